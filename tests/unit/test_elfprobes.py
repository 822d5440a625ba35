"""ELF probe discovery: the real QEMU binary (checked against readelf), stapsdt notes, debuglink."""
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmbpf.elfprobes import debug_candidates, discover, parse_debuglink, parse_stapsdt
from kvmbpf.errors import KvmbpfError

QEMU = "/usr/bin/qemu-system-x86_64"
needs_qemu = pytest.mark.skipif(not Path(QEMU).is_file(), reason=f"needs {QEMU}")
needs_toolchain = pytest.mark.skipif(not all(map(shutil.which, ("gcc", "objcopy", "readelf"))),
                                     reason="needs gcc, objcopy and readelf")


def readelf_functions(path: str) -> dict[str, int]:
    """Defined FUNC symbols and their addresses, as binutils' readelf sees them."""
    out = subprocess.run(["readelf", "-W", "--dyn-syms", "--syms", path], capture_output=True,
                         text=True, check=True).stdout
    funcs = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[3] == "FUNC" and cols[6] != "UND" and int(cols[1], 16):
            funcs.setdefault(cols[7].split("@")[0], int(cols[1], 16))
    return funcs


@needs_qemu
@needs_toolchain
def test_discovers_the_exported_functions_of_the_real_qemu():
    points = discover(QEMU)
    truth = readelf_functions(QEMU)
    for name in ("memory_region_dispatch_write", "kvm_cpu_exec", "virtio_blk_handle_vq",
                 "virtqueue_pop", "virtio_notify", "blk_aio_preadv", "blk_aio_pwritev",
                 "qemu_send_packet"):
        assert points.functions[name].addr == truth[name], name
    assert set(points.functions) == set(truth)
    assert points.grep("^kvm_cpu_exec$").functions.keys() == {"kvm_cpu_exec"}


@needs_qemu
def test_unknown_function_is_one_line_with_a_suggestion():
    with pytest.raises(KvmbpfError) as err:
        discover(QEMU).require(["memory_region_dispatch_writ"])
    assert "memory_region_dispatch_write" in str(err.value) and "\n" not in str(err.value)


def test_missing_or_non_elf_binary_is_a_one_line_error(tmp_path):
    with pytest.raises(KvmbpfError, match="no such binary"):
        discover(str(tmp_path / "nope"))
    (tmp_path / "text").write_text("not an ELF file")
    with pytest.raises(KvmbpfError, match="not a readable ELF"):
        discover(str(tmp_path / "text"))
    with pytest.raises(KvmbpfError, match="--grep"):
        discover(QEMU if Path(QEMU).is_file() else "/bin/sh").grep("(unclosed")


def note(owner: bytes, ntype: int, desc: bytes, end: str = "<") -> bytes:
    """One ELF note as the gABI lays it out: sizes, type, owner and descriptor padded to 4."""
    name = owner + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack(end + "III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def stapsdt_desc(pc: int, base: int, sem: int, provider: bytes, name: bytes, args: bytes,
                 word: str = "<Q") -> bytes:
    fmt = word[0] + word[1] * 3
    return struct.pack(fmt, pc, base, sem) + provider + b"\0" + name + b"\0" + args + b"\0"


def test_parses_stapsdt_notes_built_from_the_documented_layout():
    blob = (note(b"stapsdt", 3, stapsdt_desc(0x401234, 0x600000, 0, b"qemu", b"virtio_notify",
                                             b"8@%rdi 8@%rsi"))
            + note(b"GNU", 3, b"\x01\x02\x03\x04")            # not a stapsdt note: ignored
            + note(b"stapsdt", 3, stapsdt_desc(0x401300, 0x600000, 0x700010, b"qemu",
                                               b"kvm_run_exit", b"-4@%eax")))
    probes = parse_stapsdt(blob)
    assert [(p.provider, p.name, p.pc, p.semaphore, p.args) for p in probes] == [
        ("qemu", "virtio_notify", 0x401234, 0, "8@%rdi 8@%rsi"),
        ("qemu", "kvm_run_exit", 0x401300, 0x700010, "-4@%eax")]
    assert probes[0].label == "qemu:virtio_notify"
    moved = parse_stapsdt(blob, base_delta=0x1000)
    assert [(p.pc, p.semaphore) for p in moved] == [(0x402234, 0), (0x401300 + 0x1000, 0x701010)]


