"""The scatter VAE and everything that travels with a trained one.

- :mod:`~xpbatch.model.network`: the network and its loss (torch only, no I/O).
- :mod:`~xpbatch.model.trained`: a trained network with its input recipe.
- :mod:`~xpbatch.model.density`: the latent space (active dimensions, density, anomaly score).
- :mod:`~xpbatch.model.files`: model files (save, load, import the published checkpoint).
- :mod:`~xpbatch.model.file_checks`: a model file's description and tensors checked on load.
- :mod:`~xpbatch.model.fit_check`: does a store look like the data the model was trained on?
- :mod:`~xpbatch.model.device`: which torch device the ``device`` option means here.
"""
