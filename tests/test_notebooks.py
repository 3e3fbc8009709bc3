"""notebooks/: each notebook runs from top to bottom on small data (nbclient, a real kernel),
from the repository root or from notebooks/ (where Jupyter starts them), does the work it
promises, and is stored without outputs; the docs site shows the executed notebooks with their
figures."""

from __future__ import annotations

import ast
import dataclasses
import html
import os
from collections.abc import Callable
from pathlib import Path

import nbformat
import numpy as np
import pytest
from test_stray_warnings import STRAY

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))
N_ROWS, CHUNK_ROWS = 3000, 1000
STARTS = pytest.mark.parametrize("start", [REPO, NOTEBOOKS], ids=["from-root", "from-notebooks"])
"""Jupyter starts a kernel in the repository root or in notebooks/. What the start changes is
what a parameters cell derives from the working directory (the checkout's demo cache), and
every parameters cell runs from both starts; each whole notebook runs from notebooks/, where
Jupyter starts it, since each run after the parameters takes the same absolute paths from either."""


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A mock store with labels, a briefly trained model, and its catalogue."""
    import xpbatch
    from xpbatch.config import EncodeConfig
    from xpbatch.mock import write_mock_store
    from xpbatch.train.demo import DEMO_TRAINING

    root = tmp_path_factory.mktemp("notebooks")
    store = write_mock_store(root / "mock.zarr", N_ROWS, seed=1, chunk_rows=CHUNK_ROWS)
    model = root / "model.safetensors"
    training = dataclasses.replace(DEMO_TRAINING, epochs=2, cycle_epochs=2, sample=None)
    xpbatch.train_model(store, model, config=dataclasses.replace(training, progress_bar=False))
    catalog = root / "catalog.zarr"
    xpbatch.encode_catalog(store, model, catalog, config=EncodeConfig(progress_bar=False))
    return {"root": root, "store": store, "model": model, "catalog": catalog}


EXECUTED_DIR = REPO / "build" / "notebooks"
"""Each executed notebook is written here (git-ignored), where the docs build takes its outputs
from (docs/executed_notebooks.py)."""

PLOTS = ("plt.show()", "draw_sky_maps(", "plot_spectrum(", "plot_latents(")
"""A code cell that contains one of these draws a figure, which must show in its outputs."""


def _parameters(name: str, inputs: dict[str, Path], out: Path) -> dict[str, object]:
    """The parameters each notebook runs with here: the small inputs, its own outputs in
    ``out``."""
    return {
        "01_quickstart": {
            "STORE": inputs["store"],
            "MODEL": inputs["model"],
            "OUTPUT": out / "quickstart.zarr",
            "DASHBOARD": "127.0.0.1:0",
            "WORKERS": 1,
        },
        "02_explore_catalog": {
            "CATALOG": inputs["catalog"],
            "STORE": inputs["store"],
            "MODEL": inputs["model"],
            "BINS": 20,
            "SKY_ORDER": 2,
        },
        "03_train": {
            "STORE": inputs["store"],
            "MODEL_OUT": out / "nb-model.safetensors",
            "EPOCHS": 2,
            "SAMPLE": 0,
        },
        "04_anomalies": {
            "CATALOG": inputs["catalog"],
            "STORE": inputs["store"],
            "MODEL": inputs["model"],
            "TOP": 5,
            "SHOWN": 2,
            "K": 4,
        },
        "05_lsdb": {
            "CATALOG": inputs["catalog"],
            "HATS": out / "hats",
            "GAIA": out / "gaia",
            "ORDER": 5,
            "WORKERS": 1,
        },
        "06_uncertainties": {
            "MODEL": inputs["model"],
            "WORK": out / "work",
            "STARS": 600,
            "K": 8,
            "CLOUD": 50,
        },
    }[name]


def _execute(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, **env: object) -> str:
    """Run ``notebooks/<name>.ipynb`` in a fresh kernel started in ``cwd``; return all the text
    it printed, after checking that every cell that plots shows its figure (the kernel's own
    inline backend, as in Jupyter). Every path it writes comes from ``env``, so running in the
    checkout is safe."""
    from nbclient import NotebookClient

    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel chooses inline, as in Jupyter
    for key, value in env.items():
        monkeypatch.setenv(f"XPBATCH_NB_{key}", str(value))
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(
        book, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    plotting = [
        c for c in book.cells if c.cell_type == "code" and any(p in c.source for p in PLOTS)
    ]
    assert plotting or name == "01_quickstart", f"{name}: no figure at all?"
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"{name}: this cell drew no figure in its outputs:\n{cell.source}"
    for cell in book.cells:
        for output in cell.get("outputs", []):
            stray = STRAY.findall(output.get("text", "")) if output.get("name") == "stderr" else []
            assert not stray, f"{name}: this cell printed {stray}:\n{cell.source}"
    EXECUTED_DIR.mkdir(parents=True, exist_ok=True)
    copy = EXECUTED_DIR / f"{name}.ipynb"
    partial = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
    nbformat.write(book, partial)
    partial.replace(copy)  # whole or not at all: a docs build may read it meanwhile
    texts = []
    for cell in book.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=[p.stem for p in NOTEBOOK_FILES])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell: the parameters"


@STARTS
def test_every_parameters_cell_finds_the_checkouts_demo_cache(
    start: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parameters cell of every notebook, with its defaults, in one kernel per start."""
    from nbclient import NotebookClient

    for key in [k for k in os.environ if k.startswith("XPBATCH_NB_")] + ["XPBATCH_DEMO_DIR"]:
        monkeypatch.delenv(key, raising=False)
    show = (
        "print(sorted(str(v) for k, v in globals().items()\n"
        "             if k.isupper() and 'xpbatch-demo' in str(v)))"
    )
    cells = []
    for path in NOTEBOOK_FILES:
        first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        cells += [nbformat.v4.new_code_cell(first.source), nbformat.v4.new_code_cell(show)]
    cells.append(
        nbformat.v4.new_code_cell("from xpbatch.train.demo import demo_dir\nprint(demo_dir())")
    )
    book = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(
        book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(start)}}
    ).execute()
    assert book.cells[-1].outputs[0]["text"].strip() == str(REPO / "xpbatch-demo")
    shown = [ast.literal_eval(c.outputs[0]["text"]) for c in book.cells[1:-1:2]]
    for path, values in zip(NOTEBOOK_FILES, shown, strict=True):
        for value in values:
            assert value.startswith(str(REPO / "xpbatch-demo")), (path.name, value)
    assert sum(map(len, shown)) >= 4  # the defaults derived from the demo cache were seen


