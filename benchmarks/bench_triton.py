"""Throughput of the infer stage: in-process torch vs a local Triton server (PyTriton), HTTP and gRPC.

    .venv/bin/python benchmarks/bench_triton.py --preset small --products 200 --budget 32 --threads 1

Products per second of pipeline.inference.infer (preprocessing, the three base models and, with a
budget, token-mode MM-SHAP) on a synthetic catalogue, with untrained models of the preset
(throughput does not depend on the weights). The servers are `shapstack serve` in a subprocess on
the same machine, on the bundle (torch) and on its `export-triton` repository (ONNX Runtime), so
client and server share its cores: --threads sets the intra-op threads of torch on both sides
(OMP_NUM_THREADS for the server). Each figure is the best of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backend import InProcessBackend  # noqa: E402
from pipeline.bundle import load_bundle, save_bundle  # noqa: E402
from pipeline.feed import read_feed  # noqa: E402
from pipeline.models import KINDS, create_model  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402
from pipeline.records import Product  # noqa: E402
from pipeline.inference import infer  # noqa: E402
from pipeline.mmshap import MMShapConfig  # noqa: E402
from pipeline.synthetic import make_catalogue  # noqa: E402
from pipeline.tokenizer import train_tokenizer  # noqa: E402
from serving.client import TritonBackend  # noqa: E402
from serving.export import export_repository  # noqa: E402
from serving.local import serve_subprocess  # noqa: E402


def best_rate(backend, products: list[Product], budget: int, repeats: int) -> float:
    config = MMShapConfig(mode="token", budget=budget)
    infer(backend, products[:8], config, seed_key="bench")  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        infer(backend, products, config, seed_key="bench")
        best = min(best, time.perf_counter() - start)
    return len(products) / best


@contextmanager
def server(source: list[str], threads: int, log: Path):
    """`shapstack serve` on free ports; yields (http URL, grpc URL)."""
    try:
        with serve_subprocess([*source, "--device", "cpu"], log, timeout_s=180,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}) as urls:
            yield urls["http"], urls["grpc"]
    except RuntimeError as exc:
        sys.exit(f"server did not start: {exc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--budget", type=int, default=32, help="MM-SHAP coalitions per product for the second column")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, in process and in the server")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-onnx", action="store_true", help="Skip the exported repository (ONNX Runtime) rows.")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_triton_"))
    p = get_preset(args.preset)
    feed = make_catalogue(work / "cat", args.products, args.classes, seed=0, image_size=p["resnet"]["image_size"])
    products = [x for x in read_feed(feed) if isinstance(x, Product)]
    labels = sorted({x.label for x in products})
    tok = train_tokenizer([x.text for x in products], vocab_size=p["vocab_size"], min_frequency=1)
    torch.manual_seed(0)
    models = {k: create_model(k, p, len(labels), vocab_size=tok.vocab_size).eval() for k in KINDS}
    save_bundle(work / "bundle", preset=p, labels=labels, tokenizer=tok, models=models)
    bundle = load_bundle(work / "bundle", device="cpu")
    sources = {"PyTriton, torch": ["--bundle", str(work / "bundle")]}
    if not args.no_onnx:
        export_repository(work / "bundle", work / "repo", max_batch_size=max(args.batch_size, 64), gpu=False,
                          log=lambda _: None)
        sources["PyTriton, ONNX Runtime"] = ["--repository", str(work / "repo")]

    print(f"preset {args.preset}, {len(products)} products, batch size {args.batch_size}, "
          f"{args.threads} torch thread(s), {os.cpu_count()} CPUs, MM-SHAP token mode\n")
    print(f"| backend | products/s, no MM-SHAP | products/s, MM-SHAP budget {args.budget} |")
    print("| --- | ---: | ---: |")

    def row(name: str, backend) -> None:
        rates = [best_rate(backend, products, budget, args.repeats) for budget in (0, args.budget)]
        print(f"| {name} | {rates[0]:.1f} | {rates[1]:.1f} |", flush=True)

    row("in-process torch", InProcessBackend(bundle, device="cpu", batch_size=args.batch_size))
    for name, source in sources.items():
        with server(source, args.threads, work / f"serve-{len(name)}.log") as (http, grpc):
            for proto, url in (("HTTP", http), ("gRPC", grpc)):
                with TritonBackend(url, bundle, batch_size=args.batch_size) as backend:
                    row(f"Triton {proto} ({name})", backend)


if __name__ == "__main__":
    main()
