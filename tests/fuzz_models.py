"""Random models for fuzzing fxpress: hypothesis strategies that build valid ``nn.Module``s.

The generator draws a *spec* (plain Python data: family, input shapes, a list of ops) while tracking
the shape of every value, so every model is valid by construction. A spec becomes an ``nn.Module`` whose
layers are attributes (``self.op3 = nn.Conv2d(...)``, ``nn.Sequential`` conv-BN-act blocks, an attention
module written op by op) and whose ``forward`` is *generated Python source* written to a real file
(``forward_source``): straight-line code in the styles the reference models use (modules, ``F.*`` calls,
tensor methods, in-place activations), so tracing, stack traces and AST-reading passes (split_branches)
see what they see on real models, not hand-made graphs.

Ops (those the reference models use): conv (plain, grouped, depthwise, strided, dilated), conv-BN-act
blocks, BatchNorm, activations (module / functional / method / in-place forms), max/avg/adaptive pooling,
residual adds, concat, scalar scaling, flatten / view / reshape / unflatten / transpose, linear, layernorm,
softmax, matmul, multi-head attention, a cls token, token + position embeddings, ``x[:, 0]`` and mean
pooling. Families: image [N,C,H,W], sequence [B,T,D], vector [B,D] and token ids [B,T] (int64); some
models take a second input, some return several outputs (tuple or dict), and a few contain a
shape-dependent Python branch that symbolic_trace cannot capture (so the torch.export fallback runs).

A spec's ``repr`` is valid Python: paste a failing spec into ``FuzzCase(spec)`` to rebuild the model.

The oracle that checks a case is tests/fuzz_check.py (``check_case``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

ACTS = ["relu", "relu6", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu"]
ACT_FORMS = ["module", "functional", "method", "torch"]
# Producers of a fresh tensor (never a view, never an input): an in-place activation may follow them.
_FRESH = {"conv", "bn", "linear", "add", "scale", "ln"}

MAX_FEATURES = 1024  # flatten only when C*H*W stays below this


# ============================================================================ the spec strategy


@st.composite
def specs(draw, max_ops: int = 8, families=("image", "seq", "vector", "tokens")) -> dict:
    family = draw(st.sampled_from(list(families)))
    batch = draw(st.integers(1, 3))
    if family == "image":
        first = (batch, draw(st.integers(1, 8)), draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    elif family == "seq":
        first = (batch, draw(st.integers(1, 8)), draw(st.integers(1, 24)))
    elif family == "vector":
        first = (batch, draw(st.integers(1, 32)))
    else:
        first = (batch, draw(st.integers(1, 8)))
    two_inputs = family != "tokens" and draw(st.integers(0, 9)) == 7
    inputs = [first, first] if two_inputs else [first]
    dtypes = ["int64" if family == "tokens" else "float32"] * len(inputs)

    shapes: list[tuple] = [tuple(s) for s in inputs]
    alive = [True] * len(shapes)
    producer: list[str] = ["input"] * len(shapes)
    ops: list[tuple[str, dict]] = []

    def emit(kind: str, p: dict, out_shape: tuple) -> None:
        ops.append((kind, p))
        shapes.append(tuple(out_shape))
        alive.append(True)
        producer.append(kind)

    if family == "tokens":
        vocab = draw(st.integers(2, 50))
        dim = draw(st.integers(1, 24))
        emit("embed", {"src": 0, "vocab": vocab, "dim": dim, "max_len": first[1] + draw(st.integers(0, 3))},
             (batch, first[1], dim))

    n_ops = draw(st.integers(1, max_ops))
    for _ in range(n_ops):
        last = len(shapes) - 1
        live = [i for i, a in enumerate(alive) if a and shapes[i] and _is_float(i, dtypes)]
        # Mostly a chain, sometimes a branch from an earlier value (multi-user nodes, DAGs).
        src = last if draw(st.integers(0, 6)) else draw(st.sampled_from(live))
        if not alive[src] or not _is_float(src, dtypes):
            src = last
        s = shapes[src]
        kind = draw(st.sampled_from(_kinds_for(s)))
        if len(s) >= 3 and draw(st.integers(0, 40)) == 17:
            kind = "branch"  # rare: sends the whole model through the torch.export fallback
        p: dict[str, Any] = {"src": src}
        if kind == "act":
            p["fn"] = draw(st.sampled_from(ACTS))
            p["form"] = draw(st.sampled_from(ACT_FORMS))
            if src == last and producer[src] in _FRESH and p["form"] in ("module", "functional") \
                    and p["fn"] in ("relu", "relu6", "hardswish", "silu", "leaky_relu") and draw(st.booleans()):
                p["inplace"] = True
            out = s
        elif kind == "scale":
            p["c"] = draw(st.sampled_from([0.5, 2.0, -1.0, 0.125, 3.0]))
            out = s
        elif kind == "add":
            same = [i for i in live if shapes[i] == s]
            p["other"] = draw(st.sampled_from(same))
            p["form"] = draw(st.sampled_from(["op", "torch.add", "scaled"]))
            out = s
        elif kind == "cat":
            dim = draw(st.sampled_from(_cat_dims(s)))
            ok = [i for i in live if len(shapes[i]) == len(s)
                  and all(a == b for d, (a, b) in enumerate(zip(shapes[i], s)) if d != dim % len(s))]
            p["other"] = draw(st.sampled_from(ok))
            p["dim"] = dim
            out = list(s)
            out[dim] += shapes[p["other"]][dim]
            if math.prod(out) > 4096:
                kind, p, out = "scale", {"src": src, "c": 2.0}, s
        elif kind == "softmax":
            p["dim"] = draw(st.sampled_from([-1, 1]))
            p["form"] = draw(st.sampled_from(["torch", "functional", "method", "module"]))
            out = s
        elif kind == "bn":
            out = s
        elif kind == "ln":
            out = s
        elif kind == "linear":
            p["out"] = draw(st.integers(1, 32))
            p["bias"] = draw(st.booleans())
            out = (*s[:-1], p["out"])
        elif kind in ("conv", "conv_block"):
            p.update(_draw_conv(draw, s))
            if kind == "conv_block":
                p["act"] = draw(st.sampled_from(["relu", "relu6", "silu", "hardswish", "gelu"]))
            out = (s[0], p["out"], _conv_out(s[2], p, 0), _conv_out(s[3], p, 1))
        elif kind == "pool":
            p.update(draw(st.sampled_from(_pool_options(s))))
            k, st_, pad = p["k"], p["stride"], p["pad"]
            out = (s[0], s[1], (s[2] + 2 * pad - k) // st_ + 1, (s[3] + 2 * pad - k) // st_ + 1)
        elif kind == "gap":
            p["size"] = draw(st.sampled_from([1, 2])) if min(s[2], s[3]) >= 2 else 1
            p["form"] = draw(st.sampled_from(["module", "functional"]))
            out = (s[0], s[1], p["size"], p["size"])
        elif kind == "flatten":
            p["form"] = draw(st.sampled_from(["torch", "view", "module", "method"]))
            out = (s[0], math.prod(s[1:]))
        elif kind == "patchify":
            out = (s[0], s[2] * s[3], s[1])
        elif kind == "attention":
            p["heads"] = draw(st.integers(1, 3))
            p["head_dim"] = draw(st.integers(1, 8))
            p["bias"] = draw(st.booleans())
            mem = [i for i in live if len(shapes[i]) == 3 and shapes[i][0] == s[0] and shapes[i][2] == s[2]]
            p["mem"] = draw(st.sampled_from(mem)) if draw(st.integers(0, 3)) == 3 else None
            out = s
        elif kind == "matmul":
            ok = [i for i in live if len(shapes[i]) == 3 and shapes[i][0] == s[0] and shapes[i][2] == s[2]]
            p["other"] = draw(st.sampled_from(ok))
            p["form"] = draw(st.sampled_from(["torch.matmul", "op", "bmm"]))
            out = (s[0], s[1], shapes[p["other"]][1])
        elif kind == "reshape":
            n = s[1] * s[2]
            t2 = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
            p["shape"] = (t2, n // t2)
            p["form"] = draw(st.sampled_from(["reshape", "view"]))
            out = (s[0], t2, n // t2)
        elif kind == "transpose":
            out = (s[0], s[2], s[1])
        elif kind == "cls":
            out = (s[0], s[1] + 1, s[2])
        elif kind in ("select", "mean"):
            out = (s[0], s[2])
        elif kind == "unflatten":
            d = s[1]
            a = draw(st.sampled_from([k for k in range(1, d + 1) if d % k == 0]))
            p["sizes"] = (a, d // a)
            out = (s[0], a, d // a)
        elif kind == "branch":
            out = s
        else:  # pragma: no cover - _kinds_for and this chain must agree
            raise AssertionError(kind)
        emit(kind, p, out)
        if p.get("inplace"):
            alive[src] = False  # the in-place op overwrote it: nothing may read the old value again

    live = [i for i, a in enumerate(alive) if a and _is_float(i, dtypes) and i >= len(inputs)]
    outputs = [len(shapes) - 1]
    if len(live) > 1 and draw(st.integers(0, 5)) == 5:
        outputs.append(draw(st.sampled_from([i for i in live if i != outputs[0]])))
    out_form = "single" if len(outputs) == 1 else draw(st.sampled_from(["tuple", "dict"]))
    return {
        "family": family,
        "inputs": [list(s) for s in inputs],
        "dtypes": dtypes,
        "ops": ops,
        "shapes": [list(v) for v in shapes],  # of every value: inputs, then one per op
        "outputs": outputs,
        "out_form": out_form,
        "seed": draw(st.integers(0, 2**16)),
        "calibrate": draw(st.booleans()),
    }


def _is_float(i: int, dtypes: list[str]) -> bool:
    return i >= len(dtypes) or dtypes[i] != "int64"


def _kinds_for(s: tuple) -> list[str]:
    common = ["act", "add", "scale", "softmax"]
    if len(s) == 4:
        kinds = ["conv", "conv", "conv_block", "conv_block", "bn", *common, "cat", "gap"]  # conv-heavy, like CNNs
        if _pool_options(s):
            kinds.append("pool")
        if math.prod(s[1:]) <= MAX_FEATURES:
            kinds += ["flatten", "patchify"]
        return kinds
    if len(s) == 3:
        return ["linear", "ln", *common, "cat", "bn", "attention", "matmul", "reshape", "transpose", "cls",
                "select", "mean"]
    return ["linear", "ln", *common, "cat", "bn", "unflatten"]


def _cat_dims(s: tuple) -> list[int]:
    return [1] if len(s) == 4 else ([-1, 1] if len(s) == 3 else [1])


def _conv_out(size: int, p: dict, axis: int) -> int:
    return (size + 2 * p["pad"] - p["dil"] * (p["k"] - 1) - 1) // p["stride"] + 1


def _draw_conv(draw, s: tuple) -> dict:
    c_in, h, w = s[1], s[2], s[3]
    p: dict[str, Any] = {}
    depthwise = draw(st.integers(0, 4)) == 3
    p["out"] = c_in * draw(st.sampled_from([1, 2])) if depthwise else draw(st.integers(1, 16))
    p["k"] = draw(st.sampled_from([1, 3, 5]))
    p["pad"] = draw(st.sampled_from([p["k"] // 2, 0]))
    p["dil"] = draw(st.sampled_from([1, 1, 1, 2]))
    p["stride"] = draw(st.sampled_from([1, 1, 2]))
    while p["k"] > 1 and (_conv_out(h, p, 0) < 1 or _conv_out(w, p, 1) < 1):
        p["k"], p["dil"] = p["k"] - 2, 1
        p["pad"] = min(p["pad"], p["k"] // 2)
    if depthwise:
        p["groups"] = c_in
    else:
        p["groups"] = draw(st.sampled_from([g for g in (1, 2, 4) if c_in % g == 0 and p["out"] % g == 0]))
    p["bias"] = draw(st.booleans())
    return p


def _pool_options(s: tuple) -> list[dict]:
    h, w = s[2], s[3]
    opts = []
    for typ, k, stride, pad in (("max", 3, 2, 1), ("max", 2, 2, 0), ("avg", 2, 2, 0), ("avg", 3, 1, 1), ("max", 3, 1, 1)):
        if min(h, w) + 2 * pad >= k:
            opts.append({"type": typ, "k": k, "stride": stride, "pad": pad})
    return opts


# ============================================================================ spec → nn.Module


def _act_module(fn: str, inplace: bool = False) -> nn.Module:
    return {
        "relu": lambda: nn.ReLU(inplace=inplace), "relu6": lambda: nn.ReLU6(inplace=inplace),
        "gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": lambda: nn.SiLU(inplace=inplace), "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(),
        "hardswish": lambda: nn.Hardswish(inplace=inplace), "hardsigmoid": lambda: nn.Hardsigmoid(),
        "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=inplace),
    }[fn]()


class Attention(nn.Module):
    """Multi-head attention op by op, as in models/vit.py (optionally cross-attention to ``mem``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.scale = head_dim ** -0.5
        self.q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k = nn.Linear(dim, heads * head_dim, bias=bias)
        self.v = nn.Linear(dim, heads * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, dim, bias=bias)

    def _split(self, x):
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x, mem=None):
        kv = x if mem is None else mem
        q, k, v = self._split(self.q(x)), self._split(self.k(kv)), self._split(self.v(kv))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(scores, dim=-1)
        return self.out(torch.matmul(attn, v).transpose(1, 2).flatten(2))


