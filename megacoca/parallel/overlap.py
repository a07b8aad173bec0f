"""The unimodal text tower run concurrently with the image tower, without a pipeline.

CoCa's two towers are independent until the multimodal decoder and the contrastive loss. The text tower's kernels
are small (64-77 tokens) and leave a GPU partly idle, so it can run while the image tower runs, joined before the
decoder. Two ways (`parallel.overlap_text_tower`, decided by `choose_overlap`):
- "stream" (CUDA): the host launches the text tower on a side stream, then the image tower on the current one; the
  current stream waits for the side stream before the decoder. Autograd runs each backward op on the stream of its
  forward op and synchronises across them, so the backward overlaps the same way.
- "thread": the text tower runs in a second Python thread (torch releases the GIL in its kernels and collectives),
  joined before the decoder: the thread plays the side stream, with real concurrency on a CPU (on CUDA the thread
  launches onto the side stream). It exists for the CPU tests, which run the same structure as the side stream
  with two host threads, and it is never on by default on a CPU: a CPU rank's threads compete for the cores the
  other tower's kernels use, so there is little to gain (and the image tower's intra-op threads lose cores).
The results are those of the sequential forward, bit for bit (the same ops on the same inputs; only the order of
two independent computations changes; tested over many steps under TP, ZeRO-3 and both).

What makes it safe under tensor parallelism and ZeRO-3:
1. The text tower's collectives on a communicator of their own. Its tensor-parallel layers are handed
   `dims.text_tp_group`, a second process group over the same tensor-parallel ranks (ParallelDims builds it with the
   others), forward and backward: the autograd collectives keep the group their forward was called with. Each
   communicator then carries one tower's collectives only, in program order, the same on every rank however the
   two towers interleave: on one shared communicator rank 0 could issue an image all-reduce where rank 1 issues a
   text one (a size mismatch, a wrong sum or a deadlock: tests/distributed/test_overlap_parallel.py plants it).
   Autograd's backward runs on one engine thread (per device), so both towers' backward collectives come in one
   deterministic order on every rank.
2. ZeRO-3: the text tower's parameters gathered once per optimizer step, by the launching thread, before the text
   tower starts. ZeRO-3 gathers a layer's parameters in its forward pre-hook and frees them in its post-hook, as
   soon as the forward is launched on the host: a side stream may still read memory the current stream reuses, and
   its coordinator (one per model, the trace of submodules whose order must be the same on every rank, the
   prefetches it issues as collectives) is not made for hooks fired from two threads. So every partitioned text
   parameter is all-gathered (in-flight prefetches awaited) and pinned by a marker in `ds_active_sub_modules`
   that no module has, so that ZeRO-3 never releases it; while the text tower is launched, DeepSpeed's hooks on its
   submodules are set aside (with the parameters whole they have nothing to fetch), so the trace and the
   prefetches are the main thread's alone (without this the ZeRO-3 runs fail DeepSpeed's check that every rank
   recorded the same trace; under activation checkpointing the recomputed text blocks run the hooks again in
   backward, on autograd's one thread, the same on every rank). DeepSpeed's optimizer step partitions every
   parameter (stage 3's `_partition_all_parameters` clears the markers), and the first forward after it gathers
   them again: one all-gather of the text tower per step instead of one per micro-batch forward and backward.
   Memory: the text tower's parameters (this rank's tensor-parallel shard of them) whole from the first forward to
   the optimizer step, `text_tower_gathered_bytes` more than ZeRO-3's 1/dp partitions.
Not measured on a GPU (none was available): the stream version's speed, and NCCL itself.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from megacoca.parallel.tensor import padded_size, set_tensor_parallel_group
from megacoca.parallel.zero import is_zero3_param, keep_gathered

MODES = ("stream", "thread")


@dataclass(frozen=True)
class OverlapChoice:
    """How the text tower runs for a layout: `mode` "stream", "thread" or "off", and why."""

    mode: str
    reason: str

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def describe(self) -> str:
        if not self.on:
            return f"text tower overlap: off ({self.reason})"
        return f"text tower overlap: on, {self.reason}"


def choose_overlap(setting: str, dims, zero_stage: int, device_type: str) -> OverlapChoice:
    """`parallel.overlap_text_tower` ("auto", "off", "stream", "thread") for a layout: "auto" is the side stream on
    CUDA without a pipeline, at any tensor degree and ZeRO stage, and off on a CPU."""
    if setting == "off":
        return OverlapChoice("off", "parallel.overlap_text_tower=off")
    if dims.pp_size > 1:
        return OverlapChoice("off", "a pipeline: its last stage runs the text tower ahead instead (text_ahead)")
    how = _how(dims, zero_stage)
    if setting == "thread":
        return OverlapChoice("thread", f"the text tower in a second thread{how}")
    if device_type == "cuda":
        return OverlapChoice("stream", f"the text tower on a CUDA side stream{how}")
    if setting == "stream":
        return OverlapChoice("off", f"parallel.overlap_text_tower=stream needs CUDA streams, the device is "
                                    f"{device_type}")
    return OverlapChoice("off", f"the default on {device_type}: a rank's threads would compete for the same cores; "
                                "parallel.overlap_text_tower=thread runs it in a second thread")


def _how(dims, zero_stage: int) -> str:
    parts = []
    if dims.tp_size > 1:
        parts.append("its tensor-parallel collectives on a communicator of their own")
    if zero_stage == 3:
        parts.append("its ZeRO-3 parameters gathered once per step")
    return f" ({'; '.join(parts)})" if parts else ""


def overlap_is_safe(dims, zero_stage: int, device_type: str) -> bool:
    """Whether the default ("auto") overlaps the text tower on this layout."""
    return choose_overlap("auto", dims, zero_stage, device_type).on


def apply_text_overlap(model, mode: str = "stream", text_group=None) -> "TextOverlap":
    """Replace `model.towers` (per instance) by the concurrent version (`mode` "stream" or "thread"); with
    `text_group`, the text tower's tensor-parallel layers issue their collectives on it (ParallelDims.text_tp_group).
    A "stream" overlap given a CPU input runs the same text-first order without streams."""
    if mode not in MODES:
        raise ValueError(f"apply_text_overlap: mode {mode!r} is not one of {MODES}")
    if text_group is not None:
        set_tensor_parallel_group(model.text, text_group)
    overlap = TextOverlap(model, mode)
    model.towers = overlap
    model.text_overlapped = mode
    return overlap


class TextOverlap:
    """`towers(images, text, keep, contrastive)` with the text tower concurrent with the image tower (see above)."""

    def __init__(self, model, mode: str) -> None:
        self.model, self.mode = model, mode
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.text_params: list | None = None  # the text tower's ZeRO-3 parameters, found at the first call

    def __call__(self, images: torch.Tensor, text: torch.Tensor, keep: int, contrastive: bool = True):
        model = self.model
        held = self._hold_zero3_parameters()
        side = self._side_stream(images.device) if images.is_cuda else None
        if self.mode == "stream" and side is None:
            text_out = model.text_stage(text, keep)
            return model.image_stage(images, contrastive), text_out
        main = torch.cuda.current_stream(images.device) if side is not None else None
        if side is not None:
            side.wait_stream(main)  # the inputs (and last step's updated weights) are ready
            for param in held:
                param.data.record_stream(side)  # whole until the step; never reused while the side stream reads
        with without_deepspeed_hooks(model.text):
            if self.mode == "stream":
                with torch.cuda.stream(side):
                    text_out = model.text_stage(text, keep)
                image_out = model.image_stage(images, contrastive)
            else:
                image_out, text_out = self._in_thread(images, text, keep, contrastive, side)
        if side is not None:
            main.wait_stream(side)
            for tensor in text_out:
                tensor.record_stream(main)  # allocated on the side stream, used (and freed) on the current one
        return image_out, text_out

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _hold_zero3_parameters(self) -> list:
        """Under ZeRO-3: the text tower's partitioned parameters, gathered (once per optimizer step) and pinned."""
        if self.text_params is None:
            self.text_params = [p for p in self.model.text.parameters() if is_zero3_param(p)]
        if self.text_params:
            keep_gathered(self.text_params, getattr(self.model, "ds_inflight_param_registry", None))
        return self.text_params

    def _in_thread(self, images, text, keep, contrastive, side):
        """The text tower in a second thread with this thread's autograd, inference and autocast modes (thread-local
        in torch), the image tower here; joined before returning (also when the image tower raises)."""
        model, result = self.model, {}
        device_type = images.device.type
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        autocast = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)

        def run_text():
            try:
                with contextlib.ExitStack() as stack:
                    if side is not None:
                        stack.enter_context(torch.cuda.device(images.device))
                        stack.enter_context(torch.cuda.stream(side))
                    stack.enter_context(torch.inference_mode(inference))
                    stack.enter_context(torch.set_grad_enabled(grad))
                    stack.enter_context(torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast))
                    result["text"] = model.text_stage(text, keep)
            except BaseException as error:  # noqa: BLE001 - raised again on the calling thread
                result["error"] = error

        thread = threading.Thread(target=run_text, name="megacoca-text-tower", daemon=True)
        thread.start()
        try:
            image_out = model.image_stage(images, contrastive)
        finally:
            thread.join()
        if "error" in result:
            raise result["error"]
        return image_out, result["text"]


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def _is_deepspeed_hook(hook) -> bool:
    return (getattr(hook, "__module__", None) or "").startswith("deepspeed.")


