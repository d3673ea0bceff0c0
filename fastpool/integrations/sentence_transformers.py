"""sentence-transformers integration: ``FastPooling``, a drop-in for its ``Pooling`` module.

    from sentence_transformers import SentenceTransformer
    from fastpool.integrations.sentence_transformers import replace_pooling

    model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    replace_pooling(model)          # 1: the model's Pooling module now pools with fastpool
    model.encode(["a sentence", "another one"])
    model.save("out")               # saved as a stock Pooling: loads without fastpool

sentence-transformers is an optional dependency: ``import fastpool`` never imports it, and importing
this module without it raises an ``ImportError`` that says so. Written against the ``Pooling`` of
sentence-transformers 6.2 and 6.3 (configured by ``pooling_mode``; checked with 6.2.0 and 6.3.0,
whose ``Pooling`` is the same).

``FastPooling`` is a subclass of sentence-transformers' ``Pooling``: same constructor, same
configuration keys, same ``save`` / ``load`` / ``get_embedding_dimension``, and the library's own
``isinstance(module, Pooling)`` checks (``set_pooling_include_prompt``, ...) still find it. Only
``forward`` changes: it reads ``features["token_embeddings"]`` (B, T, d) and
``features["attention_mask"]`` (B, T) (or a packed batch, see below), honours ``include_prompt=False`` with
``features["prompt_length"]``, and writes ``features["sentence_embedding"]`` (B, n_modes * d),
computed by one ``fastpool.pool`` call with the modes concatenated in ``pooling_mode`` order. Every
other key of ``features`` is left as it is, and the caller's attention mask is never modified.

Saving. sentence-transformers records each module of a saved model in ``modules.json`` by its
class (``type(module).__module__`` and ``__name__``, which also name its folder, ``1_Pooling``).
``FastPooling`` carries ``Pooling``'s module path and name there, so a model saved after
``replace_pooling`` is written exactly as with the stock ``Pooling`` (same ``modules.json`` entry,
same folder, same ``config.json``, same model card): it loads anywhere, without fastpool and
without ``trust_remote_code``, as a stock ``Pooling``, and ``replace_pooling`` applies again after
loading. Its Python identity is unchanged (``type(m).__qualname__ == "FastPooling"``,
``isinstance(m, FastPooling)``), and pickling (``torch.save`` of a whole model, ``copy.deepcopy``,
multi-process encoding) rebuilds a ``FastPooling`` through this module.

Where sentence-transformers' output is finite and well defined the result is the same up to float
rounding. ``weightedmean`` uses sentence-transformers' weights, passed to fastpool's
``weighted_mean`` as user ``weights``: a token at position t weighs t - f + 1, f being the row's
first real position, so a mask with holes and ``include_prompt=False`` (the pooled tokens keep their
original weights, the first after the prompt weighs ``prompt_length + 1``) give sentence-transformers'
embeddings; fastpool's own ``weighted_mean`` (rank weights 1, 2, ... over the real tokens) is unchanged.
It differs where fastpool's documented semantics differ (see the fastpool README): a row with no real
token pools to zeros (sentence-transformers: ``-inf`` for max, the token at position 0 for cls),
padding that holds NaN or inf never reaches the output, and the mask is read as "nonzero = real
token" (sentence-transformers uses a non-binary mask as weights in the mean modes).

Packed (unpadded) batches
-------------------------
With flash-attention unpadding (``Transformer.unpad_inputs``; it needs a flash-attention varlen kernel,
so in practice a CUDA GPU), sentence-transformers' ``DataCollatorWithFlattening`` packs the batch into
one row: ``token_embeddings`` (1, N, d) holding the S texts back to back, no ``attention_mask``, and
``cu_seq_lens_q`` (S + 1,) int32 offsets, ``max_length_q`` (a Python int), ``seq_idx`` and
``position_ids`` (1, N). Its ``Pooling`` then pools the flat tensor (``_forward_flattened``) whenever
``cu_seq_lens_q`` is present. ``FastPooling`` does the same with one packed ``fastpool.pool`` call
(``cu_seqlens=cu_seq_lens_q``, ``max_seqlen=max_length_q`` when that is a Python int, so a CUDA batch
pools without a host-device sync), writing ``sentence_embedding`` (S, n_modes * d). The sequence
boundaries come from ``cu_seq_lens_q`` alone: ``position_ids`` is not read (it is offset for
RoBERTa-style models), nor ``seq_idx`` (sentence-transformers groups its scatter-based modes by it
when present; the collator makes it agree with the offsets). As there, ``token_weights_sum`` is
ignored and ``attention_mask``, if any, is not read.
``include_prompt=False`` is supported, as in sentence-transformers: the first ``prompt_length`` tokens
of every sequence are left out, by pooling each sequence as two segments (prompt, rest) and keeping the
second, so no token is copied; ``weightedmean`` then weighs the k-th token of a sequence k, the
prompt's tokens counted, as sentence-transformers does (user weights (N,), built from the offsets
without a host sync). The result is the same up to float rounding, except for a sequence with nothing
to pool, where fastpool gives zeros in every mode and sentence-transformers' flat path gives: for a
sequence the prompt covers, ``-inf`` for max, its first (prompt) token for cls, its last (prompt) token
for lasttoken; for an empty sequence (the collator drops empty texts, so only hand-built features have
them), ``-inf`` for max, the next sequence's first token for cls (an ``IndexError`` for the last
sequence), the previous sequence's last token for lasttoken (the batch's last token for the first one).

Inputs that fastpool does not model are pooled by sentence-transformers' own implementation,
unchanged: ``token_weights_sum`` (from ``WordWeights``) with a mean mode in a padded batch, and
``cls_token_embeddings`` with the cls mode.
"""

