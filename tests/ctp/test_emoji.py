"""The emoji stream on fake npm tarballs (no network, npm never called)."""

import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from ctp import emoji as E
from ctp.data import load_classification_set, load_retrieval_set, read_chunk
from ctp.images import decode_image

VENDOR_COLOURS = {
    "apple": (200, 30, 30),
    "google": (30, 160, 40),
    "twitter": (40, 60, 220),
    "facebook": (240, 200, 0),
}

# category -> subcategory -> emoji names; codes are made up (private use area).
CATALOG = {
    "Smileys & Emotion": {
        "face-smiling": ["grinning face", "smiling face", "winking face"],
        "face-hand": ["thinking face", "shushing face"],
    },
    "Animals & Nature": {
        "animal-mammal": ["dog face", "cat face", "cow face"],
        "plant-flower": ["rose", "tulip"],
    },
    "Food & Drink": {"food-fruit": ["cherries", "grapes"], "arts & crafts": ["artist palette", "yarn"]},
    "Objects": {"tool": ["hammer", "wrench"], "mail": ["envelope", "inbox tray"]},
}


def _png(rgb, alpha=200, size=64):
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (size // 2, size // 2), (*rgb, alpha)), (size // 4, size // 4))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _entries():
    entries, order = [], 0
    for cat, subs in CATALOG.items():
        for sub, names in subs.items():
            for name in names:
                code = f"{0xE000 + order:x}"
                entries.append(
                    {
                        "name": name.upper(),
                        "unified": code.upper(),
                        "image": f"{code}.png",
                        "short_names": [name.replace(" ", "_")],
                        "category": cat,
                        "subcategory": sub,
                        "sort_order": order,
                        **{f"has_img_{v}": True for v in E.VENDORS},
                    }
                )
                order += 1
    # a skin-tone variant (own image) that must never be used, a Component and a missing-art emoji
    entries[0]["skin_variations"] = {"1F3FB": {"unified": "E000-1F3FB", "image": "e000-1f3fb.png"}}
    entries.append(
        {
            "name": "LIGHT SKIN TONE",
            "unified": "1F3FB",
            "image": "1f3fb.png",
            "category": "Component",
            "subcategory": "skin-tone",
            "sort_order": 999,
            **{f"has_img_{v}": True for v in E.VENDORS},
        }
    )
    entries.append(
        {
            "name": "NO FACEBOOK ART",
            "unified": "E0FF",
            "image": "e0ff.png",
            "category": "Objects",
            "subcategory": "tool",
            "sort_order": 998,
            **{f"has_img_{v}": v != "facebook" for v in E.VENDORS},
        }
    )
    return entries


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("npm")
    entries = _entries()
    images = [e["image"] for e in entries] + ["e000-1f3fb.png"]
    for vendor, rgb in VENDOR_COLOURS.items():
        with tarfile.open(root / f"emoji-datasource-{vendor}-{E.DATASOURCE_VERSION}.tgz", "w:gz") as tar:
            _add(tar, "package/package.json", b"{}")
            _add(tar, "package/emoji.json", json.dumps(entries).encode())
            for i, image in enumerate(images):
                if image == "e0ff.png" and vendor == "facebook":
                    continue
                _add(tar, f"package/img/{vendor}/64/{image}", _png(rgb, alpha=100 + i))
    lib = {
        E._char(e["unified"]): [e["name"].lower().replace(" ", "_"), "smile", ":D", "happy\u00a0thing"]
        for e in entries
    }
    with tarfile.open(root / f"emojilib-{E.EMOJILIB_VERSION}.tgz", "w:gz") as tar:
        _add(tar, "package/dist/emoji-en-US.json", json.dumps(lib, ensure_ascii=False).encode())
    return root


def _no_npm(package, version, cache_dir):
    path = E.npm_tarball(package, version, cache_dir)  # cached: never runs npm
    return path


CI = E.EmojiConfig(seed=3)
II = E.EmojiConfig(split="instance-incremental", seed=3)


def _build(out, config, cache):
    return E.make_emoji_stream(out, config, cache_dir=cache, fetch=_no_npm)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


ALL_CLASSES = {E.subcategory_words(s) for subs in CATALOG.values() for s in subs}


def test_subcategory_words():
    assert E.subcategory_words("animal-mammal") == "animal mammal"
    assert E.subcategory_words("arts & crafts") == "arts and crafts"
    assert E.subcategory_words("alphanum") == "letters and numbers"


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(SystemExit, match="npm"):
        E.npm_tarball("emojilib", "0.0.0", tmp_path)


def test_npm_pack_into_the_cache(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    # fake npm: "npm pack PKG@VER --silent --pack-destination DIR"; only good@1.0.0 exists
    npm.write_text(
        '#!/bin/sh\n[ "$2" = good@1.0.0 ] || { echo "404 Not Found - $2" >&2; exit 1; }\n'
        'echo tgz > "$5/good-1.0.0.tgz"\n'
    )
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    cache = tmp_path / "cache"
    path = E.npm_tarball("good", "1.0.0", cache)
    assert path == cache / "good-1.0.0.tgz" and path.read_text() == "tgz\n"
    assert sorted(p.name for p in cache.iterdir()) == ["good-1.0.0.tgz"]  # no temp dir left
    npm.unlink()  # cached now: npm is not needed
    assert E.npm_tarball("good", "1.0.0", cache) == path
    npm.write_text('#!/bin/sh\necho "404 Not Found - $2" >&2; exit 1\n')
    npm.chmod(0o755)
    with pytest.raises(SystemExit, match="404 Not Found"):
        E.npm_tarball("missing", "1.0.0", cache)
    assert not (cache / "missing-1.0.0.tgz").exists()


def test_class_incremental(tmp_path, cache):
    paths = _build(tmp_path / "ci", CI, cache)
    assert len(paths.chunks) == len(CATALOG)
    assert sorted(c for cats in paths.category_order for c in cats) == sorted(CATALOG)
    # order is the seed's shuffle, not the catalog's; another seed gives another order
    other = _build(tmp_path / "ci-other", replace(CI, seed=4), cache)
    orders = {tuple(c[0] for c in paths.category_order), tuple(c[0] for c in other.category_order)}
    assert len(orders) == 2 or len(CATALOG) == 1
    for j, d in enumerate(paths.chunks):
        samples = read_chunk(d)
        (cat,) = paths.category_order[j]
        assert {s.meta["category"] for s in samples} == {cat}  # disjoint categories
        classes = {E.subcategory_words(s) for s in CATALOG[cat]}
        assert {s.label for s in samples} == classes == set(paths.class_order[j])
        n = sum(len(v) for v in CATALOG[cat].values())
        assert len(samples) == n * len(CI.train_vendors)  # the missing-art emoji is dropped
        for s in samples:
            vendor = s.meta["id"].rsplit("-", 1)[1]
            assert vendor in CI.train_vendors and vendor != CI.eval_vendor
            assert vendor not in s.text and s.label in ALL_CLASSES
            assert "skin" not in s.text and "no facebook art" not in s.text
            img = decode_image(s.image)
            assert img.size == (64, 64) and img.getpixel((0, 0)) == (255, 255, 255)  # onto white
            assert img.getpixel((32, 32)) != VENDOR_COLOURS[CI.eval_vendor]
    assert paths.counts["pairs_per_chunk"] == [len(read_chunk(d)) for d in paths.chunks]
    assert paths.base_chunks == [] and paths.base_classification is None


def test_instance_incremental_mixes(tmp_path, cache):
    paths = _build(tmp_path / "ii", II, cache)
    assert len(paths.chunks) == len(CATALOG)
    chunks = [read_chunk(d) for d in paths.chunks]
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1
    for c in chunks:
        assert {s.meta["category"] for s in c} == set(CATALOG)  # every chunk mixes all categories
    assert set(paths.class_order[0]) == ALL_CLASSES and not any(paths.class_order[1:])
    ids = [s.meta["id"] for c in chunks for s in c]
    assert len(ids) == len(set(ids))
    # the same pairs as class-incremental, only dealt differently
    ci = _build(tmp_path / "ci", CI, cache)
    ci_pairs = {(s.meta["id"], s.text) for d in ci.chunks for s in read_chunk(d)}
    assert {(s.meta["id"], s.text) for c in chunks for s in c} == ci_pairs


def test_eval_sets_use_the_held_out_vendor(tmp_path, cache):
    paths = _build(tmp_path / "ci", CI, cache)
    cls = load_classification_set(paths.classification)
    assert set(cls.classnames) == ALL_CLASSES and all("{c}" in t for t in cls.templates)
    assert len(cls.images) == sum(len(n) for subs in CATALOG.values() for n in subs.values())
    ret = load_retrieval_set(paths.retrieval)
    assert len(ret.images) == len(cls.images)
    names = {n for subs in CATALOG.values() for v in subs.values() for n in v}
    assert {c[0] for c in ret.captions} == names
    train_images = {s.image for d in paths.chunks for s in read_chunk(d)}
    for img in [*cls.images, *ret.images]:
        assert img not in train_images
        assert decode_image(img).getpixel((32, 32)) != (255, 255, 255)
    # the held-out vendor's colour (blended with white) is in the eval art
    r, g, b = decode_image(cls.images[0]).getpixel((32, 32))
    assert r > 240 and g > 200 and b < 200


def test_max_per_subcategory_and_vendors(tmp_path, cache):
    config = E.EmojiConfig(
        train_vendors=("twitter",), eval_vendor="apple", max_per_subcategory=1, image_size=32
    )
    paths = _build(tmp_path / "small", config, cache)
    samples = [s for d in paths.chunks for s in read_chunk(d)]
    assert len(samples) == len(ALL_CLASSES)  # one emoji per subcategory, one vendor
    assert {s.meta["id"].rsplit("-", 1)[1] for s in samples} == {"twitter"}
    assert decode_image(samples[0].image).size == (32, 32)
    assert paths.counts["classes"] == len(ALL_CLASSES) and paths.counts["eval_images"] == len(ALL_CLASSES)


def test_categories_per_chunk(tmp_path, cache):
    paths = _build(tmp_path / "cpc", replace(CI, categories_per_chunk=3), cache)
    assert [len(c) for c in paths.category_order] == [3, 1]


def test_holdout_categories_form_the_base_set(tmp_path, cache):
    held = ("Food & Drink", "Objects")
    paths = _build(tmp_path / "ho", replace(CI, holdout_categories=held), cache)
    assert len(paths.chunks) == len(CATALOG) - 2
    assert not {c for cats in paths.category_order for c in cats} & set(held)
    held_classes = {E.subcategory_words(s) for c in held for s in CATALOG[c]}
    stream = [s for d in paths.chunks for s in read_chunk(d)]
    assert not {s.label for s in stream} & held_classes
    assert not set(load_classification_set(paths.classification).classnames) & held_classes
    (base,) = paths.base_chunks
    base_samples = read_chunk(base)
    assert {s.label for s in base_samples} == held_classes
    assert {s.meta["id"].rsplit("-", 1)[1] for s in base_samples} == set(CI.train_vendors)
    base_cls = load_classification_set(paths.base_classification)
    assert set(base_cls.classnames) == held_classes
    assert paths.counts["base_pairs"] == len(base_samples)
    with pytest.raises(ValueError, match="unknown holdout"):
        _build(tmp_path / "bad", replace(CI, holdout_categories=("Nope",)), cache)


def test_rebuild_is_byte_identical_and_reused(tmp_path, cache):
    config = replace(II, holdout_categories=("Objects",))
    a, b = tmp_path / "a", tmp_path / "b"
    _build(a, config, cache)
    _build(b, config, cache)
    assert _files(a) == _files(b)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}

    def no_fetch(*args):
        raise AssertionError("a reused stream must not read the sources")

    again = E.make_emoji_stream(a, config, cache_dir=cache, fetch=no_fetch)
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == mtimes
    assert again.counts == json.loads((a / "stream.json").read_text())["counts"]
    # interrupted build (no stream.json) or another config: regenerated
    (a / "stream.json").unlink()
    (a / "chunks" / "stray").mkdir()
    _build(a, config, cache)
    assert _files(a) == _files(b)
    other = _build(a, replace(config, seed=9), cache)
    assert json.loads((a / "stream.json").read_text())["config"]["seed"] == 9
    assert len(other.chunks) == len(CATALOG) - 1


def test_captions(cache):
    catalog, _ = E.load_sources(CI, cache, fetch=_no_npm)
    assert all(em.category != "Component" and "skin" not in em.name for em in catalog)
    em = catalog[0]
    assert em.name == "grinning face" and em.classname == "face smiling"
    assert "smile" in em.keywords and "happy thing" in em.keywords and ":D" not in em.keywords
    rng = np.random.default_rng(0)
    caps = {E.make_caption(em, rng) for _ in range(200)}
    assert len(caps) >= 5 and all("grinning face" in c for c in caps)
    # every phrasing names the group: zero-shot classification asks for it by name
    assert all("face smiling" in c for c in caps)
    assert "grinning face, a face smiling emoji" in caps and "a face smiling emoji: grinning face" in caps


def test_cli_help(capsys):
    from service.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["data", "emoji", "--help"])
    assert exc.value.code == 0
    assert "--holdout-categories" in capsys.readouterr().out


