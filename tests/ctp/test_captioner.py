import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ctp.captioner import EOS, CaptionerGenerator, Vocab, detokenize, tokenize_words
from ctp.memory import MemoryItem
from ctp.models import create_model
from ctp.pseudo_texts import make_pseudo_texts

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
# Small and quick, but the same architecture as the defaults.
SMALL = dict(width=64, layers=1, heads=2, max_len=12, epochs=15, batch_size=32, lr=3e-3, buffer_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and two OpenMP threads on a busy 2-core machine
    can be many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle():
    return create_model("ctp-vit-micro-32", seed=0)


def squares(
    bundle, colours: list[str], per_colour: int, seed: int
) -> tuple[list[str], torch.Tensor, list[str]]:
    """Solid 32x32 squares with a little pixel noise: (captions, images [N, 3, 32, 32], colours)."""
    rng = np.random.default_rng(seed)
    texts, images, names = [], [], []
    for name in colours:
        for _ in range(per_colour):
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 26, size=(32, 32, 3)), 0, 255)
            images.append(bundle.preprocess_val(Image.fromarray(pixels.astype(np.uint8), "RGB")))
            texts.append(f"a {name} square")
            names.append(name)
    return texts, torch.stack(images), names


def items_for(texts: list[str], prefix: str = "k") -> list[MemoryItem]:
    return [MemoryItem(key=f"{prefix}{i}", image=b"", text=t) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def fitted(bundle):
    """A captioner fitted on all four colours, with one probe image per colour."""
    texts, images, _ = squares(bundle, list(COLOURS), 16, seed=0)
    cap = CaptionerGenerator(**SMALL, seed=0)
    cap.fit(texts, images, bundle=bundle)
    _, probes, names = squares(bundle, list(COLOURS), 1, seed=1)
    return cap, probes, names


# ---------------------------------------------------------------- vocabulary


def test_tokenize_and_detokenize():
    assert tokenize_words("A Red square, on grey!") == ["a", "red", "square", ",", "on", "grey", "!"]
    assert detokenize(["a", "red", "square", ",", "on", "grey", "!"]) == "a red square, on grey!"


def test_vocab_encode_decode_truncate_and_cap():
    vocab = Vocab(max_size=7)
    assert vocab.grow(["a red square", "a blue square"]) == 3  # 4 specials + a, red, square
    assert vocab.itos[4:] == ["a", "red", "square"]
    ids = vocab.encode("A red square", max_len=10)
    assert ids[-1] == EOS and vocab.decode(ids) == "a red square"
    assert vocab.decode(vocab.encode("a blue square", max_len=10)) == "a square"  # blue is <unk>
    assert len(vocab.encode("a red square a red square", max_len=4)) == 4
    assert EOS not in vocab.encode("a red square a red square", max_len=4)


# ---------------------------------------------------------------- learning


def test_greedy_caption_names_the_colour(fitted):
    cap, probes, names = fitted
    assert cap.greedy_caption(probes) == [f"a {n} square" for n in names]


def test_greedy_caption_resizes_other_resolutions(fitted):
    cap, probes, names = fitted
    big = torch.nn.functional.interpolate(probes, size=(64, 64), mode="nearest")  # [4, 3, 64, 64]
    assert cap.greedy_caption(big) == [f"a {n} square" for n in names]


def test_fit_is_deterministic_and_leaves_global_rng_alone(bundle):
    texts, images, _ = squares(bundle, ["red", "blue"], 4, seed=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    states = []
    for _ in range(2):
        cap = CaptionerGenerator(**{**SMALL, "epochs": 2}, seed=5)
        cap.fit(texts, images, bundle=bundle)
        cap.propose(items_for(texts), images, bundle=bundle, num=4, rng=random.Random(0))
        states.append(cap.model.state_dict())
    torch.testing.assert_close(torch.random.get_rng_state(), before)
    for name, tensor in states[0].items():
        torch.testing.assert_close(states[1][name], tensor, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- proposing


def test_propose_shapes_and_determinism(fitted):
    cap, probes, names = fitted
    items = items_for([f"a {n} square" for n in names])
    out = cap.propose(items, probes, bundle=None, num=8, rng=random.Random(7))
    assert len(out) == len(items)
    for item, cands in zip(items, out, strict=True):
        assert 1 <= len(cands) <= 8
        assert len(set(cands)) == len(cands)
        assert item.text not in cands and "" not in cands
        assert all("<" not in c for c in cands)  # no special tokens
    assert cap.propose(items, probes, bundle=None, num=8, rng=random.Random(7)) == out
    rng = random.Random(7)
    cap.propose(items, probes, bundle=None, num=8, rng=rng)
    assert rng.getstate() != random.Random(7).getstate()  # the caller's rng advanced


def test_propose_drops_the_true_caption_up_to_case_spacing_and_punctuation(fitted):
    cap, probes, _ = fitted
    cap_t, cap_k = cap.temperature, cap.top_k
    cap.temperature, cap.top_k = 1e-4, 1  # near-greedy: every sample is "a red square"
    try:
        for true in ("a red square", "A RED square.", "A  Red  square !"):
            out = cap.propose(items_for([true]), probes[:1], bundle=None, num=4, rng=random.Random(0))
            assert out == [[]], true
        out = cap.propose(items_for(["a red circle"]), probes[:1], bundle=None, num=4, rng=random.Random(0))
        assert out == [["a red square"]]
    finally:
        cap.temperature, cap.top_k = cap_t, cap_k


def test_propose_before_fit_and_bad_input(bundle):
    cap = CaptionerGenerator(**SMALL)
    _, images, _ = squares(bundle, ["red"], 2, seed=0)
    assert cap.propose(items_for(["a", "b"]), images, bundle=bundle, num=4, rng=random.Random(0)) == [[], []]
    assert cap.greedy_caption(images) == ["", ""]
    with pytest.raises(ValueError):
        cap.fit(["only one"], images, bundle=bundle)


# ---------------------------------------------------------------- growth and replay


def test_vocab_growth_and_replay_keep_old_words_and_classes(bundle):
    cap = CaptionerGenerator(**SMALL, seed=0)
    texts, images, _ = squares(bundle, ["red", "green"], 16, seed=0)
    cap.fit(texts, images, bundle=bundle)
    grown = copy.deepcopy(cap.model)
    grown.grow_vocab(len(cap.vocab) + 3, torch.Generator().manual_seed(0))
    old_rows = cap.model.token_embedding.weight.detach()  # [V, w]
    assert grown.token_embedding.weight.shape == (len(cap.vocab) + 3, old_rows.shape[1])
    torch.testing.assert_close(grown.token_embedding.weight[: len(old_rows)].detach(), old_rows)
    n_old = len(cap.vocab)

    texts2, images2, _ = squares(bundle, ["blue", "yellow"], 16, seed=1)
    texts2 = [t.replace("square", "block") for t in texts2]  # new words: blue, yellow, block
    cap.fit(texts2, images2, bundle=bundle)
    assert len(cap.vocab) == n_old + 3
    assert cap.model.token_embedding.weight.shape[0] == len(cap.vocab)
    assert cap.vocab.decode(cap.vocab.encode("a red square", max_len=12)) == "a red square"
    _, probes, names = squares(bundle, ["red", "green", "blue", "yellow"], 1, seed=2)
    # The replay buffer keeps the first chunk's classes describable after the second chunk.
    assert cap.greedy_caption(probes) == ["a red square", "a green square", "a blue block", "a yellow block"]

    # Without the buffer the same two fits forget the first chunk.
    plain = CaptionerGenerator(**{**SMALL, "buffer_size": 0}, seed=0)
    plain.fit(texts, images, bundle=bundle)
    plain.fit(texts2, images2, bundle=bundle)
    assert not {"red", "green"} & {w for c in plain.greedy_caption(probes[:2]) for w in c.split()}


def test_reservoir_buffer_is_bounded(bundle):
    cap = CaptionerGenerator(**{**SMALL, "epochs": 1, "buffer_size": 10}, seed=0)
    for seed in range(3):
        texts, images, _ = squares(bundle, ["red", "blue"], 8, seed=seed)
        cap.fit(texts, images, bundle=bundle)
    assert len(cap._buffer_texts) == len(cap._buffer_images) == 10
    assert cap._seen == 48
    assert cap._buffer_images[0].shape == (3, 32, 32) and cap._buffer_images[0].dtype == torch.float16


# ---------------------------------------------------------------- with the shared guard


def test_make_pseudo_texts_never_keeps_the_true_caption(fitted, bundle):
    cap, _, _ = fitted
    texts, images, _ = squares(bundle, list(COLOURS), 3, seed=3)
    items = items_for(texts)
    result, stats = make_pseudo_texts(cap, items, images, bundle=bundle, rng=random.Random(0), num_keep=2)
    assert set(result) == {it.key for it in items}
    assert stats.items == len(items) and stats.proposed > 0
    assert stats.kept == sum(len(v) for v in result.values()) <= 2 * len(items)
    for item in items:
        assert item.text not in result[item.key]
        assert len(result[item.key]) <= 2
