"""Training a model bundle (`shapstack train`): base models, out-of-fold outputs by K-fold
cross-fitting, the stackers on those outputs, and the bundle written to disk.

Leakage rule: a stacker never sees base-model outputs on products those base models were trained
on. With --folds K > 1, each product's logits and MM-SHAP come from the fold models that did not
train on it (groups never straddle folds), and the bundle's base models are then retrained on
every training product. With --folds 1 (the paper's D_tr / D_v), 20% of the groups are held out:
the base models train on the other 80% and are the bundle's models, the stackers train on the
held-out 20%.

Resumable: every fold model and its out-of-fold outputs are saved under OUT/.work as they finish,
keyed by a hash of the data and settings, and a rerun skips what is there.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.bundle import bundle_id, save_bundle
from pipeline.collapse import T_SHAP_COUNTS, reference_counts
from pipeline.inference import infer, stack_inputs
from pipeline.metrics import scores
from pipeline.mmshap import MMSHAP_ESTIMATOR
from pipeline.errors import UserError
from pipeline.models import create_model
from pipeline.preprocess import encode_products
from pipeline.pretrained import apply_checkpoints, checkpoint_sha256, describe, model_checkpoints, resolve_all
from pipeline.presets import get_preset
from pipeline.records import KINDS, Limits
from pipeline.tfidf import KIND as TFIDF, TfidfModel
from pipeline.stackers import UNFITTED, StackInputs, fit_stackers, make_stacker, save_oof, save_stackers
from pipeline.tokenizer import Tokenizer, checkpoint_tokenizer, train_tokenizer
from train.base_models import fit, frozen_features
from train.checkpoints import WorkDir, cache_key
from train.crossfit import fold_backend, fold_indices
from train.explainer import MIN_TARGETS, explainer_inputs, explainer_targets, fit_bundle_explainer, save_explainer
from train.data import TrainConfig, group_of, label_of, load_training_products, select_classes


RELIANCE = ("t_shap", "t_stderr", "game_text_share")  # the StackInputs fields the out-of-fold cache keeps


def collapse_reference(x: StackInputs, y: np.ndarray, labels: list[str], stackers: dict,
                       final: StackInputs | None = None) -> dict:
    """Per stacker a run may use, the collapse counts of the out-of-fold outputs grouped by that
    stacker's predicted category, as a run groups them (pipeline.collapse).

    With K > 1 folds a run's T-SHAP comes from the final models, whose reliance can differ from the
    fold models' by more than any drift threshold (docs/stacking.md measures it): then `final`, the
    final models' MM-SHAP of a sample of training products, gives the T-SHAP counts that drift
    compares with, grouped the same way; the unimodal models' signal stays out-of-fold."""
    names = np.array(labels)
    everyone = {**{n: make_stacker(n) for n in UNFITTED}, **stackers}

    def by_stacker(inputs: StackInputs, label) -> dict:
        preds = {k: names[inputs.logits[k].argmax(1)] for k in KINDS}
        return {name: reference_counts(inputs.t_shap, names[s.predict_proba(inputs).argmax(1)], preds, label,
                                       inputs.has_text, inputs.has_image) for name, s in everyone.items()}

    reference = by_stacker(x, names[y])
    if final is not None:
        for name, scopes in by_stacker(final, None).items():
            for scope, c in reference[name].items():  # a scope the sample lacks gets no T-SHAP reference
                c.update({k: scopes[scope][k] if scope in scopes else 0 for k in T_SHAP_COUNTS})
    source = "out-of-fold outputs" + (f"; T-SHAP: the final models on {len(final.t_shap)} training products"
                                      if final is not None else "")
    return {"grouping": "predicted category", "source": source, "stackers": reference}


