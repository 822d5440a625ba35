"""Which probe points a VMM binary offers: function symbols and USDT (SystemTap SDT) notes.

Uprobes attach to a function by name, so the names must come from the binary
itself: its .dynsym (a stripped Debian QEMU still exports ~9,000 functions),
its .symtab when present, and the separate debug file .gnu_debuglink or the
build id points to (/usr/lib/debug).  USDT probes are read from the
`.note.stapsdt` section that QEMU builds with the dtrace trace backend carry.

Note layout (SystemTap "UserSpaceProbeImplementation"): an ELF note with owner
"stapsdt", type 3, whose descriptor holds three address-sized words (probe pc,
link-time address of `.stapsdt.base`, semaphore address) followed by three
NUL-terminated strings: provider, probe name, argument description.
"""
from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .errors import KvmbpfError

STAPSDT_OWNER = b"stapsdt"
STAPSDT_TYPE = 3
DEBUG_ROOT = Path("/usr/lib/debug")


@dataclass(frozen=True)
class UsdtProbe:
    provider: str
    name: str
    pc: int              # probe address (already relocated by the .stapsdt.base difference)
    semaphore: int       # 0: the probe has no semaphore
    args: str            # e.g. "-4@%eax 8@%rdx"

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.name}"


@dataclass(frozen=True)
class FuncSymbol:
    name: str
    addr: int
    size: int
    source: str          # "dynsym" | "symtab" | "debug"


@dataclass
class ProbePoints:
    """Everything one binary offers to uprobes."""
    binary: str
    functions: dict[str, FuncSymbol] = field(default_factory=dict)
    usdt: list[UsdtProbe] = field(default_factory=list)
    debug_file: str | None = None

    def require(self, names: list[str]) -> list[FuncSymbol]:
        """The symbols for `names`; an unknown one is a one-line error naming the closest."""
        out = []
        for name in names:
            sym = self.functions.get(name)
            if sym is None:
                hint = close_names(name, self.functions)
                raise KvmbpfError(f"{self.binary} has no function {name!r}"
                                  + (f" (did you mean {', '.join(hint)}?)" if hint else "")
                                  + " — see `kvmbpf qemu probes --grep`")
            out.append(sym)
        return out

    def grep(self, pattern: str | None) -> "ProbePoints":
        """Only the probe points whose name matches a regular expression."""
        if not pattern:
            return self
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise KvmbpfError(f"--grep {pattern!r}: {exc}") from None
        return ProbePoints(self.binary,
                           {n: s for n, s in self.functions.items() if rx.search(n)},
                           [p for p in self.usdt if rx.search(p.label)], self.debug_file)


def close_names(name: str, known: dict[str, object], limit: int = 3) -> list[str]:
    import difflib
    return difflib.get_close_matches(name, list(known), n=limit, cutoff=0.75)


def parse_notes(data: bytes, little: bool = True) -> list[tuple[bytes, int, bytes]]:
    """(owner, type, descriptor) of each ELF note in a note section's bytes (4-byte aligned)."""
    end = "<" if little else ">"
    notes, pos = [], 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(end + "III", data, pos)
        pos += 12
        name = data[pos:pos + namesz].rstrip(b"\0")
        pos += _align4(namesz)
        desc = data[pos:pos + descsz]
        pos += _align4(descsz)
        if len(desc) != descsz:
            raise ValueError("truncated ELF note")
        notes.append((name, ntype, desc))
    return notes


def parse_stapsdt(data: bytes, elfclass: int = 64, little: bool = True,
                  base_delta: int = 0) -> list[UsdtProbe]:
    """USDT probes from the bytes of a .note.stapsdt section.

    base_delta: actual address of .stapsdt.base minus the one recorded in the
    note (non-zero when the binary was prelinked); it shifts pc and semaphore.
    """
    word = "Q" if elfclass == 64 else "I"
    fmt = ("<" if little else ">") + word * 3
    size = struct.calcsize(fmt)
    probes = []
    for owner, ntype, desc in parse_notes(data, little):
        if owner != STAPSDT_OWNER or ntype != STAPSDT_TYPE:
            continue
        pc, _base, sem = struct.unpack_from(fmt, desc, 0)
        strings = desc[size:].split(b"\0")
        if len(strings) < 3:
            raise ValueError("stapsdt note without provider/name/args strings")
        provider, name, args = (s.decode(errors="replace") for s in strings[:3])
        probes.append(UsdtProbe(provider, name, pc + base_delta,
                                sem + base_delta if sem else 0, args))
    return probes


