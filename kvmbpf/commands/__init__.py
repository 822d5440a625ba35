"""Subcommands beyond `vms`: each module registers itself on kvmbpf.cli.main."""
from . import blk, doctor, exits, export, lab, net, qemu, record, steal, top  # noqa: F401
