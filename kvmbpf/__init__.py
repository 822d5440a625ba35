"""kvmbpf: per-VM answers for KVM hosts from in-kernel eBPF aggregates.

The public API is the collectors (``kvmbpf.collectors``), the inventory
(``kvmbpf.inventory``) and the Snapshot dataclasses they return.
"""

__version__ = "0.1.0"
