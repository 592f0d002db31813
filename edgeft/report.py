"""The run report: loss and metric curves as PNG, and a Markdown page around them.

Torch-free, so the device can draw its own generations' curves too.
"""

from __future__ import annotations

from pathlib import Path


def plot_curves(rows: list[dict], path: Path, keys: list[str], title: str) -> bool:
    """One line per key that appears in `rows` (x = step). False when there is nothing to draw."""
    series = {k: [(r["step"], r[k]) for r in rows if k in r and r[k] is not None] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(out: Path, rows: list[dict], summary: dict) -> Path:
    from .fsutil import atomic_write_text

    out = Path(out)
    lines = [f"# edgeft run: {out.name}", "", f"- task: `{summary['task']}`", f"- model: `{summary['model']}`",
             f"- target: `{summary.get('target') or '(none)'}`, base quantization: `{summary['scheme']}`",
             f"- steps: {summary['steps']} / {summary['total_steps']}" + (" (stopped early)" if summary.get("stopped_early") else ""),
             f"- trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,}",
             f"- best {summary['metric']}: {summary['best']} at step {summary['best_step']}", ""]
    if plot_curves(rows, out / "loss.png", ["train_loss", "eval_loss"], "loss"):
        lines += ["![loss](loss.png)", ""]
    if plot_curves(rows, out / "metrics.png", ["accuracy", "macro_f1", "perplexity"], "validation metrics"):
        lines += ["![metrics](metrics.png)", ""]
    before, after = summary.get("before") or {}, summary.get("after") or {}
    if after:
        lines += ["| metric | before training | after training |", "|---|---|---|"]
        lines += [f"| {k} | {before.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in after.items()]
        lines.append("")
    if summary.get("forgetting"):
        f = summary["forgetting"]
        lines += [f"Forgetting check: reference loss {f['reference_loss_before']:.4f} -> {f['reference_loss_after']:.4f} ({f['delta']:+.4f}).", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
