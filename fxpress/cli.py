"""Command line: ``fxpress compile | export | inspect | bench | models``.

A model is named either by a registry name from fxpress.models (``resnet18``, with ``--size``; ``fxpress
models`` lists them) or by ``MODULE:FACTORY``, a callable returning an nn.Module, a (module, example_inputs)
pair, or a fxpress.models.ModelSpec; MODULE is imported with the current directory first on the path, as
``python -m`` does. Inputs are given as ``--input 1x3x224x224`` (float32) or ``2x16:int64``.

Every bad argument ends in one line ``fxpress: error: <what to do>`` and exit status 2. While compiling,
one line per finished stage goes to stderr (``--quiet``: none), and the compilers' own console noise is
hidden unless ``--verbose`` (or ``FXPRESS_VERBOSE=1``); see fxpress/console.py.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile

from fxpress import __version__
from fxpress.errors import FxpressError, InputError

_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"}
_TARGETS = ("llvm", "cuda", "onnx", "torch")
DATA_PASSES = ("quantize", "low_rank")  # passes that calibrate on input data


def parse_input_spec(text: str):
    """'1x3x224x224' or '2x16:int64' → a seeded random tensor of that shape and dtype."""
    import torch

    shape_text, _, dtype = text.partition(":")
    dtype = dtype or "float32"
    if dtype not in _DTYPES:
        raise InputError(f"--input {text!r}: unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    try:
        shape = [int(s) for s in shape_text.lower().split("x") if s]
    except ValueError:
        raise InputError(f"--input {text!r}: expected dimensions like 1x3x224x224[:dtype]") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--input {text!r}: dimensions must be positive integers (a batch of 0 samples "
                         "cannot be compiled); e.g. --input 1x3x224x224")
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    if dt.is_floating_point:
        return torch.randn(*shape, generator=g).to(dt)
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 100, shape, generator=g).to(dt)


def _import_factory_module(mod_name: str, ref: str):
    # As `python -m`: the current directory first, so `fxpress compile mynet:build` finds ./mynet.py.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.split(".")[0] == e.name.split(".")[0]:
            raise InputError(f"cannot load {ref!r}: no module {mod_name!r} in the current directory ({cwd}) or on "
                             "PYTHONPATH; run fxpress from the folder that holds it, or set PYTHONPATH") from e
        raise InputError(f"cannot load {ref!r}: importing {mod_name!r} failed: {e}; install the missing "
                         "package or fix the import in that module") from e


def load_model(ref: str, size: str, inputs: list[str]):
    """Resolve a model reference to (module, example_inputs)."""
    from fxpress import models

    if ":" not in ref:
        if ref not in models.names():
            raise InputError(f"model {ref!r} is neither a registry name ({', '.join(models.names())}) "
                             "nor MODULE:FACTORY (e.g. mypkg.nets:build_model)")
        spec = models.get(ref, size=size)
        model, example = spec.build(), spec.example_inputs()
    else:
        mod_name, _, attr = ref.partition(":")
        module = _import_factory_module(mod_name, ref)
        if not hasattr(module, attr):
            raise InputError(f"cannot load {ref!r}: module {mod_name!r} ({getattr(module, '__file__', '?')}) has no "
                             f"attribute {attr!r}; name a function that returns the model")
        factory = getattr(module, attr)
        made = factory() if callable(factory) else factory
        example = None
        if isinstance(made, models.ModelSpec):
            made, example = made.build(), made.example_inputs()
        elif isinstance(made, tuple) and len(made) == 2:
            made, example = made
        model = made
    if inputs:
        example = tuple(parse_input_spec(s) for s in inputs)
    if example is None:
        raise InputError(f"{ref} gives no example inputs: pass --input SHAPE[:dtype] (e.g. --input 1x3x224x224)")
    return model, example


def parse_options(text: str | None):
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--options is not valid JSON ({e.msg} at column {e.colno}); write it like "
                         '\'{"low_rank": {"energy": 0.95}}\'') from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise InputError("--options must be a JSON object of per-pass objects, e.g. '{\"low_rank\": {\"energy\": 0.95}}'")
    return options


def load_calibration(path: str, example: tuple) -> list[tuple]:
    """Input batches from ``path``: an .npz with one array per model input (in the order of their names:
    input_0, input_1... or any names, sorted), each holding N samples, cut into batches of the example's
    batch size; or a .pt (torch.save) of a list of batches (tensors or tuples of tensors) or of one
    tensor / tuple of tensors of N samples, cut likewise. Loaded without unpickling code."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise InputError(f"--calibration {path}: no such file; pass an .npz or .pt of input batches")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = sorted(data.files, key=lambda k: (len(k), k))
                whole = tuple(torch.from_numpy(np.array(data[k])) for k in keys)
        except (OSError, ValueError) as e:
            raise InputError(f"--calibration {path}: not a readable .npz of arrays ({e})") from e
        return _cut(whole, example, path)
    if path.endswith(".pt") or path.endswith(".pth"):
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise InputError(f"--calibration {path}: not a torch.save file of tensors ({str(e).splitlines()[0]})") from e
        if isinstance(data, torch.Tensor):
            return _cut((data,), example, path)
        if isinstance(data, tuple) and all(isinstance(t, torch.Tensor) for t in data):
            return _cut(data, example, path)
        if isinstance(data, list) and data:
            return [b if isinstance(b, tuple) else tuple(b) if isinstance(b, list) else (b,) for b in data]
        raise InputError(f"--calibration {path}: expected a list of input batches or a tensor / tuple of tensors, "
                         f"got {type(data).__name__}")
    raise InputError(f"--calibration {path}: use an .npz (one array per input) or a .pt (torch.save of batches)")


