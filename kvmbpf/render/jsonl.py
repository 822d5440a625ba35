"""JSON lines: one object per interval, the Snapshot dataclasses as plain data."""
from __future__ import annotations

import json
import sys
from typing import TextIO

from ..snapshot import plain


def write_snapshot(snapshot: object, out: TextIO = sys.stdout) -> None:
    out.write(json.dumps(plain(snapshot), sort_keys=False) + "\n")
    out.flush()
