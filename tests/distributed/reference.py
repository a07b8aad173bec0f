"""The unsharded single-process run that every parallel layout is checked against: plain torch, AdamW with the
trainer's parameter groups, clipping and lr schedule, over the same samples as MemoryLoader feeds the ranks."""

from __future__ import annotations

import torch
from memory_data import global_batch

from megacoca.losses import CoCaLoss, StepTokens, caption_token_count
from megacoca.models.coca import CoCa
from megacoca.optim import lr_lambda, param_groups, seed_everything


def reference_run(job, cfg, *, steps: int, global_batch_size: int, accumulation: int) -> dict:
    """A step of `global_batch_size` samples is `accumulation` micro-batches of the samples every dp rank sees
    in that micro-step (MemoryLoader: micro-step k holds samples k*B*dp ... (k+1)*B*dp); each micro-batch's
    loss (contrastive over its samples, caption its share of the step's mean token loss: its token sum over the
    step's token count) is divided by `accumulation`. With accumulation 1 the step is the whole global batch as
    one micro-batch: what `loss.negatives=global` must equal at any layout.

    Returns losses and grad norms per step, the initial and final parameters, and the first step's gradients
    (before clipping)."""
    seed_everything(job.seed)
    model = CoCa(cfg)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, job.optim.weight_decay), lr=job.optim.lr,
                                  betas=job.optim.betas, eps=job.optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.schedule))
    loss_fn, losses, norms, first_grads = CoCaLoss(job.optim.contrastive_weight, job.optim.caption_weight), [], [], None
    micro_samples = global_batch_size // accumulation
    for step in range(steps):
        total = 0.0
        batches = [global_batch((step * accumulation + micro) * micro_samples, micro_samples, cfg)
                   for micro in range(accumulation)]
        tokens = StepTokens.count(sum(caption_token_count(batch["text"], cfg.pad_id) for batch in batches),
                                  accumulation)
        for batch in batches:
            out = model(batch["images"], batch["text"], **loss_fn.model_kwargs)
            loss, _ = loss_fn(out, step_tokens=tokens)
            (loss / accumulation).backward()
            total += loss.item() / accumulation
        for param in model.parameters():  # one a dropped objective's forward skipped (a weight of 0)
            if param.grad is None:
                param.grad = torch.zeros_like(param)  # what DeepSpeed's optimizers step on: AdamW still decays it
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip).item())
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(total)
    return {"loss": losses, "grad_norm": norms, "initial": initial, "first_grads": first_grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def assert_same(a: dict, b: dict, rtol: float, atol: float, what: str) -> None:
    """Losses, grad norms and parameters (and first-step gradients when both have them) agree. A gradient tensor
    gets an absolute slack of 1e-6 x its largest element on top of `atol`: its elements are sums of terms as large
    as that element, so fp32 summed in another order (another layout) differs by about that much (measured: the
    caption pooler's out_proj.bias gradient peaks at 52, and the one-process fp32 run itself is 2.7e-5 off its
    fp64 value)."""
    torch.testing.assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(torch.tensor(a["grad_norm"]), torch.tensor(b["grad_norm"]), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} grad norm: {m}")
    for key in ("params", "first_grads"):
        if key not in a or key not in b:
            continue
        assert a[key].keys() == b[key].keys(), (what, key)
        for name in a[key]:
            slack = 1e-6 * float(b[key][name].abs().max()) if key == "first_grads" else 0.0
            torch.testing.assert_close(a[key][name], b[key][name], rtol=rtol, atol=atol + slack,
                                       msg=lambda m: f"{what} {key} {name}: {m}")


def assert_tracks_in_bf16(run: dict, reference: dict, what: str, loss_rtol: float = 3e-3,
                          grad_norm_rtol: float = 3e-2) -> None:
    """bf16 forward/backward against the fp32 reference: losses to `loss_rtol` and grad norms to `grad_norm_rtol`
    (defaults for 2 steps at dp 2; bf16 strays further with more steps), and the fp32 master
    weights to 15% of the whole update's norm (final - initial over all tensors; measured 0.073 for ZeRO-1 and
    0.074 for ZeRO-3 at dp 2). Not per tensor: Adam divides by sqrt(v), so a tensor whose true gradient is ~0
    (the key biases: softmax ignores them) takes lr-sized steps on bf16 rounding noise, unlike the reference."""
    torch.testing.assert_close(torch.tensor(run["loss"]), torch.tensor(reference["loss"]), rtol=loss_rtol, atol=0,
                               msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(torch.tensor(run["grad_norm"]), torch.tensor(reference["grad_norm"]),
                               rtol=grad_norm_rtol, atol=0, msg=lambda m: f"{what} grad norm: {m}")
    names = list(reference["params"])
    update = torch.cat([(reference["params"][n] - reference["initial"][n]).flatten() for n in names])
    error = torch.cat([(run["params"][n] - reference["params"][n]).flatten() for n in names])
    relative = float(error.norm() / update.norm())
    assert relative < 0.15, f"{what}: the master weights' update is off by {relative:.3f} of its norm"
