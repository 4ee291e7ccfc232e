"""What the Ray engine's tests share (a pytest plugin: tests/conftest.py names it): a small model, a folder of
synthetic, hostile, non-UTF-8-named and real files, the local engine's output on it, and the comparison of
two outputs."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REAL_FILES, REAL_MAMMO
from dens.exams import aggregate_paths
from dens.infer.config import InferConfig
from dens.infer.runner import run
from dens.route.config import PreprocessConfig

S = 64
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A random resnet18 at S=64, exported."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_checkpoint(root / "best.pt", build_model("resnet18"), PreprocessConfig(size=S), temperature=1.5)
    return export_onnx(root / "best.pt", root / "model.onnx")


@pytest.fixture(scope="module")
def mixed_studies(tmp_path_factory, synthetic_cohort) -> Path:
    """Synthetic exams, hostile files (bench/hostile.py's), a non-UTF-8 name, and real mammograms when there."""
    root = tmp_path_factory.mktemp("studies") / "studies"
    shutil.copytree(synthetic_cohort(3, seed=5), root)
    spec = importlib.util.spec_from_file_location("bench_hostile", BENCH / "hostile.py")
    hostile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hostile)
    hostile.make_hostile(root / "hostile")
    first = next(root.rglob("*.dcm"))
    shutil.copyfile(first, os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9.dcm"))  # a Latin-1 name
    if REAL_MAMMO.is_dir():  # real files too where the samples are (DENS_REAL_MAMMO)
        for name in REAL_FILES[:3] + REAL_FILES[-1:]:
            shutil.copyfile(REAL_MAMMO / name, root / f"real-{Path(name).name}")
    return root


@pytest.fixture(scope="module")
def local_preds(mixed_studies, small_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "preds.csv"
    run(InferConfig(mixed_studies, out, model=small_model, workers=2, progress=False))
    return out


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def same(a: Path, b: Path) -> None:
    """Two preds.csv (and their breast and exam CSVs) hold the same rows in the same order: every cell equal,
    probabilities within float tolerance (batches of other sizes)."""
    for x, y in zip((a, *aggregate_paths(a)), (b, *aggregate_paths(b)), strict=True):
        left, right = read(x), read(y)
        assert list(left.columns) == list(right.columns), x.name
        assert len(left) == len(right), x.name
        probs = [c for c in left.columns if c.startswith("p_")]
        exact = [c for c in left.columns if c not in probs]
        pd.testing.assert_frame_equal(left[exact], right[exact], obj=x.name)
        values = [frame[probs].replace("", "nan").astype(float).to_numpy() for frame in (left, right)]
        np.testing.assert_allclose(*values, atol=2e-6, err_msg=x.name)
