"""What a ``dens-infer --shard i/N`` run records of itself beside its preds.csv (``<stem>.shard.json``), and the
check dens-merge makes of a set of such records.

A shard holds the files whose path hashes to it, so a set of shards is the whole archive only when it holds
every index of one N, scored by one model over one STUDIES. preds.csv cannot tell that (a shard that was never
run has no rows to miss), so each run records what it is: its shard, its model (path and sha256), its inputs
(STUDIES as the run resolved it and, for a manifest, the sha256 of its bytes), whether it finished and how many
rows its preds.csv then held. The record is written whole (:func:`dens.files.atomic_write`) before the first
row, ``complete`` false, and again when the run ends, so a run killed half-way is seen as unfinished.
dens-infer's walk never reads it back: it is one of the run's own outputs, as preds.csv and its lock are.

A run without ``--shard`` writes none, and removes a record an earlier shard run left at its ``--out``, which
would no longer describe the file.

The standard library and :mod:`dens.files` only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import dens
from dens.files import atomic_write

KIND = "dens-infer shard record"
VERSION = 1


class RecordError(ValueError):
    """A record that cannot be read, or that contradicts the run or the set; the message says what to do."""


def record_path(out: str | os.PathLike) -> Path:
    """The record of the preds.csv ``out``: ``<stem>.shard.json`` beside it (as its breast and exam CSVs)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard.json")


