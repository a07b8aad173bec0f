"""The overlapped towers (the text tower first on a side stream on CUDA, or concurrently in a second thread) give the
sequential forward's results bit for bit; where the overlap is on and why; DeepSpeed's hooks set aside and put back;
the text tower's tensor-parallel layers on their own communicator; its size per tensor rank (the ZeRO-3 hold's
memory). The multi-rank checks (TP, ZeRO-3, the planted shared communicator):
tests/distributed/test_overlap_parallel.py.
"""

import threading

import pytest
import torch

from megacoca.config.flavors import get_flavor
from megacoca.config.recipes import build_config
from megacoca.losses import CoCaLoss
from megacoca.models.coca import CoCa
from megacoca.parallel.build import meta_model
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.overlap import (
    apply_text_overlap,
    choose_overlap,
    overlap_is_safe,
    text_tower_gathered_bytes,
    text_tower_numel,
    text_tower_tensor_numels,
    without_deepspeed_hooks,
)
from megacoca.parallel.tensor import set_tensor_parallel_group


def _loss_and_grads(model, images, text):
    loss, _ = CoCaLoss()(model(images, text))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout, mode", [("paper", "stream"), ("open_clip", "stream"), ("paper", "thread"),
                                          ("open_clip", "thread")])
def test_overlapped_towers_equal_the_sequential_forward(layout, mode):
    cfg = get_flavor("coca_tiny").replace(pooler_layout=layout, kernels="torch")
    torch.manual_seed(0)
    plain = CoCa(cfg)
    torch.manual_seed(0)
    overlapped = CoCa(cfg)
    apply_text_overlap(overlapped, mode)
    assert overlapped.text_overlapped == mode
    order, threads = [], set()
    overlapped.text.register_forward_pre_hook(lambda *_: order.append("text"))
    overlapped.text.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    overlapped.vision.register_forward_pre_hook(lambda *_: order.append("image"))
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    text = torch.randint(3, cfg.vocab_size, (4, cfg.context_length), generator=torch.Generator().manual_seed(2))
    text[:, 0], text[:, 5], text[:, 6:] = 1, 2, cfg.pad_id
    loss_a, grads_a = _loss_and_grads(plain, images, text)
    for _ in range(2):  # twice: the thread's autograd graph is released and built again
        overlapped.zero_grad(set_to_none=True)
        loss_b, grads_b = _loss_and_grads(overlapped, images, text)
        assert torch.equal(loss_a, loss_b)
        for name, grad in grads_a.items():
            assert torch.equal(grad, grads_b[name]), name
    if mode == "stream":
        assert order[:2] == ["text", "image"]  # the text tower really went first (no streams on a CPU)
        assert threads == {threading.current_thread().name}
    else:
        assert threads == {"megacoca-text-tower"}
    with torch.no_grad():  # the thread takes the caller's grad mode
        out = overlapped(images, text)
    assert out["text_features"].grad_fn is None


def test_an_error_in_the_text_thread_is_raised_by_the_caller():
    cfg = get_flavor("coca_tiny").replace(kernels="torch")
    model = CoCa(cfg)
    apply_text_overlap(model, "thread")

    def broken(*args, **kwargs):
        raise ValueError("text tower failed")

    model.text_stage = broken
    images, text = torch.randn(2, 3, cfg.image_size, cfg.image_size), torch.ones(2, cfg.context_length).long()
    with pytest.raises(ValueError, match="text tower failed"):
        model(images, text)


@pytest.mark.parametrize("setting, tp, pp, zero, device, mode", [
    ("auto", 1, 1, 2, "cuda", "stream"), ("auto", 1, 1, 0, "cuda", "stream"), ("auto", 1, 1, 3, "cuda", "stream"),
    ("auto", 2, 1, 1, "cuda", "stream"), ("auto", 2, 1, 3, "cuda", "stream"), ("auto", 1, 2, 1, "cuda", "off"),
    ("auto", 1, 1, 1, "cpu", "off"), ("auto", 2, 1, 3, "cpu", "off"), ("thread", 2, 1, 3, "cpu", "thread"),
    ("thread", 1, 1, 0, "cuda", "thread"), ("thread", 2, 2, 3, "cpu", "off"), ("stream", 1, 1, 3, "cpu", "off"),
    ("stream", 2, 1, 3, "cuda", "stream"), ("off", 1, 1, 0, "cuda", "off"),
])
def test_where_the_overlap_is_on(setting, tp, pp, zero, device, mode):
    dims = ParallelDims(dp=1, tp=tp, pp=pp, world_size=tp * pp)
    choice = choose_overlap(setting, dims, zero, device)
    assert choice.mode == mode
    described = choice.describe()
    assert described.startswith("text tower overlap: " + ("off (" if mode == "off" else "on, "))
    if mode != "off":
        assert ("CUDA side stream" if mode == "stream" else "second thread") in described
        assert ("communicator of their own" in described) == (tp > 1)
        assert ("gathered once per step" in described) == (zero == 3)
    assert overlap_is_safe(dims, zero, device) == (choose_overlap("auto", dims, zero, device).mode != "off")


