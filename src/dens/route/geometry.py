"""Where the breast is and where it goes: its mask on a thumbnail (labels, markers and film edges cut away), its
box, the side of the chest wall, and its place on the canvas. Pure numpy/OpenCV functions of arrays.
"""

from __future__ import annotations

import cv2
import numpy as np

from dens.route.config import VERSION

_MASK_SIDE = 256  # the breast is found on a thumbnail of this long side
# Film labels, rulers and film edges are cut from the breast by an opening this wide (of the thumbnail's long
# side): wider than a label's stroke or an edge strip, far narrower than any breast.
_CUT_FRACTION = 0.035


def breast_mask(unit: np.ndarray, version: int = VERSION) -> tuple[np.ndarray, float]:
    """The breast as the largest bright component on a thumbnail; returns (mask, thumbnail scale).

    Burnt-in markers and labels are separate components and drop out; so does speckle. On digitised film the
    label, the ruler and the film's bright unexposed edges often touch the breast or each other through thin
    strips, so (version 2) an opening as wide as a label's stroke cuts those strips before the largest
    component is taken, and a dilation of the same width, inside the threshold, gives the skin line back.
    """
    small, scale = thumbnail(unit)
    return mask_of(small, version), scale


def thumbnail(unit: np.ndarray) -> tuple[np.ndarray, float]:
    """``unit`` ([0, 1]) area-averaged to a long side of at most :data:`_MASK_SIDE` (float32), and its scale:
    what the breast mask and the in-breast grey levels are measured on, made once per image."""
    h, w = unit.shape
    scale = min(1.0, _MASK_SIDE / max(h, w))
    small = cv2.resize(unit, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return small, scale


def mask_of(small: np.ndarray, version: int = VERSION) -> np.ndarray:
    """:func:`breast_mask` on a :func:`thumbnail` already made: the mask, bool at the thumbnail's size."""
    thumb = np.clip(small * 255.0, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(thumb, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    below = thumb[thumb <= otsu]
    background = float(np.median(below)) if below.size else 0.0
    # Otsu alone can cut a fatty breast's periphery off; a threshold nearer the background keeps it.
    threshold = background + 0.25 * (otsu - background)
    bright = (thumb > threshold).astype(np.uint8)
    if version == 1:
        kernel = np.ones((3, 3), np.uint8)
    else:
        side = max(3, int(_CUT_FRACTION * max(thumb.shape)) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    # Version 3 opens with black beyond the image, so a strip along the border (a film's edge, a scanner's
    # frame) is as thin as it looks and goes; versions 1-2 took the border as bright, keeping such strips.
    border = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0} if version >= 3 else {}
    mask = cv2.morphologyEx(bright, cv2.MORPH_OPEN, kernel, **border)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    if version == 1:
        return largest.astype(bool)
    regrown = cv2.dilate(largest, kernel) & bright
    if version >= 3:
        # A film's bright unexposed edge runs along the image's border and touches the breast there: within a
        # kernel of the border only what survived the opening stays (the breast, not a strip along it).
        band = np.zeros_like(regrown)
        k = kernel.shape[0]
        band[:k], band[-k:], band[:, :k], band[:, -k:] = 1, 1, 1, 1
        regrown = np.where(band > 0, largest, regrown)
        regrown = _without_bright_edges(small, regrown, k)
    return regrown.astype(bool)


# A film's unexposed edge is near white and clearly brighter than the breast beside it.
_EDGE_GREY, _EDGE_STEP = 0.85, 0.08


def _without_bright_edges(small: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` without the rows (columns) along each image border whose mean in-breast grey is near white and
    brighter than the breast just inside it: a film edge lying along the breast (above an MLO's pectoral
    muscle), which the opening cannot tell from the breast because the breast continues under it. At most
    ``2k`` deep."""
    mask = mask.copy()
    if min(mask.shape) < 6 * k:
        return mask
    for axis in (0, 1):
        lines, inside = np.moveaxis(small, axis, 0), np.moveaxis(mask, axis, 0)
        for edge in (slice(0, 3 * k), slice(-1, -3 * k - 1, -1)):
            weight = inside[edge].astype(np.float32)
            # Each row's mean grey inside the breast (0 for a row without breast: darker than any edge).
            greys = (lines[edge] * weight).sum(1) / np.maximum(weight.sum(1), 1.0)
            beyond = float(np.median(greys[2 * k :]))
            edge_like = greys[: 2 * k] >= max(_EDGE_GREY, beyond + _EDGE_STEP)
            depth = int(np.argmin(edge_like)) if not edge_like.all() else 2 * k
            if depth:  # and the next two rows, half edge: the canvas's soft mask reaches beyond the mask
                rows = np.arange(inside.shape[0])[edge][: depth + 2]
                inside[rows] = False
    return mask


def crop_box(mask: np.ndarray, shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """The box ``(y0, y1, x0, x1)`` around the thumbnail's ``mask`` in an image of ``shape``, grown by ``margin``
    of its long side (the whole image when the mask is empty)."""
    h, w = shape
    if not mask.any():
        return 0, h, 0, w
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    pad = margin * max(h, w)
    # The thumbnail's own scale on each axis (its sides were rounded), so that a mirrored image
    # gets the mirrored box.
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    y0 = max(0, int(np.floor(ys[0] / sy - pad)))
    y1 = min(h, int(np.ceil((ys[-1] + 1) / sy + pad)))
    x0 = max(0, int(np.floor(xs[0] / sx - pad)))
    x1 = min(w, int(np.ceil((xs[-1] + 1) / sx + pad)))
    return y0, y1, x0, x1


def chest_wall_from_pixels(mask: np.ndarray) -> str:
    """'left' or 'right': the chest wall is the edge the breast leans on, where most tissue lies."""
    if not mask.any():
        return "left"
    cols = mask.sum(axis=0).astype(np.float64)
    third = max(1, len(cols) // 3)
    return "left" if cols[:third].sum() >= cols[-third:].sum() else "right"


def placement(h: int, w: int, height: int, width: int) -> tuple[int, int, int]:
    """Where :func:`fit_to_canvas` puts an ``h x w`` image: its resized height and width, and its top row."""
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    return nh, nw, (height - nh) // 2


def fit_to_canvas(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Aspect-preserving resize to fit ``height x width``, left-aligned (chest wall), vertically centred,
    zero-padded."""
    h, w = image.shape
    nh, nw, top = placement(h, w, height, width)
    interp = cv2.INTER_AREA if min(height / h, width / w) < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.zeros((height, width), dtype=image.dtype)
    canvas[top : top + nh, :nw] = resized
    return canvas


def breast_on_canvas(
    mask: np.ndarray,
    unit_shape: tuple[int, int],
    box: tuple[int, int, int, int],
    flipped: bool,
    canvas: tuple[int, int],
) -> np.ndarray:
    """The thumbnail's breast ``mask`` where :func:`fit_to_canvas` puts the cropped (and ``flipped``) image: a
    float32 ``canvas``-sized weight, 1 inside the breast, 0 outside, soft over a few thumbnail pixels at the skin
    line. Holes in the mask are filled first (a dark fat lobule is breast)."""
    filled = np.zeros(mask.shape, np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    # Grown by a thumbnail pixel and softened over two more: the skin line stays whole, and the mask's thumbnail
    # steps do not show as a staircase on the canvas.
    filled = cv2.GaussianBlur(cv2.dilate(filled, np.ones((3, 3), np.uint8)).astype(np.float32), (5, 5), 1.0)
    (uh, uw), (y0, y1, x0, x1) = unit_shape, box
    nh, nw, top = placement(y1 - y0, x1 - x0, *canvas)
    sy, sx = mask.shape[0] / uh, mask.shape[1] / uw
    # Canvas pixel -> crop pixel (cv2.resize's pixel-centre mapping) -> unit pixel -> thumbnail pixel.
    ky, kx = (y1 - y0) / nh, (x1 - x0) / nw
    ay, by = sy * ky, sy * (y0 + 0.5 * ky - top * ky) - 0.5
    if flipped:
        ax, bx = -sx * kx, sx * (x1 - 0.5 * kx) - 0.5
    else:
        ax, bx = sx * kx, sx * (x0 + 0.5 * kx) - 0.5
    to_thumb = np.array([[ax, 0.0, bx], [0.0, ay, by]], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    weight = cv2.warpAffine(filled, to_thumb, (canvas[1], canvas[0]), flags=flags, borderValue=0)
    weight[:top] = weight[top + nh :] = 0
    weight[:, nw:] = 0
    return weight
