"""split_branches: detection, splitting, host program semantics and errors (target="torch": no builds).

The compiled targets (llvm, ONNX Runtime), the 100-input acceptance bar, export and the torch-free reload
are in test_split_branches_e2e.py.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import fxpress
from fxpress.compiled import CompiledModel
from fxpress.dynamic_model import DynamicCompiledModel
from fxpress.errors import InputError, TraceError
from fxpress.models.registry import dynamic_names, get_dynamic, names
from fxpress.errors import UnknownPassError
from fxpress.frontends.split_branches.ir import HostProgram
from fxpress.passes import available_passes, get_pass
from fxpress.runtime.host_program import HostInterpreter, HostProgramError

# What the front end must find in each reference model, and the host program it must build.
EXPECTED = {
    # name: (regions, host node counts)
    "early_exit": (3, {"if": 2, "return": 3}),
    "gated_skip": (5, {"if": 2, "return": 1}),
    "blockdrop": (4, {"if": 2, "return": 1}),  # the second keep test is hoisted before block 0
    "refine_loop": (3, {"while": 1, "return": 1}),
    "shape_branch": (3, {"if": 1, "return": 2}),
    # a break per step: each runs its own copy of the code after the loop (stack of 1..4 logits)
    "greedy_decoder": (9, {"unrolled": 1, "if": 4, "return": 5}),
    "counter_loop": (3, {"while": 1, "return": 1}),       # bound read from `i < self.max_steps`
    "ranet": (2, {"if": 1, "return": 2}),
    "sample_gate": (5, {"if": 2, "return": 1}),           # `range(x.shape[0])` unrolled over the batch
    "attn_decoder": (4, {"unrolled": 1, "if": 4, "return": 5}),
}


_COMPILED: dict = {}


def compile_torch(name):
    """Each reference model compiled once per session for target="torch"."""
    if name not in _COMPILED:
        spec = get_dynamic(name)
        model = spec.build()
        cm = fxpress.compile(model, spec.example_inputs(), passes=["split_branches"], target="torch",
                             options={"split_branches": dict(spec.options)})
        _COMPILED[name] = (spec, model, cm)
    return _COMPILED[name]


def test_registry_keeps_static_models_apart():
    assert set(dynamic_names()) == set(EXPECTED)
    assert not set(dynamic_names()) & set(names())
    with pytest.raises(KeyError):
        get_dynamic("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_split_structure(name):
    split = compile_torch(name)[2].split
    regions, counts = EXPECTED[name]
    assert len(split.regions) == regions, split.text()
    summary = split.host.summary()
    for op, n in counts.items():
        assert summary.get(op, 0) == n, (op, split.text())
    # every region is branch-free: its graph traces with plain fx.symbolic_trace-like tracing
    for r in split.regions.values():
        out = r.module(*r.example_inputs)
        assert len(out) == len(r.sig.outputs) and len(r.example_inputs) == len(r.sig.inputs)


def test_host_program_is_plain_json():
    split = compile_torch("early_exit")[2].split
    text = json.dumps(split.host.to_json())  # no pickles, no Python objects
    again = HostProgram.from_json(json.loads(text))
    assert again.to_json() == split.host.to_json()
    assert json.loads(text)["format"] == "fxpress-host-program"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decisions_match_eager_on_torch_target(name):
    spec, model, cm = compile_torch(name)
    assert isinstance(cm, DynamicCompiledModel)
    paths = set()
    for seed in range(40):
        x = spec.sample(seed)
        y, trace = cm.run_with_trace(*x)
        y_ref, markers = cm.eager_trace(model, *x)
        for a, b in zip(torch.utils._pytree.tree_leaves(y), torch.utils._pytree.tree_leaves(y_ref)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert trace.markers == markers, (trace.key(), markers)
        paths.add(trace.key())
    assert len(paths) >= 2  # the inputs exercise several paths


def test_shape_branch_duplicates_the_join():
    spec, model, cm = compile_torch("shape_branch")
    split = cm.split
    assert split.duplications == 1
    assert any("different shapes" in n for n in split.notes)
    shapes = {tuple(r.example_inputs[0].shape) for r in split.regions.values() if r.name != "r0"}
    assert shapes == {(1, 8, 8, 8)}  # both sides start from the stem output

    def node_shapes(gm):
        return {tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                if hasattr(n.meta.get("tensor_meta"), "shape")}

    # the join (flatten → stats → head) was traced once per side, each with its own shapes
    assert (1, 256) in node_shapes(cm.regions["r1"].gm)  # coarse: 16x4x4
    assert (1, 512) in node_shapes(cm.regions["r2"].gm)  # fine: 8x8x8


def test_report_graph_and_front_end_name():
    spec, model, cm = compile_torch("gated_skip")
    names_ = cm.report.names()
    assert names_[0] == "split_branches" and names_[-1] == "host:torch"
    assert {"r0:trace", "r4:lower:torch"} <= set(names_)
    rec = cm.report["split_branches"]
    assert rec.result.metrics["regions"] == 5 and rec.max_rel_error == 0.0
    assert len(rec.result.metrics["inlined"]) == 2  # the two GatedBlock.forward
    assert isinstance(cm.graph("r1"), torch.fx.GraphModule)
    assert cm.graph("r1:trace") is cm.regions["r1"].graph("trace")
    with pytest.raises(KeyError, match="one graph per region"):
        cm.graph("fuse")
    # a front end, not an FX pass: selected by its name in passes=, absent from the pass registry
    assert "split_branches" not in available_passes()
    with pytest.raises(UnknownPassError):
        get_pass("split_branches")


def test_regions_calibrate_on_what_reaches_them():
    from fxpress.dynamic import _region_calibration
    from fxpress.lower import _TorchExecutor

    spec, model, cm = compile_torch("gated_skip")
    calibration = [spec.sample(s) for s in range(8)]
    fxpress.compile(model, spec.example_inputs(), passes=["split_branches", "fuse"], target="torch",
                    calibration=calibration)  # runs with per-region calibration
    interp = HostInterpreter(cm.split.host.to_json(), {n: _TorchExecutor(r.gm) for n, r in cm.regions.items()})
    calib = _region_calibration(interp, calibration, False, cm.split)
    assert len(calib["r0"]) == 8 and len(calib["r4"]) == 8  # every input reaches stem and head
    assert 0 < len(calib["r1"]) < 8 and 0 < len(calib["r3"]) < 8  # the gated bodies see only their inputs


@pytest.mark.parametrize("passes", [["split_branches", "fuse"], ["fuse", "split_branches"], "fuse,split_branches"])
def test_static_model_with_split_branches_compiles_whole(passes):
    """The front end runs ahead of the passes wherever it is listed; with nothing to split its stage
    reports the traced graph unchanged, and the one compile path takes the whole model."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    cm = fxpress.compile(model, (x,), passes=passes, target="torch")
    assert isinstance(cm, CompiledModel)
    assert cm.report.names() == ["trace", "split_branches", "fuse", "lower:torch"]
    assert cm.passes == ["split_branches", "fuse"]
    rec, traced = cm.report["split_branches"], cm.report["trace"]
    assert rec.status == "unchanged" and rec.kind == "pass" and rec.result.metrics["regions"] == 1
    assert (rec.params, rec.macs, rec.nodes, rec.max_rel_error) == (traced.params, traced.macs, traced.nodes,
                                                                     traced.max_rel_error)
    assert cm.graph("split_branches") is cm.graph("trace")
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("opts, match", [
    ({"max_iters": 3}, "unknown split_branches option.*Did you mean 'max_loop_iters'"),
    ({"per_sample": 1}, "per_sample.*must be bool"),
    ({"lowering": "nativ"}, "choose one of 'split', 'native'.*Did you mean 'native'"),
    ({"on_exceed": "halt"}, "choose one of 'error', 'stop'"),
    ({"max_loop_iters": -1}, "max_loop_iters=-1 is out of range"),
    ({"max_loop_iters": True}, "max_loop_iters.*must be int"),
])
def test_options_are_checked_in_one_place(opts, match):
    """Every option is checked before any work, for a static model too, as an InputError."""
    with pytest.raises(InputError, match=match):
        fxpress.compile(nn.Linear(4, 4), (torch.randn(1, 4),), passes=["split_branches"], target="torch",
                        options={"split_branches": opts})


