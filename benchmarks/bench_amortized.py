"""Amortized MM-SHAP against sampled MM-SHAP: fidelity on held-out products, classify throughput,
and what the stacker makes of amortized T-SHAP. Results and commands: docs/amortized.md.

1. Fidelity: on --products held-out products (the bundle's --split test) with both modalities,
   T-SHAP RMSE against a high-budget sampled yardstick (--yardstick coalitions per product) of the
   amortized value and of sampled MM-SHAP at the bundle's policy (default: target stderr 0.03),
   with 95% paired-bootstrap intervals of each RMSE and of their difference; and each RMSE net of
   the yardstick's own noise, the audit's policy included.
2. Throughput: embedded `classify --split test` end to end on fresh SQLite files, one process, in
   the order none, amortized without audit, amortized (default 5% audit), sampled (the bundle's
   policy), then none again:
   products/s and time relative to classify without MM-SHAP.
3. The stacker: macro-F1 of the default stacker's predictions of the amortized run against those
   of the sampled run, paired bootstrap over the labelled products.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_amortized.py --bundle BUNDLE --feed FEED \
        [--products 60] [--yardstick 6000] [--limit 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def bootstrap_rmse(err: dict[str, np.ndarray], n: int = 2000, seed: int = 0) -> dict:
    """RMSE of each error vector and its 95% interval; paired resamples across vectors."""
    rng = np.random.default_rng(seed)
    m = len(next(iter(err.values())))
    idx = rng.integers(0, m, (n, m))
    boot = {k: np.sqrt(np.mean(v[idx] ** 2, axis=1)) for k, v in err.items()}
    out = {k: (float(np.sqrt(np.mean(v**2))), np.percentile(boot[k], [2.5, 97.5]).round(4).tolist())
           for k, v in err.items()}
    names = list(err)
    if len(names) == 2:
        d = boot[names[0]] - boot[names[1]]
        out["difference"] = (out[names[0]][0] - out[names[1]][0], np.percentile(d, [2.5, 97.5]).round(4).tolist())
    return out


def fidelity(bundle_path: str, feed: str, n: int, yardstick: int) -> dict:
    from pipeline.backend import InProcessBackend
    from pipeline.bundle import load_bundle
    from pipeline.feed import read_feed
    from pipeline.inference import infer
    from pipeline.metrics import rmse_net_of_noise
    from pipeline.mmshap import mmshap_config
    from pipeline.records import Product
    from pipeline.split import split_selector

    bundle = load_bundle(bundle_path, device="cpu")
    backend = InProcessBackend(bundle)
    test = split_selector(bundle.manifest, "test")
    products = [p for p in read_feed(feed) if isinstance(p, Product) and test(p) and p.has_text and p.has_image][:n]
    sampled = mmshap_config(bundle.manifest, method="sampled")
    key = bundle.bundle_id
    out, t, se = {}, {}, {}
    for name, config in (("amortized", replace(sampled, method="amortized", audit_fraction=0.0)),
                         ("sampled", sampled), ("audit policy", sampled.audit()),
                         ("yardstick", replace(sampled, budget=yardstick))):
        started = time.perf_counter()
        c = infer(backend, products, config, seed_key=key if name != "yardstick" else key + "-yardstick").contributions
        t[name], se[name] = c.t_shap, c.stderr
        out[f"{name}_s_per_product"] = (time.perf_counter() - started) / len(products)
        out[f"{name}_evaluations"] = float(np.mean(c.n_evaluations))
        if name != "amortized":
            out[f"{name}_mean_stderr"] = float(np.nanmean(c.stderr))
    ok = np.isfinite(t["amortized"]) & np.isfinite(t["sampled"]) & np.isfinite(t["yardstick"])
    out["n"] = int(ok.sum())
    out["rmse"] = bootstrap_rmse({k: t[k][ok] - t["yardstick"][ok] for k in ("amortized", "sampled")})
    out["rmse_net_of_yardstick_noise"] = {k: rmse_net_of_noise(t[k][ok] - t["yardstick"][ok], se["yardstick"][ok])
                                          for k in ("amortized", "sampled", "audit policy")}
    kinds_file = Path(feed).parent / "classes.json"
    if kinds_file.exists():
        kinds = json.loads(kinds_file.read_text())
        kind = np.array([kinds.get(p.label, "?") for p in products])
        out["mean_t_shap_by_kind"] = {k: {m: float(np.nanmean(t[m][ok & (kind == k)])) for m in t}
                                      for k in ("image", "text", "both") if (ok & (kind == k)).any()}
    return out


def classify(bundle: str, feed: str, method: str | None, budget: int | None, audit: float | None = None) -> dict:
    from db.engine import connect
    from db.models import Run
    from db.results import audit_error, output_rows
    from jobs.classify import classify_feed
    from shapstack.settings import load_settings

    db = Path(tempfile.mkdtemp()) / "bench.db"
    settings = load_settings(env={}, database_url=f"sqlite:///{db}", bundle=bundle, mmshap_budget=budget,
                             mmshap_method=method, mmshap_audit_fraction=audit, device="cpu")
    started = time.perf_counter()
    run_id, _ = classify_feed(connect(settings.database_url), settings, feed, split="test")
    wall = time.perf_counter() - started
    with connect(settings.database_url)() as s:
        run = s.get(Run, run_id)
        rows = output_rows(s, run_id)
        audit = audit_error(s, run_id)
    return {"products": run.n_products, "wall_s": wall, "infer_s": run.timings["infer_s"], "audit": audit,
            "pred": {r["product_id"]: (r["category"], r["label"]) for r in rows}}


def stacker_effect(a: dict, b: dict, labels: list[str]) -> dict:
    from pipeline.metrics import paired_bootstrap

    index = {c: i for i, c in enumerate(labels)}
    ids = [k for k in a if a[k][1] in index and k in b]
    y = np.array([index[a[k][1]] for k in ids])
    pa = np.array([index.get(a[k][0], -1) for k in ids])
    pb = np.array([index.get(b[k][0], -1) for k in ids])
    res = paired_bootstrap(y, pa, pb, sorted(set(y.tolist())))
    return {"n": len(ids), "changed_predictions": int((pa != pb).sum()), **res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--feed", required=True)
    ap.add_argument("--products", type=int, default=60)
    ap.add_argument("--yardstick", type=int, default=6000)
    ap.add_argument("--skip-fidelity", action="store_true")
    args = ap.parse_args()

    from pipeline.manifest import read_manifest

    manifest = read_manifest(args.bundle)
    print("explainer:", json.dumps(manifest["extra"].get("mmshap_explainer")))
    if not args.skip_fidelity:
        f = fidelity(args.bundle, args.feed, args.products, args.yardstick)
        print(json.dumps(f, indent=1))
    runs = {}
    for name, method, budget, audit in (("none", None, 0, None), ("amortized, no audit", "amortized", None, 0.0),
                                        ("amortized", "amortized", None, None), ("sampled", "sampled", None, None),
                                        ("none again", None, 0, None)):
        runs[name] = classify(args.bundle, args.feed, method, budget, audit)
    base = min(runs["none"]["wall_s"], runs["none again"]["wall_s"])
    print(f"{'MM-SHAP':<20} {'products':>8} {'wall s':>8} {'prod/s':>8} {'x none':>7}  audit")
    for name, r in runs.items():
        audit = r["audit"]
        note = (f"RMSE {audit['rmse_net']:.3f} net of noise ({audit['rmse']:.3f} raw) on {audit['n']} audited, "
                f"{audit['mean_audit_stderr']:.3f} mean stderr" if audit else "")
        print(f"{name:<20} {r['products']:>8} {r['wall_s']:>8.1f} {r['products'] / r['wall_s']:>8.2f} "
              f"{r['wall_s'] / base:>7.2f}  {note}")
    effect = stacker_effect(runs["amortized"]["pred"], runs["sampled"]["pred"], manifest["labels"])
    print("stacker, amortized vs sampled inputs:", json.dumps(effect))


if __name__ == "__main__":
    main()
