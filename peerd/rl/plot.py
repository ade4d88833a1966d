"""A run's reward against step and against wall time, as a PNG (matplotlib, Agg).

Reads the run's `metrics.jsonl` (one JSON object a step: step, elapsed_s, reward,
...). Several runs may be drawn on the same axes (a benchmark comparing sync and
async): `plot_runs({"sync": path, "async": path}, out)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step lines of a metrics file; a torn last line (a crash mid-write) is
    skipped, as is anything that is not a step line."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row and "reward" in row:
            out.append(row)
    return out


def plot_runs(runs: Mapping[str, Path], out: Path, title: str = "") -> Path:
    """Write `out` (PNG): reward against step (left) and wall time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, path in runs.items():
        rows = read_metrics(path)
        steps = [r["step"] for r in rows]
        times = [r.get("elapsed_s", 0.0) for r in rows]
        rewards = [r["reward"] for r in rows]
        by_step.plot(steps, rewards, marker=".", label=label)
        by_time.plot(times, rewards, marker=".", label=label)
    by_step.set_xlabel("step")
    by_step.set_ylabel("mean reward")
    by_time.set_xlabel("wall time (s)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        by_step.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
