"""Serving benchmark: /classify throughput and latency, batching against no batching, swaps.

    python benchmarks/serve.py [--model ctp-vit-tiny-32] [--seconds 5] [--gallery 256]
        [--out runs/bench-serve]

One run measures, against real ``ctp serve`` processes (checkpoint-directory mode, no Redis):
1. the bare model's batched forward throughput (images/s, batch 32, no HTTP): the ceiling;
2. /classify throughput and p50/p99 latency at concurrency 1, 8 and 32 (dynamic batching on);
3. the same at concurrency 32 with ``CTP_MAX_BATCH_SIZE=1`` (one request, one forward);
4. p99 at concurrency 32 while new versions land (one every ``--swap-every`` seconds; each swap
   loads, warms up and re-embeds the gallery) against the steady p99 just before.
Each client's first request (connection set-up) is left out of the figures. Clients are httpx
async connections in this process, on the same machine as the server: on a
small CPU they take a share of it, so the figures are lower bounds for the server alone.
Writes ``serve.md`` and ``serve.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from ctp.checkpoint import save_checkpoint
from ctp.data import write_shards
from ctp.models import create_model
from ctp.synthetic import generate_pairs
from ctp.train import preprocess_images
from service.local.infra import free_port

LABELS = ["circle", "square", "triangle", "star", "cross", "plus", "ring", "diamond"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


class Server:
    """``ctp serve`` in a subprocess with the given CTP_ settings."""

    def __init__(self, ckpt: Path, data: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CTP_DATA_DIR": str(data), "CTP_WATCH_INTERVAL_S": "0.2", **env}
        self.cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(self.port),
            "--checkpoint-dir",
            str(ckpt),
            "--log-level",
            "warning",
        ]

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, env=self.env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, bodies: list[dict], *, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients posting /classify back to back for ``seconds``."""
    latencies: list[float] = []
    stamps: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            i = n
            while time.perf_counter() < stop_at:
                i += 1
                t0 = time.perf_counter()
                r = await c.post("/classify", json=bodies[i % len(bodies)])
                t1 = time.perf_counter()
                if i == n + 1:  # a client's first request also pays for its connection: not counted
                    continue
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(t1 - t0)
                stamps.append(t1)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "latencies": latencies,
        "stamps": stamps,
    }


def bare_model(
    model_name: str, images: torch.Tensor, *, batch: int = 32, seconds: float = 1.0, rounds: int = 3
) -> float:
    """Images/s of ``encode_image`` on preprocessed batches: the most the server could reach.

    Best of ``rounds``: on a shared machine the best round is the one least disturbed.
    """
    model = create_model(model_name).model.eval()
    x = images[:batch].repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    best = 0.0
    with torch.inference_mode():
        model.encode_image(x)
        for _ in range(rounds):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                model.encode_image(x)
                n += batch
            best = max(best, n / (time.perf_counter() - t0))
    return best


