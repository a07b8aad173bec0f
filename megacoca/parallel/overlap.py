"""The unimodal text tower overlapped with the image tower, without a pipeline (CUDA side stream).

CoCa's two towers are independent until the multimodal decoder and the contrastive loss. On a GPU the text
tower's kernels are small (64-77 tokens) and leave the device partly idle, so they can run on a side stream
while the image tower runs on the current one: the host launches the text tower first (on the side stream),
then the image tower (current stream), and the current stream waits for the side stream before the decoder.
Autograd runs each backward op on the stream of its forward op and synchronises across them, so the backward
overlaps the same way. The results are those of the sequential forward (the same ops on the same inputs; only
the order of two independent computations changes): tested on CPU, where the same text-first order runs with
no streams.

`overlap_is_safe` decides where it is on: CUDA, no tensor parallelism (two streams issuing NCCL collectives
on one communicator can interleave differently on different ranks), no pipeline (there the last stage's
text-ahead does this job), and not ZeRO-3 (which frees each layer's gathered parameters as soon as its forward
is launched on the host; memory a side stream may still be reading could be reused by the current one). Not
measured yet: no GPU was available when it was written.
"""

from __future__ import annotations

import torch


def overlap_is_safe(dims, zero_stage: int, device_type: str) -> bool:
    return device_type == "cuda" and dims.tp_size == 1 and dims.pp_size == 1 and zero_stage < 3


def apply_text_overlap(model) -> None:
    """Replace `model.towers` (per instance) by the overlapped version; a CPU input runs the same text-first
    order without streams."""
    streams: dict[torch.device, torch.cuda.Stream] = {}

    def towers(images: torch.Tensor, text: torch.Tensor, keep: int, contrastive: bool = True):
        if not images.is_cuda:
            text_out = model.text_stage(text, keep)
            return model.image_stage(images, contrastive), text_out
        main = torch.cuda.current_stream(images.device)
        side = streams.get(images.device)
        if side is None:
            side = streams[images.device] = torch.cuda.Stream(images.device)
        side.wait_stream(main)  # the inputs (and last step's updated weights) are ready
        with torch.cuda.stream(side):
            text_out = model.text_stage(text, keep)
        image_out = model.image_stage(images, contrastive)
        main.wait_stream(side)
        for tensor in text_out:
            tensor.record_stream(main)  # allocated on the side stream, used (and freed) on the current one
        return image_out, text_out

    model.towers = towers
    model.text_overlapped = True
