"""Published CLIP / CoCa training runs that the planner's GPU presets are held to: each run's throughput, its model
as a CoCaConfig, its cluster and the layout its software ran. Shared by benchmarks/plan_published.py (the tables)
and tests/unit/plan/test_presets.py (the calibration point stays put).

Sources (public; figures as published):
- open_clip's scaling-law runs on JUWELS Booster (4 x A100-40GB and four 200 Gb/s HDR links per node):
  `trained_models_info.csv` of github.com/LAION-AI/scaling-laws-openclip ("Reproducible scaling laws for contrastive
  language-image learning", Cherti et al. 2023, arXiv 2212.07143): columns gpus, samples_per_sec, local_bs. open_clip
  of 2022: PyTorch DDP, AMP (fp32 weights and gradients), nn.MultiheadAttention without a fused attention kernel,
  webdataset shards read from the parallel file system.
- NVIDIA NeMo's CLIP ViT-g/14: the NeMo Framework user guide, "CLIP > Performance" (docs.nvidia.com/nemo-framework/
  user-guide/latest/multimodalmodels/visionlanguagefoundation/clip/perf.html; measured with the 23.08 container):
  559 samples/s on one DGX A100 (8 x A100-80GB) and 8,633 on 16; 935 on one DGX H100 and 13,829 on 16, "the same
  configuration" as the A100 runs. The configuration: launcher_scripts/conf/training/clip/vit_g_14.yaml of
  github.com/NVIDIA/NeMo-Framework-Launcher as first published (commit 3dda657, February 2024): micro-batch 88 per
  GPU ("gradient accumulation is not supported in CLIP yet"), tensor and pipeline parallel 1, no activation
  checkpointing, bf16 with megatron_amp_O2, distributed_fused_adam (optimizer states sharded over data parallel:
  ZeRO-1), Megatron's fused LayerNorm, bias-dropout-add and masked softmax, no Transformer Engine and no fused
  attention (use_emha False); the ViT's 256 patches padded to 264 tokens (class_token_length 8), the text to 80.
  The page's table of global and micro-batch sizes per run could not be read here: micro-batch 88, no accumulation
  assumed. (The file's July 2024 revision uses micro-batch 80 with 8 of the 40 ViT layers recomputed.)
- open_clip's coca_ViT-L-14: 75.5 samples/s per A100 on 384 A100s, the training report linked from open_clip pull
  request 379 (github.com/mlfoundations/open_clip/pull/379); checkpoint tag laion2B-s13B-b90k (global batch ~90k,
  so ~234 per GPU). GPU memory and cluster not stated there: A100-40GB and the preset's links assumed.
- FLOPs: open_clip's `docs/model_profile.csv` (github.com/mlfoundations/open_clip), column `gflops` (forward, per
  image-text pair, attention score matmuls included); MFU here = 3 x that x samples/s / (GPUs x dense bf16 peak:
  312 TFLOP/s A100, 989 TFLOP/s H100; AMP's fp16 has the same peak).

Each CLIP is megacoca's contrastive side with the smallest captioning side megacoca allows (the paper pooler layout
with one caption query, one decoder layer, a 64-token vocabulary: a few % of FLOPs, printed by plan_published.py);
the open_clip ViT with its class token and ln_pre, the text tower over 77 tokens (context 76 + CLS).
"""

from __future__ import annotations

from dataclasses import dataclass

from megacoca.config.layout import Layout
from megacoca.config.model import CoCaConfig

# open_clip's docs/model_profile.csv, column gflops: forward GFLOP per image-text pair
OPEN_CLIP_GFLOPS = {"ViT-B-32": 14.78, "ViT-L-14": 175.33, "ViT-g-14": 581.15, "coca_ViT-L-14": 214.52}


def clip_flavor(*, patch_size: int, vision_width: int, vision_layers: int, vision_heads: int, vision_mlp_dim: int,
                text_width: int, text_layers: int, text_heads: int, text_mlp_dim: int, embed_dim: int,
                image_size: int = 224, context_length: int = 76) -> CoCaConfig:
    """A CLIP as megacoca's contrastive side plus the smallest captioning side it allows."""
    return CoCaConfig(
        image_size=image_size, patch_size=patch_size, vision_width=vision_width, vision_layers=vision_layers,
        vision_heads=vision_heads, vision_mlp_dim=vision_mlp_dim, vision_class_token=True, pooler_layout="paper",
        caption_queries=1, pooler_heads=text_heads, text_width=text_width, text_heads=text_heads,
        text_mlp_dim=text_mlp_dim, text_layers=text_layers, decoder_layers=1, vocab_size=64,
        context_length=context_length, embed_dim=embed_dim)


