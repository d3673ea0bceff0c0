"""PNG of a run: fastpool's speedup per case, and its GB/s against the measured rooflines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or the GPU box
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from summary import BASELINES, pivot, roofline_gbps, shape_label, speedup  # noqa: E402


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels over the cases: speedup vs each baseline present (eager / compile for padded
    cases, index_add / loop for packed ones; log scale), and GB/s vs rooflines."""
    groups = {k: v for k, v in pivot(rows).items() if "fastpool" in v}
    labels = [f"{k[0]} {k[1]} {k[2][:4]} {' '.join(shape_label(k))}" for k in groups]
    x = np.arange(len(groups))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.22 * len(groups) + 3), 9), sharex=True)

    present = {p for by in groups.values() for p in by}
    baselines = [b for b in BASELINES if b in present] or ["eager", "compile"]
    width = 0.8 / len(baselines)
    for i, baseline in enumerate(baselines):
        values = [speedup(by, baseline) for by in groups.values()]
        if any(v is not None for v in values):
            heights = [np.nan if v is None else v for v in values]
            top.bar(x + (i - (len(baselines) - 1) / 2) * width, heights, width, label=f"vs {baseline}")
    top.axhline(1.0, color="black", linewidth=0.8)
    top.set_yscale("log")
    top.set_ylabel("fastpool speedup (x)")
    top.legend(loc="upper right")
    top.set_title(title)

    shown = ["fastpool", *baselines]
    width = 0.84 / len(shown)
    for i, provider in enumerate(shown):
        values = [by[provider]["gbps"] if provider in by else np.nan for by in groups.values()]
        bottom.bar(x + (i - (len(shown) - 1) / 2) * width, values, width, label=provider)
    for (name, gbps), style in zip(roofline_gbps(rows).items(), ("--", ":", "-."), strict=False):
        bottom.axhline(gbps, color="gray", linestyle=style, linewidth=1, label=f"roofline {name} {gbps:.0f}")
    bottom.set_ylabel("GB/s (minimal bytes / median)")
    bottom.legend(loc="upper right", fontsize="small")
    bottom.set_xticks(x, labels, rotation=90, fontsize=7)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
