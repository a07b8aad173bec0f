"""Resume under another layout: a checkpoint's training state written into an engine of any tensor x pipeline x
data-parallel layout and ZeRO stage (issue 10 §1).

What moves, and how:
- Per parameter, the fp32 master weight and Adam's two moments, whole (megacoca.checkpoint.full_state joins every
  ZeRO partition, tensor-parallel shard and pipeline stage of the source), then cut for this rank: the pipeline
  stage's parameters only, each tensor-parallel parameter's shard (`param.tp_shard.cut`: vocabulary padding as
  the new degree needs it), and this rank's ZeRO partition of it, written where DeepSpeed keeps it: ZeRO-1/2 and
  DeepSpeed's bf16 optimizer through each parameter's fp32 fragment address in its group's flat partition (the
  way DeepSpeed's universal-checkpoint loader does); ZeRO-3 at the parameter's offset in its sub-group's flat
  partition; ZeRO-0 (a client torch optimizer) into the parameter and the optimizer's state. The bf16/fp32 model
  weights are set from the masters, as an optimizer step would.
- Adam's step, the lr schedule (LambdaLR's state: layout-free), DeepSpeed's step counters (global steps and
  samples, skipped steps) and the run's step.
- The data position: every old data-parallel rank's loader state, re-split for the new data-parallel size by the
  loader (`load_resplit_state`; megacoca.data.shards.reshard_states says exactly what is guaranteed).
- RNG: new rank r takes old rank r mod (old world size)'s states. CoCa's training draws nothing from them (no
  dropout; the data's crops are seeded per sample), so this only matters to a user model that does.

Two sources, one writer:
- a megacoca checkpoint of another layout, read directly when `--resume` names one (every rank reads the whole
  checkpoint and keeps its own cut: fine up to a few billion parameters on a node's memory; beyond, convert
  first);
- a layout-free checkpoint from `megacoca convert reshape`: DeepSpeed's universal-checkpoint file layout
  (`zero/<parameter>/{fp32,exp_avg,exp_avg_sq}.pt`, each `{"param": tensor}`, single-device names and shapes)
  plus `megacoca_state.pt` (everything else above) and `layout_free.json` (source layout, target tp/pp); each
  rank maps only the files of its own parameters. It resumes at any layout; `--tp`/`--pp` are checked against the
  model when it is written and recorded.

Bit-exactness: the weights and moments arrive bit for bit (fp32 in, fp32 out). The continued run differs from
one that kept its layout only by reduction order (gradient all-reduce and accumulation over a different number of
ranks and micro-batches, tensor-parallel partial sums) and, when the data-parallel size changes, by which samples
share a micro-batch (the contrastive loss's negatives are the micro-batch gathered over dp).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from megacoca.checkpoint.consolidate import single_device_name
from megacoca.checkpoint.files import BadCheckpointError, safe_load
from megacoca.checkpoint.full_state import KINDS, adam_step, iter_full_state
from megacoca.checkpoint.tags import (
    COMPLETE,
    LATEST,
    TagFiles,
    client_state,
    locate_tag,
    open_tag,
    rank_file,
    resolve_tag,
    set_rng_state,
)
from megacoca.config.layout import Layout
from megacoca.config.train import JobConfig
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.parallelize import check_layout

LAYOUT_FREE = "layout_free.json"
STATE_FILE = "megacoca_state.pt"
FORMAT = "megacoca-layout-free"
VERSION = 1


@dataclass
class TrainingState:
    """Everything of a checkpoint but the tensors, layout-free."""

    step: int
    adam_step: int
    global_steps: int
    global_samples: int
    skipped_steps: int
    lr_scheduler: dict | None
    data: list  # the loader state of each old data-parallel rank (None where the loader kept none)
    rng: list  # the RNG states of each old rank
    source: Layout  # the layout that wrote the checkpoint (its record, a dict, in a layout-free state file)
    config: dict | None = None
    param_names: list = field(default_factory=list)


def is_layout_free(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, LAYOUT_FREE))


def read_training_state(tag_dir: str, files: TagFiles) -> TrainingState:
    """The non-tensor state of a megacoca checkpoint (`locate_tag` checked it is complete)."""
    layout = files.layout
    states = safe_load(os.path.join(tag_dir, files.model_states(0)[0]), mmap=True)
    rank_files = []
    for rank in range(layout.world):
        path = rank_file(tag_dir, rank)
        if not os.path.isfile(path):
            raise BadCheckpointError(f"{tag_dir} is incomplete: {path} (rank {rank}'s data position and RNG state) "
                                     "is missing")
        rank_files.append(safe_load(path))
    # ranks are laid out (dp, pp, tp): old data-parallel rank d's loader is on rank d * pp * tp (and its peers)
    data = [rank_files[d * layout.pp * layout.tp].get("data") for d in range(layout.dp)]
    return TrainingState(
        step=int(states.get("step", rank_files[0]["step"])), adam_step=adam_step(tag_dir, files),
        global_steps=int(states.get("global_steps", 0)), global_samples=int(states.get("global_samples", 0)),
        skipped_steps=int(states.get("skipped_steps", 0)), lr_scheduler=states.get("lr_scheduler"), data=data,
        rng=[local["rng"] for local in rank_files], source=layout,
        config=states.get("config"))


# --------------------------------------------------------------------------------------------- offline
def write_layout_free(source: str, output: str, *, tp: int, pp: int) -> str:
    """`megacoca convert reshape`: the checkpoint `source` (any layout) as a layout-free checkpoint directory
    `output` (`output/latest` -> `output/stepN`), after checking that the model splits at tensor degree `tp` and
    `pp` pipeline stages. One parameter at a time is held (beyond what reading one pipeline stage of the source
    needs). Returns the tag directory."""
    tag_dir, files = open_tag(source)
    config = client_state(tag_dir).get("config")
    try:
        cfg = _model_config(config)
    except (KeyError, TypeError, ValueError) as error:
        raise BadCheckpointError(f"{tag_dir}: its client state has no usable job config ({error})") from None
    check_layout(cfg, ParallelDims(dp=1, tp=tp, pp=pp, world_size=tp * pp))  # before reading any tensor
    state = read_training_state(tag_dir, files)
    tag = os.path.basename(tag_dir)
    final = os.path.join(output, tag)
    scratch = final + ".partial"
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.join(scratch, "zero"))
    names = []
    for name, kinds in iter_full_state(tag_dir, files):
        folder = os.path.join(scratch, "zero", name)
        os.makedirs(folder)
        for kind in KINDS:
            torch.save({"param": kinds[kind].contiguous()}, os.path.join(folder, f"{kind}.pt"))
        names.append(name)
    state.param_names = names
    if state.config is not None:
        state.config = json.loads(json.dumps(state.config))
        state.config.setdefault("parallel", {}).update(tp=tp, pp=pp)
    torch.save(asdict(state), os.path.join(scratch, STATE_FILE))  # asdict: `source` as its record
    with open(os.path.join(scratch, LAYOUT_FREE), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "step": state.step, "source": state.source.record(),
                   "target": {"tp": tp, "pp": pp}, "parameters": len(names)}, f, indent=1)
    with open(os.path.join(scratch, COMPLETE), "w") as f:
        f.write(f"{state.step}\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(scratch, final)
    with open(os.path.join(output, LATEST + ".tmp"), "w") as f:
        f.write(tag)
    os.replace(os.path.join(output, LATEST + ".tmp"), os.path.join(output, LATEST))
    return final


def _model_config(config: dict | None):
    if config is None:
        raise KeyError("no config")
    return JobConfig.from_dict(config).model_config()


def find_layout_free(path: str) -> str | None:
    """The tag directory of a complete layout-free checkpoint at `path` (the tag, or the directory whose `latest`
    names it), else None."""
    try:
        tag_dir = resolve_tag(path)
    except FileNotFoundError:
        return None
    return tag_dir if is_layout_free(tag_dir) else None


def iter_layout_free_weights(tag_dir: str, state: TrainingState) -> Iterator[tuple[str, torch.Tensor]]:
    """(single-device name, fp32 weight) of a layout-free checkpoint, one at a time (mapped files)."""
    for name, kinds in _iter_layout_free(tag_dir, state.param_names, kinds=("fp32",)):
        yield name, kinds["fp32"].clone()


def read_layout_free_state(tag_dir: str) -> TrainingState:
    with open(os.path.join(tag_dir, LAYOUT_FREE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BadCheckpointError(f"{os.path.join(tag_dir, LAYOUT_FREE)}: not a {FORMAT} v{VERSION} checkpoint")
    path = os.path.join(tag_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise BadCheckpointError(f"{tag_dir} is incomplete: {path} is missing")
    state = TrainingState(**safe_load(path))
    state.source = Layout.from_record(state.source)  # older files: {"dp", "pp", "tp", "zero_stage"}
    return state


def _iter_layout_free(tag_dir: str, names, kinds=KINDS) -> Iterator[tuple[str, dict]]:
    wanted = kinds
    for name in names:
        kinds = {}
        for kind in wanted:
            path = os.path.join(tag_dir, "zero", name, f"{kind}.pt")
            if not os.path.isfile(path):
                raise BadCheckpointError(f"{tag_dir} is incomplete: {path} is missing")
            kinds[kind] = safe_load(path, mmap=True)["param"]
        yield name, kinds


# ---------------------------------------------------------------------------------------------- writer
def _cut(param, full: torch.Tensor) -> torch.Tensor:
    """This tensor rank's piece of the single-device tensor `full` (the whole of it for a replicated one)."""
    shard = getattr(param, "tp_shard", None)
    return shard.cut(full) if shard is not None else full


