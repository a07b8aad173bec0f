"""State-dict adapter between open_clip's CoCa and megacoca's CoCa (open_clip layout).

- `config_from_open_clip(name_or_path_or_dict)`: an open_clip model name (coca_ViT-B-32, coca_ViT-L-14), the
  path of an open_clip model-config JSON, or its dict -> CoCaConfig with open_clip's layout switches.
- `open_clip_config(cfg)`: the inverse, the open_clip model-config dict that builds the same network; raises
  `NotExpressibleError` (listing every reason) for a model open_clip cannot express (the paper layout, ...).
- `from_open_clip(state, cfg)` / `to_open_clip(state, cfg)`: state dicts both ways. open_clip's fused
  `in_proj_weight`/`in_proj_bias` are split into q/k/v projections (the pooler's separate `q/k/v_proj_weight`
  when its key width differs), its `x @ proj` matrices are transposed into Linear weights, and its 0-dim
  `logit_scale` becomes shape [1] (DeepSpeed cannot broadcast a 0-dim parameter). Every key is accounted for:
  an unknown or missing key raises with the list.
- `to_open_clip_stream(items, cfg)`: the same from an iterator of (name, tensor), one open_clip tensor out as soon
  as its parts are in (a fused q/k/v waits for its three); `open_clip_shapes(cfg)`: {open_clip name: shape}.
Reading open_clip's files (a bare state dict, a training checkpoint, safetensors) is the loader's
(megacoca.checkpoint.loader.read_open_clip_state); this module only maps configs and renames tensors.

open_clip is only imported for model names (its bundled model configs) and by callers that build its model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import torch

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.model import CoCa

__all__ = [
    "NotExpressibleError", "config_from_open_clip", "open_clip_config", "from_open_clip", "to_open_clip",
    "resolve_open_clip_config", "to_open_clip_stream", "open_clip_shapes",
]

CLIP_BPE_IDS = {"bos_id": 49406, "eos_id": 49407, "pad_id": 0}


class NotExpressibleError(ValueError):
    """The megacoca model has a layout or option that open_clip's CoCa cannot express."""


# ---- configs ------------------------------------------------------------------------------------------------
def resolve_open_clip_config(model: str | os.PathLike | dict) -> tuple[dict, str | None]:
    """(open_clip model-config dict, model name or None) from a name, a JSON path or a dict."""
    if isinstance(model, dict):
        return dict(model), None
    text = os.fspath(model)
    if text.endswith(".json") or os.path.isfile(text):
        with open(text) as handle:
            return json.load(handle), None
    try:
        import open_clip  # optional: only to look a model name up
    except ImportError as error:  # pragma: no cover - open_clip is a test dependency
        raise ImportError(
            f"resolving the open_clip model name {text!r} needs open_clip_torch (pip install "
            "'megacoca[open_clip]'), or pass the path of its model-config JSON"
        ) from error
    config = open_clip.get_model_config(text)
    if config is None:
        known = [name for name in open_clip.list_models() if "coca" in name.lower()]
        raise ValueError(f"unknown open_clip model {text!r}; its CoCa models are {known}")
    return config, text


