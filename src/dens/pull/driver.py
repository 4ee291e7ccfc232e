"""A pull from start to end: :class:`Pull` finds the studies when it opens (so a server that cannot be
reached, or refuses the credentials, stops a run before anything else starts), then :meth:`Pull.instances`
lists each study's instances and fetches the ones not done yet, a study at a time (studies in UID order, a
study's instances by series and SOP Instance UID, as a walk of the pull folder orders them), yielding one
:class:`Pulled` per instance found as it lands.

The fetching runs in a thread of its own, a bounded queue ahead of the consumer (the decode engine's
dispatcher), so the network and the decoding overlap and a slow consumer holds the fetching back; the next
studies are listed meanwhile. Memory holds a few studies' listings and the queue, whatever the number of
instances. Each instance found is accounted
for exactly once (fetched, failed with its reason, not a mammogram, or done already), whatever a server
answers: an instance a retrieve never reports on is failed here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from dens.pull.folder import PullFolder, invalid_uids
from dens.pull.query import Query, is_uid
from dens.pull.sopclasses import MAMMOGRAPHY_SOP_CLASSES
from dens.pull.source import Access, DicomWeb, Source
from dens.pull.study import PULL_FAILED, Instance, Pulled, PullError, PullSummary, Study
from dens.route.errors import Reason

log = logging.getLogger(__name__)

AHEAD = 16  # instances fetched ahead of the consumer
LIST_AHEAD = 2  # studies listed ahead of the one being retrieved
_END = object()


class Puller(Protocol):
    """What a protocol does for a pull (:mod:`dens.pull.dicomweb`, :mod:`dens.pull.dimse`)."""

    unasked: int  # instances the server sent that nothing asked for (refused)

    def open(self) -> None: ...

    def close(self) -> None: ...

    def studies(self, query: Query) -> Iterator[Study]:
        """The studies ``query`` finds; PullError when the server cannot be asked or refuses."""
        ...

    def instances(self, study: Study) -> list[Instance]:
        """The instances of ``study``; raises when they cannot be listed."""
        ...

    def retrieve(self, wanted: list[Instance], listed: list[Instance], folder: PullFolder) -> Iterator[Pulled]:
        """``wanted`` (of the study's ``listed`` instances) into ``folder``, each as it lands, or why not."""
        ...


def open_puller(source: Source, access: Access) -> Puller:
    """The puller for ``source``: DICOMweb (QIDO-RS, WADO-RS) or DIMSE (C-FIND, C-MOVE or C-GET)."""
    if isinstance(source, DicomWeb):
        from dens.pull.dicomweb import DicomWebPuller

        return DicomWebPuller(source, access)
    from dens.pull.dimse import DimsePuller

    return DimsePuller(source, access)


class Pull:
    """Pull the studies ``query`` finds on ``source`` into ``folder`` (a :class:`dens.pull.folder.PullFolder`
    layout), reached as ``access`` says. A context manager: entering it opens the source (for C-MOVE, dens's
    storage SCP) and runs the study search, raising :class:`PullError` when it cannot; :attr:`summary` counts
    what happened."""

    def __init__(self, source: Source, query: Query, access: Access, folder: str | Path):
        access.check(source)
        self.source, self.query, self.access = source, query, access
        self.folder = PullFolder(folder)
        self.summary = PullSummary(source=str(source), query=query.describe(), folder=str(folder))
        self._puller: Puller | None = None
        self._studies: list[Study] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> Pull:
        self._start = time.perf_counter()
        self._puller = open_puller(self.source, self.access)
        try:
            self._puller.open()
            self._studies = self._search()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop fetching (:meth:`instances` then ends), and close the source (C-MOVE: dens's storage SCP
        stops). Idempotent."""
        self._stop.set()
        if self._puller is not None:
            self._puller.close()
        if self._thread is not None:  # a request in flight ends by its timeout; the thread is a daemon
            self._thread.join(timeout=2)

    def _search(self) -> list[Study]:
        found: dict[str, Study] = {}
        for study in self._puller.studies(self.query):
            found.setdefault(study.uid, study)
        if self.query.study_uids:
            self.summary.studies_missing = [uid for uid in self.query.study_uids if uid not in found]
        self.summary.studies = len(found)
        log.info(
            "dens pull: %s: %d stud%s found (%s)",
            self.source,
            len(found),
            "y" if len(found) == 1 else "ies",
            self.query.describe(),
        )
        return sorted(found.values(), key=lambda study: study.uid)

    @property
    def studies(self) -> list[Study]:
        """The studies the search found."""
        return list(self._studies)

    def instances(self, done: Callable[[Instance, Path], bool] = lambda instance, path: False) -> Iterator[Pulled]:
        """One :class:`Pulled` per instance of the studies found, except those ``done(instance, path)`` says
        are done already (counted, not fetched), in the order they land; single use. A server's failures are
        results (their ``problem``); what the pull thread cannot carry on from is raised here."""
        if self._puller is None:
            raise RuntimeError("open the pull (with Pull(...) as pull:) before asking for its instances")
        out: queue.Queue = queue.Queue(maxsize=AHEAD)
        self._thread = threading.Thread(target=self._run, args=(done, out), daemon=True, name="dens-pull")
        self._thread.start()
        try:
            while True:
                try:
                    item = out.get(timeout=0.2)
                except queue.Empty:
                    if self._stop.is_set():  # closed: the consumer gets no more
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()

    def _put(self, out: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, done: Callable[[Instance, Path], bool], out: queue.Queue) -> None:
        # The next studies are listed while one is retrieved: a listing waits on the server as a retrieve does.
        lister = _Lister(self._list)
        studies = iter(self._studies)
        listings: deque[tuple[Study, Future]] = deque()

        def list_next() -> None:
            study = next(studies, None)
            if study is not None:
                listings.append((study, lister.submit(study)))

        try:
            for _ in range(LIST_AHEAD):
                list_next()
            while listings and not self._stop.is_set():
                study, listing = listings.popleft()
                list_next()
                self._study(study, listing, done, out)
        except BaseException as exc:  # surfaced in the consumer's thread
            self._put(out, exc)
            return
        finally:
            lister.shutdown()
            self.summary.seconds = time.perf_counter() - self._start
            self.summary.unasked += self._puller.unasked
        if not self._stop.is_set():
            self._put(out, _END)

    def _list(self, study: Study) -> list[Instance]:
        """The instances of ``study``, each once, in the order a walk of the pull folder gives them."""
        if not is_uid(study.uid):
            raise PullError(f"its StudyInstanceUID {study.uid[:80]!r} is not a UID")
        listed = list({i.sop_uid: i for i in self._puller.instances(study)}.values())
        return sorted(listed, key=lambda i: (i.series_uid, i.sop_uid))

    def _study(self, study: Study, listing: Future, done: Callable[[Instance, Path], bool], out: queue.Queue) -> None:
        try:
            listed = listing.result()
        except Exception as exc:  # the listing failed: the study is named, and --resume asks again
            log.warning("dens pull: study %s: its instances could not be listed (%s)", study.uid[:80], exc)
            self.summary.studies_failed.append((study.uid[:80], str(exc)))
            return
        self.summary.instances += len(listed)
        wanted = []
        for instance in listed:
            path = self.folder.path(instance)
            if done(instance, path):
                self.summary.done += 1
            elif bad := invalid_uids(instance):
                self._emit(out, Pulled(instance, path, f"{PULL_FAILED}: the server listed {', '.join(bad)}: no UID"))
            elif instance.sop_class and instance.sop_class not in MAMMOGRAPHY_SOP_CLASSES:
                problem = f"{Reason.NOT_MAMMOGRAPHY.value}: SOP class {instance.sop_class[:80]}, not pulled"
                self._emit(out, Pulled(instance, path, problem))
            else:
                wanted.append(instance)
        if not wanted:
            return
        waiting = {i.sop_uid: i for i in wanted}
        why = "the retrieve ended without it"
        try:
            for pulled in self._puller.retrieve(wanted, listed, self.folder):
                if waiting.pop(pulled.instance.sop_uid, None) is not None and not self._emit(out, pulled):
                    return
        except Exception as exc:  # the connection lost mid-study: what did not land is failed with it
            why = f"{type(exc).__name__}: {exc}"
        for instance in waiting.values():
            self._emit(out, Pulled(instance, self.folder.path(instance), f"{PULL_FAILED}: {why}"))

    def _emit(self, out: queue.Queue, pulled: Pulled) -> bool:
        self.summary.count(pulled)
        if pulled.problem:
            log.debug("dens pull: %s: %s", pulled.path, pulled.problem)
        return self._put(out, pulled)


class _Lister:
    """Lists studies one at a time on a daemon thread of its own. Not a ThreadPoolExecutor: Python joins an
    executor's threads at exit, so a listing waiting out a silent PACS's timeout (60 s) would hold up the exit
    of a run interrupted meanwhile."""

    def __init__(self, list_study: Callable[[Study], list[Instance]]):
        self._list = list_study
        self._asked: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        threading.Thread(target=self._work, daemon=True, name="dens-pull-list").start()

    def submit(self, study: Study) -> Future:
        future: Future = Future()
        self._asked.put((study, future))
        return future

    def shutdown(self) -> None:
        """No more listings: those asked for and not started are cancelled, the one under way ends alone."""
        self._closed.set()
        self._asked.put(None)

    def _work(self) -> None:
        while (asked := self._asked.get()) is not None:
            study, future = asked
            if self._closed.is_set() or not future.set_running_or_notify_cancel():
                future.cancel()
                continue
            try:
                future.set_result(self._list(study))
            except BaseException as exc:
                future.set_exception(exc)
