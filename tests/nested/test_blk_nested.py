"""kvmbpf blk side by side with a kprobe biolatency, in the nested lab (Debian 6.1: kprobes).

biolatency-bpfcc cannot start on the development host (no kprobes) nor here: bcc 0.26's
biolatency attaches its completion probe to blk_account_io_done, which this 6.1 kernel
does not let a kprobe attach to ("not traceable": inlined).  So the peer is biolatency's
own method on functions that are traceable, as a bpftrace script: a kprobe on
blk_mq_start_request stamps the request, one on blk_mq_end_request puts the time in a log2
histogram of microseconds.  One boot runs both on the same requests: a loop device over
tests/delayfs.py's file (every request takes DELAY_MS in the FUSE process), fio writes N
blocks at random offsets with O_DIRECT while the kprobe histogram and
`kvmbpf blk --all --dev loopN` (block tracepoints) are attached.  Ground truth for the count:
fio's own; for the latency: both tools see a ~DELAY_MS device.
"""
import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nestedlab import run_nested, skip_module_unless_available  # noqa: E402

from kvmbpf.hist import Histogram  # noqa: E402

pytestmark = pytest.mark.nested

skip_module_unless_available()

N, DELAY_MS = 200, 2

GUEST_SCRIPT = r'''
import json, os, signal, subprocess, sys, time

N, DELAY_MS = @N@, @DELAY_MS@
os.makedirs("/tmp/mnt")
fs = subprocess.Popen([sys.executable, "/project/tests/delayfs.py", "/tmp/mnt", str(DELAY_MS), "32"])
while not os.path.exists("/tmp/mnt/disk"):
    time.sleep(0.1)
dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", "/tmp/mnt/disk"],
                     capture_output=True, text=True, check=True).stdout.strip()
name = os.path.basename(dev)
KPROBES = """kprobe:blk_mq_start_request { @start[arg0] = nsecs; }
kprobe:blk_mq_end_request /@start[arg0]/ { @usecs = hist((nsecs - @start[arg0]) / 1000); delete(@start[arg0]); }
END { clear(@start); }"""
bio = subprocess.Popen(["bpftrace", "-e", KPROBES], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
banner = bio.stdout.readline()
while not banner.startswith("Attaching") and bio.poll() is None:
    banner = bio.stdout.readline()
def kprobed():
    perf = json.loads(subprocess.run(["bpftool", "-j", "perf"], capture_output=True, text=True).stdout or "[]")
    return {e.get("func") for e in perf if e.get("pid") == bio.pid}
deadline = time.monotonic() + 120           # bpftrace says "Attaching" before it attaches
while kprobed() != {"blk_mq_start_request", "blk_mq_end_request"} and time.monotonic() < deadline:
    time.sleep(0.2)
tool = subprocess.Popen([sys.executable, "-m", "kvmbpf", "blk", "--all", "--dev", name,
                         "--json", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, cwd="/project")
lines = [tool.stdout.readline()]        # the first interval: everything is attached
fio = subprocess.run(["fio", "--name=n", f"--filename={dev}", "--direct=1", "--rw=randwrite",
                      "--ioengine=psync", "--bs=4k", f"--number_ios={N}", "--size=32M",
                      "--randrepeat=0", "--output-format=json"],
                     capture_output=True, text=True).stdout
lines.append(tool.stdout.readline())    # SIGINT lands while it sleeps: the partial interval follows
for proc in (tool, bio):
    proc.send_signal(signal.SIGINT)
out, err = tool.communicate(timeout=300)
bio_out, bio_err = bio.communicate(timeout=300)
subprocess.run(["losetup", "-d", dev])
subprocess.run(["umount", "/tmp/mnt"])
fs.wait(timeout=30)
print(json.dumps({"device": name, "fio": fio[fio.index("{"):] if "{" in fio else fio,
                  "rc": tool.returncode, "err": err[-3000:], "banner": banner,
                  "peer": bio_out, "bio_err": bio_err[-3000:],
                  "lines": [json.loads(l) for l in lines + out.splitlines() if l.startswith("{")]}))
'''

BUCKET_RE = re.compile(r"^\[(\d+)([KM]?), (\d+)([KM]?)\)\s+(\d+)", re.M)
UNIT = {"": 1, "K": 1024, "M": 1024 ** 2}


@pytest.fixture(scope="module")
def nested():
    script = GUEST_SCRIPT.replace("@N@", str(N)).replace("@DELAY_MS@", str(DELAY_MS))
    res = run_nested(f"python3 - <<'EOF'\n{script}\nEOF\n", timeout=900)
    assert res.rc == 0, f"guest script failed rc={res.rc}\n{res.stderr}\n{res.console[-3000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0, out["err"]
    assert out["banner"].startswith("Attaching 3 probes"), out["bio_err"]
    out["fio"] = json.loads(out["fio"])["jobs"][0]["write"]
    return out


def peer_buckets(text: str) -> list[tuple[int, int, int]]:
    """(low, high, count) rows of bpftrace's log2 usecs histogram: [low, high)."""
    return [(int(lo) * UNIT[lu], int(hi) * UNIT[hu], int(n))
            for lo, lu, hi, hu, n in BUCKET_RE.findall(text)]


def writes(nested) -> list[dict]:
    return [o for line in nested["lines"] for o in line["ops"]
            if o["device"] == nested["device"] and o["op"] == "write"]


def test_counts_equal_fio_and_the_kprobe_peer(nested):
    fio = nested["fio"]["total_ios"]
    assert fio == N
    missed = sum(line["missed"] for line in nested["lines"])
    counted = sum(o["requests"] for o in writes(nested))
    assert counted <= N <= counted + missed, (counted, missed)
    assert sum(n for _lo, _hi, n in peer_buckets(nested["peer"])) == N


def test_issue_latency_in_the_kprobe_peers_median_bucket(nested):
    """The peer times blk_mq_start_request -> blk_mq_end_request: kvmbpf's issue -> complete
    (block_rq_issue fires in blk_mq_start_request, block_rq_complete in blk_mq_end_request).
    The log2 bucket of its median must hold kvmbpf's p50 (in us), and that must be at
    least the device's delay."""
    buckets = peer_buckets(nested["peer"])
    total, seen = sum(n for *_b, n in buckets), 0
    for lo, hi, n in buckets:
        seen += n
        if 2 * seen >= total:
            break
    issue = sum((Histogram.from_list(o["issue_to_complete"]["buckets"]) for o in writes(nested)),
                Histogram())
    p50_us = issue.percentiles()["p50"] / 1000
    assert lo >= DELAY_MS * 1000 / 2 and lo <= p50_us < hi * 1.0625, (lo, hi, p50_us, buckets)
    assert p50_us >= DELAY_MS * 1000
