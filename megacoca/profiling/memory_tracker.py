"""The live tensor memory of one device, op by op, by what holds it (what megacoca.profiling.measure records).

`MemoryTracker` counts the live tensor memory of one device (every storage once, however many views share it)
op by op, as a TorchDispatchMode, and sorts it into CATEGORIES by what holds each storage:

- params: the parameters as the engine holds them: the module's parameters (ZeRO-0 weights; ZeRO-1/2 views into
  DeepSpeed's `bit16_groups_flat`), ZeRO-3's `ds_tensor` partitions in `fp16_partitioned_groups_flat` /
  `lp_param_buffer`, and whatever buffer a parameter points into when an op uses it (ZeRO-3's gathered params,
  in forward and backward), for the whole life of that buffer.
- grads: `param.grad` and every gradient buffer DeepSpeed's ZeRO optimizer holds (attribute names with "grad"
  or "ipg": the reduce buckets `ipg_buffer` / `ipg_buckets`, `averaged_gradients`, `grad_partitions_flat_buffer`).
- optimizer: the torch optimizer's state and parameters (Adam moments and step counters; under ZeRO-1/2/3 its
  parameters are DeepSpeed's fp32 master partitions `single_partition_of_fp32_groups` /
  `fp32_partitioned_groups_flat`); the fp32 attributes of DeepSpeed's optimizer.
- activations: anything else allocated in the forward part of the step (inputs, outputs, tensors saved for
  backward) and still alive.
- temp: anything else allocated in `engine.backward` or `engine.step` (activation gradients, recomputed
  activations under activation checkpointing, fp32 gradient copies of the optimizer step, flattened
  all-reduce buffers).
- other: the rest (module buffers, DeepSpeed bookkeeping, unrelated tensors of the process).

A storage in several owners belongs to the first category in that order (ZeRO-0's torch optimizer holds the
module's parameters: params). Ownership is read at the start, after every backward and step, when a parameter is
an op's input and when a gradient is accumulated; the category a storage last received is the one it counts
under, also at the peak taken before it was known (a ZeRO-3 gather buffer allocated before its first use).
Not seen: memory allocated below the dispatcher (gloo's own buffers, the scratch space inside a kernel, C++
allocations that never become a tensor) and the allocator's caching and fragmentation.
"""

from __future__ import annotations

import gc
import weakref
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CATEGORIES = ("params", "grads", "optimizer", "activations", "temp", "other")
_PHASE_CATEGORY = {"forward": "activations", "backward": "temp", "step": "temp", None: "other"}
# DeepSpeed optimizer attributes by name, first match wins: the reduce buckets ("ipg") and gradient partitions are
# grads, fp32/hp copies the optimizer's, the 16-bit flat buffers the parameters.
_DS_NAME_RULES = (("norm", "other"), ("grad", "grads"), ("ipg", "grads"), ("fp32", "optimizer"),
                  ("hp_", "optimizer"), ("bit16", "params"), ("fp16", "params"), ("bf16", "params"),
                  ("lp_param", "params"))


def _ds_category(name: str) -> str:
    lowered = name.lower()
    return next((category for key, category in _DS_NAME_RULES if key in lowered), "other")



def _tensors(obj):
    """The tensors in an op's (nested) arguments or results."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)



def _walk(obj, seen: set, depth: int = 0):
    """Tensors reachable from one of DeepSpeed's optimizer objects (not through modules or foreign objects)."""
    if depth > 5 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        return
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from _walk(item, seen, depth + 1)
    elif isinstance(obj, dict):
        for item in list(obj.values()):
            yield from _walk(item, seen, depth + 1)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for item in list(vars(obj).values()):
            yield from _walk(item, seen, depth + 1)



