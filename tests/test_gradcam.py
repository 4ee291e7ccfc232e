"""Grad-CAM: the core against a hand-written reference, a trained model that finds a planted region, hooks
released and memory flat; dens-gradcam over a preds.csv maps exactly the flagged rows of the right model."""

from __future__ import annotations

import csv
import gc
import html
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from torch import nn

from dens import labels
from dens.gradcam import GradCAM, GradcamError, assign_stems, parse_flag, resolve_layer, run_gradcam, safe_stem
from dens.gradcam.cli import main as gradcam_main
from dens.review.display import as_displayed, display_config, thumbnail
from dens.route.config import PreprocessConfig
from dens.route.preprocess import load

S = 64
HOSTILE_SOP = "../../etc/passwd"
HOSTILE_NAME = "<script>alert(1)</script>"


class TinyNet(nn.Module):
    """uint8 [N, 1, S, S] in, logits out, the cast inside, as DensityNet does."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.float() / 255.0))


def reference_cam(model: TinyNet, images: np.ndarray, targets: list[int], split: int = 5) -> np.ndarray:
    """Grad-CAM by hand at ``model.features[split - 1]``, image by image: activations and gradients with
    torch.autograd.grad, the rest in numpy and OpenCV (bilinear with half-pixel centres, as
    align_corners=False)."""
    maps = []
    for image, target in zip(images, targets, strict=True):
        x = torch.from_numpy(image[None]).float() / 255.0
        acts = model.features[:split](x)
        (grads,) = torch.autograd.grad(model.head(model.features[split:](acts))[0, target], acts)
        a, g = acts[0].detach().numpy(), grads[0].numpy()
        cam = np.maximum((g.mean(axis=(1, 2))[:, None, None] * a).sum(axis=0), 0)
        cam = cv2.resize(cam, image.shape[-2:][::-1], interpolation=cv2.INTER_LINEAR)
        span = cam.max() - cam.min()
        maps.append((cam - cam.min()) / span if span > 0 else np.zeros_like(cam))  # no positive evidence
    return np.stack(maps)


def _images(n: int, seed: int = 0, size: int = S) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two spinning OpenMP threads made
    a 7 ms call take 300 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


# --- the core -------------------------------------------------------------------------------------


def test_map_shape_range_and_predicted_class(tiny):
    images = _images(3)
    with GradCAM(tiny, "features") as cam:
        result = cam(images)
    assert result.maps.shape == (3, S, S) and result.maps.dtype == np.float32
    assert result.maps.min() == 0.0 and np.allclose(result.maps.max(axis=(1, 2)), 1.0)
    np.testing.assert_array_equal(result.targets, result.logits.argmax(1))
    with torch.no_grad():
        np.testing.assert_allclose(result.logits, tiny(torch.from_numpy(images)).numpy(), rtol=1e-5, atol=1e-6)


def test_map_matches_a_hand_computed_reference_one_target_per_image(tiny):
    images = _images(4, seed=1)
    targets = [0, 2, 1, 2]  # mixed classes in one batch: each image's map is for its own target
    with GradCAM(tiny, "features.4") as cam:  # the last conv, before its ReLU: gradients vary over space
        batched = cam(images, targets).maps
        single = np.stack([cam(images[i : i + 1], [t]).maps[0] for i, t in enumerate(targets)])
        predicted = cam(images)
    assert (batched.max(axis=(1, 2)) == 1.0).all()  # the comparison is not between blank maps
    np.testing.assert_allclose(batched, reference_cam(tiny, images, targets), atol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(predicted.maps, reference_cam(tiny, images, predicted.targets.tolist()), atol=1e-5)


def test_gradients_flow_with_frozen_weights_and_caller_grad_mode_is_kept(tiny):
    images = _images(2, seed=2)
    with GradCAM(tiny, "features") as cam:
        free = cam(images, [2, 2]).maps
        tiny.requires_grad_(False)
        with torch.no_grad():
            frozen = cam(images, [2, 2]).maps
            assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    np.testing.assert_allclose(frozen, free, atol=1e-6)
    assert all(p.grad is None for p in tiny.parameters())  # autograd.grad: nothing accumulated in .grad


def test_hooks_are_released_even_on_error(tiny):
    layer = resolve_layer(tiny, "features")
    with GradCAM(tiny, layer) as cam:
        assert len(layer._forward_hooks) == 1
        with pytest.raises(ValueError, match="one target per image"):
            cam(_images(2), [1])
    assert len(layer._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="with GradCAM"):
        cam(_images(1))
    with pytest.raises(ValueError, match="no layer"), GradCAM(tiny, "features.9"):
        pass


def test_memory_stays_flat_over_100_calls():
    torch.manual_seed(0)
    model = TinyNet().eval()
    images = _images(4, seed=3, size=128)  # per call the graph holds about 5 MB of activations

    def tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    with GradCAM(model, "features") as cam:
        for _ in range(10):
            cam(images)
        before_tensors, before_rss = tensors(), rss_mb()
        for _ in range(100):
            cam(images)
        assert tensors() == before_tensors
        assert rss_mb() - before_rss < 40, "a graph kept per call would grow RSS by about 500 MB here"
        assert cam._activation is None


def test_a_model_trained_on_a_planted_bright_square_looks_at_it():
    """Class 3 = a bright 8x8 square somewhere in noise. After 80 steps (about a second) the class-3 map
    peaks on the square in every test image; the same model untrained does not."""
    size, side = 32, 8
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    def batch(n: int, *, all_planted: bool = False) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        x = np.clip(rng.normal(70, 25, (n, 1, size, size)), 0, 255).astype(np.uint8)
        y = np.full(n, 3) if all_planted else rng.integers(0, 2, n) * 3
        corners = [tuple(int(v) for v in rng.integers(2, size - side - 2, 2)) for _ in range(n)]
        for i, (r, c) in enumerate(corners):
            if y[i] == 3:
                x[i, 0, r : r + side, c : c + side] = 230
        return x, y, corners

    def peaks_on_square(model: nn.Module, x: np.ndarray, corners) -> int:
        with GradCAM(model, "features") as cam:
            maps = cam(x, [3] * len(x)).maps
        peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
        return sum(
            r - 2 <= pr < r + side + 2 and c - 2 <= pc < c + side + 2
            for (r, c), (pr, pc) in zip(corners, peaks, strict=True)
        )

    model = TinyNet()
    untrained = TinyNet()
    untrained.load_state_dict(model.state_dict())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        x, y, _ = batch(32)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.1, "the tiny model did not learn the square"

    x, _, corners = batch(16, all_planted=True)
    assert peaks_on_square(model.eval(), x, corners) == len(x)
    assert peaks_on_square(untrained.eval(), x, corners) < len(x) // 2  # the training made the difference


def test_density_net_default_layer_is_the_last_block_of_layer4():
    from dens.artifact.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", weights=None).eval()
    assert resolve_layer(model) is model.backbone.layer4[-1]
    assert resolve_layer(model, "backbone.layer4.1") is model.backbone.layer4[1]
    with GradCAM(model) as cam:
        result = cam(_images(2, size=S))
    assert result.maps.shape == (2, S, S) and result.maps.min() >= 0.0 and result.maps.max() <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_match_cpu_and_gpu_memory_stays_flat():
    from dens.artifact.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", weights=None).eval()
    images = _images(4, seed=4, size=128)
    with GradCAM(model) as cam:
        on_cpu = cam(images, [0, 1, 2, 3]).maps
    model.cuda()
    with GradCAM(model) as cam:
        on_gpu = cam(images, [0, 1, 2, 3]).maps
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(100):
            cam(images)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-2)  # cuDNN convolutions run in TF32 by default


# --- names and flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        HOSTILE_SOP,
        HOSTILE_NAME,
        "..",
        ".",
        "/",
        "a/../../b",
        "-rf",
        "x" * 500,
        "",
        "C:\\Windows\\win.ini",
        "uid\x00.png",
        "1.2.3/../4",
    ],
)
def test_stems_from_hostile_values_are_plain_names(tmp_path, value):
    stem = safe_stem(value, fallback="some/file.dcm")
    assert stem and len(stem) <= 80
    assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in stem)
    assert not stem.startswith((".", "-"))
    path = (tmp_path / f"{stem}.png").resolve()
    assert path.parent == tmp_path.resolve()


def test_stems_keep_uids_fall_back_to_a_path_hash_and_never_collide():
    assert safe_stem("1.2.840.113619.2.55", "a.dcm") == "1.2.840.113619.2.55"
    assert safe_stem("", "a.dcm") == safe_stem("", "a.dcm") != safe_stem("", "b.dcm")
    stems = assign_stems(["1.2.3", "1.2.3", "ABC", "abc", "<x>", "_x_"], [f"f{i}" for i in range(6)])
    assert stems[:4] == ["1.2.3", "1.2.3-2", "ABC", "abc-2"]
    assert len({s.casefold() for s in stems}) == len(stems)


def test_flags_select_ok_rows_by_class_threshold_or_the_flagged_column():
    probs = [
        (0.6, 0.3, 0.05, 0.05),
        (0.1, 0.2, 0.4, 0.3),
        (0.0, 0.1, 0.2, 0.7),
        (0.0, 0.0, 0.0, 1.0),
        (0.15, 0.3, 0.5, 0.05),
    ]
    preds = pd.DataFrame(
        {
            labels.STATUS: ["ok", "ok", "ok", "error", "ok"],
            labels.DENSITY: ["A", "C", "D", "D", "C"],
            **{c: [f"{p[k]:.6f}" for p in probs] for k, c in enumerate(labels.PROB_COLUMNS)},
            labels.P_DENSE: ["0.100000", "0.700000", "0.900000", "", "0.550000"],
            "flagged": ["false", "true", "false", "false", "true"],  # dens-infer's own rule, whatever it was
        }
    )
    pick = lambda spec: parse_flag(spec).select(preds).tolist()  # noqa: E731
    assert pick(None) == pick("flagged") == [False, True, False, False, True]
    assert pick("C,D") == [False, True, True, False, True]
    assert pick("d") == [False, False, True, False, False]
    assert pick("p_dense>=0.55") == [False, True, True, False, True]
    assert pick("p_dense > 0.7") == [False, False, True, False, False]
    assert pick("p_D>=0.3") == [False, True, True, False, False]
    for bad in ("E", "p_x>=0.5", "C;D", "p_dense>=lots"):
        with pytest.raises(ValueError):
            parse_flag(bad)
    # The same object is a dens-infer flag rule: (density, {class: probability}) -> bool.
    rule = parse_flag("p_dense>=0.5")
    assert rule("B", {"A": 0.1, "B": 0.35, "C": 0.3, "D": 0.25}) and not rule(
        "C", {"A": 0.5, "B": 0.1, "C": 0.4, "D": 0.0}
    )
    assert parse_flag(None)("D", {}) and not parse_flag(None)("B", {}) and parse_flag("B")("B", {})


# --- over a preds.csv -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory, synthetic_cohort) -> dict:
    """The real chain at S=64: a synthetic cohort, a resnet18 checkpoint (random weights), dens-export's
    model.onnx, dens-infer's preds.csv (and its exam CSVs). Then, as a header could, two rows get hostile
    identity values, and the flagged column is set on every other ok row (a random model calls nearly
    everything alike, so this is what tells flagged rows from the rest)."""
    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx
    from dens.infer import InferConfig
    from dens.infer import run as infer

    root = tmp_path_factory.mktemp("gradcam")
    cohort = synthetic_cohort(3, seed=5)
    torch.manual_seed(0)
    cfg = PreprocessConfig(size=S)
    save_checkpoint(root / "best.pt", build_model("resnet18", weights=None), cfg, classes=labels.CLASSES)
    export_onnx(root / "best.pt", root / "model.onnx")
    out = root / "infer"
    summary = infer(
        InferConfig(
            studies=cohort, out=out / "preds.csv", model=root / "model.onnx", device="cpu", workers=1, progress=False
        )
    )
    assert summary.ok >= 12

    # Edited with the csv module, as dens-infer writes, so that the bytes Grad-CAM keeps are dens-infer's.
    with open(out / "preds.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    col = {name: k for k, name in enumerate(header)}
    ok = [r for r in rows if r[col[labels.STATUS]] == "ok"]
    assert len(ok) < len(rows)  # a skipped file too: it must get no map
    for k, row in enumerate(ok):
        row[col["flagged"]] = "true" if k % 2 else "false"
    ok[1][col[labels.SOP_UID]], ok[1][col[labels.PATIENT_ID]] = HOSTILE_SOP, HOSTILE_NAME  # flagged
    ok[3][col[labels.SOP_UID]] = HOSTILE_SOP  # flagged, the same hostile UID: de-duplicated
    with open(out / "preds.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])
    return {"infer": out, "onnx": root / "model.onnx", "ckpt": root / "best.pt", "cfg": cfg, "cohort": cohort}


def _write_preds(study, tmp_path) -> Path:
    """A private copy of dens-infer's output (preds.csv and its breast/exam CSVs) for one test."""
    for path in study["infer"].glob("preds*.csv"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / "preds.csv"


def _stand_in_onnx(path: Path) -> Path:
    """A valid ONNX file that is not the model: right format, wrong sha256."""
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, S, S])
    y = helper.make_tensor_value_info("out", TensorProto.UINT8, ["N", 1, S, S])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "stand_in", [x], [y])
    onnx.save(helper.make_model(graph), path)
    return path