def _unsupported_towers(config: dict, vision: dict, text: dict, multimodal: dict) -> list[str]:
    """The settings of open_clip's towers megacoca's CoCa does not implement, one phrase each."""
    problems = []

    def unsupported(section: str, values: dict, key: str, allowed) -> None:
        if key in values and values[key] not in allowed:
            problems.append(f"{section}.{key}={values[key]!r} (megacoca supports {allowed})")

    if config.get("quick_gelu"):
        problems.append("quick_gelu=True (megacoca uses exact GELU)")
    if config.get("nonscalar_logit_scale"):
        problems.append("nonscalar_logit_scale=True")
    for key in ("image_size", "patch_size"):
        if not isinstance(vision.get(key, 0), int):
            problems.append(f"vision_cfg.{key}={vision[key]!r} (megacoca takes square images and patches, an int)")
    if config.get("init_logit_bias") is not None:
        problems.append("init_logit_bias (a SigLIP-style logit bias)")
    for key in ("timm_model_name", "hf_model_name"):
        for section, values in (("vision_cfg", vision), ("text_cfg", text)):
            if values.get(key):
                problems.append(f"{section}.{key} (only open_clip's own ViT and text transformer)")
    if isinstance(vision.get("layers", 12), (list, tuple)):
        problems.append("vision_cfg.layers as a list (a ResNet tower)")
    if vision.get("attentional_pool") is not True:
        problems.append(f"vision_cfg.attentional_pool={vision.get('attentional_pool')!r} (CoCa needs True)")
    for section, values in (("vision_cfg", vision), ("text_cfg", text), ("multimodal_cfg", multimodal)):
        unsupported(section, values, "ls_init_value", (None,))
        for flag in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
            unsupported(section, values, flag, (False,))
        unsupported(section, values, "block_type", (None, "default"))
        unsupported(section, values, "norm_kwargs", (None, {}))
        unsupported(section, values, "act_kwargs", (None, {}))
    unsupported("vision_cfg", vision, "patch_dropout", (0, 0.0))
    unsupported("vision_cfg", vision, "pos_embed_type", ("learnable",))
    unsupported("vision_cfg", vision, "pool_type", ("tok",))
    unsupported("text_cfg", text, "embed_cls", (True,))
    unsupported("text_cfg", text, "no_causal_mask", (False,))
    unsupported("text_cfg", text, "proj_type", ("linear",))
    unsupported("text_cfg", text, "proj_bias", (False,))
    if not text.get("embed_cls", False):
        problems.append("text_cfg.embed_cls must be True (CoCa's CLS token)")
    return problems


def _mismatched_widths(config: dict, text: dict, multimodal: dict) -> list[str]:
    """Where open_clip's text and multimodal towers disagree in a way megacoca's shared settings cannot hold."""
    problems = []
    text_width, text_heads = text.get("width", 512), text.get("heads", 8)
    mm_width, mm_heads = multimodal.get("width", 512), multimodal.get("heads", 8)
    if mm_width != text_width:
        problems.append(f"multimodal_cfg.width {mm_width} != text_cfg.width {text_width}")
    if mm_heads != text_heads:
        problems.append(f"multimodal_cfg.heads {mm_heads} != text_cfg.heads {text_heads}")
    if int(text_width * text.get("mlp_ratio", 4.0)) != 4 * mm_width:  # open_clip's decoder MLPs are 4x wide
        problems.append(f"text_cfg.mlp_ratio {text.get('mlp_ratio')} (the decoder's MLP is 4x; they must agree)")
    if config["embed_dim"] != mm_width:
        problems.append(f"embed_dim {config['embed_dim']} != multimodal width {mm_width} (open_clip itself fails on "
                        "this)")
    if multimodal.get("vocab_size", text.get("vocab_size")) != text.get("vocab_size", 49408):
        problems.append("multimodal_cfg.vocab_size differs from text_cfg.vocab_size")
    return problems


