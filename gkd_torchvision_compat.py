"""Keep `import torchvision` working when its compiled extension cannot load.

PyPI's torchvision wheels are CUDA builds; paired with a CPU-only torch their C extension fails
to load, and `torchvision/__init__.py` then dies registering fake kernels for `torchvision::nms`
in `_meta_registrations` (and autograd kernels in `_autograd_registrations`). timm, transformers'
vision models and the accelerate CLI all import torchvision, so they fail too.

`install()` adds a meta-path finder that replaces exactly those two modules by empty ones, and only
after `torchvision.extension` reports that the compiled ops are missing. On a normal install the
finder returns None for every module and changes nothing. Imported from a `.pth` file, so it must
stay cheap: it imports nothing heavy until torchvision itself is being imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_SKIPPED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


class _EmptyModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):  # default module creation
        return None

    def exec_module(self, module) -> None:
        module.__doc__ = "skipped by gkd_torchvision_compat: torchvision's C extension is unavailable"


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _SKIPPED:
            return None
        extension = sys.modules.get("torchvision.extension")
        if extension is None or extension._has_ops():
            return None  # the ops loaded: import the real module
        return importlib.machinery.ModuleSpec(fullname, _EmptyModuleLoader())


def install() -> None:
    if not any(isinstance(f, _TorchvisionOpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionOpsFinder())
