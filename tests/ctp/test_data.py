import inspect
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from ctp.data import (
    Sample,
    iter_chunk,
    load_classification_set,
    load_retrieval_set,
    read_chunk,
    write_classification_set,
    write_retrieval_set,
    write_shards,
)
from ctp.images import encode_image


def _img(i: int, fmt: str = "png") -> bytes:
    rng = np.random.default_rng(i)
    return encode_image(Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)), fmt)


def _samples(n: int) -> list[Sample]:
    out = []
    for i in range(n):
        kind = i % 3
        out.append(
            Sample(
                key=f"k{i:04d}",
                image=_img(i, "jpg" if kind == 1 else "png"),
                text=f"caption {i} — ünïcode ✓",
                label=None if kind == 2 else f"class{i % 4}",
                meta={"id": f"id-{i}", "score": i / 2} if kind == 0 else {},
                ext="jpg" if kind == 1 else "png",
            )
        )
    return out


def _tar_files(directory):
    return sorted(p.name for p in directory.iterdir())


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_round_trip(tmp_path):
    samples = _samples(25)
    paths = write_shards(samples, tmp_path / "chunk", shard_size=10, prefix="part")
    assert [p.name for p in paths] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    # Atomic writes leave no temp files behind.
    assert _tar_files(tmp_path / "chunk") == [p.name for p in paths]
    assert read_chunk(tmp_path / "chunk") == samples


def test_json_only_when_label_or_meta(tmp_path):
    samples = _samples(3)
    (path,) = write_shards(samples, tmp_path)
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names == [
        "k0000.json", "k0000.png", "k0000.txt",
        "k0001.jpg", "k0001.json", "k0001.txt",
        "k0002.png", "k0002.txt",
    ]  # fmt: skip


def test_shards_are_deterministic(tmp_path):
    a = write_shards(_samples(12), tmp_path / "a", shard_size=5)
    b = write_shards(_samples(12), tmp_path / "b", shard_size=5)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    with tarfile.open(a[0]) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar} == {(0, 0, 0, "", "")}


def test_iter_chunk_is_lazy(tmp_path):
    write_shards(_samples(4), tmp_path)
    it = iter_chunk(tmp_path)
    assert inspect.isgenerator(it)
    assert next(it).key == "k0000"


def test_empty_input_writes_nothing(tmp_path):
    assert write_shards([], tmp_path / "c") == []
    assert read_chunk(tmp_path / "c") == []


@pytest.mark.parametrize("key", ["a.b", "", "dir/key"])
def test_bad_keys_rejected_without_leftovers(tmp_path, key):
    samples = [*_samples(3), Sample(key=key, image=_img(0), text="x")]
    with pytest.raises(ValueError, match="key"):
        write_shards(samples, tmp_path, shard_size=2)
    # The first full shard was completed; the failed one left no temp file.
    assert _tar_files(tmp_path) == ["shard-000000.tar"]


def test_duplicate_keys_rejected(tmp_path):
    samples = _samples(2)
    samples[1].key = samples[0].key
    with pytest.raises(ValueError, match="duplicate"):
        write_shards(samples, tmp_path)


def test_meta_label_conflict_rejected(tmp_path):
    with pytest.raises(ValueError, match="label"):
        write_shards([Sample(key="a", image=_img(0), text="t", meta={"label": "x"})], tmp_path)


def test_missing_caption_names_shard_and_key(tmp_path):
    _write_tar(tmp_path / "s-0.tar", {"good.png": _img(0), "good.txt": b"ok", "lonely.png": _img(1)})
    with pytest.raises(ValueError, match=r"s-0\.tar.*'lonely'.*caption"):
        read_chunk(tmp_path)


def test_missing_image_names_shard_and_key(tmp_path):
    _write_tar(tmp_path / "s-0.tar", {"noimg.txt": b"caption", "noimg.json": b"{}"})
    with pytest.raises(ValueError, match=r"s-0\.tar.*'noimg'.*no image"):
        read_chunk(tmp_path)


def test_reads_foreign_shards_in_sorted_order(tmp_path):
    # Written by another tool: default tar headers, interleaved member order, shards out of order.
    _write_tar(tmp_path / "b.tar", {"z.txt": b"third", "z.webp": _img(3, "webp")})
    _write_tar(
        tmp_path / "a.tar",
        {
            "y.txt": b"first",
            "x.txt": b"second",
            "y.png": _img(1),
            "x.jpeg": _img(2, "jpeg"),
            "y.json": b'{"label": 3}',
        },
    )
    samples = read_chunk(tmp_path)
    assert [(s.key, s.text, s.ext, s.label) for s in samples] == [
        ("y", "first", "png", "3"),
        ("x", "second", "jpeg", None),
        ("z", "third", "webp", None),
    ]


def test_webdataset_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = _samples(6)
    paths = write_shards(samples, tmp_path, shard_size=4)
    got = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    assert [g["txt"].decode() for g in got] == [s.text for s in samples]
    assert [g[s.ext] for g, s in zip(got, samples, strict=True)] == [s.image for s in samples]


