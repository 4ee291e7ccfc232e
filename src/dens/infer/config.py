"""What dens-infer is asked to do: :class:`InferConfig`, which checks itself, its choice lists and its exit
statuses.

Nothing heavy at import (dens.artifact.metadata's and dens.scoring's names; dens.flags and dens.sources, which
the checks use, load numpy and the standard library only; dens.pull's query and source, the standard library):
dens-infer's command-line module imports this, and a spawned decode worker imports that module before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dens.artifact.metadata import (
    PRECISIONS as PRECISIONS,  # --precision: the variant beside the model (model.int8.onnx)
)
from dens.commands import EXIT_ERRORS as EXIT_ERRORS
from dens.commands import EXIT_FAILED as EXIT_FAILED
from dens.commands import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from dens.commands import EXIT_OK as EXIT_OK
from dens.commands import EXIT_TERMINATED as EXIT_TERMINATED
from dens.commands import EXIT_USAGE as EXIT_USAGE
from dens.pull import Access, Query, Source, parse_source
from dens.pull.source import RETRIEVES as RETRIEVES  # --retrieve: C-MOVE or C-GET
from dens.scoring import DEVICES as DEVICES  # --device: ONNX Runtime's

ENGINES = ("local", "ray")  # local: this machine's decode processes; ray: Ray Data on a Ray cluster


@dataclass(frozen=True)
class InferConfig:
    """What ``dens-infer`` was asked to do. ``None`` means the default for the provider in use."""

    studies: Path | str  # a folder, a manifest, or a PACS: a DICOMweb URL or dicom://AET@HOST:PORT (dens.pull)
    out: Path = Path("preds.csv")
    model: Path | None = None  # default: runs/latest/model.onnx
    precision: str | None = None  # the variant dens-export wrote beside ``model`` (model.int8.onnx); None: ``model``
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: when the terminal is interactive
    flag: str | None = None  # which calls are flagged (dens.flags.parse_flag); default C/D
    plain_images: bool = False  # read PNG/PGM/TIFF/JPEG files too (else each is a skipped row)
    retry_errors: bool = False  # resume, and do the files of the earlier error rows again
    sr: Path | None = None  # --sr DIR: one density SR per exam (dens.sr) after the run
    engine: str = "local"
    ray_address: str | None = None  # --engine ray: None starts a local Ray; 'auto' or 'ray://host:10001' joins one
    shard: str | None = None  # 'i/N': only the files whose path hashes to shard i of N (dens.sources)
    allow_modified_model: bool = False  # score a model edited after export (its signature fails), loudly warned
    # A PACS as STUDIES: which studies (dens.pull.Query), where the files go, and how dens reaches it
    # (dens.pull.Access; None: its default). Secrets are named by their environment variables, never given.
    study_date: str | None = None  # YYYYMMDD or a range YYYYMMDD-YYYYMMDD
    since: str | None = None  # 24h, 7d: the study dates up to today
    modality: str | None = None  # ModalitiesInStudy; None: MG for a search
    study_uid: tuple[str, ...] = ()
    query: tuple[str, ...] = ()  # extra matching keys, KEY=VALUE
    pull_dir: Path | None = None  # None: <out stem>.pulled beside --out
    pull_token_env: str | None = None
    pull_user: str | None = None
    pull_password_env: str | None = None
    pull_ca: Path | None = None
    max_answer_mib: int | None = None  # DICOMweb: the longest answer read; None: dens.pull's default
    ae_title: str | None = None
    retrieve: str | None = None
    move_port: int | None = None

    def __post_init__(self) -> None:
        """Refuse settings that cannot go together or cannot be read (ValueError, worded for the command line)."""
        from dens.flags import parse_flag
        from dens.sources import Shard

        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.overwrite and (self.resume or self.retry_errors):
            asked = "--retry-errors" if self.retry_errors else "--resume"
            raise ValueError(f"{asked} and --overwrite contradict each other: choose one")
        if self.allow_modified_model and self.engine == "ray":
            raise ValueError(
                "--allow-modified-model is for --engine local: the Ray engine's model actors verify the model "
                "themselves and refuse an edited one"
            )
        parse_flag(self.flag)
        Shard.parse(self.shard)
        self._check_pull()

    @property
    def source(self) -> Source | None:
        """The PACS STUDIES names (None: a folder or a manifest)."""
        return parse_source(str(self.studies)) if isinstance(self.studies, str) else None

    def pull_query(self) -> Query:
        """Which studies to pull (ValueError, worded for the command line)."""
        return Query.parse(self.study_date, self.since, self.modality, self.study_uid, self.query)

    def pull_access(self) -> Access:
        """How dens reaches the PACS."""
        return Access(
            token_env=self.pull_token_env,
            user=self.pull_user,
            password_env=self.pull_password_env,
            ca=self.pull_ca,
            **({} if self.max_answer_mib is None else {"max_answer_mib": self.max_answer_mib}),
            ae_title=self.ae_title,
            retrieve=self.retrieve,
            move_port=self.move_port,
        )

    @property
    def pull_folder(self) -> Path:
        """Where pulled files are kept: --pull-dir, else ``<out stem>.pulled`` beside --out."""
        out = Path(self.out)
        return Path(self.pull_dir) if self.pull_dir is not None else out.with_name(out.stem + ".pulled")

    def _check_pull(self) -> None:
        source = self.source
        if source is None:
            given = [
                option
                for option, value in (
                    ("--study-date", self.study_date),
                    ("--since", self.since),
                    ("--modality", self.modality),
                    ("--study-uid", self.study_uid),
                    ("--query", self.query),
                    ("--pull-dir", self.pull_dir),
                    ("--pull-token-env", self.pull_token_env),
                    ("--pull-user", self.pull_user),
                    ("--pull-password-env", self.pull_password_env),
                    ("--pull-ca", self.pull_ca),
                    ("--max-answer-mib", self.max_answer_mib),
                    ("--ae-title", self.ae_title),
                    ("--retrieve", self.retrieve),
                    ("--move-port", self.move_port),
                )
                if value
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: options of a pull from a PACS; STUDIES {self.studies} is a folder or a "
                    "manifest (a PACS is http(s)://HOST/dicom-web or dicom://AET@HOST:PORT)"
                )
            return
        if self.engine == "ray":
            raise ValueError(
                "--engine ray reads files every node mounts; a pull from a PACS runs on --engine local (its files "
                "land in --pull-dir, which a later --engine ray run can read as a folder)"
            )
        if self.shard is not None:
            raise ValueError(
                "--shard splits a folder or a manifest; a pull from a PACS runs as one job: split it by date "
                "instead (--study-date 20261201-20261203, then 20261204-20261206)"
            )
        self.pull_query()
        self.pull_access().check(source)
