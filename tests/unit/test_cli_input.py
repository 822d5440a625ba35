"""Validation that must never reach BPF or produce a traceback."""
import pytest

from kvmbpf.bpf import cflags_for
from kvmbpf.errors import KvmbpfError
from kvmbpf.session import Timing


def test_only_integers_become_cflags():
    assert cflags_for({"MAX_VMS": 4}) == ["-DMAX_VMS=4"]
    for bad in ({"X": "1; evil"}, {"X": 1.5}, {"X": True}, {"bad name": 1}, {"X-Y": 1}):
        with pytest.raises(ValueError):
            cflags_for(bad)


@pytest.mark.parametrize("timing", [Timing(0, None, None), Timing(-1, 3, None),
                                    Timing(1, 0, None), Timing(None, None, -2)])
def test_bad_timing(timing):
    with pytest.raises(KvmbpfError):
        timing.validate()
