import pytest

from service.settings import Settings, SettingsError, load_settings


def test_defaults_are_valid():
    s = load_settings()
    assert s.topic == "ctp.pairs" and s.dlq_topic == "ctp.pairs.dlq"
    assert s.strategy == "incclip"


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("CTP_CHUNK_SIZE", "32")
    monkeypatch.setenv("CTP_STRATEGY", "er")
    monkeypatch.setenv("CTP_API_KEY", "s3cret")
    s = load_settings()
    assert s.chunk_size == 32 and s.strategy == "er"
    assert s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("CTP_CHUNK_SIZE", "0", "CTP_CHUNK_SIZE"),
        ("CTP_CHUNK_SIZE", "many", "CTP_CHUNK_SIZE"),
        ("CTP_STRATEGY", "ewc", "CTP_STRATEGY"),
        ("CTP_DEVICE", "tpu", "CTP_DEVICE"),
        ("CTP_KAFKA_BOOTSTRAP", "localhost", "CTP_KAFKA_BOOTSTRAP"),
        ("CTP_REDIS_URL", "http://x", "CTP_REDIS_URL"),
        ("CTP_MEMORY_POLICY", "lru", "CTP_MEMORY_POLICY"),
        ("CTP_EVAL_CLASSIFICATION", "no-equals-sign", "CTP_EVAL_CLASSIFICATION"),
        ("CTP_EVAL_RETRIEVAL", "coco=/does/not/exist", "CTP_EVAL_RETRIEVAL"),
    ],
)
def test_invalid_settings_name_the_variable(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=needle):
        load_settings()


def test_every_field_has_an_env_name():
    assert all(not name.startswith("_") for name in Settings.model_fields)


def test_eval_sets_are_named_dirs(monkeypatch, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("CTP_EVAL_CLASSIFICATION", f"first={tmp_path / 'a'}, second={tmp_path / 'b'}")
    s = load_settings()
    assert s.eval_classification_sets() == {"first": tmp_path / "a", "second": tmp_path / "b"}
    assert s.eval_retrieval_sets() == {}


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_running_ctp_up_is_found_in_the_data_dir(tmp_path, monkeypatch):
    import json
    import os

    monkeypatch.delenv("CTP_REDIS_URL", raising=False)
    monkeypatch.delenv("CTP_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("CTP_DATA_DIR", str(tmp_path))
    record = {
        "pid": os.getpid(),
        "redis_url": "redis://127.0.0.1:41234/0",
        "kafka_bootstrap": "127.0.0.1:41235",
    }
    (tmp_path / "up.json").write_text(json.dumps(record))
    s = load_settings()
    assert (s.redis_url, s.kafka_bootstrap) == ("redis://127.0.0.1:41234/0", "127.0.0.1:41235")
    # a variable that is set wins over the record, and an override over both
    monkeypatch.setenv("CTP_REDIS_URL", "redis://10.0.0.1:6379/0")
    s = load_settings()
    assert (s.redis_url, s.kafka_bootstrap) == ("redis://10.0.0.1:6379/0", "127.0.0.1:41235")
    assert load_settings(kafka_bootstrap="h:1").kafka_bootstrap == "h:1"
    # the ctp up that wrote it is gone: the defaults again
    monkeypatch.delenv("CTP_REDIS_URL")
    (tmp_path / "up.json").write_text(json.dumps({**record, "pid": _dead_pid()}))
    s = load_settings()
    assert (s.redis_url, s.kafka_bootstrap) == ("redis://127.0.0.1:6379/0", "127.0.0.1:9092")
    (tmp_path / "up.json").write_text("{not json")
    assert load_settings().redis_url == "redis://127.0.0.1:6379/0"
