"""The continual learner: what happens around ``train_on_chunk`` for each chunk.

Per chunk, in order:
1. teacher = frozen copy of the model before the chunk (for KD and weight merging);
2. pseudo texts: the generator sees the chunk, then memory items whose cached texts are missing
   or older than ``refresh_every`` chunks get new ones, made with the model before the chunk;
3. ``train_on_chunk`` with the replay pool (a memory snapshot) and the teacher;
   with this chunk's KD weight (``kd_weight_for_chunk``: constant, or following the share of
   the past that the memory still holds; with ``kd_novelty``, times ``chunk_novelty``);
4. optional weight merge with the teacher (WiSE-FT);
5. the chunk's pairs are offered to the memory (its policy decides what stays);
6. optional balanced fine-tuning: a few passes over the memory alone (``balance_epochs``).
The experiment command and the service's trainer worker both drive this class.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from ctp.config import TrainConfig
from ctp.data import Sample, pair_id
from ctp.evaluate import encode_images, encode_texts
from ctp.memory import MemoryItem, ReplayMemory
from ctp.models import ClipBundle, unwrap
from ctp.pseudo_texts import PseudoTextGenerator, make_pseudo_texts
from ctp.strategies import Strategy
from ctp.train import ChunkResult, preprocess_images, train_on_chunk

logger = logging.getLogger(__name__)


@dataclass
class ChunkReport:
    index: int
    train: ChunkResult
    pseudo: dict = field(default_factory=dict)  # PseudoTextStats of this chunk's refresh
    pseudo_seconds: float = 0.0
    memory_items: int = 0
    memory_bytes: int = 0
    admitted: int = 0
    kd_weight: float = 0.0  # the KD weight this chunk trained with (0: no KD)
    memory_share: float | None = None  # memory size / pairs seen before the chunk
    novelty: float | None = None  # chunk_novelty, measured only for a kd_novelty strategy
    epochs: int = 0  # the epochs this chunk trained for (TrainConfig.epochs_for its size)
    heldout: int = 0  # pairs of this chunk kept for the next chunk's novelty (novelty_reference)
    known: float | None = None  # share of the trained pairs of a known label (kd_known only)
    balance: ChunkResult | None = None  # the pass over the memory after the chunk (balance_epochs)
    # learning headroom g (Strategy.kd_headroom): the fit gain on this chunk's pairs over the
    # last chunk; None where it is not measured (knob off, first chunk)
    headroom: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for part, result in (("train", self.train), ("balance", self.balance)):
            if result is not None:
                d[part].pop("history", None)
                d[part]["pairs_per_second"] = result.pairs_per_second
        return d


def kd_weight_for_chunk(strategy: Strategy, *, memory_items: int, seen: int) -> tuple[float, float | None]:
    """(KD weight, memory share rho) for the next chunk.

    rho = memory items / pairs seen before the chunk, capped at 1 (None when nothing was seen).
    ``kd_rule="share"`` scales the weight by (1 - rho): while the memory still holds much of the
    past, replay keeps it and the teacher would only hold new learning back; as the stream
    grows past the memory (the service's operating point, rho -> 0) the KD term takes over.
    ``kd_rule="cutoff"`` scales it by max(0, 1 - rho / kd_share_cutoff): no KD at all while the
    memory holds that share of the stream or more.
    """
    rho = min(1.0, memory_items / seen) if seen > 0 else None  # None: nothing seen (or no memory)
    if not strategy.distill:
        return 0.0, rho
    if strategy.kd_rule == "constant":
        return strategy.kd_weight, rho
    if strategy.kd_rule == "share":
        return strategy.kd_weight * (1.0 - (rho or 0.0)), rho  # nothing in memory: all KD
    if strategy.kd_rule == "cutoff":
        if strategy.kd_share_cutoff <= 0:
            raise ValueError(f"kd_share_cutoff must be > 0, got {strategy.kd_share_cutoff}")
        return strategy.kd_weight * max(0.0, 1.0 - (rho or 0.0) / strategy.kd_share_cutoff), rho
    raise ValueError(f"unknown kd_rule {strategy.kd_rule!r}; expected 'constant', 'share' or 'cutoff'")


@torch.no_grad()
def caption_fit(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    block: int,
    device: torch.device | str,
    generator: torch.Generator,
) -> float:
    """How well ``model`` matches these pairs, without labels: the pairs in a random order are cut
    into blocks of ``block`` (a shorter last block is left out), and in each block the model's
    probability of every image's own caption among the block's captions, and of every caption's
    own image, is averaged. 1 / block is chance; 1 is a perfect match."""
    if not 2 <= block <= len(tokens):
        raise ValueError(f"block must be in [2, {len(tokens)}], got {block}")
    order = torch.randperm(len(tokens), generator=generator)[: len(tokens) // block * block]
    img = encode_images(model, images[order], device=device, batch_size=256)
    txt = encode_texts(model, tokens[order], device=device, batch_size=256)
    scale = unwrap(model).logit_scale.exp().float()
    logits = scale * torch.einsum(
        "bid,bjd->bij", img.view(-1, block, img.shape[1]), txt.view(-1, block, txt.shape[1])
    )
    i2t = logits.softmax(2).diagonal(dim1=1, dim2=2)
    t2i = logits.softmax(1).diagonal(dim1=1, dim2=2)
    return float((i2t.mean() + t2i.mean()) / 2)


def chunk_novelty(
    teacher: torch.nn.Module,
    *,
    images: torch.Tensor,
    tokens: torch.Tensor,
    replay_images: torch.Tensor,
    replay_tokens: torch.Tensor,
    block: int,
    device: torch.device | str,
    seed: int,
    reference_draws: int = 1,
) -> float | None:
    """nu = 1 - fit(new pairs) / fit(reference pairs), clipped to [0, 1] (``caption_fit``, one
    block size for both, at most ``block``): 0 for a chunk the teacher fits as well as the
    reference (the replayed pairs, or a held-out slice of the past), 1 for one it cannot fit.
    The reference's fit is the mean of ``reference_draws`` random block orders (a small held-out
    slice fills one block; more orders steady its estimate). None when either side has fewer
    than 2 pairs."""
    block = min(block, len(tokens), len(replay_tokens))
    if block < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    fit_new = caption_fit(teacher, images, tokens, block=block, device=device, generator=gen)
    fit_old = sum(
        caption_fit(teacher, replay_images, replay_tokens, block=block, device=device, generator=gen)
        for _ in range(reference_draws)
    ) / max(1, reference_draws)
    if fit_old <= 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - fit_new / fit_old))


def fit_gain(
    model: torch.nn.Module,
    earlier: torch.nn.Module,
    *,
    images: torch.Tensor,
    tokens: torch.Tensor,
    block: int,
    device: torch.device | str,
    seed: int,
) -> float | None:
    """caption_fit(model) - caption_fit(earlier) on the same pairs in the same block order (one
    block size for both, at most ``block``): how much better ``model`` matches pairs that
    neither trained on. None for fewer than 2 pairs."""
    block = min(block, len(tokens))
    if block < 2:
        return None
    fits = [
        caption_fit(
            m, images, tokens, block=block, device=device, generator=torch.Generator().manual_seed(seed)
        )
        for m in (model, earlier)
    ]
    return fits[0] - fits[1]


def hold_out(n: int, strategy: Strategy, *, seed: int) -> list[int]:
    """Indices of a chunk's pairs kept out of its training as the next chunk's novelty reference
    (``novelty_reference="heldout"``): a seeded ``novelty_heldout`` share, at most
    ``novelty_heldout_max`` and at most what leaves 2 pairs to train on; none for another
    strategy. They are trained with the next chunk instead, so nothing is dropped. The slice is
    held out whenever the reference is "heldout", also without ``kd_novelty`` (plain replay with
    a slice: the control that measures what training a slice a chunk late does on its own)."""
    if strategy.novelty_reference != "heldout" or strategy.joint:
        return []
    k = min(strategy.novelty_heldout_max, round(n * strategy.novelty_heldout), n - 2)
    return sorted(random.Random(seed).sample(range(n), k)) if k >= 2 else []


def pseudo_texts_for_chunk(strategy: Strategy, share: float | None) -> bool:
    """Whether this chunk replays pseudo texts: always, unless ``pt_share_cutoff`` is set and the
    memory holds that share of the stream or more (``share`` as ``kd_weight_for_chunk`` gives it)."""
    if not strategy.pseudo_texts:
        return False
    cutoff = strategy.pt_share_cutoff
    return cutoff is None or share is None or share < cutoff


def memory_items_from(samples: Sequence[Sample], *, chunk: int, chunk_id: str) -> list[MemoryItem]:
    return [
        MemoryItem(
            key=pair_id(s.meta, chunk_id, s.key),
            image=s.image,
            text=s.text,
            label=s.label,
            chunk=chunk,
        )
        for s in samples
    ]


class ContinualLearner:
    def __init__(
        self,
        *,
        bundle: ClipBundle,
        strategy: Strategy,
        memory: ReplayMemory | None,
        generator: PseudoTextGenerator | None,
        config: TrainConfig,
        chunks_done: int = 0,
        pretrained: bool = False,
    ):
        if (strategy.replay or strategy.pseudo_texts) and memory is None:
            raise ValueError(f"strategy {strategy.name} needs a replay memory")
        if strategy.pseudo_texts and generator is None:
            raise ValueError(f"strategy {strategy.name} needs a pseudo-text generator")
        self.bundle = bundle
        self.strategy = strategy
        self.memory = memory
        self.generator = generator
        self.config = config
        self.chunks_done = chunks_done
        # A model that has learned nothing yet (random init, before its first chunk) has no
        # knowledge to keep: distilling towards it would only slow learning down.
        self.pretrained = pretrained
        self.device = torch.device(config.device)
        self._joint_samples: list[Sample] = []  # joint only: every pair so far
        # kd_past only (a diagnostic, benchmark only: unbounded): every pair trained so far
        self._past: list[Sample] = []
        # novelty_reference="heldout": the previous chunk's pairs kept out of its training (at
        # most novelty_heldout_max; in this process only: after a restart the first chunk has
        # no reference, its KD weight is the rule's, and the held-out slice of the chunk before
        # the restart is lost: neither trained nor offered to the memory)
        self._heldout: list[Sample] = []
        self._heldout_chunk_id = ""
        # kd_headroom: the model as it was before the previous chunk (in this process only: after
        # a restart the first chunk measures no headroom and keeps kd_known on, as without the knob)
        self._before_previous: torch.nn.Module | None = None
        if strategy.novelty_reference not in ("memory", "heldout"):
            raise ValueError(
                f"unknown novelty_reference {strategy.novelty_reference!r}; expected 'memory' or 'heldout'"
            )

    def _preprocess(self, images: Sequence[bytes], keys: Sequence[str]) -> torch.Tensor:
        return preprocess_images(images, keys, self.bundle.preprocess_val)

    def learn_chunk(self, samples: Sequence[Sample], *, chunk_id: str | None = None) -> ChunkReport:
        index = self.chunks_done
        chunk_id = chunk_id or f"chunk{index:06d}"
        cfg, strategy, model = self.config, self.strategy, self.bundle.model
        model.to(self.device)
        chunk_samples = samples
        if strategy.joint:
            self._joint_samples.extend(samples)
            samples = self._joint_samples
        # this chunk's held-out slice waits for the next chunk; the previous chunk's trains now
        held = set(hold_out(len(samples), strategy, seed=cfg.seed * 1_000_003 + index))
        reference, ref_chunk_id = self._heldout, self._heldout_chunk_id
        self._heldout = [s for i, s in enumerate(samples) if i in held]
        self._heldout_chunk_id = chunk_id
        samples = [s for i, s in enumerate(samples) if i not in held]
        if held:  # a held-out pair reaches the memory once trained, with the next chunk
            chunk_samples = samples
        n_chunk = len(samples)  # rows [0, n_chunk) of images: this chunk's pairs; the rest: reference
        samples = samples + reference
        images = self._preprocess([s.image for s in samples], [s.key for s in samples])
        texts = [s.text for s in samples]

        teacher = None
        has_prior = index > 0 or self.pretrained
        if has_prior and (
            strategy.distill or strategy.merge_alpha is not None or strategy.feature_kd_weight > 0
        ):
            teacher = copy.deepcopy(model).eval().requires_grad_(False)

        mem = self.memory if strategy.replay else None
        kd_weight, share = kd_weight_for_chunk(
            strategy,
            memory_items=len(mem) if mem is not None else 0,
            seen=mem.seen() if mem is not None else 0,
        )
        pseudo_stats, pseudo_seconds = {}, 0.0
        replay: list[MemoryItem] = []
        replay_images = None
        rng = random.Random(cfg.seed * 1_000_003 + index)
        if strategy.replay and self.memory is not None and len(self.memory) > 0:
            replay = self.memory.sample(min(len(self.memory), cfg.replay_pool), rng=rng)
            replay_images = self._preprocess([it.image for it in replay], [it.key for it in replay])
        novelty = None
        if strategy.kd_novelty and teacher is not None and kd_weight > 0:
            # the reference the new pairs' fit is set against: the replayed pairs, or the
            # previous chunk's held-out slice (rows [n_chunk:] of this chunk's batch)
            if strategy.novelty_reference == "memory":
                ref_images, ref_texts, draws = replay_images, [it.text for it in replay], 1
            else:
                ref_images, ref_texts = images[n_chunk:], texts[n_chunk:]
                # about as many blocks scored on the reference as on the new pairs
                draws = min(16, max(1, n_chunk // max(1, len(ref_texts))))
            if ref_texts:
                tok = self.bundle.tokenizer
                novelty = chunk_novelty(
                    teacher,
                    images=images[:n_chunk],
                    tokens=tok(texts[:n_chunk]),
                    replay_images=ref_images,
                    replay_tokens=tok(ref_texts),
                    block=cfg.batch_size,
                    device=self.device,
                    seed=cfg.seed * 1000 + index,
                    reference_draws=draws,
                )
            if novelty is not None:
                kd_weight *= novelty
        if strategy.pseudo_texts:
            # The generator learns from every chunk, also one that replays no pseudo texts (the
            # first, or one above pt_share_cutoff) so that it is ready when they come back.
            t0 = time.perf_counter()
            self.generator.fit(texts, images, bundle=self.bundle)
            if not pseudo_texts_for_chunk(strategy, share):
                strategy = replace(strategy, pseudo_texts=False)  # this chunk only
            elif replay:
                stale = [
                    i
                    for i, it in enumerate(replay)
                    if it.pseudo_version < 0 or index - it.pseudo_version >= cfg.refresh_every
                ]
                if stale:
                    # The model is still the one before this chunk: it is the teacher that guards.
                    made, stats = make_pseudo_texts(
                        self.generator,
                        [replay[i] for i in stale],
                        replay_images[stale],
                        bundle=self.bundle,
                        num_keep=cfg.pseudo_keep,
                        num_candidates=cfg.pseudo_candidates,
                        margin=cfg.pseudo_margin,
                        rng=rng,
                        device=self.device,
                    )
                    self.memory.set_pseudo_texts(made, version=index)
                    for i in stale:
                        replay[i].pseudo_texts = made.get(replay[i].key, [])
                        replay[i].pseudo_version = index
                    pseudo_stats = asdict(stats)
                pseudo_seconds = time.perf_counter() - t0

        headroom = None
        if strategy.kd_headroom is not None:
            # the model before this chunk: the teacher is that copy already (merging changes the model)
            before = teacher if teacher is not None else copy.deepcopy(model).eval().requires_grad_(False)
            if self._before_previous is not None:
                headroom = fit_gain(
                    before,
                    self._before_previous,
                    images=images[:n_chunk],
                    tokens=self.bundle.tokenizer(texts[:n_chunk]),
                    block=cfg.batch_size,
                    device=self.device,
                    seed=cfg.seed * 1000 + index,
                )
            self._before_previous = before
        past = self._past if strategy.kd_past and teacher is not None and kd_weight > 0 else []
        known_rows = None
        if strategy.kd_known and replay and (headroom is None or headroom < strategy.kd_headroom):
            # a label among the replayed pairs' (the memory, up to replay_pool) is one the teacher knows
            labels = {it.label for it in replay if it.label}
            known_rows = torch.tensor([s.label in labels for s in samples]) if labels else None
        result = train_on_chunk(
            model,
            images=images,
            texts=texts,
            known_rows=known_rows,
            tokenizer=self.bundle.tokenizer,
            strategy=strategy,
            teacher=teacher,
            replay=replay,
            replay_images=replay_images,
            kd_weight=kd_weight,
            text_lr_scale=strategy.text_lr if has_prior else 1.0,
            past_images=self._preprocess([s.image for s in past], [s.key for s in past]) if past else None,
            past_texts=[s.text for s in past],
            # the names the teacher was trained on: the labels among the replayed pairs (kd_names)
            known_names=sorted({it.label for it in replay if it.label}) if strategy.kd_names > 0 else (),
            epochs=cfg.epochs_for(len(texts)),
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            device=self.device,
            seed=cfg.seed * 1000 + index,
            progress=cfg.progress,
            desc=f"{strategy.name} chunk {index}",
        )
        if strategy.merge_alpha is not None and teacher is not None:
            merge_weights(model, teacher, alpha=strategy.merge_alpha)
        if strategy.kd_past:
            self._past.extend(samples)

        admitted = 0
        if self.memory is not None and (strategy.replay or strategy.pseudo_texts):
            # A chunk trained again after a crash may have reached memory already: offer each pair once.
            present = set(self.memory.keys())
            new_items = [
                it
                for it in memory_items_from(chunk_samples, chunk=index, chunk_id=chunk_id)
                + memory_items_from(reference, chunk=index, chunk_id=ref_chunk_id)
                if it.key not in present
            ]
            admitted = len(self.memory.add(new_items, rng=rng).admitted)
        balance = self._balance(index, rng) if strategy.balance_epochs > 0 else None
        self.chunks_done += 1
        return ChunkReport(
            index=index,
            heldout=len(self._heldout),
            epochs=cfg.epochs_for(len(texts)),
            train=result,
            pseudo=pseudo_stats,
            pseudo_seconds=pseudo_seconds,
            memory_items=len(self.memory) if self.memory is not None else 0,
            memory_bytes=self.memory.nbytes() if self.memory is not None else 0,
            admitted=admitted,
            kd_weight=kd_weight if teacher is not None else 0.0,
            memory_share=share,
            novelty=novelty,
            known=float(known_rows.float().mean()) if known_rows is not None else None,
            balance=balance,
            headroom=headroom,
        )

    def _balance(self, index: int, rng: random.Random) -> ChunkResult | None:
        """Balanced fine-tuning (``Strategy.balance_epochs``): passes over the memory alone (up to
        ``replay_pool`` pairs), contrastive loss only. None when the memory holds < 2 pairs."""
        cfg, strategy = self.config, self.strategy
        if self.memory is None or len(self.memory) < 2:
            return None
        if strategy.balance_lr <= 0:
            raise ValueError(f"balance_lr must be > 0, got {strategy.balance_lr}")
        items = self.memory.sample(min(len(self.memory), cfg.replay_pool), rng=rng)
        plain = replace(
            strategy,
            replay=False,
            distill=False,
            pseudo_texts=False,
            contrast="full",
            feature_kd_weight=0.0,
        )
        return train_on_chunk(
            self.bundle.model,
            images=self._preprocess([it.image for it in items], [it.key for it in items]),
            texts=[it.text for it in items],
            tokenizer=self.bundle.tokenizer,
            strategy=plain,
            epochs=strategy.balance_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr * strategy.balance_lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=0,
            device=self.device,
            seed=cfg.seed * 1000 + index + 500_000,
            progress=cfg.progress,
            desc=f"{strategy.name} chunk {index} balance",
        )


@torch.no_grad()
def merge_weights(model: torch.nn.Module, old: torch.nn.Module, *, alpha: float) -> None:
    """WiSE-FT: theta <- alpha * theta_new + (1 - alpha) * theta_old, floating tensors only."""
    old_state = old.state_dict()
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t.mul_(alpha).add_(old_state[name].to(t.device), alpha=1 - alpha)
