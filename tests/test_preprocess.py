"""dens.route.preprocess: the one route from a file to the canonical uint8 image."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14

from conftest import REAL_FILES
from dens.route import dicom, geometry, greyscale, preprocess
from dens.route.errors import Reason, UnusableFile
from dens.route.preprocess import PreprocessConfig

SMALL = PreprocessConfig(size=64, reduce=False)


def _grey_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b).max())


# --- MONOCHROME1 ----------------------------------------------------------------------------------


def test_monochrome1_is_the_mirror_of_monochrome2(make_dicom, breast):
    stored = breast(257, 201)
    inverted = 4095 - stored  # inverted within BitsStored's range
    cfg = PreprocessConfig(size=128, reduce=False)
    m2, info2 = preprocess.load(make_dicom(stored, bits_stored=12), cfg)
    m1, info1 = preprocess.load(make_dicom(inverted, bits_stored=12, photometric="MONOCHROME1"), cfg)
    # Min-max: both sides compute (v - lo) / (hi - lo) from the same integers, exact in practice;
    # float32 rounding could move a value sitting on .5 by one grey level, never more.
    assert info1.crop_box == info2.crop_box and info1.photometric == "MONOCHROME1"
    assert _grey_diff(m1, m2) <= 1 and np.count_nonzero(m1 != m2) <= m1.size // 1000
    # SIGMOID mirrored around the range: 1 - s(-d) against s(d) in float32 (measured: 1 pixel of
    # 16384 off by one grey level at 257x201, S=128; none elsewhere).
    window = {"WindowWidth": 1800, "VOILUTFunction": "SIGMOID"}
    s2, sinfo2 = preprocess.load(make_dicom(stored, bits_stored=12, WindowCenter=1500.5, **window), cfg)
    s1, sinfo1 = preprocess.load(
        make_dicom(inverted, bits_stored=12, photometric="MONOCHROME1", WindowCenter=4095 - 1500.5, **window), cfg
    )
    assert sinfo1.crop_box == sinfo2.crop_box
    assert _grey_diff(s1, s2) <= 1 and np.count_nonzero(s1 != s2) <= s1.size // 1000
    assert _grey_diff(s2, m2) > 10  # the window was applied, not min-max


# --- VOI against pydicom --------------------------------------------------------------------------


def _voi_dataset(bits: int = 12, signed: bool = False, **tags) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, bits, int(signed)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _lut_item(first: int, count: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [count, first, bits]
    curve = np.rint(((1 << bits) - 1) * (np.arange(count) / (count - 1)) ** 0.6)
    item.add_new(0x00283006, "US", [int(v) for v in curve])  # LUTData as US, the in-memory form
    return item


VOI_CASES = {
    "linear": _voi_dataset(WindowCenter=2048, WindowWidth=1000),
    "linear-half-centre": _voi_dataset(WindowCenter=1000.5, WindowWidth=301),
    "linear-exact": _voi_dataset(WindowCenter=2047.5, WindowWidth=999.5, VOILUTFunction="LINEAR_EXACT"),
    "sigmoid": _voi_dataset(WindowCenter=1802.31, WindowWidth=1500, VOILUTFunction="SIGMOID"),
    "multi-valued": _voi_dataset(WindowCenter=[1500, 3000], WindowWidth=[800, 200]),
    "rescaled": _voi_dataset(RescaleSlope=0.5, RescaleIntercept=-100, WindowCenter=700, WindowWidth=600),
    "signed-rescaled": _voi_dataset(
        bits=16, signed=True, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    ),
    "lut": _voi_dataset(VOILUTSequence=[_lut_item(first=500, count=3000, bits=12)]),
    "lut-16bit": _voi_dataset(bits=16, VOILUTSequence=[_lut_item(first=0, count=4096, bits=16)]),
    "lut-over-window": _voi_dataset(
        VOILUTSequence=[_lut_item(first=0, count=4096, bits=12)], WindowCenter=100, WindowWidth=50
    ),
}


def _pydicom_unit(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's Modality LUT + VOI, brought to [0, 1] by its own output range: the LUT's nominal
    depth for a VOI LUT, BitsStored's range through the rescale for a window."""
    out = apply_voi_lut(apply_modality_lut(stored, ds), ds)
    if ds.get("VOILUTSequence"):
        return out / float((1 << ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = (
        (-(1 << (ds.BitsStored - 1)), (1 << (ds.BitsStored - 1)) - 1)
        if ds.PixelRepresentation
        else (0, (1 << ds.BitsStored) - 1)
    )
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    lo, hi = lo * slope + intercept, hi * slope + intercept
    return (out - lo) / (hi - lo)


@pytest.mark.parametrize("case", VOI_CASES)
def test_voi_matches_pydicom(case):
    ds = VOI_CASES[case]
    if ds.PixelRepresentation:
        stored = np.arange(-1500, 2596, dtype=np.int16).reshape(64, 64)
    else:  # every 12-bit value once (and a spread of 16-bit ones)
        stored = (np.arange(4096, dtype=np.uint16) << (ds.BitsStored - 12)).reshape(64, 64)
    ours = greyscale.apply_voi(greyscale.apply_rescale(stored, ds), ds)
    reference = _pydicom_unit(stored, ds)
    assert ours.dtype == np.float32 and ours.min() >= 0.0 and ours.max() <= 1.0
    # float32 against float64: measured worst 1.0e-7 (SIGMOID), 4.5e-8 (linear), 3e-8 (LUTs).
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    assert ours.max() - ours.min() > 0.5  # the cases span most of the output range


def test_multi_valued_window_uses_the_first_value():
    ds = VOI_CASES["multi-valued"]
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    first = greyscale.window(stored, 1500, 800)
    np.testing.assert_array_equal(greyscale.apply_voi(stored, ds), first)
    assert np.abs(first - greyscale.window(stored, 3000, 200)).max() > 0.5


def test_voi_lut_is_preferred_over_the_window():
    ds = VOI_CASES["lut-over-window"]
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    lut_only = Dataset()
    lut_only.VOILUTSequence = ds.VOILUTSequence
    np.testing.assert_array_equal(greyscale.apply_voi(stored, ds), greyscale.apply_voi(stored, lut_only))
    assert np.abs(greyscale.apply_voi(stored, ds) - greyscale.window(stored, 100, 50)).max() > 0.5


def test_voi_lut_read_from_a_file_matches_pydicom(make_dicom, breast):
    # In a file LUTData is OW: raw little-endian words, not a list.
    item = Dataset()
    item.LUTDescriptor = [3000, 500, 12]
    item.LUTData = np.rint(4095 * (np.arange(3000) / 2999) ** 0.5).astype("<u2").tobytes()
    stored = breast()
    ds = pydicom.dcmread(make_dicom(stored, bits_stored=12, VOILUTSequence=[item]))
    assert isinstance(ds.VOILUTSequence[0].LUTData, bytes)
    ours = greyscale.apply_voi(greyscale.apply_rescale(stored, ds), ds)
    np.testing.assert_allclose(ours, apply_voi_lut(stored, ds) / 4095, rtol=0, atol=1e-6)


def test_min_max_without_window_or_lut():
    stored = np.arange(100, 1124, dtype=np.uint16).reshape(32, 32)
    unit = greyscale.apply_voi(stored, _voi_dataset())
    np.testing.assert_allclose(unit, (stored - 100) / 1023.0, rtol=0, atol=1e-6)
    assert unit.min() == 0.0 and unit.max() == 1.0
    np.testing.assert_array_equal(greyscale.apply_voi(np.full((4, 4), 7, np.uint16), _voi_dataset()), 0.0)


# --- orientation ----------------------------------------------------------------------------------


def _thirds(image: np.ndarray) -> tuple[float, float]:
    third = image.shape[1] // 3
    return float(image[:, :third].mean()), float(image[:, -third:].mean())


@pytest.mark.parametrize("shape", [(300, 240), (601, 499)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_right_breast_is_flipped_onto_the_left_breast(make_dicom, breast, shape):
    stored = breast(*shape)
    cfg = PreprocessConfig(size=128, reduce=False)
    left, left_info = preprocess.load(make_dicom(stored, bits_stored=12, ImageLaterality="L"), cfg)
    right, right_info = preprocess.load(make_dicom(stored[:, ::-1], bits_stored=12, ImageLaterality="R"), cfg)
    assert (left_info.laterality, left_info.flipped) == ("L", False)
    assert (right_info.laterality, right_info.flipped, right_info.laterality_source) == ("R", True, "tag")
    w = shape[1]
    y0, y1, x0, x1 = left_info.crop_box
    assert right_info.crop_box == (y0, y1, w - x1, w - x0)  # the crop box is mirrored too
    np.testing.assert_array_equal(left, right)


def test_laterality_falls_back_to_the_series_laterality_tag(make_dicom, breast):
    _, info = preprocess.load(make_dicom(breast()[:, ::-1], Laterality="R"), SMALL)
    assert (info.laterality, info.laterality_source, info.flipped) == ("R", "tag", True)


@pytest.mark.parametrize("laterality", ["L", "R", None])
def test_patient_orientation_decides_the_flip(make_dicom, breast, laterality):
    stored = breast()
    tags = {"ImageLaterality": laterality} if laterality else {}
    reference, _ = preprocess.load(make_dicom(stored, bits_stored=12), SMALL)
    # Row direction posterior: the chest wall is on the right edge, whatever the laterality says.
    flipped, info = preprocess.load(
        make_dicom(stored[:, ::-1], bits_stored=12, PatientOrientation=["P", "L"], **tags), SMALL
    )
    assert info.flipped
    np.testing.assert_array_equal(flipped, reference)
    # Row direction anterior: the chest wall is already on the left.
    kept, info = preprocess.load(make_dicom(stored, bits_stored=12, PatientOrientation=["A", "R"], **tags), SMALL)
    assert not info.flipped
    np.testing.assert_array_equal(kept, reference)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [(["A", "R"], ("L", "orientation")), (["P", "FL"], ("R", "orientation")), (["A", "F"], ("L", "pixels"))],
    ids=["left-cc", "right-mlo", "mlo-without-side"],
)
def test_laterality_from_patient_orientation_when_no_tag_says(make_dicom, breast, orientation, expected):
    # A left breast's columns run towards the patient's right; an MLO's "F" alone names no side.
    stored = breast() if orientation[0] == "A" else breast()[:, ::-1]
    _, info = preprocess.load(make_dicom(stored, PatientOrientation=orientation), SMALL)
    assert (info.laterality, info.laterality_source) == expected


def test_info_names_the_manufacturer_and_model(make_dicom, breast):
    path = make_dicom(breast(), Manufacturer="HOLOGIC, Inc.", ManufacturerModelName="Selenia Dimensions")
    _, info = preprocess.load(path, SMALL)
    assert (info.manufacturer, info.manufacturer_model) == ("HOLOGIC, Inc.", "Selenia Dimensions")
    assert tuple(info.to_dict())[: len(preprocess.IDENTITY_KEYS)] == preprocess.IDENTITY_KEYS


def test_laterality_from_pixels_when_no_tag_says(make_dicom, breast):
    stored = breast()
    for pixels, laterality in ((stored, "L"), (stored[:, ::-1], "R")):
        image, info = preprocess.load(make_dicom(pixels, bits_stored=12), SMALL)
        assert (info.laterality, info.laterality_source, info.flipped) == (laterality, "pixels", laterality == "R")
        left, right = _thirds(image)
        assert left > 2 * right + 20, (laterality, left, right)  # the chest wall (tissue mass) on the left


def test_orient_false_keeps_the_pixels_as_stored(make_dicom, breast):
    path = make_dicom(breast()[:, ::-1], bits_stored=12, ImageLaterality="R")
    kept, info = preprocess.load(path, PreprocessConfig(size=64, reduce=False, orient=False))
    flipped, _ = preprocess.load(path, PreprocessConfig(size=64, reduce=False))
    assert not info.flipped
    y0, y1, x0, x1 = info.crop_box
    width = round((x1 - x0) * 64 / max(y1 - y0, x1 - x0))  # the cropped breast, left-aligned, then padding
    assert _grey_diff(kept[:, :width], flipped[:, :width][:, ::-1]) <= 1
    assert not kept[:, width:].any()


# --- transfer syntaxes ----------------------------------------------------------------------------


def _gdcm_transcode(src: Path, dst: Path, syntax: str) -> Path:
    gdcm = pytest.importorskip("gdcm", reason="python-gdcm writes the JPEG Lossless test files")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        pytest.skip(f"gdcm could not read its input {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        pytest.skip(f"this gdcm build cannot encode transfer syntax {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        pytest.skip(f"gdcm could not write {dst}")
    return dst


LOSSLESS = [
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLosslessP14,
]


@pytest.fixture
def native_reference(make_dicom, breast) -> tuple[np.ndarray, Path, dict[bool, np.ndarray]]:
    """A 512x400 12-bit breast, uncompressed, and its canonical images at S=64 without and with reduce."""
    stored = breast(512, 400)
    path = make_dicom(stored, name="native.dcm", bits_stored=12)
    images = {reduce: preprocess.load(path, PreprocessConfig(size=64, reduce=reduce))[0] for reduce in (False, True)}
    return stored, path, images


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
def test_lossless_syntaxes_give_the_same_canonical_image(make_dicom, native_reference, tmp_path, syntax):
    stored, native_path, reference = native_reference
    if syntax in (JPEGLosslessSV1, JPEGLosslessP14):
        path = _gdcm_transcode(native_path, tmp_path / "jpeg-lossless.dcm", syntax)
    else:
        path = make_dicom(stored, syntax=syntax, bits_stored=12)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == syntax
    if syntax == DeflatedExplicitVRLittleEndian:
        assert stored.tobytes()[:64] not in path.read_bytes()  # really deflated
    full, info = preprocess.load(path, PreprocessConfig(size=64, reduce=False))
    assert info.transfer_syntax == syntax and info.reduce_level == 0
    np.testing.assert_array_equal(full, reference[False])
    # Reduced: level 2 here; JPEG 2000 takes the wavelet's own low-pass, the rest the emulation
    # (measured: at most 1 grey level apart).
    reduced, info = preprocess.load(path, PreprocessConfig(size=64, reduce=True))
    assert info.reduce_level == 2
    assert info.decode_route.startswith("pillow-j2k" if syntax == JPEG2000Lossless else ("pydicom", "gdcm"))
    assert _grey_diff(reduced, reference[True]) <= 2


def test_jpeg_baseline_8bit(make_dicom, breast):
    stored = (breast() >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
    jpeg = make_dicom(stored, syntax=JPEGBaseline8Bit, frame=buffer.getvalue())
    native = make_dicom(stored)
    pixels = dicom.read(jpeg).decode(0)[0]
    assert pixels.shape == stored.shape and np.abs(pixels - stored).mean() < 1.5  # lossy, but close
    image, info = preprocess.load(jpeg, SMALL)
    reference, _ = preprocess.load(native, SMALL)
    assert info.transfer_syntax == JPEGBaseline8Bit
    # Quality 95 leaves 0.7 DN of 255 per pixel on average (7 at worst), and shifts min-max a little;
    # the resize to 64 averages most of it out (measured: 3 grey levels at most).
    assert _grey_diff(image, reference) <= 4


# --- plain images ---------------------------------------------------------------------------------


def test_plain_images_take_the_same_route(make_dicom, breast, tmp_path):
    stored = breast()
    eight = (stored >> 4).astype(np.uint8)
    eight[0, 0], eight[150, 20] = 0, 255  # spans 0..255, so 8-bit (/255) and DICOM (min-max) agree
    files = {}
    for name, pixels in (
        ("eight.png", eight),
        ("eight.pgm", eight),
        ("sixteen.png", stored),
        ("sixteen.pgm", stored),
        ("sixteen.tif", stored),
        ("sixteen.tiff", stored),
    ):
        assert cv2.imwrite(str(tmp_path / name), pixels)
        files[name] = tmp_path / name
    for reduce in (False, True):
        # Version 2 takes min-max on both (version 3 divides a 16-bit file by the depth its values use).
        cfg = PreprocessConfig(version=2, size=64, reduce=reduce)
        # No BitsStored in a PNG: 16 bits nominal, which is where the low-pass overshoot is clipped.
        dicom16, _ = preprocess.load(make_dicom(stored, bits_stored=16), cfg)
        dicom8, _ = preprocess.load(make_dicom(eight), cfg)
        images = {}
        for name, path in files.items():
            images[name], info = preprocess.load(path, cfg)
            assert info.decode_route == ("opencv:lowpass1" if reduce else "opencv")
            assert info.laterality_source == "pixels"
            assert (info.rows, info.cols, info.laterality) == (300, 240, "L")
        for name, image in images.items():
            np.testing.assert_array_equal(image, images["eight.png" if name.startswith("eight") else "sixteen.png"])
        np.testing.assert_array_equal(images["sixteen.png"], dicom16)
        if reduce:
            # An 8-bit file is display-ready (/255), DICOM takes min-max: equal at full resolution,
            # where the image spans 0..255; after the low-pass it no longer quite does.
            assert _grey_diff(images["eight.png"], dicom8) <= 2
        else:
            np.testing.assert_array_equal(images["eight.png"], dicom8)


def test_unreadable_plain_image_is_a_typed_error(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    empty = tmp_path / "empty.png"
    empty.touch()
    for path, reason in ((broken, Reason.CORRUPT_PIXELS), (empty, Reason.EMPTY_FILE)):
        with pytest.raises(UnusableFile) as caught:
            preprocess.load(path, SMALL)
        assert caught.value.reason is reason and caught.value.status == "error"


# --- crop -----------------------------------------------------------------------------------------


def test_burnt_in_marker_is_left_out_of_the_crop(make_dicom, breast):
    stored = breast(400, 320)
    cfg = PreprocessConfig(size=64, reduce=False)
    _, clean = preprocess.load(make_dicom(stored, bits_stored=12), cfg)
    stored[360:385, 285:310] = 4095  # a label in the far corner of the background
    path = make_dicom(stored, bits_stored=12)
    _, info = preprocess.load(path, cfg)
    y0, y1, x0, x1 = info.crop_box
    assert info.crop_box == clean.crop_box and x1 < 285
    # The breast, radius 168 about (200, 0), and the 2% margin (8 px).
    assert x0 == 0 and abs(x1 - 176) <= 3 and abs(y0 - 24) <= 3 and abs(y1 - 376) <= 3
    _, info = preprocess.load(path, PreprocessConfig(size=64, reduce=False, crop=False))
    assert info.crop_box == (0, 400, 0, 320)


def test_canonical_image_is_square_uint8_with_the_breast_left_aligned(make_dicom, breast):
    image, info = preprocess.load(make_dicom(breast(300, 240), bits_stored=12), PreprocessConfig(size=96))
    assert image.shape == (96, 96) and image.dtype == np.uint8
    assert image.max() > 200 and image[:, 0].mean() > 64  # the chest wall touches the left edge
    assert info.rows == 300 and info.cols == 240 and info.sop_uid and info.patient_id == "P0001"


# --- real mammograms ------------------------------------------------------------------------------

# WG04 MG1 has no CSV row: what its SOURCES.md entry and header say.
_MG1 = {"patient_id": "3MG1", "image_id": "5457", "laterality": "L", "view": "MLO"}


@pytest.fixture(scope="session")
def real_labels(real_mammo) -> dict[str, dict[str, str]]:
    rows = {}
    for name in ("included_train_labels.csv", "included_test_metadata.csv"):
        with open(real_mammo / "rsna-kaggle-labels" / name, newline="") as fh:
            rows.update({row["local_file"]: row for row in csv.DictReader(fh)})
    return rows


@pytest.mark.parametrize("name", REAL_FILES, ids=lambda p: Path(p).name)
def test_real_mammograms(real_mammo, real_labels, name):
    expected = real_labels[name] if name.startswith("rsna") else _MG1
    image, info = preprocess.load(real_mammo / name)
    assert image.shape == PreprocessConfig().shape == (736, 352) and image.dtype == np.uint8
    assert info.patient_id == expected["patient_id"]
    assert info.sop_uid.endswith("." + expected["image_id"])
    assert (info.laterality, info.laterality_source) == (expected["laterality"], "tag")
    has_view_tag = "ViewPosition" in pydicom.dcmread(real_mammo / name, stop_before_pixels=True)
    assert info.view == (expected["view"] if has_view_tag else "")  # the RSNA test files carry no view
    assert info.flipped == (expected["laterality"] == "R")
    if name.endswith("MG1_JPLY"):
        assert info.decode_route.startswith("gdcm")  # 12-bit JPEG Extended: pydicom's plugins cannot
    left, right = _thirds(image)
    assert left > 1.5 * right + 10, (left, right)  # the breast against the left edge (it fills the width)


# --- harmonisation and the route's version --------------------------------------------------------


def _phantom(tmp_path: Path, draw: int, density: str) -> Path:
    """One machine's left CC phantom of ``density`` (dens.synth), drawn from the same random draws."""
    from dens.synth.image import write_image
    from dens.synth.spec import MACHINES, ImageSpec

    machine = MACHINES[0]
    uid = f"1.2.826.0.1.{draw}"
    spec = ImageSpec(
        key=(7, draw, 0), path=f"{draw}-{density}.dcm", patient_id=f"P{draw}", accession=f"A{draw}",
        study_uid=uid, series_uid=f"{uid}.1", sop_uid=f"{uid}.1.{ord(density)}", laterality="L", view="CC",
        density=density, fraction={"A": 0.08, "D": 0.85}[density], size=0.8, age=55, study_date="20240101",
        machine=machine, rows=machine.small[0], cols=machine.small[1], syntax="1.2.840.10008.1.2.1",
        photometric="MONOCHROME2", orientation_tag=True, laterality_tag=True,
    )  # fmt: skip
    write_image(tmp_path, spec)
    return tmp_path / spec.path


def _mean_in_breast(image: np.ndarray) -> float:
    mask, _ = geometry.breast_mask(image.astype(np.float32) / 255.0)
    return float(cv2.resize(image, mask.shape[::-1], interpolation=cv2.INTER_AREA)[mask].mean())


@pytest.mark.parametrize("draw", [0, 1, 2])
def test_harmonisation_keeps_a_dense_breast_above_a_fatty_one(tmp_path, draw):
    """Phantoms of known density (dens.synth, one machine, the same draws): after harmonisation the D
    phantom's mean in-breast grey stays clearly above the A phantom's, and keeps most of the gap VOI gave."""
    cfgs = {"v1": PreprocessConfig(version=1, size=128, reduce=False), "v2": PreprocessConfig(reduce=False)}
    mean = {
        (density, route): _mean_in_breast(preprocess.load(_phantom(tmp_path, draw, density), cfg)[0])
        for density in "AD"
        for route, cfg in cfgs.items()
    }
    gap = {route: mean["D", route] - mean["A", route] for route in cfgs}
    assert gap["v2"] >= 15 and gap["v2"] >= 0.6 * gap["v1"], (mean, gap)


def test_harmonise_maps_the_in_breast_range_with_a_capped_gain():
    unit = np.linspace(0, 1, 101, dtype=np.float32)
    out = preprocess.harmonise(unit, 0.2, 0.6)  # gain 0.8 / 0.4 = 2
    assert out[20] == pytest.approx(0.1) and out[60] == pytest.approx(0.9) and out[0] == 0.0
    assert np.all(np.diff(out) >= 0)  # one monotone map: the order of greys is kept
    narrow = preprocess.harmonise(unit, 0.30, 0.35)  # a fatty breast with little above fat: gain 4, not 16
    assert narrow[35] == pytest.approx(0.1 + 4 * 0.05, abs=1e-6)


def test_an_old_config_without_version_keeps_its_square_route():
    old = {"size": 256, "reduce": True, "max_reduce_levels": 5, "crop": True, "crop_margin": 0.02, "orient": True}
    cfg = PreprocessConfig.from_dict(old)
    assert cfg.version == 1 and cfg.shape == (256, 256) and cfg.to_dict() == old  # and so its cache key
    new = PreprocessConfig()
    assert new.version == 3 and new.shape == (736, 352) and PreprocessConfig.from_dict(new.to_dict()) == new
    fitted = new.fitted((("plain/8-bit", 0.1, 0.8), ("*", 0.1, 0.8)))
    assert PreprocessConfig.from_dict(fitted.to_dict()) == fitted and fitted.key() != new.key()
    assert fitted.unfitted() == new
    v2 = PreprocessConfig(version=2)
    assert "families" not in v2.to_dict() and PreprocessConfig.from_dict(v2.to_dict()) == v2
    assert PreprocessConfig(size=64).shape == (64, 64)
    with pytest.raises(ValueError, match="version 4"):
        PreprocessConfig.from_dict({**new.to_dict(), "version": 4})
    with pytest.raises(ValueError, match="family grey maps"):
        PreprocessConfig(version=2, families={"*": [0.1, 0.8]})
    with pytest.raises(ValueError, match="fat < dense"):
        PreprocessConfig(families={"*": [0.8, 0.1]})
    with pytest.raises(ValueError, match="square"):
        PreprocessConfig(version=1, height=512, width=256)


def test_version_1_is_the_route_it_was(make_dicom, breast):
    """An old model's route: the square canvas and the VOI output as they were (no harmonisation)."""
    path = make_dicom(breast(300, 240), bits_stored=12)
    old, _ = preprocess.load(path, PreprocessConfig(version=1, size=96, reduce=False, crop=False))
    new, _ = preprocess.load(path, PreprocessConfig(version=2, size=96, reduce=False, crop=False))
    assert old.shape == new.shape == (96, 96) and not np.array_equal(old, new)
    unit = greyscale.min_max(pydicom.dcmread(path).pixel_array)  # no window: min-max is the VOI
    expected = np.rint(geometry.fit_to_canvas(unit, 96, 96) * 255).astype(np.uint8)
    assert _grey_diff(old, expected) <= 1