def test_split_options_defaults_come_from_the_declaration():
    from fxpress.frontends.split_branches import OPTIONS, SplitOptions, split_options

    defaults = split_options(None)
    assert defaults == SplitOptions(**{k: spec.default for k, spec in OPTIONS.items()})
    assert split_options({"per_sample": True}).per_sample is True
    assert split_options(defaults) is defaults


def test_unknown_pass_error_names_the_front_end():
    with pytest.raises(UnknownPassError, match="unknown pass 'split_branch'.*Front ends.*split_branches"):
        fxpress.compile(nn.Linear(4, 4), (torch.randn(1, 4),), passes=["split_branch"], target="torch")


def test_front_end_listed_twice_is_refused():
    with pytest.raises(UnknownPassError, match="more than once"):
        fxpress.compile(nn.Linear(4, 4), (torch.randn(1, 4),), passes=["split_branches", "split_branches"],
                        target="torch")


def test_default_passes_fall_back_to_splitting():
    spec = get_dynamic("blockdrop")
    model = spec.build()
    cm = fxpress.compile(model, spec.example_inputs(), target="torch")  # passes="default"
    assert isinstance(cm, DynamicCompiledModel)
    assert "fuse" in cm.passes
    assert any("whole-model tracing failed" in n for n in cm.report["split_branches"].result.notes)


