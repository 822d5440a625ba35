from . import lab  # noqa: F401