def _cut(whole: tuple, example: tuple, path: str) -> list[tuple]:
    if len(whole) != len(example):
        raise InputError(f"--calibration {path} holds {len(whole)} array(s); the model takes {len(example)} input(s)")
    n = whole[0].shape[0] if whole[0].dim() else 0
    if n == 0 or any(t.dim() == 0 or t.shape[0] != n for t in whole):
        raise InputError(f"--calibration {path}: every array needs the same number (> 0) of samples on axis 0")
    size = max(1, example[0].shape[0] if example[0].dim() else 1)
    return [tuple(t[i:i + size] for t in whole) for i in range(0, n, size)]


def check_out(path: str | None) -> None:
    """Refuse an --out that export would refuse or could not write, before spending minutes compiling."""
    if not path:
        return
    from fxpress.errors import ArtifactError
    from fxpress.export import check_export_path

    full = check_export_path(path)
    probe = os.path.dirname(full)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ArtifactError(f"--out {path}: {probe} is not a directory, so nothing can be created below it; "
                            "choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fxpress-probe-", dir=probe))
    except OSError as e:
        raise ArtifactError(f"--out {path}: cannot create a directory in {probe} ({e.strerror}); choose a writable "
                            "--out") from None


class _Session:
    """One compile's console: progress lines and the captured machinery output."""

    def __init__(self, args):
        from .console import verbose_requested

        self.verbose = verbose_requested(getattr(args, "verbose", False))
        self.quiet = getattr(args, "quiet", False)
        self.hidden = None

    def run(self, fn, *a, **k):
        from .console import StageProgress, quiet_machinery

        global _LAST_SESSION
        _LAST_SESSION = self
        try:
            with quiet_machinery(self.verbose) as captured:
                self.hidden = captured
                with StageProgress(enabled=not self.quiet):
                    return fn(*a, **k)
        except FxpressError:
            raise
        except Exception:
            # not an error fxpress explains: the hidden output may be the explanation
            if self.hidden is not None and self.hidden.text():
                sys.stderr.write(self.hidden.text())
            raise

    def hint(self) -> str | None:
        n = self.hidden.lines() if self.hidden is not None and not self.verbose else 0
        return f"fxpress: ({n} lines of compiler output were hidden; --verbose shows them)" if n else None


_LAST_SESSION: _Session | None = None


def _compile(args, session: _Session):
    import fxpress

    options = parse_options(args.options)
    check_out(getattr(args, "out", None))
    model, example = load_model(args.model, args.size, args.input)
    calibration = load_calibration(args.calibration, example) if getattr(args, "calibration", None) else None
    passes = "none" if args.passes == "none" else ("default" if args.passes == "default" else args.passes.split(","))
    if not session.quiet:
        print(f"compiling {args.model} for {args.target}" + (" (portable)" if getattr(args, "portable", False) else ""),
              file=sys.stderr)
    cm = session.run(fxpress.compile, model, example, passes=passes, target=args.target, tune=args.tune,
                     tolerance=args.tolerance, options=options, calibration=calibration)
    cm._cli_calibration = len(calibration) if calibration else None
    return cm


def _calibration_note(cm, args) -> str | None:
    ran = [r.name for r in cm.report if r.kind == "pass" and r.name.split(":")[-1] in DATA_PASSES]
    if not ran:
        return None
    n = getattr(cm, "_cli_calibration", None)
    if n:
        return f"calibration: {', '.join(ran)} used {n} batch(es) from {args.calibration}"
    return (f"calibration: {', '.join(ran)} used the single example input as calibration data; pass "
            "--calibration FILE (.npz or .pt of input batches) for representative data")


