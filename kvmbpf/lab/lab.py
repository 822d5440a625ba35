"""The built-in lab: named QEMU/KVM guests with known workloads, and everything they need.

A Lab owns a work directory and a state file listing every process, loop
device and network namespace it made, so `kvmbpf lab down` (or a test's
teardown) removes exactly those, by pid and by name, even from another process.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import KvmbpfError
from . import vm as labvm
from .network import LabNetwork
from .resources import LoopDisk, stop_pid

STATE_ROOT = Path("/run/kvmbpf-lab")

#: Named workloads for `kvmbpf lab up --workload`: (guest program, parameters).
WORKLOADS: dict[str, tuple[str, dict[str, int]]] = {
    # Endless rounds of port I/O (QEMU-handled and in-kernel PIC), MMIO and CPUID, 10 rounds/s.
    "exits": ("exits", {"PIO_COUNT": 2000, "PIC_COUNT": 2000, "MMIO_COUNT": 200,
                        "CPUID_COUNT": 100, "DELAY_MS": 100, "ROUNDS": 0}),
    # A vCPU that never exits and never sleeps: 100 % of a host CPU.
    "spin": ("exits", {"ROUNDS": 1, "FINISH": 1}),
    # A guest that switches between real and protected mode as fast as it can (the GRUB case).
    "modeswitch": ("exits", {"CR0_COUNT": 20000, "ROUNDS": 0}),
}


@dataclass
class LabState:
    lab_id: str
    workdir: str
    vms: list[dict] = field(default_factory=list)
    loops: list[dict] = field(default_factory=list)
    networks: list[dict] = field(default_factory=list)


class Lab:
    def __init__(self, lab_id: str = "default"):
        if not lab_id.replace("-", "").isalnum() or len(lab_id) > 10:
            raise KvmbpfError(f"lab id {lab_id!r}: use up to 10 letters, digits or '-'")
        self.lab_id = lab_id
        self.dir = STATE_ROOT / lab_id
        self.state_file = self.dir / "state.json"
        self.state = self._load()
        self.vms: dict[str, labvm.LabVM] = {}
        self.networks: dict[str, LabNetwork] = {}

    def _load(self) -> LabState:
        if self.state_file.is_file():
            try:
                return LabState(**json.loads(self.state_file.read_text()))
            except (ValueError, TypeError) as exc:
                raise KvmbpfError(f"corrupt lab state {self.state_file}: {exc}") from None
        return LabState(self.lab_id, str(self.dir))

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        tmp.replace(self.state_file)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # --- resources -------------------------------------------------------------------------
    def loop_disk(self, name: str, size_mb: int = 16) -> LoopDisk:
        self.dir.mkdir(parents=True, exist_ok=True)
        disk = LoopDisk.create(self.dir, name, size_mb)
        self.state.loops.append(asdict(disk))
        self._save()
        return disk

    def network(self, index: int = 1, dhcp: bool = True) -> LabNetwork:
        """The lab's network number `index` (created on first use)."""
        key = f"{self.lab_id}{index}"
        if key not in self.networks:
            self.dir.mkdir(parents=True, exist_ok=True)
            net = LabNetwork.create(key, self.dir, subnet_index=index, dhcp=dhcp)
            self.networks[key] = net
            self.state.networks.append(asdict(net))
            self._save()
        return self.networks[key]

    def start_vm(self, name: str, guest: str, params: dict[str, int] | None = None, *,
                 disk: LoopDisk | None = None, net: LabNetwork | None = None,
                 mac: str = "52:54:00:12:34:56") -> labvm.LabVM:
        tap = None
        if net is not None:
            tap = net.add_tap(f"tap{name}"[:15])
            self._record_network(net)
        vm = labvm.start(name, guest, params or {}, self.dir,
                         disk=disk.device if disk else None, tap=tap,
                         netns=net.netns if net else None, mac=mac)
        self.vms[name] = vm
        self.state.vms.append({"name": name, "pid": vm.pid})
        self._save()
        return vm

    def _record_network(self, net: LabNetwork) -> None:
        self.state.networks = [n for n in self.state.networks if n["netns"] != net.netns]
        self.state.networks.append(asdict(net))
        self._save()

    def up(self, workload: str = "exits", name: str = "kvmbpf-demo", disk: bool = True,
           net: bool = True) -> labvm.LabVM:
        if workload not in WORKLOADS:
            raise KvmbpfError(f"unknown workload {workload!r} (workloads: {', '.join(WORKLOADS)})")
        if any(v["name"] == name for v in self.state.vms):
            raise KvmbpfError(f"lab {self.lab_id} already runs {name} (kvmbpf lab down first)")
        guest, params = WORKLOADS[workload]
        return self.start_vm(name, guest, params,
                             disk=self.loop_disk(name) if disk else None,
                             net=self.network() if net else None)

    def status(self) -> dict:
        alive = [dict(v, running=_is_qemu(v["pid"])) for v in self.state.vms]
        return {"lab": self.lab_id, "workdir": self.state.workdir, "vms": alive,
                "loops": self.state.loops, "networks": [n["netns"] for n in self.state.networks]}

    def down(self) -> None:
        """Stop every guest this lab started (by pid), remove its devices and namespaces."""
        for entry in self.state.vms:
            live = self.vms.get(entry["name"])
            if live is not None:
                live.stop()
            elif _is_qemu(entry["pid"]):
                stop_pid(entry["pid"])
        for net in self.networks.values():
            net.destroy()
        for entry in self.state.networks:
            if entry["netns"] not in {n.netns for n in self.networks.values()}:
                LabNetwork(**entry).destroy()
        for entry in self.state.loops:
            LoopDisk(**entry).destroy()
        self.vms.clear()
        self.networks.clear()
        self.state = LabState(self.lab_id, str(self.dir))
        self.state_file.unlink(missing_ok=True)
        for leftover in self.dir.glob("*") if self.dir.is_dir() else []:
            leftover.unlink()
        if self.dir.is_dir():
            self.dir.rmdir()


def _is_qemu(pid: int) -> bool:
    """Only stop a pid that is still a QEMU (pids are reused)."""
    try:
        return "qemu" in os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False


def labs() -> list[str]:
    return sorted(p.name for p in STATE_ROOT.iterdir()) if STATE_ROOT.is_dir() else []