# open_clip's src/open_clip/model_configs/{ViT-B-32,ViT-L-14,ViT-g-14,coca_ViT-L-14}.json (mlp_ratio 4 unless given;
# ViT-g-14: head_width 88 -> 16 heads, mlp_ratio 4.3637 -> 6144; NeMo's g/14 has 22 heads of 64: the same FLOPs)
FLAVORS: dict[str, CoCaConfig] = {
    "ViT-B-32": clip_flavor(patch_size=32, vision_width=768, vision_layers=12, vision_heads=12, vision_mlp_dim=3072,
                            text_width=512, text_layers=12, text_heads=8, text_mlp_dim=2048, embed_dim=512),
    "ViT-L-14": clip_flavor(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp_dim=4096,
                            text_width=768, text_layers=12, text_heads=12, text_mlp_dim=3072, embed_dim=768),
    "ViT-g-14": clip_flavor(patch_size=14, vision_width=1408, vision_layers=40, vision_heads=16, vision_mlp_dim=6144,
                            text_width=1024, text_layers=24, text_heads=16, text_mlp_dim=4096, embed_dim=1024),
    # the real CoCa: one 256-query pooler, text 768 wide over 76 tokens, a 12-layer decoder with two MLPs per layer
    "coca_ViT-L-14": CoCaConfig(
        image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp_dim=4096,
        vision_class_token=True, pooler_layout="open_clip", caption_queries=256, pooler_heads=8, text_width=768,
        text_heads=12, text_mlp_dim=3072, text_layers=12, decoder_layers=12, decoder_mlp_after_self_attn=True,
        vocab_size=49408, context_length=76, embed_dim=768),
}


@dataclass(frozen=True)
class PublishedRun:
    name: str
    model: str  # a key of FLAVORS and OPEN_CLIP_GFLOPS
    cluster: str  # a megacoca preset
    gpus_per_node: int
    gpus: int
    samples_per_s: float  # published, the whole run
    per_gpu_batch: int  # samples per GPU per optimizer step
    checkpointing: bool  # as the run's software recomputed (an assumption where marked)

    @property
    def global_batch(self) -> int:
        return self.per_gpu_batch * self.gpus

    @property
    def per_gpu(self) -> float:
        return self.samples_per_s / self.gpus

    def layout(self) -> Layout:
        """The run's own layout in megacoca's terms: pure data parallelism, ZeRO-1 bf16 (DDP's all-reduce is a
        reduce-scatter plus an all-gather of the same bytes), one micro-batch per step."""
        return Layout(dp=self.gpus, tp=1, pp=1, zero_stage=1, precision="bf16", micro_batch=self.per_gpu_batch,
                      grad_accum=1, checkpointing=self.checkpointing, kernels="torch")


RUNS: list[PublishedRun] = [
    # the csv's ViT-B/32 rows at 128 GPUs: 108,844.57 samples/s, 256 per GPU (the model fits without recompute)
    PublishedRun("open_clip ViT-B/32, JUWELS A100-40GB", "ViT-B-32", "a100-40gb", 4, 128, 108_844.57, 256, False),
    # the csv's ViT-L/14 400M-34B row: 79,116.28 samples/s, 84 per GPU; recompute assumed (--grad-checkpointing:
    # the csv's L/14 runs at 224 and 448 per GPU fit a 40 GB A100 only with it)
    PublishedRun("open_clip ViT-L/14, JUWELS A100-40GB", "ViT-L-14", "a100-40gb", 4, 1024, 79_116.28, 84, True),
    PublishedRun("NeMo ViT-g/14, DGX A100-80GB", "ViT-g-14", "a100-80gb", 8, 8, 559.0, 88, False),
    PublishedRun("NeMo ViT-g/14, DGX A100-80GB", "ViT-g-14", "a100-80gb", 8, 128, 8_633.0, 88, False),
    PublishedRun("NeMo ViT-g/14, DGX H100 (A100 config)", "ViT-g-14", "h100", 8, 8, 935.0, 88, False),
    PublishedRun("NeMo ViT-g/14, DGX H100 (A100 config)", "ViT-g-14", "h100", 8, 128, 13_829.0, 88, False),
    # 75.5 per GPU x 384; ~90k global batch; recompute assumed (234 per GPU of this CoCa needs ~79 GB without)
    PublishedRun("open_clip coca_ViT-L-14, 384 A100", "coca_ViT-L-14", "a100-40gb", 8, 384, 75.5 * 384, 234, True),
]

# The run the presets' matmul efficiency is fitted to: the best-engineered one, on a single node (no inter-node
# traffic), in the software closest to megacoca's (fused kernels, sharded optimizer states)
CALIBRATION = RUNS[2]


def train_flops(run: PublishedRun) -> float:
    """FLOPs per sample of a training step by the published convention: 3 x open_clip's forward GFLOPs."""
    return 3 * OPEN_CLIP_GFLOPS[run.model] * 1e9
