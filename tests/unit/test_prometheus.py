"""Prometheus exposition: escaping, `le` buckets from the log-linear layout, cardinality cap."""
from __future__ import annotations

import re

from kvmbpf.hist import Histogram, slot_bounds, slot_of
from kvmbpf.render import prometheus as prom
from kvmbpf.snapshot import Metric


def test_label_values_are_escaped():
    assert prom.escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    text = prom.render([Metric("kvmbpf_x_total", "counter", "help\nline", {"vm": 'we"ird\\vm\n'}, 3)],
                       prom.SeriesLimiter())
    assert 'kvmbpf_x_total{vm="we\\"ird\\\\vm\\n"} 3' in text
    assert "# HELP kvmbpf_x_total help\\nline" in text
    # every sample line stays one line
    assert all(line.startswith(("#", "kvmbpf_")) for line in text.strip().splitlines())


def test_invalid_names_are_sanitized():
    assert prom.metric_name("kvmbpf.bad-name") == "kvmbpf_bad_name"
    assert prom.label_name("9x-y") == "_9x_y"


def test_le_buckets_follow_the_layout_and_close_gaps():
    hist = Histogram()
    for value, n in ((5, 2), (1000, 3), (1010, 1), (50_000, 4)):
        hist.add(slot_of(value), n)
    pairs = prom.le_buckets(hist)
    # cumulative, increasing bounds, last count = total
    assert [le for le, _ in pairs] == sorted(le for le, _ in pairs)
    assert [c for _, c in pairs] == sorted(c for _, c in pairs)
    assert pairs[-1][1] == hist.count == 10
    # 5 is exact: le=4 (count 0 below), le=5 (2)
    assert pairs[0] == (4, 0) and pairs[1] == (5, 2)
    # every non-empty bucket's both edges are present, so interpolation stays inside it
    les = {le for le, _ in pairs}
    for slot in hist.buckets:
        low, high = slot_bounds(slot)
        assert high - 1 in les and (low == 0 or low - 1 in les)


def test_histogram_exposition_in_seconds():
    hist = Histogram()
    hist.add(slot_of(1500), 7)          # 1.5 us
    text = prom.render([Metric("kvmbpf_lat_seconds", "histogram", "h", {"vm": "a"}, hist=hist,
                               scale=1e-9)], prom.SeriesLimiter())
    low, high = slot_bounds(slot_of(1500))
    assert f'kvmbpf_lat_seconds_bucket{{vm="a",le="{(low - 1) / 1e9!r}"}} 0' in text
    assert f'kvmbpf_lat_seconds_bucket{{vm="a",le="{(high - 1) / 1e9!r}"}} 7' in text
    assert 'kvmbpf_lat_seconds_bucket{vm="a",le="+Inf"} 7' in text
    assert 'kvmbpf_lat_seconds_count{vm="a"} 7' in text
    total = float(re.search(r'kvmbpf_lat_seconds_sum\{vm="a"\} (\S+)', text).group(1))
    assert abs(total - 7 * 1500e-9) / (7 * 1500e-9) < 0.05
    assert "# TYPE kvmbpf_lat_seconds histogram" in text


def test_duplicate_label_sets_are_merged_not_repeated():
    metrics = [Metric("kvmbpf_x_total", "counter", "h", {"vm": "same"}, 2),
               Metric("kvmbpf_x_total", "counter", "h", {"vm": "same"}, 3)]
    text = prom.render(metrics, prom.SeriesLimiter())
    assert text.count('kvmbpf_x_total{vm="same"}') == 1
    assert 'kvmbpf_x_total{vm="same"} 5' in text
    assert text.count("# TYPE kvmbpf_x_total") == 1


def test_cardinality_cap_is_sticky_and_counted():
    limiter = prom.SeriesLimiter(max_series=2)
    first = [Metric("kvmbpf_x_total", "counter", "h", {"vm": v}, 1) for v in ("b", "c")]
    prom.render(first, limiter)
    more = [Metric("kvmbpf_x_total", "counter", "h", {"vm": v}, 1) for v in ("a", "b", "c", "d")]
    text = prom.render(more, limiter)
    # "a" sorts first but came late: the series already exported keep their place
    assert 'vm="b"' in text and 'vm="c"' in text
    assert 'vm="a"' not in text and 'vm="d"' not in text
    assert 'kvmbpf_exporter_series_dropped{family="kvmbpf_x_total"} 2' in text


def test_values_format():
    assert prom.format_value(3.0) == "3"
    assert prom.format_value(0.25) == "0.25"
    assert prom.format_value(float("inf")) == "+Inf"
