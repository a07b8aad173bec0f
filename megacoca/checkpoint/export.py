"""Conversions behind `megacoca convert` (the command line is megacoca/cli/convert.py; nothing here parses
arguments). Every one reads through the one loader (megacoca.checkpoint.loader) and writes safetensors.

- `export_model_directory(path, output, dtype=...)`: anything the loader opens (a DeepSpeed checkpoint of any
  layout, a model directory, an open_clip directory) -> a model directory (config.json + model.safetensors) in
  fp32 or bf16. It streams: each tensor is checked, cast and written at its offset as it comes, so the peak is
  what reading the checkpoint holds plus one tensor. From a DeepSpeed checkpoint (consolidate.py): ZeRO-3, the
  memory-mapped optimizer files plus one tensor; ZeRO-1/2, one fp32 copy of a pipeline stage (DeepSpeed's merge
  of the data-parallel partitions) plus one tensor; ZeRO-0, one tensor. The whole model is never built, and never
  held twice. Measured (CPU, 2026-11-29; a 70M-parameter model, 267 MiB in fp32, largest tensor 8 MiB, dp=2):
  private memory above the process after its imports +20 MiB from ZeRO-3, +19 MiB from ZeRO-0, +268 MiB from
  ZeRO-2 bf16 (DeepSpeed's merged fp32 copy); the mapped checkpoint pages add ~260 MiB of reclaimable page cache
  to the RSS. The export this replaced (the whole fp32 dict, then a copy for safetensors) took +637, +905, +636.
- `export_open_clip(path, output, ...)`: the same sources -> open_clip. A directory `output` gets open_clip's hub
  layout, `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) + `open_clip_model.safetensors`, which
  `open_clip.create_model_and_transforms("local-dir:" + output)` loads (and `hf-hub:` once uploaded as it is);
  streamed like the above. A `.safetensors` or `.pt` `output` gets the bare state dict and its model config
  beside it (`<stem>.json`, for `open_clip.add_model_config`).
- `import_open_clip(model, input, output)`: an open_clip CoCa state dict or training checkpoint -> model directory,
  checked against open_clip's own model on a random batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from megacoca.checkpoint.loader import DeepSpeedCheckpoint, checked_tensors, load, open_source, read_open_clip_state
from megacoca.data.tokenizer import open_tokenizer
from megacoca.data.transforms import CLIP_MEAN, CLIP_STD
from megacoca.models.coca.loading import (
    WEIGHTS_NAME,
    clip_bpe_tokenizer_info,
    model_tensors,
    save_pretrained,
    tokenizer_info,
    write_config,
    write_safetensors,
)
from megacoca.models.coca.model import CoCa
from megacoca.models.coca.open_clip import (
    config_from_open_clip,
    from_open_clip,
    open_clip_config,
    open_clip_shapes,
    resolve_open_clip_config,
    to_open_clip,
    to_open_clip_stream,
)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use fp32 or bf16")
    return DTYPES[dtype]


# ---- model directories --------------------------------------------------------------------------------------
def export_model_directory(path: str, output: str, *, dtype="fp32", model_config=None,
                           tokenizer: str | None = None) -> str:
    """A model directory at `output` from the checkpoint or directory at `path`, streaming (see the module
    docstring for the peak memory). `tokenizer`: the spec to record (default: the source's; for a DeepSpeed
    checkpoint, the run's data.tokenizer, which must be readable from here)."""
    dtype = resolve_dtype(dtype)
    source = open_source(path, model_config=model_config)
    # The tokenizer before the weights: a run's data.tokenizer is often a path relative to where it ran.
    if isinstance(source, DeepSpeedCheckpoint):
        tok = source.tokenizer_info(tokenizer)
    elif tokenizer is not None:
        loaded = open_tokenizer(tokenizer, source.cfg.context_length, "--tokenizer")
        tok = tokenizer_info(tokenizer, source.cfg.context_length, loaded.bos_id, loaded.eos_id, loaded.pad_id)
    else:
        tok = source.tokenizer
    os.makedirs(output, exist_ok=True)
    spec = {name: (shape, dtype) for name, shape in model_tensors(source.cfg).items()}
    write_safetensors(os.path.join(output, WEIGHTS_NAME), spec, checked_tensors(source))
    return write_config(output, source.cfg, dtype=dtype, tokenizer=tok, open_clip=source.open_clip,
                        source=source.info)


# ---- open_clip ----------------------------------------------------------------------------------------------
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def _preprocess_config(cfg) -> dict:
    """open_clip's preprocess_cfg for megacoca's eval transform: resize the shorter side (bicubic), center crop,
    CLIP mean and std."""
    return {"size": cfg.image_size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def _open_clip_model_config(source, model: str | None) -> tuple[dict, str | None]:
    """The model config to write: `model`'s (a name or JSON) when given, else the one recorded at import from
    open_clip, else derived from the CoCaConfig. NotExpressibleError for a model open_clip cannot express."""
    derived = open_clip_config(source.cfg)  # refuses the paper layout and the rest, with every reason
    if model is not None:
        return resolve_open_clip_config(model)
    recorded = source.open_clip or {}
    return recorded.get("model_config") or derived, recorded.get("model_name")


def export_open_clip(path: str, output: str, *, model: str | None = None, dtype="fp32", check: bool = True) -> dict:
    """open_clip's weights and model config from the checkpoint or directory at `path`: a directory in the hub
    layout, or (an `output` ending in .safetensors / .pt) a state-dict file plus `<stem>.json`. `check`: load the
    result with open_clip's own API (strict). Returns {"weights", "config", "directory" or None}."""
    dtype = resolve_dtype(dtype)
    source = open_source(path)
    model_config, name = _open_clip_model_config(source, model)
    stream = to_open_clip_stream(checked_tensors(source), source.cfg)
    if output.endswith((".safetensors", ".pt")):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        if output.endswith(".safetensors"):  # open_clip reads either; safetensors is never a pickle
            spec = {key: (shape, dtype) for key, shape in open_clip_shapes(source.cfg).items()}
            write_safetensors(output, spec, stream)
        else:
            torch.save({key: tensor.to(dtype) for key, tensor in stream}, output)  # tensors only: weights_only
        config_path = os.path.splitext(output)[0] + ".json"
        with open(config_path, "w") as handle:
            json.dump(model_config, handle, indent=4)
            handle.write("\n")
        if check:
            _check_open_clip_file(output, model_config, name)
        return {"weights": output, "config": config_path, "directory": None}

    os.makedirs(output, exist_ok=True)
    weights = os.path.join(output, OPEN_CLIP_WEIGHTS)
    spec = {key: (shape, dtype) for key, shape in open_clip_shapes(source.cfg).items()}
    write_safetensors(weights, spec, stream)
    config = {"model_cfg": model_config, "preprocess_cfg": _preprocess_config(source.cfg),
              # open_clip reads model_cfg and preprocess_cfg only; this lets megacoca.load keep the tokenizer
              "megacoca": {"tokenizer": source.tokenizer, "source": source.info}}
    config_path = os.path.join(output, OPEN_CLIP_CONFIG)
    with open(config_path + ".tmp", "w") as handle:
        json.dump(config, handle, indent=2)
        handle.write("\n")
    os.replace(config_path + ".tmp", config_path)
    if check:
        _check_open_clip_directory(output)
    return {"weights": weights, "config": config_path, "directory": output}


def _open_clip_or_none():
    try:
        import open_clip  # optional: only for the check
    except ImportError:
        print("megacoca convert: open_clip is not installed; the check that it loads the result is skipped",
              file=sys.stderr)
        return None
    return open_clip


def _check_open_clip_directory(directory: str) -> None:
    """open_clip's own `create_model("local-dir:...")` loads the directory, strict."""
    open_clip = _open_clip_or_none()
    if open_clip is not None:
        open_clip.create_model(f"local-dir:{os.path.abspath(directory)}")


def _check_open_clip_file(weights: str, model_config: dict, name: str | None) -> None:
    if _open_clip_or_none() is not None:
        from open_clip.factory import load_checkpoint  # optional (open_clip)

        load_checkpoint(_build_open_clip(model_config, name), weights, strict=True)


def _build_open_clip(model_config: dict, name: str | None = None):
    """open_clip's CoCa with random weights (no download): by name when known, else from the config dict."""
    import open_clip  # optional (open_clip)
    from open_clip.coca_model import CoCa as OpenClipCoCa

    if name is not None and open_clip.get_model_config(name) is not None:
        return open_clip.create_model(name, pretrained=None)

    return OpenClipCoCa(**{k: v for k, v in model_config.items() if k != "custom_text"})


def import_open_clip(model: str, input_path: str, output: str, *, check: bool = True) -> str:
    """A model directory from an open_clip CoCa state dict or training checkpoint (`model`: its open_clip name or
    model-config JSON); `check`: compare the outputs with open_clip's model on a random batch."""
    open_clip_dict, name = resolve_open_clip_config(model)
    cfg = config_from_open_clip(open_clip_dict)
    state = from_open_clip(read_open_clip_state(input_path), cfg)
    with torch.device("meta"):
        CoCa(cfg).load_state_dict(state, strict=True, assign=True)  # shapes and keys, without allocating
    save_pretrained(
        state, output, cfg, tokenizer=clip_bpe_tokenizer_info(cfg),
        open_clip={"model_name": name, "model_config": open_clip_dict},
        source={"from": "open_clip", "model": name or os.path.abspath(model), "input": os.path.abspath(input_path)},
    )
    if check:
        check_against_open_clip(output, open_clip_dict, name)
    return output


@torch.no_grad()
def check_against_open_clip(directory: str, model_config: dict, name: str | None = None,
                            atol: float = 1e-4) -> None:
    """Run both models on a small random batch; raise if the features or logits disagree."""
    if _open_clip_or_none() is None:
        return
    ours = load(directory, kernels="torch", dtype=torch.float32)
    theirs = _build_open_clip(model_config, name).eval()
    theirs.load_state_dict(to_open_clip(ours.state_dict(), ours.cfg), strict=True)
    cfg = ours.cfg
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=generator)
    text = torch.randint(1, cfg.vocab_size, (2, min(cfg.context_length, 12)), generator=generator)
    text[1, 6:] = cfg.pad_id
    a, b = theirs(images, text), ours(images, text)
    for key in ("image_features", "text_features", "logits"):
        error = (a[key].float() - b[key].float()).abs().max().item()
        if not error <= atol * max(1.0, a[key].abs().max().item()):
            raise RuntimeError(f"convert: {key} differ from open_clip's by {error:.3g}; the conversion is wrong")
