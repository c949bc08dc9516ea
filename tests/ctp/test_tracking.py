import json

import pytest

from ctp.data import load_classification_set, load_retrieval_set, read_chunk
from ctp.metrics import continual_summary
from ctp.models import create_model
from ctp.synthetic import make_stream
from ctp.tracking import EvalTracker, class_groups


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
