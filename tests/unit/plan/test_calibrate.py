"""megacoca.profiling.calibrate and megacoca.plan.fit: a quick calibration on 2 CPU ranks gives a sane,
round-tripping profile with both precisions and every ZeRO stage measured on real DeepSpeed engines; the fits
recover known numbers."""

import os
import socket
import statistics
import time

import pytest
import torch

from megacoca.config.flavors import get_flavor
from megacoca.config.layout import Layout
from megacoca.plan.fit import ENGINE_CONFIGS, TYPICAL_TENSORS, block_work, build_profile, engine_stage, fit_engine
from megacoca.plan.least_squares import fit_line
from megacoca.plan.presets import get_profile
from megacoca.plan.profile import DeviceProfile, save_profile
from megacoca.plan.timing import predict_time
from megacoca.profiling.calibrate import calibrate, measure, measured_precisions, sizes_for
from megacoca.profiling.calibrate_rank import engine_config, engine_toys, toy_model

STAGES = {"0", "1", "2", "3", "3/fp32"}  # every ZeRO stage, and ZeRO-3 in fp32 measured on its own


# The tests on a real quick calibration (two ranks measuring this machine, ~12 s, and timing-sensitive under load):
# CI runs them (make test); the fits on recorded measurements below stay in `make test-fast`.
MEASURED = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_two_ranks():
    measurement = measure(ranks=2, precision="fp32", device="cpu", quick=True, timeout=120)
    return (measurement, *build_profile(measurement))


@MEASURED
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
    assert set(profile.micro_param_s) == STAGES and set(profile.step_param_s) == STAGES
    assert all(0 <= s < 1e-6 for s in [*profile.micro_param_s.values(), *profile.step_param_s.values()])
    assert profile.overlap == 0.0 and profile.collective_ranks == 2  # CPU ranks: collectives hide behind nothing
    # each precision's blocks: overhead + work / rate per kind, least squares over the shapes measured; on a quick,
    # noisy calibration each shape's fit within a factor 2 of its time
    for precision in ("fp32", "bf16"):
        overhead, rates = fits["block_fit"][precision]
        assert profile.block_rates[precision] == rates and profile.block_overhead_s[precision] == overhead
        assert rates and set(rates) <= {"flops", "elementwise", "attention", "attention_rows"}
        # no faster than its matmuls: capped at the fastest width's rate
        assert 0 < rates["flops"] <= max(fits["matmul_per_width"][precision].values()) * (1 + 1e-9)
        for work, seconds in zip(fits["block_works"], fits["block_seconds"][precision]):
            predicted = overhead + sum(work[kind] / rate for kind, rate in rates.items())
            assert seconds / 2 < predicted < 2 * seconds, (precision, work, seconds, predicted)


@MEASURED
def test_zero3_pays_more_per_tensor_than_zero1(quick_two_ranks):
    """ZeRO-3 gathers and releases every module's parameters in forward and backward, with a collective each;
    ZeRO-1 only hooks the gradients (and reduces them at the step's last micro-batch, counted in the step)."""
    _, profile, fits = quick_two_ranks
    assert profile.tensor_overhead(3) > profile.tensor_overhead(1), profile.source
    assert fits["engines"][3].micro[1] > fits["engines"][1].micro[1]


@MEASURED
def test_calibrated_profile_plans_both_precisions(quick_two_ranks):
    _, profile, _ = quick_two_ranks
    cfg = get_flavor("coca_tiny")
    for precision in ("fp32", "bf16"):
        for zero in range(4):
            step = predict_time(cfg, Layout(dp=2, zero_stage=zero, micro_batch=4, grad_accum=2, precision=precision),
                                profile)
            assert 0 < step.seconds < 60
            # the engine costs of this precision: ZeRO-3 in fp32 has its own ("3/fp32"), what predict_time reads
            assert step.parts["optimizer step"] >= profile.step_overhead(zero, precision)


@MEASURED
def test_profile_json_round_trip(quick_two_ranks, tmp_path):
    _, profile, _ = quick_two_ranks
    assert DeviceProfile.from_json(profile.to_json()) == profile
    path = tmp_path / "profiles" / "cpu.json"
    save_profile(profile, str(path))
    assert get_profile(str(path)) == profile


