"""Training-step cost of ctp's finetune and incclip steps against open_clip's own step.

Pairs/s, peak memory and MFU.

    python benchmarks/gpu_step.py step [--model ViT-B-32] [--batch-size 256] [--steps 20] [--warmup 3]
                                       [--rounds 2] [--device cuda] [--peak-tflops F] [--json FILE]
    # GPU, torch/CUDA, a bf16 matmul ceiling:
    python benchmarks/gpu_step.py env [--device cuda] [--json FILE]

``step`` trains the same chunk three ways in one process: ``finetune`` and ``incclip`` through
``ctp.train.train_on_chunk`` (what the service's trainer runs: bf16 autocast on CUDA, AdamW, grad
clipping, replay + pseudo-text negatives + KD for incclip), and a plain open_clip training step
(``open_clip.ClipLoss``, AdamW with open_clip's no-decay rule, logit-scale clamp, no grad clip) on
the same batches. Per variant: ``warmup`` steps first (a separate chunk: kernel selection, cuBLAS
handles and allocator growth stay out of the figures), then ``steps`` timed steps; the clock is
CUDA-synchronised (ctp's loop syncs on ``loss.item()`` every step; the open_clip loop is
synchronised before and after), and the median over ``rounds`` is reported with its spread.

Peak memory (CUDA only, else None): ``torch.cuda.reset_peak_memory_stats`` before each variant;
``peak_gib`` is ``max_memory_allocated`` over its warm-up and timed steps, including what all
variants share (the chunk's images when ``--data device``, the base model and the teacher),
``base_gib`` is what was allocated when it started, and ``variant_gib = peak - base`` is what the
variant itself needs (its model copy, gradients, optimizer state, activations).

MFU = (model FLOPs per pair x pairs/s) / peak dense bf16 FLOP/s. Model FLOPs per pair are counted
with ``torch.utils.flop_counter.FlopCounterMode`` on one forward + ClipLoss + backward of the
open_clip step at the run's batch size (an analytic ViT formula is reported beside it as a check);
the same figure is used for every variant, so work incclip does beyond a plain CLIP step (the text
tower over its pseudo-text negatives, the KD logits) shows as lower MFU, not as more FLOPs. The
peak is ``--peak-tflops`` or, by GPU name, the datasheet's dense bf16 rate (H100 SXM/H200: 989
TFLOP/s); ``env`` also measures a bf16 8192^3 matmul, and ``mfu_vs_matmul`` divides by that.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# dense bf16 tensor-core rates from the vendors' datasheets, TFLOP/s (without sparsity)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
PACKAGES = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "ftfy",
    "wcwidth",
    "regex",
    "safetensors",
    "timm",
    "transformers",
    "huggingface_hub",
    "numpy",
    "pillow",
)


def peak_tflops_for(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return value
    return None


def sig(x: float | None, digits: int = 4) -> float | None:
    """``x`` to ``digits`` significant digits (tiny CPU rates stay non-zero)."""
    return None if x is None else float(f"{x:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- env


def matmul_tflops(device: torch.device, n: int = 8192, warmup: int = 3, reps: int = 10) -> float:
    """bf16 n^3 matmul rate on random data, median of ``reps`` event-timed products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


def environment(device: torch.device) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": versions,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            peak_bf16_tflops_datasheet=peak_tflops_for(props.name),
        )
        if shutil.which("nvidia-smi"):
            q = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        env["matmul_bf16_tflops"] = round(matmul_tflops(device), 1)
    return env


# ---------------------------------------------------------------------------------------- FLOPs


