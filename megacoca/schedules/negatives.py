"""Exact global-batch negatives (`loss.negatives: global`): the contrastive loss over the whole global batch, whatever
the micro-batch, accumulation, data-, tensor- and pipeline-parallel degrees, by caching the embeddings' gradients
(Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", arXiv 2101.06983:
GradCache), adapted to CoCa, whose captioning loss needs no negatives.

A step then runs in two passes (megacoca.schedules.accumulate and .pipeline):
1. every micro-batch of the step forward through both towers only (no multimodal decoder, no caption head), under
   `torch.no_grad()`: nothing is kept but the normalised embeddings and the logit scale (`GlobalNegatives.add`);
2. `solve()`: the embeddings of every micro-batch, gathered over the data-parallel group, give the global
   contrastive loss and its gradient with respect to each of this rank's embeddings and the logit scale;
3. every micro-batch again with gradients, as in the "micro" schedule, its contrastive loss replaced by
   `contrastive(k, out)`: the global loss's value, with the gradient of `m x (g_image . image_features + g_text .
   text_features) + g_scale x logit_scale`, where the g are pass 2's cached gradients for micro-batch k. DeepSpeed
   divides each micro-batch's loss by the m micro-batches and averages the data-parallel ranks' gradients, so the
   step's gradient is exactly that of the global loss (plus the caption loss, normalised by the step's global token
   count: megacoca.losses.StepTokens).

Randomness: every forward piece (a micro-batch's forward; under a pipeline, the last stage's text tower apart from
its image part when text-ahead runs it separately) draws from its own generator state, seeded from (the run's seed,
the step, the data-parallel rank, the piece, the micro-batch) in both passes (`RandomPieces`), so pass 2 draws exactly
what pass 1 drew (dropout, patch dropout or stochastic depth in a model that has them), in whatever order the
schedule runs the pieces. Tensor-parallel ranks of one data-parallel rank share the seeds, as their replicated
activations need. `replay_error` is how far pass 2's embeddings are from pass 1's (0 when the two passes compute the
same; the trainer logs it).
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from megacoca.losses.contrastive import gathered_contrastive_loss
from megacoca.parallel.collectives import all_gather_with_grad, group_rank


class RandomPieces:
    """Seeded generator states per forward piece: `with pieces.piece(step, kind, k):` runs its body on torch's
    generators (CPU, and the current CUDA device) seeded from (seed, step, dp rank, kind, k), and restores them after."""

    def __init__(self, seed: int, dp_rank: int) -> None:
        self.seed, self.dp_rank = seed, dp_rank
        self.devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

    def seed_of(self, step: int, kind: str, k: int) -> int:
        text = f"megacoca-negatives:{self.seed}:{step}:{self.dp_rank}:{kind}:{k}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1

    @contextlib.contextmanager
    def piece(self, step: int, kind: str, k: int):
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed_of(step, kind, k))
            yield


def piece(negatives: "GlobalNegatives | None", step: int, kind: str, k: int):
    """A forward piece's generators: with global negatives seeded (the same draws in both passes), else untouched."""
    if negatives is None:
        return contextlib.nullcontext()
    return negatives.pieces.piece(step, kind, k)


class GlobalNegatives:
    """One step's embeddings (pass 1), the global contrastive loss over them and its cached gradients (`solve`), and
    each micro-batch's stand-in contrastive loss in pass 2 (`contrastive`)."""

    def __init__(self, micro_batches: int, dp_group, pieces: RandomPieces) -> None:
        self.micro_batches, self.dp_group, self.pieces = micro_batches, dp_group, pieces
        self.replay_error = torch.zeros(())
        self._reset()

    def _reset(self) -> None:
        self.image: list[torch.Tensor] = []
        self.text: list[torch.Tensor] = []
        self.scale: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.scale_grad: torch.Tensor | None = None

    def begin(self) -> None:
        self._reset()

    def add(self, out: dict) -> None:
        """Pass 1: the next micro-batch's outputs (its normalised features and the logit scale), kept detached."""
        self.image.append(out["image_features"].detach())
        self.text.append(out["text_features"].detach())
        self.scale = out["logit_scale"].detach()

    def solve(self) -> None:
        """The global contrastive loss of this rank's rows (all its micro-batches) against every row of the global
        batch, gathered with gradient over the data-parallel group (megacoca.losses.contrastive_loss, as in the micro
        case), and its gradient with respect to this rank's embeddings (every rank's loss reaches them through the
        gather's backward) and to the logit scale (this rank's loss only: data-parallel averaging sums the rest)."""
        rows = [image.shape[0] for image in self.image]
        self.replay_error = torch.zeros((), device=self.image[0].device)
        image = torch.cat(self.image).float().requires_grad_()
        text = torch.cat(self.text).float().requires_grad_()
        scale = self.scale.float().requires_grad_()
        with torch.enable_grad():
            all_image = all_gather_with_grad(image, self.dp_group)
            all_text = all_gather_with_grad(text, self.dp_group)
            loss = gathered_contrastive_loss(image, text, all_image, all_text, scale, group_rank(self.dp_group))
            image_grad, text_grad, scale_grad = torch.autograd.grad(loss, (image, text, scale))
        self.loss = loss.detach()
        self.grads = list(zip(image_grad.split(rows), text_grad.split(rows)))
        self.scale_grad = scale_grad

    def contrastive(self, k: int, out: dict) -> torch.Tensor:
        """Pass 2, micro-batch k: a tensor whose value is the global contrastive loss and whose gradient reaches k's
        features and the logit scale as the global loss's does (scaled for DeepSpeed's division by the micro-batch
        count)."""
        image_grad, text_grad = self.grads[k]
        image, text = out["image_features"], out["text_features"]
        error = torch.maximum((image.detach() - self.image[k]).abs().max(), (text.detach() - self.text[k]).abs().max())
        self.replay_error = torch.maximum(self.replay_error, error.float())  # on the device: no host sync
        surrogate = self.micro_batches * ((image.float() * image_grad).sum() + (text.float() * text_grad).sum())
        surrogate = surrogate + (out["logit_scale"].float() * self.scale_grad).sum()
        return self.loss + (surrogate - surrogate.detach())
