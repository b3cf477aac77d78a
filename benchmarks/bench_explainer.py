"""What the amortized MM-SHAP explainer should learn from: many cheap targets or few precise ones,
and which inputs. Results and command: docs/amortized.md.

On a bundle trained with K > 1 folds: the final models' sampled MM-SHAP of the training products at
the audit's policy (stderr 0.1, all of them) and at the bundle's policy (the first --precise of
them), a yardstick on --products held-out products (--yardstick coalitions each), then explainers
fitted on each target set with three input sets: the standard features (pipeline.amortized), plus
the three models' full log-probabilities, plus the multimodal model's pooled hidden state (read
with a forward hook; the explainer as shipped does not use it), plus the exact modality game
(game text share, phi_text, phi_image: 3 extra multimodal passes per product). Each row: held-out T-SHAP RMSE
against the yardstick, net of the yardstick's own noise, and the 5-fold CV RMSE against the targets.
--curve N,N,...: a learning curve, the standard explainer fitted on the first N audit-policy targets.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_explainer.py --bundle BUNDLE --feed FEED \
        [--products 60] [--yardstick 6000] [--precise 150] [--curve 100,200,400]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np


def main() -> None:
    from pipeline.amortized import cross_validated, features, fit_explainer, player_counts, rmse
    from pipeline.backend import InProcessBackend
    from pipeline.bundle import load_bundle
    from pipeline.feed import read_feed
    from pipeline.inference import infer, stack_inputs
    from pipeline.metrics import rmse_net_of_noise
    from pipeline.mmshap import mmshap_config
    from pipeline.records import Product
    from pipeline.split import split_selector
    from pipeline.stackers import log_softmax

    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--feed", required=True)
    ap.add_argument("--products", type=int, default=60)
    ap.add_argument("--yardstick", type=int, default=6000)
    ap.add_argument("--precise", type=int, default=150)
    ap.add_argument("--inputs", default=",log-probs,hidden,log-probs+hidden,game",
                    help="input sets beside the standard features: '' (none), log-probs, hidden, game, joined by +")
    ap.add_argument("--curve", default="", help="comma-separated numbers of targets for a learning curve")
    args = ap.parse_args()

    bundle = load_bundle(args.bundle, device="cpu")
    backend = InProcessBackend(bundle)
    policy = mmshap_config(bundle.manifest, method="sampled")
    usable = [p for p in read_feed(args.feed) if isinstance(p, Product) and p.has_text and p.has_image
              and p.label in bundle.manifest["labels"]]
    test, train = (split_selector(bundle.manifest, s) for s in ("test", "train"))
    held_out, training = [p for p in usable if test(p)][: args.products], [p for p in usable if train(p)]

    pooled = {}
    bundle.models["multimodal"].classifier.register_forward_hook(lambda m, i, o: pooled.__setitem__("x", i[0].numpy()))

    games = {}

    def sampled(products, config, key):
        started = time.perf_counter()
        inferred = infer(backend, products, config, seed_key=key)
        x = stack_inputs(inferred)
        c = inferred.contributions
        games[id(x)] = np.stack([c.game_text_share, c.phi_text, c.phi_image], 1)  # exact, whatever the budget
        print(f"  {len(products)} products at {config.describe()}: {(time.perf_counter() - started) / len(products):.3f} "
              f"s/product, mean stderr {np.nanmean(x.t_stderr):.3f}", flush=True)
        return x

    def inputs(products, run, extra):
        logits = run.logits
        enc = backend.encode(products)
        x = [features(logits, *player_counts(backend, enc, policy.mode, policy.players))]
        if "game" in extra:
            x.append(np.nan_to_num(games[id(run)][: len(products)]))
        if "log-probs" in extra:
            x += [log_softmax(np.asarray(logits[k], float)) for k in ("text", "image", "multimodal")]
        if "hidden" in extra:
            hidden = []
            for i in range(0, len(products), 64):
                backend.base_logits(backend.encode(products[i : i + 64]))
                hidden.append(pooled["x"])
            x.append(np.concatenate(hidden))
        return np.concatenate(x, 1)

    cheap = sampled(training, policy.audit(), "bench-train")
    precise = sampled(training[: args.precise], policy, "bench-precise")
    yard = sampled(held_out, replace(policy, budget=args.yardstick), "bench-yardstick")
    y, y_se = yard.t_shap, yard.t_stderr

    def net_rmse(pred):
        ok = np.isfinite(pred) & np.isfinite(y)
        return rmse_net_of_noise(pred[ok] - y[ok], y_se[ok])

    print(f"yardstick: T-SHAP sd {np.nanstd(y):.3f} across products; constant (training mean) "
          f"RMSE {net_rmse(np.full(len(y), np.nanmean(cheap.t_shap))):.3f}")
    if args.curve:
        x_test, x_train = inputs(held_out, yard, ()), inputs(training, cheap, ())
        print("| targets (audit policy, first N training products) | N with a value | held-out RMSE (net) |")
        for n in (int(v) for v in args.curve.split(",")):
            t = cheap.t_shap[:n]
            explainer = fit_explainer(x_train[:n], t, cheap.t_stderr[:n], cheap.game_text_share[:n])
            print(f"| {n} | {int(np.isfinite(t).sum())} | {net_rmse(explainer.predict(x_test)[0]):.3f} |", flush=True)
    print("| inputs | targets | n targets | held-out RMSE (net) | CV RMSE vs targets |")
    for extra in [tuple(e.split("+")) if e else () for e in args.inputs.split(",")]:
        x_test = inputs(held_out, yard, extra)
        x_train = inputs(training, cheap, extra)
        for name, t, rows in (("audit policy", cheap, slice(None)), ("bundle policy", precise, slice(0, args.precise))):
            x = x_train[rows]
            explainer = fit_explainer(x, t.t_shap, t.t_stderr, t.game_text_share)
            cv, n = rmse(cross_validated(x, t.t_shap, t.t_stderr, t.game_text_share), t.t_shap)
            print(f"| {' + '.join(('standard', *extra))} | {name} | {n} | {net_rmse(explainer.predict(x_test)[0]):.3f} "
                  f"| {cv:.3f} |", flush=True)


if __name__ == "__main__":
    main()
