"""`shapstack report RUN`: one static HTML page with PNG plots and thumbnails, readable offline and
attachable (every file it shows is inside the report folder, referenced by a relative path).

Everything comes from the run's stored rows (predictions, contributions, collapse metrics,
rejects, dead letters, timings), so a report can be rebuilt at any time from the database alone.
Sections: summary and stage timings; per-class precision, recall and F1 and the most confused
pairs (labelled products); products to review (lowest confidence, most disagreeing models) with
thumbnails; MM-SHAP reliability (budget, evaluations, error bars, products without a value);
collapse; rejects by reason code; dead letters.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from db.progress import dead_letters, rejects_by_code, run_progress
from db.results import collapse_metrics_of, images_of, output_rows
from jobs.plots import bar, confusion_png, hist, tshap_by_category, tshap_error_bars
from pipeline.errors import UserError
from pipeline.images import is_url, load_image
from pipeline.metrics import scores

REVIEW = 12  # products in each review list
THUMB_PX = 96
STYLE = """
body{font-family:sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222}
img.plot{max-width:100%;display:block;margin:1em 0}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
td.num{text-align:right}img.thumb{width:64px;height:64px;object-fit:contain}nav a{margin-right:1em}
.note{color:#555}
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return '<td class="num">' + ("NULL" if math.isnan(value) else f"{value:.3f}") + "</td>"
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if isinstance(value, Raw):
        return f"<td>{value}</td>"
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


class Raw(str):
    """HTML that goes into a cell as it is (built by this module, never from data)."""


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _thumbnail(ref: str | None, out: Path, name: str) -> str:
    """A thumbnail of the product's image inside the report folder; a short text when there is none."""
    if not ref:
        return "no image"
    if is_url(ref):
        return f'<a href="{html.escape(ref)}">image URL</a>'
    try:
        image = load_image(ref)
        image.thumbnail((THUMB_PX, THUMB_PX))
        (out / "thumbs").mkdir(exist_ok=True)
        image.convert("RGB").save(out / "thumbs" / f"{name}.png")
    except Exception as exc:  # noqa: BLE001 - a moved or broken image file: say so, keep the report
        return f"image unavailable ({html.escape(type(exc).__name__)})"
    return f'<img class="thumb" src="thumbs/{name}.png" alt="{html.escape(name)}">'


def _disagreement(r: dict) -> int:
    return len({r["category"], r["text_category"], r["image_category"], r["multimodal_category"]})


def _review(rows: list[dict], images: dict, out: Path) -> list[str]:
    lowest = sorted(rows, key=lambda r: r["confidence"])[:REVIEW]
    disagreeing = sorted((r for r in rows if _disagreement(r) > 1),
                         key=lambda r: (-_disagreement(r), r["confidence"]))[:REVIEW]
    header = ["image", "product", "title", "label", "stacked", "confidence", "text", "image model", "multimodal",
              "T-SHAP"]
    sections = []
    for title, chosen, why in (("Lowest confidence", lowest, "the stacker's least certain predictions"),
                               ("Most disagreeing models", disagreeing,
                                "products on which the stacker and the three base models disagree most")):
        table = [[Raw(_thumbnail(images.get(r["product_id"]), out, f"p{i}-{title[0]}")), r["product_id"],
                  (r["title"] or "")[:80], r["label"] or "-", r["category"], r["confidence"], r["text_category"],
                  r["image_category"], r["multimodal_category"],
                  float("nan") if r["t_shap"] is None else r["t_shap"]] for i, r in enumerate(chosen)]
        sections += [f"<h3>{title}</h3>", f"<p class='note'>{why}</p>",
                     _table(header, table) if table else "<p>none</p>"]
    return sections


def _per_class(labelled: list[dict], out: Path) -> list[str]:
    classes = sorted({r["label"] for r in labelled} | {r["category"] for r in labelled})
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[r["label"]] for r in labelled])
    present = sorted(set(y.tolist()))
    models = []
    for name, col in (("stacked", "category"), ("text", "text_category"), ("image", "image_category"),
                      ("multimodal", "multimodal_category")):
        sc = scores(y, np.array([index.get(r[col], -1) for r in labelled]), present)
        models.append([name] + [sc[k] for k in ("macro_p", "macro_r", "macro_f1", "weighted_f1", "accuracy")])
    pred = np.array([index[r["category"]] for r in labelled])
    p, rc, f, support = precision_recall_fscore_support(y, pred, labels=present, zero_division=0)
    per_class = sorted(([classes[c], int(support[i]), float(p[i]), float(rc[i]), float(f[i])]
                        for i, c in enumerate(present)), key=lambda row: row[4])
    pairs = Counter((r["label"], r["category"]) for r in labelled if r["label"] != r["category"])
    by_label = Counter(r["label"] for r in labelled)
    confused = [[t, q, n, n / by_label[t]] for (t, q), n in pairs.most_common(10)]
    confusion_png(out / "confusion.png", y, pred, classes, present, "stacked prediction (normalised by row)")
    return [f"<h2 id='evaluation'>Evaluation on {len(labelled)} labelled products</h2>",
            _table(["model", "macro P", "macro R", "macro F1", "weighted F1", "accuracy"], models),
            "<h3>Per class (stacked), worst F1 first</h3>",
            _table(["class", "support", "precision", "recall", "F1"], per_class),
            "<h3>Most confused pairs</h3>",
            _table(["true", "predicted", "products", "share of the true class"], confused) if confused
            else "<p>no confusions</p>",
            '<img class="plot" src="confusion.png" alt="confusion matrix">']


