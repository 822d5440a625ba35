"""Tracepoint `format` files: fields and the symbolic tables in `print fmt`.

The running kernel publishes the names kvmbpf shows (VMX/SVM exit reasons,
KVM_EXIT_*, skb drop reasons) inside the tracepoints' print formats, so we
parse them from there rather than carrying tables that go stale.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import KvmbpfError

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_root(mount: bool = True) -> Path:
    """Return the tracefs mount point, mounting it if missing and allowed."""
    for cand in TRACEFS_CANDIDATES:
        try:
            if Path(cand, "events").is_dir():
                return Path(cand)
        except PermissionError:
            raise KvmbpfError(f"{cand} is not readable: kvmbpf needs root "
                              "(or CAP_BPF and CAP_PERFMON with access to tracefs)") from None
    if mount and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS_CANDIDATES[0]],
                       capture_output=True, check=False)
        if not Path("/sys/kernel/debug/tracing").exists():
            subprocess.run(["mount", "-t", "debugfs", "nodev", "/sys/kernel/debug"],
                           capture_output=True, check=False)
        if Path(TRACEFS_CANDIDATES[0], "events").is_dir():
            return Path(TRACEFS_CANDIDATES[0])
    raise KvmbpfError("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")


def tracepoint_exists(group: str, name: str) -> bool:
    try:
        return (tracefs_root() / "events" / group / name / "format").is_file()
    except KvmbpfError:
        return False


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[Field, ...]
    print_fmt: str

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


_FIELD_RE = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);")


def parse_format(text: str) -> Format:
    """Parse the text of a tracefs `format` file."""
    name_m = re.search(r"^name:\s*(\S+)", text, re.M)
    fields = []
    for m in _FIELD_RE.finditer(text):
        decl = m.group("decl").strip()
        ident = re.sub(r"\[.*\]$", "", decl.split()[-1])
        fields.append(Field(ident, decl, int(m.group("off")), int(m.group("size")),
                            m.group("signed") == "1"))
    fmt_m = re.search(r"^print fmt:\s*(.*)$", text, re.M)
    return Format(name_m.group(1) if name_m else "", tuple(fields),
                  fmt_m.group(1) if fmt_m else "")


@lru_cache(maxsize=None)
def read_format(group: str, name: str) -> Format:
    path = tracefs_root() / "events" / group / name / "format"
    try:
        return parse_format(path.read_text())
    except OSError as exc:
        raise KvmbpfError(f"tracepoint {group}:{name} is not available: {exc.strerror}") from None


_PAIR_RE = re.compile(r'\{\s*([^,{}]+?)\s*,\s*((?:"[^"]*"\s*)+)\}')


def _eval_key(expr: str) -> int | None:
    """Evaluate a table key such as `0x040 + 13`, `-1` or `KVM_EXIT_IO` (None if symbolic)."""
    expr = expr.strip()
    if "|" in expr or "<<" in expr:
        return _eval_bits(expr)
    if not re.fullmatch(r"[0-9a-fA-FxX+\-\s()]+", expr):
        return None
    total = 0
    for sign, term in re.findall(r"([+-]?)\s*(0[xX][0-9a-fA-F]+|\d+)", expr):
        value = int(term, 0)
        total += -value if sign == "-" else value
    return total


_BIT_TERM_RE = re.compile(r"\(?\s*(0[xX][0-9a-fA-F]+|\d+)\s*(?:<<\s*(\d+))?\s*\)?")


def _eval_bits(expr: str) -> int | None:
    """A key such as `(1 << 0) | (1 << 2)` (kvm_emulate_insn's CPU modes); None if not that shape."""
    total = 0
    for term in expr.split("|"):
        m = _BIT_TERM_RE.fullmatch(term.strip())
        if m is None:
            return None
        total |= int(m.group(1), 0) << int(m.group(2) or 0)
    return total


def symbolic_tables(print_fmt: str, helper: str = "__print_symbolic") -> list[dict[int, str]]:
    """Every __print_symbolic (or helper="__print_flags") table in a print fmt, in order."""
    tables = []
    for m in re.finditer(re.escape(helper) + r"\(", print_fmt):
        depth, i = 1, m.end()
        while i < len(print_fmt) and depth:
            depth += {"(": 1, ")": -1}.get(print_fmt[i], 0)
            i += 1
        body = print_fmt[m.end():i - 1]
        table = {}
        for key, strings in _PAIR_RE.findall(body):
            code = _eval_key(key)
            if code is None:
                continue
            table[code] = "".join(re.findall(r'"([^"]*)"', strings))
        tables.append(table)
    return tables


def symbolic_table(group: str, name: str, index: int = 0) -> dict[int, str]:
    """The index-th symbolic table of a tracepoint on the running kernel ({} if absent)."""
    try:
        tables = symbolic_tables(read_format(group, name).print_fmt)
    except KvmbpfError:
        return {}
    return tables[index] if index < len(tables) else {}
