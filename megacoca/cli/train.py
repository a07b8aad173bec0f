"""`megacoca train` and `python -m megacoca.train`: parse -> check -> process group -> Trainer -> train -> close.

Runs the same way under `deepspeed` (--num_gpus / --hostfile), `torchrun`, srun wrappers, or as a plain
single process (it then makes a one-rank group itself). Bad input (unknown key, wrong type, non-divisible
batch, a layout the model cannot split into, missing shards) is one line on stderr and exit code 2, before any
process group or model exists. The layout is checked here, once per launch (`check_inputs`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from datetime import timedelta

from megacoca.cli import ArgumentParser, inputs
from megacoca.config.deepspeed import build_deepspeed_config
from megacoca.config.layout import Layout, job_layout
from megacoca.config.recipes import RECIPES, build_config
from megacoca.config.train import ConfigError, JobConfig
from megacoca.launch import faults
from megacoca.launch.preemption import REQUEUE_EXIT_CODE, PreemptionWatch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None,
                        help="named recipe from megacoca.config.recipes (default coca_tiny_cpu, or the file's "
                             "`recipe:`)")
    parser.add_argument("--config", default=None, help="YAML/JSON file of nested overrides on the recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set schedule.steps=20 (repeatable)")
    parser.add_argument("--deepspeed-config", "--ds-config", dest="ds_config", default=None,
                        help="ds_configs/ name or JSON path (= --set parallel.deepspeed_config=...)")
    parser.add_argument("--train-shards", default=None, help="= --set data.train_shards=...")
    parser.add_argument("--val-shards", default=None, help="= --set data.val_shards=...")
    parser.add_argument("--steps", type=int, default=None, help="= --set schedule.steps=...")
    parser.add_argument("--run-dir", default=None, help="= --set logging.run_dir=...")
    parser.add_argument("--resume", default=None, help="'auto', 'none' or a checkpoint path (= checkpoint.resume)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--list-recipes", action="store_true", help="list the named recipes and exit")
    # The deepspeed launcher appends --local_rank=N unless told --no_local_rank; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a CoCa model (single process, deepspeed or torchrun)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def _overrides(args) -> list[str]:
    extra = list(args.overrides)
    for flag, key in (("ds_config", "parallel.deepspeed_config"), ("train_shards", "data.train_shards"),
                      ("val_shards", "data.val_shards"), ("steps", "schedule.steps"),
                      ("run_dir", "logging.run_dir"), ("resume", "checkpoint.resume")):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={value}")
    return extra


def check_layout(job: JobConfig, world_size: int) -> tuple[Layout, dict]:
    """The layout of the job over `world_size` ranks and its DeepSpeed config, after checking (one ConfigError
    line) that the degrees fit the world, the batch splits over them, the DeepSpeed JSON is sound, and the model
    splits into them (tensor degree vs heads and MLP widths, pipeline stages vs ViT blocks, micro-batches and
    `parallel.pipeline_split`). The one layout check of a launch."""
    from megacoca.parallel.parallelize import check_layout as check_model_layout  # heavy: imports torch

    job.validate(world_size)
    try:
        dp = job.layout_dp(world_size)
    except ValueError as error:
        raise ConfigError(f"parallel: {error}") from None
    ds_config = build_deepspeed_config(job, dp)
    layout = job_layout(job, world_size, ds_config)
    try:
        check_model_layout(job.model_config(), layout, job.parallel.pipeline_split)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return layout, ds_config


def check_inputs(job: JobConfig, world_size: int) -> tuple[Layout, dict]:
    """Everything that can be wrong with the input, checked before any rank builds a model or a process group:
    the config's values, the layout (`check_layout`), and the files behind them (shards, resume checkpoint, the
    run and checkpoint directories, MEGACOCA_FAULTS). Returns the layout and its DeepSpeed config."""
    from megacoca.checkpoint.state import find_resume_checkpoint  # heavy: imports torch

    layout, ds_config = check_layout(job, world_size)
    need = layout.dp * max(job.data.num_workers, 1)
    if job.data.sources:
        for index, source in enumerate(job.data.sources):
            inputs.keyed(f"data.sources[{index}] ({source.name!r})", inputs.data_source, source, need)
    elif not job.data.train_shards:
        raise ConfigError("data.train_shards is empty: pass --train-shards DIR (e.g. from "
                          "`megacoca data synth-shapes --out data/shapes`) or give data.sources")
    else:
        urls = inputs.keyed("data.train_shards", inputs.shards, job.data.train_shards)
        if len(urls) < need:
            raise ConfigError(f"data.train_shards: {len(urls)} shards cannot feed dp {layout.dp} x num_workers "
                              f"{max(job.data.num_workers, 1)} readers; write more shards or use fewer workers")
    try:
        find_resume_checkpoint(job)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    for index, source in enumerate(job.eval.val_sources if job.eval.every else []):
        inputs.keyed(f"eval.val_sources[{index}] ({source.name!r})", inputs.data_source, source,
                     strict_labels=False)
    if job.eval.every and job.data.val_shards:
        try:
            inputs.shards(job.data.val_shards)
        except ConfigError as error:
            raise ConfigError(f"data.val_shards: {error} (eval.every={job.eval.every}: pass --val-shards DIR "
                              "or --set eval.every=0)") from None
    inputs.keyed("logging.run_dir", inputs.writable_dir, job.run_dir, "run directory")
    inputs.keyed("checkpoint.dir", inputs.writable_dir, job.checkpoint_dir, "checkpoint directory")
    try:
        faults.active()  # a malformed MEGACOCA_FAULTS is refused here, not at the step it names
    except faults.FaultSpecError as error:
        raise ConfigError(str(error)) from None
    return layout, ds_config


def resolve_model_to_tokenizer(job: JobConfig, tokenizer):
    """The tokenizer decides vocab_size and pad_id: the model follows it, so the two never disagree."""
    cfg = job.model_config()
    changes = {}
    if cfg.vocab_size != tokenizer.vocab_size:
        changes["vocab_size"] = tokenizer.vocab_size
    if cfg.pad_id != tokenizer.pad_id:
        changes["pad_id"] = tokenizer.pad_id
    if changes:
        job.model.overrides.update(changes)
    return job.model_config()


def _list_recipes() -> int:
    for name in sorted(RECIPES):
        doc = (RECIPES[name].__doc__ or "").strip()
        print(f"{name}: {doc.splitlines()[0] if doc else ''}")
    return 0


def run(args, preemption: PreemptionWatch | None = None) -> int:
    """`megacoca train`. `preemption`: the watch `python -m megacoca.train` installed as its first act; without
    one (`megacoca train`) it is installed here, before anything else. A SIGUSR1/SIGTERM from then on ends the
    run with REQUEUE_EXIT_CODE and nothing lost (megacoca.launch.preemption), unless the input is bad (2)."""
    if args.list_recipes:
        return _list_recipes()
    preemption = preemption or PreemptionWatch().install()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    def fail(message: str) -> int:
        if rank == 0:
            print(f"megacoca train: error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        job = build_config(args.recipe, args.config, _overrides(args))
        if args.print_config:
            if rank == 0:
                print(json.dumps(job.to_dict(), indent=2))
            preemption.uninstall()
            return 0
        faults.point("check:begin")
        layout, ds_config = check_inputs(job, world_size)
        tokenizer = inputs.keyed("data.tokenizer", inputs.tokenizer, job.data.tokenizer,
                                 job.model_config().context_length)
        model_cfg = resolve_model_to_tokenizer(job, tokenizer)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        # even after a signal: the same input would fail the same way after a requeue
        preemption.uninstall()
        return fail(" ".join(str(error).split()))
    return train(job, layout, ds_config, model_cfg, tokenizer, fail, preemption)


def train(job: JobConfig, layout: Layout, ds_config: dict, model_cfg, tokenizer, fail,
          preemption: PreemptionWatch) -> int:
    """The checked job on this rank: process group, groups, loader, Trainer, resume, the step loop, close.
    Returns the exit status (0, REQUEUE_EXIT_CODE after a preemption, a CheckpointError's or BadStepsError's).
    `preemption` (installed) stays installed until the process exits: once one rank has stopped for preemption
    and exits, a launcher (srun --kill-on-bad-exit, the deepspeed launcher) SIGTERMs the others while they shut
    down, and they must still exit with REQUEUE_EXIT_CODE, not die of it."""
    # heavy (torch, DeepSpeed, the model): imported once the input is known to be good, not at `--help`
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from megacoca.checkpoint import CheckpointError
    from megacoca.data.loaders import build_train_loader
    from megacoca.eval import make_train_eval_fn
    from megacoca.launch.process_group import ensure_launch_env, init_distributed
    from megacoca.launch.watchdog import RendezvousDeadline, StepWatchdog
    from megacoca.parallel.dims import ParallelDims
    from megacoca.step_guard import BadStepsError
    from megacoca.trainer import Trainer

    # DeepSpeed 0.19 calls torch's deprecated collective names every step: one warning per call, per rank.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    ensure_launch_env()
    # the rendezvous and the groups' set-up, bounded by fault.rendezvous_timeout_s (a rank that never joins)
    with RendezvousDeadline(job.fault.rendezvous_timeout_s, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])):
        init_distributed(job.fault.collective_timeout_s)
        preempted_early = preemption.agreed(get_accelerator().current_device_name())
        if not preempted_early:
            dims = ParallelDims.from_layout(layout).build(timeout=timedelta(seconds=job.fault.collective_timeout_s))
    if preempted_early:
        # a signal (on any rank) while the input was checked: nothing built, nothing to save
        if dist.get_rank() == 0:
            print(f"megacoca train: preempted ({', '.join(preemption.received) or 'another rank'}) before the "
                  "model was built: nothing new to save; resume with --resume auto", flush=True)
        preemption.ignore_from_now_on()
        dist.destroy_process_group()
        return REQUEUE_EXIT_CODE
    trainer = None
    # every phase from here on is timed (fault.build_timeout_s, resume_, first_step_, eval_, save_, the steps)
    watchdog = StepWatchdog.for_job(job, dist.get_rank(), dist.get_world_size()).start()
    try:
        faults.point("build:begin")
        with watchdog.timing("build"):
            loader = build_train_loader(job, model_cfg, dims, tokenizer)
            evaluates = job.eval.every and (job.data.val_shards or job.eval.val_sources)
            eval_fn = make_train_eval_fn(job, model_cfg, dims, tokenizer) if evaluates else None
            trainer = Trainer(job, loader, dims=dims, layout=layout, ds_config=ds_config, eval_fn=eval_fn)
        trainer.watchdog = watchdog
        # a signal during the build or the resume: the ranks agree before the first step and stop there
        trainer.preemption = preemption
        faults.point("resume:begin")
        with watchdog.timing("resume"):
            trainer.resume()
        trainer.train()
        watchdog.stop()
        if trainer.preempted:
            preemption.ignore_from_now_on()
    except BaseException as error:
        watchdog.stop()
        # Leave the process group alone: destroying it can block on peers waiting in a collective. This rank
        # exits with the traceback and the launcher stops the others.
        if trainer is not None:
            trainer.close()
        # a failed save, an unsafe resume file, too many skipped steps: every rank raised it, one line says it
        if isinstance(error, (CheckpointError, BadStepsError)):
            fail(" ".join(str(error).split()))
            return error.exit_code
        raise
    trainer.close()
    dist.destroy_process_group()
    return REQUEUE_EXIT_CODE if trainer.preempted else 0


def main(argv=None, preemption: PreemptionWatch | None = None) -> int:
    """`python -m megacoca.train` (what the launchers run; it passes the PreemptionWatch it installed first)."""
    parser = ArgumentParser(prog="python -m megacoca.train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a bad argument (2) whose one line argparse printed
        return stop.code if isinstance(stop.code, int) else 2
    return run(args, preemption)
