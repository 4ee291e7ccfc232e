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
_FONT, _SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.38
_BREAKS = " /_-."  # where a caption may be cut: the path separator (captions show paths as POSIX) and word boundaries


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
            shown = fit_caption(_drawable(text), cell_w - 8)
            cv2.putText(sheet, shown, (left, y), _FONT, _SCALE, (235, 235, 235), 1, cv2.LINE_AA)
    return sheet


def _drawable(text: str) -> str:
    """``text`` in the ASCII OpenCV's Hershey font draws, the rest escaped: a file name that is not UTF-8 (its
    bytes carried as lone surrogates) crashes OpenCV's text functions, and other letters draw as '?'."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\\udc", "\\x")


def fit_caption(text: str, width: int) -> str:
    """``text`` cut to fit ``width`` pixels in the caption font, ``~`` marking what was left out.

    Cuts fall at a path separator (``/``) or a word boundary (a space, ``_``, ``-``, ``.``), never inside a word, and
    the file's own name (after the last path separator) is kept whole where it fits; of the cuts that do, the
    one that keeps the most text, the end before the start. Only where that would keep less than half of what a
    cut anywhere keeps (a name of one long word) is the name's end kept up to the width, whatever its words.
    """
    if _text_width(text) <= width:
        return text
    cuts = [0, *(i for i in range(1, len(text)) if text[i - 1] in _BREAKS or text[i] in _BREAKS), len(text)]
    name = text.rfind("/") + 1
    # (head kept to i, tail kept from j), best first: the name whole, then most text, then most of the end.
    pairs = sorted(
        ((i, j) for i in cuts for j in cuts if i <= j),
        key=lambda ij: (ij[1] <= name, ij[0] + len(text) - ij[1], len(text) - ij[1]),
        reverse=True,
    )
    shown = next((text[:i] + "~" + text[j:] for i, j in pairs if _text_width(text[:i] + "~" + text[j:]) <= width), "~")
    anywhere = next((k for k in range(len(text) - 1, -1, -1) if _text_width("~" + text[len(text) - k :]) <= width), 0)
    if 2 * (len(shown) - 1) < anywhere:
        return "~" + text[len(text) - anywhere :]
    return shown


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, _FONT, _SCALE, 1)[0][0]
