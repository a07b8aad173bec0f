"""The CoCa loss on 2 gloo ranks (megacoca.losses, gathering over the dp group) equals one process over the
global batch: the dp-mean of the per-rank losses, and the dp-averaged gradients of every model parameter."""

import torch
import torch.distributed as dist
from dist_harness import run_ranks
from memory_data import TINY, global_batch

from megacoca.losses import CoCaLoss
from megacoca.models.coca import CoCa
from megacoca.parallel.dims import ParallelDims

GLOBAL_BATCH = 8


def _loss_and_grads(model, batch, dp_group=None):
    out = model(batch["images"], batch["text"])
    loss, parts = CoCaLoss(1.0, 2.0)(out, dp_group=dp_group)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.detach(), parts, grads


def _reference():
    torch.manual_seed(0)
    model = CoCa(TINY)
    return _loss_and_grads(model, global_batch(0, GLOBAL_BATCH))


def _two_ranks(rank, world_size):
    dims = ParallelDims(dp=-1, tp=1, pp=1, world_size=world_size).build()
    torch.manual_seed(0)
    model = CoCa(TINY)
    local = GLOBAL_BATCH // dims.dp_size
    loss, parts, grads = _loss_and_grads(model, global_batch(dims.dp_rank * local, local), dims.dp_group)
    stacked = torch.stack([loss, parts["loss_contrastive"], parts["loss_caption"]])
    dist.all_reduce(stacked, group=dims.dp_group)  # what DP averaging does to the loss ...
    for grad in grads.values():  # ... and to the gradients
        dist.all_reduce(grad, group=dims.dp_group)
        grad /= dims.dp_size
    return (stacked / dims.dp_size).tolist(), grads


def test_loss_and_gradients_match_one_process(tmp_path):
    results = run_ranks(_two_ranks, 2, tmp_path)
    ref_loss, ref_parts, ref_grads = _reference()
    expected = [ref_loss.item(), ref_parts["loss_contrastive"].item(), ref_parts["loss_caption"].item()]
    for losses, grads in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
