#!/usr/bin/env python3
""""Copying files is slow in the VM": a slow disk under the VM's disk.

The lab guest reads its data disk (a loop device, virtio-blk in the guest) one sector at a
time, forever.  The loop device's backing file sits on the host's disk, and that disk is
made slow for this VM only: a block-cgroup throttle of 20 reads/s on the backing disk for the
VM's cgroup (the loop device submits the backing I/O on the VM's behalf, in its cgroup), as
a cloud volume's IOPS limit or a dying disk would.  Device-mapper's delay target would do the
same but needs a kernel with device-mapper.

`kvmbpf blk` splits each request's time into queue -> complete (what the VM waited for) and
issue -> complete (the device alone): when the two are about equal, nothing waits in the
host's block queue and the time goes to the device, here to the storage under the loop.

Run as root: .venv/bin/python examples/slow_disk.py
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from example_kit import Around, Diagnosis, around_command, kvmbpf_json, main, new_lab, say, vm_name

from kvmbpf.hist import slot_mid
from kvmbpf.lab.resources import io_throttle
from kvmbpf.lab.vm import LabVM

IOPS = 20
READS = 40                    # per round, one sector each, LBAs 0..39 again every round
FILLED = 1 << 20              # bytes of the backing file given real data (holes need no I/O)
SECONDS = 4
SLOW_MS = 10.0                # a p90 above this on a local disk is slow
DEVICE_SHARE = 0.8            # issue->complete / queue->complete above this: the device's time


@dataclass
class Scenario:
    vm: LabVM
    loop: str                 # e.g. "loop3"
    backing_dev: str          # major:minor of the disk under the backing file
    cgroup: Path


def fill(path: str, size: int) -> None:
    """Real data at the start of the backing file, on disk: reads of a hole cost no I/O."""
    with open(path, "r+b") as fh:
        fh.write(b"\xa5" * size)
        fh.flush()
        os.fsync(fh.fileno())


def run(around: Around = None) -> Diagnosis:
    with new_lab() as lab:
        name = vm_name("slow")
        disk = lab.loop_disk(name)
        fill(disk.backing, FILLED)
        backing, majmin = disk.whole_disk()
        say(f"starting lab guest {name}: {READS} one-sector reads of {disk.device}, round after round")
        vm = lab.start_vm(name, "disk", {"READS": READS, "ROUNDS": 0}, disk=disk)
        with io_throttle(majmin, IOPS) as group:
            (group / "cgroup.procs").write_text(str(vm.pid))
            say(f"throttled {name}'s I/O on {backing} (under {disk.backing}) to {IOPS} IOPS")
            loop = os.path.basename(disk.device)
            with around_command(around, Scenario(vm, loop, majmin, group)):
                (snap,) = kvmbpf_json("blk", "--vm", name, "--dev", loop, "-d", str(SECONDS))
    return diagnose(snap, name, loop, backing)


def mean_ns(hist: dict) -> float:
    """Mean of a JSON histogram, from its buckets' midpoints."""
    return sum(slot_mid(slot) * n for slot, n in hist["buckets"]) / hist["count"] if hist["count"] else 0.0


def diagnose(snap: dict, name: str, loop: str, backing: str) -> Diagnosis:
    rows = [o for o in snap["ops"] if o["vm"] == name and o["device"] == loop and o["op"] == "read"]
    if not rows or not rows[0]["queue_to_complete"]["count"]:
        return Diagnosis(False, f"no reads of {name} on {loop} were traced", {"vm": name})
    row = rows[0]
    queue, issue = row["queue_to_complete"], row["issue_to_complete"]
    evidence = {
        "vm": name, "device": loop, "backing_disk": backing, "interval_s": snap["interval_s"],
        "reads": row["requests"], "reads_per_s": round(row["requests"] / snap["interval_s"], 1),
        **{f"queue_{k}_ms": round(queue[k] / 1e6, 3) for k in ("p50", "p90", "p99")},
        **{f"issue_{k}_ms": round(issue[k] / 1e6, 3) for k in ("p50", "p90", "p99")},
        "queue_mean_ms": round(mean_ns(queue) / 1e6, 3), "issue_mean_ms": round(mean_ns(issue) / 1e6, 3),
    }
    share = issue["p90"] / queue["p90"] if queue["p90"] else 0.0
    evidence["device_share_p90"] = round(share, 2)
    slow = queue["p90"] / 1e6 >= SLOW_MS
    found = slow and share >= DEVICE_SHARE
    where = ("the device: issue -> complete is {:.0%} of it, so nothing waits in the host's "
             "block queue".format(share) if share >= DEVICE_SHARE else
             "the host's block queue: the device itself (issue -> complete) takes only "
             "{:.0%} of it".format(share))
    summary = (f"{name} waited for each read of {loop} {evidence['queue_p90_ms']:.1f} ms at p90 "
               f"(p50 {evidence['queue_p50_ms']:.1f} ms, mean {evidence['queue_mean_ms']:.1f} ms; "
               f"{row['requests']} reads, {evidence['reads_per_s']:.0f}/s). The time goes to {where}.")
    if queue["p90"] > 10 * queue["p50"]:
        summary += (" Most reads are quick and the rest wait long: the pattern of a rate limit "
                    "that lets a few through, then holds the others.")
    if found:
        summary += (f" {loop} is a file on {backing}: that disk, as this VM gets it, is slow "
                    f"(here: throttled to {IOPS} IOPS). Look below the loop device, not in the guest.")
    elif not slow:
        summary += f" That is not slow (flag: p90 above {SLOW_MS:g} ms)."
    return Diagnosis(found, summary, evidence)


if __name__ == "__main__":
    raise SystemExit(main(run, "Why is copying files slow in the VM?"))