@MEASURED
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


def test_block_work_counts_as_the_time_model_does():
    """The calibration's block is one ViT block of the time model (megacoca.plan.timing.stage_work) at tp 1."""
    from megacoca.plan.timing import stage_work

    cfg = get_flavor("coca_tiny", vision_mlp_dim=4 * 128)
    one_block = stage_work(cfg, 1, False)
    work = block_work(1, cfg.image_tokens, cfg.vision_width, cfg.vision_heads)
    assert work["flops"] == pytest.approx(one_block.flops, rel=1e-12)
    assert work["elementwise"] == pytest.approx(one_block.elementwise, rel=1e-12)
    assert work["attention"] == pytest.approx(one_block.attention, rel=1e-12)
    assert work["attention_rows"] == pytest.approx(one_block.attention_rows, rel=1e-12)


def test_fit_line_and_engine_fit_recover_known_numbers():
    tensors = [32, 64, 128, 192]
    assert fit_line(tensors, [0.001 + 2e-5 * n for n in tensors]) == (pytest.approx(0.001, rel=1e-9),
                                                                       pytest.approx(2e-5, rel=1e-9))
    with pytest.raises(ValueError, match="at least two"):
        fit_line([32], [0.001])
    micro = [3e-3 + 150e-6 * n for n in tensors]
    baseline = [1e-4 + 10e-6 * n for n in tensors]
    step = [4e-3 + 30e-6 * n for n in tensors]
    fit = fit_engine(tensors, micro, step, baseline, extra_params=1e6, extra_micro=2e-3, extra_partition=5e5,
                     extra_step=5e-3, partition_per_tensor=140)
    assert fit.micro == (pytest.approx(3e-3, rel=1e-9), pytest.approx(150e-6, rel=1e-9))
    assert fit.baseline[1] == pytest.approx(10e-6, rel=1e-9)
    assert fit.tensor_overhead == pytest.approx(140e-6, rel=1e-9)
    assert fit.step_at_typical == pytest.approx(4e-3 + 30e-6 * TYPICAL_TENSORS, rel=1e-9)
    assert fit.micro_param == pytest.approx(2e-9) and fit.step_param == pytest.approx(1e-8)
    assert fit.step_overhead == pytest.approx(fit.step_at_typical - 1e-8 * 140 * TYPICAL_TENSORS, rel=1e-9)
    # DeepSpeed adding less per tensor or per parameter than plain torch (noise) is no overhead
    cheap = fit_engine(tensors, baseline, [1e-6] * 3 + [2e-6], micro, extra_params=1e6, extra_micro=-1e-3,
                       extra_partition=5e5, extra_step=-1e-3, partition_per_tensor=140)
    assert cheap.tensor_overhead == 0.0 and cheap.micro_param == 0.0 and cheap.step_param == 0.0
    assert cheap.step_overhead >= 0.0


def test_engine_toys_share_a_tensor_count_and_differ_in_parameters():
    for device in ("cpu", "cuda"):
        sizes = sizes_for(device, quick=False)
        toys = engine_toys(sizes)
        narrow, wide = toys[0], toys[-1]
        assert narrow[1] == wide[1] and wide[0] >= 8 * narrow[0]
        params = [sum(p.numel() for p in toy_model(*toy).parameters()) for toy in (narrow, wide)]
        assert params[1] > 100 * params[0]


def test_engines_train_as_megacoca_does():
    sizes = sizes_for("cpu", quick=True)
    assert {str(key) for key in ENGINE_CONFIGS} == {"0", "1", "2", "3", "3/fp32"}  # ZeRO-3 in both precisions
    for key, (name, precision) in ENGINE_CONFIGS.items():
        stage = engine_stage(key)
        ds = engine_config(key, sizes, dp=2)
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


def test_bad_arguments_are_refused_before_any_rank_starts():
    with pytest.raises(ValueError, match="precision"):
        calibrate(precision="int8", device="cpu")
    with pytest.raises(ValueError, match="ranks"):
        calibrate(ranks=0, device="cpu")
    with pytest.raises(ValueError, match="device"):
        calibrate(device="tpu")
