"""The input XP store: the Zarr group of DR3 XP coefficients that every later stage reads.

- :mod:`~xpbatch.store.xp_store`: writing a store: template, chunk-aligned regions, finalize.
- :mod:`~xpbatch.store.reader`: opening a store, its identity, reading it chunk by chunk.
- :mod:`~xpbatch.store.layout`: its variables (names, dtypes, dimensions, fill values).
- :mod:`~xpbatch.store.checks`: checking a store (schema, source_id order, chunk files).
- :mod:`~xpbatch.store.input_recipe`: the input recipe: the rows' flags and the model's input.

Written by :mod:`xpbatch.ingest` and :mod:`xpbatch.mock`; torch never enters this layer.
"""
