"""Build the lab's guest programs (guests/*.asm) with nasm, parameters as -D integers."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from ..errors import KvmbpfError

GUEST_DIR = Path(__file__).resolve().parent / "guests"
IMAGE_SIZE = 1474560          # a floppy-sized image: stage 2 fits in the first track
CACHE = Path("/var/tmp/kvmbpf-lab/images")

#: Defaults for every guest parameter; a guest uses the ones it names.
DEFAULTS: dict[str, int] = {
    "PIO_PORT": 0x700, "PIO_COUNT": 0, "PIC_COUNT": 0, "MMIO_ADDR": 0x80000000, "MMIO_COUNT": 0,
    "CPUID_COUNT": 0, "CR0_COUNT": 0, "DELAY_MS": 0, "ROUNDS": 1, "FINISH": 0,
    "DISK_DRIVE": 0x81, "READS": 0, "WRITES": 0, "FIRST_LBA": 0,
    "UDP_COUNT": 0, "UDP_PORT": 9, "UDP_LEN": 64, "GO_WAIT": 0,
    "SPIN_COUNT": 0,
}


def build(guest: str, params: dict[str, int]) -> Path:
    """Assemble guests/<guest>.asm with the given integer parameters; cached by content."""
    src = GUEST_DIR / f"{guest}.asm"
    if not src.is_file():
        known = ", ".join(sorted(p.stem for p in GUEST_DIR.glob("*.asm")))
        raise KvmbpfError(f"unknown lab guest {guest!r} (guests: {known})")
    values = {**DEFAULTS, **params}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KvmbpfError(f"lab guest parameter {key} must be a non-negative integer")
    if shutil.which("nasm") is None:
        raise KvmbpfError("nasm is not installed (apt install nasm): the lab builds its guests with it")
    digest = hashlib.sha256()
    for path in sorted(GUEST_DIR.glob("*.*")):
        digest.update(path.read_bytes())
    digest.update(repr(sorted(values.items())).encode() + guest.encode())
    out = CACHE / f"{guest}-{digest.hexdigest()[:16]}.img"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    cmd = ["nasm", "-f", "bin", "-I", f"{GUEST_DIR}/", "-o", str(tmp), str(src)]
    cmd += [f"-D{k}={v}" for k, v in values.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KvmbpfError(f"nasm failed for {guest}: {proc.stderr.strip().splitlines()[0]}")
    with open(tmp, "r+b") as fh:
        fh.truncate(IMAGE_SIZE)
    tmp.rename(out)
    return out
