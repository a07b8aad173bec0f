"""The pipeline split: cost model, the balanced choice (checked against brute force), user overrides, and the
one-line layout errors; stages cut from a meta coca_giant hold disjoint parts that add up to the model."""

import itertools

import pytest
import torch

from megacoca.config.flavors import get_flavor
from megacoca.metrics.flops import forward_flops_per_sample
from megacoca.models.coca import CoCa
from megacoca.parallel.pipeline.split import check_pipeline, split_stages
from megacoca.parallel.pipeline.stage import PipelineStage


@pytest.mark.parametrize("flavor", ["coca_tiny", "coca_base", "coca_giant"])
def test_stage_costs_add_up_to_the_model(flavor):
    cfg = get_flavor(flavor)
    split = split_stages(cfg, 2)
    assert sum(split.stage_flops()) == pytest.approx(forward_flops_per_sample(cfg), rel=1e-9)
    assert split.text_tower_flops < split.text_side_flops


@pytest.mark.parametrize("flavor, pp", [("coca_tiny", 2), ("coca_tiny", 3), ("coca_base", 3), ("coca_base", 4),
                                        ("coca_giant", 4)])
def test_balanced_split_is_optimal(flavor, pp):
    cfg = get_flavor(flavor)
    best = max(split_stages(cfg, pp).stage_flops())
    n = cfg.vision_layers
    brute = min(
        max(split_stages(cfg, pp, list(counts)).stage_flops())
        for counts in itertools.product(range(n + 1), repeat=pp)
        if sum(counts) == n and all(c >= 1 for c in counts[:-1])
    ) if n <= 12 else None
    if brute is not None:
        assert best == brute
    else:  # the giant: at least as good as the even split
        even = [n // pp + (1 if i < n % pp else 0) for i in range(pp)]
        assert best <= max(split_stages(cfg, pp, even).stage_flops())


def test_giant_split_is_by_cost_not_layer_count():
    split = split_stages(get_flavor("coca_giant"), 4)
    counts = [len(blocks) for blocks in split.blocks]
    assert sum(counts) == 40 and counts[-1] < counts[0]  # the last stage's text side counts as ViT blocks do
    assert split.balance() > 0.9
    assert "stage 3" in split.describe() and "text tower" in split.describe()


def test_override_is_taken_as_given():
    split = split_stages(get_flavor("coca_tiny"), 2, [1, 2])
    assert [list(b) for b in split.blocks] == [[0], [1, 2]]


@pytest.mark.parametrize("pp, micro, split, message", [
    (5, None, None, "more stages than ViT blocks"),
    (2, 1, None, "at least 2 micro-batches"),
    (2, None, [3], "must list 2 integers"),
    (2, None, [1, 1], "places 2 ViT blocks, the model has 3"),
    (3, None, [3, 0, 0], "leaves stage 1 empty"),
    (2, None, [4, -1], "leaves stage 1 empty"),
])
def test_layout_errors_are_one_line(pp, micro, split, message):
    with pytest.raises(ValueError, match=message) as error:
        check_pipeline(get_flavor("coca_tiny"), pp, micro, split)
    assert "\n" not in str(error.value)


def test_meta_giant_stages_hold_disjoint_parts_of_the_model():
    cfg = get_flavor("coca_giant")
    with torch.device("meta"):
        model = CoCa(cfg)
    total = {name: p.numel() for name, p in model.named_parameters()}
    split = split_stages(cfg, 4)
    seen: dict[str, int] = {}
    for stage in range(4):
        names = {name: p.numel() for name, p in PipelineStage(model, split, stage).named_parameters()}
        assert not seen.keys() & names.keys()
        seen.update(names)
        if stage < 3:
            assert all(name.startswith("vision.") for name in names)
    assert seen == total  # every parameter on exactly one stage, under its single-device name
