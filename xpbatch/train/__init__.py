"""Fit a scatter VAE on an XP store, on one device (``xpbatch train``).

- :mod:`~xpbatch.train.data`: which rows train, and their normalisation.
- :mod:`~xpbatch.train.feed`: how those rows reach the device, batch by batch.
- :mod:`~xpbatch.train.loop`: the training loop (epochs, validation, early stopping, NaN and
  Ctrl-C).
- :mod:`~xpbatch.train.checkpoints`: the run's files, its resumable state and what a resume must
  match.
- :mod:`~xpbatch.train.model_file`: the model file a run ends with (latent density, fit
  statistics, provenance).
- :mod:`~xpbatch.train.summary`: the per-epoch records (the metrics file) and the run's summary.
- :mod:`~xpbatch.train.stage`: the stage entry :func:`~xpbatch.train.stage.train_model`.
- :mod:`~xpbatch.train.demo`: the ``--demo`` inputs (a mock store and a small trained model).
"""
