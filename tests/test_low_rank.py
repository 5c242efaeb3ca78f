"""The low_rank pass: factorisation numerics, rank selection, the fxpress ops, and lowering.

Lossy-pass checks assert the pass's own reported error and that it keeps its promises (budget,
target error, skip when not cheaper); lowering checks assert the lowered model adds no error to the
pass's FX graph (≤ 1e-4 relative).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import fxpress
from fxpress.models import get
import fxpress.passes.low_rank.ops  # noqa: F401 - registers torch.ops.fxpress.lowrank_*
from fxpress.passes import PassContext, copy_graph_module, count_params, get_pass, trace
from fxpress.passes.low_rank.factor import LayerStats, factorize
from fxpress.passes.low_rank.ranks import LayerChoice, candidate_ranks, select_budget

from helpers import rel_err

torch.manual_seed(0)


_TRACED = {}


def _run_pass(model, x, calibration=None, **options):
    key = (id(model), tuple(t.shape for t in x))
    if key not in _TRACED:
        _TRACED[key] = (model, trace(model.eval(), x).gm)  # keep model alive so its id stays unique
    traced = copy_graph_module(_TRACED[key][1])
    with torch.no_grad():
        ref = [model(*x)]
    ctx = PassContext(example_inputs=x, calibration=calibration, reference_outputs=ref)
    gm, result = get_pass("low_rank", **options).run(traced, ctx)
    return gm, result


def _correlated(n, d, seed, decay=0.85):
    """Inputs with a steeply decaying, rotated spectrum: a few directions carry nearly all variance."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(123)))
    scales = decay ** torch.arange(d, dtype=torch.float32)
    return (torch.randn(n, d, generator=g) * scales) @ basis.T


# ----------------------------------------------------------------------------- ops

def test_ops_match_their_definition_and_export():
    x = torch.randn(3, 5, 12)
    U, V, b = torch.randn(12, 4), torch.randn(4, 7), torch.randn(7)
    y = torch.ops.fxpress.lowrank_linear(x, U, V, b)
    assert torch.allclose(y, x @ U @ V + b, atol=1e-5)
    xc = torch.randn(2, 3, 9, 9)
    Uc, Vc, bc = torch.randn(4, 3, 3, 3), torch.randn(6, 4), torch.randn(6)
    yc = torch.ops.fxpress.lowrank_conv2d(xc, Uc, Vc, bc, [2, 2], [1, 1], [1, 1])
    ref = nn.functional.conv2d(nn.functional.conv2d(xc, Uc, None, 2, 1), Vc[:, :, None, None], bc)
    assert yc.shape == (2, 6, 5, 5) and torch.allclose(yc, ref, atol=1e-5)

    class M(nn.Module):
        def forward(self, x):
            return torch.ops.fxpress.lowrank_conv2d(x, Uc, Vc, bc, [2, 2], [1, 1], [1, 1])

    ep = torch.export.export(M(), (xc,))  # the fake kernel gives export the right shape
    assert tuple(ep.module()(xc).shape) == (2, 6, 5, 5)
    assert any("lowrank_conv2d" in str(n.target) for n in ep.graph.nodes)


# ----------------------------------------------------------------------------- factorisation numerics

@pytest.mark.parametrize("method", ["svd", "activation_aware", "fisher"])
def test_exact_at_full_rank(method):
    W = torch.randn(24, 40, dtype=torch.float64)
    st = LayerStats(40)
    st.add(_correlated(200, 40, seed=1).double())
    st.grad_sq = torch.rand(24, 40, dtype=torch.float64)
    f = factorize(W, st, method)
    left, right = f.factors(f.full_rank)
    assert torch.allclose(left @ right, W, atol=1e-9)
    assert f.rel_error(f.full_rank) < 1e-6


@pytest.mark.parametrize("method", ["svd", "activation_aware"])
def test_error_decreases_monotonically_with_rank(method):
    W = torch.randn(48, 64, dtype=torch.float64)
    X = _correlated(500, 64, seed=2)
    st = LayerStats(64)
    st.add(X)
    f = factorize(W, st, method)
    errs = [f.rel_error(r) for r in range(0, f.full_rank + 1)]
    # The reported error is the true output error on the calibration rows ...
    for r in (4, 16, 40):
        left, right = f.factors(r)
        true = float(torch.linalg.norm(X.double() @ (W - left @ right).T) / torch.linalg.norm(X.double() @ W.T))
        assert abs(true - errs[r]) < 1e-8
    # ... and never grows with rank; it reaches zero at full rank.
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[0] == pytest.approx(1.0) and errs[-1] < 1e-6