def _local_shape(param) -> tuple:
    shard = getattr(param, "tp_shard", None)
    if shard is not None:
        return tuple(shard.local_shape)
    return tuple(getattr(param, "ds_shape", param.shape))


def _step_like(existing, step: int):
    if isinstance(existing, torch.Tensor):
        return torch.tensor(float(step), dtype=existing.dtype, device=existing.device)
    if isinstance(existing, int):
        return step
    return torch.tensor(float(step))


class _EngineWriter:
    """Writes per-parameter fp32 masters and Adam moments (this rank's tensor-parallel cut, whole) into the
    engine's own storage, whatever its ZeRO stage."""

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = engine.optimizer
        self.params = {single_device_name(name): param for name, param in engine.module.named_parameters()}
        self.kind = ("zero3" if hasattr(self.optimizer, "fp32_partitioned_groups_flat") else
                     "hp" if hasattr(self.optimizer, "bit16_groups") or hasattr(self.optimizer, "bf16_groups") else
                     "torch")
        self.buffers: dict = {}  # (group, kind) -> flat moment buffer this rank holds
        if self.kind == "zero3":
            if getattr(self.optimizer, "swap_optimizer", False) or any(
                    flat is None for flat in self.optimizer.fp16_partitioned_groups_flat):
                raise BadCheckpointError("resuming under another layout with ZeRO-3 NVMe offload is not supported")
            self.flats = self.optimizer.fp32_partitioned_groups_flat
        elif self.kind == "hp":
            groups = "bit16_groups" if hasattr(self.optimizer, "bit16_groups") else "bf16_groups"
            self.lp_groups = getattr(self.optimizer, groups)
            self.flats = (self.optimizer.single_partition_of_fp32_groups if groups == "bit16_groups" else
                          self.optimizer.fp32_groups_flat_partition)
            self.group_of = {id(p): i for i, group in enumerate(self.lp_groups) for p in group}
        if self.kind != "torch":
            for i, flat in enumerate(self.flats):
                for kind in KINDS[1:]:
                    self.buffers[i, kind] = torch.zeros_like(flat)
        self.done: set[str] = set()

    def write(self, name: str, kinds: dict[str, torch.Tensor]) -> bool:
        """False when this rank does not hold `name` (another pipeline stage does)."""
        param = self.params.get(name)
        if param is None:
            return False
        want = _local_shape(param)
        full_shape = tuple(getattr(param, "tp_shard").full_shape) if hasattr(param, "tp_shard") else want
        if tuple(kinds["fp32"].shape) != full_shape:
            raise BadCheckpointError(f"{name}: the checkpoint holds shape {tuple(kinds['fp32'].shape)}, this model "
                                     f"{full_shape}: the model configs differ")
        local = {kind: _cut(param, value.float()) for kind, value in kinds.items()}
        getattr(self, f"_write_{self.kind}")(param, local)
        self.done.add(name)
        return True

    def _write_torch(self, param, local) -> None:
        with torch.no_grad():
            param.data.copy_(local["fp32"].to(param.dtype))
        state = self.optimizer.state[param]
        state["exp_avg"] = local["exp_avg"].to(param.device).clone()
        state["exp_avg_sq"] = local["exp_avg_sq"].to(param.device).clone()

    def _write_hp(self, param, local) -> None:
        with torch.no_grad():
            param.data.copy_(local["fp32"].to(param.dtype))  # ZeRO-1/2 keep the whole low-precision model
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return  # no part of this parameter is in this rank's partition
        i = self.group_of[id(param)]
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        for kind in KINDS:
            target = self.flats[i] if kind == "fp32" else self.buffers[i, kind]
            target.data.narrow(0, hp.start, hp.numel).copy_(local[kind].flatten().narrow(0, lp.start, lp.numel))

    def _write_zero3(self, param, local) -> None:
        optimizer = self.optimizer
        group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
        world = optimizer._get_param_partition_world_size(param)
        rank = optimizer._get_param_partition_rank(param)
        per_rank = -(-param.ds_numel // world)
        for kind in KINDS:
            flat = local[kind].flatten()
            piece = torch.zeros(per_rank, dtype=torch.float32)
            start = rank * per_rank
            valid = max(0, min(per_rank, flat.numel() - start))
            piece[:valid] = flat[start:start + valid]
            target = self.flats[group] if kind == "fp32" else self.buffers[group, kind]
            target.data.narrow(0, offset, numel).copy_(piece[:numel])

    def finish(self, step: int) -> None:
        """Every parameter must have been written; then the moments and Adam's step go into the optimizer's state
        and ZeRO-3's partitioned low-precision weights are refreshed from the masters."""
        missing = sorted(set(self.params) - self.done)
        if missing:
            raise BadCheckpointError(f"the checkpoint has no {missing[0]}" + (f" (and {len(missing) - 1} more "
                                     "parameters)" if len(missing) > 1 else "") + ": the model configs differ")
        if self.kind == "torch":
            for param in self.params.values():
                state = self.optimizer.state[param]
                state["step"] = _step_like(state.get("step"), step)
            return
        base = self.optimizer.optimizer
        for i, flat in enumerate(self.flats):
            state = base.state[flat]
            state["step"] = _step_like(state.get("step"), step)
            for kind in KINDS[1:]:
                state[kind] = self.buffers[i, kind].to(flat.device)
        if self.kind == "hp":
            self.optimizer._hp_optimizer_states_linked = False  # relinked to these buffers at the next step
            return
        optimizer = self.optimizer
        for i, flat in enumerate(self.flats):  # as DeepSpeed's own universal load does (stage3.py)
            if flat.numel() > 0:
                optimizer.fp16_partitioned_groups_flat[i].data.copy_(flat.data)
            updated = optimizer.unflatten(optimizer.fp16_partitioned_groups_flat[i],
                                          optimizer.fp16_partitioned_groups[i])
            for partitioned, value in zip(optimizer.fp16_partitioned_groups[i], updated):
                partitioned.data = value.data


# ------------------------------------------------------------------------------------------------ load
def load_reshaped(engine, tag_dir: str, train_loader, *, layout: Layout) -> dict:
    """Every rank calls this: the checkpoint `tag_dir` (another layout's, or a layout-free one) into `engine`, which
    runs under `layout`. Returns {"step", "config", "reshaped": "<old layout> -> <new layout>"}."""
    rank = dist.get_rank()
    if is_layout_free(tag_dir):
        state = read_layout_free_state(tag_dir)
        items = _iter_layout_free(tag_dir, state.param_names)
    else:
        tag_dir, files = open_tag(tag_dir)
        state = read_training_state(tag_dir, files)
        items = iter_full_state(tag_dir, files)  # every file was checked once, by open_tag above
    writer = _EngineWriter(engine)
    names = set()
    for name, kinds in items:
        names.add(name)
        writer.write(name, kinds)
    writer.finish(state.adam_step)
    _check_same_model(names, engine)
    engine.global_steps = state.global_steps
    engine.global_samples = state.global_samples
    engine.skipped_steps = state.skipped_steps
    if state.lr_scheduler is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state.lr_scheduler)
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    dp_rank = rank // (layout.pp * layout.tp)
    if hasattr(train_loader, "load_resplit_state") and any(data is not None for data in state.data):
        train_loader.load_resplit_state(state.data)
    elif hasattr(train_loader, "load_state_dict") and state.data and state.data[0] is not None:
        if len(state.data) != layout.dp:
            raise BadCheckpointError(f"resume from {tag_dir}: this run's data loader cannot re-split the data "
                                     f"position of {len(state.data)} data-parallel ranks for {layout.dp}")
        train_loader.load_state_dict(state.data[dp_rank])
    set_rng_state(state.rng[rank % len(state.rng)])
    return {"step": state.step, "config": state.config,
            "reshaped": f"{state.source.degrees()} -> {layout.degrees()}"}


