"""PreprocessConfig: the settings of the one route from a file to the canonical image.

It travels with the model (checkpoint and ONNX metadata), so training and inference cannot drift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded mammogram becomes the canonical ``uint8 [size, size]`` image."""

    size: int = 512
    # Decode JPEG 2000 at reduced resolution (and downsample other syntaxes the same way) while the
    # breast keeps at least `size` pixels on its long side.
    reduce: bool = True
    max_reduce_levels: int = 5
    # Crop to the breast's bounding box (background, padding and burnt-in markers excluded).
    crop: bool = True
    crop_margin: float = 0.02
    # Flip so the chest wall is on the left edge of every canonical image.
    orient: bool = True

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise ValueError(f"PreprocessConfig.size must be in 16..4096, got {self.size}")
        if not 0 <= self.max_reduce_levels <= 8:
            raise ValueError(f"PreprocessConfig.max_reduce_levels must be in 0..8, got {self.max_reduce_levels}")
        if not 0.0 <= self.crop_margin < 0.5:
            raise ValueError(f"PreprocessConfig.crop_margin must be in [0, 0.5), got {self.crop_margin}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Build from a dict (checkpoint, ONNX metadata, YAML); unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def key(self) -> str:
        """A short stable digest, for cache keys."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
