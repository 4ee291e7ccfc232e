"""The files a dens-infer run takes, as both engines hand them on: the entries of STUDIES (this shard's) that
preds.csv has no row for yet, and the identity a manifest gives them; or, for a PACS as STUDIES, the
instances of a pull (:class:`PulledInputs`) as they land.

The local engine's decode pool takes ``(path, problem)`` pairs and gives each result back with its input
position, so :class:`InFlight` holds a manifest's identity by that position until the file's row is made: a
manifest is streamed, and no more of it is held than the files in flight. The Ray engine carries the identity
with each item of its chunk. Either way the row gets :func:`dens.sources.fill_identity`'s identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path

from dens import labels, sources
from dens.preds.cells import path_cell
from dens.pull import Pull, Pulled, PullError


@dataclass(frozen=True)
class Inputs:
    """The files of ``studies`` (a folder or a manifest), ``exclude`` left out (the run's own outputs), those
    of ``shard`` only; plain images read when ``plain_images``, else skipped rows. ``repeats``: how many of a
    manifest's entries were dropped as a file it listed already (known once :meth:`items` has run through)."""

    studies: Path
    exclude: tuple[Path, ...]
    shard: sources.Shard
    plain_images: bool
    repeats: sources.Repeats = field(default_factory=sources.Repeats, compare=False)

    countable = True  # a second pass over the items (the progress bar's total) costs a walk, nothing more

    def items(self, done: set[str], done_sops: Set[str] = frozenset()) -> Iterator[sources.Item]:
        """The items whose path cell is not in ``done`` (the rows preds.csv already has), in the walk's order
        (``done_sops`` is a pull's: a file on disk is known by its path)."""
        found = sources.entries(self.studies, self.exclude, self.shard, self.repeats)
        return sources.items((e for e in found if path_cell(e.path) not in done), self.plain_images)

    def opened(self) -> contextlib.AbstractContextManager:
        """Nothing to open: the walk starts with :meth:`items`."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing to stop: the walk ends when its consumer stops asking."""


class PulledInputs:
    """The instances of ``pull`` (:class:`dens.pull.Pull`) as the scoring engines take them, each as it lands: a
    fetched file, or the file it would have been with why there is none (``pull_failed: ...``, an error row;
    ``not_mammography: ...``, a skipped one). An instance whose SOP Instance UID already has a row in ``out``
    (or whose file does, by its path) is not fetched again. :meth:`items` runs the pull, so it is called once."""

    countable = False

    def __init__(self, pull: Pull):
        self.pull = pull
        self.repeats = sources.Repeats()  # none: a pull lists each instance once

    @contextlib.contextmanager
    def opened(self) -> Iterator[Pull]:
        """The pull, open: its source reached and its studies found (PullError when none is)."""
        with self.pull as pull:
            if not pull.studies:
                raise PullError(f"no study on {pull.source} matches the query ({pull.query.describe()})")
            yield pull

    def items(self, done: set[str], done_sops: Set[str] = frozenset()) -> Iterator[sources.Item]:
        """One item per instance found whose SOP Instance UID is not in ``done_sops`` and whose path cell is not in
        ``done`` (the rows preds.csv already has); the others are counted as done by the pull, never fetched."""

        def is_done(instance, path: Path) -> bool:
            return instance.sop_uid in done_sops or path_cell(str(path)) in done

        for pulled in self.pull.instances(is_done):
            yield sources.Item(str(pulled.path), pulled.problem, pulled_identity(pulled))

    def close(self) -> None:
        """Stop the pull: :meth:`items` ends at once, so the decode pool's dispatcher, waiting for the next
        instance, lets its pool close (Ctrl-C, an error) instead of waiting for the network."""
        self.pull.close()


def pulled_identity(pulled: Pulled) -> sources.Identity:
    """The identity the listing gave an instance, for its row: its UIDs (what its header says stays), and for one
    not fetched the patient and accession too, since no header will say them."""
    instance = pulled.instance
    cells = [
        (labels.STUDY_UID, instance.study_uid),
        (labels.SERIES_UID, instance.series_uid),
        (labels.SOP_UID, instance.sop_uid),
    ]
    if pulled.problem:
        cells += [(labels.PATIENT_ID, instance.study.patient_id), (labels.ACCESSION, instance.study.accession)]
    return tuple((column, value) for column, value in cells if value)


class InFlight:
    """``items`` as the decode pool takes them, ``(path, problem)``, keeping each one's manifest identity by
    its input position until :meth:`info` hands it to the row. The pool's dispatcher thread iterates it while
    the main thread takes the identities: one key is only ever set by the one and popped by the other."""

    def __init__(self, items: Iterable[sources.Item]):
        self._items = items
        self._identity: dict[int, sources.Identity] = {}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for index, item in enumerate(self._items):
            if item.identity:
                self._identity[index] = item.identity
            yield item.path, item.problem

    def info(self, index: int, info: Mapping | None) -> Mapping | None:
        """The identity the row of input ``index`` gets: ``info`` (the route's), filled from the manifest."""
        return sources.fill_identity(info, self._identity.pop(index, ()))