def parse_debuglink(data: bytes, little: bool = True) -> tuple[str, int]:
    """(file name, CRC32) from a .gnu_debuglink section: name, NUL, pad to 4, 4-byte CRC."""
    nul = data.find(b"\0")
    if nul <= 0:
        raise ValueError(".gnu_debuglink has no file name")
    crc_at = _align4(nul + 1)
    if len(data) < crc_at + 4:
        raise ValueError(".gnu_debuglink is truncated")
    (crc,) = struct.unpack_from("<I" if little else ">I", data, crc_at)
    return data[:nul].decode(errors="replace"), crc


def debug_candidates(binary: str, link_name: str | None, build_id: str | None,
                     root: Path = DEBUG_ROOT) -> list[Path]:
    """Where GDB's conventions put a separate debug file, build-id path first."""
    out = []
    if build_id and len(build_id) > 2:
        out.append(root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug")
    if link_name:
        directory = Path(binary).resolve().parent
        out += [directory / link_name, directory / ".debug" / link_name,
                root / directory.relative_to("/") / link_name]
    return out


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def discover(binary: str, debug_root: Path = DEBUG_ROOT) -> ProbePoints:
    """All function symbols and USDT probes of an ELF binary (and its debug file)."""
    try:
        with open(binary, "rb") as fh:
            elf = ELFFile(fh)
            points = ProbePoints(str(binary))
            _add_functions(points, elf, from_debug_file=False)
            points.usdt = _usdt(elf)
            debug = _find_debug_file(binary, elf, debug_root)
    except FileNotFoundError:
        raise KvmbpfError(f"no such binary: {binary}") from None
    except (ELFError, OSError, ValueError) as exc:
        raise KvmbpfError(f"{binary}: not a readable ELF file ({exc})") from None
    if debug is not None:
        points.debug_file = str(debug)
        try:
            with open(debug, "rb") as fh:
                _add_functions(points, ELFFile(fh), from_debug_file=True)
        except (ELFError, OSError, ValueError):
            points.debug_file = None
    return points


def _add_functions(points: ProbePoints, elf: ELFFile, from_debug_file: bool) -> None:
    """Defined STT_FUNC symbols; the first source to name a function wins."""
    for kind in ("dynsym", "symtab"):
        section = elf.get_section_by_name(f".{kind}")
        if not isinstance(section, SymbolTableSection):   # absent, or NOBITS in a debug file
            continue
        source = "debug" if from_debug_file else kind
        for sym in section.iter_symbols():
            if (sym["st_info"]["type"] != "STT_FUNC" or sym["st_shndx"] == "SHN_UNDEF"
                    or not sym["st_value"] or not sym.name):
                continue
            name = sym.name.split("@", 1)[0]
            points.functions.setdefault(name, FuncSymbol(name, sym["st_value"], sym["st_size"], source))


def _usdt(elf: ELFFile) -> list[UsdtProbe]:
    notes = elf.get_section_by_name(".note.stapsdt")
    if notes is None:
        return []
    base = elf.get_section_by_name(".stapsdt.base")
    little = elf.little_endian
    probes = parse_stapsdt(notes.data(), elf.elfclass, little)
    if base is None or not probes:
        return probes
    # Every note records the link-time .stapsdt.base; compare with the section's address.
    recorded = _recorded_base(notes.data(), elf.elfclass, little)
    delta = base["sh_addr"] - recorded if recorded is not None else 0
    return parse_stapsdt(notes.data(), elf.elfclass, little, delta) if delta else probes


def _recorded_base(data: bytes, elfclass: int, little: bool) -> int | None:
    word = ("<" if little else ">") + ("Q" if elfclass == 64 else "I")
    for owner, ntype, desc in parse_notes(data, little):
        if owner == STAPSDT_OWNER and ntype == STAPSDT_TYPE:
            return struct.unpack_from(word, desc, struct.calcsize(word))[0]
    return None


def _find_debug_file(binary: str, elf: ELFFile, root: Path) -> Path | None:
    link = elf.get_section_by_name(".gnu_debuglink")
    name, crc = parse_debuglink(link.data(), elf.little_endian) if link is not None else (None, None)
    for candidate in debug_candidates(binary, name, _build_id(elf), root):
        if not candidate.is_file() or candidate.resolve() == Path(binary).resolve():
            continue
        if ".build-id" in candidate.parts or crc is None or file_crc32(candidate) == crc:
            return candidate
    return None


def _build_id(elf: ELFFile) -> str | None:
    section = elf.get_section_by_name(".note.gnu.build-id")
    if section is None:
        return None
    for owner, ntype, desc in parse_notes(section.data(), elf.little_endian):
        if owner == b"GNU" and ntype == 3:
            return desc.hex()
    return None


def _align4(n: int) -> int:
    return (n + 3) & ~3
