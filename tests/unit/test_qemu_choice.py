"""kvmbpf qemu: function choice, probe sets, the rate guard's arithmetic, the command line's split."""
import pytest

from kvmbpf.cli import main
from kvmbpf.collectors.qemu import (MAX_FUNCS, PROBE_SETS, choose_functions, hot_functions,
                                    overhead_pct)
from kvmbpf.elfprobes import FuncSymbol, ProbePoints
from kvmbpf.errors import KvmbpfError


def points(*names: str) -> ProbePoints:
    return ProbePoints("/x/qemu", {n: FuncSymbol(n, 0x1000 + i, 8, "dynsym") for i, n in enumerate(names)})


def test_sets_keep_only_the_functions_the_binary_has_in_set_order():
    p = points("blk_aio_pwritev", "virtio_blk_handle_vq", "kvm_cpu_exec")
    assert choose_functions(p, (), ("blk",)) == ["virtio_blk_handle_vq", "blk_aio_pwritev"]
    assert choose_functions(p, ("kvm_cpu_exec", "blk_aio_pwritev"), ("blk",)) == [
        "kvm_cpu_exec", "blk_aio_pwritev", "virtio_blk_handle_vq"]


def test_bad_choices_are_one_line_errors():
    p = points("kvm_cpu_exec", *[f"f{i}" for i in range(MAX_FUNCS + 1)])
    cases = [((), ("net",), "none of the 'net'"), ((), ("disk",), "unknown probe set"),
             (("kvm_cpu_exe",), (), "did you mean kvm_cpu_exec"), ((), (), "at least one"),
             (tuple(f"f{i}" for i in range(MAX_FUNCS + 1)), (), f"at most {MAX_FUNCS}")]
    for funcs, sets, message in cases:
        with pytest.raises(KvmbpfError, match=message) as err:
            choose_functions(p, funcs, sets)
        assert "\n" not in str(err.value)


def test_every_set_fits_in_one_run():
    assert all(0 < len(funcs) <= MAX_FUNCS for funcs in PROBE_SETS.values())


def test_rate_guard_and_cost_arithmetic():
    assert hot_functions({"a": 30000, "b": 100}, 1.5, 10000) == {"a": 20000.0}
    assert hot_functions({"a": 30000}, 0.0, 1) == {}
    assert overhead_pct(20000, 1.0, latency=False) == pytest.approx(3.0)
    assert overhead_pct(20000, 2.0, latency=True) == pytest.approx(3.0)


def parse(*args: str):
    trace = main.commands["qemu"].commands["trace"]
    ctx = trace.make_context("trace", list(args))
    return ctx.meta["funcs"], ctx.params


def test_function_names_then_interval_and_count():
    funcs, params = parse("virtqueue_pop", "--vm", "a", "virtio_notify", "0.5", "3", "--json")
    assert funcs == ("virtqueue_pop", "virtio_notify")
    assert (params["interval"], params["count"], params["vms"], params["as_json"]) == (0.5, 3, ("a",), True)
    funcs, params = parse("--set", "blk", "2", "--max-rate=50")
    assert funcs == () and params["sets"] == ("blk",) and params["interval"] == 2.0
    assert params["count"] is None and params["max_rate"] == 50
