"""split_branches, alternative lowering: the host program as ONE graph with ``torch.cond``.

TVM's Relax importer turns ``torch.cond`` into ``relax.If`` and the ONNX exporter into an ``If`` node,
so where the control flow fits that form the whole dynamic model can be one compiled artifact instead
of regions + a host program. This module builds that graph from the split program (so the regions,
already optimised by the passes, are reused):

- an ``if`` whose branches fall through becomes ``torch.cond`` returning the variables both sides
  define with the same shape; one whose branches leave (``return``/``break``/``continue``) takes the
  rest of the program into both branches (continuation passing), so every branch returns the model
  outputs;
- loops are unrolled to their declared bound: a bounded ``while`` becomes ``max_iter`` guarded
  copies of its body. Past the bound the native graph stops (``on_exceed="stop"``): a graph cannot
  raise the host program's error.

The cost is what the benchmark measures: the graph holds every path (code size grows with the bound
and with early exits) and each ``If`` has a fixed dispatch overhead, versus the host program's one
Python call per region.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from . import ir

_DTYPES = {"bool": torch.bool, "int64": torch.int64, "float64": torch.float64, "float32": torch.float32,
           "int32": torch.int32}


def _exits(nodes: list, in_loop: bool = False) -> bool:
    for n in nodes:
        if isinstance(n, ir.Return):
            return True
        if isinstance(n, (ir.Break, ir.Continue)) and not in_loop:
            return True
        if isinstance(n, ir.If) and (_exits(n.then, in_loop) or _exits(n.orelse, in_loop)):
            return True
        if isinstance(n, (ir.While, ir.ForRange, ir.Unrolled)):
            bodies = n.iterations if isinstance(n, ir.Unrolled) else [n.body] + (
                [n.cond_body] if isinstance(n, ir.While) else [])
            if any(_exits(b, True) for b in bodies):
                if any(isinstance(x, ir.Return) for b in bodies for x in ir.walk(b)):
                    return True
    return False


def _leaves_loop(body: list) -> bool:
    """Whether a loop body can leave its iteration early: break/continue at this loop's level, or return."""
    for n in body:
        if isinstance(n, (ir.Break, ir.Continue, ir.Return)):
            return True
        if isinstance(n, ir.If) and (_leaves_loop(n.then) or _leaves_loop(n.orelse)):
            return True
        if isinstance(n, (ir.While, ir.ForRange, ir.Unrolled)) and any(isinstance(x, ir.Return) for x in ir.walk([n])):
            return True
    return False


def _tensor(value, dtype: str | None = None):
    if isinstance(value, torch.Tensor):
        return value if dtype is None or str(value.dtype).replace("torch.", "") == dtype else value.to(_DTYPES[dtype])
    if dtype is None:
        dtype = "bool" if isinstance(value, bool) else "int64" if isinstance(value, int) else "float64"
    return torch.tensor(value, dtype=_DTYPES[dtype])


class _Loop:
    def __init__(self, brk: Callable, cont: Callable):
        self.brk, self.cont = brk, cont


