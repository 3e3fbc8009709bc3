"""Fit a scatter VAE on an XP store, on one device (``xpbatch train``).

- :mod:`~xpbatch.train.data`: which rows train, and their normalisation.
- :mod:`~xpbatch.train.feed`: how those rows reach the device, batch by batch.
- :mod:`~xpbatch.train.stage`: the training loop, its checkpoints and the stage entry
  :func:`~xpbatch.train.stage.train_model`.
- :mod:`~xpbatch.train.demo`: the ``--demo`` inputs (a mock store and a small trained model).
"""
