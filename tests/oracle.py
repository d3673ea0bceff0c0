"""Float64 NumPy definitions of fastpool's pooling, written as plainly as possible.

This is the independent truth every backend is checked against. It never imports fastpool.
hidden: (B, T, d) array; mask: (B, T) array or None (nonzero = real token; NaN is nonzero).
"""

from __future__ import annotations

import math

import numpy as np


def real_positions(mask: np.ndarray | None, b: int, T: int) -> list[int]:
    """Positions of the real tokens of row b, in order."""
    if mask is None:
        return list(range(T))
    return [t for t in range(T) if mask[b, t] != 0 or math.isnan(float(mask[b, t]))]


def mean(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(B, d): average of the real tokens; zeros for a row with none."""
    B, T, d = hidden.shape
    out = np.zeros((B, d), dtype=np.float64)
    for b in range(B):
        real = real_positions(mask, b, T)
        for j in range(d):
            total = 0.0
            for t in real:
                total += float(hidden[b, t, j])
            out[b, j] = total / len(real) if real else 0.0
    return out


def max_with_index(hidden: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(B, d) values and int64 positions of the max over real tokens.

    The first NaN wins if there is one; otherwise the first of equal maxima. Empty rows: 0 and -1.
    """
    B, T, d = hidden.shape
    values = np.zeros((B, d), dtype=np.float64)
    index = np.full((B, d), -1, dtype=np.int64)
    for b in range(B):
        real = real_positions(mask, b, T)
        for j in range(d):
            best, best_t = None, -1
            for t in real:
                x = float(hidden[b, t, j])
                if math.isnan(x):
                    best, best_t = x, t
                    break
                if best is None or x > best:
                    best, best_t = x, t
            if best_t >= 0:
                values[b, j], index[b, j] = best, best_t
    return values, index


def first_index(mask: np.ndarray | None, B: int, T: int) -> np.ndarray:
    """(B,) position of the first real token, -1 for an empty row."""
    out = np.full(B, -1, dtype=np.int64)
    for b in range(B):
        real = real_positions(mask, b, T)
        if real:
            out[b] = real[0]
    return out


def last_index(mask: np.ndarray | None, B: int, T: int) -> np.ndarray:
    """(B,) position of the last real token, -1 for an empty row."""
    out = np.full(B, -1, dtype=np.int64)
    for b in range(B):
        real = real_positions(mask, b, T)
        if real:
            out[b] = real[-1]
    return out


def gather(hidden: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(B, d): hidden[b, position[b]], zeros where position is -1."""
    B, _, d = hidden.shape
    out = np.zeros((B, d), dtype=np.float64)
    for b in range(B):
        if position[b] >= 0:
            out[b] = hidden[b, position[b]].astype(np.float64)
    return out


def token_weights(mask: np.ndarray | None, weights: np.ndarray | None, b: int, T: int) -> tuple[list, list]:
    """(real positions, their weights) of row b for weighted_mean: the given weights, else 1, 2, 3, ..."""
    real = real_positions(mask, b, T)
    if weights is None:
        return real, [float(k) for k in range(1, len(real) + 1)]
    return real, [float(weights[b, t]) for t in real]


def pool(
    hidden: np.ndarray, mask: np.ndarray | None, mode: str, weights: np.ndarray | None = None
) -> np.ndarray:
    """(B, d) float64 result of one mode.

    weighted_mean: sum_t w_t x_t / sum_t w_t over the real tokens, with w the given (B, T) weights
    or the rank of each real token (1, 2, ...); zeros when there is no real token or the weights
    sum to 0.
    """
    B, T, _ = hidden.shape
    if mode == "mean":
        return mean(hidden, mask)
    if mode == "mean_sqrt_len":
        counts = np.array([len(real_positions(mask, b, T)) for b in range(B)], dtype=np.float64)
        return mean(hidden, mask) * np.sqrt(counts)[:, None]
    if mode == "weighted_mean":
        out = np.zeros((B, hidden.shape[2]), dtype=np.float64)
        for b in range(B):
            real, w = token_weights(mask, weights, b, T)
            total = sum(w)
            if real and total != 0:
                for t, w_t in zip(real, w, strict=True):
                    out[b] += w_t * hidden[b, t].astype(np.float64)
                out[b] /= total
        return out
    if mode == "max":
        return max_with_index(hidden, mask)[0]
    if mode == "cls":
        return gather(hidden, first_index(mask, B, T))
    if mode == "last":
        return gather(hidden, last_index(mask, B, T))
    raise ValueError(mode)


def pool_grad(
    hidden: np.ndarray,
    mask: np.ndarray | None,
    mode: str,
    grad_out: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(B, T, d) float64 gradient of sum(pool(hidden) * grad_out) with respect to hidden."""
    B, T, d = hidden.shape
    grad = np.zeros((B, T, d), dtype=np.float64)
    if mode in ("mean", "mean_sqrt_len"):
        for b in range(B):
            real = real_positions(mask, b, T)
            for t in real:
                scale = len(real) if mode == "mean" else math.sqrt(len(real))
                grad[b, t] += grad_out[b] / scale
    elif mode == "weighted_mean":
        for b in range(B):
            real, w = token_weights(mask, weights, b, T)
            total = sum(w)
            if total != 0:
                for t, w_t in zip(real, w, strict=True):
                    grad[b, t] += grad_out[b] * w_t / total
    elif mode == "max":
        _, index = max_with_index(hidden, mask)
        for b in range(B):
            for j in range(d):
                if index[b, j] >= 0:
                    grad[b, index[b, j], j] += grad_out[b, j]
    else:
        position = first_index(mask, B, T) if mode == "cls" else last_index(mask, B, T)
        for b in range(B):
            if position[b] >= 0:
                grad[b, position[b]] += grad_out[b]
    return grad


def weights_grad(
    hidden: np.ndarray, mask: np.ndarray | None, weights: np.ndarray, grad_out: np.ndarray
) -> np.ndarray:
    """(B, T) float64 gradient of sum(weighted_mean(hidden, weights) * grad_out) with respect to weights.

    d/dw_t of sum_s w_s x_s / W is (x_t - out) / W at real tokens; 0 at padding and where W = 0.
    """
    B, T, _ = hidden.shape
    out = pool(hidden, mask, "weighted_mean", weights)
    grad = np.zeros((B, T), dtype=np.float64)
    for b in range(B):
        real, w = token_weights(mask, weights, b, T)
        total = sum(w)
        if total != 0:
            for t in real:
                grad[b, t] = float(np.dot(grad_out[b], hidden[b, t].astype(np.float64) - out[b])) / total
    return grad


def segments(cu_seqlens: np.ndarray) -> list[tuple[int, int]]:
    """[(begin, end)] of every packed sequence."""
    return [(int(cu_seqlens[s]), int(cu_seqlens[s + 1])) for s in range(len(cu_seqlens) - 1)]


def packed_pool(
    hidden: np.ndarray, cu_seqlens: np.ndarray, mode: str, weights: np.ndarray | None = None
) -> np.ndarray:
    """(S, d) float64 result of one mode over a packed batch: hidden (N, d), sequence s is
    hidden[cu[s]:cu[s + 1]], every token real; weights (N,) or None."""
    d = hidden.shape[1]
    out = np.zeros((len(cu_seqlens) - 1, d), dtype=np.float64)
    for s, (a, b) in enumerate(segments(cu_seqlens)):
        w = None if weights is None else weights[None, a:b]
        out[s] = pool(hidden[None, a:b], None, mode, w)[0]
    return out


def packed_max_index(hidden: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """(S, d) int64 global token index of each sequence's max (-1 for an empty sequence)."""
    index = np.full((len(cu_seqlens) - 1, hidden.shape[1]), -1, dtype=np.int64)
    for s, (a, b) in enumerate(segments(cu_seqlens)):
        local = max_with_index(hidden[None, a:b], None)[1][0]
        index[s] = np.where(local >= 0, local + a, -1)
    return index


def packed_pool_grad(
    hidden: np.ndarray,
    cu_seqlens: np.ndarray,
    mode: str,
    grad_out: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(N, d) float64 gradient of sum(packed_pool(hidden) * grad_out) with respect to hidden."""
    grad = np.zeros(hidden.shape, dtype=np.float64)
    for s, (a, b) in enumerate(segments(cu_seqlens)):
        w = None if weights is None else weights[None, a:b]
        grad[a:b] = pool_grad(hidden[None, a:b], None, mode, grad_out[s : s + 1], w)[0]
    return grad


def packed_weights_grad(
    hidden: np.ndarray, cu_seqlens: np.ndarray, weights: np.ndarray, grad_out: np.ndarray
) -> np.ndarray:
    """(N,) float64 gradient of packed weighted_mean with respect to the user weights."""
    grad = np.zeros(hidden.shape[0], dtype=np.float64)
    for s, (a, b) in enumerate(segments(cu_seqlens)):
        grad[a:b] = weights_grad(hidden[None, a:b], None, weights[None, a:b], grad_out[s : s + 1])[0]
    return grad


def attention(hidden: np.ndarray, scores: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(B, d): per row and head, softmax over the real tokens' scores weighs them.

    scores (B, T, H); head h pools features h*d/H:(h+1)*d/H. Real tokens with a -inf score weigh 0;
    a head with no real token of finite score gives zeros.
    """
    B, T, d = hidden.shape
    H = scores.shape[2]
    dh = d // H
    out = np.zeros((B, d), dtype=np.float64)
    for b in range(B):
        real = real_positions(mask, b, T)
        for h in range(H):
            live = [t for t in real if float(scores[b, t, h]) != -math.inf]
            if not live:
                continue
            top = max(float(scores[b, t, h]) for t in live)
            e = {t: math.exp(float(scores[b, t, h]) - top) for t in live}
            total = sum(e.values())
            for j in range(h * dh, (h + 1) * dh):
                out[b, j] = sum(e[t] / total * float(hidden[b, t, j]) for t in live if e[t] > 0)
    return out


def global_pool(x: np.ndarray, mode: str) -> np.ndarray:
    """(B, C): mean or max of a (B, C, *spatial) feature map over its spatial positions (NaN wins)."""
    B, C = x.shape[:2]
    flat = x.reshape(B, C, -1).astype(np.float64)
    out = np.zeros((B, C), dtype=np.float64)
    for b in range(B):
        for c in range(C):
            values = [float(v) for v in flat[b, c]]
            if mode == "mean":
                out[b, c] = sum(values) / len(values) if values else math.nan
            elif any(math.isnan(v) for v in values):
                out[b, c] = math.nan
            else:
                out[b, c] = max(values)
    return out


def global_pool_index(x: np.ndarray) -> np.ndarray:
    """(B, C) int64: row-major spatial index of the first maximum of each channel (the first NaN if any)."""
    B, C = x.shape[:2]
    flat = x.reshape(B, C, -1).astype(np.float64)
    index = np.zeros((B, C), dtype=np.int64)
    for b in range(B):
        for c in range(C):
            values = [float(v) for v in flat[b, c]]
            nans = [i for i, v in enumerate(values) if math.isnan(v)]
            index[b, c] = nans[0] if nans else values.index(max(values))
    return index


def global_pool_grad(x: np.ndarray, modes: list[str], grad_out: np.ndarray) -> np.ndarray:
    """Gradient of x (B, C, *spatial) from grad_out (B, len(modes) * C): the mean's g / S at every
    position, the max's g at the first maximum only."""
    B, C = x.shape[:2]
    S = int(np.prod(x.shape[2:]))
    grad = np.zeros((B, C, S), dtype=np.float64)
    for i, mode in enumerate(modes):
        g = grad_out[:, i * C : (i + 1) * C].astype(np.float64)
        if mode == "mean":
            grad += g[:, :, None] / S
        else:
            index = global_pool_index(x)
            for b in range(B):
                for c in range(C):
                    grad[b, c, index[b, c]] += g[b, c]
    return grad.reshape(x.shape)
