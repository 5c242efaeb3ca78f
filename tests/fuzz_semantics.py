"""Random models for the semantics fuzzer: integer dtypes, NaN/Inf, and index ops (issue #17).

tests/fuzz_models.py draws float networks; the bugs it cannot see are about *what an op means*:
true division of integers, integer constants, type promotion, NaN and Inf propagation, and indices
past the end of a table. Here each case is one small module around such an op, drawn with its dtypes,
shapes, constants and input values (negative integers, NaN/Inf placed at random, ids in range or out of
it). The oracle is eager PyTorch, exactly:

- integer outputs: the same dtype and the same values;
- float outputs: the same dtype, NaN where eager has NaN, the same infinities, finite values within
  1e-4 relative;
- an input eager refuses (an out-of-range id raises IndexError/RuntimeError): the compiled model must
  raise a clear fxpress error, never return numbers and never crash.

``SemanticsCase(spec)`` rebuilds a failing case from the spec printed with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn

INT_DTYPES = ["int64", "int32"]
INT_OPS = ["truediv", "floordiv", "trunc_div", "mul", "add", "sub", "remainder", "neg_const_floordiv"]
PROMOTE_OPS = ["cat", "where", "add_float", "mul_half", "bool_cumsum", "arange_index"]
NAN_OPS = ["linear_relu", "relu", "clamp_min", "maximum", "sigmoid", "softmax", "max_reduce", "gelu"]
INDEX_OPS = ["subscript", "index_select", "gather", "take", "embedding_computed"]


@st.composite
def semantics_specs(draw, kinds=("int", "promote", "nan", "index")) -> dict:
    kind = draw(st.sampled_from(list(kinds)))
    spec: dict = {"kind": kind, "seed": draw(st.integers(0, 2**16)),
                  "batch": draw(st.integers(1, 3)), "width": draw(st.integers(1, 9))}
    if kind == "int":
        spec["op"] = draw(st.sampled_from(INT_OPS))
        spec["dtype"] = draw(st.sampled_from(INT_DTYPES))
        spec["c"] = draw(st.sampled_from([1, 2, 3, 7, -2, -3]))
    elif kind == "promote":
        spec["op"] = draw(st.sampled_from(PROMOTE_OPS))
        spec["dtype"] = draw(st.sampled_from(INT_DTYPES))
    elif kind == "nan":
        spec["op"] = draw(st.sampled_from(NAN_OPS))
        spec["specials"] = draw(st.lists(st.sampled_from(["nan", "inf", "-inf"]), min_size=1, max_size=3))
    else:
        spec["op"] = draw(st.sampled_from(INDEX_OPS))
        spec["table"] = draw(st.integers(2, 12))
        spec["offset"] = draw(st.sampled_from([0, 1, -1]))  # ids + offset: the computed-id case
        # how far out of range the bad call's id is: just past the end, far past it, or negative
        # (-1 is a valid index for t[ids] and take, an error for embedding, index_select and gather)
        spec["bad"] = draw(st.sampled_from(["end", "far", "negative", "minus_one"]))
    return spec


# ============================================================================ models


class IntArith(nn.Module):
    def __init__(self, op: str, c: int):
        super().__init__()
        self.op, self.c = op, c

    def forward(self, x):
        c = self.c
        if self.op == "truediv":
            return x / c
        if self.op == "floordiv":
            return x // c
        if self.op == "trunc_div":
            return torch.div(x, c, rounding_mode="trunc")
        if self.op == "mul":
            return x * c
        if self.op == "add":
            return x + c
        if self.op == "sub":
            return x - c
        if self.op == "remainder":
            return x % c
        return x // -abs(c)  # neg_const_floordiv


class Promote(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, x, y):
        if self.op == "cat":
            return torch.cat([x, y], dim=1)
        if self.op == "where":
            return torch.where(y > 0, x, y)
        if self.op == "add_float":
            return x + y
        if self.op == "mul_half":
            return x * 0.5
        if self.op == "bool_cumsum":
            return (x > 0).cumsum(1)
        idx = torch.arange(x.shape[1] - 1, -1, -1)  # arange_index: reverse the columns
        return x[:, idx]


class NanOps(nn.Module):
    def __init__(self, op: str, width: int):
        super().__init__()
        self.op = op
        self.lin = nn.Linear(width, 4)

    def forward(self, x):
        if self.op == "linear_relu":
            return torch.relu(self.lin(x))
        if self.op == "relu":
            return torch.relu(x)
        if self.op == "clamp_min":
            return x.clamp(min=0.0)
        if self.op == "maximum":
            return torch.maximum(x, torch.zeros_like(x))
        if self.op == "sigmoid":
            return torch.sigmoid(x)
        if self.op == "softmax":
            return torch.softmax(x, dim=-1)
        if self.op == "max_reduce":
            return x.max(dim=-1).values
        return nn.functional.gelu(x)


class IndexOps(nn.Module):
    def __init__(self, op: str, table: int, width: int, offset: int):
        super().__init__()
        self.op, self.offset = op, offset
        self.t = nn.Parameter(torch.randn(table, width))
        self.emb = nn.Embedding(table, width)

    def forward(self, ids):
        ids = ids + self.offset
        if self.op == "subscript":
            return self.t[ids]
        if self.op == "index_select":
            return torch.index_select(self.t, 0, ids.flatten())
        if self.op == "gather":
            return torch.gather(self.t, 0, ids[:, :1].expand(-1, self.t.shape[1]))
        if self.op == "take":
            return torch.take(self.t, ids)
        return self.emb(ids)


@dataclass
class SemanticsCase:
    spec: dict

    def build(self) -> nn.Module:
        s = self.spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s["seed"])
            if s["kind"] == "int":
                m = IntArith(s["op"], s["c"])
            elif s["kind"] == "promote":
                m = Promote(s["op"])
            elif s["kind"] == "nan":
                m = NanOps(s["op"], s["width"])
            else:
                m = IndexOps(s["op"], s["table"], s["width"], s["offset"])
        return m.eval()

    def _gen(self, variant: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.spec["seed"] * 7 + variant)

    def inputs(self, variant: int = 0) -> tuple:
        """Variant 0 is the example the model is compiled with; others are fresh calls of the same shapes."""
        s, g = self.spec, self._gen(variant)
        b, w = s["batch"], s["width"] + 1
        dt = getattr(torch, s.get("dtype", "int64"))
        if s["kind"] == "int":
            return (torch.randint(-50, 50, (b, w), generator=g).to(dt),)
        if s["kind"] == "promote":
            x = torch.randint(-9, 9, (b, w), generator=g).to(dt)
            return (x, torch.randn(b, w, generator=g))
        if s["kind"] == "nan":
            x = torch.randn(b, s["width"], generator=g)
            if variant:  # the example is finite (as users' are); fresh calls carry NaN/Inf
                flat = x.view(-1)
                for special in s["specials"]:
                    if s["op"] == "gelu" and special != "nan":
                        continue  # eager's gelu(+-inf) can be inf * 0 = NaN; compiled kernels give the limit
                    flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = float(special)
            return (x,)
        return (self._ids(g, lo=0, hi=self.valid_high()),)

    def valid_high(self) -> int:
        """Largest id + 1 such that ids + offset stays in range for the op."""
        s = self.spec
        n = s["table"] * s["width"] if s["op"] == "take" else s["table"]
        return n - max(s["offset"], 0)

    def _ids(self, g, lo: int, hi: int) -> torch.Tensor:
        lo = max(lo, -min(self.spec["offset"], 0))
        return torch.randint(lo, max(hi, lo + 1), (self.spec["batch"], 3), generator=g)

    def bad_inputs(self) -> tuple | None:
        """An input eager refuses (index cases only)."""
        s = self.spec
        if s["kind"] != "index":
            return None
        ids = self._ids(self._gen(99), 0, self.valid_high())
        n = self.valid_high() + max(s["offset"], 0)
        bad = {"end": n - s["offset"], "far": 10**8, "negative": -n - 1 - s["offset"],
               "minus_one": -1 - s["offset"]}[s["bad"]]
        ids[0, 0] = bad
        return (ids,)

    def __repr__(self) -> str:
        return f"SemanticsCase({self.spec!r})"


def semantics_cases(kinds=("int", "promote", "nan", "index")):
    return semantics_specs(kinds=kinds).map(SemanticsCase)


# ============================================================================ the oracle


@dataclass
class SemanticsOutcome:
    case: SemanticsCase
    target: str
    findings: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)

    @property
    def bugs(self) -> list[tuple[str, str]]:
        return [f for f in self.findings if f[0] in ("mismatch", "crash")]

    def __str__(self) -> str:
        return "\n".join(f"[{k}] {self.target}: {m}\n  {self.case!r}" for k, m in self.findings)


def compare(y: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when ``y`` means what eager's ``ref`` means; else what differs."""
    if y.dtype != ref.dtype:
        return f"dtype {y.dtype} where eager gives {ref.dtype}"
    if y.shape != ref.shape:
        return f"shape {tuple(y.shape)} where eager gives {tuple(ref.shape)}"
    if not ref.is_floating_point():
        return None if torch.equal(y, ref) else f"integer values differ (max |diff| {(y - ref).abs().max()})"
    if not torch.equal(torch.isnan(y), torch.isnan(ref)):
        return f"NaN at {int(torch.isnan(y).sum())} places where eager has {int(torch.isnan(ref).sum())}"
    inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(y), inf) or not torch.equal(y[inf], ref[inf]):
        return "infinities differ from eager"
    fin = torch.isfinite(ref)
    if fin.any():
        scale = ref[fin].abs().max().clamp_min(1e-30)
        err = float((y[fin] - ref[fin]).abs().max() / scale)
        if not err <= 1e-4:
            return f"relative error {err:.3g}"
    return None


