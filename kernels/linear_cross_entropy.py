"""Fused linear + cross-entropy: the caption head and its loss without the (tokens x vocab) logits.

The tokens are processed in chunks. For each chunk the logits (chunk x V) come from one cuBLAS matmul; a
first Triton kernel computes, per row, the fp32 logsumexp (online max / sum over vocab tiles) and the target's
logit; a second overwrites the logits in place with their gradient
    scale * (softmax - onehot(target))
(scale = 1 / n_valid for "mean", 1 for "sum", 0 for ignored rows). Two more matmuls turn that into the
chunk's grad_hidden and its contribution to grad_weight (accumulated in fp32) and grad_bias. So the
forward pass already holds all gradients (the Liger design), peak memory is O(chunk x V) rather than
O(tokens x V), and the backward only multiplies them by the incoming scalar gradient.

Vocabulary (tensor) parallelism, Megatron's vocab-parallel cross-entropy fused the same way: each of the tp
ranks of `tp_group` holds rows [vocab_start, vocab_start + V_local) of a vocabulary padded to a multiple of
tp, of which the first `vocab_valid` are real tokens. Per chunk, between the two kernels, two small
all-reduces over the group turn each rank's local logsumexp and target logit into the global ones (MAX of the
local lse; then one SUM of [exp(lse_local - lse_max), target_logit]), so no rank ever builds more than its
(chunk x V_local) slice of the logits. Padding columns count as -inf (no probability mass, zero gradient).
Without a group the two kernels run back to back with no collective.

reduction="none" has a per-token incoming gradient, unknown in the forward: there the forward computes
the losses (and keeps each token's global lse) and the backward recomputes each chunk's logits and runs the
second kernel with the per-row scale; it needs no collective.

Losses are returned in fp32 whatever the input dtype (a bf16 sum over 32k tokens would lose digits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._utils import check_device, empty, empty_like, interpreting

# Largest logits chunk, in elements (2**28 = 512 MiB of bf16): at V = 64k that is 4096 tokens, so 32k
# tokens take 8 chunks and the fp32 grad_weight accumulation costs little next to the matmuls.
MAX_CHUNK_LOGITS = 2**28


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    LOGITS, stride_logits, TARGET, LSE, TARGET_LOGIT,
    V_valid, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Per row: fp32 logsumexp over the valid columns [0, V_valid) (-inf when there are none) and the target's
    logit (0 when the target is ignored or not in [vocab_start, vocab_start + V_valid))."""
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_logits
    target = tl.load(TARGET + row)

    # Online logsumexp over the vocabulary, fp32. Every tile holds at least one valid column, so m is finite
    # after the first one.
    m = float("-inf")
    d = 0.0
    for start in range(0, V_valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    tl.store(LSE + row, m + tl.log(d))
    local = target - vocab_start
    here = (target != ignore_index) & (local >= 0) & (local < V_valid)
    x_target = tl.load(logits + tl.where(here, local, 0)).to(tl.float32)
    tl.store(TARGET_LOGIT + row, tl.where(here, x_target, 0.0))


@triton.jit
def _linear_cross_entropy_bwd_kernel(
    LOGITS, stride_logits, TARGET, LSE, SCALE, stride_scale,
    V, V_valid, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Overwrite a row of logits (all V columns) with scale * (exp(x - lse) - onehot(target - vocab_start)),
    0 on padding columns (>= V_valid) and on ignored rows; lse is the row's global logsumexp."""
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_logits
    target = tl.load(TARGET + row)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
    scale = tl.where(target == ignore_index, 0.0, scale)
    local = target - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        # padding columns read as -inf: exp(-inf - lse) = 0, and the one-hot never falls on them
        x = tl.load(logits + cols, mask=cols < V_valid, other=float("-inf")).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)
        tl.store(logits + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=cols < V)


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), 1024 if interpreting() else 4096)


