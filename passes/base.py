"""The pass protocol: what every FX → FX rewrite takes, returns and promises.

A pass is a function of (GraphModule, PassContext) → (GraphModule, PassResult). The pass
manager hands each pass a private deep copy, so a pass may edit what it is given; it must
return the graph it wants kept. Passes register by name so users can write
``passes=["fuse", "low_rank"]``; options reach a pass through ``PassContext.options[name]``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx

from fxpress.errors import UnknownPassError

log = logging.getLogger("fxpress.passes")


@dataclass
class Rewrite:
    """One change a pass made: which nodes it consumed and which it produced."""

    kind: str
    consumed: list[str]
    produced: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.detail.items())
        text = f"{self.kind}: {', '.join(self.consumed)} -> {', '.join(self.produced) or '(removed)'}"
        return f"{text} [{extra}]" if extra else text


@dataclass
class Skip:
    """A place where a pass chose not to rewrite, and why (users ask 'why not this layer?')."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


@dataclass
class PassResult:
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Pass-specific per-layer rows for the report (rank chosen, bits, error ...).
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)

    def rewrite(self, kind: str, consumed: Iterable, produced: Iterable = (), **detail) -> Rewrite:
        r = Rewrite(kind, [_name(n) for n in consumed], [_name(n) for n in produced], detail)
        self.rewrites.append(r)
        return r

    def skip(self, node, reason: str) -> None:
        self.skipped.append(Skip(_name(node), reason))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _name(n) -> str:
    return n.name if isinstance(n, fx.Node) else str(n)


@dataclass
class PassContext:
    """What a pass may read besides the graph. Never holds the original model's graph."""

    example_inputs: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: str = "llvm"
    tolerance: float | None = None
    # Original model outputs on example_inputs (flattened), for passes that search under a budget.
    reference_outputs: list[torch.Tensor] | None = None

    def options_for(self, pass_name: str) -> dict[str, Any]:
        return dict(self.options.get(pass_name, {}))

    def calibration_batches(self, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Calibration inputs if the user gave some, else the example inputs (one batch)."""
        batches = list(self.calibration) if self.calibration else [self.example_inputs]
        return batches[:limit] if limit else batches


class Pass:
    """Base class for passes. Subclasses set ``name`` and implement ``run``.

    ``lossy`` passes change the function (low rank, shift/add, quantize): the manager reports
    their error and the tolerance guard may roll them back. Lossless passes are still checked.
    """

    name: str = ""
    lossy: bool = False
    # Whether the pass needs calibration data to do its best (it still runs without).
    wants_calibration: bool = False

    def __init__(self, **options: Any):
        self.options = options

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        return self.run(gm, ctx)

    def option(self, ctx: PassContext, key: str, default: Any = None) -> Any:
        """Option lookup: explicit constructor options win over ``compile(options=...)``."""
        if key in self.options:
            return self.options[key]
        return ctx.options_for(self.name).get(key, default)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


class FunctionPass(Pass):
    """Wraps a plain function ``f(gm, ctx) -> (gm, PassResult)`` as a pass."""

    def __init__(self, name: str, fn: Callable, lossy: bool = False, **options: Any):
        super().__init__(**options)
        self.name, self._fn, self.lossy = name, fn, lossy

    def run(self, gm, ctx):
        return self._fn(gm, ctx)


# ----------------------------------------------------------------------------- registry

# Canonical order when several passes are asked for by name: control flow is split first
# (so the rest see branch-free graphs), fusion before factorisation, quantization last.
CANONICAL_ORDER = ["split_branches", "fuse", "low_rank", "shift_add", "quantize"]

_REGISTRY: dict[str, type[Pass]] = {}
# Passes that `passes="default"` runs, in canonical order. Lossy passes join only when they
# stay within their own default error budget (each pass documents it).
_DEFAULT: list[str] = []

# Modules that define the built-in passes; imported on first lookup so that importing
# fxpress.passes stays cheap and a broken optional pass cannot break the others.
_BUILTIN_MODULES = ["fusion", "low_rank", "shift_add", "split_branches", "quantize"]
_builtins_loaded = False


def register_pass(name: str, *, default: bool = False):
    """Class decorator: make a Pass subclass available by ``name``."""

    def deco(cls: type[Pass]) -> type[Pass]:
        cls.name = name
        _REGISTRY[name] = cls
        if default and name not in _DEFAULT:
            _DEFAULT.append(name)
        return cls

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import importlib

    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            # A family not written yet is simply absent; anything else is a real bug.
            if e.name != f"{__package__}.{mod}":
                raise


def available_passes() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY, key=lambda n: (CANONICAL_ORDER.index(n) if n in CANONICAL_ORDER else 99, n))


def default_pipeline() -> list[str]:
    _load_builtins()
    return sorted(_DEFAULT, key=lambda n: CANONICAL_ORDER.index(n) if n in CANONICAL_ORDER else 99)


def get_pass(name: str, **options: Any) -> Pass:
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(available_passes()) or "(none)"
        raise UnknownPassError(
            f"unknown pass {name!r}. Known passes: {known}. "
            "Pass a name from that list or a fxpress.passes.Pass instance."
        )
    return _REGISTRY[name](**options)


def resolve_passes(spec: str | Sequence[str | Pass] | None) -> list[Pass]:
    """Turn the ``passes=`` argument of compile() into Pass objects, in the order given."""
    if spec is None or spec == "none":
        return []
    if spec == "default":
        return [get_pass(n) for n in default_pipeline()]
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[Pass] = []
    for item in spec:
        if isinstance(item, Pass):
            out.append(item)
        elif isinstance(item, str):
            out.append(get_pass(item))
        else:
            raise UnknownPassError(
                f"passes entries must be pass names or fxpress.passes.Pass objects, got {type(item).__name__}: {item!r}"
            )
    names = [p.name for p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UnknownPassError(f"pass(es) {sorted(dup)} listed more than once; each pass runs once per pipeline")
    return out

