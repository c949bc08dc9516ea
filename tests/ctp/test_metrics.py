import pytest

from ctp.metrics import (
    average_accuracy,
    bwt,
    continual_summary,
    first_seen_chunk,
    forgetting,
    format_task_matrix,
    group_accuracy,
)

# Values are multiples of 1/8 so every mean below is exact in binary floating point.
R3 = [
    [0.5, 0.125, 0.25],
    [0.25, 0.75, 0.0],
    [0.375, 0.5, 0.875],
]


def test_first_seen_chunk():
    assert first_seen_chunk([[0, 1], [1, 2], [3, 0]]) == {0: 0, 1: 0, 2: 1, 3: 2}


def test_group_accuracy():
    correct = [True, False, True, True, False, True]
    targets = [0, 0, 1, 2, 2, 9]  # class 9 belongs to no group and is ignored
    acc = group_accuracy(correct, targets, {0: 0, 1: 1, 2: 1, 3: 2}, num_groups=3)
    assert acc == [0.5, 2 / 3, None]  # group 2 (class 3) has no examples


def test_group_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        group_accuracy([True], [0, 1], {0: 0}, 1)
    with pytest.raises(ValueError):
        group_accuracy([True], [0], {0: 1}, 1)


def test_t0_edge_case():
    R = [[0.5, 0.25]]
    assert average_accuracy(R, 0) == 0.5  # only j <= 0; R[0][1] (unseen classes) is ignored
    assert forgetting(R, 0) == 0.0
    assert bwt(R, 0) == 0.0
    assert continual_summary(R) == {"avg_accuracy": 0.5, "forgetting": 0.0, "bwt": 0.0}


def test_average_accuracy():
    assert average_accuracy(R3, 0) == 0.5
    assert average_accuracy(R3, 1) == (0.25 + 0.75) / 2
    assert average_accuracy(R3, 2) == (0.375 + 0.5 + 0.875) / 3


def test_forgetting_t1():
    # j=0: max_{i<1} R[i][0] = 0.5; 0.5 - 0.25
    assert forgetting(R3, 1) == 0.25


def test_forgetting_t2():
    # j=0: max(0.5, 0.25) - 0.375 = 0.125; j=1: max(0.125, 0.75) - 0.5 = 0.25
    assert forgetting(R3, 2) == (0.125 + 0.25) / 2


def test_forgetting_max_includes_rows_before_the_chunk():
    # docs/design.md's max_{i<T} includes i < j: R[0][1] = 0.75 (zero-shot, before chunk 1) beats
    # R[1][1] = 0.5, so forgetting on chunk 1 is 0.75 - 0.25, not 0.5 - 0.25.
    R = [
        [1.0, 0.75, 0.0],
        [1.0, 0.5, 0.0],
        [1.0, 0.25, 0.5],
    ]
    assert forgetting(R, 2) == (0.0 + 0.5) / 2


def test_bwt():
    assert bwt(R3, 1) == 0.25 - 0.5
    # j=0: 0.375 - 0.5; j=1: 0.5 - 0.75
    assert bwt(R3, 2) == (-0.125 - 0.25) / 2


def test_positive_bwt_and_negative_forgetting_free():
    R = [
        [0.25, 0.0],
        [0.5, 0.75],
    ]
    assert bwt(R, 1) == 0.25
    assert forgetting(R, 1) == -0.25  # improvement shows as negative forgetting


def test_continual_summary_3x3():
    assert continual_summary(R3) == {
        "avg_accuracy": (0.375 + 0.5 + 0.875) / 3,
        "forgetting": 0.1875,
        "bwt": -0.1875,
    }


def test_continual_summary_partial_rows():
    # Two chunks trained out of three: rows are full length, summary is at T = 1.
    assert continual_summary(R3[:2]) == {"avg_accuracy": 0.5, "forgetting": 0.25, "bwt": -0.25}


def test_none_cells_are_skipped():
    R = [
        [0.5, None, 0.25],
        [0.25, None, 0.0],
        [0.375, None, 0.875],
    ]
    assert average_accuracy(R, 2) == (0.375 + 0.875) / 2
    assert forgetting(R, 2) == 0.5 - 0.375
    assert bwt(R, 2) == 0.375 - 0.5
    assert average_accuracy([[None]], 0) is None


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        average_accuracy(R3, 3)
    with pytest.raises(ValueError):
        forgetting([[0.5], [0.5]], 1)  # row too short for T = 1
    with pytest.raises(ValueError):
        continual_summary([])


def test_format_task_matrix():
    text = format_task_matrix([[0.5, None], [0.25, 1.0]])
    lines = text.splitlines()
    assert len(lines) == 3
    assert "0.500" in lines[1] and "-" in lines[1]
    assert "1.000" in lines[2]
