"""Names from the running kernel: tracepoint format parsing, on real saved format files."""
from pathlib import Path

from kvmbpf.tracefs import parse_format, symbolic_tables

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def fmt(name):
    return parse_format((FIX / f"{name}.format").read_text())


def test_fields_of_kvm_exit():
    f = fmt("kvm_exit")
    assert f.name == "kvm_exit"
    assert f.field("exit_reason").offset == 8 and f.field("exit_reason").size == 4
    assert f.field("isa").ctype == "u32 isa"
    assert f.field("nope") is None


def test_vmx_and_svm_tables():
    vmx, svm = symbolic_tables(fmt("kvm_exit").print_fmt)
    assert vmx[30] == "IO_INSTRUCTION" and vmx[12] == "HLT" and vmx[48] == "EPT_VIOLATION"
    assert svm[0x7b] == "io" and svm[0x72] == "cpuid" and svm[0x400] == "npf"
    assert svm[0x40 + 14] == "PF excp"          # keys written as sums in the format file
    assert svm[-1] == "invalid_guest_state"


def test_userspace_exit_names_are_concatenated_strings():
    (table,) = symbolic_tables(fmt("kvm_userspace_exit").print_fmt)
    assert table[2] == "KVM_EXIT_IO" and table[6] == "KVM_EXIT_MMIO"


def test_drop_reasons():
    (table,) = symbolic_tables(fmt("kfree_skb").print_fmt)
    assert table[3] == "NO_SOCKET"
    assert "NETFILTER_DROP" in table.values()


def test_sched_switch_fields_have_array_names_stripped():
    f = fmt("sched_switch")
    assert f.field("prev_comm").size == 16 and f.field("next_pid").offset == 56
