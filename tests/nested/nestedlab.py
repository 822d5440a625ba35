"""Run a shell script inside the nested KVM lab.

The lab is a Debian kernel booted by QEMU TCG with an emulated AMD EPYC CPU
(it has SVM), so inside it kvm-amd gives a /dev/kvm whose guests fire the
real kvm:kvm_exit / kvm:kvm_entry tracepoints, and the kernel has kprobes.
``setup.sh`` (next to this file) prepares the kernel and initramfs; see
README.md for the design.

    from tests.nested.nestedlab import nested_available, run_nested
    reason = nested_available()
    if reason: pytest.skip(reason)
    res = run_nested("ls /dev/kvm", timeout=300)
    assert res.rc == 0, res.stderr

In the guest the script runs as root in a chroot whose /usr is the host's
(read-only), with:
    /project  this checkout (read-only)
    /pysite   the running interpreter's site-packages (read-only), when it
              is not under /usr
    /nested   the per-run scratch share (read-write); files the script puts
              in /nested/artifacts/ come back in NestedResult.artifacts
    /tmp, /run  tmpfs
and PYTHONPATH=/project:/pysite, so ``python3 -m kvmbpf`` works.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent.parent
DEFAULT_CACHE = "/var/cache/kvmbpf-nested"
QEMU = "qemu-system-x86_64"
MAX_MEMORY_MB = 3072

# where tests/nested is seen from inside the guest
GUEST_TESTS_DIR = "/project/tests/nested"


@dataclass
class NestedResult:
    rc: int
    stdout: str
    stderr: str
    console: str = ""
    #: host wall-clock seconds from starting QEMU to its exit
    elapsed: float = 0.0
    #: guest uptime stamps (seconds): init_start, script_start, script_end
    timing: Dict[str, float] = field(default_factory=dict)
    #: files the script left in /nested/artifacts (name -> content)
    artifacts: Dict[str, bytes] = field(default_factory=dict)


class NestedError(RuntimeError):
    """The guest did not produce a result (boot failure, crash, timeout)."""

    def __init__(self, msg: str, console: str = "", qemu_pid: Optional[int] = None):
        tail = "\n".join(console.splitlines()[-40:])
        super().__init__(f"{msg}\n--- guest console (tail) ---\n{tail}" if tail else msg)
        self.console = console
        #: pid of the QEMU this run started (already reaped when raised)
        self.qemu_pid = qemu_pid


class NestedTimeout(NestedError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KVMBPF_NESTED_CACHE", DEFAULT_CACHE))


def _lab_env() -> Dict[str, str]:
    env = {}
    p = cache_dir() / "lab.env"
    for line in p.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            env[k.strip()] = v.strip().strip('"')
    return env


def nested_available() -> Optional[str]:
    """None if run_nested() can work here, else why not (for pytest.skip)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (run tests/nested/setup.sh as root)"
    cache = cache_dir()
    if not (cache / "lab.env").is_file():
        return f"nested lab not set up: no {cache}/lab.env (run tests/nested/setup.sh as root)"
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        if not (cache / name).is_file():
            return f"nested lab incomplete: {cache / name} missing (rerun tests/nested/setup.sh)"
    kver = _lab_env().get("KVER", "")
    if not Path(f"/usr/lib/modules/{kver}/build/include").is_dir():
        return (f"headers for the guest kernel {kver!r} missing on the host "
                f"(/usr/lib/modules/{kver}/build); bcc would fail in the guest")
    if not os.access(str(cache / "initramfs.cpio.gz"), os.R_OK):
        return f"cannot read {cache}/initramfs.cpio.gz"
    return None



def skip_module_unless_available() -> None:
    """pytest: skip the calling test module, naming what is missing, when run_nested() can't work."""
    import pytest  # noqa: PLC0415 (nestedlab also runs standalone, without pytest)
    why = nested_available()
    if why:
        pytest.skip(why, allow_module_level=True)

def _site_packages() -> Optional[str]:
    purelib = sysconfig.get_paths().get("purelib")
    if purelib and os.path.isdir(purelib) and not purelib.startswith("/usr/"):
        return purelib
    return None


