"""Starting weights: the real download code (torch.hub, as torchvision's Weights use it) against a server on
127.0.0.1, its cache, its hash check and its error; a run that cannot get its weights stops before decoding;
the learning-rate rule for random initialisation. No traffic leaves the loopback address."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from click.testing import CliRunner

from dens.artifact import model
from dens.artifact.model import WeightsUnavailable, fetch_weights, hub_cache_path, imagenet_weights_path
from dens.train import cli, loop
from dens.train.config import TrainConfig
from dens.train.distributed import Ranks

PROXIES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def local_only(tmp_path, monkeypatch):
    """The torch hub cache in tmp_path, and no proxy that could carry a request off this machine."""
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


class _Server:
    """A loopback HTTP server of in-memory files that counts the requests it is sent."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _small_state() -> tuple[dict, bytes]:
    state = {"conv.weight": torch.arange(12.0).reshape(3, 4), "bn.running_var": torch.ones(3)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return state, buffer.getvalue()


def _closed_port_url(name: str) -> str:
    with socket.socket() as s:  # a port that was free a moment ago and now has nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/weights/{name}"


def test_download_lands_in_the_hub_cache_once_and_is_reused(tmp_path):
    state, blob = _small_state()
    name = f"/weights/small-{hashlib.sha256(blob).hexdigest()[:10]}.pth"  # torch.hub's name-<sha256 prefix>
    with _Server({name: blob}) as server:
        url = server.url(name)
        got = fetch_weights(url, progress=False)
        cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(name).name
        assert hub_cache_path(url) == cached and cached.read_bytes() == blob
        again = fetch_weights(url, progress=False)
    assert server.requests == [name]  # the second call read the cached file
    for value in (got, again):
        assert value.keys() == state.keys()
        for key in state:
            assert torch.equal(value[key], state[key])


def test_a_file_failing_the_hash_check_is_refused_and_not_cached(tmp_path):
    _, blob = _small_state()
    name = "/weights/small-0123abcd.pth"  # the file's sha256 does not start with 0123abcd
    with _Server({name: blob}) as server:
        url = server.url(name)
        with pytest.raises(WeightsUnavailable) as err:
            fetch_weights(url, progress=False)
    message = str(err.value)
    assert url in message and "invalid hash value" in message
    assert not hub_cache_path(url).exists()
    assert list(hub_cache_path(url).parent.iterdir()) == []  # no partial file left behind


def test_an_unreachable_url_names_every_way_out(tmp_path):
    url = _closed_port_url("resnet18-f37072fd.pth")
    with pytest.raises(WeightsUnavailable) as err:
        fetch_weights(url, progress=False)
    message = str(err.value)
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    for needed in (url, str(path), "TORCH_HOME", "--weights PATH", "--weights none"):
        assert needed in message, needed
    assert isinstance(err.value, FileNotFoundError)  # dens-train reports it as a usage error, not a traceback


def test_imagenet_reads_torchvisions_file_from_the_cache(tmp_path):
    assert imagenet_weights_path("resnet18") == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet50").name == Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url).name
    torch.manual_seed(7)
    saved = torchvision.models.resnet18(weights=None).state_dict()
    imagenet_weights_path("resnet18").parent.mkdir(parents=True)
    torch.save(saved, imagenet_weights_path("resnet18"))
    # Cached: no download ('auto' is 'imagenet'), and the run records which weights it started from.
    cfg = TrainConfig(arch="resnet18", weights="auto")
    net, weights = loop.start_model(cfg, Ranks(0, 1, torch.device("cpu")))
    assert weights == "imagenet" and not loop.from_scratch(weights)
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight.detach(), saved["layer4.1.conv2.weight"])


def test_dens_train_stops_before_decoding_when_the_weights_cannot_be_downloaded(tmp_path, monkeypatch):
    url = _closed_port_url("resnet18-f37072fd.pth")
    monkeypatch.setitem(model.ARCHS, "resnet18", (torchvision.models.resnet18, SimpleNamespace(url=url)))

    def prepare_data(*args, **kwargs):
        raise AssertionError("data prepared before the weights were fetched")

    monkeypatch.setattr(loop.inputs, "prepare_data", prepare_data)
    (tmp_path / "data").mkdir()
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--arch", "resnet18", "--cache", str(cache)]
    outcome = CliRunner().invoke(cli.main, [*args, "--no-progress"])  # --weights imagenet: the default
    assert outcome.exit_code == 1, outcome.output
    assert url in outcome.output and "--weights none" in outcome.output and "TORCH_HOME" in outcome.output
    assert not cache.exists() and not (out / "config.yaml").exists()


def test_random_init_refuses_a_fine_tuning_learning_rate(tmp_path):
    assert TrainConfig().weights == "imagenet" and cli.DEFAULTS["weights"] == "imagenet"
    with pytest.raises(ValueError, match=r"--weights none .*raise --lr \(e\.g\. --lr 1e-3"):
        TrainConfig(weights="none", lr=1e-5)
    TrainConfig(weights="none", lr=1e-3)
    TrainConfig(weights="imagenet", lr=1e-5)  # the recipe: fine-tuning pretrained weights
    outcome = CliRunner().invoke(cli.main, ["--data", str(tmp_path), "--weights", "none", "--no-progress"])
    assert outcome.exit_code == 1 and "raise --lr" in outcome.output, outcome.output


def test_weights_path_starts_from_that_file(tmp_path):
    """--weights PATH: a local torchvision file (a machine without network access) is the starting point."""
    torch.manual_seed(11)
    saved = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-local.pth"
    torch.save(saved, path)
    net, weights = loop.start_model(TrainConfig(arch="resnet18", weights=str(path)), Ranks(0, 1, torch.device("cpu")))
    assert weights == str(path) and not loop.from_scratch(weights)
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight.detach(), saved["layer4.1.conv2.weight"])
    torch.testing.assert_close(
        # The grey input's first convolution is the RGB one summed over its colour channels.
        net.backbone.conv1.weight.detach().sum(1, keepdim=True),
        saved["conv1.weight"].sum(1, keepdim=True),
    )
