"""End to end: ``ctp experiment`` and ``ctp compare`` on the tiny synthetic stream."""

import json

import pytest

from ctp.metrics import continual_summary
from service.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_stream):
    root = tmp_path_factory.mktemp("exp")
    outs = {}
    for strategy in ("finetune", "incclip"):
        out = root / strategy
        argv = [
            "experiment",
            "--chunks",
            *map(str, tiny_stream.chunks),
            "--eval-classification",
            f"shapes={tiny_stream.classification}",
            "--eval-retrieval",
            f"shapes_ret={tiny_stream.retrieval}",
            "--strategy",
            strategy,
            "--model",
            "ctp-vit-micro-32",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--memory-size",
            "40",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        outs[strategy] = out
    return outs


def test_metrics_json_contract(runs):
    m = json.loads((runs["incclip"] / "metrics.json").read_text())
    assert m["strategy"] == "incclip" and m["chunks"] == 2
    cls = m["eval"]["shapes"]
    assert cls["kind"] == "classification"
    assert len(cls["after_chunk"]) == 2
    assert set(cls["final"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert len(cls["task_matrix"]) == 2 and len(cls["task_matrix"][0]) == 2
    for k in ("avg_accuracy", "forgetting", "bwt"):
        assert k in cls
    assert cls["task_matrix"][0][0] is not None  # classes of chunk 0 have eval examples
    assert continual_summary(cls["task_matrix"]) == {k: cls[k] for k in ("avg_accuracy", "forgetting", "bwt")}
    for v in cls["final"].values():
        assert 0.0 <= v <= 1.0
    ret = m["eval"]["shapes_ret"]
    assert ret["kind"] == "retrieval"
    assert "image_retrieval_recall@10" in ret["final"] and "text_retrieval_recall@1" in ret["final"]
    assert m["chunk_reports"][1]["pseudo"]["items"] > 0


def test_outputs_written(runs):
    out = runs["incclip"]
    for name in (
        "metrics.json",
        "report.md",
        "accuracy.png",
        "task_matrix_shapes.png",
        "checkpoint/model.safetensors",
        "checkpoint/meta.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Task matrix" in (out / "report.md").read_text()


def test_compare(runs, tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(runs["finetune"]), str(runs["incclip"]), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| finetune | 1 |" in out and "| incclip | 1 |" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flag", ["--synthetic", "--stream"])
def test_synthetic_source(tmp_path, flag):
    """--synthetic NAME and --stream NAME build the same synthetic stream with its eval sets."""
    out = tmp_path / "syn"
    args = [flag, "tiny", "--data-dir", str(tmp_path / "data"), "--strategy", "er"]
    args += ["--model", "ctp-vit-micro-32", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main(["experiment", *args]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["eval"]) == {"synthetic", "synthetic_retrieval"}


@pytest.mark.parametrize("generator", ["captioner", "random"])
def test_other_pseudo_text_generators(tmp_path, tiny_stream, generator):
    out = tmp_path / generator
    assert (
        main(
            [
                "experiment",
                "--chunks",
                *map(str, tiny_stream.chunks),
                "--strategy",
                "incclip",
                "--generator",
                generator,
                "--model",
                "ctp-vit-micro-32",
                "--epochs",
                "1",
                "--memory-size",
                "20",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["generator"] == generator
    assert m["chunk_reports"][1]["pseudo"]["proposed"] > 0


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--strategy", "incclip", "--out", str(tmp_path)])  # no data source
    with pytest.raises(SystemExit, match="not found"):
        main(
            ["experiment", "--chunks", str(tmp_path / "missing"), "--strategy", "er", "--out", str(tmp_path)]
        )
    assert main(["nope"]) == 2


@pytest.mark.slow
def test_experiment_under_torchrun(tmp_path, tiny_stream):
    """`torchrun --nproc-per-node 2 ... experiment`: two gloo CPU ranks, rank 0 writes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "service.cli",
        "experiment",
        "--chunks",
        *map(str, tiny_stream.chunks),
        "--eval-classification",
        f"shapes={tiny_stream.classification}",
        "--strategy",
        "incclip",
        "--model",
        "ctp-vit-micro-32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--memory-size",
        "20",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    # 80 pairs a chunk over 2 ranks: 40 each, 8 new + 8 replayed per step after chunk 0
    assert m["chunk_reports"][0]["train"]["steps"] == 3
    assert m["chunk_reports"][1]["train"]["steps"] == 5
    assert m["chunk_reports"][1]["train"]["pairs"] == 2 * 5 * 16


def test_compute_counts_the_balanced_pass(tmp_path, tiny_stream):
    out = tmp_path / "bal"
    argv = ["experiment", "--chunks", *map(str, tiny_stream.chunks), "--strategy", "er"]
    argv += ["--model", "ctp-vit-micro-32", "--epochs", "1", "--memory-size", "20", "--no-progress"]
    assert main([*argv, "--set", "balance_epochs=2", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    chunks = m["chunk_reports"]
    assert all(c["balance"]["pairs"] == 2 * 20 for c in chunks)  # two passes over a full memory
    assert m["compute"]["pairs"] == sum(c["train"]["pairs"] + c["balance"]["pairs"] for c in chunks)
