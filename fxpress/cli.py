"""Command line: ``fxpress compile | export | inspect | bench``.

A model is named either by a registry name from fxpress.models (``resnet18``, with ``--size``) or by
``MODULE:FACTORY``, a callable returning an nn.Module, a (module, example_inputs) pair, or a
fxpress.models.ModelSpec. Inputs are given as ``--input 1x3x224x224`` (float32) or ``2x16:int64``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from fxpress.errors import FxpressError, InputError

_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"}


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
        raise InputError(f"--input {text!r}: dimensions must be positive integers")
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    if dt.is_floating_point:
        return torch.randn(*shape, generator=g).to(dt)
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 100, shape, generator=g).to(dt)


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
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"cannot load {ref!r}: {e}. Expected MODULE:FACTORY with MODULE importable "
                             "(run from the directory that contains it, or set PYTHONPATH)") from e
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


def _compile(args):
    import fxpress

    model, example = load_model(args.model, args.size, args.input)
    passes = "none" if args.passes == "none" else ("default" if args.passes == "default" else args.passes.split(","))
    options = json.loads(args.options) if args.options else None
    return fxpress.compile(model, example, passes=passes, target=args.target, tune=args.tune,
                           tolerance=args.tolerance, options=options)


def cmd_compile(args) -> int:
    cm = _compile(args)
    print(cm.report)
    _write_html(cm, args)
    if args.details:
        for r in cm.report:
            if r.kind == "pass":
                print()
                print(cm.report.details(r.name))
    if args.out:
        path = cm.export(args.out)
        print(f"\nexported to {path}: {', '.join(sorted(os.listdir(path)))}")
    return 0


def cmd_export(args) -> int:
    if not args.out:
        raise InputError("fxpress export needs --out DIR")
    return cmd_compile(args)


def cmd_inspect(args) -> int:
    if os.path.isdir(args.model):
        from fxpress.runtime.manifest import read_manifest

        manifest = read_manifest(args.model)
        with open(os.path.join(args.model, "report.json")) as f:
            stages = json.load(f)
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
    cm = _compile(args)
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
        from fxpress.html_report import write_html_report

        path = write_html_report(cm_or_report, args.html, title=os.path.basename(args.model.rstrip("/")))
        print(f"\nHTML report: {path}")


def _print_stage(report, name: str) -> int:
    r = report[name]
    print(r.ir if r.kind == "lowering" and r.ir else r.code)
    return 0


def cmd_bench(args) -> int:
    from fxpress.bench import bench_model

    model, example = load_model(args.model, args.size, args.input)
    # Title a registry model by the name typed: its class may be generic (digits_cnn is a Sequential).
    name = args.model if ":" not in args.model else None
    passes = args.passes if args.passes in ("none", "default") else args.passes.split(",")
    result = bench_model(model, example, targets=args.targets.split(","), passes=passes,
                         repeat=args.repeat, name=name, tune=args.tune, tolerance=args.tolerance,
                         options=json.loads(args.options) if args.options else None)
    print(result.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxpress", description="Compile PyTorch models with fxpress.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, out: bool, html: bool = True):
        sp.add_argument("model", help="registry name (resnet18, bert_small, ...) or MODULE:FACTORY")
        sp.add_argument("--size", default="small", choices=["small", "full"], help="registry model size")
        sp.add_argument("--input", action="append", default=[], metavar="SHAPE[:DTYPE]",
                        help="example input, e.g. 1x3x224x224 or 2x16:int64 (repeat for several)")
        sp.add_argument("--passes", default="default", help="'default', 'none' or a comma list (fuse,low_rank)")
        sp.add_argument("--target", default="llvm", choices=["llvm", "cuda", "onnx", "torch"])
        sp.add_argument("--tune", type=int, default=0, help="MetaSchedule trials (0: default schedules)")
        sp.add_argument("--tolerance", type=float, default=None, help="max relative output error per pass")
        sp.add_argument("--options", default=None, help='per-pass options as JSON, e.g. \'{"low_rank": {"energy": 0.95}}\'')
        if out:
            sp.add_argument("--out", default=None, help="export the artifact directory here")
        sp.add_argument("--details", action="store_true", help="print each pass's rewrites and skips")
        if html:
            sp.add_argument("--html", default=None, metavar="PATH",
                            help="also write a self-contained HTML report (stages, FX diffs, graphs, IR) to PATH")

    sp = sub.add_parser("compile", help="compile a model, print the per-pass report, optionally export")
    model_args(sp, out=True)
    sp.set_defaults(fn=cmd_compile)
    sp = sub.add_parser("export", help="compile and export an artifact directory (--out required)")
    model_args(sp, out=True)
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("inspect", help="report of an artifact directory, or compile a model and report")
    model_args(sp, out=False)
    sp.add_argument("--stage", default=None, help="print this stage's FX code (or Relax IR for lower:*)")
    sp.set_defaults(fn=cmd_inspect)
    sp = sub.add_parser("bench", help="latency of fxpress vs eager, torch.compile and ONNX Runtime")
    model_args(sp, out=False, html=False)
    sp.add_argument("--targets", default="llvm,onnx", help="fxpress targets to time (--target is not used here)")
    sp.add_argument("--repeat", type=int, default=20)
    sp.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch and onnx deprecation chatter would bury the report.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FxpressError as e:
        print(f"fxpress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
