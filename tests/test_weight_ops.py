"""Issue #14 (passes part) and #19 (options, in-place DCE): every compression pass finds the weight-bearing
ops of the graphs users' models produce, whatever the tracer captured, and says per layer what it did.

Coverage counts "body" layers: every Linear/Conv except embeddings, the stem (the first layer on the raw
input) and the head (the last layer) — the documented exclusions (docs/passes/weight_ops.md).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxpress
from fxpress.errors import PassError
from fxpress.passes.base import PassContext, rebatch
from fxpress.passes.graph import flatten_outputs
from fxpress.passes.trace import trace
from fxpress.passes.weight_ops import CONV, CONV_T, EMBEDDING, LINEAR, find_weight_ops
from fxpress.passes.weight_ops_lift import lift_to_modules

from helpers import rel_err

warnings.filterwarnings("ignore", category=UserWarning)
transformers = pytest.importorskip("transformers")
from fxpress.models.corpus import get_corpus  # noqa: E402 - after the importorskip


def _stage(cm, name):
    return next(r for r in cm.report.records if r.name == name)


def _first(out):
    return flatten_outputs(out)[0]


def _corpus(name, batch=1):
    spec = get_corpus(name)
    return spec.build(), spec.example_inputs(batch)


class NoCache(nn.Module):
    """GPT-2 / Llama return a DynamicCache unless told not to; the layers are what this test is about."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).last_hidden_state


# ----------------------------------------------------------------------------- the view itself

class ManySpellings(nn.Module):
    """One Linear / conv per spelling a graph can hold, plus two look-alikes that are not layers."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.w_f = nn.Parameter(torch.randn(8, 8, generator=g))        # F.linear
        self.w_t = nn.Parameter(torch.randn(8, 8, generator=g))        # x @ W.t()
        self.w_c1d = nn.Parameter(torch.randn(8, 8, generator=g))      # HF Conv1D: addmm(b, x, W[in, out])
        self.b_c1d = nn.Parameter(torch.randn(8, generator=g))
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.w_fc1 = nn.Parameter(torch.randn(8, 8, 3, generator=g))   # F.conv1d
        self.convt = nn.ConvTranspose1d(8, 8, 2, stride=2)
        self.w_left = nn.Parameter(torch.randn(4, 4, generator=g))     # W @ x: not a layer

    def forward(self, ids):
        h = self.emb(ids)                                   # [B, 4, 8]
        h = self.lin(h)
        h = F.linear(h, self.w_f)
        h = h @ self.w_t.t()
        h = torch.addmm(self.b_c1d, h.reshape(-1, 8), self.w_c1d).reshape(h.shape)
        c = self.conv1(h.transpose(1, 2))                   # [B, 8, 4]
        c = F.conv1d(c, self.w_fc1, padding=1)
        c = self.convt(c)                                   # [B, 8, 8]
        return c[..., :4].transpose(1, 2) + self.w_left @ h


def test_find_weight_ops_covers_every_spelling_and_lifting_is_exact():
    m = ManySpellings().eval()
    x = (torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(1)),)
    gm = fx.symbolic_trace(m)
    scan = find_weight_ops(gm)
    kinds = sorted(w.kind for w in scan.ops)
    assert kinds == sorted([EMBEDDING, LINEAR, LINEAR, LINEAR, LINEAR, CONV, CONV, CONV_T]), [w.describe() for w in scan.ops]
    # canonical layouts: a Linear's weight is [out, in] whatever the spelling
    by_form = {w.form: w for w in scan.ops}
    conv1d_style = next(w for f, w in by_form.items() if "W [in, out]" in f)
    assert torch.equal(conv1d_style.weight, m.w_c1d.t())
    transposed = next(w for f, w in by_form.items() if "t(W)" in f)
    assert transposed.weight is m.w_t or torch.equal(transposed.weight, m.w_t)
    assert any("on the left" in reason for _, reason in scan.near_misses), scan.near_misses

    ref = m(*x)
    lift_to_modules(gm)
    assert rel_err(gm(*x), ref) < 1e-6
    after = find_weight_ops(gm)
    assert all(w.module is not None for w in after.ops if w.kind != EMBEDDING)


def test_export_graph_ops_are_found():
    """torch.export's re-traced graph: aten.addmm / mm with t(W), aten.convolution, aten batch norm."""
    m, x = _corpus("shape_checked_cnn", 2)
    traced = trace(m, x)
    assert traced.method == "torch.export"
    forms = sorted(w.form for w in find_weight_ops(traced.gm).ops)
    assert len(forms) == 4 and any("addmm" in f for f in forms) and any("convolution" in f for f in forms), forms


# ----------------------------------------------------------------------------- coverage on real models

