"""linear_cross_entropy forward and backward against full-logits torch, through Triton's interpreter.

The chunk size is forced small so every case runs several token chunks (and a ragged last one) and several
vocabulary tiles; errors are bounded by twice torch's same-dtype error (vs fp64) plus atol.
"""

import importlib

import pytest
import torch
from kernel_asserts import assert_close_to_ref

from megacoca_kernels import linear_cross_entropy, linear_cross_entropy_ref

# The package's `linear_cross_entropy` attribute is the function; reach the module through importlib.
lce = importlib.import_module("megacoca_kernels.linear_cross_entropy")

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "MAX_CHUNK_LOGITS", 24 * 1531)  # 24 tokens per chunk at the largest V


def _run(h, w, b, target, go, fn, reduction):
    h, w, b = (t.detach().clone().requires_grad_() if t is not None else None for t in (h, w, b))
    loss = fn(h, w, target, bias=b, reduction=reduction)
    inputs = [t for t in (h, w, b) if t is not None]
    return (loss, *torch.autograd.grad(loss, inputs, go))


# (leading shape of hidden, H, V): odd token counts (one chunk, several, ragged last), vocab not a tile multiple
SHAPES = [((1,), 32, 50), ((3, 7), 64, 1000), ((2, 37), 48, 1531)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every shape x reduction x dtype; the bias is on for half of them (alternating), so both paths run in
# every dtype and every reduction without doubling the (interpreter-bound) run time.
CASES = [
    (shape, reduction, dtype, (i + j + k) % 2 == 0)
    for i, shape in enumerate(SHAPES)
    for j, reduction in enumerate(["mean", "sum", "none"])
    for k, dtype in enumerate(DTYPES)
]


def _id(case):
    (lead, H, V), reduction, dtype, with_bias = case
    n = 1
    for d in lead:
        n *= d
    return f"n{n}-h{H}-v{V}-{reduction}-{str(dtype).split('.')[-1]}-{'bias' if with_bias else 'nobias'}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_linear_cross_entropy_matches_torch(case, device):
    shape, reduction, dtype, with_bias = case
    lead, H, V = shape
    h64 = torch.randn(*lead, H, device=device, dtype=torch.float64)
    w64 = torch.randn(V, H, device=device, dtype=torch.float64) / H**0.5 * 2
    b64 = torch.randn(V, device=device, dtype=torch.float64) * 0.1 if with_bias else None
    target = torch.randint(0, V, lead, device=device)
    if target.numel() > 1:
        target.view(-1)[1::3] = -100  # ignored tokens contribute nothing
    go_shape = lead if reduction == "none" else ()
    go64 = torch.rand(go_shape, device=device, dtype=torch.float64) + 0.5
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    h, w, b = map(cast, (h64, w64, b64))
    go = go64.float()  # losses are fp32 in both implementations
    got = _run(h, w, b, target, go, linear_cross_entropy, reduction)
    ref64 = _run(h.double(), w.double(), b.double() if b is not None else None, target, go.double(),
                 linear_cross_entropy_ref, reduction)
    ref_dt = _run(h, w, b, target, go, linear_cross_entropy_ref, reduction)
    names = ["loss", "dhidden", "dweight", "dbias"]
    assert got[0].dtype == torch.float32 and got[0].shape == ref64[0].shape
    for name, a, r64, rdt in zip(names, got, ref64, ref_dt):
        if name != "loss":
            assert a.dtype == dtype
        scale = target.numel() ** 0.5 if (name in ("dweight", "dbias") or reduction == "sum") else 1
        assert_close_to_ref(a, r64, rdt, ATOL[dtype] * scale, name)


def test_ignored_tokens_have_zero_loss_and_gradient(device):
    h = torch.randn(10, 32, device=device, requires_grad=True)
    w = torch.randn(70, 32, device=device, requires_grad=True)
    target = torch.randint(0, 70, (10,), device=device)
    target[3:6] = -1
    loss = linear_cross_entropy(h, w, target, ignore_index=-1, reduction="none")
    assert (loss[3:6] == 0).all()
    loss.sum().backward()
    assert (h.grad[3:6] == 0).all()
    mean = linear_cross_entropy(h, w, target, ignore_index=-1, reduction="mean")
    torch.testing.assert_close(mean, loss.sum() / 7)


def test_no_gradients_computed_without_grad(device, monkeypatch):
    h = torch.randn(9, 32, device=device, requires_grad=True)
    w = torch.randn(70, 32, device=device, requires_grad=True)
    target = torch.randint(0, 70, (9,), device=device)
    calls = []
    real = lce._accumulate_grad_weight
    monkeypatch.setattr(lce, "_accumulate_grad_weight", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, target, reduction="sum")
    assert not calls
    torch.testing.assert_close(loss, linear_cross_entropy_ref(h, w, target, reduction="sum"))


def test_linear_cross_entropy_under_activation_checkpointing(device):
    from torch.utils.checkpoint import checkpoint

    h = torch.randn(20, 32, device=device, requires_grad=True)
    w = torch.randn(90, 32, device=device, requires_grad=True)
    target = torch.randint(0, 90, (20,), device=device)

    def head(h, w):
        return linear_cross_entropy(h.tanh(), w, target, reduction="sum")

    def grads(fn):
        h.grad = w.grad = None
        fn().backward()
        return h.grad.clone(), w.grad.clone()

    plain = grads(lambda: head(h, w))
    for reentrant in (False, True):
        for a, b in zip(plain, grads(lambda: checkpoint(head, h, w, use_reentrant=reentrant))):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