def config_from_open_clip(model: str | os.PathLike | dict, **overrides) -> CoCaConfig:
    """CoCaConfig equal to open_clip's CoCa `model` (a name, a model-config JSON path or dict); ValueError naming
    every setting megacoca cannot express."""
    config, name = resolve_open_clip_config(model)
    vision, text, multimodal = config.get("vision_cfg", {}), config.get("text_cfg", {}), config.get("multimodal_cfg", {})
    embed_dim = config["embed_dim"]
    problems = _unsupported_towers(config, vision, text, multimodal) + _mismatched_widths(config, text, multimodal)
    if problems:
        raise ValueError(f"cannot convert {name or 'the open_clip config'}: " + "; ".join(problems))
    vision_width = vision.get("width", 768)
    head_width = vision.get("head_width", 64)
    text_width, text_heads = text.get("width", 512), text.get("heads", 8)
    text_mlp = int(text_width * text.get("mlp_ratio", 4.0))
    values = dict(
        image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 16),
        vision_width=vision_width,
        vision_layers=vision.get("layers", 12),
        vision_heads=vision_width // head_width,
        vision_mlp_dim=int(vision_width * vision.get("mlp_ratio", 4.0)),
        vision_class_token=True,
        vision_patch_bias=False,
        vision_ln_pre=not vision.get("no_ln_pre", False),
        pooler_layout="open_clip",
        caption_queries=vision.get("attn_pooler_queries", 256),
        pooler_heads=vision.get("attn_pooler_heads", 8),
        pooler_dim=embed_dim,
        vocab_size=text.get("vocab_size", 49408),
        context_length=text.get("context_length", 77),
        text_width=text_width,
        text_heads=text_heads,
        text_mlp_dim=text_mlp,
        text_layers=text.get("layers", 12),
        pad_id=text.get("pad_id", 0),
        legacy_cls_mask=True,
        text_tokens_after_ln=False,
        decoder_layers=multimodal.get("layers", 12),
        decoder_mlp_after_self_attn=True,
        decoder_bias=False,
        tie_word_embeddings=False,
        embed_dim=embed_dim,
        ln_eps=1e-5,
        init_logit_scale=math.log(1 / 0.07),
        max_logit_scale=math.log(100.0),
    )
    values.update(overrides)
    return CoCaConfig(**values)


def open_clip_config(cfg: CoCaConfig) -> dict:
    """The open_clip model-config dict of the same network; NotExpressibleError lists what open_clip lacks."""
    reasons = []
    required = dict(
        pooler_layout="open_clip", vision_class_token=True, vision_patch_bias=False, legacy_cls_mask=True,
        text_tokens_after_ln=False, decoder_mlp_after_self_attn=True, decoder_bias=False,
        tie_word_embeddings=False, in_channels=3, ln_eps=1e-5,
    )
    for key, value in required.items():
        if getattr(cfg, key) != value:
            reasons.append(f"{key}={getattr(cfg, key)!r} (open_clip has only {value!r})")
    if cfg.pooled_width != cfg.embed_dim or cfg.embed_dim != cfg.text_width:
        reasons.append(
            f"pooler width {cfg.pooled_width}, embed_dim {cfg.embed_dim} and text_width {cfg.text_width} differ "
            "(open_clip pools at embed_dim and cross-attends at the text width)"
        )
    if cfg.text_mlp_dim != 4 * cfg.text_width:
        reasons.append(f"text_mlp_dim {cfg.text_mlp_dim} != 4 x text_width (open_clip's decoder MLP is 4x)")
    if int(cfg.vision_width * (cfg.vision_mlp_dim / cfg.vision_width)) != cfg.vision_mlp_dim:
        reasons.append(f"vision_mlp_dim {cfg.vision_mlp_dim} is not int(vision_width x a ratio)")
    if reasons:
        raise NotExpressibleError("open_clip's CoCa cannot express this model: " + "; ".join(reasons))
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "head_width": cfg.vision_width // cfg.vision_heads,
            "mlp_ratio": cfg.vision_mlp_dim / cfg.vision_width,
            "patch_size": cfg.patch_size,
            "no_ln_pre": not cfg.vision_ln_pre,
            "attentional_pool": True,
            "attn_pooler_queries": cfg.caption_queries,
            "attn_pooler_heads": cfg.pooler_heads,
            "output_tokens": True,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": cfg.vocab_size,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
            "mlp_ratio": cfg.text_mlp_dim / cfg.text_width,
            "pad_id": cfg.pad_id,
            "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": cfg.vocab_size,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.decoder_layers,
            "attn_pooler_heads": cfg.pooler_heads,
        },
        "custom_text": True,
    }


# ---- state dicts --------------------------------------------------------------------------------------------
def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous()


