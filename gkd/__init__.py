"""GKD: generalizable knowledge distillation from vision foundation models."""
import gkd_torchvision_compat as _tv_compat

_tv_compat.install()  # also when the package is used from a source tree without the .pth

__version__ = "0.1.0"

# `gkd.load(path)` (gkd/api.py) loads torch on first use only: `import gkd` and `gkd --help` stay cheap.
from gkd._lazy import lazy_exports as _lazy_exports  # noqa: E402

__getattr__, __dir__ = _lazy_exports(__name__, {"load": "api"})
