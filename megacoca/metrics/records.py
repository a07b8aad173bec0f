"""The training record logged every `logging.log_every` steps: losses, lr, grad norm, throughput, MFU."""

from __future__ import annotations


def train_record(*, step: int, losses: list[float], lr: float, grad_norm, samples_per_s: float,
                 flops_per_sample: float, world_size: int, peak_flops: float | None, skipped_samples: int) -> dict:
    """One metrics.jsonl line. `losses` is (loss, loss_contrastive, loss_caption, logit_scale), already averaged
    over micro-batches and data-parallel ranks. TFLOP/s per device spreads the samples' training FLOPs over
    every rank (tensor- and pipeline-parallel ranks share a sample's work); MFU is that over the device's peak,
    null when the peak is unknown (a CPU, a GPU missing from megacoca/metrics/peak.py)."""
    loss, loss_contrastive, loss_caption, logit_scale = losses
    tflops = samples_per_s * flops_per_sample / world_size / 1e12
    return {
        "step": step, "loss": loss, "loss_contrastive": loss_contrastive, "loss_caption": loss_caption,
        "logit_scale": logit_scale, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
        "samples_per_s": samples_per_s, "tflops_per_device": tflops,
        "mfu": None if peak_flops is None else tflops * 1e12 / peak_flops,
        "skipped_samples": skipped_samples,
    }


SOURCE_FIELDS = ("samples", "epochs", "skipped")  # per mixture source: samples taken, epochs completed, skipped


def source_record(per_source: dict[str, dict[str, int]]) -> dict:
    """A data mixture's accounting as flat fields `data/<source>/samples|epochs|skipped` (over every data-parallel
    rank: samples taken since the start, epochs every rank completed, bad samples skipped), in the sources' order."""
    return {f"data/{name}/{field}": int(values[field]) for name, values in per_source.items()
            for field in SOURCE_FIELDS}
