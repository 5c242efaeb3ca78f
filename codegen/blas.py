"""The GEMM shim: ``fxpress_sgemm``, a small C function the llvm kernels call for dense fp32 matmuls.

Why a shim and not TVM's own schedules: on this project's CPUs the scheduled TIR matmuls reached
10-45 % of the FMA peak, a tuned BLAS 80-100 % (docs/tuning.md, "BLAS route"). The TVM wheel links
no BLAS, but numpy's wheels ship OpenBLAS (DYNAMIC_ARCH: AVX-512 / AVX2 / SSE kernels picked at load
time for the CPU it runs on), so the runtime needs no package beyond numpy.

How it links. A generated PrimFunc calls the symbol ``fxpress_sgemm`` (``T.call_extern``):

* in-process (the JIT'd module ``build`` returns), the shim is a shared library compiled here once per
  source version (cached under ``$FXPRESS_CACHE_DIR/blas`` or ``~/.cache/fxpress/blas``) and opened
  with RTLD_GLOBAL, so the JIT finds the symbol;
* in an exported library, the shim's object file is linked in (``export_library(addons=...)``), so
  the artifact carries it and the runtime needs no compiler.

The shim binds a CBLAS sgemm by name through ``dlsym(RTLD_DEFAULT)`` on its first call
(runtime/blas.py makes numpy's OpenBLAS global first) and falls back to a plain loop when none is
present: an artifact never fails to run for want of a BLAS, it only runs slower (one warning on stderr).

Without a C compiler at build time, ``available()`` is False and matmuls keep TVM's schedules.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

from fxpress.runtime import blas as runtime_blas

SYMBOL = "fxpress_sgemm"

SHIM_SOURCE = r"""
/* fxpress GEMM shim (codegen/blas.py). Row-major, contiguous operands; batch strides may be 0. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#ifdef __cplusplus
extern "C" {
#endif
typedef void (*sgemm64_fn)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                           const float *, int64_t, float, float *, int64_t);
typedef void (*sgemm32_fn)(int, int, int, int32_t, int32_t, int32_t, float, const float *, int32_t,
                           const float *, int32_t, float, float *, int32_t);
static void *fxpress_blas_fn = 0;
static int fxpress_blas_ilp64 = 0;
static int fxpress_blas_state = 0; /* 1 bound, 2 none (plain loop); set once, under pthread_once */
static pthread_once_t fxpress_blas_once = PTHREAD_ONCE_INIT;
static const char *fxpress_blas_symbol = "none";

/* The shim runs one single-threaded BLAS call per TVM worker (the kernel's parallel loop), so the
   BLAS must not start threads of its own: two pools on the same cores fight (measured: 7x slower
   on a loaded 2-core machine). OpenBLAS's thread count is process-wide; it is set to 1 here. */
static void fxpress_blas_single_thread(void) {
  static const char *setters[] = {"scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                                  "openblas_set_num_threads64_", "openblas_set_num_threads",
                                  "MKL_Set_Num_Threads_Local",
                                  "bli_thread_set_num_threads", 0};
  int i;
  /* MKL: its sequential layer, chosen before its first call (a later call to this is ignored).
     The lower-case mkl_* setters take pointers (the Fortran interface): only the mixed-case ones. */
  void *layer = dlsym(RTLD_DEFAULT, "MKL_Set_Threading_Layer");
  if (layer) ((int (*)(int))layer)(1 /* MKL_THREADING_SEQUENTIAL */);
  for (i = 0; setters[i]; ++i) {
    void *f = dlsym(RTLD_DEFAULT, setters[i]);
    if (f) ((void (*)(int))f)(1);
  }
}

