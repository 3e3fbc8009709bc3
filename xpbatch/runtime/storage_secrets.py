"""The secrets of explicit storage options, given to every Dask worker by a plugin.

A task never carries a secret: a pickled :class:`~xpbatch.storage.clients.StorageOptions`
holds only the name of its secrets (its ``secret_ref``). Workers take credentials from their
own environment (the usual case: a Kubernetes Secret as the AWS variables), or, when the user
gave them as options, from :class:`StorageSecrets`, registered once per worker for the run.
"""

from __future__ import annotations

from distributed import WorkerPlugin


class StorageSecrets(WorkerPlugin):
    """Gives every worker process the secrets of explicit storage options, once, outside every
    task graph: the tasks then carry only the options' ``secret_ref``
    (:meth:`xpbatch.storage.clients.StorageOptions.__reduce__`), never a key.

    Without it (the usual case) workers take credentials from their own environment, as a
    Kubernetes pod does from a Secret (docs/clusters.md).
    """

    def __init__(self, secrets: dict[str, tuple[str | None, str | None, str | None]]) -> None:
        self._secrets = secrets

    def __repr__(self) -> str:
        return f"StorageSecrets({len(self._secrets)} set(s), values hidden)"

    def setup(self, worker: object) -> None:
        from xpbatch.storage.clients import register_secrets

        for ref, values in self._secrets.items():
            register_secrets(ref, values)