def _chunk_tokens(N: int, V: int) -> int:
    return max(1, min(N, MAX_CHUNK_LOGITS // V))


_FUSED_FP32_ACCUMULATE = True  # addmm(out_dtype=fp32) exists on CUDA only; set False after a failure


def _accumulate_grad_weight(grad_weight_f32, grad_logits, hidden):
    """grad_weight_f32 (V, H) += grad_logits^T (V, C) @ hidden (C, H), accumulating in fp32."""
    global _FUSED_FP32_ACCUMULATE
    if hidden.dtype == torch.float32:
        grad_weight_f32.addmm_(grad_logits.t(), hidden)
        return
    if _FUSED_FP32_ACCUMULATE and hidden.is_cuda:
        try:
            torch.addmm(grad_weight_f32, grad_logits.t(), hidden, out_dtype=torch.float32, out=grad_weight_f32)
            return
        except (RuntimeError, TypeError):
            _FUSED_FP32_ACCUMULATE = False
    grad_weight_f32.add_(torch.mm(grad_logits.t(), hidden))


def _combine(lse, target_logit, tp_group):
    """Each row's global logsumexp and target logit from every rank's local ones, in place.

    Two all-reduces: the MAX of the local lse, then one SUM of [exp(lse_local - lse_max), target_logit]
    (the target logit is 0 on every rank but the one holding the target). A rank with no valid vocabulary
    has lse_local = -inf and adds exp(-inf) = 0.
    """
    if tp_group is None:
        return
    lse_max = lse.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=tp_group)
    stats = torch.stack((torch.exp(lse - lse_max), target_logit))
    dist.all_reduce(stats, group=tp_group)
    torch.add(lse_max, torch.log(stats[0]), out=lse)
    target_logit.copy_(stats[1])


class _Vocab(NamedTuple):
    """Where this rank's weight rows sit in the vocabulary, and the group they are split over."""

    start: int  # global id of row 0
    valid: int  # rows [0, valid) are real tokens, the rest padding
    ignore_index: int
    group: object  # torch.distributed ProcessGroup, or None: no collective


def _logits(h, weight, bias):
    return torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())


def _chunk_grads(logits, h, weight, target, lse, scale, vocab, block_v, grad_hidden, grad_weight, grad_bias):
    """Overwrite a chunk's logits with d loss / d logits, then add its gradients (grad_hidden is the chunk's)."""
    V = weight.shape[0]
    _linear_cross_entropy_bwd_kernel[(logits.shape[0],)](
        logits, logits.stride(0), target, lse, scale, 0 if scale.numel() == 1 else 1,
        V, vocab.valid, vocab.start, vocab.ignore_index,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    torch.mm(logits, weight, out=grad_hidden)
    _accumulate_grad_weight(grad_weight, logits, h)
    if grad_bias is not None:
        grad_bias += logits.sum(0, dtype=torch.float32)


def _new_grads(hidden, weight, bias):
    grad_hidden = empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, device=hidden.device, dtype=torch.float32)
    grad_bias = torch.zeros(weight.shape[0], device=hidden.device, dtype=torch.float32) if bias is not None else None
    return grad_hidden, grad_weight, grad_bias


def _forward_pass(hidden, weight, target, bias, vocab, scale):
    """The chunk loop of the forward. scale: None (losses only) or an fp32 tensor of 1 element.

    Returns (loss per token fp32, global lse fp32, (grad_hidden, grad_weight fp32, grad_bias fp32) | None).
    With gradients, each chunk's lse is combined over the group before its gradient kernel (two all-reduces
    per chunk); without, the whole lse is combined once after the loop.
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    lse = empty(N, device=hidden.device, dtype=torch.float32)
    target_logit = empty(N, device=hidden.device, dtype=torch.float32)
    grads = _new_grads(hidden, weight, bias) if scale is not None else None
    chunk = _chunk_tokens(N, V)
    block_v = _block_v(V)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        h = hidden[rows]
        logits = _logits(h, weight, bias)
        _linear_cross_entropy_fwd_kernel[(logits.shape[0],)](
            logits, logits.stride(0), target[rows], lse[rows], target_logit[rows],
            vocab.valid, vocab.start, vocab.ignore_index,
            BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
        if grads is not None:
            _combine(lse[rows], target_logit[rows], vocab.group)
            _chunk_grads(logits, h, weight, target[rows], lse[rows], scale, vocab, block_v,
                         grads[0][rows], grads[1], grads[2])
        del logits
    if grads is None:
        _combine(lse, target_logit, vocab.group)
    loss = torch.where(target == vocab.ignore_index, 0.0, lse - target_logit)
    return loss, lse, grads


def _backward_pass(hidden, weight, target, bias, vocab, lse, scale):
    """The chunk loop of reduction="none"'s backward: recompute the logits, then the gradient kernel with the
    forward's global lse and a per-token scale. No collective."""
    N = hidden.shape[0]
    V = weight.shape[0]
    grads = _new_grads(hidden, weight, bias)
    chunk = _chunk_tokens(N, V)
    block_v = _block_v(V)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        h = hidden[rows]
        logits = _logits(h, weight, bias)
        _chunk_grads(logits, h, weight, target[rows], lse[rows], scale[rows], vocab, block_v,
                     grads[0][rows], grads[1], grads[2])
        del logits
    return grads


