"""The decode engine: one crash-tolerant way to run the preprocessing route over many files, for every
stage. A codec that crashes or hangs on a file costs that file its row (dens-infer's test covers the CSV) or
its cache entry, and the codecs' noise stays off the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dens.engine import DecodePool
from dens.route.config import PreprocessConfig
from dens.route.errors import Reason
from dens.train.cache import build_cache, cache_dir_for

S = 64


@pytest.fixture
def files(make_dicom, breast) -> list[Path]:
    paths = [make_dicom(breast(seed=i), name=f"img{i}.dcm") for i in range(5)]
    (paths[0].parent / "notes.txt").write_text("not an image")
    return [*paths, paths[0].parent / "notes.txt"]


def _decode(files: list[Path], **pool) -> list:
    with DecodePool(2, PreprocessConfig(size=S), **pool) as engine:
        return list(engine.map((str(p), "") for p in files))


def test_one_result_per_file_in_input_order(files):
    results = _decode(files)
    assert [r.path for r in results] == [str(p) for p in files]
    assert [r.status for r in results] == ["ok"] * 5 + ["skipped"]
    assert results[-1].code == Reason.NOT_DICOM.value and results[0].image.shape == (S, S)


def test_a_crashing_codec_costs_one_file(files, codec_fault):
    codec_fault("crash", "img2.dcm")
    results = _decode(files)
    assert [r.status for r in results] == ["ok", "ok", "error", "ok", "ok", "skipped"]
    assert results[2].code == Reason.WORKER_CRASHED.value and "SIGSEGV" in results[2].reason


def test_a_hanging_codec_costs_one_file(files, codec_fault):
    codec_fault("hang", "img1.dcm")
    results = _decode(files, timeout=3)
    assert [r.status for r in results] == ["ok", "error", "ok", "ok", "ok", "skipped"]
    assert results[1].code == Reason.WORKER_TIMEOUT.value and "3 s" in results[1].reason


def test_the_training_cache_survives_a_crashing_codec_and_does_not_keep_the_crash(files, tmp_path, codec_fault):
    codec_fault("crash", "img3.dcm")
    cfg, root = PreprocessConfig(size=S), tmp_path / "cache"
    paths = [str(p) for p in files]
    entries, decoded = build_cache(paths, cfg, root, workers=2, progress=False)
    assert decoded == len(paths)
    assert [e.reason for e in entries] == ["", "", "", Reason.WORKER_CRASHED.value, "", Reason.NOT_DICOM.value]
    assert all(np.load(e.npy).shape == (S, S) for e in entries if not e.reason)
    # The file's own verdict is kept; the crash is not, so the next run tries that file again.
    kept = [json.loads(p.read_text())["reason"] for p in cache_dir_for(root, cfg).rglob("*.err.json")]
    assert kept == [Reason.NOT_DICOM.value]
    entries, decoded = build_cache(paths, cfg, root, workers=2, progress=False)
    assert decoded == 1 and entries[3].reason == Reason.WORKER_CRASHED.value


def test_codec_noise_stays_off_the_terminal(real_mammo, capfd):
    # GDCM's libjpeg prints its complaints about this 12-bit JPEG Extended file on fd 2 before decoding it.
    [result] = _decode([real_mammo / "wg04-nema-MG1" / "MG1_JPLY"])
    assert result.status == "ok", result.reason
    assert "Unsupported JPEG data precision 12" in result.noise
    assert "JPEG" not in capfd.readouterr().err


def test_a_slow_file_is_overtaken_not_waited_for(files, codec_fault):
    # Results came in input order, so one slow file held up every file after it. With buffer=2, each two
    # finished files waiting behind it go ahead; the last one (less than a buffer) waits for it, as the run
    # cannot end before it anyway. (per_worker=1: with 2, the file queued at its worker waits with it.)
    codec_fault("hang", "img0.dcm")
    with DecodePool(2, PreprocessConfig(size=S), timeout=3, buffer=2, per_worker=1) as engine:
        results = list(engine.map((str(p), "") for p in files))
    assert [r.index for r in results] == [1, 2, 3, 4, 0, 5]
    assert [r.path for r in results] == [str(files[i]) for i in (1, 2, 3, 4, 0, 5)]
    assert results[4].code == Reason.WORKER_TIMEOUT.value and all(r.status == "ok" for r in results[:4])


def test_in_input_order_restores_the_order_of_results_delivered_ahead():
    from dens.engine import Decoded, in_input_order

    delivered = [Decoded(i, f"f{i}", "ok") for i in (1, 2, 0, 4, 3)]
    assert [d.index for d in in_input_order(delivered)] == [0, 1, 2, 3, 4]
    # Nothing is held back once the files before it are in: a consumer that stops early gets no later file.
    taken = []
    for d in in_input_order(iter(delivered)):
        taken.append(d.index)
        if d.index == 1:
            break
    assert taken == [0, 1]
