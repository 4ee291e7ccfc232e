"""One view's pictures for the review page, on disk: its thumbnail, and for a flagged view its overlay figure and
the overlay's thumbnail, each on the page's one scale and on the map's own.

The page's scale (1 = the page's largest map value) lets maps be compared: a C map looks weaker than a D map
beside it. A map's own scale (1 = its own largest value) shows where a weak map looked, which the page's scale can
leave nearly invisible; the page offers it as a toggle, and says which scale is on. :mod:`dens.review.report` puts
the files on the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dens import counted, labels
from dens.review import display

THUMBS = "thumbs"  # the thumbnails' folder under the Grad-CAM folder
OWN_SCALE = "own-scale"  # the folder of the overlays on each map's own scale (figures, thumbnails): the toggle


@dataclass(frozen=True)
class ViewFiles:
    """What one view of the page has on disk (None: not made). ``overlay``: the figure on the page's scale (what
    preds.csv's ``gradcam`` column names); ``own_overlay``: the same map on its own scale."""

    thumbnail: Path | None
    overlay: Path | None
    overlay_thumbnail: Path | None
    own_overlay: Path | None = None
    own_overlay_thumbnail: Path | None = None


def write_view_files(
    out_dir: Path,
    stem: str,
    image: np.ndarray,
    cam: np.ndarray | None,
    label: Sequence[str],
    version: int,
    *,
    thumbnail: bool = True,
    own: tuple[np.ndarray, Sequence[str]] | None = None,
) -> ViewFiles:
    """One view's pictures from its display image (uint8, as PACS shows it) and, for a flagged view, its
    map (as displayed, on the page's scale: 1.0 = the page's largest value; any size, upsampled here):
    ``thumbs/<stem>.webp``, the overlay figure ``<stem>.png`` and its thumbnail ``thumbs/<stem>.cam.webp``.
    ``own``: the same map on its own scale (1.0 = its largest value) and its figure's label, drawn the same way
    into ``own-scale/`` (``<stem>.png``, ``<stem>.cam.webp``): the Grad-CAM folder keeps one figure per map, on
    the page's scale."""
    thumb = None
    if thumbnail:
        thumb = _write_bytes(
            out_dir / THUMBS / f"{stem}{display.IMAGE_SUFFIX}", display.encode(display.thumbnail(image))
        )
    if cam is None:
        return ViewFiles(thumb, None, None)
    weight = display.breast_weight(image, version)
    small = out_dir / THUMBS / f"{stem}.cam{display.IMAGE_SUFFIX}" if thumbnail else None
    overlay, overlay_thumb = _overlay(out_dir / f"{stem}.png", small, image, cam, weight, label)
    own_overlay = own_thumb = None
    if own is not None:
        small = out_dir / OWN_SCALE / f"{stem}.cam{display.IMAGE_SUFFIX}" if thumbnail else None
        own_overlay, own_thumb = _overlay(out_dir / OWN_SCALE / f"{stem}.png", small, image, own[0], weight, own[1])
    return ViewFiles(thumb, overlay, overlay_thumb, own_overlay, own_thumb)


def _overlay(
    path: Path,
    small: Path | None,
    image: np.ndarray,
    cam: np.ndarray,
    weight: np.ndarray,
    label: Sequence[str],
) -> tuple[Path, Path | None]:
    """The overlay figure at ``path`` and, when ``small`` is given, the overlay's thumbnail there."""
    cam = display.upsample(cam, image.shape)
    overlay = _write_bytes(path, _png(display.overlay_figure(image, cam, weight, label)))
    if small is None:
        return overlay, None
    return overlay, _write_bytes(small, display.encode(display.thumbnail(display.blend(image, cam, weight))))


def view_label(record: dict, own_peak: float | None = None) -> list[str]:
    """The lines above an overlay figure: side and view as displayed, the class and its p, the scale (the page's;
    with ``own_peak``, the map's own, whose largest raw value that is)."""
    side = {"L": "left breast, chest wall left", "R": "right breast, chest wall right"}.get(
        str(record.get(labels.LATERALITY, "")).upper(), "side unknown, as the model saw it"
    )
    density = str(record.get(labels.DENSITY, ""))
    p_class = record.get(f"p_{density}", "")
    scale = "this page's largest map value" if own_peak is None else f"this map's own largest value ({own_peak:.3g})"
    lines = [
        f"{record.get(labels.LATERALITY, '')} {record.get(labels.VIEW, '')} ({side}, as PACS shows it)",
        f"called {density}: p_{density} {_number(p_class)}, p_dense {_number(record.get(labels.P_DENSE, ''))}",
        f"Grad-CAM for that class; 1 = {scale}; breast only",
    ]
    # The overlay's font draws ASCII only; header values are untrusted, so keep them printable too.
    return ["".join(ch if " " <= ch <= "~" else "?" for ch in line) for line in lines]


def page_scale(page_max: float, maps: int) -> str:
    """The page's sentence on what 1.0 on the colour bar is."""
    if not maps:
        return "no maps on this page"
    return (
        f"1 is the largest raw Grad-CAM value among this page's {counted(maps, 'map')} "
        f"({page_max:.3g} in the model's units), 0 is none"
    )


def _number(value) -> str:
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return "?"


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError("could not encode an overlay as PNG")
    return data.tobytes()


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
