"""The uint8-in model, its weights loading and its checkpoint file (resnet18 at S=32, CPU)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dens.artifact.model import (
    GREY_MEAN,
    GREY_STD,
    CheckpointError,
    build_model,
    file_sha256,
    imagenet_weights_path,
    load_checkpoint,
    save_checkpoint,
)
from dens.labels import CLASSES
from dens.route.config import PreprocessConfig

S = 32  # resnet18 still ends at 1x1 in layer4; small keeps the file fast on 2 CPU cores


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 32-pixel resnet18 gains nothing from threads, and on a busy 2-core machine OpenMP's waiting made
    each forward pass take a second instead of 20 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("resnet18", weights=None).eval()


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, S, S), dtype=torch.uint8, generator=g)


def test_uint8_in_logits_out(net):
    x = _images(3)
    with torch.no_grad():
        logits = net(x)
        as_float = net(x.float())
    assert logits.shape == (3, len(CLASSES)) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, as_float, rtol=0, atol=0)
    assert net.backbone.conv1.in_channels == 1 and net.backbone.fc.out_features == 4
    assert net.model_args == {"arch": "resnet18", "num_classes": 4, "mean": GREY_MEAN, "std": GREY_STD}


def test_normalisation_is_inside_the_graph(net):
    x = torch.zeros(1, 1, S, S, dtype=torch.uint8)
    x[..., 10:40, 5:30] = 200
    with torch.no_grad():
        got = net(x)
        expected = net.backbone((x.float() / 255 - 0.449) / 0.226)
        raw = net.backbone(x.float())
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, raw, atol=1e-3)
    assert {"mean", "std"} <= set(net.state_dict())  # buffers: they travel into the exported graph


def test_channels_last_gives_the_same_logits(net):
    x = _images(2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), net(x))


def _fake_pretrained(path, arch=torchvision.models.resnet18):
    torch.manual_seed(7)
    state = arch(weights=None).state_dict()  # torchvision layout: 3-channel conv1, 1000-way fc
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_imagenet_present_sums_conv1_and_replaces_fc(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    saved = _fake_pretrained(imagenet_weights_path("resnet18"))
    model = build_model("resnet18", weights="imagenet")
    conv1 = model.backbone.conv1.weight.detach()
    assert conv1.shape == (64, 1, 7, 7)
    torch.testing.assert_close(conv1, saved["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight.detach(), saved["layer4.1.conv2.weight"])
    torch.testing.assert_close(model.backbone.bn1.running_var, saved["bn1.running_var"])
    assert model.backbone.fc.weight.shape == (4, 512)


def test_weights_from_a_path_and_clear_errors(tmp_path):
    saved = _fake_pretrained(tmp_path / "r18.pth")
    model = build_model("resnet18", weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight.detach(), saved["layer1.0.conv1.weight"])
    with pytest.raises(FileNotFoundError, match=r"gone\.pth"):
        build_model("resnet18", weights=tmp_path / "gone.pth")
    with pytest.raises(CheckpointError, match=r"r18\.pth.*resnet50"):
        build_model("resnet50", weights=tmp_path / "r18.pth")  # another arch's file
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        build_model("resnet18", weights=tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg16")


def test_checkpoint_round_trip(net, tmp_path):
    cfg = PreprocessConfig(size=S, crop=False)
    summary = {"arch": "resnet18", "val_kappa_quadratic": 0.71, "data": {"train": 10}}
    extra = {"epoch": 3, "rng": torch.get_rng_state()}
    sha = save_checkpoint(tmp_path / "runs" / "best.pt", net, cfg, summary=summary, temperature=1.7, extra=extra)
    assert sha == file_sha256(tmp_path / "runs" / "best.pt")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["best.pt"]  # no temporary file left behind

    ckpt = load_checkpoint(tmp_path / "runs" / "best.pt")
    assert not ckpt.model.training and ckpt.sha256 == sha and ckpt.path == tmp_path / "runs" / "best.pt"
    assert ckpt.preprocess == cfg and ckpt.classes == CLASSES and ckpt.temperature == 1.7
    assert ckpt.summary == summary and ckpt.extra["epoch"] == 3
    torch.testing.assert_close(ckpt.extra["rng"], extra["rng"])
    x = _images(2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), net(x), rtol=0, atol=0)


def test_training_state_survives_weights_only(tmp_path):
    """What dens-train keeps in ``extra`` (optimizer, scheduler, scaler) loads back under weights_only."""
    model = build_model("resnet18", weights=None)
    head = model.backbone.fc  # the head alone keeps this fast; the state's format is the same for all layers
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
    save_checkpoint(tmp_path / "last.pt", model, PreprocessConfig(size=S), extra=extra)
    loaded = load_checkpoint(tmp_path / "last.pt").extra
    fresh = torch.optim.AdamW(nn.Linear(512, 4).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert loaded["scheduler"] == scheduler.state_dict() and loaded["scaler"] == scaler.state_dict()


def test_save_refuses_what_weights_only_cannot_load(net, tmp_path):
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"extra\['best'\].*numpy"):
        save_checkpoint(tmp_path / "x.pt", net, PreprocessConfig(size=S), extra={"best": np.float64(0.5)})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "x.pt", net, PreprocessConfig(size=S), summary={"t": torch.ones(1)})
    with pytest.raises(TypeError, match="DensityNet"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(2, 2), PreprocessConfig(size=S))
    assert not list(tmp_path.iterdir())


def test_wrapper_prefixes_are_stripped(net, tmp_path):
    # DataParallel runs on CPU and adds `module.`; torch.compile adds `_orig_mod.` (nothing compiles until a call).
    wrapped = torch.compile(nn.DataParallel(net))
    assert next(iter(wrapped.state_dict())).startswith("_orig_mod.module.")
    save_checkpoint(tmp_path / "a.pt", wrapped, PreprocessConfig(size=S))
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(blob["state_dict"]) == set(net.state_dict())

    # A checkpoint written by other code with the prefixes still on its keys loads too.
    blob["state_dict"] = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    torch.save(blob, tmp_path / "b.pt")
    x = _images(1, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "b.pt").model(x), net(x), rtol=0, atol=0)


RAN: list[str] = []


def _payload() -> None:
    RAN.append("code from a checkpoint ran")


class Hostile:
    """Unpickling this would call _payload: what a malicious checkpoint does with os.system."""

    def __reduce__(self):
        return (_payload, ())


def test_pickled_objects_are_refused(net, tmp_path):
    save_checkpoint(tmp_path / "ok.pt", net, PreprocessConfig(size=S))
    blob = torch.load(tmp_path / "ok.pt", weights_only=True)
    blob["extra"] = {"x": Hostile()}
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    assert RAN == []


def test_bad_checkpoints_are_named(net, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare\.pt is not a dens checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")
    save_checkpoint(tmp_path / "ok.pt", net, PreprocessConfig(size=S))
    blob = torch.load(tmp_path / "ok.pt", weights_only=True)
    variants = {
        "future.pt": ({**blob, "format_version": 99}, "format 99"),
        "nokeys.pt": ({k: v for k, v in blob.items() if k != "classes"}, "lacks classes"),
        "head.pt": ({**blob, "model_args": {**blob["model_args"], "num_classes": 5}}, "inconsistent.*fc"),
        "args.pt": ({**blob, "model_args": {**blob["model_args"], "depth": 3}}, "inconsistent.*depth"),
        "classes.pt": ({**blob, "classes": ["A", "B"]}, "2 classes"),
    }
    for name, (bad, why) in variants.items():
        torch.save(bad, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"(?s){name.replace('.', '[.]')}.*{why}"):
            load_checkpoint(tmp_path / name)
