import hashlib
import json
import os
from collections import Counter

import numpy as np

from megacoca.data import shapes
from megacoca.data.shards import decode_caption, iter_samples
from megacoca.data.transforms import load_image


def test_vocabulary_and_class_helpers():
    assert len(shapes.COLORS) >= 6 and len(shapes.SHAPES) >= 4 and len(shapes.SIZES) == 2
    assert len(shapes.CLASSES) == 24 and len(set(shapes.CLASSES)) == 24
    assert shapes.class_prompts()[0] == "a photo of a red circle"
    assert shapes.class_prompts("a {} on a background")[1] == "a red square on a background"
    assert shapes.class_index(*shapes.CLASSES[7]) == 7


def test_caption_matches():
    one = {"objects": [{"color": "red", "shape": "circle", "size": "small"}], "relation": None}
    assert shapes.caption_matches("a photo of a small red circle", one)
    assert shapes.caption_matches("Red circle.", one)
    assert shapes.caption_matches("a red circle", ("red", "circle"))
    assert not shapes.caption_matches("a photo of a blue circle", one)
    assert not shapes.caption_matches("a red square", one)
    assert not shapes.caption_matches("a red circle and a blue square", one)
    assert not shapes.caption_matches("a photo of a circle", one)
    two = {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
           "relation": "left of"}
    assert shapes.caption_matches("a red circle left of a blue square", two)
    assert not shapes.caption_matches("a blue circle left of a red square", two)


def test_make_sample_is_deterministic_and_consistent():
    a = shapes.make_sample(np.random.default_rng([1, 0, 5]), 64, 2)
    b = shapes.make_sample(np.random.default_rng([1, 0, 5]), 64, 2)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    image, caption, attributes = a
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert shapes.caption_matches(caption, attributes) and attributes["relation"] in caption
    first, second = attributes["objects"]
    axis = "x" if attributes["relation"] in ("left of", "right of") else "y"
    before = attributes["relation"] in ("left of", "above")
    assert (first[axis] < second[axis]) == before  # the caption's relation is true of the picture
    for seed in range(50):  # single objects: the object's color dominates its own pixels
        image, caption, attributes = shapes.make_sample(np.random.default_rng([seed]), 64, 1)
        obj = attributes["objects"][0]
        cx, cy = int(obj["x"] * 64), int(obj["y"] * 64)
        patch = image[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
        assert np.abs(patch - shapes.COLORS[obj["color"]]).max() < 45, (caption, patch)


def test_synth_shapes_writes_deterministic_splits(tmp_path):
    meta = shapes.synth_shapes(str(tmp_path / "a"), train_samples=60, val_samples=48, image_size=32, seed=3,
                               shard_size=25, workers=2)
    assert meta["train_shards"] == 3 and meta["val_shards"] == 2
    assert sorted(os.listdir(tmp_path / "a" / "train")) == ["00000.tar", "00001.tar", "00002.tar"]
    shapes.synth_shapes(str(tmp_path / "b"), train_samples=60, val_samples=48, image_size=32, seed=3,
                        shard_size=25, workers=1)

    def digest(root):
        return [hashlib.sha1(open(os.path.join(root, split, name), "rb").read()).hexdigest()
                for split in ("train", "val") for name in sorted(os.listdir(os.path.join(root, split)))]

    assert digest(tmp_path / "a") == digest(tmp_path / "b")  # same bytes, any number of processes
    val = list(iter_samples(str(tmp_path / "a" / "val")))
    assert len(val) == 48
    classes = Counter()
    for raw in val:
        attributes = json.loads(raw["json"])
        assert len(attributes["objects"]) == 1 and attributes["relation"] is None
        obj = attributes["objects"][0]
        assert set(obj) >= {"color", "shape", "size", "x", "y"}
        caption, reason = decode_caption(raw)
        assert reason is None and shapes.caption_matches(caption, attributes)
        assert load_image(raw["jpg"]).size == (32, 32)
        classes[attributes["class"]] += 1
    assert classes == Counter({i: 2 for i in range(24)})  # balanced over the 24 classes
    train = list(iter_samples(str(tmp_path / "a" / "train")))
    counts = Counter(len(json.loads(raw["json"])["objects"]) for raw in train)
    assert counts[1] > 0 and counts[2] > 0
    assert len({decode_caption(raw)[0].split(" ")[0] for raw in train}) >= 3  # varied templates


def test_label_only_source_holds_class_ids_and_no_captions(tmp_path):
    meta = shapes.synth_shapes(str(tmp_path / "a"), train_samples=30, val_samples=48, image_size=32, seed=3,
                               shard_size=20, workers=2, labels_only=True)
    assert meta["dataset"] == "synth-shapes-labels" and meta["train_shards"] == 2 and meta["val_shards"] == 3
    assert sorted(os.listdir(tmp_path / "a")) == ["classnames.txt", "meta.json", "templates.txt", "train", "val"]
    assert (tmp_path / "a" / "classnames.txt").read_text().splitlines() == shapes.CLASS_NAMES
    templates = (tmp_path / "a" / "templates.txt").read_text().splitlines()
    assert templates == list(shapes.LABEL_TEMPLATES) and templates[0] == "a photo of a {c}"
    assert all("{c}" in t and "{" not in t.replace("{c}", "") for t in templates) and len(templates) > 3
    shapes.synth_shapes(str(tmp_path / "b"), train_samples=30, val_samples=48, image_size=32, seed=3,
                        shard_size=20, workers=1, labels_only=True)

    def digest(root):
        return [hashlib.sha1(open(os.path.join(root, split, name), "rb").read()).hexdigest()
                for split in ("train", "val") for name in sorted(os.listdir(os.path.join(root, split)))]

    assert digest(tmp_path / "a") == digest(tmp_path / "b")  # same bytes, any number of processes
    for split, count in (("train", 30), ("val", 48)):
        samples = list(iter_samples(str(tmp_path / "a" / split)))
        assert len(samples) == count
        labels = []
        for raw in samples:
            assert set(raw) - {"__key__", "__url__"} == {"jpg", "cls"}  # an image and a class id, no caption
            labels.append(int(raw["cls"]))
            assert load_image(raw["jpg"]).size == (32, 32)
        assert all(0 <= label < 24 for label in labels)
        if split == "val":
            assert Counter(labels) == Counter({i: 2 for i in range(24)})  # balanced, as the captioned val split
        else:
            assert len(set(labels)) > 8
    # each image is one object of its class: the captioned set's generator, drawn from split ids of its own
    for split, index in (("train", 7), ("val", 29)):
        raw = list(iter_samples(str(tmp_path / "a" / split)))[index]
        rng = np.random.default_rng([3, shapes.LABEL_SPLIT_IDS[split], index])
        image, _, attributes = shapes.make_sample(rng, 32, 1, cls=index % 24 if split == "val" else None)
        assert raw["jpg"] == shapes._encode(image, "jpg") and int(raw["cls"]) == attributes["class"]
        assert len(attributes["objects"]) == 1


def test_label_only_images_are_not_the_captioned_ones(tmp_path):
    shapes.synth_shapes(str(tmp_path / "captions"), 20, 24, image_size=32, seed=1, shard_size=50, workers=1)
    shapes.synth_shapes(str(tmp_path / "labels"), 20, 24, image_size=32, seed=1, shard_size=50, workers=1,
                        labels_only=True)
    for split in ("train", "val"):
        captioned = {raw["jpg"] for raw in iter_samples(str(tmp_path / "captions" / split))}
        labelled = {raw["jpg"] for raw in iter_samples(str(tmp_path / "labels" / split))}
        assert not captioned & labelled, split
