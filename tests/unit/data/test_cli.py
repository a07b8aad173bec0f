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
