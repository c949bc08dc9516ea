"""A checkpoint whose ``meta.json`` is corrupt: refused once, logged, the old version keeps serving;
a registry outage: one warning, the loaded version keeps serving, the watcher resumes by itself."""

from __future__ import annotations

import logging
import os
import signal
import threading

from service.registry import Registry
from service.serve.holder import ModelHolder
from service.serve.sources import DirectorySource, RegistrySource
from tests.service.api_support import trained_model, write_checkpoint


def _poll_past_the_corrupt_one(holder: ModelHolder, caplog, *, refused: str) -> None:
    """Three watcher rounds after a corrupt version lands: one refusal, logged once, 1 still served."""
    with caplog.at_level(logging.WARNING, logger="service"):
        for _ in range(3):
            holder.poll_once()
    assert holder.snapshot is not None and holder.snapshot.version == "1"
    assert holder.stats.failures == 1 and holder.stats.failed_versions == [refused]
    refusals = [r for r in caplog.records if r.levelno >= logging.ERROR and "refused" in r.getMessage()]
    assert len(refusals) == 1


def test_corrupt_meta_json_in_a_watched_directory_is_refused_once(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    write_checkpoint(root / "v000001", trained_model(), version=1)
    holder = ModelHolder(source=DirectorySource(root))
    holder.poll_once()
    assert holder.snapshot is not None and holder.snapshot.version == "1"
    bad = write_checkpoint(root / "v000002", trained_model(), version=2)
    (bad / "meta.json").write_text('{"model": "ctp-vit-')  # cut short
    _poll_past_the_corrupt_one(holder, caplog, refused="v000002")
    assert [h["version"] for h in holder.source.history()] == ["1"]  # the broken one is left out


def test_corrupt_meta_json_of_a_registered_version_is_refused_once(redis_server, tmp_path, caplog):
    reg = Registry(redis_server.client(), root=tmp_path / "checkpoints")
    reg.publish(trained_model(), {"model": "ctp-vit-micro-32"})
    holder = ModelHolder(source=RegistrySource(reg))
    try:
        holder.poll_once()
        assert holder.snapshot is not None and holder.snapshot.version == "1"
        info = reg.publish(trained_model(), {"model": "ctp-vit-micro-32"})
        (info.path / "meta.json").write_text("not json")
        _poll_past_the_corrupt_one(holder, caplog, refused="2")
    finally:
        holder.stop()


def test_a_registry_outage_is_one_warning_and_serving_goes_on(redis_server, tmp_path, caplog):
    reg = Registry(redis_server.client(), root=tmp_path / "checkpoints")
    reg.publish(trained_model(), {"model": "ctp-vit-micro-32"})
    source = RegistrySource(reg)
    holder = ModelHolder(source=source, interval_s=0.05)
    never = threading.Event()
    try:
        holder.poll_once()
        os.kill(redis_server.pid, signal.SIGKILL)  # a crash: the dir and its AOF stay
        with caplog.at_level(logging.DEBUG, logger="service"):
            for _ in range(5):  # five watcher rounds while Redis is away
                holder.poll_once()
                source.wait(0.05, never)
            assert holder.snapshot is not None and holder.snapshot.version == "1"
            redis_server.start()  # same port, same data
            reg.publish(trained_model(), {"model": "ctp-vit-micro-32"})
            holder.poll_once()
        assert holder.snapshot.version == "2"  # the watcher carried on by itself
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len([w for w in warnings if "cannot read the latest version" in w]) == 1, warnings
        assert len([w for w in warnings if "pub/sub unavailable" in w]) == 1, warnings
        assert any("answers again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    finally:
        holder.stop()
