"""Commands that make and measure models: train, evaluate."""

from __future__ import annotations

import click

from pipeline.feed import check_feed
from pipeline.manifest import require_bundle
from pipeline.presets import preset_names
from shapstack.checkpoint_options import checkpoint_options, checkpoints_of, tfidf_option
from shapstack.group import cli, echo_for, json_option, progress_bar, settings_of
from shapstack.summaries import print_json


@cli.command()
@click.argument("feed", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--preset", default="small", show_default=True, type=click.Choice(preset_names()))
@click.option("--label-column", default="category", show_default=True)
@click.option("--group-column", default="group_id", show_default=True)
@click.option("--min-class-size", default=20, show_default=True, type=click.IntRange(1))
@click.option("--folds", default=5, show_default=True, type=click.IntRange(1),
              help="K-fold cross-fitting for the stackers' inputs; 1 = a 20% held-out split.")
@click.option("--seed", default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(1), help="Override the preset's epochs for every model.")
@click.option("--test-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 0.9),
              help="Hold out this share of groups (by hash) for `evaluate/classify --split test`.")
@click.option("--mmshap-budget", type=click.IntRange(0), help="Coalitions per product for out-of-fold MM-SHAP.")
@click.option("--explainer/--no-explainer", default=True, show_default=True,
              help="Fit amortized MM-SHAP's explainer (docs/amortized.md).")
@click.option("--explainer-products", default=2000, show_default=True, type=click.IntRange(10),
              help="With --folds > 1: training products whose MM-SHAP under the final models the explainer learns from.")
@tfidf_option
@click.option("--tokenizer", type=click.Path(exists=True), help="A local pretrained tokenizer (default: train WordPiece).")
@checkpoint_options
@click.option("--paper-epochs", default=50_000, show_default=True, type=click.IntRange(1),
              help="Full-batch SGD epochs of the mmshap-paper stackers (the paper's Table I: 50,000).")
@click.option("--device", help="auto | cpu | cuda")
@click.pass_context
def train(ctx: click.Context, feed: str, out: str, preset: str, label_column: str, group_column: str,
          min_class_size: int, folds: int, seed: int, epochs: int | None, test_fraction: float,
          mmshap_budget: int | None, explainer: bool, explainer_products: int, tfidf: bool | None,
          tokenizer: str | None, paper_epochs: int, device: str | None, **checkpoints: str | None) -> None:
    """Train the base models and every stacker into a model bundle (resumable)."""
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    settings = settings_of(ctx, device=device)
    cfg = TrainConfig(preset=preset, label_column=label_column, group_column=group_column,
                      min_class_size=min_class_size, folds=folds, seed=seed, epochs=epochs, device=settings.device,
                      test_fraction=test_fraction,
                      mmshap_budget=mmshap_budget, explainer=explainer, explainer_products=explainer_products, tokenizer=tokenizer,
                      checkpoints=checkpoints_of(**checkpoints), paper_epochs=paper_epochs, tfidf=tfidf,
                      **{f"mmshap_{k}": v for k, v in {
                          "mode": settings.mmshap_image_mode, "target_stderr": settings.mmshap_target_stderr,
                          "cap": settings.mmshap_cap, "players": settings.mmshap_players}.items() if v is not None})
    check_feed(feed)
    train_bundle(feed, out, cfg, settings.limits, log=click.echo)


@cli.command()
@click.argument("feed", type=click.Path())
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Model bundle (default: settings.bundle).")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="all", show_default=True,
              help="Which side of the bundle's --test-fraction split to evaluate on.")
@click.option("--report", type=click.Path(file_okay=False), help="Write per-class CSV, confusion PNGs and metrics here.")
@click.option("--mmshap-budget", type=click.IntRange(0), help="Coalitions per product (0 = skip MM-SHAP).")
@click.option("--mmshap-mode", type=click.Choice(["token", "pixel"]), help="Image players (default: the bundle's).")
@click.option("--tfidf", is_flag=True, help="Add a TF-IDF + logistic regression baseline trained on the train side.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1),
              help="Refit the seeded stackers with seeds 0..N-1 on the bundle's out-of-fold inputs; report mean and spread.")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, type=click.IntRange(100),
              help="Resamples of the test products for the 95% paired-bootstrap intervals (seed 0).")
@click.option("--device", help="auto | cpu | cuda")
@json_option
@click.pass_context
def evaluate(ctx: click.Context, feed: str, bundle: str | None, split: str, report: str | None,
             mmshap_budget: int | None, mmshap_mode: str | None, tfidf: bool, seeds: int, n_boot: int,
             device: str | None, as_json: bool) -> None:
    """Macro/weighted P, R, F1 and accuracy of every base model and stacker (the paper's Table II).

    MM-SHAP budget and mode are resolved as `classify` resolves them (flags, settings, the bundle's).
    Reads no database and writes none.
    """
    from train.evaluate import evaluate_bundle

    settings = settings_of(ctx, device=device, bundle=bundle, mmshap_budget=mmshap_budget,
                           mmshap_image_mode=mmshap_mode)
    check_feed(feed)
    with progress_bar("evaluate", unit=" products") as bar:
        def advance(n: int, total: int) -> None:
            bar.total = total
            bar.update(n)

        table = evaluate_bundle(feed, require_bundle(settings.bundle), split=split, report=report,
                                limits=settings.limits, budget=settings.mmshap_budget,
                                mode=settings.mmshap_image_mode, device=settings.device,
                                batch_size=settings.batch_size, tfidf=tfidf, seeds=seeds, n_boot=n_boot,
                                log=echo_for(as_json), progress=advance)
    if as_json:
        print_json(table)
