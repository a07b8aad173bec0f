"""synth-shapes: a synthetic captioned-shapes dataset a tiny ViT can learn on a CPU in minutes.

6 saturated colors x 4 shapes x 2 sizes; one object, or two with a spatial relation ("a small red circle
left of a large blue square"), over a noisy low-saturation background, captioned with varied templates.
The val split holds single-object images only, balanced over the 24 (color, shape) classes, for zero-shot
classification (chance 1/24 ~ 0.04) and caption correctness (`caption_matches`).

Every sample is generated from `np.random.default_rng([seed, split, index])`, and tars are written with
a fixed mtime, so the output bytes depend only on the arguments (not on the number of processes).

`labels_only=True` writes a label-only source instead (`synth_labels`): single-object images whose samples are
`key.jpg` + `key.cls` (the class id in CLASS_NAMES order) and no caption, from split ids of their own (other images
than the captioned set of the same seed), with `classnames.txt` and `templates.txt` (LABEL_TEMPLATES) beside the
shards: the second source of a two-source mixture (megacoca.config.sources, `text: labels`).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from multiprocessing import get_context

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "yellow": (235, 215, 20),
    "green": (30, 175, 40),
    "cyan": (20, 200, 215),
    "blue": (35, 55, 225),
    "purple": (160, 40, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
CLASSES: list[tuple[str, str]] = [(color, shape) for color in COLORS for shape in SHAPES]
CLASS_NAMES: list[str] = [f"{color} {shape}" for color, shape in CLASSES]

SINGLE_TEMPLATES = (
    "a photo of a {a}",
    "there is a {a}",
    "a {a}",
    "an image of a {a}",
    "a picture showing a {a}",
    "a {a} on a noisy background",
    "one {a}",
    "a drawing of a {a}",
)
PAIR_TEMPLATES = (
    "a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "a photo of a {a} {rel} a {b}",
    "an image with a {a} {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
)
ZERO_SHOT_TEMPLATES = ("a photo of a {color} {shape}", "a {color} {shape}", "there is a {color} {shape}")
# A label source's templates (`{c}`: the class name, "red circle"): the zero-shot ones, then the other single-object
# caption templates, without the size word no class name holds.
LABEL_TEMPLATES = tuple(dict.fromkeys([t.replace("{color} {shape}", "{c}") for t in ZERO_SHOT_TEMPLATES]
                                      + [t.replace("{a}", "{c}") for t in SINGLE_TEMPLATES]))

# Object half-extent as a fraction of the image side.
SIZE_RANGE = {"small": (0.15, 0.18), "large": (0.25, 0.29)}
JITTER = 0.15  # single objects: centre within 0.5 +- JITTER of the side
BACKGROUND_NOISE, OBJECT_NOISE = 10.0, 5.0  # gaussian std in 0..255 units
SPLIT_IDS = {"train": 0, "val": 1}
LABEL_SPLIT_IDS = {"train": 2, "val": 3}  # a label-only source's images: none of them is a captioned one's


def class_index(color: str, shape: str) -> int:
    return CLASSES.index((color, shape))


def class_prompts(template: str = "a photo of a {color} {shape}") -> list[str]:
    """One prompt per class in CLASSES order. The template uses {color} and {shape}, or a single {}."""
    if "{}" in template:
        return [template.format(f"{color} {shape}") for color, shape in CLASSES]
    return [template.format(color=color, shape=shape) for color, shape in CLASSES]


_WORD = re.compile(r"[a-z]+")


def _singular(word: str) -> str:
    return word[:-1] if word not in SHAPES and word.endswith("s") and word[:-1] in SHAPES else word


def caption_pairs(caption: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(colors named, shapes named, (color, shape) noun phrases: a color followed by the next shape).
    Plural shapes ("circles") count as the shape."""
    words = [_singular(w) for w in _WORD.findall(caption.lower())]
    colors = [w for w in words if w in COLORS]
    shapes = [w for w in words if w in SHAPES]
    pairs, current = [], None
    for word in words:
        if word in COLORS:
            current = word
        elif word in SHAPES and current is not None:
            pairs.append((current, word))
            current = None
    return colors, shapes, pairs


