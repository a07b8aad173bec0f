"""Evaluation during training under pipeline parallelism, sharded: no rank ever holds more than its stage.

Everything in `megacoca.eval.evaluate` but the image tower needs only the last stage (the text tower for
zero-shot classes and retrieval, the decoder and caption head for generation), so the last stage runs
`evaluate` itself on a stand-in model (`PipelinedEvalModel`) whose `image_stage` / `encode_image` run the image
tower through the pipeline: for each batch the last stage broadcasts (over its pipeline group) which eval
images to encode; stage 0 embeds them and runs its ViT blocks, every stage passes the hidden state on, and the
last stage finishes the tower. The other stages only serve those requests (`serve_image_requests`) until the
last stage says it is done, then every stage gets the metrics (rank 0 logs them). Tensor- and data-parallel
replicas of a stage run the same requests in lockstep, as the non-pipelined sharded eval does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacoca.parallel.pipeline.p2p import PendingSends, recv_tensor, send_tensor

DONE, ENCODE = 0, 1


def _control(values, dims, device) -> torch.Tensor:
    message = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(message, dims.pp_ranks[-1], group=dims.pp_group)
    return message


class PipelinedEvalModel:
    """The last stage as `evaluate` sees a CoCa: text side local, image tower through the pipeline. Batches of
    images must be rows of `images` (the eval set), as `evaluate` passes them; each is found by content."""

    def __init__(self, stage, images: torch.Tensor, dims) -> None:
        self.stage, self.images, self.dims = stage, images, dims
        self.device = next(stage.parameters()).device
        self._next_start = 0

    def __getattr__(self, name):  # cfg, text, decoder, caption_head, parameters, training, eval, train
        return getattr(self.stage, name)

    def _locate(self, images: torch.Tensor) -> int:
        rows = images.detach().to("cpu", self.images.dtype)
        n = rows.shape[0]
        for start in (self._next_start, 0):
            if start + n <= len(self.images) and torch.equal(self.images[start:start + n], rows):
                return start
        for start in range(len(self.images) - n + 1):
            if torch.equal(self.images[start:start + n], rows):
                return start
        raise ValueError("pipelined eval: a batch of images that is not a run of consecutive eval-set rows")

    def image_stage(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._locate(images)
        end = start + images.shape[0]
        self._next_start = end
        _control([ENCODE, start, end], self.dims, self.device)
        hidden = recv_tensor(self.dims.pp_ranks[-2], self.dims.pp_group, self.device)
        return self.stage(hidden, part="image")

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        embedding, _ = self.image_stage(images)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        embedding, _ = self.stage(text=text, keep=self.stage.text_keep(text), part="text")
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def finish(self) -> None:
        _control([DONE, 0, 0], self.dims, self.device)


def serve_image_requests(stage, images: torch.Tensor, dims) -> None:
    """A stage before the last: run its share of the image tower for every request, until DONE."""
    device = next(stage.parameters()).device
    ranks, s = dims.pp_ranks, dims.pp_rank
    while True:
        command, start, end = _control([DONE, 0, 0], dims, device).tolist()
        if command == DONE:
            return
        if stage.is_first:
            x = images[start:end].to(device, dtype=next(stage.parameters()).dtype)
        else:
            x = recv_tensor(ranks[s - 1], dims.pp_group, device)
        pending = PendingSends()
        send_tensor(stage(x, part="image"), ranks[s + 1], dims.pp_group, pending)
        pending.wait()


def pipelined_evaluate(engine, dims, evaluate_on_last_stage, images: torch.Tensor) -> dict:
    """Run `evaluate_on_last_stage(model)` on the last stage with the pipelined stand-in model while the other
    stages serve its image requests; every stage returns the last stage's result."""
    stage = getattr(engine, "module", engine)  # called directly: ZeRO-3's hooks gather each layer as it runs
    result = [None]
    if stage.is_last:
        model = PipelinedEvalModel(stage, images, dims)
        try:
            result[0] = evaluate_on_last_stage(model)
        finally:
            model.finish()
    else:
        serve_image_requests(stage, images, dims)
    dist.broadcast_object_list(result, dims.pp_ranks[-1], group=dims.pp_group)
    return result[0]