def test_only_flagged_rows_get_maps_named_safely(study, tmp_path):
    preds_csv = _write_preds(study, tmp_path)
    before, before_text = pd.read_csv(preds_csv, dtype=str, keep_default_na=False), preds_csv.read_text()
    out = tmp_path / "cams"
    table = run_gradcam(preds_csv, out, model_path=study["onnx"], batch_size=3, progress=False)

    written = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    assert (before["gradcam"] == "").all()  # dens-infer writes the column empty
    pd.testing.assert_frame_equal(written.drop(columns="gradcam"), before.drop(columns="gradcam"))

    # Byte for byte what was there, but the last column.
    def head(text: str) -> list[str]:
        return [line.rsplit(",", 1)[0] for line in text.splitlines()]

    assert head(preds_csv.read_text()) == head(before_text)
    flagged = before["flagged"] == "true"
    assert flagged.sum() >= 5 and (written["gradcam"] != "").tolist() == flagged.tolist()
    assert table.attrs["summary"].maps == flagged.sum() and table.attrs["summary"].errors == 0
    overlays = sorted(out.glob("*.png"))
    assert len(overlays) == len(list(out.glob("*.npy"))) == flagged.sum()
    shown = display_config(study["cfg"]).height  # the display image: 512 px tall for this 64-px model
    peaks = []
    for rel in written.loc[flagged, "gradcam"]:
        png = (tmp_path / rel).resolve()
        assert png.parent == out.resolve() and png.is_file()
        raw = np.load(png.with_suffix(".npy"))  # the model's units, its input size
        assert raw.shape == (S, S) and raw.dtype == np.float16 and raw.min() >= 0.0 and raw.max() > 0
        peaks.append(float(raw.max()))
        overlay = cv2.imread(str(png))
        assert overlay.shape[0] > shown and overlay.shape[1] > 2 * shown  # header; image, overlay, colour bar
    hostile = written.loc[written[labels.SOP_UID] == HOSTILE_SOP, "gradcam"].tolist()
    assert len(hostile) == len(set(hostile)) == 2 and all(hostile)
    assert all(Path(h).parent.name == "cams" and not Path(h).name.startswith(".") for h in hostile)
    outside = {p.name for p in tmp_path.rglob("*") if out.resolve() not in (p.resolve(), *p.resolve().parents)}
    assert outside == {"preds.csv", "preds.breast.csv", "preds.exam.csv", "preds.report.html"}

    page = (tmp_path / "preds.report.html").read_text()
    assert HOSTILE_NAME not in page and html.escape(HOSTILE_NAME) in page
    assert page.count('<img class="cam"') == flagged.sum() and 'title="preds.exam.csv"' in page
    # One scale for the page: 1.0 is the largest of its maps' raw values, and the page says which.
    assert f"among this page&#x27;s {flagged.sum()} maps ({max(peaks):.3g} in the model&#x27;s units)" in page
    ok = (before[labels.STATUS] == "ok").sum()
    thumbs = {p.name for p in (out / "thumbs").glob("*.webp")}
    assert len({t for t in thumbs if not t.endswith(".cam.webp")}) == ok  # every view, flagged or not
    assert len({t for t in thumbs if t.endswith(".cam.webp")}) == flagged.sum()


