"""What a dens-infer run did: :class:`Summary`, its counts and where the time went, the lines it prints and its
exit status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import click

from dens import counted, labels
from dens.commands import EXIT_NOTHING_SCORED
from dens.infer.config import EXIT_ERRORS, EXIT_OK
from dens.pull import PullSummary
from dens.route import families
from dens.route.errors import Reason


@dataclass
class Summary:
    """Counts and where the time went; ``exit_code`` is 0, 3 when preds.csv holds error rows (this run's,
    or an earlier run's that were not retried), or 4 when it holds no ``ok`` row at all."""

    files: int = 0
    ok: int = 0
    skipped: int = 0
    errors: int = 0
    already_done: int = 0
    already_errors: int = 0  # error rows kept from the earlier run (--resume without --retry-errors)
    already_ok: int = 0  # ok rows kept from the earlier run
    plain_skipped: int = 0  # plain images (PNG/PGM...) skipped: --plain-images was not given
    retried: int = 0  # error rows of the earlier run done again (--retry-errors)
    unseen_families: int = 0  # ok images of an acquisition family the model never saw (harmonisation: fallback)
    repeats: int = 0  # manifest entries dropped: a file listed again, however spelt, is scored once
    seconds: float = 0.0
    decode_s: float = 0.0  # summed over workers (busy time)
    wait_s: float = 0.0  # the main thread waiting for decoded images: > 0 means decode-bound
    model_s: float = 0.0
    write_s: float = 0.0
    provider: str = ""
    workers: int = 0
    threads: int = 0
    batch_size: int = 0
    model: Path | None = None  # the ONNX file that scored
    out: Path | None = None
    breast_csv: Path | None = None
    exam_csv: Path | None = None
    sr: Path | None = None  # --sr: the folder of the density SRs
    reports: tuple[Path, ...] = ()  # --sr: the density SRs written, one per exam
    pull: PullSummary | None = None  # a PACS as STUDIES: what the pull found, fetched and failed

    def count(self, status: str, info: Mapping | None = None, reason: str = "") -> None:
        """One more file accounted for, with its row's status and reason (and what the route learnt of it)."""
        self.files += 1
        self.plain_skipped += reason.startswith(Reason.PLAIN_IMAGE_NOT_REQUESTED.value)
        self.unseen_families += status == "ok" and (info or {}).get(labels.HARMONISATION) == families.FALLBACK
        self.ok += status == "ok"
        self.skipped += status == "skipped"
        self.errors += status == "error"

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        if not self.ok and not self.already_ok:
            return EXIT_NOTHING_SCORED
        unlisted = self.pull is not None and self.pull.studies_failed  # no rows to say so: the status does
        return EXIT_ERRORS if self.errors or self.already_errors or unlisted else EXIT_OK

    def line(self) -> str:
        resumed = ""
        if self.already_done:
            kept = f", {counted(self.already_errors, 'error')} among them" if self.already_errors else ""
            resumed = f" (+{self.already_done} from the earlier run{kept})"
        if self.retried:
            resumed += f" ({counted(self.retried, 'earlier error')} retried)"
        return (
            f"dens-infer: {counted(self.files, 'file')}{resumed}: {self.ok} ok, {self.skipped} skipped, "
            f"{counted(self.errors, 'error')} in {self.seconds:.1f} s, {self.images_per_s:.2f} img/s; "
            f"decode {self.decode_s:.1f} s ({self.workers} workers), model {self.model_s:.1f} s ({self.provider}, "
            f"batch {self.batch_size}, {self.threads} threads), write {self.write_s:.1f} s, "
            f"waiting for decode {self.wait_s:.1f} s"
        )

    def warnings(self) -> list[str]:
        """What the reader of preds.csv should know about this run's calls, and of the files it did not read."""
        said = list(self.pull.warnings()) if self.pull is not None else []
        if self.unseen_families:
            advice = "review those calls with care (their rows: harmonisation=fallback), or train on those machines"
            said.append(families.unseen_warning(self.unseen_families, self.ok, advice))
        if self.plain_skipped:
            said.append(
                f"{counted(self.plain_skipped, 'plain image')} (PNG/PGM/TIFF/JPEG) skipped: dens-infer reads DICOM "
                "unless asked; pass --plain-images to read them as breast images"
            )
        if self.repeats:
            said.append(
                f"{counted(self.repeats, 'manifest entry', 'manifest entries')} dropped: they named a file listed "
                "before (however spelt), which is scored once"
            )
        if self.exit_code == EXIT_NOTHING_SCORED:
            said.append(
                f"nothing scored: no file gave an image the model could call (their rows in {self.out} say why; "
                f"exit status {EXIT_NOTHING_SCORED})"
            )
        return said

    def print(self) -> None:
        """The run's summary as dens-infer prints it: the counts, what was written, and, on stderr, the warnings
        and the errors to look at."""
        if self.pull is not None:
            click.echo(f"dens-infer: {self.pull.line()}; files in {self.pull.folder}")
        click.echo(self.line())
        for warning in self.warnings():
            click.echo(f"dens-infer: warning: {warning}", err=True)
        click.echo(f"dens-infer: wrote {self.out}, {self.breast_csv}, {self.exam_csv}")
        if self.sr is not None:
            click.echo(f"dens-infer: wrote {counted(len(self.reports), 'density SR')} (one per exam) to {self.sr}")
        if self.errors or self.already_errors:
            earlier = f" ({self.already_errors} from the earlier run)" if self.already_errors else ""
            click.echo(
                f"dens-infer: {counted(self.errors + self.already_errors, 'file')} could not be read{earlier}: their "
                f"rows in {self.out} have status 'error' and say why (exit status {self.exit_code}); --retry-errors "
                "does them again",
                err=True,
            )
