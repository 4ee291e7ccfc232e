"""What the commands say before and after their work: a usage error (a bad option, a missing argument, --help)
answers at once, without importing torch, through each installed console script; and the summaries count in
words ("1 file", "1 error")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# Every console script, with what it needs to get past its argument parsing (empty: nothing) and whether a run
# without arguments stops at a missing argument (the commands whose input has no default).
COMMANDS = {
    "dens-synth": True,
    "dens-train": False,
    "dens-export": False,
    "dens-infer": True,
    "dens-merge": True,
    "dens-gradcam": True,
    "dens-serve": True,
    "dens-qc": True,
    "dens-verdicts": True,
    "dens-eval": True,
}


def _imported(stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reported importing."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", stderr, re.M)}


def _run(command: str, *args: str) -> subprocess.CompletedProcess:
    script = BIN / command
    assert script.is_file(), f"{script}: is the package installed in this environment (pip install -e .)?"
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(script), *args], capture_output=True, text=True, timeout=120
    )


def test_every_command_is_listed():
    scripts = re.findall(r"^(dens-[a-z]+) = ", (Path(__file__).parents[1] / "pyproject.toml").read_text(), re.M)
    assert sorted(scripts) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_usage_errors_answer_without_importing_torch(command):
    cases = [(("--help",), 0, "Usage:"), (("--no-such-option",), 2, "No such option")]
    if COMMANDS[command]:
        cases.append(((), 2, "Missing"))
    for args, status, said in cases:
        done = _run(command, *args)
        assert done.returncode == status, (args, done.stdout, done.stderr[-2000:])
        assert said in done.stdout + done.stderr
        heavy = sorted(m for m in _imported(done.stderr) if m.split(".")[0] in ("torch", "torchvision", "onnx"))
        assert not heavy, f"{command} {' '.join(args)} imported {heavy[:5]} before answering"


def test_summaries_count_in_words():
    from dens.infer.runner import Summary

    one = Summary(files=1, ok=0, skipped=0, errors=1).line()
    assert "dens-infer: 1 file: 0 ok, 0 skipped, 1 error in" in one
    many = Summary(files=3, ok=1, skipped=0, errors=2).line()
    assert "3 files: 1 ok, 0 skipped, 2 errors in" in many
    from dens.gradcam.runner import GradcamSummary
    from dens.qc.runner import QcResult

    assert (
        GradcamSummary(1, 1, 1, 0, 0, 1.0, "cpu")
        .line()
        .startswith("Grad-CAM: 1 of 1 flagged image mapped among 1 row,")
    )
    failed = GradcamSummary(9, 3, 2, 1, 0, 1.0, "cpu").line()
    assert "2 of 3 flagged images mapped (1 map failed: the warnings above say why) among 9 rows" in failed
    assert QcResult(Path("s.png"), files=1).counts() == "0 images from 1 file (0 skipped, 0 errors)"
