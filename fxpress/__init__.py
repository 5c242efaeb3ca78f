"""fxpress: compile PyTorch models with torch.fx compression passes, Apache TVM and ONNX.

This file imports nothing heavy: ``import fxpress.runtime`` runs it first, and the runtime must
work on a machine without torch. ``compile`` and friends load on first access.
"""
__version__ = "0.1.0"

_LAZY = {
    "compile": ("fxpress.api", "compile"),
    "CompiledModel": ("fxpress.compiled", "CompiledModel"),
    "Report": ("fxpress.report", "Report"),
    "Pass": ("fxpress.passes", "Pass"),
    "PassResult": ("fxpress.passes", "PassResult"),
    "PassContext": ("fxpress.passes", "PassContext"),
    "register_pass": ("fxpress.passes", "register_pass"),
    "available_passes": ("fxpress.passes", "available_passes"),
    "bound": ("fxpress.control", "bound"),
}

__all__ = ["__version__", "runtime", "errors", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("torch", "fxpress"):  # the torch-free runtime wheel
                raise ImportError(f"fxpress.{name} needs the full fxpress package with torch (`pip install "
                                  f"fxpress`); this installation has the runtime only ({e.name!r} is missing). "
                                  "fxpress.runtime.load(dir) runs exported artifacts.") from e
            raise
        value = getattr(module, attr)
        globals()[name] = value
        return value
    if name in ("runtime", "errors", "models", "passes", "lowering", "codegen"):
        import importlib

        return importlib.import_module(f"fxpress.{name}")
    raise AttributeError(f"module 'fxpress' has no attribute {name!r}")
