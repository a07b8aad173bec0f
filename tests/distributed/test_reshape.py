"""Resume under another layout (megacoca.checkpoint.reshape), round trips through the trainer on gloo ranks.

Each round trip: run A trains at layout L1 and checkpoints; run B resumes A's checkpoint at layout L2; run C
resumes B's at L1 again. Right after each resume the run saves: the full training state of that save (fp32 masters
and both Adam moments per single-device parameter, megacoca.checkpoint.full_state) equals the loaded checkpoint's
bit for bit, and so do Adam's step, the lr schedule and the step. Then each run trains on, and its losses equal
A's (which kept its layout) at every step to 2e-6 relative in fp32: the layouts are chosen so that each
contrastive group (micro-batch x dp) and each global batch hold the same samples, so only the reduction order
differs. The data position is re-split: every run consumes exactly the global batches A does.
"""

import os
import subprocess
import sys

import pytest
import torch
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, MemoryLoader

from megacoca.checkpoint.full_state import KINDS, adam_step, iter_full_state
from megacoca.checkpoint.reshape import read_training_state
from megacoca.checkpoint.tags import open_tag
from megacoca.config.recipes import build_config
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

CFG = TINY.replace(vision_layers=2, vision_heads=2, text_heads=2)
STEPS = 24  # A's steps; B resumes A at step 2 and C resumes B at step 4: 20 steps continued after each reshape


def _run(rank, world_size, run_dir, layout, steps, resume, cfg=None):
    cfg = cfg or CFG
    ds, tp, pp, micro = layout["ds"], layout.get("tp", 1), layout.get("pp", 1), layout["micro"]
    overrides = [f"parallel.deepspeed_config={ds}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                 f"schedule.steps={steps}", "schedule.global_batch_size=8", f"schedule.micro_batch_size={micro}",
                 "schedule.warmup_steps=3", "optim.lr=3e-3", "optim.grad_clip=1.0", "checkpoint.every=2",
                 "checkpoint.keep=0", f"checkpoint.resume={resume}", f"logging.run_dir={run_dir}",
                 "logging.tensorboard=false", "logging.log_every=1", SHARD_ALL]
    if "stage" in layout:
        overrides.append(f"parallel.deepspeed_overrides.zero_optimization.stage={layout['stage']}")
    job = build_config(overrides=overrides)
    job.model.overrides = cfg.to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    loader = MemoryLoader(micro, dims.dp_rank, dims.dp_size, cfg)
    trainer = Trainer(job, loader, dims=dims)
    messages = []
    info = trainer.logger.info
    trainer.logger.info = lambda text: (messages.append(text), info(text))
    resumed = trainer.resume()
    if resumed:
        trainer.save()  # the state as loaded, to compare with the source checkpoint
    history = trainer.train()
    trainer.close()
    return {"loss": {r["step"]: r["loss"] for r in history}, "position": loader.position, "dp": dims.dp_size,
            "micro": micro,
            "lr": {r["step"]: r["lr"] for r in history},
            "reshaped": [m for m in messages if m.startswith("resumed from") and "reshaped" in m]}


