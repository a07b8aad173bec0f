"""benchmarks/pipeline_vs_deepspeed.py's DeepSpeed side: CoCa as the chain of layers DeepSpeed's PipelineModule runs.

`deepspeed_layers` writes CoCa as tuple-passing layers that share the modules (and so the weights) of one CoCa;
`fixed_split_pipeline_module` splits them at given layer indices; `instrument_deepspeed` times a PipelineEngine's
p2p instructions and its whole schedule. The comparison itself, and how it is measured, is in
benchmarks/pipeline_vs_deepspeed.py.
"""

from __future__ import annotations

import time


def deepspeed_layers(model, loss_fn):
    """CoCa as the linear chain of tuple-passing layers DeepSpeed's PipelineModule runs (modules shared with
    `model`, so the weights are `model`'s)."""
    import torch.nn as nn

    from megacoca.models.coca.model import JoinedTowers

    class PatchEmbed(nn.Module):
        def __init__(self, embed):
            super().__init__()
            self.embed = embed

        def forward(self, inputs):
            images, text = inputs
            return self.embed(images).contiguous(), text

    class VitBlock(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, inputs):
            hidden, text = inputs
            return self.block(hidden).contiguous(), text

    class TextSideAndLoss(JoinedTowers, nn.Module):
        """megacoca's last-stage forward after its ViT blocks (PipelineStage.forward), then the CoCa loss."""

        def __init__(self, coca):
            super().__init__()
            self.cfg = coca.cfg
            self.image_pooler = coca.image_pooler
            self.text = coca.text
            self.decoder = coca.decoder
            self.caption_head = coca.caption_head
            self.logit_scale = coca.logit_scale

        def forward(self, inputs):
            hidden, text = inputs
            keep = self.text_keep(text)
            image_embedding, caption_tokens = self.image_pooler(hidden)
            text_embedding, token_outputs = self.text(text, keep)
            out = self.joined_outputs(image_embedding, caption_tokens, text_embedding, token_outputs, text, keep)
            loss, _ = loss_fn(out, dp_group=None)  # dp = 1
            return loss

    return [PatchEmbed(model.vision.embed)] + [VitBlock(b) for b in model.vision.blocks] + [TextSideAndLoss(model)]


def fixed_split_pipeline_module(layers, parts: list[int]):
    """A PipelineModule of len(parts) - 1 stages whose boundaries are `parts` (layer indices, DeepSpeed's `parts`
    convention)."""
    from deepspeed.pipe import PipelineModule

    class FixedSplitPipelineModule(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = list(parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return FixedSplitPipelineModule(layers=layers, num_stages=len(parts) - 1, loss_fn=None, partition_method="fixed",
                                    activation_checkpoint_interval=0)


def instrument_deepspeed(engine) -> dict:
    """Time this rank's p2p instructions and its whole schedule per train_batch (instance-level wrappers)."""
    from deepspeed.runtime.pipe import schedule as S

    stats = {"wait": 0.0, "window": 0.0}
    comm = (S.SendActivation, S.RecvActivation, S.SendGrad, S.RecvGrad)

    def timed(fn):
        def wrapper(self, **kwargs):
            began = time.perf_counter()
            try:
                return fn(self, **kwargs)
            finally:
                stats["wait"] += time.perf_counter() - began

        return wrapper

    engine._INSTRUCTION_MAP = {kind: (timed(fn) if kind in comm else fn)
                               for kind, fn in type(engine)._INSTRUCTION_MAP.items()}
    real = engine._exec_schedule

    def exec_schedule(pipe_schedule):
        stats["wait"] = 0.0
        began = time.perf_counter()
        real(pipe_schedule)
        stats["window"] = time.perf_counter() - began

    engine._exec_schedule = exec_schedule
    return stats
