"""passes="auto" (issue #20): per-layer choice across techniques under an accuracy budget.

The model is fxpress.models' digits CNN, *trained* here in seconds on scikit-learn's digits (the 8x8
images ship inside scikit-learn; weights come from models.digits.trained_digits_cnn, cached on disk).
The metric is top-1 accuracy. The search sees only the "search" half of the test split; the verdicts
are on the other half ("held-out"), which the search never saw. Everything runs on target="torch" with
objective="size" (stored bytes), so no verdict depends on this machine's speed or ISA.
"""
import math

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import InputError
from fxpress.models import digits_data, get

B = 64  # the example batch; compiled models take this batch size


def batched_accuracy(f, x, y):
    """Accuracy in batches of B (the last one padded with samples from the start)."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), B):
            xb = x[i:i + B]
            n = len(xb)
            if n < B:
                xb = torch.cat([xb, x[:B - n]])
            correct += int((f(xb)[:n].argmax(1) == y[i:i + n]).sum())
    return correct / len(x)


@pytest.fixture(scope="module")
def digits():
    x_train, _, x_test, y_test = digits_data()
    half = len(x_test) // 2
    return dict(model=get("digits_cnn").build(), example=(x_train[:B],),
                calibration=[(x_train[i:i + B],) for i in range(0, 4 * B, B)],
                search=(x_test[:half], y_test[:half]), held=(x_test[half:], y_test[half:]))


def _auto(d, max_drop=0.01, calls=None, **auto_opts):
    def evaluate(f):
        if calls is not None:
            calls.append(1)
        return batched_accuracy(f, *d["search"])
    return fxpress.compile(d["model"], d["example"], passes="auto", evaluate=evaluate, max_drop=max_drop,
                           objective="size", target="torch", calibration=d["calibration"],
                           options={"auto": {"progress": False, "calibration_batches": 2, **auto_opts}})


def _stored_bytes(cm) -> int:
    """Bytes the compiled graph stores (parameters and buffers), from its report."""
    return [r for r in cm.report if r.kind == "pass"][-1].param_bytes


@pytest.fixture(scope="module")
def chosen(digits):
    calls = []
    cm = _auto(digits, calls=calls, max_evaluations=6)
    return cm, calls


def test_chosen_configuration_keeps_the_budget_on_held_out_data(digits, chosen):
    cm, _ = chosen
    base = batched_accuracy(digits["model"], *digits["held"])
    got = batched_accuracy(cm, *digits["held"])
    assert base - got <= 0.01, (base, got, cm.auto)
    assert any(c != "fp32" for c in cm.auto.chosen.values()), "nothing was compressed"
    assert _stored_bytes(cm) < 0.5 * _stored_bytes(fxpress.compile(digits["model"], digits["example"],
                                                                   passes=["fuse"], target="torch"))


def test_evaluate_calls_are_bounded_and_counted(chosen):
    cm, calls = chosen
    # the baseline, at most max_evaluations during the search, and the final check (plus fallbacks)
    assert cm.auto.evaluate_calls == len(calls)
    assert 2 <= len(calls) <= 6 + 2 + len([t for t in cm.auto.tried if t.accepted])
    assert len(cm.auto.tried) <= 6


def test_report_has_choice_front_and_calls(chosen):
    cm, _ = chosen
    d = cm.auto.to_dict()
    assert set(d["chosen"]) == {L.label for L in cm.auto.layers}
    assert d["pareto_front"] and d["evaluate_calls"] == cm.auto.evaluate_calls
    assert cm.report["auto"].note.startswith("auto (size")
    assert "Pareto front" in str(cm.auto)


@pytest.mark.parametrize("technique", ["int8", "low_rank", "shift_add"])
def test_not_worse_than_a_single_technique_at_the_same_budget(digits, chosen, technique):
    cm, _ = chosen
    single = _auto(digits, techniques=[technique], max_evaluations=6)
    held_base = batched_accuracy(digits["model"], *digits["held"])
    assert held_base - batched_accuracy(single, *digits["held"]) <= 0.03  # sanity: the single run is real
    assert _stored_bytes(cm) <= _stored_bytes(single), (cm.auto.chosen, single.auto.chosen)


def test_latency_table_is_measured_once_then_cached(tmp_path, monkeypatch):
    # A tiny MLP; the verdict is on the cache's behaviour, never on the numbers. A fixed load average keeps
    # the "re-measure entries timed on a busy machine" rule out of the way.
    import fxpress.auto.latency_table as lt
    monkeypatch.setattr(lt.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 32)
    cache = tmp_path / "lat.json"

    @torch.no_grad()
    def evaluate(f):
        return -float((f(x) - model(x)).abs().mean())

    opts = {"auto": {"progress": False, "latency_cache": str(cache), "techniques": ["int8", "low_rank"]}}
    cm = fxpress.compile(model, (x,), passes="auto", evaluate=evaluate, max_drop=0.05, objective="latency",
                         target="torch", options=opts)
    assert cache.exists() and len(__import__("json").loads(cache.read_text())) >= 3
    lat = [e["latency_s"] for row in cm.auto.estimates.values() for e in row.values()]
    assert all(v is not None and v > 0 for v in lat)
    before = cache.read_text()
    fxpress.compile(model, (x,), passes="auto", evaluate=evaluate, max_drop=0.05, objective="latency",
                    target="torch", options=opts)
    assert cache.read_text() == before  # every entry came from the cache
    # another code generation (a kernel changed): its timings are measured, not taken from the old ones
    monkeypatch.setattr(lt, "codegen_fingerprint", lambda: "another-codegen")
    fxpress.compile(model, (x,), passes="auto", evaluate=evaluate, max_drop=0.05, objective="latency",
                    target="torch", options=opts)
    after = __import__("json").loads(cache.read_text())
    assert len(after) > len(__import__("json").loads(before))
    assert any("|codegen another-codegen|" in key for key in after)


@pytest.mark.parametrize("kwargs, match", [
    (dict(evaluate=None, max_drop=0.01), "needs evaluate="),
    (dict(evaluate=lambda f: 1.0), "needs max_drop="),
    (dict(evaluate=lambda f: 1.0, max_drop=-1), "max_drop must be"),
    (dict(evaluate=lambda f: 1.0, max_drop=float("nan")), "max_drop must be"),
    (dict(evaluate=lambda f: 1.0, max_drop=0.01, objective="speed"), "objective must be"),
    (dict(evaluate=lambda f: "high", max_drop=0.01), "evaluate must return a number"),
    (dict(evaluate=lambda f: math.nan, max_drop=0.01), "finite number"),
    (dict(evaluate=lambda f: 1 / 0, max_drop=0.01), "evaluate raised ZeroDivisionError"),
    (dict(evaluate=lambda f: 1.0, max_drop=0.01, options={"auto": {"time": 3}}), "unknown option"),
    (dict(evaluate=lambda f: 1.0, max_drop=0.01, options={"auto": {"techniques": ["int3"]}}), "techniques"),
    (dict(evaluate=lambda f: 1.0, max_drop=0.01, options={"quantize": {"bits": 4}}), "chooses each pass"),
])
def test_bad_arguments_get_clear_errors(kwargs, match):
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(InputError, match=match):
        fxpress.compile(model, (torch.randn(2, 4),), passes="auto", target="torch", **kwargs)


def test_evaluate_without_auto_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(InputError, match="only with passes='auto'"):
        fxpress.compile(model, (torch.randn(2, 4),), passes="default", evaluate=lambda f: 1.0, max_drop=0.01)


def test_html_report_shows_the_choice_and_the_front(chosen, tmp_path):
    cm, _ = chosen
    page = open(cm.html_report(str(tmp_path / "r.html")), encoding="utf-8").read()
    assert "Auto search: per-layer choice and Pareto front" in page
    for label, choice in cm.auto.chosen.items():
        assert f"<b>{choice}</b>" in page


def test_time_bound_stops_the_search_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 32)
    calls = []

    @torch.no_grad()
    def evaluate(f):
        calls.append(1)
        return -float((f(x) - model(x)).abs().mean())

    cm = fxpress.compile(model, (x,), passes="auto", evaluate=evaluate, max_drop=1.0, objective="size",
                         target="torch", options={"auto": {"progress": False, "time_s": 1e-3}})
    assert any("time_s ran out" in n for n in cm.auto.notes), cm.auto.notes
    assert set(cm.auto.chosen.values()) == {"fp32"} and len(calls) == 2  # baseline + the final check


def test_low_rank_plus_int8_candidate_factors_the_layer_then_quantizes_both_factors(digits):
    """lr<r>+int8 (a combination across techniques, offered where low_rank and int8 both are): low_rank
    writes the layer as two Linear calls (as_linears), and the int8 pass takes both; the other layers
    stay fp32. Numbers: within int8's error of the low-rank-only graph (target torch, any ISA)."""
    from fxpress.auto.candidates import FP32, LOW_RANK_INT8, build_passes, find_layers

    x = digits["example"]
    traced = fxpress.compile(digits["model"], x, passes=["fuse"], target="torch").gm
    layers = find_layers(traced, ("int8", "low_rank"))
    linear = next(L for L in layers if L.kind == "linear" and any(c.technique == LOW_RANK_INT8 for c in L.candidates))
    assert all(c.technique != LOW_RANK_INT8 for L in layers if L.kind != "linear" for c in L.candidates)
    combo = next(c for c in linear.candidates if c.technique == LOW_RANK_INT8)
    plain = next(c for c in linear.candidates if c.name == f"lr{combo.rank}")

    def compiled(candidate):
        config = {L.key: (candidate if L.key == linear.key else FP32) for L in layers}
        return fxpress.compile(digits["model"], x, passes=build_passes(layers, config), target="torch",
                               calibration=digits["calibration"])

    both, low_rank_only = compiled(combo), compiled(plain)
    code = both.gm.code
    assert code.count("fxpress.qlinear") == 2 and "lowrank_linear" not in code  # the two factors, quantized
    assert "fxpress.qconv2d" not in code  # the convs were not chosen: fp32
    with torch.no_grad():
        y, y_lr = both(*x), low_rank_only(*x)
    assert float((y - y_lr).norm() / y_lr.norm()) < 0.05
    assert _stored_bytes(both) < _stored_bytes(low_rank_only)