@pytest.mark.parametrize("name", ["hf_bert", "hf_wav2vec2", "hf_resnet"])
def test_quantize_and_shift_add_rewrite_90_percent_of_body_layers(name):
    m, x = _corpus(name)
    for p in ("quantize", "shift_add"):
        cm = fxpress.compile(m, x, passes=[p], target="torch")
        rec = _stage(cm, p)
        cov = rec.result.coverage
        assert rec.status == "applied", rec.note
        assert cov["body_layers"] > 0 and cov["body_rewritten"] >= 0.9 * cov["body_layers"], (p, cov)
        assert f"{cov['layers_rewritten']}/{cov['layers_found']} layers" in rec.note
        # the error the pass reports is the error the model has
        assert rec.result.metrics["output_rel_error"] == pytest.approx(rec.max_rel_error, rel=1e-3, abs=1e-6)
        assert rel_err(_first(cm(*x)), _first(m(*x))) <= max(2 * rec.max_rel_error, 1e-5)


@pytest.mark.parametrize("name", ["hf_bert", "hf_whisper_encoder"])
def test_low_rank_budget_halves_the_eligible_weights(name):
    m, x = _corpus(name)
    cm = fxpress.compile(m, x, passes=["low_rank"], target="torch", options={"low_rank": {"budget": 0.5}})
    rec = _stage(cm, "low_rank")
    met = rec.result.metrics
    assert rec.status == "applied", rec.note
    assert met["eligible_weight_params_after"] <= 0.5 * met["eligible_weight_params_before"]
    assert met["body_weight_params_after"] <= 0.5 * met["body_weight_params_before"] * 1.05, met
    assert met["rel_error_vs_original"] == pytest.approx(rec.max_rel_error, rel=1e-3, abs=1e-6)


def test_gpt2_conv1d_addmm_is_quantized():
    spec = get_corpus("hf_gpt2")
    m = NoCache(spec.build()).eval()
    x = spec.example_inputs(1)[:1]
    forms = {w.form for w in find_weight_ops(trace(m, x).gm).ops}
    assert any("HF Conv1D" in f for f in forms), forms
    cm = fxpress.compile(m, x, passes=["fuse", "quantize"], target="torch")
    cov = _stage(cm, "quantize").result.coverage
    assert cov["body_rewritten"] >= 0.9 * cov["body_layers"] > 0, cov


def test_quantized_export_graph_lowers_to_onnx():
    m, x = _corpus("hf_bert")
    cm = fxpress.compile(m, x, passes=["fuse", "quantize"], target="onnx")
    q = _stage(cm, "quantize")
    assert q.result.coverage["body_rewritten"] == q.result.coverage["body_layers"]
    assert rel_err(_first(cm(*x)), _first(m(*x))) <= 2 * q.max_rel_error + 1e-4


def test_conv1d_low_rank_lowers_to_llvm():
    m, x = _corpus("depthwise_net", 2)
    cm = fxpress.compile(m, x, passes=["low_rank"], target="llvm", options={"low_rank": {"rank": 8}})
    rec = _stage(cm, "low_rank")
    assert "mix" in {c for r in rec.result.rewrites for c in r.consumed}
    assert rel_err(cm(*x), m(*x)) == pytest.approx(rec.max_rel_error, rel=1e-3, abs=1e-5)


def test_fuse_folds_aten_batch_norm_and_merges_qkv():
    m, x = _corpus("hf_resnet")
    rec = _stage(fxpress.compile(m, x, passes=["fuse"], target="torch"), "fuse")
    assert rec.result.metrics["bn_after"] == 0 < rec.result.metrics["bn_before"] and rec.max_rel_error < 1e-4
    m, x = _corpus("hf_bert")
    rec = _stage(fxpress.compile(m, x, passes=["fuse"], target="torch"), "fuse")
    assert rec.result.metrics["rewrites"].get("merge_parallel_linear") == 2 and rec.max_rel_error < 1e-4


# ----------------------------------------------------------------------------- reasons

class FiveLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(16, 16) for _ in range(5))

    def forward(self, x):
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return x


def test_partial_rewrite_says_k_of_n_and_unchanged_says_why():
    m, x = FiveLinears().eval(), (torch.randn(4, 16),)
    cm = fxpress.compile(m, x, passes=["quantize"], target="torch",
                         options={"quantize": {"skip": [f"fcs.{i}" for i in range(1, 5)]}})
    rec = _stage(cm, "quantize")
    assert rec.note.startswith("applied: 1/5 layers"), rec.note
    assert "listed in the 'skip' option" in rec.note

    cm = fxpress.compile(m, x, passes=["low_rank"], target="torch")  # 16x16 layers: too small to factor
    rec = _stage(cm, "low_rank")
    assert rec.status == "unchanged" and "0/5 layers" in rec.note and "min_layer_size" in rec.note, rec.note

    cm = fxpress.compile(nn.ReLU(), x, passes=["shift_add"], target="torch")
    rec = _stage(cm, "shift_add")
    assert rec.status == "unchanged" and "no weight-bearing op found" in rec.note and "relu" in rec.note, rec.note


# ----------------------------------------------------------------------------- Conv1d

def test_conv1d_is_quantized_low_ranked_and_shifted():
    m, x = _corpus("depthwise_net", 2)
    for p, opts in (("quantize", {}), ("low_rank", {"low_rank": {"rank": 8}}),
                    ("shift_add", {"shift_add": {"keep_first_last": False}})):
        cm = fxpress.compile(m, x, passes=[p], target="torch", options=opts)
        rec = _stage(cm, p)
        touched = {c for r in rec.result.rewrites for c in r.consumed}
        assert "mix" in touched, (p, rec.note)
        assert rel_err(cm(*x), m(*x)) == pytest.approx(rec.max_rel_error, rel=1e-3, abs=1e-6)


