import json

import pytest
from PIL import Image

from megacoca.data.from_folder import folder_to_shards
from megacoca.data.shards import ShardLoader, iter_samples
from megacoca.data.transforms import ImageTransform

from .conftest import StubTokenizer


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for index, (name, fmt) in enumerate([("a.jpg", "JPEG"), ("b.png", "PNG"), ("sub/c.webp", "WEBP"),
                                          ("d.jpeg", "JPEG")]):
        Image.new("RGB", (12, 10), (index * 40, 0, 0)).save(images / name, format=fmt)
    return images


def test_csv_captions(folder, tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text('file,caption\na.jpg,"a red, thing"\nb.png,second\nsub/c.webp,third\nmissing.jpg,gone\n'
                   "d.jpeg,   \n")
    result = folder_to_shards(str(folder), str(tmp_path / "out"), captions=str(csv), shard_size=2, shuffle=False)
    assert result["written"] == 3 and len(result["shards"]) == 2
    assert result["skipped"] == {"missing_image": 1, "empty_caption": 1}
    samples = list(iter_samples(str(tmp_path / "out")))
    assert [s["txt"].decode() for s in samples] == ["a red, thing", "second", "third"]
    assert "jpg" in samples[0] and "png" in samples[1] and "webp" in samples[2]
    assert json.loads(samples[2]["json"]) == {"file": "sub/c.webp"}
    loader = ShardLoader(str(tmp_path / "out"), 1, StubTokenizer(), ImageTransform(8), epochs=1)
    assert len(list(loader)) == 3


def test_jsonl_captions_with_image_and_text_keys(folder, tmp_path):
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in [{"image": "a.jpg", "text": "one"},
                                                          {"image": str(folder / "d.jpeg"), "text": "two"}]))
    result = folder_to_shards(str(folder), str(tmp_path / "out"), captions=str(jsonl), shuffle=False)
    assert result["written"] == 2
    samples = list(iter_samples(str(tmp_path / "out")))
    assert [s["txt"] for s in samples] == [b"one", b"two"] and "jpg" in samples[1]


def test_sidecar_captions(folder, tmp_path):
    (folder / "a.txt").write_text("sidecar a")
    (folder / "sub" / "c.txt").write_text("sidecar c")
    (folder / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    result = folder_to_shards(str(folder), str(tmp_path / "out"), sidecar=True, shuffle=False)
    assert result["written"] == 2
    assert result["skipped"] == {"missing_caption": 1, "non_utf8_text": 1}
    assert [s["txt"] for s in iter_samples(str(tmp_path / "out"))] == [b"sidecar a", b"sidecar c"]


def test_default_order_is_a_seeded_shuffle(folder, tmp_path):
    for name in ("a", "b", "sub/c", "d"):
        (folder / f"{name}.txt").write_text(f"caption {name}")

    def order(out, seed):
        folder_to_shards(str(folder), str(tmp_path / out), sidecar=True, seed=seed)
        return [json.loads(s["json"])["file"] for s in iter_samples(str(tmp_path / out))]

    assert order("x", 0) == order("y", 0)
    assert sorted(order("x", 0)) == ["a.jpg", "b.png", "d.jpeg", "sub/c.webp"]
    assert {tuple(order(f"s{seed}", seed)) for seed in range(6)} != {tuple(order("x", 0))}


def test_bad_arguments(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        folder_to_shards(str(folder), str(tmp_path / "o"), captions=str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        folder_to_shards(str(tmp_path / "nope"), str(tmp_path / "o"), sidecar=True)
    bad = tmp_path / "bad.csv"
    bad.write_text("path_to,words\na.jpg,x\n")
    with pytest.raises(ValueError, match="no image column"):
        folder_to_shards(str(folder), str(tmp_path / "o"), captions=str(bad))