class _Plan:
    """One list of correspondences, read forwards (open_clip -> megacoca) and backwards."""

    def __init__(self) -> None:
        # (megacoca keys, open_clip key, to_megacoca(tensor) -> tensors, to_open_clip(tensors) -> tensor)
        self.items: list[tuple[tuple[str, ...], str, Callable, Callable]] = []

    def same(self, mine: str, theirs: str) -> None:
        self.items.append(((mine,), theirs, lambda t: (t,), lambda ts: ts[0]))

    def transposed(self, mine: str, theirs: str) -> None:
        self.items.append(((mine,), theirs, lambda t: (_transpose(t),), lambda ts: _transpose(ts[0])))

    def fused(self, mine: tuple[str, str, str], theirs: str) -> None:
        self.items.append((mine, theirs, lambda t: tuple(c.contiguous() for c in t.chunk(3)), lambda ts: torch.cat(ts)))

    def scalar(self, mine: str, theirs: str) -> None:
        self.items.append(((mine,), theirs, lambda t: (t.reshape(1),), lambda ts: ts[0].reshape(())))

    def layer_norm(self, mine: str, theirs: str) -> None:
        for suffix in ("weight", "bias"):
            self.same(f"{mine}.{suffix}", f"{theirs}.{suffix}")

    def linear(self, mine: str, theirs: str) -> None:
        self.layer_norm(mine, theirs)  # same two keys

    def attention(self, mine: str, theirs: str, split_weights: bool = False) -> None:
        qkv = tuple(f"{mine}.{name}_proj" for name in "qkv")
        if split_weights:  # nn.MultiheadAttention with kdim != embed_dim keeps q/k/v weights apart
            for name, target in zip("qkv", qkv):
                self.same(f"{target}.weight", f"{theirs}.{name}_proj_weight")
        else:
            self.fused(tuple(f"{k}.weight" for k in qkv), f"{theirs}.in_proj_weight")
        self.fused(tuple(f"{k}.bias" for k in qkv), f"{theirs}.in_proj_bias")
        self.linear(f"{mine}.out_proj", f"{theirs}.out_proj")

    def block(self, mine: str, theirs: str, mlp: bool = True) -> None:
        self.layer_norm(f"{mine}.ln_1", f"{theirs}.ln_1")
        self.attention(f"{mine}.attn", f"{theirs}.attn")
        if mlp:
            self.layer_norm(f"{mine}.ln_2", f"{theirs}.ln_2")
            self.linear(f"{mine}.mlp.fc1", f"{theirs}.mlp.c_fc")
            self.linear(f"{mine}.mlp.fc2", f"{theirs}.mlp.c_proj")


def _plan(cfg: CoCaConfig) -> _Plan:
    open_clip_config(cfg)  # refuses what has no open_clip counterpart
    plan = _Plan()
    plan.scalar("logit_scale", "logit_scale")
    # Image tower.
    plan.same("vision.embed.patch_embed.weight", "visual.conv1.weight")
    plan.same("vision.embed.class_embedding", "visual.class_embedding")
    plan.same("vision.embed.positional_embedding", "visual.positional_embedding")
    if cfg.vision_ln_pre:
        plan.layer_norm("vision.embed.ln_pre", "visual.ln_pre")
    for i in range(cfg.vision_layers):
        plan.block(f"vision.blocks.{i}", f"visual.transformer.resblocks.{i}")
    pooler = "image_pooler.caption_pooler"
    plan.same(f"{pooler}.query", "visual.attn_pool.query")
    plan.layer_norm(f"{pooler}.ln_q", "visual.attn_pool.ln_q")
    plan.layer_norm(f"{pooler}.ln_k", "visual.attn_pool.ln_k")
    plan.attention(f"{pooler}.attn", "visual.attn_pool.attn", split_weights=cfg.vision_width != cfg.pooled_width)
    plan.layer_norm("image_pooler.ln_post", "visual.ln_post")
    plan.transposed("image_pooler.projection.weight", "visual.proj")
    # Unimodal text tower.
    plan.same("text.embed.token_embedding.weight", "text.token_embedding.weight")
    plan.same("text.embed.positional_embedding", "text.positional_embedding")
    plan.same("text.embed.cls_embedding", "text.cls_emb")
    for i in range(cfg.text_layers):
        plan.block(f"text.blocks.{i}", f"text.transformer.resblocks.{i}")
    plan.layer_norm("text.outputs.ln_final", "text.ln_final")
    plan.transposed("text.outputs.projection.weight", "text.text_projection")
    # Multimodal decoder and its untied vocabulary projection.
    for i in range(cfg.decoder_layers):
        mine = f"decoder.layers.{i}"
        plan.block(f"{mine}.self_block", f"text_decoder.resblocks.{i}")
        theirs = f"text_decoder.cross_attn.{i}"
        plan.layer_norm(f"{mine}.cross_block.ln_q", f"{theirs}.ln_1")
        plan.layer_norm(f"{mine}.cross_block.ln_kv", f"{theirs}.ln_1_kv")
        plan.attention(f"{mine}.cross_block.attn", f"{theirs}.attn")
        plan.layer_norm(f"{mine}.cross_block.ln_2", f"{theirs}.ln_2")
        plan.linear(f"{mine}.cross_block.mlp.fc1", f"{theirs}.mlp.c_fc")
        plan.linear(f"{mine}.cross_block.mlp.fc2", f"{theirs}.mlp.c_proj")
    plan.layer_norm("decoder.ln_final", "text_decoder.ln_final")
    plan.transposed("caption_head.weight", "text_decoder.text_projection")
    return plan


