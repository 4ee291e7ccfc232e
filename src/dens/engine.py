"""The decode engine: the one way to run :func:`dens.route.preprocess.load` over many files, for every stage.

dens-infer, the training cache, export's parity check on real images and Grad-CAM all decode through
:class:`DecodePool`: files in, canonical ``uint8 [S, S]`` images out, in input order as far as that costs
nothing (a slow file is overtaken: see :meth:`DecodePool.map`). Each worker runs the one route from a file to
pixels and sends back the small canonical image (resizing inside the worker: a 512x512 image crosses the pipe
almost free, a 27 MB frame does not).

The pool is hand-made rather than ``concurrent.futures`` or ``multiprocessing.Pool``: a worker killed by a
codec (a segfault on a hostile file) or stuck in one (no result within ``timeout`` seconds) must cost that
one file a row with a reason while the run carries on; a ``ProcessPoolExecutor`` is broken for good after one
death and ``Pool.imap`` waits forever for a task whose worker died. Each worker has its own pipe and at most
``per_worker`` tasks, so the pool always knows which file a dead worker was reading. Each file is decoded
under a memory budget (RLIMIT_DATA, set around the one file): a file whose header promises a decode larger
than the budget is refused before any pixel is read, and a decoder that tries to allocate past it fails with a
MemoryError; either way the file gets an ``over_memory_budget`` row and the machine never runs out of memory.

Work in flight is bounded (tasks at the workers + results waiting to be consumed), so memory stays flat
however large the archive. Workers are spawned (never forked from a process that holds an ONNX Runtime
session, a CUDA context or OpenCV's thread pool); each pins BLAS/OpenMP and OpenCV to one thread, as the
parallelism is the processes, and decodes every file inside :func:`dens.route.decode.quiet_decoders`, so codec
noise becomes the result's ``noise`` instead of lines on the user's terminal.

This module imports only the standard library (and :mod:`dens.route.errors`) at the top: a spawned worker
imports it before it pins its threads.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from dens.route.errors import Reason, status_of

log = logging.getLogger(__name__)

THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)
# Seconds one file may take in a worker before the worker is killed and the file gets a worker_timeout
# row. The slowest honest decode (a 5355x4915 JPEG 2000 frame in full, GDCM on a large 12-bit JPEG) takes
# seconds on one core; a minute leaves room for a loaded machine.
DEFAULT_TIMEOUT = 60.0
# Bytes one file's decode may allocate in a worker. The largest mammograms (about 30 megapixels, 16 bits)
# take under 400 MiB decoded in full; 1 GiB leaves room and bounds N workers to N GiB whatever the files say.
DEFAULT_MEMORY_BUDGET = 1 << 30
_DONE = object()


@dataclass
class Decoded:
    """One file's outcome. ``index``: its position in the input. ``image`` (uint8 [S, S]) and ``info``
    (``ImageInfo.to_dict()``) when ``status`` is ``ok``; otherwise ``reason`` says why (``code: detail``, the
    code a :class:`dens.route.errors.Reason`) and ``info`` is the file's identity as its header gave it (the keys
    of ``dens.route.preprocess.IDENTITY_KEYS``), or None when no header was read (not DICOM, unreadable, a worker
    that crashed or timed out). ``noise``: what the codecs logged or printed on the way (debug material).
    ``seconds``: time in the worker."""

    index: int
    path: str
    status: str
    reason: str = ""
    image: Any = None
    info: dict | None = None
    noise: str = ""
    seconds: float = 0.0

    @property
    def code(self) -> str:
        """The reason's code (``corrupt_pixel_data``, ``worker_crashed``...); '' when ``ok``."""
        return self.reason.partition(": ")[0]

    @property
    def detail(self) -> str:
        """The reason after its code."""
        return self.reason.partition(": ")[2]


def _pin_threads() -> None:
    """One thread per BLAS/OpenMP pool and for OpenCV in this worker: the variables for libraries not yet
    loaded, threadpoolctl for those that are (a parent's ``__main__`` re-imported under spawn may have
    loaded numpy already)."""
    os.environ.update(dict.fromkeys(THREAD_ENV, "1"))
    import cv2
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    cv2.setNumThreads(0)  # sequential OpenCV