def cmd_compile(args) -> int:
    session = _Session(args)
    cm = _compile(args, session)
    print(cm.report)
    note = _calibration_note(cm, args)
    if note:
        print(note)
    _write_html(cm, args)
    if args.details:
        for r in cm.report:
            if r.kind == "pass":
                print()
                print(cm.report.details(r.name))
    if args.out:
        import time

        t0 = time.perf_counter()
        path = session.run(cm.export, args.out)
        if not session.quiet:
            print(f"  {'export':<24} {time.perf_counter() - t0:8.2f} s", file=sys.stderr)
        print(f"\nexported to {path}: {', '.join(sorted(os.listdir(path)))}")
    return 0


def cmd_export(args) -> int:
    if not args.out:
        raise InputError("fxpress export needs --out DIR")
    return cmd_compile(args)


def cmd_inspect(args) -> int:
    if os.path.isdir(args.model):
        from fxpress.errors import ArtifactError
        from fxpress.runtime.manifest import read_manifest

        manifest = read_manifest(args.model)
        try:
            with open(os.path.join(args.model, "report.json")) as f:
                stages = json.load(f)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{args.model}/report.json is missing or not JSON ({e}); re-export the artifact") from e
        from fxpress.report import Report
        from fxpress.passes.manager import StageRecord

        records = [StageRecord(**{k: v for k, v in s.items() if k in StageRecord.__dataclass_fields__ and k != "result"})
                   for s in stages]
        report = Report(records)
        if args.stage:
            return _print_stage(report, args.stage)
        print(f"artifact {args.model}: target {manifest.get('target')}, backends {list(manifest['backends'])}")
        print(report)
        _write_html(report, args)
        return 0
    cm = _compile(args, _Session(args))
    if args.stage:
        return _print_stage(cm.report, args.stage)
    print(cm.report)
    _write_html(cm, args)
    for r in cm.report:
        if r.kind == "pass":
            print()
            print(cm.report.details(r.name))
    return 0


def _write_html(cm_or_report, args) -> None:
    if getattr(args, "html", None):
        import importlib.util

        from fxpress.html_report import write_html_report

        try:
            path = write_html_report(cm_or_report, args.html, title=os.path.basename(args.model.rstrip("/")))
        except OSError as e:
            raise InputError(f"--html {args.html}: cannot write it ({e.strerror or e}); choose a writable path") from None
        print(f"\nHTML report: {path}")
        if importlib.util.find_spec("matplotlib") is None:
            print("(written without plots: matplotlib is not installed; pip install 'fxpress[html]' adds them)")


def _print_stage(report, name: str) -> int:
    try:
        r = report[name]
    except KeyError:
        raise InputError(f"--stage {name!r}: no such stage; choose one of {', '.join(report.names())}") from None
    print(r.ir if r.kind == "lowering" and r.ir else r.code)
    return 0


def cmd_bench(args) -> int:
    from fxpress.bench import bench_model

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in _TARGETS]
    if bad or not targets:
        raise InputError(f"--targets {args.targets!r}: unknown target(s) {bad or '(none)'}; use a comma list of "
                         f"{', '.join(_TARGETS)}")
    if args.repeat < 1:
        raise InputError(f"--repeat {args.repeat}: the number of timed runs must be at least 1")
    options = parse_options(args.options)
    model, example = load_model(args.model, args.size, args.input)
    # Title a registry model by the name typed: its class may be generic (digits_cnn is a Sequential).
    name = args.model if ":" not in args.model else None
    passes = args.passes if args.passes in ("none", "default") else args.passes.split(",")
    session = _Session(args)
    result = session.run(bench_model, model, example, targets=targets, passes=passes, repeat=args.repeat, name=name,
                         tune=args.tune, tolerance=args.tolerance, options=options)
    print(result.table())
    ours = [p for p in result.peers if p.peer.startswith("fxpress:")]
    if (ours and not any(p.ok for p in ours)) or not any(p.ok for p in result.peers):
        print("fxpress: error: no fxpress target ran successfully: see the failed rows above "
              "(--verbose shows the compilers' output)", file=sys.stderr)
        return 1
    return 0


