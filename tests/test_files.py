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
