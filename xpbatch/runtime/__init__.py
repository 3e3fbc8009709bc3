"""Where tasks run: the executor every stage maps its items with, and the cluster it connects to.

- :mod:`~xpbatch.runtime.executor`: the one ``Executor`` (serially, in threads, or on a Dask
  client) that maps a function over many items: bounded, retried, failures named, with a
  progress bar.
- :mod:`~xpbatch.runtime.cluster`: connect to a LocalCluster, dask-cuda or a running scheduler.
- :mod:`~xpbatch.runtime.storage_secrets`: the worker plugin that gives workers the secrets of
  explicit storage options, outside every task.
- :mod:`~xpbatch.runtime.report_logs`: a performance report without distributed's warning
  about the size of the profiles it gathers.
- :mod:`~xpbatch.runtime.interrupts`: Ctrl-C without the cluster's shutdown tracebacks.

This is the only layer (with the encode stage's worker plugin) that imports ``distributed``.
"""