@contextlib.contextmanager
def without_deepspeed_hooks(module: torch.nn.Module):
    """DeepSpeed's forward hooks on `module` and its submodules (ZeRO-3's fetch, release and backward wiring) set
    aside for the block, every other hook kept, all put back in their order afterwards. Only the calling thread
    changes the hook tables, before and after the block."""
    saved = []
    for sub in module.modules():
        hooks = sub._forward_pre_hooks, sub._forward_hooks
        drop = {key for table in hooks for key, hook in table.items() if _is_deepspeed_hook(hook)}
        if not drop:
            continue
        for name in _HOOK_DICTS:
            table = getattr(sub, name)
            saved.append((table, dict(table)))
            for key in drop & set(table):
                del table[key]
    try:
        yield
    finally:
        for table, original in saved:
            table.clear()
            table.update(original)


# ------------------------------------------------------------------------------------------------- memory
def text_tower_numel(cfg, tp: int = 1) -> int:
    """Elements of the unimodal text tower one tensor-parallel rank holds (its shards and the replicated tensors):
    per layer (4 W^2 + 2 W M + 3 W + M) / tp + 6 W, plus the token embedding (V padded to a multiple of tp) W / tp,
    the positional and CLS embeddings (L + 2) W, the final LayerNorm 2 W and the projection W E (W text_width,
    M text_mlp_dim, V vocab_size, L context_length, E embed_dim). Tied to the caption head, the embedding counts
    here (it is the text tower's to hold whole)."""
    return sum(text_tower_tensor_numels(cfg, tp))


