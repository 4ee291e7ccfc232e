"""The contact sheet of a set of files (dens-qc): the canonical images a model sees, each captioned, so a
person checks the preprocessing at a glance (the crop, the side, the grey range, what the model said).

Files decode through the decode engine (:class:`dens.engine.DecodePool`), so a sheet shows exactly what
``dens.route.preprocess.load`` gives the model, and a file that crashes a codec costs its own tile only. With a
model, the route is the one its metadata names and each tile carries the model's call and p_dense (ONNX
Runtime on the CPU: a sheet is a few dozen images); without one, the default :class:`PreprocessConfig`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import dens
from dens import counted, sources
from dens.engine import Decoded, DecodePool, in_input_order
from dens.files import atomic_write
from dens.flags import call
from dens.qc.sheet import contact_sheet
from dens.route import families
from dens.route.config import PreprocessConfig
from dens.scoring.model import ModelError, ModelFile

log = logging.getLogger(__name__)

FORMATS = (".png", ".jpg", ".jpeg")  # what --out may name
_BATCH = 8  # images per model call
_SHOWN_FAILURES = 10  # failed files listed one per line; the rest are counted


class QcError(Exception):
    """A problem the user must fix (no files, no usable image, an unusable model); the message says how."""


@dataclass(frozen=True)
class QcConfig:
    """What one dens-qc run makes. ``inputs``: files and folders (folders are walked recursively, in sorted
    order). ``limit``: images on the sheet, the first usable ones in that order. ``model``: an exported ONNX
    model; its metadata's preprocessing is used and each tile shows its call. ``plain_images``: read
    PNG/PGM/TIFF/JPEG files too (else each is a skipped file, as in dens-infer). ``workers``: decode processes."""

    inputs: tuple[Path, ...]
    out: Path
    model: Path | None = None
    limit: int = 48
    columns: int = 8
    workers: int | None = None
    plain_images: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("dens-qc needs at least one file or folder")
        if self.limit < 1 or self.columns < 1:
            raise ValueError(f"limit and columns must be at least 1, got {self.limit} and {self.columns}")
        if Path(self.out).suffix.lower() not in FORMATS:
            raise ValueError(f"--out {self.out}: name a {', '.join(FORMATS)} file for the sheet")


@dataclass(frozen=True)
class Tile:
    """One image on the sheet: its file, what the route learnt about it and, with a model, the call."""

    path: str
    info: dict
    density: str = ""
    p_dense: float | None = None

    def caption(self, shown_path: str) -> list[str]:
        """The lines under the image: file, vendor, side/view/decode route, and the call when there is one."""
        info = self.info
        maker = " ".join(part for part in (info.get("manufacturer", ""), info.get("manufacturer_model", "")) if part)
        side = " ".join(part for part in (info.get("laterality", ""), info.get("view", "")) if part)
        lines = [shown_path, maker or "manufacturer not given", f"{side}  {info.get('decode_route', '')}".strip()]
        if self.p_dense is not None:
            # A family the model never saw is mapped by its pooled grey line: the call deserves a second look.
            unseen = "  (machine unseen)" if info.get("harmonisation") == families.FALLBACK else ""
            lines.append(f"call {self.density}  p_dense {self.p_dense:.2f}{unseen}")
        return lines


@dataclass
class QcResult:
    """What a run made: the sheet, its tiles in order, the files that gave no image and the summary line."""

    sheet: Path
    tiles: list[Tile] = field(default_factory=list)
    failures: list[Decoded] = field(default_factory=list)
    files: int = 0  # files found
    unread: int = 0  # files past the limit, never decoded
    seconds: float = 0.0

    def counts(self) -> str:
        """How many files were read and what they gave."""
        skipped = sum(d.status == "skipped" for d in self.failures)
        errors = len(self.failures) - skipped
        read = counted(self.files - self.unread, "file")
        return f"{counted(len(self.tiles), 'image')} from {read} ({skipped} skipped, {counted(errors, 'error')})"

    def line(self) -> str:
        """The one-line summary."""
        past = f"; {counted(self.unread, 'more file')} not read (--limit)" if self.unread else ""
        return f"{self.counts()}{past} in {self.seconds:.1f} s; sheet {self.sheet}"


def find_files(inputs: Sequence[Path], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """``(file, name to show)`` for every file named or under a folder named (:func:`dens.sources.walk`:
    sorted, symlinked folders followed once); the name is relative to the folder it was found in (a named
    file: its name). ``exclude``: the sheet."""
    found = []
    for root in inputs:
        root = Path(root)
        for entry in sources.walk(root, [exclude] if exclude is not None else []):
            found.append(
                (Path(entry.path), Path(entry.path).relative_to(root).as_posix() if root.is_dir() else root.name)
            )
    return found


class _Model:
    """An exported dens model on ONNX Runtime's CPU provider (a sheet is a few dozen images): its
    preprocessing and its calls."""

    def __init__(self, path: Path):
        from dens.scoring.runtime import open_runtime

        try:
            self.file = ModelFile.read(path, "dens-qc")
            self.runtime = open_runtime(self.file, "cpu", batch_size=_BATCH)
        except ModelError as exc:
            raise QcError(str(exc)) from exc

    def calls(self, images: list[np.ndarray]) -> list[tuple[str, float]]:
        """(call, p_dense) per canonical image."""
        out = []
        for start in range(0, len(images), _BATCH):
            batch = np.stack(images[start : start + _BATCH])[:, None]
            out += [call(p, self.file.classes) for p in self.runtime.predict(batch)]
        return out


def decode_first(
    files: Sequence[Path], cfg: PreprocessConfig, limit: int, workers: int, plain_images: bool, progress: bool
) -> Iterator[Decoded]:
    """The decode results of ``files`` in input order, up to and including the ``limit``-th usable image.

    Results come in input order (:func:`in_input_order`), so which files make the sheet never depends on
    timing."""
    items = sources.pool_items((sources.Entry(str(p)) for p in files), plain_images)
    ok = 0
    bar = tqdm(total=min(limit, len(files)), desc="dens-qc", unit="img", disable=not progress)
    with DecodePool(max(1, min(workers, len(files))), cfg, buffer=2 * _BATCH) as pool:
        for result in in_input_order(pool.map(items)):
            ok += result.status == "ok"
            bar.update(result.status == "ok")
            yield result
            if ok >= limit:
                break
    bar.close()


def run(cfg: QcConfig) -> QcResult:
    """Write the contact sheet ``cfg.out`` of the first ``cfg.limit`` usable images among ``cfg.inputs``.

    Raises :class:`QcError` when there is nothing to show (no files, none usable) or the model is unusable.
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    files = find_files(cfg.inputs, exclude=out)
    if not files:
        raise QcError(f"no files in {', '.join(map(str, cfg.inputs))}")
    model = _Model(Path(cfg.model)) if cfg.model is not None else None
    preprocess = model.file.preprocess if model is not None else PreprocessConfig()
    names = {str(p): name for p, name in files}
    workers = cfg.workers or min(4, dens.usable_cores())

    images, tiles, failures = [], [], []
    for decoded in decode_first([p for p, _ in files], preprocess, cfg.limit, workers, cfg.plain_images, cfg.progress):
        if decoded.status == "ok":
            images.append(decoded.image)
            tiles.append(Tile(decoded.path, decoded.info or {}))
        else:
            failures.append(decoded)
    read = len(tiles) + len(failures)
    result = QcResult(out, failures=failures, files=len(files), unread=len(files) - read)
    _log_failures(failures)
    if not tiles:
        raise QcError(
            f"none of the {read} files read gave an image ({result.counts()}); "
            "the reasons are above (a folder of PNG/PGM/TIFF/JPEG images needs --plain-images)"
        )
    if model is not None:
        tiles = [
            Tile(tile.path, tile.info, density, p_dense)
            for tile, (density, p_dense) in zip(tiles, model.calls(images), strict=True)
        ]
    sheet = contact_sheet(
        [(image, tile.caption(names[tile.path])) for image, tile in zip(images, tiles, strict=True)],
        columns=cfg.columns,
    )
    sheet = _with_title(sheet, _title(preprocess, model))
    ok, encoded = cv2.imencode(out.suffix.lower(), sheet)
    if not ok:
        raise QcError(f"OpenCV could not encode the sheet as {out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(out) as f:
            f.write(encoded.tobytes())
    except OSError as exc:
        raise QcError(f"cannot write {out} ({exc.strerror or exc}): choose another --out") from exc
    result.tiles = tiles
    result.seconds = time.perf_counter() - started
    return result


def _title(preprocess: PreprocessConfig, model: _Model | None) -> str:
    route = f"preprocess version {preprocess.version}, {preprocess.height}x{preprocess.width} canvas"
    if model is None:
        return f"dens-qc: {route} (the default; no model)"
    return f"dens-qc: {route}, from {model.file.path.name} (sha256 {model.file.sha256[:12]})"


def _with_title(sheet: np.ndarray, title: str) -> np.ndarray:
    """``sheet`` under a strip that says which route (and model) made it."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    (w, h), _ = cv2.getTextSize(title, font, scale, 1)
    width = max(sheet.shape[1], w + 16)
    strip = np.full((h + 16, width, 3), 32, np.uint8)
    cv2.putText(strip, title, (8, h + 8), font, scale, (235, 235, 235), 1, cv2.LINE_AA)
    body = np.full((sheet.shape[0], width, 3), 32, np.uint8)
    body[:, : sheet.shape[1]] = sheet
    return np.vstack([strip, body])


def _log_failures(failures: list[Decoded]) -> None:
    for decoded in failures[:_SHOWN_FAILURES]:
        shown = decoded.path.encode("utf-8", "backslashreplace").decode()  # a name that is not UTF-8, escaped
        log.warning("dens-qc: %s: %s (%s)", shown, decoded.status, decoded.reason)
    if len(failures) > _SHOWN_FAILURES:
        log.warning("dens-qc: ... and %d more files without an image", len(failures) - _SHOWN_FAILURES)
