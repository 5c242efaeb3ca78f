"""The pass protocol: what every FX → FX rewrite takes, returns and promises.

A pass is a function of (GraphModule, PassContext) → (GraphModule, PassResult). The pass
manager hands each pass a private deep copy, so a pass may edit what it is given; it must
return the graph it wants kept. Passes register by name so users can write
``passes=["fuse", "low_rank"]``; options reach a pass through ``PassContext.options[name]``.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx

from fxpress import families
from fxpress.errors import PassError, UnknownPassError
from fxpress.families import CANONICAL_ORDER

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

    # Layer coverage: which Linear/Conv layers the pass looked at and how many it rewrote
    # (set by ``count_layers``; the manager shows ``headline()`` in the report's notes).
    coverage: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)

    def count_layers(self, found: int, rewritten: int, body: int | None = None, body_rewritten: int | None = None,
                     nothing: str | None = None, layer_nodes: Iterable[str] = ()) -> None:
        """Record "rewrote ``rewritten`` of the ``found`` Linear/Conv layers" (``body``: of those that are not
        the stem / head, see weight_ops.stems_and_heads); ``nothing`` says what the graph held when it had none."""
        self.coverage = {"layers_found": found, "layers_rewritten": rewritten}
        if body is not None:
            self.coverage.update(body_layers=body, body_rewritten=body_rewritten)
        if nothing:
            self.coverage["nothing_found"] = nothing
        self.coverage["layer_nodes"] = sorted(layer_nodes)

    def headline(self) -> str:
        """One line for the report: "applied 3/5 layers" / "unchanged: ..." with the per-layer reasons."""
        cov = self.coverage
        if not cov:
            return ""
        if cov.get("nothing_found"):
            return cov["nothing_found"]
        found, done = cov["layers_found"], cov["layers_rewritten"]
        text = f"{'applied' if self.changed else 'unchanged'}: {done}/{found} layers rewritten"
        layer_nodes = set(cov.get("layer_nodes", ()))
        # reasons for the layers left alone first, then the rest (embeddings, near misses)
        skips = sorted(self.skipped, key=lambda k: k.node not in layer_nodes)
        if skips and (done < found or not self.changed):
            reasons = "; ".join(str(k) for k in skips[:4])
            more = f" (+{len(skips) - 4} more, see details)" if len(skips) > 4 else ""
            text += f"; left alone: {reasons}{more}"
        elif skips:
            text += f"; {len(skips)} other op(s) left alone (embeddings, earlier rewrites ...: see details)"
        return text

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

    def calibration_batches(self, limit: int | None = None, gm: fx.GraphModule | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Calibration inputs if the user gave some, else the example inputs (one batch).

        With ``gm``: a graph captured by torch.export may have the example's batch size baked in
        (``view(x, [100, 3136])``). When a calibration batch of another size does not run through
        ``gm``, every batch is re-cut to the example's batch size (samples concatenated, the last
        chunk filled up with samples from the start), so calibration works with any batch size.
        """
        batches = list(self.calibration) if self.calibration else [self.example_inputs]
        if gm is not None and self.calibration:
            batches = rebatch_if_needed(gm, batches, self.example_inputs)
        return batches[:limit] if limit else batches


