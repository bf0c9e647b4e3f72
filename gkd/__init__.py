"""GKD: generalizable knowledge distillation from vision foundation models."""
import gkd_torchvision_compat as _tv_compat

_tv_compat.install()  # also when the package is used from a source tree without the .pth

__version__ = "0.1.0"
