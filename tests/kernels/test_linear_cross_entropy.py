"""linear_cross_entropy forward and backward against full-logits torch, through Triton's interpreter.

The chunk size is forced small so every case runs several token chunks (and a ragged last one) and several
vocabulary tiles; errors are bounded by twice torch's same-dtype error (vs fp64) plus atol.

The vocabulary-parallel tests run the op on 2 and 4 gloo ranks (tests/distributed/dist_harness.py), each
holding a padded shard of the vocabulary, and compare it, and megacoca's torch vocabulary-parallel
cross-entropy on the same shards, with one process's cross-entropy on the full weight.
"""

import importlib
import math
import os
import sys

# The multi-rank tests' ranks import this module (to unpickle their function) before the harness applies
# their env=, so the interpreter flag must be set here too, as tests/conftest.py does, for a rank to define
# the kernels interpreted.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_asserts import assert_close_to_ref  # noqa: E402

from megacoca.parallel.tensor import vocab_parallel_cross_entropy  # noqa: E402
from megacoca_kernels import linear_cross_entropy, linear_cross_entropy_ref  # noqa: E402

# The package's `linear_cross_entropy` attribute is the function; reach the module through importlib.
lce = importlib.import_module("megacoca_kernels.linear_cross_entropy")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
from dist_harness import run_ranks  # noqa: E402

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


# ---------------------------------------------------------------------------------------------------------
# Vocabulary (tensor) parallel: vocab_start / vocab_valid / tp_group


def test_padding_rows_without_a_group_match_the_unpadded_vocabulary(device):
    """One shard with padding rows (vocab_valid < V_local): they get no probability mass and zero gradient."""
    V, V_padded, H = 70, 80, 32
    h = torch.randn(3, 9, H, device=device, dtype=torch.float64)
    w = torch.randn(V_padded, H, device=device, dtype=torch.float64)
    b = torch.randn(V_padded, device=device, dtype=torch.float64)
    w[V:], b[V:] = 10.0, 50.0  # padding that would dominate the softmax if it were not masked
    target = torch.randint(0, V, (3, 9), device=device)
    target[0, ::2] = -100
    for reduction in ("mean", "none"):
        go = torch.rand(target.shape if reduction == "none" else (), device=device, dtype=torch.float64) + 0.5
        got = _run(h.float(), w.float(), b.float(), target, go.float(),
                   lambda *a, **k: linear_cross_entropy(*a, **k, vocab_valid=V), reduction)
        ref = _run(h, w[:V], b[:V], target, go, linear_cross_entropy_ref, reduction)
        ref32 = _run(h.float(), w[:V].float(), b[:V].float(), target, go.float(), linear_cross_entropy_ref, reduction)
        ref_padded = _run(h, w, b, target, go, lambda *a, **k: linear_cross_entropy_ref(*a, **k, vocab_valid=V),
                          reduction)
        for name, a, r, r32, rp in zip(["loss", "dhidden", "dweight", "dbias"], got, ref, ref32, ref_padded):
            if name in ("dweight", "dbias"):
                assert (a[V:] == 0).all() and (rp[V:] == 0).all(), name
                a, rp = a[:V], rp[:V]
            torch.testing.assert_close(rp, r)  # fp64: equal up to the matmul's summation order
            assert_close_to_ref(a, r, r32, ATOL[torch.float32] * target.numel() ** 0.5, name)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_valid=71), r"vocab_valid must be in \[0, 70\]"),
    (dict(vocab_valid=-1), r"vocab_valid must be in \[0, 70\]"),
    (dict(vocab_start=-1), r"vocab_start must be >= 0"),
    (dict(vocab_start=70), r"vocab_start must be 0 without a tp_group"),
])
def test_vocab_arguments_are_validated(kwargs, message, device):
    h = torch.randn(4, 32, device=device)
    w = torch.randn(70, 32, device=device)
    target = torch.randint(0, 70, (4,), device=device)
    # the unsharded reference takes no vocab_start (it has no tp_group)
    for fn in (linear_cross_entropy,) if "vocab_start" in kwargs else (linear_cross_entropy, linear_cross_entropy_ref):
        with pytest.raises(ValueError, match=message):
            fn(h, w, target, **kwargs)
    with pytest.raises(ValueError, match="V >= 1"):
        linear_cross_entropy(h, w[:0], target)


