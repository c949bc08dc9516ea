"""Pseudo-text replay: hard-negative texts for the images in replay memory.

A generator *proposes* candidate texts for each memory image; ``make_pseudo_texts`` then scores
every candidate with the model (the model as it is before the next chunk, i.e. the teacher),
drops false negatives and keeps the hardest few. The guard and the selection are shared, so
generators differ only in how they propose:

- ``edit``: gradient-guided token substitution (HotFlip, Ebrahimi et al. 2018) on the true
  caption: the first-order change of image-text similarity for swapping token p for v is
  (E[v] - E[x_p]) . dS/de_p, so one forward/backward per image ranks every single-token edit.
  Conditioned on the image through the gradient of *its* similarity.
- ``random``: other captions from the stream, not conditioned on the image (ablation baseline).
- ``captioner``: a small text decoder trained on the stream, sampling from the image
  (``ctp.captioner``).

False-negative guard: a candidate is kept only if it differs from the true caption and scores
more than ``margin`` below it: s(img, cand) < s(img, true) - margin (cosine similarities).
Generation is amortised: it runs for memory items whose cached texts are missing or older than
the refresh period, never per training step.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ctp.config import GENERATORS  # noqa: F401  re-exported: the names, without torch
from ctp.memory import MemoryItem

logger = logging.getLogger(__name__)


class PseudoTextGenerator(Protocol):
    name: str

    def fit(self, texts: Sequence[str], images: torch.Tensor, *, bundle) -> None:
        """See a new chunk's pairs (vocabulary, captioner training...); images [N, 3, H, W]."""

    def propose(
        self, items: Sequence[MemoryItem], images: torch.Tensor, *, bundle, num: int, rng: random.Random
    ) -> list[list[str]]:
        """Up to ``num`` candidate texts per item; ``images`` are the preprocessed [n, 3, H, W]."""


@dataclass
class PseudoTextStats:
    items: int = 0
    proposed: int = 0  # candidates scored
    dropped_false_negative: int = 0  # failed the guard
    kept: int = 0
    mean_true_sim: float = 0.0  # s(img, true caption)
    mean_kept_sim: float = 0.0  # s(img, kept pseudo text): how hard the negatives are
    extra: dict = field(default_factory=dict)


class RandomCaptionGenerator:
    """Captions of other pairs from the stream: negatives that ignore the image (ablation)."""

    name = "random"

    def __init__(self, *, max_pool: int = 5000):
        self.max_pool = max_pool
        self.pool: list[str] = []

    def fit(self, texts: Sequence[str], images: torch.Tensor, *, bundle) -> None:
        self.pool = (self.pool + list(texts))[-self.max_pool :]

    def propose(self, items, images, *, bundle, num, rng):
        if not self.pool:
            return [[] for _ in items]
        return [[self.pool[rng.randrange(len(self.pool))] for _ in range(num)] for _ in items]