def flops_formula(config: dict, batch_size: int) -> float | None:
    """Training FLOPs per pair of an open_clip ViT CLIP: 3x the forward matmuls, the patch conv 2x.

    Forward per transformer layer of width w over T tokens: 24 T w^2 (qkv, out proj, 4x MLP) +
    4 T^2 w (scores, weighted values); plus the patch embedding, the two projections and the two
    b x b logit matrices of ClipLoss. Backward is twice the forward except the patch embedding,
    whose input needs no gradient. None for non-ViT towers.
    """
    v, t, d = config.get("vision_cfg", {}), config.get("text_cfg", {}), config["embed_dim"]
    if "patch_size" not in v or "timm_model_name" in v or "hf_model_name" in t:
        return None

    def layers(n_layers, tokens, width, mlp_ratio):
        return n_layers * (2 * tokens * width * width * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * width)

    p, w = v["patch_size"], v["width"]
    patches = (v["image_size"] // p) ** 2
    conv = 2 * patches * 3 * p * p * w
    fwd = conv + layers(v["layers"], patches + 1, w, v.get("mlp_ratio", 4.0)) + 2 * w * d
    fwd += layers(t["layers"], t["context_length"], t["width"], t.get("mlp_ratio", 4.0)) + 2 * t["width"] * d
    fwd += 2 * 2 * batch_size * d  # logits_per_image and logits_per_text, per pair
    return 3 * fwd - conv


def open_clip_output(out):
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[:3]


def flops_counted(model, images, tokens, device) -> float:
    """FLOPs of one forward + ClipLoss + backward on this batch, per pair (FlopCounterMode)."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    from ctp.evaluate import autocast_for

    model = copy.deepcopy(model).train()
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast_for(device):
            loss = open_clip.ClipLoss()(*open_clip_output(model(images, tokens)))
        loss.backward()
    del model
    return counter.get_total_flops() / len(images)


# ---------------------------------------------------------------------------------------- steps


def synthetic_pairs(n: int, image_size: int, seed: int):
    import numpy as np

    from ctp.synthetic import generate_pairs

    classes = ["circle", "square", "triangle", "star"]
    return generate_pairs(
        classes, max(1, math.ceil(n / len(classes))), np.random.default_rng(seed), image_size
    )[:n]


@contextlib.contextmanager
def memory_window(device: torch.device, into: dict):
    """Peak memory of the block: base (allocated at the start), peak, and their difference, in GiB."""
    gc.collect()
    if device.type != "cuda":
        into.update(base_gib=None, peak_gib=None, variant_gib=None)
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    into.update(
        base_gib=round(base / 2**30, 3),
        peak_gib=round(peak / 2**30, 3),
        variant_gib=round((peak - base) / 2**30, 3),
    )


def ctp_round(name, bundle, data, *, batch_size, steps, warmup, device) -> tuple[float, dict]:
    """One round of a ctp strategy: a warm-up chunk, then a timed chunk; (pairs/s, details)."""
    from ctp.strategies import get_strategy
    from ctp.train import train_on_chunk

    strategy = get_strategy(name)
    n_new = batch_size - (round(batch_size * strategy.replay_fraction) if strategy.replay else 0)
    model = copy.deepcopy(bundle.model)
    res = None
    for n_steps in (warmup, steps):
        if n_steps == 0:
            continue
        take = n_new * n_steps
        sync(device)
        res = train_on_chunk(
            model,
            images=data["images"][:take],
            texts=data["texts"][:take],
            tokenizer=bundle.tokenizer,
            strategy=strategy,
            teacher=data["teacher"] if strategy.distill else None,
            replay=data["replay"] if strategy.replay else (),
            replay_images=data["replay_images"] if strategy.replay else None,
            epochs=1,
            batch_size=batch_size,
            device=device,
            progress=False,
        )
        sync(device)
    assert res is not None and res.steps == steps, (name, res and res.steps, steps)
    del model
    return res.pairs_per_second, {
        "steps": res.steps,
        "pairs_per_step": res.pairs / res.steps,
        "negatives_per_step": res.negatives_per_step,
        "prepare_seconds": round(res.prepare_seconds, 4),
        "loss": res.loss,
    }


def open_clip_round(bundle, data, *, batch_size, steps, warmup, device) -> tuple[float, dict]:
    """One round of open_clip's own step (ClipLoss, AdamW, logit-scale clamp): (pairs/s, details)."""
    import open_clip

    from ctp.evaluate import autocast_for
    from ctp.train import param_groups

    model = copy.deepcopy(bundle.model).train()
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    images, tokens = data["images"], data["tokens"]
    n = len(tokens)

    def step(i):
        rows = torch.arange(i * batch_size, (i + 1) * batch_size) % n
        x, t = images[rows.to(images.device)].to(device), tokens[rows].to(device)
        with autocast_for(device):
            loss = loss_fn(*open_clip_output(model(x, t)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    for i in range(warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    sync(device)
    seconds = time.perf_counter() - t0
    return steps * batch_size / seconds, {"steps": steps, "pairs_per_step": batch_size, "loss": loss.item()}


def clip_step_costs(
    model_name: str = "ViT-B-32",
    *,
    batch_size: int = 256,
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 2,
    device: torch.device | str = "cuda",
    peak_tflops: float | None = None,
    data_on_device: bool | None = None,
    distinct: int = 512,
    matmul_tflops: float | None = None,
    log=print,
) -> dict:
    """pairs/s, peak memory and MFU of finetune / incclip (train_on_chunk) and the open_clip step."""
    from ctp.continual import memory_items_from
    from ctp.models import create_model
    from ctp.train import preprocess_images

    device = torch.device(device)
    if data_on_device is None:
        data_on_device = device.type == "cuda"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bundle = create_model(model_name, device=device, seed=0)
    size = bundle.config["vision_cfg"]["image_size"]
    # a few hundred distinct pairs, tiled to the chunk: the step's cost does not depend on the pixels
    n_total = batch_size * max(steps, warmup, 1)
    pairs = synthetic_pairs(min(n_total, distinct), size, seed=0)
    base_img = preprocess_images([s.image for s in pairs], [s.key for s in pairs], bundle.preprocess_val)
    tile = torch.arange(n_total) % len(pairs)
    images = base_img[tile]
    texts = [pairs[i].text for i in tile.tolist()]
    replay = memory_items_from(pairs, chunk=0, chunk_id="old")
    for it in replay:
        it.pseudo_texts = ["a purple nothing", "a blue circle"]
    if data_on_device:
        images, base_img = images.to(device), base_img.to(device)
    data = {
        "images": images,
        "texts": texts,
        "tokens": bundle.tokenizer(texts),
        "replay": replay,
        "replay_images": base_img,
        "teacher": copy.deepcopy(bundle.model).eval().requires_grad_(False),
    }
    log(
        f"data: {n_total} pairs ({len(pairs)} distinct) at {size} px on {images.device}, "
        f"{time.perf_counter() - t0:.1f} s"
    )

    if peak_tflops is None and device.type == "cuda":
        peak_tflops = peak_tflops_for(torch.cuda.get_device_name(device))
    x, t = data["images"][:batch_size].to(device), data["tokens"][:batch_size].to(device)
    counted = flops_counted(bundle.model, x, t, device)
    formula = flops_formula(bundle.config, batch_size)
    del x, t
    flops = counted or formula

    variants = {"finetune": None, "incclip": None, "open_clip": None}
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    results: dict[str, dict] = {k: {} for k in variants}
    kw = dict(batch_size=batch_size, steps=steps, warmup=warmup, device=device)
    for r in range(rounds):  # alternate round by round so machine noise hits every variant alike
        for name in variants:
            mem: dict = {}
            with memory_window(device, mem):
                if name == "open_clip":
                    pps, details = open_clip_round(bundle, data, **kw)
                else:
                    pps, details = ctp_round(name, bundle, data, **kw)
            per_round[name].append(pps)
            if r == 0:  # memory is the same every round; keep the first
                results[name].update(details, **mem)
            log(f"  round {r} {name}: {pps:.0f} pairs/s")
    for name in variants:
        pps = statistics.median(per_round[name])
        achieved = flops * pps if flops else None
        results[name].update(
            pairs_per_s=sig(pps),
            pairs_per_s_rounds=[sig(v) for v in per_round[name]],
            ms_per_step=sig(1000 * results[name]["pairs_per_step"] / pps),
            achieved_tflops=sig(achieved / 1e12) if achieved else None,
            mfu=sig(achieved / (peak_tflops * 1e12)) if achieved and peak_tflops else None,
            mfu_vs_matmul=sig(achieved / (matmul_tflops * 1e12)) if achieved and matmul_tflops else None,
        )
    oc = results["open_clip"]["pairs_per_s"]
    for name in ("finetune", "incclip"):
        results[name]["vs_open_clip"] = sig(results[name]["pairs_per_s"] / oc, 3) if oc else None
    return {
        "model": model_name,
        "image_size": size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "device": str(device),
        "autocast": "bf16" if device.type == "cuda" else "none (fp32)",
        "data": "device" if data_on_device else "host",
        "threads": torch.get_num_threads(),
        "flops_per_pair": flops,
        "flops_per_pair_counted": counted,
        "flops_per_pair_formula": formula,
        "flops_source": "FlopCounterMode (open_clip fwd+ClipLoss+bwd)" if counted else "formula",
        "peak_tflops": peak_tflops,
        "matmul_tflops": matmul_tflops,
        "seconds": round(time.perf_counter() - t0, 2),
        "variants": results,
    }


def print_table(res: dict, out=print) -> None:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    out(
        f"{res['model']} @{res['image_size']} px, batch {res['batch_size']}, {res['device']}, autocast "
        f"{res['autocast']}, data on {res['data']}, {res['steps']} "
        f"timed steps after {res['warmup']} warm-up, "
        f"median of {res['rounds']} rounds"
    )
    out(
        f"model FLOPs/pair: {fmt(res['flops_per_pair'], '.4g')} ({res['flops_source']}; formula "
        f"{fmt(res['flops_per_pair_formula'], '.4g')}); peak {fmt(res['peak_tflops'], 'g')} TFLOP/s"
    )
    out(
        f"{'variant':<10} {'pairs/s':>9} {'ms/step':>8} {'vs oc':>6} {'TFLOP/s':>8} {'MFU':>7} "
        f"{'peak GiB':>9} {'own GiB':>8}"
    )
    for name, v in res["variants"].items():
        mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "-"
        out(
            f"{name:<10} {v['pairs_per_s']:>9.0f} {v['ms_per_step']:>8.2f} "
            f"{fmt(v.get('vs_open_clip'), '.2f'):>6} "
            f"{fmt(v['achieved_tflops'], '.1f'):>8} {mfu:>7} {fmt(v['peak_gib'], '.2f'):>9} "
            f"{fmt(v['variant_gib'], '.2f'):>8}"
        )


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="GPU, torch/CUDA versions, bf16 matmul rate")
    s = sub.add_parser("step", help="finetune / incclip / open_clip step: pairs/s, peak memory, MFU")
    for q in (e, s):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--json", type=Path, help="write the figures here")
    s.add_argument("--model", default="ViT-B-32")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--steps", type=int, default=20, help="timed steps per round")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps per round, before the timed ones")
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    s.add_argument(
        "--env-json", type=Path, help="env's figures: its matmul_bf16_tflops becomes mfu_vs_matmul's ceiling"
    )
    s.add_argument(
        "--data", choices=("device", "host"), help="where the chunk's images live (default: device on CUDA)"
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.cmd == "env":
        res = environment(device)
        print(json.dumps(res, indent=1))
    else:
        ceiling = None
        if args.env_json and args.env_json.is_file():
            ceiling = json.loads(args.env_json.read_text()).get("matmul_bf16_tflops")
        res = clip_step_costs(
            args.model,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            rounds=args.rounds,
            device=device,
            peak_tflops=args.peak_tflops,
            data_on_device=None if args.data is None else args.data == "device",
            matmul_tflops=ceiling,
            log=lambda m: print(m, flush=True),
        )
        print_table(res)
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