static void fxpress_blas_resolve(void) {
  static const char *names64[] = {"scipy_cblas_sgemm64_", "cblas_sgemm64_", 0};
  static const char *names32[] = {"scipy_cblas_sgemm", "cblas_sgemm", 0};
  int i;
  for (i = 0; names64[i]; ++i) {
    void *f = dlsym(RTLD_DEFAULT, names64[i]);
    if (f) { fxpress_blas_fn = f; fxpress_blas_ilp64 = 1; fxpress_blas_symbol = names64[i];
             fxpress_blas_single_thread(); fxpress_blas_state = 1; return; }
  }
  for (i = 0; names32[i]; ++i) {
    void *f = dlsym(RTLD_DEFAULT, names32[i]);
    if (f) { fxpress_blas_fn = f; fxpress_blas_ilp64 = 0; fxpress_blas_symbol = names32[i];
             fxpress_blas_single_thread(); fxpress_blas_state = 1; return; }
  }
  fprintf(stderr, "fxpress: no CBLAS sgemm in this process (numpy's OpenBLAS not loaded?); "
                  "matmuls run as plain loops, correct but slow\n");
  fxpress_blas_state = 2;
}

/* The first call may come from several TVM workers at once: resolve exactly once. */
#define FXPRESS_BLAS_READY() pthread_once(&fxpress_blas_once, fxpress_blas_resolve)

const char *fxpress_blas_name(void) {
  FXPRESS_BLAS_READY();
  return fxpress_blas_symbol;
}

static void fxpress_gemm1(int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, int ta,
                          const float *b, int64_t ldb, int tb, float *c, int64_t ldc) {
  if (fxpress_blas_state != 1) {
    int64_t i, j, k;
    for (i = 0; i < M; ++i)
      for (j = 0; j < N; ++j) {
        float s = 0.0f;
        for (k = 0; k < K; ++k)
          s += (ta ? a[k * lda + i] : a[i * lda + k]) * (tb ? b[j * ldb + k] : b[k * ldb + j]);
        c[i * ldc + j] = s;
      }
  } else if (fxpress_blas_ilp64) {
    ((sgemm64_fn)fxpress_blas_fn)(101, ta ? 112 : 111, tb ? 112 : 111, M, N, K, 1.0f, a, lda, b, ldb,
                                  0.0f, c, ldc);
  } else {
    ((sgemm32_fn)fxpress_blas_fn)(101, ta ? 112 : 111, tb ? 112 : 111, (int32_t)M, (int32_t)N,
                                  (int32_t)K, 1.0f, a, (int32_t)lda, b, (int32_t)ldb, 0.0f, c,
                                  (int32_t)ldc);
  }
}

/* Part `part` of `parts` of C[i] = op(A[i]) . op(B[i]) for i < batch (A[i] = A + i * sa, ...).
   Called once per iteration of the kernel's parallel loop. Whole batches go to workers when there
   are enough of them; otherwise each product is split by columns of C (16-aligned), so every
   worker packs only its own slice of B (a Linear's weight), or by rows of C when A is the larger
   operand (M > 2N: a convolution's weight times few output pixels), so none packs all of A. */
int32_t fxpress_sgemm(int64_t part, int64_t parts, int64_t batch, int64_t M, int64_t N, int64_t K,
                      const float *A, int64_t sa, int32_t ta, const float *B, int64_t sb, int32_t tb,
                      float *C, int64_t sc) {
  int64_t i, lda = ta ? M : K, ldb = tb ? K : N;
  FXPRESS_BLAS_READY();
  if (batch >= 2 * parts || (batch >= parts && batch % parts == 0)) {
    int64_t lo = batch * part / parts, hi = batch * (part + 1) / parts;
    for (i = lo; i < hi; ++i)
      fxpress_gemm1(M, N, K, A + i * sa, lda, ta, B + i * sb, ldb, tb, C + i * sc, N);
    return 0;
  }
  if (M > 2 * N) {
    int64_t chunk = (M + parts - 1) / parts, i0, i1;
    chunk = (chunk + 15) / 16 * 16;
    i0 = part * chunk;
    i1 = i0 + chunk < M ? i0 + chunk : M;
    if (i0 >= i1) return 0;
    for (i = 0; i < batch; ++i)
      fxpress_gemm1(i1 - i0, N, K, A + i * sa + (ta ? i0 : i0 * K), lda, ta, B + i * sb, ldb, tb,
                    C + i * sc + i0 * N, N);
    return 0;
  }
  {
    int64_t chunk = (N + parts - 1) / parts, j0, j1;
    chunk = (chunk + 15) / 16 * 16;
    j0 = part * chunk;
    j1 = j0 + chunk < N ? j0 + chunk : N;
    if (j0 >= j1) return 0;
    for (i = 0; i < batch; ++i)
      fxpress_gemm1(M, j1 - j0, K, A + i * sa, lda, ta, B + i * sb + (tb ? j0 * K : j0), ldb, tb,
                    C + i * sc + j0, N);
  }
  return 0;
}
/* ---- int8: C[M, N] (int32) = A[M, K] (uint8) . B[N, K]^T (int8), exact int32 sums ----
   Bound to MKL's cblas_gemm_s8u8s32 (row-major: A unsigned, B signed; AMX or VNNI on parts that have
   them) only after a probe shows it exact: without VNNI, MKL may sum u8 x s8 pairs in saturating int16
   (vpmaddubsw). Otherwise, and with no MKL, a plain exact loop. */