def _objects(attributes) -> list[dict]:
    if isinstance(attributes, dict) and "objects" in attributes:
        return list(attributes["objects"])
    if isinstance(attributes, dict):
        return [attributes]
    if isinstance(attributes, (tuple, list)) and len(attributes) == 2 and all(isinstance(a, str) for a in attributes):
        return [{"color": attributes[0], "shape": attributes[1]}]
    return list(attributes)


def caption_matches(caption: str, attributes) -> bool:
    """True if the caption names the right color AND shape of every object and no other color or shape.

    `attributes` is a sample's json dict (`{"objects": [...], ...}`), one object dict with "color" and
    "shape", or a (color, shape) tuple. For two objects, each (color, shape) pair must appear as a phrase.
    """
    objects = _objects(attributes)
    colors, shapes, pairs = caption_pairs(caption)
    want_colors = {o["color"] for o in objects}
    want_shapes = {o["shape"] for o in objects}
    want_pairs = {(o["color"], o["shape"]) for o in objects}
    return set(colors) == want_colors and set(shapes) == want_shapes and want_pairs <= set(pairs)


ATTRIBUTES = ("color", "shape")


def caption_names_attribute(caption: str, attributes, attribute: str) -> bool:
    """True if the caption names exactly the right colors (attribute="color") or shapes ("shape") of the
    objects, whatever it says about the other attribute: one half of `caption_matches`, same parsing.
    "a photo of a red square" names the right color of a red circle and the wrong shape."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    colors, shapes, _ = caption_pairs(caption)
    named = colors if attribute == "color" else shapes
    return set(named) == {o[attribute] for o in _objects(attributes)}


# ---- rendering -----------------------------------------------------------------------------------------
def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.88
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # pointing up, base at cy + r
        t = (dy + r) / (2 * r)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r * 1.1)
    if shape == "cross":
        arm = r * 0.36
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _grid(size: int):
    """Cached pixel-centre coordinates and a fixed bank of unit gaussian noise (4x the image side), from which
    each sample takes a window at a random offset: ~10x cheaper than fresh normals, still deterministic."""
    if size not in _GRID_CACHE:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        bank = np.random.default_rng(20240531).standard_normal((4 * size, 4 * size, 3)).astype(np.float32)
        _GRID_CACHE[size] = (yy, xx, bank)
    return _GRID_CACHE[size]


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    bank = _grid(size)[2]
    oy, ox = rng.integers(0, 3 * size, size=2)
    return bank[oy : oy + size, ox : ox + size]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(60, 190)
    tint = rng.uniform(-18, 18, size=3).astype(np.float32)  # low saturation: never confused with the objects
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gx, gy = rng.uniform(-20, 20, size=2)
    image = _noise(rng, size) * np.float32(BACKGROUND_NOISE) + (base + tint)  # per-pixel noise
    image += (np.float32(gx) * ramp[None, :] + np.float32(gy) * ramp[:, None])[..., None]  # soft gradient
    return image


_COLOR_NAMES = tuple(COLORS)


def _object(rng, size_name=None, color=None, shape=None) -> dict:
    return {
        "color": color or _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))],
        "shape": shape or SHAPES[int(rng.integers(len(SHAPES)))],
        "size": size_name or SIZES[int(rng.integers(len(SIZES)))],
    }


def _phrase(obj: dict, with_size: bool) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}" if with_size else f"{obj['color']} {obj['shape']}"


def make_sample(rng: np.random.Generator, image_size: int = 64, num_objects: int = 1, cls: int | None = None):
    """Render one sample: (uint8 image HxWx3, caption, attributes dict)."""
    s = image_size
    yy, xx, _ = _grid(s)
    image = _background(rng, s)
    if num_objects == 1:
        color, shape = CLASSES[cls] if cls is not None else (None, None)
        obj = _object(rng, color=color, shape=shape)
        r = rng.uniform(*SIZE_RANGE[obj["size"]]) * s
        # near the centre (+-JITTER of the side): a patch-based encoder sees each shape at few positions
        lo, hi = max(r + 1, s * (0.5 - JITTER)), min(s - r - 1, s * (0.5 + JITTER))
        cx, cy = rng.uniform(lo, hi, size=2)
        placed = [(obj, cx, cy, r)]
        relation = None
    else:
        a, b = _object(rng), _object(rng)
        while (a["color"], a["shape"]) == (b["color"], b["shape"]):
            b = _object(rng)
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        ra = rng.uniform(*SIZE_RANGE[a["size"]]) * s
        rb = rng.uniform(*SIZE_RANGE[b["size"]]) * s
        # along the relation axis: a before b (left/above) or after it (right/below); free on the other axis
        gap = rng.uniform(0.02, 0.06) * s
        shrink = min(1.0, (s - 2 - gap) / (2 * ra + 2 * rb))  # two large objects must fit side by side
        ra, rb = ra * shrink, rb * shrink
        span = 2 * ra + gap + 2 * rb
        start = rng.uniform(1, max(1.0, s - 1 - span))
        if relation in ("left of", "above"):  # a comes first along the axis
            ca, cb = start + ra, start + 2 * ra + gap + rb
        else:
            cb, ca = start + rb, start + 2 * rb + gap + ra
        other_a = rng.uniform(ra + 1, s - ra - 1)
        other_b = rng.uniform(rb + 1, s - rb - 1)
        if relation in ("left of", "right of"):
            placed = [(a, ca, other_a, ra), (b, cb, other_b, rb)]
        else:
            placed = [(a, other_a, ca, ra), (b, other_b, cb, rb)]
    objects = []
    for obj, cx, cy, r in placed:
        mask = _mask(obj["shape"], yy, xx, cx, cy, r)
        rgb = np.asarray(COLORS[obj["color"]], np.float32) + rng.uniform(-12, 12, size=3)
        image[mask] = rgb + _noise(rng, s)[mask] * np.float32(OBJECT_NOISE)
        objects.append({**obj, "x": round(float(cx) / s, 4), "y": round(float(cy) / s, 4), "radius": round(float(r) / s, 4)})
    with_size = bool(rng.random() < 0.7)
    if len(objects) == 1:
        template = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
        caption = template.format(a=_phrase(objects[0], with_size))
    else:
        template = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
        caption = template.format(a=_phrase(objects[0], with_size), rel=relation, b=_phrase(objects[1], with_size))
    attributes = {"objects": objects, "relation": relation}
    if len(objects) == 1:
        attributes["class"] = class_index(objects[0]["color"], objects[0]["shape"])
    return np.clip(image, 0, 255).astype(np.uint8), caption, attributes


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=92, subsampling=0)
    else:
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_shard(job) -> int:
    from webdataset import TarWriter  # heavy (imports torch): only writing shards needs it, not the caption checks

    path, split, start, stop, image_size, seed, fmt, two_object_fraction, labels_only = job
    if labels_only:
        return _write_label_shard(path, split, start, stop, image_size, seed, fmt)
    split_id = SPLIT_IDS[split]
    tmp = path + ".tmp"
    with TarWriter(tmp, mtime=0) as writer:
        for index in range(start, stop):
            rng = np.random.default_rng([seed, split_id, index])
            if split == "val":
                image, caption, attributes = make_sample(rng, image_size, 1, cls=index % len(CLASSES))
            else:
                num = 2 if rng.random() < two_object_fraction else 1
                image, caption, attributes = make_sample(rng, image_size, num)
            writer.write({
                "__key__": f"{split}{index:08d}",
                fmt: _encode(image, fmt),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(attributes, sort_keys=True).encode("utf-8"),
            })
    os.replace(tmp, path)
    return stop - start


def _write_label_shard(path: str, split: str, start: int, stop: int, image_size: int, seed: int, fmt: str) -> int:
    """A label-only shard: single-object images (val: balanced over the classes, train: drawn), `key.cls` the
    class id, no caption."""
    from webdataset import TarWriter  # heavy: see _write_shard

    split_id = LABEL_SPLIT_IDS[split]
    tmp = path + ".tmp"
    with TarWriter(tmp, mtime=0) as writer:
        for index in range(start, stop):
            rng = np.random.default_rng([seed, split_id, index])
            image, _, attributes = make_sample(rng, image_size, 1, cls=index % len(CLASSES) if split == "val" else None)
            writer.write({
                "__key__": f"{split}_label{index:08d}",
                fmt: _encode(image, fmt),
                "cls": str(attributes["class"]).encode("ascii"),
            })
    os.replace(tmp, path)
    return stop - start


def write_split(out_dir: str, split: str, num_samples: int, image_size: int = 64, seed: int = 0,
                shard_size: int = 1000, fmt: str = "jpg", two_object_fraction: float = 0.4, workers: int = 1,
                labels_only: bool = False) -> list[str]:
    """Write `num_samples` samples of `split` ("train" or "val") as out_dir/split/{00000..}.tar; `labels_only`:
    label-only samples (`_write_label_shard`)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
    if fmt not in ("jpg", "png"):
        raise ValueError(f"format must be jpg or png, got {fmt!r}")
    split_dir = os.path.join(out_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    jobs = []
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        path = os.path.join(split_dir, f"{shard:05d}.tar")
        jobs.append((path, split, start, min(start + shard_size, num_samples), image_size, seed, fmt,
                     two_object_fraction, labels_only))
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(min(workers, len(jobs))) as pool:
            list(pool.imap_unordered(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)
    return [job[0] for job in jobs]


def synth_shapes(out_dir: str, train_samples: int = 20000, val_samples: int = 1200, image_size: int = 64,
                 seed: int = 0, shard_size: int = 1000, fmt: str = "jpg", two_object_fraction: float = 0.4,
                 workers: int | None = None, labels_only: bool = False) -> dict:
    """Write out_dir/train/*.tar, out_dir/val/*.tar and out_dir/meta.json; returns the meta dict. `labels_only`:
    the label-only source (`synth_labels`)."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if labels_only:
        return synth_labels(out_dir, train_samples, val_samples, image_size, seed, shard_size, fmt, workers)
    began = time.perf_counter()
    train = write_split(out_dir, "train", train_samples, image_size, seed, shard_size, fmt, two_object_fraction, workers)
    val = write_split(out_dir, "val", val_samples, image_size, seed, shard_size, fmt, 0.0, workers)
    seconds = time.perf_counter() - began
    return _write_meta(out_dir, seconds, "synth-shapes", seed, image_size, fmt, train_samples, val_samples, train,
                       val, two_object_fraction=two_object_fraction, colors=list(COLORS), shapes=list(SHAPES),
                       sizes=list(SIZES), classes=CLASS_NAMES)


def _write_meta(out_dir, seconds, dataset, seed, image_size, fmt, train_samples, val_samples, train, val, **more):
    """out_dir/meta.json (what was written, and the set's own fields `more`); returns it with the seconds taken."""
    meta = {"dataset": dataset, "seed": seed, "image_size": image_size, "format": fmt,
            "train_samples": train_samples, "val_samples": val_samples, "train_shards": len(train),
            "val_shards": len(val), **more}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    meta["seconds"] = seconds
    return meta


def synth_labels(out_dir: str, train_samples: int = 20000, val_samples: int = 1200, image_size: int = 64,
                 seed: int = 0, shard_size: int = 1000, fmt: str = "jpg", workers: int = 1) -> dict:
    """The label-only source: out_dir/train/*.tar and out_dir/val/*.tar of `key.jpg` + `key.cls`, out_dir/
    classnames.txt (CLASS_NAMES, one per line: line k is class id k), out_dir/templates.txt (LABEL_TEMPLATES, one
    per line) and out_dir/meta.json; returns the meta dict."""
    began = time.perf_counter()
    train = write_split(out_dir, "train", train_samples, image_size, seed, shard_size, fmt, 0.0, workers, True)
    val = write_split(out_dir, "val", val_samples, image_size, seed, shard_size, fmt, 0.0, workers, True)
    for name, lines in (("classnames.txt", CLASS_NAMES), ("templates.txt", LABEL_TEMPLATES)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    seconds = time.perf_counter() - began
    return _write_meta(out_dir, seconds, "synth-shapes-labels", seed, image_size, fmt, train_samples, val_samples,
                       train, val, class_names="classnames.txt", templates="templates.txt", classes=CLASS_NAMES)
