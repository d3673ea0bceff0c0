"""The layout of a partial pooling state (``fastpool.partial``): which parts a mode list keeps.

A state's floating-point parts live side by side in one (rows, n_slots * d) tensor in the
accumulation dtype, one (rows, d) block per slot, in the order of ``SLOTS``:

- ``sum``: the sum of the real tokens (mean, mean_sqrt_len, and rank weights: their fold needs it);
- ``weighted``: the rank-weighted sum, ranks counted from 1 at the chunk's first real token, or
  the user-weighted sum;
- ``max``: the raw maximum (-inf for a row without real token; a zero keeps its sign);
- ``first`` / ``last``: the values of the first / last real token (cls / last).
"""

from __future__ import annotations

from collections.abc import Sequence

SLOTS = ("sum", "weighted", "max", "first", "last")
# The one-shot mode whose backward spreads a slot's gradient like the slot's own derivative:
# with the row count given as 1 (and a weight total of 1), "mean" gives g to every real token,
# "weighted_mean" w_t g, "max" g at the position, "cls" / "last" g at the first / last token.
SLOT_MODE = {"sum": "mean", "weighted": "weighted_mean", "max": "max", "first": "cls", "last": "last"}


def state_slots(modes: Sequence[str], has_weights: bool) -> tuple[str, ...]:
    """The slots a state of ``modes`` keeps, in ``SLOTS`` order. The sum is kept exactly when the
    forward kernel computes it (``launch.forward_plan``'s DO_MEAN)."""
    names = set(modes)
    weighted = "weighted_mean" in names
    wanted = {
        "sum": "mean" in names or "mean_sqrt_len" in names or (weighted and not has_weights),
        "weighted": weighted,
        "max": "max" in names,
        "first": "cls" in names,
        "last": "last" in names,
    }
    return tuple(slot for slot in SLOTS if wanted[slot])


def slot_index(slots: Sequence[str], name: str) -> int:
    """Position of slot ``name`` in ``slots``, -1 when absent (the kernels' convention)."""
    return slots.index(name) if name in slots else -1
