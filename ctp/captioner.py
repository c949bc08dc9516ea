"""A small image-conditioned captioner trained on the stream: the ``captioner`` pseudo-text generator.

The captioner is self-contained: its own conv image encoder and a small transformer decoder with
causal self-attention and cross-attention on the image tokens, over a word-level vocabulary built
from the stream's captions. It does not share weights with the CLIP model, which changes every
chunk. ``fit`` trains it with teacher forcing on each chunk plus a bounded reservoir of past
pairs (so it keeps describing old classes); ``propose`` samples captions for memory images with
temperature + top-k. Samples that describe the image *almost* right (a wrong attribute, a
neighbouring class) are the hard negatives pseudo-text replay wants; the shared guard in
``ctp.pseudo_texts.make_pseudo_texts`` drops those that are as close as the true caption.

The decoder keeps a key/value cache while sampling: without it, each step would re-run the
whole prefix and sampling 500 images x 16 candidates would cost O(L^2) token passes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctp.memory import MemoryItem

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

_WORD = re.compile(r"\w+|[^\w\s]")  # words, and each punctuation mark as its own token
_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?])")


def tokenize_words(text: str) -> list[str]:
    """Lowercased words with punctuation marks as separate tokens."""
    return _WORD.findall(text.lower())


def _words(text: str) -> list[str]:
    """The words of ``text`` without punctuation: captions equal under this are the same text."""
    return re.findall(r"\w+", text.lower())


def detokenize(words: Sequence[str]) -> str:
    """Words joined by spaces; closing punctuation attaches to the word before it, so a sampled
    "a red square ." reads like the stream's "a red square." (the CLIP tokenizer sees both alike)."""
    return _NO_SPACE_BEFORE.sub(r"\1", " ".join(words))


