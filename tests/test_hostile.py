"""Hostile files cost their own row, decided from the header before any pixel byte is read: a file that
claims a huge image, hides another codestream, carries a tomosynthesis stack or is no DICOM at all is refused
in a fresh process as a decode worker runs it, reading little and allocating nothing large; every failing
file whose header was read keeps its identity. The files are bench/hostile.py's, which measures their cost."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from dens.engine import DecodePool
from dens.route import preprocess
from dens.route.config import PreprocessConfig
from dens.route.errors import Reason, UnusableFile
from dens.route.preprocess import IDENTITY_KEYS

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Peak RSS a refused file may add to a worker's (its imports): no decode buffer, no pixel data.
REFUSED_PEAK_MIB = 50
# Bytes a refused file may cause to be read: its header and a frame's first bytes, never its pixel data.
REFUSED_READ = 1 << 20


@pytest.fixture(scope="module")
def bench_hostile():
    """bench/hostile.py as a module: the hostile files and the one-file cost the benchmark records."""
    spec = importlib.util.spec_from_file_location("bench_hostile", BENCH / "hostile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hostile(bench_hostile, tmp_path_factory) -> dict[str, Path]:
    return bench_hostile.make_hostile(tmp_path_factory.mktemp("hostile"))


def _cost(bench_hostile, path: Path) -> dict:
    cost = bench_hostile.file_cost(path)
    assert "reason" in cost, cost  # the child process ran to its end
    return cost


def test_a_large_file_of_zeros_is_told_from_its_first_bytes(bench_hostile, hostile):
    # A forced dcmread read all 256 MB (85 s); the first bytes say it is no DICOM.
    cost = _cost(bench_hostile, hostile["zeros_256mb"])
    assert (cost["status"], cost["reason"].split(":")[0]) == ("skipped", Reason.NOT_DICOM.value)
    assert cost["bytes_read"] < REFUSED_READ, cost


def test_a_header_claiming_60000x60000_over_100_kb_is_refused_from_the_header(bench_hostile, hostile):
    # pydicom refused it, then GDCM allocated 8.6 GB for 21 s before refusing it too.
    cost = _cost(bench_hostile, hostile["native_60000x60000"])
    assert cost["reason"] == (
        "corrupt_pixel_data: the header declares 60000x60000 (rows x columns) at 16 bits (7,200,000,000 bytes) "
        "but the pixel data holds 100,000 bytes"
    )
    assert cost["peak_over_imports_mib"] < REFUSED_PEAK_MIB, cost


def test_the_same_header_over_a_jpeg_2000_codestream_is_refused_before_decoding(bench_hostile, hostile):
    # The shape was checked only after decoding, and not at all on the JPEG 2000 route: status ok.
    cost = _cost(bench_hostile, hostile["j2k_header_60000x60000"])
    assert cost["status"] == "error" and cost["reason"] == (
        "corrupt_pixel_data: the header says 60000x60000 (rows x columns), the JPEG 2000 codestream is "
        "300x240 (rows x columns)"
    )
    assert cost["peak_over_imports_mib"] < REFUSED_PEAK_MIB, cost


def test_a_codestream_claiming_60000x60000_is_over_the_memory_budget(bench_hostile, hostile):
    # Header and codestream agree: only the size tells, against the budget a worker decodes under.
    cost = _cost(bench_hostile, hostile["j2k_codestream_60000x60000"])
    assert cost["status"] == "error" and cost["reason"].startswith("over_memory_budget: decoding 60000x60000")
    assert cost["peak_over_imports_mib"] < REFUSED_PEAK_MIB, cost


def test_a_1000_frame_file_is_skipped_from_its_header(bench_hostile, hostile):
    # Its 2 GB of pixel data were read (per worker) before the frame count was looked at.
    cost = _cost(bench_hostile, hostile["dbt_1000_frames_2gb"])
    assert (cost["status"], cost["reason"]) == ("skipped", "multi_frame: 1000 frames (tomosynthesis?)")
    assert cost["bytes_read"] < REFUSED_READ and cost["peak_over_imports_mib"] < REFUSED_PEAK_MIB, cost


def test_a_jp2_file_under_jpeg_lossless_is_diagnosed(hostile):
    # The reason was "Unable to decode as exceptions were raised by all available plugins:; gdcm: ...".
    with pytest.raises(UnusableFile) as caught:
        preprocess.load(hostile["jp2_under_jpeg_lossless"], PreprocessConfig(size=64))
    assert caught.value.reason is Reason.CORRUPT_PIXELS
    assert caught.value.detail == (
        "the transfer syntax says JPEG Lossless SV1, the codestream is JPEG 2000 (JP2 box); the header says "
        "2294x1914 (rows x columns), the JPEG 2000 (JP2 box) codestream is 300x240 (rows x columns)"
    )


def test_every_failing_file_whose_header_was_read_keeps_its_identity(bench_hostile, hostile, make_dicom, breast):
    names = ["native_60000x60000", "jp2_under_jpeg_lossless", "dbt_1000_frames_2gb", "zeros_256mb"]
    biopsy = make_dicom(breast(), SeriesDescription="MAMMO STEREOTACTIC BREAST BIOPSY LEFT W SPECIMEN AND CLIP")
    with DecodePool(2, PreprocessConfig(size=64)) as pool:
        results = {d.path: d for d in pool.map([(str(hostile[n]), "") for n in names] + [(str(biopsy), "")])}
    for name in names[:3]:
        info = results[str(hostile[name])].info
        assert info is not None and tuple(info) == IDENTITY_KEYS, name
        assert (info["patient_id"], info["accession"], info["laterality"], info["laterality_source"]) == (
            bench_hostile.PATIENT_ID,
            "ACC-HOSTILE",
            "L",
            "tag",
        )
        assert (info["manufacturer"], info["view"], info["path"]) == ("GE MEDICAL SYSTEMS", "CC", str(hostile[name]))
        assert info["sop_uid"] and info["study_uid"] and info["series_uid"]
    assert results[str(hostile["native_60000x60000"])].info["rows"] == 60000
    assert results[str(hostile["zeros_256mb"])].info is None  # no header: nothing to say
    skipped = results[str(biopsy)]
    assert (skipped.status, skipped.code) == ("skipped", Reason.NOT_SCREENING.value)
    assert skipped.info["patient_id"] == "P0001" and skipped.info["sop_uid"]


@pytest.mark.parametrize(
    "tags",
    [
        {"SeriesDescription": "MAMMO STEREOTACTIC BREAST BIOPSY LEFT W SPECIMEN AND CLIP"},
        {"StudyDescription": "MAMMO NEEDLE LOCALIZATION RIGHT"},
        {"RequestedProcedureDescription": "Specimen radiograph"},
        {"SeriesDescription": "Hookwire localisation L"},
    ],
    ids=["biopsy-series", "localization-study", "specimen-procedure", "hookwire-series"],
)
def test_images_of_a_procedure_are_not_screening(make_dicom, breast, tags):
    with pytest.raises(UnusableFile) as caught:
        preprocess.load(make_dicom(breast(), **tags), PreprocessConfig(size=64))
    assert (caught.value.reason, caught.value.status) == (Reason.NOT_SCREENING, "skipped")
    keyword = next(iter(tags))
    assert caught.value.detail.startswith(f"{keyword} '{tags[keyword]}'")
    assert caught.value.identity["patient_id"] == "P0001"


def test_screening_descriptions_are_scored(make_dicom, breast):
    path = make_dicom(breast(), SeriesDescription="L CC", StudyDescription="MAMMO SCREENING BILAT W TOMO CAD")
    _, info = preprocess.load(path, PreprocessConfig(size=64))
    assert info.patient_id == "P0001"


def test_codec_output_on_a_frame_that_is_no_jpeg_stays_off_the_terminal(bench_hostile, tmp_path, capfd):
    # libjpeg prints "Not a JPEG file: starts with 0x00 0x00" on fd 2 for each decoder that tries.
    ds = bench_hostile._dataset(300, 240, JPEGBaseline8Bit, BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.PixelData = encapsulate([bytes(5000)])
    path = tmp_path / "zeros-as-jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    with DecodePool(1, PreprocessConfig(size=64)) as pool:
        [result] = pool.map([(str(path), "")])
    assert result.code == Reason.CORRUPT_PIXELS.value
    assert "the JPEG Baseline frame does not start like one (its first bytes: 00 00 00 00)" in result.reason
    assert "Unable to decode" not in result.reason and "NoneType" not in result.reason.split("(pydicom: ")[1][:20]
    assert "Not a JPEG file: starts with 0x00 0x00" in result.noise
    assert "JPEG" not in capfd.readouterr().err


def test_the_memory_budget_reaches_the_worker(make_dicom, breast):
    # 1200x1000 at 16 bits takes about 18 MiB to decode in full: over an 8 MiB budget, well within the default.
    path = str(make_dicom(breast(1200, 1000)))
    with DecodePool(1, PreprocessConfig(size=64), memory_budget=8 << 20) as pool:
        [refused] = pool.map([(path, "")])
    assert (refused.status, refused.code) == ("error", Reason.OVER_MEMORY_BUDGET.value), refused.reason
    assert "8 MiB" in refused.detail and refused.info["patient_id"] == "P0001"
    assert not Reason.OVER_MEMORY_BUDGET.is_verdict  # a larger budget decodes it: the cache tries again
    with DecodePool(1, PreprocessConfig(size=64)) as pool:
        [decoded] = pool.map([(path, "")])
    assert decoded.status == "ok", decoded.reason
