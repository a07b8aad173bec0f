import io

import numpy as np
import pytest
import torch
from PIL import Image

from megacoca.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    load_image,
    random_resized_crop_box,
    to_rgb,
)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def rgb_at(image, xy):
    return tuple(int(v) for v in image.convert("RGB").getpixel(xy))


def test_every_mode_becomes_rgb_with_sensible_values():
    gray16 = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))  # "I;16"
    assert gray16.mode == "I;16"
    assert [rgb_at(to_rgb(gray16), (x, 0))[0] for x in range(3)] == [0, 128, 255]  # scaled, not clipped
    int32 = Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I")
    assert [rgb_at(to_rgb(int32), (x, 0))[0] for x in (0, 2)] == [0, 255]
    small_int = Image.fromarray(np.array([[0, 100, 255]], np.int32), "I")
    assert rgb_at(to_rgb(small_int), (1, 0)) == (100, 100, 100)
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert [rgb_at(to_rgb(floats), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent -> white background, not black
    assert rgb_at(to_rgb(rgba), (0, 0)) == (255, 0, 0) and rgb_at(to_rgb(rgba), (1, 0)) == (255, 255, 255)
    palette = Image.new("RGB", (2, 1), (0, 0, 255)).convert("P")
    assert rgb_at(to_rgb(palette), (0, 0)) == (0, 0, 255)
    transparent_p = palette.copy()
    transparent_p.info["transparency"] = transparent_p.getpixel((0, 0))
    assert rgb_at(to_rgb(transparent_p), (0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # red
    assert rgb_at(to_rgb(cmyk), (0, 0)) == (255, 0, 0)
    for mode in ("1", "L", "LA", "YCbCr", "RGB", "I;16B", "HSV"):
        image = Image.new(mode, (3, 2))
        out = to_rgb(image)
        assert out.mode == "RGB" and out.size == (3, 2), mode


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("RGB", "WEBP"), ("LA", "PNG"), ("1", "PNG"),
                                      ("I", "TIFF"), ("F", "TIFF")])
def test_load_image_decodes_every_mode_to_rgb(mode, fmt):
    image = Image.new(mode, (7, 5))
    decoded = load_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (7, 5)
    tensor = ImageTransform(4)(decoded)
    assert tensor.shape == (3, 4, 4) and tensor.dtype == torch.float32 and torch.isfinite(tensor).all()


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    image = load_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert image.size == (20, 40)
    top, bottom = rgb_at(image, (10, 5)), rgb_at(image, (10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_corrupt_bytes_raise():
    good = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")
    for bad in (b"", b"not an image", good[: len(good) // 2]):
        with pytest.raises(Exception):
            load_image(bad)


def test_eval_transform_resizes_crops_and_normalizes():
    image = Image.new("RGB", (30, 20), (255, 128, 0))
    out = ImageTransform(8)(image)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[:, 4, 4], expected.float(), atol=1e-5)
    wide = Image.new("RGB", (30, 10), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 10, 10))  # left third white: cropped away by the center crop
    assert ImageTransform(10)(wide).mean() < 0


def test_train_crop_is_deterministic_under_a_seed_and_varies_across_seeds():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    transform = ImageTransform(16, train=True, scale=(0.3, 1.0))
    a = transform(image, rng=np.random.default_rng(1))
    b = transform(image, rng=np.random.default_rng(1))
    c = transform(image, rng=np.random.default_rng(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 16, 16)
    rng = np.random.default_rng(3)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(70, 50, rng, scale=(0.08, 1.0))
        assert 0 <= left < right <= 70 and 0 <= top < bottom <= 50
