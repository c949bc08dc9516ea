import pytest
import torch

from ctp.checkpoint import load_checkpoint, save_checkpoint
from ctp.models import create_model
from service.registry import FencedOut, Registry


def test_publish_latest_history_retention_and_announcements(redis_server, tmp_path):
    reg = Registry(redis_server.client(), root=tmp_path, keep=2)
    assert reg.latest() is None
    sub = reg.subscribe()
    model = create_model("ctp-vit-micro-32", seed=0).model
    infos = []
    for i in range(3):
        with torch.no_grad():
            model.logit_scale.fill_(float(i))
        infos.append(reg.publish(model, {"model": "ctp-vit-micro-32", "chunks": i + 1, "strategy": "er"}))
    assert [i.version for i in infos] == [1, 2, 3]
    assert reg.latest_version() == 3 and reg.latest().meta["chunks"] == 3
    assert [v.version for v in reg.history()] == [2, 3]  # keep=2
    assert not infos[0].path.exists() and infos[2].path.exists()
    bundle, meta = load_checkpoint(reg.latest().path)
    assert meta["version"] == 3 and float(bundle.model.logit_scale.detach()) == 2.0
    seen = []
    for _ in range(50):
        msg = sub.get_message(timeout=0.1)
        if msg:
            seen.append(int(msg["data"]))
        if len(seen) == 3:
            break
    assert seen == [1, 2, 3]


def test_versions_are_never_reused(redis_server, tmp_path):
    client = redis_server.client()
    model = create_model("ctp-vit-micro-32", seed=0).model
    Registry(client, root=tmp_path).publish(model, {"model": "ctp-vit-micro-32"})
    client.incr("ctp:registry:next")  # a writer that crashed after taking a number
    assert Registry(client, root=tmp_path).publish(model, {"model": "ctp-vit-micro-32"}).version == 3


def test_dirs_left_by_a_crash_mid_publish_are_removed(redis_server, tmp_path):
    reg = Registry(redis_server.client(), root=tmp_path)
    model = torch.nn.Linear(2, 2)
    kept = reg.publish(model, {"chunks": 1})
    save_checkpoint(tmp_path / "v000002", model, {})  # written, then the process died before registering
    (tmp_path / ".v000003.abc").mkdir()  # died while writing
    removed = reg.remove_unregistered()
    assert sorted(p.name for p in removed) == [".v000003.abc", "v000002"]
    assert [p.name for p in tmp_path.iterdir()] == [kept.path.name]


def test_eval_history_has_one_row_per_registered_version_past_retention(redis_server, tmp_path):
    client = redis_server.client()
    reg = Registry(client, root=tmp_path, keep=2)
    model = create_model("ctp-vit-micro-32", seed=0).model
    for i in range(4):
        meta = {
            "model": "ctp-vit-micro-32",
            "chunks": i + 1,
            "chunk_id": f"c{i}",
            "metrics": {"s": {"acc1": i}},
        }
        reg.publish(model, meta)
    client.set("lease", "other")
    with pytest.raises(FencedOut):  # not registered: no row either
        reg.publish(model, {"model": "ctp-vit-micro-32", "chunk_id": "fenced"}, fence=("lease", "me"))
    assert [v.version for v in reg.history()] == [3, 4]  # retention drops versions, not their rows
    rows = reg.eval_history()
    assert [r["version"] for r in rows] == [1, 2, 3, 4] and [r["chunk_id"] for r in rows] == [
        "c0",
        "c1",
        "c2",
        "c3",
    ]
    assert [r["metrics"]["s"]["acc1"] for r in rows] == [0, 1, 2, 3]
    assert [r["version"] for r in reg.eval_history(count=2)] == [3, 4]
    trimmed = Registry(client, root=reg.root, keep=2, eval_max=3)  # CTP_EVAL_HISTORY_MAX=3
    trimmed.publish(model, {"model": "ctp-vit-micro-32", "chunks": 5, "chunk_id": "c4"})
    assert [r["version"] for r in reg.eval_history()] == [3, 4, 6]  # the oldest go (5: the fenced one)
