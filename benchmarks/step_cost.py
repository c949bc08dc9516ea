"""Cost of an incclip training step against a finetune step at the same batch size.

    python benchmarks/step_cost.py [--model ctp-rn-tiny-32] [--batch-size 64] [--steps 40]

Both strategies train on the same chunk with the same batch size in one process, alternating
rounds so machine noise hits both alike. Printed per strategy: seconds per step of the loop,
and the whole chunk cost including the per-chunk work (decoding, teacher embeddings and, for
incclip, pseudo-text generation). On CUDA it also measures pairs/s, peak memory and MFU of a
ViT-B-32 at 224 px in bf16 for finetune and incclip against a plain open_clip training step
(ClipLoss, same batch), with ``benchmarks/gpu_step.py``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from ctp.continual import memory_items_from
from ctp.data import Sample
from ctp.models import create_model
from ctp.pseudo_texts import TokenEditGenerator, make_pseudo_texts
from ctp.strategies import get_strategy
from ctp.synthetic import generate_pairs
from ctp.train import preprocess_images, train_on_chunk


def synthetic_pairs(n: int, image_size: int, seed: int) -> list[Sample]:
    import numpy as np

    classes = ["circle", "square", "triangle", "star"]
    return generate_pairs(classes, max(1, n // len(classes)), np.random.default_rng(seed), image_size)


def measure_once(bundle, *, images, samples, replay, rimg, strategy_name, batch_size, steps, device, teacher):
    """One chunk of exactly ``steps`` steps: (seconds per loop step, seconds in all, ChunkResult)."""
    strategy = get_strategy(strategy_name)
    n_new = batch_size - (round(batch_size * strategy.replay_fraction) if strategy.replay else 0)
    take = n_new * steps
    model = copy.deepcopy(bundle.model)
    t0 = time.perf_counter()
    res = train_on_chunk(
        model,
        images=images[:take],
        texts=[s.text for s in samples[:take]],
        tokenizer=bundle.tokenizer,
        strategy=strategy,
        teacher=teacher if strategy.distill else None,
        replay=replay if strategy.replay else (),
        replay_images=rimg if strategy.replay else None,
        epochs=1,
        batch_size=batch_size,
        device=device,
        progress=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return res.seconds / res.steps, time.perf_counter() - t0, res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ctp-rn-tiny-32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-vit", action="store_true", help="skip the CUDA ViT-B-32 comparison")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    bundle = create_model(args.model, device=device, seed=0)
    size = bundle.config["vision_cfg"]["image_size"]
    samples = synthetic_pairs(args.batch_size * args.steps, size, seed=0)
    replay = memory_items_from(synthetic_pairs(256, size, seed=1), chunk=0, chunk_id="old")
    teacher = copy.deepcopy(bundle.model).eval().requires_grad_(False)

    # pseudo texts: generated once per chunk for the memory (amortised), timed on their own
    gen = TokenEditGenerator()
    rimg = preprocess_images([it.image for it in replay], [it.key for it in replay], bundle.preprocess_val)
    gen.fit([s.text for s in samples] + [it.text for it in replay], rimg, bundle=bundle)
    t0 = time.perf_counter()
    made, stats = make_pseudo_texts(
        gen, replay, rimg, bundle=bundle, margin=-1.0, rng=random.Random(0), device=device
    )
    pseudo_s = time.perf_counter() - t0
    for it in replay:
        it.pseudo_texts = made[it.key]

    images = preprocess_images([s.image for s in samples], [s.key for s in samples], bundle.preprocess_val)
    runs: dict[str, list] = {"finetune": [], "incclip": []}
    for _ in range(args.rounds):  # alternate round by round so machine noise hits both alike
        for name in runs:
            runs[name].append(
                measure_once(
                    bundle,
                    images=images,
                    samples=samples,
                    replay=replay,
                    rimg=rimg,
                    strategy_name=name,
                    batch_size=args.batch_size,
                    steps=args.steps,
                    device=device,
                    teacher=teacher,
                )
            )
    ft_step, ft_total = (statistics.median(r[i] for r in runs["finetune"]) for i in (0, 1))
    ic_step, ic_total = (statistics.median(r[i] for r in runs["incclip"]) for i in (0, 1))
    ic_res = runs["incclip"][-1][2]
    print(
        f"model {args.model}, batch {args.batch_size}, device "
        f"{device}, {args.steps} steps x {args.rounds} rounds"
    )
    print(f"finetune: {1000 * ft_step:.1f} ms/step ({args.batch_size / ft_step:.0f} pairs/s)")
    print(
        f"incclip : {1000 * ic_step:.1f} ms/step ({args.batch_size / ic_step:.0f} pairs/s), "
        f"{ic_res.negatives_per_step:.0f} pseudo-text negatives/step, KD on cached teacher embeddings"
    )
    print(f"step ratio incclip/finetune: {ic_step / ft_step:.2f} (target <= 1.30)")
    print(
        f"per chunk of {args.steps} steps incl. preparation: "
        f"finetune {ft_total:.2f} s, incclip {ic_total:.2f} s "
        f"+ pseudo texts for {len(replay)} memory images {pseudo_s:.2f} s "
        f"-> ratio {(ic_total + pseudo_s) / ft_total:.2f}"
    )
    if device.type == "cuda" and not args.skip_vit:
        vit_b32(args.batch_size)
    return 0


def vit_b32(batch_size: int, steps: int = 20) -> None:
    """pairs/s, peak memory and MFU of ViT-B-32 @224, bf16: ctp finetune / incclip vs a plain open_clip step.

    The measurement lives in ``benchmarks/gpu_step.py`` (also run by ``benchmarks/gpu_check.sh``).
    """
    from gpu_step import clip_step_costs, print_table  # benchmarks/gpu_step.py, beside this script

    print_table(clip_step_costs("ViT-B-32", batch_size=batch_size, steps=steps, device=torch.device("cuda")))


if __name__ == "__main__":
    raise SystemExit(main())
