"""A ctp checkpoint (and ``ctp export``'s output) is an open_clip model: plain open_clip, in a
process that never imports ctp, builds the same model, preprocessing and tokenizer, bit for bit."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ctp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ctp.export import main as export_main
from ctp.models import create_model
from service.cli import main as cli_main

MODEL = "ctp-rn-tiny-32"
TEXTS = ["a photo of a red star", "a blue ring", "three green squares on a white background"]

# Runs in a fresh interpreter with only open_clip: for each model name in argv[2:]
# ("local-dir:..." / "hf-hub:...") embeds fixed inputs; saves all to argv[1].
PLAIN_OPEN_CLIP = textwrap.dedent("""
    import io, json, sys
    import numpy as np, open_clip, torch
    from PIL import Image
    from safetensors.torch import save_file

    out, names = sys.argv[1], sys.argv[2:]
    texts = json.loads(sys.stdin.read())
    torch.set_num_threads(1)
    result = {}
    for n, name in enumerate(names):
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
        model.eval()
        rng = np.random.default_rng(0)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        pixels = preprocess(Image.open(io.BytesIO(buf.getvalue())))[None]
        tokens = tokenizer(texts)
        with torch.no_grad():
            result.update({f"{n}.pixels": pixels, f"{n}.tokens": tokens,
                           f"{n}.image": model.encode_image(pixels), f"{n}.text": model.encode_text(tokens)})
    assert "ctp" not in sys.modules and not any(m.startswith("ctp.") for m in sys.modules), "ctp was imported"
    save_file({k: v.contiguous() for k, v in result.items()}, out)
""")


def _ctp_embeddings(bundle):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    pixels = bundle.preprocess_val(Image.open(io.BytesIO(buf.getvalue())))[None]
    tokens = bundle.tokenizer(TEXTS)
    model = bundle.model.eval()
    with torch.no_grad():
        return {
            "pixels": pixels,
            "tokens": tokens,
            "image": model.encode_image(pixels),
            "text": model.encode_text(tokens),
        }


def _assert_identical(ours, theirs):
    for key in ("pixels", "tokens", "image", "text"):
        assert ours[key].shape == theirs[key].shape, key
        assert (ours[key].double() - theirs[key].double()).abs().max().item() == 0, key


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three random-init models saved/exported ctp's ways, and what plain open_clip makes of them
    (one subprocess for all: starting open_clip is the slow part)."""
    tmp = tmp_path_factory.mktemp("open-clip-format")
    bundles = {n: create_model(MODEL, seed=n) for n in range(3)}
    # 0: a checkpoint, read as local-dir:
    ckpt = save_checkpoint(tmp / "v000001", bundles[0].model, {"model": MODEL, "version": 1})
    # 1: exported, read as local-dir: and, from a Hub cache holding the exported files, as hf-hub:
    exported = save_checkpoint(
        tmp / "ckpt",
        bundles[1].model,
        {
            "model": MODEL,
            "version": 7,
            "strategy": "incclip",
            "chunks": 3,
            "metrics": {"shapes": {"acc1": 0.25, "avg_accuracy": 0.5}},
        },
    )
    assert cli_main(["export", str(exported), "--out", str(tmp / "export")]) == 0  # the `ctp export` command
    repo = tmp / "hub" / "models--ctp--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)  # what a download leaves behind
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for p in (tmp / "export").iterdir():
        (snapshot / p.name).write_bytes(p.read_bytes())
    # 2: an old checkpoint without open_clip_config.json, exported
    old = save_checkpoint(tmp / "old", bundles[2].model, {"model": MODEL})
    (old / "open_clip_config.json").unlink()  # as written before format_version 2
    assert export_main([str(old), "--out", str(tmp / "old-export")]) == 0

    names = {
        "ckpt": f"local-dir:{ckpt}",
        "export": f"local-dir:{tmp / 'export'}",
        "hub": "hf-hub:ctp/tiny",
        "old-export": f"local-dir:{tmp / 'old-export'}",
    }
    out = tmp / "plain.safetensors"
    # -I: isolated (no PYTHONPATH, no cwd on sys.path); the child also asserts ctp never got imported
    subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_OPEN_CLIP, str(out), *names.values()],
        check=True,
        input=json.dumps(TEXTS),
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    flat = load_file(str(out))
    plain = {
        key: {f: flat[f"{n}.{f}"] for f in ("pixels", "tokens", "image", "text")}
        for n, key in enumerate(names)
    }
    return {"tmp": tmp, "bundles": bundles, "ckpt": ckpt, "old": old, "plain": plain}


def test_checkpoint_is_an_open_clip_local_dir(models):
    ckpt = models["ckpt"]
    files = ["meta.json", "model.safetensors", "open_clip_config.json"]
    assert sorted(p.name for p in ckpt.iterdir()) == files
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == dict.fromkeys(files, 0o644)
    assert ckpt.stat().st_mode & 0o777 == 0o755
    config = json.loads((ckpt / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["layers"] == [1, 1, 1, 1]  # the full preset config
    assert config["preprocess_cfg"]["size"] == 32

    loaded, meta = load_checkpoint(ckpt)
    assert meta["format_version"] == 2
    ours = _ctp_embeddings(loaded)
    _assert_identical(ours, _ctp_embeddings(models["bundles"][0]))
    _assert_identical(ours, models["plain"]["ckpt"])  # plain open_clip, local-dir:


def test_export_is_the_hub_layout_plain_open_clip_reads(models):
    out = models["tmp"] / "export"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    card = (out / "README.md").read_text()
    assert "library_name: open_clip" in card and "hf-hub:" in card and "| shapes | acc1 | 0.25 |" in card
    ours = _ctp_embeddings(models["bundles"][1])
    _assert_identical(ours, models["plain"]["export"])  # local-dir:
    _assert_identical(ours, models["plain"]["hub"])  # hf-hub:, offline from the Hub cache


def test_checkpoint_without_open_clip_config_still_loads_and_exports(models):
    loaded, _ = load_checkpoint(models["old"])
    ours = _ctp_embeddings(models["bundles"][2])
    _assert_identical(_ctp_embeddings(loaded), ours)
    _assert_identical(ours, models["plain"]["old-export"])


def test_export_refuses_a_broken_checkpoint_and_its_own_dir(models, tmp_path):
    with pytest.raises(ValueError, match="differ"):
        export_main([str(models["ckpt"]), "--out", str(models["ckpt"])])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"model": MODEL}))
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        export_main([str(broken), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_loading_weights_logs_no_random_init_warning(models, caplog):
    caplog.clear()
    with caplog.at_level("INFO"):
        load_checkpoint(models["ckpt"])
        create_model(MODEL, pretrained=str(models["ckpt"]))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
