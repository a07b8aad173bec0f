"""The streaming safetensors writer, the open_clip stream adapter and the one loader on model directories: what
the exports are built from (real DeepSpeed checkpoints: tests/distributed/test_loader.py; open_clip loading the
exported directory: tests/interop/test_deepspeed_export.py)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import megacoca
from megacoca.checkpoint import BadCheckpointError
from megacoca.checkpoint.loader import open_source
from megacoca.cli import main as cli
from megacoca.models.coca import CoCa, get_flavor
from megacoca.models.coca.loading import save_pretrained, write_safetensors

OVERRIDES = dict(image_size=32, patch_size=8, vocab_size=64, context_length=16, kernels="torch")


def test_write_safetensors_streams_any_order_and_dtypes(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(4), "d": torch.zeros(0, 2),
               "e": torch.tensor(2.5)}
    spec = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    spec["a"] = ((3, 5), torch.bfloat16)  # cast as it is written
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, spec, reversed(list(tensors.items())), metadata={"format": "pt", "note": "x"})
    back = load_file(path)
    assert set(back) == set(tensors) and back["a"].dtype == torch.bfloat16
    assert torch.equal(back["a"], tensors["a"].bfloat16())
    assert all(torch.equal(back[name], tensors[name]) for name in "bcde")


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape", "twice"])
def test_write_safetensors_leaves_nothing_when_the_stream_is_wrong(tmp_path, problem):
    tensors = [("a", torch.ones(2)), ("b", torch.ones(3))]
    spec = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    stream = {"missing": tensors[:1], "unexpected": tensors + [("c", torch.ones(1))],
              "shape": [tensors[0], ("b", torch.ones(4))], "twice": tensors + tensors[:1]}[problem]
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match={"missing": "missing b", "unexpected": "c is not a tensor",
                                          "shape": "b has shape", "twice": "a came twice"}[problem]):
        write_safetensors(str(path), spec, stream)
    assert os.listdir(tmp_path) == []


def test_to_open_clip_stream_is_to_open_clip():
    from megacoca.models.coca.open_clip import (
        config_from_open_clip, open_clip_shapes, to_open_clip, to_open_clip_stream,
    )
    tiny = {"embed_dim": 32, "custom_text": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 16, "patch_size": 8,
                           "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 9},
            "text_cfg": {"context_length": 14, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1,
                         "embed_cls": True},
            "multimodal_cfg": {"context_length": 14, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    cfg = config_from_open_clip(tiny, kernels="torch")  # open_clip itself is not needed for a config dict
    state = CoCa(cfg).state_dict()
    expected = to_open_clip(state, cfg)
    streamed = dict(to_open_clip_stream(reversed(list(state.items())), cfg))
    assert set(streamed) == set(expected) and all(torch.equal(streamed[k], v) for k, v in expected.items())
    assert open_clip_shapes(cfg) == {k: tuple(v.shape) for k, v in expected.items()}
    with pytest.raises(KeyError, match="missing logit_scale"):
        list(to_open_clip_stream([(k, v) for k, v in state.items() if k != "logit_scale"], cfg))


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = CoCa(get_flavor("coca_tiny", **OVERRIDES, tie_word_embeddings=True))
    return save_pretrained(model, tmp_path / "model"), model


def test_load_and_convert_a_model_directory(model_dir, tmp_path):
    directory, model = model_dir
    assert json.loads(open(os.path.join(directory, "config.json")).read())["dtype"] == "float32"
    assert "caption_head.weight" not in load_file(os.path.join(directory, "model.safetensors"))  # tied: stored once
    loaded = megacoca.load(directory, dtype=torch.bfloat16)
    assert loaded.caption_head.weight is loaded.text.embed.token_embedding.weight
    assert all(torch.equal(loaded.state_dict()[k], v.bfloat16()) for k, v in model.state_dict().items())
    # from-deepspeed's writer takes any source the loader opens: a model directory re-written in bf16
    from megacoca.checkpoint.export import export_model_directory

    export_model_directory(directory, str(tmp_path / "half"), dtype="bf16")
    half = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_truncated_or_missing_weights_file_is_one_line(model_dir, tmp_path, capsys):
    directory, _ = model_dir
    weights = os.path.join(directory, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(BadCheckpointError) as info:
        megacoca.load(directory)
    assert str(info.value).startswith(f"cannot read {weights}: ") and "\n" not in str(info.value)

    from megacoca.data import shapes

    shapes.write_split(str(tmp_path), "val", 4, image_size=32, shard_size=4)
    assert cli(["eval", "--checkpoint", directory, "--shards", str(tmp_path / "val"), "--tokenizer", "clip-bpe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot read {weights}: " in err, err
    assert cli(["convert", "from-deepspeed", "--input", directory, "--output", str(tmp_path / "o")]) == 2
    assert "has no COMPLETE marker" in capsys.readouterr().err  # a model directory is not a DeepSpeed checkpoint

    os.remove(weights)
    with pytest.raises(BadCheckpointError, match=f"{weights} is missing"):
        megacoca.load(directory)


def test_open_source_says_what_a_path_is_not(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        open_source(tmp_path / "nope")
    (tmp_path / "f.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file: give the model directory"):
        open_source(tmp_path / "f.pt")
    with pytest.raises(FileNotFoundError, match="neither a model directory .* an open_clip directory .* nor a "
                                                 "DeepSpeed checkpoint"):
        open_source(tmp_path)