def _check_same_model(names: set[str], engine) -> None:
    """The source's parameters are the model's, across every pipeline stage (each rank checks its own stage's in
    the writer; here the union)."""
    named = engine.module.named_parameters(remove_duplicate=False)  # a tied parameter under both names
    held = {single_device_name(name) for name, _ in named}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(held))
    model = set().union(*map(set, everyone))
    extra = sorted(names - model)
    if extra:
        raise BadCheckpointError(f"the checkpoint holds {extra[0]}, which this model has not" +
                                 (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") +
                                 ": the model configs differ")


def needs_reshape(tag_dir: str, layout: Layout, files: TagFiles | None = None) -> bool:
    """Whether `tag_dir` must be loaded through `load_reshaped` into a run of `layout`: a layout-free checkpoint,
    or one written by another dp x pp x tp or ZeRO stage (`Layout.same_shards`), or in another precision (DeepSpeed's
    bf16 optimizer and its fp32 ZeRO optimizer name and lay out their files differently: its own loader would look
    for files the checkpoint does not have). With `files`, the tag's files were already found complete."""
    if is_layout_free(tag_dir):
        return True
    if files is None:
        tag_dir, files = locate_tag(tag_dir)
    return not files.layout.same_shards(layout) or files.layout.precision != layout.precision


__all__ = ["is_layout_free", "load_reshaped", "needs_reshape", "write_layout_free"]
