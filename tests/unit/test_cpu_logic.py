"""Pure logic of `kvmbpf cpu`: /proc parsing and per-interval deltas."""
from __future__ import annotations

import pytest

from kvmbpf.collectors.cpu import (TICK_NS, CpuRow, Times, parse_host_stat, parse_schedstat,
                                   parse_stat, vm_delta)


def _stat(comm: str, utime: int, stime: int, gtime: int) -> str:
    fields = ["S"] + ["0"] * 50
    fields[11], fields[12], fields[40] = str(utime), str(stime), str(gtime)
    return f"1234 ({comm}) " + " ".join(fields)


def test_stat_splits_guest_out_of_user_time():
    t = parse_stat(_stat("CPU 0/KVM", utime=300, stime=50, gtime=200))
    assert t == Times(guest=200 * TICK_NS, user=100 * TICK_NS, system=50 * TICK_NS)


def test_stat_comm_with_parens_and_spaces():
    t = parse_stat(_stat("a) (b c)", utime=1, stime=2, gtime=0))
    assert (t.user, t.system) == (TICK_NS, 2 * TICK_NS)


def test_schedstat_field_two_is_run_delay():
    assert parse_schedstat("1948505935 50763282 1149\n") == 50763282


def test_host_stat_guest_is_taken_out_of_user():
    text = "cpu  1000 10 300 5000 7 4 6 0 200 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    t = parse_host_stat(text)
    assert t.guest == 200 * TICK_NS
    assert t.user == (1000 + 10 - 200) * TICK_NS
    assert t.system == (300 + 4 + 6) * TICK_NS
    with pytest.raises(ValueError):
        parse_host_stat("intr 1 2\n")


def test_vm_delta_uses_process_totals_and_sums_thread_waits():
    old = (Times(0, 10, 100), {1: Times(runq_wait=50), 2: Times(runq_wait=70)})
    new = (Times(5, 12, 160), {1: Times(runq_wait=80), 3: Times(runq_wait=9)})   # 2 exited, 3 new
    total, per_thread = vm_delta(old, new)
    assert total == Times(5, 2, 60, 30 + 9)
    assert per_thread[3].runq_wait == 9 and 2 not in per_thread


def test_times_never_go_negative():
    assert (Times(1, 1, 1, 1) - Times(2, 2, 2, 2)) == Times()


def test_row_is_percent_of_one_cpu():
    row = CpuRow.of(Times(guest=0, user=0, system=1_000_000_000, runq_wait=500_000_000), 2.0)
    assert (row.system_pct, row.runq_wait_pct, row.runq_wait_ns) == (50.0, 25.0, 500_000_000)