# Vocabulary layouts: V real ids padded to `padded` rows split over tp ranks, the padding on the last rank(s).
# world // tp data-parallel replicas each run their own tensor-parallel group on different data, so a
# collective over the wrong group (WORLD) shows up as a wrong answer.
LAYOUTS = {
    "w2-tp2-v1531-pad1": dict(world=2, tp=2, V=1531, padded=1532),  # the last shard has one padding row
    "w4-tp4-v1531-pad5": dict(world=4, tp=4, V=1531, padded=1536),  # ... five
    "w4-tp4-v10-pad6": dict(world=4, tp=4, V=10, padded=16),  # shard 2 half padding, shard 3 all padding
    "w4-tp2x2-v1531-pad1": dict(world=4, tp=2, V=1531, padded=1532),  # two tp groups
}
TP_LEAD, TP_H, TP_CHUNK = (2, 11), 32, 8  # 22 tokens in chunks of 8: three chunks, the last ragged


def _tp_combos(flip):
    """(reduction, dtype, bias): every reduction in both dtypes, the bias alternating (flipped from one layout
    to the next, so that the layouts together run every reduction x dtype x bias)."""
    return [(r, dt, (i + j + flip) % 2 == 0) for i, r in enumerate(["mean", "sum", "none"])
            for j, dt in enumerate(["float32", "float16"])]


def _tp_problem(layout, replica, device="cpu"):
    """One replica's full problem in fp64: hidden, padded weight and bias, targets, incoming gradients."""
    g = torch.Generator().manual_seed(1000 + replica)
    V, padded, V_local = layout["V"], layout["padded"], layout["padded"] // layout["tp"]
    h = torch.randn(*TP_LEAD, TP_H, generator=g, dtype=torch.float64)
    w = torch.randn(padded, TP_H, generator=g, dtype=torch.float64) / TP_H**0.5 * 2
    b = torch.randn(padded, generator=g, dtype=torch.float64) * 0.1
    w[V:], b[V:] = 1.0, 50.0  # padding rows that would dominate the softmax if they were not masked
    target = torch.randint(0, V, TP_LEAD, generator=g)
    flat = target.view(-1)
    flat[1::3] = -100
    # every shard's first and last real id, and the last id, on tokens that are not ignored
    edges = [i for r in range(layout["tp"]) if r * V_local < V for i in (r * V_local, min((r + 1) * V_local, V) - 1)]
    kept = [i for i in range(flat.numel()) if i % 3 != 1]
    flat[kept[: len(edges) + 1]] = torch.tensor(edges + [V - 1])
    go_none = torch.rand(TP_LEAD, generator=g, dtype=torch.float64) + 0.5
    go_scalar = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    return [t.to(device) for t in (h, w, b, target, go_none, go_scalar)]


