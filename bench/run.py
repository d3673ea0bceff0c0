#!/usr/bin/env python
"""fastpool benchmark suite: check, then time, every provider on a preset grid.

    python bench/run.py                      # default preset (CPU-sized, < 1 min)
    python bench/run.py --preset gpu         # H100 / H200 grid (~4 min)
    python bench/run.py --preset gpu --dry-run
    python bench/run.py --providers fastpool eager --quick --out /tmp/r.jsonl --plot /tmp/r.png

Writes one JSON line per measurement to bench/results/<device>-<preset>.jsonl (long format; see
ROW_FIELDS), a PNG next to it, and prints a table. Rooflines (CUDA only) are measured first.

Packed (variable-length) rows have op "packed_mean" / "packed_max", layout "packed", B = S (the
number of sequences, the output's rows), T = the longest sequence, padding 0 and pad_actual 0
(a packed batch has no padding), and fill the columns S, N (total tokens) and length_dist
("uniform" / "skewed"), which are None on padded rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import re
import sys
from pathlib import Path

import attention_global
import torch
from checks import check_backward, check_forward, grad_output
from plot import plot
from providers import PROVIDERS, Provider, build_provider, make_providers
from rich.console import Console
from rich.table import Table
from shapes import DTYPES, PRESETS, Case, FeatureBlock, PackedBlock, Preset, make_inputs, spatial_label
from summary import print_table
from timing import Timing, measure, measure_interleaved, measure_rooflines
from tqdm import tqdm
from traffic import ROOFLINE_OF_PASS, gbps, minimal_bytes, packed_minimal_bytes

import fastpool
from fastpool.backend import resolve_backend

RESULTS = Path(__file__).resolve().parent / "results"
ROW_FIELDS = (
    "op", "pass", "dtype", "B", "T", "d", "padding", "layout", "S", "N", "length_dist", "provider",
    "median_ms", "p20_ms", "p80_ms", "wall_ms", "graph_ms", "gbps", "frac_roofline", "bytes", "backend",
    "timer",
    "matches_reference", "pad_actual", "headline", "block", "preset", "spatial",
    "device", "threads", "torch", "triton", "fastpool", "date",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: the preset's")
    parser.add_argument("--blocks", nargs="+", help="run only these blocks of the preset (default: all)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where default-named results go")
    parser.add_argument("--out", type=Path, help="JSONL path (default <out-dir>/<device>-<preset>.jsonl)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: --out with .png)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs (noisier)")
    parser.add_argument(
        "--cudagraph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each call replayed as a CUDA graph (GPU; default on)",
    )
    parser.add_argument(
        "--compile-budget", type=float, help="seconds of compiling after which compile is skipped"
    )
    parser.add_argument(
        "--threads", type=int, help="CPU: torch.set_num_threads (default: the preset's, else torch's choice)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the grid and count measurements, run nothing"
    )
    return parser.parse_args(argv)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU {model}"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", text.lower())).strip("-")


def environment(device: torch.device) -> dict:
    """Columns shared by every row of a run: where and with what it ran."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastpool": fastpool.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def timed_callable(pass_: str, fn, h: torch.Tensor, mask: torch.Tensor, g: torch.Tensor):
    """What one timed iteration runs. Backward goes through autograd.grad, not .backward(), so no
    .grad accumulates (that would add a read-modify-write of (B, T, d) to every iteration)."""
    if isinstance(mask, attention_global.AttentionInputs):
        return attention_global.timed_callable(pass_, fn, h, mask, g)
    if pass_ == "fwd":
        return lambda: fn(h, mask)
    hg = h.detach().requires_grad_()
    if pass_ == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(hg, mask), hg, g)
    out = fn(hg, mask)
    return lambda: torch.autograd.grad(out, hg, g, retain_graph=True)


def time_one(case: Case, provider: Provider, h, mask, g, args, preset: Preset) -> Timing:
    run = timed_callable(case.pass_, provider.fn(case.op), provider.prepare(h), mask, g)
    with torch.set_grad_enabled(case.pass_ != "fwd"):
        return measure(
            run, h.device, quick=args.quick, min_run_time=preset.min_run_time,
            cudagraph=args.cudagraph and provider.cudagraph,
        )  # fmt: skip


