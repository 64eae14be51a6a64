"""FVD statistics: streaming float64 mean/covariance, exact merge, and the Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from i3d.fvd.frechet import TFGAN_ROOT_FLOOR, frechet_distance, psd_sqrt, trace_sqrt_product
from i3d.fvd.stats import ActivationStats


def _scipy_fvd(m1, s1, m2, s2) -> float:
    """StyleGAN-V / cd-fvd / common_metrics' formula: scipy sqrtm of the product, real part."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    diff = m1 - m2
    return float(np.real(diff @ diff + np.trace(s1 + s2 - 2 * root)))


def _well_conditioned(rng, dim, n):
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim)
    return rng.normal(size=(n, dim)) @ mix + rng.normal(size=dim)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streaming_stats_equal_numpy(offset):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(257, 12)) * rng.uniform(0.1, 10, size=12) + offset
    stats = ActivationStats(12)
    start = 0
    for size in (1, 5, 0, 100, 13, 138):  # uneven batches, one empty
        stats.add(x[start : start + size])
        start += size
    assert start == len(x) and stats.count == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12 * (1 + offset))
    for ddof in (0, 1):
        want = np.cov(x, rowvar=False, ddof=ddof)
        np.testing.assert_allclose(stats.covariance(ddof), want, rtol=1e-10, atol=1e-10)


def test_merge_is_exact_and_order_free_up_to_rounding():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(90, 6)) + 3.0
    a, b, whole = ActivationStats(6), ActivationStats(6), ActivationStats(6)
    a.add(x[:37])
    b.add(x[37:])
    whole.add(x)
    merged = a.merge(b)
    assert merged.count == 90 and a.count == 37  # merge leaves its inputs alone
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.covariance(), np.cov(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(b.merge(a).m2, merged.m2, rtol=1e-12)
    assert ActivationStats(6).merge(a).count == 37  # merging an empty accumulator


def test_stats_refuse_bad_input():
    stats = ActivationStats(3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        stats.add(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        stats.add(np.array([[0.0, np.nan, 1.0]]))
    stats.add(np.ones(3))
    with pytest.raises(ValueError, match="at least 2 videos"):
        stats.covariance(1)
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        ActivationStats.from_parts(2, np.zeros(3), np.zeros((3, 2)))


def test_trace_sqrt_product_by_hand():
    # commuting diagonal matrices: sqrt(diag(1*4, 4*1, 9*0)) has trace 2 + 2 + 0
    assert trace_sqrt_product(np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 0.0])) == pytest.approx(
        4.0, abs=1e-12
    )
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])
    s = rot @ np.diag([9.0, 1.0]) @ rot.T
    np.testing.assert_allclose(psd_sqrt(s), rot @ np.diag([3.0, 1.0]) @ rot.T, atol=1e-12)
    # |m1 - m2|^2 = 25; tr = 2 + 8 - 2 * (sqrt(1*4) + sqrt(1*4)) = 2
    value = frechet_distance(np.zeros(2), np.eye(2), np.array([3.0, 4.0]), 4 * np.eye(2))
    assert value == pytest.approx(25.0 + 2.0, abs=1e-12)


def test_tfgan_root_floor_by_hand():
    # eigenvalue 1e-12 < 1e-10: TF-GAN's SVD square root leaves it as is, so sqrt(C1) =
    # diag(1, 1e-12), A C2 A = diag(1, 1e-36) and its "root" again diag(1, 1e-36)
    cov = np.diag([1.0, 1e-12])
    assert trace_sqrt_product(cov, cov, TFGAN_ROOT_FLOOR) == pytest.approx(1.0 + 1e-36, abs=0)
    assert trace_sqrt_product(cov, cov) == pytest.approx(1.0 + 1e-12, rel=1e-15)
    m, m2 = np.zeros(2), np.array([1e-3, 0.0])  # (identical statistics are exactly 0)
    tfgan = frechet_distance(m, cov, m2, cov, TFGAN_ROOT_FLOOR) - 1e-6
    assert tfgan == pytest.approx(2e-12, rel=1e-3)  # tr(2C) - 2 (1 + 1e-36)
    assert frechet_distance(m, cov, m2, cov) - 1e-6 == pytest.approx(0.0, abs=1e-15)
    # a round-off negative eigenvalue: kept (not rooted) below the floor, sign-rooted above
    s = np.diag([4.0, -1e-14, -1e-8])
    np.testing.assert_allclose(
        np.diag(psd_sqrt(s, TFGAN_ROOT_FLOOR)), [2.0, -1e-14, -1e-4], rtol=1e-12
    )
    np.testing.assert_allclose(np.diag(psd_sqrt(s)), [2.0, 0.0, 0.0], atol=1e-15)


@pytest.mark.parametrize(("dim", "n"), [(4, 50), (16, 200), (64, 1000)])
def test_frechet_equals_scipy_on_well_conditioned(dim, n):
    rng = np.random.default_rng(dim)
    a, b = _well_conditioned(rng, dim, n), _well_conditioned(rng, dim, n)
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    ours, theirs = frechet_distance(*args), _scipy_fvd(*args)
    assert ours == pytest.approx(theirs, rel=1e-8)


def test_frechet_finite_and_non_negative_when_ill_conditioned():
    rng = np.random.default_rng(5)
    dim = 400
    cases = []
    for n in (2, 5, 50, 399):  # fewer videos than dimensions: singular covariances
        a, b = rng.normal(size=(n, dim)) * 30, rng.normal(size=(n, dim)) * 30 + 0.1
        cases.append((a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
    zero = np.zeros((dim, dim))
    cases.append((np.zeros(dim), zero, np.ones(dim), zero))  # all videos identical
    scales = np.diag(np.logspace(-12, 6, dim))  # condition number 1e18
    cases.append((np.zeros(dim), scales, np.zeros(dim), scales[::-1, ::-1].copy()))
    for case in cases:
        for floor in (0.0, TFGAN_ROOT_FLOOR):
            value = frechet_distance(*case, floor)
            assert np.isfinite(value) and value >= 0.0
    assert frechet_distance(*cases[4]) == pytest.approx(dim, rel=1e-12)  # |m1 - m2|^2 only


@pytest.mark.parametrize("floor", [0.0, TFGAN_ROOT_FLOOR])
def test_identical_sets_give_zero(floor):
    rng = np.random.default_rng(6)
    for n in (3, 401, 2000):
        a = rng.normal(size=(n, 400)) * 10
        m, s = a.mean(0), np.cov(a, rowvar=False)
        assert frechet_distance(m, s, m, s, floor) == 0.0
        assert frechet_distance(m, s.copy(), m.copy(), s, floor) == 0.0  # equal, not the same
        # one value apart: a real (tiny) distance, not the shortcut
        moved = m.copy()
        moved[0] += 1e-3
        assert frechet_distance(moved, s, m, s, floor) >= 0.0
        assert frechet_distance(moved, s, m, s, 0.0) == pytest.approx(1e-6, abs=2e-3)


def test_frechet_refuses_bad_shapes():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
