import json
import random

import pytest

from ctp.data import load_classification_set, load_retrieval_set, read_chunk
from ctp.metrics import continual_summary
from ctp.models import create_model
from ctp.synthetic import make_stream
from ctp.tracking import EvalTracker, RunningSummary, StreamEvalTracker, class_groups


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return make_stream(tmp_path_factory.mktemp("stream"), "tiny")


def test_class_groups_first_chunk_wins_and_unlabelled_is_one_group():
    names = ["a", "b", "c"]
    assert class_groups(names, [{"a"}, {"a", "b"}]) == {0: 0, 1: 1}  # "c" not seen: no group
    assert class_groups(names, [set(), set()]) == {0: 0, 1: 0, 2: 0}


def test_rows_grow_with_the_stream_and_state_round_trips(stream):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    cls, ret = load_classification_set(stream.classification), load_retrieval_set(stream.retrieval)
    tracker = EvalTracker({"cls": cls}, {"ret": ret})
    chunks = [read_chunk(d) for d in stream.chunks]
    tracker.after_chunk(bundle, [s.label for s in chunks[0]], device="cpu")
    assert [len(r) for r in tracker.results["cls"]["rows"]] == [1]
    # after chunk 0 only its classes have a group; the other classes are in none
    saved = json.loads(json.dumps(tracker.state()))
    resumed = EvalTracker({"cls": cls}, {"ret": ret}, state=saved)
    summary = resumed.after_chunk(bundle, [s.label for s in chunks[1]], device="cpu")
    rows = summary["cls"]["task_matrix"]
    assert [len(r) for r in rows] == [2, 2] and rows[0][1] is None and rows[1][1] is not None
    assert summary["cls"]["avg_accuracy"] == continual_summary(rows)["avg_accuracy"]
    assert len(summary["ret"]["after_chunk"]) == 2 and summary["ret"]["score"] == "mean_recall@1"
    # a set added to a running stream starts with unmeasured (None) rows, and its summary works
    late = EvalTracker({"cls": cls, "late": cls}, state=json.loads(json.dumps(resumed.state())))
    out = late.after_chunk(bundle, [s.label for s in chunks[1]], device="cpu")
    assert out["late"]["after_chunk"][:2] == [None, None] and out["late"]["final"] is not None
    assert out["late"]["task_matrix"][0] == [None, None, None]


def test_running_summary_matches_the_whole_matrix():
    """Row by row with O(columns) state, the same figures as ctp.metrics on the whole R."""
    rng = random.Random(0)
    for _ in range(20):
        T = rng.randint(1, 12)
        # EvalTracker's layout: row i measured with i + 1 columns, padded to T with None
        R = [[rng.random() if j <= i and rng.random() > 0.3 else None for j in range(T)] for i in range(T)]
        running = RunningSummary()
        for t in range(T):
            got = running.add(R[t])
            if t == T // 2:  # a restart from the saved state in between changes nothing
                running = RunningSummary(json.loads(json.dumps(running.state())))
            want = continual_summary(R[: t + 1])
            for k in ("avg_accuracy", "forgetting", "bwt"):
                assert got[k] == pytest.approx(want[k]), (t, k)
        assert len(running.best) <= T and running.rows == T


def test_stream_tracker_state_stays_bounded_and_reads_an_old_state(stream):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    cls, ret = load_classification_set(stream.classification), load_retrieval_set(stream.retrieval)
    chunks = [read_chunk(d) for d in stream.chunks]
    matrix = EvalTracker({"cls": cls}, {"ret": ret})
    tracker = StreamEvalTracker({"cls": cls}, {"ret": ret})
    sizes = []
    for k in range(8):  # the tiny stream's chunks again and again: a long stream
        labels = [s.label for s in chunks[k % len(chunks)]]
        whole = matrix.after_chunk(bundle, labels, device="cpu")
        row = tracker.after_chunk(bundle, labels, device="cpu")
        for name in ("cls", "ret"):
            for key in ("avg_accuracy", "forgetting", "bwt"):
                assert row[name][key] == pytest.approx(whole[name][key])
            assert row[name]["metrics"] == whole[name]["final"]
        tracker = StreamEvalTracker({"cls": cls}, {"ret": ret}, state=json.loads(json.dumps(tracker.state())))
        sizes.append(len(json.dumps(tracker.state())))
    assert sizes[-1] == sizes[len(chunks)]  # every class seen: the state no longer grows
    assert len(json.dumps(matrix.state())) > 3 * sizes[-1]  # the whole matrix does
    assert set(row["cls"]["row"]) <= {str(j) for j in range(len(chunks))}  # one cell per class group
    # a state EvalTracker wrote is folded in: the next summary is the same as the matrix's
    upgraded = StreamEvalTracker({"cls": cls}, {"ret": ret}, state=json.loads(json.dumps(matrix.state())))
    labels = [s.label for s in chunks[0]]
    a = upgraded.after_chunk(bundle, labels, device="cpu")
    b = matrix.after_chunk(bundle, labels, device="cpu")
    assert a["cls"]["forgetting"] == pytest.approx(b["cls"]["forgetting"]) and upgraded.chunks == 9
