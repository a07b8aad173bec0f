"""CoCa: image encoder + attentional poolers, unimodal text decoder with CLS, multimodal decoder, heads.

The forward runs four stages, each a method or submodule that the pipeline and the overlapped text stage can
call on its own, with no host synchronisation inside: `image_stage(images)` -> (contrastive embedding, caption
image tokens); `text_stage(text, keep)` -> (text embedding, token outputs); `decode(token outputs, caption
tokens)` -> hidden; `caption_head(hidden, targets)` -> summed token cross-entropy (or logits). Nothing here
reads global parallel state: megacoca.parallel shards and checkpoints this single-device model afterwards.

Initialisation is a pure function of (parameter name, full shape, the model's `init_seed`): every parameter
draws from its own generator, so a tensor-parallel rank that materialises only its shard of a layer (built on
the meta device) gets exactly the slice of what the single-device model holds for the same seed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.decoder import CaptionHead, MultimodalDecoder
from megacoca.models.coca.layers import LayerNorm
from megacoca.models.coca.poolers import ImagePooler
from megacoca.models.coca.text import TextEncoder, kept_text_length
from megacoca.models.coca.vision import VisionEncoder


@dataclass(frozen=True)
class InitSpec:
    """How one parameter starts: "trunc_normal" / "normal" (std, then x scale), "zeros", "ones" or "constant"."""

    kind: str
    std: float = 0.0
    scale: float = 1.0
    value: float = 0.0


def parameter_generator(init_seed: int, name: str) -> torch.Generator:
    """The generator that parameter `name` draws from: independent of every other parameter and of order."""
    return torch.Generator().manual_seed((init_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


class JoinedTowers:
    """What CoCa and a pipeline's last stage (megacoca.parallel.pipeline) share, both holding `cfg`, `decoder`,
    `caption_head` and `logit_scale` under the same names: how much of the text to run, and what runs once both
    towers are done (the multimodal decoder, the caption head and the loss inputs)."""

    def text_keep(self, text: torch.Tensor) -> int:
        """How many leading text positions a forward must run (`trim_text_padding`); a host sync, so it is taken
        outside the stages."""
        if not self.cfg.trim_text_padding:
            return text.shape[1]
        return kept_text_length(text, self.cfg.pad_id, self.cfg.legacy_cls_mask)

    def decode(self, token_outputs: torch.Tensor, caption_tokens: torch.Tensor) -> torch.Tensor:
        """Unimodal token outputs (B, T, width) cross-attending to the caption image tokens -> hidden (B, T, width)."""
        return self.decoder(token_outputs, caption_tokens)

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()

    def joined_outputs(self, image_embedding: torch.Tensor | None, caption_tokens: torch.Tensor,
                       text_embedding: torch.Tensor, token_outputs: torch.Tensor, text: torch.Tensor, keep: int, *,
                       caption_loss: bool = True, contrastive: bool = True, captioning: bool = True) -> dict:
        """The training outputs (docs/design.md) from the two towers' outputs and the text (B, L). Without
        `contrastive` there are no features; without `captioning` the multimodal decoder and the caption head
        do not run (`caption_loss` then means nothing)."""
        cfg = self.cfg
        out = {"logit_scale": self.clamped_logit_scale()}
        if contrastive:
            out["image_features"] = F.normalize(image_embedding, dim=-1)
            out["text_features"] = F.normalize(text_embedding, dim=-1)
        if not captioning:
            return out
        hidden = self.decode(token_outputs[:, :-1], caption_tokens)
        targets = text[:, 1:keep]
        if caption_loss:
            out["caption_loss_sum"] = self.caption_head(
                hidden, targets.masked_fill(targets == cfg.pad_id, -100)
            )
            out["caption_tokens"] = (targets != cfg.pad_id).sum()
        else:
            out["logits"] = self.caption_head(hidden)
        return out


class CoCa(JoinedTowers, nn.Module):
    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # One draw from torch's global generator (seeded by the trainer) decides every parameter's init. Drawn
        # first: the submodules' own default inits consume the generator on a CPU but not on the meta device.
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.vision = VisionEncoder(cfg)
        self.image_pooler = ImagePooler(cfg)
        self.text = TextEncoder(cfg)
        self.decoder = MultimodalDecoder(cfg)
        self.caption_head = CaptionHead(cfg)
        # Shape [1], not a 0-dim tensor: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        if cfg.tie_word_embeddings:
            # One Parameter registered in both modules, so ZeRO-3 gathers it in either forward.
            self.caption_head.weight = self.text.embed.token_embedding.weight
        self.init_specs = self._init_specs()
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------------------------
    def _init_specs(self) -> dict[str, InitSpec]:
        """Truncated-normal(0.02) matmul weights, zero biases, unit LayerNorms, output projections of the blocks
        scaled by 1/sqrt(2 * depth), embeddings and queries normal; by parameter name."""
        cfg = self.cfg
        specs: dict[str, InitSpec] = {}
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                specs[prefix + "weight"] = InitSpec("trunc_normal", 0.02)
                if module.bias is not None:
                    specs[prefix + "bias"] = InitSpec("zeros")
            elif isinstance(module, LayerNorm):
                specs[prefix + "weight"], specs[prefix + "bias"] = InitSpec("ones"), InitSpec("zeros")
        depths = {"vision.blocks.": cfg.vision_layers, "text.blocks.": cfg.text_layers,
                  "decoder.layers.": cfg.text_layers + cfg.decoder_layers}
        for name, spec in list(specs.items()):
            depth = next((d for p, d in depths.items() if name.startswith(p)), None)
            if depth and name.endswith(("out_proj.weight", "fc2.weight")):
                specs[name] = InitSpec(spec.kind, spec.std, 1.0 / math.sqrt(2 * depth))
        specs.update({
            "vision.embed.positional_embedding": InitSpec("normal", 0.02),
            "text.embed.token_embedding.weight": InitSpec("normal", 0.02),
            "text.embed.positional_embedding": InitSpec("normal", 0.01),
            "text.embed.cls_embedding": InitSpec("normal", 0.02),
            "logit_scale": InitSpec("constant", value=cfg.init_logit_scale),
        })
        if self.vision.embed.class_embedding is not None:
            specs["vision.embed.class_embedding"] = InitSpec("normal", 0.02)
        for name in ("caption_pooler", "contrastive_pooler"):
            if getattr(self.image_pooler, name) is not None:
                specs[f"image_pooler.{name}.query"] = InitSpec("normal", cfg.pooler_query_std)
        if not cfg.tie_word_embeddings:
            specs["caption_head.weight"] = InitSpec("normal", 0.02)
        if self.caption_head.bias is not None:
            specs["caption_head.bias"] = InitSpec("zeros")
        missing = sorted({name for name, _ in self.named_parameters()} - set(specs))
        if missing:
            raise RuntimeError(f"CoCa: no initialisation rule for {missing}")
        return specs

    def initial_value(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The fp32 CPU tensor parameter `name` (full, unsharded `shape`) starts from."""
        spec = self.init_specs[name]
        out = torch.empty(shape, dtype=torch.float32)
        if spec.kind == "trunc_normal":
            nn.init.trunc_normal_(out, std=spec.std, generator=parameter_generator(self.init_seed, name))
        elif spec.kind == "normal":
            out.normal_(0.0, spec.std, generator=parameter_generator(self.init_seed, name))
        elif spec.kind in ("zeros", "ones", "constant"):
            out.fill_({"zeros": 0.0, "ones": 1.0}.get(spec.kind, spec.value))
        else:
            raise ValueError(f"unknown init kind {spec.kind!r} for {name}")
        return out.mul_(spec.scale) if spec.scale != 1.0 else out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter from `initial_value` (single-device layout; meta parameters are left alone)."""
        for name, param in self.named_parameters():
            if not param.is_meta:
                param.copy_(self.initial_value(name, tuple(param.shape)))

    # ---- stages ---------------------------------------------------------------------------------------------
    def image_stage(self, images: torch.Tensor,
                    contrastive: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """images (B, 3, H, W) -> (unnormalised contrastive embedding (B, E), caption image tokens (B, Q, width));
        the embedding is None (not computed) with `contrastive=False`."""
        return self.image_pooler(self.vision(images), contrastive)

    def text_stage(self, text: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, L) -> (unnormalised text embedding (B, E), token outputs (B, keep, width)). `keep` runs only
        the first positions (the rest must be padding: `text_keep`); the CLS stays at position L."""
        return self.text(text, keep)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        embedding, _ = self.image_stage(images)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        embedding, _ = self.text_stage(text, self.text_keep(text))
        return F.normalize(embedding, dim=-1) if normalize else embedding

    # ---- training forward -----------------------------------------------------------------------------------
    def towers(self, images: torch.Tensor, text: torch.Tensor, keep: int,
               contrastive: bool = True) -> tuple[tuple, tuple]:
        """Both towers, independent of each other: (image_stage(images, contrastive), text_stage(text, keep)).
        The parallelize step may replace this (per instance) by a version that runs the text tower
        concurrently."""
        return self.image_stage(images, contrastive), self.text_stage(text, keep)

    def forward(self, images: torch.Tensor, text: torch.Tensor, *, caption_loss: bool = True,
                contrastive: bool = True, captioning: bool = True, keep: int | None = None) -> dict:
        """images (B, 3, H, W); text (B, L): bos, tokens, eos, pads. See docs/design.md for the outputs.
        `contrastive` / `captioning` = False compute only what the other objective needs (the ablations of
        the paper's Table 8b: CoCaLoss.model_kwargs). `keep`: the text positions to run (default: the trimmed
        length `text_keep` when the caption loss is computed, else all); a caller that runs the same batch twice
        passes the same `keep` to both."""
        if not (contrastive or captioning):
            raise ValueError("a CoCa forward needs the contrastive or the captioning outputs (or both)")
        if keep is None:
            keep = self.text_keep(text) if caption_loss and captioning else text.shape[1]
        (image_embedding, caption_tokens), (text_embedding, token_outputs) = self.towers(images, text, keep,
                                                                                           contrastive)
        return self.joined_outputs(image_embedding, caption_tokens, text_embedding, token_outputs, text, keep,
                                   caption_loss=caption_loss, contrastive=contrastive, captioning=captioning)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