def _check_keys(given, expected, side: str) -> None:
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {show(unexpected)}")
        raise KeyError(f"the {side} state dict does not match the config: " + "; ".join(parts))


def from_open_clip(state: dict, cfg: CoCaConfig) -> dict:
    """open_clip CoCa state dict -> megacoca CoCa state dict (strict: every key used, none missing)."""
    plan = _plan(cfg)
    _check_keys(state, [theirs for _, theirs, _, _ in plan.items], "open_clip")
    out = {}
    for mine, theirs, to_mine, _ in plan.items:
        for key, tensor in zip(mine, to_mine(state[theirs])):
            out[key] = tensor
    return out


def to_open_clip(state: dict, cfg: CoCaConfig) -> dict:
    """megacoca CoCa state dict (open_clip layout) -> open_clip CoCa state dict."""
    plan = _plan(cfg)
    _check_keys(state, [key for mine, _, _, _ in plan.items for key in mine], "megacoca")
    return {theirs: to_theirs(tuple(state[k] for k in mine)) for mine, theirs, _, to_theirs in plan.items}


def to_open_clip_stream(items, cfg: CoCaConfig):
    """(open_clip name, tensor) from an iterator of megacoca (name, tensor), in the order their parts complete;
    KeyError for a name the plan does not know, or (at the end) parts that never came."""
    plan = _plan(cfg)
    owner = {key: index for index, (mine, _, _, _) in enumerate(plan.items) for key in mine}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    done = set()
    for name, tensor in items:
        if name not in owner:
            raise KeyError(f"the megacoca state dict does not match the config: unexpected {name}")
        index = owner[name]
        mine, theirs, _, to_theirs = plan.items[index]
        parts = pending.setdefault(index, {})
        parts[name] = tensor
        if len(parts) == len(mine):
            yield theirs, to_theirs(tuple(parts[key] for key in mine))
            del pending[index]
            done.add(index)
    missing = [key for index, (mine, _, _, _) in enumerate(plan.items) if index not in done for key in mine]
    if missing:
        _check_keys([key for key in owner if key not in missing], list(owner), "megacoca")


def open_clip_shapes(cfg: CoCaConfig) -> dict[str, tuple[int, ...]]:
    """{open_clip name: shape} of the open_clip state dict `to_open_clip` gives for `cfg`, without any data."""

    with torch.device("meta"):
        state = CoCa(cfg).state_dict()
        return {name: tuple(tensor.shape) for name, tensor in to_open_clip(state, cfg).items()}
