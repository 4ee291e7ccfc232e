"""What a reviewer sees of one image: the display image in PACS orientation, its Grad-CAM overlay on one
page-wide scale, masked to the breast and labelled, and small WebP thumbnails for the page.

The display image is the model's own canonical image (:func:`dens.route.preprocess.load`, the crop, the grey
harmonisation), drawn on a canvas scaled up to at least :data:`DISPLAY_MIN` pixels tall
(:func:`display_config`), so the map lies where the model looked. The canonical image puts every chest wall
on the left; PACS hangs a right breast with its chest wall on the right, so right breasts are mirrored back
(:func:`as_displayed`), and their maps with them. Pure numpy/OpenCV: no files read or written here.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

from dens.route.config import PreprocessConfig
from dens.route.geometry import breast_mask

DISPLAY_MIN, DISPLAY_MAX = 512, 1024  # the display image's height, pixels
THUMB_HEIGHT = 320  # thumbnails: shown 160 CSS pixels tall, sharp on a 2x screen
# The page's images are WebP (every current browser shows it): about half a JPEG's bytes at the same look,
# which keeps a page of hundreds of exams mailable.
IMAGE_SUFFIX, IMAGE_MIME = ".webp", "image/webp"
THUMB_QUALITY = 80  # thumbnails
FIGURE_QUALITY = 85  # the overlay figures embedded in the page
COLORMAP, COLORMAP_NAME = cv2.COLORMAP_VIRIDIS, "viridis"  # perceptually uniform, readable in greyscale
# The map's weight over the breast grows with its value, from ALPHA_LOW (a tint: the tissue stays readable
# where the model looked little) to ALPHA_LOW + ALPHA_GAIN where it looked most.
ALPHA_LOW, ALPHA_GAIN = 0.2, 0.5
_HEADER_GREY, _TEXT = 24, (235, 235, 235)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def display_config(cfg: PreprocessConfig) -> PreprocessConfig:
    """The model's preprocessing on a canvas an integer multiple of its own, at least :data:`DISPLAY_MIN`
    and at most :data:`DISPLAY_MAX` tall (the model's canvas as it is when already in that range): the same
    crop and greys, enough pixels for a person."""
    scale = max(1, math.ceil(DISPLAY_MIN / cfg.height))
    while scale > 1 and cfg.height * scale > DISPLAY_MAX:
        scale -= 1
    if scale == 1:
        return cfg
    return dataclasses.replace(cfg, height=cfg.height * scale, width=cfg.width * scale)


def as_displayed(image: np.ndarray, laterality: str, cfg: PreprocessConfig) -> np.ndarray:
    """A canonical image (or a map over one) as PACS shows it: a right breast mirrored so that its chest
    wall is on the right; a left breast (and one of unknown side) as the canonical image has it, chest wall
    on the left. ``cfg.orient`` False: the canonical image kept the file's orientation; it is shown so."""
    if cfg.orient and str(laterality).strip().upper() == "R":
        return np.ascontiguousarray(image[:, ::-1])
    return image


def breast_weight(image: np.ndarray, version: int) -> np.ndarray:
    """Where the breast is in a display image (uint8 [H, W]): the preprocessing's own breast mask, brought
    to the image's size with a soft edge; float32 [H, W] in [0, 1]."""
    mask, _ = breast_mask(image.astype(np.float32) / 255.0, version)
    if not mask.any():
        return np.ones(image.shape, np.float32)
    h, w = image.shape
    weight = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    edge = max(3, (h // 128) | 1)
    return np.clip(cv2.GaussianBlur(weight, (edge, edge), 0), 0.0, 1.0)


def upsample(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map at the model's input size onto ``shape`` (height, width): bicubic, clipped to [0, 1]."""
    if cam.shape != tuple(shape):
        cam = cv2.resize(cam.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(cam, 0.0, 1.0).astype(np.float32)


def colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] in the colour map; BGR uint8."""
    return cv2.applyColorMap(np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8), COLORMAP)


def blend(image: np.ndarray, cam: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The display image under its map (both [H, W], the map on the page's scale in [0, 1]) where ``weight``
    (the breast) is; the background stays as it is. BGR uint8."""
    grey = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR).astype(np.float32)
    alpha = (weight * (ALPHA_LOW + ALPHA_GAIN * np.clip(cam, 0, 1)))[..., None]
    return np.rint(grey * (1 - alpha) + colour(cam).astype(np.float32) * alpha).astype(np.uint8)


def overlay_figure(image: np.ndarray, cam: np.ndarray, weight: np.ndarray, label: Sequence[str]) -> np.ndarray:
    """One flagged view for a person: the display image, the same under its map, and the colour bar of the
    page's scale, under a header of ``label`` lines (side and view, class and p, the scale). BGR uint8."""
    h, w = image.shape
    gap = max(4, h // 96)
    bar = _colour_bar(h)
    body = np.full((h, 2 * w + 2 * gap + bar.shape[1], 3), _HEADER_GREY, np.uint8)
    body[:, :w] = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    body[:, w + gap : 2 * w + gap] = blend(image, cam, weight)
    body[:, 2 * w + 2 * gap :] = bar
    return np.vstack([_header(label, body.shape[1], h), body])


def _text_scale(height: int) -> tuple[float, int]:
    return max(0.4, height / 1100), max(1, round(height / 700))


def _header(lines: Sequence[str], width: int, height: int) -> np.ndarray:
    scale, thick = _text_scale(height)
    line_h = cv2.getTextSize("Ag", _FONT, scale, thick)[0][1] * 2
    header = np.full((line_h * len(lines) + line_h // 2, width, 3), _HEADER_GREY, np.uint8)
    for k, text in enumerate(lines):
        shown = _fit(text, width - 8, scale, thick)
        cv2.putText(header, shown, (6, line_h * (k + 1)), _FONT, scale, _TEXT, thick, cv2.LINE_AA)
    return header


def _fit(text: str, width: int, scale: float, thick: int) -> str:
    while text and cv2.getTextSize(text, _FONT, scale, thick)[0][0] > width:
        text = text[:-2] + "~"
    return text


def _colour_bar(height: int) -> np.ndarray:
    """The page scale's colour bar, 1.0 (the page's largest map value) at the top, 0 at the bottom."""
    scale, thick = _text_scale(height)
    pad, bar_w = max(4, height // 48), max(10, height // 40)
    text_w = cv2.getTextSize("0.5", _FONT, scale, thick)[0][0]
    panel = np.full((height, 3 * pad + bar_w + text_w, 3), _HEADER_GREY, np.uint8)
    span = height - 2 * pad
    ramp = np.linspace(1.0, 0.0, span, dtype=np.float32)[:, None]
    panel[pad : pad + span, pad : pad + bar_w] = colour(np.repeat(ramp, bar_w, axis=1))
    text_h = cv2.getTextSize("0", _FONT, scale, thick)[0][1]
    for value, label in ((1.0, "1"), (0.5, "0.5"), (0.0, "0")):
        y = pad + round((1 - value) * (span - 1))
        baseline = min(height - 2, max(pad + text_h, y + text_h // 2))
        cv2.putText(panel, label, (2 * pad + bar_w, baseline), _FONT, scale, _TEXT, thick, cv2.LINE_AA)
    return panel


def thumbnail(image: np.ndarray, height: int = THUMB_HEIGHT) -> np.ndarray:
    """A copy ``height`` pixels tall, aspect kept (area-averaged; never enlarged)."""
    h, w = image.shape[:2]
    if h <= height:
        return image
    return cv2.resize(image, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA)


def encode(image: np.ndarray, quality: int = THUMB_QUALITY) -> bytes:
    """The page's image bytes (WebP, lossy at ``quality``)."""
    ok, data = cv2.imencode(IMAGE_SUFFIX, image, [cv2.IMWRITE_WEBP_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as {IMAGE_SUFFIX}")
    return data.tobytes()


def data_uri(data: bytes, mime: str = IMAGE_MIME) -> str:
    """``data:`` URI of image bytes, for a page that carries its images."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