def time_interleaved(case: Case, providers: list[Provider], h, mask, g, args, preset: Preset) -> dict:
    """CPU: every provider of the case timed in alternation ({name: Timing}); a provider whose
    callable cannot be built or run is left out (only optional ones may fail)."""
    fns = {}
    with torch.set_grad_enabled(case.pass_ != "fwd"):
        for p in providers:
            try:
                run = timed_callable(case.pass_, p.fn(case.op), p.prepare(h), mask, g)
                run()
            except Exception as exc:  # noqa: BLE001 - only optional providers may fail here
                if not p.optional:
                    raise
                tqdm.write(f"note: {p.name} failed on {case.label}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            fns[p.name] = run
        return measure_interleaved(fns, quick=args.quick, min_run_time=preset.min_run_time)


def case_bytes(case: Case, mask) -> int:
    """bench/traffic.py's minimal byte count of the case (``mask`` is a PackedBatch when packed)."""
    dtype = DTYPES[case.dtype]
    if case.op in attention_global.EAGER:
        return attention_global.minimal_bytes(case, mask)
    if case.packed is None:
        return minimal_bytes(case.op, case.pass_, case.B, case.T, case.d, dtype, mask)
    cu = mask.cu_seqlens
    return packed_minimal_bytes(
        case.op, case.pass_, case.packed.N, case.B, case.d, dtype, cu.numel() * cu.element_size()
    )


def shape_columns(case: Case) -> dict:
    """The packed-shape columns of a row (None on padded rows), and the feature-map spatial shape
    ("HxW", None on other rows)."""
    p = case.packed
    spatial = case.spatial and spatial_label(case.spatial)
    return {"S": p and p.S, "N": p and p.N, "length_dist": p and p.dist, "spatial": spatial}


def roofline_rows(device: torch.device, args, env: dict) -> list[dict]:
    rows = []
    for name, (t, n_bytes) in measure_rooflines(device, quick=args.quick).items():
        rows.append({
            "op": f"roofline-{name}", "pass": "-", "dtype": "bfloat16", "B": None, "T": None, "d": None,
            "padding": None, "layout": None, "S": None, "N": None, "length_dist": None,
            "provider": "torch", "median_ms": t.median_ms,
            "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "wall_ms": t.wall_ms, "graph_ms": t.graph_ms,
            "gbps": gbps(n_bytes, t.median_ms),
            "frac_roofline": None, "bytes": n_bytes, "backend": "torch", "timer": t.timer,
            "matches_reference": None, "pad_actual": None, "headline": False, "block": "roofline",
            "spatial": None, "preset": args.preset, **env,
        })  # fmt: skip
    return rows


def emit(sink, row: dict) -> dict:
    """Write one row as a JSON line, columns in ROW_FIELDS order (a missing one is a bug here)."""
    row = {k: row[k] for k in ROW_FIELDS}
    sink.write(json.dumps(row) + "\n")
    sink.flush()
    return row


def run_grid(
    preset: Preset, providers: list[Provider], device: torch.device, args, env: dict, sink
) -> list[dict]:
    """Check and time every case; rows are written to ``sink`` as they come (a crash keeps them)."""
    rows = [emit(sink, r) for r in roofline_rows(device, args, env)]
    roof = {r["op"].removeprefix("roofline-"): r["gbps"] for r in rows}
    checked: dict[tuple, dict[str, bool]] = {}
    grads_checked: set[tuple] = set()
    skip_noted: set[tuple[str, str]] = set()
    inputs_key, h, mask = None, None, None
    cases = preset.cases()
    for case in tqdm(cases, desc=f"{preset.name} on {device.type}", unit="case", dynamic_ncols=True):
        if case.input_key != inputs_key:
            h = mask = None  # free the previous input first: long-context inputs are GBs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            h, mask = make_inputs(case, device)
            inputs_key = case.input_key
        # CompileProvider.skip drops compile on cases whose op family spent its compile budget.
        runs = []  # the providers that take this case (padded or packed input, size limits)
        for p in providers:
            reason = p.skip(case)
            if reason is None:
                runs.append(p)
            elif case.packed is not None and p.inputs == ("packed",) and (p.name, reason) not in skip_noted:
                skip_noted.add((p.name, reason))  # say once why a packed baseline is missing
                tqdm.write(f"note: {p.name} not run on {case.label} and the like: {reason}")
        key = (case.input_key, case.op)
        if key not in checked:
            checked[key] = check_forward(case, runs, h, mask)
        if case.pass_ != "fwd" and key not in grads_checked:
            check_backward(case, runs, h, mask)
            grads_checked.add(key)
        g = grad_output(case, h)
        n_bytes = case_bytes(case, mask)
        if case.op in attention_global.EAGER:
            pad_actual = attention_global.padding_fraction(case, mask)
        else:
            pad_actual = 0.0 if case.packed is not None else float((mask == 0).float().mean())
        timed = [
            p for p in runs
            if not p.unavailable() and case.pass_ in p.passes and p.name in checked[key]
        ]  # fmt: skip
        # CPU: the providers of a case are timed in alternation (a shared CPU's load hits them alike).
        interleaved = time_interleaved(case, timed, h, mask, g, args, preset) if device.type == "cpu" else {}
        for p in timed:
            if device.type == "cpu":
                if p.name not in interleaved:
                    continue
                t = interleaved[p.name]
            else:
                try:
                    t = time_one(case, p, h, mask, g, args, preset)
                except Exception as exc:  # noqa: BLE001 - only optional providers may fail here
                    if not p.optional:
                        raise
                    # Skip this case only: e.g. one pass may not support being replayed.
                    tqdm.write(
                        f"note: {p.name} failed on {case.label}: {type(exc).__name__}: {str(exc)[:300]}"
                    )
                    continue
            rate = gbps(n_bytes, t.median_ms)
            roof_rate = roof.get(ROOFLINE_OF_PASS[case.pass_])
            row = {
                "op": case.op, "pass": case.pass_, "dtype": case.dtype, "B": case.B, "T": case.T,
                "d": case.d, "padding": case.padding, "layout": case.layout, **shape_columns(case),
                "provider": p.name,
                "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "wall_ms": t.wall_ms,
                "graph_ms": t.graph_ms, "gbps": rate,
                "frac_roofline": rate / roof_rate if roof_rate else None, "bytes": n_bytes,
                "backend": p.backend(), "timer": t.timer, "matches_reference": checked[key][p.name],
                "pad_actual": pad_actual, "headline": case.headline, "block": case.block,
                "preset": preset.name, **env,
            }  # fmt: skip
            rows.append(emit(sink, row))
    return rows


def print_grid(preset: Preset, provider_names: tuple[str, ...], device: torch.device) -> None:
    """--dry-run: the blocks of the grid and how many measurements (and compiled graphs) it makes."""
    console = Console(width=None if Console().is_terminal else 160)
    table = Table(title=f"preset {preset.name!r}: {preset.description}")
    for col in ("block", "shapes", "dtypes", "ops", "passes", "paddings x layouts", "cases"):
        table.add_column(col)
    for b in preset.blocks:
        if isinstance(b, PackedBlock):
            names = [f"{p.S} {p.dist} max {p.max_len} ({p.N} tok) x{p.d}" for p in b.shapes[:4]]
            pads = "packed"
        elif isinstance(b, FeatureBlock):
            names = ["x".join(map(str, shape)) for shape in b.shapes[:4]]
            pads = ", ".join(b.formats)
        else:
            names = [f"{B}x{T}x{d}" for B, T, d in b.shapes[:4]]
            pads = f"{', '.join(f'{p:g}' for p in b.paddings)} x {', '.join(b.layouts)}"
        shapes = ", ".join(names) + (f" (+{len(b.shapes) - 4} more)" if len(b.shapes) > 4 else "")
        table.add_row(
            b.name,
            shapes,
            ", ".join(b.dtypes),
            ", ".join(b.ops),
            ", ".join(b.passes),
            pads,
            str(len(b.cases())),
        )
    console.print(table)
    cases = preset.cases()
    providers = {name: build_provider(name, device) for name in provider_names}
    per_provider = {
        name: sum(1 for c in cases if c.pass_ in p.passes and p.skip(c) is None)
        for name, p in providers.items()
    }
    graphs = (
        len({(c.input_key, c.op, c.pass_ == "fwd") for c in cases if c.packed is None})
        if "compile" in provider_names
        else 0
    )
    inputs = len({c.input_key for c in cases})
    console.print(
        f"{len(cases)} cases on {inputs} inputs; measurements per provider: {per_provider}; "
        f"total {sum(per_provider.values())} measurements, {graphs} torch.compile graphs; device {device}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.blocks:
        unknown = set(args.blocks) - {b.name for b in preset.blocks}
        if unknown:
            raise SystemExit(f"--blocks: no block {sorted(unknown)} in preset {preset.name!r}")
        blocks = tuple(b for b in preset.blocks if b.name in args.blocks)
        preset = dataclasses.replace(preset, name=f"{preset.name}:{'+'.join(args.blocks)}", blocks=blocks)
    provider_names = tuple(args.providers or preset.providers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run:
        print_grid(preset, provider_names, device)
        return 0
    threads = args.threads or (preset.cpu_threads if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    env = environment(device)
    out = args.out or args.out_dir / f"{slug(env['device'])}-{preset.name}.jsonl"
    png = args.plot or out.with_suffix(".png")
    budget = args.compile_budget if args.compile_budget is not None else (
        preset.compile_budget_s if device.type == "cpu" else None
    )  # fmt: skip
    providers = make_providers(provider_names, device, budget)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | fastpool {env['fastpool']} "
          f"(backend {resolve_backend(device)}) | preset {preset.name}")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as sink:
        rows = run_grid(preset, providers, device, args, env, sink)
    print_table(rows, title=f"fastpool on {env['device']} ({preset.name} preset)")
    plot(rows, png, title=f"fastpool on {env['device']} ({preset.name} preset, torch {env['torch']})")
    print(f"wrote {len(rows)} rows to {out} and the plot to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
