from . import doctor, lab  # noqa: F401
from . import steal  # noqa: F401
from . import blk  # noqa: F401
from . import exits  # noqa: F401
from . import top, export, record  # noqa: F401
from . import net  # noqa: F401
from . import qemu  # noqa: F401
