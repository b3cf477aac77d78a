"""Wall time per MM-SHAP coalition, per preset and image mode: MMBT run as it was (pixel mode: the
whole model per coalition, as the reference runs it, here batched; every token position computed)
against how pipeline/mmshap.py runs it now (pixel mode: the image encoder once per distinct image
coalition; both modes: the fusion transformer over the present tokens only, MMBT.compact).

Models of each preset's shape with random weights (a coalition costs the same whatever the
weights), one synthetic product with a text of the preset's full length (p x p = #text tokens
patches), the coalitions of antithetic permutation pairs as estimate_mm_shap draws them. Both paths
give the same values (checked here to 1e-4, and in tests/test_mmshap.py and tests/test_models.py).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_coalitions.py [--presets tiny,small,pretrained] [--pairs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from pipeline.mmshap import _patch_masks, coalition_values, players_of
from pipeline.models import KINDS, create_model
from pipeline.presets import get_preset
from pipeline.records import Product
from pipeline.shapley import _draw_perms, _prefixes
from pipeline.stackers import log_softmax
from pipeline.synthetic import make_catalogue
from pipeline.tokenizer import train_tokenizer
from train.crossfit import fold_backend


def whole_model(backend, enc, pl, masks):
    """The model on the masked pixels, coalition by row (what pixel mode ran before)."""
    m = len(masks)
    tmask = np.repeat(enc.text_mask, m, 0)
    tmask[:, pl.text_pos] = masks[:, : pl.n_text][:, pl.word]
    pixels = enc.clip_pixels[[0] * m] * _patch_masks(masks[:, pl.n_text :], enc.clip_pixels.shape[-1])
    z = backend.multimodal_logits(np.repeat(enc.input_ids, m, 0), tmask, pixels,
                                  np.repeat(enc.image_mask(backend.num_image_embeds), m, 0))
    return log_softmax(z.astype(np.float64))[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,small,pretrained")
    ap.add_argument("--pairs", type=int, default=6, help="antithetic pairs of coalitions to time (6: the first round of the default policy)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    feed = make_catalogue(tempfile.mkdtemp(), 6, 2, seed=0, image_size=96)
    print("| preset | mode | players | coalitions | before, ms / coalition | shared encoder, ms / coalition "
          "| + present tokens only, ms / coalition | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for preset_name in args.presets.split(","):
        preset = get_preset(preset_name)
        words = " ".join(f"word{k}" for k in range(preset["max_length"]))
        product = Product(product_id="p", title="", description=words, image=str(feed.parent / "images" / "p000000.jpg"))
        tok = train_tokenizer([words], 200)
        torch.manual_seed(0)
        models = {k: create_model(k, preset, 2, vocab_size=tok.vocab_size).eval() for k in KINDS}
        backend = fold_backend(models, tok, preset, ["a", "b"], "cpu")
        backend.batch_size = 64  # InProcessBackend's default
        enc = backend.encode([product])
        mmbt = backend.models["multimodal"]
        for mode in ("pixel", "token"):
            pl = players_of(backend, enc, 0, mode)
            n = len(pl.is_text)
            perms = _draw_perms(np.random.default_rng(0), args.pairs, n, antithetic=True)
            masks = _prefixes(perms, np.arange(1, n)).reshape(-1, n)
            embeds = backend.image_embeddings(enc) if mode == "token" else None

            def ours():
                return coalition_values(backend, enc, 0, pl, masks, mode, 0, embeds)

            # before: pixel mode the whole model per coalition, token mode ours; both over every position.
            # shared (pixel mode): the encoder once per distinct image mask, every position
            paths = ({"before": lambda: whole_model(backend, enc, pl, masks), "shared": ours, "now": ours}
                     if mode == "pixel" else {"before": ours, "now": ours})
            seconds, values = {}, {}
            for name in [*paths, *paths]:  # the second round is timed
                mmbt.compact = name == "now"
                t0 = time.perf_counter()
                values[name] = paths[name]()
                seconds[name] = time.perf_counter() - t0
            for name in paths:
                assert np.allclose(values[name], values["now"], atol=1e-4), name
            ms = {k: 1000 * v / len(masks) for k, v in seconds.items()}
            shared = f"{ms['shared']:.2f}" if "shared" in ms else "-"
            print(f"| {preset_name} | {mode} | {n} | {len(masks)} | {ms['before']:.2f} | {shared} | {ms['now']:.2f} "
                  f"| {ms['before'] / ms['now']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
