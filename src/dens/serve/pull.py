"""A scheduled pull (``--pull``): a thread that asks a PACS for studies every ``--pull-every`` and feeds them to
the spool and the exactly-once state, as C-STOREs would (:mod:`dens.pull` speaks DICOMweb and DIMSE).

A poll:

1. searches the studies of the ``--pull-since`` window, in two searches, today's and the earlier days', so
   that it knows which studies are dated today;
2. leaves out the studies the node answered already, before it lists or fetches anything of them;
3. lists the instances of today's studies and takes one only once its instance count has been the same at two
   polls at least ``--stable-seconds`` apart (:class:`Growth`): a study still being acquired waits. A study
   dated before today is taken as complete at once (yesterday's studies do not grow);
4. fetches the instances the state does not hold into the spool's hidden pull folder (``spool/.pulled``, the
   spool's filesystem), a study at a time, and hands each study over whole
   (:meth:`dens.serve.state.State.receive_study`): the scheduler, and a restart after kill -9, sees all of a
   study's new instances or none of them. The node's quiet time then applies as it does to C-STOREs.

An instance the PACS lists but does not deliver is logged, counted and audited, and its study is held back
whole: the next poll tries again (after :data:`ATTEMPTS` polls in a row, the study is scored without it). An
instance of another SOP class than a mammogram's (a report, a presentation state) is left on the PACS. A poll
that fails (the PACS down, credentials refused) is logged with its reason, counted and audited, and the next
poll tries again: it never stops the node.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dens import counted
from dens.pull import PULL_FAILED, Dimse, Instance, Pull, Pulled, PullError, Query, Study, is_uid
from dens.serve.audit import AuditLog
from dens.serve.config import ServeConfig, redact
from dens.serve.metrics import Metrics
from dens.serve.state import State
from dens.sr import valid_uid

log = logging.getLogger(__name__)

PULLED = ".pulled"  # the spool's folder for the files of the poll under way
ATTEMPTS = 3  # polls in a row an instance of a study may fail before the study is scored without it
DICOMWEB_AET = "DICOMWEB"  # the calling AE title the state records for an instance pulled over DICOMweb


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Growth:
    """When a study dated today is complete enough to pull: once its instance count has been the same at two
    polls at least ``stable_seconds`` apart. It keeps, per study, the count last seen and since when."""

    def __init__(self, stable_seconds: float):
        self.stable_seconds = stable_seconds
        self._seen: dict[str, tuple[int, float]] = {}

    def ready(self, study_uid: str, count: int, now: float) -> bool:
        """Whether the study, listed with ``count`` instances at ``now`` (seconds), is ready to pull."""
        seen = self._seen.get(study_uid)
        if seen is None or seen[0] != count:
            self._seen[study_uid] = (count, now)
            return False
        return now - seen[1] >= self.stable_seconds

    def keep(self, study_uids: Iterable[str]) -> None:
        """Forget every study but ``study_uids`` (answered, or out of the window)."""
        kept = set(study_uids)
        self._seen = {uid: seen for uid, seen in self._seen.items() if uid in kept}


@dataclass
class Poll:
    """What one poll did: studies found, answered already (left alone), waiting (dated today and maybe still
    growing), pulled (handed to the spool) and held back (an instance not delivered); instances fetched, failed
    and not mammograms; or why it failed."""

    started: float
    seconds: float = 0.0
    error: str | None = None
    found: int = 0
    answered: int = 0
    waiting: int = 0
    pulled: int = 0
    held: int = 0
    fetched: int = 0
    failed: int = 0
    not_mammography: int = 0

    @property
    def outcome(self) -> str:
        return "failed" if self.error else "ok"

    def fields(self) -> dict:
        """The poll as the status and the audit log say it."""
        return {
            "started": _iso(self.started),
            "seconds": round(self.seconds, 3),
            "outcome": self.outcome,
            "error": self.error,
            "studies": {k: getattr(self, k) for k in ("found", "answered", "waiting", "pulled", "held")},
            "instances": {k: getattr(self, k) for k in ("fetched", "failed", "not_mammography")},
        }

    def line(self) -> str:
        """The poll in one line of the log."""
        if self.error:
            return f"failed: {self.error}"
        said = [f"{self.answered} answered already"] if self.answered else []
        if self.waiting:
            said.append(f"{self.waiting} dated today and not yet stable (pulled once their count holds)")
        if self.pulled or self.fetched:
            said.append(f"{self.pulled} pulled ({counted(self.fetched, 'instance')} fetched)")
        if self.failed or self.held:
            said.append(f"{self.held} held back ({counted(self.failed, 'instance')} not delivered)")
        if self.not_mammography:
            said.append(f"{counted(self.not_mammography, 'instance')} not a mammogram's (left on the PACS)")
        if not (self.pulled or self.held):
            said.append("nothing to fetch")
        return f"{counted(self.found, 'study', 'studies')} found: {', '.join(said)}; in {self.seconds:.1f} s"


class Poller:
    """The thread that polls ``cfg.pull`` every ``cfg.pull_every`` seconds, from :meth:`start` to :meth:`stop`,
    feeding ``state`` (and setting ``received``, so that the scheduler looks at once)."""

    def __init__(self, cfg: ServeConfig, state: State, metrics: Metrics, audit: AuditLog, received: threading.Event):
        self.cfg, self.state, self.metrics, self.audit, self.received = cfg, state, metrics, audit, received
        self.source = cfg.pull_source
        self.access = cfg.pull_access()
        # Searching and listing retrieve nothing: over DIMSE they open no storage SCP for a C-MOVE.
        dimse = isinstance(self.source, Dimse)
        self.listing = dataclasses.replace(self.access, retrieve="get", move_port=None) if dimse else self.access
        self.calling_aet = self.source.aet if dimse else DICOMWEB_AET
        self.address = self.source.host if dimse else urlsplit(self.source.url).hostname or ""
        self.folder = state.spool / PULLED
        self.growth = Growth(cfg.stable_seconds)
        self.last: Poll | None = None
        self.next_poll: float | None = None
        self.polls: Counter[str] = Counter()
        self._attempts: dict[str, int] = {}  # study UID -> polls in a row an instance of it was not delivered
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the state is touched under it, and never once stop() has taken it
        self._thread: threading.Thread | None = None
        metrics.pulling()

    def start(self) -> None:
        """Poll now, then every ``pull_every`` seconds, in a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="dens-serve-pull", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling: the pull under way fetches nothing more, and the state is not touched once this returns.
        The request in flight is let end rather than aborted: an association aborted from another thread leaves
        its C-FIND waiting for the whole DIMSE timeout, and the process' exit with it."""
        self._stop.set()
        with self._lock:  # whatever touches the state now has finished
            pass
        if self._thread is not None:
            self._thread.join(timeout)  # a daemon: a PACS that does not answer holds up the process' exit only

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.next_poll = None
            self.poll()
            wait = max(0.0, self.cfg.pull_every - (time.monotonic() - started))
            self.next_poll = time.time() + wait
            self._stop.wait(wait)

    def info(self) -> dict:
        """The pull as the status shows it: the source (its userinfo redacted), the query, the last poll and
        when the next one starts."""
        return {
            "source": redact(str(self.source)),
            "every_seconds": self.cfg.pull_every,
            "since": self.cfg.pull_since,
            "query": self.cfg.pull_search().describe(),
            "auth": self.access.auth,  # the scheme only, never the secret
            "retrieve": self.access.how if isinstance(self.source, Dimse) else None,
            "ae_title": self.access.calling_aet if isinstance(self.source, Dimse) else None,
            "polls": {outcome: self.polls[outcome] for outcome in ("ok", "failed")},
            "last_poll": None if self.last is None else self.last.fields(),
            "next_poll": _iso(self.next_poll),
        }

    # --- a poll ---------------------------------------------------------------------------------------------

    def poll(self) -> Poll:
        """One poll (never raises: a failure is its ``error``), logged, counted and audited."""
        poll, t0 = Poll(time.time()), time.perf_counter()
        try:
            self._poll(poll)
        except PullError as exc:
            poll.error = str(exc)
        except Exception as exc:  # an answer the pull did not foresee, a full disk: the next poll tries again
            poll.error = f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)  # what was not handed over is fetched again
        poll.seconds = time.perf_counter() - t0
        if not self._stop.is_set():  # a poll the node's stop cut short says nothing
            self._report(poll)
        return poll

    def _poll(self, poll: Poll) -> None:
        now = dt.datetime.now()  # StudyDate is the acquiring site's local date
        window = self.cfg.pull_search(now)
        first, today = window.study_date.partition("-")[0], f"{now:%Y%m%d}"
        dated_today = self._search(dataclasses.replace(window, study_date=today))
        earlier: list[Study] = []
        if first < today:
            yesterday = f"{now.date() - dt.timedelta(days=1):%Y%m%d}"
            earlier = self._search(dataclasses.replace(window, study_date=f"{first}-{yesterday}"))
        found = {s.uid for s in dated_today} | {s.uid for s in earlier}
        with self._lock:
            if self._stop.is_set():
                raise PullError("the node is stopping")
            answered = self.state.answered(found)
        poll.found, poll.answered = len(found), len(answered)
        growing = [s.uid for s in dated_today if s.uid not in answered]
        counts = self._count(growing) if growing else {}
        clock = time.time()
        ready = [uid for uid in growing if uid in counts and self.growth.ready(uid, counts[uid], clock)]
        self.growth.keep(growing)
        poll.waiting = len(growing) - len(ready)
        self._fetch(sorted({*(s.uid for s in earlier if s.uid not in answered), *ready}), poll)

    def _opened(self, query: Query, listing: bool = False) -> Pull:
        """A pull of ``query`` (to open with ``with``), unless the node is stopping."""
        if self._stop.is_set():
            raise PullError("the node is stopping")
        return Pull(self.source, query, self.listing if listing else self.access, self.folder)

    def _search(self, query: Query) -> list[Study]:
        """The studies ``query`` finds whose UID an SR can name (as a C-STORE's, another is left alone)."""
        with self._opened(query, listing=True) as pull:
            studies = pull.studies
        invalid = [s.uid for s in studies if not (is_uid(s.uid) and valid_uid(s.uid))]
        if invalid:
            log.warning(
                "dens-serve: pull: %s left on the PACS: no valid StudyInstanceUID (%r%s), so no SR could name it",
                counted(len(invalid), "study", "studies"),
                invalid[0][:80],
                ", ..." if len(invalid) > 1 else "",
            )
        return [s for s in studies if s.uid not in invalid]

    def _count(self, study_uids: list[str]) -> dict[str, int]:
        """The instances each study lists now (a study whose listing failed is left out)."""
        counts: Counter[str] = Counter()

        def tally(instance: Instance, path: Path) -> bool:
            counts[instance.study_uid] += 1
            return True  # listed, never fetched

        with self._opened(Query(study_uids=tuple(study_uids), modality=None), listing=True) as pull:
            for _ in pull.instances(tally):
                pass
        return dict(counts)

    def _fetch(self, study_uids: list[str], poll: Poll) -> None:
        """Fetch what the state does not hold of ``study_uids``, handing each study over once it has landed."""
        wanted = set(study_uids)
        self._attempts = {uid: n for uid, n in self._attempts.items() if uid in wanted}
        if not study_uids:
            return
        with self._opened(Query(study_uids=tuple(study_uids), modality=None)) as pull:
            study, landed = None, []
            for pulled in pull.instances(self._done):  # a study's instances come together, a study at a time
                if pulled.instance.study_uid != study:
                    self._hand_over(study, landed, poll)
                    study, landed = pulled.instance.study_uid, []
                landed.append(pulled)
            self._hand_over(study, landed, poll)
            failed = [] if self._stop.is_set() else pull.summary.studies_failed  # listings that failed
            for uid, why in failed:
                poll.held += 1
                self.audit.write("pull_study_failed", study_uid=uid, instances_failed=None, reason=why, held=True)

    def _done(self, instance: Instance, path: Path) -> bool:
        """Whether the instance is not to be fetched: the state holds it, or its study is answered already."""
        with self._lock:
            if self._stop.is_set():
                return True
            return self.state.knows(instance.sop_uid) or bool(self.state.answered([instance.study_uid]))

    def _hand_over(self, study_uid: str | None, landed: list[Pulled], poll: Poll) -> None:
        """A study's instances, all accounted for: the fetched ones to the spool, unless one failed. Once the node
        is stopping, nothing (a stop lets the pull run out, fetching nothing more)."""
        if study_uid is None or self._stop.is_set():
            return
        fetched = {p.instance.sop_uid: p.path for p in landed if not p.problem}
        failed = [p.problem for p in landed if p.problem.startswith(PULL_FAILED)]
        other = len(landed) - len(fetched) - len(failed)
        poll.failed += len(failed)
        poll.not_mammography += other
        self.metrics.pull_instances.labels("failed").inc(len(failed))
        self.metrics.pull_instances.labels("not_mammography").inc(other)
        for pulled in landed:
            if pulled.problem and not pulled.problem.startswith(PULL_FAILED):
                log.debug("dens-serve: pull: %s left on the PACS (%s)", pulled.instance.sop_uid, pulled.problem)
        if failed:
            attempt = self._attempts[study_uid] = self._attempts.get(study_uid, 0) + 1
            held = attempt < ATTEMPTS or not fetched
            log.warning(
                "dens-serve: pull: study %s: %s not delivered (%s); %s",
                study_uid,
                counted(len(failed), "instance"),
                failed[0],
                "the study is held back and tried again at the next poll"
                if held
                else f"the study is scored without them ({ATTEMPTS} polls in a row)",
            )
            self.audit.write(
                "pull_study_failed", study_uid=study_uid, instances_failed=len(failed), reason=failed[0], held=held
            )
            if held:
                poll.held += 1
                return
        self._attempts.pop(study_uid, None)
        if not fetched:
            return
        with self._lock:
            if self._stop.is_set():
                return
            added = self.state.receive_study(study_uid, fetched, self.calling_aet, self.address)
        poll.pulled += 1
        poll.fetched += len(added)
        self.metrics.pull_instances.labels("fetched").inc(len(added))
        self.received.set()

    def _report(self, poll: Poll) -> None:
        self.last = poll
        self.polls[poll.outcome] += 1
        self.metrics.pull_polls.labels(poll.outcome).inc()
        if poll.error is None:
            self.metrics.pull_waiting.set(poll.waiting)
            self.metrics.pull_last_ok.set(poll.started)
        self.audit.write("pull_poll", source=str(self.source), **poll.fields())
        source = redact(str(self.source))
        if poll.error:
            log.error(
                "dens-serve: pull from %s failed: %s; tried again at the next poll, in %.0f s",
                source,
                poll.error,
                self.cfg.pull_every,
            )
        else:
            log.info("dens-serve: pull from %s: %s", source, poll.line())
