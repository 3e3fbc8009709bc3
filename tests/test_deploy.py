"""deploy/: the scripts pass bash -n and shellcheck, the manifests parse and agree with each
other and with the CLI, and the Slurm recipe (a scheduler file, workers started against it,
`xpbatch encode-catalog --scheduler-file`) runs for real on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
K8S = DEPLOY / "kubernetes"
IMAGE = "xpbatch:0.1.0"


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(DEPLOY)) for p in paths]


def _load(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _k8s(kind: str) -> list[dict[str, Any]]:
    """Every document of this kind in deploy/kubernetes/."""
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    return [d for d in docs if d and d.get("kind") == kind]


def _option_names(command: str) -> set[str]:
    """Every option spelling an xpbatch subcommand accepts (e.g. '--scheduler-file', '-o')."""
    from xpbatch.cli.main import main

    sub = main.commands[command]
    names = {"--help"}
    for param in sub.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


def _check_encode_args(args: list[str]) -> None:
    """``xpbatch [-v] encode-catalog ...`` uses only options the CLI has."""
    from xpbatch.cli.main import main

    assert args[0] == "xpbatch"
    rest = [a for a in args[1:] if a != "-v"]
    command = rest[0]
    if command not in main.commands:
        pytest.skip(f"`xpbatch {command}` is not in the CLI yet")
    unknown = {a for a in rest[1:] if a.startswith("-")} - _option_names(command)
    assert not unknown, f"options unknown to `xpbatch {command}`: {sorted(unknown)}"


# --- scripts --------------------------------------------------------------------------------
def test_there_are_scripts_and_manifests() -> None:
    assert [p.name for p in SCRIPTS] == ["encode.sbatch", "single-node-slurm.sh"]
    assert len(YAML_FILES) >= 7


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_script_is_valid_bash(script: Path) -> None:
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_script_passes_shellcheck(script: Path, shellcheck: str) -> None:
    result = subprocess.run([shellcheck, script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_script_runs_encode_catalog_with_scheduler_file_and_resume() -> None:
    text = (DEPLOY / "slurm" / "encode.sbatch").read_text()
    encode = text[text.index("xpbatch -v encode-catalog") :].split("&\n")[0]
    args = encode.replace("\\\n", " ").split()
    assert {"--scheduler-file", "--resume", "--model", "-o"} <= set(args)
    _check_encode_args([a for a in args if not a.startswith(('"', "$"))])
    assert "#SBATCH --requeue" in text and "trap on_sigterm TERM" in text
    assert "dask scheduler --scheduler-file" in text


def test_jobqueue_config_makes_a_valid_one_gpu_worker_job() -> None:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is in the test extra")
    result = subprocess.run(
        [sys.executable, DEPLOY / "slurm" / "encode_jobqueue.py", "--print-job-script"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "#SBATCH --gpus=1" in script and "--nthreads 8" in script  # 8 tasks per GPU
    assert "distributed.cli.dask_worker tcp://" in script
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


# --- manifests ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def _worker_containers() -> list[dict[str, Any]]:
    specs = [d["spec"]["worker"]["spec"] for d in _k8s("DaskCluster") + _k8s("DaskWorkerGroup")]
    return [c for spec in specs for c in spec["containers"]]


def test_kubernetes_workers_are_gpu_dask_cuda_workers_of_our_image() -> None:
    workers = _worker_containers()
    assert len(workers) == 2
    for container in workers:
        assert container["args"][:3] == ["dask", "cuda", "worker"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"] == IMAGE


def test_kubernetes_manifests_agree_with_each_other() -> None:
    (cluster,) = _k8s("DaskCluster")
    (group,) = _k8s("DaskWorkerGroup")
    (job,) = _k8s("Job")
    (claim,) = _k8s("PersistentVolumeClaim")
    (policy,) = _k8s("NetworkPolicy")
    name = cluster["metadata"]["name"]
    service = cluster["spec"]["scheduler"]["service"]
    port = {p["name"]: p["port"] for p in service["ports"]}["tcp-comm"]

    assert group["spec"]["cluster"] == name
    assert service["type"] == "ClusterIP"  # cluster-internal by default
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--cluster") + 1] == f"tcp://{name}-scheduler:{port}"
    assert "--resume" in args
    _check_encode_args(args)
    pod_specs = [
        cluster["spec"]["worker"]["spec"],
        group["spec"]["worker"]["spec"],
        job["spec"]["template"]["spec"],
    ]
    for spec in pod_specs:
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [claim["metadata"]["name"]]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"dask.org/cluster-name": name}
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    allowed = [
        f["podSelector"]["matchLabels"]
        for f in policy["spec"]["ingress"][0]["from"]
        if "podSelector" in f
    ]
    assert any(labels.items() <= job_labels.items() for labels in allowed)


def test_compose_publishes_on_localhost_and_runs_encode_against_its_scheduler() -> None:
    compose = _load(DEPLOY / "docker" / "docker-compose.yml")
    services = compose["services"]
    assert {"scheduler", "worker", "cpu-worker", "encode"} <= set(services)
    for spec in services.values():
        for port in spec.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} would listen on every interface"
    gpus = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["capabilities"] == ["gpu"]
    encode = services["encode"]["command"]
    assert encode[encode.index("--cluster") + 1] == "tcp://scheduler:8786"
    _check_encode_args(encode)
    assert compose["x-xpbatch"]["image"] == IMAGE


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [s for c in copies for s in c]
    assert sources == ["pyproject.toml", "README.md", "xpbatch"]
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
        assert f"!{source}" in ignore or f"!{source}/" in ignore
    assert 'pip install ".[cuda13]"' in dockerfile
    assert 'python -c "import dask_cuda"' in dockerfile  # checked when the image is built


# --- the real thing: a scheduler file, workers started against it, encode-catalog -----------
BIN = Path(sys.executable).parent  # dask and xpbatch of this environment


@pytest.fixture(scope="module")
def encode_inputs(tmp_path_factory: pytest.TempPathFactory, make_xp_store) -> dict[str, Path]:
    """A 3-chunk store, a model, and the catalogue encoded serially (the reference)."""
    import xpbatch
    from xpbatch.config import EncodeConfig
    from xpbatch.model.files import save_model
    from xpbatch.model.trained import TrainedModel

    root = tmp_path_factory.mktemp("deploy")
    store = make_xp_store(root / "store.zarr", 1500, chunk_rows=500)
    model = root / "model.safetensors"
    save_model(TrainedModel.untrained(seed=7), model)
    serial = root / "serial.zarr"
    xpbatch.encode_catalog(store, model, serial, config=EncodeConfig(progress_bar=False))
    return {"store": store, "model": model, "serial": serial}


def _assert_same_catalog(got: Path, expected: Path) -> None:
    import xpbatch

    a, b = xpbatch.open_catalog(got).load(), xpbatch.open_catalog(expected).load()
    assert sorted(a.variables) == sorted(b.variables)
    for name in b.variables:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def _wait_for(condition, what: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s; exited: {dead}")
        time.sleep(0.2)


@pytest.fixture
def scheduler_file_cluster(tmp_path: Path) -> Iterator[Path]:
    """`dask scheduler --scheduler-file` and a `dask worker --scheduler-file`, as encode.sbatch
    starts them (here on 127.0.0.1); every process is stopped in the end."""
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")  # noqa: SIM115 - closed in finally
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        procs.append(subprocess.Popen([BIN / "dask", *args], stdout=log, stderr=subprocess.STDOUT))

    try:
        start(
            "scheduler",
            "--scheduler-file",
            str(scheduler_file),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
        )
        _wait_for(scheduler_file.exists, "the scheduler file", 60, procs)
        # One worker: sharing chunks among several is test_pipeline's (on a LocalCluster).
        start(
            "worker",
            "--scheduler-file",
            str(scheduler_file),
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--local-directory",
            str(tmp_path),
        )
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield scheduler_file
    finally:
        # Workers first, then the scheduler (as encode.sbatch does): a worker whose scheduler
        # is gone first tries to reconnect, which only makes the shutdown slower.
        for group in (procs[1:], procs[:1]):
            for proc in group:
                proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.close()


def test_encode_catalog_on_a_scheduler_file_cluster_equals_serial(
    encode_inputs: dict[str, Path], scheduler_file_cluster: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cluster.zarr"
    result = subprocess.run(
        [
            BIN / "xpbatch",
            "encode-catalog",
            encode_inputs["store"],
            "--model",
            encode_inputs["model"],
            "-o",
            out,
            "--scheduler-file",
            scheduler_file_cluster,
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified complete" in result.stdout
    _assert_same_catalog(out, encode_inputs["serial"])


@pytest.fixture(scope="module")
def slurm_up() -> bool:
    """Whether a Slurm controller answers with an idle node, asked once: ``sinfo`` retries for
    seconds when Slurm is installed but not running."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    idle = subprocess.run(
        ["sinfo", "--noheader", "--states=idle,mixed"], capture_output=True, text=True, timeout=20
    )
    return idle.returncode == 0 and bool(idle.stdout.strip())


