"""Benchmark grids (presets) and deterministic inputs: hidden states, padding masks, packed batches.

A preset is a list of blocks; each block is a small cartesian product (shapes x dtypes x paddings x
layouts x ops x passes) with one purpose (serving shapes, long context, padding sweep, ...), so the
grid stays readable and each block can be pruned on its own. A PackedBlock is the same for packed
(variable-length) input: S sequences back to back in hidden (N, d) with cu_seqlens offsets, their
lengths drawn from a seeded distribution (PackedShape).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import torch

OPS: dict[str, tuple[str, ...]] = {
    "mean": ("mean",),
    "max": ("max",),
    "cls": ("cls",),
    "last": ("last",),
    "mean+max": ("mean", "max"),
}
ALL_OPS = tuple(OPS)
# Packed (cu_seqlens) ops: their own names, so a row never mixes with a padded op of the same mode.
PACKED_OPS: dict[str, tuple[str, ...]] = {"packed_mean": ("mean",), "packed_max": ("max",)}
ALL_PACKED_OPS = tuple(PACKED_OPS)
# The modes of every op, padded or packed (what the checks and byte counts need).
MODES_OF: dict[str, tuple[str, ...]] = {**OPS, **PACKED_OPS}
PASSES = ("fwd", "fwd+bwd", "bwd")
LAYOUTS = ("right", "left", "holes")
PADDINGS = (0.0, 0.25, 0.5, 0.75)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

Shape = tuple[int, int, int]
LENGTH_DISTS = ("uniform", "skewed")


@dataclass(frozen=True)
class PackedShape:
    """S sequences packed back to back into hidden (N, d); N follows from the seeded lengths.

    uniform: every length uniform in [L // 2, L] (a batch of similar lengths). skewed: ``n_long``
    sequences of exactly L, at seeded positions, among S - n_long lengths uniform in ``short``
    (a few very long documents among many short ones: the load-balancing case, where one program
    per sequence would leave most of the GPU idle while the long ones finish).
    """

    dist: str
    S: int
    L: int
    d: int
    n_long: int = 0
    short: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.dist not in LENGTH_DISTS:
            raise ValueError(f"dist: expected one of {LENGTH_DISTS}, got {self.dist!r}")
        if self.dist == "skewed" and not (0 < self.n_long <= self.S and 1 <= self.short[0] <= self.short[1]):
            raise ValueError(f"skewed: need 0 < n_long <= S and 1 <= short[0] <= short[1], got {self}")

    def lengths(self) -> torch.Tensor:
        """(S,) int64 lengths, every one >= 1, the same on every call and machine (seeded by the
        distribution only, so shapes differing in d alone hold the same sequences)."""
        gen = torch.Generator().manual_seed(
            seed_of("lengths", self.dist, self.S, self.L, self.n_long, self.short)
        )
        if self.dist == "uniform":
            return torch.randint(max(1, self.L // 2), self.L + 1, (self.S,), generator=gen)
        lo, hi = self.short
        out = torch.randint(lo, hi + 1, (self.S,), generator=gen)
        out[torch.randperm(self.S, generator=gen)[: self.n_long]] = self.L
        return out

    @property
    def N(self) -> int:
        """Total tokens (rows of hidden)."""
        return int(self.lengths().sum())

    @property
    def max_len(self) -> int:
        return int(self.lengths().max())

    @property
    def label(self) -> str:
        if self.dist == "uniform":
            return f"{self.S} seqs uniform [{max(1, self.L // 2)}, {self.L}] ({self.N} tokens) x {self.d}"
        lo, hi = self.short
        return (
            f"{self.S} seqs skewed {self.n_long} x {self.L} + {self.S - self.n_long} x [{lo}, {hi}] "
            f"({self.N} tokens) x {self.d}"
        )


def uniform(S: int, L: int, d: int) -> PackedShape:
    """S sequences of lengths uniform in [L // 2, L], width d."""
    return PackedShape("uniform", S, L, d)


def skewed(S: int, L: int, d: int, n_long: int, short: tuple[int, int] = (64, 256)) -> PackedShape:
    """n_long sequences of length L among S - n_long of lengths uniform in ``short``, width d."""
    return PackedShape("skewed", S, L, d, n_long, short)


@dataclass(frozen=True)
class PackedBatch:
    """What a packed case feeds every provider in place of the mask: the offsets as a user has them
    (int32 on the device, flash-attention's convention) and max_seqlen (a Python int)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def S(self) -> int:
        return self.cu_seqlens.shape[0] - 1


@dataclass(frozen=True)
class Case:
    """One (op, pass) on one input: the unit the suite checks and times for every provider."""

    block: str
    op: str
    pass_: str
    B: int
    T: int
    d: int
    dtype: str
    padding: float
    layout: str
    headline: bool = False
    # Packed cases: the sequences (then B = S, T = the longest length, padding 0, layout "packed").
    packed: PackedShape | None = None
    # Feature-map cases (global pooling): the spatial shape (then d = C, T = its product, padding 0,
    # layout the memory format "nchw" or "channels_last").
    spatial: tuple[int, ...] | None = None

    @property
    def input_key(self) -> tuple:
        """Cases with the same key share one (hidden, mask) allocation (attention adds scores)."""
        attention = self.op in ATTENTION_OPS
        return (
            self.B,
            self.T,
            self.d,
            self.dtype,
            self.padding,
            self.layout,
            self.packed,
            self.spatial,
            attention,
        )

    @property
    def label(self) -> str:
        if self.spatial is not None:
            shape = f"{self.B}x{self.d}x{spatial_label(self.spatial)}"
            return f"{self.op} {self.pass_} {self.dtype} {shape} {self.layout}"
        if self.packed is not None:
            return f"{self.op} {self.pass_} {self.dtype} {self.packed.label}"
        pad = f"{self.padding:.0%} {self.layout}" if self.padding else "no pad"
        return f"{self.op} {self.pass_} {self.dtype} {self.B}x{self.T}x{self.d} {pad}"


@dataclass(frozen=True)
class Block:
    """A cartesian sub-grid with one purpose. Padding 0 is measured once (layouts coincide)."""

    name: str
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    ops: tuple[str, ...]
    passes: tuple[str, ...]
    paddings: tuple[float, ...] = (0.0,)
    layouts: tuple[str, ...] = ("right",)
    headline: bool = False

    def cases(self) -> list[Case]:
        out = []
        for B, T, d in self.shapes:
            for dtype in self.dtypes:
                for padding in self.paddings:
                    layouts = self.layouts[:1] if padding == 0 else self.layouts
                    for layout in layouts:
                        for op in self.ops:
                            for pass_ in self.passes:
                                out.append(
                                    Case(self.name, op, pass_, B, T, d, dtype, padding, layout, self.headline)
                                )
        return out


@dataclass(frozen=True)
class PackedBlock:
    """Packed shapes x dtypes x ops x passes (ops from PACKED_OPS)."""

    name: str
    shapes: tuple[PackedShape, ...]
    dtypes: tuple[str, ...]
    ops: tuple[str, ...]
    passes: tuple[str, ...]
    headline: bool = False

    def cases(self) -> list[Case]:
        for op in self.ops:
            if op not in PACKED_OPS:
                raise ValueError(f"op: expected one of {ALL_PACKED_OPS} in a packed block, got {op!r}")
        return [
            Case(self.name, op, pass_, p.S, p.max_len, p.d, dtype, 0.0, "packed", self.headline, p)
            for p in self.shapes
            for dtype in self.dtypes
            for op in self.ops
            for pass_ in self.passes
        ]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    blocks: tuple[Block | PackedBlock, ...]
    providers: tuple[str, ...] = (
        "fastpool",
        "eager",
        "compile",
        "sentence-transformers",
        "index_add",
        "loop",
    )
    # CPU timing: torch.utils.benchmark's min_run_time per measurement (seconds).
    min_run_time: float = 0.2
    # CPU only: stop compiling new torch.compile graphs once this many seconds went into compiling.
    compile_budget_s: float | None = None
    # CPU only: torch.set_num_threads for the run (None: torch's choice); --threads overrides it.
    cpu_threads: int | None = None

    def cases(self) -> list[Case]:
        """Every case of every block, first occurrence kept (blocks may overlap), grouped by input."""
        seen: dict[tuple, Case] = {}
        for block in self.blocks:
            for case in block.cases():
                key = replace(case, block="", headline=False)
                if key not in seen:
                    seen[key] = case
        # Group cases sharing an input so it is allocated once, keeping first-appearance order.
        order: dict[tuple, list[Case]] = {}
        for case in seen.values():
            order.setdefault(case.input_key, []).append(case)
        return [case for group in order.values() for case in group]


def serving_shapes() -> tuple[Shape, ...]:
    """B in {1,8,64,512} x T in {128,512,2048,8192} x d in {384,768,1024,4096}, pruned to realistic sizes.

    Keeps batches of at most 2**20 tokens and inputs of at most 2**29 elements (1 GiB in bf16, so
    eager's (B, T, d) temporaries fit an 80 GB card next to the compiled variants): 55 shapes.
    """
    return tuple(
        (B, T, d)
        for B in (1, 8, 64, 512)
        for T in (128, 512, 2048, 8192)
        for d in (384, 768, 1024, 4096)
        if B * T <= 2**20 and B * T * d <= 2**29
    )


# The CPU default grid of issue 13: a serving batch and a longer one.
CPU_SHAPES: tuple[Shape, ...] = ((32, 256, 768), (8, 512, 1024))
ISSUE_SHAPE: Shape = (64, 512, 1024)  # the shape the feature request quotes, bf16
WIDE_SHAPE: Shape = (8, 2048, 4096)
LONG_SHAPES: tuple[Shape, ...] = ((1, 32768, 4096), (8, 8192, 4096), (1, 131072, 1024))

# Packed GPU shapes: 0.18M-0.79M tokens, at most 2**30 elements of hidden (2 GiB in bf16, so the
# index_add baseline's float32 copy and gradients fit an 80 GB card). The loop baseline only runs
# up to LOOP_MAX_SEQUENCES sequences (bench/providers.py), so the S = 4096 shape is without it.
PACKED_UNIFORM = uniform(1024, 512, 1024)  # ~0.39M tokens of [256, 512]
PACKED_SKEWED = skewed(1002, 8192, 1024, n_long=2)  # 2 x 8192 among 1000 x [64, 256]: ~0.18M tokens
PACKED_GPU_SHAPES: tuple[PackedShape, ...] = (
    uniform(1024, 512, 768),
    PACKED_UNIFORM,
    uniform(4096, 256, 1024),  # ~0.79M tokens of [128, 256], S above the loop's limit
    uniform(256, 1024, 4096),  # ~0.20M tokens of [512, 1024], wide
    PACKED_SKEWED,
    skewed(1002, 8192, 4096, n_long=2),  # the same lengths, wide
    skewed(2004, 32768, 1024, n_long=4),  # 4 x 32768 among 2000 x [64, 256]: ~0.45M tokens
)
PACKED_PASSES = ("fwd+bwd", "bwd")

_GPU_BLOCKS = (
    Block("issue", (ISSUE_SHAPE,), ("bfloat16",), ALL_OPS, PASSES, (0.0, 0.5), ("right",), headline=True),
    Block("serving", serving_shapes(), ("bfloat16",), ("mean",), ("fwd",)),
    Block("dtypes", (ISSUE_SHAPE, WIDE_SHAPE), ("float16", "float32"), ("mean", "max"), ("fwd", "fwd+bwd")),
    Block("long-context", LONG_SHAPES, ("bfloat16",), ("mean", "max", "mean+max"), ("fwd",)),
    Block("long-context-train", LONG_SHAPES, ("bfloat16",), ("mean",), ("fwd+bwd",)),
    Block("padding", (ISSUE_SHAPE,), ("bfloat16",), ("mean", "max", "last"), ("fwd",), PADDINGS, LAYOUTS),
    Block("padding-wide", (WIDE_SHAPE,), ("bfloat16",), ("mean",), ("fwd",), PADDINGS, LAYOUTS),
    PackedBlock("packed", PACKED_GPU_SHAPES, ("bfloat16",), ALL_PACKED_OPS, ("fwd",)),
    PackedBlock(
        "packed-train", (PACKED_UNIFORM, PACKED_SKEWED), ("bfloat16",), ALL_PACKED_OPS, PACKED_PASSES
    ),
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        "smoke test of the whole pipeline (seconds on CPU)",
        (
            Block("tiny", ((2, 16, 32),), ("float32",), ALL_OPS, ("fwd", "fwd+bwd"), headline=True),
            Block("tiny-holes", ((2, 16, 32),), ("float32",), ALL_OPS, ("fwd",), (0.5,), ("holes",)),
            PackedBlock("tiny-packed", (uniform(3, 8, 16),), ("float32",), ALL_PACKED_OPS, PASSES),
            PackedBlock(
                "tiny-packed-skewed", (skewed(5, 32, 16, 1, (2, 6)),), ("float32",), ALL_PACKED_OPS, ("fwd",)
            ),
        ),
        providers=("fastpool", "eager", "index_add", "loop"),
        min_run_time=0.005,
    ),
    "default": Preset(
        "default",
        "CPU grid (issue 13): fp32 and bf16, every op, fwd and fwd+bwd, padding and packed rows; "
        "a few minutes on 2 cores",
        (
            Block(
                "headline", CPU_SHAPES, ("float32", "bfloat16"), ALL_OPS, ("fwd", "fwd+bwd"), headline=True
            ),
            Block("padding", CPU_SHAPES[:1], ("float32", "bfloat16"), ("mean", "max"), ("fwd",), (0.5,)),
            Block(
                "left",
                CPU_SHAPES[1:],
                ("float32", "bfloat16"),
                ("mean", "max", "last"),
                ("fwd",),
                (0.25,),
                ("left",),
            ),
            # ~3k tokens each, few sequences (the loop baseline is a few ops per sequence): ~5 s in all.
            PackedBlock(
                "packed",
                (uniform(32, 128, 256),),
                ("float32", "bfloat16"),
                ALL_PACKED_OPS,
                ("fwd", "fwd+bwd"),
            ),
            # The same number of sequences at the padded grid's width and length: ~6k tokens x 768.
            PackedBlock(
                "packed-768",
                (uniform(32, 256, 768),),
                ("float32", "bfloat16"),
                ALL_PACKED_OPS,
                ("fwd", "fwd+bwd"),
            ),
            PackedBlock(
                "packed-skewed",
                (skewed(34, 1024, 256, 2, (16, 64)),),
                ("float32", "bfloat16"),
                ALL_PACKED_OPS,
                ("fwd",),
            ),
        ),  # fmt: skip
        # A cold inductor cache spends ~30 s on the first CPU graph; later graphs take a few seconds.
        compile_budget_s=240.0,
        # One thread, timed in CPU time (bench/timing.py): on a shared 2-core machine two threads time
        # the scheduler (a stalled sibling thread blocks every parallel op; bench/NOTES.md).
        cpu_threads=1,
    ),
    "gpu-quick": Preset(
        "gpu-quick",
        "headline GPU subset for a short device session: issue shape, long context, padding, packed (~2 min)",
        (
            Block(
                "issue",
                (ISSUE_SHAPE,),
                ("bfloat16",),
                ("mean", "max", "mean+max", "cls", "last"),
                ("fwd", "fwd+bwd"),
                (0.0, 0.5),
                ("right",),
                headline=True,
            ),
            Block("long-context", LONG_SHAPES[:2], ("bfloat16",), ("mean", "max"), ("fwd",)),
            Block(
                "padding-wide", (WIDE_SHAPE,), ("bfloat16",), ("mean", "max"), ("fwd",), (0.0, 0.5), LAYOUTS
            ),
            PackedBlock(
                "packed", (PACKED_UNIFORM, PACKED_SKEWED), ("bfloat16",), ALL_PACKED_OPS, ("fwd", "fwd+bwd")
            ),
        ),  # fmt: skip
        providers=("fastpool", "eager", "compile", "index_add", "loop"),
    ),
    "gpu": Preset(
        "gpu",
        "H100/H200 grid: serving, dtypes, long context, padding, packed (~4 min on an H200)",
        _GPU_BLOCKS,
    ),
    "full": Preset(
        "full",
        "gpu grid plus every op, training passes and dtypes on the serving and packed shapes",
        _GPU_BLOCKS
        + (
            Block("serving-ops", serving_shapes(), ("bfloat16",), ("max", "mean+max", "last"), ("fwd",)),
            Block("serving-train", serving_shapes(), ("bfloat16",), ("mean",), ("fwd+bwd", "bwd")),
            Block("serving-dtypes", serving_shapes(), ("float16", "float32"), ("mean",), ("fwd",)),
            Block(
                "padding-all",
                (ISSUE_SHAPE, WIDE_SHAPE),
                ("bfloat16",),
                ALL_OPS,
                ("fwd", "fwd+bwd"),
                PADDINGS,
                LAYOUTS,
            ),
            PackedBlock("packed-train-all", PACKED_GPU_SHAPES, ("bfloat16",), ALL_PACKED_OPS, PACKED_PASSES),
            PackedBlock(
                "packed-dtypes",
                (PACKED_UNIFORM, PACKED_SKEWED),
                ("float16", "float32"),
                ALL_PACKED_OPS,
                ("fwd", "fwd+bwd"),
            ),
        ),  # fmt: skip
    ),
}


def seed_of(*parts: object) -> int:
    """A stable seed from the case's parameters (Python's hash() is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def make_mask(B: int, T: int, padding: float, layout: str, seed: int) -> torch.Tensor:
    """(B, T) int64 attention mask (1 = real), on CPU, with about ``padding`` of the tokens padded.

    right/left: each row keeps a prefix/suffix whose length is jittered around (1 - padding) * T, as
    in a real batch of different lengths. holes: each token is padding with probability ``padding``.
    Every row keeps at least one real token, so the eager last-token idiom never indexes -1.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    gen = torch.Generator().manual_seed(seed)
    if layout == "holes":
        real = torch.rand(B, T, generator=gen) >= padding
        real[~real.any(1), 0] = True
    else:
        spread = min(padding, 1.0 - padding)
        frac = (1.0 - padding) + spread * (2 * torch.rand(B, generator=gen) - 1)
        lengths = (frac * T).round().clamp(1, T).long()
        real = torch.arange(T) < lengths[:, None]
        if layout == "left":
            real = real.flip(1)
    return real.to(torch.int64)


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | PackedBatch]:
    """Seeded hidden = randn (never zeros: no shortcut for any provider) and the case's mask (a
    PackedBatch of offsets for a packed case; attention and global pooling: see attention_global)."""
    if case.packed is not None:
        return make_packed_inputs(case, device)
    if case.op in ATTENTION_OPS or case.op in GLOBAL_OPS:
        import attention_global

        return attention_global.make_inputs(case, device)
    seed = seed_of(case.B, case.T, case.d, case.dtype, case.padding, case.layout)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn((case.B, case.T, case.d), generator=gen, device=device, dtype=DTYPES[case.dtype])
    mask = make_mask(case.B, case.T, case.padding, case.layout, seed).to(device)
    return hidden, mask


def make_packed_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, PackedBatch]:
    """Seeded hidden (N, d) = randn and the case's offsets: int32 cu_seqlens (S + 1,), max_seqlen."""
    p = case.packed
    if p is None:
        raise ValueError(f"{case.label}: not a packed case")
    lengths = p.lengths()
    cu = torch.zeros(p.S + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    gen = torch.Generator(device=device).manual_seed(seed_of("packed", p, case.dtype))
    hidden = torch.randn((int(cu[-1]), p.d), generator=gen, device=device, dtype=DTYPES[case.dtype])
    return hidden, PackedBatch(cu.to(device), int(lengths.max()))


# --- Attention pooling and global pooling of feature maps (inputs, checks: bench/attention_global.py) --
# "attention": hidden (B, T, d), a padding mask and one score per token (a single head);
# "global_mean" / "global_max": a (B, C, H, W) feature map in one memory format.
ATTENTION_OPS: dict[str, tuple[str, ...]] = {"attention": ("attention",)}
GLOBAL_OPS: dict[str, tuple[str, ...]] = {"global_mean": ("mean",), "global_max": ("max",)}
MEMORY_FORMATS = ("nchw", "channels_last")
MODES_OF.update({**ATTENTION_OPS, **GLOBAL_OPS})
FeatureShape = tuple[int, int, int, int]  # (B, C, H, W)


def spatial_label(spatial: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in spatial)


def input_kind(case: Case) -> str:
    """Which inputs a case feeds its providers: "padded", "packed", "attention" or "feature"."""
    if case.packed is not None:
        return "packed"
    if case.op in ATTENTION_OPS:
        return "attention"
    return "feature" if case.op in GLOBAL_OPS else "padded"


def op_family(op: str) -> str:
    """Ops that share compiled-graph budgets and README tables: "pooling", "attention" or "global"."""
    return "attention" if op in ATTENTION_OPS else "global" if op in GLOBAL_OPS else "pooling"


@dataclass(frozen=True)
class FeatureBlock:
    """Feature maps (B, C, H, W) x dtypes x memory formats x ops x passes (ops from GLOBAL_OPS)."""

    name: str
    shapes: tuple[FeatureShape, ...]
    dtypes: tuple[str, ...]
    ops: tuple[str, ...]
    passes: tuple[str, ...]
    formats: tuple[str, ...] = MEMORY_FORMATS
    headline: bool = False

    def cases(self) -> list[Case]:
        for op in self.ops:
            if op not in GLOBAL_OPS:
                raise ValueError(f"op: expected one of {tuple(GLOBAL_OPS)} in a feature block, got {op!r}")
        return [
            Case(self.name, op, pass_, B, H * W, C, dtype, 0.0, fmt, self.headline, None, (H, W))
            for B, C, H, W in self.shapes
            for dtype in self.dtypes
            for fmt in self.formats
            for op in self.ops
            for pass_ in self.passes
        ]


RESNET_HEAD: FeatureShape = (256, 2048, 7, 7)  # ResNet-50's last feature map before the classifier
SE_BLOCK: FeatureShape = (32, 256, 56, 56)  # a squeeze-and-excitation block's global pool
_EXTRA_BLOCKS: dict[str, tuple] = {
    "default": (
        Block("attention", ((32, 256, 768),), ("float32",), ("attention",), ("fwd", "fwd+bwd"), (0.5,)),
        FeatureBlock("global", ((32, 256, 14, 14),), ("float32",), tuple(GLOBAL_OPS), ("fwd", "fwd+bwd")),
    ),
    "gpu-quick": (
        Block("attention", (ISSUE_SHAPE,), ("bfloat16",), ("attention",), ("fwd", "fwd+bwd"), (0.0, 0.5)),
        FeatureBlock("global", (RESNET_HEAD,), ("bfloat16",), tuple(GLOBAL_OPS), ("fwd", "fwd+bwd")),
    ),
}
_EXTRA_BLOCKS["gpu"] = _EXTRA_BLOCKS["full"] = (
    Block("attention", (ISSUE_SHAPE,), ("bfloat16",), ("attention",), ("fwd", "fwd+bwd"), (0.0, 0.5)),
    FeatureBlock("global", (RESNET_HEAD, SE_BLOCK), ("bfloat16",), tuple(GLOBAL_OPS), ("fwd", "fwd+bwd")),
)
for _name, _blocks in _EXTRA_BLOCKS.items():
    PRESETS[_name] = replace(PRESETS[_name], blocks=PRESETS[_name].blocks + _blocks)
