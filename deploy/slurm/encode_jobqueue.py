#!/usr/bin/env python
"""Encode an XP store on Slurm with dask-jobqueue: this process runs the Dask scheduler and the
encode; every Dask worker is a Slurm job with one GPU (see jobqueue.yaml beside this file).

    pip install 'xpbatch[cuda13]' dask-jobqueue
    python deploy/slurm/encode_jobqueue.py STORE MODEL OUTPUT --jobs 8
    python deploy/slurm/encode_jobqueue.py --print-job-script   # what each worker job runs

Run it where it may live for the whole encode (a login node inside tmux, or a small CPU job):
when it stops, its worker jobs are cancelled. Rerunning the same command resumes from the
catalogue's finished blocks, so an interrupted run (or a preempted worker) loses no work.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("xpbatch.deploy.jobqueue")


def load_jobqueue_config(path: Path) -> None:
    """Merge a dask-jobqueue YAML file into Dask's configuration (this file wins)."""
    import dask.config
    import yaml

    with open(path) as f:
        loaded = yaml.safe_load(f)
    if not isinstance(loaded, dict) or "slurm" not in loaded.get("jobqueue", {}):
        raise SystemExit(f"{path} has no 'jobqueue: slurm:' section; see {HERE / 'jobqueue.yaml'}")
    dask.config.update(dask.config.config, loaded, priority="new")


def make_cluster(*, tls: bool) -> Any:
    """A SLURMCluster from the loaded configuration; TLS with throw-away certificates if asked."""
    from dask_jobqueue import SLURMCluster

    # security=True makes dask-jobqueue create temporary certificates (needs `cryptography`) and
    # share them with the worker jobs through the (shared) working directory.
    return SLURMCluster(security=True if tls else None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", nargs="?", help="input XP store (Zarr)")
    parser.add_argument("model", nargs="?", help="model file (.safetensors)")
    parser.add_argument("output", nargs="?", help="catalogue to write or resume (Zarr)")
    parser.add_argument("--jobs", type=int, default=4, help="worker jobs (= GPUs) [4]")
    parser.add_argument(
        "--config", type=Path, default=HERE / "jobqueue.yaml", help="dask-jobqueue YAML file"
    )
    parser.add_argument("--tls", action="store_true", help="encrypt and authenticate with TLS")
    parser.add_argument(
        "--print-job-script", action="store_true", help="print a worker job's script and exit"
    )
    args = parser.parse_args(argv)
    if not args.print_job_script and None in (args.store, args.model, args.output):
        parser.error("STORE, MODEL and OUTPUT are required (or give --print-job-script)")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    load_jobqueue_config(args.config)
    # SIGTERM (scancel of a launcher job, preemption) unwinds the `with` blocks below, which
    # cancels the worker jobs instead of leaving them to time out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    with make_cluster(tls=args.tls) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        from distributed import Client

        import xpbatch
        from xpbatch.config import EncodeConfig

        with Client(cluster) as client:
            logger.info("dashboard %s (ssh -L 8787:localhost:8787 HOST)", client.dashboard_link)
            cluster.scale(jobs=args.jobs)
            # Logs its summary (rows, flags, speed) at INFO when it is done.
            xpbatch.encode_catalog(
                args.store, args.model, args.output, client=client, config=EncodeConfig(resume=True)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
