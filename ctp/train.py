"""One incremental update of the model on one chunk: ``train_on_chunk``.

Everything a strategy changes is a visible line in the loop below: the replay share of the
batch, the pseudo-text negatives of replayed images, the KD term against the frozen teacher.
Runs on one device or under ``torchrun`` (DDP; each rank takes its own slice of the chunk and
its own replay draws, gradients are averaged by DDP).

Images are decoded and preprocessed once per chunk (``preprocess_val``, no augmentation): the
tiny CPU presets are input-bound otherwise, and fixed inputs let the teacher's embeddings be
computed once per chunk instead of once per step (exact, since the teacher is frozen). The one
exception is ``Strategy.replay_crop``: replayed images are cropped and flipped on the
preprocessed tensor each step (``augment_replay``, one batched resampling), while KD keeps the
teacher's embeddings of the unaugmented images.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ctp.evaluate import autocast_for, encode_images, encode_texts
from ctp.images import decode_image
from ctp.losses import contrastive_loss, distillation_loss, feature_distillation_loss
from ctp.memory import MemoryItem
from ctp.models import unwrap
from ctp.strategies import Strategy

logger = logging.getLogger(__name__)

KD_SCOPES = ("batch", "replay", "anchor")  # Strategy.kd_scope: which similarities KD keeps
VIEW_MIN_SCALE = 0.5  # kd_views: crops of side 50-100 % of the replayed image, mirrored half the time
CONTRASTS = ("full", "asymmetric")  # Strategy.contrast: which rows see which columns


@dataclass
class ChunkResult:
    steps: int = 0
    pairs: int = 0  # pairs trained on (new + replayed), all ranks
    seconds: float = 0.0  # wall time of the loop (after the per-chunk preparation)
    prepare_seconds: float = 0.0  # decoding + teacher embeddings
    loss: float = float("nan")  # mean total loss over the last epoch
    loss_clip: float = float("nan")
    loss_kd: float = float("nan")
    negatives_per_step: float = 0.0  # pseudo-text negatives per step, on average
    history: list[float] = field(default_factory=list)  # total loss per step (this rank)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


def preprocess_images(
    images: Sequence[bytes], keys: Sequence[str], preprocess: Callable, *, max_pixels: int = 40_000_000
) -> torch.Tensor:
    """Decode (with the safety limits of ``decode_image``) and preprocess: [N, 3, H, W]."""
    if not images:
        raise ValueError("no images to preprocess")
    return torch.stack(
        [preprocess(decode_image(b, key=k, max_pixels=max_pixels)) for b, k in zip(images, keys, strict=True)]
    )


@torch.no_grad()
def param_groups(model: torch.nn.Module, weight_decay: float, *, text_lr_scale: float = 1.0) -> list[dict]:
    """open_clip's rule: no decay on gains, biases, embeddings' scale and logit_scale. Each group
    carries ``lr_scale`` (times the schedule's rate): ``text_lr_scale`` for the text tower (every
    parameter outside ``visual`` but logit_scale), 1 elsewhere; an empty group is left out."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        text = not name.startswith("visual") and "logit_scale" not in name and text_lr_scale != 1.0
        groups.setdefault((no_decay, text), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": text_lr_scale if text else 1.0,
        }
        for (no_decay, text), ps in sorted(groups.items())
    ]


