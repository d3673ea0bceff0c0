"""Ahead-of-time compilation of the kernel specializations the launchers choose.

Compiles for real NVIDIA targets without a GPU (``triton.compile`` + ``GPUTarget``), then reads
registers, stack and local memory from the cubin with the ``cuobjdump`` that ships with Triton.
A specialization is one kernel with one set of constexprs and argument types: hidden dtype, mask
integer width, the MASK_BITS argument type, the mode flags, user weights, padded or packed, and
the block sizes from ``fastpool.launchers`` (fixed per dtype). Each is compiled in two layouts:
"contiguous" (unit feature stride and 16-divisible row strides, what Triton specializes for
ordinary tensors) and "strided" (no stride assumptions).

Every constexpr path of every kernel is compiled for every hidden dtype. Arguments that change a
single load are sampled rather than crossed with everything: the wider mask widths (int16/32/64,
float64 bits) with two mode mixes, the strided layout (bf16, fp32, fp64) with every mix without a
mask and three with the byte mask, user weights in hidden's dtype, the packed combine for the
mixes whose fold differs.

Run ``python -m fastpool.aot --arch 80 90`` (must not run under ``TRITON_INTERPRET=1``).
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

from . import launchers

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
# (DO_MEAN, DO_MAX, DO_WEIGHTED) of kernels with a loop over T; weighted implies mean (the launcher
# keeps the plain sum for the T-split fold).
LOOP_VARIANTS = (
    (True, False, False), (False, True, False), (True, True, False), (True, False, True), (True, True, True),
)  # fmt: skip
# (DO_MEAN, DO_MAX) of weighted_mean with user weights (HAS_WEIGHTS), which needs no plain sum. User
# weights are compiled in hidden's dtype and with the mask kinds of STRIDED_MASK_KINDS: the mask
# width and the weights' dtype only change one load each.
USER_WEIGHT_VARIANTS = ((False, False), (True, False), (False, True), (True, True))
# Pointer arguments of the packed work list, passed as placeholders to padded launches.
UNUSED_WORK_LIST = {"cu_seqlens_ptr": "*i32", "chunk_seg_ptr": "*i32", "chunk_start_ptr": "*i32"}


@dataclass(frozen=True)
class Specialization:
    """One compile job: kernel name, argument types, constexpr values, num_warps, divisible args."""

    kernel: str
    label: str
    types: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    divisible: tuple = ()
    num_warps: int = launchers.NUM_WARPS


def _kernel(name: str):
    from .kernels import pool_backward, pool_forward

    return {
        "pool_forward_kernel": pool_forward.pool_forward_kernel,
        "pool_combine_kernel": pool_forward.pool_combine_kernel,
        "pool_backward_kernel": pool_backward.pool_backward_kernel,
        "packed_backward_kernel": pool_backward.packed_backward_kernel,
    }[name]


def _acc(dtype: str) -> str:
    return "fp64" if dtype == "fp64" else "fp32"


def specializations() -> list[Specialization]:
    """Every (kernel, dtype, mask kind, modes, layout) the launchers can launch (T-splits are runtime)."""
    specs: list[Specialization] = []
    for dtype, size in HIDDEN_DTYPES.items():
        acc = _acc(dtype)
        block_d = launchers.feature_block(size)
        for layout in LAYOUTS:
            contiguous = layout == "contiguous"
            if not contiguous and dtype == "fp16":
                continue  # bf16 covers the strided addressing of 2-byte elements, same block sizes
            fixed_h = {"stride_hd": 1} if contiguous else {}
            div_h = ("d", "stride_hb", "stride_ht", "stride_ob") if contiguous else ()
            for mask_name, (mask_ty, bits_ty) in MASK_KINDS.items():
                if not contiguous and mask_name not in STRIDED_MASK_KINDS:
                    continue
                has_mask = mask_name != "none"
                fixed_m = {"stride_mt": 1} if (contiguous and has_mask) else {}
                variants = [(*v, False) for v in LOOP_VARIANTS + ((False, False, False),)]
                if mask_name in STRIDED_MASK_KINDS:
                    variants += [(m, x, True, True) for m, x in USER_WEIGHT_VARIANTS]
                else:
                    # Wider masks change one load: compiled for the lightest and the heaviest mix.
                    variants = [(True, False, False, False), (True, True, True, False)]
                if not contiguous and has_mask:  # the mode mixes are covered without a mask
                    variants = [
                        (True, False, False, False),
                        (True, True, True, False),
                        (False, False, True, True),
                    ]
                for do_mean, do_max, do_weighted, has_weights in variants:
                    weights_ty = f"*{dtype}" if has_weights else f"*{acc}"
                    types = {
                        "hidden_ptr": f"*{dtype}", "mask_ptr": mask_ty, "out_ptr": f"*{dtype}",
                        "argmax_ptr": "*i32", "stats_ptr": "*i32", "part_sum_ptr": f"*{acc}",
                        "part_max_ptr": f"*{acc}", "part_pos_ptr": "*i32", "part_stats_ptr": "*i32",
                        "part_wsum_ptr": f"*{acc}", "weights_ptr": weights_ty, "wsum_ptr": f"*{acc}",
                        **UNUSED_WORK_LIST, "MASK_BITS": bits_ty,
                    }  # fmt: skip
                    constexprs = {
                        "HAS_MASK": has_mask, "DO_MEAN": do_mean, "DO_MAX": do_max,
                        "DO_WEIGHTED": do_weighted, "HAS_WEIGHTS": has_weights, "PACKED": False,
                        "ACC_DTYPE": acc, "BLOCK_T": launchers.token_block(size, do_max or do_weighted),
                        "BLOCK_D": block_d, "SCAN_BLOCK": launchers.SCAN_BLOCK, **fixed_h, **fixed_m,
                    }  # fmt: skip
                    label = (
                        f"fwd {dtype} mask={mask_name} mean={int(do_mean)} max={int(do_max)} "
                        f"weighted={int(do_weighted)} user_weights={int(has_weights)} {layout}"
                    )
                    specs.append(Specialization("pool_forward_kernel", label, types, constexprs, div_h))
                for has_weights in (False, True) if mask_name in STRIDED_MASK_KINDS else (False,):
                    types = {
                        "grad_out_ptr": f"*{dtype}", "mask_ptr": mask_ty, "argmax_ptr": "*i32",
                        "stats_ptr": "*i32", "ranks_ptr": "*i32",
                        "weights_ptr": f"*{dtype}" if has_weights else f"*{acc}", "wsum_ptr": f"*{acc}",
                        "grad_ptr": f"*{dtype}", "MASK_BITS": bits_ty,
                    }  # fmt: skip
                    constexprs = {
                        "HAS_MASK": has_mask, "HAS_WEIGHTS": has_weights, "ACC_DTYPE": acc,
                        "BLOCK_T": launchers.token_block(size), "BLOCK_D": block_d,
                        **({"stride_god": 1, "stride_gd": 1} if contiguous else {}), **fixed_m,
                    }  # fmt: skip
                    div_g = ("d", "stride_gob", "stride_gb", "stride_gt") if contiguous else ()
                    label = f"bwd {dtype} mask={mask_name} user_weights={int(has_weights)} {layout}"
                    specs.append(Specialization("pool_backward_kernel", label, types, constexprs, div_g))
            combine_variants = [(*v, False) for v in LOOP_VARIANTS]
            combine_variants += [(m, x, True, True) for m, x in USER_WEIGHT_VARIANTS]
            if not contiguous:  # only the first/last-token gather addresses hidden
                combine_variants = [(True, True, True, False), (False, True, True, True)]
            for do_mean, do_max, do_weighted, has_weights in combine_variants:
                types = {
                    "hidden_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "argmax_ptr": "*i32",
                    "stats_ptr": "*i32", "part_sum_ptr": f"*{acc}", "part_max_ptr": f"*{acc}",
                    "part_pos_ptr": "*i32", "part_stats_ptr": "*i32", "part_wsum_ptr": f"*{acc}",
                    "wsum_ptr": f"*{acc}", "chunk_start_ptr": "*i32",
                }  # fmt: skip
                constexprs = {
                    "DO_MEAN": do_mean, "DO_MAX": do_max, "DO_WEIGHTED": do_weighted,
                    "HAS_WEIGHTS": has_weights, "PACKED": False, "ACC_DTYPE": acc, "BLOCK_D": block_d,
                    **fixed_h,
                }  # fmt: skip
                flags = f"mean={int(do_mean)} max={int(do_max)} weighted={int(do_weighted)}"
                label = f"combine {dtype} {flags} user_weights={int(has_weights)} {layout}"
                specs.append(Specialization("pool_combine_kernel", label, types, constexprs, div_h))
            specs += _packed_specializations(dtype, size, layout)
        specs += _normalized_row_specializations(dtype, size)
    return specs


def _normalized_row_specializations(dtype: str, size: int) -> list[Specialization]:
    """The widened feature blocks of the fused L2 normalisation (one program per output row, up to
    MAX_NORMALIZED_ROW_BYTES), contiguous, for the lightest and the heaviest mode mix."""
    acc = _acc(dtype)
    specs = []
    block_d = launchers.feature_block(size) * 2
    while size < 8 and block_d * size <= launchers.MAX_NORMALIZED_ROW_BYTES:
        for mask_name, do_max in (("none", False), ("i8", True)):
            mask_ty, bits_ty = MASK_KINDS[mask_name]
            config = launchers.forward_config(1, 1, block_d, size, True, do_max, 132, block_d)
            types = {
                "hidden_ptr": f"*{dtype}", "mask_ptr": mask_ty, "out_ptr": f"*{dtype}", "argmax_ptr": "*i32",
                "stats_ptr": "*i32", "part_sum_ptr": f"*{acc}", "part_max_ptr": f"*{acc}",
                "part_pos_ptr": "*i32", "part_stats_ptr": "*i32", "part_wsum_ptr": f"*{acc}",
                "weights_ptr": f"*{acc}", "wsum_ptr": f"*{acc}", "norm_ptr": f"*{acc}", **UNUSED_WORK_LIST,
                "normalize_eps": "fp32", "MASK_BITS": bits_ty,
            }  # fmt: skip
            constexprs = {
                "HAS_MASK": mask_name != "none", "DO_MEAN": True, "DO_MAX": do_max, "DO_WEIGHTED": do_max,
                "HAS_WEIGHTS": False, "PACKED": False, "ACC_DTYPE": acc, "BLOCK_T": config.block_t,
                "BLOCK_D": block_d, "SCAN_BLOCK": launchers.SCAN_BLOCK, "stride_hd": 1,
                **({"stride_mt": 1} if mask_name != "none" else {}),
            }  # fmt: skip
            div = ("d", "stride_hb", "stride_ht", "stride_ob")
            label = f"fwd-normalized {dtype} block_d={block_d} mask={mask_name} max={int(do_max)} contiguous"
            specs.append(
                Specialization(
                    "pool_forward_kernel", label, types, constexprs, div, num_warps=config.num_warps
                )
            )
        types = {
            "hidden_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "argmax_ptr": "*i32", "stats_ptr": "*i32",
            "part_sum_ptr": f"*{acc}", "part_max_ptr": f"*{acc}", "part_pos_ptr": "*i32",
            "part_stats_ptr": "*i32", "part_wsum_ptr": f"*{acc}", "wsum_ptr": f"*{acc}",
            "chunk_start_ptr": "*i32", "norm_ptr": f"*{acc}", "normalize_eps": "fp32",
        }  # fmt: skip
        constexprs = {
            "DO_MEAN": True, "DO_MAX": True, "DO_WEIGHTED": True, "HAS_WEIGHTS": False, "PACKED": False,
            "ACC_DTYPE": acc, "BLOCK_D": block_d, "stride_hd": 1,
        }  # fmt: skip
        label = f"combine-normalized {dtype} block_d={block_d} contiguous"
        warps = launchers.forward_warps(block_d, size)
        specs.append(
            Specialization(
                "pool_combine_kernel", label, types, constexprs, ("d", "stride_ob"), num_warps=warps
            )
        )
        block_d *= 2
    return specs


def _packed_specializations(dtype: str, size: int, layout: str) -> list[Specialization]:
    """The packed launches (no mask; offsets int32 or int64). The strided layout only changes
    hidden's addressing: it is compiled for a few mode mixes, the combine only contiguous."""
    acc = _acc(dtype)
    block_d = launchers.feature_block(size)
    contiguous = layout == "contiguous"
    fixed_h = {"stride_hd": 1} if contiguous else {}
    div_h = ("d", "stride_hb", "stride_ht", "stride_ob") if contiguous else ()  # stride_hb is 0
    loops = [(*v, False) for v in LOOP_VARIANTS] + [(m, x, True, True) for m, x in USER_WEIGHT_VARIANTS]
    if not contiguous:
        loops = [(True, False, False, False), (False, True, False, False), (True, True, True, True)]
    specs = []
    for i, (do_mean, do_max, do_weighted, has_weights) in enumerate(loops):
        offsets_ty = "*i64" if i % 2 else "*i32"
        types = {
            "hidden_ptr": f"*{dtype}", "mask_ptr": "*i32", "out_ptr": f"*{dtype}", "argmax_ptr": "*i32",
            "stats_ptr": "*i32", "part_sum_ptr": f"*{acc}", "part_max_ptr": f"*{acc}",
            "part_pos_ptr": "*i32", "part_stats_ptr": "*i32", "part_wsum_ptr": f"*{acc}",
            "weights_ptr": f"*{dtype}" if has_weights else f"*{acc}", "wsum_ptr": f"*{acc}",
            "cu_seqlens_ptr": offsets_ty, "chunk_seg_ptr": "*i32", "chunk_start_ptr": "*i32",
        }  # fmt: skip
        constexprs = {
            "HAS_MASK": False, "DO_MEAN": do_mean, "DO_MAX": do_max, "DO_WEIGHTED": do_weighted,
            "HAS_WEIGHTS": has_weights, "PACKED": True, "ACC_DTYPE": acc,
            "BLOCK_T": launchers.token_block(size, do_max or do_weighted), "BLOCK_D": block_d,
            "SCAN_BLOCK": launchers.SCAN_BLOCK, **fixed_h,
        }  # fmt: skip
        flags = f"mean={int(do_mean)} max={int(do_max)} weighted={int(do_weighted)}"
        label = (
            f"packed-fwd {dtype} offsets={offsets_ty[1:]} {flags} user_weights={int(has_weights)} {layout}"
        )
        specs.append(Specialization("pool_forward_kernel", label, types, constexprs, div_h))
        if contiguous and (do_max or has_weights):  # the fold itself is the padded one's
            types = {
                "hidden_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "argmax_ptr": "*i32", "stats_ptr": "*i32",
                "part_sum_ptr": f"*{acc}", "part_max_ptr": f"*{acc}", "part_pos_ptr": "*i32",
                "part_stats_ptr": "*i32", "part_wsum_ptr": f"*{acc}", "wsum_ptr": f"*{acc}",
                "chunk_start_ptr": "*i32",
            }  # fmt: skip
            constexprs = {
                "DO_MEAN": do_mean, "DO_MAX": do_max, "DO_WEIGHTED": do_weighted,
                "HAS_WEIGHTS": has_weights, "PACKED": True, "ACC_DTYPE": acc, "BLOCK_D": block_d,
                **fixed_h,
            }  # fmt: skip
            label = f"packed-combine {dtype} {flags} user_weights={int(has_weights)} {layout}"
            specs.append(Specialization("pool_combine_kernel", label, types, constexprs, div_h))
    for has_weights in (False, True):
        offsets_ty = "*i64" if has_weights else "*i32"
        types = {
            "grad_out_ptr": f"*{dtype}", "cu_seqlens_ptr": offsets_ty, "chunk_seg_ptr": "*i32",
            "chunk_start_ptr": "*i32", "argmax_ptr": "*i32", "stats_ptr": "*i32",
            "weights_ptr": f"*{dtype}" if has_weights else f"*{acc}", "wsum_ptr": f"*{acc}",
            "grad_ptr": f"*{dtype}",
        }  # fmt: skip
        constexprs = {
            "HAS_WEIGHTS": has_weights, "ACC_DTYPE": acc, "BLOCK_T": launchers.token_block(size),
            "BLOCK_D": block_d, **({"stride_god": 1, "stride_gd": 1} if contiguous else {}),
        }  # fmt: skip
        div_g = ("d", "stride_gob", "stride_gt") if contiguous else ()
        label = f"packed-bwd {dtype} offsets={offsets_ty[1:]} user_weights={int(has_weights)} {layout}"
        specs.append(Specialization("packed_backward_kernel", label, types, constexprs, div_g))
    return specs


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def compile_one(spec: Specialization, arch: int) -> dict:
    """Compile ``spec`` for sm_<arch>; returns registers, stack and local bytes (or the error)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(spec.kernel)
    names = fn.arg_names
    signature, constexprs = {}, {}
    # Arguments every forward launch passes the same way: the norms output (a placeholder of the
    # accumulation dtype when not normalising) and the float normalisation floor.
    defaults = {"norm_ptr": "*" + spec.constexprs.get("ACC_DTYPE", "fp32"), "normalize_eps": "fp32"}
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
            signature[name] = defaults.get(name, "i32")
    pointer_args = [n for n in names if signature[n].startswith("*")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*pointer_args, *spec.divisible)}
    result = {"label": spec.label, "arch": arch}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps}
        )
    except Exception as exc:  # noqa: BLE001 - reported per specialization
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return result
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        )
    for key in ("REG", "STACK", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", usage.stdout)
        result[key.lower()] = int(match.group(1)) if match else -1
    result["vector_loads"] = compiled.asm["ptx"].count("ld.global.v")
    return result


def _compile_packed(job):
    return compile_one(*job)


def compile_all(archs: list[int], workers: int | None = None) -> list[dict]:
    """Compile every specialization for every arch in a process pool; one result dict each."""
    jobs = [(spec, arch) for arch in archs for spec in specializations()]
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_packed, jobs, chunksize=4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastpool.aot: unset TRITON_INTERPRET to compile for GPUs", file=sys.stderr)
        return 2
    results = compile_all(args.arch, args.workers)
    bad = [r for r in results if "error" in r or r["stack"] or r["local"]]
    for r in results:
        status = (
            r.get("error")
            or f"regs={r['reg']} stack={r['stack']} local={r['local']} v_loads={r['vector_loads']}"
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
