"""`megacoca convert`: open_clip <-> megacoca model directories, and DeepSpeed checkpoints -> directories.

    megacoca convert from-open-clip --model coca_ViT-B-32 --input open_clip.pt --output DIR
    megacoca convert to-open-clip --input DIR --output open_clip.pt
    megacoca convert from-deepspeed --input RUN/checkpoints[/stepN] --output DIR

A model directory holds `config.json` and `model.safetensors` (megacoca.models.coca.loading); load it with
`megacoca.load(DIR)`. `to-open-clip` writes open_clip's state dict and, next to it, the open_clip model-config
JSON (`<output stem>.json`): `open_clip.add_model_config(<that json>)` then `open_clip.create_model(<stem>,
pretrained=<output>)` builds the model; it checks the export by loading it into open_clip with strict=True.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

from megacoca.config import inputs
from megacoca.config.inputs import argument


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert between open_clip, DeepSpeed checkpoints and megacoca model directories",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="convert_command", metavar="FORMAT", required=True)

    p = commands.add_parser("from-open-clip", help="open_clip CoCa state dict or checkpoint -> model directory")
    p.add_argument("--model", required=True, type=argument(inputs.open_clip_model),
                   help="open_clip model name (coca_ViT-B-32, coca_ViT-L-14) or the path of its model-config JSON")
    p.add_argument("--input", required=True, type=argument(inputs.weights_file),
                   help="state dict or training checkpoint ({'state_dict': ...}) .pt")
    p.add_argument("--output", required=True, type=argument(inputs.output_dir),
                   help="directory to write config.json and model.safetensors to")
    p.add_argument("--no-check", action="store_true", help="skip comparing outputs with open_clip's model")
    p.set_defaults(func=from_open_clip_command)

    p = commands.add_parser("to-open-clip", help="model directory (open_clip layout) -> open_clip state dict")
    p.add_argument("--input", required=True, type=argument(inputs.model_dir), help="megacoca model directory")
    p.add_argument("--output", required=True, type=argument(inputs.output_file),
                   help="open_clip state dict to write (.safetensors, or .pt)")
    p.add_argument("--model", default=None, type=argument(inputs.open_clip_model),
                   help="open_clip model name to check against (default: the one recorded in the directory)")
    p.add_argument("--no-check", action="store_true", help="skip loading the result into open_clip")
    p.set_defaults(func=to_open_clip_command)

    p = commands.add_parser("from-deepspeed", help="megacoca DeepSpeed checkpoint (any ZeRO stage, any tensor-parallel "
                                                   "degree) -> model directory")
    p.add_argument("--input", required=True, type=argument(inputs.deepspeed_checkpoint),
                   help="a checkpoint tag directory (RUN/checkpoints/step00000100) or the checkpoint directory "
                        "(its `latest` is used)")
    p.add_argument("--output", required=True, type=argument(inputs.output_dir),
                   help="directory to write config.json and model.safetensors to")
    p.add_argument("--model-config", default=None, type=argument(inputs.model_config_file),
                   help="CoCaConfig JSON (or a model directory) when the checkpoint's client state has no job config")
    p.add_argument("--tokenizer", default=None, type=argument(inputs.tokenizer),
                   help="tokenizer spec to record (default: the run's data.tokenizer)")
    p.set_defaults(func=from_deepspeed_command)


# ---- from-open-clip -----------------------------------------------------------------------------------------
def convert_from_open_clip(model: str, input_path: str, output: str, *, check: bool = True) -> str:
    from megacoca.models.coca.loading import clip_bpe_tokenizer_info, save_pretrained
    from megacoca.models.coca.model import CoCa
    from megacoca.models.coca.open_clip import (
        config_from_open_clip, from_open_clip, read_open_clip_state, resolve_open_clip_config,
    )

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
        _check_against_open_clip(output, open_clip_dict)
    return output


def _build_open_clip(model_config: dict, name: str | None = None):
    """open_clip's CoCa with random weights (no download): by name when known, else from the config dict."""
    import open_clip

    if name is not None and open_clip.get_model_config(name) is not None:
        return open_clip.create_model(name, pretrained=None)
    from open_clip.coca_model import CoCa as OpenClipCoCa

    kwargs = {k: v for k, v in model_config.items() if k != "custom_text"}
    return OpenClipCoCa(**kwargs)


