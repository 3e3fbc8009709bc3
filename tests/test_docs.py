"""The documentation site builds in strict mode, its generated tables follow the code, and the
README stays a two-minute page that links into it."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import xpbatch
from xpbatch import schema

ROOT = Path(__file__).resolve().parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter")


def missing_docs_packages() -> list[str]:
    """The packages of the ``docs`` extra that are not installed."""
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def build_site(out: Path, *, notebooks: str) -> Path:
    """Build the site into ``out/site`` with ``mkdocs build --strict`` (a warning, e.g. a broken
    link, fails); ``notebooks`` is docs/executed_notebooks.py's mode (``stored``: the notebook
    pages without outputs, ``executed``: with the tests' executed copies, or fail)."""
    missing = missing_docs_packages()
    if missing:
        pytest.skip(
            f"the docs extra is not installed (no {', '.join(missing)}): "
            "pip install -e '.[docs]' to build the site"
        )
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        "PYTHONPATH": str(ROOT),
        "XPBATCH_DOCS_NOTEBOOKS": notebooks,
    }
    config, destination = str(ROOT / "mkdocs.yml"), str(out / "site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-q",
            "-f",
            config,
            "-d",
            destination,
        ],
        cwd=out,  # mkdocs-jupyter keeps its cache in the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out / "site"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, its notebook pages as stored (tests/test_notebooks.py checks them executed)."""
    return build_site(tmp_path_factory.mktemp("site"), notebooks="stored")


def _text(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_every_page_is_built(site: Path) -> None:
    for page in (
        "getting-started",
        "workflow",
        "stages",
        "format",
        "clusters",
        "troubleshooting",
        "performance",
        "notebooks",
        "api",
        "packages",
    ):
        assert (site / page / "index.html").is_file(), page
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert (site / "notebooks" / notebook.stem / "index.html").is_file(), notebook.name


@pytest.mark.slow
def test_format_page_is_generated_from_the_schema(site: Path) -> None:
    from xpbatch.catalog.layout import CatalogLayout
    from xpbatch.store.layout import variable_specs

    page = _text(site, "format")
    assert "<!-- generated:" not in page
    for flag in (*schema.InputFlag, *schema.CatalogFlag):
        assert re.search(rf"<code>{flag.name}</code></td>\s*<td>{int(flag)}</td>", page), flag
    layout = CatalogLayout(
        n_rows=1,
        chunk_rows=1,
        with_reconstruction=True,
        with_positions=True,
        with_mc=True,
    )
    specs = [*variable_specs(list(schema.DR3_SCALARS), True, True), *layout.variables()]
    for spec in specs:
        assert f"<code>{spec.name}</code>" in page, spec.name
    for name in (schema.STORE_ATTR_STORE_ID, schema.CATALOG_ATTR_MODEL_HASH, schema.CHUNK_FILES):
        assert f"<code>{name}</code>" in page, name


@pytest.mark.slow
def test_api_reference_has_every_public_name(site: Path) -> None:
    page = _text(site, "api")
    for module, names in xpbatch._MODULES.items():
        for name in names:
            assert f'id="{module}.{name}"' in page, f"{module}.{name}"


@pytest.mark.slow
def test_stages_page_has_every_command(site: Path) -> None:
    from xpbatch.cli.main import main

    page = _text(site, "stages")
    for name in main.commands:
        assert f"Usage: xpbatch {name} [OPTIONS]" in page, name


def test_unknown_generated_table_fails_the_build() -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(ROOT / "docs"))
    with pytest.raises(ValueError, match="unknown generated table 'no-such-table'"):
        gen_reference.expand("<!-- generated: no-such-table -->")
    flags = gen_reference.expand("<!-- generated: input-flags -->")
    assert "| `G_FLUX_FROM_XP_FILE` | 32 |" in flags


def test_readme_is_short_and_links_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links to no docs page"
    for link in links:
        assert (ROOT / link).is_file(), link
