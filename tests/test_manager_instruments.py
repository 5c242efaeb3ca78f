"""The pass manager's instruments and its weight-sharing stage snapshots (passes/instruments.py, manager.py)."""
import pytest
import torch
from torch import fx, nn

import fxpress
from fxpress.errors import PassError
from fxpress.passes import FunctionPass, Pass, count_params, PassContext, PassManager, PassResult, get_pass, snapshot, trace
from fxpress.passes.instruments import Instrument
from fxpress.passes.manager import shares_weights
from fxpress.passes.record import StageRecord
from fxpress.passes.trace import copy_graph_module
from fxpress.report import Report


def _ptr(gm: nn.Module, name: str) -> int:
    return gm.get_parameter(name).data_ptr()


class _TwoLayers(nn.Module):
    """``big`` has rank 4 (low_rank factors it); ``small`` is under low_rank's min_layer_size (left alone)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.big = nn.Linear(64, 64)
        self.small = nn.Linear(64, 4)
        with torch.no_grad():
            self.big.weight.copy_(torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g) / 8)

    def forward(self, x):
        return self.small(torch.relu(self.big(x)))


def _pipeline(model, passes, tolerance=None, instruments=()):
    x = (torch.randn(8, 64, generator=torch.Generator().manual_seed(1)),)
    with torch.no_grad():
        reference = [model(*x)]
    gm = trace(model, x, reference).gm
    ctx = PassContext(example_inputs=x, reference_outputs=reference)
    outcome = PassManager(passes, tolerance=tolerance, instruments=instruments).run(
        gm, ctx, reference, snapshot("trace", "trace", gm, reference, x))
    return gm, outcome


def test_snapshots_share_untouched_weights_and_not_rewritten_ones():
    model = _TwoLayers().eval()
    big_before = model.big.weight.detach().clone()
    gm, out = _pipeline(model, [get_pass("low_rank", energy=0.999)])
    assert out.records[-1].status == "applied", out.records[-1].note
    after = out.graphs["low_rank"]
    # the traced graph holds the model's own tensors; the pass's graph shares the layer it left alone ...
    assert _ptr(gm, "small.weight") == _ptr(model, "small.weight") == _ptr(after, "small.weight")
    assert _ptr(after, "small.bias") == _ptr(model, "small.bias")
    # ... but as its own Parameter object (replacing or re-flagging it on the copy leaves the model alone)
    assert after.get_parameter("small.weight") is not model.small.weight
    # the rewritten layer is new storage, and the layer it replaced is unchanged in the earlier snapshot
    new_ptrs = {p.data_ptr() for p in after.parameters()}
    assert _ptr(model, "big.weight") not in new_ptrs
    assert torch.equal(gm.get_parameter("big.weight"), big_before)


class _ScaleInPlace(Pass):
    """Writes into a weight of its input in place (what the pass contract forbids for sharing passes)."""

    name, lossy, lift_layers = "scaler", True, False

    def run(self, gm, ctx):
        with torch.no_grad():
            gm.get_parameter("small.weight").mul_(2)
        r = PassResult()
        r.rewrite("scale", ["small"], ["small"])
        return gm, r


def test_a_sharing_pass_writing_a_weight_in_place_is_stopped():
    scaler = _ScaleInPlace()
    scaler.shares_weights = True
    with pytest.raises(PassError, match=r"'scaler' wrote into weight\(s\) small.weight .* in place"):
        _pipeline(_TwoLayers().eval(), [scaler])


def test_user_passes_get_a_deep_copy_and_may_edit_it_in_place():
    assert shares_weights(get_pass("fuse")) and shares_weights(get_pass("quantize"))
    assert not shares_weights(_ScaleInPlace()) and not shares_weights(FunctionPass("f", lambda gm, ctx: None))
    model = _TwoLayers().eval()
    w = model.small.weight.detach().clone()
    gm, out = _pipeline(model, [_ScaleInPlace()])
    assert out.records[-1].status == "applied"
    assert torch.equal(model.small.weight, w) and torch.equal(gm.get_parameter("small.weight"), w)
    assert torch.equal(out.gm.get_parameter("small.weight"), 2 * w)


def test_a_pass_replacing_a_weight_leaves_earlier_graphs_alone():
    def replace(gm, ctx):
        small = gm.get_submodule("small")
        small.weight.data = torch.zeros_like(small.weight)  # rebinds the copy's Parameter only
        small.bias = nn.Parameter(torch.ones_like(small.bias))
        r = PassResult()
        r.rewrite("zero", ["small"], ["small"])
        return gm, r

    model = _TwoLayers().eval()
    w, b = model.small.weight.detach().clone(), model.small.bias.detach().clone()
    zero = FunctionPass("zero", replace, lossy=True)
    zero.shares_weights = True
    gm, out = _pipeline(model, [zero])
    assert out.records[-1].status == "applied"
    assert _ptr(out.gm, "big.weight") == _ptr(model, "big.weight")  # it did share
    assert torch.equal(model.small.weight, w) and torch.equal(gm.get_parameter("small.bias"), b)
    assert float(out.graphs["zero"].get_parameter("small.weight").detach().abs().sum()) == 0.0


def _counting_graph() -> fx.GraphModule:
    """``calls.add_(1); return lin(x)``: a graph that writes into its own buffer when it runs."""
    root = nn.Module()
    root.lin = nn.Linear(4, 4)
    root.register_buffer("calls", torch.zeros(1))
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_method("add_", (g.get_attr("calls"), 1))
    g.output(g.call_module("lin", (x,)))
    return fx.GraphModule(root, g)


def test_weight_sharing_copy_clones_tensors_the_graph_writes():
    gm = _counting_graph()
    copy = copy_graph_module(gm, share_weights=True)
    assert copy.get_buffer("calls").data_ptr() != gm.get_buffer("calls").data_ptr()
    assert copy.get_parameter("lin.weight").data_ptr() == gm.get_parameter("lin.weight").data_ptr()
    copy(torch.randn(2, 4))
    assert float(gm.get_buffer("calls")) == 0.0 and float(copy.get_buffer("calls")) == 1.0
    deep = copy_graph_module(gm)  # the default still copies every tensor
    assert deep.get_parameter("lin.weight").data_ptr() != gm.get_parameter("lin.weight").data_ptr()


def test_tied_weights_stay_tied_in_the_copy():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    copy = copy_graph_module(fx.symbolic_trace(Tied()), share_weights=True)
    assert copy.get_parameter("a.weight") is copy.get_parameter("b.weight")


class _Log(Instrument):
    def __init__(self):
        self.events = []

    def before(self, stage):
        self.events.append(("before", stage.name, stage.graph is None))

    def after(self, stage):
        self.events.append(("after", stage.name, stage.status, stage.measured["params"]))


def test_user_instruments_see_every_pass_after_the_measures():
    log = _Log()
    _, out = _pipeline(_TwoLayers().eval(), [get_pass("fuse"), get_pass("low_rank", energy=0.999)], instruments=[log])
    assert [e[:2] for e in log.events] == [("before", "fuse"), ("after", "fuse"), ("before", "low_rank"),
                                           ("after", "low_rank")]
    assert log.events[0][2]  # before: the pass has not made its graph yet
    assert log.events[3][2:] == ("applied", out.records[-1].params)


def test_rollback_reports_the_kept_graph_and_the_attempt():
    model = _TwoLayers().eval()
    gm, out = _pipeline(model, [get_pass("low_rank", rank=1)], tolerance=1e-6)
    rec = out.records[-1]
    assert rec.status == "rolled back" and "tolerance" in rec.note
    assert (rec.params, rec.nodes, rec.code) == (count_params(gm)[0], len(gm.graph.nodes), gm.code)
    assert rec.extra["attempted"]["params"] < rec.params and rec.extra["attempted"]["max_rel_error"] > 1e-6
    assert out.gm is gm and out.graphs["low_rank"] is gm


def test_compile_report_records_are_typed():
    cm = fxpress.compile(_TwoLayers().eval(), torch.randn(2, 64), passes=["fuse"], target="torch")
    assert all(isinstance(r, StageRecord) for r in cm.report)
    assert cm.report.names() == ["trace", "fuse", "lower:torch"]
    with pytest.raises(TypeError, match="entry 0 is a dict"):
        Report([{"name": "trace"}])


def test_compile_shares_the_callers_parameters_but_not_its_modules_or_buffers():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).train()
    cm = fxpress.compile(model, torch.randn(4, 8), passes=["fuse"], target="torch")
    traced = cm.graph("trace")
    assert _ptr(traced, "0.weight") == _ptr(model, "0.weight")
    assert traced.get_parameter("0.weight") is not model[0].weight
    assert traced.get_buffer("1.running_mean").data_ptr() != model[1].running_mean.data_ptr()
    assert model.training and model[1].training  # compile() evals its copy, not the caller's modules
    fused = {p.data_ptr() for p in cm.graph("fuse").parameters()}
    assert cm.report["fuse"].status == "applied"
    # BN folded into the first Linear: a new weight there; the last Linear's is the caller's storage
    assert _ptr(model, "3.weight") in fused and _ptr(model, "0.weight") not in fused
