"""A region as an nn.Module that shares the model's submodules, ready for the tracer, passes and lowering."""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils import _pytree as pytree

from .regions import RegionDef


class RegionModule(nn.Module):
    """A region of the model as a module: shares the model's submodules, parameters and buffers, so
    fxpress's tracer records the same module paths (``blocks.0.conv``) as for the whole model."""

    def __init__(self, root: nn.Module, fn, in_layout: list, out_layout: list):
        super().__init__()
        for n, m in root.named_children():
            self.add_module(n, m)
        for n, p in root.named_parameters(recurse=False):
            self.register_parameter(n, p)
        for n, b in root.named_buffers(recurse=False):
            self.register_buffer(n, b)
        self._sb_fn = fn
        self._sb_in = in_layout
        self._sb_out = out_layout
        self.train(root.training)

    def _sb_run(self, flat):
        args, i = [], 0
        for _, kind, extra in self._sb_in:
            if kind in ("tensor", "scalar"):
                args.append(flat[i])
                i += 1
            elif kind == "tree":
                n = extra.num_leaves
                args.append(pytree.tree_unflatten(list(flat[i:i + n]), extra))
                i += n
            else:
                args.append(extra)
        out = self._sb_fn(*args)
        res = []
        for name, kind, _ in self._sb_out:
            if kind == "tensor":
                res.append(out[name])
            else:
                res.extend(pytree.tree_leaves(out[name]))
        return tuple(res)


def flat_input_names(in_layout: list) -> list[str]:
    names = []
    for name, kind, extra in in_layout:
        if kind in ("tensor", "scalar"):
            names.append(name)
        elif kind == "tree":
            names += [f"{name}__{i}" for i in range(extra.num_leaves)]
    return names


def flat_output_names(out_layout: list) -> list[str]:
    names = []
    for name, kind, extra in out_layout:
        names += [name] if kind == "tensor" else [f"{name}__{i}" for i in range(extra.num_leaves)]
    return names


def region_module(root: nn.Module, region: RegionDef, fn) -> RegionModule:
    params = flat_input_names(region.in_layout)
    ident = [_ident(p) for p in params]
    joined = ", ".join(ident)
    src = (f"def forward(self{', ' if ident else ''}{joined}):\n"
           f"    return self._sb_run(({joined}{',' if len(ident) == 1 else ''}))\n")
    ns: dict[str, Any] = {}
    exec(src, ns)  # noqa: S102 - a generated signature
    cls = type(f"Region_{region.name}", (RegionModule,), {"forward": ns["forward"]})
    return cls(root, fn, region.in_layout, region.out_layout)


def _ident(name: str) -> str:
    return name if name.isidentifier() and not name.startswith("__") else "v_" + "".join(
        c if c.isalnum() else "_" for c in name)
