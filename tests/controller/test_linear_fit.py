"""Non-negative weighted least squares over the normal equations (controller/linear_fit.py)."""

import itertools
import random

import pytest

from controller.linear_fit import LinearFit


def test_an_exact_line_is_found_whatever_the_scales():
    fit = LinearFit(3, prefer=(0, 1, 2))
    assert fit.coefficients() is None
    for x1, x2 in itertools.product((1, 4, 16), (1e3, 5e4, 2e5)):  # batch sizes and KV tokens
        fit = fit.add((x1, x2), 0.003 + 0.002 * x1 + 4e-7 * x2)
    assert fit.coefficients() == pytest.approx((0.003, 0.002, 4e-7), rel=1e-6)


def test_no_coefficient_goes_below_zero_and_the_best_feasible_fit_is_kept():
    """A line through these would have a negative intercept; the best fit with none is through the origin, whose
    slope is least squares through the origin (not the line's slope)."""
    fit = LinearFit(2, prefer=(0, 1), smoothing=0.0)
    points = [(1, 0.001), (2, 0.001), (10, 0.2), (12, 0.25)]
    for x, y in points:
        fit = fit.add((x,), y)
    slope = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    assert fit.coefficients() == pytest.approx((0.0, slope), rel=1e-9)


def test_points_that_cannot_tell_terms_apart_keep_the_fewer_and_the_preferred():
    flat = LinearFit(2, prefer=(0, 1))
    proportional = LinearFit(2, prefer=(1, 0))
    for _ in range(3):
        flat, proportional = flat.add((4.0,), 2.0), proportional.add((4.0,), 2.0)
    assert flat.coefficients() == pytest.approx((2.0, 0.0))
    assert proportional.coefficients() == pytest.approx((0.0, 0.5))


def test_it_is_the_least_squares_optimum_among_non_negative_coefficients():
    """Against a brute-force search over a grid: nothing non-negative fits the noisy points better."""
    rng = random.Random(0)
    fit = LinearFit(3, prefer=(0, 1, 2), smoothing=0.0)
    points = []
    for _ in range(30):
        x1, x2 = rng.uniform(1, 32), rng.uniform(100, 5000)
        y = 0.01 + 0.001 * x1 + rng.gauss(0, 0.005)  # no KV term in the truth; noise may suggest a negative one
        points.append((x1, x2, y))
        fit = fit.add((x1, x2), y)
    c = fit.coefficients()
    assert all(v >= 0 for v in c)

    def sse(a, b, k):
        return sum((y - a - b * x1 - k * x2) ** 2 for x1, x2, y in points)

    best = sse(*c)
    for a, b, k in itertools.product(*(sorted({max(0.0, v * f) for f in (0.0, 0.9, 0.99, 1.0, 1.01, 1.1)} | {v + 1e-4})
                                       for v in c)):
        assert sse(a, b, k) >= best - 1e-12


def test_older_points_fade():
    fit = LinearFit(2, prefer=(0, 1), smoothing=0.5)
    for _ in range(5):
        fit = fit.add((1.0,), 10.0)
    for _ in range(30):
        fit = fit.add((1.0,), 1.0)
    assert fit.coefficients()[0] == pytest.approx(1.0, rel=1e-6)


def test_the_number_of_xs_is_checked():
    with pytest.raises(ValueError, match="expected 2 xs"):
        LinearFit(3, prefer=(0, 1, 2)).add((1.0,), 1.0)
