"""A manifest others wrote: a file listed many times, however spelt, is scored once and the repeats are counted;
a listed path that cannot be read says why (no such file, not a regular file, permission denied), never a
blanket "does not exist"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import synthetic_breast, write_dicom
from dens import labels, sources
from dens.infer.cli import main as infer_main
from dens.preds.cells import raw_path


def infer(*args) -> object:
    return CliRunner().invoke(infer_main, [*map(str, args), "--workers", "1", "--no-progress"])


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_a_file_listed_ten_thousand_times_however_spelt_is_scored_once(onnx_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    one = write_dicom(images / "one.dcm", synthetic_breast(seed=1), ImageLaterality="L", ViewPosition="CC")
    two = write_dicom(images / "two.dcm", synthetic_breast(seed=2), ImageLaterality="R", ViewPosition="CC")
    (images / "sub").mkdir()
    (tmp_path / "link").symlink_to(images)
    spellings = ["images/one.dcm", "images/sub/../one.dcm", str(one), "./images//one.dcm", "link/one.dcm"]
    listed = [spellings[k % len(spellings)] for k in range(10_000)] + ["images/two.dcm", str(two)]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": listed}).to_csv(manifest, index=False)
    out = tmp_path / "preds.csv"
    result = infer(manifest, "--out", out, "--model", onnx_model)
    assert result.exit_code == 0, result.output
    preds = read(out)
    assert sorted(map(raw_path, preds[labels.PATH])) == [str(one), str(two)]
    assert list(preds[labels.STATUS]) == ["ok", "ok"]
    assert "dens-infer: 2 files:" in result.output
    assert "10000 manifest entries dropped" in result.output
    # Every spelling hashes as the one file: a shard takes all of them or none.
    shards = [sources.Shard(i, 3) for i in range(3)]
    taken = [[e.path for e in sources.entries(manifest, shard=s)] for s in shards]
    assert sorted(p for paths in taken for p in paths) == sorted([str(one), str(two)])


def test_a_listed_path_that_cannot_be_read_says_why(onnx_model, tmp_path):
    fifo = tmp_path / "fifo.dcm"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    listed = {
        "missing.dcm": "does not exist",
        str(fifo): "not a regular file",
        "/dev/null": "not a regular file",
        "folder": "is a folder, not a file",
        "file/under-a-file.dcm": "cannot stat: Not a directory",
    }
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": list(listed)}).to_csv(manifest, index=False)
    out = tmp_path / "preds.csv"
    result = infer(manifest, "--out", out, "--model", onnx_model)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    preds = read(out)
    reasons = dict(zip(map(raw_path, preds[labels.PATH]), preds[labels.REASON], strict=True))
    for path, why in listed.items():
        full = os.path.realpath(os.path.join(tmp_path, path))
        assert reasons[full] == f"unreadable: {why}", (path, reasons[full])


def test_permission_is_named_as_the_reason(tmp_path):
    """A file the user may not read (as /etc/shadow is to most), and one in a folder the user may not search.
    Root reads anything, so as root the check runs without the capabilities that let it (setpriv)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux permissions")
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
    unreadable, closed = tmp_path / "shadow.dcm", tmp_path / "closed"
    unreadable.write_bytes(b"x")
    closed.mkdir()
    (closed / "x.dcm").write_bytes(b"x")
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [unreadable.name, "closed/x.dcm"]}).to_csv(manifest, index=False)
    code = "import sys; from dens import sources; [print(e.problem) for e in sources.entries(sys.argv[1])]"
    unreadable.chmod(0)
    closed.chmod(0)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", code, str(manifest)], capture_output=True, text=True)
    finally:
        closed.chmod(0o700)
    if prefix and done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr[-200:]}")
    assert done.returncode == 0, done.stderr
    expected = ["permission denied", "permission denied (a folder on its path cannot be searched)"]
    assert done.stdout.splitlines() == expected
