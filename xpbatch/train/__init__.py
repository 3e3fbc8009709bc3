"""Fit a scatter VAE on an XP store, on one device (``xpbatch train``).

- :mod:`~xpbatch.train.data`: which rows train, their normalisation, how they reach the device.
- :mod:`~xpbatch.train.stage`: the training loop, its checkpoints and the stage entry
  :func:`~xpbatch.train.stage.train_model`.
- :mod:`~xpbatch.train.demo`: the ``--demo`` inputs (a mock store and a small trained model).
"""
