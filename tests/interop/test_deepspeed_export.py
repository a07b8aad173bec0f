"""A 2-rank ZeRO-3 megacoca run (open_clip layout) exports to a model directory and loads into open_clip."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

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
    """from-deepspeed gives exactly the trained weights (fp32) or their bf16 rounding; to-open-clip writes a
    directory that open_clip's own create_model_and_transforms("local-dir:...") loads, with the same image and
    text features and caption logits as megacoca's model, its preprocessing and its tokenizer."""
    import megacoca
    from megacoca.data.transforms import ImageTransform

    job = job_config(tmp_path, OPEN_CLIP_TINY)
    run_ranks(train_and_gather, 2, tmp_path, job.to_dict(), str(tmp_path / "gathered.pt"), timeout=90)
    reference = torch.load(tmp_path / "gathered.pt", weights_only=True)
    checkpoints = tmp_path / "run" / "checkpoints"

    directory, half = tmp_path / "exported", tmp_path / "exported_bf16"
    assert cli(["convert", "from-deepspeed", "--input", str(checkpoints), "--output", str(directory)]) == 0
    assert cli(["convert", "from-deepspeed", "--input", str(checkpoints), "--output", str(half),
                "--dtype", "bf16"]) == 0
    config = json.loads((directory / "config.json").read_text())
    assert config["source"]["step"] == 2 and config["tokenizer"]["spec"] == "clip-bpe"
    assert config["dtype"] == "float32" and json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = megacoca.load(directory)
    state, state_bf16 = loaded.state_dict(), megacoca.load(half).state_dict()
    assert set(state) == set(reference) == set(state_bf16)
    for name, tensor in reference.items():  # the export is exactly the trained (gathered) weights
        assert torch.equal(state[name], tensor.float()), name
        assert state_bf16[name].dtype == torch.bfloat16 and torch.equal(state_bf16[name], tensor.bfloat16()), name
    assert not torch.equal(reference["logit_scale"], torch.full((1,), loaded.cfg.init_logit_scale)), "not trained?"

    # From the model directory and straight from the DeepSpeed checkpoint: the same open_clip directory.
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    text[0, 7:] = 0
    with torch.no_grad():
        ours = loaded(images, text)
    for source, name in ((directory, "open_clip_dir"), (checkpoints, "open_clip_from_ds")):
        out = tmp_path / name
        assert cli(["convert", "to-open-clip", "--input", str(source), "--output", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
        theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
        theirs.eval()
        with torch.no_grad():
            got = theirs(images, text)
        for key in ("image_features", "text_features", "logits"):
            torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-5 * ours[key].abs().max().item())
        # open_clip's eval preprocessing is megacoca's (an image at the model's size: no resampling involved)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        torch.testing.assert_close(preprocess(image), ImageTransform(32, train=False)(image), rtol=0, atol=1e-5)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
        captions = ["a red circle", "two blue squares"]
        assert torch.equal(tokenizer(captions), megacoca.load_tokenizer(loaded).encode(captions))
    # megacoca reads the open_clip directory back: the same tensors.
    back = megacoca.load(tmp_path / "open_clip_dir").state_dict()
    assert all(torch.equal(back[name], tensor) for name, tensor in state.items())


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