class TokenEditGenerator:
    """HotFlip token substitutions on the true caption, ranked by the image's own gradient.

    Candidate replacement tokens are those seen in stream captions (at most ``max_vocab``, the
    most frequent), so edits stay in the language of the stream. Needs an open_clip model with
    a ``token_embedding`` (CLIP/CoCa with the built-in text tower).
    """

    name = "edit"

    def __init__(self, *, max_vocab: int = 4096, max_doc_freq: float = 0.5, batch_size: int = 128):
        self.max_vocab = max_vocab
        # Words in more than this share of captions ("a", "the", "of") are function words: they
        # are neither edited nor used as replacements, because swapping "a" for "the" makes a
        # text that still describes the image, i.e. a false negative the guard may miss.
        self.max_doc_freq = max_doc_freq
        self.batch_size = batch_size
        self.token_counts: Counter[int] = Counter()  # occurrences of whole-word tokens
        self.doc_counts: Counter[int] = Counter()  # captions containing each token
        self.num_docs = 0
        # (previous token, next token) contexts of each word: a word is only replaced by a word
        # seen in one of its contexts ("pink square" -> "pink circle", never "pink over"), so an
        # edit swaps an attribute for another of its kind instead of making a non-sentence.
        self.contexts: dict[int, set[tuple[int, int]]] = {}

    def fit(self, texts: Sequence[str], images: torch.Tensor, *, bundle) -> None:
        tokens = bundle.tokenizer(list(texts))
        words = _whole_word_ids(bundle)
        for row in tokens.tolist():
            row = [t for t in row if t != 0]  # drop padding; SOT/EOT stay as boundaries
            present = [t for t in row if t in words]
            self.token_counts.update(present)
            self.doc_counts.update(set(present))
            for i in range(1, len(row) - 1):
                if row[i] in words:
                    self.contexts.setdefault(row[i], set()).add((row[i - 1], row[i + 1]))
        self.num_docs += len(texts)

    def substitutable(self, vocab: torch.Tensor) -> torch.Tensor:
        """[V, V] bool: vocab[j] was seen in a context of vocab[i] (and i != j)."""
        ids = vocab.tolist()
        ctx = [self.contexts.get(t, set()) for t in ids]
        owners: dict[tuple[int, int], list[int]] = {}
        for i, cs in enumerate(ctx):
            for c in cs:
                owners.setdefault(c, []).append(i)
        allowed = torch.zeros(len(ids), len(ids), dtype=torch.bool)
        for group in owners.values():
            idx = torch.tensor(group)
            allowed[idx[:, None], idx[None, :]] = True
        allowed.fill_diagonal_(False)
        return allowed

    def function_words(self) -> set[int]:
        return {t for t, n in self.doc_counts.items() if n > self.max_doc_freq * max(self.num_docs, 1)}

    def vocab(self) -> torch.Tensor:
        stop = self.function_words()
        return torch.tensor(
            [t for t, _ in self.token_counts.most_common() if t not in stop][: self.max_vocab],
            dtype=torch.long,
        )

    def propose(self, items, images, *, bundle, num, rng):
        model = bundle.model
        if not hasattr(model, "token_embedding"):
            raise TypeError("the edit generator needs an open_clip model with token_embedding")
        vocab = self.vocab().to(images.device)
        out: list[list[str]] = []
        for start in range(0, len(items), self.batch_size):
            part = items[start : start + self.batch_size]
            out.extend(self._propose_batch(part, images[start : start + len(part)], bundle, vocab, num))
        return out

    def _propose_batch(self, items, images, bundle, vocab, num) -> list[list[str]]:
        model = bundle.model
        tokens = bundle.tokenizer([it.text for it in items]).to(images.device)  # [n, L]
        captured: dict[str, torch.Tensor] = {}

        def keep_grad(_module, _inp, output):
            output.retain_grad()
            captured["emb"] = output

        with torch.no_grad():
            img_f = model.encode_image(images, normalize=True)  # [n, D]
        handle = model.token_embedding.register_forward_hook(keep_grad)
        try:
            with torch.enable_grad():
                txt_f = model.encode_text(tokens, normalize=True)  # [n, D]
                (img_f * txt_f).sum().backward(inputs=[captured["emb"]])
        finally:
            handle.remove()
        emb = captured["emb"]
        grad = emb.grad  # [n, L, w]
        table = model.token_embedding.weight.detach()[vocab]  # [V, w]
        # first-order gain of similarity for putting vocab v at position p: [n, L, V]
        gain = grad @ table.T - (grad * emb.detach()).sum(-1, keepdim=True)
        editable = _editable_positions(tokens, bundle)  # [n, L] bool
        stop = torch.tensor(sorted(self.function_words()) or [-1], device=tokens.device)
        editable &= ~torch.isin(tokens, stop)
        gain = gain.masked_fill(~editable[..., None], float("-inf"))
        # only substitutions seen in a shared context: [n, L, V] from the [V, V] table
        allowed = self.substitutable(vocab).to(tokens.device)
        pos_in_vocab = (tokens[..., None] == vocab[None, None, :]).float().argmax(-1)  # [n, L]
        in_vocab = torch.isin(tokens, vocab)
        gain = gain.masked_fill(~(allowed[pos_in_vocab] & in_vocab[..., None]), float("-inf"))
        n, L, V = gain.shape
        k = min(num, L * V)
        top = gain.reshape(n, L * V).topk(k, dim=1)
        texts: list[list[str]] = []
        for i in range(n):
            cands = []
            for score, flat in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True):
                if score == float("-inf"):
                    break
                pos, v = divmod(flat, V)
                edited = tokens[i].clone()
                edited[pos] = vocab[v]
                cands.append(_decode(bundle, edited))
            texts.append(cands)
        model.zero_grad(set_to_none=True)
        return texts


def _special_ids(bundle) -> set[int]:
    tok = getattr(bundle.tokenizer, "encoder", None)
    ids = {0}
    if tok is not None:
        ids |= {tok.get("<start_of_text>", 0), tok.get("<end_of_text>", 0)}
    return ids


def _whole_word_ids(bundle) -> set[int]:
    """BPE ids that are a whole word ("red</w>"); swapping a word piece would make non-words."""
    cached = getattr(bundle.tokenizer, "_ctp_whole_words", None)
    if cached is None:
        decoder = getattr(bundle.tokenizer, "decoder", {})
        cached = {i for i, tok in decoder.items() if tok.endswith("</w>") and not tok.startswith("<")}
        bundle.tokenizer._ctp_whole_words = cached
    return cached