def _torch_vocab_parallel(hidden, weight, target, *, bias=None, reduction="mean", vocab_start, vocab_valid,
                          tp_group):
    """megacoca's torch vocabulary-parallel cross-entropy (the model's path without the kernels) on this rank's
    shard, called like the fused op (ignore_index -100)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
    loss = vocab_parallel_cross_entropy(logits, target.reshape(-1), vocab_start=vocab_start, vocab_valid=vocab_valid,
                                        ignore_index=-100, group=tp_group)
    if reduction == "none":
        return loss.view(target.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / (target != -100).sum()


def _tp_rank(rank, world_size, layout, combos):
    """One rank: the fused op and megacoca's torch vocabulary-parallel cross-entropy ("ref") on this rank's
    vocabulary shard, for every combo."""
    import torch.distributed as dist

    from megacoca_kernels import _utils

    assert _utils.interpreting() == (os.environ["TRITON_INTERPRET"] not in ("", "0")), "kernels defined too early"
    device = "cpu" if _utils.interpreting() else "cuda"
    _utils.DEBUG_FILL_NAN = True
    tp, V, V_local = layout["tp"], layout["V"], layout["padded"] // layout["tp"]
    lce.MAX_CHUNK_LOGITS = TP_CHUNK * V_local
    groups = [dist.new_group(list(range(start, start + tp))) for start in range(0, world_size, tp)]
    group, tp_rank = groups[rank // tp], rank % tp
    h64, w64, b64, target, go_none, go_scalar = _tp_problem(layout, rank // tp, device)
    rows = slice(tp_rank * V_local, (tp_rank + 1) * V_local)
    shard = dict(vocab_start=tp_rank * V_local, vocab_valid=min(max(V - tp_rank * V_local, 0), V_local),
                 tp_group=group)

    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return real_all_reduce(*args, **kwargs)

    results = {}
    for reduction, dtype_name, with_bias in combos:
        dtype = getattr(torch, dtype_name)
        h, w = h64.to(dtype), w64[rows].to(dtype)
        b = b64[rows].to(dtype) if with_bias else None
        go = (go_none if reduction == "none" else go_scalar).float()
        for impl, fn in (("fused", linear_cross_entropy), ("ref", _torch_vocab_parallel)):
            calls.clear()
            dist.all_reduce = counting_all_reduce
            try:
                loss, dh, dw, *db = _run(h, w, b, target, go, lambda *a, **k: fn(*a, **k, **shard), reduction)
            finally:
                dist.all_reduce = real_all_reduce
            n_calls = len(calls)
            dist.all_reduce(dh, group=group)  # what the column-parallel copy op's backward does
            results[(reduction, dtype_name, with_bias, impl)] = dict(
                loss=loss.cpu(), dhidden=dh.cpu(), dweight=dw.cpu(), dbias=db[0].cpu() if db else None,
                all_reduces=n_calls)
    return results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_vocab_parallel_matches_unsharded_torch(name, tmp_path):
    """Fused op and megacoca's torch vocabulary-parallel cross-entropy on tp vocabulary shards vs one process's
    cross-entropy on the full weight."""
    layout = LAYOUTS[name]
    tp, V, V_local = layout["tp"], layout["V"], layout["padded"] // layout["tp"]
    combos = _tp_combos(list(LAYOUTS).index(name) % 2)
    if layout["world"] != layout["tp"]:
        combos = [combos[0], combos[-1]]  # the group test: mean fp32 (per-chunk combines) and none fp16 (one)
    per_rank = run_ranks(_tp_rank, layout["world"], tmp_path, layout, combos,
                         env={"TRITON_INTERPRET": os.environ["TRITON_INTERPRET"]})
    n_chunks = -(-math.prod(TP_LEAD) // TP_CHUNK)
    for replica in range(layout["world"] // tp):
        ranks = per_rank[replica * tp:(replica + 1) * tp]
        h64, w64, b64, target, go_none, go_scalar = _tp_problem(layout, replica)
        w64, b64 = w64[:V], b64[:V]
        for reduction, dtype_name, with_bias in combos:
            dtype = getattr(torch, dtype_name)
            go64 = go_none if reduction == "none" else go_scalar
            b = b64 if with_bias else None
            ref64 = _run(h64, w64, b, target, go64, linear_cross_entropy_ref, reduction)
            cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
            ref_dt = _run(cast(h64), cast(w64), cast(b), target, go64.float(), linear_cross_entropy_ref, reduction)
            for impl in ("fused", "ref"):
                got = [r[(reduction, dtype_name, with_bias, impl)] for r in ranks]
                label = f"{name} replica{replica} {reduction} {dtype_name} {'bias' if with_bias else 'nobias'} {impl}"
                for r in got[1:]:  # every rank returns the same loss, and gets the same summed grad_hidden
                    assert torch.equal(r["loss"], got[0]["loss"]), label
                    assert torch.equal(r["dhidden"], got[0]["dhidden"]), label
                if impl == "fused":  # two all-reduces per chunk with gradients, two in all without
                    assert [r["all_reduces"] for r in got] == [2 if reduction == "none" else 2 * n_chunks] * tp, label
                dweight = torch.cat([r["dweight"] for r in got])
                assert (dweight[V:] == 0).all(), f"{label}: padding rows got a gradient"
                parts = {"loss": got[0]["loss"], "dhidden": got[0]["dhidden"], "dweight": dweight[:V]}
                if with_bias:
                    dbias = torch.cat([r["dbias"] for r in got])
                    assert (dbias[V:] == 0).all(), f"{label}: padding rows got a gradient"
                    parts["dbias"] = dbias[:V]
                for part, r64, rdt in zip(["loss", "dhidden", "dweight", "dbias"], ref64, ref_dt):
                    if part not in parts:
                        continue
                    a = parts[part]
                    assert a.dtype == (torch.float32 if part == "loss" else dtype), (label, part, a.dtype)
                    scale = target.numel() ** 0.5 if (part in ("dweight", "dbias") or reduction == "sum") else 1
                    assert_close_to_ref(a, r64, rdt, ATOL[dtype] * scale, f"{label} {part}")
