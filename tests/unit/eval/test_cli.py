"""`megacoca eval` on a DeepSpeed-layout checkpoint (config from the client state) and synth-shapes shards; labelled
sets (--class-names, --templates) and the named sets of a --config; the one-line errors."""

import json
import os

import pytest
import torch

from megacoca.cli import main as cli
from megacoca.data import shapes
from megacoca.eval import runner
from megacoca.models.coca import CoCa, get_flavor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """val shards, a SentencePiece tokenizer, and a ZeRO-0 style checkpoint dir (what megacoca saves)."""
    from megacoca.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("evalcli")
    shapes.write_split(str(root), "val", 24, image_size=32, shard_size=12)
    captions = [shapes.make_sample(__import__("numpy").random.default_rng(i), 32, 1 + i % 2)[1] for i in range(300)]
    tokenizer = train_sentencepiece(captions, str(root / "tok"), vocab_size=64, model_type="bpe")
    overrides = dict(image_size=32, patch_size=8, vocab_size=64, context_length=16, kernels="torch")
    torch.manual_seed(0)
    model = CoCa(get_flavor("coca_tiny", **overrides))
    job = {"name": "t", "model": {"flavor": "coca_tiny", "overrides": overrides}, "schedule": {"steps": 1}}
    tag_dir = root / "run" / "checkpoints" / "step00000001"
    os.makedirs(tag_dir)
    torch.save({"module": model.state_dict(), "step": 1, "dp_size": 1, "config": job},
               tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "COMPLETE").write_text("1\n")
    (root / "run" / "checkpoints" / "latest").write_text("step00000001")
    return root, tokenizer, model


def test_load_model_for_eval_reads_config_and_weights(setup):
    root, _, model = setup
    for path in (root / "run" / "checkpoints", root / "run" / "checkpoints" / "step00000001"):
        loaded = runner.load_model_for_eval(str(path))
        assert loaded.cfg.image_size == 32 and loaded.cfg.vocab_size == 64 and not loaded.training
        for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name


def test_eval_cli_writes_json_and_curves(setup, tmp_path, capsys):
    """The CLI's numbers are the numbers of the checkpointed model: equal, metric by metric, to evaluate() on the
    model the fixture saved (a CLI that loaded other weights, another config or other shards would differ)."""
    root, tokenizer, model = setup
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3)))
    out = tmp_path / "eval.json"
    code = cli(["eval", "--checkpoint", str(root / "run" / "checkpoints"), "--shards", str(root / "val"),
                "--tokenizer", tokenizer, "--out", str(out), "--max-new-tokens", "6", "--max-samples", "20",
                "--caption-samples", "10", "--metrics", str(metrics), "--curves", str(tmp_path / "curves.png"),
                "--generative-zeroshot"])
    assert code == 0
    results = json.loads(out.read_text())
    from megacoca.data.tokenizer import load_tokenizer

    eval_set = runner.load_eval_set(str(root / "val"), 32, 20)
    expected = runner.evaluate(model.eval(), load_tokenizer(tokenizer, 16), eval_set, max_new_tokens=6,
                               caption_samples=10, generative_zeroshot=True)
    for key in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                "class_i2t_r1", "class_t2i_r1", "caption_match", "num_samples", "num_captioned", "samples",
                "zeroshot_generative_top1", "zeroshot_generative_color_acc", "zeroshot_generative_shape_acc"):
        assert results[key] == expected[key], key
    assert results["num_samples"] == 20 and results["num_captioned"] == 10
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    printed = capsys.readouterr().out
    assert f"{results['zeroshot_top1']:.3f}" in printed and "zero-shot top-1" in printed


