"""The lab's own network: a namespace with a bridge, a tap per guest, and dnsmasq for DHCP.

Everything lives inside a namespace the lab creates, so guest traffic never
leaves it.  Names carry the lab's id so two labs or test runs can coexist.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KvmbpfError
from .resources import sh, stop_pid

SUBNET = "10.199.{n}"


@dataclass
class LabNetwork:
    netns: str
    bridge: str
    workdir: str
    subnet_index: int
    dnsmasq_pid: int | None = None
    taps: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return SUBNET.format(n=self.subnet_index) + ".1"

    @property
    def dnsmasq_log(self) -> Path:
        return Path(self.workdir) / f"{self.netns}-dnsmasq.log"

    @classmethod
    def create(cls, lab_id: str, workdir: Path, subnet_index: int = 1,
               dhcp: bool = True) -> "LabNetwork":
        net = cls(f"kvmbpf-{lab_id}", f"kb{lab_id}"[:15], str(workdir), subnet_index)
        sh("ip", "netns", "add", net.netns)
        try:
            net._ns("ip", "link", "set", "lo", "up")
            net._ns("ip", "link", "add", net.bridge, "type", "bridge")
            net._ns("ip", "addr", "add", f"{net.gateway}/24", "dev", net.bridge)
            net._ns("ip", "link", "set", net.bridge, "up")
            if dhcp:
                net.start_dnsmasq()
        except Exception:
            net.destroy()
            raise
        return net

    def _ns(self, *cmd: str) -> str:
        return sh("ip", "netns", "exec", self.netns, *cmd)

    def add_tap(self, name: str) -> str:
        """A tap on the bridge, for one guest (QEMU opens it by name inside the namespace)."""
        self._ns("ip", "tuntap", "add", "dev", name, "mode", "tap")
        self._ns("ip", "link", "set", name, "master", self.bridge)
        self._ns("ip", "link", "set", name, "up")
        self.taps.append(name)
        return name

    def start_dnsmasq(self) -> None:
        exe = shutil.which("dnsmasq")
        if exe is None:
            raise KvmbpfError("dnsmasq is not installed (apt install dnsmasq-base): the lab serves DHCP with it")
        prefix = SUBNET.format(n=self.subnet_index)
        pidfile = Path(self.workdir) / f"{self.netns}-dnsmasq.pid"
        sh("ip", "netns", "exec", self.netns, exe, f"--interface={self.bridge}", "--bind-interfaces",
           "--except-interface=lo", f"--dhcp-range={prefix}.50,{prefix}.99,12h", "--port=0",
           "--log-dhcp", f"--log-facility={self.dnsmasq_log}", f"--pid-file={pidfile}",
           "--dhcp-leasefile=" + str(Path(self.workdir) / f"{self.netns}.leases"),
           "--conf-file=/dev/null")
        self.dnsmasq_pid = int(pidfile.read_text().strip())

    def stop_dnsmasq(self) -> None:
        if self.dnsmasq_pid:
            stop_pid(self.dnsmasq_pid)
            self.dnsmasq_pid = None

    def counters(self, dev: str) -> dict[str, int]:
        """Interface counters of a device in the namespace (ground truth for tests)."""
        out = {}
        for stat in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped"):
            out[stat] = int(self._ns("cat", f"/sys/class/net/{dev}/statistics/{stat}").strip())
        return out

    def destroy(self) -> None:
        self.stop_dnsmasq()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
