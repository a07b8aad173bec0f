"""megacoca.plan.calibrate: a quick calibration on 2 CPU ranks gives a sane, round-tripping profile with both
precisions and every ZeRO stage measured on real DeepSpeed engines; the fits recover known numbers."""

import os
import socket
import statistics
import time

import pytest
import torch

from megacoca.config.flavors import get_flavor
from megacoca.metrics.flops import forward_flops_breakdown
from megacoca.plan.calibrate import (ENGINE_CONFIGS, TYPICAL_TENSORS, block_train_flops, build_profile, calibrate,
                                     engine_config, fit_engine, fit_line, fit_overhead, fit_ring, measure,
                                     measured_precisions, save_profile, sizes_for, toy_model)
from megacoca.plan.memory import Layout
from megacoca.plan.profile import DeviceProfile, get_profile
from megacoca.plan.timing import predict_time

STAGES = {"0", "1", "2", "3"}


@pytest.fixture(scope="module")
def quick_two_ranks():
    measurement = measure(ranks=2, precision="fp32", device="cpu", quick=True, timeout=120)
    return (measurement, *build_profile(measurement))


def test_quick_calibration_is_sane(quick_two_ranks):
    measurement, profile, fits = quick_two_ranks
    assert measurement.seconds < 30
    assert measurement.precisions == ("fp32", "bf16")  # both, although fp32 was asked for
    assert set(profile.matmul_flops) == {"fp32", "bf16"}
    assert all(1e8 < rate < 1e13 for rate in profile.matmul_flops.values())
    assert profile.peak_flops == profile.matmul_flops  # a CPU: no datasheet figure
    assert set(profile.block_overhead_s) == {"fp32", "bf16"}
    assert all(0 <= s < 0.5 for s in profile.block_overhead_s.values())
    assert set(profile.tensor_overhead_s) == STAGES and set(profile.step_overhead_s) == STAGES
    assert all(0 <= s < 0.01 for s in profile.tensor_overhead_s.values())
    assert all(0 <= s < 0.5 for s in profile.step_overhead_s.values())
    assert 1e6 < profile.intra_node_bw < 1e12 and profile.inter_node_bw == profile.intra_node_bw
    assert 0 <= profile.collective_latency_s < 0.05
    assert 1e8 < profile.memory_bw < 1e13
    host_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert profile.memory_bytes == pytest.approx(host_ram / 2)
    assert profile.gpus_per_node == 2
    # every size within 2.5x of the ring fit: on a busy 2-core machine a 4 KB gloo all-reduce takes 0.3-3 ms from
    # one run to the next (a rank waits for a core), so the fit is loose at the small sizes
    assert fits["allreduce_residual"] < 1.5
    for text in (socket.gethostname(), torch.__version__, "2 CPU rank(s)", "inter-node bandwidth NOT measured",
                 "no datasheet peak", "DeepSpeed engines on 2 processes (gloo)", "zero3_bf16"):
        assert text in profile.source
    # each precision's block: the free fit (intercept + FLOPs / a block rate), least squares over the batches
    # measured: its residuals sum to zero when the intercept is not floored
    for precision in ("fp32", "bf16"):
        rate, overhead = profile.block_flops[precision], profile.block_overhead_s[precision]
        predicted = [overhead + f / rate for f in fits["block_flops"]]
        if overhead > 0:
            assert statistics.fmean(predicted) == pytest.approx(statistics.fmean(fits["block_seconds"][precision]),
                                                                rel=1e-6)
        assert rate <= 1.5 * profile.matmul_flops[precision]  # a block is no faster than its matmuls


def test_zero3_pays_more_per_tensor_than_zero1(quick_two_ranks):
    """ZeRO-3 gathers and releases every module's parameters in forward and backward, with a collective each;
    ZeRO-1 only hooks the gradients (and reduces them at the step's last micro-batch, counted in the step)."""
    _, profile, fits = quick_two_ranks
    assert profile.tensor_overhead(3) > profile.tensor_overhead(1), profile.source
    assert fits["engines"][3].micro[1] > fits["engines"][1].micro[1]


def test_calibrated_profile_plans_both_precisions(quick_two_ranks):
    _, profile, _ = quick_two_ranks
    cfg = get_flavor("coca_tiny")
    for precision in ("fp32", "bf16"):
        for zero in range(4):
            step = predict_time(cfg, Layout(dp=2, zero=zero, micro_batch=4, grad_accum=2, precision=precision),
                                profile)
            assert 0 < step.seconds < 60
            assert step.parts["optimizer step"] >= profile.step_overhead(zero)


def test_profile_json_round_trip(quick_two_ranks, tmp_path):
    _, profile, _ = quick_two_ranks
    assert DeviceProfile.from_json(profile.to_json()) == profile
    path = tmp_path / "profiles" / "cpu.json"
    save_profile(profile, str(path))
    assert get_profile(str(path)) == profile


def test_matmul_rate_matches_a_direct_timing(quick_two_ranks, one_thread):
    _, profile, _ = quick_two_ranks
    a, b = torch.randn(2048, 512), torch.randn(512, 2048)
    a @ b
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    direct = 2 * 2048 * 512 * 2048 / statistics.median(times)
    assert direct / 3 < profile.matmul_flops["fp32"] < 3 * direct


