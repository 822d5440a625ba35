#!/usr/bin/env python3
"""A tiny KVM VMM in pure Python, for tests that need a known exit mix.

It creates one VM with one vCPU and 64 KiB of RAM at guest-physical 0, runs
a handwritten real-mode program, and prints a JSON summary.  The program
does, in order:

    N x  out dx, al   to port 0x500   -> KVM_EXIT_IO each (SVM exit 'io', 0x7b)
    M x  cpuid                         -> handled in KVM  (SVM exit 'cpuid', 0x72)
    K x  mov es:[0], al  (GPA 0x90000, no memslot there)
                                       -> KVM_EXIT_MMIO each (SVM exit 'npf', 0x400)
    hlt                                -> KVM_EXIT_HLT    (SVM exit 'hlt', 0x78)

N, M, K come in SI, DI, BP (so at most 65535 each).  The machine code,
loaded at 0x1000 (CS=0, IP=0x1000, ES=0x9000):

    1000: ba 00 05      mov  dx, 0x500
    1003: 85 f6         test si, si        ; io loop
    1005: 74 04         jz   100b
    1007: ee            out  dx, al
    1008: 4e            dec  si
    1009: eb f8         jmp  1003
    100b: 85 ff         test di, di        ; cpuid loop
    100d: 74 08         jz   1017
    100f: 66 31 c0      xor  eax, eax      ; cpuid leaf 0
    1012: 0f a2         cpuid              ; (clobbers eax..edx, not the counters)
    1014: 4f            dec  di
    1015: eb f4         jmp  100b
    1017: 85 ed         test bp, bp        ; mmio loop
    1019: 74 07         jz   1022
    101b: 26 a2 00 00   mov  es:[0x0000], al
    101f: 4d            dec  bp
    1020: eb f5         jmp  1017
    1022: f4            hlt

With --repeat R (or --duration S) the program is run again after each hlt
(registers reset, same memory, so no new page faults for the code page).

Threads: the main thread is named --name (PR_SET_NAME, 15 chars max) and
holds the VM fd (anon_inode:kvm-vm) and vCPU fd; the vCPU runs in a second
thread named 'CPU 0/KVM' like QEMU's, whose tid is the common_pid of the
kvm_exit events.  --hold S keeps that thread and the fds alive S seconds
after the last hlt (e.g. for inventory tests); the JSON is printed at exit.

There is no in-kernel irqchip, so every IO/MMIO/HLT exit reaches this VMM.
Usage: vmm.py --io 100 --cpuid 50 --mmio 20 [--name NAME] [--repeat R]
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import struct
import sys
import threading
import time

# ---- KVM ABI (linux/kvm.h), x86-64 ----------------------------------------
KVMIO = 0xAE


def _IO(nr):
    return (KVMIO << 8) | nr


def _IOW(nr, size):
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _IOR(nr, size):
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, 32)
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, 144)
KVM_SET_REGS = _IOW(0x82, 144)
KVM_GET_SREGS = _IOR(0x83, 312)
KVM_SET_SREGS = _IOW(0x84, 312)

EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG",
    5: "HLT", 6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY",
    10: "INTR", 17: "INTERNAL_ERROR",
}
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 5, 6


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16)] + [
        (n, ctypes.c_uint8) for n in ("type", "present", "dpl", "db", "s", "l",
                                      "g", "avl", "unusable", "padding")]


class DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [(n, Segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", DTable), ("idt", DTable)] + [
        (n, ctypes.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")] + [
        ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class MemRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


assert ctypes.sizeof(Regs) == 144 and ctypes.sizeof(Sregs) == 312
assert ctypes.sizeof(MemRegion) == 32

# ---- the guest ----------------------------------------------------------
MEM_SIZE = 0x10000
CODE_ADDR = 0x1000
IO_PORT = 0x500
MMIO_SEG = 0x9000          # ES; the write goes to GPA 0x90000, beyond MEM_SIZE
MMIO_GPA = MMIO_SEG << 4
GUEST_CODE = bytes.fromhex(
    "ba0005"        # mov dx, 0x500
    "85f6" "7404" "ee" "4e" "ebf8"                    # io loop
    "85ff" "7408" "6631c0" "0fa2" "4f" "ebf4"        # cpuid loop
    "85ed" "7407" "26a20000" "4d" "ebf5"             # mmio loop
    "f4"            # hlt
)
MAX_COUNT = 0xFFFF

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15


def set_thread_name(name: str) -> None:
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _ioctl(fd, req, arg=0):
    while True:
        try:
            return fcntl.ioctl(fd, req, arg)
        except InterruptedError:
            continue


class TinyVM:
    def __init__(self, dev="/dev/kvm"):
        self.kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        api = _ioctl(self.kvm, KVM_GET_API_VERSION)
        if api != 12:
            raise RuntimeError(f"unexpected KVM API version {api}")
        self.vm = _ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.mem = mmap.mmap(-1, MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem[CODE_ADDR:CODE_ADDR + len(GUEST_CODE)] = GUEST_CODE
        self._mem_anchor = ctypes.c_char.from_buffer(self.mem)
        region = MemRegion(slot=0, flags=0, guest_phys_addr=0, memory_size=MEM_SIZE,
                           userspace_addr=ctypes.addressof(self._mem_anchor))
        _ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)
        self.vcpu = _ioctl(self.vm, KVM_CREATE_VCPU, 0)
        size = _ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.run = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = Sregs()
        _ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        sregs.cs.base, sregs.cs.selector = 0, 0
        sregs.es.base, sregs.es.selector = MMIO_GPA, MMIO_SEG
        _ioctl(self.vcpu, KVM_SET_SREGS, sregs)

    def reset(self, io, cpuid, mmio):
        regs = Regs(rip=CODE_ADDR, rflags=0x2, rsi=io, rdi=cpuid, rbp=mmio, rsp=0xF000)
        _ioctl(self.vcpu, KVM_SET_REGS, regs)

    def run_once(self, counts):
        """KVM_RUN until hlt; add each exit reason seen to counts."""
        while True:
            _ioctl(self.vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("<I", self.run, 8)[0]
            name = EXIT_NAMES.get(reason, str(reason))
            counts[name] = counts.get(name, 0) + 1
            if reason == KVM_EXIT_IO:
                direction, size, port, count = struct.unpack_from("<BBHI", self.run, 32)
                if (direction, size, port, count) != (1, 1, IO_PORT, 1):
                    raise RuntimeError(f"unexpected IO exit {direction, size, port, count}")
            elif reason == KVM_EXIT_MMIO:
                addr = struct.unpack_from("<Q", self.run, 32)[0]
                length, is_write = struct.unpack_from("<IB", self.run, 48)
                if (addr, length, is_write) != (MMIO_GPA, 1, 1):
                    raise RuntimeError(f"unexpected MMIO exit {addr:#x} len {length} w {is_write}")
            elif reason == KVM_EXIT_HLT:
                return
            else:
                regs = Regs()
                _ioctl(self.vcpu, KVM_GET_REGS, regs)
                raise RuntimeError(f"unexpected exit {name} at rip {regs.rip:#x}")

    def close(self):
        self.run.close()
        os.close(self.vcpu)
        os.close(self.vm)
        os.close(self.kvm)
        del self._mem_anchor
        self.mem.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--io", type=int, default=0, help="out instructions (KVM_EXIT_IO)")
    ap.add_argument("--cpuid", type=int, default=0, help="cpuid instructions (in-kernel)")
    ap.add_argument("--mmio", type=int, default=0, help="writes to unmapped GPA (KVM_EXIT_MMIO)")
    ap.add_argument("--repeat", type=int, default=1, help="run the program this many times")
    ap.add_argument("--duration", type=float, default=0.0,
                    help="instead of --repeat: rerun the program until this many seconds passed")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="keep the VM and vCPU thread alive this long after the last hlt")
    ap.add_argument("--name", default="kvmbpf-vmm", help="main thread name (comm)")
    ap.add_argument("--vcpu-name", default="CPU 0/KVM", help="vCPU thread name")
    args = ap.parse_args(argv)
    for k in ("io", "cpuid", "mmio"):
        if not 0 <= getattr(args, k) <= MAX_COUNT:
            ap.error(f"--{k} must be in 0..{MAX_COUNT}")

    set_thread_name(args.name)
    vm = TinyVM()
    counts: dict = {}
    info: dict = {}
    errors: list = []

    def vcpu_thread():
        set_thread_name(args.vcpu_name)
        info["vcpu_tid"] = threading.get_native_id()
        t0 = time.monotonic()
        runs = 0
        try:
            while True:
                vm.reset(args.io, args.cpuid, args.mmio)
                vm.run_once(counts)
                runs += 1
                if args.duration > 0:
                    if time.monotonic() - t0 >= args.duration:
                        break
                elif runs >= args.repeat:
                    break
        except Exception as e:  # reported in the JSON, exit code 1
            errors.append(f"{type(e).__name__}: {e}")
        info["runs"] = runs
        info["elapsed"] = round(time.monotonic() - t0, 6)
        if args.hold > 0:  # keep the vCPU thread (and the fds) visible
            time.sleep(args.hold)

    t = threading.Thread(target=vcpu_thread, name=args.vcpu_name)
    t.start()
    t.join()
    vm.close()
    runs = info.get("runs", 0)
    out = {
        "name": args.name,
        "pid": os.getpid(),
        "vcpu_tid": info.get("vcpu_tid"),
        "runs": runs,
        "per_run": {"io": args.io, "cpuid": args.cpuid, "mmio": args.mmio},
        # totals the guest was asked to do; cpuid never reaches userspace
        "expected": {"io": args.io * runs, "cpuid": args.cpuid * runs,
                     "mmio": args.mmio * runs, "hlt": runs},
        "exits": counts,   # KVM_RUN exit reasons seen by this VMM
        "elapsed": info.get("elapsed"),
        "errors": errors,
    }
    print(json.dumps(out, sort_keys=True))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