def _check_quickstart(text: str, inputs: dict[str, Path], out: Path) -> None:
    """A cluster with its dashboard link, a catalogue encoded and verified, its summary."""
    import xpbatch

    assert "dashboard: http://127.0.0.1:" in text
    assert f"rows           {N_ROWS:,} in 3 chunks" in text and "verified complete" in text
    assert "rows per flag bit (flags)" in text  # the info summary at the end
    assert xpbatch.open_catalog(out / "quickstart.zarr").sizes["source"] == N_ROWS


def _check_explore(text: str, inputs: dict[str, Path], out: Path) -> None:
    """Histograms over every encoded row, the mock labels used, the sky maps' pixels."""
    import xpbatch
    from xpbatch.schema import CatalogFlag

    flags = xpbatch.open_catalog(inputs["catalog"]).flags.values
    n_encoded = int(((flags & CatalogFlag.NOT_ENCODED) == 0).sum())
    assert "15 histograms of 20x20 bins; the (z0, z1) panel holds " in text
    assert f"of the {n_encoded:,} encoded rows" in text
    assert "no labels beside" not in text  # the mock labels were found and used
    assert "is not the model that made this catalogue" not in text
    assert f"sky maps: {N_ROWS:,} sources on 192 pixels" in text


def _check_train(text: str, inputs: dict[str, Path], out: Path) -> None:
    """A model trained, and its active dimensions counted as `xpbatch info` counts them."""
    import xpbatch
    from xpbatch.cli.info import format_summary, summarize

    assert "latent dimensions active" in text and "'z5'" in text
    model_path = out / "nb-model.safetensors"
    model = xpbatch.load_model(model_path)
    assert model.provenance["epochs"] == 2
    # The notebook's count is the model's own, the one `xpbatch info` prints.
    n_active = len(model.density.active_dims)
    assert f"{n_active} of 6 latent dimensions active" in text
    assert f"{model.density.active_dims} (KL >= " in format_summary(summarize(model_path))


