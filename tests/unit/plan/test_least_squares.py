"""megacoca.plan.least_squares: each fit recovers known numbers from exact made-up times, refuses what it cannot
fit, and keeps its bounds (coefficients >= 0, capped rates)."""

import pytest

from megacoca.plan.least_squares import fit_rates, fit_residuals, fit_ring


def test_fit_rates_recovers_known_numbers():
    """Three kinds of work at known rates plus a per-call overhead come back from exact times; a kind that costs
    nothing gets no rate (not a negative or infinite one); times that do not grow with the work are refused."""
    works = [{"flops": f, "elementwise": e, "attention": a}
             for f, e, a in [(1e8, 1e6, 1e4), (2e8, 1e6, 3e4), (4e8, 3e6, 1e4), (8e8, 2e6, 5e4), (3e8, 6e6, 2e4)]]
    rates = {"flops": 1e10, "elementwise": 1e9, "attention": 1e7}
    seconds = [2e-4 + sum(w[k] / r for k, r in rates.items()) for w in works]
    overhead, fitted = fit_rates(works, seconds)
    assert overhead == pytest.approx(2e-4, rel=1e-6)
    assert fitted == {k: pytest.approx(r, rel=1e-6) for k, r in rates.items()}
    free_attention = [2e-4 + w["flops"] / 1e10 + w["elementwise"] / 1e9 for w in works]
    overhead, fitted = fit_rates(works, free_attention)
    assert set(fitted) == {"flops", "elementwise"} and overhead == pytest.approx(2e-4, rel=1e-6)
    with pytest.raises(ValueError, match="times > 0"):
        fit_rates(works, [0.0] + seconds[1:])
    with pytest.raises(ValueError, match="as many"):
        fit_rates(works, seconds[:2])


def test_fit_rates_keeps_a_capped_kind_at_or_below_its_cap():
    """A block's FLOPs run no faster than plain matmuls: with a cap, a kind's rate never exceeds it, and it is never
    left out (its time handed to a correlated kind), whatever the times say; a cap above the true rate changes
    nothing. CI's quick calibration once fitted a block FLOP rate of 1.9x the matmul rate on noisy times."""
    works = [{"flops": f, "elementwise": e}
             for f, e in [(1e8, 1e6), (2e8, 2.2e6), (4e8, 3.9e6), (8e8, 8.4e6), (3e8, 2.8e6)]]
    truth = [2e-4 + w["flops"] / 1e10 + w["elementwise"] / 1e9 for w in works]
    overhead, fitted = fit_rates(works, truth, max_rates={"flops": 3e10})
    assert overhead == pytest.approx(2e-4, rel=1e-6)
    assert fitted == {"flops": pytest.approx(1e10, rel=1e-6), "elementwise": pytest.approx(1e9, rel=1e-6)}
    fast = [2e-4 + w["flops"] / 2e10 + w["elementwise"] / 1e9 for w in works]  # FLOPs faster than the cap allows
    assert fit_rates(works, fast)[1]["flops"] == pytest.approx(2e10, rel=1e-6)
    overhead, fitted = fit_rates(works, fast, max_rates={"flops": 1e10})
    assert fitted["flops"] == pytest.approx(1e10, rel=1e-9)
    no_flops = [2e-4 + w["elementwise"] / 1e9 for w in works]
    assert "flops" not in fit_rates(works, no_flops)[1]
    assert fit_rates(works, no_flops, max_rates={"flops": 1e10})[1]["flops"] == pytest.approx(1e10, rel=1e-9)
    with pytest.raises(ValueError, match="max_rates"):
        fit_rates(works, truth, max_rates={"attention": 1e10})
    with pytest.raises(ValueError, match="max_rates"):
        fit_rates(works, truth, max_rates={"flops": 0.0})


def test_fit_residuals_recovers_step_micro_and_sample_parts():
    def residual(b, a):
        return 0.01 + a * (0.02 + b * 0.003)

    points = {(b, a): residual(b, a) for b, a in ((4, 1), (4, 3), (8, 1))}
    assert fit_residuals(points) == (pytest.approx(0.01), pytest.approx(0.02), pytest.approx(0.003))
    # a per-sample part below zero (noise) is floored, the others refitted from the same points
    points[(8, 1)] = residual(4, 1) - 0.001
    step, micro, sample = fit_residuals(points)
    assert sample == 0.0 and step >= 0 and micro >= 0


def test_fit_ring_recovers_known_numbers():
    nbytes = [4096 * 4 ** i for i in range(8)]
    seconds = [50e-6 + 2 * 3 / 4 * n / 2e9 for n in nbytes]
    latency, busbw, residual = fit_ring(nbytes, seconds, ranks=4)
    assert latency == pytest.approx(50e-6, rel=1e-6) and busbw == pytest.approx(2e9, rel=1e-6)
    assert residual < 1e-9
    with pytest.raises(ValueError, match="at least 2 ranks"):
        fit_ring(nbytes, seconds, ranks=1)