def test_eval_cli_errors_are_one_line_and_exit_2(setup, tmp_path, capsys):
    root, tokenizer, _ = setup
    base = ["eval", "--shards", str(root / "val"), "--tokenizer", tokenizer]
    assert cli(base + ["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    wrong = ["--flavor", "coca_tiny", "--model-set", "vocab_size=8", "--model-set", "image_size=32"]
    assert cli(base + ["--checkpoint", str(root / "run" / "checkpoints")] + wrong) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ labelled sets, --config
@pytest.fixture(scope="module")
def label_set(setup):
    """The label-only synth-shapes val set (`key.png` + `key.cls`) with its classnames.txt and templates.txt."""
    root = setup[0] / "labels"
    shapes.synth_shapes(str(root), 0, 30, image_size=32, shard_size=8, workers=1, labels_only=True)
    return root


def test_eval_cli_classifies_a_labelled_set(setup, label_set, tmp_path, capsys):
    """--class-names/--templates: top-1/top-5 of the checkpointed model, equal to megacoca.eval.labelled on it and
    to top-k of its logits computed here (class embeddings averaged over every template)."""
    from megacoca.data.source_text import LabelText
    from megacoca.data.tokenizer import load_tokenizer
    from megacoca.eval.labelled import direct, zeroshot_labelled
    from megacoca.eval.zeroshot import class_embeddings, topk_accuracy, zeroshot_logits

    root, tokenizer, model = setup
    out = tmp_path / "eval.json"
    code = cli(["eval", "--checkpoint", str(root / "run" / "checkpoints"), "--shards", str(label_set / "val"),
                "--tokenizer", tokenizer, "--class-names", str(label_set / "classnames.txt"), "--templates",
                str(label_set / "templates.txt"), "--label-field", "cls", "--out", str(out), "--batch-size", "7"])
    assert code == 0
    results = json.loads(out.read_text())
    tok = load_tokenizer(tokenizer, 16)
    rule = LabelText(shapes.CLASS_NAMES, list(shapes.LABEL_TEMPLATES))
    expected = zeroshot_labelled(direct(model.eval()), tok, str(label_set / "val"), rule, 32)
    for key in ("zeroshot_top1", "zeroshot_top5", "num_samples", "num_skipped", "num_classes", "num_templates"):
        assert results[key] == expected[key], key
    from megacoca.data.shard_reader import iter_samples
    from megacoca.data.transforms import ImageTransform, load_image

    raws = list(iter_samples(str(label_set / "val")))
    images = torch.stack([ImageTransform(32, train=False)(load_image(raw["jpg"], 32)) for raw in raws])
    labels = torch.tensor([int(raw["cls"]) for raw in raws])
    with torch.no_grad():
        logits = zeroshot_logits(model.encode_image(images, normalize=True),
                                 class_embeddings(model, tok, shapes.CLASS_NAMES,
                                                  [t.replace("{c}", "{}") for t in shapes.LABEL_TEMPLATES]))
    reference = topk_accuracy(logits, labels, (1, 5))
    assert results["zeroshot_top1"] == pytest.approx(reference[1], abs=1e-6)
    assert results["zeroshot_top5"] == pytest.approx(reference[5], abs=1e-6)
    assert results["num_samples"] == 30 and results["num_classes"] == 24 and results["shards"] == str(label_set / "val")
    printed = capsys.readouterr().out
    assert "zero-shot top-5" in printed and f"{results['zeroshot_top5']:.3f}" in printed


def test_eval_cli_evaluates_every_named_set_of_a_config(setup, label_set, tmp_path, capsys):
    root, tokenizer, _ = setup
    config = tmp_path / "sets.yaml"
    config.write_text(
        "eval:\n  val_sources:\n"
        f"    - {{name: shapes_labels, shards: {label_set / 'val'}, text: labels, max_samples: 12,\n"
        f"       class_names: {label_set / 'classnames.txt'}, templates: {label_set / 'templates.txt'}}}\n"
        f"    - {{name: shapes_captions, shards: {root / 'val'}, max_samples: 20}}\n")
    out = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", str(root / "run" / "checkpoints"), "--config", str(config), "--tokenizer",
                tokenizer, "--out", str(out), "--max-new-tokens", "4", "--caption-samples", "3"]) == 0
    results = json.loads(out.read_text())
    assert list(results["sources"]) == ["shapes_labels", "shapes_captions"]
    labels, captions = results["sources"]["shapes_labels"], results["sources"]["shapes_captions"]
    assert labels["num_samples"] == 12 and 0 <= labels["zeroshot_top5"] <= 1
    assert captions["num_samples"] == 20 and "i2t_r1" in captions and captions["zeroshot_top1"] is not None
    printed = capsys.readouterr().out
    assert "== shapes_labels ==" in printed and "== shapes_captions ==" in printed


def test_eval_cli_labelled_set_bad_input_is_one_line(setup, label_set, tmp_path, capsys):
    from webdataset import TarWriter

    root, tokenizer, _ = setup
    base = ["eval", "--checkpoint", str(root / "run" / "checkpoints"), "--tokenizer", tokenizer]
    names, templates = str(label_set / "classnames.txt"), str(label_set / "templates.txt")
    labelled = base + ["--shards", str(label_set / "val")]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "no_slot.txt").write_text("a photo of a {c}\na photo\n")
    out_of_range = tmp_path / "bad"
    out_of_range.mkdir()
    with TarWriter(str(out_of_range / "00000.tar"), mtime=0) as writer:
        for index in range(3):
            writer.write({"__key__": f"k{index}", "jpg": b"never decoded: the labels are refused first",
                          "cls": b"24"})
    no_sources = tmp_path / "none.yaml"
    no_sources.write_text("eval: {every: 0}\n")
    cases = [
        (labelled + ["--class-names", str(tmp_path / "missing.txt"), "--templates", templates],
         "argument --class-names: class names file not found"),
        (labelled + ["--class-names", str(tmp_path / "empty.txt"), "--templates", templates],
         "lists no class names"),
        (labelled + ["--class-names", names, "--templates", str(tmp_path / "no_slot.txt")],
         "'a photo' has no '{}' or '{c}'"),
        (labelled + ["--class-names", names], "--class-names and --templates go together"),
        (labelled + ["--label-field", "cls"], "--label-field needs --class-names"),
        (labelled + ["--class-names", names, "--templates", templates, "--label-field", "label"],
         "none of the first 30 samples has a valid label in the .json field 'label'"),
        (base + ["--shards", str(out_of_range), "--class-names", names, "--templates", templates],
         "none of the first 3 samples has a valid label in the .cls file (bad_label 3; 24 classes"),
        (labelled + ["--class-names", names, "--templates", templates, "--generative-zeroshot"],
         "--generative-zeroshot scores synth-shapes captions"),
        (base, "nothing to evaluate: give --shards"),
        (base + ["--config", str(no_sources)], "has no eval.val_sources"),
        (labelled + ["--config", str(no_sources)], "give --config, or --shards"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert err.startswith("megacoca eval: error: "), err
