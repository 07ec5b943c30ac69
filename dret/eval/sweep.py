"""`--evaluate_all --checkpoint_dir DIR`: every saved step of a training run -> a table and a PNG plot per metric."""

from __future__ import annotations

import os

from dret import inference
from dret.errors import DretError

PLOT_METRICS = ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100")


def checkpoint_steps(output_dir: str) -> list[int]:
    """The run's saved steps; a DretError when there is none."""
    steps = inference.saved_steps(output_dir)
    if not steps:
        raise DretError(f"{os.path.join(output_dir, inference.CHECKPOINTS)} holds no saved step")
    return steps


def table(rows: list[dict]) -> str:
    """Markdown: one line per (step, dataset)."""
    lines = ["| step | dataset | " + " | ".join(PLOT_METRICS) + " |", "|---" * (len(PLOT_METRICS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['dataset']} | " + " | ".join(f"{100 * r[m]:.2f}" for m in PLOT_METRICS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """One panel per metric, one line per dataset, against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 3.2))
    for ax, metric in zip(axes, PLOT_METRICS):
        for name in sorted({r["dataset"] for r in rows}):
            points = sorted((r["step"], r[metric]) for r in rows if r["dataset"] == name)
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_title(metric)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
