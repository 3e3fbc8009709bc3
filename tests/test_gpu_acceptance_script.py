"""tests/gpu/acceptance.sh (run by hand on a GPU machine): valid bash, shellcheck-clean, and
every xpbatch option it passes exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from xpbatch.cli.main import main

SCRIPT = Path(__file__).parent / "gpu" / "acceptance.sh"


def test_acceptance_script_is_valid_bash_and_passes_shellcheck(shellcheck: str) -> None:
    syntax = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    result = subprocess.run([shellcheck, SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("command", ["encode-catalog", "train", "info"])
def test_acceptance_script_uses_only_real_options(command: str) -> None:
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = re.findall(rf"^\s*xpbatch {command}\b(.*)$", text, flags=re.MULTILINE)
    assert calls, f"the script runs no `xpbatch {command}`"
    known = {opt for p in main.commands[command].params for opt in (*p.opts, *p.secondary_opts)}
    for call in calls:
        used = set(re.findall(r"(?<!\S)(--?[a-z][\w-]*)", call))
        assert used <= known, sorted(used - known)