def _editable_positions(tokens: torch.Tensor, bundle) -> torch.Tensor:
    """[n, L] bool: positions holding a whole word (the previous token ends a word too)."""
    words = torch.tensor(sorted(_whole_word_ids(bundle)), device=tokens.device)
    special = torch.tensor(sorted(_special_ids(bundle)), device=tokens.device)
    is_word = torch.isin(tokens, words)
    prev_ends_word = torch.ones_like(is_word)
    prev_ends_word[:, 1:] = is_word[:, :-1] | torch.isin(tokens[:, :-1], special)
    return is_word & prev_ends_word


def _decode(bundle, tokens: torch.Tensor) -> str:
    special = _special_ids(bundle)
    ids = [t for t in tokens.tolist() if t not in special]
    return bundle.tokenizer.decode(ids).strip()


def create_generator(name: str, **kwargs) -> PseudoTextGenerator:
    if name == "edit":
        return TokenEditGenerator(**kwargs)
    if name == "random":
        return RandomCaptionGenerator(**kwargs)
    if name == "captioner":
        from ctp.captioner import CaptionerGenerator

        return CaptionerGenerator(**kwargs)
    raise ValueError(f"unknown pseudo-text generator {name!r}; choose edit, captioner or random")


@torch.no_grad()
def score_texts(bundle, image_features: torch.Tensor, texts: list[list[str]], device) -> list[torch.Tensor]:
    """Cosine similarity of each image with each of its texts: a list of [k_i] tensors."""
    flat = [t for ts in texts for t in ts]
    if not flat:
        return [torch.empty(0) for _ in texts]
    feats = []
    for start in range(0, len(flat), 512):
        tok = bundle.tokenizer(flat[start : start + 512]).to(device)
        feats.append(bundle.model.encode_text(tok, normalize=True))
    txt = torch.cat(feats)  # [sum k_i, D]
    out, at = [], 0
    for i, ts in enumerate(texts):
        out.append((txt[at : at + len(ts)] @ image_features[i]).cpu())
        at += len(ts)
    return out


def make_pseudo_texts(
    generator: PseudoTextGenerator,
    items: Sequence[MemoryItem],
    images: torch.Tensor,  # [n, 3, H, W], preprocessed images of ``items``
    *,
    bundle,
    num_keep: int = 2,
    num_candidates: int = 16,
    margin: float = 0.05,
    rng: random.Random,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, list[str]], PseudoTextStats]:
    """Propose, guard and select: the ``num_keep`` hardest valid negatives per item."""
    model = bundle.model
    was_training = model.training
    model.eval()
    stats = PseudoTextStats(items=len(items))
    result: dict[str, list[str]] = {}
    try:
        images = images.to(device)
        proposals = generator.propose(items, images, bundle=bundle, num=num_candidates, rng=rng)
        with torch.no_grad():
            img_f = torch.cat(
                [model.encode_image(images[s : s + 512], normalize=True) for s in range(0, len(items), 512)]
            )
        # A candidate that tokenizes like the true caption is the true caption to the model.
        candidates = [
            [
                c
                for c in sorted(set(p))
                if not torch.equal(bundle.tokenizer([c])[0], bundle.tokenizer([it.text])[0])
            ]
            for it, p in zip(items, proposals, strict=True)
        ]
        sims = score_texts(
            bundle, img_f, [[it.text] + c for it, c in zip(items, candidates, strict=True)], device
        )
        kept_sims, true_sims = [], []
        for it, cands, s in zip(items, candidates, sims, strict=True):
            true_sim, cand_sims = float(s[0]), s[1:]
            true_sims.append(true_sim)
            stats.proposed += len(cands)
            ok = [
                (float(cs), c)
                for cs, c in zip(cand_sims, cands, strict=True)
                if float(cs) < true_sim - margin
            ]
            stats.dropped_false_negative += len(cands) - len(ok)
            ok.sort(reverse=True)  # hardest (most similar) first
            chosen = ok[:num_keep]
            stats.kept += len(chosen)
            kept_sims += [cs for cs, _ in chosen]
            result[it.key] = [c for _, c in chosen]
        stats.mean_true_sim = sum(true_sims) / max(len(true_sims), 1)
        stats.mean_kept_sim = sum(kept_sims) / max(len(kept_sims), 1)
    finally:
        model.train(was_training)
    logger.info(
        "pseudo texts (%s): %d items, %d proposed, %d dropped by the guard, %d kept",
        generator.name,
        stats.items,
        stats.proposed,
        stats.dropped_false_negative,
        stats.kept,
    )
    return result, stats