typedef void (*gemm_s8u8s32_fn)(int, int, int, int, int32_t, int32_t, int32_t, float, const void *, int32_t,
                                int8_t, const void *, int32_t, int8_t, float, int32_t *, int32_t,
                                const int32_t *);
static gemm_s8u8s32_fn fxpress_i8_fn = 0;
static pthread_once_t fxpress_i8_once = PTHREAD_ONCE_INIT;
static const char *fxpress_i8_symbol = "none";

static void fxpress_i8_loop(int64_t M, int64_t N, int64_t K, const uint8_t *a, const int8_t *b, int64_t ldb,
                            int32_t *c, int64_t ldc) {
  int64_t i, j, k;
  for (i = 0; i < M; ++i)
    for (j = 0; j < N; ++j) {
      int32_t s = 0;
      for (k = 0; k < K; ++k) s += (int32_t)a[i * K + k] * (int32_t)b[j * ldb + k];
      c[i * ldc + j] = s;
    }
}

static void fxpress_i8_resolve(void) {
  enum { PM = 4, PN = 16, PK = 256 };
  static uint8_t a[PM * PK];
  static int8_t b[PN * PK];
  static int32_t got[PM * PN], want[PM * PN];
  int32_t zero = 0;
  int i;
  void *f;
  FXPRESS_BLAS_READY(); /* MKL's sequential layer first */
  f = dlsym(RTLD_DEFAULT, "cblas_gemm_s8u8s32");
  if (!f) return;
  /* worst case for int16 pair sums: 255 x -128 everywhere, plus a pattern */
  for (i = 0; i < PM * PK; ++i) a[i] = (uint8_t)(i % 7 == 0 ? 3 * i : 255);
  for (i = 0; i < PN * PK; ++i) b[i] = (int8_t)(i % 5 == 0 ? i : -128);
  ((gemm_s8u8s32_fn)f)(101, 111, 112, 173, PM, PN, PK, 1.0f, a, PK, 0, b, PK, 0, 0.0f, got, PN, &zero);
  fxpress_i8_loop(PM, PN, PK, a, b, PK, want, PN);
  for (i = 0; i < PM * PN; ++i)
    if (got[i] != want[i]) {
      fprintf(stderr, "fxpress: cblas_gemm_s8u8s32 is not exact on this CPU (saturating int16 sums); "
                      "int8 GEMMs run as plain loops\n");
      return;
    }
  fxpress_i8_fn = (gemm_s8u8s32_fn)f;
  fxpress_i8_symbol = "cblas_gemm_s8u8s32";
}

const char *fxpress_blas_int8_name(void) {
  pthread_once(&fxpress_i8_once, fxpress_i8_resolve);
  return fxpress_i8_symbol;
}

/* Part `part` of `parts`, each worker one single-threaded call: the columns of C (16-aligned shares), or
   its rows when A is the larger operand (M > 2N: a convolution's pixels times its few output channels),
   so that no worker packs all of A. */
