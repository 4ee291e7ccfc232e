"""dens.files.atomic_write: the one way dens writes an artifact whole."""

from __future__ import annotations

import pytest

from dens.files import atomic_write


def test_the_file_appears_whole_or_not_at_all(tmp_path):
    path = tmp_path / "preds.csv"
    with atomic_write(path, "w", fsync=True, encoding="utf-8") as f:
        f.write("a,b\n")
        assert not path.exists()  # nothing under the real name until the block ends
    assert path.read_text() == "a,b\n"
    with pytest.raises(RuntimeError), atomic_write(path, "w") as f:
        f.write("half")
        raise RuntimeError("killed half-way")
    assert path.read_text() == "a,b\n"  # the old file stays
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]  # and no temporary is left behind


def test_a_long_running_process_remembers_a_bounded_number_of_folders_and_still_cleans_a_forgotten_one(
    tmp_path, monkeypatch
):
    """A node writes to a folder per study for months: the folders listed for stale temporaries are the most
    recent few thousand, and one forgotten is listed again at its next write (its stale temporary still goes)."""
    import os

    from dens import files

    monkeypatch.setattr(files, "_FOLDERS_REMEMBERED", 8)
    monkeypatch.setattr(files, "_leftovers", type(files._leftovers)())
    first = tmp_path / "f0"
    first.mkdir()
    with atomic_write(first / "a.txt", "w") as f:
        f.write("a")
    for i in range(1, 40):
        (tmp_path / f"f{i}").mkdir()
        with atomic_write(tmp_path / f"f{i}" / "a.txt", "w") as f:
            f.write("a")
    assert len(files._leftovers) == 8 and first not in files._leftovers
    stale = first / ".a.txt.999999999.1.tmp"  # a killed writer's (no such process), old
    stale.write_text("half")
    os.utime(stale, (0, 0))
    with atomic_write(first / "a.txt", "w") as f:
        f.write("b")
    assert not stale.exists() and (first / "a.txt").read_text() == "b"