def test_without_preds_exam_csv_the_report_uses_dens_infer_s_exam_rule(study, tmp_path):
    preds_csv = _write_preds(study, tmp_path)
    exam_csv = tmp_path / "preds.exam.csv"
    expected = pd.read_csv(exam_csv, dtype=str, keep_default_na=False)
    exam_csv.unlink()
    run_gradcam(preds_csv, tmp_path / "cams", model_path=study["onnx"], batch_size=3, progress=False)
    page = (tmp_path / "preds.report.html").read_text()
    assert 'title="densest image"' not in page and 'title="preds.exam.csv"' not in page
    for density in expected[labels.DENSITY]:
        assert f'title="dens-infer&#x27;s exam rule, from preds.csv">{density}<' in page
    assert page.count("dens-infer&#x27;s exam rule") == len(expected)


def test_threshold_flag_and_map_matches_a_direct_call(study, tmp_path):
    from dens.artifact.model import load_checkpoint

    preds_csv = _write_preds(study, tmp_path)
    before = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    threshold = float(np.median(pd.to_numeric(before.loc[before[labels.STATUS] == "ok", labels.P_DENSE])))
    written = run_gradcam(
        preds_csv,
        tmp_path / "cams",
        model_path=study["onnx"],
        checkpoint=study["ckpt"],
        flag=f"p_dense>={threshold}",
        report=False,
        progress=False,
    )
    p_dense = pd.to_numeric(written[labels.P_DENSE], errors="coerce")
    expected = (written[labels.STATUS] == "ok") & (p_dense >= threshold)
    assert 0 < expected.sum() < len(expected) and (written["gradcam"] != "").tolist() == expected.tolist()
    assert not (tmp_path / "preds.report.html").exists()

    row = int(np.flatnonzero(expected)[0])
    image, _ = load(written.at[row, labels.PATH], study["cfg"])
    with GradCAM(load_checkpoint(study["ckpt"]).model.eval()) as cam:
        direct = cam(image[None, None], [labels.class_index(written.at[row, labels.DENSITY])]).raw[0]
    saved = np.load((tmp_path / written.at[row, "gradcam"]).with_suffix(".npy")).astype(np.float32)
    np.testing.assert_allclose(saved, direct, rtol=2e-3, atol=1e-4)  # float16 on disk