# ----------------------------------------------------------------------------- batches

def test_per_sample_batches():
    spec = get_dynamic("gated_skip")
    model = spec.build()
    x = torch.cat([spec.sample(s)[0] for s in range(6)])
    cm = fxpress.compile(model, (x,), passes=["split_branches"], target="torch",
                         options={"split_branches": {"per_sample": True}})
    assert cm.batch == "per_sample"
    assert all(t.shape[0] == 1 for r in cm.split.regions.values() for t in r.example_inputs)
    for xb in (x, x[:3], x[:1]):  # any batch size
        y, trace = cm.run_with_trace(xb)
        y_ref, markers = cm.eager_trace(model, xb)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        assert trace.markers == markers
        assert y.shape[0] == xb.shape[0]
    # samples of one batch took different paths
    assert len({k for k in (cm.run_with_trace(x[i:i + 1])[1].key() for i in range(6))}) >= 2


def test_uniform_mode_rejects_per_sample_conditions():
    spec = get_dynamic("gated_skip")
    x = torch.cat([spec.sample(s)[0] for s in range(2)])
    with pytest.raises(InputError, match="per_sample"):
        fxpress.compile(spec.build(), (x,), passes=["split_branches"], target="torch")


def test_uniform_batch_condition_reduced_over_batch():
    spec = get_dynamic("early_exit")  # exits when every sample of the batch is confident
    model = spec.build()
    x = torch.cat([spec.sample(s)[0] for s in range(3)])
    cm = fxpress.compile(model, (x,), passes=["split_branches"], target="torch")
    for seed in range(10):
        xb = torch.cat([spec.sample(100 + 3 * seed + i)[0] for i in range(3)])
        y, trace = cm.run_with_trace(xb)
        y_ref, markers = cm.eager_trace(model, xb)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        assert trace.markers == markers


# ----------------------------------------------------------------------------- loops

class Halve(nn.Module):
    def __init__(self, bound=None, on_exceed="error"):
        super().__init__()
        self.bound, self.on_exceed = bound, on_exceed

    def forward(self, x):
        while fxpress.bound(x.abs().max() > 1.0, max_iter=self.bound, on_exceed=self.on_exceed):
            x = x / 2
        return x


