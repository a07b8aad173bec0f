"""What one rank of `megacoca plan --calibrate` measures (megacoca.profiling.calibrate starts the ranks).

Every rank at once: matmuls, a large copy, fused attention calls and SelfAttentionBlocks in each precision (the
compute ranks), then real DeepSpeed engines of a toy model under every ZeRO stage and the same toy in plain torch,
then an all-reduce sweep. Times are medians over repetitions that start together on every rank (`_Timer`); the
numbers go back to the parent as plain dicts, and megacoca.plan.fit turns them into a profile.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import statistics
import time
import warnings

import deepspeed
import torch
import torch.distributed as dist

from megacoca.config.deepspeed import load_json
from megacoca.launch.deepspeed_comm import without_shared_memory_allreduce
from megacoca.models.coca.layers import SelfAttentionBlock
from megacoca.plan.fit import ENGINE_CONFIGS, Sizes, engine_stage

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Timer:
    """Times a call on every rank of the default process group at once (group=True), or on this rank alone."""

    def __init__(self, device, reps: int, min_rep_s: float, group: bool) -> None:
        self.device, self.reps, self.min_rep_s, self.group = device, reps, min_rep_s, group

    def _barrier(self) -> None:
        if self.group:
            dist.barrier()

    def _agree(self, inner: int) -> int:
        """The largest repeat count of any rank: the same on all (a collective must be called as often on each)."""
        if not self.group:
            return inner
        count = torch.tensor([float(inner)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        """Median seconds of one call of fn over `reps` repetitions after two warm-up calls; a repetition repeats the
        call until it lasts min_rep_s (the longest count of any rank), and starts together on all ranks."""
        fn()  # warm-up (first-call work: allocation, kernel compilation, lazy init)
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        inner = self._agree(max(1, math.ceil(self.min_rep_s / max(time.perf_counter() - start, 1e-9))))
        times = []
        for _ in range(self.reps):
            self._barrier()
            self._sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            self._sync()
            times.append((time.perf_counter() - start) / inner)
        return statistics.median(times)


def _measure_matmuls(timer: _Timer, sizes: Sizes, precisions: tuple[str, ...], device) -> dict:
    """{"matmul": {precision: {W: seconds of (T x W) @ (W x 4W) @ (4W x W)}}, "copy": seconds of a large copy}."""
    out: dict = {"matmul": {}}
    for precision in precisions:
        dtype = _DTYPES[precision]
        out["matmul"][precision] = {}
        for width in sizes.widths:
            x = torch.randn(sizes.tokens, width, device=device, dtype=dtype)
            up = torch.randn(width, 4 * width, device=device, dtype=dtype) / width ** 0.5
            down = torch.randn(4 * width, width, device=device, dtype=dtype) / (2 * width)
            out["matmul"][precision][width] = timer(lambda: (x @ up) @ down)
            del x, up, down

    src = torch.empty(sizes.copy_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    out["copy"] = timer(lambda: dst.copy_(src))
    del src, dst
    return out


def _measure_attention(timer: _Timer, sizes: Sizes, precisions: tuple[str, ...], device) -> dict:
    """{precision: {(queries, keys): seconds of a fused attention call, forward + backward}}."""
    out: dict = {}
    b, heads, dh = sizes.attention_batch, sizes.block_heads, sizes.attention_head_dim
    for precision in precisions:
        dtype = _DTYPES[precision]
        out[precision] = {}
        for queries, keys in sizes.attention_shapes:
            q = torch.randn(b, heads, queries, dh, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(b, heads, keys, dh, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(b, heads, keys, dh, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(b, heads, queries, dh, device=device, dtype=dtype)

            def attention():
                q.grad = k.grad = v.grad = None
                torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

            out[precision][(queries, keys)] = timer(attention)
            del q, k, v, grad
    return out


def _measure_blocks(timer: _Timer, sizes: Sizes, precisions: tuple[str, ...], device) -> dict:
    """{precision: {(W, batch): seconds of a SelfAttentionBlock's forward + backward}}."""
    out: dict = {}
    heads, seq = sizes.block_heads, sizes.block_seq
    for precision in precisions:
        dtype = _DTYPES[precision]
        out[precision] = {}
        for w in sizes.block_widths:
            torch.manual_seed(0)
            block = SelfAttentionBlock(w, heads, 4 * w, 1e-5, "auto").to(device=device, dtype=dtype)
            params = list(block.parameters())
            for batch in sizes.block_batches:
                x = torch.randn(batch, seq, w, device=device, dtype=dtype, requires_grad=True)
                grad = torch.randn(batch, seq, w, device=device, dtype=dtype)

                def forward_backward():
                    x.grad = None
                    for p in params:
                        p.grad = None  # zero_grad(set_to_none=True): backward allocates them, as in training
                    block(x).backward(grad)

                out[precision][(w, batch)] = timer(forward_backward)
            del block, params, x, grad
    return out


def engine_toys(sizes: Sizes) -> list[tuple[int, int]]:
    """(width, K) of every toy the engines train: the narrow one at each K (the per-tensor costs), and a wide one at
    the smallest K (as many tensors, many more parameters: the per-parameter costs)."""
    return [(sizes.engine_width, k) for k in sizes.engine_blocks] + [(sizes.engine_heavy_width,
                                                                      sizes.engine_blocks[0])]


def toy_model(width: int, blocks: int):
    """The engines' model: `blocks` x (Linear(W, W), LayerNorm(W)), 4 small tensors each
    (megacoca.plan.fit.TENSORS_PER_BLOCK), negligible FLOPs."""
    return torch.nn.Sequential(*(layer for _ in range(blocks)
                                 for layer in (torch.nn.Linear(width, width), torch.nn.LayerNorm(width))))


def engine_config(stage: int | str, sizes: Sizes, dp: int) -> dict:
    """The DeepSpeed config megacoca trains ZeRO `stage` (an ENGINE_CONFIGS key: 0-3 or "3/fp32") with, batch fields
    for the toy, every tensor partitioned."""
    ds = load_json(ENGINE_CONFIGS[stage][0])
    ds.update(train_micro_batch_size_per_gpu=sizes.engine_micro_batch,
              gradient_accumulation_steps=sizes.engine_accum,
              train_batch_size=sizes.engine_micro_batch * sizes.engine_accum * dp,
              gradient_clipping=1.0)  # megacoca's default optim.grad_clip: the step computes the gradient norm
    if engine_stage(stage) == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


def _loss_of(out):
    return out.float().square().mean()


def _measure_baselines(sizes: Sizes, device, timed) -> dict:
    """{precision: {(W, K): median seconds of plain torch forward + backward of the toy}}."""
    out: dict = {}
    for precision in sorted({p for _, p in ENGINE_CONFIGS.values()}):
        dtype = _DTYPES[precision]
        out[precision] = {}
        for width, blocks in engine_toys(sizes):
            torch.manual_seed(0)
            model = toy_model(width, blocks).to(device=device, dtype=dtype)
            x = torch.randn(sizes.engine_micro_batch, width, device=device, dtype=dtype)
            times = []
            for step in range(sizes.engine_warmup_steps + sizes.engine_steps):
                for _ in range(sizes.engine_accum):
                    seconds = timed(lambda: _loss_of(model(x)).backward())
                    if step >= sizes.engine_warmup_steps:
                        times.append(seconds)
                model.zero_grad(set_to_none=True)
            out[precision][(width, blocks)] = statistics.median(times)
            del model
    return out


def _measure_engine(stage: int, width: int, blocks: int, sizes: Sizes, timed) -> tuple[int, dict]:
    """(the toy's parameter count, medians of its "micro", "last" and "step" times) under ZeRO `stage`."""
    dtype = _DTYPES[ENGINE_CONFIGS[stage][1]]
    torch.manual_seed(0)
    model = toy_model(width, blocks)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() > 1]  # as megacoca.optim.param_groups
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=engine_config(stage, sizes, dist.get_world_size()),
                                      dist_init_required=False)
    x = torch.randn(sizes.engine_micro_batch, width, device=engine.device, dtype=dtype)

    def micro_batch():
        engine.backward(_loss_of(engine(x)))
        engine.step()  # not a boundary: the engine only counts it

    times: dict[str, list[float]] = {"micro": [], "last": [], "step": []}
    for step in range(sizes.engine_warmup_steps + sizes.engine_steps):
        step_times = [("micro", timed(micro_batch)) for _ in range(sizes.engine_accum - 1)]
        step_times.append(("last", timed(lambda: engine.backward(_loss_of(engine(x))))))
        step_times.append(("step", timed(engine.step)))
        if step >= sizes.engine_warmup_steps:
            for kind, seconds in step_times:
                times[kind].append(seconds)
    engine.destroy()
    return params, {kind: statistics.median(t) for kind, t in times.items()}


