"""The histogram layout: agreement with kvmbpf.h, bucket bounds, and percentile accuracy."""
import random
import re
from pathlib import Path

import pytest

from kvmbpf import hist
from kvmbpf.hist import Histogram, slot_bounds, slot_of

HEADER = Path(__file__).resolve().parents[2] / "bpf_programs" / "kvmbpf.h"


def test_constants_match_the_bpf_header():
    text = HEADER.read_text()
    assert int(re.search(r"#define HIST_SUB_BITS (\d+)", text).group(1)) == hist.SUB_BITS
    assert int(re.search(r"#define HIST_MAX_EXP (\d+)", text).group(1)) == hist.MAX_EXP
    # the C slot formula, spelled as in the header
    assert "((e - HIST_SUB_BITS + 1) << HIST_SUB_BITS) + sub" in text


@pytest.mark.parametrize("value", [0, 1, 15, 16, 17, 31, 32, 33, 1000, 12345, 10**6, 2**40 + 7])
def test_every_value_falls_inside_its_bucket(value):
    low, high = slot_bounds(slot_of(value))
    assert low <= value < high


def test_slots_are_contiguous_and_monotonic():
    for slot in range(1, hist.SLOTS - 1):
        assert slot_bounds(slot)[0] == slot_bounds(slot - 1)[1]


def test_relative_width_bound():
    for slot in range(hist.SUB, hist.SLOTS - 1):
        low, high = slot_bounds(slot)
        assert (high - low) / low <= 1 / hist.SUB


def test_huge_values_share_the_last_bucket():
    assert slot_of(2**60) == hist.SLOTS - 1


def test_percentiles_within_the_documented_error():
    rng = random.Random(7)
    values = sorted(int(rng.lognormvariate(10, 1.5)) + 1 for _ in range(20000))
    h = Histogram()
    for v in values:
        h.add(slot_of(v), 1)
    pct = h.percentiles()
    for p in (50, 90, 99):
        exact = values[int(len(values) * p / 100) - 1]
        assert abs(pct[f"p{p}"] - exact) / exact <= hist.MIDPOINT_ERROR + 0.01
    assert pct["max"] >= values[-1]


def test_delta_and_sum():
    a, b = Histogram({20: 5, 30: 2}), Histogram({20: 2})
    assert (a - b).buckets == {20: 3, 30: 2}
    assert (a + b).count == 9
    assert Histogram().percentiles() == {}