int32_t fxpress_gemm_u8s8(int64_t part, int64_t parts, int64_t M, int64_t N, int64_t K, const uint8_t *A,
                          const int8_t *B, int32_t *C) {
  int64_t i0 = 0, i1 = M, j0 = 0, j1 = N, chunk;
  int32_t zero = 0;
  pthread_once(&fxpress_i8_once, fxpress_i8_resolve);
  if (M > 2 * N) {
    chunk = ((M + parts - 1) / parts + 15) / 16 * 16;
    i0 = part * chunk;
    i1 = i0 + chunk < M ? i0 + chunk : M;
  } else {
    chunk = ((N + parts - 1) / parts + 15) / 16 * 16;
    j0 = part * chunk;
    j1 = j0 + chunk < N ? j0 + chunk : N;
  }
  if (i0 >= i1 || j0 >= j1) return 0;
  if (fxpress_i8_fn && M < 2147483647 && N < 2147483647 && K < 2147483647)
    fxpress_i8_fn(101, 111, 112, 173, (int32_t)(i1 - i0), (int32_t)(j1 - j0), (int32_t)K, 1.0f, A + i0 * K,
                  (int32_t)K, 0, B + j0 * K, (int32_t)K, 0, 0.0f, C + i0 * N + j0, (int32_t)N, &zero);
  else
    fxpress_i8_loop(i1 - i0, j1 - j0, K, A + i0 * K, B + j0 * K, K, C + i0 * N + j0, N);
  return 0;
}
#ifdef __cplusplus
}
#endif
"""

_state: dict = {}


def _cache_dir() -> str:
    base = os.environ.get("FXPRESS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxpress")
    return os.path.join(base, "blas")


def _compile() -> tuple[str, str] | None:
    """(object file, shared library) of the shim, compiled once per source version; None without gcc/cc."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None
    tag = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
    out = _cache_dir()
    obj, so = os.path.join(out, f"sgemm-{tag}.o"), os.path.join(out, f"sgemm-{tag}.so")
    if os.path.isfile(obj) and os.path.isfile(so):
        return obj, so
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        src = os.path.join(tmp, "sgemm.c")
        with open(src, "w") as f:
            f.write(SHIM_SOURCE)
        tmp_obj, tmp_so = os.path.join(tmp, "sgemm.o"), os.path.join(tmp, "sgemm.so")
        try:
            subprocess.run([cc, "-O2", "-fPIC", "-c", src, "-o", tmp_obj], check=True, capture_output=True)
            subprocess.run([cc, "-shared", tmp_obj, "-o", tmp_so, "-ldl", "-lpthread"], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        os.replace(tmp_obj, obj)  # atomic: concurrent builds see a whole file or none
        os.replace(tmp_so, so)
    return obj, so


def available() -> bool:
    """True when the shim is compiled and loaded into this process (``FXPRESS_BLAS=0`` turns it off)."""
    if os.environ.get("FXPRESS_BLAS", "1") == "0":
        return False
    if "ok" not in _state:
        built = _compile()
        _state["ok"] = False
        if built is not None:
            runtime_blas.preload()
            try:
                _state["lib"] = ctypes.CDLL(built[1], mode=ctypes.RTLD_GLOBAL)
            except OSError:
                return False
            _state["object"] = built[0]
            _state["ok"] = True
    return _state["ok"]


def object_file() -> str | None:
    """The shim's object file, to link into an exported library; None when unavailable."""
    return _state.get("object") if available() else None


INT8_SYMBOL = "fxpress_gemm_u8s8"


def bound_int8_symbol() -> str:
    """Which int8 GEMM the shim calls (``"cblas_gemm_s8u8s32"`` once a probe found it exact, else ``"none"``:
    its plain loop)."""
    if not available():
        return "none"
    fn = _state["lib"].fxpress_blas_int8_name
    fn.restype = ctypes.c_char_p
    return fn().decode()


def bound_symbol() -> str:
    """Which CBLAS function the shim in this process calls (``"none"``: the plain loop)."""
    if not available():
        return "none"
    fn = _state["lib"].fxpress_blas_name
    fn.restype = ctypes.c_char_p
    return fn().decode()