def _reliability(rows: list[dict], options: dict, out: Path) -> list[str]:
    with_value = [r for r in rows if r["t_shap"] is not None]
    nulls = len(rows) - len(with_value)
    errors = np.array([r["t_shap_stderr"] for r in with_value if r["t_shap_stderr"] is not None], float)
    no_error_bar = len(with_value) - len(errors)
    evals = np.array([r["mmshap_evaluations"] for r in with_value if r["mmshap_evaluations"] is not None], float)
    modes = sorted({r["mmshap_mode"] for r in with_value if r["mmshap_mode"]})

    def stat(values: np.ndarray, q: float) -> float:
        return float(np.quantile(values, q)) if len(values) else float("nan")

    table = [["budget asked (coalitions per product)", str(options.get("mmshap_budget", "bundle default"))],
             ["image players", ", ".join(modes) or "-"],
             ["model evaluations per product: min / median / max",
              f"{stat(evals, 0):.0f} / {stat(evals, 0.5):.0f} / {stat(evals, 1):.0f}" if len(evals) else "-"],
             ["standard error of T-SHAP: median / 90th percentile",
              f"{stat(errors, 0.5):.3f} / {stat(errors, 0.9):.3f}" if len(errors) else "-"],
             ["products without T-SHAP (NULL)", nulls],
             ["products with T-SHAP but no finite error bar", no_error_bar]]
    sections = ["<h2 id='mmshap'>MM-SHAP reliability</h2>",
                "<p class='note'>T-SHAP is estimated from sampled coalitions: each value has a standard error. "
                "Read a category's mean T-SHAP, not one product's value, when the error bars are wide.</p>",
                _table(["", "value"], table)]
    if with_value:
        sections.append(f'<img class="plot" src="{tshap_error_bars(out / "t_shap_error_bars.png", with_value)}" '
                        'alt="T-SHAP with error bars">')
    return sections


def _interval(get, name: str) -> str:
    if name not in get:
        return ""
    lo, hi, n = get.get(f"{name}_ci_low"), get.get(f"{name}_ci_high"), get.get(f"{name}_n")
    return f"{get[name]:.3f} [{lo:.3f}, {hi:.3f}]" + (f" n={n:.0f}" if n is not None else "")


def flag_rows(metrics) -> list[list[str]]:
    """One row per raised flag, with the evidence behind it (95% intervals)."""
    by_scope: dict[str, dict[str, float]] = {}
    for c in metrics:
        by_scope.setdefault(c.scope, {})[c.metric] = c.value
    rows = []
    for scope, get in by_scope.items():
        for metric in sorted(k for k, v in get.items() if k.startswith("flag_") and v):
            flag = metric.removeprefix("flag_")
            m = flag.removesuffix("_collapse")
            if flag == "drift":
                lo, hi = get.get("drift_t_shap_ci_low"), get.get("drift_t_shap_ci_high")
                rows.append([scope, flag, "", "", "", _interval(get, "mean_t_shap"),
                             f"{get['drift_t_shap']:+.3f} [{lo:+.3f}, {hi:+.3f}]"])
                continue
            source = "run labels" if get.get(f"evidence_{m}_signal_from_labels") else "training reference"
            rows.append([scope, flag, _interval(get, f"evidence_{m}_ignored"), _interval(get, f"evidence_{m}_signal"),
                         source, _interval(get, f"evidence_{m}_share"), ""])
    return rows


