"""The implementations compared side by side: fastpool, the eager idiom, torch.compile of it, and
sentence-transformers' Pooling module. Each maps an op name to a callable ``f(hidden, mask)``.

Packed cases (ops "packed_mean" / "packed_max", hidden (N, d)) get a PackedBatch (cu_seqlens,
max_seqlen) in place of the mask, and their own baselines: "index_add" (segment reductions with
index_add_ / scatter_reduce_) and "loop" (a Python loop over the sequences). fastpool runs both
kinds; every other provider says in ``skip(case)`` which cases it does not run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attention_global
import torch
from shapes import OPS, Case, PackedBatch, input_kind, op_family
from tqdm import tqdm

import fastpool
from fastpool.backend import resolve_backend

PoolFn = Callable[[torch.Tensor, torch.Tensor | PackedBatch], torch.Tensor]
PROVIDERS = ("fastpool", "eager", "compile", "sentence-transformers", "index_add", "loop")
# The loop baseline costs a few kernel launches per sequence: above this many sequences it is
# not run (it would take most of a GPU session's time and add nothing but a bigger number).
LOOP_MAX_SEQUENCES = 2048


# --- The eager idiom, as users write it today --------------------------------------------------
def eager_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype)
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)


def eager_max(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h.masked_fill(~mask[..., None].bool(), float("-inf")).max(1).values


def eager_cls(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Position 0: wrong under left padding (and for holes at 0); timed as written, checked apart.
    return h[:, 0]


def eager_last(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # count - 1: right only under right padding; timed as written, checked apart.
    return h[torch.arange(h.shape[0], device=h.device), mask.sum(1) - 1]


def eager_mean_max(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([eager_mean(h, mask), eager_max(h, mask)], dim=1)


EAGER: dict[str, PoolFn] = {
    "mean": eager_mean,
    "max": eager_max,
    "cls": eager_cls,
    "last": eager_last,
    "mean+max": eager_mean_max,
}


# --- Packed idioms: hidden (N, d) holding S sequences, cu_seqlens (S + 1,) offsets ---------------
# Both baselines start from cu_seqlens on every call, as fastpool does (it builds its work list from
# the offsets per call): nothing derived from the offsets is cached between timed iterations.
def segment_ids(pk: PackedBatch, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths (S,), segment id of every token (N,) int64). output_size=N: no host sync on CUDA."""
    lengths = pk.cu_seqlens.diff()
    seg = torch.repeat_interleave(
        torch.arange(pk.S, device=pk.cu_seqlens.device), lengths.long(), output_size=N
    )
    return lengths, seg


def index_add_mean(h: torch.Tensor, pk: PackedBatch) -> torch.Tensor:
    """Sum every token into its segment's row with index_add_, divide by the lengths.

    Accumulates in float32 (float64 for float64 input), as a careful user would: a bf16 / fp16
    buffer would sum thousands of tokens in 8-11 bits of mantissa. index_add_ needs source and
    buffer of one dtype, so half-precision input costs a float32 copy of hidden (N x d x 4 bytes
    written and read again); the (S, d) mean is cast back to hidden's dtype once.
    """
    lengths, seg = segment_ids(pk, h.shape[0])
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    acc = torch.zeros((pk.S, h.shape[1]), dtype=acc_dtype, device=h.device)
    acc = acc.index_add(0, seg, h.to(acc_dtype))
    return (acc / lengths.clamp(min=1)[:, None]).to(h.dtype)


def index_add_max(h: torch.Tensor, pk: PackedBatch) -> torch.Tensor:
    """scatter_reduce 'amax' with include_self=False into an (S, d) buffer in hidden's dtype (a max
    is exact in any dtype; an empty segment would keep its 0, as fastpool's). Its backward splits
    the gradient evenly among tied maxima (fastpool gives it to the first): same segment sums."""
    _, seg = segment_ids(pk, h.shape[0])
    out = torch.zeros((pk.S, h.shape[1]), dtype=h.dtype, device=h.device)
    return out.scatter_reduce(0, seg[:, None].expand(-1, h.shape[1]), h, "amax", include_self=False)


def loop_pieces(h: torch.Tensor, pk: PackedBatch) -> tuple[torch.Tensor, ...]:
    """The sequences as views, via split (the lengths go to the host: one sync on CUDA).

    split, not ``hidden[a:b]`` slices: each slice's backward materializes a zero (N, d) gradient
    and adds them all up, O(S * N * d) (3.2 s against split's 70 ms for 200 sequences of ~100 x 256
    fp32 on a 2-core CPU), which would make the baseline a strawman; split's backward is one cat.
    """
    return h.split(pk.cu_seqlens.diff().tolist())


