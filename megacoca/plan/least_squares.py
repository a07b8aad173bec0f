"""The least-squares fits a calibration's measurements go through (megacoca.plan.fit): pure functions of numbers,
tested on made-up ones (tests/unit/plan/test_least_squares.py). A line, a ring all-reduce's latency and bandwidth,
time as an overhead plus work over a rate per kind of work (with optional caps), and a step's residual parts."""

from __future__ import annotations

import itertools
import statistics

import numpy as np


def _weighted_line(x: list[float], y: list[float], w: list[float]) -> tuple[float, float]:
    """Weighted least squares y = a + b x: (a, b)."""
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    if sxx <= 0:
        raise ValueError("a line through points that all have the same x")
    b = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y)) / sxx
    return my - b * mx, b


def fit_ring(nbytes: list[float], seconds: list[float], ranks: int) -> tuple[float, float, float]:
    """Fit all-reduce times to a ring, time = latency + 2 (n-1)/n bytes / busbw: (latency >= 0, busbw, residual).

    Relative residuals are minimised (weights 1/time^2), so that microsecond calls at 4 KB weigh as much as the
    tens of milliseconds at 64 MB; `residual` is the largest |fit - time| / time.
    """
    if ranks < 2:
        raise ValueError("a ring all-reduce needs at least 2 ranks")
    x = [2 * (ranks - 1) / ranks * b for b in nbytes]
    weights = [1.0 / s ** 2 for s in seconds]
    latency, slope = _weighted_line(x, seconds, weights)
    if latency < 0:
        latency = 0.0
        slope = (sum(w * xi * s for w, xi, s in zip(weights, x, seconds))
                 / sum(w * xi * xi for w, xi in zip(weights, x)))
    if slope <= 0:
        raise ValueError(f"all-reduce time does not grow with its size ({list(zip(nbytes, seconds))})")
    residual = max(abs(latency + slope * xi - s) / s for xi, s in zip(x, seconds))
    return latency, 1.0 / slope, residual


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("a line needs as many y as x, at least two")
    return _weighted_line(x, y, [1.0] * len(x))


def fit_rates(works: list[dict[str, float]], seconds: list[float],
              max_rates: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """Fit seconds = overhead + sum over kinds of work[kind] / rate[kind] with every coefficient >= 0, minimising
    relative residuals (each point counts alike, whatever its size): (overhead, {kind: rate}); a kind whose best
    coefficient is 0 (its cost hides in the others at these shapes) gets no rate. `max_rates` caps a kind's rate (a
    block's FLOPs run no faster than the fastest plain matmul measured): such a kind always gets a rate, at most its
    cap, so that noise cannot hand its time to a correlated kind. Exhaustive over the active sets of the (at most
    four) terms: each term left out (coefficient 0) or held at its cap, the rest solved; the best fit whose
    coefficients all keep their bounds."""
    if len(works) != len(seconds) or not works:
        raise ValueError("fit_rates needs as many times as work counts, at least one")
    if min(seconds) <= 0:
        raise ValueError(f"fit_rates needs times > 0 (relative residuals), got {seconds}")
    kinds = list(works[0])
    caps = dict(max_rates or {})
    if set(caps) - set(kinds) or any(not rate > 0 for rate in caps.values()):
        raise ValueError(f"fit_rates: max_rates {caps} must be rates > 0 of kinds among {kinds}")
    y = np.asarray(seconds, dtype=float)
    # each column over its point's time: the residuals are relative
    columns = {c: np.asarray(v, dtype=float) / y
               for c, v in {"overhead": [1.0] * len(works), **{k: [w[k] for w in works] for k in kinds}}.items()}
    floors = {k: 1.0 / rate for k, rate in caps.items()}  # the least seconds per unit of a capped kind
    optional = [c for c in columns if c not in floors]
    best = None
    for size in range(len(optional) + 1):
        for subset in itertools.combinations(optional, size):
            for held_count in range(len(floors) + 1):
                for held in itertools.combinations(floors, held_count):
                    free = [*subset, *(k for k in floors if k not in held)]
                    target = np.ones_like(y) - sum((columns[k] * floors[k] for k in held), np.zeros_like(y))
                    coef = {k: floors[k] for k in held}
                    if free:
                        a = np.stack([columns[c] for c in free], axis=1)
                        solved, *_ = np.linalg.lstsq(a, target, rcond=None)
                        coef |= dict(zip(free, solved))
                    elif not held:
                        continue
                    if any(coef[c] <= 0 for c in subset) or any(coef[k] < floors[k] for k in floors):
                        continue
                    error = float(((sum(columns[c] * v for c, v in coef.items()) - 1) ** 2).sum())
                    if best is None or error < best[0] - 1e-12:
                        best = (error, coef)
    if best is None:
        raise ValueError(f"times do not grow with the work ({list(zip(works, seconds))}): no rate to fit")
    coef = best[1]
    return float(coef.get("overhead", 0.0)), {k: 1.0 / coef[k] for k in kinds if k in coef}


def fit_residuals(points: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """Residual step times at (micro-batch b, accumulation a) -> (per step, per micro-batch, per sample), from
    r(b, a) = step + a (micro + b sample) through three points (b1, 1), (b1, a2), (b2, 1); a negative per-sample
    or per-step part (noise) is floored at 0 and the others refitted."""
    b1, b2 = min(b for b, _ in points), max(b for b, _ in points)
    a2 = max(a for _, a in points)
    r11, r12, r21 = points[(b1, 1)], points[(b1, a2)], points[(b2, 1)]
    at_b1 = (r12 - r11) / (a2 - 1)  # micro + b1 sample
    step = r11 - at_b1
    sample = (r21 - step - at_b1) / (b2 - b1)
    if sample < 0:
        sample = 0.0
    micro = at_b1 - b1 * sample
    if step < 0:
        step, micro = 0.0, statistics.fmean((r - a * b * sample) / a for (b, a), r in points.items())
    return step, max(micro, 0.0), sample