def test_loop_bound_exceeded_raises_or_stops():
    x = torch.tensor([[3.0, -2.0]])  # needs 2 halvings
    cm = fxpress.compile(Halve(4), (x,), passes=["split_branches"], target="torch")
    _, trace = cm.run_with_trace(torch.tensor([[10.0, 0.0]]))  # 4 halvings: within the bound
    assert ("loop", 1, 4) in trace.path
    with pytest.raises(HostProgramError, match="declared bound of 4"):
        cm(torch.tensor([[100.0, 0.0]]))
    cm = fxpress.compile(Halve(4, "stop"), (x,), passes=["split_branches"], target="torch")
    torch.testing.assert_close(cm(torch.tensor([[100.0, 0.0]])), torch.tensor([[100.0 / 16, 0.0]]))


class OptionalMask(nn.Module):
    """A forward parameter the example inputs do not give keeps its default (a constant)."""

    def forward(self, x, mask=None, scale=2.0):
        if mask is not None:
            x = x * mask
        if x.sum() > 0:
            x = x * scale
        return x


def test_forward_defaults_are_constants():
    model = OptionalMask()
    cm = fxpress.compile(model, (torch.randn(1, 3),), passes=["split_branches"], target="torch")
    for seed in range(6):
        x = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(cm(x), model(x))


class CountedLoop(nn.Module):
    """A for loop whose trip count is data (DyCL could not compile these)."""

    def forward(self, x, n):
        acc = torch.zeros_like(x)
        for i in fxpress.bound(range(n.sum()), max_iter=5):
            acc = acc + x * (i + 1)
        return acc


def test_input_dependent_for_loop():
    x, n = torch.randn(1, 3), torch.tensor([2])
    model = CountedLoop()
    cm = fxpress.compile(model, (x, n), passes=["split_branches"], target="torch")
    for k in range(6):
        nk = torch.tensor([k])
        y, trace = cm.run_with_trace(x, nk)
        torch.testing.assert_close(y, model(x, nk))
        assert trace.markers == cm.eager_trace(model, x, nk)[1]


