"""Turn long-format rows into one line per case (providers side by side) and print it with rich."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

# The fields that identify one case; a row adds provider and measurements to these. N and
# length_dist only exist on packed rows (and in results written since packed input was added):
# rows are read with .get, so older results files key their cases with None there.
CASE_FIELDS = ("op", "pass", "dtype", "B", "T", "d", "padding", "layout", "N", "length_dist", "spatial")
# Whom fastpool's speedup is computed against: padded cases' baselines, then packed cases'.
BASELINES = ("eager", "compile", "index_add", "loop")
PACKED_BASELINES = ("index_add", "loop")


def measurements(rows: Iterable[dict]) -> list[dict]:
    """Rows of pooling measurements (roofline rows left out)."""
    return [r for r in rows if not str(r["op"]).startswith("roofline")]


def roofline_gbps(rows: Iterable[dict]) -> dict[str, float]:
    """{"copy" | "read" | "fill": GB/s} from the roofline rows (empty on CPU)."""
    return {r["op"].removeprefix("roofline-"): r["gbps"] for r in rows if str(r["op"]).startswith("roofline")}


def pivot(rows: Iterable[dict]) -> dict[tuple, dict[str, dict]]:
    """{case key: {provider: row}}, in the order cases were measured."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in measurements(rows):
        out.setdefault(tuple(r.get(f) for f in CASE_FIELDS), {})[r["provider"]] = r
    return out


def speedup(by_provider: dict[str, dict], baseline: str) -> float | None:
    """baseline median / fastpool median, or None when either is missing."""
    if "fastpool" not in by_provider or baseline not in by_provider:
        return None
    return by_provider[baseline]["median_ms"] / by_provider["fastpool"]["median_ms"]


def is_packed(key: tuple) -> bool:
    """Whether a case key (of pivot) is a packed case."""
    return dict(zip(CASE_FIELDS, key, strict=True))["layout"] == "packed"


def shape_label(key: tuple) -> tuple[str, str]:
    """("BxTxd", "padding layout") for a case key; ("S/Nxd", "<length dist> <=T") for a packed one
    (S sequences, N tokens in all, the longest T); ("BxCxHxW", "<memory format>") for a feature map."""
    k = dict(zip(CASE_FIELDS, key, strict=True))
    if k["spatial"]:  # a feature map (global pooling): B x C x H x W, memory format
        return f"{k['B']}x{k['d']}x{k['spatial']}", k["layout"]
    if k["layout"] == "packed":
        return f"{k['B']}/{k['N']}x{k['d']}", f"{k['length_dist']} <= {k['T']}"
    return f"{k['B']}x{k['T']}x{k['d']}", (f"{k['padding']:.0%} {k['layout']}" if k["padding"] else "0%")


SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.4g}"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_table(rows: list[dict], title: str, console: Console | None = None) -> None:
    """One line per (op, pass, dtype, shape, padding, layout): each provider's median ms, fastpool's
    GB/s (and fraction of the copy / fill roofline on GPU), and its speedup vs eager and compile.
    Packed cases get a second table of their own, with speedups vs index_add and loop."""
    # Piped output gets rich's 80 columns by default: too narrow for a line per case.
    console = console or Console(width=None if Console().is_terminal else 200)
    groups = pivot(rows)
    padded = {k: by for k, by in groups.items() if not is_packed(k)}
    packed = {k: by for k, by in groups.items() if is_packed(k)}
    roofs = roofline_gbps(rows)
    notes = ["median ms; speedup = provider median / fastpool median; GB/s from bench/traffic.py"]
    if roofs:
        notes.append("rooflines (GB/s): " + ", ".join(f"{k} {v:.0f}" for k, v in roofs.items()))
    if padded or not packed:
        table = _table(padded, title, ("shape", "padding"), ("eager", "compile"), bool(roofs))
        note = "* = wrong result for this mask (eager cls/last idiom under left padding or holes)"
        table.caption = "\n".join([*notes, note])
        console.print(table)
    if packed:
        table = _table(packed, f"{title}: packed input", ("S/Nxd", "lengths"), PACKED_BASELINES, bool(roofs))
        note = (
            "S/Nxd = S sequences, N tokens in all, width d; lengths = distribution <= the longest; "
            "index_add = index_add_ (fp32) / scatter_reduce amax, loop = split + mean / max per sequence"
        )
        table.caption = "\n".join([*notes, note])
        console.print(table)


def _table(
    groups: dict[tuple, dict[str, dict]],
    title: str,
    shape_columns: tuple[str, str],
    baselines: tuple[str, ...],
    has_roof: bool,
) -> Table:
    providers = list(dict.fromkeys(p for by in groups.values() for p in by))
    table = Table(title=title, header_style="bold", show_lines=False, caption_justify="left")
    for name in ("op", "pass", "dtype", *shape_columns):
        table.add_column(name)
    for p in providers:
        table.add_column(f"{p} ms", justify="right")
    table.add_column("fastpool GB/s", justify="right")
    if has_roof:
        table.add_column("% roof", justify="right")
    for b, style in zip(baselines, ("bold green", "bold cyan"), strict=True):
        table.add_column(f"vs {b}", justify="right", style=style)
    for key, by in groups.items():
        shape, pad = shape_label(key)
        cells = [key[0], key[1], SHORT_DTYPE.get(key[2], key[2]), shape, pad]
        for p in providers:
            r = by.get(p)
            # A trailing * marks a provider whose result is wrong for this mask (eager cls/last).
            wrong = r is not None and r.get("matches_reference") is False
            cells.append(fmt_ms(r and r["median_ms"]) + ("*" if wrong else ""))
        fp = by.get("fastpool")
        cells.append("-" if fp is None else f"{fp['gbps']:.3g}")
        if has_roof:
            frac = fp and fp.get("frac_roofline")
            cells.append("-" if frac is None else f"{frac:.0%}")
        cells += [fmt_x(speedup(by, b)) for b in baselines]
        table.add_row(*cells)
    return table
