"""The per-stage report: one StageRecord per stage, printable as a table, serialisable as JSON."""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from fxpress.passes.record import StageRecord


def human(n: float, unit: str = "") -> str:
    """1234567 → '1.23M' (keeps tables narrow)."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.4g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def human_bytes(n: int) -> str:
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{n} B"


class Report:
    """Ordered stage records. ``report["fuse"]`` is the record of the stage named 'fuse'."""

    COLUMNS = ("stage", "status", "params", "size", "MACs", "mults", "nodes", "max rel err", "seconds")

    def __init__(self, records: Iterable[StageRecord]):
        self.records: list[StageRecord] = list(records)
        for i, r in enumerate(self.records):
            if not isinstance(r, StageRecord):
                raise TypeError(f"Report takes StageRecords; entry {i} is a {type(r).__name__}")

    def __iter__(self) -> Iterator[StageRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | slice | str):
        if isinstance(key, (int, slice)):
            return self.records[key]
        for r in self.records:
            if r.name == key:
                return r
        raise KeyError(f"no stage named {key!r}; stages: {self.names()}")

    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def rows(self) -> list[list[str]]:
        rows = []
        for r in self.records:
            err = "-" if r.max_rel_error is None else f"{r.max_rel_error:.2e}"
            rows.append([r.name, r.status, human(r.params), human_bytes(r.param_bytes), human(r.macs),
                         human(r.multiplies), str(r.nodes), err, f"{r.seconds:.2f}"])
        return rows

    def table(self) -> str:
        rows = [list(self.COLUMNS)] + self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.COLUMNS))]
        lines = []
        for j, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        notes = [f"  {r.name}: {r.note}" for r in self.records if r.note]
        if notes:
            lines += ["", "notes:"] + notes
        return "\n".join(lines)

    def details(self, name: str) -> str:
        """What a pass did: its rewrites, skips and per-layer rows."""
        r = self[name]
        out = [f"stage {r.name} ({r.kind}, {r.status})"]
        res = r.result
        if res is not None:
            out += [f"  rewrite {w}" for w in res.rewrites]
            out += [f"  skipped {s}" for s in res.skipped]
            out += [f"  {k} = {v}" for k, v in res.metrics.items()]
            out += [f"  note: {n}" for n in res.notes]
            for row in res.layers:
                out.append("  layer " + ", ".join(f"{k}={v}" for k, v in row.items()))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    __repr__ = __str__

    def to_list(self, full: bool = False) -> list[dict[str, Any]]:
        return [r.to_dict() if full else r.summary() for r in self.records]

    def to_json(self, full: bool = False) -> str:
        return json.dumps(self.to_list(full), indent=2, default=str)
