"""What passes="auto" chose and why: the per-layer choice, the configurations evaluated, the Pareto front."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fxpress.report import human_bytes

from .candidates import FP32, Layer
from .search import Tried, pareto_front


@dataclass
class AutoReport:
    objective: str
    max_drop: float
    baseline: float                          # evaluate(eager model)
    chosen: dict[str, str]                   # layer label -> candidate name
    search_metric: float                     # evaluate() of the chosen configuration during the search (target torch)
    final_metric: float                      # evaluate() of the returned CompiledModel (its target)
    evaluate_calls: int
    tried: list[Tried]
    layers: list[Layer]
    estimates: dict[str, dict[str, dict[str, Any]]]  # label -> candidate -> {error, size_bytes, latency_s}
    seconds: dict[str, float]                # phase -> seconds
    notes: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float:
        return self.baseline - self.final_metric

    def front(self) -> list[Tried]:
        return pareto_front(self.tried)

    def _label(self, config) -> str:
        parts = [f"{L.label}={config[L.key].name}" for L in self.layers if config.get(L.key, FP32) != FP32]
        return " ".join(parts) or "all fp32"

    def to_dict(self) -> dict[str, Any]:
        def row(t: Tried) -> dict[str, Any]:
            return {"config": {L.label: t.config.get(L.key, FP32).name for L in self.layers}, "metric": t.metric,
                    "drop": t.drop, "accepted": t.accepted, "est_error": t.est_error, "size_bytes": t.size_bytes,
                    "est_latency_s": t.latency_s, "phase": t.phase}
        return {"objective": self.objective, "max_drop": self.max_drop, "baseline": self.baseline,
                "chosen": self.chosen, "search_metric": self.search_metric, "final_metric": self.final_metric,
                "drop": self.drop, "evaluate_calls": self.evaluate_calls, "tried": [row(t) for t in self.tried],
                "pareto_front": [row(t) for t in self.front()], "estimates": self.estimates,
                "seconds": self.seconds, "notes": self.notes}

    def summary(self) -> str:
        choice = " ".join(f"{k}={v}" for k, v in self.chosen.items() if v != FP32.name) or "all fp32"
        return (f"auto ({self.objective}, max_drop {self.max_drop:g}): {choice}; metric {self.baseline:.4g} -> "
                f"{self.final_metric:.4g} (drop {self.drop:.4g}); {self.evaluate_calls} evaluate calls")

    def __str__(self) -> str:
        lines = [self.summary(), "", "per layer (estimated squared relative output error / size / latency):"]
        for L in self.layers:
            est = self.estimates.get(L.label, {})
            cells = []
            for name, e in est.items():
                lat = f" {e['latency_s'] * 1e6:.0f}us" if e.get("latency_s") is not None else ""
                cells.append(f"{name}: {e['error']:.2g} {human_bytes(e['size_bytes'])}{lat}")
            lines.append(f"  {L.describe():40s} -> {self.chosen.get(L.label, 'fp32'):6s} | " + "; ".join(cells))
        lines += ["", "Pareto front of the evaluated configurations (metric / est. latency / size):"]
        for t in self.front():
            lat = f"{t.latency_s * 1e6:.0f}us" if t.latency_s is not None else "-"
            lines.append(f"  {t.metric:.4g}  {lat:>8s}  {human_bytes(t.size_bytes):>9s}  {self._label(t.config)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
