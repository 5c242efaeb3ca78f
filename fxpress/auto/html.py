"""The auto search's section of the HTML report: per-layer choice, Pareto table and plot."""
from __future__ import annotations

import base64
import html
import io

from fxpress.report import human_bytes

from .candidates import FP32
from .report import AutoReport


def pareto_png(report: AutoReport) -> bytes | None:
    """Metric vs size (and vs estimated latency when measured) of every evaluated configuration."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    front = {id(t) for t in report.front()}
    axes_spec = [("stored size (KiB)", lambda t: t.size_bytes / 1024)]
    if any(t.latency_s is not None for t in report.tried):
        axes_spec.append(("estimated latency (sum of layers, us)", lambda t: (t.latency_s or 0) * 1e6))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.5 * len(axes_spec), 3.6), squeeze=False)
    for ax, (label, x) in zip(axes[0], axes_spec):
        for t in report.tried:
            ax.scatter(x(t), t.metric, c="#f58518" if id(t) in front else "#9ecae9",
                       marker="o" if t.accepted else "x")
        ax.axhline(report.baseline - report.max_drop, color="gray", ls="--", lw=1, label="budget")
        ax.axhline(report.baseline, color="black", lw=1, label="baseline (fp32)")
        ax.set_xlabel(label)
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def auto_section_html(report: AutoReport) -> str:
    e = html.escape
    rows = []
    for L in report.layers:
        est = report.estimates.get(L.label, {})
        cells = "; ".join(f"{e(n)} {v['error']:.2g}" + (f" / {v['latency_s'] * 1e6:.0f}us" if v.get("latency_s") else "")
                          for n, v in est.items() if n != FP32.name)
        rows.append(f"<tr><td class=l>{e(L.describe())}</td><td class=l><b>{e(report.chosen.get(L.label, 'fp32'))}"
                    f"</b></td><td class=l>{cells}</td></tr>")
    front = []
    for t in report.front():
        lat = f"{t.latency_s * 1e6:.0f}" if t.latency_s is not None else "-"
        choice = " ".join(f"{L.label}={t.config[L.key].name}" for L in report.layers if t.config.get(L.key, FP32) != FP32)
        front.append(f"<tr><td>{t.metric:.4g}</td><td>{t.drop:+.4g}</td><td>{lat}</td>"
                     f"<td>{e(human_bytes(t.size_bytes))}</td><td class=l>{e(choice or 'all fp32')}</td></tr>")
    png = pareto_png(report)
    img = (f'<img class="plot" alt="Pareto front" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else "")
    notes = "".join(f"<li>{e(n)}</li>" for n in report.notes)
    return (f"<p>{e(report.summary())}</p>"
            "<table><tr><th>layer</th><th>chosen</th><th>candidates: est. squared rel. error / latency</th></tr>"
            + "".join(rows) + "</table><h3>Pareto front (evaluated configurations)</h3>"
            "<table><tr><th>metric</th><th>drop</th><th>est. latency us</th><th>size</th><th>configuration</th></tr>"
            + "".join(front) + f"</table>{img}<ul>{notes}</ul>")