def _randomize_norm(m: nn.Module, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics, so folding a norm is really tested."""
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
        with torch.no_grad():
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


class FuzzNet(nn.Module):
    """The layers of a spec as attributes ``op<i>``; ``forward`` is generated Python (see ``forward_source``)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        shapes = [tuple(s) for s in spec["shapes"]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec["seed"])
            for i, (kind, p) in enumerate(spec["ops"]):
                self._build(f"op{i}", kind, p, shapes[p["src"]])
            g = torch.Generator().manual_seed(spec["seed"] + 7)
            for m in self.modules():
                _randomize_norm(m, g)

    def _build(self, key: str, kind: str, p: dict, s: tuple) -> None:
        mod: nn.Module | None = None
        if kind == "embed":
            mod = nn.Embedding(p["vocab"], p["dim"])
            setattr(self, key + "_pos", nn.Embedding(p["max_len"], p["dim"]))
        elif kind == "act" and p["form"] == "module":
            mod = _act_module(p["fn"], p.get("inplace", False))
        elif kind == "softmax" and p["form"] == "module":
            mod = nn.Softmax(dim=p["dim"])
        elif kind == "bn":
            mod = nn.BatchNorm2d(s[1]) if len(s) == 4 else nn.BatchNorm1d(s[1])
        elif kind == "ln":
            mod = nn.LayerNorm(s[-1])
        elif kind == "linear":
            mod = nn.Linear(s[-1], p["out"], bias=p["bias"])
        elif kind in ("conv", "conv_block"):
            mod = nn.Conv2d(s[1], p["out"], p["k"], stride=p["stride"], padding=p["pad"], dilation=p["dil"],
                            groups=p["groups"], bias=p["bias"])
            if kind == "conv_block":
                mod = nn.Sequential(mod, nn.BatchNorm2d(p["out"]), _act_module(p["act"], inplace=True))
        elif kind == "pool":
            mod = (nn.MaxPool2d if p["type"] == "max" else nn.AvgPool2d)(p["k"], p["stride"], p["pad"])
        elif kind == "gap" and p["form"] == "module":
            mod = nn.AdaptiveAvgPool2d(p["size"])
        elif kind == "flatten" and p["form"] == "module":
            mod = nn.Flatten()
        elif kind == "attention":
            mod = Attention(s[-1], p["heads"], p["head_dim"], p["bias"])
        elif kind == "cls":
            setattr(self, key + "_cls", nn.Parameter(torch.randn(1, 1, s[-1]) * 0.5))
        if mod is not None:
            setattr(self, key, mod)


_ACT_EXPR = {  # (form, fn) -> expression of {x}; "module" calls self.op<i>
    "functional": {"relu": "F.relu({x}{ip})", "relu6": "F.relu6({x}{ip})", "gelu": "F.gelu({x})",
                   "gelu_tanh": "F.gelu({x}, approximate='tanh')", "silu": "F.silu({x}{ip})",
                   "sigmoid": "torch.sigmoid({x})", "tanh": "torch.tanh({x})", "hardswish": "F.hardswish({x}{ip})",
                   "hardsigmoid": "F.hardsigmoid({x})", "leaky_relu": "F.leaky_relu({x}, 0.1{ip})"},
    "method": {"relu": "{x}.relu()", "relu6": "{x}.clamp(0.0, 6.0)", "gelu": "F.gelu({x})",
               "gelu_tanh": "F.gelu({x}, approximate='tanh')", "silu": "{x} * {x}.sigmoid()",
               "sigmoid": "{x}.sigmoid()", "tanh": "{x}.tanh()", "hardswish": "{x} * ({x} + 3).clamp(0, 6) / 6",
               "hardsigmoid": "({x} + 3).clamp(0, 6) / 6", "leaky_relu": "torch.where({x} > 0, {x}, {x} * 0.1)"},
    "torch": {"relu": "torch.relu({x})", "relu6": "torch.clamp({x}, 0.0, 6.0)", "gelu": "F.gelu({x})",
              "gelu_tanh": "F.gelu({x}, approximate='tanh')", "silu": "F.silu({x})", "sigmoid": "torch.sigmoid({x})",
              "tanh": "torch.tanh({x})", "hardswish": "F.hardswish({x})", "hardsigmoid": "F.hardsigmoid({x})",
              "leaky_relu": "F.leaky_relu({x}, 0.1)"},
}


def forward_source(spec: dict) -> str:
    """The model's ``forward`` as Python source, written the way the reference models are written."""
    n_in = len(spec["inputs"])
    name = [f"x{i}" if n_in > 1 else "x" for i in range(n_in)] + [f"v{i}" for i in range(len(spec["ops"]))]
    lines = [f"def forward(self, {', '.join(name[:n_in])}):"]
    for i, (kind, p) in enumerate(spec["ops"]):
        v, x, key = name[n_in + i], name[p["src"]], f"self.op{i}"
        o = name[p["other"]] if "other" in p else None
        if kind == "embed":
            e = f"{key}({x}) + {key}_pos.weight[: {x}.shape[1]]"
        elif kind == "act":
            ip = ", inplace=True" if p.get("inplace") else ""
            e = f"{key}({x})" if p["form"] == "module" else _ACT_EXPR[p["form"]][p["fn"]].format(x=x, ip=ip)
        elif kind == "scale":
            e = f"{x} * {p['c']!r}"
        elif kind == "add":
            e = {"op": f"{x} + {o}", "torch.add": f"torch.add({x}, {o})",
                 "scaled": f"torch.add({x}, {o}, alpha=0.5)"}[p["form"]]
        elif kind == "cat":
            e = f"torch.cat([{x}, {o}], dim={p['dim']})"
        elif kind == "softmax":
            d = p["dim"]
            e = {"torch": f"torch.softmax({x}, dim={d})", "functional": f"F.softmax({x}, dim={d})",
                 "method": f"{x}.softmax({d})", "module": f"{key}({x})"}[p["form"]]
        elif kind in ("bn", "ln", "linear", "conv", "conv_block", "pool"):
            e = f"{key}({x})"
        elif kind == "attention":
            e = f"{key}({x})" if p["mem"] is None else f"{key}({x}, {name[p['mem']]})"
        elif kind == "gap":
            e = f"{key}({x})" if p["form"] == "module" else f"F.adaptive_avg_pool2d({x}, {p['size']})"
        elif kind == "flatten":
            e = {"torch": f"torch.flatten({x}, 1)", "view": f"{x}.view({x}.size(0), -1)", "module": f"{key}({x})",
                 "method": f"{x}.flatten(1)"}[p["form"]]
        elif kind == "patchify":
            e = f"{x}.flatten(2).transpose(1, 2)"
        elif kind == "matmul":
            e = {"torch.matmul": f"torch.matmul({x}, {o}.transpose(-2, -1))", "op": f"{x} @ {o}.transpose(1, 2)",
                 "bmm": f"torch.bmm({x}, {o}.transpose(1, 2))"}[p["form"]]
        elif kind == "reshape":
            t2, d2 = p["shape"]
            e = (f"{x}.reshape({x}.shape[0], {t2}, {d2})" if p["form"] == "reshape"
                 else f"{x}.contiguous().view(-1, {t2}, {d2})")
        elif kind == "transpose":
            e = f"{x}.transpose(1, 2)"
        elif kind == "cls":
            e = f"torch.cat([{key}_cls.expand({x}.shape[0], -1, -1), {x}], dim=1)"
        elif kind == "select":
            e = f"{x}[:, 0]"
        elif kind == "mean":
            e = f"{x}.mean(dim=1)"
        elif kind == "unflatten":
            e = f"{x}.unflatten(1, {tuple(p['sizes'])})"
        elif kind == "branch":
            # A Python branch on a shape: symbolic_trace cannot follow it, torch.export can.
            lines += [f"    if {x}.shape[-1] % 2 == 0:", f"        {v} = {x} * 2.0", "    else:", f"        {v} = {x} - 1.0"]
            continue
        else:  # pragma: no cover - specs() and this chain must agree
            raise AssertionError(kind)
        lines.append(f"    {v} = {e}")
    outs = [name[j] for j in spec["outputs"]]
    if spec["out_form"] == "tuple":
        lines.append(f"    return ({', '.join(outs)},)" if len(outs) == 1 else f"    return {', '.join(outs)}")
    elif spec["out_form"] == "dict":
        lines.append("    return {" + ", ".join(f"'out{k}': {o}" for k, o in enumerate(outs)) + "}")
    else:
        lines.append(f"    return {outs[0]}")
    return "\n".join(lines) + "\n"


_SRC_DIR = os.path.join(tempfile.gettempdir(), "fxpress-fuzz-models")
_CLASSES: dict[str, type] = {}


def model_class(spec: dict) -> type:
    """A FuzzNet subclass whose forward is the generated source, loaded from a real file so that
    stack traces, ``inspect.getsource`` and AST-reading passes (split_branches) see real code."""
    src = "import torch\nimport torch.nn.functional as F\n\n\n" + forward_source(spec)
    digest = hashlib.sha1(src.encode()).hexdigest()[:16]
    if digest not in _CLASSES:
        os.makedirs(_SRC_DIR, exist_ok=True)
        path = os.path.join(_SRC_DIR, f"fuzz_{digest}.py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        mod_spec = importlib.util.spec_from_file_location(f"fxpress_fuzz_{digest}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
        _CLASSES[digest] = type("FuzzModel", (FuzzNet,), {"forward": module.forward, "__module__": module.__name__})
    return _CLASSES[digest]


# ============================================================================ a case: model + inputs


@dataclass
class FuzzCase:
    spec: dict

    def build(self) -> nn.Module:
        return model_class(self.spec)(self.spec).eval()

    @property
    def source(self) -> str:
        return forward_source(self.spec)

    def inputs(self, variant: int = 0) -> tuple[torch.Tensor, ...]:
        """Example inputs (variant 0); other variants are fresh inputs of the same shapes."""
        g = torch.Generator().manual_seed(self.spec["seed"] * 31 + variant)
        out = []
        for shape, dtype in zip(self.spec["inputs"], self.spec["dtypes"]):
            if dtype == "int64":
                vocab = self.spec["ops"][0][1]["vocab"]
                out.append(torch.randint(0, vocab, tuple(shape), generator=g))
            else:
                out.append(torch.randn(tuple(shape), generator=g))
        return tuple(out)

    def calibration(self) -> list[tuple] | None:
        return [self.inputs(10 + i) for i in range(2)] if self.spec["calibrate"] else None

    @property
    def op_kinds(self) -> list[str]:
        return [k for k, _ in self.spec["ops"]]

    def __repr__(self) -> str:
        return f"FuzzCase({self.spec!r})"


def fuzz_cases(max_ops: int = 8, families=("image", "seq", "vector", "tokens")):
    return specs(max_ops=max_ops, families=families).map(FuzzCase)