@pytest.fixture
def slurm(slurm_up: bool) -> None:
    """Skip unless Slurm is up with an idle node (single-node-slurm.sh starts one)."""
    if not slurm_up:
        pytest.skip("no Slurm with an idle node here (sudo deploy/slurm/single-node-slurm.sh)")


@pytest.mark.slow
def test_encode_sbatch_runs_on_a_single_node_slurm(
    slurm: None, encode_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """The real batch script through real Slurm (deploy/slurm/single-node-slurm.sh starts one)."""
    out = tmp_path / "slurm.zarr"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "XPBATCH_WORKER_CMD": "dask worker --nworkers 1 --nthreads 1 --no-dashboard",
        "XPBATCH_N_WORKERS": "1",
        "XPBATCH_WAIT_TIMEOUT": "120",
    }
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            "--mem=2G",
            "--time=10",
            f"--output={tmp_path}/slurm-%j.log",
            f"--chdir={tmp_path}",
            DEPLOY / "slurm" / "encode.sbatch",
            encode_inputs["store"],
            encode_inputs["model"],
            out,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        state = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
            state = (
                show.stdout.split("JobState=")[1].split()[0] if "JobState=" in show.stdout else ""
            )
            if state in {
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            }:
                break
            time.sleep(0.5)
        log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.log"))
        assert state == "COMPLETED", f"job {job} ended {state or 'unknown'}:\n{log[-3000:]}"
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert "encode-catalog exited with status 0" in log
    assert not list(tmp_path.glob("xpbatch-scheduler-*.json"))  # cleaned up
    _assert_same_catalog(out, encode_inputs["serial"])