def _batch_size(batch: tuple) -> int | None:
    sizes = {t.shape[0] for t in batch if isinstance(t, torch.Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def rebatch(batches: list[tuple], size: int) -> list[tuple]:
    """The samples of ``batches`` re-cut into batches of ``size`` (the last one completed with samples from
    the start, so no batch is short)."""
    cols = list(zip(*batches))
    joined = [torch.cat(list(c)) if isinstance(c[0], torch.Tensor) and c[0].dim() > 0 else c[0] for c in cols]
    total = next(j.shape[0] for j in joined if isinstance(j, torch.Tensor))
    out = []
    for start in range(0, total, size):
        idx = torch.arange(start, start + size) % total
        out.append(tuple(j[idx] if isinstance(j, torch.Tensor) and j.dim() > 0 else j for j in joined))
    return out


def runs_with_batch_of_one(gm: fx.GraphModule, batch: tuple) -> bool:
    """Whether ``gm`` takes a one-sample slice of ``batch`` (a torch.export capture may fix the batch size)."""
    try:
        with torch.no_grad():
            gm(*(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in batch))
        return True
    except Exception:  # noqa: BLE001 - e.g. view(x, [100, 3136])
        return False


def rebatch_if_needed(gm: fx.GraphModule, batches: list[tuple], example: tuple) -> list[tuple]:
    want = _batch_size(example)
    odd = next((b for b in batches if _batch_size(b) != want), None)
    if want is None or odd is None or any(_batch_size(b) is None for b in batches):
        return batches
    try:
        with torch.no_grad():
            gm(*odd)
        return batches  # the graph takes other batch sizes
    except Exception:  # noqa: BLE001 - a baked-in batch size shows up as any shape error
        log.info("calibration batches re-cut to the example's batch size %d (the graph fixes it)", want)
        return rebatch(batches, want)


@dataclass(frozen=True)
class Option:
    """One option a pass declares: its type(s), allowed values or range, default and meaning.

    ``types`` may hold ``None`` (the option may be unset). ``low``/``high`` bound numbers (inclusive
    unless ``open_low``/``open_high``); ``choices`` lists the allowed values of a string option.
    """

    types: tuple = (object,)
    default: Any = None
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    doc: str = ""

    def check(self, pass_name: str, key: str, value: Any) -> None:
        if value is None and (type(None) in self.types or self.default is None):
            return
        types = tuple(t for t in self.types if t is not type(None))
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types and
                                               any(t in (int, float) for t in types))
        if not ok:
            names = " or ".join(getattr(t, "__name__", str(t)) for t in self.types)
            raise PassError(f"pass {pass_name!r}: option {key!r} must be {names}, got {type(value).__name__} {value!r}"
                            + (f" ({self.doc})" if self.doc else ""))
        if self.choices is not None and isinstance(value, str) and value not in self.choices:
            near = difflib.get_close_matches(value, [str(c) for c in self.choices], n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise PassError(f"pass {pass_name!r}: unknown {key} {value!r} (option {key!r}); choose one of "
                            f"{', '.join(map(repr, self.choices))}.{hint}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo_bad = self.low is not None and (value <= self.low if self.open_low else value < self.low)
            hi_bad = self.high is not None and (value >= self.high if self.open_high else value > self.high)
            if lo_bad or hi_bad:
                lo = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
                hi = "" if self.high is None else f"{'<' if self.open_high else '<='} {self.high:g}"
                raise PassError(f"pass {pass_name!r}: option {key}={value!r} is out of range: it must be "
                                f"{' and '.join(x for x in (lo, hi) if x)}" + (f" ({self.doc})" if self.doc else ""))


# Sections of ``compile(options=...)`` that are not passes: tuning, the lowering (dynamic_batch), the
# passes="auto" search, the split_branches front end (fxpress.frontends; it checks its own section).
NON_PASS_SECTIONS = {"tune", "lower", "auto", "split_branches"}


def check_option_sections(options: dict[str, Any]) -> None:
    """Every key of ``compile(options=...)`` must name a pass (or a known non-pass section)."""
    known = set(available_passes()) | NON_PASS_SECTIONS
    for key, value in options.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise PassError(f"options: {key!r} names no pass.{hint} Known: {', '.join(sorted(known))}")
        if not isinstance(value, dict):
            raise PassError(f"options[{key!r}] must be a dict of that pass's options, got {type(value).__name__}")


class Pass:
    """Base class for passes. Subclasses set ``name`` and implement ``run``.

    The base class wraps every subclass's ``run`` (``__init_subclass__``) so each pass, however it is
    called, gets the same contract: its declared ``OPTIONS`` are checked (unknown names get the nearest
    known one as a suggestion; types and ranges are checked), functional / ATen layers are lifted to
    modules when ``lift_layers`` (weight_ops_lift.lift_to_modules: every pass sees one layer form), and the
    returned graph is finalized with the in-place-aware dead-code elimination (graph.finalize).

    ``lossy`` passes change the function (low rank, shift/add, quantize). The manager checks a pass
    that is not lossy against the graph before it and rolls it back if the outputs drift.
    """

    name: str = ""
    lossy: bool = False
    # name -> Option. ``None``: the pass checks its own options.
    OPTIONS: dict[str, Option] | None = None
    # Lift functional / ATen Linear, Conv and BatchNorm ops into modules before ``run``.
    lift_layers: bool = True

    def __init__(self, **options: Any):
        self.options = options

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__ and not getattr(cls.__dict__["run"], "_fxpress_wrapped", False):
            cls.run = _contract(cls.__dict__["run"])

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        return self.run(gm, ctx)

    def check_options(self, ctx: PassContext) -> None:
        """Unknown names (with a suggestion), wrong types and out-of-range values are errors."""
        if ctx is None:  # a pass called by hand without a context checks only its constructor options
            ctx = PassContext(example_inputs=())
        if ctx.options:
            check_option_sections(ctx.options)
        if self.OPTIONS is None:
            return
        given = {**ctx.options_for(self.name), **self.options}
        for key, value in given.items():
            spec = self.OPTIONS.get(key)
            if spec is None:
                near = difflib.get_close_matches(str(key), list(self.OPTIONS), n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise PassError(f"pass {self.name!r}: unknown option {key!r}.{hint} Known: {', '.join(self.OPTIONS)}")
            spec.check(self.name, key, value)

    def option(self, ctx: PassContext, key: str, default: Any = None) -> Any:
        """Option lookup: explicit constructor options win over ``compile(options=...)``; then the declared default."""
        if key in self.options:
            return self.options[key]
        opts = ctx.options_for(self.name)
        if key in opts:
            return opts[key]
        if default is None and self.OPTIONS is not None and key in self.OPTIONS:
            return self.OPTIONS[key].default
        return default

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def _contract(run):
    """requires → run → ensures, for every pass (see ``Pass``)."""

    @functools.wraps(run)
    def checked(self: Pass, gm: fx.GraphModule, ctx: PassContext):
        from .graph import finalize
        from .weight_ops_lift import lift_to_modules

        self.check_options(ctx)
        if self.lift_layers and lift_to_modules(gm):
            finalize(gm)  # drop the replaced weights now, so the pass's own "before" counts each weight once
        new, result = run(self, gm, ctx)
        if isinstance(new, fx.GraphModule):
            finalize(new)
        return new, result

    checked._fxpress_wrapped = True
    return checked


class FunctionPass(Pass):
    """Wraps a plain function ``f(gm, ctx) -> (gm, PassResult)`` as a pass."""

    def __init__(self, name: str, fn: Callable, lossy: bool = False, **options: Any):
        super().__init__(**options)
        self.name, self._fn, self.lossy = name, fn, lossy

    def run(self, gm, ctx):
        return self._fn(gm, ctx)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Pass]] = {}
# Passes that `passes="default"` runs, in canonical order. Lossy passes join only when they
# stay within their own default error budget (each pass documents it).
_DEFAULT: list[str] = []

# The built-in passes' modules (fxpress/families.py) are imported on first lookup, so that importing
# fxpress.passes stays cheap.
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
    families.import_modules("passes")


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

