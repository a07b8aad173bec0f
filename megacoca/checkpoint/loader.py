"""The one way in: a model directory, an open_clip directory or a DeepSpeed checkpoint -> a built model.

`open_source(path)` recognises what `path` is and returns a `Source`: the model config (`cfg`), the tokenizer ids
it records, and `tensors()`, the single-device megacoca state dict one tensor at a time.

- a model directory: `config.json` + `model.safetensors` (megacoca.models.coca.loading), read tensor by tensor;
- an open_clip directory in the hub layout: `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) + its
  weights (`open_clip_model.safetensors`, or a torch file read weights_only), through the state-dict adapter
  (megacoca.models.coca.open_clip); `read_open_clip_state` opens open_clip's files (here, since opening a file
  is the loader's: the adapter only maps configs and renames tensors);
- a DeepSpeed checkpoint of a megacoca run (the checkpoint directory, whose `latest` is used, or one tag
  directory), any layout: dp/tp/pp, ZeRO 0-3, bf16 or fp32 (megacoca.checkpoint.consolidate, streaming). Its
  model config is the run's job config from the client state, or `model_config` (a CoCaConfig, a CoCaConfig JSON
  or a model directory) for a checkpoint that does not record one.

`checked_tensors(source)` holds every tensor to the model config (names, shapes; a tied head once) as it streams,
and `load(path, ...)` builds the model from it: `megacoca.load`, `megacoca eval` and `megacoca convert` all come
through here. A missing, truncated or unreadable file is one `BadCheckpointError` line naming it (exit 2 from the
command line).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megacoca.checkpoint.consolidate import iter_consolidated
from megacoca.checkpoint.files import BadCheckpointError, safe_load
from megacoca.checkpoint.reshape import find_layout_free, iter_layout_free_weights, read_layout_free_state
from megacoca.checkpoint.tags import COMPLETE, LATEST, client_state, describe_ranks, open_tag
from megacoca.config.model import CoCaConfig
from megacoca.config.train import ConfigError, JobConfig
from megacoca.data.tokenizer import open_tokenizer
from megacoca.models.coca.loading import (
    TIED_KEY,
    TIED_SOURCE,
    WEIGHTS_NAME,
    PretrainedCoCa,
    clip_bpe_tokenizer_info,
    model_tensors,
    read_config,
    tokenizer_info,
)
from megacoca.models.coca.open_clip import CLIP_BPE_IDS, config_from_open_clip, from_open_clip, open_clip_config

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


class Source:
    """What a path holds: `cfg`, `tokenizer` (ids, or None), `open_clip` (name and model config, or None),
    `info` (where the weights came from), `tensors()`."""

    def __init__(self, path: str, cfg: CoCaConfig, *, tokenizer: dict | None = None, open_clip: dict | None = None,
                 info: dict | None = None) -> None:
        self.path, self.cfg, self.tokenizer, self.open_clip, self.info = path, cfg, tokenizer, open_clip, info or {}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError


# ---- model directories --------------------------------------------------------------------------------------
def _safetensors_error(path: str, error: Exception) -> BadCheckpointError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return BadCheckpointError(f"cannot read {path}: {reason} (truncated or not a safetensors file?)")


def _open_safetensors(path: str):
    if not os.path.isfile(path):
        raise BadCheckpointError(f"{path} is missing")
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # SafetensorError, OSError: header or size wrong
        raise _safetensors_error(path, error) from None


def _read_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    handle = _open_safetensors(path)
    for name in handle.keys():
        try:
            tensor = handle.get_tensor(name)
        except Exception as error:
            raise _safetensors_error(path, error) from None
        yield name, tensor


class ModelDirectory(Source):
    """config.json + model.safetensors, read tensor by tensor."""

    def __init__(self, path: str) -> None:
        config = read_config(path)
        try:
            cfg = CoCaConfig.from_dict(config["model"])
        except (KeyError, TypeError, ValueError) as error:
            raise BadCheckpointError(f"{path}/config.json: not a megacoca model config "
                                     f"({' '.join(str(error).split())})") from None
        super().__init__(path, cfg, tokenizer=config.get("tokenizer"), open_clip=config.get("open_clip"),
                         info=config.get("source") or {})

    def tensors(self):
        return _read_safetensors(os.path.join(self.path, WEIGHTS_NAME))


# ---- open_clip files and directories ------------------------------------------------------------------------
def read_open_clip_state(path: str | os.PathLike) -> dict:
    """A bare open_clip state dict (.pt/.bin, or .safetensors as on the HF hub) or a training checkpoint
    ({"state_dict": ...}), DDP `module.` and torch.compile `_orig_mod.` prefixes stripped."""
    if os.fspath(path).endswith(".safetensors"):
        state = load_file(os.fspath(path))
    else:
        state = safe_load(os.fspath(path))  # weights_only: a file from elsewhere cannot run code
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds neither a state dict nor a checkpoint with a 'state_dict'")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


class OpenClipDirectory(Source):
    """open_clip's hub layout (what `megacoca convert to-open-clip DIR` writes, and `hf-hub:` repositories hold)."""

    def __init__(self, path: str) -> None:
        config_path = os.path.join(path, OPEN_CLIP_CONFIG)
        try:
            with open(config_path) as handle:
                config = json.load(handle)
            model_cfg = config["model_cfg"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadCheckpointError(f"{config_path}: not an open_clip model config ({' '.join(str(error).split())})")
        cfg = config_from_open_clip(model_cfg)
        extra = config.get("megacoca") or {}
        tokenizer = extra.get("tokenizer")
        if tokenizer is None and not (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name"):
            tokenizer = clip_bpe_tokenizer_info(cfg)  # open_clip's default tokenizer for a custom config
        super().__init__(path, cfg, tokenizer=tokenizer, open_clip={"model_name": None, "model_config": model_cfg},
                         info=extra.get("source") or {"from": "open_clip", "directory": os.path.abspath(path)})
        found = [os.path.join(path, name) for name in OPEN_CLIP_WEIGHTS if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise BadCheckpointError(f"{path} holds {OPEN_CLIP_CONFIG} but no weights ({OPEN_CLIP_WEIGHTS[0]})")
        self.weights = found[0]

    def tensors(self):
        if self.weights.endswith(".safetensors"):
            state = dict(_read_safetensors(self.weights))
        else:
            state = read_open_clip_state(self.weights)  # weights_only
        return iter(from_open_clip(state, self.cfg).items())


# ---- DeepSpeed checkpoints ----------------------------------------------------------------------------------
def read_model_config(value) -> CoCaConfig:
    """A CoCaConfig from a CoCaConfig, its dict, a CoCaConfig JSON file or a model directory."""
    if isinstance(value, CoCaConfig):
        return value
    if isinstance(value, dict):
        return CoCaConfig.from_dict(value)
    path = os.fspath(value)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as handle:
        values = json.load(handle)
    return CoCaConfig.from_dict(values.get("model", values) if values.get("format") == "megacoca" else values)


class DeepSpeedCheckpoint(Source):
    """A megacoca run's DeepSpeed checkpoint, any layout (megacoca.checkpoint.consolidate), checked on opening."""

    def __init__(self, path: str, model_config=None) -> None:
        self.layout_free = None
        layout_free_dir = find_layout_free(path)
        if layout_free_dir is not None:  # `megacoca convert reshape`'s output: one file per parameter and kind
            self.tag_dir, self.files = layout_free_dir, None
            self.layout_free = read_layout_free_state(self.tag_dir)
            client = {"config": self.layout_free.config, "step": self.layout_free.step}
        else:
            self.tag_dir, self.files = open_tag(path)  # complete, every file there and safe to read
            client = client_state(self.tag_dir)
        self.job = None
        try:
            self.job = JobConfig.from_dict(client["config"]) if client.get("config") else None
        except ConfigError as error:  # a run of another megacoca version: its config may not load here
            if model_config is None:
                raise ConfigError(f"{self.tag_dir}: the run's job config does not load ({error}); pass "
                                  "--model-config (megacoca convert) or --flavor (megacoca eval)") from None
        if model_config is not None:
            cfg = read_model_config(model_config)
        elif self.job is not None:
            cfg = self.job.model_config()
        else:
            raise ConfigError(f"{self.tag_dir} records no job config in its client state: pass --model-config "
                              "(megacoca convert) or --flavor (megacoca eval)")
        try:
            open_clip_meta = {"model_name": None, "model_config": open_clip_config(cfg)}
        except ValueError:
            open_clip_meta = None  # a paper-layout model: `to-open-clip` refuses it with the reasons
        super().__init__(path, cfg, open_clip=open_clip_meta, info={
            "from": "deepspeed", "checkpoint": os.path.abspath(self.tag_dir), "step": client.get("step"),
            "layout": describe_ranks(self.files.layout) if self.files is not None else
            f"layout-free (from {self.layout_free.source.degrees()})",
            "run": self.job.name if self.job is not None else None,
        })
        self.tokenizer = self.tokenizer_info(strict=False)

    def tokenizer_info(self, spec: str | None = None, *, strict: bool = True) -> dict | None:
        """The ids of `spec`, or of the run's data.tokenizer (often a path relative to where the run ran): a
        ConfigError when it cannot be read and `strict`, else None."""
        where = "--tokenizer"
        if spec is None and self.job is not None:
            spec, where = self.job.data.tokenizer, "the run's data.tokenizer (pass --tokenizer to override)"
        if not spec:
            return None
        if spec in ("clip-bpe", "clip_bpe", "clip"):  # fixed ids: no need to load its 180 MB of merges
            return tokenizer_info("clip-bpe", self.cfg.context_length, **CLIP_BPE_IDS)
        try:
            tok = open_tokenizer(spec, self.cfg.context_length, where)
        except ConfigError:
            if strict:
                raise
            return None
        return tokenizer_info(spec, self.cfg.context_length, tok.bos_id, tok.eos_id, tok.pad_id)

    def tensors(self):
        if self.layout_free is not None:
            return self._layout_free_tensors()
        return iter_consolidated(self.tag_dir, self.files)

    def _layout_free_tensors(self):
        """The weights, and a tied head under its second name too (as DeepSpeed's consolidation gives it)."""
        tie = self.cfg.tie_word_embeddings and "caption_head.weight" not in self.layout_free.param_names
        for name, tensor in iter_layout_free_weights(self.tag_dir, self.layout_free):
            yield name, tensor
            if tie and name == "text.embed.token_embedding.weight":
                yield "caption_head.weight", tensor


# ---- one entry ----------------------------------------------------------------------------------------------
def _is_deepspeed(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, LATEST)) or os.path.isfile(os.path.join(path, COMPLETE))
            or bool(glob.glob(os.path.join(path, "*model_states.pt"))))


def open_source(path: str | os.PathLike, *, model_config=None) -> Source:
    """The Source at `path` (see the module docstring). `model_config` only for a DeepSpeed checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a file: give the model directory or checkpoint directory holding it")
    if os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        if model_config is not None:
            raise ValueError(f"{path} is a model directory with its own config; a model config (--model-config, "
                             "--flavor) is taken for a DeepSpeed checkpoint only")
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelDirectory(path)
        return OpenClipDirectory(path)
    if _is_deepspeed(path):
        return DeepSpeedCheckpoint(path, model_config)
    raise FileNotFoundError(
        f"{path} is neither a model directory (config.json + model.safetensors), an open_clip directory "
        f"({OPEN_CLIP_CONFIG} + weights) nor a DeepSpeed checkpoint (a directory with `latest`, or a tag directory "
        "with COMPLETE and *model_states.pt)")


def checked_tensors(source: Source, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`source.tensors()` held to its model config as they stream: every name the model's, every shape right,
    none missing (checked at the end), a tied head once; floating-point tensors cast to `dtype` if given."""
    expected = model_tensors(source.cfg)
    tied = source.cfg.tie_word_embeddings
    seen = set()

    def unfit(what: str) -> ValueError:
        return ValueError(f"{source.path}: the checkpoint does not fit the model config: {what}")

    for name, tensor in source.tensors():
        if tied and name == TIED_KEY:
            continue  # the token embedding's tensor under its second name
        if name not in expected:
            raise unfit(f"unexpected tensor {name}")
        if tuple(tensor.shape) != expected[name]:
            raise unfit(f"{name} is {tuple(tensor.shape)} in the checkpoint, {expected[name]} in the model")
        if name in seen:
            raise unfit(f"{name} comes twice")
        seen.add(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" ... ({len(missing)} in all)" if len(missing) > 5 else ""
        raise unfit(f"missing {', '.join(missing[:5])}{more}")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         kernels: str | None = None, model_config=None):
    """The model at `path` (a model directory, an open_clip directory or a DeepSpeed checkpoint of any layout) as
    a `PretrainedCoCa` in eval mode. `dtype`: cast floating-point tensors as they stream (default: as stored, the
    fp32 master weights of a DeepSpeed checkpoint); `kernels` overrides CoCaConfig.kernels ("auto"/"triton"/
    "torch"); `model_config`: for a DeepSpeed checkpoint that records no job config. Memory: the model, plus what
    reading the checkpoint holds (megacoca.checkpoint.consolidate)."""
    source = open_source(path, model_config=model_config)
    cfg = source.cfg if kernels is None else source.cfg.replace(kernels=kernels)
    with torch.device("meta"):
        model = PretrainedCoCa(cfg, source.tokenizer)
    state = dict(checked_tensors(source, dtype=dtype))
    if cfg.tie_word_embeddings:
        state[TIED_KEY] = state[TIED_SOURCE]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced both Parameters; make them one again
        model.caption_head.weight = model.text.embed.token_embedding.weight
    return model.to(device=device).eval()
