"""dens-infer on Ray Data (``--engine ray``): the same files, rows and CSVs as the local engine, on a cluster.

The driver streams the files to account for (the walk of STUDIES or a manifest, exactly as the local engine
does, in chunks of :data:`CHUNK`: a million-path archive is never held whole) into Ray Data, where

1. decode actors (one CPU each) run the one preprocessing route through :class:`dens.engine.DecodePool`
   (one spawned worker each), so a codec that crashes or hangs costs its file an error row, not the actor;
2. model actors (one ONNX Runtime session each; one GPU each on GPU nodes, else a few CPU threads) score
   the decoded batch;

and the driver turns each result into the preds.csv row the local engine writes (:func:`make_row`),
appending it through the same writer, in the same order (Ray Data's ``preserve_order``). A Ray worker
killed mid-run is restarted and its batch done again: it costs time, not rows. ``--resume`` works as it
does locally: the rows written are the record of what is done.

Files are read where the actors run: STUDIES (or the manifest's paths) must be on a filesystem every node
mounts at the same path. The paths sent (the files', the model's) are absolute, and the workers start in an
empty working directory of Ray's, not in the driver's: Ray puts a driver's working directory first on its
workers' import path, where a folder named like a module (``dens``, ``numpy``) would break every worker.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from ray.exceptions import RayError as RayError  # what process() raises when Ray cannot go on

from dens import labels
from dens.route.errors import status_of
from dens.sources import Item

log = logging.getLogger(__name__)

# Where Ray's job manager hands a submitted job's config (its runtime_env among it) to the driver.
_JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"
CHUNK = 20_000  # files handed to Ray Data at a time: the driver's memory holds one chunk of paths
DECODE_BATCH = 8  # files per decode task: small, so one slow file delays few others


@dataclass(frozen=True)
class RayPlan:
    """How the cluster is used: where it is, how many actors of each kind, and what each gets."""

    decoders: int  # decode actors
    scorers: int  # model actors
    scorer_cpus: float
    scorer_gpus: float
    batch_size: int
    decoder_cpus: float = 1.0


def connect(address: str | None, progress: bool) -> dict:
    """Join the Ray cluster at ``address`` ('auto': the one this machine belongs to; 'ray://host:10001': a
    remote one through Ray Client), or start a local one when None; returns its resources."""
    # Ray's own chatter (its C++ log lines, its data library's info and warnings) stays off the terminal;
    # set RAY_BACKEND_LOG_LEVEL to see the former.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    import ray

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        # An empty working_dir keeps the driver's working directory (and its script's folder) off the workers'
        # import path; Ray copies it to each node, so the folder itself may go once Ray has it.
        with tempfile.TemporaryDirectory(prefix="dens-ray-") as empty:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                ignore_reinit_error=True,
                runtime_env=None if _job_has_working_dir() else {"working_dir": empty},
            )
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in the walk's order, as the local engine writes
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    return ray.cluster_resources()


def _job_has_working_dir() -> bool:
    """Whether this driver runs as a Ray job (``ray job submit``, a KubeRay RayJob) given a working_dir: Ray then
    keeps the working directory off the workers' path itself, and refuses a second working_dir."""
    job = json.loads(os.environ.get(_JOB_CONFIG_VARIABLE) or "{}")
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def plan(resources: dict, device: str, batch_size: int | None) -> RayPlan:
    """Actors for the cluster's resources: a model actor per GPU when there are GPUs (and the device allows
    them), else one CPU model actor per 8 CPUs (at least one) with 2 threads; the remaining CPUs decode."""
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if cpus < 2 and not gpus:  # one CPU: one decode and one model actor share it (else the second never starts)
        return RayPlan(1, 1, 0.5, 0, batch_size or 4, decoder_cpus=0.5)
    if gpus and device in ("auto", "cuda", "tensorrt"):
        return RayPlan(max(1, cpus - gpus), gpus, 1, 1, batch_size or 64)
    scorers = max(1, cpus // 8)
    threads = 2 if cpus >= 4 else 1
    return RayPlan(max(1, cpus - scorers * threads), scorers, threads, 0, batch_size or 4)


def first_line(exc: BaseException) -> str:
    """The line of a Ray error that says what went wrong (its last non-empty one: Ray's own come first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class _Decode:
    """A decode actor: the one preprocessing route behind a one-worker :class:`DecodePool`.

    Text crosses Ray as JSON (ASCII): a path that is not UTF-8 (its bytes kept as surrogate escapes) or a
    reason quoting one would not survive Arrow's UTF-8 strings."""

    def __init__(self, preprocess: dict, timeout: float | None, memory_budget: int | None):
        from dens.engine import DecodePool
        from dens.route.config import PreprocessConfig

        self.cfg = PreprocessConfig.from_dict(preprocess)
        self.pool = DecodePool(1, self.cfg, buffer=DECODE_BATCH, timeout=timeout, memory_budget=memory_budget)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [tuple(json.loads(item)) for item in batch["item"].tolist()]
        n = len(items)
        result = np.empty(n, dtype=object)
        ok = np.zeros(n, bool)
        image = np.zeros((n, *self.cfg.shape), np.uint8)
        for decoded in self.pool.map(items):
            i = decoded.index
            result[i] = json.dumps(
                {
                    "status": decoded.status,
                    "reason": decoded.reason,
                    "info": decoded.info,
                    "noise": decoded.noise,
                    "seconds": decoded.seconds,
                }
            )
            if decoded.status == "ok":
                ok[i] = True
                image[i] = decoded.image
        return {"index": batch["index"], "result": result, "ok": ok, "image": image}


class _Score:
    """A model actor: one ONNX Runtime session; adds ``probs`` and drops the images."""

    def __init__(self, model: str, device: str, batch_size: int, threads: int):
        from dens.scoring.runtime import open_runtime

        self.runtime = open_runtime(model, device, batch_size=batch_size, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["ok"])
        probs = np.full((len(batch["index"]), len(labels.CLASSES)), np.nan, np.float32)
        if len(ok):
            probs[ok] = self.runtime.predict(batch["image"][ok][:, None])
        return {"index": batch["index"], "result": batch["result"], "probs": probs}


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def process(
    items: Iterable[Item],
    plan: RayPlan,
    model: Path,
    device: str,
    preprocess: dict,
    on_result: Callable[[dict], None],
    *,
    timeout: float | None,
    memory_budget: int | None,
    chunk: int = CHUNK,
) -> None:
    """Decode and score ``items`` (:class:`dens.sources.Item`: path, problem, a manifest's identity) on the
    cluster, calling ``on_result`` with each file's outcome (path, status, reason, info dict or None, probs or
    None, noise, seconds, and the item's identity) in ``items``' order. Raises :class:`RayError` when Ray
    cannot go on (an actor that cannot start)."""
    # Ray Data's actors are restarted when they die and their task retried (max_restarts and
    # max_task_retries -1 by default): a killed worker costs its batch's time, not its rows.
    for part in _chunks(items, chunk):
        started = time.perf_counter()
        # A file the walk or the manifest already found wanting (missing, a folder) gets its error row here,
        # in its place, as the local pool makes it: a manifest of mostly missing paths costs Ray nothing.
        told = 0  # the first index of ``part`` not yet reported
        for index, outcome, probs in _run_chunk(part, plan, model, device, preprocess, timeout, memory_budget):
            for item in part[told:index]:  # only files with a problem lie between two sent ones
                on_result(_problem_row(item))
            probs = probs if outcome["status"] == "ok" else None
            on_result({"path": part[index].path, **outcome, "probs": probs, "identity": part[index].identity})
            told = index + 1
        for item in part[told:]:
            on_result(_problem_row(item))
        log.debug("ray engine: %d files in %.1f s", len(part), time.perf_counter() - started)


def _problem_row(item: Item) -> dict:
    return {
        "path": item.path,
        "status": status_of(item.problem),
        "reason": item.problem,
        "info": None,
        "probs": None,
        "noise": "",
        "seconds": 0.0,
        "identity": item.identity,
    }


def _run_chunk(part, plan, model, device, preprocess, timeout, memory_budget):
    """``(index, outcome, probs)`` for the items of ``part`` that have no problem, in order, through Ray
    Data: the decode actor pool, then the model actor pool."""
    send = [{"index": i, "item": json.dumps(item[:2])} for i, item in enumerate(part) if not item.problem]
    if not send:
        return
    import ray.data

    ds = ray.data.from_items(send)
    ds = ds.map_batches(
        _Decode,
        fn_constructor_kwargs={"preprocess": preprocess, "timeout": timeout, "memory_budget": memory_budget},
        batch_size=DECODE_BATCH,
        compute=ray.data.ActorPoolStrategy(size=plan.decoders),
        num_cpus=plan.decoder_cpus,
    )
    ds = ds.map_batches(
        _Score,
        fn_constructor_kwargs={
            "model": os.path.abspath(model),  # the actors' working directory is not the driver's
            "device": device if plan.scorer_gpus else "cpu",
            "batch_size": plan.batch_size,
            "threads": max(1, int(plan.scorer_cpus)),
        },
        batch_size=plan.batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.scorers),
        num_cpus=plan.scorer_cpus,
        num_gpus=plan.scorer_gpus,
    )
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for index, result, probs in zip(batch["index"], batch["result"], batch["probs"], strict=True):
            yield int(index), json.loads(result), probs
