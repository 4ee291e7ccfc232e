"""dens-train: manifest, split, decoded cache, the AMP step, a tiny end-to-end run, resume, the CLI and DDP."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from dens import labels, manifest, synth
from dens.artifact.model import build_model, load_checkpoint
from dens.route import families
from dens.route.preprocess import PreprocessConfig, load
from dens.train import cache, cli, data, loop
from dens.train.config import TrainConfig
from dens.train.step import resolve_precision, train_step

SIZE = 64


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth.generate(out, 10, size="small", seed=5, workers=2, progress=False)
    return out


def _config(cohort: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(cohort),
        out=str(out),
        arch="resnet18",
        weights="none",
        size=SIZE,
        epochs=3,
        batch_size=4,
        lr=1e-3,
        workers=0,
        decode_workers=2,
        cache=str(out.parent / "cache"),
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> tuple[TrainConfig, dict]:
    """One uninterrupted three-epoch run (about 30 training images, 8 steps an epoch), shared by the tests
    that read its artifacts; two epochs are too few for the loss to fall reliably."""
    cfg = _config(cohort, tmp_path_factory.mktemp("runs") / "full")
    return cfg, loop.run(cfg)


# --- manifest and split ----------------------------------------------------------------------------------


def test_a_failed_run_leaves_no_empty_run_folder_behind(tmp_path, monkeypatch):
    """A run that fails before writing anything removes the run folder (and the folders above it) it made;
    a folder that was there before, or that holds anything, stays."""
    (tmp_path / "labels.csv").write_text("path,density\nmissing.png,A\n")
    monkeypatch.chdir(tmp_path)
    args = ["--data", "labels.csv", "--arch", "resnet18", "--weights", "none", "--lr", "1e-3", "--no-progress"]
    result = CliRunner().invoke(cli.main, [*args, "--out", "runs/new"])
    assert result.exit_code == 1 and "none of its 1 files exists" in result.output, result.output
    assert not (tmp_path / "runs").exists()  # neither the run folder nor runs/, both made by the run
    (tmp_path / "kept").mkdir()
    result = CliRunner().invoke(cli.main, [*args, "--out", "kept/run"])
    assert result.exit_code == 1 and (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "run").exists()
    (tmp_path / "mine").mkdir()
    result = CliRunner().invoke(cli.main, [*args, "--out", "mine"])
    assert result.exit_code == 1 and (tmp_path / "mine").is_dir()  # not made by the run: never removed

    def fails_after_writing(cfg, ranks, out):
        (out / "split.csv").write_text("written\n")
        raise ValueError("failed after writing")

    monkeypatch.setattr(loop, "Trainer", fails_after_writing)
    result = CliRunner().invoke(cli.main, [*args, "--out", "runs/partial"])
    assert result.exit_code == 1 and "failed after writing" in result.output
    assert (tmp_path / "runs" / "partial" / "split.csv").is_file()  # it holds something: kept


def test_rsna_layout_skips_and_counts_rows_without_density(tmp_path):
    rows = pd.DataFrame(
        {
            "site_id": [1, 1, 2],
            "patient_id": ["10006", "10006", "10011"],
            "image_id": ["462822612", "1459541791", "220375232"],
            "laterality": ["L", "L", "R"],
            "view": ["CC", "MLO", "CC"],
            "density": ["B", "B", ""],
        }
    )
    rows.to_csv(tmp_path / "train.csv", index=False)
    frame, info = manifest.read_manifest(tmp_path)
    assert info["without_density"] == 1 and info["labelled"] == 2 and info["source"] == "rsna"
    assert frame[labels.PATH].tolist() == [
        str(tmp_path / "train_images/10006/462822612.dcm"),
        str(tmp_path / "train_images/10006/1459541791.dcm"),
    ]
    assert frame[data.LABEL].tolist() == [1, 1]


def test_generic_csv_paths_relative_to_it_numeric_density_and_no_patient(tmp_path, caplog):
    pd.DataFrame({"path": ["a.png", "/abs/b.png", "c.png"], "density": ["1", "4", "c"]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    with caplog.at_level(logging.WARNING):
        frame, _ = manifest.read_manifest(tmp_path / "labels.csv")
    assert frame[labels.DENSITY].tolist() == ["A", "D", "C"]
    assert frame[labels.PATH].tolist() == [str(tmp_path / "a.png"), "/abs/b.png", str(tmp_path / "c.png")]
    assert frame[labels.PATIENT_ID].is_unique and "no patient_id" in caplog.text
    pd.DataFrame({"path": ["a.png", "b.png"], "density": ["B", "E"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad.csv: 1 rows have a density.*line 3: 'E'"):
        manifest.read_manifest(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no labels found"):
        manifest.read_manifest(tmp_path / "missing")


def test_a_csv_whose_files_are_all_missing_says_where_it_looked(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "labels").mkdir()
    csv = tmp_path / "labels" / "train.csv"
    pd.DataFrame({"path": ["images/a.png", "images/b.png"], "density": ["A", "B"]}).to_csv(csv, index=False)
    monkeypatch.chdir(tmp_path)  # the paths were written relative to here, not to the CSV's folder
    cfg = _config(tmp_path, tmp_path / "run", data=str(csv))
    with pytest.raises(ValueError) as caught:
        loop.run(cfg)  # before any image is decoded
    message = str(caught.value)
    assert "none of its 2 files exists" in message and str(tmp_path / "labels") in message
    assert f"1 of the first 2 exist relative to the working directory {tmp_path}" in message
    monkeypatch.chdir(tmp_path / "labels")
    with pytest.raises(ValueError, match="nor relative to the working directory"):
        loop.run(cfg)


def test_a_class_a_split_lacks_is_a_warning_that_says_what_it_means():
    def split(**counts):
        return {"classes": {c: counts.get(c, 5) for c in labels.CLASSES}}

    described = {"train": split(D=0), "val": split(A=0), "test": split(A=0, C=0)}
    warnings = data.class_warnings(described)
    assert len(warnings) == 4, warnings
    assert warnings[0].startswith("class A has no validation image")
    assert "class A has no test image" in warnings[1] and "class C has no test image" in warnings[2]
    assert "class D has no usable training image: the model cannot learn to call it" in warnings[3]
    assert data.class_warnings({s: split() for s in data.SPLITS}) == []


def test_split_keeps_patients_together_and_class_ratios():
    rng = np.random.default_rng(3)
    rows = []
    for patient in range(80):  # about 300 images: 2 to 6 per patient, one density each
        density = rng.choice(4, p=[0.11, 0.42, 0.42, 0.05])
        rows += [{"patient_id": f"P{patient}", data.LABEL: density} for _ in range(rng.integers(2, 7))]
    frame = pd.DataFrame(rows)
    split = data.assign_split(frame, seed=0)
    assert split.groupby(frame["patient_id"]).nunique().max() == 1  # no patient in two splits
    patients = split.groupby(frame["patient_id"]).first().value_counts(normalize=True)
    for name, share in zip(data.SPLITS, (0.7, 0.15, 0.15), strict=True):
        assert patients[name] == pytest.approx(share, abs=0.02)
    by_patient = frame.groupby("patient_id")[data.LABEL].first()
    for name in data.SPLITS:  # every class within one patient of its quota in every split
        got = by_patient[split.groupby(frame["patient_id"]).first() == name].value_counts()
        share = dict(zip(data.SPLITS, (0.7, 0.15, 0.15), strict=True))[name]
        for c, n in by_patient.value_counts().items():
            assert abs(got.get(c, 0) - share * n) <= 1.0 + 1e-9, (name, c)
    assert split.equals(data.assign_split(frame, seed=0))
    assert not split.equals(data.assign_split(frame, seed=1))


def test_tiny_cohort_still_validates_and_tests():
    frame = pd.DataFrame({"patient_id": ["a", "a", "b", "c", "d"], data.LABEL: [1, 1, 2, 1, 2]})
    assert set(data.assign_split(frame)) == set(data.SPLITS)


# --- decoded cache ---------------------------------------------------------------------------------------


def test_cache_folder_changes_with_a_decoder_library_version(monkeypatch):
    # An upgraded codec can change the canonical image: the old cache must not serve it.
    import importlib.metadata

    cfg = PreprocessConfig(size=64)
    cache.route_version.cache_clear()
    before = cache.cache_dir_for("/c", cfg)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "99.0" if n == "pylibjpeg-openjpeg" else real(n))
    cache.route_version.cache_clear()
    try:
        assert cache.cache_dir_for("/c", cfg) != before
    finally:
        monkeypatch.undo()
        cache.route_version.cache_clear()
    assert cache.cache_dir_for("/c", cfg) == before


def test_cache_is_bit_equal_to_the_shared_route_and_reused(trained, cohort):
    cfg, result = trained
    split = pd.read_csv(Path(cfg.out) / "split.csv", dtype=str, keep_default_na=False)
    paths = split[labels.PATH].tolist()
    fitted = load_checkpoint(Path(cfg.out) / "best.pt").preprocess
    assert fitted.families and fitted.unfitted() == PreprocessConfig(size=SIZE)  # fitted on the train split
    # The cache keeps the canvases before the family grey maps; training applies each image's table to them.
    entries, decoded = cache.build_cache(paths, fitted.unfitted(), cfg.cache, workers=2, progress=False)
    assert decoded == 0 and result["data"]["decoded_now"] == len(paths)
    val = split.index[split[data.SPLIT] == "val"]
    tables = [families.lookup(fitted.families, entries[i].info["family"])[0] for i in val]
    item = data.CachedImages([entries[i].npy for i in val], [0] * len(val), tables)[0][0]
    expected, _ = load(paths[val[0]], fitted)  # an inference worker, with the model's own config
    assert item.dtype == torch.uint8 and item.shape == (1, SIZE, SIZE)
    np.testing.assert_array_equal(item[0].numpy(), expected)  # what inference sees, bit for bit


def test_unusable_files_are_listed_not_fatal(tmp_path, cohort):
    good = next(cohort.rglob("*.dcm"))
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all" * 10)
    paths = [str(good), str(tmp_path / "junk.dcm"), str(tmp_path / "gone.dcm")]
    entries, decoded = cache.build_cache(paths, PreprocessConfig(size=SIZE), tmp_path / "c", workers=1, progress=False)
    assert decoded == 2 and entries[0].npy and not entries[0].reason
    assert (entries[1].npy, entries[1].reason) == (None, "not_dicom")
    assert (entries[2].npy, entries[2].reason) == (None, "missing_file")
    again, decoded = cache.build_cache(paths, PreprocessConfig(size=SIZE), tmp_path / "c", workers=1, progress=False)
    assert decoded == 0 and again == entries  # the unusable file is remembered too
    _, decoded = cache.build_cache(paths, PreprocessConfig(size=SIZE + 8), tmp_path / "c", workers=1, progress=False)
    assert decoded == 2  # another PreprocessConfig is another cache


# --- sampling, weights, augmentation ---------------------------------------------------------------------


def test_sampler_deals_disjoint_shares_fixed_by_seed_and_epoch():
    targets = np.array([0] * 10 + [1] * 30 + [2] * 50 + [3] * 10)
    ranks = [data.EpochSampler(targets, seed=1, rank=r, world=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    shares = [list(s) for s in ranks]
    assert all(len(s) == 34 for s in shares) and set().union(*shares) == set(range(100))
    one = data.EpochSampler(targets, seed=1)
    one.set_epoch(2)
    order = list(one)
    one.set_epoch(2, start=40)
    assert list(one) == order[40:] and len(one) == 60
    one.set_epoch(3)
    assert list(one) != order
    balanced = data.EpochSampler(targets, balanced=True, seed=0)
    counts = np.bincount(targets[[i for e in range(20) for i in (balanced.set_epoch(e) or balanced)]], minlength=4)
    assert counts.min() / counts.max() > 0.8  # classes drawn about equally despite 10/30/50/10


def test_class_weights_are_inverse_frequency_with_mean_one():
    targets = np.array([0] * 10 + [1] * 40 + [2] * 50)
    w = data.class_weights(targets).numpy()
    assert w[3] == 0 and w[0] / w[2] == pytest.approx(5.0)
    assert (w[targets]).mean() == pytest.approx(1.0)


def test_augment_is_small_seeded_and_keeps_the_chest_wall_left():
    image = torch.zeros(4, 1, SIZE, SIZE, dtype=torch.uint8)
    image[..., 8:56, :28] = 200  # a breast leaning on the left edge
    first = data.augment(image, torch.Generator().manual_seed(1))
    assert first.dtype == torch.uint8 and first.shape == image.shape
    assert torch.equal(first, data.augment(image, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, image) and not torch.equal(first[0], first[1])
    columns = first.float().sum(dim=(1, 2))
    assert (columns[:, : SIZE // 2].sum(1) > 5 * columns[:, SIZE // 2 :].sum(1)).all()  # never mirrored
    changed = (first.float() - image.float()).abs().mean() / 200
    assert changed < 0.25


# --- the AMP step ----------------------------------------------------------------------------------------


class _Probe(torch.nn.Module):
    """A tiny classifier that records whether autocast was on during its forward pass."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 4)
        )
        self.autocast_seen: list[bool] = []

    def forward(self, x):
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return self.net(x.float() / 255)