def test_model_error_decreases_with_rank_through_the_pass():
    """Same property end to end: a BERT-style model, every eligible Linear at the same fixed rank."""
    spec = get("bert_small")
    model, x = spec.build(), spec.example_inputs()
    last = math.inf
    for r in (8, 16, 24):
        gm, res = _run_pass(model, x, method="activation_aware", rank=r)
        err = rel_err(gm(*x), model(*x))
        assert err < last and res.metrics["layers_replaced"] == 13
        last = err


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    """Correlated inputs: whitening (SVD-LLM) must cut output error far below plain SVD at equal rank.

    This test fails for plain SVD: the weight's top singular directions are not the ones the
    inputs excite, so plain truncation keeps the wrong subspace.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    calib = [(_correlated(256, 64, seed=s),) for s in range(4)]
    held_out = (_correlated(512, 64, seed=99),)
    errs = {}
    for method, extra in (("svd", {}), ("activation_aware", {}), ("activation_aware", {"whitening": "scale"})):
        gm, res = _run_pass(model, held_out, calibration=calib, method=method, rank={"0": 16},
                            min_layer_size=0, **extra)
        assert [row["rank"] for row in res.layers] == [16]
        with torch.no_grad():
            y, ref = gm(*held_out), model(*held_out)
        errs[method + extra.get("whitening", "")] = (float((y - ref).norm() / ref.norm()), res.layers[0]["output_error"])
    svd_err, svd_layer = errs["svd"]
    aa_err, aa_layer = errs["activation_aware"]
    assert aa_err < 0.2 * svd_err, errs  # measured: ~0.05 vs ~0.6
    assert aa_layer < 0.2 * svd_layer, errs
    assert errs["activation_awarescale"][0] < svd_err, errs


def test_fisher_keeps_the_rows_the_loss_needs():
    """FWSVD: when the loss depends on a few output rows, fisher reconstructs those rows best."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64)).eval()
    calib = [(torch.randn(32, 48),) for _ in range(2)]
    x = calib[0]

    def loss_fn(out, inputs):  # only the first 8 outputs matter
        return out[:, :8].square().sum()

    outs = {}
    for method in ("svd", "fisher"):
        gm, res = _run_pass(model, x, calibration=calib, method=method, rank=16, min_layer_size=0,
                            loss_fn=loss_fn, fisher_samples=64)
        with torch.no_grad():
            outs[method] = float((gm(*x)[:, :8] - model(*x)[:, :8]).norm() / model(*x)[:, :8].norm())
    assert outs["fisher"] < 0.3 * outs["svd"], outs


# ----------------------------------------------------------------------------- rank selection

def test_candidate_ranks_snap_and_save():
    assert candidate_ranks(64, 64, 64, snap=8, min_saving=0.1) == [8, 16, 24]  # 24*128 <= 0.9*4096
    assert candidate_ranks(10, 64, 10, snap=8, min_saving=0.0) == [8]  # 8·74 < 10·64: saves 7.5%
    assert candidate_ranks(10, 64, 10, snap=8, min_saving=0.1) == []
    layers = [LayerChoice("a", 64, 64, [8, 16, 24], {8: 0.5, 16: 0.2, 24: 0.1}),
              LayerChoice("b", 64, 64, [8, 16, 24], {8: 0.05, 16: 0.01, 24: 0.001})]
    state, ok = select_budget(layers, 0.5 * 2 * 4096)
    assert ok and sum(layers[i].params(state[k]) for i, k in enumerate("ab")) <= 4096
    assert state["b"] <= (state["a"] or 99)  # the insensitive layer is cut deeper


@pytest.mark.parametrize("name,budget,on", [("bert_small", 0.5, "params"), ("digits_cnn", 0.6, "params"),
                                            ("digits_cnn", 0.5, "macs")])
def test_budget_is_respected(name, budget, on):
    spec = get(name)
    model, x = spec.build(), spec.example_inputs()
    gm, res = _run_pass(model, x, method="activation_aware", budget=budget, budget_on=on)
    m = res.metrics
    assert res.changed and m["budget_reached"]
    key = "eligible_weight_params" if on == "params" else "eligible_macs"
    assert m[f"{key}_after"] <= budget * m[f"{key}_before"]
    # The reported totals are the graph's real parameter count.
    assert count_params(gm)[0] == m["params_after"] < m["params_before"]
    assert m["macs_after"] < m["macs_before"]
    if on == "macs":  # the MAC budget goes after the conv, where digits_cnn's MACs are
        assert any(row["op"] == "conv2d" for row in res.layers)
        assert m["macs_after"] <= m["macs_before"] - (1 - budget) * m["eligible_macs_before"]
    for row in res.layers:
        assert row["rank"] % 8 == 0 and row["params_after"] < row["params_before"]
        assert row["macs_after"] < row["macs_before"] and 0 <= row["output_error"] < 1


def test_model_scope_budget():
    spec = get("bert_small")
    model, x = spec.build(), spec.example_inputs()
    total = count_params(trace(model, x).gm)[0]
    gm, res = _run_pass(model, x, budget=0.8, budget_scope="model", method="activation_aware")
    assert count_params(gm)[0] <= 0.8 * total + 64 * 12  # + the biases the factored layers keep
    with pytest.raises(fxpress.errors.PassError, match="unreachable"):
        _run_pass(model, x, budget=0.3, budget_scope="model")


