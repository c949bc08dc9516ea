"""Units of the serving path: the retrieval index, the label cache, the batcher."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
import torch.nn.functional as F

from ctp.models import create_model
from service.serve.batching import Batcher, Overloaded
from service.serve.gallery import GalleryImages, GalleryIndex
from service.serve.holder import ModelHolder
from service.serve.snapshot import LabelCache, Snapshot
from service.serve.sources import DirectorySource
from tests.service.api_support import make_pairs, trained_model, write_checkpoint, write_chunk


def _index(n: int, d: int = 16, *, ann_threshold: int = 10**9, seed: int = 0) -> GalleryIndex:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return GalleryIndex(
        [f"id{i}" for i in range(n)], [f"t{i}" for i in range(n)], img, txt, ann_threshold=ann_threshold
    )


def test_exact_search_is_the_brute_force_ranking():
    index = _index(200)
    q = index.image_emb[17] + 0.01
    q = q / q.norm()
    hits = index.search(q, against="images", k=5)
    want = torch.topk(index.image_emb @ q, 5)
    assert [r for r, _ in hits] == want.indices.tolist() and hits[0][0] == 17
    torch.testing.assert_close(torch.tensor([s for _, s in hits]), want.values)
    assert index.search(q, against="texts", k=500)[-1][1] <= index.search(q, against="texts", k=1)[0][1]
    assert (
        len(index.search(q, against="texts", k=500)) == 200
        and GalleryIndex.empty(16, torch.device("cpu")).search(q, against="images", k=3) == []
    )


def test_extend_leaves_the_old_index_unchanged():
    a = _index(10)
    b = a.extend(["x"], ["new"], a.image_emb[:1] * 1, a.text_emb[:1] * 1)
    assert len(a) == 10 and len(b) == 11 and b.ids[-1] == "x" and a.ids[-1] == "id9"


def test_hnsw_past_the_threshold_agrees_with_exact_search():
    pytest.importorskip("faiss")
    exact = _index(2000)
    ann = _index(2000, ann_threshold=1000)
    assert exact.kind == "exact" and ann.kind == "hnsw"
    agree = 0
    for i in range(0, 2000, 40):
        q = exact.text_emb[i]
        agree += ann.search(q, against="texts", k=1)[0][0] == exact.search(q, against="texts", k=1)[0][0] == i
    assert agree >= 48  # of 50: approximate, but the item itself is found
    grown = ann.extend(["new"], ["t"], exact.image_emb[:1], exact.text_emb[:1])
    assert grown.kind == "hnsw" and len(grown) == 2001 and ann.search(exact.text_emb[0], against="texts", k=1)


def test_label_cache_is_an_lru():
    cache = LabelCache(max_entries=2)
    cache.put(("1", "{c}", "a"), torch.ones(1))
    cache.put(("1", "{c}", "b"), torch.ones(1))
    assert cache.get(("1", "{c}", "a")) is not None  # a is now the most recent
    cache.put(("1", "{c}", "c"), torch.ones(1))
    assert cache.get(("1", "{c}", "b")) is None and cache.get(("1", "{c}", "a")) is not None
    assert cache.get(("2", "{c}", "a")) is None  # another version never shares an entry
    assert len(cache) == 2


def _snapshot(seed: int, version: str) -> Snapshot:
    b = create_model("ctp-vit-micro-32", seed=seed)
    b.model.eval()
    return Snapshot(
        version=version,
        model=b.model,
        tokenizer=b.tokenizer,
        preprocess=b.preprocess_val,
        device=torch.device("cpu"),
        logit_scale=100.0,
        meta={},
        index=GalleryIndex.empty(32, torch.device("cpu")),
    )


def test_batcher_batches_and_keeps_each_job_on_its_own_snapshot():
    s1, s2 = _snapshot(0, "1"), _snapshot(1, "2")
    images = torch.randn(12, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sizes: list[int] = []

    async def run():
        b = Batcher(max_batch_size=4, max_wait_ms=50, queue_size=64, on_batch=lambda n, _: sizes.append(n))
        await b.start()
        try:
            return await asyncio.gather(
                *(b.submit(s1 if i % 2 else s2, "images", images[i]) for i in range(12)),
                b.submit(s1, "texts", ["a circle", "a square"]),
            )
        finally:
            await b.stop()

    out = asyncio.run(run())
    assert sum(sizes) == 13 and max(sizes) == 4 and len(sizes) <= 5  # batched, never past the limit
    for i in range(12):
        torch.testing.assert_close(
            out[i], (s1 if i % 2 else s2).encode_images(images[i]), atol=1e-5, rtol=1e-4
        )
    torch.testing.assert_close(out[12], s1.encode_texts(["a circle", "a square"]), atol=1e-5, rtol=1e-4)


def test_batcher_refuses_when_the_queue_is_full():
    snap = _snapshot(0, "1")

    async def run():
        b = Batcher(max_batch_size=1, max_wait_ms=0, queue_size=2)
        await b.start()
        try:
            results = await asyncio.gather(
                *(b.submit(snap, "texts", ["x"]) for _ in range(6)), return_exceptions=True
            )
        finally:
            await b.stop()
        return results

    results = asyncio.run(run())
    # submit() puts without yielding: the worker has not taken any yet, so 2 fit and 4 are refused
    assert sum(isinstance(r, Overloaded) for r in results) == 4
    assert sum(isinstance(r, torch.Tensor) for r in results) == 2


def test_newest_keeps_the_last_rows():
    index = _index(10)
    assert index.newest(20) is index and len(index.newest(0)) == 0
    tail = index.newest(3)
    assert tail.ids == ["id7", "id8", "id9"] and torch.equal(tail.text_emb, index.text_emb[-3:])


def test_the_gallery_holds_the_newest_pairs_as_chunks_arrive(tmp_path):
    """A real holder on a checkpoint dir: the index and the thumbnail map stay at the cap, with the
    newest pairs, however many chunks land (and a chunk removed by retention is forgotten)."""
    write_checkpoint(tmp_path / "ckpt" / "v000001", trained_model(), version=1)
    chunks = tmp_path / "chunks"
    batches = [make_pairs(per_class=2, seed=s) for s in range(5)]  # 8 pairs each
    for k in range(3):
        write_chunk(chunks, f"c{k}", batches[k])
    holder = ModelHolder(source=DirectorySource(tmp_path / "ckpt"), chunks_root=chunks, gallery_max_pairs=12)
    holder.poll_once()
    ids = lambda: holder.snapshot.index.ids  # noqa: E731
    want = [p.meta["id"] for b in batches[:3] for p in b][-12:]
    assert ids() == want  # the newest 12 of 24: chunk c2 and the last 4 of c1
    for k in (3, 4):
        write_chunk(chunks, f"c{k}", batches[k])
        holder.poll_once()
        assert len(holder.snapshot.index) == 12
        assert ids() == [p.meta["id"] for b in batches[: k + 1] for p in b][-12:]
    images = GalleryImages(max_items=12, max_image_bytes=10**6)
    dirs = holder.gallery_dirs()
    newest, oldest = batches[4][0], batches[0][0]
    assert images.read(newest.meta["id"], dirs) == (newest.image, "image/png")
    assert images.read(oldest.meta["id"], dirs) is None and len(images) == 12
    shutil.rmtree(chunks / "c0")  # chunk retention
    holder.poll_once()
    assert chunks / "c0" not in holder._known_dirs and len(holder.snapshot.index) == 12
