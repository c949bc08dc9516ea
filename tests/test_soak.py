"""benchmarks/soak.py end to end: a one-minute soak through ``ctp up`` on real servers (Kafka,
Redis, ingest, trainer, API) writes its samples and plot, pairs and bad messages flow through,
and Redis stays within a loose bound per pair (the dedup ids expire, nothing else per pair)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(480)]

# Redis may grow by the replay memory (500 pairs of ~1.2 KB), registry, scripts and allocator slack
# (~2 MB measured on ~3,000 messages), plus a dedup id and digest per pair (~60-100 B while its
# bucket lives): a per-pair leak of an image (~1 KB base64) or of a message would pass this bound.
REDIS_BASE_BYTES = 4_000_000
REDIS_BYTES_PER_PAIR = 100


def test_a_short_soak_records_bounded_state(tmp_path, monkeypatch):
    monkeypatch.setenv("CTP_DEDUP_WINDOW_S", "20")  # the ids expire within the run
    monkeypatch.setenv("CTP_CHUNK_SIZE", "512")
    monkeypatch.setenv("CTP_CHUNK_MAX_WAIT_S", "5")
    out = tmp_path / "out"
    argv = ["--minutes", "1", "--rate", "50", "--every", "5", "--out", str(out)]
    assert soak.main([*argv, "--data-dir", str(tmp_path / "data")]) == 0

    result = json.loads((out / "soak.json").read_text())
    assert (out / "soak.png").stat().st_size > 10_000
    assert result["ctp_up_exit"] == 0 and result["settings"]["CTP_DEDUP_WINDOW_S"] == "20"
    samples = result["samples"]
    assert len(samples) >= 10 and samples[-1]["t"] >= 60
    last = samples[-1]
    assert last["sent_valid"] >= 2000 and last["sent_bad"] >= 20 and last["send_failed"] == 0
    assert last["messages_chunked"] >= 0.5 * (last["sent_valid"] + last["sent_bad"])
    assert last["chunks_enqueued"] >= 2 and last["chunks_dead"] == 0
    assert last["dead_letters"] > 0  # the bad messages went to the DLQ topic
    assert last["dead_letters_kept"] <= last["dead_letters"] <= last["sent_bad"]
    assert all(r["api_rss"] for r in samples[1:])  # the API process was found and measured
    assert all(r["redis_used_memory"] > 0 and r["data_dir_bytes"] > 0 for r in samples)
    assert max(r["log_dir_bytes"] for r in samples) <= soak._log_bound(result)

    used = [r["redis_used_memory"] for r in samples]
    grown = max(used) - used[0]
    allowed = REDIS_BASE_BYTES + REDIS_BYTES_PER_PAIR * last["messages_chunked"]
    assert grown <= allowed, f"Redis grew {grown} B for {last['messages_chunked']} messages"
    print(f"Redis grew {grown} B of {allowed} B allowed")  # -s shows the margin
    assert set(result["verdicts"]) == {s.key for s in soak.BOUNDED}
