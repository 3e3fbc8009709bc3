"""The output catalogue: one row of latents, scatter, rmse and flags per input source.

- :mod:`~xpbatch.catalog.zarr_catalog`: template, region writes, completion records, open.
- :mod:`~xpbatch.catalog.verify`: verifying a catalogue chunk by chunk, against its store too.

Written by :mod:`xpbatch.encode`; read by :mod:`xpbatch.products` and by users through
``xarray.open_zarr``. torch never enters this layer.
"""
