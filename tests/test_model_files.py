"""Malformed model files end in one ``ModelFileError`` line naming the file and what is wrong,
in ``info`` and ``encode-catalog -m`` (``neighbours`` reads the catalogue's own density):
headers, metadata, every tensor's shape and dtype, the latent density's shapes (content hash
recomputed, so only the checks against the architecture can catch them)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from xpbatch.cli.main import main
from xpbatch.errors import ModelFileError
from xpbatch.model import files
from xpbatch.model.trained import TrainedModel

Mutation = Callable[[bytes], bytes]


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _header(change: Callable[[dict], object]) -> Mutation:
    def mutate(raw: bytes) -> bytes:
        header, body = _split(raw)
        return _with_header(change(header), body)

    return mutate


def _metadata(change: Callable[[dict], object]) -> Mutation:
    return _header(lambda h: {**h, "__metadata__": change(dict(h["__metadata__"]))})


def _description(change: Callable[[dict], None]) -> Mutation:
    def meta(m: dict) -> dict:
        d = json.loads(m["xpbatch"])
        change(d)
        return {**m, "xpbatch": json.dumps(d)}

    return _metadata(meta)


def _rehashed(
    tensors: Callable[[dict[str, torch.Tensor]], None],
    description: Callable[[dict], None] = lambda d: None,
) -> Callable[[Path], None]:
    """Change tensors or description and record a matching content hash (a careful forger)."""

    def rewrite(path: Path) -> None:
        header, _ = _split(path.read_bytes())
        meta = header["__metadata__"]
        loaded = load_file(str(path))
        tensors(loaded)
        d = json.loads(meta["xpbatch"])
        description(d)
        text = json.dumps(d, sort_keys=True)
        digest = files._content_hash(text, loaded)
        save_file(loaded, str(path), metadata={**meta, "xpbatch": text, "content_sha256": digest})

    return rewrite


def _length(delta: int) -> Mutation:
    def mutate(raw: bytes) -> bytes:
        (n,) = struct.unpack("<Q", raw[:8])
        return struct.pack("<Q", n + delta) + raw[8:]

    return mutate


def _drop(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


f64 = torch.float64
BYTE_CASES: dict[str, tuple[Mutation, str]] = {
    "header a JSON list": (_header(lambda h: [1, 2]), "JSON object, found a list"),
    "__metadata__ a string": (_metadata(lambda m: "hello"), "'__metadata__' must be"),
    "no xpbatch key": (_metadata(lambda m: {**m, "xpbatch": None}), "lacks its description"),
    "metadata not JSON": (_metadata(lambda m: {**m, "xpbatch": "{no"}), "is not JSON"),
    "no architecture": (_description(_drop("architecture")), "'architecture' must be"),
    "name a number": (_description(lambda d: d.update(name=5)), "'name' must be"),
    "header length -3": (_length(-3), "corrupt"),
    "header length -1": (_length(-1), "corrupt"),
    "header length +2": (_length(2), "corrupt header"),
    "header length +5": (_length(5), "corrupt header"),
}
TENSOR_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "no normalisation.std": (
        _rehashed(lambda t: t.pop("normalisation.std")),
        "normalisation.std is missing",
    ),
    "density means shape": (
        _rehashed(lambda t: t.update({"latent_density.means": torch.zeros(1, 2, dtype=f64)})),
        "latent_density.means is torch.float64 (1, 2), expected torch.float64 (1, 6)",
    ),
    "density precision shape": (
        _rehashed(
            lambda t: (
                t.update({"latent_density.precision_cholesky": torch.eye(6, dtype=f64)[None]})
                or t.update({"latent_density.weights": torch.ones(3, dtype=f64)})
            )
        ),
        "latent_density.",
    ),
    "weight dtype": (
        _rehashed(lambda t: t.update({"network.mu.weight": t["network.mu.weight"].double()})),
        "network.mu.weight is torch.float64",
    ),
    "normalisation length": (
        _rehashed(lambda t: t.update({"normalisation.mean": torch.zeros(100, dtype=f64)})),
        "normalisation.mean",
    ),
    "normalisation NaN": (
        _rehashed(lambda t: t["normalisation.std"].__setitem__(3, float("nan"))),
        "normalisation.std holds NaN",
    ),
    "architecture huge": (
        _rehashed(lambda t: None, lambda d: d["architecture"].update(latent_dim=10**9)),
        "does not fit its architecture",
    ),
    "architecture a string": (
        _rehashed(lambda t: None, lambda d: d["architecture"].update(input_dim="110")),
        "unreadable architecture",
    ),
    "foreign tensor": (
        _rehashed(lambda t: t.update({"extra": torch.zeros(2)})),
        "tensor extra is not part of an xpbatch model",
    ),
}


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "good.safetensors"
    files.save_model(TrainedModel.untrained(seed=5), path)
    return path


def _malformed(good: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(good.read_bytes())
    if case in BYTE_CASES:
        mutate, expected = BYTE_CASES[case]
        path.write_bytes(mutate(path.read_bytes()))
    else:
        rewrite, expected = TENSOR_CASES[case]
        rewrite(path)
    return path, expected


def _one_line(result, *expected: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("case", [*BYTE_CASES, *TENSOR_CASES])
def test_a_malformed_model_file_is_one_line_in_info_and_load(
    good_model: Path, tmp_path: Path, case: str
) -> None:
    path, expected = _malformed(good_model, tmp_path, case)
    with pytest.raises(ModelFileError, match=r"bad\.safetensors"):
        files.load_model(path)
    result = CliRunner().invoke(main, ["info", str(path)])
    _one_line(result, str(path), expected)


@pytest.mark.parametrize("case", ["header a JSON list", "no xpbatch key", "density means shape"])
def test_encode_refuses_a_malformed_model_in_one_line(
    good_model: Path,
    tmp_path: Path,
    case: str,
    make_xp_store: Callable[..., Path],
    encode_untrained: Callable[[Path, Path], Path],
) -> None:
    path, expected = _malformed(good_model, tmp_path, case)
    store = make_xp_store(tmp_path / "s.zarr", 600)
    out = tmp_path / "c.zarr"
    encode = ["encode-catalog", str(store), "-m", str(path), "-o", str(out)]
    _one_line(CliRunner().invoke(main, encode), str(path), expected)
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x1f\x8b\x08\x00" + bytes(60), "gzip-compressed"),
        (b"", "empty"),
        (b"source_id,ra,dec\n1,2,3\n", "no safetensors header"),
    ],
)
def test_info_on_a_file_that_is_no_model_says_what_info_reads(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "GaiaSource_000000-003111.csv.gz"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["info", str(path)])
    _one_line(result, expected, "info reads XP stores and catalogues")
    assert "corrupt" not in result.output and f"model file {path}" not in result.output
