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