def write_report(factory, run_id: int, out: str | Path) -> Path:
    """Write OUT/index.html, its PNGs and thumbnails; returns the HTML path."""
    out = Path(out)
    with factory() as s:
        progress = run_progress(s, run_id)
        rows = output_rows(s, run_id)
        metrics = collapse_metrics_of(s, run_id)
        rejects = rejects_by_code(s, run_id)
        dead = dead_letters(s, run_id)
    if not rows:
        hint = f": classify it with `shapstack classify --run {run_id}`" if progress["status"] == "ingested" else ""
        raise UserError(f"run {run_id} has no predictions yet{hint}")
    out.mkdir(parents=True, exist_ok=True)
    labelled = [r for r in rows if r["label"]]
    review = sorted(rows, key=lambda r: r["confidence"])[:REVIEW] + [r for r in rows if _disagreement(r) > 1]
    with factory() as s:
        images = images_of(s, run_id, sorted({r["product_id"] for r in review}))

    timings = progress["timings"] or {}
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("evaluation", "evaluation"), ("review", "review"), ("mmshap", "MM-SHAP"), ("collapse", "collapse"),
        ("rejects", "rejects"), ("dead", "dead letters"), ("timings", "timings")))
    sections = [
        f"<h1>shapstack run {run_id}</h1>", f"<nav>{nav}</nav>",
        _table(["", ""], [["feed", progress["feed"]], ["status", progress["status"]],
                          ["model bundle", progress["bundle"]], ["stacker", progress["stacker"]],
                          ["created", progress["created"]], ["finished", progress["finished"]],
                          ["products", progress["products"]], ["predicted", progress["predicted"]],
                          ["failed", progress["failed"]], ["dead-lettered", progress["dead"]],
                          ["rejected rows", progress["rejects"]]]),
    ]
    plots = [
        bar(out / "categories.png", Counter(r["category"] for r in rows), "Predicted categories"),
        hist(out / "confidence.png", np.array([r["confidence"] for r in rows]), "Confidence", "stacker probability"),
    ]
    with_t = [r for r in rows if r["t_shap"] is not None]
    if with_t:
        plots += [hist(out / "t_shap.png", np.array([r["t_shap"] for r in with_t]),
                       "T-SHAP of the multimodal model", "T-SHAP (text share of the contribution)"),
                  tshap_by_category(out / "t_shap_by_category.png", with_t)]
    sections += [f'<img class="plot" src="{p}" alt="{p}">' for p in plots]
    if labelled:
        sections += _per_class(labelled, out)
    else:
        sections += ["<h2 id='evaluation'>Evaluation</h2>", "<p>no labelled products in this run</p>"]
    sections += ["<h2 id='review'>Products to review</h2>", *_review(rows, images, out)]
    sections += _reliability(rows, progress["options"] or {}, out)

    flagged = flag_rows(metrics)
    overall = [[c.metric, c.value] for c in metrics if c.scope == "all" and not c.metric.startswith("flag_")]
    sections += ["<h2 id='collapse'>Collapse</h2>", _table(["metric", "value"], overall),
                 "<h3>Flags raised, with their evidence (95% intervals)</h3>",
                 _table(["scope", "flag", "multimodal model ignores it on disagreements", "its unimodal model wins "
                         "decisive disagreements", "measured on", "reliance share (T-SHAP / V-SHAP)",
                         "drift of mean T-SHAP"], flagged) if flagged else "<p>none</p>"]
    sections += ["<h2 id='rejects'>Rejected rows by reason</h2>",
                 _table(["code", "rows", "example reason"], [[e["code"], e["n"], e["example"]] for e in rejects])
                 if rejects else "<p>none</p>"]
    sections += ["<h2 id='dead'>Dead letters</h2>",
                 _table(["product", "row", "stage", "attempts", "last error"],
                        [[d["product_id"], d["row"], d["stage"], d["attempts"], " ".join(d["error"].split())[:300]]
                         for d in dead]) if dead else "<p>none</p>"]
    sections += ["<h2 id='timings'>Stage timings</h2>",
                 _table(["stage", "seconds"], [[k.removesuffix("_s"), float(v)] for k, v in timings.items()])
                 if timings else "<p>none recorded</p>"]
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>shapstack run {run_id}</title><style>{STYLE}</style></head><body>"
            + "\n".join(sections) + "</body></html>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
