import json
import os

from PIL import Image

from megacoca.cli import main
from megacoca.data.shards import iter_samples
from megacoca.data.tokenizer import load_tokenizer


def test_synth_shapes_then_tokenizer_train_and_encode(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "synth-shapes", "--out", str(out), "--train-samples", "80", "--val-samples", "24",
                 "--image-size", "32", "--seed", "1", "--shard-size", "40", "--workers", "1"]) == 0
    assert "images/s" in capsys.readouterr().out
    assert sorted(os.listdir(out / "train")) == ["00000.tar", "00001.tar"]
    assert json.load(open(out / "meta.json"))["val_samples"] == 24
    assert sum(1 for _ in iter_samples(str(out / "val"))) == 24

    prefix = tmp_path / "tok" / "shapes"
    assert main(["tokenizer", "train", "--shards", str(out / "train" / "{00000..00001}.tar"),
                 "--vocab-size", "200", "--output", str(prefix)]) == 0
    tok = load_tokenizer(str(prefix) + ".model", 32)
    assert tok.decode(tok.encode(["a small red circle left of a large blue square"])[0]) == \
        "a small red circle left of a large blue square"
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(prefix) + ".model", "a red circle"]) == 0
    assert json.loads(capsys.readouterr().out)["decoded"] == "a red circle"
    assert main(["data", "inspect", "--shards", str(out / "val"), "--show", "1"]) == 0
    assert "24 samples" in capsys.readouterr().out


def test_from_folder_cli(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.png")
    (images / "x.txt").write_text("a black square")
    assert main(["data", "from-folder", "--images", str(images), "--sidecar", "--out", str(tmp_path / "o"),
                 "--shard-size", "5"]) == 0
    assert "1 samples in 1 shards" in capsys.readouterr().out
    csv = tmp_path / "c.csv"
    csv.write_text("image,text\nx.png,hello\n")
    assert main(["data", "from-folder", "--images", str(images), "--captions", str(csv), "--out",
                 str(tmp_path / "o2")]) == 0


def test_missing_paths_are_one_line_errors(tmp_path, capsys):
    """Bad input is refused while the command line is parsed: one line, exit code 2 (tests/unit/config/
    test_bad_input.py holds the full table)."""
    missing = str(tmp_path / "none")
    assert main(["tokenizer", "train", "--shards", missing, "--vocab-size", "10", "--output",
                 str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"megacoca tokenizer train: error: argument --shards: shard not found: {missing}"
    assert main(["data", "from-folder", "--images", missing, "--sidecar", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"megacoca data from-folder: error: argument --images: images folder not found: {missing}"
    assert main(["tokenizer", "encode", "--tokenizer", missing + ".model", "hi"]) == 2
    assert main(["data"]) == 2


def test_synth_shapes_label_only_source_and_mixture_stats(tmp_path, capsys):
    """The captioned set and a label-only source beside it, then `data stats` of the two as a mixture: 80 captioned
    and 40 label-only train samples at weights 1 and 3 (shares 1/4, 3/4): an epoch of the captioned source costs
    320 mixture samples (the label source reads 6 epochs meanwhile), one of the label source 53."""
    out = tmp_path / "shapes"
    common = ["--val-samples", "24", "--image-size", "32", "--seed", "1", "--shard-size", "40", "--workers", "1"]
    assert main(["data", "synth-shapes", "--out", str(out / "captions"), "--train-samples", "80", *common]) == 0
    assert main(["data", "synth-shapes", "--out", str(out / "labels"), "--train-samples", "40", "--labels-only",
                 *common]) == 0
    printed = capsys.readouterr().out
    assert "40 train + 24 val label-only samples" in printed and "classnames.txt" in printed
    first = next(iter(iter_samples(str(out / "labels" / "train"))))
    assert "cls" in first and "txt" not in first
    assert len((out / "labels" / "classnames.txt").read_text().splitlines()) == 24

    assert main(["data", "stats", "--source", f"captions=1:{out / 'captions' / 'train'}",
                 "--source", f"labels=3:{out / 'labels' / 'train'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["captions", "2", "80", "1", "0.250", "320", "captions", "1,", "labels", "6"]
    assert lines[2].split() == ["labels", "1", "40", "3", "0.750", "53", "captions", "0.167,", "labels", "1"]
    assert lines[3] == "one epoch of every source: 320 mixture samples (set by 'captions')"

    config = tmp_path / "mix.yaml"
    config.write_text("schedule: {global_batch_size: 32, micro_batch_size: 16}\ndata:\n  sources:\n"
                      f"    - {{name: captions, shards: {out / 'captions' / 'train'}, weight: 1}}\n"
                      f"    - {{name: labels, shards: {out / 'labels' / 'train'}, weight: 3, text: labels,\n"
                      f"       class_names: {out / 'labels' / 'classnames.txt'},\n"
                      f"       templates: {out / 'labels' / 'templates.txt'}}}\n")
    assert main(["data", "stats", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "one epoch of every source: 320 mixture samples = 10.0 steps of global batch 32 (set by 'captions')"


def test_data_stats_and_label_only_bad_input(tmp_path, capsys):
    for argv, message in (
            (["data", "stats", "--source", "a=0:x"], "expected NAME=WEIGHT:SHARDS with a weight > 0"),
            (["data", "stats", "--source", f"a=1:{tmp_path / 'none'}"], "source 'a': shard not found"),
            (["data", "stats"], "one of the arguments --config --source is required"),
            (["data", "synth-shapes", "--out", str(tmp_path / "o"), "--labels-only", "--two-object-fraction", "0.3"],
             "a label-only set (--labels-only) holds single-object images only")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