def test_cli_builds(tmp_path, cache, capsys):
    from service.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                "data",
                "emoji",
                "--out",
                str(out),
                "--cache-dir",
                str(cache),
                "--train-vendors",
                "google",
                "--max-per-subcategory",
                "1",
                "--image-size",
                "32",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["chunks"] == len(CATALOG) and printed["pairs"] == len(ALL_CLASSES)


def test_experiment_on_emoji_stream(tmp_path, cache, monkeypatch):
    from service.cli import main

    (tmp_path / "ctp").mkdir()
    (tmp_path / "ctp" / "npm").symlink_to(cache)
    monkeypatch.setenv("CTP_CACHE", str(tmp_path / "ctp"))
    out = tmp_path / "exp"
    assert (
        main(
            [
                "experiment",
                "--stream",
                "emoji-ci-small",
                "--data-dir",
                str(tmp_path / "data"),
                "--strategy",
                "finetune",
                "--model",
                "ctp-vit-micro-32",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["chunks"] == len(CATALOG)
    assert set(m["eval"]) == {"emoji", "emoji_retrieval"}


def test_top_subcategories_chunked_by_subcategory(tmp_path, cache):
    config = replace(CI, top_subcategories=3, chunk_by="subcategory", categories_per_chunk=1)
    paths = _build(tmp_path / "top", config, cache)
    # the three largest: face-smiling and animal-mammal (3 emoji each), then the first of the 2s
    assert sorted(c for cats in paths.category_order for c in cats) == [
        "animal-mammal",
        "face-hand",
        "face-smiling",
    ]
    assert len(paths.chunks) == 3
    for d, classes in zip(paths.chunks, paths.class_order, strict=True):
        assert len(classes) == 1 and {s.label for s in read_chunk(d)} == set(classes)
    assert len(load_classification_set(paths.classification).classnames) == 3
    held = replace(config, holdout_categories=("face-hand",))
    hp = _build(tmp_path / "top-held", held, cache)
    assert len(hp.chunks) == 2 and set(load_classification_set(hp.base_classification).classnames) == {
        "face hand"
    }
    # skipping the two largest leaves the 2s: the first of them, as top_subcategories=3 took it
    skipped = _build(tmp_path / "skip", replace(config, skip_subcategories=2, top_subcategories=1), cache)
    assert skipped.category_order == [["face-hand"]]
    with pytest.raises(ValueError, match="skip_subcategories"):
        replace(CI, skip_subcategories=-1)
    with pytest.raises(ValueError, match="chunk_by"):
        replace(CI, chunk_by="vendor")