def test_parses_32_bit_big_endian_stapsdt_notes():
    blob = note(b"stapsdt", 3, stapsdt_desc(0x1000, 0x2000, 0x3000, b"p", b"n", b"", word=">I"), ">")
    [probe] = parse_stapsdt(blob, elfclass=32, little=False)
    assert (probe.provider, probe.name, probe.pc, probe.semaphore, probe.args) == ("p", "n", 0x1000, 0x3000, "")


def test_truncated_note_is_refused():
    with pytest.raises(ValueError):
        parse_stapsdt(note(b"stapsdt", 3, stapsdt_desc(1, 2, 3, b"p", b"n", b"a"))[:-8])


def test_parses_debuglink_name_padding_and_crc():
    for name in (b"a.debug", b"abc", b"qemu-system-x86_64.debug"):
        blob = name + b"\0" * (1 + (-(len(name) + 1) % 4)) + struct.pack("<I", 0xDEADBEEF)
        assert parse_debuglink(blob) == (name.decode(), 0xDEADBEEF)
    with pytest.raises(ValueError):
        parse_debuglink(b"x.debug\0")


def test_debug_candidates_follow_gdb_conventions(tmp_path):
    got = debug_candidates("/usr/bin/qemu-system-x86_64", "q.debug", "abcdef12", tmp_path)
    assert got == [tmp_path / ".build-id/ab/cdef12.debug", Path("/usr/bin/q.debug"),
                   Path("/usr/bin/.debug/q.debug"), tmp_path / "usr/bin/q.debug"]


@needs_qemu
@needs_toolchain
def test_real_qemu_debuglink_matches_binutils(tmp_path):
    section = tmp_path / "debuglink"
    subprocess.run(["objcopy", "--dump-section", f".gnu_debuglink={section}", QEMU,
                    str(tmp_path / "copy")], check=True)
    strings = subprocess.run(["readelf", "--string-dump=.gnu_debuglink", QEMU], capture_output=True,
                             text=True, check=True).stdout
    name, crc = parse_debuglink(section.read_bytes())
    assert name.endswith(".debug") and name in strings.split()
    assert crc == struct.unpack("<I", section.read_bytes()[-4:])[0]


@needs_toolchain
def test_follows_debuglink_to_a_separate_debug_file(tmp_path):
    """A stripped binary whose static function only its debug file names."""
    src = tmp_path / "prog.c"
    src.write_text("static int __attribute__((noinline)) hidden_helper(int x) { return x * 3; }\n"
                   "int exported_entry(int x) { return hidden_helper(x) + 1; }\n"
                   "int main(int c, char **v) { return exported_entry(c); }\n")
    binary = tmp_path / "bin" / "prog"
    binary.parent.mkdir()
    subprocess.run(["gcc", "-O1", "-g", "-rdynamic", "-o", str(binary), str(src)], check=True)
    debug = tmp_path / "prog.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run(["objcopy", "--strip-all", f"--add-gnu-debuglink={debug}", str(binary)], check=True)
    root = tmp_path / "debugroot"
    installed = root / binary.parent.relative_to("/") / "prog.debug"
    installed.parent.mkdir(parents=True)
    assert not discover(str(binary), root).debug_file  # nothing installed yet
    shutil.copy(debug, installed)
    points = discover(str(binary), root)
    assert points.debug_file == str(installed)
    assert points.functions["exported_entry"].source == "dynsym"
    assert points.functions["hidden_helper"].source == "debug"
    assert points.functions["hidden_helper"].addr == readelf_functions(str(debug))["hidden_helper"]
    installed.write_bytes(installed.read_bytes() + b"x")  # CRC no longer matches: ignored
    assert discover(str(binary), root).debug_file is None
