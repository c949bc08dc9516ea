"""The dashboard: its JSON (``/status``), gallery thumbnails, and the page itself in a real headless
Chromium (Selenium + Debian's chromium/chromedriver, installed by .ci/install-servers --test-tools) against a
live uvicorn server with a tiny model and a real redis-server holding three versions with metrics."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import httpx
import pytest
import redis

from ctp.checkpoint import save_checkpoint
from ctp.metrics import continual_summary, forgetting
from service.local.infra import free_port
from service.registry import Registry, eval_row
from service.serve.api import create_app
from service.serve.dashboard import IngestRate, KafkaLag, eval_curves
from service.settings import load_settings
from tests.service.api_support import (
    CLASSES,
    MODEL,
    make_pairs,
    serving,
    trained_model,
    wait_for,
    write_chunk,
)

REPO = Path(__file__).resolve().parents[2]

# Three chunks: circle+square, then triangle, then star. R[i][j]: accuracy on chunk j's classes after
# chunk i (ctp.tracking layout: every row as wide as the chunks so far, later columns padded).
CHUNK_LABELS = [["circle", "square"], ["triangle"], ["star"]]
R_SHAPES = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.25], [0.6, 0.65, 0.85]]
R_CAPTIONS = [0.5, 0.55, 0.6]  # retrieval: one column, mean_recall@1


def eval_state(n: int) -> dict:
    """The eval results after ``n`` chunks (``ctp.tracking.EvalTracker`` layout: per set the
    metrics after each chunk and the rows of R)."""
    shapes = {
        "kind": "classification",
        "after_chunk": [
            {"acc1": sum(r[: i + 1]) / (i + 1), "acc5": 1.0, "mean_per_class_recall": 0.5}
            for i, r in enumerate(R_SHAPES[:n])
        ],
        "rows": [r[:n] for r in R_SHAPES[:n]],
    }
    captions = {
        "kind": "retrieval",
        "after_chunk": [
            {"image_retrieval_recall@1": v, "text_retrieval_recall@1": v, "mean_recall@1": v}
            for v in R_CAPTIONS[:n]
        ],
        "rows": [[v] + [None] * (n - 1) for v in R_CAPTIONS[:n]],
    }
    return {"chunk_labels": CHUNK_LABELS[:n], "results": {"shapes": shapes, "captions": captions}}


def version_meta(n: int) -> dict:
    """Metadata shaped as service/trainer.py writes it after chunk ``n``: its own metrics and row."""
    state = eval_state(n)
    metrics, rows = {}, {}
    for name, r in state["results"].items():
        metrics[name] = {**r["after_chunk"][-1], **continual_summary(r["rows"])}
        rows[name] = {
            "kind": r["kind"],
            "row": {str(j): v for j, v in enumerate(r["rows"][-1]) if v is not None},
        }
    return {
        "model": MODEL,
        "strategy": "ctp",
        "chunks": n,
        "chunk_id": f"c{n - 1}",
        "chunk_ids": [f"c{i}" for i in range(n)],
        "pairs": 48,
        "metrics": metrics,
        "eval": rows,
    }


# ---- units ----------------------------------------------------------------------------------------


def test_eval_curves_per_chunk():
    """From the eval history: one row per version, each with the metrics after its chunk."""
    curves = eval_curves([eval_row(n, version_meta(n), None) for n in (1, 2, 3)])
    assert curves["version"] == 3 and curves["chunks"] == 3
    shapes, captions = curves["sets"]["shapes"], curves["sets"]["captions"]
    assert shapes["score"] == "acc1" and captions["score"] == "mean_recall@1"
    assert shapes["after_chunk"] == pytest.approx([0.9, 0.75, 0.7])
    assert shapes["forgetting"] == pytest.approx([forgetting(R_SHAPES, T) for T in range(3)])
    assert captions["after_chunk"] == pytest.approx(R_CAPTIONS)
    rows = eval_state(3)["results"]["captions"]["rows"]
    assert captions["forgetting"] == pytest.approx([0.0, -0.05, -0.05])  # the score rose: negative
    assert captions["forgetting"] == pytest.approx([forgetting(rows, T) for T in range(3)])
    assert shapes["chunk"] == [1, 2, 3]
    assert eval_curves([]) == {"version": None, "chunks": 0, "sets": {}}
    # a set first measured at the second version: the first point is unmeasured (None)
    late = eval_curves([{"version": 1, "chunks": 1, "metrics": {}}, eval_row(2, version_meta(2), None)])
    assert late["sets"]["shapes"]["after_chunk"] == [None, pytest.approx(0.75)]


def test_ingest_rate_from_successive_produced_counts():
    rate = IngestRate(window_s=10)
    assert rate.per_s() is None
    rate.add(100.0, 1000)
    rate.add(102.0, 1100)
    assert rate.per_s() == pytest.approx(50.0)
    for t in range(103, 120):  # old samples leave the window
        rate.add(float(t), 1100 + (t - 102) * 10)
    assert rate.per_s() == pytest.approx(10.0)
    rate.add(121.0, 5)  # topic recreated: start again
    assert rate.per_s() is None


# ---- /status and thumbnails without Redis or Kafka --------------------------------------------------


def test_status_answers_200_with_errors_when_redis_and_kafka_are_away(tmp_path):
    """Checkpoint-dir mode, nothing listening on the Redis and Kafka ports: the page still gets its
    versions and curves from the checkpoints, and says what is down."""
    for n in (1, 2):
        save_checkpoint(tmp_path / "ckpt" / f"v{n:06d}", trained_model(), {**version_meta(n), "version": n})
    pairs = make_pairs(per_class=2)
    write_chunk(tmp_path / "data" / "chunks", "chunk_000", pairs)
    settings = load_settings(
        data_dir=tmp_path / "data",
        serve_checkpoint_dir=tmp_path / "ckpt",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        kafka_bootstrap="127.0.0.1:1",
        watch_interval_s=0.1,
    )
    with serving(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        t0 = time.monotonic()
        r = client.get("/status")
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 5  # Kafka is asked in the background, never by the request
        s = r.json()
        assert "redis" in s["errors"] and s["ingest_pending"] is True and "ingest" not in s
        assert [v["version"] for v in s["versions"]] == ["1", "2"] and s["latest"] == "2"
        assert s["serving"]["model_version"] == "2" and s["serving"]["gallery_size"] == len(pairs)
        assert s["curves"]["chunks"] == 2 and len(s["curves"]["sets"]["shapes"]["after_chunk"]) == 2
        assert [p["version"] for p in s["version_metrics"]["shapes"]] == ["1", "2"]

        img = client.get(f"/gallery/{pairs[3].key}/image")
        assert img.status_code == 200 and img.content == pairs[3].image
        assert (
            img.headers["content-type"] == "image/png" and img.headers["x-content-type-options"] == "nosniff"
        )
        for bad in ("/gallery/nope/image", "/gallery/a/b/image", "/gallery/%00/image"):
            r = client.get(bad)
            assert r.status_code == 404 and r.json()["error"] == "not_found"
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/static/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/../app.py").status_code == 404


# ---- the page in a real browser ---------------------------------------------------------------------


def _chrome(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    assert browser and driver_path, "needs chromium and chromedriver: run .ci/install-servers --test-tools"
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1280,1500",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))


@pytest.fixture
def stack(tmp_path, redis_server, monkeypatch):
    """A live API on a real Redis registry of three versions (eval metrics in each), a gallery chunk,
    and a stand-in for the Kafka lag that grows 40 messages a second."""
    import service.serve.dashboard

    start = time.time()

    def fake_lag(settings, r, *, timeout_ms=5000, previous=None):
        produced = 1000 + int((time.time() - start) * 40)
        last = [
            {"source": f"{settings.topic}/0/5", "error": "not_json", "reason": "value is not JSON", "time": 1}
        ]
        return {
            "topic": settings.topic,
            "partitions": {0: {"end": produced, "chunked": produced - 7, "lag": 7}},
            "lag": 7,
            "produced": produced,
            "dead_letters": {"topic": settings.dlq_topic, "count": 3, "fallback": 0, "last": last},
        }

    monkeypatch.setattr(service.serve.dashboard, "topic_lag", fake_lag)
    data = tmp_path / "data"
    client = redis.Redis.from_url(redis_server.url)
    registry = Registry(client, root=data / "checkpoints")
    for n in (1, 2, 3):
        registry.publish(trained_model(), version_meta(n))
    pairs = make_pairs()
    write_chunk(data / "chunks", "chunk_000", pairs)
    settings = load_settings(
        data_dir=data, redis_url=redis_server.url, kafka_bootstrap="127.0.0.1:1", watch_interval_s=0.2
    )
    with serving(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        wait_for(lambda: http.get("/readyz").status_code == 200)
        srv.http, srv.pairs = http, pairs
        yield srv
    client.close()


@pytest.mark.timeout(240)
def test_dashboard_in_headless_chromium(stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    http, pairs = stack.http, stack.pairs
    driver = _chrome(tmp_path)
    try:
        wait = WebDriverWait(driver, 30)
        css = lambda sel: driver.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
        driver.get(f"{stack.url}/")

        # the served version, the version table, and per eval set the two charts, one point per chunk
        wait.until(lambda d: d.find_element(By.ID, "version").text == "3")
        wait.until(lambda d: len(css("#history tbody tr[data-version]")) == 3)
        assert [r.get_attribute("data-version") for r in css("#history tbody tr")] == ["3", "2", "1"]
        assert "current" in css("#history tbody tr")[0].get_attribute("class")
        wait.until(lambda d: len(css(".chart-card")) == 2)
        assert sorted(c.get_attribute("data-set") for c in css(".chart-card")) == ["captions", "shapes"]
        status = http.get("/status").json()
        for name, curve in status["curves"]["sets"].items():
            card = f'.chart-card[data-set="{name}"]'
            acc = css(f'{card} svg[data-chart="accuracy"] circle[data-series="score"]')
            assert len(acc) == len(CHUNK_LABELS)
            ys = [float(c.get_attribute("data-y")) for c in acc]
            assert ys == pytest.approx(curve["after_chunk"])
            assert len(css(f'{card} svg[data-chart="accuracy"] path[data-series="avg_accuracy"]')) == 1
            fgt = css(f'{card} svg[data-chart="forgetting"] circle[data-series="forgetting"]')
            assert [float(c.get_attribute("data-y")) for c in fgt] == pytest.approx(curve["forgetting"])
            per_version = css(f'{card} svg[data-chart="forgetting"] circle[data-series="version"]')
            assert len(per_version) == 3  # one per registry version
        shapes_fgt = [
            float(c.get_attribute("data-y"))
            for c in css('.chart-card[data-set="shapes"] circle[data-series="forgetting"]')
        ]
        assert shapes_fgt[-1] == pytest.approx(forgetting(R_SHAPES, 2)) and shapes_fgt[-1] > 0

        # pipeline tiles: Redis figures at once; the (stand-in) ingest rate once two lag samples are in
        assert driver.find_element(By.ID, "chunks-pending").text == "0"
        assert driver.find_element(By.ID, "latest-version").text == "3"
        wait.until(lambda d: d.find_element(By.ID, "ingest-lag").text == "7")
        wait.until(lambda d: d.find_element(By.ID, "ingest-rate").text not in ("–", "…"))
        assert 20 <= float(driver.find_element(By.ID, "ingest-rate").text) <= 60  # ~40/s
        assert driver.find_element(By.ID, "dlq-count").text == "3"  # dead letters and the newest reason
        assert [li.text for li in css("#dlq-last li")] == ["not_json: value is not JSON"]
        assert driver.find_element(By.ID, "errors").get_attribute("hidden") is not None

        # try it: classify an uploaded PNG; the list is what POST /classify answers for the same input
        png = tmp_path / "shape.png"
        png.write_bytes(pairs[5].image)
        labels = [f"a {c}" for c in CLASSES]  # the tiny model learnt captions "a {shape}"
        driver.find_element(By.ID, "classify-file").send_keys(str(png))
        driver.find_element(By.ID, "classify-labels").send_keys(", ".join(labels))
        driver.find_element(By.ID, "classify-btn").click()
        wait.until(lambda d: len(css("#classify-results li")) == len(labels))
        shown = [
            (li.get_attribute("data-label"), float(li.get_attribute("data-score")))
            for li in css("#classify-results li")
        ]
        want = http.post(
            "/classify", files={"file": ("shape.png", pairs[5].image, "image/png")}, data={"labels": labels}
        ).json()["predictions"]
        assert [x[0] for x in shown] == [p["label"] for p in want]
        assert [x[1] for x in shown] == pytest.approx([p["score"] for p in want], abs=1e-6)
        assert shown[0][0] == f"a {pairs[5].label}"
        assert css("#classify-results li .label")[0].text == f"a {pairs[5].label}"

        # try it: text retrieval with thumbnails from GET /gallery/{id}/image
        driver.find_element(By.ID, "retrieve-text").send_keys("a star")
        driver.find_element(By.ID, "retrieve-btn").click()
        wait.until(lambda d: len(css("#retrieve-results li")) == 8)
        want = http.post("/retrieve", json={"text": "a star", "k": 8}).json()["results"]
        assert [li.get_attribute("data-id") for li in css("#retrieve-results li")] == [x["id"] for x in want]
        wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#retrieve-results img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        )

        logs = driver.get_log("browser")
        assert not [e for e in logs if e["level"] == "SEVERE"], logs

        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from PIL import Image

    assert shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 1000
        assert len(im.convert("RGB").resize((64, 64)).getcolors(64 * 64) or []) > 20  # not a blank page
    try:  # for people to look at; the test's own copy is in tmp_path
        (REPO / "runs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "runs" / "dashboard.png")
    except OSError:
        pass


def test_kafka_lag_refresh_runs_in_background(monkeypatch):
    """A slow or absent broker never blocks ``poll()``; a failure is retried after ``retry_s``."""
    import threading

    import service.serve.dashboard

    gate = threading.Event()
    calls = []

    def slow_lag(settings, r, *, timeout_ms=5000, previous=None):
        calls.append(time.monotonic())
        gate.wait(10)
        raise ConnectionError("no broker")

    monkeypatch.setattr(service.serve.dashboard, "topic_lag", slow_lag)
    lag = KafkaLag(load_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), every_s=0.0, retry_s=60)
    t0 = time.monotonic()
    first = lag.poll()
    assert time.monotonic() - t0 < 1 and first == {"ingest": None, "error": None, "checked_at": None}
    wait_for(lambda: calls)
    assert lag.poll()["checked_at"] is None and len(calls) == 1  # one check in flight at a time
    gate.set()
    wait_for(lambda: lag.poll()["error"])
    assert "no broker" in lag.poll()["error"] and len(calls) == 1  # retried only after retry_s
    assert math.isfinite(lag.poll()["checked_at"])