from __future__ import annotations

from typing import Any

import torch

import fastpool

try:
    import sentence_transformers
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    if exc.name == "sentence_transformers":
        message = (
            "fastpool.integrations.sentence_transformers needs the optional dependency "
            "sentence-transformers, which is not installed: pip install sentence-transformers"
        )
    else:
        message = (
            f"fastpool.integrations.sentence_transformers: importing sentence-transformers failed: {exc}"
        )
    raise ImportError(message) from exc

try:
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError as exc:  # pragma: no cover - older sentence-transformers layouts
    raise ImportError(
        "fastpool.integrations.sentence_transformers needs a sentence-transformers whose Pooling lives in "
        "sentence_transformers.sentence_transformer.modules and is configured by `pooling_mode` "
        f"(checked with 6.2.0 and 6.3.0); found {getattr(sentence_transformers, '__version__', 'unknown')}"
    ) from exc
if "pooling_mode" not in getattr(Pooling, "config_keys", ()):  # pragma: no cover
    raise ImportError(
        "fastpool.integrations.sentence_transformers needs a sentence-transformers whose Pooling is "
        "configured by `pooling_mode` (checked with 6.2.0 and 6.3.0); "
        f"found {getattr(sentence_transformers, '__version__', 'unknown')}"
    )

__all__ = ["MODE_NAMES", "FastPooling", "fastpool_modes", "replace_pooling", "restore_pooling"]

#: sentence-transformers' pooling mode names -> fastpool's.
MODE_NAMES: dict[str, str] = {
    "cls": "cls",
    "max": "max",
    "mean": "mean",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weighted_mean",
    "lasttoken": "last",
}
_MEAN_MODES = ("mean", "mean_sqrt_len_tokens", "weightedmean")


def _st_modes(pooling: Pooling) -> tuple[str, ...]:
    """The sentence-transformers modes of ``pooling``, in its concatenation order."""
    mode = pooling.pooling_mode
    return (mode,) if isinstance(mode, str) else tuple(mode)


