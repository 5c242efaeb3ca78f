"""The options of the ``split_branches`` front end: declared once here, checked once here.

``compile(passes=[..., "split_branches", ...], options={"split_branches": {...}})``. Every other module
of the front end reads a checked ``SplitOptions``, never the user's dict.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from fxpress.control import ON_EXCEED
from fxpress.errors import InputError, PassError
from fxpress.passes.base import Option

NAME = "split_branches"  # what users write in passes= and options=

OPTIONS: dict[str, Option] = {
    "per_sample": Option(types=(bool,), default=False,
                         doc="run the host program once per sample (regions compiled for batch 1)"),
    "max_loop_iters": Option(types=(int, type(None)), default=None, low=0,
                             doc="bound for every data-dependent loop that declares none (None: such a loop is an "
                                 "error that names its line)"),
    "on_exceed": Option(types=(str,), default="error", choices=ON_EXCEED,
                        doc="what a loop bounded by max_loop_iters does past it: raise, or stop"),
    "lowering": Option(types=(str,), default="split", choices=("split", "native"),
                       doc="'split': regions + host program; 'native': one graph with torch.cond "
                           "(relax.If / ONNX If; branches only, loops unrolled to their bound)"),
}


@dataclass(frozen=True)
class SplitOptions:
    """Checked options, every one set (defaults from ``OPTIONS``)."""

    per_sample: bool
    max_loop_iters: int | None
    on_exceed: str
    lowering: str


def split_options(given: SplitOptions | Mapping[str, Any] | None) -> SplitOptions:
    """``options["split_branches"]`` → SplitOptions (one already checked is returned as is). Unknown names
    (with the nearest known one), wrong types and values outside the choices or range are an InputError,
    like every other compile() argument."""
    if isinstance(given, SplitOptions):
        return given
    given = dict(given or {})
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), list(OPTIONS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise InputError(f"unknown {NAME} option(s) {unknown}.{hint} Known: {', '.join(OPTIONS)}")
    for key, value in given.items():
        try:
            OPTIONS[key].check(NAME, key, value)
        except PassError as e:  # Option.check words it for passes; this is an argument of compile()
            raise InputError(str(e).replace(f"pass {NAME!r}: ", f"{NAME}: ", 1)) from None
    return SplitOptions(**{key: given.get(key, spec.default) for key, spec in OPTIONS.items()})
