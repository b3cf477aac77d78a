"""What the CLI reports after a run: the ingest summary, the evaluation table, the collapse metrics,
as text for a person and as one JSON document (`--json`) for a script."""

from __future__ import annotations

import json
import math

import click
import numpy as np

from db.progress import reject_reasons, run_progress
from db.results import audit_error, collapse_metrics_of, output_rows
from pipeline.metrics import format_table, scores


def audit_line(audit: dict) -> str:
    """One line on a run's amortized MM-SHAP audit (db.results.audit_error)."""
    low, high = audit["rmse_net_ci"]
    se = audit["mean_audit_stderr"]
    return (f"audit on {audit['n']} products: T-SHAP RMSE {audit['rmse_net']:.3f} [{low:.3f}, {high:.3f}] net of the "
            f"audit's own noise ({audit['rmse']:.3f} against the audit's values, mean stderr "
            f"{'n/a' if se is None else format(se, '.3f')}); mean diff {audit['mean_diff']:+.3f}")


def print_json(payload) -> None:
    click.echo(json.dumps(payload, default=str))


def ingest_summary(factory, run_id: int) -> dict:
    with factory() as session:
        p = run_progress(session, run_id)
        reasons = reject_reasons(session, run_id)
    return {"run": run_id, "products": p["products"], "rejects": p["rejects"],
            "reject_reasons": dict(reasons.most_common())}


def print_ingest_summary(factory, run_id: int, echo=click.echo) -> dict:
    summary = ingest_summary(factory, run_id)
    echo(f"run {run_id}: {summary['products']} products accepted, {summary['rejects']} rejected")
    for reason, n in summary["reject_reasons"].items():
        echo(f"  {n:>7}  {reason}")
    return summary


def evaluation(rows: list[dict], labels) -> tuple[int, dict[str, dict[str, float]]]:
    """(labelled products, {model: scores}) of the stacked and each base model's category."""
    index = {c: i for i, c in enumerate(labels)}
    labelled = [r for r in rows if r["label"] in index]
    if not labelled:
        return 0, {}
    y = np.array([index[r["label"]] for r in labelled])
    present = sorted(set(y.tolist()))
    return len(labelled), {name: scores(y, np.array([index.get(r[col], -1) for r in labelled]), present)
                           for name, col in (("stacked", "category"), ("text", "text_category"),
                                             ("image", "image_category"), ("multimodal", "multimodal_category"))}


def collapse_summary(factory, run_id: int) -> dict:
    """The run-wide collapse metrics and every flag raised ("flag (category or run)")."""
    with factory() as s:
        metrics = [(c.scope, c.metric, c.value) for c in collapse_metrics_of(s, run_id)]
    overall = {k: (None if math.isnan(v) else v) for scope, k, v in metrics
               if scope == "all" and not k.startswith("flag_")}
    raised = sorted({f"{k.removeprefix('flag_')} ({'run' if scope == 'all' else scope})"
                     for scope, k, v in metrics if k.startswith("flag_") and v})
    return {"metrics": overall, "flags": raised}


def run_summary(factory, run_id: int, labels) -> dict:
    """Everything `classify` reports about a finished run, as one dict (the --json document)."""
    with factory() as s:
        p = run_progress(s, run_id)
        rows = output_rows(s, run_id)
        audit = audit_error(s, run_id)
    n_labelled, table = evaluation(rows, labels)
    return {**ingest_summary(factory, run_id), **{k: p[k] for k in (
        "status", "mode", "bundle", "stacker", "predicted", "failed", "dead", "created", "finished", "timings",
        "options")}, "labelled": n_labelled, "evaluation": table, "collapse": collapse_summary(factory, run_id),
        "mmshap_audit": audit}


def print_run_summary(summary: dict, echo=click.echo) -> None:
    """The evaluation table when the feed has labels, and the run's collapse metrics."""
    if summary["evaluation"]:
        echo(f"evaluation on {summary['labelled']} labelled products "
             f"({summary['predicted'] - summary['labelled']} without a known label):")
        echo(format_table(summary["evaluation"]))
    metrics = summary["collapse"]["metrics"]
    if metrics:
        get = lambda k: float("nan") if metrics.get(k) is None else metrics[k]  # noqa: E731
        echo(f"collapse: mean T-SHAP {get('mean_t_shap'):.3f} (std {get('std_t_shap'):.3f}, "
             f"{get('n_reliance'):.0f} products with both modalities and a T-SHAP), "
             f"MM agrees with text {get('agree_text'):.1%} / image {get('agree_image'):.1%}; "
             f"on {get('n_disagree'):.0f} text/image disagreements it follows text {get('evidence_image_ignored'):.1%}")
        echo("collapse flags: " + (", ".join(summary["collapse"]["flags"]) or "none"))
    audit = summary.get("mmshap_audit")
    if audit:
        echo("amortized MM-SHAP " + audit_line(audit))