class Vocab:
    """Word <-> id, grown in order of first occurrence; ids 0..3 are the special tokens."""

    def __init__(self, *, max_size: int):
        self.max_size = max_size  # words beyond this map to <unk>
        self.itos: list[str] = list(SPECIALS)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(SPECIALS)}

    def __len__(self) -> int:
        return len(self.itos)

    def grow(self, texts: Sequence[str]) -> int:
        """Add unseen words of ``texts``; returns how many were added."""
        added = 0
        for text in texts:
            for w in tokenize_words(text):
                if w not in self.stoi and len(self.itos) < self.max_size:
                    self.stoi[w] = len(self.itos)
                    self.itos.append(w)
                    added += 1
        return added

    def encode(self, text: str, max_len: int) -> list[int]:
        """<bos> words <eos>, at most ``max_len`` ids; a truncated caption gets no <eos> (it did
        not end there)."""
        ids = [BOS] + [self.stoi.get(w, UNK) for w in tokenize_words(text)] + [EOS]
        return ids[:max_len]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids up to the first <eos>, special tokens dropped."""
        words = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                words.append(self.itos[i])
        return detokenize(words)


class ImageEncoder(nn.Module):
    """[N, 3, S, S] -> [N, grid*grid, width] image tokens: three stride-2 convs, then pooled to a grid."""

    def __init__(self, *, width: int, grid: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),  # S/2
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # S/4
            nn.GELU(),
            nn.Conv2d(64, width, 3, stride=2, padding=1),  # S/8
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)  # S/8 -> grid (identity for S=32, grid=4)
        self.pos = nn.Parameter(torch.randn(grid * grid, width) * 0.02)  # [M, width]
        self.ln = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.convs(images))  # [N, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [N, M, width]
        return self.ln(x + self.pos)


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention on image tokens, MLP."""

    def __init__(self, *, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.self_out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.cross_q = nn.Linear(width, width)
        self.cross_kv = nn.Linear(width, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape  # -> [B, heads, T, w/heads]
        return x.view(b, t, self.heads, w // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape  # -> [B, T, h*d]
        return x.transpose(1, 2).reshape(b, t, h * d)

    def image_kv(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values, computed once per image: 2 x [N, heads, M, d]."""
        k, v = self.cross_kv(image_tokens).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, width]
        image_kv: tuple[torch.Tensor, torch.Tensor],  # 2 x [B, heads, M, d]
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x [B, heads, S, d], earlier steps
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = (self._split(t) for t in self.qkv(self.ln_1(x)).chunk(3, dim=-1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        # With a cache, T == 1 and the new position may attend to every earlier one.
        att = _attend(q, k, v, causal=cache is None)
        x = x + self.drop(self.self_out(self._merge(att)))
        q = self._split(self.cross_q(self.ln_2(x)))
        att = _attend(q, *image_kv, causal=False)
        x = x + self.drop(self.cross_out(self._merge(att)))
        x = x + self.drop(self.mlp(self.ln_3(x)))
        return x, (k, v)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """q [B, h, T, d], k/v [B, h, S, d] -> [B, h, T, d]. A single query (a decoding step) uses
    plain matmuls: on CPU they are 2-4x faster than the fused kernel at T == 1."""
    if q.shape[2] == 1:
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class CaptionModel(nn.Module):
    """Image encoder + text decoder; the output layer is tied to the token embedding, so growing
    the vocabulary resizes one matrix."""

    def __init__(
        self, *, vocab_size: int, width: int, layers: int, heads: int, max_len: int, grid: int, dropout: float
    ):
        super().__init__()
        self.encoder = ImageEncoder(width=width, grid=grid)
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.01)  # [max_len, width]
        self.blocks = nn.ModuleList(
            DecoderBlock(width=width, heads=heads, dropout=dropout) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(width)

    def image_kv(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, cross-attention keys/values of ``images`` [N, 3, S, S]."""
        tokens = self.encoder(images)  # [N, M, width]
        return [blk.image_kv(tokens) for blk in self.blocks]

    def forward(
        self,
        ids: torch.Tensor,  # [B, T] token ids
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits [B, T, V] and the new key/value cache; with a cache, ``ids`` is the next step."""
        start = 0 if cache is None else cache[0][0].shape[2]
        x = self.token_embedding(ids) + self.pos[start : start + ids.shape[1]]
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, image_kv[i], None if cache is None else cache[i])
            new_cache.append(kv)
        logits = self.ln_f(x) @ self.token_embedding.weight.T  # [B, T, V]
        return logits, new_cache

    @torch.no_grad()
    def grow_vocab(self, new_size: int, generator: torch.Generator) -> None:
        """Resize the (tied) embedding to ``new_size`` rows keeping the learned ones."""
        old = self.token_embedding.weight
        if new_size <= old.shape[0]:
            return
        fresh = torch.randn(new_size - old.shape[0], old.shape[1], generator=generator) * 0.02
        # from_pretrained: no default init, so the global RNG is not touched
        weight = torch.cat([old, fresh.to(old.device)])  # [new_size, width]
        self.token_embedding = nn.Embedding.from_pretrained(weight, freeze=False)


class CaptionerGenerator:
    """Pseudo texts sampled from a small captioner trained on the stream (see module docstring)."""

    name = "captioner"

    def __init__(
        self,
        *,
        width: int = 128,  # decoder and image-token width
        layers: int = 2,  # decoder blocks
        heads: int = 4,  # attention heads (must divide width)
        max_len: int = 24,  # tokens per caption incl. <bos>/<eos>; longer captions are truncated
        grid: int = 4,  # image tokens = grid * grid
        image_size: int = 32,  # images are resized to this before encoding and buffering
        epochs: int = 10,  # passes over (chunk + replay sample) per fit
        batch_size: int = 64,
        lr: float = 2e-3,  # AdamW peak learning rate (linear warm-up, cosine decay per fit)
        weight_decay: float = 0.01,
        dropout: float = 0.1,
        buffer_size: int = 2000,  # reservoir of past pairs replayed in later fits
        replay_ratio: float = 1.0,  # replayed pairs per chunk pair in each epoch
        max_vocab: int = 20000,  # words beyond this map to <unk> (never sampled)
        temperature: float = 1.0,  # sampling temperature in propose
        top_k: int = 10,  # sample among the k most likely words (0: all)
        sample_batch: int = 2048,  # sequences decoded at once in propose (bounds cache memory)
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.layers, self.heads, self.max_len, self.grid = width, layers, heads, max_len, grid
        self.image_size = image_size
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.buffer_size, self.replay_ratio = buffer_size, replay_ratio
        self.temperature, self.top_k, self.sample_batch = temperature, top_k, sample_batch
        self.seed = seed
        self.device = torch.device(device)
        self.vocab = Vocab(max_size=max_vocab)
        # Local RNGs only: shuffles and new embedding rows from a torch.Generator, reservoir
        # decisions from a random.Random; global RNG use (init, dropout) sits inside ``_seeded``.
        self._gen = torch.Generator().manual_seed(seed)
        self._reservoir_rng = random.Random(seed)
        self._fits = 0
        self._seen = 0  # pairs offered to the reservoir so far
        self._buffer_texts: list[str] = []
        self._buffer_images: list[torch.Tensor] = []  # [3, S, S] float16 on CPU each
        with self._seeded(seed):
            self.model = CaptionModel(
                vocab_size=len(self.vocab),
                width=width,
                layers=layers,
                heads=heads,
                max_len=max_len,
                grid=grid,
                dropout=dropout,
            ).to(self.device)
        self.model.eval()

    # ------------------------------------------------------------------ training

    def fit(self, texts: Sequence[str], images: torch.Tensor, *, bundle=None) -> None:
        """Train on the chunk's pairs (images [N, 3, H, W], preprocessed) plus replayed past pairs,
        then offer the chunk to the reservoir. ``bundle`` is unused (interface compatibility)."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        if not len(texts):
            return
        t0 = time.perf_counter()
        added = self.vocab.grow(texts)
        self.model.grow_vocab(len(self.vocab), self._gen)
        chunk_images = self._resize(images).cpu()  # [N, 3, S, S] float32
        chunk_ids = [self.vocab.encode(t, self.max_len) for t in texts]
        old_ids = [self.vocab.encode(t, self.max_len) for t in self._buffer_texts]  # new words now known
        n_replay = min(len(old_ids), round(self.replay_ratio * len(texts)))
        steps_per_epoch = math.ceil((len(texts) + n_replay) / self.batch_size)
        total = steps_per_epoch * self.epochs
        # A fresh optimiser per fit: the parameter set changes when the vocabulary grows.
        opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.lr,
            weight_decay=self.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        warmup = max(1, total // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / total))),
        )
        losses = []
        with self._seeded(self.seed * 1_000_003 + self._fits):  # dropout
            self.model.train()
            try:
                for _ in range(self.epochs):
                    for ids, imgs in self._epoch(chunk_ids, chunk_images, old_ids, n_replay):
                        loss = self._loss(ids.to(self.device), imgs.to(self.device))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                        opt.step()
                        sched.step()
                        losses.append(loss.item())
            finally:
                self.model.eval()
        self._add_to_buffer(texts, chunk_images)
        self._fits += 1
        tail = losses[-steps_per_epoch:]
        logger.info(
            "captioner fit %d: %d pairs + %d replayed, %d new words (vocab %d), last-epoch loss %.3f, %.1fs",
            self._fits,
            len(texts),
            n_replay,
            added,
            len(self.vocab),
            sum(tail) / len(tail),
            time.perf_counter() - t0,
        )

    def _epoch(
        self, chunk_ids: list[list[int]], chunk_images: torch.Tensor, old_ids: list[list[int]], n_replay: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches of (ids [B, T], images [B, 3, S, S]) over the chunk and a fresh replay sample."""
        pairs: list[tuple[list[int], torch.Tensor]] = list(zip(chunk_ids, chunk_images, strict=True))
        if n_replay:
            pick = torch.randperm(len(old_ids), generator=self._gen)[:n_replay].tolist()
            pairs += [(old_ids[j], self._buffer_images[j].float()) for j in pick]
        order = torch.randperm(len(pairs), generator=self._gen).tolist()
        for s in range(0, len(order), self.batch_size):
            batch = [pairs[j] for j in order[s : s + self.batch_size]]
            yield _pad([ids for ids, _ in batch]), torch.stack([img for _, img in batch])

    def _loss(self, ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy; ids [B, T] start with <bos>, padded with <pad>."""
        logits, _ = self.model(ids[:, :-1], self.model.image_kv(images))  # [B, T-1, V]
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)

    def _add_to_buffer(self, texts: Sequence[str], images: torch.Tensor) -> None:
        """Reservoir sampling (Vitter's R): every pair seen so far is buffered with equal probability."""
        for text, img in zip(texts, images, strict=True):
            self._seen += 1
            if len(self._buffer_texts) < self.buffer_size:
                self._buffer_texts.append(text)
                self._buffer_images.append(img.half())
            else:
                j = self._reservoir_rng.randrange(self._seen)
                if j < self.buffer_size:
                    self._buffer_texts[j] = text
                    self._buffer_images[j] = img.half()

    # ------------------------------------------------------------------ sampling

    def propose(
        self,
        items: Sequence[MemoryItem],
        images: torch.Tensor,  # [n, 3, H, W] preprocessed images of ``items``
        *,
        bundle=None,
        num: int,
        rng: random.Random,
    ) -> list[list[str]]:
        """Up to ``num`` distinct sampled captions per item, never the item's own caption (up to
        case, spacing and punctuation). Deterministic given ``rng``'s state, which advances by one
        draw."""
        if len(items) != len(images):
            raise ValueError(f"{len(items)} items but {len(images)} images")
        if self._fits == 0 or not len(items) or num <= 0:
            return [[] for _ in items]
        gen = torch.Generator(device=self.device).manual_seed(rng.getrandbits(63))
        rows = self._sample(images, num=num, generator=gen)  # n * num id lists, image-major
        out: list[list[str]] = []
        for i, item in enumerate(items):
            true = _words(item.text)
            seen: dict[str, None] = {}
            for ids in rows[i * num : (i + 1) * num]:
                text = self.vocab.decode(ids)
                if text and _words(text) != true:
                    seen.setdefault(text, None)
            out.append(list(seen))
        return out

    def greedy_caption(self, images: torch.Tensor) -> list[str]:
        """The most likely caption (argmax at each step) for each image [n, 3, H, W]; "" before
        the first fit."""
        if self._fits == 0:
            return ["" for _ in images]
        return [self.vocab.decode(ids) for ids in self._sample(images, num=1, generator=None)]

    @torch.inference_mode()
    def _sample(
        self, images: torch.Tensor, *, num: int, generator: torch.Generator | None
    ) -> list[list[int]]:
        """``num`` captions per image as id lists, image-major; greedy when ``generator`` is None."""
        self.model.eval()
        per_call = max(1, self.sample_batch // num)  # images per decoding batch
        rows: list[list[int]] = []
        for s in range(0, len(images), per_call):
            imgs = self._resize(images[s : s + per_call].to(self.device))
            kv = [
                (k.repeat_interleave(num, 0), v.repeat_interleave(num, 0))
                for k, v in self.model.image_kv(imgs)
            ]  # per block 2 x [b*num, heads, M, d]
            rows += self._decode_batch(kv, generator).tolist()
        return rows

    def _decode_batch(
        self, image_kv: list[tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator | None
    ) -> torch.Tensor:
        """Autoregressive decoding with a key/value cache: ids [B, max_len-1] after <bos>, <pad>
        after <eos>. Finished rows leave the batch (captions are mostly far shorter than max_len)."""
        b = image_kv[0][0].shape[0]
        out = torch.full((b, self.max_len - 1), PAD, dtype=torch.long, device=self.device)
        rows = torch.arange(b, device=self.device)  # rows of ``out`` still decoding
        ids = torch.full((b, 1), BOS, dtype=torch.long, device=self.device)
        cache = None
        banned = torch.tensor([PAD, BOS, UNK], device=self.device)
        for step in range(self.max_len - 1):
            logits, cache = self.model(ids, image_kv, cache)
            logits = logits[:, -1].float()  # [b', V]
            logits[:, banned] = float("-inf")
            if step == 0:
                logits[:, EOS] = float("-inf")  # no empty captions
            if generator is None:
                nxt = logits.argmax(-1)
            else:
                logits = logits / max(self.temperature, 1e-5)
                if 0 < self.top_k < logits.shape[-1]:
                    kth = logits.topk(self.top_k, dim=-1).values[:, -1:]  # [b', 1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # [b']
            out[rows, step] = nxt
            going = nxt != EOS
            if not bool(going.any()):
                break
            if not bool(going.all()):
                rows, nxt = rows[going], nxt[going]
                image_kv = [(k[going], v[going]) for k, v in image_kv]
                cache = [(k[going], v[going]) for k, v in cache]
            ids = nxt[:, None]
        return out

    # ------------------------------------------------------------------ helpers

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 3, S, S] float32: the captioner's cost and buffer size do not depend
        on the CLIP model's input resolution."""
        images = images.float()
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        return images

    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Global RNG use (weight init, dropout) seeded with ``seed`` and isolated from the caller's
        stream: fork the CPU generator (and this device's CUDA one) and seed only those."""
        cuda: list[int] = []
        if self.device.type == "cuda":
            cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            yield


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    """Right-pad id lists with <pad> to [B, longest]: with causal attention padding affects no
    real position, and the loss ignores it."""
    longest = max(len(s) for s in seqs)
    return torch.tensor([s + [PAD] * (longest - len(s)) for s in seqs], dtype=torch.long)