def _reduce(loss, n_valid, reduction):
    if reduction == "mean":
        return loss.sum() / n_valid
    if reduction == "sum":
        return loss.sum()
    return loss


def linear_cross_entropy_fwd(hidden, weight, target, bias, vocab, reduction, compute_grad):
    """hidden (N, H), weight (V, H), target (N,) -> (reduced loss, global lse, (grad_hidden, grad_weight fp32,
    grad_bias fp32)).

    The gradients are those of the reduced loss (already divided by the token count for "mean"); they are
    Nones when compute_grad is off or reduction is "none". grad_hidden is this shard's contribution (see
    `linear_cross_entropy`). Targets are not range-checked (that would need a device sync): a target outside
    the vocabulary that is not ignore_index gets a target logit of 0, a wrong loss instead of an error.
    """
    n_valid = (target != vocab.ignore_index).sum()  # the same on every rank: the targets are replicated
    scale = None
    if compute_grad and reduction != "none":
        if reduction == "mean":
            scale = (1.0 / n_valid.to(torch.float32)).reshape(1)
        else:
            scale = torch.ones(1, device=hidden.device, dtype=torch.float32)
    loss, lse, grads = _forward_pass(hidden, weight, target, bias, vocab, scale)
    return _reduce(loss, n_valid, reduction), lse, grads if grads is not None else (None, None, None)