def test_cpu_default_says_why_it_is_off():
    dims = ParallelDims(dp=1, tp=1, pp=1, world_size=1)
    described = choose_overlap("auto", dims, 3, "cpu").describe()
    assert "compete for the same cores" in described and "overlap_text_tower=thread" in described


def test_the_config_takes_thread_and_refuses_unknown_modes():
    assert build_config(overrides=["parallel.overlap_text_tower=thread"]).parallel.overlap_text_tower == "thread"
    # YAML reads a bare `off` as False: the Literal takes it back as "off"
    assert build_config(overrides=["parallel.overlap_text_tower=off"]).parallel.overlap_text_tower == "off"
    with pytest.raises(ValueError, match="overlap_text_tower"):
        build_config(overrides=["parallel.overlap_text_tower=true"])  # no "on" to read it as
    with pytest.raises(ValueError, match="overlap_text_tower"):
        build_config(overrides=["parallel.overlap_text_tower=threads"])


def _deepspeed_like(module, calls):
    def hook(*args):
        calls.append("ds")

    hook.__module__ = "deepspeed.runtime.zero.parameter_offload"
    return module.register_forward_pre_hook(hook)


def test_deepspeed_hooks_set_aside_then_back_in_order():
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    calls = []
    layer[0].register_forward_pre_hook(lambda *_: calls.append("first"))
    _deepspeed_like(layer[0], calls)
    layer[0].register_forward_pre_hook(lambda *_: calls.append("last"))
    _deepspeed_like(layer[1], calls)
    before = [list(layer[i]._forward_pre_hooks) for i in range(2)]
    with without_deepspeed_hooks(layer):
        layer(torch.zeros(1, 2))
        assert calls == ["first", "last"]
    assert [list(layer[i]._forward_pre_hooks) for i in range(2)] == before
    calls.clear()
    layer(torch.zeros(1, 2))
    assert calls == ["first", "ds", "last", "ds"]


def test_text_tower_layers_get_their_own_group():
    model = meta_model(get_flavor("coca_tiny"), tp=2)
    text_group, shared = object(), None  # meta_model's layers hold group None
    # the embedding, and per block the attention, its q, k, v and out projections, fc1 and fc2
    assert set_tensor_parallel_group(model.text, text_group) == 1 + 7 * get_flavor("coca_tiny").text_layers
    groups = {name: module.group for name, module in model.named_modules() if hasattr(module, "group")}
    assert all((group is text_group) == name.startswith("text.") for name, group in groups.items()), groups
    assert groups["caption_head"] is shared  # tied or not, the caption head stays on the shared communicator


@pytest.mark.parametrize("flavor", ["coca_tiny", "coca_base", "coca_giant"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_text_tower_size_matches_the_meta_model(flavor, tp):
    cfg = get_flavor(flavor)
    if cfg.text_heads % tp or cfg.vision_heads % tp or cfg.pooler_heads % tp:
        pytest.skip(f"{flavor} does not split {tp} ways")
    params = list(meta_model(cfg, tp).text.parameters())
    assert [p.numel() for p in params] == text_tower_tensor_numels(cfg, tp)
    assert text_tower_numel(cfg, tp) == sum(p.numel() for p in params)
    partitioned = sum(p.numel() for p in params if p.numel() > 100_000)
    assert text_tower_gathered_bytes(cfg, tp, 8, 2) == partitioned * 2 * 7 // 8
    assert text_tower_gathered_bytes(cfg, tp, 1, 2) == 0


def test_text_tower_hold_numbers():
    """The figures the report gives: coca_giant bf16 at TP=8, DP=8."""
    giant = get_flavor("coca_giant")
    assert text_tower_numel(giant, 8) == 67_042_976
    assert round(text_tower_gathered_bytes(giant, 8, 8, 2) / 2**20, 1) == 111.4
