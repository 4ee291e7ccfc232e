"""What a pull finds and what becomes of it: :class:`Study` and :class:`Instance` as the server lists them,
:class:`Pulled` (one per instance found: its file, or why there is none), :class:`PullSummary` (the counts)
and :class:`PullError` (a pull that cannot start or go on).

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dens import counted

PULL_FAILED = "pull_failed"  # the reason code of an instance found but not fetched (an error row)


class PullError(Exception):
    """A pull that cannot start or go on (the server unreachable, authentication refused, a port in use);
    the message says what to do."""


@dataclass(frozen=True)
class Study:
    """A study the query found, with the identity the server gave it (text as the server sent it: its UID
    is checked before it names anything)."""

    uid: str
    patient_id: str = ""
    accession: str = ""


@dataclass(frozen=True)
class Instance:
    """An instance of a study, as the server listed it. ``sop_class``: '' where the listing did not say."""

    study: Study
    series_uid: str
    sop_uid: str
    sop_class: str = ""

    @property
    def study_uid(self) -> str:
        return self.study.uid


@dataclass(frozen=True)
class Pulled:
    """What became of one instance found: fetched into ``path`` (``problem`` ''), or not, ``problem`` saying
    why as ``code: detail`` (``pull_failed: HTTP 500 ...``; ``not_mammography: ...`` for an instance dens does
    not read), ``path`` then the file it would have been. ``size``: bytes written."""

    instance: Instance
    path: Path
    problem: str = ""
    size: int = 0


@dataclass
class PullSummary:
    """A pull's counts: studies and instances found, those already scored (not fetched again), fetched,
    failed and not pulled (not a mammogram), bytes written and seconds from the first query to the last
    file; studies whose instances could not be listed, and listed study UIDs the server does not have."""

    source: str = ""
    query: str = ""
    folder: str = ""  # where the files are kept
    studies: int = 0
    instances: int = 0
    done: int = 0
    fetched: int = 0
    failed: int = 0
    not_pulled: int = 0
    bytes: int = 0
    seconds: float = 0.0
    unasked: int = 0  # instances a server sent that nothing asked for: refused
    studies_failed: list[tuple[str, str]] = field(default_factory=list)  # (study UID, why)
    studies_missing: list[str] = field(default_factory=list)  # --study-uid UIDs the server does not have

    def count(self, pulled: Pulled) -> None:
        """One more instance accounted for."""
        if not pulled.problem:
            self.fetched += 1
            self.bytes += pulled.size
        elif pulled.problem.startswith(PULL_FAILED):
            self.failed += 1
        else:
            self.not_pulled += 1

    def line(self) -> str:
        """The pull in one line, as dens-infer prints it."""
        listed = f", {counted(len(self.studies_failed), 'study', 'studies')} not listed" if self.studies_failed else ""
        not_pulled = f", {self.not_pulled} not mammograms (skipped)" if self.not_pulled else ""
        rate = f", {self.fetched / self.seconds:.1f} instances/s" if self.seconds and self.fetched else ""
        nothing = "; nothing to fetch: every instance found has a row already" if self.done == self.instances else ""
        return (
            f"pulled from {self.source} ({self.query}): {counted(self.studies, 'study', 'studies')}{listed}, "
            f"{counted(self.instances, 'instance')} found, {self.done} already scored, {self.fetched} fetched "
            f"({self.bytes / 1e6:.1f} MB), {self.failed} failed{not_pulled} in {self.seconds:.1f} s{rate}{nothing}"
        )

    def warnings(self) -> list[str]:
        """What the reader of the run should know about the pull."""
        said = []
        for uid, why in self.studies_failed:
            said.append(f"study {uid}: its instances could not be listed ({why}); --resume tries it again")
        if self.studies_missing:
            shown = ", ".join(self.studies_missing[:5]) + (" ..." if len(self.studies_missing) > 5 else "")
            said.append(f"{counted(len(self.studies_missing), 'study UID')} not found on {self.source}: {shown}")
        if self.unasked:
            said.append(f"{counted(self.unasked, 'instance')} the server sent unasked were refused")
        return said