def train_bundle(feed, out, cfg: TrainConfig, limits: Limits = Limits(), log=print) -> dict:
    started = time.perf_counter()
    out = Path(out)
    paths = resolve_all(get_preset(cfg.preset), cfg.checkpoints)
    preset = apply_checkpoints(get_preset(cfg.preset), paths)
    products = load_training_products(feed, cfg, limits, "train")
    labels, dropped = select_classes(products, cfg)
    index = {c: i for i, c in enumerate(labels)}
    products = [p for p in products if label_of(p, cfg.label_column) in index]
    y = np.array([index[label_of(p, cfg.label_column)] for p in products])
    groups = np.array([group_of(p, cfg.group_column) for p in products])
    log(f"training on {len(products)} products, {len(labels)} classes ({len(dropped)} classes under "
        f"{cfg.min_class_size} products dropped), {len(set(groups))} groups, preset {preset['name']}")

    if "text" in paths and cfg.tokenizer:
        raise UserError("a text checkpoint brings its own tokenizer: drop --tokenizer")
    if "text" in paths:
        tokenizer = checkpoint_tokenizer(paths["text"], preset["max_length"], preset["num_image_embeds"])
    elif cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer((p.text for p in products), preset["vocab_size"])
    t0 = time.perf_counter()
    enc = encode_products(products, tokenizer, preset, limits)
    encode_s = time.perf_counter() - t0
    hashes = {slot: checkpoint_sha256(path) for slot, path in paths.items()}
    sampled = {k: v for k, v in asdict(cfg.mmshap).items() if k not in ("method", "audit_fraction")}
    key = cache_key(preset, cfg.seed, cfg.epochs, cfg.folds,
                    [p.content_hash for p in products], labels, tokenizer.tok.to_str(), hashes)
    work = WorkDir(out, key, cache_key(sampled, MMSHAP_ESTIMATOR))
    ckpt = model_checkpoints(preset, paths)
    features = {}
    frozen = [slot for slot in ("text", "image") if preset.get(f"freeze_{slot}")]
    for slot in frozen:
        if slot not in paths:
            raise UserError(f"preset has freeze_{slot} but no {slot} checkpoint: a frozen random encoder learns nothing")
    if frozen:
        t0 = time.perf_counter()
        features = work.arrays("frozen-features", lambda: frozen_features(preset, ckpt, enc, cfg.device))
        log(f"  frozen {' and '.join(frozen)} features of {len(y)} products: {time.perf_counter() - t0:.0f} s")

    def train_models(rows: np.ndarray, tag: str) -> tuple[dict, dict]:
        models, stats = {}, {}
        for kind in KINDS:
            def build(kind=kind):
                return create_model(kind, preset, len(labels), vocab_size=tokenizer.vocab_size, checkpoint=ckpt.get(kind))

            def train(kind=kind):
                text_encoder = models["text"].bert if kind == "multimodal" and "text" not in paths else None
                feats = features[kind][rows] if kind in features else None
                return fit(kind, preset, enc[rows], y[rows], len(labels), vocab_size=tokenizer.vocab_size,
                           seed=cfg.seed, device=cfg.device, epochs=cfg.epochs, checkpoint=ckpt.get(kind),
                           desc=f"{tag} {kind}", text_encoder=text_encoder, groups=groups[rows], features=feats)

            models[kind], stats[kind] = work.model(f"{tag}-{kind}", build, train)
            log(f"  {tag} {kind}: {stats[kind]['train_s']} s" + (" (resumed)" if stats[kind].get("resumed") else ""))
        return models, stats

    use_tfidf = preset.get("tfidf", False) if cfg.tfidf is None else cfg.tfidf
    kinds = (*KINDS, TFIDF) if use_tfidf else KINDS
    texts = [p.text for p in products]

    def train_tfidf(rows: np.ndarray, tag: str) -> tuple[TfidfModel, dict]:
        t0 = time.perf_counter()
        model = TfidfModel.fit([texts[i] for i in rows], y[rows], len(labels), seed=cfg.seed)
        log(f"  {tag} {TFIDF}: {time.perf_counter() - t0:.0f} s")
        return model, {"train_s": round(time.perf_counter() - t0, 1)}

    # out-of-fold outputs
    oof = {k: np.zeros((len(y), len(labels)), np.float32) for k in kinds}
    reliance = {f: np.full(len(y), np.nan) for f in RELIANCE}
    covered = np.zeros(len(y), bool)
    fold_stats = []
    for f, (tr, te) in enumerate(fold_indices(y, groups, cfg.folds, cfg.seed)):
        models, stats = train_models(tr, f"fold{f}")
        fold_stats.append(stats)

        def held_out(models=models, te=te, f=f):
            backend = fold_backend(models, tokenizer, preset, labels, cfg.device)
            res = infer(backend, [products[i] for i in te], cfg.mmshap, seed_key=f"train-seed-{cfg.seed}")
            x = stack_inputs(res)
            return {**res.logits, **{f: getattr(x, f) for f in RELIANCE}}

        arrays = work.mmshap_arrays(f"fold{f}-oof", held_out)
        for k in KINDS:
            oof[k][te] = arrays[k]
        for name in RELIANCE:
            reliance[name][te] = arrays[name]
        if use_tfidf:
            sparse, stats[TFIDF] = train_tfidf(tr, f"fold{f}")
            oof[TFIDF][te] = sparse.logits([texts[i] for i in te])
        covered[te] = True
        final_models = models

    if cfg.folds > 1:
        final_models, final_stats = train_models(np.arange(len(y)), "final")
        if use_tfidf:
            sparse, final_stats[TFIDF] = train_tfidf(np.arange(len(y)), "final")
    else:
        final_stats = fold_stats[0]

    # stackers on out-of-fold outputs only
    rows = np.nonzero(covered)[0]
    x = StackInputs({k: oof[k][rows] for k in kinds}, reliance["t_shap"][rows], enc.has_text[rows],
                    enc.has_image[rows], reliance["t_stderr"][rows], reliance["game_text_share"][rows])
    stackers = fit_stackers(x, y[rows], cfg.stackers, seed=cfg.seed, paper_epochs=cfg.paper_epochs)
    present = sorted(set(y[rows].tolist()))
    oof_scores = {k: scores(y[rows], oof[k][rows].argmax(1), present) for k in kinds}
    # the final models' MM-SHAP of training products: the explainer's targets, and with K > 1 folds the
    # T-SHAP the drift reference compares a run with
    final_sample, explainer = None, None
    if not cfg.mmshap.off and (cfg.explainer or cfg.folds > 1):
        t0 = time.perf_counter()
        backend = fold_backend(final_models, tokenizer, preset, labels, cfg.device)
        target_rows, final_sample, policy = explainer_targets(work, backend, products, rows, x, cfg)
        if use_tfidf and cfg.folds > 1:
            final_sample.logits[TFIDF] = sparse.logits([texts[i] for i in target_rows])
    reference = collapse_reference(x, y[rows], labels, stackers, final_sample if cfg.folds > 1 else None)
    if cfg.explainer and final_sample is not None:
        if np.isfinite(final_sample.t_shap).sum() < MIN_TARGETS:
            log(f"  MM-SHAP explainer not fitted: {int(np.isfinite(final_sample.t_shap).sum())} products with a "
                f"sampled T-SHAP, {MIN_TARGETS} needed (amortized MM-SHAP unavailable for this bundle)")
        else:
            explainer, explainer_meta = fit_bundle_explainer(
                explainer_inputs(backend, enc[target_rows], final_sample, cfg.mmshap), final_sample, policy, cfg.seed)
            explainer_meta["fit_s"] = round(time.perf_counter() - t0, 1)
            log(f"  MM-SHAP explainer: cross-validated T-SHAP RMSE {explainer_meta['cv_rmse_net']:.3f} net of the "
                f"targets' noise ({explainer_meta['cv_rmse_vs_sampled']:.3f} against the {explainer_meta['n_train']} "
                f"sampled targets, {policy.describe()})")

    metrics = {
        "n_train": int(len(y)), "n_classes": len(labels), "folds": cfg.folds,
        "oof": oof_scores,
        "oof_mean_t_shap": float(np.nanmean(x.t_shap)) if np.isfinite(x.t_shap).any() else None,
        "oof_t_shap_null": int((~np.isfinite(x.t_shap)).sum()),
        "train_s": {k: final_stats[k]["train_s"] for k in kinds},
        "stacker_fit_s": {name: s.fit_s for name, s in stackers.items()},
        "fold_train_s": [{k: s[k]["train_s"] for k in kinds} for s in fold_stats],
        "encode_s": round(encode_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    extra = {
        "label_column": cfg.label_column, "group_column": cfg.group_column, "min_class_size": cfg.min_class_size,
        "dropped_classes": dropped, "seed": cfg.seed, "test_fraction": cfg.test_fraction,
        "mmshap": sampled,  # how the stackers' (and the explainer's) T-SHAP was estimated
        "collapse_reference": reference,
        "default_stacker": "mmshap" if "mmshap" in stackers else next(iter(stackers)),
        **({"mmshap_explainer": explainer_meta} if explainer is not None else {}),
    }
    manifest = save_bundle(out, preset=preset, labels=labels, tokenizer=tokenizer, models=final_models,
                           metrics=metrics, extra=extra, checkpoints=describe(paths),
                           sparse={TFIDF: sparse} if use_tfidf else None, overwrite=True)
    save_stackers(out, stackers)
    save_oof(out, x, y[rows])
    if explainer is not None:
        save_explainer(out, explainer)
    log(f"bundle {bundle_id(manifest)} written to {out} in {metrics['total_s']} s")
    return manifest
