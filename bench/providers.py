"""The implementations compared side by side: fastpool, the eager idiom, torch.compile of it, and
sentence-transformers' Pooling module. Each maps an op name to a callable ``f(hidden, mask)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from shapes import OPS
from tqdm import tqdm

import fastpool
from fastpool.backend import resolve_backend

PoolFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PROVIDERS = ("fastpool", "eager", "compile", "sentence-transformers")


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


class Provider:
    """One implementation. ``fn(op)`` gives the callable that is checked and timed."""

    name = ""
    passes: tuple[str, ...] = ("fwd", "fwd+bwd", "bwd")
    # An optional provider that fails (compiler error, third-party API change) is dropped with a
    # note instead of ending a long GPU run; fastpool and eager failing is a real error.
    optional = False

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

    def backend(self) -> str:
        return resolve_backend(self.device)

    def fn(self, op: str) -> PoolFn:
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


class EagerProvider(Provider):
    name = "eager"

    def fn(self, op: str) -> PoolFn:
        return EAGER[op]


class CompileProvider(Provider):
    """torch.compile(eager idiom, dynamic=False): one static graph per shape, as in serving.

    Compiling happens on the first call (the suite's correctness check, before timing); the time it
    takes is added up, and once ``budget_s`` is spent no new graph is compiled (CPU: a cold inductor
    cache costs ~30 s for the first graph). A failure disables the provider with a printed note.
    """

    name = "compile"
    optional = True

    def __init__(self, device: torch.device, budget_s: float | None = None) -> None:
        super().__init__(device)
        self.budget_s = budget_s
        self.spent_s = 0.0
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

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.spent_s > self.budget_s

    def fn(self, op: str) -> PoolFn:
        if op not in self._compiled:
            self._compiled[op] = torch.compile(EAGER[op], dynamic=False)
        return self._compiled[op]

    def first_call(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        start = time.perf_counter()
        try:
            return super().first_call(fn)
        finally:
            self.spent_s += time.perf_counter() - start


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

    def canonical(self, op: str, out: torch.Tensor) -> torch.Tensor:
        # Pooling concatenates max before mean; fastpool and the eager idiom put mean first.
        if op == "mean+max":
            d = out.shape[1] // 2
            return torch.cat([out[:, d:], out[:, :d]], dim=1)
        return out


def make_providers(
    names: tuple[str, ...], device: torch.device, compile_budget_s: float | None
) -> list[Provider]:
    """The requested providers that can run here; a skipped one gets a printed note."""
    factories: dict[str, Callable[[], Provider]] = {
        "fastpool": lambda: FastpoolProvider(device),
        "eager": lambda: EagerProvider(device),
        "compile": lambda: CompileProvider(device, compile_budget_s),
        "sentence-transformers": lambda: SentenceTransformersProvider(device),
    }
    out = []
    for name in names:
        if name not in factories:
            raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
        provider = factories[name]()
        reason = provider.unavailable()
        if reason:
            print(f"note: skipping provider {name!r}: {reason}")
            continue
        out.append(provider)
    return out
