from . import doctor, lab  # noqa: F401
