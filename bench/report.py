#!/usr/bin/env python
"""Regenerate the README's performance section from the committed results (bench/results/*.jsonl).

    python bench/report.py            # rewrite README.md between <!-- bench:start --> and <!-- bench:end -->
    python bench/report.py --stdout   # only print the markdown

One section per results file (device + preset): the headline cases' fwd and fwd+bwd medians and
speedups, a table of the packed (variable-length) cases when the run has any, plus the
geometric-mean speedup over every case of the run. Without the README or its markers the markdown
goes to stdout and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from shapes import op_family
from summary import (
    PACKED_BASELINES,
    SHORT_DTYPE,
    fmt_ms,
    fmt_x,
    is_packed,
    measurements,
    pivot,
    roofline_gbps,
    shape_label,
    speedup,
)

BENCH = Path(__file__).resolve().parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TABLE_PASSES = ("fwd", "fwd+bwd")
MAX_ROWS = 40  # per run: the README is an overview; the JSONL and PNG hold the rest


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def section(rows: list[dict], source: str) -> str:
    """Markdown for one run: heading naming the device, a compact table, the overall speedups."""
    first = measurements(rows)[0]
    groups = pivot(rows)
    extra = [k for k in groups if op_family(k[0]) != "pooling" and k[1] in TABLE_PASSES]
    padded = {k: by for k, by in groups.items() if not is_packed(k) and op_family(k[0]) == "pooling"}
    chosen = [
        k for k, by in padded.items() if k[1] in TABLE_PASSES and by.get("fastpool", {}).get("headline")
    ]
    chosen = (chosen or [k for k in padded if k[1] in TABLE_PASSES])[:MAX_ROWS]
    roofs = roofline_gbps(rows)
    lines = [
        f"#### {first['device']} ({first['preset']} preset)",
        "",
        f"torch {first['torch']}, triton {first['triton']}, fastpool {first['fastpool']} "
        f"(backend {next((by['fastpool']['backend'] for by in groups.values() if 'fastpool' in by), '?')}), "
        f"{first['date'][:10]}"
        + (f", {first['threads']} CPU thread(s), timer {first['timer']}" if first.get("threads") else "")
        + f"; source `bench/results/{source}`."
        + (
            " Measured rooflines: " + ", ".join(f"{k} {v:.0f} GB/s" for k, v in roofs.items()) + "."
            if roofs
            else ""
        ),
    ]
    if chosen:
        lines += [
            "",
            "| op | pass | dtype | B x T x d | padding | fastpool ms | eager ms | compile ms "
            "| vs eager | vs compile | fastpool GB/s |" + (" % roofline |" if roofs else ""),
            "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if roofs else ""),
        ]
    for key in chosen:
        by = groups[key]
        shape, pad = shape_label(key)
        fp = by.get("fastpool")
        cells = [key[0], key[1], SHORT_DTYPE.get(key[2], key[2]), shape, pad]
        cells += [fmt_ms(by[p]["median_ms"]) if p in by else "-" for p in ("fastpool", "eager", "compile")]
        cells += [fmt_x(speedup(by, "eager")), fmt_x(speedup(by, "compile"))]
        cells.append(f"{fp['gbps']:.0f}" if fp else "-")
        if roofs:
            cells.append(f"{fp['frac_roofline']:.0%}" if fp and fp.get("frac_roofline") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += packed_table([k for k in groups if is_packed(k) and k[1] in TABLE_PASSES], groups, bool(roofs))
    lines += extra_table(extra, groups, bool(roofs))
    summary = []
    for pass_ in ("fwd", "fwd+bwd", "bwd"):
        parts = []
        for base in ("eager", "compile", *PACKED_BASELINES):
            values = [(s, k) for k, by in groups.items() if k[1] == pass_ and (s := speedup(by, base))]
            if values:
                low, key = min(values)
                lowest = f"{key[0]} {SHORT_DTYPE.get(key[2], key[2])} {' '.join(shape_label(key))}"
                parts.append(
                    f"{fmt_x(geomean([v for v, _ in values]))} vs {base} ({len(values)} cases, lowest "
                    f"{fmt_x(low)}: {lowest})"
                )
        if parts:
            summary.append(f"{pass_}: " + ", ".join(parts))
    if summary:
        lines += ["", "Geometric-mean speedup of fastpool over the whole run: " + "; ".join(summary) + "."]
    return "\n".join(lines)


def packed_table(keys: list[tuple], groups: dict, roofs: bool) -> list[str]:
    """Markdown lines for the packed cases (none when the run has none)."""
    if not keys:
        return []
    lines = [
        "",
        "Packed (variable-length) input, `cu_seqlens` + `max_seqlen`: S/Nxd = S sequences, N tokens, "
        "width d; index_add = `index_add_` into float32 (mean) or `scatter_reduce` amax (max); loop = "
        "one mean / max per sequence (`split`), not run above 2048 sequences (`bench/providers.py`).",
        "",
        "| op | pass | dtype | S/Nxd | lengths | fastpool ms | index_add ms | loop ms "
        "| vs index_add | vs loop | fastpool GB/s |" + (" % roofline |" if roofs else ""),
        "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if roofs else ""),
    ]
    for key in keys[:MAX_ROWS]:
        by = groups[key]
        shape, lengths = shape_label(key)
        fp = by.get("fastpool")
        cells = [key[0], key[1], SHORT_DTYPE.get(key[2], key[2]), shape, lengths]
        cells += [fmt_ms(by[p]["median_ms"]) if p in by else "-" for p in ("fastpool", *PACKED_BASELINES)]
        cells += [fmt_x(speedup(by, p)) for p in PACKED_BASELINES]
        cells.append(f"{fp['gbps']:.0f}" if fp else "-")
        if roofs:
            cells.append(f"{fp['frac_roofline']:.0%}" if fp and fp.get("frac_roofline") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def extra_table(keys: list[tuple], groups: dict, roofs: bool) -> list[str]:
    """Markdown lines for attention pooling and global pooling cases (none when the run has none)."""
    if not keys:
        return []
    lines = [
        "",
        "Attention pooling (`attention`: one score per token, eager = masked `softmax` then the (B, T, d) "
        "product summed over T; training passes differentiate hidden and scores) and global pooling of "
        "feature maps (`global_mean` / `global_max`, B x C x H x W in NCHW or channels_last; eager = "
        "`AdaptiveAvgPool2d(1)` / `flatten(2).amax(-1)`); compile = `torch.compile` of the eager code.",
        "",
        "| op | pass | dtype | shape | padding / format | fastpool ms | eager ms | compile ms "
        "| vs eager | vs compile | fastpool GB/s |" + (" % roofline |" if roofs else ""),
        "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if roofs else ""),
    ]
    for key in keys[:MAX_ROWS]:
        by = groups[key]
        shape, pad = shape_label(key)
        fp = by.get("fastpool")
        cells = [key[0], key[1], SHORT_DTYPE.get(key[2], key[2]), shape, pad]
        cells += [fmt_ms(by[p]["median_ms"]) if p in by else "-" for p in ("fastpool", "eager", "compile")]
        cells += [fmt_x(speedup(by, "eager")), fmt_x(speedup(by, "compile"))]
        cells.append(f"{fp['gbps']:.0f}" if fp else "-")
        if roofs:
            cells.append(f"{fp['frac_roofline']:.0%}" if fp and fp.get("frac_roofline") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results: Path) -> str:
    """All sections, GPU runs first. Results in subfolders (scratch/) are not part of the report."""
    sections = []
    files = sorted(results.glob("*.jsonl"))
    runs = [(f, load(f)) for f in files]
    runs = [(f, rows) for f, rows in runs if measurements(rows)]
    runs.sort(key=lambda fr: (measurements(fr[1])[0]["device"].startswith("CPU"), fr[0].name))
    for f, rows in runs:
        sections.append(section(rows, f.name))
    if not sections:
        return "_No benchmark results yet: run `python bench/run.py` and commit bench/results/._"
    intro = (
        "Median times from `python bench/run.py --preset <preset>`; speedup = other provider / fastpool. "
        "GB/s counts the minimal bytes of bench/traffic.py (padding is not counted as read)."
    )
    return "\n\n".join([intro, *sections])


def rewrite(readme: Path, markdown: str) -> bool:
    """Replace the text between the markers; False (nothing written) if the file or a marker is missing."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[: start + len(START)] + "\n" + markdown + "\n" + text[end:])
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--readme", type=Path, default=BENCH.parent / "README.md")
    parser.add_argument("--stdout", action="store_true", help="print only, never write the README")
    args = parser.parse_args(argv)
    markdown = render(args.results)
    if not args.stdout and rewrite(args.readme, markdown):
        print(f"updated {args.readme} between {START} and {END}")
    else:
        if not args.stdout:
            print(
                f"({args.readme} or its {START} / {END} markers not found: printing instead)", file=sys.stderr
            )
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
