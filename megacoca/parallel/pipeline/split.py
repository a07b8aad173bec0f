"""Where CoCa's layers go on a pipeline of `pp` stages, chosen by a cost model (FLOPs), not by layer count.

CoCa's graph: the ViT (patch embedding, then blocks) and the unimodal text tower are independent until the
poolers, the multimodal decoder and the losses. So the ViT blocks spread over the stages in order, and the last
stage holds the "text side": the attentional poolers, the unimodal text tower, the multimodal decoder, the
caption head and both losses, plus whatever ViT blocks it is given. The one tensor that crosses a stage
boundary is the ViT's hidden state (B, image tokens, vision width); text never leaves the last stage.

Cost of a stage = forward FLOPs of its parts (megacoca.metrics.flops; training costs 3x everywhere, so the
ratio is the same): ViT block i at the image token count, patch embedding with block 0, and on the last stage
poolers + text tower + decoder + heads. The split minimises the largest stage cost over every contiguous
assignment of blocks (the last stage may hold none). `parallel.pipeline_split` overrides it: ViT blocks per
stage, e.g. [14, 14, 12] for 40 layers on 3 stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacoca.metrics.flops import forward_flops_breakdown


@dataclass(frozen=True)
class StageSplit:
    """`blocks[s]` = the ViT block indices stage s runs (a range); the last stage also runs the text side."""

    blocks: tuple[range, ...]
    block_flops: tuple[int, ...]  # forward FLOPs per sample of each ViT block (patch embedding in block 0's)
    text_side_flops: int  # poolers, text tower, decoder, heads
    text_tower_flops: int  # the unimodal text tower alone (what text-ahead can move into the warmup bubble)

    @property
    def pp(self) -> int:
        return len(self.blocks)

    def stage_flops(self) -> list[int]:
        """Forward FLOPs per sample of each stage."""
        costs = [sum(self.block_flops[i] for i in blocks) for blocks in self.blocks]
        costs[-1] += self.text_side_flops
        return costs

    def balance(self) -> float:
        """Mean stage cost over the largest (1.0 = perfectly balanced): the pipeline's efficiency from the split."""
        costs = self.stage_flops()
        return sum(costs) / (len(costs) * max(costs))

    def describe(self) -> str:
        costs = self.stage_flops()
        total = sum(costs)
        parts = []
        for stage, (blocks, cost) in enumerate(zip(self.blocks, costs)):
            what = f"ViT blocks {blocks.start}-{blocks.stop - 1}" if len(blocks) else "no ViT blocks"
            if stage == self.pp - 1:
                what += " + poolers, text tower, decoder, heads"
            parts.append(f"stage {stage}: {what} ({cost / 1e9:.3g} GFLOP fwd/sample, {100 * cost / total:.1f}%)")
        return f"pipeline split over {self.pp} stages (balance {self.balance():.2f}): " + "; ".join(parts)


def _costs(cfg) -> tuple[list[int], int, int]:
    parts = forward_flops_breakdown(cfg)
    patch = 2 * cfg.num_patches * cfg.in_channels * cfg.patch_size ** 2 * cfg.vision_width
    per_block = (parts["vision"] - patch + parts["vision_attention"]) // cfg.vision_layers
    blocks = [per_block] * cfg.vision_layers
    blocks[0] += patch
    text_tower = parts["text"] + parts["text_attention"]
    text_side = (parts["poolers"] + parts["poolers_attention"] + text_tower + parts["decoder"]
                 + parts["decoder_attention"] + parts["heads"])
    return blocks, text_side, text_tower


def check_pipeline(cfg, pp: int, micro_batches: int | None = None, split: list[int] | None = None) -> None:
    """The layout errors that need no process group: one line each."""
    if pp < 1:
        raise ValueError(f"parallel.pp must be >= 1, got {pp}")
    if pp == 1:
        return
    if cfg.vision_layers < pp - 1:
        raise ValueError(f"parallel.pp={pp}: more stages than ViT blocks allow ({cfg.vision_layers} blocks; the first "
                         f"{pp - 1} stages need at least one block each)")
    if micro_batches is not None and micro_batches < pp:
        raise ValueError(f"parallel.pp={pp} needs at least {pp} micro-batches per step, got {micro_batches} "
                         "(global_batch_size / (micro_batch_size x dp)): raise the global batch or lower the "
                         "micro-batch size")
    if split is not None:
        if len(split) != pp or any(not isinstance(n, int) or isinstance(n, bool) for n in split):
            raise ValueError(f"parallel.pipeline_split must list {pp} integers (ViT blocks per stage), got {split!r}")
        if sum(split) != cfg.vision_layers:
            raise ValueError(f"parallel.pipeline_split {split} places {sum(split)} ViT blocks, the model has "
                             f"{cfg.vision_layers}")
        empty = [stage for stage, n in enumerate(split[:-1]) if n < 1]
        if empty or split[-1] < 0:
            stage = (empty or [pp - 1])[0]
            raise ValueError(f"parallel.pipeline_split {split} leaves stage {stage} empty (every stage but the last "
                             "needs at least one ViT block; the last holds the text side)")


def split_stages(cfg, pp: int, split: list[int] | None = None) -> StageSplit:
    """The split of `cfg` over `pp` stages: `split` (ViT blocks per stage) if given, else the cheapest. The layout
    was checked (`check_pipeline`) by whoever chose it."""
    blocks, text_side, text_tower = _costs(cfg)
    if split is None:
        split = _balanced(blocks, text_side, pp)
    ranges, start = [], 0
    for count in split:
        ranges.append(range(start, start + count))
        start += count
    return StageSplit(tuple(ranges), tuple(blocks), text_side, text_tower)


def _balanced(blocks: list[int], text_side: int, pp: int) -> list[int]:
    """Block counts per stage minimising the largest stage cost (exact, by dynamic programming): stages 0..pp-2
    take at least one block each, the last stage the remaining blocks plus `text_side`. Ties go to the split
    that puts fewer blocks on the later stages."""
    n = len(blocks)
    prefix = [0]
    for cost in blocks:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[s][i]: the smallest achievable max cost of stages 0..s-1 covering blocks 0..i-1 (each >= 1 block)
    best = [[inf] * (n + 1) for _ in range(pp)]
    choice = [[0] * (n + 1) for _ in range(pp)]
    best[0][0] = 0
    for s in range(1, pp):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], choice[s][i] = value, j
    end, top = n, inf
    for i in range(pp - 1, n + 1):
        value = max(best[pp - 1][i], prefix[n] - prefix[i] + text_side)
        if value < top or (value == top and i > end):
            top, end = value, i
    counts = [n - end]
    for s in range(pp - 1, 0, -1):
        start = choice[s][end]
        counts.append(end - start)
        end = start
    return counts[::-1]
