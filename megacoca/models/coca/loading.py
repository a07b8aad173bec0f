"""Model directories: `config.json` + `model.safetensors`, what `megacoca convert` writes and `megacoca.load` reads.

config.json:
    {"format": "megacoca", "format_version": 1,
     "model": {CoCaConfig fields},
     "tokenizer": {"spec": "clip-bpe" | "<sentencepiece .model path>", "context_length": L,
                   "bos_id": ..., "eos_id": ..., "pad_id": ...} or null,
     "open_clip": {"model_name": "coca_ViT-B-32" | null, "model_config": {...}} or null,
     "source": {where the weights came from}}

`load_pretrained(dir)` returns a `PretrainedCoCa` (a CoCa with the same parameters) in eval mode: its forward
defaults to `caption_loss=False`, returning open_clip's outputs (`image_features`, `text_features`, `logits`
(B, L-1, V), `logit_scale`, `labels`), and it has `generate(images, ...)` with the tokenizer's special ids. The
model knows the tokenizer's ids only (`tokenizer_info`); `megacoca.load_tokenizer(model)` loads the tokenizer
itself, from megacoca.data.
"""

from __future__ import annotations

import json
import os

import torch

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.model import CoCa

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
TIED_KEY, TIED_SOURCE = "caption_head.weight", "text.embed.token_embedding.weight"


class PretrainedCoCa(CoCa):
    """CoCa as `megacoca.load` returns it: forward defaults to logits (open_clip's semantics), plus generate."""

    def __init__(self, cfg: CoCaConfig, tokenizer: dict | None = None) -> None:
        super().__init__(cfg)
        self.tokenizer_info = dict(tokenizer or {})

    def forward(self, images: torch.Tensor, text: torch.Tensor, *, caption_loss: bool = False) -> dict:
        out = super().forward(images, text, caption_loss=caption_loss)
        if not caption_loss:
            out["labels"] = text[:, 1:]
            if self.cfg.pooler_layout == "open_clip":
                out["logit_scale"] = out["logit_scale"].reshape(())  # open_clip's logit_scale is 0-dim
        return out

    def generate(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        """`megacoca.models.coca.generate.generate` with bos/eos/pad from the tokenizer recorded in config.json."""
        from megacoca.models.coca.generate import generate

        for key in ("bos_id", "eos_id", "pad_id"):
            if key not in kwargs and key in self.tokenizer_info:
                kwargs[key] = self.tokenizer_info[key]
        if "bos_id" not in kwargs or "eos_id" not in kwargs:
            raise ValueError("this model directory records no tokenizer: pass bos_id and eos_id to generate()")
        return generate(self, images, **kwargs)


def tokenizer_info(spec: str, context_length: int, bos_id: int, eos_id: int, pad_id: int) -> dict:
    return {"spec": spec, "context_length": context_length, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}


def clip_bpe_tokenizer_info(cfg: CoCaConfig) -> dict:
    """open_clip's CLIP BPE: sot 49406, eot 49407, pad 0, context = the model's text context (76 for CoCa)."""
    return tokenizer_info("clip-bpe", cfg.context_length, 49406, 49407, cfg.pad_id)


def save_pretrained(
    model_or_state: "CoCa | dict", directory: str | os.PathLike, cfg: CoCaConfig | None = None, *,
    tokenizer: dict | None = None, open_clip: dict | None = None, source: dict | None = None,
) -> str:
    """Write config.json and model.safetensors to `directory`; a state dict needs its `cfg`. Returns directory."""
    from safetensors.torch import save_file

    if isinstance(model_or_state, torch.nn.Module):
        cfg = cfg or model_or_state.cfg
        state = model_or_state.state_dict()
        if tokenizer is None and getattr(model_or_state, "tokenizer_info", None):
            tokenizer = model_or_state.tokenizer_info
    else:
        state = dict(model_or_state)
    if cfg is None:
        raise ValueError("save_pretrained: pass the CoCaConfig of a bare state dict")
    if cfg.tie_word_embeddings:
        state.pop(TIED_KEY, None)  # the same tensor as the token embedding; re-tied on load
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    # safetensors wants contiguous tensors that share no storage.
    save_file({name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()},
              os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "format": "megacoca",
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "tokenizer": tokenizer,
        "open_clip": open_clip,
        "source": source or {},
    }
    tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, os.path.join(directory, CONFIG_NAME))
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a megacoca model directory (no {CONFIG_NAME})")
    with open(path) as handle:
        config = json.load(handle)
    if config.get("format") != "megacoca":
        raise ValueError(f"{path} is not a megacoca model config (format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {config['format_version']}; this megacoca reads <= {FORMAT_VERSION}")
    return config


def read_state(directory: str | os.PathLike, cfg: CoCaConfig) -> dict:
    from safetensors.torch import load_file

    state = load_file(os.path.join(os.fspath(directory), WEIGHTS_NAME))
    if cfg.tie_word_embeddings and TIED_KEY not in state and TIED_SOURCE in state:
        state[TIED_KEY] = state[TIED_SOURCE]
    return state


def load_pretrained(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    kernels: str | None = None,
) -> PretrainedCoCa:
    """The model in `directory`, in eval mode. `kernels` overrides CoCaConfig.kernels ("auto"/"triton"/"torch")."""
    config = read_config(directory)
    cfg = CoCaConfig.from_dict(config["model"])
    if kernels is not None:
        cfg = cfg.replace(kernels=kernels)
    with torch.device("meta"):
        model = PretrainedCoCa(cfg, config.get("tokenizer"))
    state = read_state(directory, cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced both Parameters; make them one again
        model.caption_head.weight = model.text.embed.token_embedding.weight
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    return model.eval()
