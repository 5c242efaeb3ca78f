"""The quantize pass on its own (target='torch'): ops, observers, SplitQuant, sensitivity, accuracy."""
import math

import pytest
import torch
from torch import nn

import fxpress
from fxpress import models
from fxpress.passes.quantize.observers import Observer, quantize_weight, weight_clip
from fxpress.passes.quantize.ops import qparams_asym
from fxpress.passes.quantize.splitquant import cluster_masks, kmeans_1d

from helpers import rel_err

OPS = torch.ops.fxpress


def _qstage(cm):
    return cm.report["quantize"]


def _compile(model, x, calib=None, tolerance=None, **opts):
    return fxpress.compile(model, x, passes=["quantize"], target="torch", calibration=calib, tolerance=tolerance,
                           options={"quantize": opts})


# ----------------------------------------------------------------------------- ops

def test_quantize_dequantize_round_trip_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3
    for lo, hi in [(-9.0, 9.0), (0.0, 5.0), (-1.0, 20.0)]:
        scale, zp = qparams_asym(lo, hi)
        q = OPS.quantize(x, scale, zp, 0, 255)
        assert q.dtype == torch.uint8
        back = OPS.dequantize(q, scale, zp)
        inside = (x >= lo) & (x <= hi)
        # in range: error at most half a step (plus float rounding); outside: clamped to the range ends
        assert float((back - x)[inside].abs().max()) <= scale / 2 * (1 + 1e-5)
        assert float(back.min()) >= min(lo, 0) - scale and float(back.max()) <= hi + scale
        assert float(OPS.dequantize(OPS.quantize(torch.zeros(1), scale, zp, 0, 255), scale, zp)) == 0.0  # 0 exact
    # signed variant
    q = OPS.quantize(x, 0.05, 0, -128, 127)
    assert q.dtype == torch.int8 and int(q.min()) == -128 and int(q.max()) == 127
    # round half to even, like ONNX QuantizeLinear
    assert OPS.quantize(torch.tensor([0.5, 1.5, 2.5]), 1.0, 0, 0, 255).tolist() == [0, 2, 2]


def test_weight_round_trip_bounds_per_bit_width():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for bits, qmax in [(8, 127), (4, 7), (2, 1)]:
        clip = weight_clip(w, qmax, "minmax")
        q, scale = quantize_weight(w, clip, qmax)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax
        err = (q.float() * scale[:, None] - w).abs()
        assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all()), bits
        mse_clip = weight_clip(w, qmax, "mse")
        assert bool((mse_clip <= clip + 1e-12).all())


def test_qlinear_reference_is_integer_exact():
    g = torch.Generator().manual_seed(2)
    xq = torch.randint(0, 256, (5, 7, 40), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (3, 6, 40), dtype=torch.int8, generator=g)
    ws = torch.rand(3, 6, generator=g) * 0.01
    bq = torch.randint(-500, 500, (3, 6), dtype=torch.int32, generator=g)
    y = OPS.qlinear(xq, 0.02, 9, w, ws, bq)
    acc = (xq.long() - 9) @ w.long().transpose(1, 2)[:, None]  # [3, 5, 7, 6]
    ref = sum(((acc[c] + bq[c].long()).float() * (ws[c] * torch.tensor(0.02))) for c in range(3))
    assert torch.equal(y, ref)


# ----------------------------------------------------------------------------- observers, k-means

def test_observers():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    data = [torch.randn(1000, generator=g) for _ in range(4)]
    data[2][5] = 40.0  # one outlier
    obs = {m: Observer(m, percentile=99.9) for m in ("minmax", "percentile", "mse")}
    for d in data:
        for o in obs.values():
            o.observe(d)
    lo_mm, hi_mm = obs["minmax"].range()
    assert hi_mm == 40.0
    assert obs["percentile"].range()[1] < 10  # the outlier is clipped
    x = torch.cat(data)

    def err(o, x):
        s, zp, _ = o.qparams()
        return float(((OPS.dequantize(OPS.quantize(x, s, zp, 0, 255), s, zp) - x) ** 2).mean())

    # MSE picks the range with the least error: here keeping the lone outlier is cheaper than clipping it
    assert err(obs["mse"], x) <= min(err(obs["minmax"], x), err(obs["percentile"], x)) * 1.001
    # heavy tails at 4 bits: the MSE range clips, and beats min-max
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    mm, mse = Observer("minmax", qmax=15), Observer("mse", qmax=15)
    mm.observe(heavy)
    mse.observe(heavy)

    def err4(o):
        s, zp, _ = o.qparams()
        return float(((OPS.dequantize(OPS.quantize(heavy, s, zp, 0, 15), s, zp) - heavy) ** 2).mean())

    assert mse.range()[1] < 0.7 * mm.range()[1]
    assert err4(mse) < 0.7 * err4(mm)