class BreakContinue(nn.Module):
    """A static loop with data-dependent break and continue (kept as an unrolled loop, not spliced)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if x.abs().max() > 6:
                break
            if x.sum() < 0:
                x = x * -1.5
                continue
            x = layer(x) * 2
        return x


class WhileContinue(nn.Module):
    """A bounded while whose body has a continue (the loop test is then not rotated into the body)."""

    def forward(self, x):
        n = torch.zeros((), dtype=torch.int64)
        while fxpress.bound(n < 6, max_iter=6):
            n = n + 1
            if x.sum() > n:
                continue
            x = x + 1
        return x, n


@pytest.mark.parametrize("cls", [BreakContinue, WhileContinue])
def test_break_and_continue(cls):
    model = cls().eval()
    cm = fxpress.compile(model, (torch.randn(1, 4),), passes=["split_branches"], target="torch")
    ops = cm.split.host.summary()
    assert ops.get("break", 0) + ops.get("continue", 0) >= 1
    paths = set()
    for seed in range(30):
        x = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed)) * 3
        y, trace = cm.run_with_trace(x)
        y_ref, markers = cm.eager_trace(model, x)
        for a, b in zip(torch.utils._pytree.tree_leaves(y), torch.utils._pytree.tree_leaves(y_ref)):
            torch.testing.assert_close(a, b)
        assert trace.markers == markers
        paths.add(trace.key())
    assert len(paths) >= 3


# ----------------------------------------------------------------------------- errors

class Unbounded(nn.Module):
    def forward(self, x):
        while x.sum() > 0:
            x = x - 1
        return x


class UnboundedFor(nn.Module):
    def forward(self, x):
        for _ in range(int(x.sum())):
            x = x * 0.5
        return x


class DynamicCallInExpression(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = get_dynamic("gated_skip").build().blocks[0]

    def forward(self, x):
        return self.block(x) + 1


class TensorTernary(nn.Module):
    def forward(self, x):
        y = x * 2 if x.sum() > 0 else x
        if x.mean() > 0:
            y = y + 1
        return y


class ShapeChangingLoop(nn.Module):
    def forward(self, x):
        while fxpress.bound(x.sum() < 10, max_iter=3):
            x = torch.cat([x, x], 1)
        return x


def clamp_if_positive(x):
    if x.sum() > 0:  # data-dependent control flow in a plain function: not split
        return x.clamp(max=1.0)
    return x


class HelperFunction(nn.Module):
    def forward(self, x):
        return clamp_if_positive(x) * 2


class HelperInRegion(nn.Module):
    def forward(self, x):
        if x.mean() > 0:
            x = x + 1
        return clamp_if_positive(x)


def test_control_flow_outside_what_is_split_is_reported():
    with pytest.raises(TraceError, match="found no data-dependent control flow") as e:
        fxpress.compile(HelperFunction(), (torch.randn(1, 4),), passes=["split_branches"], target="torch")
    assert "if x.sum() > 0" in str(e.value)  # tracing's offending line
    with pytest.raises(TraceError, match=r"region r2 .* still has control flow"):
        fxpress.compile(HelperInRegion(), (torch.randn(1, 4),), passes=["split_branches"], target="torch")


def _line_of(cls, text):
    import inspect

    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, ln in enumerate(lines) if text in ln)


def test_unbounded_while_names_the_line_and_how_to_bound_it():
    with pytest.raises(TraceError) as e:
        fxpress.compile(Unbounded(), (torch.randn(1, 4),), passes=["split_branches"], target="torch")
    msg = str(e.value)
    assert f"test_split_branches.py:{_line_of(Unbounded, 'while x.sum()')}" in msg
    assert "fxpress.bound(x.sum() > 0, max_iter=N)" in msg and "max_loop_iters" in msg


def test_unbounded_for_names_the_line():
    with pytest.raises(TraceError) as e:
        fxpress.compile(UnboundedFor(), (torch.ones(1, 4),), passes=["split_branches"], target="torch")
    msg = str(e.value)
    assert f"test_split_branches.py:{_line_of(UnboundedFor, 'for _ in')}" in msg
    assert "fxpress.bound(range(int(x.sum())), max_iter=N)" in msg


def test_global_loop_bound_option():
    model = Unbounded()
    x = torch.full((1, 4), 0.6)
    cm = fxpress.compile(model, (x,), passes=["split_branches"], target="torch",
                         options={"split_branches": {"max_loop_iters": 3}})
    torch.testing.assert_close(cm(x), model(x))


def test_other_errors_are_clear():
    with pytest.raises(TraceError, match="statement of its own"):
        fxpress.compile(DynamicCallInExpression(), (torch.randn(1, 8, 4, 4),), passes=["split_branches"],
                        target="torch")
    with pytest.raises(TraceError, match="torch.where"):
        fxpress.compile(TensorTernary(), (torch.randn(1, 4),), passes=["split_branches"], target="torch")
    with pytest.raises(TraceError, match="changes from a tensor"):
        fxpress.compile(ShapeChangingLoop(), (torch.ones(1, 2),), passes=["split_branches"], target="torch")
    with pytest.raises(InputError, match="unknown split_branches option"):
        fxpress.compile(Unbounded(), (torch.randn(1, 4),), passes=["split_branches"], target="torch",
                        options={"split_branches": {"max_iters": 3}})


def test_interpreter_rejects_multi_value_conditions():
    program = {"format": "fxpress-host-program", "version": 1, "inputs": ["c"], "batch": "uniform", "regions": {},
               "body": [{"op": "if", "id": 1, "cond": "c", "then": [], "else": [], "loc": "m.py:3"},
                        {"op": "return", "values": ["c"], "loc": "m.py:4"}]}
    interp = HostInterpreter(program, {})
    assert interp.run([np.array([True])])[0].tolist() == [True]
    with pytest.raises(HostProgramError, match="m.py:3"):
        interp.run([np.array([True, False])])