def cosine_lr(step: int, total: int, *, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def train_on_chunk(
    model: torch.nn.Module,
    *,
    images: torch.Tensor,  # [N, 3, H, W] preprocessed images of the chunk
    texts: Sequence[str],  # [N] captions
    tokenizer: Callable[[list[str]], torch.Tensor],
    strategy: Strategy,
    teacher: torch.nn.Module | None = None,  # frozen model before the chunk (needed for KD)
    replay: Sequence[MemoryItem] = (),  # replay pool: memory snapshot taken before the chunk
    replay_images: torch.Tensor | None = None,  # [M, 3, H, W] preprocessed images of ``replay``
    kd_weight: float | None = None,  # this chunk's KD weight (None: strategy.kd_weight)
    # [N] bool: rows whose label the teacher knows (Strategy.kd_known); None: none
    known_rows: torch.Tensor | None = None,
    text_lr_scale: float = 1.0,  # the text tower's learning rate as a share of the rest's
    # Strategy.kd_past (a diagnostic): the pairs trained so far, which KD draws its rows from
    past_images: torch.Tensor | None = None,  # [P, 3, H, W] preprocessed
    past_texts: Sequence[str] = (),  # [P] captions
    known_names: Sequence[str] = (),  # [K] class names the teacher was trained on (Strategy.kd_names)
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    warmup_steps: int = 10,
    grad_clip: float = 1.0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    desc: str = "chunk",
) -> ChunkResult:
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    t_prep = time.perf_counter()
    use_replay = strategy.replay and len(replay) > 0
    kd_weight = strategy.kd_weight if kd_weight is None else kd_weight
    use_kd = strategy.distill and teacher is not None and kd_weight > 0  # no teacher: nothing to keep
    if strategy.kd_scope not in KD_SCOPES:
        raise ValueError(f"unknown kd_scope {strategy.kd_scope!r}; expected one of {KD_SCOPES}")
    if strategy.contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {strategy.contrast!r}; expected one of {CONTRASTS}")
    if not 0 < strategy.replay_crop <= 1:
        raise ValueError(f"replay_crop must be in (0, 1], got {strategy.replay_crop}")
    use_fkd = strategy.feature_kd_weight > 0 and teacher is not None and use_replay
    # kd_known: new rows of known classes join the replayed rows in the KD term
    use_known = (
        use_kd
        and use_replay
        and strategy.kd_scope == "replay"
        and strategy.kd_known
        and known_rows is not None
        and bool(known_rows.any())
    )
    # KD on augmented views of the replayed images against every text of the batch (kd_views)
    use_views = use_kd and use_replay and strategy.kd_views > 0
    if strategy.kd_past and (strategy.kd_scope != "replay" or strategy.kd_known or strategy.kd_views):
        raise ValueError(
            "kd_past takes the rows of kd_scope='replay' from the past; not with kd_known or kd_views"
        )
    # KD rows drawn from the past instead of the replayed pairs (kd_past): as many as a full replay share
    use_past = use_kd and use_replay and strategy.kd_past and len(past_texts) > 0
    if use_past and (past_images is None or len(past_images) != len(past_texts)):
        raise ValueError("past_images must hold one preprocessed image per past text")
    n_past = min(round(batch_size * strategy.replay_fraction), len(past_texts)) if use_past else 0
    # KD of every image's softmax over the known class names (kd_names): two names at least
    use_names = use_kd and strategy.kd_names > 0 and len(known_names) >= 2
    n_names = len(known_names) if use_names else 0
    if known_rows is not None and len(known_rows) != len(texts):
        raise ValueError(f"known_rows has {len(known_rows)} rows for {len(texts)} pairs")
    tokens = tokenizer(list(texts))  # [N, L]
    # Replayed rows are drawn without replacement: a pair twice in one batch is its own false
    # negative (two identical columns), so a memory smaller than the replay share of the batch
    # gives the batch all of its pairs once and the rest of the batch to new pairs.
    n_rep = min(round(batch_size * strategy.replay_fraction), len(replay)) if use_replay else 0
    n_new = batch_size - n_rep
    if use_replay:
        if replay_images is None or len(replay_images) != len(replay):
            raise ValueError("replay_images must hold one preprocessed image per replay item")
        rep_tokens = tokenizer([it.text for it in replay])  # [M, L]
        # pseudo texts of each replay item, tokenized once: pseudo_tokens[i] is [K_i, L]
        pseudo_tokens = [
            tokenizer(it.pseudo_texts) if (strategy.pseudo_texts and it.pseudo_texts) else None
            for it in replay
        ]
    if use_kd or use_fkd:
        # Teacher embeddings once per chunk; the loop only indexes them. [N, D] and [M, D]
        kd_on_new = use_kd and (use_known or use_names or not (use_replay and strategy.kd_scope == "replay"))
        if kd_on_new:
            t_img_new = encode_images(teacher, images, device=device, batch_size=256)
        if kd_on_new or use_views:
            t_txt_new = encode_texts(teacher, tokens, device=device, batch_size=256)
        if use_replay:
            t_img_rep = encode_images(teacher, replay_images, device=device, batch_size=256)
            t_txt_rep = encode_texts(teacher, rep_tokens, device=device, batch_size=256)
        if use_names:
            name_tokens = tokenizer(list(known_names))  # [K, L]
            t_names = encode_texts(teacher, name_tokens, device=device, batch_size=256)  # [K, D]
        if use_past:
            past_tokens = tokenizer(list(past_texts))  # [P, L]
            t_img_past = encode_images(teacher, past_images, device=device, batch_size=256)
            t_txt_past = encode_texts(teacher, past_tokens, device=device, batch_size=256)
        t_scale = unwrap(teacher).logit_scale.exp().detach().float()
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    net = unwrap(model)

    per_rank = len(texts) // world
    if per_rank == 0:
        raise ValueError(f"chunk of {len(texts)} pairs cannot be split over {world} ranks")
    # A batch needs two rows: one pair has no negative, and a BatchNorm tower (the ModifiedResNet
    # presets) cannot train on one. A lone last pair joins the batch before it.
    bounds = batch_bounds(per_rank, n_new, min_last=2 - n_rep)
    steps_per_epoch = len(bounds)
    total_steps = steps_per_epoch * epochs
    # fused: one kernel for all parameters; the per-tensor loop costs more than the model's own
    # step on the tiny CPU presets (the 49,408-token embedding is most of their parameters)
    optimizer = torch.optim.AdamW(
        param_groups(net, weight_decay, text_lr_scale=text_lr_scale),
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=device.type in ("cpu", "cuda"),
    )
    order_gen = torch.Generator().manual_seed(seed)  # same permutation on every rank
    rep_rng = random.Random(seed * 7919 + rank)  # own replay draws per rank
    aug_gen = torch.Generator().manual_seed(seed * 7919 + rank)  # own replay crops per rank
    view_gen = torch.Generator().manual_seed(seed * 7919 + rank + 104_729)  # own views (kd_views)
    past_gen = torch.Generator().manual_seed(seed * 7919 + rank + 209_459)  # own past rows (kd_past)
    result = ChunkResult(prepare_seconds=time.perf_counter() - t_prep)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress or rank != 0, leave=False)
    step = 0
    for _epoch in range(epochs):
        perm = torch.randperm(len(texts), generator=order_gen)[rank::world][:per_rank]
        sums = {"loss": 0.0, "clip": 0.0, "kd": 0.0}
        for start, end in bounds:
            idx = perm[start:end]  # new pairs of this step
            batch_img, batch_tok = images[idx], tokens[idx]
            neg_tok, neg_owner = [], []
            if use_replay:
                ridx = torch.tensor(rep_rng.sample(range(len(replay)), n_rep))
                rep_img = replay_images[ridx]
                if strategy.replay_crop < 1:
                    rep_img = augment_replay(rep_img, min_scale=strategy.replay_crop, generator=aug_gen)
                batch_img = torch.cat([batch_img, rep_img])
                batch_tok = torch.cat([batch_tok, rep_tokens[ridx]])
                for row, r in enumerate(ridx.tolist()):  # pseudo-text negatives of replayed images
                    pt = pseudo_tokens[r]
                    if pt is None:
                        continue
                    for j in rep_rng.sample(range(len(pt)), min(strategy.pseudo_per_image, len(pt))):
                        neg_tok.append(pt[j])
                        neg_owner.append(len(idx) + row)
            b = len(batch_tok)
            if use_views:  # old-like images the teacher has not learnt by heart: its view is knowledge
                views = augment_replay(replay_images[ridx], min_scale=VIEW_MIN_SCALE, generator=view_gen)
                batch_img = torch.cat([batch_img, views])  # one forward (and DDP graph) with the batch
            all_tok = torch.cat([batch_tok, torch.stack(neg_tok)]) if neg_tok else batch_tok
            if use_names:  # the class names, in the same forward
                all_tok = torch.cat([all_tok, name_tokens])
            if use_past:  # past pairs for the KD term only, in the same forward
                pidx = torch.randperm(len(past_texts), generator=past_gen)[:n_past]
                batch_img = torch.cat([batch_img, past_images[pidx]])
                all_tok = torch.cat([all_tok, past_tokens[pidx]])
            n_neg = len(neg_tok)
            names_at = b + n_neg  # text rows: batch, pseudo-text negatives, names, past captions
            for g in optimizer.param_groups:
                g["lr"] = cosine_lr(step, total_steps, base_lr=lr, warmup=warmup_steps) * g["lr_scale"]
            with autocast_for(device):
                img_f, txt_f, scale = ddp_model(batch_img.to(device), all_tok.to(device))[:3]
                # rows after the batch: the views (kd_views) or the past pairs' images (kd_past)
                img_f, view_f = img_f[:b], img_f[b:]
                loss_clip = contrastive_loss(
                    img_f,
                    txt_f[:b],
                    scale,
                    negative_text_features=txt_f[b : b + n_neg] if neg_tok else None,
                    negative_owner=torch.tensor(neg_owner, device=device) if neg_tok else None,
                    new_rows=len(idx) if strategy.contrast == "asymmetric" else None,
                )
                loss = loss_clip
                loss_kd = torch.zeros((), device=device)
                if use_kd:
                    # each branch picks the student's image and text rows and the teacher's
                    if use_past:  # the same KD among pairs drawn from the whole past instead
                        s_img, s_txt = view_f, txt_f[names_at + n_names :]
                        t_img, t_txt = t_img_past[pidx], t_txt_past[pidx]
                    elif use_replay and strategy.kd_scope == "replay":
                        # KD over the replayed pairs only: the teacher's knowledge is about old
                        # data; its view of the new pairs would hold the new classes back.
                        rows = cols = slice(len(idx), b)
                        t_img, t_txt = t_img_rep[ridx], t_txt_rep[ridx]
                        known = known_rows[idx].nonzero().flatten() if use_known else None
                        if known is not None and len(known):  # ... and the new pairs of known classes
                            rows = cols = torch.cat([known, torch.arange(len(idx), b)]).to(device)
                            t_img = torch.cat([t_img_new[idx[known]], t_img])
                            t_txt = torch.cat([t_txt_new[idx[known]], t_txt])
                    elif use_replay and strategy.kd_scope == "anchor":
                        # every image of the batch against the replayed texts only: how new
                        # images sit among the old concepts is kept, new-vs-new is left free.
                        rows, cols = slice(0, b), slice(len(idx), b)
                        t_img = torch.cat([t_img_new[idx], t_img_rep[ridx]])
                        t_txt = t_txt_rep[ridx]
                    else:  # "batch" (or nothing replayed): every image against every text
                        rows = cols = slice(0, b)
                        t_img = torch.cat([t_img_new[idx], t_img_rep[ridx]]) if use_replay else t_img_new[idx]
                        t_txt = torch.cat([t_txt_new[idx], t_txt_rep[ridx]]) if use_replay else t_txt_new[idx]
                    if not use_past:
                        s_img, s_txt = img_f[rows], txt_f[cols]
                    loss_kd = distillation_loss(
                        scale * s_img @ s_txt.T,
                        t_scale * t_img @ t_txt.T,
                        temperature=strategy.kd_temperature,
                        gate=strategy.kd_gate,
                    )
                    loss = loss + kd_weight * loss_kd
                if use_views:
                    # each view's softmax over the batch's texts (new and replayed), as the
                    # teacher has it: old-like images kept off the new names it had no use for
                    t_view = encode_images(teacher, views, device=device, batch_size=256)
                    t_txt = torch.cat([t_txt_new[idx], t_txt_rep[ridx]])
                    loss_views = distillation_loss(
                        scale * view_f @ txt_f[:b].T,
                        t_scale * t_view @ t_txt.T,
                        temperature=strategy.kd_temperature,
                        symmetric=False,
                    )
                    loss_kd = loss_kd + strategy.kd_views * loss_views
                    loss = loss + kd_weight * strategy.kd_views * loss_views
                if use_names:
                    # every image's softmax over the names the teacher knows, as the teacher has it
                    t_rows = torch.cat([t_img_new[idx], t_img_rep[ridx]]) if use_replay else t_img_new[idx]
                    loss_names = distillation_loss(
                        scale * img_f @ txt_f[names_at : names_at + n_names].T,
                        t_scale * t_rows @ t_names.T,
                        temperature=strategy.kd_temperature,
                        symmetric=False,
                    )
                    loss_kd = loss_kd + strategy.kd_names * loss_names
                    loss = loss + kd_weight * strategy.kd_names * loss_names
                if use_fkd:  # replayed rows stay where the teacher put them in the joint space
                    rep = slice(len(idx), b)
                    loss_fkd = feature_distillation_loss(
                        img_f[rep], t_img_rep[ridx]
                    ) + feature_distillation_loss(txt_f[rep], t_txt_rep[ridx])
                    loss = loss + strategy.feature_kd_weight * loss_fkd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizer.step()
            with torch.no_grad():  # CLIP's clamp: temperature at most 100
                net.logit_scale.clamp_(0, math.log(100))
            step += 1
            result.history.append(loss.item())
            result.negatives_per_step += len(neg_tok)
            result.pairs += (b + n_past) * world  # the past rows are forwarded and trained too
            sums["loss"] += loss.item()
            sums["clip"] += loss_clip.item()
            sums["kd"] += loss_kd.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    result.seconds = time.perf_counter() - t0
    result.steps = step
    result.negatives_per_step /= max(step, 1)
    result.loss = sums["loss"] / max(steps_per_epoch, 1)
    result.loss_clip = sums["clip"] / max(steps_per_epoch, 1)
    result.loss_kd = sums["kd"] / max(steps_per_epoch, 1)
    return result


def augment_replay(images: torch.Tensor, *, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Random square crop of side uniform in [min_scale, 1] (anywhere inside the image), resized
    back, and a left-right flip with probability 1/2, per image: [n, C, H, W] -> [n, C, H, W]."""
    n = len(images)
    if n == 0:
        return images
    scale = min_scale + (1 - min_scale) * torch.rand(n, generator=generator)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift = (1 - scale)[:, None] * (2 * torch.rand(n, 2, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(
        images.float(), grid.to(images.device), mode="bilinear", align_corners=False
    )
    return out.to(images.dtype)


def batch_bounds(n: int, size: int, *, min_last: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each batch of ``size`` over ``n`` rows; a last batch under ``min_last``
    rows joins the one before it, and a single batch under it is dropped (nothing to train)."""
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    if bounds and bounds[-1][1] - bounds[-1][0] < min_last:
        last = bounds.pop()
        if bounds:
            bounds[-1] = (bounds[-1][0], last[1])
    return bounds
