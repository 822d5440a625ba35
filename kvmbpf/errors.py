"""The one exception type the CLI turns into a one-line message and exit status 2."""


class KvmbpfError(Exception):
    """A user-facing error: bad input, missing privilege, missing kernel feature."""
