"""A 2-rank ZeRO-3 megacoca run (open_clip layout) exports to a model directory and loads into open_clip."""

import json

import pytest
import torch

import open_clip

from megacoca.cli import main as cli  # noqa: E402
from tests.distributed.dist_harness import run_ranks  # noqa: E402

# A tiny open_clip-layout model: every layout switch open_clip needs, widths open_clip can express.
OPEN_CLIP_TINY = dict(
    image_size=32, patch_size=8, vision_width=48, vision_layers=1, vision_heads=3, vision_mlp_dim=192,
    vision_class_token=True, pooler_layout="open_clip", caption_queries=9, pooler_heads=4, pooler_dim=32,
    vocab_size=64, context_length=12, text_width=32, text_heads=2, text_mlp_dim=128, text_layers=1,
    legacy_cls_mask=True, text_tokens_after_ln=False, decoder_layers=1, decoder_mlp_after_self_attn=True,
    embed_dim=32, kernels="torch",
)


def job_config(tmp_path, overrides: dict):
    from megacoca.config.train import JobConfig

    job = JobConfig()
    job.name = "export_test"
    job.model.flavor = "coca_tiny"
    job.model.overrides = dict(overrides)
    job.parallel.deepspeed_config = "zero3_fp32"
    job.schedule.steps, job.schedule.warmup_steps = 2, 0
    job.schedule.global_batch_size, job.schedule.micro_batch_size = 8, 4
    job.logging.run_dir = str(tmp_path / "run")
    job.logging.tensorboard = False
    job.checkpoint.save_final = True
    return job


def train_and_gather(rank, world_size, job_dict, reference_path):
    """Two ZeRO-3 steps through the Trainer, a checkpoint, then every full parameter gathered on rank 0."""
    import deepspeed

    from megacoca.config.train import JobConfig
    from megacoca.trainer import Trainer
    from tests.distributed.memory_data import MemoryLoader

    from megacoca.config.deepspeed import build_deepspeed_config

    job = JobConfig.from_dict(job_dict)
    cfg = job.model_config()
    ds_config = build_deepspeed_config(job, world_size)
    # Partition every parameter (the default threshold keeps a model this small whole on each rank).
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    trainer = Trainer(job, MemoryLoader(job.schedule.micro_batch_size, rank, world_size, cfg), ds_config=ds_config)
    trainer.train()
    trainer.close()
    module = trainer.engine.module
    params = dict(module.named_parameters())
    assert all(hasattr(p, "ds_shape") and p.numel() == 0 for p in params.values()), "expected ZeRO-3 partitioning"
    with deepspeed.zero.GatheredParameters(list(params.values())):
        full = {name: p.detach().clone() for name, p in params.items()}
    if rank == 0:  # through a file: tensors sent over the result queue die with the rank's process
        torch.save(full, reference_path)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_zero3_checkpoint_exports_to_open_clip(tmp_path):
    from megacoca.models.coca.loading import load_pretrained

    job = job_config(tmp_path, OPEN_CLIP_TINY)
    run_ranks(train_and_gather, 2, tmp_path, job.to_dict(), str(tmp_path / "gathered.pt"), timeout=90)
    reference = torch.load(tmp_path / "gathered.pt", weights_only=True)
    checkpoints = tmp_path / "run" / "checkpoints"

    directory = tmp_path / "exported"
    assert cli(["convert", "from-deepspeed", "--input", str(checkpoints), "--output", str(directory)]) == 0
    config = json.loads((directory / "config.json").read_text())
    assert config["source"]["step"] == 2 and config["tokenizer"]["spec"] == "clip-bpe"
    loaded = load_pretrained(directory)
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():  # the export is exactly the trained (gathered) weights
        assert torch.equal(state[name], tensor.float()), name
    assert not torch.equal(reference["logit_scale"], torch.full((1,), loaded.cfg.init_logit_scale)), "not trained?"

    exported = tmp_path / "open_clip" / "coca_export.pt"
    assert cli(["convert", "to-open-clip", "--input", str(directory), "--output", str(exported)]) == 0  # strict load
    open_clip.add_model_config(str(exported.with_suffix(".json")))
    theirs = open_clip.create_model("coca_export", pretrained=str(exported)).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    text[0, 7:] = 0
    with torch.no_grad():
        a, b = theirs(images, text), loaded(images, text)
    for key in ("image_features", "text_features", "logits"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5 * a[key].abs().max().item())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_zero3_paper_layout_exports_but_open_clip_is_refused(tmp_path):
    paper = {k: v for k, v in OPEN_CLIP_TINY.items() if k in (
        "image_size", "patch_size", "vocab_size", "context_length", "kernels")}
    paper.update(vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64, caption_queries=8,
                 pooler_heads=2, text_width=32, text_heads=2, text_mlp_dim=64, text_layers=1, decoder_layers=1,
                 embed_dim=32)
    job = job_config(tmp_path, paper)
    run_ranks(train_and_gather, 2, tmp_path, job.to_dict(), str(tmp_path / "gathered.pt"), timeout=90)
    directory = tmp_path / "exported"
    assert cli(["convert", "from-deepspeed", "--input", str(tmp_path / "run" / "checkpoints"),
                "--output", str(directory)]) == 0
    assert json.loads((directory / "config.json").read_text())["open_clip"] is None
    assert cli(["convert", "to-open-clip", "--input", str(directory), "--output", str(tmp_path / "x.pt")]) == 2
