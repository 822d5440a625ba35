"""The lab's own network: a namespace with a bridge, a tap per guest, and dnsmasq for DHCP.

Everything lives inside a namespace the lab creates, so guest traffic never
leaves it.  Names carry the lab's id so two labs or test runs can coexist.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
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
            # No IPv6: the bridge would send router solicitations and MLD reports to the
            # guests, noise in counts the tests check exactly.
            for scope in ("all", "default"):
                net._ns("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
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
           "--no-ping",  # no ICMP/ARP probe of the address: a 3 s delay and frames to the guest
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

    def mac(self, dev: str) -> str:
        return self._ns("cat", f"/sys/class/net/{dev}/address").strip()

    def send_frames(self, dev: str, frame: bytes, count: int = 1, *, tap: bool = False,
                    settle: float = 0.0) -> None:
        """Inside the namespace, send `frame` `count` times: out of `dev` (AF_PACKET), or with
        tap=True into the tap `dev` as if written by its VMM (it must not be open elsewhere)."""
        self._ns(sys.executable, "-m", "kvmbpf.lab.network", "tap" if tap else "packet", dev,
                 frame.hex(), str(count), str(settle))

    def destroy(self) -> None:
        self.stop_dnsmasq()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


# ---- test traffic: frames of a known count and size, sent inside the namespace ----------------
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def ether_frame(dst: str, src: str, ethertype: int, size: int) -> bytes:
    """An Ethernet frame (no FCS) of `size` bytes: header, then a zero payload."""
    if size < 14:
        raise ValueError("an Ethernet frame has at least 14 bytes")
    header = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
    return (header + ethertype.to_bytes(2, "big")).ljust(size, b"\0")


def _send(mode: str, dev: str, frame: bytes, count: int, settle: float) -> None:
    """Runs inside the namespace: write `frame` `count` times to a tap (TUNSETIFF) or out of
    a device (AF_PACKET)."""
    if mode == "tap":
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TAP | IFF_NO_PI).ljust(40, b"\0"))
        time.sleep(settle)        # carrier up -> bridge port forwarding (link watch is async)
        for _ in range(count):
            os.write(fd, frame)
        os.close(fd)
        return
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((dev, 0))
        for _ in range(count):
            sock.send(frame)


def _main(argv: list[str]) -> None:
    mode, dev, frame_hex, count, settle = argv
    _send(mode, dev, bytes.fromhex(frame_hex), int(count), float(settle))


if __name__ == "__main__":
    _main(sys.argv[1:])
