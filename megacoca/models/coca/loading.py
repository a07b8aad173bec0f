"""Model directories: `config.json` + `model.safetensors`, what `megacoca convert` writes and `megacoca.load` reads.

config.json:
    {"format": "megacoca", "format_version": 1,
     "model": {CoCaConfig fields},
     "dtype": "float32" | "bfloat16" (what model.safetensors holds; informational, the file says it too),
     "tokenizer": {"spec": "clip-bpe" | "<sentencepiece .model path>", "context_length": L,
                   "bos_id": ..., "eos_id": ..., "pad_id": ...} or null,
     "open_clip": {"model_name": "coca_ViT-B-32" | null, "model_config": {...}} or null,
     "source": {where the weights came from}}

A tied vocabulary head is stored once (under the token embedding's name). `megacoca.load(dir)`
(megacoca.checkpoint.loader) returns a `PretrainedCoCa` (a CoCa with the same parameters) in eval mode: its
forward defaults to `caption_loss=False`, returning open_clip's outputs (`image_features`, `text_features`,
`logits` (B, L-1, V), `logit_scale`, `labels`), and it has `generate(images, ...)` with the tokenizer's special
ids. The model knows the tokenizer's ids only (`tokenizer_info`); `megacoca.load_tokenizer(model)` loads the
tokenizer itself, from megacoca.data.

`write_safetensors` writes a .safetensors file tensor by tensor from an iterator (the header, which lists every
tensor's shape and offset, is computed first from the expected shapes): what the streaming exports use.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import torch

from megacoca.config.model import CoCaConfig
from megacoca.models.coca.generate import generate
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


def model_tensors(cfg: CoCaConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor a model directory of `cfg` holds (a tied head once), in the model's order."""
    with torch.device("meta"):
        state = CoCa(cfg).state_dict()
    if cfg.tie_word_embeddings:
        state.pop(TIED_KEY, None)
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors(path: str, spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> str:
    """Write `path` (.safetensors) from an iterator of (name, tensor), holding one tensor at a time: `spec`
    ({name: (shape, dtype)}) fixes the header, each tensor is cast to its dtype and written at its offset as it
    comes. Every name of `spec` must come exactly once with its shape; otherwise ValueError, and nothing is left
    at `path` (the file is written as `path`.tmp and renamed when complete)."""
    order = sorted(spec, key=lambda name: -torch.empty((), dtype=spec[name][1]).element_size())  # stable
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    offsets, position = {}, 0
    for name in order:
        shape, dtype = spec[name]
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    base = 8 + len(encoded)
    tmp = path + ".tmp"
    written: set[str] = set()
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            handle.truncate(base + position)
            for name, tensor in tensors:
                if name not in spec:
                    raise ValueError(f"{name} is not a tensor of this model")
                if name in written:
                    raise ValueError(f"{name} came twice")
                shape, dtype = spec[name]
                if tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)}; the model's is {tuple(shape)}")
                data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
                if data.numel():
                    handle.seek(base + offsets[name])
                    handle.write(data.view(torch.uint8).numpy())
                written.add(name)
                del tensor, data
            missing = [name for name in spec if name not in written]
            if missing:
                more = f" ... ({len(missing)} in all)" if len(missing) > 5 else ""
                raise ValueError(f"missing {', '.join(missing[:5])}{more}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_config(directory: str, cfg: CoCaConfig, *, dtype: torch.dtype | None = None, tokenizer: dict | None = None,
                 open_clip: dict | None = None, source: dict | None = None) -> str:
    """config.json of a model directory, written atomically (after the weights: a directory with a config.json
    is complete)."""
    config = {
        "format": "megacoca",
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
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


def save_pretrained(
    model_or_state: "CoCa | dict", directory: str | os.PathLike, cfg: CoCaConfig | None = None, *,
    tokenizer: dict | None = None, open_clip: dict | None = None, source: dict | None = None,
) -> str:
    """Write config.json and model.safetensors to `directory`; a state dict needs its `cfg`. Returns directory."""
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
    spec = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}
    write_safetensors(os.path.join(directory, WEIGHTS_NAME), spec, state.items())
    dtypes = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
    return write_config(directory, cfg, dtype=dtypes.pop() if len(dtypes) == 1 else None, tokenizer=tokenizer,
                        open_clip=open_clip, source=source)


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
