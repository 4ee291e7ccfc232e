"""Version 3 of the canonical image: one fixed grey line per acquisition family, fitted on training images,
applied unchanged at inference as a table on the canvas; the background outside the breast black; JPEG read
as the other plain images are. (Whether it keeps density on real mammograms: tests/test_real_density.py.)"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from dens.route import families, geometry, preprocess
from dens.route.config import PreprocessConfig

CANVAS = {"height": 128, "width": 64}


def test_a_family_gets_the_medians_of_its_images_and_the_pool_gets_everyone():
    measured = [("GE", (0.1 + i / 100, 0.6 + i / 100)) for i in range(9)] + [("film", (0.3, 0.9))] * 3
    fitted = dict((key, (lo, hi)) for key, lo, hi in families.fit(measured))
    # Fat: the median of the images' 2nd percentiles; dense: the 90th percentile of their 98th percentiles.
    assert fitted["GE"] == pytest.approx((0.14, np.percentile([0.6 + i / 100 for i in range(9)], 90)))
    assert "film" not in fitted  # 3 images: too few for a line of its own; the pooled line maps it
    pooled_dense = np.percentile([0.6 + i / 100 for i in range(9)] + [0.9] * 3, 90)
    assert fitted[families.POOLED] == pytest.approx((0.155, pooled_dense))  # over all 12 images
    assert families.fit(measured[:5]) == ()  # too few images to fit anything


def test_lookup_says_which_line_mapped_an_image():
    fitted = (("GE", 0.2, 0.6), (families.POOLED, 0.1, 0.8))
    table, how = families.lookup(fitted, "GE")
    assert how == families.FAMILY and np.array_equal(table, families.table(0.2, 0.6))
    table, how = families.lookup(fitted, "never seen")
    assert how == families.FALLBACK and np.array_equal(table, families.table(0.1, 0.8))
    table, how = families.lookup((), "GE")
    assert how == families.NONE and np.array_equal(table, np.arange(256))


def test_the_line_keeps_the_order_and_anchors_fat_and_dense():
    table = families.table(0.2, 0.6).astype(int)
    assert table[0] == 0 and np.all(np.diff(table) >= 0)  # black stays black; brighter stays brighter
    assert table[round(0.2 * 255)] == pytest.approx(0.1 * 255, abs=1.5)  # the family's fat grey
    assert table[round(0.6 * 255)] == pytest.approx(0.9 * 255, abs=1.5)  # its dense grey
    narrow = families.line(np.array([0.30, 0.35], np.float32), 0.30, 0.35)
    assert narrow[1] - narrow[0] == pytest.approx(families.MAX_GAIN * 0.05, abs=1e-6)  # capped, not 16x


def _dicom_family(make_dicom, pixels, maker):
    return make_dicom(pixels, bits_stored=12, Manufacturer=maker, WindowCenter=2048, WindowWidth=4096)


def test_a_fitted_canonical_image_is_the_table_over_the_unfitted_canvas(make_dicom, breast):
    """Training keeps unfitted canvases in its cache and applies the table; inference maps in the route: the
    two must be the same bytes, for a fitted family and for one the model never saw."""
    seen = _dicom_family(make_dicom, breast(seed=1), "Maker A")
    unseen = _dicom_family(make_dicom, breast(seed=2), "Maker B")
    unfitted = PreprocessConfig(**CANVAS)
    before = {p: preprocess.load(p, unfitted) for p in (seen, unseen)}
    assert all(info.harmonisation == families.NONE for _, info in before.values())
    key = before[seen][1].family
    assert key == "Maker A/?/MONOCHROME2/LINEAR/12-bit"
    fitted = unfitted.fitted(((key, 0.3, 0.8), (families.POOLED, 0.2, 0.9)))
    for path, expected_how, line in ((seen, families.FAMILY, (0.3, 0.8)), (unseen, families.FALLBACK, (0.2, 0.9))):
        image, info = preprocess.load(path, fitted)
        assert info.harmonisation == expected_how
        np.testing.assert_array_equal(image, families.table(*line)[before[path][0]])
        # The levels the fit reads are the image's own, whatever the config's lines.
        assert info.breast_levels == before[path][1].breast_levels


def test_fit_on_levels_the_route_measures(make_dicom, breast):
    paths = [_dicom_family(make_dicom, breast(seed=s), "Maker A") for s in range(8)]
    infos = [preprocess.load(p, PreprocessConfig(**CANVAS))[1] for p in paths]
    (key, lo, hi), pooled = families.fit((i.family, i.breast_levels) for i in infos)
    assert key == infos[0].family and pooled == (families.POOLED, lo, hi)
    assert 0.4 < lo < hi < 0.95  # the synthetic tissue's greys under a full-range window


def test_version_3_blacks_out_a_label_inside_the_breast_box(make_dicom, breast):
    """A film label beside the breast, inside its bounding box but not part of it, leaves the canvas in
    version 3 (version 2 keeps it: it keeps the whole box)."""
    pixels = breast(400, 300, seed=3)
    pixels[330:360, 150:200] = 4000  # a bright label below the breast, level with its nipple region
    pixels[30:60, 150:200] = 4000  # and one above
    path = _dicom_family(make_dicom, pixels, "Film")
    v2, info = preprocess.load(path, PreprocessConfig(version=2, **CANVAS))
    v3, _ = preprocess.load(path, PreprocessConfig(**CANVAS))
    y0, y1, _, x1 = info.crop_box
    assert y0 <= 40 and y1 >= 350 and x1 > 150, "the labels reach into the breast's box, or the test shows nothing"
    corner = (slice(100, None), slice(52, None))  # the lower label's place on the canvas, clear of the breast
    assert v2[corner].max() > 200 and v3[corner].max() == 0
    # The breast itself is all there: its in-breast greys move by the grey map only (none here: unfitted).
    mask, _ = geometry.breast_mask(v3.astype(np.float32) / 255)
    full = cv2.resize(mask.astype(np.uint8), v3.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert full.mean() > 0.3


def test_the_breast_weight_follows_the_canvas_geometry(breast):
    """breast_on_canvas puts the thumbnail mask where fit_to_canvas puts the crop, flipped or not."""
    unit = breast(300, 240).astype(np.float32) / 4095
    small, _ = geometry.thumbnail(unit)
    mask = geometry.mask_of(small)
    box = (20, 280, 0, 200)
    for flipped in (False, True):
        crop = unit[20:280, 0:200][:, ::-1] if flipped else unit[20:280, 0:200]
        canvas = geometry.fit_to_canvas(np.ascontiguousarray(crop), 128, 64)
        weight = geometry.breast_on_canvas(mask, unit.shape, box, flipped, (128, 64))
        breast_there, weighted = canvas > 0.2, weight > 0.5
        overlap = (breast_there & weighted).sum() / (breast_there | weighted).sum()
        assert overlap > 0.9, (flipped, overlap)  # a mirrored or shifted weight overlaps far less
        assert weight[~geometry.fit_to_canvas(np.ones_like(crop), 128, 64).astype(bool)].max() == 0  # padding


# A 12-bit baseline-extended JPEG of synthetic_breast(300, 240, bits=12) (libjpeg-turbo via imagecodecs,
# quality 95): no encoder among the project's dependencies writes one.
JPEG12 = Path(__file__).parent / "data" / "breast-12bit.jpg"


@pytest.mark.parametrize("bits", [8, 12])
def test_jpeg_mammograms_are_read_like_png(tmp_path, breast, bits):
    """Public sets ship baseline JPEG, 8-bit and 12-bit (OpenCV reads only the first; libjpeg the second)."""
    stored = breast(300, 240, bits=12)
    pixels = stored if bits == 12 else (stored >> 4).astype(np.uint8)
    path = tmp_path / "breast.jpg"
    if bits == 8:
        assert cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    else:
        path.write_bytes(JPEG12.read_bytes())
    png = tmp_path / "breast.png"
    assert cv2.imwrite(str(png), pixels)
    image, info = preprocess.load(path, PreprocessConfig(**CANVAS))
    reference, _ = preprocess.load(png, PreprocessConfig(**CANVAS))
    assert info.family == ("plain/8-bit" if bits == 8 else "plain/16-bit")
    assert info.decode_route.startswith("opencv" if bits == 8 else "libjpeg")
    assert np.abs(image.astype(int) - reference.astype(int)).mean() < 2  # lossy, but the same image
