import json

import open_clip
import pytest
import torch
from torch.testing import assert_close

from ctp.checkpoint import CheckpointError, load_checkpoint, load_meta, save_checkpoint
from ctp.models import create_model, list_presets


def test_presets_build_and_are_seeded():
    assert {"ctp-vit-micro-32", "ctp-vit-tiny-32", "ctp-vit-tiny-64"} <= set(list_presets())
    a = create_model("ctp-vit-micro-32", seed=3)
    b = create_model("ctp-vit-micro-32", seed=3)
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert_close(v, w, msg=k)
    img = torch.zeros(2, 3, 32, 32)
    tok = a.tokenizer(["a red star", "a blue ring"])
    assert tok.shape == (2, 16)
    f = a.model.encode_image(img, normalize=True)
    assert f.shape == (2, 32)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no-such-model")


def test_checkpoint_round_trip_and_open_clip_loads_it(tmp_path):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    path = save_checkpoint(tmp_path / "v1", bundle.model, {"model": "ctp-vit-micro-32", "version": 1})
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "open_clip_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temp dirs left behind
    assert load_meta(path)["version"] == 1
    back, meta = load_checkpoint(path)
    for k, v in bundle.model.state_dict().items():
        assert_close(back.model.state_dict()[k], v, msg=k)
    # plain open_clip, pretrained=<file>
    oc, _, _ = open_clip.create_model_and_transforms(
        "ctp-vit-micro-32", pretrained=str(path / "model.safetensors")
    )
    assert_close(oc.state_dict()["text_projection"], bundle.model.state_dict()["text_projection"])
    # and ctp loads a checkpoint directory or file as pretrained
    again = create_model("ctp-vit-micro-32", pretrained=str(path))
    assert_close(again.model.logit_scale, bundle.model.logit_scale)
    # (plain open_clip with local-dir:, no import ctp: tests/ctp/test_open_clip_format.py)


def test_checkpoint_replace_is_whole(tmp_path):
    a = create_model("ctp-vit-micro-32", seed=0)
    b = create_model("ctp-vit-micro-32", seed=1)
    save_checkpoint(tmp_path / "latest", a.model, {"model": "ctp-vit-micro-32", "version": 1})
    save_checkpoint(tmp_path / "latest", b.model, {"model": "ctp-vit-micro-32", "version": 2})
    back, meta = load_checkpoint(tmp_path / "latest")
    assert meta["version"] == 2
    assert_close(
        back.model.state_dict()["positional_embedding"], b.model.state_dict()["positional_embedding"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_corrupt_or_mismatched_weights_are_refused(tmp_path):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    path = save_checkpoint(tmp_path / "c", bundle.model, {"model": "ctp-vit-micro-32"})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(path)
    other = save_checkpoint(
        tmp_path / "o", create_model("ctp-vit-tiny-32", seed=0).model, {"model": "ctp-vit-tiny-32"}
    )
    meta = json.loads((other / "meta.json").read_text())
    meta["model"] = "ctp-vit-micro-32"
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(other)
    (other / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(other)


def test_unreadable_config_and_pickles_are_refused(tmp_path):
    path = save_checkpoint(
        tmp_path / "c", create_model("ctp-vit-micro-32", seed=0).model, {"model": "ctp-vit-micro-32"}
    )
    (path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="open_clip_config.json"):
        load_checkpoint(path)
    (tmp_path / "w.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        create_model("ctp-vit-micro-32", pretrained=str(tmp_path / "w.bin"))
    with pytest.raises(CheckpointError, match="no weights"):
        create_model("ctp-vit-micro-32", pretrained=str(tmp_path))
