"""Image decoding and transforms: PIL + numpy + torch only (no torchvision in the package).

`load_image(data)` turns encoded bytes into an RGB PIL image (EXIF orientation applied, any mode converted).
`ImageTransform(size, train=...)` turns an RGB PIL image into a normalized float32 tensor (3, size, size):

- eval: resize the shorter side to `size` (bicubic), center crop;
- train: random-resized-crop "lite" (open_clip's training default: area scale (0.9, 1.0), aspect ratio
  (3/4, 4/3)), then resize to `size`. The randomness comes only from the `rng` argument
  (`numpy.random.Generator`), so the loader makes it deterministic per (seed, epoch, shard, sample).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# JPEG/PNG bombs: refuse images above ~179M pixels (PIL's default warning threshold x2 raises).
Image.MAX_IMAGE_PIXELS = 89_478_485


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer or float array to uint8.

    16-bit data ("I;16*", or "I" holding values up to 65535) is divided by 257 so 65535 -> 255; floats in
    [0, 1] are scaled by 255; anything else outside [0, 255] is min-max normalized.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            return np.round(array * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.round(array).astype(np.uint8)
    else:
        array = array.astype(np.int64)
        lo, hi = int(array.min(initial=0)), int(array.max(initial=0))
        if lo >= 0 and hi <= 255:
            return array.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return ((array + 128) // 257).astype(np.uint8)
        array = array.astype(np.float64)
    span = hi - lo
    if span <= 0:
        return np.zeros(array.shape, np.uint8)
    return np.round((array - lo) * (255.0 / span)).astype(np.uint8)


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Convert a PIL image of any mode to RGB.

    Transparent images (RGBA, LA, PA, P with a transparency entry) are composited over `background`;
    16-bit and 32-bit integer ("I;16", "I;16B", "I") and float ("F") images are rescaled to 8 bits instead of
    clipped (PIL's own convert("RGB") turns most 16-bit images white).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        gray = _to_uint8(np.asarray(image))
        if gray.ndim == 3:  # e.g. "I;16" multi-channel variants are not produced by PIL, but be safe
            gray = gray[..., 0]
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # modes PIL cannot convert directly (e.g. LAB): use the first channel as gray
        first = np.asarray(image)
        first = first[..., 0] if first.ndim == 3 else first
        return Image.fromarray(_to_uint8(first), "L").convert("RGB")


def load_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image with EXIF orientation applied.

    `draft_size` lets the JPEG decoder downscale by a power of two while keeping both sides >= draft_size
    (a large speed-up for big photos). Raises (OSError, ValueError, ...) on corrupt or truncated data; the
    loader counts those as `corrupt_image`.
    """
    image = Image.open(io.BytesIO(data))
    if draft_size is not None and image.format == "JPEG":
        # EXIF rotation may swap sides; request a square so the shorter side stays >= draft_size either way.
        image.draft(image.mode, (draft_size, draft_size))
    image.load()
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centered square (left, top, right, bottom)."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale=(0.9, 1.0),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, driven by a numpy Generator (10 tries, then center)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the whole image clipped to the ratio range, centered.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def normalize(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W), (x / 255 - mean) / std."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    mean = np.asarray(mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
    array = (array - mean) * inv_std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ImageTransform:
    """RGB PIL image -> normalized float32 tensor (3, size, size).

    `train=False`: resize shorter side + center crop. `train=True`: random-resized-crop-lite whose
    randomness comes from the `rng` passed to `__call__` (a fresh `np.random.default_rng()` if None, which
    is NOT deterministic; the ShardLoader always passes a seeded one).
    """

    accepts_rng = True  # the ShardLoader passes rng=... to transforms that set this

    def __init__(
        self,
        size: int,
        train: bool = False,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        scale=(0.9, 1.0),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        interpolation: str = "bicubic",
    ):
        if size <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = int(size)
        self.train = bool(train)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.resample = {
            "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST,
            "lanczos": Image.Resampling.LANCZOS,
        }[interpolation]

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, train={self.train}, scale={self.scale})"

    def crop_box(self, width: int, height: int, rng: np.random.Generator | None = None):
        if self.train:
            return random_resized_crop_box(width, height, rng or np.random.default_rng(), self.scale, self.ratio)
        return center_crop_box(width, height)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = to_rgb(image)
        box = self.crop_box(image.width, image.height, rng)
        size = (self.size, self.size)
        if (box[2] - box[0], box[3] - box[1]) != size or box[:2] != (0, 0):
            image = image.resize(size, self.resample, box=box, reducing_gap=3.0)
        return normalize(image, self.mean, self.std)


def image_transform(size: int, train: bool = False, mean=CLIP_MEAN, std=CLIP_STD) -> ImageTransform:
    """The default train/eval transform for a model with square input `size`."""
    return ImageTransform(size, train=train, mean=mean, std=std)
