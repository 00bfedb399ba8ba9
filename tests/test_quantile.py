"""The numpy-free median and percentile equal numpy's to the last bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradience._quantile import median, percentile

finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e300, max_value=1e300)
values = st.lists(finite, min_size=1, max_size=60)
qs = st.one_of(st.sampled_from([0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 100.0]),
               st.floats(min_value=0.0, max_value=100.0))  # fmt: skip


@given(values, qs)
def test_percentile_equals_numpy_bit_for_bit(xs: list[float], q: float) -> None:
    assert percentile(xs, q) == float(np.percentile(xs, q))


@given(values)
def test_median_equals_numpy_bit_for_bit(xs: list[float]) -> None:
    assert median(xs) == float(np.median(xs))


@given(st.lists(st.integers(0, 4096), min_size=1, max_size=200), qs)
def test_integer_ranks_match_numpy(xs: list[int], q: float) -> None:
    assert percentile([float(x) for x in xs], q) == float(np.percentile(xs, q))


def test_nan_propagates_like_numpy() -> None:
    assert math.isnan(median([1.0, math.nan, 3.0]))
    assert math.isnan(percentile([1.0, math.nan], 90))


def test_known_values() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert percentile([5.0], 37.5) == 5.0


@pytest.mark.parametrize("bad", [-1.0, 100.5])
def test_q_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], bad)


def test_empty_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        median([])
