"""Run the host program of a split dynamic model (``split_branches``). Imports no torch.

The host program (JSON; format in ``fxpress/frontends/split_branches/ir.py``) evaluates conditions on the
outputs of branch-free regions and calls the regions, each an executor with ``run(list of arrays) ->
list of arrays`` (TVM VM or ONNX Runtime, see ``backends.py``).

Batches. ``"batch": "uniform"``: the program runs once on the whole batch and every condition must
hold a single value (as eager PyTorch requires of a Python ``if`` on a tensor). ``"per_sample"``: the
regions were compiled for batch 1; the program runs once per sample, on ``x[i:i+1]`` of every input,
and the outputs are concatenated on axis 0, so samples of one batch may take different paths.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fxpress.errors import ArtifactError, FxpressError, InputError

HOST_FORMAT = "fxpress-host-program"
HOST_VERSION = 1
HOST_FILE = "host_program.json"


class HostProgramError(FxpressError, RuntimeError):
    """The host program cannot go on: a loop passed its declared bound, a condition is not one value."""


@dataclass
class Trace:
    """What one run decided: ``markers`` ("file:line" of every branch body entered, loop iteration
    started and return taken, in order) and ``path`` ((kind, node id, value) per decision)."""

    markers: list[str] = field(default_factory=list)
    path: list[tuple] = field(default_factory=list)

    def key(self) -> str:
        """A short name of the path taken, e.g. 'if1=T if3=F loop5=3 ret'."""
        parts = []
        for kind, nid, value in self.path:
            if kind == "if":
                parts.append(f"if{nid}={'T' if value else 'F'}")
            elif kind == "loop":
                parts.append(f"loop{nid}={value}")
            elif kind == "return":
                parts.append(f"ret@{os.path.basename(str(nid))}")
        return " ".join(parts)


class _Signal:
    BREAK = "break"
    CONTINUE = "continue"


class _Return(Exception):
    def __init__(self, values):
        self.values = values


def combine_samples(values: list) -> np.ndarray:
    """Per-sample outputs → one batch: concatenated on axis 0; scalars (0-d, e.g. a step count) stacked."""
    arrays = [np.asarray(v) for v in values]
    return np.stack(arrays) if arrays[0].ndim == 0 else np.concatenate(arrays, axis=0)


def check_program(program: dict[str, Any]) -> None:
    if program.get("format") != HOST_FORMAT:
        raise ArtifactError(f"not an fxpress host program (format={program.get('format')!r})")
    version = program.get("version")
    if not isinstance(version, int) or version > HOST_VERSION:
        raise ArtifactError(f"host program version {version!r} is newer than this runtime understands "
                            f"({HOST_VERSION}); upgrade fxpress here or export with the installed version")
    if program.get("batch", "uniform") not in ("uniform", "per_sample"):
        raise ArtifactError(f"unknown host program batch mode {program.get('batch')!r}")
    known = {"call", "set", "if", "while", "for", "unrolled", "break", "continue", "return"}

    def visit(body):
        for n in body:
            op = n.get("op")
            if op not in known:
                raise ArtifactError(f"unknown host program node {op!r}; re-export with this fxpress version")
            if op == "call" and n["region"] not in program["regions"]:
                raise ArtifactError(f"host program calls unknown region {n['region']!r}")
            for key in ("then", "else", "body", "cond_body"):
                if key in n:
                    visit(n[key])
            for it in n.get("iterations", []):
                visit(it)

    visit(program["body"])


def truth(value, loc: str) -> bool:
    if isinstance(value, np.ndarray) or hasattr(value, "shape"):
        arr = np.asarray(value)
        if arr.size != 1:
            raise HostProgramError(
                f"the condition at {loc} has {arr.size} values (shape {arr.shape}); a branch needs one. With "
                "batch > 1 compile with options={'split_branches': {'per_sample': True}} or reduce the condition "
                "over the batch (.all()/.any()).")
        return bool(arr.reshape(-1)[0])
    return bool(value)


class HostInterpreter:
    """Executes a host program dict with one executor per region."""

    def __init__(self, program: dict[str, Any], executors: dict[str, Any]):
        check_program(program)
        missing = set(program["regions"]) - set(executors)
        if missing:
            raise ArtifactError(f"no executor for region(s) {sorted(missing)}")
        self.program = program
        self.executors = executors
        self.regions = program["regions"]
        # (input names, numpy dtypes, output names) per region, resolved once
        self._sigs = {name: (r["inputs"], [np.dtype(d) for d in r["input_dtypes"]], r["outputs"])
                      for name, r in self.regions.items()}
        self.inputs = program["inputs"]
        self.batch = program.get("batch", "uniform")

    # ------------------------------------------------------------------ public
    def run(self, inputs: Sequence[np.ndarray], trace: Trace | None = None) -> list[np.ndarray]:
        if self.batch == "per_sample":
            n = int(np.asarray(inputs[0]).shape[0]) if inputs else 1
            outs = [self._run_once([np.asarray(x)[i:i + 1] for x in inputs], trace) for i in range(n)]
            return [combine_samples([o[k] for o in outs]) for k in range(len(outs[0]))]
        return self._run_once(inputs, trace)

    def _run_once(self, inputs: Sequence[np.ndarray], trace: Trace | None) -> list[np.ndarray]:
        env: dict[str, Any] = dict(zip(self.inputs, inputs))
        try:
            self._block(self.program["body"], env, trace)
        except _Return as r:
            return r.values
        raise HostProgramError("the host program ended without a return")

    # ------------------------------------------------------------------ nodes
    def _block(self, body, env, trace):
        for n in body:
            op = n["op"]
            if op == "call":
                self._call(n, env)
            elif op == "set":
                env.update(n["values"])
            elif op == "if":
                taken = truth(self._get(env, n["cond"], n), n.get("loc", "?"))
                if trace is not None:
                    trace.path.append(("if", n["id"], taken))
                    line = n.get("then_line") if taken else n.get("else_line")
                    if line:
                        trace.markers.append(line)
                signal = self._block(n["then"] if taken else n["else"], env, trace)
                if signal:
                    return signal
            elif op in ("while", "for", "unrolled"):
                self._loop(n, env, trace)
            elif op == "break":
                return _Signal.BREAK
            elif op == "continue":
                return _Signal.CONTINUE
            elif op == "return":
                if trace is not None:
                    trace.path.append(("return", n.get("id", n.get("loc")), None))
                    if n.get("line"):
                        trace.markers.append(n["line"])
                raise _Return([np.asarray(self._get(env, v, n)) for v in n["values"]])
        return None

    def _loop(self, n, env, trace):
        op = n["op"]
        count = 0
        try:
            if op == "unrolled":
                for body in n["iterations"]:
                    if trace is not None and n.get("body_line"):
                        trace.markers.append(n["body_line"])
                    count += 1
                    if self._block(body, env, trace) == _Signal.BREAK:
                        break
                return
            if op == "for":
                total = n["count"] if isinstance(n["count"], int) else self._get(env, n["count"], n)
                total = int(np.asarray(total).reshape(-1)[0]) if not isinstance(total, int) else total
                limit = n["max_iter"]
                if total > limit:
                    if n.get("on_exceed", "error") == "error":
                        raise HostProgramError(f"the loop at {n.get('loc')} wants {total} iterations, more than its "
                                               f"declared bound {limit}; raise max_iter in fxpress.bound(...)")
                    total = limit
                for k in range(max(total, 0)):
                    if n.get("index"):
                        env[n["index"]] = np.asarray(k, dtype=n.get("index_dtype", "int64"))
                    if trace is not None and n.get("body_line"):
                        trace.markers.append(n["body_line"])
                    count += 1
                    if self._block(n["body"], env, trace) == _Signal.BREAK:
                        break
                return
            # while
            while True:
                self._block(n["cond_body"], env, trace)
                if not truth(self._get(env, n["cond"], n), n.get("loc", "?")):
                    break
                if count >= n["max_iter"]:
                    if n.get("on_exceed", "error") == "stop":
                        break
                    raise HostProgramError(
                        f"the loop at {n.get('loc')} wants more than its declared bound of {n['max_iter']} "
                        "iterations; raise max_iter in fxpress.bound(...) (or on_exceed='stop' to cut it there)")
                if trace is not None and n.get("body_line"):
                    trace.markers.append(n["body_line"])
                count += 1
                if self._block(n["body"], env, trace) == _Signal.BREAK:
                    break
        finally:
            if trace is not None:
                trace.path.append(("loop", n["id"], count))

    def _call(self, n, env):
        in_names, dtypes, out_names = self._sigs[n["region"]]
        args = []
        for name, dtype in zip(in_names, dtypes):
            value = self._get(env, name, n)
            if not isinstance(value, np.ndarray) or value.dtype != dtype:
                value = np.asarray(value, dtype=dtype)
            args.append(value)
        outs = self.executors[n["region"]].run(args)
        if len(outs) != len(out_names):
            raise HostProgramError(f"region {n['region']} returned {len(outs)} values, its signature says "
                                   f"{len(out_names)}")
        for name, value in zip(out_names, outs):
            env[name] = value if isinstance(value, np.ndarray) else np.asarray(value)
        if n.get("consts"):
            env.update(n["consts"])

    @staticmethod
    def _get(env, name, node):
        try:
            return env[name]
        except KeyError:
            raise HostProgramError(f"host program: `{name}` is not defined when {node.get('op')} at "
                                   f"{node.get('loc') or node.get('region')} needs it") from None


# ----------------------------------------------------------------------------- artifacts

class HostProgramRuntime:
    """A loaded dynamic artifact: ``rt(x, ...)`` like ``fxpress.runtime.Runtime``; ``rt.run(inputs, trace)``
    also fills a Trace with the decisions taken."""

    def __init__(self, root: str, manifest: dict[str, Any], backend: str, program: dict[str, Any],
                 executors: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.program = program
        self.interpreter = HostInterpreter(program, executors)
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]
        self.last_trace: Trace | None = None

    def check(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        from .executors import check_inputs

        if self.interpreter.batch != "per_sample":
            return check_inputs(inputs, self.inputs)
        if len(inputs) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} input(s), got {len(inputs)}")
        out = []
        batch = None
        for i, (x, spec) in enumerate(zip(inputs, self.inputs)):
            x = np.asarray(x)
            if list(x.shape[1:]) != list(spec["shape"][1:]) or str(x.dtype) != spec["dtype"] or x.ndim < 1:
                raise InputError(f"input {i} ('{spec['name']}'): expected shape (N, "
                                 f"{', '.join(map(str, spec['shape'][1:]))}) dtype {spec['dtype']} (any batch N, "
                                 f"the program runs per sample), got shape {tuple(x.shape)} dtype {x.dtype}")
            if batch is not None and x.shape[0] != batch:
                raise InputError(f"input {i} has batch {x.shape[0]}, input 0 has {batch}; per-sample models need "
                                 "the same batch on every input")
            batch = x.shape[0]
            out.append(x)
        return out

    def run(self, inputs: Sequence[np.ndarray], trace: Trace | None = None) -> list[np.ndarray]:
        return self.interpreter.run(self.check(inputs), trace)

    def __call__(self, *inputs):
        trace = Trace()
        outs = self.run(inputs, trace)
        self.last_trace = trace
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return (f"HostProgramRuntime({self.root!r}, backend={self.backend!r}, "
                f"regions={len(self.program['regions'])}, batch={self.interpreter.batch!r})")


def load_host_program(root: str, manifest: dict[str, Any], backend: str = "auto",
                      device: str | None = None) -> HostProgramRuntime:
    """Build the runtime of an artifact whose manifest has a ``host_program`` entry (hashes already
    verified by ``read_manifest``)."""
    from .executors import _pick_backend, make_executor
    from .manifest import artifact_file

    entry = manifest["host_program"]
    chosen = _pick_backend(manifest, backend)
    path = artifact_file(root, manifest, entry.get("file"))
    try:
        with open(path) as f:
            program = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is missing or not valid JSON ({e}); re-export the artifact") from e
    check_program(program)
    executors = {}
    for name, info in entry["regions"].items():
        if chosen not in info["backends"]:
            raise ArtifactError(f"region {name} has no {chosen!r} files in this artifact; re-export with that backend")
        # Region file paths are relative to the artifact root and listed (hashed) in its manifest.
        executors[name] = make_executor(root, {"backends": info["backends"], "files": manifest.get("files")},
                                        chosen, device)
    return HostProgramRuntime(root, manifest, chosen, program, executors)