def _measure_engines(sizes: Sizes, device, sync) -> dict:
    """Every rank at once: per ZeRO stage and toy size K, the medians of a micro-batch (not the last of its step:
    forward, backward, step), of the last one (forward, backward) and of the step that follows it; per precision
    and K, plain torch forward + backward of the same model. Seconds on this rank."""
    deepspeed.utils.logger.setLevel(logging.WARNING)
    without_shared_memory_allreduce()

    def timed(fn) -> float:
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    out: dict = {"baseline": _measure_baselines(sizes, device, timed), "engine": {}, "params": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # DeepSpeed's deprecated torch.distributed spellings
        for stage in ENGINE_CONFIGS:
            for width, blocks in engine_toys(sizes):
                params, times = _measure_engine(stage, width, blocks, sizes, timed)
                out["params"][(width, blocks)] = params
                out["engine"][(stage, width, blocks)] = times
    return out


def _measure_allreduce(timer: _Timer, sizes: Sizes, device) -> dict:
    out = {}
    for nbytes in sizes.allreduce_bytes:
        tensor = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
        out[nbytes] = timer(lambda: dist.all_reduce(tensor))
    return out


def _measure(rank: int, device, compute_ranks: int, precisions: tuple[str, ...], sizes: Sizes,
             collectives: bool) -> dict:
    result: dict = {}
    if rank < compute_ranks:  # all compute ranks at once (a lone rank 0 when ranks == 1)
        timer = _Timer(device, sizes.reps, sizes.min_rep_s, compute_ranks > 1)
        result.update(_measure_matmuls(timer, sizes, precisions, device))
        result["attention"] = _measure_attention(timer, sizes, precisions, device)
        result["block"] = _measure_blocks(timer, sizes, precisions, device)
    dist.barrier()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    result["engines"] = _measure_engines(sizes, device, sync)
    if collectives:
        dist.barrier()
        timer = _Timer(device, sizes.allreduce_reps, sizes.min_rep_s, True)
        result["allreduce"] = _measure_allreduce(timer, sizes, device)
    return result


def rank_main(rank: int, world: int, store_path: str, compute_ranks: int, device_type: str,
              precisions: tuple[str, ...], sizes: Sizes, threads: int, collectives: bool) -> dict:
    """One rank (megacoca.launch.ranks, init=False: its own process group, gloo or nccl): compute measurements if
    rank < compute_ranks (all of them at once), then the DeepSpeed engines on every rank, then the all-reduce sweep
    (if `collectives`)."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(threads)
        device = torch.device("cpu")
    # what a launcher sets and DeepSpeed reads (its accelerator, its comm backend); the group itself comes from here
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    kwargs = {"device_id": device} if device_type == "cuda" else {}
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.FileStore(store_path, world),
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=15), **kwargs)
    try:
        return _measure(rank, device, compute_ranks, precisions, sizes, collectives)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
