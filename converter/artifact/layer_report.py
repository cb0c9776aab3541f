"""Per-layer quantization report: a table (Markdown and HTML) and PNG plots in every artifact.

The table rows are built once (`layer_rows`), written into the manifest, and rendered from there, so
the report and the manifest cannot disagree.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from converter.models.text import Windows
from converter.quant.calibrate import ActStats, run_hooked
from converter.quant.quantize import QuantPlan, fake_quantize_input

REPORT_DIR = "report"
COLUMNS = (
    ("linear", "linear", "{}"),
    ("act_absmax_before", "act abs-max before smoothing", "{:.4g}"),
    ("act_absmax_after", "act abs-max after smoothing", "{:.4g}"),
    ("alpha", "alpha", "{}"),
    ("weight_error", "weight quant error (rel. sq.)", "{:.3e}"),
    ("act_error", "activation quant error (rel. sq.)", "{:.3e}"),
    ("sensitivity", "sensitivity (KL drop)", "{:.3e}"),
    ("float", "kept float", "{}"),
)


@torch.no_grad()
def activation_errors(model, plan: QuantPlan, windows: Windows, samples: int, batch_size: int) -> dict[str, float]:
    """Relative squared error ||x - QDQ(x)||^2 / ||x||^2 of each planned linear's input, as exported."""
    sums = {n: [0.0, 0.0] for n in plan.linears}

    def record(name, x):
        quant = plan.linears[name]
        err = fake_quantize_input(x, quant.act_mode, quant.act_scale) - x
        sums[name][0] += float(err.pow(2).sum())
        sums[name][1] += float(x.pow(2).sum())

    sample = Windows(windows.input_ids[:samples], windows.sha256, windows.total_windows)
    run_hooked(model, list(plan.linears), sample, batch_size, "activation error", record)
    return {n: e / max(t, 1e-30) for n, (e, t) in sums.items()}


def layer_rows(linears, before: ActStats, after: ActStats, plan: QuantPlan, full_plan: QuantPlan,
               smoothing: dict, act_errors: dict[str, float], fallback: dict | None) -> list[dict]:
    """One row per quantizable linear that was calibrated (quantized or sent back to float)."""
    alpha = {lin: g["alpha"] for g in smoothing["groups"] for lin in g["linears"]}
    sensitivity = (fallback or {}).get("sensitivity", {})
    rows = []
    for name in linears:
        if name not in full_plan.linears:
            continue
        rows.append({
            "linear": name,
            "act_absmax_before": before.per_tensor(name),
            "act_absmax_after": after.per_tensor(name),
            "alpha": alpha.get(name),
            "weight_error": full_plan.linears[name].weight_rel_error ** 2,
            "act_error": act_errors.get(name),
            "sensitivity": sensitivity.get(name),
            "float": name not in plan.linears,
        })
    return rows


def _cell(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(fmt, row[key]) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def _plot_channels(path: Path, layer: str, before: torch.Tensor, after: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    for ax, values, title in ((axes[0], before, "before smoothing"), (axes[1], after, "after smoothing")):
        ax.bar(range(len(values)), values.numpy(), width=1.0, color="#c0392b" if ax is axes[0] else "#2471a3")
        ax.set_title(f"{title}: max/median {float(values.max() / values.median().clamp(min=1e-12)):.1f}")
        ax.set_xlabel("input channel")
    axes[0].set_ylabel("|activation| max")
    fig.suptitle(f"{layer}: per-channel activation maxima")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def _plot_errors(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.06), 3.6))
    x = torch.arange(len(rows)).numpy()
    ax.bar(x - 0.2, [r["act_error"] or 0 for r in rows], width=0.4, label="activation", color="#2471a3")
    ax.bar(x + 0.2, [r["weight_error"] for r in rows], width=0.4, label="weight", color="#e67e22")
    for i, r in enumerate(rows):
        if r["float"]:
            ax.axvspan(i - 0.5, i + 0.5, color="#27ae60", alpha=0.25)
    ax.set_yscale("log")
    ax.set_xlabel("quantizable linear (model order); green: kept float")
    ax.set_ylabel("relative squared error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def write_report(folder: Path, title: str, rows: list[dict], channels: dict | None) -> list[str]:
    """Write report/quantization_report.{md,html} and its PNGs; returns the files written.

    Args:
        rows: `layer_rows` (as stored in the manifest).
        channels: {"layer", "before", "after"} per-channel activation maxima to plot, or None.
    """
    out = folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    files = ["quantization_report.md", "quantization_report.html", "quantization_errors.png"]
    _plot_errors(out / "quantization_errors.png", rows)
    pictures = ["quantization_errors.png"]
    if channels is not None:
        _plot_channels(out / "activation_channels.png", channels["layer"],
                       torch.tensor(channels["before"]), torch.tensor(channels["after"]))
        pictures.insert(0, "activation_channels.png")
        files.append("activation_channels.png")
    md = [f"# Quantization report: {title}", ""] + [f"![{p}]({p})" for p in pictures] + ["", markdown_table(rows), ""]
    (out / "quantization_report.md").write_text("\n".join(md))
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(f, r[k]))}</td>" for k, _, f in COLUMNS) + "</tr>"
                   for r in rows)
    imgs = "".join(f'<p><img src="{p}" alt="{p}"></p>' for p in pictures)
    (out / "quantization_report.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<h1>Quantization report: {html.escape(title)}</h1>{imgs}<table border=1 cellpadding=3>"
        f"<tr>{head}</tr>{body}</table>\n")
    return [f"{REPORT_DIR}/{f}" for f in files]


def channel_plot_data(rows: list[dict], before: ActStats, after: ActStats) -> dict | None:
    """Per-channel maxima, before and after smoothing, of the most outlier-heavy smoothed linear."""
    layer = outlier_layer(rows, before)
    if layer is None:
        return None
    return {"layer": layer, "before": before.amax[layer].tolist(), "after": after.amax[layer].tolist()}


def outlier_layer(rows: list[dict], before: ActStats) -> str | None:
    """The smoothed linear whose input had the largest max/median channel ratio before smoothing."""
    smoothed = [r["linear"] for r in rows if r["alpha"] is not None]
    ratio = lambda n: float(before.amax[n].max() / before.amax[n].median().clamp(min=1e-12))
    return max(smoothed, key=ratio) if smoothed else None
