"""kvmbpf.btf against the running kernel's BTF, with bpftool's raw dump as the independent truth."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmbpf import btf
from kvmbpf.errors import KvmbpfError

needs_btf = pytest.mark.skipif(not Path(btf.VMLINUX).is_file(), reason="no kernel BTF (CONFIG_DEBUG_INFO_BTF)")
needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")
_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(?: size=(\d+))?")
_MEMBER = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")


def bpftool_types() -> dict[int, tuple[str, str, int | None, list[tuple[str, int, int, int]]]]:
    """id -> (KIND, name, size, members) from `bpftool btf dump ... format raw`."""
    text = subprocess.run(["bpftool", "btf", "dump", "file", btf.VMLINUX, "format", "raw"],
                          capture_output=True, text=True, check=True).stdout
    out: dict = {}
    current = None
    for line in text.splitlines():
        m = _TYPE.match(line)
        if m:
            current = int(m.group(1))
            out[current] = (m.group(2), "" if m.group(3) == "(anon)" else m.group(3),
                            int(m.group(4)) if m.group(4) else None, [])
            continue
        m = _MEMBER.match(line)
        if m and current is not None and out[current][0] in ("STRUCT", "UNION"):
            out[current][3].append((m.group(1).replace("(anon)", ""), int(m.group(2)), int(m.group(3)),
                                    int(m.group(4) or 0)))
    return out


@pytest.fixture(scope="module")
def truth():
    return bpftool_types()


@needs_btf
@needs_bpftool
def test_every_struct_and_union_matches_bpftool(truth):
    parsed = btf.vmlinux()
    assert len(parsed.types) - 1 == len(truth)
    kinds = {"STRUCT": btf.STRUCT, "UNION": btf.UNION}
    checked = 0
    for type_id, (kind, name, size, members) in truth.items():
        t = parsed.types[type_id]
        assert t.name == name, type_id
        if kind in kinds:
            assert t.kind == kinds[kind] and t.size_or_type == size, (type_id, name)
            assert [(m.name, m.type_id, m.bit_offset, m.bitfield_size) for m in t.members] == members
            checked += 1
    assert checked > 1000


def walk(truth, type_id: int, member: str, base: int = 0) -> int | None:
    """The test's own lookup through anonymous members, on bpftool's data."""
    for name, tid, bits, _ in truth[type_id][3]:
        if name == member:
            return base + bits
        if not name and truth[tid][0] in ("STRUCT", "UNION"):
            got = walk(truth, tid, member, base + bits)
            if got is not None:
                return got
    return None


@needs_btf
@needs_bpftool
@pytest.mark.parametrize("member", ["head", "data", "tail", "mac_header", "network_header", "dev", "len"])
def test_sk_buff_offsets_match_bpftool(truth, member):
    skb = next(i for i, (kind, name, _, _) in truth.items() if kind == "STRUCT" and name == "sk_buff")
    offset, size = btf.member_offset("sk_buff", member)
    assert offset * 8 == walk(truth, skb, member)
    assert size == {"head": 8, "data": 8, "dev": 8, "tail": 4, "len": 4}.get(member, 2)


@needs_btf
def test_net_device_name_and_functions():
    assert btf.member_offset("net_device", "name")[1] == 16
    assert btf.vmlinux().has_function("__netif_receive_skb")
    assert not btf.vmlinux().has_function("no_such_function_kvmbpf")


@needs_btf
def test_unknown_struct_or_member_is_an_error():
    with pytest.raises(KvmbpfError, match="no struct 'no_such_struct'"):
        btf.member_offset("no_such_struct", "x")
    with pytest.raises(KvmbpfError, match="has no member 'nope'"):
        btf.member_offset("sk_buff", "nope")


def test_bad_blob_is_an_error():
    with pytest.raises(KvmbpfError, match="bad magic"):
        btf.BTF(struct.pack("<HBBI", 0x1234, 1, 0, 24).ljust(24, b"\0"))
    with pytest.raises(KvmbpfError, match="too short"):
        btf.BTF(b"\x9f\xeb")


def test_synthetic_blob_anonymous_union_and_bitfield():
    """A hand-built blob: struct s { int a; union { int b; short c; }; int d:3; }."""
    strings = b"\0int\0s\0a\0b\0c\0d\0short\0"
    off = {s: strings.index(s.encode() + b"\0") for s in ("int", "s", "a", "b", "c", "d", "short")}
    types = b"".join([
        struct.pack("<3I", off["int"], btf.INT << 24, 4) + struct.pack("<I", 32),          # 1 int
        struct.pack("<3I", off["short"], btf.INT << 24, 2) + struct.pack("<I", 16),        # 2 short
        struct.pack("<3I", 0, btf.UNION << 24 | 2, 4)                                        # 3 anon union
        + struct.pack("<3I", off["b"], 1, 0) + struct.pack("<3I", off["c"], 2, 0),
        struct.pack("<3I", off["s"], 1 << 31 | btf.STRUCT << 24 | 3, 12)                    # 4 struct s
        + struct.pack("<3I", off["a"], 1, 0) + struct.pack("<3I", 0, 3, 32)
        + struct.pack("<3I", off["d"], 1, 3 << 24 | 64),
    ])
    blob = struct.pack("<HBBI4I", btf.MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings
    parsed = btf.BTF(blob)
    assert parsed.member_offset("s", "a") == (0, 4)
    assert parsed.member_offset("s", "c") == (4, 2)
    with pytest.raises(KvmbpfError, match="bitfield"):
        parsed.member_offset("s", "d")