def test_wrong_model_or_checkpoint_is_an_error(study, tmp_path):
    from dens.artifact.model import build_model, save_checkpoint

    preds_csv = _write_preds(study, tmp_path)
    other_onnx = _stand_in_onnx(tmp_path / "other.onnx")
    with pytest.raises(GradcamError, match="not the model that wrote"):
        run_gradcam(preds_csv, tmp_path / "cams", model_path=other_onnx, progress=False)
    torch.manual_seed(1)
    save_checkpoint(
        tmp_path / "other.pt",
        build_model("resnet18", weights=None),
        study["cfg"],
        classes=labels.CLASSES,
        summary={},
        temperature=1.0,
        extra={},
    )
    with pytest.raises(GradcamError, match="not the one"):
        run_gradcam(
            preds_csv, tmp_path / "cams", model_path=study["onnx"], checkpoint=tmp_path / "other.pt", progress=False
        )
    assert (pd.read_csv(preds_csv, dtype=str, keep_default_na=False)["gradcam"] == "").all()  # nothing rewritten


def test_cli_writes_maps_and_reports_errors_as_messages(study, tmp_path):
    preds_csv = _write_preds(study, tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        gradcam_main,
        [
            str(preds_csv),
            "--out",
            str(tmp_path / "cams"),
            "--model",
            str(study["onnx"]),
            "--flag",
            "C,D",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "flagged" in result.output and "preds.report.html" in result.output
    written = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    dense = (written[labels.STATUS] == "ok") & written[labels.DENSITY].isin(["C", "D"])
    assert ((written["gradcam"] != "") == dense).all()

    bad = runner.invoke(
        gradcam_main, [str(preds_csv), "--out", str(tmp_path / "cams"), "--model", str(study["ckpt"]), "--no-progress"]
    )
    assert bad.exit_code == 1 and "Error:" in bad.output and "--model" in bad.output
    assert "Traceback" not in bad.output
    bad_flag = runner.invoke(gradcam_main, [str(preds_csv), "--out", str(tmp_path / "c"), "--flag", "E"])
    assert bad_flag.exit_code == 2 and "--flag" in bad_flag.output


def test_cli_opens_files_whose_path_cells_are_escaped_or_formula_guarded(study, tmp_path):
    """A preds.csv path cell is escaped (a backslash doubled, a tab as ``\\t``) and guarded against formulas (a
    leading apostrophe before ``=`` or ``@``): dens-gradcam opens the file the cell was written from."""
    from dens.preds.cells import path_cell

    preds_csv = _write_preds(study, tmp_path)
    with open(preds_csv, newline="") as f:
        header, *rows = list(csv.reader(f))
    col = {name: k for k, name in enumerate(header)}
    flagged = [r for r in rows if r[col["flagged"]] == "true"]
    names = ["=odd\\name.dcm", "@tab\there\\x.dcm"]
    # Beside preds.csv and named relative to it, so that each cell starts with = or @.
    for row, name in zip(flagged[:2], names, strict=True):
        shutil.copy(row[col[labels.PATH]], tmp_path / name)
        row[col[labels.PATH]] = path_cell(name)
    assert [r[col[labels.PATH]] for r in flagged[:2]] == ["'=odd\\\\name.dcm", "'@tab\\there\\\\x.dcm"]
    with open(preds_csv, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])

    result = CliRunner().invoke(
        gradcam_main, [str(preds_csv), "--out", str(tmp_path / "cams"), "--model", str(study["onnx"]), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert f"Grad-CAM: {len(flagged)} of {len(flagged)} flagged images mapped among" in result.output
    written = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    odd = written[written[labels.PATH].isin(["'=odd\\\\name.dcm", "'@tab\\there\\\\x.dcm"])]
    assert len(odd) == 2 and (odd[labels.GRADCAM] != "").all()  # mapped, and the cells kept as written
    assert all((tmp_path / rel).is_file() for rel in odd[labels.GRADCAM])


def test_model_defaults_to_the_latest_run_and_checkpoint_is_found_beside_it(study, tmp_path, monkeypatch):
    from dens import runs
    from dens.gradcam.runner import _find_checkpoint

    (tmp_path / "study").mkdir()
    _write_preds(study, tmp_path / "study")
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    shutil.copy(study["onnx"], run_dir / "model.onnx")
    runs.update_latest(run_dir)
    monkeypatch.chdir(tmp_path)  # runs/ is here; paths relative to here, not to the page, must still work
    written = run_gradcam("study/preds.csv", "study/out/cams", flag="C,D", progress=False)
    assert (written["gradcam"] != "").any()
    refs = re.findall(r'src="([^"]+)"', (tmp_path / "study" / "preds.report.html").read_text())
    assert refs and all(ref.startswith("data:image/webp;base64,") for ref in refs)  # the page carries them
    assert all((tmp_path / "study" / rel).is_file() for rel in written.loc[written["gradcam"] != "", "gradcam"])

    shutil.copy(study["ckpt"], run_dir / "best.pt")
    moved = {"checkpoint_path": "/elsewhere/no/longer/best.pt"}  # exported on another machine
    assert _find_checkpoint(None, moved, run_dir / "model.onnx") == run_dir / "best.pt"
    with pytest.raises(GradcamError, match="--checkpoint"):
        _find_checkpoint(None, moved, tmp_path / "model.onnx")


def test_dens_infer_gradcam_flag_and_resume(study, tmp_path):
    """`dens-infer --gradcam --flag` maps exactly the rows its own rule flags; a later --resume accepts the
    gradcam column it wrote and adds no row."""
    from click.testing import CliRunner

    from dens.infer.cli import main as infer_main

    cohort = study["cohort"]
    out = tmp_path / "preds.csv"
    args = [
        str(cohort),
        "--out",
        str(out),
        "--model",
        str(study["onnx"]),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--no-progress",
        "--flag",
        "p_A>=0",
    ]
    result = CliRunner().invoke(infer_main, [*args, "--gradcam", str(tmp_path / "cams")])
    assert result.exit_code == 0, result.output
    preds = pd.read_csv(out, dtype=str, keep_default_na=False)
    ok = preds[labels.STATUS] == "ok"
    assert ok.sum() >= 12 and (preds.loc[ok, labels.FLAGGED] == "true").all()  # p_A >= 0 flags every ok row
    assert (preds.loc[ok, labels.GRADCAM] != "").all() and (preds.loc[~ok, labels.GRADCAM] == "").all()
    for rel in preds.loc[ok, labels.GRADCAM]:
        assert (out.parent / rel).is_file()
    assert (out.parent / "preds.report.html").is_file()
    # It says where the page is, and its Grad-CAM line counts maps, not "errors" beside dens-infer's own count.
    (said,) = [line for line in result.output.splitlines() if "Grad-CAM" in line]
    assert said.startswith(f"dens-infer: --gradcam: Grad-CAM: {ok.sum()} of {ok.sum()} flagged images mapped")
    assert f"review page {out.parent / 'preds.report.html'}" in said and "error" not in said
    # Each map on the page's scale and, for its toggle, on its own: both drawn, both on the page.
    page = (out.parent / "preds.report.html").read_text()
    assert page.count('data-own-full="data:image/webp;base64,') == ok.sum()
    for rel in preds.loc[ok, labels.GRADCAM]:
        assert (out.parent / rel).parent.joinpath("own-scale", Path(rel).name).is_file()

    result = CliRunner().invoke(infer_main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out, dtype=str, keep_default_na=False)) == len(preds)


def test_every_view_is_shown_as_pacs_shows_it_at_the_display_size(study, tmp_path):
    """Thumbnails for every ok row by default (not only flagged exams), each the model's own canonical image
    on the display canvas, right breasts mirrored back so their chest wall is on the right."""
    preds_csv = _write_preds(study, tmp_path)
    written = run_gradcam(preds_csv, tmp_path / "cams", model_path=study["onnx"], flag="p_A>=2", progress=False)
    assert (written["gradcam"] == "").all()  # nothing flagged: every view still gets its thumbnail
    stems = assign_stems(written[labels.SOP_UID].tolist(), written[labels.PATH].tolist())
    tag = next((tmp_path / "cams" / "thumbs").glob("*.webp")).name.split("_", 1)[0]
    checked = set()
    for i, r in written[written[labels.STATUS] == "ok"].iterrows():
        shown = cv2.imread(str(tmp_path / "cams" / "thumbs" / f"{tag}_{stems[i]}.webp"), cv2.IMREAD_GRAYSCALE)
        canonical, info = load(r[labels.PATH], display_config(study["cfg"]))
        expected = thumbnail(as_displayed(canonical, r[labels.LATERALITY], study["cfg"]))
        assert shown.shape == expected.shape == (320, 320)
        error = np.abs(shown.astype(int) - expected).mean()
        assert error < 4, (r[labels.PATH], error)  # the lossy encoding's only
        if r[labels.LATERALITY] == "R":
            assert info.flipped and np.abs(shown.astype(int) - thumbnail(canonical)).mean() > 3 * error + 5
        checked.add(r[labels.LATERALITY])
    assert checked == {"L", "R"}
    page = (tmp_path / "preds.report.html").read_text()
    assert page.count("<img src=") == (written[labels.STATUS] == "ok").sum()


def test_the_page_shows_each_exam_s_study_date_and_age_from_its_headers(study, tmp_path):
    import pydicom

    from dens import exams

    preds_csv = _write_preds(study, tmp_path)
    written = run_gradcam(preds_csv, tmp_path / "cams", model_path=study["onnx"], flag="p_A>=2", progress=False)
    page = (tmp_path / "preds.report.html").read_text()
    ok = written[written[labels.STATUS] == "ok"]
    keys = [exams.exam_key(r) for r in ok.to_dict("records")]
    assert len(set(keys)) >= 3
    for key in set(keys):
        first = ok.iloc[keys.index(key)]
        header = pydicom.dcmread(first[labels.PATH], stop_before_pixels=True)
        date, age = header.StudyDate, int(header.PatientAge.rstrip("Y"))
        cell = page.split(f'data-exam="{html.escape(key, quote=True)}"')[1].split("</td>")[0] + "<"  # its identity
        assert f'<span class="k">study date</span> {date[:4]}-{date[4:6]}-{date[6:]}<' in cell
        assert f'<span class="k">age</span> {age}<' in cell


def test_on_a_canvas_already_display_sized_no_file_is_decoded_twice(tmp_path, synthetic_cohort, monkeypatch):
    """A model whose canvas is 512 px tall is shown on its own canvas: the flagged images its maps were
    computed on are reused for the pictures (the same pixels a second decode would give), the rest decoded
    once."""
    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx
    from dens.gradcam import runner
    from dens.infer import InferConfig
    from dens.infer import run as infer

    cfg = PreprocessConfig(height=512, width=256)
    assert display_config(cfg) == cfg
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", build_model("resnet18", weights=None), cfg, classes=labels.CLASSES)
    export_onnx(tmp_path / "best.pt", tmp_path / "model.onnx")
    preds_csv = tmp_path / "preds.csv"
    studies = synthetic_cohort(1, seed=9)
    infer(InferConfig(studies=studies, out=preds_csv, model=tmp_path / "model.onnx", workers=1, progress=False))
    decoded: list[int] = []
    real_load_batches = runner.load_batches

    def counting(items, *args):  # the real decode engine; only which rows it is asked for is noted
        decoded.extend(row for row, _ in items)
        return real_load_batches(items, *args)

    before = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    threshold = float(np.median(pd.to_numeric(before.loc[before[labels.STATUS] == "ok", labels.P_DENSE])))
    monkeypatch.setattr(runner, "load_batches", counting)
    written = run_gradcam(
        preds_csv, tmp_path / "cams", model_path=tmp_path / "model.onnx", flag=f"p_dense>{threshold}", progress=False
    )
    ok = written.index[written[labels.STATUS] == "ok"].tolist()
    flagged = written.index[written["gradcam"] != ""].tolist()
    assert 0 < len(flagged) < len(ok)
    assert sorted(decoded) == ok  # each once: the flagged ones for their maps, the rest for their thumbnails
    stems = assign_stems(written[labels.SOP_UID].tolist(), written[labels.PATH].tolist())
    tag = next((tmp_path / "cams" / "thumbs").glob("*.webp")).name.split("_", 1)[0]
    for i in flagged:  # the kept image is the one a decode gives
        thumb = cv2.imread(str(tmp_path / "cams" / "thumbs" / f"{tag}_{stems[i]}.webp"), cv2.IMREAD_GRAYSCALE)
        expected = thumbnail(
            as_displayed(load(written.at[i, labels.PATH], cfg)[0], written.at[i, labels.LATERALITY], cfg)
        )
        assert np.abs(thumb.astype(int) - expected).mean() < 4
