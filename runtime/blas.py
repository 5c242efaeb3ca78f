"""Make a CBLAS sgemm visible to fxpress's GEMM shim (codegen/blas.py). Torch-free.

fxpress's llvm kernels call dense matmuls through ``fxpress_sgemm``, a small C function compiled into
the built library. It binds, on its first call, the first of these symbols it finds in the process's
global scope: ``scipy_cblas_sgemm64_`` (the OpenBLAS that numpy's wheels ship in ``numpy.libs``),
``cblas_sgemm64_``, ``scipy_cblas_sgemm``, ``cblas_sgemm`` (Intel MKL's ``libmkl_rt``, from the ``mkl``
wheel). ``preload()`` opens exactly one library with RTLD_GLOBAL before a library runs, so the shim finds
that one. With none found the shim runs a plain C loop: correct, slow, and it says so once on stderr.

Which library: ``$FXPRESS_BLAS_LIB`` when set; otherwise every candidate present is *timed* on one
single-threaded transformer-sized sgemm and the fastest wins (no CPU vendor or ISA is assumed: on the
Intel Xeon of 2026-12-07 MKL ran 88-94 % of one core's FMA peak, OpenBLAS 71-74 %; on other parts the
order may differ). The candidates are opened RTLD_LOCAL to be timed, so the losers stay invisible.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import time

_loaded: str | None = None
_timings: dict[str, float] = {}  # path -> best seconds of the probe sgemm (what the choice saw)

# Probe: one BERT-sized projection, 128 x 256 x 256 (8.4 MFLOP, tens of microseconds).
_PROBE_M, _PROBE_N, _PROBE_K = 128, 256, 256


def _mkl_paths() -> list[str]:
    """Intel MKL's single dynamic library from the ``mkl`` wheel (installed under <prefix>/lib)."""
    found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found.extend(sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)[:1])
    return found


def _numpy_openblas_paths() -> list[str]:
    try:
        import numpy
    except ImportError:
        return []
    root = os.path.dirname(os.path.dirname(numpy.__file__))
    paths = []
    for pattern in ("numpy.libs/libscipy_openblas*.so*", "numpy.libs/libopenblas*.so*",
                    "numpy/.dylibs/libscipy_openblas*.dylib"):
        paths.extend(sorted(glob.glob(os.path.join(root, pattern))))
    return paths


def candidates() -> list[str]:
    """Paths of BLAS libraries to try: ``$FXPRESS_BLAS_LIB`` alone when set, else MKL and numpy's OpenBLAS."""
    env = os.environ.get("FXPRESS_BLAS_LIB")
    if env:
        return [env]
    return _mkl_paths() + _numpy_openblas_paths()


def _sgemm(lib: ctypes.CDLL):
    """The library's row-major sgemm as a callable (M, N, K, a, b, c), single-threaded; None if absent."""
    for name, index in (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
                        ("scipy_cblas_sgemm", ctypes.c_int), ("cblas_sgemm", ctypes.c_int)):
        fn = getattr(lib, name, None)
        if fn is not None:
            break
    else:
        return None
    # MKL: the sequential layer before its first call (the shim asks the same); OpenBLAS: one thread,
    # restored afterwards, because this is numpy's own OpenBLAS and numpy's thread count is the user's.
    layer = getattr(lib, "MKL_Set_Threading_Layer", None)
    if layer is not None:
        layer(ctypes.c_int(1))
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, index, ctypes.c_float,
                   ctypes.c_void_p, index, ctypes.c_void_p, index, ctypes.c_float, ctypes.c_void_p, index]

    def call(M, N, K, a, b, c):
        fn(101, 111, 111, M, N, K, 1.0, a, K, b, N, 0.0, c, N)
    return call


def _openblas_threads(lib: ctypes.CDLL):
    """(get, set) of an OpenBLAS's thread count, or None for other libraries."""
    for suffix in ("64_", ""):
        get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None) or \
            getattr(lib, f"openblas_get_num_threads{suffix}", None)
        put = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None) or \
            getattr(lib, f"openblas_set_num_threads{suffix}", None)
        if get is not None and put is not None:
            return get, put
    return None


def _probe_seconds(path: str) -> float | None:
    """Best time of the probe sgemm on one thread with the library at ``path``; None if unusable."""
    import numpy as np

    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError:
        return None
    call = _sgemm(lib)
    if call is None:
        return None
    threads = _openblas_threads(lib)
    saved = threads[0]() if threads else None
    if threads:
        threads[1](1)
    try:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((_PROBE_M, _PROBE_K), dtype=np.float32)
        b = rng.standard_normal((_PROBE_K, _PROBE_N), dtype=np.float32)
        c = np.empty((_PROBE_M, _PROBE_N), np.float32)
        best = float("inf")
        for i in range(12):  # the first calls pay for dispatch and buffers; the minimum resists load
            t0 = time.perf_counter()
            call(_PROBE_M, _PROBE_N, _PROBE_K, a.ctypes.data, b.ctypes.data, c.ctypes.data)
            if i >= 3:
                best = min(best, time.perf_counter() - t0)
        if not np.allclose(c, a @ b, rtol=1e-3, atol=1e-3):
            return None  # a library that computes something else is no candidate
        return best
    finally:
        if threads:
            threads[1](saved)


def preload() -> str | None:
    """Open the chosen library with RTLD_GLOBAL (once per process); its path, or None."""
    global _loaded
    if _loaded is not None:
        return _loaded
    paths = candidates()
    if len(paths) > 1:
        for p in paths:
            t = _probe_seconds(p)
            if t is not None:
                _timings[p] = t
        paths = sorted(_timings, key=_timings.get) or paths
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = path
        return path
    return None


def choice() -> dict:
    """What ``preload`` chose and the probe times it compared (microseconds), for reports."""
    return {"library": _loaded, "probe_us": {os.path.basename(p): round(t * 1e6, 1) for p, t in _timings.items()}}
