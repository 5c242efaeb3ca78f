"""The fuzz oracle: ``check_case`` runs one random model (tests/fuzz_models.py) through the passes and
lowerings and returns Findings: "mismatch" (a silent numeric mismatch: always a bug), "crash" (an
exception that is not a deliberate fxpress error: a bug) or "refusal" (a clear fxpress error). Shared by
tests/test_fuzz.py (CI sample), tests/test_fuzz_big.py (the dedicated fuzz job) and fuzz_semantics.py.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field

import torch

from fuzz_models import FuzzCase

LOSSLESS_TOL = 1e-4  # fp32 lossless passes and lowerings: relative error vs eager / the final FX graph


@dataclass
class Finding:
    kind: str  # "mismatch" (silent, a bug) | "crash" (unclear exception, a bug) | "refusal" (clear error)
    stage: str  # "pass:<name>", "pipeline", "lower:<target>", "model"
    message: str
    case: str = ""
    source: str = ""  # the model's generated forward

    def __str__(self) -> str:
        return f"[{self.kind}] {self.stage}: {self.message}\n  {self.case}\n{self.source}"


@dataclass
class CaseOutcome:
    case: FuzzCase
    findings: list[Finding] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # stages that ran to a numeric check

    @property
    def bugs(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in ("mismatch", "crash")]


def classify(e: BaseException) -> str:
    """A clear refusal is an fxpress error raised on purpose (not one wrapping a crash)."""
    from fxpress.errors import FxpressError

    if isinstance(e, FxpressError) and (e.__cause__ is None or isinstance(e.__cause__, FxpressError)):
        return "refusal"
    if isinstance(e, FxpressError) and "has no ONNX translation" in str(e):  # names op, node and line
        return "refusal"
    return "crash"


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__
    if cause is not None:
        tb = traceback.extract_tb(cause.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        text += f"\n  caused by {type(cause).__name__}: {str(cause)[:500]}{where}"
    return text[:2000]


def rel_error(outputs, reference) -> float:
    from fxpress.passes.manager import output_error

    return output_error(list(outputs), list(reference))[1]


def _flat(out) -> list[torch.Tensor]:
    from fxpress.passes.graph import flatten_outputs

    return [t.detach() for t in flatten_outputs(out)]


def _lower(gm, inputs: tuple, target: str, reference: list):
    """fxpress.lower.lower; while codegen.build is not there yet, lower with to_relax + tvm.compile."""
    from fxpress.lower import lower

    try:
        return lower(gm, inputs, target, reference)
    except ImportError as e:
        if target != "llvm" or "fxpress.codegen" not in str(e):
            raise
    import tvm

    from fxpress.codegen.targets import resolve_target
    from fxpress.lowering import to_relax
    from fxpress.runtime.backends import TVMExecutor

    relax_mod = to_relax(gm, inputs)
    ex = tvm.compile(relax_mod.mod, target=resolve_target("llvm"))
    return TVMExecutor.from_built(ex, relax_mod.params), None, None


def check_case(case: FuzzCase, passes: list[str] | None = None, pipeline: bool = True, single: bool = True,
               targets: tuple[str, ...] = ("onnx", "llvm"), lower_trace_graph: bool = False,
               tolerance: float | None = None) -> CaseOutcome:
    """Run each pass alone (``single``), then all of them (``pipeline``), then lower the final graph
    (and the traced graph too with ``lower_trace_graph``) for each of ``targets``; compare everything.
    With ``tolerance``, the pipeline also runs under the tolerance guard, whose final graph must stay
    within it.

    - a lossless pass (and a pipeline of them) must match eager within 1e-4 relative, on the example
      inputs and on fresh inputs of the same shape;
    - a lossy pass must report exactly the error we measure against eager (its report is the contract);
    - every lowering must match the final FX graph within 1e-4 relative (example and fresh inputs);
    - nothing may mutate the user's model.
    """
    import fxpress
    from fxpress.passes import get_pass

    passes = fxpress.available_passes() if passes is None else list(passes)
    res = CaseOutcome(case)
    rcase, source = repr(case), case.source

    def add(kind, stage, msg):
        res.findings.append(Finding(kind, stage, msg, rcase, source))

    model = case.build()
    x, x2 = case.inputs(0), case.inputs(1)
    with torch.no_grad():
        ref, ref2 = _flat(model(*x)), _flat(model(*x2))
    if not all(torch.isfinite(t).all() for t in ref + ref2):
        add("crash", "model", "generator produced a model with non-finite outputs")  # a generator bug
        return res
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = case.calibration()

    def compile_and_check(stage: str, pass_list, lossy: bool):
        try:
            cm = fxpress.compile(model, x, passes=pass_list, target="torch", calibration=calib)
        except Exception as e:  # noqa: BLE001
            add(classify(e), stage, _describe(e))
            return None
        try:
            y = _flat(cm(*x))
            measured = rel_error(y, ref)
            records = [r for r in cm.report if r.kind in ("trace", "pass")]
            reported = records[-1].max_rel_error  # the last pass (or the trace when no pass ran)
        except Exception as e:  # noqa: BLE001 - the compiled model fails to run or to report
            add(classify(e), stage, "compiled, then failed: " + _describe(e))
            return None
        if not math.isfinite(measured):
            add("mismatch", stage, f"non-finite output error {measured} (report says {reported})")
        elif lossy:
            if not (abs(reported - measured) <= 1e-6 + 1e-3 * measured):
                add("mismatch", stage, f"reported max_rel_error {reported:.6g} but measured {measured:.6g} vs eager")
        else:
            if measured > LOSSLESS_TOL:
                add("mismatch", stage, f"lossless pass(es) changed the output: rel error {measured:.3g} "
                                       f"(report says {reported:.3g})")
            else:
                e2 = rel_error(_flat(cm(*x2)), ref2)
                if not e2 <= LOSSLESS_TOL:
                    add("mismatch", stage, f"matches on the example inputs but not on fresh ones: rel error {e2:.3g}")
        res.stages.append(stage)
        return cm

    cms = {name: compile_and_check(f"pass:{name}", [name], get_pass(name).lossy)
           for name in (passes if single else [])}
    final = None
    if pipeline and (len(passes) > 1 or (passes and not single)):
        cm = compile_and_check("pipeline", passes, any(get_pass(n).lossy for n in passes))
        final = getattr(cm, "gm", None)  # None too for a split (dynamic) model: its regions lower themselves
    elif pipeline and len(passes) == 1 and cms[passes[0]] is not None:
        final = getattr(cms[passes[0]], "gm", None)
    if tolerance is not None and passes:
        stage = "pipeline+tolerance"
        try:
            cm = fxpress.compile(model, x, passes=passes, target="torch", calibration=calib, tolerance=tolerance)
            err = rel_error(_flat(cm(*x)), ref)
            if not err <= tolerance:
                add("mismatch", stage, f"tolerance={tolerance:g} but the final model's error is {err:.3g} "
                                       f"(statuses: {[(r.name, r.status) for r in cm.report if r.kind == 'pass']})")
            res.stages.append(stage)
        except Exception as e:  # noqa: BLE001
            add(classify(e), stage, _describe(e))

    graphs = []
    if final is not None:
        graphs.append(("final", final))
    if lower_trace_graph or final is None:
        try:
            graphs.append(("trace", fxpress.compile(model, x, passes="none", target="torch").gm))
        except Exception as e:  # noqa: BLE001
            add(classify(e), "trace", _describe(e))

    for label, gm in graphs:
        with torch.no_grad():
            fx_ref, fx_ref2 = _flat(gm(*x)), _flat(gm(*x2))
        for target in targets:
            stage = f"lower:{target}" + (f"({label})" if len(graphs) > 1 else "")
            try:
                executor, _, _ = _lower(gm, x, target, fx_ref)
                if executor is None:
                    continue
                import numpy as np

                y = [torch.from_numpy(np.array(o)) for o in executor.run([t.numpy() for t in x])]
                y2 = [torch.from_numpy(np.array(o)) for o in executor.run([t.numpy() for t in x2])]
            except Exception as e:  # noqa: BLE001
                add(classify(e), stage, _describe(e))
                continue
            try:
                e1, e2 = rel_error(y, fx_ref), rel_error(y2, fx_ref2)
            except Exception as e:  # noqa: BLE001 - wrong count/shape of outputs is a mismatch too
                add("mismatch", stage, _describe(e))
                continue
            if not (e1 <= LOSSLESS_TOL and e2 <= LOSSLESS_TOL):
                add("mismatch", stage, f"lowered output differs from the final FX graph: rel error {e1:.3g} "
                                       f"(example inputs), {e2:.3g} (fresh inputs)")
            res.stages.append(stage)

    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if changed:
        add("mismatch", "model", f"compile mutated the user's model: {changed[:5]}")
    return res