def test_kmeans_finds_three_clusters():
    g = torch.Generator().manual_seed(4)
    v = torch.cat([torch.randn(300, generator=g) * 0.1 - 5, torch.randn(900, generator=g) * 0.1,
                   torch.randn(300, generator=g) * 0.1 + 5])
    c = kmeans_1d(v)
    assert torch.allclose(c, torch.tensor([-5.0, 0.0, 5.0], dtype=torch.float64), atol=0.05)
    masks = cluster_masks(v)
    assert [int(m.sum()) for m in masks] == [300, 900, 300]
    assert bool((masks[0] ^ masks[1] ^ masks[2]).all())  # a partition


# ----------------------------------------------------------------------------- per-channel, SplitQuant

class OneLinear(nn.Module):
    def __init__(self, w, b=None):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            self.fc.weight.copy_(w)
            if b is not None:
                self.fc.bias.copy_(b)

    def forward(self, x):
        return self.fc(x)


def _layer_err(cm, model, x):
    with torch.no_grad():
        return rel_err(cm.gm(x), model(x))


def test_per_channel_beats_per_tensor_on_outlier_channel():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, generator=g) * 0.05
    w[7] *= 60  # one channel with much larger weights
    model = OneLinear(w, torch.zeros(32)).eval()
    x = torch.randn(64, 64, generator=g)
    errs = {}
    for pc in (True, False):
        cm = _compile(model, (x,), [(x,)], per_channel=pc, observer="minmax")
        y, ref = cm.gm(x), model(x)
        # judge on the ordinary channels: per-tensor spends its whole range on channel 7
        mask = torch.ones(32, dtype=torch.bool)
        mask[7] = False
        errs[pc] = rel_err(y[:, mask], ref[:, mask])
    assert errs[True] < errs[False] / 5, errs


def test_splitquant_beats_plain_at_int4_on_outliers():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(64, 128, generator=g) * 0.05
    idx = torch.randint(0, w.numel(), (40,), generator=g)
    w.view(-1)[idx] = torch.randn(40, generator=g).sign() * 1.0  # sparse large outliers in every channel region
    model = OneLinear(w, torch.randn(64, generator=g) * 0.1).eval()
    x = torch.randn(256, 128, generator=g)
    plain = _compile(model, (x,), [(x,)], bits=4, weight_clip="minmax")
    split = _compile(model, (x,), [(x,)], bits=4, weight_clip="minmax", splitquant=True)
    e_plain, e_split = _layer_err(plain, model, x), _layer_err(split, model, x)
    assert e_split < 0.5 * e_plain, (e_split, e_plain)
    assert e_plain > 0.1 and e_split < 0.1  # without the split int4 is badly off on this layer
    row = _qstage(split).result.layers[0]
    assert row["clusters"] == 3 and row["bits"] == 4
    # the split layer is one op holding the three clusters, not three layers
    ops = [n.target for n in split.gm.graph.nodes if n.op == "call_function"]
    assert ops.count(OPS.qlinear.default) == 1 and split.gm.fc_qweight.shape[0] == 3


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte = models.digits_data()
    model = models.trained_digits_cnn()
    calib = [(xtr[i:i + 128],) for i in range(0, 512, 128)]
    return model, calib, xte, yte


def test_digits_int8_accuracy_and_report(digits):
    model, calib, xte, yte = digits
    cm = _compile(model, (xte[:16],), calib)
    fp32 = models.accuracy(model, xte, yte)
    int8 = models.accuracy(lambda x: cm.gm(x), xte, yte)
    assert int8 >= fp32 - 0.01, (int8, fp32)
    st = _qstage(cm)
    assert st.status == "applied" and st.max_rel_error < 0.05
    res = st.result
    assert res.metrics["quantized_layers"] == 4 and res.metrics["calibration_batches"] == 4
    assert any(r.kind == "fold_bn_after" for r in res.rewrites)  # fuse's BN folding, run by quantize
    for row in res.layers:
        assert row["bits"] == 8 and row["status"] == "quantized"
        assert row["act_scale"][0] > 0 and 0 <= row["act_zero_point"][0] <= 255
        assert row["w_scale_min"] > 0 and row["layer_rel_error"] < 0.05
        assert row["act_clip"] and row["act_range"] and row["weight_sqnr_db"] > 30
    # size: int8 weights in the graph's parameters
    assert st.param_bytes < cm.report["trace"].param_bytes / 3
    # precision changes are visible in the graph table
    dtypes = {r["dtype"] for r in st.table if "quantize" in str(r["target"]) and "dequantize" not in str(r["target"])}
    assert dtypes == {"uint8"}


def test_digits_low_bits_splitquant_gain(digits):
    model, calib, xte, yte = digits
    acc = {}
    for split in (False, True):
        cm = _compile(model, (xte[:16],), calib, bits=2, splitquant=split)
        acc[split] = models.accuracy(lambda x: cm.gm(x), xte, yte)
    assert acc[True] > acc[False] + 0.01, acc