def test_fit_overhead_recovers_known_numbers():
    flops = [1e8, 2e8, 4e8, 8e8]
    seconds = [0.002 + f / 1e10 for f in flops]
    overhead, rate = fit_overhead(flops, seconds)
    assert overhead == pytest.approx(0.002, rel=1e-9) and rate == pytest.approx(1e10, rel=1e-9)
    assert fit_overhead(flops, seconds, rate=1e10) == (pytest.approx(0.002, rel=1e-9), 1e10)
    # a negative intercept is reported as none, the rate refitted through the origin
    overhead, rate = fit_overhead(flops, [f / 1e10 - 0.001 for f in flops])
    assert overhead == 0.0 and rate > 1e10
    assert fit_overhead(flops, seconds, rate=1e9)[0] == 0.0


def test_fit_ring_recovers_known_numbers():
    nbytes = [4096 * 4 ** i for i in range(8)]
    seconds = [50e-6 + 2 * 3 / 4 * n / 2e9 for n in nbytes]
    latency, busbw, residual = fit_ring(nbytes, seconds, ranks=4)
    assert latency == pytest.approx(50e-6, rel=1e-6) and busbw == pytest.approx(2e9, rel=1e-6)
    assert residual < 1e-9
    with pytest.raises(ValueError, match="at least 2 ranks"):
        fit_ring(nbytes, seconds, ranks=1)


def test_fit_line_and_engine_fit_recover_known_numbers():
    tensors = [32, 64, 128, 192]
    assert fit_line(tensors, [0.001 + 2e-5 * n for n in tensors]) == (pytest.approx(0.001, rel=1e-9),
                                                                       pytest.approx(2e-5, rel=1e-9))
    with pytest.raises(ValueError, match="at least two"):
        fit_line([32], [0.001])
    micro = [3e-3 + 150e-6 * n for n in tensors]
    baseline = [1e-4 + 10e-6 * n for n in tensors]
    step = [4e-3 + 30e-6 * n for n in tensors]
    fit = fit_engine(tensors, micro, step, baseline, params_per_tensor=280, memory_bw=1e10)
    assert fit.micro == (pytest.approx(3e-3, rel=1e-9), pytest.approx(150e-6, rel=1e-9))
    assert fit.baseline[1] == pytest.approx(10e-6, rel=1e-9)
    assert fit.tensor_overhead == pytest.approx(140e-6, rel=1e-9)
    assert fit.step_at_typical == pytest.approx(4e-3 + 30e-6 * TYPICAL_TENSORS, rel=1e-9)
    assert fit.stream == pytest.approx(32 * 280 * TYPICAL_TENSORS / 1e10, rel=1e-9)
    assert fit.step_overhead == pytest.approx(fit.step_at_typical - fit.stream, rel=1e-9)
    # DeepSpeed adding less per tensor than plain torch (noise) is no overhead; nor a step the stream explains
    cheap = fit_engine(tensors, baseline, [1e-6] * 3 + [2e-6], micro, params_per_tensor=280, memory_bw=1e10)
    assert cheap.tensor_overhead == 0.0 and cheap.step_overhead == 0.0


def test_engines_train_as_megacoca_does():
    sizes = sizes_for("cpu", quick=True)
    for stage, (name, precision) in ENGINE_CONFIGS.items():
        ds = engine_config(stage, sizes, dp=2)
        assert name == f"zero{stage}_{precision}" and ds["zero_optimization"]["stage"] == stage
        assert ds["bf16"]["enabled"] == (precision == "bf16")
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
        assert ds["gradient_accumulation_steps"] >= 2  # a micro-batch that is not the step's last, to time
    assert engine_config(3, sizes, dp=2)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    model = toy_model(32, 8)
    assert len(list(model.parameters())) == 32 and sum(p.numel() for p in model.parameters()) == 8 * (32 * 32 + 96)


def test_both_precisions_are_measured_whatever_is_asked():
    assert measured_precisions("fp32") == measured_precisions("bf16") == ("fp32", "bf16")
    assert measured_precisions("fp16") == ("fp32", "bf16", "fp16")


def test_block_flops_count_as_the_model_does():
    cfg = get_flavor("coca_tiny")
    parts = forward_flops_breakdown(cfg)
    patch_embed = 2 * cfg.num_patches * cfg.in_channels * cfg.patch_size ** 2 * cfg.vision_width
    per_layer = (parts["vision"] - patch_embed + parts["vision_attention"]) / cfg.vision_layers
    assert block_train_flops(1, cfg.image_tokens, cfg.vision_width, cfg.vision_mlp_dim) == 3 * per_layer


def test_bad_arguments_are_refused_before_any_rank_starts():
    with pytest.raises(ValueError, match="precision"):
        calibrate(precision="int8", device="cpu")
    with pytest.raises(ValueError, match="ranks"):
        calibrate(ranks=0, device="cpu")
    with pytest.raises(ValueError, match="device"):
        calibrate(device="tpu")