def text_tower_gathered_bytes(cfg, tp: int, dp: int, bytes_per_element: int,
                              persistence_threshold: int | None = 100_000) -> int:
    """What holding the text tower whole for the step costs each rank under ZeRO-3 on top of its 1/dp partitions:
    E (1 - 1/dp) x bytes, E the text tower's elements per tensor rank that ZeRO-3 partitions (those of tensors with
    more than `persistence_threshold` elements, DeepSpeed's stage3_param_persistence_threshold, default 1e5: the
    smaller ones are whole on every rank anyway; None counts every tensor)."""
    if dp <= 1:
        return 0
    partitioned = sum(numel for numel in text_tower_tensor_numels(cfg, tp)
                      if persistence_threshold is None or numel > persistence_threshold)
    return partitioned * bytes_per_element * (dp - 1) // dp


def text_tower_tensor_numels(cfg, tp: int = 1) -> list[int]:
    """The element count of each tensor of the text tower on one tensor-parallel rank, in `model.text`'s parameter
    order (their sum is `text_tower_numel`)."""
    width, mlp = cfg.text_width, cfg.text_mlp_dim
    layer = [width, width,  # ln_1
             *[width * width // tp, width // tp] * 3,  # q, k, v (column-parallel weight and bias)
             width * width // tp, width,  # out_proj (row-parallel weight, replicated bias)
             width, width,  # ln_2
             mlp * width // tp, mlp // tp,  # fc1
             width * mlp // tp, width]  # fc2
    return ([(cfg.context_length + 1) * width, width, padded_size(cfg.vocab_size, tp) // tp * width]
            + layer * cfg.text_layers + [width, width, width * cfg.embed_dim])
