"""A tiny deterministic in-memory batch source with the ShardLoader interface (tests only)."""

from __future__ import annotations

import torch

from megacoca.config.model import CoCaConfig

# A CoCa small enough that a 2-rank DeepSpeed step takes well under a second on CPU.
TINY = CoCaConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                  vision_mlp_dim=64, caption_queries=8, pooler_heads=2, vocab_size=64, context_length=12,
                  text_width=32, text_heads=2, text_mlp_dim=64, text_layers=1, decoder_layers=1, embed_dim=32,
                  kernels="torch")


# ZeRO-3 keeps tensors under stage3_param_persistence_threshold (1e5 elements) whole on every rank: every
# tensor of TINY is smaller, so a test that claims ZeRO-3 sets the threshold to 0 and asserts the partitioning.
SHARD_ALL = "parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"


def assert_partitioned(module, dp_size: int) -> None:
    """Every parameter of `module` is split across the dp ranks: each rank holds a 1/dp shard between forwards."""
    from megacoca.parallel.zero import partition_stats

    stats = partition_stats(module)
    assert stats.partitioned_tensors == stats.tensors, stats.describe()
    for name, param in module.named_parameters():
        assert param.numel() == 0 and param.ds_tensor.numel() == -(-param.ds_numel // dp_size), name


def sample(index: int, cfg: CoCaConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + index)
    image = torch.randn(3, cfg.image_size, cfg.image_size, generator=gen)
    length = int(torch.randint(3, cfg.context_length + 1, (1,), generator=gen))
    text = torch.full((cfg.context_length,), cfg.pad_id, dtype=torch.long)
    text[:length] = torch.randint(3, cfg.vocab_size, (length,), generator=gen)
    text[0], text[length - 1] = 1, 2  # bos, eos
    return image, text


def global_batch(start: int, size: int, cfg: CoCaConfig = TINY) -> dict:
    images, texts = zip(*(sample(start + i, cfg) for i in range(size)))
    return {"images": torch.stack(images), "text": torch.stack(texts)}


class MemoryLoader:
    """Batch k of dp rank r holds samples (k * dp + r) * B ... + B: the dp ranks split each global batch."""

    def __init__(self, batch_size: int, dp_rank: int = 0, dp_size: int = 1, cfg: CoCaConfig = TINY):
        self.batch_size, self.dp_rank, self.dp_size, self.cfg = batch_size, dp_rank, dp_size, cfg
        self.position = 0
        self.skipped = {"decode": 0}

    def __iter__(self):
        while True:
            start = (self.position * self.dp_size + self.dp_rank) * self.batch_size
            self.position += 1
            batch = global_batch(start, self.batch_size, self.cfg)
            batch["keys"] = [str(start + i) for i in range(self.batch_size)]
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position, "dp_size": self.dp_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def load_resplit_state(self, states: list[dict]) -> None:
        """Continue from every old dp rank's state under this loader's dp size and batch size: the global batches
        consumed so far are skipped (they must fill a whole number of this loader's global batches)."""
        consumed = {state["position"] * state["dp_size"] * state["batch_size"] for state in states}
        assert len(consumed) == 1 and len(states) == states[0]["dp_size"], states
        per_batch = self.dp_size * self.batch_size
        assert consumed.pop() % per_batch == 0
        self.position = states[0]["position"] * states[0]["dp_size"] * states[0]["batch_size"] // per_batch
