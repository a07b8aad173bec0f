"""The memory tracker of megacoca.profiling against exact byte counts: a plain torch model with AdamW, and a
2-rank DeepSpeed ZeRO-1 run whose optimizer state is read back from the engine's flat partitions."""

import torch

from megacoca.config.model import CoCaConfig
from megacoca.launch.ranks import run_ranks
from megacoca.profiling.measure import PRELOAD, build_measured_trainer, measure_step
from megacoca.profiling.memory_tracker import CATEGORIES, MemoryTracker

# A CoCa whose 2-rank ZeRO-1 step takes well under a second on CPU.
TINY = CoCaConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64,
                  caption_queries=8, pooler_heads=2, vocab_size=64, context_length=12, text_width=32, text_heads=2,
                  text_mlp_dim=64, text_layers=1, decoder_layers=1, embed_dim=32, kernels="torch")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_views_of_one_storage_count_once():
    tracker = MemoryTracker("cpu")
    with tracker:
        before = tracker.total
        flat = torch.empty(1000)
        views = [flat[:500], flat.view(10, 100), flat[::2]]
        assert tracker.total - before == 4000
        del flat
        assert tracker.total - before == 4000  # the views keep the storage alive
        del views
        assert tracker.total == before


def test_plain_torch_model_exact_categories(one_thread):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(512, 32)

    def step():
        loss = model(data).square().mean()
        tracker.phase = "backward"
        loss.backward()
        tracker.phase = "step"
        optimizer.step()
        tracker.phase = None

    tracker = MemoryTracker("cpu")
    step()  # untracked: AdamW's state exists from here on
    tracker.watch_module(model)
    tracker.watch_optimizer(optimizer)
    with tracker:
        tracker.phase = "forward"
        step()
        tracker.scan()
        steady = tracker.breakdown()
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values()]
    exact = {"params": _bytes(params), "grads": _bytes(p.grad for p in params), "optimizer": _bytes(state)}
    assert exact["optimizer"] == 2 * exact["params"] + 4 * len(params)  # exp_avg, exp_avg_sq, fp32 step counters
    assert {k: steady[k] for k in exact} == exact
    peak = tracker.breakdown(peak=True)
    assert sum(peak.values()) == tracker.peak_bytes and set(peak) == set(CATEGORIES)
    assert peak["params"] == exact["params"] and peak["optimizer"] == exact["optimizer"]
    assert 0 < peak["grads"] <= exact["grads"]
    assert peak["activations"] >= _bytes([data]) + 512 * 256 * 4  # the input and the first Linear's output
    assert tracker.peak_phase in ("forward", "backward")


def _zero1_rank(rank, world_size, run_dir):
    overrides = ["parallel.deepspeed_config=zero1_bf16", "schedule.global_batch_size=8",
                 "schedule.micro_batch_size=4"]
    trainer = build_measured_trainer(overrides, world_size, TINY, f"{run_dir}/rank{rank}")
    result = measure_step(trainer, steps=2)
    opt = trainer.optimizer
    master = opt.single_partition_of_fp32_groups
    steps = [s["step"] for s in opt.optimizer.state.values()]
    result["expected_optimizer"] = 3 * 4 * sum(p.numel() for p in master) + _bytes(steps)
    result["expected_params"] = _bytes(opt.bit16_groups_flat)
    trainer.close()
    return result


def test_zero1_optimizer_state_exact(tmp_path):
    results = run_ranks(_zero1_rank, 2, str(tmp_path), timeout=120, preload=PRELOAD)
    for result in results:
        for breakdown in (result["steady_bytes"], result["peak_by_category"]):
            assert breakdown["optimizer"] == result["expected_optimizer"], (breakdown, result["expected_optimizer"])
            assert breakdown["params"] == result["expected_params"]
        assert sum(result["peak_by_category"].values()) == result["peak_bytes"]
        assert result["peak_by_category"]["activations"] > 0
        assert result["step_time_s"] > 0
