"""The guard on real pixels: the canonical image keeps density on real labelled mammograms.

Every labelled set the team holds (DENS_REAL_LABELLED: folders with labels.csv, separated by os.pathsep; by
default the DDSM films beside the checkout) goes through versions 1 and 3 of the route, and two proxies for
density on the model's input (bench/real_proxies.py: the in-breast median grey and the fraction of the breast
above a fixed grey) must rank the images by their density label at least as well with version 3 as with
version 1, and positively. On the real DICOM samples of several vendors, version 3's family lines put every
vendor's breast on a similar grey range, as version 2's per-image stretch did, and version 1 did not.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL_J2K
from dens.route import families, preprocess
from dens.route.config import PreprocessConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_proxies  # (bench/real_proxies.py: the proxies, measured the same way there and here)

DEFAULT_SET = Path(__file__).resolve().parents[2] / "shared/data/real-labelled-ddsm"
SETS = real_proxies.labelled_sets(default=DEFAULT_SET)
# A rank correlation over about a hundred images moves by more than this when one image's crop changes by a
# few pixels: version 3 may not fall below version 1 by more.
TOLERANCE = 0.02


@pytest.fixture(scope="module", params=SETS or [None], ids=lambda p: p.parent.name if p else "none")
def measured(request) -> dict:
    if request.param is None:
        pytest.skip(
            f"no real labelled mammograms at {DEFAULT_SET}: set {real_proxies.ENV} to folders holding labels.csv"
        )
    return real_proxies.measure(request.param, versions=(1, 3))


@pytest.mark.parametrize("proxy", ["median", "fraction"])
def test_version_3_keeps_the_density_signal_of_version_1(measured, proxy):
    v1, v3 = (measured["versions"][v][proxy]["spearman"] for v in ("1", "3"))
    assert v3 > 0, f"{measured['set']}: version 3's {proxy} no longer rises with density ({v3:.3f})"
    assert v3 >= v1 - TOLERANCE, f"{measured['set']}: version 3's {proxy} {v3:.3f} fell below version 1's {v1:.3f}"


def test_the_proxies_see_density_at_all(measured):
    """The guard means something only if the proxies separate the classes on this set: D above A."""
    medians = measured["versions"]["3"]["median"]["class_medians"]
    assert medians["D"] > medians["A"], medians


def _in_breast_range(image: np.ndarray) -> tuple[float, float]:
    p2, p98 = np.percentile(real_proxies.in_breast(image), [2, 98])
    return float(p2), float(p98)


def test_every_vendor_lands_on_a_similar_range(real_mammo):
    """Lines fitted per family on these files (one image is enough here): each vendor's typical breast spans
    about the same greys, where version 1 left Hologic's SIGMOID images in the lower half."""
    loaded = [preprocess.load(real_mammo / name, PreprocessConfig()) for name in REAL_J2K]
    fitted = families.fit(((info.family, info.breast_levels) for _, info in loaded), min_images=1)
    ranges: dict[str, list[tuple[float, float]]] = {}
    for image, info in loaded:
        table, how = families.lookup(fitted, info.family)
        assert how == families.FAMILY
        ranges.setdefault(info.family, []).append(_in_breast_range(table[image]))
    assert len(ranges) >= 2, ranges  # several vendors, or the test shows nothing
    typical = {
        f: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for f, rs in ranges.items()
    }
    for family, (p2, p98) in typical.items():
        assert 10 <= p2 <= 60 and 180 <= p98 <= 245, (family, p2, p98)
    v1 = {
        name: _in_breast_range(preprocess.load(real_mammo / name, PreprocessConfig(version=1))[0]) for name in REAL_J2K
    }
    spread = max(t[1] for t in typical.values()) - min(t[1] for t in typical.values())
    spread_v1 = max(r[1] for r in v1.values()) - min(r[1] for r in v1.values())
    assert spread <= 45 < spread_v1, (typical, v1)


def test_a_set_is_named_by_its_folder_only(measured):
    """Results and failures name a set by its folder's name, never by where it lives."""
    assert os.sep not in measured["set"] and measured["images"] >= 20