def _check_anomalies(text: str, inputs: dict[str, Path], out: Path) -> None:
    """The top anomalies of the whole column, and neighbours with the mock labels joined."""
    import xpbatch

    ds = xpbatch.open_catalog(inputs["catalog"])
    n_encoded = int(np.isfinite(ds.anomaly_score.values).sum())
    assert f"the 5 most anomalous of {n_encoded:,} encoded sources" in text
    assert str(int(ds.source_id.values[np.nanargmax(ds.anomaly_score.values)])) in text
    assert "4 neighbours of source " in text and "'teff'" in text  # the mock labels joined


def _check_lsdb(text: str, inputs: dict[str, Path], out: Path) -> None:
    """The HATS export written, a cone search as by direct separation, the join complete."""
    assert f"wrote {N_ROWS:,} rows" in text
    assert "as by direct separation: True" in text
    assert f"joined {N_ROWS:,} of {N_ROWS:,} rows, {N_ROWS:,} distinct source_id" in text


def _check_uncertainties(text: str, inputs: dict[str, Path], out: Path) -> None:
    """Pairs of repeat observations encoded with Monte-Carlo draws, two clouds, the z table."""
    import xpbatch

    ds = xpbatch.open_catalog(out / "work" / "pairs-catalog.zarr")
    assert ds.sizes["source"] == 1200 and "latent_std_mc" in ds
    assert "complete pairs of 600 stars; 8 draws per spectrum" in text
    assert text.count("cloud std") == 2 and "x the cloud" in text
    assert "sigma = latent_std: std(z) over all pairs" in text
    assert "sigma = latent_std_mc: std(z) over all pairs" in text


CHECKS: dict[str, Callable[[str, dict[str, Path], Path], None]] = {
    "01_quickstart": _check_quickstart,
    "02_explore_catalog": _check_explore,
    "03_train": _check_train,
    "04_anomalies": _check_anomalies,
    "05_lsdb": _check_lsdb,
    "06_uncertainties": _check_uncertainties,
}
"""What each notebook must have done, from the text it printed and the files it wrote."""


@pytest.mark.slow  # a kernel per notebook (hats-import on a cluster in 05), then mkdocs build
def test_every_notebook_runs_and_the_docs_site_shows_its_figures(
    small_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each notebook runs whole from notebooks/ (where Jupyter starts it), does its work and
    shows every figure in its outputs; then the site, built in strict mode from these executed
    copies, shows each notebook page with every figure as an image and the text it printed.

    One test, so that the site is built from copies this run executed (pytest-xdist gives no
    order between tests), and no notebook runs twice."""
    from test_docs import build_site

    assert sorted(CHECKS) == [p.stem for p in NOTEBOOK_FILES], "a notebook without its checks"
    books = {}
    for path in NOTEBOOK_FILES:
        out = tmp_path / path.stem
        out.mkdir()
        parameters = _parameters(path.stem, small_inputs, out)
        text = _execute(path.stem, NOTEBOOKS, monkeypatch, **parameters)
        CHECKS[path.stem](text, small_inputs, out)
        books[path.stem] = nbformat.read(EXECUTED_DIR / path.name, as_version=4)

    site = build_site(tmp_path, notebooks="executed")  # skips without the docs extra
    for name, book in books.items():
        outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
        n_figures = sum("image/png" in o.get("data", {}) for o in outputs)
        page = (site / "notebooks" / name / "index.html").read_text(encoding="utf-8")
        assert page.count('src="data:image/png;base64,') == n_figures, name
        assert n_figures or name == "01_quickstart", f"{name}: no figure at all?"
        printed = [o["text"] for o in outputs if o.get("name") == "stdout"]
        lines = [line for text in printed for line in text.splitlines() if line.strip()]
        assert lines, f"{name}: printed nothing?"
        shown = html.unescape(page)
        for line in (lines[0], lines[-1]):
            assert line in shown, (name, line)
