"""What the CLI shows while it compiles: one progress line per stage, and none of the machinery's noise.

Compiling drives torch.export, the ONNX exporter and TVM, which print FutureWarnings, dumped
``def forward`` graphs, "Unable to find user code corresponding to {u0}", onnxscript's "Evaluation
failed", and TVM's C++ "Fast mode segfaults..." warning. ``quiet_machinery()`` captures all of that
(Python warnings, log records, and the process's stdout/stderr file descriptors, where C++ writes)
unless ``verbose``. What it never hides:

- Python warnings attributed to the user's own code (any file outside the machinery packages),
  shown once each after the compile;
- fxpress's own log warnings (``fxpress.*`` loggers: a pass skipped a layer, a bad tuning file);
- progress (``StageProgress``) and tqdm bars (tuning), which write to ``sys.stderr``: during the
  capture that is a stream on the terminal's original descriptor.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings

# Packages whose warnings are machinery noise (the model author cannot act on them).
MACHINERY = ("torch", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "tvm", "tvm_ffi", "numpy", "sympy",
             "fxpress", "triton", "functorch")


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("FXPRESS_VERBOSE", "0") not in ("", "0")


def _machinery_dirs() -> list[str]:
    import importlib.util

    dirs = [os.path.dirname(os.__file__)]  # the standard library
    for name in MACHINERY:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            dirs.extend(os.path.realpath(p) for p in (spec.submodule_search_locations or []))
    import fxpress

    # fxpress.passes, .lowering, .codegen, .runtime live beside fxpress/ in a source checkout
    for sub in ("passes", "lowering", "codegen", "runtime", "models"):
        try:
            mod = __import__(f"fxpress.{sub}", fromlist=["_"])
            dirs.append(os.path.realpath(os.path.dirname(mod.__file__)))
        except Exception:  # noqa: BLE001
            pass
    dirs.append(os.path.realpath(os.path.dirname(fxpress.__file__)))
    return dirs


def is_users(filename: str, machinery: list[str]) -> bool:
    """True when a warning attributed to ``filename`` comes from the user's code, not the machinery."""
    if not filename or filename.startswith("<"):
        return False
    real = os.path.realpath(filename)
    return not any(real == d or real.startswith(d + os.sep) for d in machinery)


class _FxpressToTerminal(logging.Handler):
    """fxpress's own warnings (about the user's model) stay visible during the capture."""

    def __init__(self, stream):
        super().__init__(logging.WARNING)
        self.stream = stream
        self.setFormatter(logging.Formatter("fxpress: %(message)s"))

    def emit(self, record):
        try:
            self.stream.write(self.format(record).split("\n", 1)[0] + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def quiet_machinery(verbose: bool = False):
    """Capture the machinery's console output for the duration (see the module docstring).

    Yields a ``Captured`` whose ``text()`` holds what was hidden (for an error hint)."""
    captured = Captured()
    if verbose:
        yield captured
        return
    machinery = _machinery_dirs()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:  # no stdout/stderr descriptors (a daemon): nothing to capture from
        yield captured
        return
    log_file = tempfile.TemporaryFile(mode="w+b")
    terminal = io.TextIOWrapper(os.fdopen(os.dup(saved_fds[2]), "wb", buffering=0), write_through=True,
                                errors="replace")
    real_err_obj, real_out_obj = sys.stderr, sys.stdout
    # In a test (or a caller that swapped sys.stderr for an object), keep writing to that object.
    progress_stream = real_err_obj if not _is_fd_stream(real_err_obj, 2) else terminal
    capture_text = io.TextIOWrapper(os.fdopen(os.dup(log_file.fileno()), "wb", buffering=0), write_through=True,
                                    errors="replace")
    fx_logger = logging.getLogger("fxpress")
    handler = _FxpressToTerminal(progress_stream)
    saved_last_resort = logging.lastResort
    saved_propagate = fx_logger.propagate
    try:
        for fd in (1, 2):
            os.dup2(log_file.fileno(), fd)
        sys.stdout = capture_text
        sys.stderr = progress_stream
        logging.lastResort = logging.StreamHandler(capture_text)
        logging.lastResort.setLevel(logging.WARNING)
        fx_logger.addHandler(handler)
        fx_logger.propagate = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # once per location: hot loops (bench) stay cheap
            try:
                yield captured
            finally:
                captured.user_warnings = _show_users_warnings(caught, machinery, progress_stream, capture_text)
    finally:
        fx_logger.removeHandler(handler)
        fx_logger.propagate = saved_propagate
        logging.lastResort = saved_last_resort
        sys.stdout, sys.stderr = real_out_obj, real_err_obj
        for fd, saved in saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        capture_text.flush()
        capture_text.close()
        terminal.close()
        log_file.seek(0)
        captured.data = log_file.read().decode("utf-8", "replace")
        log_file.close()


def _is_fd_stream(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _show_users_warnings(caught, machinery, terminal, capture) -> int:
    seen = set()
    shown = 0
    for w in caught:
        key = (str(w.message), w.category, w.filename, w.lineno)
        if key in seen:
            continue
        seen.add(key)
        text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
        if is_users(w.filename, machinery):
            terminal.write(text)
            shown += 1
        else:
            capture.write(text)
    terminal.flush()
    return shown


class Captured:
    def __init__(self):
        self.data = ""
        self.user_warnings = 0

    def text(self) -> str:
        return self.data

    def lines(self) -> int:
        return len([line for line in self.data.splitlines() if line.strip()])


class StageProgress:
    """Prints ``  <stage>  <seconds> s`` as each compile stage (trace, every pass, lowering) finishes.

    Every stage ends by creating its ``StageRecord`` (with its name and seconds), so the progress hook
    wraps that class's constructor for the duration of the compile; nothing in the compiler changes.
    """

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self.start = time.perf_counter()
        self._done: list[tuple[str, float]] = []

    def __enter__(self):
        if not self.enabled:
            return self
        from fxpress.passes.manager import StageRecord

        self._cls = StageRecord
        self._orig = StageRecord.__init__
        orig, progress = self._orig, self

        def init(record, *args, **kwargs):
            orig(record, *args, **kwargs)
            progress.stage(record)

        StageRecord.__init__ = init
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._cls.__init__ = self._orig
        return False

    def stage(self, record) -> None:
        # split models copy each region's records under "<region>:<stage>": already shown
        if any(record.name.endswith(":" + n) and record.seconds == s for n, s in self._done):
            return
        self._done.append((record.name, record.seconds))
        stream = self.stream or sys.stderr
        try:
            stream.write(f"  {record.name:<24} {record.seconds:8.2f} s  ({record.status})\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - progress must never break a compile
            pass
