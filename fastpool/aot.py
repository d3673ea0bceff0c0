"""Ahead-of-time compilation of the kernel specializations the launchers choose.

Compiles for real NVIDIA targets without a GPU (``triton.compile`` + ``GPUTarget``), then reads
registers, stack and local memory from the cubin with the ``cuobjdump`` that ships with Triton.
A specialization is one kernel with one set of constexprs and argument types: hidden dtype, mask
integer width, the MASK_BITS argument type, the mode flags (max with or without positions), user
weights, padded or packed, and the block sizes from ``fastpool.launch`` (fixed per dtype: the chunk,
the lanes, the feature block, the pipelining depth). Each is compiled in two layouts: "contiguous"
(unit feature stride and 16-divisible row strides, what Triton specializes for ordinary tensors)
and "strided" (no stride assumptions). How many programs share a row, the normalisation and the
mode columns are runtime arguments of one compiled kernel.

Every constexpr path of every kernel is compiled for every hidden dtype. Arguments that change a
single load are sampled rather than crossed with everything: the wider mask widths (int16/32/64,
float64 bits) and the strided layout with three mode mixes, user weights in hidden's dtype.

Run ``python -m fastpool.aot --arch 80 90`` (must not run under ``TRITON_INTERPRET=1``);
``--sass`` adds, for the contiguous bf16 forward, what the hot loop's loads look like in SASS;
``--pairwise`` compiles a subset in which every pair of values of the specializations' labels and the
arch occurs together (CI's run on the newest triton release, see ``pairwise_cover``).

A spill is local memory traffic: local memory, or loads and stores to the stack (LDL/STL). A stack
frame without them is a subroutine's call frame, not a spill: ptxas of triton 3.9 outlines the rare
slow path of the correctly rounded float32 square root on sm_90 that way.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from . import launch

HIDDEN_DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
# (mask pointer type, MASK_BITS type) as the launcher produces them: masks are viewed as signed
# integers of their width; MASK_BITS is -1 (i32) for integer masks and 2**(w-1)-1 for float
# masks, which is an i64 argument only for 8-byte float masks. None: no mask (stats is passed).
MASK_KINDS = {
    "none": ("*i32", "i32"),
    "i8": ("*i8", "i32"),
    "i16": ("*i16", "i32"),
    "i32": ("*i32", "i32"),
    "i64": ("*i64", "i32"),
    "f64": ("*i64", "i64"),
}
LAYOUTS = ("contiguous", "strided")
# The mask width only changes the mask loads; the strided layout (hidden without unit feature
# stride) is compiled with these mask kinds, the contiguous one with all of them.
STRIDED_MASK_KINDS = ("none", "i8")
# (DO_MEAN, DO_MAX, TRACK_POS, DO_WEIGHTED, HAS_WEIGHTS) of the forward: every mode mix the launcher
# can ask for. Rank weights imply the plain sum (the chunk fold shifts ranks with it); user weights
# do not; max comes with positions (indices or a gradient wanted) or values only.
FORWARD_VARIANTS = (
    (False, False, False, False, False),  # cls / last only
    (True, False, False, False, False),  # mean, mean_sqrt_len
    (False, True, False, False, False),  # max, values only (inference)
    (False, True, True, False, False),  # max with positions
    (True, True, False, False, False),
    (True, True, True, False, False),
    (True, False, False, True, False),  # rank-weighted mean
    (True, True, True, True, False),
    (False, False, False, True, True),  # user weights
    (True, False, False, True, True),
    (False, True, True, True, True),
    (True, True, True, True, True),
)
# Mixes compiled for the wider mask kinds and the strided layout: the lightest and the heaviest.
SAMPLED_VARIANTS = (FORWARD_VARIANTS[1], FORWARD_VARIANTS[7], FORWARD_VARIANTS[11])


@dataclass(frozen=True)
class Specialization:
    """One compile job: kernel name, argument types, constexpr values, num_warps, divisible args."""

    kernel: str
    label: str
    types: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    divisible: tuple = ()
    num_warps: int = launch.NUM_WARPS
    maxnreg: int | None = None


def _kernel(name: str):
    from .kernels import pool_backward, pool_forward

    return {
        "pool_forward_kernel": pool_forward.pool_forward_kernel,
        "pool_backward_kernel": pool_backward.pool_backward_kernel,
        "packed_backward_kernel": pool_backward.packed_backward_kernel,
        "weights_backward_kernel": pool_backward.weights_backward_kernel,
        "pool_finish_kernel": pool_forward.pool_finish_kernel,
    }[name]


def _acc(dtype: str) -> str:
    return "fp64" if dtype == "fp64" else "fp32"


def _flags(variant: tuple) -> str:
    do_mean, do_max, track, do_weighted, has_weights = variant
    return (
        f"mean={int(do_mean)} max={int(do_max)} pos={int(track)} weighted={int(do_weighted)} "
        f"user_weights={int(has_weights)}"
    )


def _forward(
    dtype: str, mask_name: str, variant: tuple, layout: str, packed: bool, offsets: str = "*i32",
    state: bool = False,
):  # fmt: skip
    """One pool_forward_kernel specialization (padded with a mask kind, or packed with an offsets type);
    ``state``: the STATE variant of ``fastpool.partial`` (out_ptr is the state, in the acc dtype)."""
    size = HIDDEN_DTYPES[dtype]
    acc = _acc(dtype)
    do_mean, do_max, track, do_weighted, has_weights = variant
    contiguous = layout == "contiguous"
    mask_ty, bits_ty = MASK_KINDS[mask_name]
    has_mask = mask_name != "none"
    types = {
        "hidden_ptr": f"*{dtype}", "mask_ptr": mask_ty, "out_ptr": f"*{acc if state else dtype}",
        "argmax_ptr": "*i32", "stats_ptr": "*i32", "wsum_ptr": f"*{acc}", "wmean_ptr": f"*{acc}",
        "prefix_ptr": "*i32",
        "part_sum_ptr": f"*{acc}", "part_wsum_ptr": f"*{acc}", "part_max_ptr": f"*{acc}",
        "part_pos_ptr": "*i32",
        "part_stats_ptr": "*i32", "part_wt_ptr": f"*{acc}", "counter_ptr": "*i64",
        "weights_ptr": f"*{dtype}" if has_weights else f"*{acc}", "cu_seqlens_ptr": offsets,
        "norm_ptr": f"*{acc}", "rowbuf_ptr": f"*{acc}", "epoch": "i64", "normalize_eps": "fp32",
        "MASK_BITS": bits_ty,
    }  # fmt: skip
    constexprs = {
        "HAS_MASK": has_mask, "DO_MEAN": do_mean, "DO_MAX": do_max, "TRACK_POS": track,
        "DO_WEIGHTED": do_weighted, "HAS_WEIGHTS": has_weights, "PACKED": packed, "ACC_DTYPE": acc,
        "LANES": launch.LANES, "BLOCK_D": launch.feature_block(size), "CHUNK": launch.CHUNK,
        "SCAN_BLOCK": launch.SCAN_BLOCK, "NUM_STAGES": launch.NUM_STAGES, "STATE": state,
        **({"stride_hd": 1} if contiguous else {}), **({"stride_mt": 1} if contiguous and has_mask else {}),
    }  # fmt: skip
    divisible = ("d", "stride_hb", "stride_ht", "stride_ob") if contiguous else ()
    where = f"packed offsets={offsets[1:]}" if packed else f"mask={mask_name}"
    label = f"{'state-fwd' if state else 'fwd'} {dtype} {where} {_flags(variant)} {layout}"
    maxnreg = launch.forward_max_registers(track, do_weighted, packed)
    return Specialization("pool_forward_kernel", label, types, constexprs, divisible, maxnreg=maxnreg)


def _backward(
    dtype: str, mask_name: str, has_weights: bool, layout: str, grad_dtype: str | None = None
) -> Specialization:
    """One pool_backward_kernel specialization; ``grad_dtype``: grad_out's, when not hidden's (the
    partial states' backward reads the state's gradient in the acc dtype)."""
    size = HIDDEN_DTYPES[dtype]
    acc = _acc(dtype)
    contiguous = layout == "contiguous"
    mask_ty, bits_ty = MASK_KINDS[mask_name]
    has_mask = mask_name != "none"
    types = {
        "grad_out_ptr": f"*{grad_dtype or dtype}", "mask_ptr": mask_ty, "argmax_ptr": "*i32",
        "stats_ptr": "*i32",
        "prefix_ptr": "*i32", "weights_ptr": f"*{dtype}" if has_weights else f"*{acc}", "wsum_ptr": f"*{acc}",
        "grad_ptr": f"*{dtype}", "MASK_BITS": bits_ty,
    }  # fmt: skip
    constexprs = {
        "HAS_MASK": has_mask, "HAS_WEIGHTS": has_weights, "ACC_DTYPE": acc, "CHUNK": launch.CHUNK,
        "BLOCK_T": launch.token_block(size), "BLOCK_D": launch.feature_block(size),
        **({"stride_god": 1, "stride_gd": 1} if contiguous else {}),
        **({"stride_mt": 1} if contiguous and has_mask else {}),
    }  # fmt: skip
    divisible = ("d", "stride_gob", "stride_gb", "stride_gt") if contiguous else ()
    grad_label = f" grad={grad_dtype}" if grad_dtype else ""
    label = f"bwd {dtype}{grad_label} mask={mask_name} user_weights={int(has_weights)} {layout}"
    return Specialization("pool_backward_kernel", label, types, constexprs, divisible)


def _packed_backward(dtype: str, offsets: str, has_weights: bool, layout: str) -> Specialization:
    size = HIDDEN_DTYPES[dtype]
    acc = _acc(dtype)
    contiguous = layout == "contiguous"
    types = {
        "grad_out_ptr": f"*{dtype}", "cu_seqlens_ptr": offsets, "argmax_ptr": "*i32", "stats_ptr": "*i32",
        "weights_ptr": f"*{dtype}" if has_weights else f"*{acc}", "wsum_ptr": f"*{acc}",
        "grad_ptr": f"*{dtype}",
    }  # fmt: skip
    constexprs = {
        "HAS_WEIGHTS": has_weights, "ACC_DTYPE": acc, "CHUNK": launch.CHUNK,
        "BLOCK_T": launch.token_block(size), "BLOCK_D": launch.feature_block(size),
        **({"stride_god": 1, "stride_gd": 1} if contiguous else {}),
    }  # fmt: skip
    divisible = ("d", "stride_gob", "stride_gt") if contiguous else ()
    label = f"packed-bwd {dtype} offsets={offsets[1:]} user_weights={int(has_weights)} {layout}"
    return Specialization("packed_backward_kernel", label, types, constexprs, divisible)


def _weights_backward(dtype: str, mask_name: str, packed: bool, layout: str) -> Specialization:
    size = HIDDEN_DTYPES[dtype]
    acc = _acc(dtype)
    contiguous = layout == "contiguous"
    mask_ty, bits_ty = MASK_KINDS[mask_name]
    types = {
        "grad_block_ptr": f"*{dtype}", "hidden_ptr": f"*{dtype}", "mask_ptr": mask_ty, "wsum_ptr": f"*{acc}",
        "wmean_ptr": f"*{acc}", "grad_ptr": f"*{dtype}", "cu_seqlens_ptr": "*i32" if packed else "*i32",
        "MASK_BITS": bits_ty,
    }  # fmt: skip
    constexprs = {
        "HAS_MASK": mask_name != "none", "PACKED": packed, "ACC_DTYPE": acc,
        "BLOCK_T": launch.token_block(size), "BLOCK_D": launch.feature_block(size),
        **({"stride_hd": 1} if contiguous else {}),
    }  # fmt: skip
    divisible = ("d", "stride_ht") if contiguous else ()
    where = "packed" if packed else f"mask={mask_name}"
    label = f"weights-bwd {dtype} {where} {layout}"
    return Specialization("weights_backward_kernel", label, types, constexprs, divisible)


def _finish(dtype: str, variant: tuple) -> Specialization:
    """One pool_finish_kernel specialization: (DO_MEAN, DO_MAX, DO_WEIGHTED, HAS_WEIGHTS)."""
    size = HIDDEN_DTYPES[dtype]
    acc = _acc(dtype)
    do_mean, do_max, do_weighted, has_weights = variant
    types = {
        "state_ptr": f"*{acc}", "count_ptr": "*i32", "wsum_in_ptr": f"*{acc}", "out_ptr": f"*{dtype}",
        "scratch_ptr": "*i32", "wsum_out_ptr": f"*{acc}", "norm_ptr": f"*{acc}", "rowbuf_ptr": f"*{acc}",
        "counter_ptr": "*i64", "epoch": "i64", "normalize_eps": "fp32",
    }  # fmt: skip
    constexprs = {
        "DO_MEAN": do_mean, "DO_MAX": do_max, "DO_WEIGHTED": do_weighted, "HAS_WEIGHTS": has_weights,
        "ACC_DTYPE": acc, "BLOCK_D": launch.feature_block(size),
    }  # fmt: skip
    label = (
        f"finish {dtype} mean={int(do_mean)} max={int(do_max)} weighted={int(do_weighted)} "
        f"user_weights={int(has_weights)}"
    )
    return Specialization("pool_finish_kernel", label, types, constexprs, ("d", "stride_sb", "stride_ob"))


# Partial states (fastpool.partial): the STATE forward always keeps max positions; sampled like the
# wider masks: the lightest and the heaviest mixes, rank and user weights. The finish kernel's mixes.
STATE_VARIANTS = (
    FORWARD_VARIANTS[0],
    FORWARD_VARIANTS[1],
    FORWARD_VARIANTS[3],
    FORWARD_VARIANTS[7],
    FORWARD_VARIANTS[11],
)
FINISH_VARIANTS = (
    (False, False, False, False),  # cls / last only
    (True, False, False, False),
    (True, True, True, False),
    (True, True, True, True),
)


def state_specializations() -> list[Specialization]:
    """The kernels of the partial states: the STATE forward, the finish kernel, and the backward
    reading a float32 state gradient for 16-bit hidden."""
    specs: list[Specialization] = []
    for dtype in HIDDEN_DTYPES:
        for variant in STATE_VARIANTS:
            specs.append(_forward(dtype, "i8", variant, "contiguous", packed=False, state=True))
        for variant in FINISH_VARIANTS:
            specs.append(_finish(dtype, variant))
    specs.append(_forward("bf16", "none", STATE_VARIANTS[-1], "strided", packed=False, state=True))
    for dtype in ("fp16", "bf16"):
        for has_weights in (False, True):
            specs.append(_backward(dtype, "i8", has_weights, "contiguous", grad_dtype="fp32"))
    return specs


def specializations() -> list[Specialization]:
    """Every (kernel, dtype, mask kind, modes, layout) the launchers can launch. The parallelism of a
    launch (programs per row), the normalisation and the mode columns are runtime arguments."""
    specs: list[Specialization] = []
    for dtype in HIDDEN_DTYPES:
        for layout in LAYOUTS:
            contiguous = layout == "contiguous"
            if not contiguous and dtype == "fp16":
                continue  # bf16 covers the strided addressing of 2-byte elements, same block sizes
            for mask_name in MASK_KINDS:
                if not contiguous and mask_name not in STRIDED_MASK_KINDS:
                    continue
                full = contiguous and mask_name in STRIDED_MASK_KINDS
                for variant in FORWARD_VARIANTS if full else SAMPLED_VARIANTS:
                    specs.append(_forward(dtype, mask_name, variant, layout, packed=False))
                for has_weights in (False, True) if mask_name in STRIDED_MASK_KINDS else (False,):
                    specs.append(_backward(dtype, mask_name, has_weights, layout))
            for i, variant in enumerate(FORWARD_VARIANTS if contiguous else SAMPLED_VARIANTS):
                offsets = "*i64" if i % 2 else "*i32"
                specs.append(_forward(dtype, "none", variant, layout, packed=True, offsets=offsets))
            for has_weights in (False, True):
                specs.append(_packed_backward(dtype, "*i64" if has_weights else "*i32", has_weights, layout))
            for mask_name in ("none", "i8"):
                specs.append(_weights_backward(dtype, mask_name, False, layout))
            specs.append(_weights_backward(dtype, "none", True, layout))
    return specs + state_specializations()


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def compile_one(spec: Specialization, arch: int, sass: bool = False) -> dict:
    """Compile ``spec`` for sm_<arch>; returns registers, stack and local bytes (or the error), and with
    ``sass`` what the loads of its innermost loops look like (``loop_loads``)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(spec.kernel)
    names = fn.arg_names
    signature, constexprs = {}, {}
    for name in names:
        if name in spec.constexprs:
            value = spec.constexprs[name]
            if name == "ACC_DTYPE":
                value = tl.float64 if value == "fp64" else tl.float32
            signature[name] = "constexpr"
            constexprs[name] = value
        elif name in spec.types:
            signature[name] = spec.types[name]
        else:
            signature[name] = "i32"
    pointer_args = [n for n in names if signature[n].startswith("*")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*pointer_args, *spec.divisible)}
    result = {"label": spec.label, "arch": arch}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": spec.num_warps}
        if spec.maxnreg is not None:
            options["maxnreg"] = spec.maxnreg
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - reported per specialization
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return result
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        )
        if sass:
            listing = subprocess.run(
                [_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True
            )
            result["loop_loads"] = loop_loads(listing.stdout)
    for key in ("REG", "STACK", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", usage.stdout)
        result[key.lower()] = int(match.group(1)) if match else -1
    result["spill_ops"] = 0
    if result["stack"] or result["local"]:  # read the code: spills, or only a call frame?
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            listing = subprocess.run(
                [_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True
            )
        result["spill_ops"] = len(re.findall(r"\b(?:LDL|STL)(?:\.[A-Z0-9]+)*\s", listing.stdout))
    result["vector_loads"] = compiled.asm["ptx"].count("ld.global.v")
    result["shared"] = compiled.metadata.shared
    return result


def loop_loads(sass: str) -> list[dict]:
    """The global loads of each innermost loop of a SASS listing: async copies (LDGSTS, cp.async) and
    direct loads (LDG) by width, and the copy groups waited on (DEPBAR), in program order."""
    code = []
    for line in sass.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if match:
            code.append((int(match.group(1), 16), match.group(2)))
    loops = []
    for address, text in code:
        branch = re.search(r"\bBRA\b.*0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    report = []
    for begin, end in inner:
        body = [text for address, text in code if begin <= address <= end]
        counts: dict[str, int] = {}
        for text in body:
            op = re.search(r"\b(LDGSTS\S*|LDG\S*|DEPBAR\S*)", text)
            if op:
                counts[op.group(1)] = counts.get(op.group(1), 0) + 1
        if any(k.startswith("LDG") for k in counts):
            report.append({"range": f"{begin:#x}-{end:#x}", **counts})
    return report


def _compile_packed(job):
    return compile_one(*job)


def pairwise_cover(cases: list[dict]) -> list[int]:
    """Indices (ascending) of a subset of ``cases`` (dicts of hashable parameter values) in which every
    value and every pair of values that occur together in some case occur together in a chosen one.
    Greedy and deterministic: each step takes the first case covering the most pairs still missing."""

    def pairs(case: dict) -> set:
        items = sorted(case.items(), key=lambda kv: kv[0])
        return {(a,) for a in items} | {(a, b) for i, a in enumerate(items) for b in items[i + 1 :]}

    covers = [pairs(case) for case in cases]
    missing = set().union(*covers) if covers else set()
    chosen = []
    while missing:
        best = max(range(len(cases)), key=lambda i: len(covers[i] & missing))
        chosen.append(best)
        missing -= covers[best]
    return sorted(chosen)


def label_parameters(spec: Specialization, arch: int) -> dict:
    """The parameters a compile job varies: kernel, arch, and each word of the label (``key=value`` or
    a positional word: direction, dtype, layout)."""
    words = spec.label.split()
    params = {"kernel": spec.kernel, "arch": arch}
    for i, word in enumerate(words):
        key, _, value = word.partition("=")
        params.update({key: value} if value else {f"word{i}": word})
    return params


def compile_jobs(archs: list[int], pairwise: bool = False) -> list[tuple[Specialization, int]]:
    """(specialization, arch) jobs: all of them, or with ``pairwise`` a subset covering every pair of
    label values and arch within each kernel."""
    jobs = [(spec, arch) for arch in archs for spec in specializations()]
    if not pairwise:
        return jobs
    kept = []
    for kernel in dict.fromkeys(spec.kernel for spec, _ in jobs):
        mine = [job for job in jobs if job[0].kernel == kernel]
        kept += [mine[i] for i in pairwise_cover([label_parameters(*job) for job in mine])]
    return kept


def compile_all(archs: list[int], workers: int | None = None, pairwise: bool = False) -> list[dict]:
    """Compile every specialization (or a pairwise subset) for every arch in a process pool; one
    result dict each."""
    jobs = compile_jobs(archs, pairwise)
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_packed, jobs, chunksize=4))


# The forward variants whose hot loop the --sass report shows (contiguous bf16, byte mask).
SASS_REPORT = (
    "fwd bf16 mask=i8 mean=1 max=0 pos=0 weighted=0 user_weights=0 contiguous",
    "fwd bf16 mask=i8 mean=0 max=1 pos=0 weighted=0 user_weights=0 contiguous",
    "fwd bf16 mask=i8 mean=1 max=1 pos=1 weighted=0 user_weights=0 contiguous",
)


def sass_report(arch: int) -> list[str]:
    """Lines describing the loads of the forward's token loops (dense: async copies; with holes:
    predicated loads), with the bytes each thread keeps in flight in the dense loop."""
    lines = []
    threads = 32 * launch.NUM_WARPS
    tile = launch.LANES * launch.ROW_BYTES  # bytes of hidden per loop iteration (one program)
    in_flight = (launch.NUM_STAGES - 1) * tile // threads
    for spec in specializations():
        if spec.label not in SASS_REPORT:
            continue
        r = compile_one(spec, arch, sass=True)
        loops = "; ".join(
            f"{loop['range']}: " + ", ".join(f"{k} x{v}" for k, v in loop.items() if k != "range")
            for loop in r.get("loop_loads", [])
        )
        lines.append(
            f"sm_{arch} {spec.label}: regs={r.get('reg')} shared={r.get('shared')} B; tile {tile} B per "
            f"iteration, {launch.NUM_STAGES} stages: {in_flight} B in flight per thread in the dense loop; "
            f"innermost loops with global loads: {loops}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--sass", action="store_true", help="report the forward's hot-loop loads")
    parser.add_argument("--pairwise", action="store_true", help="compile a pairwise-covering subset")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastpool.aot: unset TRITON_INTERPRET to compile for GPUs", file=sys.stderr)
        return 2
    if args.sass:
        for arch in args.arch:
            print("\n".join(sass_report(arch)))
        return 0
    results = compile_all(args.arch, args.workers, args.pairwise)
    bad = [r for r in results if "error" in r or r["local"] or r["spill_ops"]]
    for r in results:
        status = r.get("error") or (
            f"regs={r['reg']} stack={r['stack']} local={r['local']} spill_ops={r['spill_ops']} "
            f"v_loads={r['vector_loads']} shared={r['shared']}"
        )
        print(f"sm_{r['arch']} {r['label']}: {status}")
    print(f"{len(results) - len(bad)} compiled without spills, {len(bad)} failed")
    return 1 if bad else 0


# --- Attention pooling and global pooling ---------------------------------------------------------
# Their specializations come from their own launchers (fastpool/attention_launchers.py,
# fastpool/global_pool_launchers.py) and are appended to the pooling kernels' ones by rebinding
# ``specializations`` and ``_kernel`` below, so the pooling part above stays untouched.
# MASK_BITS is a constexpr of the attention kernels: (mask pointer type, MASK_BITS value).
ATTENTION_MASKS = {
    "none": (None, -1), "i8": ("*i8", -1), "i64": ("*i64", -1), "f32": ("*i32", 2**31 - 1),
}  # fmt: skip
GLOBAL_MODE_SETS = ((True, False), (False, True), (True, True))


def _extension_kernel(name: str):
    from .kernels import attention_pool, global_pool

    return {
        "attention_pool_forward_kernel": attention_pool.attention_pool_forward_kernel,
        "attention_pool_backward_kernel": attention_pool.attention_pool_backward_kernel,
        "global_pool_forward_kernel": global_pool.global_pool_forward_kernel,
        "global_pool_combine_kernel": global_pool.global_pool_combine_kernel,
        "global_pool_backward_kernel": global_pool.global_pool_backward_kernel,
    }[name]


def attention_specializations() -> list[Specialization]:
    """Attention pooling forward and backward: every dtype with and without a byte mask (contiguous,
    the launcher's head block for d/H >= 512 bytes); sampled: strided layouts, wider and float masks,
    float32 scores with bf16 hidden, a narrow head (d/H = 8), one head with (B, T) scores."""
    from . import attention_launchers

    cases = [
        (dtype, mask, "contiguous", dtype, 1024, 4) for dtype in HIDDEN_DTYPES for mask in ("none", "i8")
    ]
    cases += [("bf16", "i8", "strided", "bf16", 1024, 4), ("fp64", "i8", "strided", "fp64", 1024, 4)]
    cases += [("fp32", "i64", "contiguous", "fp32", 1024, 4), ("fp32", "f32", "contiguous", "fp32", 1024, 4)]
    cases += [("bf16", "i8", "contiguous", "fp32", 1024, 4), ("bf16", "i8", "contiguous", "bf16", 8, 4)]
    cases += [("bf16", "none", "contiguous", "bf16", 1024, 1)]
    # Packed batches (no mask; offsets int32 or int64).
    cases += [
        ("bf16", "packed-i32", "contiguous", "bf16", 1024, 4),
        ("fp32", "packed-i64", "contiguous", "fp32", 1024, 1),
    ]
    specs = []
    for dtype, mask, layout, score_dtype, dh, heads in cases:
        packed = mask.startswith("packed")
        offsets_ty = "*" + mask.removeprefix("packed-") if packed else None
        mask = "none" if packed else mask
        acc = _acc(dtype)
        block_t, block_d = attention_launchers.block_sizes(dh, HIDDEN_DTYPES[dtype])
        mask_ty, bits = ATTENTION_MASKS[mask]
        contiguous = layout == "contiguous"
        fixed = {"stride_hd": 1, "stride_sh": 1} if contiguous else {}
        if contiguous and heads == 1:
            fixed["stride_st"] = 1
        if contiguous and mask != "none":
            fixed["stride_mt"] = 1
        div = ("DH", "stride_hb", "stride_ht") if contiguous else ()
        common = {
            "hidden_ptr": f"*{dtype}", "scores_ptr": f"*{score_dtype}",
            "mask_ptr": mask_ty or f"*{score_dtype}", "out_ptr": f"*{dtype}", "max_ptr": f"*{acc}",
            "sum_ptr": f"*{acc}", "cu_seqlens_ptr": offsets_ty or f"*{acc}",
        }  # fmt: skip
        constexprs = {
            "ACC_DTYPE": acc, "MASK_BITS": bits, "HAS_MASK": mask != "none", "PACKED": packed,
            "BLOCK_T": block_t, "BLOCK_D": block_d, **fixed,
        }  # fmt: skip
        if packed:
            div = ("DH", "stride_hb", "stride_ht", "stride_sb")  # the row strides are 0
            constexprs.pop("stride_st", None)
        what = f"{dtype} scores={score_dtype} mask={mask} dh={dh} heads={heads} {layout}"
        what += f" packed offsets={offsets_ty[1:]}" if packed else ""
        specs.append(
            Specialization(
                "attention_pool_forward_kernel", f"attention-fwd {what}", common, constexprs, div,
                attention_launchers.NUM_WARPS,
            )
        )  # fmt: skip
        bwd_types = {
            **common, "grad_out_ptr": f"*{dtype}", "grad_hidden_ptr": f"*{dtype}",
            "grad_scores_ptr": f"*{score_dtype}",
        }  # fmt: skip
        bwd_constexprs = {**constexprs, "stride_gd": 1, "stride_od": 1}
        specs.append(
            Specialization(
                "attention_pool_backward_kernel", f"attention-bwd {what}", bwd_types, bwd_constexprs,
                div + ("stride_gb", "stride_ob", "n_tblocks") if contiguous else (),
                attention_launchers.NUM_WARPS,
            )
        )  # fmt: skip
    return specs


def global_pool_specializations() -> list[Specialization]:
    """Global pooling. Forward: every dtype x mode set x orientation (contiguous NCHW: S has unit
    stride; channels_last: C has) with the launcher's full tile and a single chunk (n_chunks == 1,
    a constexpr at run time); sampled: the chunked launch (partials), a short extent (7 x 7, no
    alignment), non-mergeable spatial dims (NDIM 2 and 3), 1 x 1 maps (S == 1). The combine for
    every dtype; the backward for every dtype and orientation (mean+max) and sampled mode sets."""
    from . import global_pool_launchers as gl

    specs = []
    # (dtype, orientation, (mean, max), S, NDIM, split): orientation "nchw", "nhwc" or "strided".
    cases = [
        (dtype, orient, modes, 56 * 56, 1, False)
        for dtype in HIDDEN_DTYPES
        for orient in ("nchw", "nhwc")
        for modes in GLOBAL_MODE_SETS
    ]
    cases += [(dtype, "nhwc", (True, True), 56 * 56, 1, True) for dtype in HIDDEN_DTYPES]
    cases += [("bf16", "nchw", (True, True), 49, 1, False), ("fp32", "nchw", (True, True), 49, 1, False)]
    cases += [
        ("bf16", "strided", (True, True), 56 * 56, 2, False),
        ("fp32", "strided", (True, True), 56 * 56, 3, True),
    ]
    cases += [("fp32", "nhwc", (True, True), 1, 1, False)]  # 1 x 1 maps: C is the unit-stride axis

    def layout_args(orient: str, S: int, ndim: int) -> tuple[dict, tuple]:
        fixed: dict = {"NDIM": ndim}
        if ndim == 1:
            fixed.update(S2=1, S3=1)
        if orient == "nchw" and S > 1:
            fixed["stride_s1"] = 1
        if orient == "nhwc":
            fixed["stride_xc"] = 1
        if S == 1:
            fixed["S"] = 1
        aligned = orient != "strided" and S % 16 == 0
        div = ("stride_xb", "stride_s1" if orient == "nhwc" else "stride_xc") if aligned else ()
        # C = 2048 and chunk lengths are multiples of 16 (Triton marks such integers at launch).
        return fixed, div + ("C", "chunk_len") + (("stride_s2", "stride_s3") if ndim == 1 else ())

    for dtype, orient, (do_mean, do_max), S, ndim, split in cases:
        size, acc = HIDDEN_DTYPES[dtype], _acc(dtype)
        cfg = gl.config(2048, S, size, orient == "nchw", do_max)
        fixed, div = layout_args(orient, S, ndim)
        if not split:
            fixed["n_chunks"] = 1
        types = {
            "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "argmax_ptr": "*i32", "part_sum_ptr": f"*{acc}",
            "part_max_ptr": f"*{acc}", "part_pos_ptr": "*i32",
        }  # fmt: skip
        constexprs = {
            "DO_MEAN": do_mean, "DO_MAX": do_max, "ACC_DTYPE": acc, "BLOCK_C": cfg.block_c,
            "BLOCK_S": cfg.block_s, **fixed,
        }  # fmt: skip
        label = (
            f"global-fwd {dtype} mean={int(do_mean)} max={int(do_max)} {orient} S={S} ndim={ndim} "
            f"split={int(split)} block={cfg.block_c}x{cfg.block_s}"
        )
        specs.append(
            Specialization("global_pool_forward_kernel", label, types, constexprs, div, gl.NUM_WARPS)
        )
    for dtype in HIDDEN_DTYPES:
        acc = _acc(dtype)
        for do_mean, do_max in GLOBAL_MODE_SETS if dtype == "fp32" else ((True, True),):
            types = {
                "out_ptr": f"*{dtype}", "argmax_ptr": "*i32", "part_sum_ptr": f"*{acc}",
                "part_max_ptr": f"*{acc}", "part_pos_ptr": "*i32",
            }  # fmt: skip
            constexprs = {
                "DO_MEAN": do_mean,
                "DO_MAX": do_max,
                "ACC_DTYPE": acc,
                "BLOCK_C": gl.COMBINE_BLOCK_C,
            }
            label = f"global-combine {dtype} mean={int(do_mean)} max={int(do_max)}"
            specs.append(
                Specialization("global_pool_combine_kernel", label, types, constexprs, (), gl.NUM_WARPS)
            )
    bwd_cases = [(dtype, orient, (True, True), 1) for dtype in HIDDEN_DTYPES for orient in ("nchw", "nhwc")]
    bwd_cases += [("bf16", "nchw", (True, False), 1), ("bf16", "nchw", (False, True), 1)]
    bwd_cases += [("fp32", "strided", (True, True), 3)]
    for dtype, orient, (do_mean, do_max), ndim in bwd_cases:
        size, acc = HIDDEN_DTYPES[dtype], _acc(dtype)
        cfg = gl.config(2048, 56 * 56, size, orient == "nchw", False)
        fixed, div = layout_args(orient, 56 * 56, ndim)
        fixed = {("stride_gc" if k == "stride_xc" else k): v for k, v in fixed.items()}
        div = tuple({"stride_xb": "stride_gb", "stride_xc": "stride_gc"}.get(n, n) for n in div)
        types = {"grad_out_ptr": f"*{dtype}", "argmax_ptr": "*i32", "grad_ptr": f"*{dtype}"}
        constexprs = {
            "DO_MEAN": do_mean, "DO_MAX": do_max, "ACC_DTYPE": acc, "BLOCK_C": cfg.block_c,
            "BLOCK_S": cfg.block_s, "stride_goc": 1, **fixed,
        }  # fmt: skip
        label = (
            f"global-bwd {dtype} mean={int(do_mean)} max={int(do_max)} {orient} ndim={ndim} "
            f"block={cfg.block_c}x{cfg.block_s}"
        )
        specs.append(
            Specialization("global_pool_backward_kernel", label, types, constexprs, div, gl.NUM_WARPS)
        )
    return specs


_pooling_kernel = _kernel
_pooling_specializations = specializations


def _kernel(name: str):  # noqa: F811 - extends the table above
    return _extension_kernel(name) if name.startswith(("attention_", "global_")) else _pooling_kernel(name)


def specializations() -> list[Specialization]:  # noqa: F811 - extends the list above
    """Every specialization: the pooling kernels' (above), attention pooling's and global pooling's."""
    return _pooling_specializations() + attention_specializations() + global_pool_specializations()


if __name__ == "__main__":
    sys.exit(main())
