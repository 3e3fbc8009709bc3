"""Benchmarks run by ``xpbatch bench ...``: each measures one stage on mock data."""
