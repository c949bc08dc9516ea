import random

import torch

from ctp.continual import memory_items_from
from ctp.models import create_model
from ctp.pseudo_texts import RandomCaptionGenerator, TokenEditGenerator, make_pseudo_texts
from ctp.train import preprocess_images


def _setup(chunk, n=12):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    items = memory_items_from(chunk[:n], chunk=0, chunk_id="c0")
    images = preprocess_images([it.image for it in items], [it.key for it in items], bundle.preprocess_val)
    return bundle, items, images


def test_edit_generator_makes_single_token_edits_of_the_caption(tiny_chunks):
    bundle, items, images = _setup(tiny_chunks[0])
    gen = TokenEditGenerator()
    gen.fit([s.text for s in tiny_chunks[0] + tiny_chunks[1]], images, bundle=bundle)
    proposals = gen.propose(items, images, bundle=bundle, num=8, rng=random.Random(0))
    assert len(proposals) == len(items)
    vocab_words = {w for s in tiny_chunks[0] + tiny_chunks[1] for w in s.text.replace(",", " , ").split()}
    for it, cands in zip(items, proposals, strict=True):
        assert 1 <= len(cands) <= 8
        orig = bundle.tokenizer([it.text])[0]
        for c in cands:
            edited = bundle.tokenizer([c])[0]
            assert int((edited != orig).sum()) >= 1  # changed
            assert c != it.text
            assert set(c.replace(",", " , ").split()) <= vocab_words | {","}  # stream language
    # no parameter gradients are left behind by the generator
    assert all(p.grad is None for p in bundle.model.parameters())


def test_edit_ranking_follows_the_gradient(tiny_chunks):
    """The top-ranked edit raises the image-text similarity more than the average edit."""
    bundle, items, images = _setup(tiny_chunks[0], n=8)
    gen = TokenEditGenerator()
    gen.fit([s.text for s in tiny_chunks[0] + tiny_chunks[1]], images, bundle=bundle)
    props = gen.propose(items, images, bundle=bundle, num=64, rng=random.Random(0))
    with torch.no_grad():
        img_f = bundle.model.encode_image(images, normalize=True)
    top_gain, mean_gain = 0.0, 0.0
    for i, cands in enumerate(props):
        sims = bundle.model.encode_text(bundle.tokenizer(cands), normalize=True) @ img_f[i]
        top_gain += float(sims[:4].mean().detach())
        mean_gain += float(sims.mean().detach())
    assert top_gain > mean_gain


def test_guard_drops_false_negatives_and_keeps_the_hardest(tiny_chunks):
    bundle, items, images = _setup(tiny_chunks[0])

    class Echo:
        """Proposes the true caption (must be dropped) and two other captions."""

        name = "echo"

        def fit(self, texts, images, *, bundle):
            pass

        def propose(self, items, images, *, bundle, num, rng):
            return [[it.text, it.text.upper(), "a totally different thing", "zzz"] for it in items]

    made, stats = make_pseudo_texts(
        Echo(), items, images, bundle=bundle, num_keep=2, margin=0.0, rng=random.Random(0)
    )
    with torch.no_grad():
        img_f = bundle.model.encode_image(images, normalize=True)
        for i, it in enumerate(items):
            true_sim = float(
                bundle.model.encode_text(bundle.tokenizer([it.text]), normalize=True)[0] @ img_f[i]
            )
            assert it.text not in made[it.key]
            kept = made[it.key]
            assert len(kept) <= 2
            if kept:
                sims = bundle.model.encode_text(bundle.tokenizer(kept), normalize=True) @ img_f[i]
                assert bool((sims <= true_sim + 1e-5).all())
                assert sims.tolist() == sorted(sims.tolist(), reverse=True)  # hardest first
    # the true caption and its upper-cased twin (same tokens) are never candidates
    assert stats.proposed == 2 * len(items)


def test_a_huge_margin_keeps_nothing(tiny_chunks):
    bundle, items, images = _setup(tiny_chunks[0], n=4)
    gen = RandomCaptionGenerator()
    gen.fit([s.text for s in tiny_chunks[1]], images, bundle=bundle)
    made, stats = make_pseudo_texts(gen, items, images, bundle=bundle, margin=5.0, rng=random.Random(0))
    assert all(v == [] for v in made.values()) and stats.kept == 0 and stats.proposed > 0


def test_function_words_are_not_edited(tiny_chunks):
    bundle, items, images = _setup(tiny_chunks[0], n=8)
    gen = TokenEditGenerator(max_doc_freq=0.5)
    texts = [s.text for s in tiny_chunks[0] + tiny_chunks[1]]
    gen.fit(texts, images, bundle=bundle)
    stop = gen.function_words()
    a_id = bundle.tokenizer(["a"])[0][1].item()
    assert a_id in stop  # "a" starts most captions
    shape_id = bundle.tokenizer([tiny_chunks[0][0].label])[0][1].item()
    assert shape_id not in stop and shape_id in gen.vocab().tolist()
    for it, cands in zip(
        items, gen.propose(items, images, bundle=bundle, num=16, rng=random.Random(0)), strict=True
    ):
        orig = bundle.tokenizer([it.text])[0]
        for c in cands:
            edited = bundle.tokenizer([c])[0]
            changed = (edited != orig).nonzero().flatten().tolist()
            assert len(changed) == 1
            assert orig[changed[0]].item() not in stop and edited[changed[0]].item() not in stop
