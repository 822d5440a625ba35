"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

kvmbpf reads a few kernel struct fields (sk_buff, net_device) where the headers
bcc compiles against may not match the kernel.  BTF is the kernel's own
description of its types, so offsets taken from it are right for this kernel.
Only what that needs is parsed: the header, the type section (every kind is
walked to find where each type starts; STRUCT/UNION members and sizes are
kept) and the string section.  Format: the kernel's Documentation/bpf/btf.rst.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import KvmbpfError

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F
POINTER_SIZE = 8

# kinds (btf.rst "Type encoding")
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
#: bytes that follow struct btf_type: fixed, or per vlen item
_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_ITEM = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_NO_EXTRA = {PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG}
_SIZED = {INT, STRUCT, UNION, ENUM, FLOAT, ENUM64}
_ALIASES = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int          # 0: not a bitfield


@dataclass(frozen=True)
class Type:
    kind: int
    name: str
    size_or_type: int           # size for sized kinds, referenced type id otherwise
    members: tuple[Member, ...] = ()
    array: tuple[int, int] = (0, 0)     # ARRAY: (element type id, nelems)


class BTF:
    """The types of one raw BTF blob (type id i is types[i]; 0 is void)."""

    def __init__(self, blob: bytes):
        if len(blob) < 24:
            raise KvmbpfError("BTF: too short for a header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", blob)
        if magic != MAGIC:
            raise KvmbpfError(f"BTF: bad magic {magic:#x} (not little-endian BTF)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<4I", blob, 8)
        self.version = version
        self.strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        self.types: list[Type | None] = [None]
        self.by_name: dict[str, list[int]] = {}
        self._parse(blob, hdr_len + type_off, hdr_len + type_off + type_len)

    def _str(self, off: int) -> str:
        end = self.strings.index(b"\0", off)
        return self.strings[off:end].decode()

    def _parse(self, blob: bytes, pos: int, end: int) -> None:
        unpack = struct.unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack("<3I", blob, pos)
            pos += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            members: tuple[Member, ...] = ()
            array = (0, 0)
            if kind in (STRUCT, UNION):
                members = tuple(self._member(unpack("<3I", blob, pos + 12 * i), kflag) for i in range(vlen))
            elif kind == ARRAY:
                elem, _index, nelems = unpack("<3I", blob, pos)
                array = (elem, nelems)
            elif kind not in _FIXED and kind not in _PER_ITEM and kind not in _NO_EXTRA:
                raise KvmbpfError(f"BTF: unknown kind {kind} at type {len(self.types)}")
            pos += _FIXED.get(kind, 0) + _PER_ITEM.get(kind, 0) * vlen
            name = self._str(name_off) if name_off else ""
            if name and kind in (STRUCT, UNION, FUNC):
                self.by_name.setdefault(name, []).append(len(self.types))
            self.types.append(Type(kind, name, size_or_type, members, array))

    def _member(self, raw: tuple[int, int, int], kflag: int) -> Member:
        name_off, type_id, offset = raw
        if kflag:
            return Member(self._str(name_off) if name_off else "", type_id, offset & 0xFFFFFF, offset >> 24)
        return Member(self._str(name_off) if name_off else "", type_id, offset, 0)

    def resolve(self, type_id: int) -> Type:
        """The type behind typedefs and qualifiers."""
        t = self.types[type_id]
        while t is not None and t.kind in _ALIASES:
            t = self.types[t.size_or_type]
        if t is None:
            raise KvmbpfError(f"BTF: type {type_id} is void")
        return t

    def size(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t.kind in _SIZED:
            return t.size_or_type
        if t.kind == PTR:
            return POINTER_SIZE
        if t.kind == ARRAY:
            return t.array[1] * self.size(t.array[0])
        raise KvmbpfError(f"BTF: type {type_id} (kind {t.kind}) has no size")

    def struct(self, name: str) -> int:
        """Type id of the (first, complete) struct or union called `name`."""
        for type_id in self.by_name.get(name, []):
            if self.types[type_id].kind in (STRUCT, UNION):
                return type_id
        raise KvmbpfError(f"BTF: no struct {name!r} in the kernel's BTF")

    def has_function(self, name: str) -> bool:
        return any(self.types[i].kind == FUNC for i in self.by_name.get(name, []))

    def member_offset(self, struct_name: str, member: str) -> tuple[int, int]:
        """(byte offset, byte size) of a member, looking into anonymous structs/unions."""
        found = self._find(self.struct(struct_name), member, 0)
        if found is None:
            raise KvmbpfError(f"BTF: struct {struct_name} has no member {member!r}")
        bits, m = found
        if m.bitfield_size or bits % 8:
            raise KvmbpfError(f"BTF: {struct_name}.{member} is a bitfield")
        return bits // 8, self.size(m.type_id)

    def _find(self, type_id: int, member: str, base: int) -> tuple[int, Member] | None:
        for m in self.resolve(type_id).members:
            if m.name == member:
                return base + m.bit_offset, m
            if not m.name and self.resolve(m.type_id).kind in (STRUCT, UNION):
                found = self._find(m.type_id, member, base + m.bit_offset)
                if found:
                    return found
        return None


@lru_cache(maxsize=1)
def vmlinux() -> BTF:
    """The running kernel's BTF (a one-line error when it is not there)."""
    try:
        blob = Path(VMLINUX).read_bytes()
    except OSError as exc:
        raise KvmbpfError(f"no kernel BTF ({VMLINUX}: {exc.strerror}); the kernel needs "
                          "CONFIG_DEBUG_INFO_BTF") from None
    return BTF(blob)


def member_offset(struct_name: str, member: str) -> tuple[int, int]:
    """(byte offset, byte size) of struct_name.member in the running kernel."""
    return vmlinux().member_offset(struct_name, member)
