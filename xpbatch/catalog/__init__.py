"""The output catalogue: one row of latents, scatter, rmse and flags per input source.

- :mod:`~xpbatch.catalog.layout`: its variables, the template of the whole output, the chunk record.
- :mod:`~xpbatch.catalog.output`: claiming the output (create, resume, overwrite), marking it
  complete.
- :mod:`~xpbatch.catalog.writer`: writing one chunk (values checked), then its record.
- :mod:`~xpbatch.catalog.zarr_catalog`: opening and reading: attributes, records, chunk files.
- :mod:`~xpbatch.catalog.verify`: verifying a catalogue chunk by chunk, against its store too.

Written by :mod:`xpbatch.encode`; read by :mod:`xpbatch.products` and by users through
``xarray.open_zarr``. torch never enters this layer.
"""
