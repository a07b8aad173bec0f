"""The CoCa loss on 2 gloo ranks (megacoca.losses, gathering over the dp group) equals one process over the
global batch: the dp-mean of the per-rank losses, and the dp-averaged gradients of every model parameter.

The batch is chosen so that the ranks' caption token counts differ by far (rank 0 gets the shortest captions,
rank 1 the longest) and the model's caption head is scaled up so that token losses differ: otherwise a caption
loss normalised by each rank's own token count would agree with the global one by accident."""

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


def _model():
    torch.manual_seed(0)
    model = CoCa(TINY)
    with torch.no_grad():
        model.caption_head.weight.mul_(30.0)  # token losses that differ from token to token
    return model


def _batch():
    """The 4 shortest then the 4 longest captions of 32 samples."""
    pool = global_batch(0, 32)
    order = (pool["text"] != TINY.pad_id).sum(dim=1).argsort(stable=True)
    chosen = torch.cat([order[:GLOBAL_BATCH // 2], order[-GLOBAL_BATCH // 2:]])
    return {key: value[chosen] for key, value in pool.items()}


def _reference():
    return _loss_and_grads(_model(), _batch())


def _two_ranks(rank, world_size):
    dims = ParallelDims(dp=-1, tp=1, pp=1, world_size=world_size).build()
    model = _model()
    local = GLOBAL_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)
    loss, parts, grads = _loss_and_grads(model, {k: v[rows] for k, v in _batch().items()}, dims.dp_group)
    stacked = torch.stack([loss, parts["loss_contrastive"], parts["loss_caption"]])
    dist.all_reduce(stacked, group=dims.dp_group)  # what DP averaging does to the loss ...
    for grad in grads.values():  # ... and to the gradients
        dist.all_reduce(grad, group=dims.dp_group)
        grad /= dims.dp_size
    return (stacked / dims.dp_size).tolist(), grads


def test_loss_and_gradients_match_one_process(tmp_path):
    tokens = (_batch()["text"][:, 1:] != TINY.pad_id).sum(dim=1)
    assert tokens[4:].sum() > 2 * tokens[:4].sum()  # the ranks' token counts differ by far
    results = run_ranks(_two_ranks, 2, tmp_path)
    ref_loss, ref_parts, ref_grads = _reference()
    expected = [ref_loss.item(), ref_parts["loss_contrastive"].item(), ref_parts["loss_caption"].item()]
    for losses, grads in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