def cmd_models(args) -> int:
    from fxpress import models

    for name in models.names():
        for size in ("small", "full"):
            spec = models.get(name, size=size)
            inputs = ", ".join("x".join(map(str, x.shape)) + ("" if str(x.dtype) == "torch.float32" else
                                                                ":" + str(x.dtype).replace("torch.", ""))
                               for x in spec.example_inputs())
            print(f"{name:<14} --size {size:<6} inputs {inputs:<22} {spec.description}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line saying what to do (and status 2), not the usage text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `bench --target` must not silently mean --targets
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _pass_names() -> str:
    try:
        from fxpress.frontends import FRONT_ENDS
        from fxpress.passes import available_passes

        return ", ".join(available_passes() + list(FRONT_ENDS))
    except ImportError:  # a runtime-only install: no torch, nothing to compile with
        return "(install fxpress with torch to compile)"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="fxpress", description="Compile PyTorch models with fxpress.", formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"fxpress {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pass_names = _pass_names()

    def model_args(sp, out: bool, html: bool = True, target: bool = True):
        sp.add_argument("model", help="registry name (see `fxpress models`) or MODULE:FACTORY")
        sp.add_argument("--size", default="small", choices=["small", "full"], help="registry model size")
        sp.add_argument("--input", action="append", default=[], metavar="SHAPE[:DTYPE]",
                        help="example input, e.g. 1x3x224x224 or 2x16:int64 (repeat for several); "
                             "default: the registry model's own")
        sp.add_argument("--passes", default="default",
                        help=f"'default', 'none' or a comma list of passes: {pass_names}")
        if target:
            sp.add_argument("--target", default="llvm", choices=list(_TARGETS), help="what to compile for")
            sp.add_argument("--portable", action="store_true",
                            help="build llvm for a generic x86-64 CPU (no AVX), for artifacts meant to run on other "
                                 "machines; default: this machine's CPU")
        sp.add_argument("--tune", type=int, default=0, help="MetaSchedule trials (0: default schedules)")
        sp.add_argument("--tolerance", type=float, default=None, help="max relative output error per pass")
        sp.add_argument("--options", default=None, help='per-pass options as JSON, e.g. \'{"low_rank": {"energy": 0.95}}\'')
        sp.add_argument("--calibration", default=None, metavar="FILE",
                        help="input batches for quantize / low_rank: an .npz with one array of N samples per input, "
                             "or a .pt (torch.save) of a list of batches; default: the single example input")
        if out:
            sp.add_argument("--out", default=None, help="export the artifact directory here (a new or empty "
                                                        "directory, or an earlier artifact)")
        sp.add_argument("--details", action="store_true", help="print each pass's rewrites and skips")
        if html:
            sp.add_argument("--html", default=None, metavar="PATH",
                            help="also write a self-contained HTML report (stages, FX diffs, graphs, IR) to PATH")
        sp.add_argument("--quiet", action="store_true", help="no progress line per stage")
        sp.add_argument("--verbose", action="store_true",
                        help="show the compilers' own console output (torch, ONNX, TVM); also FXPRESS_VERBOSE=1")

    sp = sub.add_parser("compile", help="compile a model, print the per-pass report, optionally export",
                        formatter_class=fmt)
    model_args(sp, out=True)
    sp.set_defaults(fn=cmd_compile)
    sp = sub.add_parser("export", help="compile and export an artifact directory (--out required)", formatter_class=fmt)
    model_args(sp, out=True)
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("inspect", help="report of an artifact directory, or compile a model and report",
                        formatter_class=fmt)
    model_args(sp, out=False)
    sp.add_argument("--stage", default=None, help="print this stage's FX code (or Relax IR for lower:*)")
    sp.set_defaults(fn=cmd_inspect)
    sp = sub.add_parser("bench", help="latency of fxpress vs eager, torch.compile and ONNX Runtime", formatter_class=fmt)
    model_args(sp, out=False, html=False, target=False)
    sp.add_argument("--targets", default="llvm,onnx", help=f"comma list of fxpress targets to time ({', '.join(_TARGETS)})")
    sp.add_argument("--repeat", type=int, default=20, help="timed runs per peer (>= 1)")
    sp.set_defaults(fn=cmd_bench)
    sp = sub.add_parser("models", help="list the bundled models, their sizes and example inputs", formatter_class=fmt)
    sp.set_defaults(fn=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    global _LAST_SESSION
    _LAST_SESSION = None
    args = build_parser().parse_args(argv)
    saved = os.environ.get("FXPRESS_PORTABLE")
    if getattr(args, "portable", False):
        os.environ["FXPRESS_PORTABLE"] = "1"  # read by codegen.targets.resolve_target("llvm"), at compile and export
    try:
        return args.fn(args)
    except FxpressError as e:
        print(f"fxpress: error: {e}", file=sys.stderr)
        hint = _LAST_SESSION.hint() if _LAST_SESSION is not None else None
        if hint:
            print(hint, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxpress: interrupted", file=sys.stderr)
        return 130
    finally:
        if saved is None:
            os.environ.pop("FXPRESS_PORTABLE", None)
        else:
            os.environ["FXPRESS_PORTABLE"] = saved


if __name__ == "__main__":
    sys.exit(main())