def _tag(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step{step:08d}")


def _assert_same_state(source, copy):
    expected, got = dict(iter_full_state(source)), dict(iter_full_state(copy))
    assert expected.keys() == got.keys()
    for name, kinds in expected.items():
        for kind in KINDS:
            assert torch.equal(kinds[kind], got[name][kind]), (name, kind)
    assert adam_step(source) == adam_step(copy)
    a, b = (read_training_state(*open_tag(path)) for path in (source, copy))
    assert (a.step, a.global_steps, a.global_samples, a.skipped_steps) == \
           (b.step, b.global_steps, b.global_samples, b.skipped_steps)
    assert a.lr_scheduler["last_epoch"] == b.lr_scheduler["last_epoch"]
    assert a.lr_scheduler["_last_lr"] == b.lr_scheduler["_last_lr"]


def _world(layout):
    return layout["dp"] * layout.get("tp", 1) * layout.get("pp", 1)


def _world_dp(ran):
    return ran["dp"] * ran["micro"]  # samples per micro-batch position over the data-parallel ranks


def _chain(tmp_path, layouts, rel):
    """Run 0 trains at layouts[0]; run i resumes run i-1's checkpoint of step 2i at layouts[i]. Returns the largest
    relative loss difference from run 0 over the continued steps."""
    runs, dirs = [], []
    for i, layout in enumerate(layouts):
        dirs.append(str(tmp_path / f"run{i}"))
        resume = _tag(dirs[i - 1], 2 * i) if i else "none"
        runs.append(run_ranks(_run, _world(layout), tmp_path, dirs[i], layout, STEPS, resume)[0])
    first, worst = runs[0], 0.0
    for i, ran in enumerate(runs[1:], start=1):
        assert len(ran["reshaped"]) == 1, ran["reshaped"]
        _assert_same_state(_tag(dirs[i - 1], 2 * i), _tag(dirs[i], 2 * i))
        assert sorted(ran["loss"]) == list(range(2 * i + 1, STEPS + 1))
        assert ran["position"] * _world_dp(ran) == first["position"] * _world_dp(first)  # the same global batches
        for step, loss in ran["loss"].items():
            assert loss == pytest.approx(first["loss"][step], rel=rel), (i, step, loss, first["loss"][step])
            assert ran["lr"][step] == pytest.approx(first["lr"][step], rel=1e-12)
            worst = max(worst, abs(loss - first["loss"][step]) / abs(first["loss"][step]))
    print(f"largest relative loss difference from the run that kept its layout: {worst:.2e}")
    return worst


FP32, BF16 = "zero0_fp32", "zero1_bf16"
ZERO1 = {"ds": FP32, "stage": 1}
ZERO3 = {"ds": "zero3_fp32"}


@pytest.mark.parametrize("layouts", [
    # TP 2 -> 1 -> 2 (TP=1 on two ranks is dp=2), ZeRO-1
    [dict(ZERO1, dp=1, tp=2, micro=8), dict(ZERO1, dp=2, micro=4), dict(ZERO1, dp=1, tp=2, micro=8)],
    # PP 2 -> 1 -> 2, with ZeRO-1 -> ZeRO-3 -> ZeRO-1
    [dict(ZERO1, dp=1, pp=2, micro=4), dict(ZERO3, dp=2, micro=2), dict(ZERO1, dp=1, pp=2, micro=4)],
    # DP 2 -> 4 -> 1 under ZeRO-3, and under ZeRO-1
    pytest.param([dict(ZERO3, dp=2, micro=4), dict(ZERO3, dp=4, micro=2), dict(ZERO3, dp=1, micro=8)],
                 marks=pytest.mark.slow),  # ~12 s; its ZeRO-1 twin below stays in the fast set
    [dict(ZERO1, dp=2, micro=4), dict(ZERO1, dp=4, micro=2), dict(ZERO1, dp=1, micro=8)],
    # ZeRO-0 (a client torch optimizer) -> TP=2 under ZeRO-3 -> ZeRO-2
    [dict(ds=FP32, dp=2, micro=4), dict(ZERO3, dp=1, tp=2, micro=8), dict(ds=FP32, stage=2, dp=2, micro=4)],
], ids=["tp2-tp1-tp2", "pp2-pp1-pp2", "zero3-dp2-dp4-dp1", "zero1-dp2-dp4-dp1", "zero0-tp2zero3-zero2"])
def test_reshaped_runs_continue_as_the_original(tmp_path, layouts):
    _chain(tmp_path, layouts, rel=2e-6)


@pytest.mark.slow  # ~6 s: make test runs it
def test_bf16_reshape(tmp_path):
    """bf16 weights are rounded from the exact fp32 masters as a step rounds them; the continued losses differ from
    the original run's by bf16 reduction-order noise only."""
    _chain(tmp_path, [dict(ds=BF16, dp=1, tp=2, micro=8), dict(ds="zero3_bf16", dp=2, micro=4)], rel=5e-3)


@pytest.mark.slow  # ~6 s: make test runs it
def test_a_precision_change_at_the_same_layout_is_reshaped(tmp_path):
    """bf16 -> fp32 -> bf16 at the same dp=2 ZeRO-1: DeepSpeed's own loader would look for the other precision's
    file names; the reshape path loads the fp32 masters and moments exactly (the state as loaded equals the
    checkpoint's bit for bit) and the continued losses follow the original run's within bf16 rounding."""
    _chain(tmp_path, [dict(ds=BF16, dp=2, micro=4), dict(ZERO1, dp=2, micro=4), dict(ds=BF16, dp=2, micro=4)],
           rel=2e-2)


@pytest.mark.slow  # ~9 s: make test runs it
def test_offline_reshape_through_the_cli(tmp_path, capsys):
    """`megacoca convert reshape` of a ZeRO-3 dp=2 checkpoint, resumed at TP=2 under ZeRO-1; a tensor degree the
    model cannot split is refused with one line."""
    from megacoca.cli import main as cli

    first, second = dict(ZERO3, dp=2, micro=4), dict(ZERO1, dp=1, tp=2, micro=8)
    source, reshaped, resumed = (str(tmp_path / name) for name in ("source", "reshaped", "resumed"))
    original = run_ranks(_run, 2, tmp_path, source, first, STEPS, "none")[0]
    assert cli(["convert", "reshape", "--input", _tag(source, 2), "--output", reshaped, "--tp", "2"]) == 0
    printed = capsys.readouterr().out
    assert "dp=2 x pp=1 x tp=1 ZeRO-3" in printed and "--set parallel.tp=2" in printed
    ran = run_ranks(_run, 2, tmp_path, resumed, second, STEPS, reshaped)[0]
    assert "reshaped dp=2 x pp=1 x tp=1 ZeRO-3 -> dp=1 x pp=1 x tp=2 ZeRO-1" in ran["reshaped"][0]
    _assert_same_state(_tag(source, 2), _tag(resumed, 2))
    for step, loss in ran["loss"].items():
        assert loss == pytest.approx(original["loss"][step], rel=2e-6), step

    # the one loader reads the layout-free directory too: the weights equal the source checkpoint's
    import megacoca

    want, got = megacoca.load(_tag(source, 2)).state_dict(), megacoca.load(reshaped).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert cli(["convert", "from-deepspeed", "--input", reshaped, "--output", str(tmp_path / "exported")]) == 0
    assert "layout-free (from dp=2 x pp=1 x tp=1 ZeRO-3)" in (tmp_path / "exported" / "config.json").read_text()

    # --tp that does not divide the heads: one line naming the layer (a subprocess: the real exit and stderr)
    result = subprocess.run([sys.executable, "-m", "megacoca", "convert", "reshape", "--input", _tag(source, 2),
                             "--output", str(tmp_path / "bad"), "--tp", "3"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "parallel.tp=3 cannot split" in result.stderr


class _CharTokenizer:
    """Picklable: one id per character, within TINY's vocabulary (bos 1, eos 2, pad 0)."""

    context_length, vocab_size, pad_id = CFG.context_length, CFG.vocab_size, 0

    def encode(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1] + [3 + ord(c) % (self.vocab_size - 3) for c in text][: self.context_length - 2] + [2]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def _shard_run(rank, world_size, run_dir, shards, layout, steps, resume):
    from megacoca.data.shards import ShardLoader
    from megacoca.data.transforms import ImageTransform

    class Recording(ShardLoader):
        keys: list = []

        def __iter__(self):
            for batch in super().__iter__():
                self.keys.append(list(batch["keys"]))
                yield batch

    tp, micro = layout.get("tp", 1), layout["micro"]
    job = build_config(overrides=[
        f"parallel.deepspeed_config={layout['ds']}", f"parallel.tp={tp}", f"schedule.steps={steps}",
        "schedule.global_batch_size=8", f"schedule.micro_batch_size={micro}", "schedule.warmup_steps=1",
        "checkpoint.every=2", "checkpoint.keep=0", f"checkpoint.resume={resume}", f"logging.run_dir={run_dir}",
        "logging.tensorboard=false", SHARD_ALL]
        + ([f"parallel.deepspeed_overrides.zero_optimization.stage={layout['stage']}"] if "stage" in layout else []))
    job.model.overrides = CFG.to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    loader = Recording(shards, micro, _CharTokenizer(), ImageTransform(CFG.image_size, train=True),
                       dp_rank=dims.dp_rank, dp_size=dims.dp_size, num_workers=layout.get("workers", 0), seed=3,
                       shuffle_buffer=4)
    trainer = Trainer(job, loader, dims=dims)
    trainer.resume()
    trainer.train()
    trainer.close()
    return {"keys": loader.keys, "dp_rank": dims.dp_rank, "tp_rank": dims.tp_rank}


def test_data_position_is_resplit(tmp_path):
    """Real webdataset shards (12 of 8 samples: one epoch is 12 steps of 8): 2 steps at dp=2 (each rank reading
    shards of its own), then a resume at dp=1 x tp=2 to step 12 reads the other 80 samples of the epoch, each
    once, whichever shards the first ranks had half read."""
    from megacoca.data.shapes import write_split

    shards = str(tmp_path / "shapes" / "train")
    write_split(str(tmp_path / "shapes"), "train", 96, image_size=CFG.image_size, shard_size=8)
    first, second = dict(ZERO1, dp=2, micro=4), dict(ZERO1, dp=1, tp=2, micro=8)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ran_a = run_ranks(_shard_run, 2, tmp_path, a, shards, first, 2, "none")
    ran_b = run_ranks(_shard_run, 2, tmp_path, b, shards, second, 12, _tag(a, 2))
    before = [key for ran in ran_a for batch in ran["keys"] for key in batch]
    after = [key for batch in ran_b[0]["keys"] for key in batch]
    assert ran_b[1]["keys"] == ran_b[0]["keys"]  # the two tensor ranks read the same batches
    assert len(before) == 16 and len(after) == 80
    assert not set(before) & set(after)
    assert len(set(before + after)) == 96


def _resume_error(rank, world_size, run_dir, layout, resume, cfg):
    from megacoca.checkpoint import CheckpointError

    job = build_config(overrides=[
        f"parallel.deepspeed_config={layout['ds']}", f"parallel.tp={layout.get('tp', 1)}", "schedule.steps=24",
        "schedule.global_batch_size=8", f"schedule.micro_batch_size={layout['micro']}",
        f"checkpoint.resume={resume}", f"logging.run_dir={run_dir}", "logging.tensorboard=false"])
    job.model.overrides = cfg.to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(layout["micro"], dims.dp_rank, dims.dp_size, cfg), dims=dims)
    try:
        trainer.resume()
    except CheckpointError as error:
        return str(error)
    finally:
        trainer.close()
    return None


def test_bad_checkpoints_are_one_line(tmp_path, capsys):
    """A source missing a rank's megacoca file, a layout-free checkpoint missing or with a truncated parameter
    file, and one of another model: each refused with one line naming the file or the parameter."""
    from megacoca.cli import main as cli

    source, out = str(tmp_path / "source"), str(tmp_path / "out")
    run_ranks(_run, 2, tmp_path, source, dict(ZERO1, dp=2, micro=4), 2, "none")
    tag = _tag(source, 2)
    assert cli(["convert", "reshape", "--input", tag, "--output", out, "--tp", "1"]) == 0
    layout_free = os.path.join(out, "step00000002")
    capsys.readouterr()

    os.rename(os.path.join(tag, "megacoca_rank00001.pt"), os.path.join(tmp_path, "moved.pt"))
    assert cli(["convert", "reshape", "--input", tag, "--output", str(tmp_path / "x"), "--tp", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and os.path.join(tag, "megacoca_rank00001.pt") + " (rank 1's data position" in err, err

    one = dict(ZERO1, dp=1, micro=8)
    weight = os.path.join(layout_free, "zero", "logit_scale", "exp_avg.pt")
    data = open(weight, "rb").read()
    open(weight, "wb").write(data[: len(data) // 2])
    error = run_ranks(_resume_error, 1, tmp_path, str(tmp_path / "r1"), one, out, CFG)[0]
    assert error is not None and "\n" not in error and weight in error, error
    os.remove(weight)
    error = run_ranks(_resume_error, 1, tmp_path, str(tmp_path / "r2"), one, out, CFG)[0]
    assert error == f"{layout_free} is incomplete: {weight} is missing", error
    open(weight, "wb").write(data)

    other = CFG.replace(text_mlp_dim=96)
    error = run_ranks(_resume_error, 1, tmp_path, str(tmp_path / "r3"), one, out, other)[0]
    assert error is not None and "the model configs differ" in error and "\n" not in error, error


def test_tied_head_round_trip(tmp_path):
    """A model whose caption head is the token embedding (coca_giant's layout): reshaped TP=2 -> DP=2 and back into
    a model through the layout-free directory, the head under both names."""
    import megacoca
    from megacoca.cli import main as cli

    tied = CFG.replace(tie_word_embeddings=True)
    source, reshaped = str(tmp_path / "source"), str(tmp_path / "reshaped")
    run_ranks(_run, 2, tmp_path, source, dict(ZERO1, dp=1, tp=2, micro=8), 2, "none", tied)
    ran = run_ranks(_run, 2, tmp_path, str(tmp_path / "dp2"), dict(ZERO1, dp=2, micro=4), 4, _tag(source, 2), tied)[0]
    assert ran["reshaped"] and sorted(ran["loss"]) == [3, 4]
    _assert_same_state(_tag(source, 2), _tag(str(tmp_path / "dp2"), 2))
    assert cli(["convert", "reshape", "--input", _tag(source, 2), "--output", reshaped, "--tp", "1"]) == 0
    model = megacoca.load(reshaped)
    assert model.caption_head.weight is model.text.embed.token_embedding.weight
    want = megacoca.load(_tag(source, 2)).state_dict()
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
