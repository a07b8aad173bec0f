"""Point-to-point transfers between pipeline stages, the shape and dtype agreed by a header once per step.

A tensor whose shape the receiver does not know goes as two messages: a fixed-size int64 header (dtype code,
number of dimensions, the sizes), then the data; reading the header is a host synchronisation. Within a
training step every activation a stage sends has the same shape (and every gradient sent back has its
activation's), so only the first message of a kind in a step carries a header (`header=True`); the receiver
remembers the shape and receives the rest straight into a buffer of it (`like=`): no host sync per message in
the steady state, while a changed micro-batch size or sequence length between steps still cannot hang a stage
on a receive of the wrong size. Sends are asynchronous (`isend`): a stage never waits for its neighbour to
receive before going on, which with 1F1B's order makes the exchanges deadlock-free; the pending sends are kept
(with their tensors alive) and waited for at the end of the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool)
MAX_DIMS = 8
HEADER = 2 + MAX_DIMS


def _header(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in DTYPES:
        raise TypeError(f"pipeline send: unsupported dtype {tensor.dtype}")
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"pipeline send: {tensor.dim()} dimensions, at most {MAX_DIMS}")
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0] = DTYPES.index(tensor.dtype)
    header[1] = tensor.dim()
    header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return header


class PendingSends:
    """The asynchronous sends of one step: wait for them all before their tensors may be freed or reused."""

    def __init__(self) -> None:
        self.works: list = []
        self.tensors: list[torch.Tensor] = []

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works.clear()
        self.tensors.clear()


def send_tensor(tensor: torch.Tensor, dst: int, group, pending: PendingSends, *, header: bool = True) -> None:
    """Send `tensor` to global rank `dst` without waiting for it to be received: the header, then the data
    (`header=False`: the data alone, for a receiver that knows the shape and dtype)."""
    data = tensor.detach().contiguous()
    parts = (_header(data).to(data.device), data) if header else (data,)
    for part in parts:
        pending.works.append(dist.isend(part, dst, group=group))
        pending.tensors.append(part)


def recv_tensor(src: int, group, device: torch.device | str,
                like: tuple[torch.Size, torch.dtype] | None = None) -> torch.Tensor:
    """Receive the next tensor `send_tensor` sent from global rank `src` (blocks until it arrives): its header
    first, or, with `like=(shape, dtype)`, the data alone into a new tensor of that shape (no host sync)."""
    if like is None:
        header = torch.empty(HEADER, dtype=torch.int64, device=device)
        dist.recv(header, src, group=group)
        header = header.tolist()
        dtype, ndim = DTYPES[header[0]], header[1]
        like = (torch.Size(header[2:2 + ndim]), dtype)
    out = torch.empty(like[0], dtype=like[1], device=device)
    dist.recv(out, src, group=group)
    return out
