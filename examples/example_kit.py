"""What every troubleshooting example shares: the Diagnosis it returns, a lab of its own,
running the real `kvmbpf` command, and a main() that prints the answer.

Each example exposes `run(around=None) -> Diagnosis`.  `around(scenario)`, when given, is a
context manager entered just around the kvmbpf command: the tests use it to read their
ground truth (schedstat, serial output, disk statistics) before and after the command.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

from kvmbpf.lab.lab import Lab

Around = Optional[Callable[[Any], ContextManager]]


@dataclass
class Diagnosis:
    """What an example found, in one sentence and in the numbers that show it."""
    found: bool
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)


def new_lab() -> Lab:
    """A lab with a unique id: examples and tests may run next to other labs."""
    return Lab("ex" + uuid.uuid4().hex[:6])


def vm_name(prefix: str) -> str:
    """A unique VM name, short enough for its tap name (tap<name>, 15 characters)."""
    return f"{prefix}-{uuid.uuid4().hex[:4]}"


def around_command(around: Around, scenario: Any) -> ContextManager:
    return around(scenario) if around else contextlib.nullcontext()


def kvmbpf_command(*args: str) -> list[str]:
    """The kvmbpf CLI as an operator runs it (this interpreter, so the same install)."""
    return [sys.executable, "-m", "kvmbpf", *args]


def kvmbpf_json(*args: str, timeout: float = 120) -> list[dict]:
    """Run `kvmbpf ARGS --json` to completion; its JSON lines (one per interval)."""
    cmd = kvmbpf_command(*args, "--json")
    say(f"$ kvmbpf {shlex.join([*args, '--json'])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kvmbpf {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def say(text: str) -> None:
    """Progress for a person watching (stderr: stdout is the diagnosis)."""
    print(text, file=sys.stderr, flush=True)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(run: Callable[[], Diagnosis], question: str) -> int:
    """Run an example: the question, then the diagnosis and its evidence.  Ctrl-C or SIGTERM
    unwinds through the lab's context manager, so everything it made is removed."""
    signal.signal(signal.SIGTERM, _terminate)
    print(f"Question: {question}")
    try:
        diagnosis = run()
    except KeyboardInterrupt:
        print("interrupted: the lab was torn down", file=sys.stderr)
        return 130
    print(("FOUND: " if diagnosis.found else "NOT FOUND: ") + diagnosis.summary)
    print("Evidence:")
    for key, value in diagnosis.evidence.items():
        print(f"  {key}: {value}")
    return 0 if diagnosis.found else 1
