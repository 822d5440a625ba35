"""Smoke test of the nested KVM lab (QEMU TCG + emulated EPYC + kvm-amd).

One boot runs guest_smoke.py, which drives vmm.py with a known exit mix and
counts kvm:kvm_exit per exit_reason with a tracefs hist trigger (and with a
tiny bcc program).  SVM exit codes: io 0x7b, cpuid 0x72, hlt 0x78, npf 0x400,
intr 0x60.

Exactness: io and cpuid are exact.  npf is K plus one: the first instruction
fetch from the code page faults it into the nested page tables; the baseline
run (N=M=K=0) measures that fixed overhead in the same boot.  intr (host
timer interrupts) varies and is not checked.
"""
import glob
import json
import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nestedlab import GUEST_TESTS_DIR, NestedTimeout, run_nested, skip_module_unless_available  # noqa: E402

pytestmark = pytest.mark.nested

skip_module_unless_available()

N_IO, M_CPUID, K_MMIO = 300, 200, 100
SVM_IO, SVM_CPUID, SVM_HLT, SVM_NPF = 0x7B, 0x72, 0x78, 0x400


@pytest.fixture(scope="module")
def smoke():
    script = (f"python3 {GUEST_TESTS_DIR}/guest_smoke.py "
              f"--io {N_IO} --cpuid {M_CPUID} --mmio {K_MMIO} --bcc\n")
    res = run_nested(script, timeout=600)
    assert res.rc == 0, f"guest script failed rc={res.rc}\n{res.stderr}\n{res.console[-3000:]}"
    data = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nnested boot: {res.elapsed:.1f}s total, guest timing {res.timing}, "
          f"bcc compile {data.get('bcc', {}).get('compile_seconds')}s")
    return data


def _c(hist, code):
    return hist.get(str(code), 0)


def test_dev_kvm_after_insmod(smoke):
    assert smoke["dev_kvm"], "kvm-amd did not give /dev/kvm in the nested guest"
    assert smoke["npt"] in ("Y", "1")


def test_exit_counts_match_vmm(smoke):
    base, main = smoke["hist"]["baseline"], smoke["hist"]["main"]
    vmm = smoke["vmm"]["main"]
    assert vmm["errors"] == []
    assert vmm["exits"] == {"IO": N_IO, "MMIO": K_MMIO, "HLT": 1}
    # baseline: only the code page's first fetch (npf) and the hlt
    assert _c(base, SVM_IO) == 0 and _c(base, SVM_CPUID) == 0
    assert _c(base, SVM_HLT) == 1
    npf_overhead = _c(base, SVM_NPF)
    assert npf_overhead == 1, base
    assert _c(main, SVM_IO) == N_IO, main
    assert _c(main, SVM_CPUID) == M_CPUID, main
    assert _c(main, SVM_NPF) == K_MMIO + npf_overhead, main
    assert _c(main, SVM_HLT) == 1, main


def test_kprobes_in_nested_kernel(smoke):
    kp = smoke["kprobe"]
    assert kp.get("kprobe_events"), kp
    assert kp.get("created") and kp.get("removed"), kp


def test_bcc_tracepoint_in_guest(smoke):
    bcc = smoke["bcc"]
    assert "error" not in bcc, bcc["error"]
    c = bcc["counts"]
    assert _c(c, SVM_IO) == N_IO and _c(c, SVM_CPUID) == M_CPUID, c
    assert _c(c, SVM_NPF) == K_MMIO + 1, c


def test_timeout_kills_only_its_qemu():
    pattern = os.path.join(tempfile.gettempdir(), "kvmbpf-nested-*")
    dirs_before = set(glob.glob(pattern))
    with pytest.raises(NestedTimeout) as exc:
        run_nested("sleep 600", timeout=8)
    pid = exc.value.qemu_pid
    assert pid, "NestedTimeout should carry the qemu pid"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert set(glob.glob(pattern)) <= dirs_before, "temp dir left behind"
