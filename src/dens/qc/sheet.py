"""The contact sheet: canonical images side by side, each captioned, so a person checks the route at a glance.

Pure numpy/OpenCV; :mod:`dens.qc.runner` feeds it what ``load`` made (and a model's calls), and
bench/canonical.py the same files through two routes.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

TILE_HEIGHT = 368  # a canonical image is shown this high by default, aspect kept
_LINE = 14  # caption line height, pixels
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def contact_sheet(
    tiles: Sequence[tuple[np.ndarray, Sequence[str]]], columns: int = 6, tile_height: int = TILE_HEIGHT
) -> np.ndarray:
    """One BGR uint8 image of ``tiles`` (canonical uint8 image, caption lines) in rows of ``columns``.

    Each image is scaled to ``tile_height``, outlined in grey (so its canvas edge shows against the
    black padding), and captioned beneath in up to four lines.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one image")
    width = max(round(img.shape[1] * tile_height / img.shape[0]) for img, _ in tiles)
    lines = min(4, max(len(caption) for _, caption in tiles))
    cell_h, cell_w = tile_height + lines * _LINE + 8, max(width, 150) + 8
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * cell_h, min(columns, len(tiles)) * cell_w, 3), 32, np.uint8)
    for i, (image, caption) in enumerate(tiles):
        top, left = (i // columns) * cell_h + 4, (i % columns) * cell_w + 4
        w = round(image.shape[1] * tile_height / image.shape[0])
        shown = cv2.resize(image, (w, tile_height), interpolation=cv2.INTER_AREA)
        sheet[top : top + tile_height, left : left + w] = shown[..., None]
        cv2.rectangle(sheet, (left, top), (left + w - 1, top + tile_height - 1), (110, 110, 110), 1)
        for k, text in enumerate(caption[:lines]):
            y = top + tile_height + (k + 1) * _LINE
            cv2.putText(
                sheet, _fit(_drawable(text), cell_w - 8), (left, y), _FONT, 0.38, (235, 235, 235), 1, cv2.LINE_AA
            )
    return sheet


def _drawable(text: str) -> str:
    """``text`` in the ASCII OpenCV's Hershey font draws, the rest escaped: a file name that is not UTF-8 (its
    bytes carried as lone surrogates) crashes OpenCV's text functions, and other letters draw as '?'."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\\udc", "\\x")


def _fit(text: str, width: int) -> str:
    """``text`` cut to fit ``width`` pixels in the caption font, ``~`` marking the cut: a third of what
    stays from its start, two thirds from its end, so a file's own name stays in sight beside its folder."""
    for keep in range(len(text), -1, -1):
        head = keep // 3
        shown = text if keep == len(text) else text[:head] + "~" + text[len(text) - (keep - head) :]
        if cv2.getTextSize(shown, _FONT, 0.38, 1)[0][0] <= width:
            return shown
    return ""
