"""The only module that imports bcc: compile a program, attach it, read its maps, detach.

Programs are C files in bpf_programs/; parameters reach them only as validated
integers (-D flags).  Tracepoints declared with TRACEPOINT_PROBE attach on load;
everything detaches in close(), which the session calls on every exit path.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import struct
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from .errors import KvmbpfError

_PARAM_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def programs_dir() -> Path:
    """Where the BPF C sources live: next to the package when installed, or in the checkout."""
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        installed = Path(str(resources.files("kvmbpf.bpf_programs")))
        if (installed / "kvmbpf.h").is_file():
            return installed
    return Path(__file__).resolve().parent.parent / "bpf_programs"


def require_root() -> None:
    if os.geteuid() != 0:
        raise KvmbpfError("kvmbpf needs root (or CAP_BPF and CAP_PERFMON) to load BPF programs")


def cflags_for(params: dict[str, int]) -> list[str]:
    """-D flags from integer parameters; anything else is refused (no strings reach C)."""
    flags = []
    for name, value in params.items():
        if not _PARAM_RE.match(name) or isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"BPF parameter {name}={value!r} is not an integer constant")
        flags.append(f"-D{name}={value}")
    return flags


def _import_bcc():
    try:
        import bcc  # noqa: PLC0415 (optional system package)
    except ImportError:
        raise KvmbpfError("bcc is not installed (Debian/Ubuntu: apt install python3-bpfcc)") from None
    return bcc


_NR_BPF = 321                    # x86-64
_BPF_OBJ_GET_INFO_BY_FD = 15
_PROG_INFO_SIZE = 232            # struct bpf_prog_info (UAPI, append-only)
_PROG_INFO_RECURSION_MISSES = 208


def bpf_syscall(cmd: int, attr: ctypes.Array) -> int:
    """bpf(2) without bcc; returns the result or -errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return ret if ret >= 0 else -ctypes.get_errno()


def recursion_misses(prog_fd: int) -> int:
    """Events the kernel did not deliver to a program because another BPF program was
    already running on that CPU (bpf_prog_info.recursion_misses, Linux 5.12+)."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = ctypes.create_string_buffer(struct.pack("IIQ", prog_fd, _PROG_INFO_SIZE,
                                                   ctypes.addressof(info)))
    if bpf_syscall(_BPF_OBJ_GET_INFO_BY_FD, attr) < 0:
        return 0
    return struct.unpack_from("Q", info, _PROG_INFO_RECURSION_MISSES)[0]


def fentry_probe() -> tuple[bool, str]:
    """Load and attach a trivial fentry program; (False, why) when the kernel refuses."""
    bcc = _import_bcc()
    err = io.StringIO()
    try:
        with _capture_stderr(err):
            prog = bcc.BPF(text=b"KFUNC_PROBE(do_nanosleep) { return 0; }")
    except Exception as exc:  # bcc raises bare Exception
        detail = _first_error(err.getvalue()) or str(exc)
        return False, f"cannot attach: {detail}"
    prog.cleanup()
    return True, "an fentry program attached"


def key_tuple(key: Any) -> tuple:
    """A ctypes map key as a tuple of its fields (bcc's padding fields left out)."""
    if not hasattr(key, "_fields_"):
        return (key.value,) if hasattr(key, "value") else (key,)
    out = []
    for name, _ in key._fields_:
        if name.startswith("__pad"):
            continue
        val = getattr(key, name)
        if isinstance(val, (bytes, bytearray)):
            val = bytes(val).split(b"\0", 1)[0].decode(errors="replace")
        elif hasattr(val, "_length_"):
            val = bytes(val).split(b"\0", 1)[0].decode(errors="replace")
        out.append(val)
    return tuple(out)


class Program:
    """One compiled, attached BPF program."""

    def __init__(self, name: str, params: dict[str, int] | None = None):
        require_root()
        bcc = _import_bcc()
        src = programs_dir() / f"{name}.bpf.c"
        if not src.is_file():
            raise KvmbpfError(f"BPF program {src} is missing")
        flags = [f"-I{programs_dir()}", "-Wno-macro-redefined"] + cflags_for(params or {})
        self.name = name
        err = io.StringIO()
        try:
            with _capture_stderr(err):
                self.bpf = bcc.BPF(src_file=str(src).encode(), cflags=flags)
        except Exception as exc:  # bcc raises bare Exception on compile/attach failure
            detail = _first_error(err.getvalue()) or str(exc)
            raise KvmbpfError(f"cannot load BPF program {name}: {detail}") from None

    def __enter__(self) -> "Program":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            self.bpf = None
            bpf.cleanup()

    def table(self, name: str):
        return self.bpf[name.encode()]

    def attach_uprobe(self, binary: str, sym: str, fn_name: str, ret: bool = False) -> None:
        """Attach handler fn_name to a function of a binary (every process; filter in BPF)."""
        attach = self.bpf.attach_uretprobe if ret else self.bpf.attach_uprobe
        err = io.StringIO()
        try:
            with _capture_stderr(err):
                attach(name=binary.encode(), sym=sym.encode(), fn_name=fn_name.encode(), pid=-1)
        except Exception as exc:  # bcc raises bare Exception
            detail = _first_error(err.getvalue()) or str(exc)
            raise KvmbpfError(f"cannot attach a uprobe to {sym} in {binary}: {detail}") from None

    def attach_kprobe(self, sym: str, fn_name: str) -> None:
        """Attach handler fn_name to the entry of kernel function sym."""
        err = io.StringIO()
        try:
            with _capture_stderr(err):
                self.bpf.attach_kprobe(event=sym.encode(), fn_name=fn_name.encode())
        except Exception as exc:  # bcc raises bare Exception
            detail = _first_error(err.getvalue()) or str(exc)
            raise KvmbpfError(f"cannot attach a kprobe to {sym}: {detail}") from None

    def missed_events(self) -> int:
        """Events lost to the kernel's recursion guard, summed over this program's functions."""
        return sum(recursion_misses(fn.fd) for fn in self.bpf.funcs.values())

    def fill(self, map_name: str, entries: dict[int, int]) -> None:
        """Make an integer->integer filter map hold exactly `entries`."""
        table = self.bpf[map_name.encode()]
        current = {k.value: v.value for k, v in table.items()}
        for key in set(current) - set(entries):
            del table[table.Key(key)]
        for key, val in entries.items():
            if current.get(key) != val:
                table[table.Key(key)] = table.Leaf(val)

    def read(self, map_name: str) -> dict[tuple, int]:
        """All entries of a counter map, per-CPU values summed, keys as tuples (one batch)."""
        table = self.bpf[map_name.encode()]
        out: dict[tuple, int] = {}
        for key, val in _items(table):
            total = sum(val) if hasattr(val, "_length_") else getattr(val, "value", val)
            out[key_tuple(key)] = out.get(key_tuple(key), 0) + int(total)
        return out

    def read_raw(self, map_name: str) -> list[tuple[Any, Any]]:
        """All entries with their ctypes values (for struct-valued maps)."""
        return list(_items(self.bpf[map_name.encode()]))


def _items(table) -> Iterator[tuple[Any, Any]]:
    """Batched lookup where the kernel offers it; the iterator otherwise."""
    try:
        yield from list(table.items_lookup_batch())
    except Exception:  # older kernels, array maps: bcc raises bare Exception
        yield from list(table.items())


@contextlib.contextmanager
def _capture_stderr(buf: io.StringIO):
    """bcc prints compiler diagnostics on fd 2; keep them for a one-line error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            buf.write(spool.read().decode(errors="replace"))


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else ""
