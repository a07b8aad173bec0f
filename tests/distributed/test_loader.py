"""The one loader and the streaming export on real checkpoints of three layouts (ZeRO-3 bf16 at dp=2 with a tied
vocabulary head, ZeRO-1 bf16 at pp=2, ZeRO-0 fp32 at tp=2): `megacoca convert from-deepspeed` writes exactly the
consolidated master weights (fp32) or their bf16 rounding, and `megacoca.load` builds the same model; a checkpoint
missing one rank's file, or holding a truncated one, is refused by convert, eval and `megacoca.load` with one
line naming the file."""

import os
import shutil

import pytest
import torch
from dist_harness import run_ranks
from memory_data import TINY, MemoryLoader

import megacoca
from megacoca.checkpoint import BadCheckpointError, consolidated_state_dict
from megacoca.cli import main as cli

# name: (DeepSpeed config, tp, pp, model overrides)
LAYOUTS = {
    "zero3_dp2": ("zero3_bf16", 1, 1, {"tie_word_embeddings": True}),
    "zero1_pp2": ("zero1_bf16", 1, 2, {}),
    "zero0_tp2": ("zero0_fp32", 2, 1, {}),
}


def _train(rank, world_size, run_dir, ds_name, tp, pp, overrides):
    from megacoca.config.recipes import build_config
    from megacoca.parallel.dims import ParallelDims
    from megacoca.trainer import Trainer

    job = build_config(overrides=[
        f"parallel.deepspeed_config={ds_name}", "schedule.steps=1", "schedule.global_batch_size=4",
        "schedule.micro_batch_size=2", f"parallel.tp={tp}", f"parallel.pp={pp}", "checkpoint.save_final=true",
        f"logging.run_dir={run_dir}", "logging.tensorboard=false",
        "parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"])
    job.model.overrides = TINY.replace(vision_layers=2, **overrides).to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size, job.model_config()), dims=dims)
    trainer.train()
    trainer.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    for name, (ds_name, tp, pp, overrides) in LAYOUTS.items():
        os.makedirs(root / name)
        run_ranks(_train, 2, root / name, str(root / name / "run"), ds_name, tp, pp, overrides, timeout=120)
    from megacoca.data import shapes

    shapes.write_split(str(root), "val", 4, image_size=32, shard_size=4)
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_streaming_export_is_the_consolidated_model(checkpoints, tmp_path, layout):
    from safetensors.torch import load_file

    source = str(checkpoints / layout / "run" / "checkpoints")
    expected = consolidated_state_dict(source)
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert cli(["convert", "from-deepspeed", "--input", source, "--output", str(out), "--dtype", dtype]) == 0
        written = load_file(str(out / "model.safetensors"))
        tied = LAYOUTS[layout][3].get("tie_word_embeddings", False)
        assert set(written) == set(expected) - ({"caption_head.weight"} if tied else set())
        for name, tensor in written.items():
            assert torch.equal(tensor, expected[name].to(torch.bfloat16 if dtype == "bf16" else torch.float32)), name
    model = megacoca.load(source)  # the checkpoint itself, through the same loader
    assert not model.training and model.cfg.tie_word_embeddings == tied
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    if tied:
        assert model.caption_head.weight is model.text.embed.token_embedding.weight


BROKEN = [  # (layout, file, how)
    ("zero3_dp2", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "missing"),  # dp rank 1's fp32 partition
    ("zero3_dp2", "zero_pp_rank_0_mp_rank_00_model_states.pt", "missing"),
    ("zero1_pp2", "mp_rank_01_model_states.pt", "missing"),  # pipeline stage 1
    ("zero0_tp2", "mp_rank_01_model_states.pt", "missing"),  # tensor-parallel rank 1
    ("zero3_dp2", "zero_pp_rank_0_mp_rank_00_model_states.pt", "truncated"),
    ("zero1_pp2", "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt", "truncated"),
]


@pytest.mark.parametrize("layout, name, how", BROKEN, ids=[f"{h}-{l}-{n.split('_states')[0]}" for l, n, h in BROKEN])
def test_a_broken_checkpoint_is_one_line_naming_the_file(checkpoints, tmp_path, capsys, layout, name, how):
    shutil.copytree(checkpoints / layout / "run" / "checkpoints", tmp_path / "checkpoints")
    tag_dir = tmp_path / "checkpoints" / "step00000001"
    path = str(tag_dir / name)
    if how == "missing":
        os.remove(path)
    else:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    said = f"{path} is missing" if how == "missing" else f"cannot read {path}: "

    code = cli(["convert", "from-deepspeed", "--input", str(tmp_path / "checkpoints"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("megacoca convert from-deepspeed: error: ") and said in err, err
    assert not (tmp_path / "o").exists()

    code = cli(["eval", "--checkpoint", str(tmp_path / "checkpoints"), "--shards", str(checkpoints / "val"),
                "--tokenizer", "clip-bpe"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and said in err, err

    with pytest.raises(BadCheckpointError, match="is missing" if how == "missing" else "cannot read") as info:
        megacoca.load(tag_dir)
    assert path in str(info.value) and "\n" not in str(info.value)