class NativeProgram(nn.Module):
    """Runs the host program with torch ops only (torch.cond for branches): exportable as one graph."""

    def __init__(self, host: ir.HostProgram, graphs: dict[str, fx.GraphModule]):
        super().__init__()
        self.graphs = nn.ModuleDict(graphs)
        self.host = host

    def forward(self, *inputs):
        env = dict(zip(self.host.inputs, inputs))
        return tuple(self._run(self.host.body, env, None, None))

    # ------------------------------------------------------------------ blocks (continuation passing)
    def _run(self, nodes: list, env: dict, k: Callable | None, loop: _Loop | None):
        env = dict(env)
        for i, n in enumerate(nodes):
            rest = nodes[i + 1:]
            if isinstance(n, ir.Call):
                self._call(n, env)
            elif isinstance(n, ir.Set):
                env.update(n.values)
            elif isinstance(n, ir.Return):
                return [env[v] for v in n.values]
            elif isinstance(n, ir.Break):
                return loop.brk(env)
            elif isinstance(n, ir.Continue):
                return loop.cont(env)
            elif isinstance(n, ir.If):
                if _exits(n.then) or _exits(n.orelse):
                    after = (lambda e, rest=rest: self._run(rest, e, k, loop))
                    return self._cond(env[n.cond], env,
                                      lambda e: self._run(n.then, e, after, loop),
                                      lambda e: self._run(n.orelse, e, after, loop))
                env = self._join_if(env[n.cond], env, n.then, n.orelse, loop)
            elif isinstance(n, ir.Unrolled):
                after = (lambda e, rest=rest: self._run(rest, e, k, loop))
                return self._unrolled(n.iterations, 0, env, after)
            elif isinstance(n, ir.While):
                if _leaves_loop(n.body):
                    after = (lambda e, rest=rest: self._run(rest, e, k, loop))
                    return self._while_cps(n, 0, env, after)
                for _ in range(n.max_iter):
                    env = self._run(n.cond_body, env, lambda e: e, None)
                    env = self._join_if(env[n.cond], env, n.body, [], None)
            elif isinstance(n, ir.ForRange):
                if _leaves_loop(n.body):
                    raise NotImplementedError(f"native lowering: break/continue/return in the bounded for loop at "
                                              f"{n.loc}; use lowering='split'")
                count = env[n.count] if isinstance(n.count, str) else n.count
                for j in range(n.max_iter):
                    if n.index:
                        env[n.index] = torch.tensor(j, dtype=torch.int64)
                    pred = (torch.as_tensor(j) < count) if isinstance(count, torch.Tensor) else (j < count)
                    env = self._join_if(pred, env, n.body, [], None)
            else:  # pragma: no cover
                raise TypeError(n)
        return k(env) if k is not None else env

    def _unrolled(self, iterations: list, j: int, env: dict, after: Callable):
        if j == len(iterations):
            return after(env)
        nxt = (lambda e: self._unrolled(iterations, j + 1, e, after))
        return self._run(iterations[j], env, nxt, _Loop(after, nxt))

    def _while_cps(self, n: ir.While, j: int, env: dict, after: Callable):
        env = self._run(n.cond_body, env, lambda e: e, None)
        if j == n.max_iter:
            return after(env)  # the bound: stop
        nxt = (lambda e: self._while_cps(n, j + 1, e, after))
        return self._cond(env[n.cond], env, lambda e: self._run(n.body, e, nxt, _Loop(after, nxt)), after)

    # ------------------------------------------------------------------ primitives
    def _call(self, n: ir.Call, env: dict) -> None:
        sig = self.host.regions[n.region]
        args = [_tensor(env[name], dtype) for name, dtype in zip(sig.inputs, sig.input_dtypes)]
        outs = self.graphs[n.region](*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        env.update(zip(sig.outputs, outs))
        env.update(n.consts)

    @staticmethod
    def _pred(pred):
        if isinstance(pred, torch.Tensor):
            return pred.reshape(()).to(torch.bool) if pred.dtype != torch.bool else pred.reshape(())
        return bool(pred)

    def _cond(self, pred, env: dict, true_fn: Callable, false_fn: Callable):
        """torch.cond over continuations that both return the model outputs (a list of tensors)."""
        pred = self._pred(pred)
        if isinstance(pred, bool):
            return (true_fn if pred else false_fn)(env)
        names = [k for k, v in env.items() if isinstance(v, torch.Tensor)]
        static = {k: v for k, v in env.items() if not isinstance(v, torch.Tensor)}
        ops = tuple(env[k] for k in names)

        def wrap(fn):
            def branch(*xs):
                outs = fn({**static, **dict(zip(names, xs))})
                return tuple(_no_alias(_tensor(o), xs) for o in outs)
            return branch

        return list(torch.cond(pred, wrap(true_fn), wrap(false_fn), ops))

    def _join_if(self, pred, env: dict, then: list, orelse: list, loop) -> dict:
        """An if whose branches fall through: torch.cond returning the variables defined after it."""
        pred = self._pred(pred)
        if isinstance(pred, bool):
            return self._run(then if pred else orelse, env, lambda e: e, loop)
        meta_t = self._assigned(then, env)
        meta_f = self._assigned(orelse, env)
        names = [v for v in dict.fromkeys(list(meta_t) + list(meta_f))
                 if meta_t.get(v, _meta(env.get(v))) == meta_f.get(v, _meta(env.get(v)))
                 and meta_t.get(v, _meta(env.get(v))) is not None]
        tensor_names = [k for k, v in env.items() if isinstance(v, torch.Tensor)]
        static = {k: v for k, v in env.items() if not isinstance(v, torch.Tensor)}
        ops = tuple(env[k] for k in tensor_names)

        def wrap(block):
            def branch(*xs):
                e = self._run(block, {**static, **dict(zip(tensor_names, xs))}, lambda e: e, loop)
                return tuple(_no_alias(_tensor(e[v]), xs) for v in names)
            return branch

        if not names:
            return env
        outs = torch.cond(pred, wrap(then), wrap(orelse), ops)
        env = dict(env)
        env.update(zip(names, outs))
        return env

    def _assigned(self, nodes: list, env: dict) -> dict[str, Any]:
        """(shape, dtype) of every variable a fall-through block assigns (last assignment wins)."""
        out: dict[str, Any] = {}
        for n in nodes:
            if isinstance(n, ir.Call):
                sig = self.host.regions[n.region]
                outs = _output_metas(self.graphs[n.region])
                for name, m in zip(sig.outputs, outs):
                    out[name] = m
                for name, v in n.consts.items():
                    out[name] = _meta(_tensor(v))
            elif isinstance(n, ir.Set):
                for name, v in n.values.items():
                    out[name] = _meta(_tensor(v))
            else:
                for sub in ir.children(n):
                    for name, m in self._assigned(sub, env).items():
                        out.setdefault(name, m)
                if isinstance(n, ir.ForRange) and n.index:
                    out[n.index] = ((), torch.int64)
        return out


def _meta(v):
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.dtype)
    if isinstance(v, (bool, int, float)):
        return _meta(_tensor(v))
    return None


def _output_metas(gm: fx.GraphModule) -> list:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    args = out_node.args[0]
    args = args if isinstance(args, (tuple, list)) else (args,)
    metas = []
    for a in args:
        tm = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
        metas.append((tuple(tm.shape), tm.dtype) if tm is not None else None)
    return metas


def _no_alias(t: torch.Tensor, inputs) -> torch.Tensor:
    # torch.cond branches may not return their inputs; a copy costs nothing once compiled.
    return t.clone() if any(t is x for x in inputs) else t


def native_module(split, graphs: dict[str, fx.GraphModule], example_inputs: tuple) -> fx.GraphModule:
    """The split program as one exported graph (torch.cond for branches), as an fx.GraphModule."""
    module = NativeProgram(split.host, graphs).eval()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(example_inputs), strict=False)
    gm = ep.module()
    # An exported module refuses .eval(); it computes the same in either mode, so only set the flag
    # (exporters warn about modules in training mode).
    for m in gm.modules():
        m.training = False
    return gm
