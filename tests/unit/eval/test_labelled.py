"""Zero-shot classification of a labelled set read from shards, class names and templates read from files: top-1
and top-5 against a hand-computed reference, labels from `.cls` and from a JSON field (id or name), bad samples
skipped and counted, the label probe, and the trainer's per-source eval keys."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from webdataset import TarWriter

from megacoca.config.sources import ValSourceConfig
from megacoca.config.train import JobConfig
from megacoca.data import shapes
from megacoca.data.source_text import LabelText, read_class_names, read_templates
from megacoca.data.transforms import ImageTransform, load_image
from megacoca.eval import labelled, runner
from megacoca.eval.zeroshot import class_embeddings, topk_accuracy, zeroshot_logits
from megacoca.models.coca import build_model

NAMES = [f"c{i}" for i in range(8)]
TEMPLATES = ["a photo of a {c}", "{} again", "one {c}"]


def png_bytes(value: int, size: int = 16) -> bytes:
    image = np.full((size, size, 3), (value * 29) % 256, np.uint8)
    image[0, 0] = (value * 7 % 256, value * 13 % 256, value % 256)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_samples(directory, samples, per_shard: int = 5) -> str:
    """Shards of `samples` (dicts of extension -> bytes, the key added), `per_shard` a shard."""
    os.makedirs(directory, exist_ok=True)
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        with TarWriter(os.path.join(str(directory), f"{shard:05d}.tar"), mtime=0) as writer:
            for index in range(start, min(start + per_shard, len(samples))):
                writer.write({"__key__": f"s{index:05d}", **samples[index]})
    return str(directory)


def write_lists(directory) -> tuple[str, str]:
    names, templates = os.path.join(str(directory), "names.txt"), os.path.join(str(directory), "templates.json")
    with open(names, "w") as f:
        f.write("# eight classes\n" + "\n".join(NAMES) + "\n")
    with open(templates, "w") as f:
        json.dump(TEMPLATES, f)
    return names, templates


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary: pad 0, bos 1, eos 2."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, words, context_length=12):
        self.words = ["<pad>", "<s>", "</s>"] + list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.context_length, self.vocab_size = context_length, len(self.words)

    def encode(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1] + [self.ids[w] for w in text.split()][: self.context_length - 2] + [2]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


TOKENIZER = WordTokenizer(NAMES + "a photo of again one".split())


class StubModel(torch.nn.Module):
    """Text: the one-hot of the class it names. Image: looked up by content (`images` maps an image's bytes to its
    embedding): a model whose zero-shot scores the test sets by hand."""

    def __init__(self, images: dict):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.images = images
        self.image_batches = []

    def encode_text(self, text, normalize=True):
        rows = [next(NAMES.index(TOKENIZER.words[i]) for i in ids.tolist() if TOKENIZER.words[i] in NAMES)
                for ids in text]
        return F.one_hot(torch.tensor(rows), len(NAMES)).float()

    def encode_image(self, images, normalize=True):
        self.image_batches.append(images.shape[0])
        return torch.stack([self.images[row.numpy().tobytes()] for row in images])


def transformed(data: bytes, size: int = 16) -> torch.Tensor:
    return ImageTransform(size, train=False)(load_image(data, draft_size=size))


def test_zeroshot_on_a_stub_model_is_the_hand_computed_score(tmp_path):
    """Sample i has label i % 8. Its image scores its own class highest when i % 3 == 0 (a top-1 hit), else
    classes label+1, label+2 (and, when i % 3 == 2, label+3 .. label+5) above its label: top-5 hits unless
    i % 3 == 2. 20 samples: 7 top-1 hits, 14 top-5 hits."""
    samples, embeddings = [], {}
    for i in range(20):
        data, label = png_bytes(i), i % 8
        above = 0 if i % 3 == 0 else (2 if i % 3 == 1 else 5)
        scores = torch.zeros(8)
        scores[label] = 1.0
        for step in range(1, above + 1):
            scores[(label + step) % 8] = 1.0 + step
        embeddings[transformed(data).numpy().tobytes()] = F.normalize(scores, dim=0)
        samples.append({"png": data, "cls": str(label).encode()})
    shards = write_samples(tmp_path / "set", samples)
    names, templates = write_lists(tmp_path)
    rule = LabelText(read_class_names(names), read_templates(templates))
    model = StubModel(embeddings)
    results = labelled.zeroshot_labelled(labelled.direct(model), TOKENIZER, shards, rule, 16, batch_size=3,
                                         chunk_size=4)
    assert results["zeroshot_top1"] == pytest.approx(7 / 20) and results["zeroshot_top5"] == pytest.approx(14 / 20)
    assert results["num_samples"] == 20 and results["num_skipped"] == 0 and results["skipped"] == {}
    assert results["num_classes"] == 8 and results["num_templates"] == 3
    assert model.image_batches == [3, 1] * 5  # chunks of 4, batches of 3: never more than a chunk in memory
    limited = labelled.zeroshot_labelled(labelled.direct(model), TOKENIZER, shards, rule, 16, max_samples=6)
    assert limited["num_samples"] == 6 and limited["zeroshot_top1"] == pytest.approx(2 / 6)
    few = LabelText(NAMES[:5], TEMPLATES)  # 5 classes: every label is in the top 5, no top-5 reported
    assert labelled.zeroshot_labelled(labelled.direct(model), TOKENIZER, shards, few, 16,
                                      max_samples=5)["zeroshot_top5"] is None


def test_zeroshot_of_a_real_model_equals_its_logits(tmp_path, one_thread):
    """A tiny random CoCa: the metrics are top-k of zeroshot_logits(image embeddings, class embeddings averaged over
    every template), computed here directly."""
    torch.manual_seed(0)
    model = build_model("coca_tiny", image_size=16, patch_size=8, vocab_size=TOKENIZER.vocab_size,
                        context_length=TOKENIZER.context_length, kernels="torch")
    labels = [(i * 5) % 8 for i in range(24)]
    shards = write_samples(tmp_path / "set", [{"png": png_bytes(i), "cls": str(label).encode()}
                                              for i, label in enumerate(labels)], per_shard=7)
    rule = LabelText(NAMES, TEMPLATES)
    model.train()
    results = labelled.zeroshot_labelled(labelled.direct(model), TOKENIZER, shards, rule, 16, batch_size=5,
                                         chunk_size=10)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        images = torch.stack([transformed(png_bytes(i)) for i in range(24)])
        features = model.encode_image(images, normalize=True)
        classes = class_embeddings(model, TOKENIZER, NAMES, [t.replace("{c}", "{}") for t in TEMPLATES])
    expected = topk_accuracy(zeroshot_logits(features, classes), torch.tensor(labels), (1, 5))
    assert results["zeroshot_top1"] == pytest.approx(expected[1], abs=1e-6)
    assert results["zeroshot_top5"] == pytest.approx(expected[5], abs=1e-6)
    assert 0 < expected[5] < 1  # not a degenerate score that any wiring would reproduce


def test_labels_from_cls_and_json_fields_and_bad_samples_counted(tmp_path):
    good = [{"png": png_bytes(0), "cls": b"3", "json": json.dumps({"label": 3, "name": "c3"}).encode()},
            {"png": png_bytes(1), "cls": b" 5\n", "json": json.dumps({"label": 5, "name": "c5"}).encode()}]
    bad = [{"png": png_bytes(2), "cls": b"8", "json": json.dumps({"label": 8, "name": "c8"}).encode()},  # bad_label
           {"png": png_bytes(3), "cls": b"x", "json": json.dumps({"label": "3", "name": 2.5}).encode()},
           {"png": png_bytes(4), "json": b"{}"},  # missing_label
           {"jpg": b"not a jpeg", "cls": b"1", "json": json.dumps({"label": 1, "name": "c1"}).encode()},
           {"cls": b"1", "json": json.dumps({"label": 1, "name": "c1"}).encode()}]  # missing_image
    shards = write_samples(tmp_path / "set", good + bad, per_shard=3)
    for field, skipped in (("cls", {"bad_label": 2, "missing_label": 1, "corrupt_image": 1, "missing_image": 1}),
                           ("label", {"bad_label": 2, "missing_label": 1, "corrupt_image": 1, "missing_image": 1}),
                           ("name", {"bad_label": 2, "missing_label": 1, "corrupt_image": 1, "missing_image": 1})):
        rule = LabelText(NAMES, TEMPLATES, field=field)
        counted = __import__("collections").Counter()
        chunks = list(labelled.labelled_chunks(shards, 16, rule, counted))
        assert [chunk[1].tolist() for chunk in chunks] == [[3, 5]], field
        assert chunks[0][0].shape == (2, 3, 16, 16)
        assert dict(counted) == skipped, field


def test_label_probe_and_a_set_without_valid_labels(tmp_path):
    shards = write_samples(tmp_path / "set", [{"png": png_bytes(i), "cls": b"9"} for i in range(6)])
    rule = LabelText(NAMES, TEMPLATES)
    problem = labelled.label_problem(shards, rule)
    assert "none of the first 6 samples has a valid label in the .cls file (bad_label 6; 8 classes" in problem
    assert "missing_label 6" in labelled.label_problem(shards, LabelText(NAMES, TEMPLATES, field="label"))
    with pytest.raises(ValueError, match="no sample of .* has a readable image and a valid label .bad_label 6."):
        labelled.zeroshot_labelled(labelled.direct(StubModel({})), TOKENIZER, shards, rule, 16)
    mixed = write_samples(tmp_path / "mixed", [{"png": png_bytes(0), "cls": b"9"}, {"png": png_bytes(1), "cls": b"2"}])
    assert labelled.label_problem(mixed, rule) is None


# ------------------------------------------------------------------------------- the trainer's per-source eval
class ShapesTokenizer(WordTokenizer):
    def __init__(self):
        words = "a an of photo there is image picture showing on noisy background one drawing small large".split()
        super().__init__(words + list(shapes.COLORS) + list(shapes.SHAPES) + "left right above below with".split(),
                         context_length=16)

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids.tolist() if i > 2)


class Dims:
    pp_size = 1


def test_train_eval_fn_evaluates_each_named_set_with_prefixed_keys(tmp_path, one_thread):
    shapes.synth_shapes(str(tmp_path / "captions"), 0, 12, image_size=32, shard_size=8, workers=1)
    shapes.synth_shapes(str(tmp_path / "labels"), 0, 30, image_size=32, shard_size=8, workers=1, labels_only=True)
    tokenizer = ShapesTokenizer()
    torch.manual_seed(0)
    model = build_model("coca_tiny", image_size=32, patch_size=8, vocab_size=tokenizer.vocab_size,
                        context_length=tokenizer.context_length, kernels="torch")
    job = JobConfig()
    job.data.val_shards = str(tmp_path / "captions" / "val")
    options = {"caption_samples": 4, "batch_size": 8, "max_new_tokens": 4}
    plain = runner.make_train_eval_fn(job, model.cfg, Dims(), tokenizer, max_samples=10, **options)(model, 0)
    eval_set = runner.load_eval_set(job.data.val_shards, 32, 10)
    reference = runner.evaluate(model, tokenizer, eval_set, num_examples=1, **options)
    assert plain == {**{k: reference[k] for k in runner.TRAIN_EVAL_KEYS if reference[k] is not None},
                     "sample_caption": reference["samples"][0]["generated"]}  # no val_sources: as before

    job.eval.val_sources = [
        ValSourceConfig(name="shapes_val", shards=str(tmp_path / "captions" / "val"), max_samples=10),
        ValSourceConfig(name="labels_val", shards=str(tmp_path / "labels" / "val"), text="labels",
                        class_names=str(tmp_path / "labels" / "classnames.txt"),
                        templates=str(tmp_path / "labels" / "templates.txt"))]
    metrics = runner.make_train_eval_fn(job, model.cfg, Dims(), tokenizer, **options)(model, 0)
    assert {key: value for key, value in metrics.items() if key.startswith("shapes_val/")} == {
        f"shapes_val/{key}": value for key, value in plain.items()}
    rule = LabelText(shapes.CLASS_NAMES, list(shapes.LABEL_TEMPLATES))
    expected = labelled.zeroshot_labelled(labelled.direct(model), tokenizer, str(tmp_path / "labels" / "val"), rule,
                                          32)
    assert {key for key in metrics if key.startswith("labels_val/")} == {"labels_val/zeroshot_top1",
                                                                          "labels_val/zeroshot_top5"}
    assert metrics["labels_val/zeroshot_top1"] == expected["zeroshot_top1"] and expected["num_samples"] == 30
    assert metrics["labels_val/zeroshot_top5"] == expected["zeroshot_top5"]

    job.eval.val_sources[1].label_field = "label"  # no .json: refused when the eval is built, not at its first call
    with pytest.raises(ValueError, match="'labels_val': none of the first 30 samples has a valid label"):
        runner.make_train_eval_fn(job, model.cfg, Dims(), tokenizer, **options)
