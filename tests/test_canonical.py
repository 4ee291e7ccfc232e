"""The canonical image on the real samples (DENS_REAL_MAMMO): the film's label cropped off, every source's
in-breast grey range used alike, the breast filling the H x W canvas; version 1 (the square route old models
were trained on) kept as it was. bench/canonical.py reports the same figures per source."""

from __future__ import annotations

import statistics
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REAL_J2K
from dens.route import geometry, preprocess
from dens.route.config import PreprocessConfig

V1 = PreprocessConfig(version=1, size=512)
DIGITAL = [name for name in REAL_J2K if name.startswith("rsna")]
FILM = "wg04-nema-MG1/MG1_J2KI"
# Where MG1's "L MLO" label starts on the film (full-resolution column), read off the image: right of the
# breast's skin line (the breast reaches column ~2100 at the nipple), near the top (rows 200-750).
_MG1_LABEL_COLUMN = 2300


def _in_breast(image: np.ndarray) -> tuple[float, np.ndarray]:
    """The canvas's breast fill and its in-breast greys (the route's own mask, found on the canonical image)."""
    mask, _ = geometry.breast_mask(image.astype(np.float32) / 255.0)
    full = cv2.resize(mask.astype(np.uint8), image.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return float(full.mean()), image[full]


@pytest.fixture(scope="module")
def canonical(real_mammo) -> dict[tuple[str, str], tuple[np.ndarray, preprocess.ImageInfo]]:
    routes = {"v1": V1, "v2": PreprocessConfig(version=2)}
    return {(n, r): preprocess.load(real_mammo / n, cfg) for n in [*DIGITAL, FILM] for r, cfg in routes.items()}


def test_the_film_label_is_cropped_off(canonical):
    (_, old), (_, new) = canonical[FILM, "v1"], canonical[FILM, "v2"]
    assert old.crop_box == (0, old.rows, 0, old.cols)  # version 1 keeps the whole film, label included
    y0, y1, x0, x1 = new.crop_box
    assert x0 == 0 and x1 <= _MG1_LABEL_COLUMN, new.crop_box  # every label column is outside the box
    assert x1 >= 2000 and y1 - y0 >= 0.95 * new.rows  # the breast is not: nipple and full height kept


@pytest.mark.parametrize("name", DIGITAL, ids=lambda p: Path(p).name)
def test_digital_crops_stay_what_they_were(canonical, name):
    (_, old), (_, new) = canonical[name, "v1"], canonical[name, "v2"]
    # The version-2 mask cuts thin strips off and grows back what it cut of the breast; on a digital image it
    # moves a crop edge by a few tens of pixels at most (the decode level differs too: the canvas is taller).
    tolerance = 0.025 * max(new.rows, new.cols)
    assert all(abs(a - b) <= tolerance for a, b in zip(old.crop_box, new.crop_box, strict=True)), (old, new)


def test_every_source_uses_the_grey_range_alike(canonical):
    for name in [*DIGITAL, FILM]:
        image, _ = canonical[name, "v2"]
        _, grey = _in_breast(image)
        p2, p98 = np.percentile(grey, [2, 98])
        assert 10 <= p2 <= 60 and 215 <= p98 <= 245 and p98 - p2 >= 170, (name, p2, p98)
    # Before: Hologic's SIGMOID VOI left its in-breast 98th percentile near 120 of 255.
    _, hologic = _in_breast(canonical[DIGITAL[0], "v1"][0])
    assert np.percentile(hologic, 98) < 150


def test_the_breast_fills_the_two_to_one_canvas(canonical):
    fills = {r: [_in_breast(canonical[n, r][0])[0] for n in [*DIGITAL, FILM]] for r in ("v1", "v2")}
    assert canonical[FILM, "v2"][0].shape == (736, 352) and canonical[FILM, "v1"][0].shape == (512, 512)
    assert statistics.median(fills["v2"]) >= 0.5 > statistics.median(fills["v1"]), fills
    assert min(fills["v2"]) >= 0.35, fills  # a tall Hologic crop filled about a fifth of the square