def test_classification_set_round_trip(tmp_path):
    images = [_img(i) for i in range(13)]
    targets = [i % 3 for i in range(13)]
    # shard_size=1 gives 0.tar ... 12.tar: numeric order, not lexical, must be kept.
    out = write_classification_set(
        tmp_path / "cls",
        classnames=["cat", "dog", "sea lion"],
        templates=["a photo of a {c}.", "a {c}."],
        images=images,
        targets=targets,
        shard_size=1,
    )
    assert (out / "test" / "nshards.txt").read_text() == "13\n"
    assert not [p for p in (out / "test").iterdir() if p.name.startswith(".")]
    ds = load_classification_set(out)
    assert ds.classnames == ["cat", "dog", "sea lion"]
    assert ds.templates == ["a photo of a {c}.", "a {c}."]
    assert ds.images == images
    assert ds.targets == targets
    assert len(set(ds.keys)) == 13


def test_classification_set_validation(tmp_path):
    kwargs = {"classnames": ["a", "b"], "templates": ["a {c}"], "images": [_img(0)], "targets": [0]}
    with pytest.raises(ValueError, match="template"):
        write_classification_set(tmp_path, **{**kwargs, "templates": ["no placeholder"]})
    with pytest.raises(ValueError, match="out of range"):
        write_classification_set(tmp_path, **{**kwargs, "targets": [2]})
    with pytest.raises(ValueError):
        write_classification_set(tmp_path, **{**kwargs, "targets": [0, 1]})


def test_retrieval_set_round_trip(tmp_path):
    images = [_img(i, "jpg") for i in range(5)]
    captions = [[f"caption {i}"] + ([f"another {i}"] if i % 2 else []) for i in range(5)]
    out = write_retrieval_set(tmp_path / "ret", images=images, captions=captions, ext="jpg")
    ds = load_retrieval_set(out)
    assert ds.images == images
    assert ds.captions == captions
    assert len(ds.keys) == 5


def test_eval_sets_are_what_clip_benchmark_reads_with_its_defaults(tmp_path):
    # dataset_type.txt says which loader; >= 4 shards so its 4 default workers each get one
    images = [_img(i) for i in range(41)]
    cls = write_classification_set(
        tmp_path / "cls",
        classnames=["a", "b"],
        templates=["a {c}"],
        images=images,
        targets=[i % 2 for i in range(41)],
    )
    ret = write_retrieval_set(tmp_path / "ret", images=images[:5], captions=[[f"c {i}"] for i in range(5)])
    assert (cls / "dataset_type.txt").read_text() == "classification\n"
    assert (ret / "dataset_type.txt").read_text() == "retrieval\n"
    for out, n in ((cls, 5), (ret, 5)):  # 41 // 4 = 10 a shard: 5 shards; 5 // 4 = 1 a shard: 5
        assert (out / "test" / "nshards.txt").read_text() == f"{n}\n"
        assert sorted(p.name for p in (out / "test").glob("*.tar")) == [f"{i}.tar" for i in range(n)]
    assert len(load_classification_set(cls).images) == 41
    small = write_retrieval_set(tmp_path / "small", images=images[:2], captions=[["x"], ["y"]])
    assert (small / "test" / "nshards.txt").read_text() == "2\n"  # fewer samples than workers
    # sets from before dataset_type.txt still load
    (ret / "dataset_type.txt").unlink()
    assert load_retrieval_set(ret).captions == [[f"c {i}"] for i in range(5)]


def test_retrieval_set_validation(tmp_path):
    with pytest.raises(ValueError, match="caption"):
        write_retrieval_set(tmp_path, images=[_img(0)], captions=[["two\nlines"]])
    with pytest.raises(ValueError, match="caption"):
        write_retrieval_set(tmp_path, images=[_img(0)], captions=[[]])


def test_tar_headers_match_tarfile_and_long_or_unicode_names_fall_back_to_pax(tmp_path):
    from ctp.data import _tar_header

    for name, size in [("p0-o1.jpg", 12345), ("a.txt", 0), ("x" * 96 + ".jpg", 7)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
            size,
            0,
            0o644,
            0,
            0,
            "",
            "",
        )
        assert _tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    long_key, uni_key = "k" * 120, "café"
    write_shards(
        [
            Sample(key=long_key, image=b"\x89PNG-not-decoded", text="t", ext="png"),
            Sample(key=uni_key, image=b"\x89PNG-x", text="u", ext="png"),
        ],
        tmp_path,
        shard_size=10,
    )
    with tarfile.open(next(tmp_path.glob("*.tar"))) as tar:
        assert sorted(tar.getnames()) == sorted(
            [f"{long_key}.png", f"{long_key}.txt", f"{uni_key}.png", f"{uni_key}.txt"]
        )
        assert tar.extractfile(f"{uni_key}.txt").read() == b"u"
