"""Fused linear + cross-entropy: the caption head and its loss without the (tokens x vocab) logits.

The tokens are processed in chunks. For each chunk the logits (chunk x V) come from one cuBLAS matmul;
a Triton kernel then computes, per row, the fp32 logsumexp (online max / sum over vocab tiles), the loss
lse - logit[target], and overwrites the logits in place with their gradient
    scale * (softmax - onehot(target))
(scale = 1 / n_valid for "mean", 1 for "sum", 0 for ignored rows). Two more matmuls turn that into the
chunk's grad_hidden and its contribution to grad_weight (accumulated in fp32) and grad_bias. So the
forward pass already holds all gradients (the Liger design), peak memory is O(chunk x V) rather than
O(tokens x V), and the backward only multiplies them by the incoming scalar gradient.

reduction="none" has a per-token incoming gradient, unknown in the forward: there the forward computes
the losses only and the backward recomputes each chunk's logits with the per-row scale.

Losses are returned in fp32 whatever the input dtype (a bf16 sum over 32k tokens would lose digits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_device, empty, empty_like, interpreting

# Largest logits chunk, in elements (2**28 = 512 MiB of bf16): at V = 64k that is 4096 tokens, so 32k
# tokens take 8 chunks and the fp32 grad_weight accumulation costs little next to the matmuls.
MAX_CHUNK_LOGITS = 2**28


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    LOGITS, stride_logits, TARGET, LOSS, LSE, SCALE, stride_scale,
    V, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_logits
    target = tl.load(TARGET + row)
    ignored = target == ignore_index

    # Online logsumexp over the vocabulary, fp32.
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    safe_target = tl.where(ignored, 0, target)
    x_target = tl.load(logits + safe_target).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - x_target))
    tl.store(LSE + row, lse)

    if COMPUTE_GRAD:
        scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
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


def _chunked_pass(hidden, weight, target, bias, ignore_index, scale, compute_grad):
    """Run the chunk loop. scale: fp32 tensor, 1 element (broadcast) or one per token.

    Returns (loss per token fp32, lse fp32, grad_hidden | None, grad_weight fp32 | None, grad_bias fp32 | None).
    """
    N, Hd = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    loss = empty(N, device=device, dtype=torch.float32)
    lse = empty(N, device=device, dtype=torch.float32)
    grad_hidden = grad_weight = grad_bias = None
    if compute_grad:
        grad_hidden = empty_like(hidden)
        grad_weight = torch.zeros((V, Hd), device=device, dtype=torch.float32)
        grad_bias = torch.zeros(V, device=device, dtype=torch.float32) if bias is not None else None
    chunk = _chunk_tokens(N, V)
    block_v = _block_v(V)
    stride_scale = 0 if scale.numel() == 1 else 1
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())
        _linear_cross_entropy_fwd_kernel[(end - start,)](
            logits, logits.stride(0), target[start:end], loss[start:end], lse[start:end],
            scale if stride_scale == 0 else scale[start:end], stride_scale,
            V, ignore_index,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
        if compute_grad:  # logits now hold d loss / d logits for this chunk
            torch.mm(logits, weight, out=grad_hidden[start:end])
            _accumulate_grad_weight(grad_weight, logits, h)
            if grad_bias is not None:
                grad_bias += logits.sum(0, dtype=torch.float32)
        del logits
    return loss, lse, grad_hidden, grad_weight, grad_bias


def _reduce(loss, n_valid, reduction):
    if reduction == "mean":
        return loss.sum() / n_valid
    if reduction == "sum":
        return loss.sum()
    return loss


def linear_cross_entropy_fwd(hidden, weight, target, bias, ignore_index, reduction, compute_grad):
    """hidden (N, H), weight (V, H), target (N,) -> (reduced loss, (grad_hidden, grad_weight fp32, grad_bias fp32)).

    The gradients are those of the reduced loss (already divided by the token count for "mean"); they are
    Nones when compute_grad is off or reduction is "none". Targets are not range-checked (that would need a
    device sync): a target outside [0, V) that is not ignore_index gives a wrong loss instead of an error.
    """
    n_valid = (target != ignore_index).sum()
    if reduction == "mean":
        scale = (1.0 / n_valid.to(torch.float32)).reshape(1)
    else:
        scale = torch.ones(1, device=hidden.device, dtype=torch.float32)
    grads_now = compute_grad and reduction != "none"
    loss, _, gh, gw, gb = _chunked_pass(hidden, weight, target, bias, ignore_index, scale, grads_now)
    return _reduce(loss, n_valid, reduction), (gh, gw, gb)


def linear_cross_entropy_bwd_none(grad_loss, hidden, weight, target, bias, ignore_index):
    """Backward for reduction="none": recompute each chunk's logits with the per-token incoming gradient."""
    scale = grad_loss.to(torch.float32).contiguous()
    _, _, gh, gw, gb = _chunked_pass(hidden, weight, target, bias, ignore_index, scale, True)
    return gh, gw, gb


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, compute_grad):
        loss, (gh, gw, gb) = linear_cross_entropy_fwd(
            hidden, weight, target, bias, ignore_index, reduction, compute_grad)
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, target, bias)
        elif compute_grad:
            # Keep grad_weight in the weight's dtype between forward and backward (memory); it was summed in fp32.
            ctx.save_for_backward(gh, gw.to(weight.dtype), gb.to(bias.dtype) if gb is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hidden, weight, target, bias = ctx.saved_tensors
            gh, gw, gb = linear_cross_entropy_bwd_none(grad_loss, hidden, weight, target, bias, ctx.ignore_index)
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


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean"):
    """cross_entropy(hidden @ weight.T + bias, target) without materializing the logits.

    hidden (..., H), weight (V, H) like nn.Linear, target (...) long; reduction "mean" (over non-ignored
    tokens), "sum" or "none" (per-token losses shaped like target). The loss is fp32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_device(hidden, "linear_cross_entropy")
    Hd = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != Hd:
        raise ValueError(f"weight must be (V, {Hd}), got {tuple(weight.shape)}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    out_shape = target.shape
    hidden2d = hidden.reshape(-1, Hd).contiguous()
    target1d = target.reshape(-1).contiguous()
    # Matmuls run in the hidden dtype, like autocast would; gradients come back in each input's dtype.
    weight_c = weight.to(hidden.dtype).contiguous()
    bias_c = bias.to(hidden.dtype).contiguous() if bias is not None else None
    compute_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    loss = LinearCrossEntropyFunction.apply(
        hidden2d, weight_c, target1d, bias_c, int(ignore_index), reduction, compute_grad)
    return loss.view(out_shape) if reduction == "none" else loss


def linear_cross_entropy_ref(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean"):
    """Plain torch: full logits, then cross_entropy (fp32 loss for comparison)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=ignore_index,
        reduction=reduction,
    ).view(target.shape if reduction == "none" else ())