def test_sensitivity_keeps_layers_fp32_under_tolerance(digits):
    model, calib, xte, yte = digits
    x = (xte[:16],)
    free = _compile(model, x, calib, bits=4)
    err_all = _qstage(free).max_rel_error
    tol = err_all / 3
    cm = _compile(model, x, calib, tolerance=tol, bits=4)
    st = _qstage(cm)
    assert st.status == "applied" and st.max_rel_error <= tol
    res = st.result
    assert 0 < res.metrics["fp32_layers"] < 4
    kept = [r for r in res.layers if r["status"] == "fp32 (sensitivity)"]
    assert kept and all("sensitivity" in r for r in res.layers)
    assert any("kept in fp32" in s.reason for s in res.skipped)


def test_bert_static_shares_quantize_nodes_and_keeps_fidelity():
    spec = models.get("bert_small")
    model, x = spec.build(), spec.example_inputs()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 1000, (4, 16), generator=g),) for _ in range(4)]
    cm = _compile(model, x, calib)
    nodes = list(cm.gm.graph.nodes)
    qlin = [n for n in nodes if n.target == OPS.qlinear.default]
    qmm = [n for n in nodes if n.target == OPS.qmatmul.default]
    quant = [n for n in nodes if n.target == OPS.quantize.default]
    assert len(qlin) == 14 and len(qmm) == 4  # 2 layers x (q,k,v,out,fc1,fc2) + pooler + classifier; 2 matmuls/layer
    # q, k and v read one quantized copy of their shared input
    assert len(quant) < len(qlin) + 2 * len(qmm)
    assert any(sum(u.target == OPS.qlinear.default for u in q.users) == 3 for q in quant)
    with torch.no_grad():
        y, ref = cm.gm(*x), model(*x)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert float(cos) > 0.999 and rel_err(y, ref) < 0.03


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_bert_dynamic_and_weight_only(mode):
    spec = models.get("bert_small")
    model, x = spec.build(), spec.example_inputs()
    cm = _compile(model, x, mode=mode, bits=8)
    op = OPS.qlinear_dynamic.default if mode == "dynamic" else OPS.wlinear.default
    assert sum(n.target == op for n in cm.gm.graph.nodes) == 14
    assert not any(n.target == OPS.qmatmul.default for n in cm.gm.graph.nodes)
    assert rel_err(cm.gm(*x), model(*x)) < 0.03


def test_options_are_checked():
    spec = models.get("digits_cnn")
    with pytest.raises(fxpress.errors.PassError, match="unknown mode"):
        _compile(spec.build(), spec.example_inputs(), mode="int3")
    with pytest.raises(fxpress.errors.PassError, match="observer"):
        _compile(spec.build(), spec.example_inputs(), observer="kl")
    with pytest.raises(fxpress.errors.PassError, match="unknown option"):
        _compile(spec.build(), spec.example_inputs(), bitz=4)


def test_skip_option_and_no_layers():
    spec = models.get("digits_cnn")
    cm = _compile(spec.build(), spec.example_inputs(), skip=["11"])
    res = _qstage(cm).result
    assert res.metrics["quantized_layers"] == 3 and any("skip" in s.reason for s in res.skipped)

    class NoLayers(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    cm = _compile(NoLayers(), (torch.randn(3, 4),))
    assert _qstage(cm).status == "unchanged"
    assert math.isclose(_qstage(cm).max_rel_error, 0.0)


def test_layers_reading_quantized_layers_directly():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16)

        def forward(self, x):
            h = self.b(self.a(x))                # linear → linear
            s = torch.matmul(h.t(), self.c(h))   # matmul of a linear output: [16, 16]
            return self.a(s)[:8, :16] + h        # a module called twice

    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(8, 16)
    cm = _compile(model, (x,), [(x,)])
    res = _qstage(cm).result
    assert res.metrics["quantized_layers"] == 5  # a (twice), b, c and the matmul
    assert rel_err(cm.gm(x), model(x)) < 0.05
    ops = [n.target for n in cm.gm.graph.nodes]
    assert ops.count(OPS.qlinear.default) == 4 and ops.count(OPS.qmatmul.default) == 1


def test_fold_bn_uses_the_fuse_pass_folding():
    """quantize folds BN with fuse's step (passes/fusion/bn.py): after a Conv2d and after a Linear alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    folded = _qstage(_compile(model, (x,))).result
    assert [r.consumed for r in folded.rewrites if r.kind == "fold_bn_after"] == [["_0", "_1"], ["_4", "_5"]]
    assert folded.metrics["quantized_layers"] == 3
    kept = _qstage(_compile(model, (x,), fold_bn=False)).result
    assert not any(r.kind.startswith("fold_bn") for r in kept.rewrites)
