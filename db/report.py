"""`shapstack report RUN`: one static HTML page with PNG plots, readable offline and attachable.

Everything comes from the run's stored rows (predictions, contributions, collapse metrics), so a
report can be rebuilt at any time from the database alone.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import numpy as np
from sqlalchemy import select

from db import models as m
from db.runs import output_rows
from db.store import run_progress


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path.name


def _bar(path: Path, counts: Counter, title: str) -> str:
    plt = _plt()
    items = counts.most_common(40)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(items))))
    ax.barh([k[:30] for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel("products")
    return _save(fig, path)


def _hist(path: Path, values: np.ndarray, title: str, xlabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=20, range=(0, 1), color="#55a868")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("products")
    return _save(fig, path)


def _tshap_by_category(path: Path, rows: list[dict]) -> str:
    plt = _plt()
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["category"], []).append(r["t_shap"])
    cats = sorted(by, key=lambda c: -len(by[c]))[:30]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(cats))))
    ax.boxplot([by[c] for c in cats][::-1], orientation="horizontal", tick_labels=[c[:30] for c in cats][::-1])
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_title("T-SHAP per predicted category (1 = text only, 0 = image only)")
    return _save(fig, path)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(factory, run_id: int, out: str | Path) -> Path:
    """Write OUT/index.html and its PNGs; returns the HTML path."""
    from train.evaluate import confusion_png, scores

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with factory() as s:
        progress = run_progress(s, run_id)
        rows = output_rows(s, run_id)
        metrics = s.scalars(select(m.CollapseMetric).where(m.CollapseMetric.run_id == run_id)).all()
    if not rows:
        raise ValueError(f"run {run_id} has no predictions yet")
    sections = [
        f"<h1>shapstack run {run_id}</h1>",
        f"<p>feed <code>{html.escape(progress['feed'])}</code>, {progress['products']} products, "
        f"{progress['rejects']} rejects, model {html.escape(str(progress['bundle']))}, stacker "
        f"{html.escape(str(progress['stacker']))}, status {progress['status']}</p>",
    ]
    plots = [
        _bar(out / "categories.png", Counter(r["category"] for r in rows), "Predicted categories"),
        _hist(out / "confidence.png", np.array([r["confidence"] for r in rows]), "Confidence", "stacker probability"),
        _hist(out / "t_shap.png", np.array([r["t_shap"] for r in rows if r["t_shap"] is not None]),
              "T-SHAP of the multimodal model", "T-SHAP (text share of the contribution)"),
        _tshap_by_category(out / "t_shap_by_category.png", [r for r in rows if r["t_shap"] is not None]),
    ]
    sections += [f'<img src="{p}" alt="{p}">' for p in plots]

    flagged = [[c.scope, c.metric.removeprefix("flag_")] for c in metrics if c.metric.startswith("flag_") and c.value]
    overall = [[c.metric, f"{c.value:.3f}"] for c in metrics if c.scope == "all" and not c.metric.startswith("flag_")]
    sections += ["<h2>Collapse</h2>", _table(["metric", "value"], overall),
                 "<h3>Flags raised</h3>", _table(["scope", "flag"], flagged) if flagged else "<p>none</p>"]

    labelled = [r for r in rows if r["label"]]
    if labelled:
        classes = sorted({r["label"] for r in labelled} | {r["category"] for r in labelled})
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[r["label"]] for r in labelled])
        present = sorted(set(y.tolist()))
        table = []
        for name, col in (("stacked", "category"), ("text", "text_category"), ("image", "image_category"),
                          ("multimodal", "multimodal_category")):
            pred = np.array([index.get(r[col], -1) for r in labelled])
            sc = scores(y, pred, present)
            table.append([name] + [f"{sc[k]:.3f}" for k in ("macro_p", "macro_r", "macro_f1", "weighted_f1", "accuracy")])
        confusion_png(out / "confusion.png", y, np.array([index[r["category"]] for r in labelled]), classes, present,
                      "stacked prediction (normalised by row)")
        sections += [f"<h2>Evaluation on {len(labelled)} labelled products</h2>",
                     _table(["model", "P", "R", "F1", "weighted F1", "accuracy"], table),
                     '<img src="confusion.png" alt="confusion matrix">']
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>shapstack run {}</title><style>"
            "body{{font-family:sans-serif;max-width:960px;margin:2em auto}}img{{max-width:100%;display:block;margin:1em 0}}"
            "table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}</style></head><body>{}"
            "</body></html>").format(run_id, "\n".join(sections))
    path = out / "index.html"
    path.write_text(page)
    return path
