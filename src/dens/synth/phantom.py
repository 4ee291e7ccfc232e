"""The synthetic breast that :mod:`dens.synth.image` writes into DICOM files: one view drawn at a small height, chest
wall on the left, with a skin line, a nipple, the pectoral muscle on MLO and fibroglandular tissue whose
amount and texture follow the density class; and the burnt-in corner label archives carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dens.labels import CLASSES
from dens.synth.spec import ImageSpec

RENDER_ROWS = 512  # anatomy is drawn at this height and upsampled: full size is not dominated by drawing
# Texture per class: fatty breasts show thin strands converging on the nipple, dense ones confluent blobs.
_BLOB_SIGMA = (0.010, 0.014, 0.020, 0.028)  # of the rendered height
_STREAK_WEIGHT = (0.75, 0.6, 0.4, 0.25)


@dataclass
class Rendered:
    """A drawn breast, chest wall on the left: intensity in [0, 1] (tissue bright) and its masks."""

    image: np.ndarray
    breast: np.ndarray  # everything that is not background
    region: np.ndarray  # where fibroglandular tissue may lie (the breast less muscle)
    gland: np.ndarray  # the fibroglandular tissue


def _field(rng: np.random.Generator, shape: tuple[int, int], sx: float, sy: float | None = None) -> np.ndarray:
    """Smoothed white noise with zero mean and unit spread."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), sx, sigmaY=sy or sx)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def render(rng: np.random.Generator, spec: ImageSpec, rows: int = RENDER_ROWS) -> Rendered:
    """Draw the anatomy of one view at ``rows`` height, chest wall on the left."""
    c = CLASSES.index(spec.density)
    h, w = rows, max(8, round(rows * spec.cols / spec.rows))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mlo = spec.view == "MLO"
    a = w * spec.size * rng.uniform(0.78, 0.92)
    b = h * spec.size * (rng.uniform(0.50, 0.58) if mlo else rng.uniform(0.42, 0.5))
    cy = h * (rng.uniform(0.52, 0.6) if mlo else rng.uniform(0.45, 0.55))
    angle = np.arctan2(yy - cy, xx + 1.0)
    wobble = 1.0 + sum(rng.uniform(-0.04, 0.04) * np.sin(k * angle + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    rho = np.sqrt((xx / a) ** 2 + ((yy - cy) / b) ** 2) / wobble
    breast = rho <= 1.0
    pectoral = np.zeros_like(breast)
    if mlo:  # the muscle is a triangle from the top of the chest wall, its edge slightly bowed
        pw, ph = w * rng.uniform(0.25, 0.42), h * rng.uniform(0.45, 0.75)
        pectoral = (xx / pw) ** rng.uniform(0.85, 1.2) + yy / ph < 1.0
        breast |= pectoral
    # Nipple: a small disk at the tip of the breast, partly in profile.
    xn, rn = a * float(wobble[int(cy), min(w - 1, int(a))]), h * rng.uniform(0.012, 0.02)
    breast |= (xx - xn) ** 2 + (yy - cy) ** 2 <= rn**2
    region = breast & ~pectoral & (rho <= 1.0)
    # The compressed breast thins towards its edge: the last stretch before the skin is darker.
    thick = np.clip((1.0 - rho) / rng.uniform(0.08, 0.16), 0.0, 1.0) ** 0.5
    fat = rng.uniform(0.22, 0.42)
    image = breast * fat * (0.45 + 0.55 * thick)
    # Fibroglandular tissue: isotropic blobs mixed with streaks converging on the nipple, biased to the
    # middle of the breast, thresholded to the exam's fraction with a soft edge.
    blob = _field(rng, (h, w), h * _BLOB_SIGMA[c] * rng.lognormal(0, 0.2))
    polar = _field(rng, (256, 96), 6.0, 1.2)  # rows: angle around the nipple, cols: distance from it
    warp = 3.0 * _field(rng, (h, w), h * 0.06)  # bends the strands so they do not form a perfect star
    phi = (np.arctan2(yy - cy, xn - xx) + np.pi) / (2 * np.pi) * 255 + warp
    dist = np.sqrt((xx - xn) ** 2 + (yy - cy) ** 2) / max(a, b) * 95 + warp
    streak = cv2.remap(polar, dist.astype(np.float32), phi.astype(np.float32), cv2.INTER_LINEAR)
    s = float(np.clip(_STREAK_WEIGHT[c] + rng.normal(0, 0.1), 0.0, 1.0))
    prior = np.exp(-((((xx / a) - 0.5) / 0.35) ** 2)) * np.clip((1.0 - rho) / 0.25, 0.0, 1.0)
    field = (1 - s) * blob + s * streak + 1.5 * prior
    threshold = np.quantile(field[region], 1.0 - spec.fraction)
    gland = region & (field > threshold)
    soft = region / (1.0 + np.exp(-(field - threshold) / rng.uniform(0.2, 0.45)))
    lobes = 0.75 + 0.25 * _field(rng, (h, w), h * 0.01)  # dense tissue is not one flat grey
    image += rng.uniform(0.22, 0.45) * soft * lobes * (0.4 + 0.6 * thick)
    image += 0.03 * _field(rng, (h, w), 1.0) * breast  # fine parenchymal mottle
    if mlo:
        image += pectoral * (fat + rng.uniform(0.2, 0.4) * (1.0 - 0.4 * yy / h))
    dist_in = cv2.distanceTransform(breast.astype(np.uint8), cv2.DIST_L2, 3)
    image += ((dist_in > 0) & (dist_in < 2.5)) * rng.uniform(0.05, 0.1)  # skin line
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.8)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.75, 1.35)
    return Rendered(image.astype(np.float32), breast, region, gland)


def add_marker(rng: np.random.Generator, image: np.ndarray, breast: np.ndarray) -> None:
    """Burn a text-like label into a background corner away from the chest wall, as archives do."""
    h, w = image.shape
    mh, mw = max(3, h // 40), max(8, w // 10)
    y0 = int(rng.choice((h // 50, h - h // 50 - mh)))
    x0 = w - w // 40 - mw
    margin = max(2, h // 50)
    if breast[max(0, y0 - margin) : y0 + mh + margin, max(0, x0 - margin) :].any():
        return
    glyphs = (rng.random((3, 12)) < 0.6).astype(np.float32)
    image[y0 : y0 + mh, x0 : x0 + mw] = cv2.resize(glyphs, (mw, mh), interpolation=cv2.INTER_NEAREST) * 0.95
