"""The overlapped towers (text tower first, on a side stream on CUDA) give the sequential forward's results bit
for bit, and are switched on only where it is safe."""

import pytest
import torch

from megacoca.config.flavors import get_flavor
from megacoca.losses import CoCaLoss
from megacoca.models.coca import CoCa
from megacoca.parallel.dims import ParallelDims
from megacoca.parallel.overlap import apply_text_overlap, overlap_is_safe


def _loss_and_grads(model, images, text):
    loss, _ = CoCaLoss()(model(images, text))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["paper", "open_clip"])
def test_overlapped_towers_equal_the_sequential_forward(layout):
    cfg = get_flavor("coca_tiny").replace(pooler_layout=layout, kernels="torch")
    torch.manual_seed(0)
    plain = CoCa(cfg)
    torch.manual_seed(0)
    overlapped = CoCa(cfg)
    apply_text_overlap(overlapped)
    assert overlapped.text_overlapped
    order = []
    overlapped.text.register_forward_pre_hook(lambda *_: order.append("text"))
    overlapped.vision.register_forward_pre_hook(lambda *_: order.append("image"))
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    text = torch.randint(3, cfg.vocab_size, (4, cfg.context_length), generator=torch.Generator().manual_seed(2))
    text[:, 0], text[:, 5], text[:, 6:] = 1, 2, cfg.pad_id
    loss_a, grads_a = _loss_and_grads(plain, images, text)
    loss_b, grads_b = _loss_and_grads(overlapped, images, text)
    assert order == ["text", "image"]  # the text tower really went first
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


@pytest.mark.parametrize("tp, pp, zero, device, safe", [
    (1, 1, 2, "cuda", True), (1, 1, 0, "cuda", True), (1, 1, 3, "cuda", False), (2, 1, 1, "cuda", False),
    (1, 2, 1, "cuda", False), (1, 1, 1, "cpu", False),
])
def test_overlap_only_where_safe(tp, pp, zero, device, safe):
    dims = ParallelDims(dp=1, tp=tp, pp=pp, world_size=tp * pp)
    assert overlap_is_safe(dims, zero, device) is safe
