"""`megacoca convert`: the command line only; the conversions are megacoca.checkpoint.export.

    megacoca convert from-deepspeed --input RUN/checkpoints[/stepN] --output DIR [--dtype bf16]
    megacoca convert to-open-clip --input DIR|RUN/checkpoints --output OPEN_CLIP_DIR
    megacoca convert from-open-clip --model coca_ViT-B-32 --input open_clip.pt --output DIR
    megacoca convert reshape --input RUN/checkpoints[/stepN] --output DIR --tp N --pp M

A model directory holds `config.json` and `model.safetensors` (megacoca.models.coca.loading); load it with
`megacoca.load(DIR)`. `from-deepspeed` takes a checkpoint of any layout (dp/tp/pp, ZeRO 0-3, bf16 or fp32) and
streams it tensor by tensor. `to-open-clip` takes a model directory or a DeepSpeed checkpoint and writes a
directory in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors):
`open_clip.create_model_and_transforms("local-dir:OPEN_CLIP_DIR")` loads it, and so does `hf-hub:ORG/REPO` once
it is uploaded as it is. `reshape` writes a layout-free checkpoint (masters, Adam moments, lr schedule, step, data
position: megacoca.checkpoint.reshape) that `megacoca train --resume DIR` continues at any layout; `--tp`/`--pp`
are checked against the model. (`--resume` of a checkpoint of another layout reshapes it directly too.) An --output ending in .safetensors or .pt writes the bare open_clip state dict instead,
with its model config beside it (`<stem>.json`: `open_clip.add_model_config(<json>)`, then
`open_clip.create_model(<stem>, pretrained=<file>)`).
"""

from __future__ import annotations

import argparse
import os
import sys

from megacoca.cli import inputs
from megacoca.cli.inputs import argument

DTYPE_CHOICES = ("fp32", "bf16")
DEEPSPEED_INPUT_HELP = ("a checkpoint tag directory (RUN/checkpoints/step00000100) or the checkpoint directory (its "
                        "`latest` is used)")


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

    p = commands.add_parser("to-open-clip", help="model directory or DeepSpeed checkpoint (open_clip layout) -> "
                                                 "open_clip directory (or state-dict file)")
    p.add_argument("--input", required=True, type=argument(inputs.model_source),
                   help="megacoca model directory, or a DeepSpeed checkpoint (directory or tag directory)")
    p.add_argument("--output", required=True, type=argument(inputs.open_clip_output),
                   help="directory to write open_clip_config.json and open_clip_model.safetensors to (open_clip's "
                        "hub layout); a path ending in .safetensors or .pt writes the state dict alone")
    p.add_argument("--model", default=None, type=argument(inputs.open_clip_model),
                   help="open_clip model name or model-config JSON to write (default: the one recorded, else "
                        "derived from the model config)")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help="dtype of the weights (default fp32)")
    p.add_argument("--no-check", action="store_true", help="skip loading the result with open_clip")
    p.set_defaults(func=to_open_clip_command)

    p = commands.add_parser("from-deepspeed", help="megacoca DeepSpeed checkpoint (any ZeRO stage, tensor- and "
                                                   "pipeline-parallel degree) -> model directory")
    p.add_argument("--input", required=True, type=argument(inputs.deepspeed_checkpoint),
                   help=DEEPSPEED_INPUT_HELP)
    p.add_argument("--output", required=True, type=argument(inputs.output_dir),
                   help="directory to write config.json and model.safetensors to")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES,
                   help="dtype of the weights: fp32 (the master weights, default) or bf16")
    p.add_argument("--model-config", default=None, type=argument(inputs.model_config_file),
                   help="CoCaConfig JSON (or a model directory) when the checkpoint's client state has no job config")
    p.add_argument("--tokenizer", default=None, type=argument(inputs.tokenizer),
                   help="tokenizer spec to record (default: the run's data.tokenizer)")
    p.set_defaults(func=from_deepspeed_command)

    p = commands.add_parser("reshape", help="megacoca DeepSpeed checkpoint (any layout) -> layout-free checkpoint "
                                            "that resumes at another tensor/pipeline/data-parallel layout")
    p.add_argument("--input", required=True, type=argument(inputs.deepspeed_checkpoint),
                   help=DEEPSPEED_INPUT_HELP)
    p.add_argument("--output", required=True, type=argument(inputs.output_dir),
                   help="directory to write the layout-free checkpoint to (OUTPUT/latest, OUTPUT/stepN/)")
    p.add_argument("--tp", required=True, type=argument(inputs.positive_int),
                   help="the tensor-parallel degree the run will resume at (checked against the model)")
    p.add_argument("--pp", default="1", type=argument(inputs.positive_int),
                   help="the pipeline-parallel degree the run will resume at (default 1; checked against the model)")
    p.set_defaults(func=reshape_command)


# The commands import the conversions (torch, the model) when they run, not when `megacoca --help` imports this module.


def from_open_clip_command(args) -> int:
    from megacoca.checkpoint.export import import_open_clip

    out = import_open_clip(args.model, args.input, args.output, check=not args.no_check)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


def to_open_clip_command(args) -> int:
    from megacoca.checkpoint.export import export_open_clip
    from megacoca.models.coca.open_clip import NotExpressibleError

    try:
        written = export_open_clip(args.input, args.output, model=args.model, dtype=args.dtype,
                                   check=not args.no_check)
    except NotExpressibleError as error:
        print(f"megacoca convert to-open-clip: {error}", file=sys.stderr)
        return 2
    if written["directory"]:
        where = os.path.abspath(written["directory"])
        print(f"wrote {written['config']} and {written['weights']} (open_clip's hub layout); in open_clip:\n"
              f"  model, _, preprocess = open_clip.create_model_and_transforms({'local-dir:' + where!r})\n"
              f"  tokenizer = open_clip.get_tokenizer({'local-dir:' + where!r})")
    else:
        stem = os.path.splitext(os.path.basename(written["config"]))[0]
        print(f"wrote {written['weights']} (open_clip state dict) and {written['config']} (its model config); in "
              f"open_clip:\n  open_clip.add_model_config({written['config']!r})\n"
              f"  model = open_clip.create_model({stem!r}, pretrained={written['weights']!r})")
    return 0


def from_deepspeed_command(args) -> int:
    from megacoca.checkpoint.export import export_model_directory

    out = export_model_directory(args.input, args.output, dtype=args.dtype, model_config=args.model_config,
                                 tokenizer=args.tokenizer)
    print(f"wrote {out}/config.json and {out}/model.safetensors ({args.dtype})")
    return 0


def reshape_command(args) -> int:
    from megacoca.checkpoint.reshape import read_layout_free_state, write_layout_free

    try:
        tag_dir = write_layout_free(args.input, args.output, tp=int(args.tp), pp=int(args.pp))
    except ValueError as error:  # the model does not split at --tp / --pp
        print(f"megacoca convert reshape: {error}", file=sys.stderr)
        return 2
    state = read_layout_free_state(tag_dir)
    print(f"wrote {tag_dir}: step {state.step}, {len(state.param_names)} parameters (fp32 masters and Adam moments), "
          f"lr schedule and the data position of {state.source.degrees()}; resume with\n"
          f"  megacoca train ... --resume {os.path.abspath(args.output)} --set parallel.tp={args.tp} "
          f"--set parallel.pp={args.pp}  (any data-parallel size and ZeRO stage)")
    return 0
