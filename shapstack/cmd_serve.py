"""`shapstack serve` and `shapstack export-triton`: the Triton side of the CLI."""

from __future__ import annotations

import click

from pipeline.errors import UserError
from pipeline.manifest import require_bundle
from shapstack.group import cli, settings_of

BATCH = click.option("--max-batch-size", default=256, show_default=True, type=click.IntRange(1),
                     help="Triton max_batch_size; clients send at most this many rows per request.")
DELAY = click.option("--queue-delay-us", default=500, show_default=True, type=click.IntRange(0),
                     help="Dynamic batching: how long a request may wait for others to join it.")
BUNDLE = click.option("--bundle", type=click.Path(exists=True, file_okay=False),
                      help="Model bundle (default: settings.bundle).")


@cli.command()
@BUNDLE
@click.option("--repository", type=click.Path(exists=True, file_okay=False),
              help="Serve an `export-triton` repository's ONNX models (onnxruntime, its own max_batch_size) "
                   "instead of a bundle.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface the HTTP, gRPC and metrics endpoints listen on (0.0.0.0: every interface).")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@BATCH
@DELAY
@click.option("--device", help="auto | cpu | cuda (default: settings.device)")
@click.pass_context
def serve(ctx: click.Context, bundle: str | None, repository: str | None, host: str, http_port: int, grpc_port: int,
          metrics_port: int, max_batch_size: int, queue_delay_us: int, device: str | None) -> None:
    """Serve a bundle's models from a local Triton server (PyTriton) until interrupted.

    Health: Triton's /v2/health/live and /v2/health/ready (ready = every model loaded)."""
    from serving.server import serve as run

    settings = settings_of(ctx, bundle=bundle, device=device)

    def ready(names: list[str]) -> None:
        click.echo(f"serving {', '.join(names)} on {host}: http :{http_port}, grpc :{grpc_port}, metrics :{metrics_port} "
                   f"(health: /v2/health/ready)")

    if repository and bundle:
        raise UserError("serve --bundle or --repository, not both")
    source = {"repository": repository} if repository else {"bundle_path": require_bundle(settings.bundle)}
    if not run(**source, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
               device=settings.device, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, on_ready=ready):
        click.echo("error: the Triton server failed to start or stopped on its own (see its log above)", err=True)
        ctx.exit(1)


@cli.command("export-triton")
@BUNDLE
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model repository to write.")
@BATCH
@DELAY
@click.option("--gpu/--cpu", default=None, help="instance_group kind (default: KIND_GPU when this machine has one).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Instances per model.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare every ONNX model with torch on random inputs (onnxruntime, 1e-4).")
@click.pass_context
def export_triton(ctx: click.Context, bundle: str | None, out: str, max_batch_size: int, queue_delay_us: int,
                  gpu: bool | None, instances: int, check: bool) -> None:
    """Write a Triton model repository (ONNX, onnxruntime backend) for the NGC tritonserver image."""
    from serving.export import ExportError, export_repository

    settings = settings_of(ctx, bundle=bundle)
    try:
        record = export_repository(require_bundle(settings.bundle), out, max_batch_size=max_batch_size, gpu=gpu,
                                   queue_delay_us=queue_delay_us, instances=instances, check=check, log=click.echo)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"wrote {len(record['models'])} models of bundle {record['bundle_id']} to {out} "
               f"({record['instance_kind']})")
