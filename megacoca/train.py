"""`megacoca train` and `python -m megacoca.train`: parse -> config -> Trainer -> train -> close.

Runs the same way under `deepspeed` (--num_gpus / --hostfile), `torchrun`, srun wrappers, or as a plain
single process (it then makes a one-rank group itself). Bad input (unknown key, wrong type, non-divisible
batch, missing shards) is one line on stderr and exit code 2, before any process group or model exists.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings

if __name__ == "__main__" and not __package__:
    # Run as a file (`deepspeed megacoca/train.py ...`): put the repo root, not megacoca/, first on sys.path,
    # so that megacoca's subpackages (data, config, eval, ...) cannot shadow top-level modules of those names.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None,
                        help="named recipe from megacoca.config.train (default coca_tiny_cpu, or the file's `recipe:`)")
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_launch_env() -> None:
    """A plain `python -m megacoca.train` is a one-rank job: give it the env a launcher would."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def init_distributed(timeout_s: float | None = None) -> None:
    """The default process group; `timeout_s` (fault.collective_timeout_s) bounds the rendezvous and every
    collective of it, so a rank that stops cannot hold the others forever (megacoca.launch.watchdog)."""
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from megacoca.launch.deepspeed_comm import without_shared_memory_allreduce

    if dist.is_initialized():
        return
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    without_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                               **kwargs)


def check_inputs(job, world_size: int):
    """Everything that can be wrong with the input, checked before any rank builds a model or a process group:
    the config's values, the DeepSpeed JSON, the layout, and the files behind them (shards, resume checkpoint,
    the run and checkpoint directories). Returns the (unbuilt) ParallelDims of the job."""
    from megacoca.config import inputs
    from megacoca.config.deepspeed import build_deepspeed_config
    from megacoca.config.train import ConfigError
    from megacoca.parallel.dims import ParallelDims
    from megacoca.parallel.parallelize import check_layout

    job.validate(world_size)
    dims = ParallelDims.from_config(job.parallel, world_size)
    build_deepspeed_config(job, dims.dp_size)
    try:
        check_layout(job.model_config(), dims)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    if not job.data.train_shards:
        raise ConfigError("data.train_shards is empty: pass --train-shards DIR (e.g. from "
                          "`megacoca data synth-shapes --out data/shapes`)")
    urls = inputs.keyed("data.train_shards", inputs.shards, job.data.train_shards)
    from megacoca.checkpoint.state import find_resume_checkpoint

    try:
        find_resume_checkpoint(job)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    need = dims.dp_size * max(job.data.num_workers, 1)
    if len(urls) < need:
        raise ConfigError(f"data.train_shards: {len(urls)} shards cannot feed dp {dims.dp_size} x "
                          f"num_workers {max(job.data.num_workers, 1)} readers; write more shards or use fewer workers")
    if job.eval.every and job.data.val_shards:
        try:
            inputs.shards(job.data.val_shards)
        except ConfigError as error:
            raise ConfigError(f"data.val_shards: {error} (eval.every={job.eval.every}: pass --val-shards DIR "
                              "or --set eval.every=0)") from None
    inputs.keyed("logging.run_dir", inputs.writable_dir, job.run_dir, "run directory")
    inputs.keyed("checkpoint.dir", inputs.writable_dir, job.checkpoint_dir, "checkpoint directory")
    from megacoca.launch import faults

    try:
        faults.active()  # a malformed MEGACOCA_FAULTS is refused here, not at the step it names
    except faults.FaultSpecError as error:
        raise ConfigError(str(error)) from None
    return dims


def resolve_model_to_tokenizer(job, tokenizer):
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


def build_train_loader(job, model_cfg, dims, tokenizer):
    from megacoca.data.shards import ShardLoader
    from megacoca.data.transforms import ImageTransform

    return ShardLoader(job.data.train_shards, job.schedule.micro_batch_size, tokenizer,
                       ImageTransform(model_cfg.image_size, train=True), dp_rank=dims.dp_rank,
                       dp_size=dims.dp_size, num_workers=job.data.num_workers, seed=job.seed,
                       shard_retries=job.data.shard_retries, shard_timeout=job.data.shard_timeout_s or None)


