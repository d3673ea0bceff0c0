"""Pooling mode names and their normalisation (the one list every layer agrees on)."""

from __future__ import annotations

from collections.abc import Sequence

#: Every mode fastpool knows, in the order the kernels handle them.
MODES: tuple[str, ...] = ("mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean")
_SINGLE = {name: (name,) for name in MODES}


def normalize_modes(mode: str | Sequence[str]) -> tuple[str, ...]:
    """Turn ``mode`` (a name or a sequence of names) into a non-empty tuple of distinct known modes.

    Raises ``TypeError`` for anything but a string or a sequence of strings, ``ValueError`` for an
    unknown name, an empty sequence or a repeated name.
    """
    if type(mode) is str:
        single = _SINGLE.get(mode)
        if single is not None:  # the common call: one known name
            return single
    names = (mode,) if isinstance(mode, str) else mode
    if not isinstance(names, Sequence) or not all(isinstance(m, str) for m in names):
        raise TypeError(
            f"mode: expected a str or a sequence of str from {MODES}, got {type(mode).__name__} {mode!r}"
        )
    if len(names) == 0:
        raise ValueError(f"mode: expected at least one of {MODES}, got an empty sequence")
    for name in names:
        if name not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"mode: expected each mode at most once, got {list(names)}")
    return tuple(names)


def mode_columns(modes: Sequence[str], d: int) -> dict[str, int]:
    """Column offset of each mode's (B, d) block in the concatenated output; -1 when absent."""
    cols = {name: -1 for name in MODES}
    for i, name in enumerate(modes):
        cols[name] = i * d
    return cols
