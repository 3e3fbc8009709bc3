"""Where outputs live and how they are written safely: the layer every stage writes through.

- :mod:`~xpbatch.storage.paths`: path helpers (atomic files, sizes, ``PathLike``).
- :mod:`~xpbatch.storage.kinds`: the store and the catalogue as kinds of output (names in
  errors, format versions).
- :mod:`~xpbatch.storage.zarr_arrays`: the Zarr layer the XP store and the catalogue share
  (array specs, codecs, templates, region writes, chunk files and their checksums).
- :mod:`~xpbatch.storage.chunk_bytes`: a chunk file's bytes without a store (rows encoded into
  them and decoded from them, their checksums).
- :mod:`~xpbatch.storage.location`: where an output or input lives, a local path or an
  ``s3://`` URL (objects, listing, removal, Zarr stores, reader options, one client per process).
- :mod:`~xpbatch.storage.clients`: object-storage settings, one client per process, errors
  without secrets.
- :mod:`~xpbatch.storage.lease`: one writer per output on object storage (a lease object made
  with conditional writes, renewed in the background) and the check that the server honours them.
- :mod:`~xpbatch.storage.outputs`: one writer per output (the lock on its real path).
- :mod:`~xpbatch.storage.manifest`: the run manifest every stage claims, resumes and completes
  its output with (the one output rule).
- :mod:`~xpbatch.storage.partitions`: the Gaia DR3 bulk partitions (HEALPix ranges of source_id).

Nothing here knows about spectra, models or Dask.
"""