def run_nested(
    script: str,
    timeout: float = 600,
    shares: Optional[Mapping[str, str]] = None,
    env: Optional[Mapping[str, str]] = None,
    memory_mb: int = MAX_MEMORY_MB,
    smp: int = 1,
    kernel_args: Sequence[str] = (),
) -> NestedResult:
    """Boot the lab, run ``script`` in it, return its exit code and output.

    script:  shell script text; run with /bin/sh unless it starts with '#!'.
    timeout: seconds for the whole run (boot + script + poweroff); on expiry
             the QEMU started here is killed and NestedTimeout is raised.
    shares:  extra read-only host dirs, {guest mount point: host path}.
    env:     extra environment variables for the script.
    """
    reason = nested_available()
    if reason:
        raise NestedError(reason)
    if memory_mb > MAX_MEMORY_MB:
        raise ValueError(f"memory_mb is capped at {MAX_MEMORY_MB}")
    cache = cache_dir()
    work = Path(tempfile.mkdtemp(prefix="kvmbpf-nested-"))
    proc = None
    try:
        os.chmod(work, 0o755)
        (work / "artifacts").mkdir()
        script_path = work / "script"
        script_path.write_text(script)
        script_path.chmod(0o755)

        # 9p shares: (tag, host path, guest mount point, read-only)
        mounts = [("project", str(PROJECT_ROOT), "/project", True)]
        site = _site_packages()
        if site:
            mounts.append(("pysite", site, "/pysite", True))
        for i, (gpath, hpath) in enumerate(sorted((shares or {}).items())):
            if not gpath.startswith("/") or any(c.isspace() or c == ":" for c in gpath):
                raise ValueError(f"bad guest mount point {gpath!r}")
            mounts.append((f"share{i}", str(Path(hpath).resolve()), gpath, True))

        (work / "config.sh").write_text(
            "NESTED_MOUNTS=" + shlex.quote(" ".join(
                f"{tag}:{g}:{'ro' if ro else 'rw'}" for tag, _, g, ro in mounts)) + "\n")

        genv = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "PYTHONPATH": "/project" + (":/pysite" if site else ""),
            "PYTHONDONTWRITEBYTECODE": "1",
            "KVMBPF_NESTED": "1",
            "NESTED_TESTS": GUEST_TESTS_DIR,
            "ARTIFACTS": "/nested/artifacts",
        }
        genv.update(env or {})
        runner = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in genv.items())
        runner += "cd /tmp\n"
        runner += ("exec /nested/script\n" if script.startswith("#!")
                   else "exec /bin/sh /nested/script\n")
        (work / "run.sh").write_text(runner)

        console = work / "console.log"
        append = " ".join(["console=ttyS0", "panic=-1", "quiet", "mitigations=off",
                           *kernel_args])
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", "EPYC", "-m", str(memory_mb),
            "-smp", str(smp), "-nodefaults", "-no-user-config", "-nic", "none",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console}",
            "-kernel", str(cache / "vmlinuz"),
            "-initrd", str(cache / "initramfs.cpio.gz"),
            "-append", append,
            "-virtfs", "local,path=/usr,mount_tag=hostusr,readonly=on,"
                       "security_model=none,multidevs=remap",
            "-virtfs", f"local,path={work},mount_tag=nestedwork,security_model=none",
        ]
        for tag, hpath, _, ro in mounts:
            cmd += ["-virtfs", f"local,path={hpath},mount_tag={tag},"
                               f"{'readonly=on,' if ro else ''}security_model=none,multidevs=remap"]

        t0 = time.monotonic()
        with open(work / "qemu.log", "wb") as qlog:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog,
                                    stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        elapsed = time.monotonic() - t0
        timed_out = proc.poll() is None
        if timed_out:
            _kill(proc)
        cons = _read(console)
        if timed_out:
            raise NestedTimeout(f"nested run timed out after {timeout:.0f}s", cons, proc.pid)
        rc_file = work / "rc"
        if not rc_file.is_file():
            raise NestedError(
                f"guest produced no exit code (qemu rc {proc.returncode}; "
                f"qemu said: {_read(work / 'qemu.log').strip()[-500:]})", cons, proc.pid)
        timing = {}
        for line in _read(work / "timing").splitlines():
            parts = line.split()
            if len(parts) == 2:
                try:
                    timing[parts[0]] = float(parts[1])
                except ValueError:
                    pass
        artifacts = {}
        for p in sorted((work / "artifacts").rglob("*")):
            if p.is_file():
                artifacts[str(p.relative_to(work / "artifacts"))] = p.read_bytes()
        return NestedResult(
            rc=int(rc_file.read_text().strip() or -1),
            stdout=_read(work / "stdout"),
            stderr=_read(work / "stderr"),
            console=cons,
            elapsed=elapsed,
            timing=timing,
            artifacts=artifacts,
        )
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc)
        shutil.rmtree(work, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the QEMU we started (only that pid) and reap it."""
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""


if __name__ == "__main__":  # manual use: python3 nestedlab.py 'script text'
    import sys

    why = nested_available()
    if why:
        sys.exit(f"nested lab unavailable: {why}")
    r = run_nested(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    print(f"[nested: rc={r.rc} elapsed={r.elapsed:.1f}s timing={r.timing}]", file=sys.stderr)
    sys.exit(r.rc)