@torch.no_grad()
def _check_against_open_clip(directory: str, model_config: dict, name: str | None = None, atol: float = 1e-4) -> None:
    """Run both models on a small random batch; raise if the features or logits disagree."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("convert: open_clip is not installed; output check skipped", file=sys.stderr)
        return
    from megacoca.models.coca.loading import load_pretrained
    from megacoca.models.coca.open_clip import to_open_clip

    ours = load_pretrained(directory, kernels="torch")
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


def from_open_clip_command(args) -> int:
    out = convert_from_open_clip(args.model, args.input, args.output, check=not args.no_check)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


# ---- to-open-clip -------------------------------------------------------------------------------------------
def convert_to_open_clip(input_dir: str, output: str, *, model: str | None = None, check: bool = True) -> tuple[str, str]:
    """Write open_clip's state dict to `output` and its model config to `<output stem>.json`."""
    from megacoca.config.model import CoCaConfig
    from megacoca.models.coca.loading import read_config, read_state
    from megacoca.models.coca.open_clip import open_clip_config, resolve_open_clip_config, to_open_clip

    config = read_config(input_dir)
    cfg = CoCaConfig.from_dict(config["model"])
    model_config = open_clip_config(cfg)  # NotExpressibleError for the paper layout and other non-open_clip models
    recorded = config.get("open_clip") or {}
    name = model or recorded.get("model_name")
    if model is not None:
        model_config = resolve_open_clip_config(model)[0]
    elif recorded.get("model_config"):
        model_config = recorded["model_config"]
    state = to_open_clip(read_state(input_dir, cfg), cfg)
    if check:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            print("convert: open_clip is not installed; strict load check skipped", file=sys.stderr)
        else:
            _build_open_clip(model_config, name).load_state_dict(state, strict=True)
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    if output.endswith(".safetensors"):  # open_clip reads either; safetensors is never a pickle
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous().clone() for name, tensor in state.items()}, output)
    else:
        torch.save(state, output)  # tensors only: open_clip loads it with weights_only=True
    config_path = os.path.splitext(output)[0] + ".json"
    with open(config_path, "w") as handle:
        json.dump(model_config, handle, indent=4)
        handle.write("\n")
    return output, config_path


def to_open_clip_command(args) -> int:
    from megacoca.models.coca.open_clip import NotExpressibleError

    try:
        state_path, config_path = convert_to_open_clip(args.input, args.output, model=args.model,
                                                       check=not args.no_check)
    except NotExpressibleError as error:
        print(f"megacoca convert to-open-clip: {error}", file=sys.stderr)
        return 2
    stem = os.path.splitext(os.path.basename(config_path))[0]
    print(f"wrote {state_path} (open_clip state dict) and {config_path} (its model config); in open_clip:\n"
          f"  open_clip.add_model_config({config_path!r})\n"
          f"  model = open_clip.create_model({stem!r}, pretrained={state_path!r})")
    return 0


# ---- from-deepspeed -----------------------------------------------------------------------------------------
def _read_model_config(path: str):
    from megacoca.config.model import CoCaConfig
    from megacoca.models.coca.loading import CONFIG_NAME

    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    with open(path) as handle:
        values = json.load(handle)
    return CoCaConfig.from_dict(values.get("model", values) if values.get("format") == "megacoca" else values)


def convert_from_deepspeed(input_path: str, output: str, *, model_config: str | None = None,
                           tokenizer: str | None = None) -> str:
    from megacoca.checkpoint.consolidate import client_state, consolidated_state_dict, resolve_tag_dir
    from megacoca.config.train import ConfigError, JobConfig
    from megacoca.models.coca.loading import save_pretrained, tokenizer_info
    from megacoca.models.coca.model import CoCa
    from megacoca.models.coca.open_clip import NotExpressibleError, open_clip_config

    tag_dir = resolve_tag_dir(input_path)
    client = client_state(tag_dir)
    job = JobConfig.from_dict(client["config"]) if client.get("config") else None
    if model_config is not None:
        cfg = _read_model_config(model_config)
    elif job is not None:
        cfg = job.model_config()
    else:
        raise ConfigError(f"{tag_dir} records no job config in its client state: pass --model-config")
    # The tokenizer before the weights: a run's data.tokenizer is often a path relative to where it ran.
    spec = tokenizer or (job.data.tokenizer if job is not None else None)
    tok = None
    if spec:
        where = "--tokenizer" if tokenizer else "the run's data.tokenizer (pass --tokenizer to override)"
        tokenizer_obj = inputs.keyed(where, inputs.tokenizer, spec, cfg.context_length)
        tok = tokenizer_info(spec, cfg.context_length, tokenizer_obj.bos_id, tokenizer_obj.eos_id, tokenizer_obj.pad_id)
    state = consolidated_state_dict(tag_dir)  # fp32, merged over the ZeRO partitions and tensor-parallel shards
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    if cfg.tie_word_embeddings and "caption_head.weight" not in state:
        state["caption_head.weight"] = state["text.embed.token_embedding.weight"]
    with torch.device("meta"):
        CoCa(cfg).load_state_dict(state, strict=True, assign=True)  # every key, every shape

    try:
        open_clip_meta = {"model_name": None, "model_config": open_clip_config(cfg)}
    except NotExpressibleError:
        open_clip_meta = None  # a paper-layout model: `to-open-clip` will refuse it with the reasons
    save_pretrained(state, output, cfg, tokenizer=tok, open_clip=open_clip_meta, source={
        "from": "deepspeed", "checkpoint": os.path.abspath(tag_dir), "step": client.get("step"),
        "run": job.name if job is not None else None,
    })
    return output


def from_deepspeed_command(args) -> int:
    out = convert_from_deepspeed(args.input, args.output, model_config=args.model_config, tokenizer=args.tokenizer)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0