@pytest.mark.slow
def test_jobqueue_launcher_runs_on_a_single_node_slurm(
    slurm: None, encode_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """encode_jobqueue.py with jobqueue.yaml made CPU-only: worker jobs really go through Slurm."""
    config = _load(DEPLOY / "slurm" / "jobqueue.yaml")
    slurm = config["jobqueue"]["slurm"]
    slurm["job-extra-directives"].remove("--gpus=1")
    slurm.update({"memory": "2GiB", "cores": 1, "job-cpu": 1, "local-directory": str(tmp_path)})
    slurm["log-directory"] = str(tmp_path / "logs")
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "jobqueue.zarr"
    result = subprocess.run(
        [
            sys.executable,
            DEPLOY / "slurm" / "encode_jobqueue.py",
            encode_inputs["store"],
            encode_inputs["model"],
            out,
            "--jobs",
            "1",
            "--config",
            tmp_path / "cpu.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_catalog(out, encode_inputs["serial"])


def test_the_object_storage_variant_has_no_shared_volume_and_secrets_from_a_secret() -> None:
    """deploy/kubernetes/object-storage: every pod reads the AWS variables from one Secret,
    no pod mounts a PersistentVolumeClaim, and the Job encodes s3:// to s3:// with --resume."""
    docs = [
        d
        for p in sorted((K8S / "object-storage").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (cluster,) = [d for d in docs if d["kind"] == "DaskCluster"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    name = secret["metadata"]["name"]
    specs = [cluster["spec"]["worker"]["spec"], job["spec"]["template"]["spec"]]
    for spec in specs:
        assert all("persistentVolumeClaim" not in v for v in spec.get("volumes", []))
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            assert {"secretRef": {"name": name}} in container["envFrom"]
            assert "REPLACE_ME" not in str(container)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[3].startswith("s3://") and args[args.index("-o") + 1].startswith("s3://")
    assert (
        args[args.index("--cluster") + 1] == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    )
    assert "--resume" in args
    _check_encode_args(args)
