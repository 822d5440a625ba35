"""The one histogram layout every collector uses (mirrors bpf_programs/kvmbpf.h).

Log-linear buckets: exact below 2^SUB_BITS, then every power of two split into
2^SUB_BITS linear sub-buckets.  A bucket's width is at most 2^-SUB_BITS of its
lower bound, so a percentile read from the bucket midpoint is within
2^-(SUB_BITS+1) (3.1 %) of the true value.  Percentiles come from hdrhistogram,
fed with bucket midpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

SUB_BITS = 4
SUB = 1 << SUB_BITS
MAX_EXP = 47
SLOTS = (MAX_EXP - SUB_BITS + 2) * SUB
#: Worst-case relative error of a value reported from a bucket midpoint.
MIDPOINT_ERROR = 1 / (2 * SUB)
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def slot_of(value: int) -> int:
    """The bucket index of a value (the same arithmetic as hist_slot() in BPF)."""
    if value < SUB:
        return value
    exp = value.bit_length() - 1
    if exp > MAX_EXP:
        return SLOTS - 1
    sub = (value >> (exp - SUB_BITS)) & (SUB - 1)
    return ((exp - SUB_BITS + 1) << SUB_BITS) + sub


def slot_bounds(slot: int) -> tuple[int, int]:
    """[low, high) of the values that fall into a bucket."""
    if slot < SUB:
        return slot, slot + 1
    group, sub = divmod(slot, SUB)
    exp = group + SUB_BITS - 1
    width = 1 << (exp - SUB_BITS)
    low = (1 << exp) + sub * width
    return low, low + width


def slot_mid(slot: int) -> int:
    low, high = slot_bounds(slot)
    return (low + high - 1) // 2 if high - low > 1 else low


@dataclass
class Histogram:
    """Bucket counts of one distribution; cumulative or a delta between two reads."""
    buckets: dict[int, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.buckets.values())

    @property
    def total(self) -> int:
        """Approximate sum of all values (bucket midpoints)."""
        return sum(slot_mid(s) * n for s, n in self.buckets.items())

    def add(self, slot: int, n: int) -> None:
        if n:
            self.buckets[slot] = self.buckets.get(slot, 0) + n

    def __sub__(self, older: "Histogram") -> "Histogram":
        out = Histogram()
        for slot, n in self.buckets.items():
            out.add(slot, n - older.buckets.get(slot, 0))
        return out

    def __add__(self, other: "Histogram") -> "Histogram":
        out = Histogram(dict(self.buckets))
        for slot, n in other.buckets.items():
            out.add(slot, n)
        return out

    def max(self) -> int:
        return slot_bounds(max(self.buckets))[1] - 1 if self.buckets else 0

    def to_hdr(self) -> HdrHistogram:
        hdr = HdrHistogram(1, max(2, slot_bounds(SLOTS - 1)[1]), 3)
        for slot, n in self.buckets.items():
            if n > 0:
                hdr.record_value(max(1, slot_mid(slot)), n)
        return hdr

    def percentiles(self, pcts: tuple[float, ...] = PERCENTILES) -> dict[str, int]:
        """p50..p99.9 and max, from bucket midpoints (max is the top bucket's bound)."""
        if not self.buckets:
            return {}
        hdr = self.to_hdr()
        out = {f"p{p:g}": int(hdr.get_value_at_percentile(p)) for p in pcts}
        out["max"] = self.max()
        return out

    def buckets_as_list(self) -> list[list[int]]:
        """[[slot, count], ...] sorted: the histogram's JSON form (bounds from hist.slot_bounds)."""
        return [[slot, n] for slot, n in sorted(self.buckets.items())]

    @classmethod
    def from_list(cls, pairs) -> "Histogram":
        """The inverse of buckets_as_list (JSON output read back)."""
        return cls({int(slot): int(n) for slot, n in pairs})