@contextlib.contextmanager
def _memory_limit(budget: int | None) -> Iterator[None]:
    """Inside this block the process may allocate at most ``budget`` more bytes of data (RLIMIT_DATA's soft
    limit, raised back when the block ends). Where the limit cannot be read or set, no limit."""
    from dens.route.decode import data_memory

    used = data_memory()
    try:
        import resource
    except ImportError:
        resource = None
    if budget is None or used is None or resource is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = used + budget if hard == resource.RLIM_INFINITY else min(hard, used + budget)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _worker(conn: Connection) -> None:
    """Worker main: ``(PreprocessConfig dict, nice, memory budget)`` first, then ``(index, path)`` in and
    ``(index, status, reason, image, info, noise, seconds)`` out. The setup comes over the pipe so that a
    worker can start (imports take a second) while the parent is still opening the model that says what the
    config is, and on which device (the niceness to add: lower priority than the parent's model on a CPU)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes our pipe
    _pin_threads()
    import cv2

    from dens.route.config import PreprocessConfig
    from dens.route.decode import quiet_decoders
    from dens.route.errors import Reason, UnusableFile
    from dens.route.preprocess import load

    try:
        setup = conn.recv()
    except (EOFError, OSError):
        return
    if setup is None:
        return
    cfg, nice, budget = setup
    niceness = os.nice(nice)
    config = PreprocessConfig.from_dict(cfg)
    conn.send(("ready", os.getpid(), cv2.getNumThreads(), niceness))
    # What the codecs print on fd 2 goes to one file, reused for every file this worker decodes.
    with tempfile.TemporaryFile() as capture:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if task is None:
                return
            index, path = task
            start = time.perf_counter()
            noise: list[str] = []
            try:
                # The budget also reaches dens.route.dicom's check from the header, which reads the limit.
                with quiet_decoders(path, capture) as noise, _memory_limit(budget):
                    image, info = load(path, config)
                result = (index, "ok", "", image, info.to_dict())
            except UnusableFile as exc:
                result = (index, exc.status, f"{exc.reason.value}: {exc.detail}", None, exc.identity)
            except Exception as exc:  # a decoder bug costs one file an error row, never the run
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                result = (index, "error", f"{Reason.UNEXPECTED.value}: {type(exc).__name__}: {first}", None, None)
            try:
                conn.send((*result, " | ".join(noise), time.perf_counter() - start))
            except (BrokenPipeError, EOFError, OSError):
                return


class PoolError(RuntimeError):
    """The pool cannot run at all (a worker dies before it is ready)."""


class _Worker:
    def __init__(self, ctx, setup: tuple[dict, int, int | None] | None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True, name="dens-decode")
        self.proc.start()
        child.close()
        if setup is not None:
            self.configure(setup)
        self.pending: deque[tuple[int, str]] = deque()
        self.ready = False
        self.cv2_threads: int | None = None
        self.niceness: int | None = None
        self.busy_since: float | None = None  # when it began its first pending task (once ready)

    def configure(self, setup: tuple[dict, int, int | None]) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):  # a dead worker is found by its sentinel
            self.conn.send(setup)

    def ask_to_stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)

    def stop(self, timeout: float = 2.0) -> None:
        """Wait ``timeout`` for the worker to leave (after :meth:`ask_to_stop`), then kill it."""
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()


def _death_note(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


class DecodePool:
    """``workers`` decode processes running ``dens.route.preprocess.load(path, cfg)``. Without ``cfg`` the workers
    start (and import) at once and wait for :meth:`configure`, so their start-up overlaps the caller's.

    ``per_worker``: tasks handed to one worker at a time (2: one running, one waiting, so a worker never
    idles on the round trip). ``buffer``: decoded results held for the consumer (set it to about two
    batches). ``nice`` (here or in :meth:`configure`): added to each worker's scheduling niceness, so that
    where decoding and a CPU model share the cores, the model (the bottleneck there) keeps them and
    decoding fills its gaps.
    ``timeout``: seconds one file may take before its worker is killed and the file gets a
    ``worker_timeout`` row (None: wait forever).
    ``memory_budget``: bytes one file's decode may allocate in its worker (default
    :data:`DEFAULT_MEMORY_BUDGET`, 1 GiB; None: no limit). A file whose header promises more is refused
    before its pixels are read, a decode that tries to take more fails; either way the file gets an
    ``over_memory_budget`` error row. Enforced through RLIMIT_DATA on Linux (kernel 4.7 or later).
    Use as a context manager; :meth:`map` yields one :class:`Decoded` per input.
    """

    def __init__(
        self,
        workers: int,
        cfg=None,
        *,
        per_worker: int = 2,
        buffer: int = 16,
        nice: int = 0,
        timeout: float | None = DEFAULT_TIMEOUT,
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.timeout = timeout
        self.memory_budget = memory_budget
        self._setup: tuple[dict, int, int | None] | None = (
            (cfg.to_dict(), nice, memory_budget) if cfg is not None else None
        )
        self._ctx = multiprocessing.get_context("spawn")
        self.per_worker = per_worker
        self.buffer = max(1, buffer)
        self._workers = [_Worker(self._ctx, self._setup) for _ in range(workers)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, cfg, nice: int = 0, buffer: int | None = None) -> None:
        """Send the PreprocessConfig and the niceness to the workers (once, before :meth:`map`); ``buffer``:
        decoded results to hold for the consumer, when the pool was made before its batch size was known."""
        if self._setup is not None:
            raise RuntimeError("the pool is already configured")
        if buffer is not None:
            self.buffer = max(1, buffer)
        self._setup = (cfg.to_dict(), nice, self.memory_budget)
        for w in self._workers:
            w.configure(self._setup)

    def grow(self, workers: int) -> None:
        """Start more workers, up to ``workers`` in all (before :meth:`map`); fewer are never stopped."""
        while len(self._workers) < workers:
            self._workers.append(_Worker(self._ctx, self._setup))

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def cv2_threads(self) -> list[int | None]:
        """``cv2.getNumThreads()`` as each worker reported it when ready (for tests and logs)."""
        return [w.cv2_threads for w in self._workers]

    @property
    def niceness(self) -> list[int | None]:
        """Each worker's scheduling niceness as it reported it when ready (for tests and logs)."""
        return [w.niceness for w in self._workers]

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the dispatcher and the workers (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for w in self._workers:  # all told first, so they wind down together
            w.ask_to_stop()
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.stop(max(0.0, deadline - time.monotonic()))

    def map(self, items: Iterable[tuple[str, str]]) -> Iterator[Decoded]:
        """Decode ``(path, problem)`` items; an item with a ``problem`` (from the walk) is not decoded and
        comes back as an ``error`` with that reason. Single use per pool.

        Yields one :class:`Decoded` per item, in input order except that a file still decoding never holds up
        more than ``buffer`` finished ones: they are delivered ahead of it, and it follows when it is done
        (or timed out). So a slow file stalls nobody (but the ``per_worker - 1`` files already queued at its
        worker, which wait with it), and memory stays bounded. Each result carries its input ``index``: a
        caller that needs input order restores it from that.
        """
        if self._setup is None:
            raise RuntimeError("configure the pool (DecodePool(..., cfg) or .configure(cfg)) before map()")
        out: queue.Queue = queue.Queue(maxsize=self.buffer)
        self._thread = threading.Thread(
            target=self._dispatch, args=(iter(items), out), daemon=True, name="dens-decode-dispatch"
        )
        self._thread.start()
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # --- the dispatcher thread: all pipe traffic happens here, so decoding goes on while the main
    # thread runs the model ----------------------------------------------------------------------------

    def _put(self, out: queue.Queue, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _dispatch(self, items: Iterator[tuple[str, str]], out: queue.Queue) -> None:
        try:
            self._loop(items, out)
        except BaseException as exc:  # surfaced in the consumer's thread
            self._put(out, exc)
            return
        self._put(out, _DONE)

    def _loop(self, items: Iterator[tuple[str, str]], out: queue.Queue) -> None:
        done: dict[int, Decoded] = {}
        retry: deque[tuple[int, str]] = deque()  # the tasks a dead worker had not started
        overtook: set[int] = set()  # results delivered ahead of a slow file (all above next_out)
        next_in = next_out = 0
        exhausted = False
        while not self._stop.is_set():
            # Hand out work while the window allows: results not yet consumed count against it.
            while True:
                in_flight = sum(len(w.pending) for w in self._workers) + len(done)
                free = min(self._workers, key=lambda w: len(w.pending))
                if in_flight >= self.buffer + len(self._workers) * self.per_worker:
                    break
                if len(free.pending) >= self.per_worker:
                    break
                if retry:
                    task = retry.popleft()
                else:
                    if exhausted:
                        break
                    try:
                        path, problem = next(items)
                    except StopIteration:
                        exhausted = True
                        break
                    task, next_in = (next_in, path), next_in + 1
                    if problem:
                        done[task[0]] = Decoded(task[0], path, status_of(problem), problem)
                        continue
                self._send(free, task)
            while next_out in done or next_out in overtook:
                if next_out in overtook:
                    overtook.remove(next_out)
                elif not self._put(out, done.pop(next_out)):
                    return
                next_out += 1
            if len(done) >= self.buffer:
                # A file still decoding holds up a full buffer of finished ones: they go ahead of it. (The
                # input's last ones wait for it: the run cannot end before it anyway.)
                for index in sorted(done):
                    if not self._put(out, done.pop(index)):
                        return
                    overtook.add(index)
            if exhausted and not retry and not done and not any(w.pending for w in self._workers):
                return
            # Idle workers too: one that dies idle (the OOM killer) is replaced, and no file is blamed.
            workers = list(self._workers)
            ready = wait([w.conn for w in workers] + [w.proc.sentinel for w in workers], timeout=0.2)
            for w in workers:
                if w.conn in ready or w.proc.sentinel in ready:
                    self._service(w, done, retry)
                elif self._overdue(w):
                    w.proc.kill()
                    w.proc.join()
                    self._replace(w, done, retry, timed_out=True)

    def _overdue(self, w: _Worker) -> bool:
        return self.timeout is not None and w.busy_since is not None and time.monotonic() - w.busy_since > self.timeout

    def _send(self, w: _Worker, task: tuple[int, str]) -> None:
        if not w.pending and w.ready:
            w.busy_since = time.monotonic()
        w.pending.append(task)
        # A dead worker's pipe refuses the task: its sentinel reports the death and the task is retried.
        with contextlib.suppress(BrokenPipeError, OSError):
            w.conn.send(task)

    def _service(self, w: _Worker, done: dict[int, Decoded], retry: deque) -> None:
        closed = False
        try:
            while w.conn.poll():
                self._receive(w, w.conn.recv(), done)
        except (EOFError, OSError):
            closed = True  # the worker's end is gone: it died (its last results were read above)
        if closed or not w.proc.is_alive():
            self._replace(w, done, retry)

    def _receive(self, w: _Worker, msg: tuple, done: dict[int, Decoded]) -> None:
        if msg[0] == "ready":
            w.ready, w.cv2_threads, w.niceness = True, msg[2], msg[3]
            w.busy_since = time.monotonic() if w.pending else None
            return
        index, status, reason, image, info, noise, seconds = msg
        task = w.pending.popleft()
        assert task[0] == index, (task, index)  # one pipe, handled in order
        done[index] = Decoded(index, task[1], status, reason, image, info, noise, seconds)
        w.busy_since = time.monotonic() if w.pending else None

    def _replace(self, w: _Worker, done: dict[int, Decoded], retry: deque, timed_out: bool = False) -> None:
        w.proc.join(5)
        if w.proc.is_alive():  # its pipe broke but it lingers: make sure it is gone
            w.proc.kill()
            w.proc.join()
        note = _death_note(w.proc.exitcode)
        if not w.ready:
            raise PoolError(f"a decode worker died while starting ({note}); its error is printed above")
        if w.pending:
            index, path = w.pending.popleft()
            if timed_out:
                reason = f"{Reason.WORKER_TIMEOUT.value}: no result after {self.timeout:g} s, its worker killed"
            else:
                reason = f"{Reason.WORKER_CRASHED.value}: decode worker {note} reading this file"
            log.warning("%s: %s; it gets an error row", path, reason)
            done[index] = Decoded(index, path, "error", reason)
            retry.extendleft(reversed(w.pending))
        w.conn.close()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self._setup)


def in_input_order(results: Iterable[Decoded]) -> Iterator[Decoded]:
    """:meth:`DecodePool.map`'s results in input order: one delivered ahead of a slower file waits here until
    that file is in. For callers whose outcome depends on the order (the first N usable files of a folder);
    dens-infer batches results as they come and orders only its rows."""
    waiting: dict[int, Decoded] = {}
    next_index = 0
    for decoded in results:
        waiting[decoded.index] = decoded
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1
