"""The paper's noisy-quadratic result, reproduced with the real optimizer (Proposition 1)."""

import pytest

from benchmarks.nqm import closed_form_ratio, measure_variance, sgd_variance_closed_form


def test_closed_form_example_from_the_paper_summary():
    assert closed_form_ratio(0.5, 1.0, 5, 0.5) == pytest.approx(0.34, abs=0.005)
    assert closed_form_ratio(0.5, 1.0, 5, 1.0) == 1.0


@pytest.mark.parametrize("gamma,a,k,alpha", [(0.5, 1.0, 5, 0.5), (0.1, 1.0, 10, 0.8)])
def test_lookahead_variance_ratio_matches_closed_form(gamma, a, k, alpha):
    kw = dict(coords=20_000, samples=100, burn_in_syncs=30, seed=1)
    v_sgd = measure_variance(gamma, a, k, None, **kw)
    v_la = measure_variance(gamma, a, k, alpha, **kw)
    assert v_sgd == pytest.approx(sgd_variance_closed_form(gamma, a), rel=0.05)
    assert v_la / v_sgd == pytest.approx(closed_form_ratio(gamma, a, k, alpha), rel=0.05)
    assert v_la < v_sgd  # variance reduction for 0 < alpha < 1
