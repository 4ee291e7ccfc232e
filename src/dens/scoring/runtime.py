"""One ONNX Runtime session: provider choice, the model's own metadata, batched uint8 in, probabilities out.

``onnxruntime-gpu`` lists TensorRT and CUDA among its available providers on a machine with no GPU, and a
session asked for them there logs an error and runs on the CPU. So GPU providers are requested only when
a CUDA device really answers (the driver's ``cuDeviceGetCount``), and the provider in use is read from
the session after it is created: an explicit ``cuda``/``tensorrt`` request that the session did not
honour is an error, never a silent CPU run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

import dens
from dens.artifact.metadata import INPUT, PROBS
from dens.route.config import PreprocessConfig
from dens.scoring import DEVICES
from dens.scoring.model import ModelError, ModelFile

log = logging.getLogger(__name__)


PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# Batch sizes that keep each provider busy without holding many decoded images: on the CPU a bigger
# batch buys nothing (ResNet-50 at 512: the same img/s at batch 2, 4 and 8; the convolutions already fill
# the cores) and a smaller one starts the model sooner; a GPU wants dozens per launch.
DEFAULT_BATCH = {"tensorrt": 64, "cuda": 64, "cpu": 4}
OUTPUT = PROBS  # dens-infer reads the calibrated probabilities only


class DeviceError(RuntimeError):
    """The requested device cannot be used here; the message says why and what to do."""


def gpu_present() -> bool:
    """True when the CUDA driver loads and reports at least one device (no torch import needed)."""
    name = "libcuda.so.1" if os.name == "posix" else ctypes.util.find_library("nvcuda")
    try:
        lib = ctypes.CDLL(name)
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (OSError, AttributeError, TypeError):
        return False


def tensorrt_present() -> bool:
    """True when TensorRT's runtime library can be loaded (the TensorRT provider needs it)."""
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", ctypes.util.find_library("nvinfer")):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _wanted(device: str) -> list[str]:
    """Providers to ask for, best first, for ``device``; raises DeviceError when the hardware is absent."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return ["cpu"]
    gpu = gpu_present()
    if device == "auto":
        if not gpu:
            return ["cpu"]
        return ["tensorrt", "cuda", "cpu"] if tensorrt_present() else ["cuda", "cpu"]
    if not gpu:
        raise DeviceError(
            f"--device {device}: no CUDA GPU found on this machine (the CUDA driver reports none); "
            "use --device cpu or auto"
        )
    if device == "tensorrt" and not tensorrt_present():
        raise DeviceError(
            "--device tensorrt: TensorRT's runtime (libnvinfer) is not installed or not on the library "
            "path; install TensorRT, or use --device cuda"
        )
    return ["tensorrt", "cuda"] if device == "tensorrt" else ["cuda"]


# Niceness added to decode workers when the model runs on the CPU (see default_parallelism).
CPU_DECODE_NICE = 10


def default_parallelism(device: str, cores: int | None = None) -> tuple[int, int]:
    """(decode workers, ONNX Runtime threads) for ``device`` on ``cores`` CPUs (default: this process's).

    On a GPU the model costs the host almost nothing: every core but one (the main process batches and
    feeds the GPU) decodes. On the CPU the model is most of the work (ResNet-50 at 512 on 2 cores: 4.6-5.0
    img/s in ORT alone against about 8 img/s decoding on one core), so ORT gets every core and so do the
    decode workers, at a lower priority (CPU_DECODE_NICE): the model keeps its cores and decoding fills
    its gaps. On the 2-core machine that took the model stage inside dens-infer from 66% to about 90% of
    ORT alone and end to end from 3.0-3.25 to 3.2-3.4 img/s (bench/pipeline.py, bench/scaling.py; notes).
    """
    if cores is None:
        cores = dens.usable_cores()
    if device in ("cuda", "tensorrt"):
        return max(1, cores - 1), 1
    return max(1, cores), max(1, cores)


def decode_nice(device: str) -> int:
    """Niceness for decode workers: CPU_DECODE_NICE when the model runs on the CPU, else 0 (on a GPU the
    decoding is the bottleneck and must not yield to anything)."""
    return CPU_DECODE_NICE if device == "cpu" else 0


def planned_device(device: str) -> str:
    """The device ``device`` resolves to here, before any session exists (``auto`` -> the best present);
    raises DeviceError for an explicit GPU choice without the hardware."""
    return _wanted(device)[0]


def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries ONNX Runtime's CUDA provider needs, before a GPU session opens.

    torch's CUDA wheels (a dens dependency) carry them in the ``nvidia`` packages, and ``import torch``
    loads them into the process: ONNX Runtime documents that as enough when torch's CUDA major matches its
    own. ``ort.preload_dlls`` alone looks for those packages beside onnxruntime, which misses them when
    the two are installed in different places (a ``--target`` or user install of onnxruntime-gpu beside
    a system torch); it still finds a system CUDA. Failures surface as a provider that did not load."""
    try:
        import torch  # noqa: F401  (loads libcudart, cuBLAS and cuDNN from torch's nvidia packages)
    except Exception as exc:
        log.debug("import torch (for its CUDA libraries): %s", exc)
    try:
        ort.preload_dlls()
    except Exception as exc:
        log.debug("onnxruntime.preload_dlls: %s", exc)


def _provider_options(
    name: str, shape: tuple[int, int], batch: int, cuda_options: dict | None = None
) -> tuple[str, dict]:
    if name == "tensorrt":
        cache = Path(os.environ.get("DENS_TRT_CACHE", Path.home() / ".cache" / "dens" / "tensorrt"))
        cache.mkdir(parents=True, exist_ok=True)
        dims = f"{INPUT}:{{}}x1x{shape[0]}x{shape[1]}"
        # An optimisation profile over the batch sizes the run feeds (1 .. batch) and an engine cache,
        # so the engine is built once per model and machine, not per run.
        return PROVIDERS[name], {
            "device_id": 0,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_profile_min_shapes": dims.format(1),
            "trt_profile_opt_shapes": dims.format(batch),
            "trt_profile_max_shapes": dims.format(batch),
        }
    if name == "cuda":
        return PROVIDERS[name], {"device_id": 0, **(cuda_options or {})}
    return PROVIDERS[name], {}


@dataclass
class Runtime:
    """An open session and what it was opened with. :meth:`predict` takes uint8 ``[N, 1, S, S]``."""

    session: ort.InferenceSession
    model: ModelFile
    provider: str  # the provider ONNX Runtime put first, e.g. CPUExecutionProvider
    device: str  # tensorrt | cuda | cpu
    batch_size: int
    threads: int
    _device_input: dict = field(default_factory=dict, repr=False)

    @property
    def model_path(self) -> Path:
        return self.model.path

    @property
    def metadata(self) -> dict:
        return self.model.metadata

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.model.preprocess

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.classes

    @property
    def precision(self) -> str:
        """What the graph computes in, from its metadata: fp32, fp16 or int8."""
        return self.model.precision

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities ``[N, len(classes)]`` (float32) for a uint8 batch."""
        if self.device == "cpu":
            return self.session.run([OUTPUT], {INPUT: batch})[0]
        # IO binding: the uint8 batch is copied once into a device buffer reused across batches of one
        # shape (one byte a pixel crosses the bus); only the small probability matrix comes back.
        value = self._device_input.get(batch.shape)
        if value is None:
            value = ort.OrtValue.ortvalue_from_shape_and_type(batch.shape, np.uint8, "cuda", 0)
            self._device_input = (
                {batch.shape: value} if len(self._device_input) >= 2 else {**self._device_input, batch.shape: value}
            )
        value.update_inplace(np.ascontiguousarray(batch))
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT, value)
        binding.bind_output(OUTPUT, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def open_runtime(
    model: ModelFile | str | os.PathLike,
    device: str = "auto",
    *,
    batch_size: int | None = None,
    threads: int | None = None,
    spinning: bool = False,
    cuda_options: dict | None = None,
) -> Runtime:
    """Open ``model`` (read already, or its path: read now) on ``device`` (auto = TensorRT, then CUDA, then
    CPU, GPU ones only when a GPU is present). ``threads``: ONNX Runtime's intra-op threads (the CPU provider's
    compute; on a GPU they only feed it; default: :func:`default_parallelism`). ``spinning``: let idle ORT
    threads spin, which steals cores from the decode workers that share them. ``cuda_options``: more CUDA
    provider options (such as ``{"prefer_nhwc": "1"}``), for benchmarks that try them before dens-infer adopts
    one."""
    if not isinstance(model, ModelFile):
        model = _read(Path(model))
    model_path = model.path
    wanted = _wanted(device)
    if wanted[0] != "cpu":
        load_cuda_libraries()
    chosen = threads
    threads = max(1, threads or default_parallelism(wanted[0])[1])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: a provider that fails to load is reported by us, once
    probe_shape = model.preprocess.shape
    probe_batch = batch_size or DEFAULT_BATCH[wanted[0]]
    providers = [_provider_options(name, probe_shape, probe_batch, cuda_options) for name in wanted]
    try:
        session = ort.InferenceSession(
            str(model_path), options, providers=[p for p, _ in providers], provider_options=[o for _, o in providers]
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{model_path}: ONNX Runtime cannot open it ({first})") from exc
    provider = session.get_providers()[0]
    used = next(name for name, full in PROVIDERS.items() if full == provider)
    if device != "auto" and used != device:
        raise DeviceError(
            f"--device {device}: ONNX Runtime could not start {PROVIDERS[device]} (it fell back to "
            f"{provider}); check the CUDA/cuDNN/TensorRT libraries, or use --device auto"
        )
    if used != wanted[0]:  # auto: a GPU is there but its provider did not load
        log.warning("%s was requested but did not load; running on %s", PROVIDERS[wanted[0]], provider)
        if used == "cpu" and chosen is None:  # reopen with the CPU's thread count, not the GPU's
            return open_runtime(model, "cpu", batch_size=batch_size, spinning=spinning)
    _check_io(session, model_path, model.preprocess.shape, len(model.classes))
    int8 = model.metadata.get("int8") or {}
    calibrated = f", {int8['format']}, calibrated on {int8['calibration_images']} images" if int8 else ""
    log.info("running the %s graph %s%s", model.precision, model_path, calibrated)
    return Runtime(session, model, provider, used, batch_size or DEFAULT_BATCH[used], threads)


def _read(path: Path) -> ModelFile:
    """The model at ``path``, read for a caller that holds only its path (a benchmark, a Ray model actor):
    a file that is no dens model is ModelError, as from :meth:`ModelFile.read`."""
    if not path.is_file():
        raise ModelError(f"model {path} not found: export one with `dens-export --onnx` or pass --model")
    return ModelFile.read(path)


def _check_io(session: ort.InferenceSession, model_path: Path, shape: tuple[int, int], num_classes: int) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    image = inputs.get(INPUT)
    if image is None or OUTPUT not in outputs:
        raise ModelError(
            f"{model_path}: expected input '{INPUT}' and output '{OUTPUT}', found inputs "
            f"{sorted(inputs)} and outputs {sorted(outputs)}; re-export it with dens-export"
        )
    if image.type != "tensor(uint8)" or len(image.shape) != 4 or list(image.shape[1:]) != [1, *shape]:
        raise ModelError(
            f"{model_path}: input '{INPUT}' is {image.type} {image.shape}; dens-infer feeds uint8 "
            f"[N, 1, {shape[0]}, {shape[1]}] as its metadata's preprocess says; re-export it"
        )
    width = outputs[OUTPUT].shape[-1]
    if isinstance(width, int) and width != num_classes:
        raise ModelError(f"{model_path}: '{OUTPUT}' has {width} columns for {num_classes} classes; re-export it")