def fastpool_modes(st_modes: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Map sentence-transformers pooling mode name(s) to fastpool's, keeping the order.

    Raises ``NotImplementedError`` for a mode this fastpool cannot compute (``weightedmean`` before
    fastpool has ``weighted_mean``, or a mode name it does not know).
    """
    names = (st_modes,) if isinstance(st_modes, str) else tuple(st_modes)
    out = []
    for name in names:
        target = MODE_NAMES.get(name)
        if target is None or target not in fastpool.MODES:
            have = f"fastpool's {target!r} mode" if target else "a fastpool equivalent"
            raise NotImplementedError(
                f"FastPooling: sentence-transformers pooling mode {name!r} needs {have}, which fastpool "
                f"{fastpool.__version__} does not have (its modes: {fastpool.MODES}); keep "
                "sentence-transformers' Pooling for this model"
            )
        out.append(target)
    return tuple(out)


def _first_real(real: torch.Tensor) -> torch.Tensor:
    """(B,) int64: each row's first real position of a (B, T) bool mask, 0 for an empty row (as
    sentence-transformers' ``argmax`` of the mask gives). Needs T > 0."""
    return real.to(torch.int32).argmax(dim=1)


def _exclude_prompt(real: torch.Tensor, first: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """A new bool mask without the prompt: positions before (first real position + prompt_length).

    The same positions sentence-transformers excludes (``Pooling._exclude_prompt_from_mask``): the
    prompt starts at each row's first real token, after any left padding.
    """
    positions = torch.arange(real.shape[1], device=real.device)
    return real & (positions[None, :] >= (first + prompt_length)[:, None])


def _position_weights(first: torch.Tensor, T: int) -> torch.Tensor:
    """sentence-transformers' weightedmean weights (B, T) float32: position - first real position + 1.

    Only their values at the pooled tokens matter (fastpool ignores weights at padding); there they
    are >= 1 and exact (integers in float32).
    """
    positions = torch.arange(1, T + 1, device=first.device, dtype=torch.float32)
    return positions[None, :] - first[:, None].to(torch.float32)


def _pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    modes: tuple[str, ...],
    weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """``fastpool.pool`` over ``modes`` in order; a mode listed twice is computed once and repeated.
    ``weights`` are weighted_mean's (fastpool's rank weights when None)."""
    unique = tuple(dict.fromkeys(modes))
    out = fastpool.pool(
        hidden, mask, mode=unique, weights=weights, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
    )
    if len(unique) == len(modes):
        return out
    d = hidden.shape[-1]
    block = {name: out[:, i * d : (i + 1) * d] for i, name in enumerate(unique)}
    return torch.cat([block[name] for name in modes], dim=-1)


def _pool_padded(
    hidden: torch.Tensor, mask: torch.Tensor | None, modes: tuple[str, ...], prompt_length: int
) -> torch.Tensor:
    """Pool sentence-transformers' padded batch: (B, T, d) with an optional (B, T) mask -> (B, n * d)."""
    weighted = "weighted_mean" in modes
    B, T = hidden.shape[:2]
    if T == 0 or (prompt_length == 0 and (mask is None or not weighted)):
        # No prompt, and no weights needed: without a mask position t + 1 is the rank fastpool uses.
        return _pool(hidden, mask, modes)
    real = torch.ones(B, T, dtype=torch.bool, device=hidden.device) if mask is None else mask != 0
    first = _first_real(real)
    # sentence-transformers' weights count positions from the first real token of the mask as given
    # (prompt included, holes counted), not ranks among the pooled tokens: pass them as user weights.
    weights = _position_weights(first, T) if weighted else None
    if prompt_length > 0:
        mask = _exclude_prompt(real, first, prompt_length)
    return _pool(hidden, mask, modes, weights)


def _split_off_prompt(cu_seqlens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Offsets (2S + 1,) that cut every sequence of ``cu_seqlens`` into (its first ``prompt_length``
    tokens, the rest); the rest is empty where the prompt covers the whole sequence. Built on the
    offsets' device without a host sync; every segment is at most as long as its sequence."""
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    cuts = torch.minimum(starts + prompt_length, ends)
    return torch.cat([torch.stack([starts, cuts], dim=1).reshape(-1), cu_seqlens[-1:]])


def _packed_position_weights(cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """(N,) float32: each token's position in its sequence plus 1 (sentence-transformers' flattened
    weightedmean weights). No host sync: each token finds its sequence by a binary search of the
    offsets; malformed offsets give wrong weights, never an out-of-bounds read (fastpool checks them)."""
    tokens = torch.arange(N, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens, tokens, right=True) - 1  # in [-1, S]: indexes cu_seqlens
    return (tokens - cu_seqlens[sequence] + 1).to(torch.float32)


def _pool_packed(
    hidden: torch.Tensor, features: dict[str, Any], modes: tuple[str, ...], prompt_length: int
) -> torch.Tensor:
    """Pool sentence-transformers' flattened batch: (1, N, d) with ``cu_seq_lens_q`` -> (S, n * d)."""
    cu_seqlens = features["cu_seq_lens_q"]
    max_seqlen = features.get("max_length_q")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        max_seqlen = None  # a tensor would cost a host sync to read: let fastpool find the longest
    if prompt_length == 0:
        # Without a prompt sentence-transformers' weights (position + 1) are fastpool's ranks.
        return _pool(hidden, None, modes, None, cu_seqlens, max_seqlen)
    weights = None
    if "weighted_mean" in modes and isinstance(cu_seqlens, torch.Tensor):
        # The tokens after the prompt keep their positions in the sequence (prompt_length + 1, ...).
        weights = _packed_position_weights(cu_seqlens, hidden.shape[-2])
    out = _pool(hidden, None, modes, weights, _split_off_prompt(cu_seqlens, prompt_length), max_seqlen)
    return out[1::2].contiguous()  # the segments after the prompts


def _new_fast_pooling() -> FastPooling:
    """An uninitialised ``FastPooling`` for pickle, which then restores its state."""
    return FastPooling.__new__(FastPooling)


class FastPooling(Pooling):
    """sentence-transformers' ``Pooling``, computed by ``fastpool.pool`` (see the module docstring).

    Constructed like ``Pooling`` (``embedding_dimension``, ``pooling_mode``, ``include_prompt``), or
    from an existing one with ``FastPooling.from_pooling(pooling)``. Raises ``NotImplementedError``
    for a pooling mode fastpool cannot compute. Saved by sentence-transformers as a stock ``Pooling``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fastpool_modes(_st_modes(self))  # fail here, not at the first forward

    @classmethod
    def from_pooling(cls, pooling: Pooling) -> FastPooling:
        """A ``FastPooling`` with ``pooling``'s configuration and train/eval state."""
        if not isinstance(pooling, Pooling):
            raise TypeError(
                f"pooling: expected a sentence_transformers Pooling module, got {type(pooling).__name__}"
            )
        module = cls(**pooling.get_config_dict())
        module.train(pooling.training)
        return module

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle finds a class by __module__ + __qualname__, which (below) point into sentence-transformers,
        # where there is no FastPooling: rebuild it through this module instead.
        if type(self) is not FastPooling:  # a subclass has its own, importable, name
            return super().__reduce_ex__(protocol)
        return (_new_fast_pooling, (), self.__getstate__())

    def _prompt_length(self, features: dict[str, Any]) -> int:
        if self.include_prompt or "prompt_length" not in features:
            return 0
        # An int at inference; a tensor of equal values in training (sentence-transformers reads the first).
        value = features["prompt_length"]
        length = int(value.reshape(-1)[0].item()) if isinstance(value, torch.Tensor) else int(value)
        if length < 0:
            raise ValueError(f"prompt_length: expected a number of prompt tokens >= 0, got {length}")
        return length

    def forward(
        self, features: dict[str, torch.Tensor | Any], **kwargs: Any
    ) -> dict[str, torch.Tensor | Any]:
        st_modes = _st_modes(self)
        packed = "cu_seq_lens_q" in features
        if ("cls_token_embeddings" in features and "cls" in st_modes) or (
            # sentence-transformers' flattened path ignores token_weights_sum; its padded one divides by it
            not packed and "token_weights_sum" in features and any(m in _MEAN_MODES for m in st_modes)
        ):
            return super().forward(features, **kwargs)
        modes = fastpool_modes(st_modes)
        hidden = features["token_embeddings"]
        prompt_length = self._prompt_length(features)
        if packed:
            features["sentence_embedding"] = _pool_packed(hidden, features, modes, prompt_length)
            return features
        mask = features.get("attention_mask")
        if mask is not None and mask.size(-1) != hidden.size(1):
            mask = None  # as sentence-transformers: a mask of another length means "every token is real"
        features["sentence_embedding"] = _pool_padded(hidden, mask, modes, prompt_length)
        return features


# sentence-transformers writes a module's class into modules.json as type(module).__module__ + "." +
# type(module).__name__ and names its folder after __name__ ("1_Pooling"). Presenting Pooling's makes a
# saved model refer to the stock Pooling, which loads anywhere without fastpool or trust_remote_code;
# __qualname__ stays "FastPooling", and __reduce_ex__ above keeps pickling working.
FastPooling.__module__ = Pooling.__module__
FastPooling.__name__ = Pooling.__name__


def _swap(model: torch.nn.Module, match, make) -> int:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module (e.g. a SentenceTransformer), got {type(model).__name__}"
        )
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if match(child)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, make(child))
    return len(swaps)


def replace_pooling(model: torch.nn.Module) -> int:
    """Swap every sentence-transformers ``Pooling`` inside ``model`` for a ``FastPooling``; return how many.

    Walks all submodules (a ``Router``'s routes included). Only modules whose type is exactly
    ``Pooling`` are replaced: a subclass may override ``forward``, so it is left alone. Raises
    ``NotImplementedError`` (before swapping anything) when a Pooling uses a mode fastpool cannot
    compute. A model saved afterwards loads (anywhere) with stock ``Pooling`` modules: call
    ``replace_pooling`` again after loading it.
    """
    for module in model.modules() if isinstance(model, torch.nn.Module) else ():
        if type(module) is Pooling:
            fastpool_modes(_st_modes(module))
    return _swap(model, lambda m: type(m) is Pooling, FastPooling.from_pooling)


def restore_pooling(model: torch.nn.Module) -> int:
    """Undo ``replace_pooling``: swap every ``FastPooling`` back to a plain ``Pooling``; return how many.

    Not needed for saving (a ``FastPooling`` is saved as a stock ``Pooling``); useful to compare
    against sentence-transformers' own pooling, or to hand on a live model that must not call fastpool.
    """

    def make(module: FastPooling) -> Pooling:
        plain = Pooling(**module.get_config_dict())
        plain.train(module.training)
        return plain

    return _swap(model, lambda m: isinstance(m, FastPooling), make)
