"""The files a dens-infer run takes, as both engines hand them on: the entries of STUDIES (this shard's) that
preds.csv has no row for yet, and the identity a manifest gives them.

The local engine's decode pool takes ``(path, problem)`` pairs and gives each result back with its input
position, so :class:`InFlight` holds a manifest's identity by that position until the file's row is made: a
manifest is streamed, and no more of it is held than the files in flight. The Ray engine carries the identity
with each item of its chunk. Either way the row gets :func:`dens.sources.fill_identity`'s identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dens import sources
from dens.preds.cells import path_cell


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

    def items(self, done: set[str]) -> Iterator[sources.Item]:
        """The items whose path cell is not in ``done`` (the rows preds.csv already has), in the walk's order."""
        found = sources.entries(self.studies, self.exclude, self.shard, self.repeats)
        return sources.items((e for e in found if path_cell(e.path) not in done), self.plain_images)


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
