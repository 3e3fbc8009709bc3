"""What users make from a catalogue: exports, sky maps, pictures and searches.

- :mod:`~xpbatch.products.parquet_export`: Parquet, one file per DR3 partition.
- :mod:`~xpbatch.products.hats_export`: a HATS catalogue that LSDB opens and joins.
- :mod:`~xpbatch.products.sky_positions`: where a catalogue's rows are on the sky.
- :mod:`~xpbatch.products.sky_maps`: HEALPix maps of a catalogue, drawn in Mollweide.
- :mod:`~xpbatch.products.neighbours`: exact k-nearest search in latent space.
- :mod:`~xpbatch.products.anomalies`: the most anomalous sources (``top_anomalies``).
- :mod:`~xpbatch.products.spectra`: spectra in wavelength (nm) through GaiaXPy's sampling.
- :mod:`~xpbatch.products.plots`: spectrum and latent corner plots, as matplotlib figures.
"""
