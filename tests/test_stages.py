"""One shape for every stage: the same signature, the same resume convention, a summary to print.

The convention (docs/troubleshooting.md, "Resuming and replacing outputs") is
:class:`xpbatch.storage.manifest.RunManifest`;
each stage's own tests check it on real outputs (test_ingest, test_train, test_export,
test_hats_export, test_catalog), these check the rule itself and the stages' shape.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from xpbatch.config import (
    EncodeConfig,
    HatsExportConfig,
    IngestConfig,
    ParquetExportConfig,
    TrainConfig,
    result_options,
)
from xpbatch.errors import ConfigError, OutputExistsError, ResumeRefusedError
from xpbatch.storage.manifest import JsonRecord, RunManifest


def _stages() -> dict[str, tuple[Callable[..., object], type]]:
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.ingest import ingest_files, ingest_table
    from xpbatch.products.hats_export import export_hats
    from xpbatch.products.parquet_export import export_parquet
    from xpbatch.train.stage import train_model

    return {
        "ingest": (ingest_files, IngestConfig),
        "ingest-table": (ingest_table, IngestConfig),
        "train": (train_model, TrainConfig),
        "encode-catalog": (encode_catalog, EncodeConfig),
        "export-parquet": (export_parquet, ParquetExportConfig),
        "export-hats": (export_hats, HatsExportConfig),
    }


@pytest.mark.parametrize("name", list(_stages()))
def test_every_stage_has_one_shape(name: str) -> None:
    """stage(inputs, out, *, config=..., client=...) -> a frozen summary with its own __str__."""
    stage, config_class = _stages()[name]
    parameters = inspect.signature(stage).parameters
    positional = [p.name for p in parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional[-1] in ("out", "output_dir"), positional
    assert parameters["config"].kind is inspect.Parameter.KEYWORD_ONLY
    if name != "train":  # one device, no cluster: train has no client to ignore
        assert parameters["client"].kind is inspect.Parameter.KEYWORD_ONLY
    function = inspect.unwrap(stage)
    summary = eval(function.__annotations__["return"], function.__globals__)  # the return class
    assert dataclasses.is_dataclass(summary) and summary.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert summary.__str__ is not object.__str__ and "__str__" in vars(summary)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    assert {"resume", "overwrite"} <= set(fields), f"{config_class.__name__} lacks resume/overwrite"
    with pytest.raises(ConfigError, match="give one"):
        config_class(resume=True, overwrite=True)


def test_run_control_fields_are_never_part_of_a_result() -> None:
    """A resumed output records the same options as an uninterrupted one."""
    assert result_options(TrainConfig(resume=True)) == result_options(TrainConfig())
    assert "progress_bar" not in result_options(HatsExportConfig(progress_bar=False))


# --- the rule: (what is there, the flags) -> new, resumed, replaced or refused -----------------
CASES = {
    # name: (what is there, resume, overwrite, expected: True/False or an error class)
    "nothing-there": (None, False, False, False),
    "nothing-there-resume-starts-new": (None, True, False, False),
    "ours-no-flag-refused": ("thing", False, False, OutputExistsError),
    "ours-resume": ("thing", True, False, True),
    "ours-overwrite-removes": ("thing", False, True, False),
    "foreign-no-flag-refused": ("foreign", False, False, OutputExistsError),
    "foreign-overwrite-refused": ("foreign", False, True, OutputExistsError),
    "foreign-resume-refused": ("foreign", True, False, ResumeRefusedError),
    "other-kind-overwrite-refused": ("other", False, True, OutputExistsError),
    "other-kind-resume-refused": ("other", True, False, ResumeRefusedError),
    "empty-directory-is-ours": ("empty", False, True, False),
}


def _manifest(out: Path, fingerprint: dict[str, object] | None = None) -> RunManifest:
    return RunManifest(out, kind="thing", record=JsonRecord.inside(out), fingerprint=fingerprint)


@pytest.mark.parametrize("case", list(CASES))
def test_the_one_output_rule(case: str, tmp_path: Path) -> None:
    there, resume, overwrite, expected = CASES[case]
    out = tmp_path / "out"
    if there is not None:
        out.mkdir()
    if there == "thing":
        _manifest(out).begin()
    elif there == "other":
        RunManifest(out, kind="other thing", record=JsonRecord.inside(out)).begin()
    elif there == "foreign":
        (out / "notes.txt").write_text("mine")
    removed: list[bool] = []
    run = _manifest(out)
    claim = {
        "resume": resume,
        "overwrite": overwrite,
        "found": "a thing, 2 of 3 done",
        "remove": lambda: removed.append(True),
    }
    if isinstance(expected, bool):
        assert run.claim(**claim) is expected  # type: ignore[arg-type]
        assert removed == ([True] if overwrite else [])
        return
    with pytest.raises(expected) as error:
        run.claim(**claim)  # type: ignore[arg-type]
    assert not removed  # a refusal changes nothing
    message = str(error.value)
    assert "Nothing was changed" in message
    if there == "thing":  # what is there, and both ways on
        assert "a thing, 2 of 3 done" in message and "--resume" in message
        assert "--overwrite" in message
    elif there == "other":
        assert "an xpbatch other thing, not the thing" in message
        assert "another output path" in message
    else:
        assert "not an xpbatch thing" in message and "another output path" in message


def test_check_names_every_difference(tmp_path: Path) -> None:
    recorded = json.loads(json.dumps({"inputs": ("a", "b"), "chunk_rows": 512, "seed": 1}))
    _manifest(tmp_path, {"inputs": ("a", "b"), "chunk_rows": 512, "seed": 1}).check(recorded)
    with pytest.raises(ResumeRefusedError) as error:
        _manifest(tmp_path, {"inputs": ["a"], "chunk_rows": 256, "seed": 1}).check(recorded)
    message = str(error.value)
    assert "chunk_rows: 512 there, 256 now" in message and "inputs: " in message
    assert "seed" not in message and "--overwrite" in message


def test_a_resumed_run_is_checked_planned_recorded_and_completed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _manifest(out, {"input": "a"})
    assert first.claim(resume=True, overwrite=False) is False
    first.begin()
    first.record_done("1", 10)
    record = json.loads((out / "_xpbatch_run.json").read_text())
    assert record["kind"] == "thing" and record["complete"] is False
    assert record["done"] == {"1": 10} and record["fingerprint"] == {"input": "a"}
    with pytest.raises(ResumeRefusedError, match="input: 'a' there, 'b' now"):
        _manifest(out, {"input": "b"}).claim(resume=True, overwrite=False)
    again = _manifest(out, {"input": "a"})
    assert again.claim(resume=True, overwrite=False) is True and not again.complete
    assert again.recorded_done() == {"1": 10}
    again.begin()
    again.mark_complete(files=2)
    record = json.loads((out / "_xpbatch_run.json").read_text())
    assert record["complete"] is True and record["files"] == 2 and len(record["resumed"]) == 1


def test_resume_plan_splits_only_when_resuming(tmp_path: Path) -> None:
    items = [1, 2, 3, 4]
    out = tmp_path / "out"
    _manifest(out).begin()
    resumed = _manifest(out)
    resumed.claim(resume=True, overwrite=False)
    plan = resumed.plan(items, lambda i: i % 2 == 0)
    assert (plan.done, plan.todo) == ((2, 4), (1, 3))
    fresh = _manifest(tmp_path / "new").plan(items, lambda i: pytest.fail("a new run asks nothing"))
    assert (fresh.done, fresh.todo) == ((), (1, 2, 3, 4))