def run(args) -> int:
    from megacoca.config.train import RECIPES, ConfigError, build_config

    if args.list_recipes:
        for name in sorted(RECIPES):
            print(f"{name}: {(RECIPES[name].__doc__ or '').strip().splitlines()[0] if RECIPES[name].__doc__ else ''}")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    def fail(message: str) -> int:
        if rank == 0:
            print(f"megacoca train: error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        job = build_config(args.recipe, args.config, _overrides(args))
        if args.print_config:
            import json

            if rank == 0:
                print(json.dumps(job.to_dict(), indent=2))
            return 0
        dims = check_inputs(job, world_size)
        from megacoca.config import inputs

        tokenizer = inputs.keyed("data.tokenizer", inputs.tokenizer, job.data.tokenizer,
                                 job.model_config().context_length)
        model_cfg = resolve_model_to_tokenizer(job, tokenizer)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        return fail(" ".join(str(error).split()))

    # DeepSpeed 0.19 calls torch's deprecated collective names every step: one warning per call, per rank.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    ensure_launch_env()
    init_distributed(job.fault.collective_timeout_s)
    global _process_group_made
    _process_group_made = True
    import torch.distributed as dist

    from megacoca.launch.preemption import REQUEUE_EXIT_CODE, PreemptionWatch
    from megacoca.trainer import Trainer

    trainer = None
    try:
        from datetime import timedelta

        dims.build(timeout=timedelta(seconds=job.fault.collective_timeout_s))
        loader = build_train_loader(job, model_cfg, dims, tokenizer)
        trainer = Trainer(job, loader, dims=dims, eval_fn=build_eval_fn(job, model_cfg, dims, tokenizer))
        trainer.resume()
        # Installed until the process exits: once one rank has stopped for preemption and exits, a launcher
        # (srun --kill-on-bad-exit, the deepspeed launcher) SIGTERMs the others while they shut down, and they
        # must still exit with REQUEUE_EXIT_CODE, not die of it.
        trainer.preemption = PreemptionWatch().install()
        trainer.train()
        if trainer.preempted:
            trainer.preemption.ignore_from_now_on()
    except BaseException as error:
        # Leave the process group alone: destroying it can block on peers waiting in a collective. This rank
        # exits with the traceback and the launcher stops the others.
        if trainer is not None:
            trainer.close()
        from megacoca.checkpoint import CheckpointError
        from megacoca.step_guard import BadStepsError

        # a failed save, an unsafe resume file, too many skipped steps: every rank raised it, one line says it
        if isinstance(error, (CheckpointError, BadStepsError)):
            fail(" ".join(str(error).split()))
            return error.exit_code
        raise
    trainer.close()
    dist.destroy_process_group()
    return REQUEUE_EXIT_CODE if trainer.preempted else 0


def build_eval_fn(job, model_cfg, dims, tokenizer):
    """The eval hook (megacoca.eval) when eval.every and data.val_shards are set; None otherwise."""
    if not job.eval.every or not job.data.val_shards:
        return None
    from megacoca.eval import make_train_eval_fn

    return make_train_eval_fn(job, model_cfg, dims, tokenizer)


def main(argv=None) -> int:
    from megacoca.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m megacoca.train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a bad argument (2) whose one line argparse printed
        return stop.code if isinstance(stop.code, int) else 2
    return run(args)


_process_group_made = False


def exit_process(code: int) -> None:
    """End the process with `code`. Once this process has had a process group, without the interpreter's
    teardown: gloo's worker threads can then still hold work (ZeRO-3's prefetches) whose tensors, freed during
    finalization, abort the process ("terminate called without an active exception", SIGABRT). That turned a
    finished run's status into 134 and a preempted run's 75 (requeue) into a failure, now and then on a loaded
    machine. Everything megacoca writes is closed by then (Trainer.close, the process group destroyed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _process_group_made:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