def linear_cross_entropy_bwd_none(grad_loss, hidden, weight, target, bias, vocab, lse):
    """Backward for reduction="none": recompute each chunk's logits with the per-token incoming gradient."""
    scale = grad_loss.to(torch.float32).contiguous()
    return _backward_pass(hidden, weight, target, bias, vocab, lse, scale)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, vocab, reduction, compute_grad):
        loss, lse, (gh, gw, gb) = linear_cross_entropy_fwd(hidden, weight, target, bias, vocab, reduction, compute_grad)
        ctx.reduction = reduction
        ctx.vocab = vocab
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, target, bias, lse)
        elif compute_grad:
            # Keep grad_weight in the weight's dtype between forward and backward (memory); it was summed in fp32.
            ctx.save_for_backward(gh, gw.to(weight.dtype), gb.to(bias.dtype) if gb is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hidden, weight, target, bias, lse = ctx.saved_tensors
            gh, gw, gb = linear_cross_entropy_bwd_none(grad_loss, hidden, weight, target, bias, ctx.vocab, lse)
            gw = gw.to(ctx.weight_dtype)
            gb = gb.to(ctx.bias_dtype) if gb is not None else None
        else:
            saved = ctx.saved_tensors  # unpack once (activation checkpointing allows a single unpack)
            if not saved:
                raise RuntimeError("linear_cross_entropy: backward called but gradients were not computed in forward")
            gh, gw, gb = saved
            g = grad_loss.to(torch.float32)
            gh = (gh * g).to(gh.dtype)
            gw = (gw * g).to(gw.dtype)
            gb = (gb * g).to(gb.dtype) if gb is not None else None
        return gh, gw, None, gb, None, None, None


def _check_vocab(weight, vocab_start, vocab_valid, tp_group):
    """Validate the shard arguments; returns (vocab_start, vocab_valid, tp_group), a one-rank group as None."""
    V = weight.shape[0]
    vocab_start = int(vocab_start)
    vocab_valid = V if vocab_valid is None else int(vocab_valid)
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if not 0 <= vocab_valid <= V:
        raise ValueError(f"vocab_valid must be in [0, {V}] (this shard's weight rows), got {vocab_valid}")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    if tp_group is None and vocab_start != 0:
        raise ValueError(f"vocab_start must be 0 without a tp_group (one shard holds the whole vocabulary), "
                         f"got {vocab_start}")
    return vocab_start, vocab_valid, tp_group


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                         vocab_start=0, vocab_valid=None, tp_group=None):
    """cross_entropy(hidden @ weight.T + bias, target) without materializing the logits.

    hidden (..., H), weight (V, H) like nn.Linear, target (...) long; reduction "mean" (over non-ignored
    tokens), "sum" or "none" (per-token losses shaped like target). The loss is fp32. Targets are not
    range-checked (a device sync): one outside the vocabulary that is not ignore_index gives a wrong loss.

    Vocabulary parallel (Megatron's VocabParallelEmbedding / vocab-parallel cross-entropy layout), with
    `tp_group` the group the vocabulary is split over:
    - weight (V_local, H) and bias (V_local,) are this rank's rows [vocab_start, vocab_start + V_local) of a
      vocabulary padded to tp * V_local; the first `vocab_valid` (default V_local) are real tokens, the rest
      padding: their logits count as -inf and their grad_weight / grad_bias rows are 0. Every rank must have
      the same V_local (the chunking, and so the per-chunk collectives, follow it).
    - hidden and target are the same on every rank of the group (target holds global ids), and every rank
      calls this with the same shapes, reduction and grad mode (whether hidden / weight / bias require grad),
      since it runs collectives over the group: two small all-reduces per token chunk in a forward that
      computes gradients, two in all in a forward without; the backward runs none.
    - The returned loss is the full-vocabulary cross-entropy, the same on every rank; backpropagate it on
      every rank with the same incoming gradient.
    - weight / bias get the gradient of this shard's rows. hidden gets only this shard's CONTRIBUTION,
      d loss / d hidden through this shard's logits: the caller must sum it over tp_group, i.e. pass hidden
      through the column-parallel "copy" op (identity forward, all-reduce backward over tp_group; Megatron's
      copy_to_tensor_model_parallel_region) before this function, as for any column-parallel linear.
    tp_group=None (or a one-rank group) is one shard holding the whole vocabulary: vocab_start must be 0 and
    no collective runs.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_device(hidden, "linear_cross_entropy")
    Hd = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != Hd or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, {Hd}) with V >= 1, got {tuple(weight.shape)}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    vocab_start, vocab_valid, tp_group = _check_vocab(weight, vocab_start, vocab_valid, tp_group)
    out_shape = target.shape
    hidden2d = hidden.reshape(-1, Hd).contiguous()
    target1d = target.reshape(-1).contiguous()
    # Matmuls run in the hidden dtype, like autocast would; gradients come back in each input's dtype.
    weight_c = weight.to(hidden.dtype).contiguous()
    bias_c = bias.to(hidden.dtype).contiguous() if bias is not None else None
    compute_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    vocab = _Vocab(vocab_start, vocab_valid, int(ignore_index), tp_group)
    loss = LinearCrossEntropyFunction.apply(hidden2d, weight_c, target1d, bias_c, vocab, reduction, compute_grad)
    return loss.view(out_shape) if reduction == "none" else loss


def linear_cross_entropy_ref(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                             vocab_valid=None):
    """Plain torch: the full logits, then cross_entropy (fp32 loss for comparison); rows >= vocab_valid of
    weight (default all real) are padding and take no part.

    This is also what `linear_cross_entropy` computes on vocabulary shards: with a tp_group, the loss on every
    rank (and the shards' gradients, concatenated) equal this on the whole weight. The torch vocabulary-parallel
    cross-entropy on one shard is megacoca's (megacoca/parallel/tensor/cross_entropy.py); the kernel tests
    check it against the fused op.
    """
    _, vocab_valid, _ = _check_vocab(weight, 0, vocab_valid, None)
    logits = torch.nn.functional.linear(hidden, weight, bias)[..., :vocab_valid]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=ignore_index,
        reduction=reduction,
    ).view(target.shape if reduction == "none" else ())
