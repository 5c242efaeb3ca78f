"""Make a CBLAS sgemm visible to fxpress's GEMM shim (codegen/blas.py). Torch-free.

fxpress's llvm kernels call dense matmuls through ``fxpress_sgemm``, a small C function compiled into
the built library. It binds, on its first call, the first of these symbols it finds in the process's
global scope: ``scipy_cblas_sgemm64_`` (the OpenBLAS that numpy's wheels ship in ``numpy.libs``),
``cblas_sgemm64_``, ``scipy_cblas_sgemm``, ``cblas_sgemm``. numpy loads its OpenBLAS privately
(RTLD_LOCAL), so ``preload()`` opens it again with RTLD_GLOBAL before a library runs. With none found
the shim runs a plain C loop: correct, slow, and it says so once on stderr.
"""
from __future__ import annotations

import ctypes
import glob
import os

_loaded: str | None = None


def candidates() -> list[str]:
    """Paths of BLAS libraries to try, best first: ``$FXPRESS_BLAS_LIB``, then numpy's bundled OpenBLAS."""
    paths = []
    env = os.environ.get("FXPRESS_BLAS_LIB")
    if env:
        paths.append(env)
    try:
        import numpy

        root = os.path.dirname(os.path.dirname(numpy.__file__))
        for pattern in ("numpy.libs/libscipy_openblas*.so*", "numpy.libs/libopenblas*.so*",
                        "numpy/.dylibs/libscipy_openblas*.dylib"):
            paths.extend(sorted(glob.glob(os.path.join(root, pattern))))
    except ImportError:
        pass
    return paths


def preload() -> str | None:
    """Open the first loadable candidate with RTLD_GLOBAL (once per process); its path, or None."""
    global _loaded
    if _loaded is not None:
        return _loaded
    for path in candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = path
        return path
    return None
