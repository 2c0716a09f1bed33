"""The Pareto plot: accuracy against throughput, point area proportional to peak memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Point:
    label: str
    throughput: float  # sequences/s, higher is better
    accuracy: float  # e.g. mean cosine to fp32, higher is better
    memory_mb: float | None = None
    frontier: bool = False


def mark_frontier(points: list[Point]) -> list[Point]:
    """Flag the points no other point beats on both throughput and accuracy."""
    for p in points:
        p.frontier = not any(
            (q.throughput >= p.throughput and q.accuracy >= p.accuracy)
            and (q.throughput > p.throughput or q.accuracy > p.accuracy)
            for q in points
        )
    return points


def plot_pareto(
    points: list[Point],
    path: Path,
    title: str,
    accuracy_label: str = "mean cosine to fp32",
    x_label: str = "throughput (sequences/s, higher is better)",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mark_frontier(points)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    mems = [p.memory_mb for p in points if p.memory_mb]
    scale = 600 / max(mems) if mems else 1.0
    for p in points:
        size = (p.memory_mb or 50) * scale
        ax.scatter(
            p.throughput,
            p.accuracy,
            s=max(size, 20),
            alpha=0.55,
            color="tab:green" if p.frontier else "tab:gray",
            edgecolors="black",
            linewidths=0.6,
        )
        mem = f", {p.memory_mb:.0f} MB" if p.memory_mb else ""
        ax.annotate(f"{p.label}{mem}", (p.throughput, p.accuracy), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = sorted((p for p in points if p.frontier), key=lambda p: p.throughput)
    if len(front) > 1:
        ax.plot(
            [p.throughput for p in front],
            [p.accuracy for p in front],
            "--",
            color="tab:green",
            linewidth=1,
            label="Pareto frontier",
        )
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{accuracy_label} (higher is better)")
    ax.set_title(title + "\n(point area = peak memory of a fresh process)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