@dataclass(frozen=True)
class ShardRecord:
    """One shard run: shard ``index`` of ``count``, its model and its inputs, and whether it finished with
    ``rows`` rows in preds.csv."""

    index: int
    count: int
    model: str  # the ONNX file, as the run found it
    model_sha256: str
    studies: str  # STUDIES as the run resolved it (symlinks followed): the paths it hashed are under it
    manifest_sha256: str = ""  # STUDIES is a manifest: the sha256 of its bytes; '' for a folder
    complete: bool = False
    rows: int = 0

    @property
    def shard(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def inputs(self) -> tuple[str, str]:
        """What the shard was run over: two shards of one split agree on it."""
        return self.studies, self.manifest_sha256

    def describe_inputs(self) -> str:
        return f"{self.studies} (sha256 {self.manifest_sha256[:12]})" if self.manifest_sha256 else self.studies

    def to_json(self) -> dict:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return {
            "kind": KIND,
            "version": VERSION,
            "shard": self.shard,
            **asdict(self),
            "dens_version": dens.__version__,
            "written": now,
        }

    @classmethod
    def from_json(cls, data: Mapping, where: Path) -> ShardRecord:
        if not isinstance(data, Mapping) or data.get("kind") != KIND:
            raise RecordError(f"{where} is not a dens-infer shard record: remove it, or run that shard again")
        try:
            return cls(
                int(data["index"]),
                int(data["count"]),
                str(data["model"]),
                str(data["model_sha256"]),
                str(data["studies"]),
                str(data.get("manifest_sha256", "")),
                bool(data["complete"]),
                int(data["rows"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"{where}: a damaged shard record ({exc!r}); run that shard again") from exc


def new_record(index: int, count: int, model: Path, model_sha256: str, studies: Path) -> ShardRecord:
    """The record of a run starting: shard ``index``/``count`` of ``studies`` (a folder; or a file, a manifest,
    whose bytes are hashed) by ``model``."""
    manifest = ""
    if studies.is_file():
        digest = hashlib.sha256()
        with open(studies, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        manifest = digest.hexdigest()
    return ShardRecord(index, count, str(model), model_sha256, str(studies), manifest)


def read_record(out: str | os.PathLike) -> ShardRecord | None:
    """The record beside the preds.csv ``out``; None when it has none."""
    path = record_path(out)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"{path} is not a readable shard record ({exc}); run that shard again") from exc
    return ShardRecord.from_json(data, path)


def write_record(out: str | os.PathLike, record: ShardRecord) -> Path:
    """Write ``record`` beside the preds.csv ``out``, whole."""
    path = record_path(out)
    with atomic_write(path, "w", fsync=True, encoding="utf-8") as f:
        json.dump(record.to_json(), f, indent=2)
        f.write("\n")
    return path


def begin(out: str | os.PathLike, record: ShardRecord | None, *, resume: bool) -> None:
    """Before a run writes ``out``: refuse to resume it as another shard, or over other inputs, than its
    record says; then write ``record`` (unfinished), or, for a run without ``--shard``, remove a record left
    there (which would describe another file)."""
    earlier = read_record(out) if resume else None
    if earlier is not None and (record is None or (record.index, record.count) != (earlier.index, earlier.count)):
        given = f"--shard {record.shard}" if record else "no --shard"
        raise RecordError(
            f"{out} holds shard {earlier.shard}'s rows ({record_path(out)}), and this run was given {given}: "
            f"resume it with --shard {earlier.shard}, or choose another --out"
        )
    if earlier is not None and record is not None and earlier.inputs != record.inputs:
        raise RecordError(
            f"{out} holds the rows of shard {earlier.shard} of {earlier.describe_inputs()}, and this run reads "
            f"{record.describe_inputs()}: resume it over the same STUDIES, or choose another --out"
        )
    if record is None:
        with contextlib.suppress(FileNotFoundError):
            record_path(out).unlink()
        return
    write_record(out, record)


def check_set(records: Sequence[tuple[Path, ShardRecord | None]], allow_incomplete: bool = False) -> list[str]:
    """Whether the shards (each preds.csv with its record, None when it has none) are one whole split: every
    index of one N, one model, one STUDIES, each run to its end. A mixed set (two splits, models or inputs,
    one shard twice) is refused (RecordError); an incomplete one (a shard missing or unfinished, or shards
    without a record, which cannot be checked) too, unless ``allow_incomplete``: then the notes returned say
    what the set lacks."""
    known = [(path, r) for path, r in records if r is not None]
    bare = [path for path, r in records if r is None]
    lacks: list[tuple[str, str]] = []  # (what the set lacks, what to do about it)
    if bare:
        lacks.append(
            (
                f"{', '.join(map(str, bare))} not checked: no shard record ({record_path(bare[0]).name} beside it)",
                "a run without --shard, or by an older dens-infer, writes none, so the set cannot be checked",
            )
        )
    if known:
        _refuse_mixed(known)
        indices = {r.index for _, r in known}
        for path, r in known:
            if not r.complete:
                lacks.append(
                    (
                        f"{path} (shard {r.shard}) did not finish",
                        f"finish it with dens-infer --resume --shard {r.shard}",
                    )
                )
        count = known[0][1].count
        missing = [f"{i}/{count}" for i in range(count) if i not in indices]
        if missing:
            several = len(missing) > 1
            lacks.append(
                (
                    f"shard{'s' if several else ''} {', '.join(missing)} missing",
                    f"run {'each' if several else 'it'} with dens-infer --shard i/{count}, or give its preds.csv",
                )
            )
    if lacks and not allow_incomplete:
        raise RecordError(
            "an incomplete set of shards: "
            + "; ".join(f"{what} ({advice})" for what, advice in lacks)
            + ". Merge every shard of one split, each run to its end, or pass --allow-incomplete to merge these "
            "as they are"
        )
    return [what for what, _ in lacks]


def _refuse_mixed(known: Sequence[tuple[Path, ShardRecord]]) -> None:
    """Refuse shards of two splits, models or inputs, or one shard given as two files."""
    first, base = known[0]
    for path, r in known[1:]:
        if r.count != base.count:
            raise RecordError(
                f"the shards are of different splits: {first} is shard {base.shard}, {path} is shard {r.shard}: "
                "merge the shards of one --shard i/N split"
            )
        if r.model_sha256 != base.model_sha256:
            raise RecordError(
                f"{path} was scored by another model than {first} (sha256 {r.model_sha256[:12]} vs "
                f"{base.model_sha256[:12]}): merge the outputs of one model"
            )
        if r.inputs != base.inputs:
            raise RecordError(
                f"{path} was run over other inputs than {first} ({r.describe_inputs()} vs "
                f"{base.describe_inputs()}): merge the shards of one STUDIES"
            )
    seen: dict[int, Path] = {}
    for path, r in known:
        if r.index in seen:
            raise RecordError(f"{seen[r.index]} and {path} are both shard {r.shard} (two runs of it?): give one")
        seen[r.index] = path