def loop_mean(h: torch.Tensor, pk: PackedBatch) -> torch.Tensor:
    # torch's mean of bf16 / fp16 accumulates in float32 internally and returns hidden's dtype.
    return torch.stack([x.mean(0) for x in loop_pieces(h, pk)])


def loop_max(h: torch.Tensor, pk: PackedBatch) -> torch.Tensor:
    return torch.stack([x.max(0).values for x in loop_pieces(h, pk)])


INDEX_ADD: dict[str, PoolFn] = {"packed_mean": index_add_mean, "packed_max": index_add_max}
LOOP: dict[str, PoolFn] = {"packed_mean": loop_mean, "packed_max": loop_max}


class Provider:
    """One implementation. ``fn(op)`` gives the callable that is checked and timed."""

    name = ""
    passes: tuple[str, ...] = ("fwd", "fwd+bwd", "bwd")
    # An optional provider that fails (compiler error, third-party API change) is dropped with a
    # note instead of ending a long GPU run; fastpool and eager failing is a real error.
    optional = False
    # Whether small inputs may be timed as a replayed CUDA graph (False for host-syncing callables).
    cudagraph = True
    # Which inputs it takes: "padded" (hidden (B, T, d) + mask) and / or "packed" (hidden (N, d) + offsets).
    inputs: tuple[str, ...] = ("padded",)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.disabled: str | None = None

    def unavailable(self) -> str | None:
        """Why this provider cannot run (any more), or None."""
        return self.disabled

    def disable(self, reason: str) -> None:
        self.disabled = reason
        tqdm.write(f"note: skipping provider {self.name!r} from here on: {reason.splitlines()[0][:300]}")

    def first_call(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The first call on a case (the correctness check); None if an optional provider failed."""
        if not self.optional:
            return fn()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any failure only drops this optional provider
            self.disable(f"{type(exc).__name__}: {exc}")
            return None

    def skip(self, case: Case) -> str | None:
        """Why this provider does not run ``case`` (padded vs packed input, size limits), or None."""
        kind = input_kind(case)
        return None if kind in self.inputs else f"{self.name} takes no {kind} input"

    def backend(self) -> str:
        """What actually executes (recorded in every row)."""
        return "torch"

    def fn(self, op: str) -> PoolFn:
        raise NotImplementedError

    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden this provider is fed (made once per case, outside the timed region)."""
        return h

    def canonical(self, op: str, out: torch.Tensor) -> torch.Tensor:
        """The output in fastpool's layout (modes concatenated in OPS[op] order), for checking."""
        return out


class FastpoolProvider(Provider):
    """fastpool's public functions, backend auto (Triton on CUDA, eager torch elsewhere)."""

    name = "fastpool"
    inputs = ("padded", "packed", "attention", "feature")

    def backend(self) -> str:
        return resolve_backend(self.device)

    def fn(self, op: str) -> PoolFn:
        if op in attention_global.EAGER:
            return attention_global.fastpool_fn(op)
        if op in PACKED_FNS:
            # Offsets and max_seqlen, as flash-attention users have them: no host sync on CUDA.
            f = PACKED_FNS[op]
            return lambda h, pk: f(h, cu_seqlens=pk.cu_seqlens, max_seqlen=pk.max_seqlen)
        single = {
            "mean": fastpool.mean_pool,
            "max": fastpool.max_pool,
            "cls": fastpool.cls_pool,
            "last": fastpool.last_token_pool,
        }
        if op in single:
            return single[op]
        modes = list(OPS[op])
        return lambda h, m: fastpool.pool(h, m, mode=modes)


PACKED_FNS = {"packed_mean": fastpool.mean_pool, "packed_max": fastpool.max_pool}


class EagerProvider(Provider):
    name = "eager"
    inputs = ("padded", "attention", "feature")

    def fn(self, op: str) -> PoolFn:
        return attention_global.EAGER[op] if op in attention_global.EAGER else EAGER[op]


class CompileProvider(Provider):
    """torch.compile(eager idiom, dynamic=False): one static graph per shape, as in serving.

    Compiling happens on the first call (the suite's correctness check, before timing); the time it
    takes is added up, and once ``budget_s`` is spent no new graph is compiled (CPU: a cold inductor
    cache costs ~30 s for the first graph). A failure disables the provider with a printed note.
    """

    name = "compile"
    optional = True
    inputs = ("padded", "attention", "feature")

    def __init__(self, device: torch.device, budget_s: float | None = None) -> None:
        super().__init__(device)
        self.budget_s = budget_s
        self.spent_s = 0.0
        # The budget holds per op family (shapes.op_family): attention and global pooling graphs
        # get their own, so the pooling ops' cold-cache compile does not starve them.
        self.spent_by_family: dict[str, float] = {}
        self._family = "pooling"
        self._budget_noted: set[str] = set()
        self._compiled: dict[str, PoolFn] = {}
        # Every shape is a new static graph: lift the recompile limit so dynamo never silently
        # falls back to eager (which would be timed as "compile").
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 4096)
        dynamo_config.suppress_errors = False
        # The bwd pass replays one backward (retain_graph=True), which donated buffers forbid.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False

    def backend(self) -> str:
        return "inductor"

    def over_budget(self, family: str = "pooling") -> bool:
        return self.budget_s is not None and self.spent_by_family.get(family, 0.0) > self.budget_s

    def skip(self, case: Case) -> str | None:
        family = op_family(case.op)
        if self.over_budget(family):
            reason = f"compile budget of {self.budget_s:.0f} s spent on {family} graphs"
            if family not in self._budget_noted:
                self._budget_noted.add(family)
                tqdm.write(f"note: skipping provider 'compile' on {family} cases from here on: {reason}")
            return reason
        return super().skip(case)

    def fn(self, op: str) -> PoolFn:
        self._family = op_family(op)
        if op not in self._compiled:
            self._compiled[op] = torch.compile({**EAGER, **attention_global.EAGER}[op], dynamic=False)
        return self._compiled[op]

    def first_call(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        start = time.perf_counter()
        try:
            return super().first_call(fn)
        finally:
            elapsed = time.perf_counter() - start
            self.spent_s += elapsed
            self.spent_by_family[self._family] = self.spent_by_family.get(self._family, 0.0) + elapsed


class SentenceTransformersProvider(Provider):
    """sentence_transformers.models.Pooling fed {'token_embeddings', 'attention_mask'} (forward only)."""

    name = "sentence-transformers"
    passes = ("fwd",)
    optional = True
    _MODE = {"mean": "mean", "max": "max", "cls": "cls", "last": "lasttoken"}

    def unavailable(self) -> str | None:
        if self.disabled is None:
            try:
                import sentence_transformers.models  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - absent or broken install: just skip it
                self.disabled = f"sentence-transformers not importable ({type(exc).__name__})"
        return self.disabled

    def fn(self, op: str) -> PoolFn:
        from sentence_transformers.models import Pooling

        def build(d: int):
            if op == "mean+max":
                # pooling_mode order is the output order: [mean | max], as fastpool's mode=["mean", "max"].
                return Pooling(d, pooling_mode=("mean", "max"))
            return Pooling(d, pooling_mode=self._MODE[op])

        modules: dict[int, torch.nn.Module] = {}

        def run(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            d = h.shape[-1]
            if d not in modules:
                modules[d] = build(d).to(h.device)
            return modules[d]({"token_embeddings": h, "attention_mask": m})["sentence_embedding"]

        return run

    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        # Some versions fill padding with -1e9 in place: give them a copy, not the shared input.
        return h.clone()


class IndexAddProvider(Provider):
    """Packed: index_add_ (mean, float32 accumulation) / scatter_reduce amax (max); see above."""

    name = "index_add"
    inputs = ("packed",)

    def fn(self, op: str) -> PoolFn:
        return INDEX_ADD[op]


class LoopProvider(Provider):
    """Packed: a Python loop over the sequences (split + mean / max + stack), what users write today.

    Skipped above LOOP_MAX_SEQUENCES sequences; never timed as a CUDA graph (it syncs for the lengths).
    """

    name = "loop"
    inputs = ("packed",)
    cudagraph = False

    def skip(self, case: Case) -> str | None:
        if case.packed is not None and case.packed.S > LOOP_MAX_SEQUENCES:
            return f"loop runs up to {LOOP_MAX_SEQUENCES} sequences (one launch or more per sequence)"
        return super().skip(case)

    def fn(self, op: str) -> PoolFn:
        return LOOP[op]


def build_provider(name: str, device: torch.device, compile_budget_s: float | None = None) -> Provider:
    """One provider by name, whether or not it can run here (see ``Provider.unavailable``)."""
    factories: dict[str, Callable[[], Provider]] = {
        "fastpool": lambda: FastpoolProvider(device),
        "eager": lambda: EagerProvider(device),
        "compile": lambda: CompileProvider(device, compile_budget_s),
        "sentence-transformers": lambda: SentenceTransformersProvider(device),
        "index_add": lambda: IndexAddProvider(device),
        "loop": lambda: LoopProvider(device),
    }
    if name not in factories:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
    return factories[name]()


def make_providers(
    names: tuple[str, ...], device: torch.device, compile_budget_s: float | None
) -> list[Provider]:
    """The requested providers that can run here; a skipped one gets a printed note."""
    out = []
    for name in names:
        provider = build_provider(name, device, compile_budget_s)
        reason = provider.unavailable()
        if reason:
            print(f"note: skipping provider {name!r}: {reason}")
            continue
        out.append(provider)
    return out