def _optimizer_tensors(optimizer) -> list[tuple[str, torch.Tensor]]:
    """(category, tensor) of what an optimizer holds: a torch optimizer's state and parameters are `optimizer`;
    DeepSpeed's ZeRO optimizers are read attribute by attribute (their torch optimizer inside is `optimizer`)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        held = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        held += [p for group in optimizer.param_groups for p in group["params"]]
        return [("optimizer", t) for t in held]
    found, seen = [], {id(optimizer)}
    for name, value in list(vars(optimizer).items()):
        if isinstance(value, torch.optim.Optimizer):
            found += _optimizer_tensors(value)
        else:
            found += [(_ds_category(name), t) for t in _walk(value, seen)]
    return found



class _Storage:
    __slots__ = ("nbytes", "category", "owned")

    def __init__(self, nbytes: int, category: str):
        self.nbytes, self.category, self.owned = nbytes, category, False



class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes of `device` by category, and their peak, while the tracker is entered.

    Register what owns memory with `watch_module` / `watch_optimizer` before entering; set `phase` ("forward",
    "backward", "step" or None) to say what new allocations are. What exists on entry is found by the garbage
    collector (every tensor object) and counted from the start.
    """

    def __init__(self, device="cpu"):
        super().__init__()
        self.device_type = torch.device(device).type
        self.phase: str | None = None
        self.total = 0
        self.peak_bytes = 0
        self.peak_phase: str | None = None
        self._live: dict[int, _Storage] = {}  # StorageImpl address -> entry, while the storage lives
        self._refs: dict[int, weakref.ref] = {}
        self._peak: list[tuple[_Storage, int]] = []
        self._modules: list[torch.nn.Module] = []
        self._optimizers: list = []
        self._handles: list = []
        self._resize = None
        self.scan_at_next_grad = False  # set when a backward starts: DeepSpeed has allocated its buckets by then

    def watch_module(self, module: torch.nn.Module) -> None:
        self._modules.append(module)

    def watch_optimizer(self, optimizer) -> None:
        self._optimizers.append(optimizer)

    # ------------------------------------------------------------------------------------- storages

    def _storage(self, tensor: torch.Tensor):
        if tensor.device.type != self.device_type:
            return None
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested: no single storage
            return None
        # a fake tensor claims a real device over a meta storage
        return storage if storage.nbytes() and storage.device.type == self.device_type else None

    def _entry(self, tensor: torch.Tensor, category: str) -> _Storage | None:
        storage = self._storage(tensor)
        return None if storage is None else self._add(storage, category)

    def _add(self, storage, category: str) -> _Storage:
        """The entry of `storage`, added under `category` if it is new (a resize since is applied)."""
        key = storage._cdata
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = _Storage(storage.nbytes(), category)
            self._refs[key] = weakref.ref(storage, partial(self._freed, key))
            self.total += entry.nbytes
        elif entry.nbytes != storage.nbytes():
            self.total += storage.nbytes() - entry.nbytes
            entry.nbytes = storage.nbytes()
        return entry

    def _freed(self, key: int, _ref) -> None:
        entry = self._live.pop(key, None)
        self._refs.pop(key, None)
        if entry is not None:
            self.total -= entry.nbytes

    def _update_peak(self) -> None:
        if self.total > self.peak_bytes:
            self.peak_bytes, self.peak_phase = self.total, self.phase
            self._peak = [(entry, entry.nbytes) for entry in self._live.values()]

    def _own(self, tensor: torch.Tensor, category: str) -> None:
        entry = self._entry(tensor, category)
        if entry is not None:
            entry.category, entry.owned = category, True

    def scan(self) -> None:
        """Re-read what the watched modules and optimizers hold; the first owner of a storage names its category."""
        claimed: set[int] = set()
        held = []
        for module in self._modules:
            for param in module.parameters():
                held += [("params", param), ("params", getattr(param, "ds_tensor", None)), ("grads", param.grad)]
            held += [("other", buffer) for buffer in module.buffers()]
        for optimizer in self._optimizers:
            held += _optimizer_tensors(optimizer)
        order = {category: i for i, category in enumerate(CATEGORIES)}
        for category, tensor in sorted((item for item in held if isinstance(item[1], torch.Tensor)),
                                       key=lambda item: order[item[0]]):
            storage = self._storage(tensor)
            if storage is not None and storage._cdata not in claimed:
                claimed.add(storage._cdata)
                self._own(tensor, category)
        self._update_peak()

    def breakdown(self, peak: bool = False) -> dict[str, int]:
        """Bytes by category now, or at the peak (each storage under the category it last received)."""
        items = self._peak if peak else [(entry, entry.nbytes) for entry in self._live.values()]
        out = dict.fromkeys(CATEGORIES, 0)
        for entry, nbytes in items:
            out[entry.category] += nbytes
        return out

    # ------------------------------------------------------------------------------------ the mode

    def __enter__(self):
        gc.collect()
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # isinstance would ask deprecated proxies their __class__
                self._entry(obj, "other")
        self.scan()
        for module in self._modules:
            for param in module.parameters():
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._grad_accumulated))
        self._resize = torch.UntypedStorage.resize_
        tracker, resize = self, self._resize

        def resize_(storage, size):  # storage resizes bypass the dispatcher
            result = resize(storage, size)
            if storage.device.type == tracker.device_type and (storage.nbytes() or storage._cdata in tracker._live):
                tracker._add(storage, _PHASE_CATEGORY[tracker.phase])
                tracker._update_peak()
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._refs.clear()  # the weak references go, and with them every callback on later frees
        return result

    def _grad_accumulated(self, param: torch.Tensor) -> None:
        if self.scan_at_next_grad:
            self.scan_at_next_grad = False
            self.scan()
        if param.grad is not None:
            self._own(param.grad, "grads")
            self._update_peak()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        category = _PHASE_CATEGORY[self.phase]
        for tensor in _tensors(out):
            self._entry(tensor, category)
        for tensor in _tensors((args, kwargs)):
            entry = self._entry(tensor, "other")  # an input only a C++ object held until now
            if entry is not None and not entry.owned and isinstance(tensor, torch.nn.Parameter):
                entry.category = "params"  # what a parameter points into: ZeRO-3's gathered buffers
        self._update_peak()
        return out