# ----------------------------------------------------------------------------- calibration batches

def test_rebatch_recuts_samples():
    batches = [(torch.arange(3.0).reshape(3, 1),), (torch.arange(3.0, 5.0).reshape(2, 1),)]
    out = rebatch(batches, 4)
    assert [b[0].flatten().tolist() for b in out] == [[0, 1, 2, 3], [4, 0, 1, 2]]


def test_activation_aware_low_rank_with_other_calibration_batch_size():
    """An export-traced graph bakes the example's batch (view(x, [4, 256])): calibration batches of 3 used to
    crash with "shape '[4, 256]' is invalid"."""
    spec = get_corpus("shape_checked_cnn")
    m, x = spec.build(), spec.example_inputs(4)
    calib = [spec.example_inputs(3) for _ in range(3)]
    cm = fxpress.compile(m, x, passes=["low_rank", "quantize"], target="torch", calibration=calib,
                         options={"low_rank": {"method": "activation_aware", "rank": 8, "min_layer_size": 0}})
    assert _stage(cm, "low_rank").status == "applied"
    assert _stage(cm, "quantize").status == "applied"


# ----------------------------------------------------------------------------- options (#19)

@pytest.mark.parametrize("options, words", [
    ({"low_rank": {"enery": 0.5}}, ["unknown option 'enery'", "Did you mean 'energy'"]),
    ({"low_rank": {"rank": -3}}, ["rank", "out of range"]),
    ({"low_rank": {"budget": 1.5}}, ["budget", "out of range"]),
    ({"shift_add": {"terms": "two"}}, ["terms", "must be int"]),
    ({"lowrank": {"budget": 0.5}}, ["'lowrank' names no pass", "Did you mean 'low_rank'"]),
    ({"quantize": {"mode": "statc"}}, ["mode", "Did you mean 'static'"]),
])
def test_option_errors_are_clear(options, words):
    m, x = FiveLinears().eval(), (torch.randn(2, 16),)
    name = next(iter(options)).replace("lowrank", "low_rank")
    with pytest.raises(PassError) as e:
        fxpress.compile(m, x, passes=[name], target="torch", options=options)
    for w in words:
        assert w in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- in-place DCE (#19)

class InPlaceAdd(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)
        self.inplace = inplace

    def forward(self, x):
        h = self.fc1(x)
        if self.inplace:
            h.add_(1.0)  # result unused: fx's own DCE would drop it
        else:
            h = h + 1.0
        return self.fc2(h)


@pytest.mark.parametrize("p, opts", [("quantize", {}), ("shift_add", {"keep_first_last": False})])
def test_passes_keep_in_place_writes(p, opts):
    """The in-place model must come out exactly as its out-of-place twin (#19: 0.24 vs 0.005 before)."""
    x = (torch.randn(8, 32, generator=torch.Generator().manual_seed(0)),)
    errs = []
    for inplace in (True, False):
        cm = fxpress.compile(InPlaceAdd(inplace).eval(), x, passes=[p], target="torch", options={p: opts})
        rec = _stage(cm, p)
        assert rec.status == "applied"
        errs.append(rec.max_rel_error)
        if inplace:
            assert any(n.op == "call_method" and n.target == "add_" for n in cm.graph(p).graph.nodes), cm.graph(p).code
    assert errs[0] == pytest.approx(errs[1], rel=1e-3, abs=1e-6), errs


def test_base_class_runs_in_place_aware_dce_for_any_pass():
    from fxpress.passes.base import Pass, PassResult

    class Noop(Pass):
        name = "noop_test"

        def run(self, gm, ctx):
            return gm, PassResult()

    gm = fx.symbolic_trace(InPlaceAdd().eval())
    out, _ = Noop()(gm, PassContext(example_inputs=(torch.randn(2, 32),)))
    assert any(n.target == "add_" for n in out.graph.nodes)


def test_fuse_left_unchanged_says_why_for_every_layer():
    """GPT-2 (transformers, small seeded config): its MLP activation is the tanh GELU written out, so fuse
    finds nothing to fuse. Every layer it looked at must carry its reason, and the parameter count must not
    count a lifted layer's weight twice."""
    m, x = _corpus("hf_gpt2")
    cm = fxpress.compile(m, x, passes=["fuse"], target="torch")
    rec = _stage(cm, "fuse")
    assert rec.status == "unchanged"
    layers = [n for n in cm.graph("fuse").graph.nodes if n.op == "call_module"
              and isinstance(cm.graph("fuse").get_submodule(n.target), torch.nn.Linear)]
    reasons = {s.node: s.reason for s in rec.result.skipped}
    assert layers and all(n.name in reasons for n in layers), sorted(set(n.name for n in layers) - set(reasons))
    assert all("read by" in reasons[n.name] for n in layers)
    met = rec.result.metrics
    assert met["params_before"] == met["params_after"] == _stage(cm, "trace").params