def check_semantics(case: SemanticsCase, target: str) -> SemanticsOutcome:
    import fxpress
    from fxpress.errors import FxpressError

    from fuzz_check import classify

    out = SemanticsOutcome(case, target)
    model, x = case.build(), case.inputs(0)
    try:
        cm = fxpress.compile(model, x, passes="none", target=target)
    except Exception as e:  # noqa: BLE001 - a deliberate fxpress error is a refusal, anything else a crash
        out.findings.append((classify(e), f"compile: {type(e).__name__}: {str(e)[:500]}"))
        return out
    for variant in (0, 1, 2):
        xs = case.inputs(variant)
        with torch.no_grad():
            ref = model(*xs)
        try:
            y = cm(*xs)
        except Exception as e:  # noqa: BLE001
            out.findings.append(("crash", f"call {variant}: {type(e).__name__}: {str(e)[:500]}"))
            return out
        why = compare(y, ref)
        if why is not None:
            out.findings.append(("mismatch", f"call {variant}: {why}"))
            return out
    bad = case.bad_inputs()
    if bad is not None:
        try:
            with torch.no_grad():
                model(*bad)
            eager_refuses = False
        except (IndexError, RuntimeError):
            eager_refuses = True
        if eager_refuses:
            try:
                cm(*bad)
                out.findings.append(("mismatch", "an out-of-range id returned numbers (eager raises IndexError)"))
            except FxpressError:
                pass
            except Exception as e:  # noqa: BLE001
                out.findings.append(("crash", f"out-of-range id: {type(e).__name__}: {str(e)[:300]}"))
    return out
