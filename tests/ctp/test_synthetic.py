import itertools
import json

import numpy as np
import pytest

from ctp.data import load_classification_set, load_retrieval_set, read_chunk
from ctp.images import decode_image
from ctp.synthetic import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    POSITIONS,
    PRESETS,
    SHAPES,
    SIZES,
    SyntheticConfig,
    generate_pairs,
    make_stream,
    shape_mask,
)

TINY = PRESETS["tiny"]
# Small configs beyond the presets: 2 classes per chunk, and instance-incremental over 3 chunks.
SMALL_CI = SyntheticConfig(num_classes=8, num_chunks=4, train_per_class=6, eval_per_class=3, seed=3)
SMALL_II = SyntheticConfig(
    num_classes=6, num_chunks=3, train_per_class=7, eval_per_class=2, split="instance-incremental", seed=5
)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_stream(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, make_stream(out, TINY)


def test_vocabulary_sizes():
    assert len(SHAPES) >= 16 and len(COLORS) >= 8 and len(BACKGROUNDS) >= 4
    assert len(CAPTION_TEMPLATES) >= 5 and set(POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert all(name.isalpha() and name.islower() for name in SHAPES)


def test_generate_pairs():
    classes = ["star", "ring", "heart"]
    pairs = generate_pairs(classes, 20, np.random.default_rng(0), 32)
    assert len(pairs) == 60
    assert len({p.key for p in pairs}) == 60
    assert len({p.image for p in pairs}) == 60  # jitter: no two images identical
    assert sorted({p.label for p in pairs}) == sorted(classes)
    assert {p.label: sum(q.label == p.label for q in pairs) for p in pairs} == dict.fromkeys(classes, 20)
    for p in pairs:
        assert set(p.meta) == {"color", "size", "position", "background"}
        assert p.meta["color"] in COLORS and p.meta["size"] in SIZES
        assert p.meta["position"] in POSITIONS and p.meta["background"] in BACKGROUNDS
        assert p.label in p.text
        assert decode_image(p.image).size == (32, 32)
    # Several phrasings are in use.
    assert len({p.text.split()[0] for p in pairs}) >= 4


def test_image_size_option():
    (pair,) = generate_pairs(["arrow"], 1, np.random.default_rng(0), 64)
    assert decode_image(pair.image).size == (64, 64)


def test_class_incremental_stream(tiny_stream):
    out, paths = tiny_stream
    assert [p.name for p in paths.chunks] == ["chunk_000", "chunk_001"]
    classes = list(SHAPES)[: TINY.num_classes]
    # Groups are disjoint and cover all classes; chunk j holds exactly group j.
    assert sorted(c for group in paths.class_order for c in group) == sorted(classes)
    for chunk, group in zip(paths.chunks, paths.class_order, strict=True):
        samples = read_chunk(chunk)
        assert {s.label for s in samples} == set(group)
        assert len(samples) == TINY.train_per_class * len(group)
        for s in samples:
            assert s.label in s.text
            assert decode_image(s.image).size == (TINY.image_size, TINY.image_size)
    record = json.loads((out / "stream.json").read_text())
    assert record["config"]["split"] == "class-incremental"
    assert record["class_order"] == paths.class_order


def test_eval_sets(tiny_stream):
    _, paths = tiny_stream
    cls = load_classification_set(paths.classification)
    assert cls.classnames == list(SHAPES)[: TINY.num_classes]
    assert len(cls.templates) >= 4 and all("{c}" in t for t in cls.templates)
    assert np.bincount(cls.targets).tolist() == [TINY.eval_per_class] * TINY.num_classes
    ret = load_retrieval_set(paths.retrieval)
    assert 0 < len(ret.images) <= 500
    assert all(1 <= len(caps) <= 2 for caps in ret.captions)
    # Eval images are drawn from their own random stream: none appears in training.
    train = {s.image for chunk in paths.chunks for s in read_chunk(chunk)}
    assert not train & set(cls.images)
    assert set(ret.images) <= set(cls.images)
    for img, caps in zip(ret.images, ret.captions, strict=True):
        name = cls.classnames[cls.targets[cls.images.index(img)]]
        assert all(name in c for c in caps)


def test_instance_incremental_stream(tmp_path):
    paths = make_stream(tmp_path, SMALL_II)
    classes = set(list(SHAPES)[: SMALL_II.num_classes])
    chunks = [read_chunk(c) for c in paths.chunks]
    assert len(chunks) == 3
    for samples in chunks:
        assert {s.label for s in samples} == classes
    all_images = [s.image for samples in chunks for s in samples]
    assert len(all_images) == len(set(all_images)) == SMALL_II.num_classes * SMALL_II.train_per_class
    assert sorted(paths.class_order[0]) == sorted(classes)
    assert paths.class_order[1:] == [[], []]


def test_class_incremental_many_chunks(tmp_path):
    paths = make_stream(tmp_path, SMALL_CI)
    groups = paths.class_order
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert len({c for g in groups for c in g}) == 8
    for chunk, group in zip(paths.chunks, groups, strict=True):
        assert {s.label for s in read_chunk(chunk)} == set(group)


def test_deterministic_and_cached(tmp_path, tiny_stream):
    out, _ = tiny_stream
    paths = make_stream(tmp_path / "again", TINY)
    assert _files(tmp_path / "again") == _files(out)
    # Same config: reused, not regenerated.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*.tar")}
    assert make_stream(tmp_path / "again", "tiny") == paths
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*.tar")} == before


def test_other_seed_or_config_regenerates(tmp_path):
    cfg = SyntheticConfig(num_classes=4, num_chunks=2, train_per_class=3, eval_per_class=1, seed=0)
    make_stream(tmp_path, cfg)
    first = _files(tmp_path)
    other = SyntheticConfig(num_classes=4, num_chunks=2, train_per_class=2, eval_per_class=1, seed=1)
    paths = make_stream(tmp_path, other)
    assert _files(tmp_path) != first
    assert sum(len(read_chunk(c)) for c in paths.chunks) == 8  # no stale shards from the first run
    assert json.loads((tmp_path / "stream.json").read_text())["config"]["seed"] == 1


def test_a_style_shift_keeps_one_background_for_the_eval_images(tmp_path):
    shifted = SyntheticConfig(**{**SMALL_II.__dict__, "eval_background": "striped"})
    paths = make_stream(tmp_path / "shift", shifted)
    trained = {s.meta["background"] for c in paths.chunks for s in read_chunk(c)}
    assert trained == set(BACKGROUNDS) - {"striped"}
    retrieval = load_retrieval_set(paths.retrieval)
    assert all("striped" in caps[0] for caps in retrieval.captions if "background" in caps[0])
    # the eval images are drawn on stripes: the top row or the left column crosses them (a flat
    # black or white background, or one of grey noise, would not give two levels this far apart)
    cls = load_classification_set(paths.classification)
    for img in cls.images:
        a = np.asarray(decode_image(img)).astype(int).mean(axis=2)
        edge = np.concatenate([a[0], a[:, 0]])
        assert edge.max() - edge.min() > 40 and len(np.unique(edge.round())) <= 12
    # the unshifted stream of the same config is the one built before the field existed: its
    # manifest does not record the field, so caches made before it are reused, bytes unchanged
    plain = make_stream(tmp_path / "plain", SMALL_II)
    manifest = json.loads((tmp_path / "plain" / "stream.json").read_text())
    assert "eval_background" not in manifest["config"]
    assert {s.meta["background"] for c in plain.chunks for s in read_chunk(c)} <= set(BACKGROUNDS)
    assert _files(tmp_path / "plain") != _files(tmp_path / "shift")
    with pytest.raises(ValueError, match="eval_background"):
        SyntheticConfig(eval_background="plaid")


def test_config_validation():
    with pytest.raises(ValueError):
        SyntheticConfig(split="domain-incremental")
    with pytest.raises(ValueError):
        SyntheticConfig(num_classes=len(SHAPES) + 1)
    with pytest.raises(ValueError):
        SyntheticConfig(num_classes=2, num_chunks=3)
    assert PRESETS["class-incremental"].num_classes == 16 and PRESETS["class-incremental"].num_chunks == 4
    assert PRESETS["instance-incremental"].split == "instance-incremental"


def _shift_invariant_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the smaller shape's area that differs, minimised over shifts of up to 2 pixels."""
    best = min(
        np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b).sum() for dy in range(-2, 3) for dx in range(-2, 3)
    )
    return best / min(a.sum(), b.sum())


@pytest.mark.parametrize("size", sorted(SIZES))
def test_default_classes_are_visually_distinct(size):
    # Silhouettes at 32x32 must differ by at least 18% of their area even after the best
    # alignment; hexagon and pentagon, beyond the default 16, are closer (12%).
    masks = {
        s: np.asarray(shape_mask(s, image_size=32, radius=SIZES[size]), dtype=np.float64) / 255
        for s in SHAPES
    }
    default = list(SHAPES)[:16]
    for a, b in itertools.combinations(SHAPES, 2):
        threshold = 0.18 if a in default and b in default else 0.12
        assert _shift_invariant_difference(masks[a], masks[b]) >= threshold, (a, b)


def test_generated_classes_separable_by_nearest_centroid():
    # End to end through draw + encode + decode: on a fixed background and position, a nearest
    # centroid on foreground masks tells the classes apart despite jitter in colour and scale.
    from ctp.synthetic import draw_image

    rng = np.random.default_rng(0)
    classes = list(SHAPES)[:16]

    def fg(shape: str) -> np.ndarray:
        img = draw_image(
            shape, color="yellow", size="large", position="center", background="black", rng=rng, image_size=32
        )
        return (np.asarray(img, dtype=np.float64).mean(axis=2) > 80).astype(np.float64).ravel()

    centroids = np.stack([np.mean([fg(c) for _ in range(6)], axis=0) for c in classes])
    correct = 0
    for i, c in enumerate(classes):
        for _ in range(4):
            correct += int(np.argmin(((centroids - fg(c)) ** 2).sum(axis=1)) == i)
    assert correct / (4 * len(classes)) >= 0.95


def test_parallel_builders_of_one_stream_take_turns(tmp_path):
    """A builder of a named stream waits while another holds the stream's lock (a sweep's cells
    of one seed start together), then reuses or builds the whole stream."""
    import subprocess
    import sys
    import time

    from ctp.streams import stream_lock

    code = (
        "import sys; from ctp.streams import make_named_stream; "
        "make_named_stream('tiny', sys.argv[1], seed=3)"
    )
    out = tmp_path / "tiny-seed3"
    with stream_lock(out):
        proc = subprocess.Popen([sys.executable, "-c", code, str(out)])
        time.sleep(3)
        assert proc.poll() is None and not (out / "stream.json").exists()  # waiting for the lock
    assert proc.wait(timeout=120) == 0
    assert (out / "stream.json").is_file()