async def swap_run(
    server: Server, ckpt: Path, model, bodies, *, seconds: float, every: float, model_name: str
):
    """Steady load, then the same load while a new version lands every ``every`` seconds."""
    steady = await load(server.url, bodies, concurrency=32, seconds=seconds)
    swaps = 0

    async def publisher() -> None:
        nonlocal swaps
        end = time.perf_counter() + seconds
        v = 100
        while time.perf_counter() < end - every / 2:
            await asyncio.sleep(every)
            v += 1
            await asyncio.to_thread(
                save_checkpoint, ckpt / f"v{v:06d}", model, {"model": model_name, "version": v}
            )
            swaps += 1

    during, _ = await asyncio.gather(load(server.url, bodies, concurrency=32, seconds=seconds), publisher())
    m = httpx.get(f"{server.url}/model").json()
    return steady, during, swaps, m["swaps"] - 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ctp-vit-tiny-32")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--gallery", type=int, default=256, help="gallery pairs (re-embedded at each swap)")
    p.add_argument("--swap-every", type=float, default=1.0)
    p.add_argument("--out", default="runs/bench-serve")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ctp-bench-serve-"))
    bundle = create_model(args.model, seed=0)
    size = bundle.config["vision_cfg"]["image_size"]
    pairs = generate_pairs(LABELS[:4], max(1, args.gallery // 4), np.random.default_rng(0), size)
    write_shards(pairs, work / "data" / "chunks" / "chunk_000")
    save_checkpoint(work / "ckpt" / "v000001", bundle.model, {"model": args.model, "version": 1})
    bodies = [
        {"image": base64.b64encode(s.image).decode(), "labels": LABELS, "templates": ["a {c}"]}
        for s in pairs[:64]
    ]
    images = preprocess_images(
        [s.image for s in pairs[:64]], [s.key for s in pairs[:64]], bundle.preprocess_val
    )

    print(
        f"model {args.model}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
        f"gallery {len(pairs)} pairs, {args.seconds:.0f} s per measurement"
    )
    limit = bare_model(args.model, images)
    print(f"bare model, batch 32: {limit:.0f} images/s")
    rows = []
    with Server(work / "ckpt", work / "data") as srv:
        for c in (1, 8, 32):
            r = asyncio.run(load(srv.url, bodies, concurrency=c, seconds=args.seconds))
            rows.append(("batched", r))
            print(
                f"batched  c={c:<3} {r['rps']:7.1f} req/s  p50 "
                f"{r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
                f"  errors {r['errors']}"
            )
        steady, during, published, swapped = asyncio.run(
            swap_run(
                srv,
                work / "ckpt",
                bundle.model,
                bodies,
                seconds=args.seconds,
                every=args.swap_every,
                model_name=args.model,
            )
        )
        print(
            f"swaps    c=32  steady p99 {steady['p99_ms']:.1f} ms, during {swapped} swaps p99 "
            f"{during['p99_ms']:.1f} ms ({during['rps']:.1f} req/s, errors {during['errors']})"
        )
    with Server(work / "ckpt", work / "data", CTP_MAX_BATCH_SIZE="1", CTP_MAX_WAIT_MS="0") as srv:
        for c in (8, 32):
            r = asyncio.run(load(srv.url, bodies, concurrency=c, seconds=args.seconds))
            rows.append(("one forward per request", r))
            print(
                f"naive    c={c:<3} {r['rps']:7.1f} req/s  p50 "
                f"{r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
                f"  errors {r['errors']}"
            )

    limit = max(limit, bare_model(args.model, images))  # again after the servers: best of both
    print(f"bare model, batch 32, best of before and after: {limit:.0f} images/s")
    _report(out, args, limit, rows, steady, during, swapped)
    print(f"wrote {out / 'serve.md'} and {out / 'serve.png'}")
    return 0


def _report(out: Path, args, limit: float, rows, steady: dict, during: dict, swapped: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"# Serving benchmark ({args.model}, {os.cpu_count()} CPUs, {args.seconds:.0f} s per row)",
        "",
        f"Bare model, batched forward (batch 32, no HTTP): **{limit:.0f} images/s**",
        "",
        "| server | concurrency | req/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {r['concurrency']} | {r['rps']:.1f} | "
        f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |"
        for name, r in rows
    ]
    lines += [
        "",
        f"Swaps at concurrency 32: steady p99 {steady['p99_ms']:.1f} ms ({steady['rps']:.1f} req/s); "
        f"with {swapped} swaps in {args.seconds:.0f} s (gallery re-embedded each time) p99 "
        f"{during['p99_ms']:.1f} ms ({during['rps']:.1f} req/s), {during['errors']} errors.",
        "",
    ]
    (out / "serve.md").write_text("\n".join(lines))

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, marker in (("batched", "o"), ("one forward per request", "s")):
        rs = [r for n, r in rows if n == name]
        a.plot([r["concurrency"] for r in rs], [r["rps"] for r in rs], marker=marker, label=name)
    a.axhline(limit, ls="--", c="gray", label="bare model, batch 32 (images/s)")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("concurrent clients")
    a.set_ylabel("/classify requests/s")
    a.legend(fontsize=8)
    for name, r in (("steady", steady), ("during swaps", during)):
        t0 = min(r["stamps"]) if r["stamps"] else 0
        b.scatter([t - t0 for t in r["stamps"]], [1000 * x for x in r["latencies"]], s=2, label=name)
    b.set_xlabel("seconds")
    b.set_ylabel("latency ms")
    b.set_title("concurrency 32: steady vs during swaps")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
