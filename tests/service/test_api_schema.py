"""Property-based fuzzing of the whole API from its own /openapi.json (schemathesis), against a
real uvicorn server with a loaded model: no input may produce a 5xx, every error is JSON."""

from __future__ import annotations

import base64

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from service.serve.api import create_app
from service.settings import load_settings
from tests.service.api_support import (
    make_pairs,
    serving,
    trained_model,
    wait_for,
    write_checkpoint,
    write_chunk,
)

EXAMPLES = 200  # per operation, media type and mode (positive, negative); small input spaces end sooner


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    write_checkpoint(root / "ckpt" / "v1", trained_model(), version=1)
    write_chunk(root / "data" / "chunks", "chunk_000", make_pairs(per_class=3))
    # a key is set and Kafka is absent: generated requests cannot guess the key, so /ingest answers
    # 401/403/413/422 and never reaches the (unavailable) broker
    settings = load_settings(
        data_dir=root / "data",
        serve_checkpoint_dir=root / "ckpt",
        api_key="k" * 32,
        kafka_bootstrap="127.0.0.1:1",
        max_body_bytes=100_000,
        max_labels=16,
        max_k=50,
    )
    with serving(create_app(settings)) as srv:
        import httpx

        wait_for(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200)
        yield srv


IMAGE = base64.b64encode(make_pairs(per_class=1)[0].image).decode()


def _operations(schema):
    for result in schema.get_all_operations():
        op = result.ok()
        media_types = [b.media_type for b in op.body] or [None]
        for media_type in media_types:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                yield op, media_type, mode


def test_no_generated_input_gives_a_server_error(api):
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    calls: list[tuple[str, int]] = []
    tried = []
    for op, media_type, mode in _operations(schema):
        tried.append((op.label, media_type, mode.value))

        @hypothesis.given(case=op.as_strategy(generation_mode=mode, media_type=media_type))
        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            if (
                case.meta
                and case.meta.generation.mode is GenerationMode.POSITIVE
                and isinstance(case.body, dict)
                and "image" in case.body
            ):
                case.body["image"] = IMAGE  # a real image: the labels, templates, k... reach the model
            response = case.call(timeout=30)
            calls.append((case.operation.label, response.status_code))
            assert response.status_code < 500, (case.as_curl_command(), response.text)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error", "reason"}, body

        try:
            check()
        except hypothesis.errors.Unsatisfiable:  # negative mode of an operation with no inputs
            assert mode is GenerationMode.NEGATIVE, op.label
    labels = {label for label, _ in calls}
    assert {"POST /classify", "POST /retrieve", "POST /ingest", "GET /model"} <= labels, tried
    assert len(calls) >= 1000, len(calls)
    assert sum(1 for _, s in calls if s == 200) >= 50  # not only refusals: valid requests got through