def _step(amp_dtype, scaler: torch.amp.GradScaler, optim=torch.optim.SGD):
    torch.manual_seed(0)
    model = _Probe()
    optimizer = optim(model.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    before = [p.detach().clone() for p in model.parameters()]
    batch = (torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    loss, _ = train_step(model, batch, optimizer, scaler, torch.nn.CrossEntropyLoss(), amp_dtype)
    after = [p.detach() for p in model.parameters()]
    return model, loss, len(steps), before, after


def test_train_step_fp32_steps_once_without_autocast():
    model, loss, steps, before, after = _step(None, torch.amp.GradScaler("cpu", enabled=False))
    assert steps == 1 and model.autocast_seen == [False]
    assert loss.dtype == torch.float32 and not loss.requires_grad and torch.isfinite(loss)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_train_step_runs_the_forward_under_autocast():
    model, loss, steps, _, _ = _step(torch.bfloat16, torch.amp.GradScaler("cpu", enabled=False))
    assert model.autocast_seen == [True] and steps == 1
    assert loss.dtype == torch.float32  # the loss is computed in fp32 from the autocast logits


def test_train_step_with_a_grad_scaler_unscales_and_steps_once():
    _, _, steps_plain, _, plain = _step(None, torch.amp.GradScaler("cpu", enabled=False))
    _, _, steps_scaled, _, scaled = _step(None, torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True))
    assert steps_plain == steps_scaled == 1
    for p, s in zip(plain, scaled, strict=True):  # the same SGD update: gradients were unscaled before it
        torch.testing.assert_close(p, s)


def test_cpu_training_is_fp32_unless_bf16_is_asked_for(caplog):
    with caplog.at_level(logging.INFO, logger="dens.train"):
        assert resolve_precision("auto", torch.device("cpu")) is None
        assert resolve_precision("fp16", torch.device("cpu")) is None
        assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    assert "fp32 on CPU" in caplog.text and "needs a CUDA device" in caplog.text and "bf16 autocast" in caplog.text


@pytest.mark.slow  # fast cover: the train_step tests above (autocast forward, fp32 loss, one optimizer step)
def test_a_bf16_step_on_cpu_learns():
    # CPU autocast: the forward in bf16, the loss and the Adam update in fp32.
    torch.manual_seed(0)
    net = build_model("resnet18", weights=None).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    targets = torch.tensor([0, 1, 2, 3])
    loss_fn = torch.nn.CrossEntropyLoss()
    step = (net, (images, targets), optimizer, scaler, loss_fn, torch.bfloat16)
    losses = [float(train_step(*step)[0]) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_steps_learn_in_every_precision(precision):
    # fp16 goes through the GradScaler, bf16 does not; channels_last as dens-train runs it on CUDA.
    device = torch.device("cuda")
    amp = resolve_precision(precision, device)
    torch.manual_seed(0)
    net = build_model("resnet18", weights=None).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8, device=device)
    targets = torch.tensor([0, 1, 2, 3], device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = [float(train_step(net, (images, targets), optimizer, scaler, loss_fn, amp)[0]) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_trains_with_amp_and_reports(cohort, tmp_path):
    result = loop.run(_config(cohort, tmp_path / "cuda", epochs=1, device="cuda"))
    resolved = result["config"]["resolved"]
    assert resolved["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert result["test"]["image"]["n"] > 0 and np.isfinite(result["history"][0]["train_loss"])


# --- end to end ------------------------------------------------------------------------------------------


def test_bf16_training_reports_the_fp32_model_it_ships(cohort, tmp_path, monkeypatch):
    # Model selection may run under autocast; the temperature and metrics.json come from the float32 model
    # that dens-export ships.
    seen = []
    real = loop.inputs.predict

    def spy(net, dataset, ranks, batch, workers, amp_dtype, *rest):
        seen.append(amp_dtype)
        return real(net, dataset, ranks, batch, workers, amp_dtype, *rest)

    monkeypatch.setattr(loop.inputs, "predict", spy)
    result = loop.run(_config(cohort, tmp_path / "bf16", epochs=1, precision="bf16", device="cpu"))
    assert result["config"]["resolved"]["precision"] == "bf16"
    assert seen == [torch.bfloat16, None, None]  # the epoch's validation, then validation and test in fp32


def test_tiny_training_learns_and_writes_every_artifact(trained):
    cfg, result = trained
    out = Path(cfg.out)
    for name in (
        "best.pt",
        "last.pt",
        "metrics.json",
        "split.csv",
        "config.yaml",
        "unusable.csv",
        "test_predictions.csv",
        "loss.png",
        "accuracy.png",
        "lr.png",
        "confusion_image.png",
        "confusion_image_normalised.png",
        "confusion_breast.png",
        "confusion_breast_normalised.png",
        "confusion_exam.png",
        "confusion_exam_normalised.png",
        "roc_dense.png",
        "reliability.png",
        "classes.png",
        "model_card.md",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out.parent / "latest").resolve() == out.resolve()
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2  # it learns
    assert history[0]["lr"] == pytest.approx(1e-3) and history[2]["lr"] == pytest.approx(0.25e-3)  # cosine, 3 epochs
    assert all(0 <= h["train_accuracy"] <= 1 for h in history)
    saved = json.loads((out / "metrics.json").read_text())
    for level in ("image", "breast", "exam"):
        test = saved["test"][level]
        assert set(test["ci"]) >= {"kappa_quadratic", "dense_sensitivity", "dense_specificity", "dense_auc"}
        low, high = test["ci"]["accuracy"]
        assert low <= test["accuracy"] <= high, (level, test["ci"]["accuracy"])
        for key in (
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "kappa_linear",
            "kappa_quadratic",
            "dense",
            "per_class",
            "confusion",
            "confusion_normalised",
            "ece",
        ):
            assert key in test, (level, key)
        assert set(test["per_class"]["B"]) >= {"sensitivity", "specificity"}
    assert saved["test"]["exam"]["n"] < saved["test"]["breast"]["n"] < saved["test"]["image"]["n"]
    assert saved["test"]["bootstrap"]["unit"] == "patient" and saved["test"]["bootstrap"]["resamples"] == 1000
    # dens-synth cohorts carry site_id and machine_id, and their headers a manufacturer: figures per value.
    assert {"site_id", "machine_id", "manufacturer"} <= set(saved["test"]["by"])
    assert saved["data"]["synthetic"] and set(saved["data"]["groups"]) >= {"site_id", "machine_id"}
    card = (out / "model_card.md").read_text()
    assert "not a medical device" in card and "synthetic phantoms" in card and "random weights" in card
    assert f"{saved['test']['exam']['kappa_quadratic']:.3f} [" in card  # the exam kappa with its interval
    assert saved["model_card"]["data"]["splits"]["test"]["images"] == saved["data"]["test"]["images"]
    cal = saved["calibration"]["validation"]
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9 and {"ece_before", "ece_after"} <= set(cal)
    # A validation split of a few images is too small to fit a temperature: 1.0, and metrics.json says why.
    assert saved["data"]["val"]["images"] < 30 and saved["calibration"]["temperature"] == 1.0
    assert not saved["calibration"]["kept"] and "at least 30" in saved["calibration"]["reason"]
    assert saved["weights"] == {"start": "none", "from_scratch": True}
    split = pd.read_csv(out / "split.csv", dtype=str)
    assert len(split) == saved["data"]["labelled"] and set(split[data.SPLIT]) == set(data.SPLITS)
    assert split.groupby(labels.PATIENT_ID)[data.SPLIT].nunique().max() == 1
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["arch"] == "resnet18" and config["preprocess"]["height"] == SIZE
    assert config["resolved"]["precision"] == "fp32"
    best = load_checkpoint(out / "best.pt")
    assert best.temperature == pytest.approx(cal["temperature"])
    assert best.preprocess.unfitted() == PreprocessConfig(size=SIZE) and tuple(best.classes) == labels.CLASSES
    fitted = saved["data"]["families"]["fitted"]
    assert {key: [v["fat"], v["dense"]] for key, v in fitted.items()} == best.preprocess.to_dict()["families"]
    assert set(split["harmonisation"]) <= {"family", "fallback"} and split["family"].str.len().min() > 0
    assert best.summary["data"] == {s: saved["data"][s]["images"] for s in data.SPLITS}
    calls = pd.read_csv(out / "test_predictions.csv")
    assert len(calls) == saved["data"]["test"]["images"] and set(
        split.loc[split[data.SPLIT] == "test", labels.PATH]
    ) == set(calls[labels.PATH])
    assert np.allclose(calls[list(labels.PROB_COLUMNS)].sum(axis=1), 1, atol=1e-5)
    assert best.summary["test"]["image"]["kappa_quadratic"] == pytest.approx(saved["test"]["image"]["kappa_quadratic"])
    assert best.summary["arch"] == "resnet18" and best.summary["weights"] == "none" and best.summary["from_scratch"]
    assert best.summary["model_card"] == saved["model_card"]  # the card travels with the weights


def test_interrupted_run_resumes_to_the_same_weights(trained, cohort):
    full_cfg, full = trained
    out = Path(full_cfg.out).parent / "resumed"
    cfg = _config(cohort, out)
    # Stopped in the middle of the second epoch, as Ctrl-C would.
    stopped = loop.run(cfg, should_stop=lambda epoch, step: (epoch, step) == (1, 2))
    assert stopped == {"interrupted": True, "epoch": 1, "step": 3, "out": str(out)}
    extra = load_checkpoint(out / "last.pt").extra
    assert (extra["epoch"], extra["step"]) == (1, 3) and "optimizer" in extra and "scheduler" in extra
    with pytest.raises(ValueError, match="already holds a run"):
        loop.run(cfg)
    # The CLI reads the run's own config.yaml: --out and --resume are all it needs.
    outcome = CliRunner().invoke(cli.main, ["--out", str(out), "--resume", "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    assert "kappa quadratic" in outcome.output and "dens-train:" in outcome.output
    assert "STARTED FROM SCRATCH" in outcome.output.splitlines()[-1]  # the summary line says so
    assert "not calibrated: validation has" in outcome.output
    resumed, uninterrupted = load_checkpoint(out / "last.pt"), load_checkpoint(Path(full_cfg.out) / "last.pt")
    assert resumed.extra["epoch"] == 3
    for (name, a), b in zip(resumed.model.state_dict().items(), uninterrupted.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in full["history"]])


def test_cli_flags_override_the_yaml_file_which_overrides_the_recipe(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(loop, "run", lambda cfg: seen.append(cfg) or {"interrupted": True, "epoch": 0, "step": 0})
    (tmp_path / "recipe.yaml").write_text("arch: resnet18\nepochs: 3\nbatch-size: 4\nlr: 1e-3\n")
    outcome = CliRunner().invoke(
        cli.main,
        [
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
            "--config",
            str(tmp_path / "recipe.yaml"),
            "--epochs",
            "5",
        ],
    )
    assert outcome.exit_code == 130, outcome.output
    (cfg,) = seen
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr) == ("resnet18", 5, 4, 0.001)
    assert (cfg.optimizer, cfg.weight_decay, cfg.balance) == ("adam", 3e-3, "weighted-loss")
    assert (cfg.height, cfg.width, cfg.size) == (736, 352, None)  # the 2:1 canvas; --size S: a square one
    for text, message in (("epoch: 3\n", "unknown options epoch"), ("arch: resnet34\n", "'resnet34' is not one of")):
        (tmp_path / "bad.yaml").write_text(text)
        outcome = CliRunner().invoke(cli.main, ["--data", str(tmp_path), "--config", str(tmp_path / "bad.yaml")])
        assert outcome.exit_code == 2 and message in outcome.output, outcome.output
    assert len(seen) == 1


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    # A notebook or a GUI that imports dens.figures keeps its own backend; the PNGs are still written.
    code = (
        "import matplotlib, sys; from dens.figures import plots; "
        "plots.confusion_png([[1] * 4] * 4, sys.argv[1], normalised=False, title='t'); "
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    command = [sys.executable, "-c", code, str(tmp_path / "c.png")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["svg", "False"] and (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(cohort, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "dens.train.cli",
        "--data",
        str(cohort),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--size",
        str(SIZE),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--workers",
        "0",
        "--cache",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["batch_per_process"] == 4
    assert done.stdout.count("dens-train:") == 1  # rank 0 alone reports
    assert json.loads((out / "metrics.json").read_text())["test"]["image"]["n"] > 0


def test_every_rank_keeps_the_files_rank_zero_could_use(tmp_path):
    # Failures other than an unusable file are not cached, so another rank retries them and may see them
    # differently: the ranks would then hold datasets of different lengths and DDP would hang.
    from dataclasses import dataclass

    from dens.train.distributed import Ranks
    from dens.train.inputs import as_rank_zero_saw

    @dataclass(frozen=True)
    class SecondRank(Ranks):
        seen_by_rank_zero: tuple = ()

        def broadcast(self, obj):
            assert obj is None  # only rank 0's view travels
            return list(self.seen_by_rank_zero)

    ok = lambda p: cache.CacheEntry(p, f"{p}.npy", {})  # noqa: E731
    bad = lambda p, why: cache.CacheEntry(p, None, {}, why, "detail")  # noqa: E731
    rank_zero = (("", ""), ("unexpected_error", "OSError: stale file handle"), ("decode_failed", "d"))
    rank = SecondRank(1, 2, torch.device("cpu"), rank_zero)
    agreed = as_rank_zero_saw([ok("a"), ok("b"), bad("c", "decode_failed")], rank, tmp_path)
    assert [(e.npy, e.reason) for e in agreed] == [("a.npy", ""), (None, "unexpected_error"), (None, "decode_failed")]
    with pytest.raises(ValueError, match=r"rank 1 cannot use a .*every rank must read the data and that cache"):
        as_rank_zero_saw([bad("a", "missing_file"), ok("b"), ok("c")], rank, tmp_path)
    alone = Ranks(0, 1, torch.device("cpu"))
    entries = [ok("a"), bad("b", "missing_file")]
    assert as_rank_zero_saw(entries, alone, tmp_path) == entries


def test_a_csv_with_its_own_split_keeps_it(cohort, tmp_path):
    """A set with an official test split (or a cross-validation fold) gives dens-train its split column."""
    frame, _ = manifest.read_manifest(cohort)
    patients = sorted(frame[labels.PATIENT_ID].unique())
    chosen = {p: data.SPLITS[i % 3] for i, p in enumerate(patients)}
    given = frame[[labels.PATH, labels.DENSITY, labels.PATIENT_ID]].assign(split=frame[labels.PATIENT_ID].map(chosen))
    given.to_csv(tmp_path / "given.csv", index=False)
    loop.run(_config(cohort, tmp_path / "run", data=str(tmp_path / "given.csv"), epochs=1))
    kept = pd.read_csv(tmp_path / "run" / "split.csv", dtype=str).set_index(labels.PATH)[data.SPLIT]
    assert kept.to_dict() == given.set_index(labels.PATH)["split"].to_dict()
    given.assign(split=["train", "holdout"] * (len(given) // 2) + ["train"] * (len(given) % 2)).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(ValueError, match="'holdout'"):
        loop.run(_config(cohort, tmp_path / "bad", data=str(tmp_path / "bad.csv"), epochs=1))
