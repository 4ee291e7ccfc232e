"""PreprocessConfig: the settings of the one route from a file to the canonical image.

It travels with the model (checkpoint and ONNX metadata), so training and inference cannot drift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

# The routes a config can name. 1: a square S x S canvas, the crop keeps the largest bright component,
# VOI output as is (every model exported before version 2 existed). 2: an H x W canvas, a crop that drops
# film labels, rulers and film edges, and the in-breast grey range harmonised after VOI. 3: version 2's canvas
# and crop, the background outside the breast black, and the greys mapped by one fixed line per acquisition
# family (dens.route.families), fitted on the training images and carried in ``families``: a breast keeps its density.
VERSIONS = (1, 2, 3)
VERSION = 3
# About 512 x 512's pixel count (98.8%) on a 2:1 canvas, both sides multiples of a ResNet's stride of 32.
HEIGHT, WIDTH = 736, 352


@dataclass(frozen=True, init=False)
class PreprocessConfig:
    """How a decoded mammogram becomes the canonical ``uint8 [height, width]`` image.

    ``PreprocessConfig(size=S)`` is a square ``S x S`` canvas. A dict without ``version`` (a checkpoint or
    ONNX file written before the version existed) is version 1, the route those models were trained on.
    """

    version: int
    height: int
    width: int
    # Decode JPEG 2000 at reduced resolution (and downsample other syntaxes the same way) while the
    # breast keeps at least ``decode_side`` pixels on its long side.
    reduce: bool
    max_reduce_levels: int
    # Crop to the breast's bounding box (background, padding, burnt-in markers and film labels excluded).
    crop: bool
    crop_margin: float
    # Flip so the chest wall is on the left edge of every canonical image.
    orient: bool
    # Version 3: each acquisition family's grey line, ``(key, fat grey, dense grey)``, fitted on the training
    # images (dens.route.families.fit); () before the fit, when greys stay as VOI gives them.
    families: tuple[tuple[str, float, float], ...]

    def __init__(
        self,
        *,
        version: int = VERSION,
        height: int | None = None,
        width: int | None = None,
        size: int | None = None,
        reduce: bool = True,
        max_reduce_levels: int = 5,
        crop: bool = True,
        crop_margin: float = 0.02,
        orient: bool = True,
        families: tuple | dict = (),
    ) -> None:
        if size is not None and (height is not None or width is not None):
            raise ValueError("PreprocessConfig takes size (a square canvas) or height and width, not both")
        if size is None and version == 1 and height is None and width is None:
            size = 512
        default_h, default_w = (size, size) if size is not None else (HEIGHT, WIDTH)
        values = {
            "version": version,
            "height": default_h if height is None else height,
            "width": default_w if width is None else width,
            "reduce": reduce,
            "max_reduce_levels": max_reduce_levels,
            "crop": crop,
            "crop_margin": crop_margin,
            "orient": orient,
            "families": _families(families),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(
                f"PreprocessConfig.version {self.version!r} is not one this dens knows "
                f"({', '.join(map(str, VERSIONS))}); a model made by a newer dens needs a newer dens"
            )
        for side in ("height", "width"):
            if not 16 <= getattr(self, side) <= 4096:
                raise ValueError(f"PreprocessConfig.{side} must be in 16..4096, got {getattr(self, side)}")
        if self.version == 1 and self.height != self.width:
            raise ValueError(f"PreprocessConfig version 1 has a square canvas; got {self.height}x{self.width}")
        if not 0 <= self.max_reduce_levels <= 8:
            raise ValueError(f"PreprocessConfig.max_reduce_levels must be in 0..8, got {self.max_reduce_levels}")
        if self.families and self.version < 3:
            raise ValueError(f"PreprocessConfig version {self.version} has no family grey maps (version 3 has)")
        if not 0.0 <= self.crop_margin < 0.5:
            raise ValueError(f"PreprocessConfig.crop_margin must be in [0, 0.5), got {self.crop_margin}")

    @property
    def shape(self) -> tuple[int, int]:
        """The canvas, ``(height, width)``: the model's input is ``uint8 [N, 1, height, width]``."""
        return self.height, self.width

    @property
    def size(self) -> int:
        """The canvas's long side: the breast's long side is decoded to at least this many pixels."""
        return max(self.height, self.width)

    @property
    def decode_side(self) -> int:
        """The fewest pixels the breast's long side is decoded to (reduced-resolution decoding stops above it):
        the canvas's long side, and from version 3 the side of a square of the canvas's pixel count. The 2:1
        canvas (736 x 352) then decodes as deep as version 1's 512 x 512 did: the same decoded pixels at the
        same cost, where its full 736 rows would decode a typical file a level shallower, at twice the cost.
        """
        return self.size if self.version < 3 else math.isqrt(self.height * self.width - 1) + 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able settings. Version 1 writes the keys it always wrote (``size``, no version), so its
        cache keys and metadata stay what they were."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        families = data.pop("families")
        if self.version >= 3:
            data["families"] = {key: [lo, hi] for key, lo, hi in families}
        if self.version == 1:
            del data["version"], data["height"], data["width"]
            data = {"size": self.height, **data}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Build from a dict (checkpoint, ONNX metadata, YAML); unknown keys are an error, not ignored. A dict
        without ``version`` is version 1 (it was written before versions existed)."""
        known = {f.name for f in dataclasses.fields(cls)} | {"size"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{"version": 1, **data})

    def unfitted(self) -> PreprocessConfig:
        """This config without its family grey maps: the canvas before the maps, which the decoded cache keeps
        (the maps are a table applied to it, so a refit never decodes again)."""
        return dataclasses.replace(self, families=())

    def fitted(self, families: tuple) -> PreprocessConfig:
        """This config with ``families`` (dens.route.families.fit) as its grey maps."""
        return dataclasses.replace(self, families=families)

    def key(self) -> str:
        """A short stable digest, for cache keys."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _families(value: tuple | dict) -> tuple[tuple[str, float, float], ...]:
    """``families`` from a dict (JSON: ``{key: [fat, dense]}``) or a tuple of ``(key, fat, dense)``, checked."""
    items = [(k, *v) for k, v in value.items()] if isinstance(value, dict) else list(value)
    out = []
    for item in items:
        try:
            key, lo, hi = item
            key, lo, hi = str(key), float(lo), float(hi)
        except (TypeError, ValueError):
            raise ValueError(f"PreprocessConfig.families: expected (key, fat grey, dense grey), got {item!r}") from None
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"PreprocessConfig.families[{key!r}]: greys must satisfy 0 <= fat < dense <= 1")
        out.append((key, lo, hi))
    return tuple(out)