def test_skips_layers_where_low_rank_is_not_cheaper():
    model = nn.Sequential(nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 64)).eval()
    x = (torch.randn(4, 64),)
    gm, res = _run_pass(model, x, min_layer_size=0, budget=0.5)
    assert not res.changed
    reasons = " ".join(s.reason for s in res.skipped)
    assert "would not reduce cost" in reasons
    # Energy: a random square matrix needs nearly full rank for 99% energy → left alone, with the reason.
    sq = nn.Sequential(nn.Linear(64, 64)).eval()
    _, res = _run_pass(sq, x, min_layer_size=0, energy=0.99)
    assert not res.changed and "would not reduce cost" in res.skipped[0].reason
    # An explicit rank that does not pay off is refused as well.
    _, res = _run_pass(sq, x, min_layer_size=0, rank=40)
    assert not res.changed and "would not reduce cost" in res.skipped[0].reason


def test_target_error_and_tolerance():
    spec = get("digits_cnn")
    model, x = spec.build(), spec.example_inputs()
    gm, res = _run_pass(model, x, target_error=0.05)
    assert res.changed and res.metrics["target_error_measured"] <= 0.05
    assert res.metrics["rel_error_vs_original"] <= 0.05
    # With only a tolerance, the pass aims below it so the manager keeps it.
    cm = fxpress.compile(model, x, passes=["low_rank"], target="torch", tolerance=0.05)
    rec = cm.report["low_rank"]
    assert rec.status == "applied" and rec.max_rel_error <= 0.05 and rec.params < cm.report["trace"].params


# ----------------------------------------------------------------------------- lowering

LOWERING_CASES = {
    # every eligible Linear of a transformer, ranks from the budget search
    "bert_small": {"method": "activation_aware", "budget": 0.5},
    # the conv variant (module "3": Conv2d 16→32, 3×3) and a Linear ("8"), at fixed ranks
    "digits_cnn": {"rank": {"3": 8, "8": 24}},
}


@pytest.mark.parametrize("target", ["torch", "onnx", "llvm"])
@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_lowered_model_matches_the_pass_graph(name, target):
    spec = get(name)
    model, x = spec.build(), spec.example_inputs()
    cm = fxpress.compile(model, x, passes=["low_rank"], target=target, options={"low_rank": LOWERING_CASES[name]})
    rec = cm.report["low_rank"]
    assert rec.status == "applied" and rec.result.layers
    if name == "digits_cnn":
        assert sorted(row["op"] for row in rec.result.layers) == ["conv2d", "linear"]
    with torch.no_grad():
        fx_out = cm.gm(*x)
    assert rel_err(cm(*x), fx_out) <= 1e-4
    assert rec.macs < cm.report["trace"].macs and rec.params < cm.report["trace"].params
    assert rec.result.metrics["output_cosine"] > 0.9


def test_fused_kernel_path_matches(monkeypatch):
    """The fused two-GEMM TIR kernel, end to end and on awkward shapes, against the FX graph."""
    import tvm
    from tvm import relax

    from fxpress.codegen import build
    from fxpress.codegen.low_rank_kernels import apply_default_schedules, lowrank_linear_func
    from fxpress.lowering import to_relax

    monkeypatch.setenv("FXPRESS_LOWRANK_IMPL", "fused")
    spec = get("bert_small")
    model, x = spec.build(), spec.example_inputs()
    cm = fxpress.compile(model, x, passes=["low_rank"], target="torch", options={"low_rank": {"rank": 16}})
    rm = to_relax(cm.gm, x)
    assert "fxpress_lowrank_linear" in rm.ir_text and "R.call_tir" in rm.ir_text
    bm = build(apply_default_schedules(rm.mod, "llvm"), "llvm")
    vm = relax.VirtualMachine(bm.executable, tvm.cpu())
    args = [tvm.runtime.tensor(t.numpy()) for t in x] + [tvm.runtime.tensor(p) for p in rm.params]
    out = vm["main"](*args)
    out = out[0] if not hasattr(out, "numpy") else out
    with torch.no_grad():
        assert rel_err(torch.from_numpy(out.numpy()), cm.gm(*x)) <= 1e-4

    rng = np.random.default_rng(0)
    for M, K, R, N in [(1, 40, 8, 24), (7, 100, 12, 30), (6, 64, 24, 10)]:
        f = apply_default_schedules(tvm.IRModule({"k": lowrank_linear_func(M, K, R, N, scheduled=False, name="k")}),
                                    "llvm")
        lib = tvm.compile(f, target="llvm")
        a = [rng.standard_normal(s).astype("float32") for s in ((M, K), (K, R), (R, N), (N,))]
        y = tvm.runtime.tensor(np.zeros((M, N), "float32"))
        lib["k"](*[tvm.runtime.tensor(v) for v in a], y)
        ref = a[0] @ a[1] @ a[2] + a[3]
        assert np.abs(y.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()
