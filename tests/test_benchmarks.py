"""benchmarks/continual.py and benchmarks/report.py: cells, resumability and the statistics."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import continual  # noqa: E402
import report  # noqa: E402


def test_mean_ci_is_students_t():
    m, h = report.mean_ci([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2)
    assert h == pytest.approx(4.303 * 0.1 / math.sqrt(3))  # sd 0.1, df 2
    assert math.isnan(report.mean_ci([0.5])[1])


def test_sweeps_pair_seeds_and_keep_memory_free_strategies_once():
    test = continual.sweeps()["test"]
    cells = continual.select(test.cells, [f"stream={continual.EMOJI}", "seed=0"])
    by = {(c.strategy, c.share) for c in cells}
    assert ("finetune", None) in by and ("joint", None) in by and ("lwf", None) in by
    assert {s for (st, s) in by if st == "incclip"} == set(continual.SHARES)
    # incclip's default and its constant-KD predecessor ([const]) beside it, at every share
    const = [c for c in cells if c.variant == "const"]
    assert {(c.strategy, c.share) for c in const} == {("incclip", s) for s in continual.SHARES}
    assert all(c.sets == ("kd_rule=constant",) for c in const)
    assert len(cells) == 3 + 4 * len(continual.SHARES) + len(const)
    assert {c.seed for c in test.cells} == set(range(5))
    # knobs are tuned on their own seeds, never on the test seeds
    assert not {c.seed for c in continual.sweeps()["validation"].cells} & {c.seed for c in test.cells}
    assert continual.select(cells, ["strategy=er,incclip", "share=0.01"]) == [
        c for c in cells if c.strategy in ("er", "incclip") and c.share == 0.01
    ]


def test_validation_rerun_repeats_the_validation_references_cell_for_cell():
    sw = continual.sweeps()
    rerun = {(c.stream, c.seed, c.label, c.share) for c in sw["validation-rerun"].cells}
    val = {
        (c.stream, c.seed, c.label, c.share) for c in sw["validation"].cells if c.label in ("er", "incclip")
    }
    assert rerun == val and {s for (_, _, _, s) in rerun} == set(continual.SHARES)


def test_validation_confirm_uses_fresh_seeds_and_the_grid_knob_as_validated():
    sw = continual.sweeps()
    confirm = sw["validation-confirm"].cells
    seeds = {c.seed for c in confirm}
    assert not seeds & {c.seed for c in sw["validation"].cells}
    assert not seeds & {c.seed for c in sw["test"].cells}
    kd2 = [c for c in confirm if c.variant == "kd2"]
    assert kd2 and all(c.sets == continual.ABLATIONS["kd2"][1] for c in kd2)
    # every knob cell has its paired references: incclip and er on the same seed and share
    refs = {(c.seed, c.share) for c in confirm if c.label == "incclip"}
    assert {(c.seed, c.share) for c in kd2} <= refs
    assert refs == {(c.seed, c.share) for c in confirm if c.label == "er"}


def test_validation_novelty_pairs_each_knob_cell_with_same_sweep_references_on_both_splits():
    from ctp.synthetic import PRESETS

    sw = continual.sweeps()
    cells = sw["validation-novelty"].cells
    assert {c.stream for c in cells} == {continual.SYNTHETIC, continual.SYNTHETIC_II}
    assert PRESETS[continual.SYNTHETIC_II].split == "instance-incremental"
    knob = [c for c in cells if c.variant == "novelty"]
    assert knob and all(c.sets == ("kd_novelty=true",) for c in knob)
    for ref in ("er", "incclip"):
        assert {(c.stream, c.seed, c.share) for c in knob} == {
            (c.stream, c.seed, c.share)
            for c in cells
            if c.label == ref and c.share in continual.ABLATION_SHARES
        }
    # er at the storage of er[delay]: its memory plus the 50-pair slice, on the 1,600-pair stream
    equal = {
        (c.seed, round(c.share * 1600))
        for c in cells
        if c.label == "er" and c.share not in continual.ABLATION_SHARES
    }
    delay = {
        (c.seed, round(c.share * 1600) + 50)
        for c in cells
        if c.variant == "delay" and c.stream == continual.SYNTHETIC
    }
    assert equal == delay
    # kd_known on the instance-incremental twin only (a class-incremental chunk trains as incclip)
    known = [c for c in cells if c.variant == "known"]
    assert {c.stream for c in known} == {continual.SYNTHETIC_II}
    assert {(c.seed, c.share) for c in known} <= {(c.seed, c.share) for c in cells if c.label == "incclip"}
    assert not {c.seed for c in cells} & {c.seed for c in sw["test"].cells}
    assert not [c for c in sw["validation"].cells if c.variant == "novelty"]  # its own sweep only
    # its confirmation: fresh seeds, the same knob, both splits, same-sweep references
    confirm = sw["validation-novelty-confirm"].cells
    assert not {c.seed for c in confirm} & ({c.seed for c in cells} | {c.seed for c in sw["test"].cells})
    assert {c.stream for c in confirm} == {continual.SYNTHETIC, continual.SYNTHETIC_II}
    cknob = [c for c in confirm if c.variant == "novelty"]
    assert {c.sets for c in cknob} == {("kd_novelty=true",)}
    for ref in ("er", "incclip"):
        assert {(c.stream, c.seed, c.share) for c in cknob} == {
            (c.stream, c.seed, c.share) for c in confirm if c.label == ref
        }


def test_validation_shift_differs_from_its_twin_by_the_eval_background_only_on_validation_seeds():
    from dataclasses import replace

    from ctp.synthetic import PRESETS

    sw = continual.sweeps()
    cells = sw["validation-shift"].cells
    shifted = PRESETS[continual.SYNTHETIC_II_SHIFT]
    assert shifted.eval_background == "striped"
    assert replace(shifted, eval_background=None) == PRESETS[continual.SYNTHETIC_II]
    assert not {c.seed for c in cells} & {c.seed for c in sw["test-ii"].cells}
    # the unshifted twin's er and incclip are the validation-novelty (seeds 100-102) and
    # -confirm (103-105) cells: every seed here has them there
    refs = {
        (c.seed, c.strategy, c.share)
        for name in ("validation-novelty", "validation-novelty-confirm")
        for c in sw[name].cells
        if c.stream == continual.SYNTHETIC_II and not c.variant
    }
    for c in cells:
        if c.stream == continual.SYNTHETIC_II_SHIFT and c.strategy in ("er", "incclip"):
            assert (c.seed, c.strategy, c.share) in refs
    plain = {(c.seed, c.strategy) for c in cells if c.stream == continual.SYNTHETIC_II}
    assert plain == {
        (c.seed, c.strategy)
        for c in cells
        if c.stream == continual.SYNTHETIC_II_SHIFT and c.strategy in ("finetune", "lwf")
    }


def test_test_ii_runs_the_instance_incremental_twins_of_the_test_streams_on_the_test_seeds():
    from dataclasses import replace

    from ctp.emoji import PRESETS as EMOJI
    from ctp.synthetic import PRESETS as SYNTHETIC

    sw = continual.sweeps()
    cells = sw["test-ii"].cells
    assert {c.stream for c in cells} == {continual.SYNTHETIC_II, continual.EMOJI_II}
    # the twins differ from the class-incremental test streams in their split only
    assert replace(EMOJI[continual.EMOJI_II], split="class-incremental") == EMOJI[continual.EMOJI]
    assert (
        replace(SYNTHETIC[continual.SYNTHETIC_II], split="class-incremental")
        == SYNTHETIC[continual.SYNTHETIC]
    )
    assert {c.seed for c in cells} == {c.seed for c in sw["test"].cells} == set(range(5))
    assert {c.strategy for c in cells} == set(continual.CORE)
    for stream in (continual.SYNTHETIC_II, continual.EMOJI_II):
        for seed in range(5):
            mine = [c for c in cells if (c.stream, c.seed) == (stream, seed)]
            assert {c.share for c in mine if c.strategy == "incclip"} == set(continual.SHARES)
            assert {c.share for c in mine if c.strategy == "er"} == set(continual.SHARES)
            assert [c.share for c in mine if c.strategy in continual.MEMORY_FREE] == [None] * 3


def test_validation_ii_is_emoji_ii_10s_shape_on_other_classes_and_seeds():
    from ctp.emoji import PRESETS

    sw = continual.sweeps()
    cells = sw["validation-ii"].cells
    assert {c.stream for c in cells} == {continual.EMOJI_II_VAL}
    v, t = PRESETS[continual.EMOJI_II_VAL], PRESETS[continual.EMOJI_II]
    assert v.split == t.split == "instance-incremental"
    assert (v.top_subcategories, v.categories_per_chunk, v.chunk_by) == (
        t.top_subcategories,
        t.categories_per_chunk,
        t.chunk_by,
    )
    # its subcategories come after every one an emoji test stream uses (by size rank)
    for name in (
        continual.EMOJI_II,
        continual.EMOJI,
        continual.EMOJI_LONG,
        continual.WARM,
        continual.EMOJI_LONG_WARM,
    ):
        assert v.skip_subcategories >= PRESETS[name].top_subcategories > 0
    assert {c.seed for c in cells}.isdisjoint(c.seed for c in sw["test-ii"].cells)
    # every memory share has both replay references on every seed; memory-free baselines once a seed
    seeds = {c.seed for c in cells}
    assert len(seeds) >= 5
    for ref in ("er", "incclip"):
        assert {(c.seed, c.share) for c in cells if c.label == ref} == {
            (s, share) for s in seeds for share in continual.ABLATION_SHARES
        }
    for ref in ("finetune", "lwf"):
        assert sorted(c.seed for c in cells if c.label == ref) == sorted(seeds)
    known = [c for c in cells if c.variant == "known"]
    assert all(c.sets == ("kd_known=true",) for c in known)
    assert {(c.seed, c.share) for c in known} == {(c.seed, c.share) for c in cells if c.label == "incclip"}


def test_warm_remedies_are_chosen_on_a_validation_stream_of_other_classes_and_seeds():
    from ctp.emoji import PRESETS

    sw = continual.sweeps()
    val, confirm, test = (
        sw["validation-warm"].cells,
        sw["validation-warm-confirm"].cells,
        sw["long-warm"].cells,
    )
    assert {c.stream for c in val + confirm} == {continual.EMOJI_WARM_VAL}
    assert all(c.pretrained == "base" for c in val + confirm)
    # its subcategories come after every one the emoji test streams use (by size rank)
    v = PRESETS[continual.EMOJI_WARM_VAL]
    for name in (continual.EMOJI_LONG_WARM, continual.EMOJI_LONG, continual.WARM, continual.EMOJI):
        assert v.skip_subcategories >= PRESETS[name].top_subcategories > 0
    assert {c.seed for c in val}.isdisjoint(c.seed for c in confirm)
    assert {c.seed for c in val + confirm}.isdisjoint(c.seed for c in test)
    # every remedy, in both sweeps, with its paired references on each seed and share
    for cells in (val, confirm):
        refs = {(c.seed, c.share) for c in cells if c.label == "incclip"}
        assert refs == {(c.seed, c.share) for c in cells if c.label == "er"}
        for variant, sets in continual.WARM_REMEDIES.items():
            mine = [c for c in cells if c.variant == variant]
            assert {(c.seed, c.share) for c in mine} == refs and all(c.sets == sets for c in mine)


def _fake(strategy, seed, avg, *, memory=16, share=0.01):
    R = [[avg]]
    return {
        "strategy": strategy,
        "chunks": 1,
        "model": "m",
        "seed": seed,
        "memory_size": memory,
        "compute": {"pairs": 100 * (1 + (strategy == "joint")), "train_seconds": 1.0},
        "cell": {"stream_pairs": 1600, "common": ["--epochs", "1"], "share": share},
        "eval": {
            "synthetic": {
                "kind": "classification",
                "avg_accuracy": avg,
                "forgetting": 0.1,
                "task_matrix": R,
                "final": {"acc1": avg},
                "after_chunk": [{"acc1": avg}],
            },
            "synthetic_retrieval": {
                "kind": "retrieval",
                "final": {"mean_recall@1": avg / 2},
                "avg_accuracy": avg / 2,
                "forgetting": 0.0,
                "after_chunk": [{"mean_recall@1": avg / 2}],
            },
        },
    }


def test_report_paired_differences_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    root = tmp_path / "s" / "stream"
    er = {0: 0.30, 1: 0.50, 2: 0.40}
    for seed, a in er.items():
        for label, mem, value in (
            ("er", "mem1", a),
            ("incclip", "mem1", a + 0.05 + 0.01 * seed),
            ("finetune", "nomem", 0.1),
            ("joint", "nomem", 0.9),
        ):
            f = root / label / mem / f"seed{seed}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            fake = _fake(label, seed, value)
            if label in ("er", "incclip"):  # cells made with the environment kept, the others before
                fake["env"] = continual.environment()
                if label == "incclip" and seed == 2:  # one pair made on two machines
                    fake["env"] = {**fake["env"], "cpu": "another CPU"}
            f.write_text(json.dumps(fake))
    runs = report.load("s")
    m, h, n = report.paired(runs[("stream", "incclip", "mem1")], runs[("stream", "er", "mem1")])
    assert n == 3 and m == pytest.approx(0.06) and h == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert report.best_baseline(runs, "stream", "mem1") == "er"  # finetune's one result serves every memory
    path = report.write_report("s", out_dir=tmp_path / "docs")
    text = path.read_text()
    assert "| incclip − best baseline | 6.0 ± 2.5 (er), n=3, 1 across environments |" in text
    cross = report.cross_env
    assert cross(runs[("stream", "er", "mem1")], runs[("stream", "finetune", "nomem")]) == 3  # one unrecorded
    assert cross(runs[("stream", "joint", "nomem")], runs[("stream", "finetune", "nomem")]) == 0  # both
    for kind in ("curves", "paired", "compute"):
        assert (tmp_path / "docs" / f"s-stream-{kind}.png").stat().st_size > 1000
    # the acceptance table judges each target from the same files
    accept = report.acceptance_table(runs, ["stream"])
    target = "incclip − best baseline (er) ≥ +4.6, interval > 0"
    pairs = "n=3, 1 across environments"
    assert f"| stream | 1 % (16 pairs) | {target} | 6.0 ± 2.5 ({pairs}) | met |" in accept
    assert f"| incclip ≥ er − 1 | 6.0 ± 2.5 ({pairs}) | met |" in accept
    # forgetting 0.1 for both: 0.1 > 0.6 x 0.1
    assert "| forgetting ≤ 0.6 × finetune's (6.0) | 10.0 | **not met** |" in accept
    assert "## Acceptance targets" in text
    # which environment made how many cells: runs repeat bitwise only within one
    env = continual.environment()
    assert set(env) >= {"cpu", "cpu_capability", "torch", "pillow", "numpy"} and env["torch"]
    here = f"| cpu {env['cpu']}, cpu_flags {env['cpu_flags']}, cpu_capability {env['cpu_capability']}, torch"
    assert f"{here} {env['torch']}" in text and "| cpu another CPU, cpu_flags" in text
    assert f"{here} {env['torch']}, numpy {env['numpy']}, pillow {env['pillow']}" in text
    assert "| not recorded (made before environments were kept) | 6 |" in text


def test_the_remedy_rule_judges_part_one_then_pools_fresh_seeds_for_the_winner():
    def runs(seeds, gains):
        out = {}
        for label, mem, g in gains:
            out[("st", label, mem)] = {s: _fake(label, s, 0.2 + g(s)) for s in seeds}
        return out

    base = [("incclip", m, lambda s: 0.0) for m in ("mem1", "mem3")]
    base += [("er", m, lambda s: 0.01) for m in ("mem1", "mem3")]
    good = [("incclip[a]", "mem1", lambda s: 0.03 + 0.001 * s), ("incclip[a]", "mem3", lambda s: 0.0)]
    # b gains more at 1 % but loses 2 points to er at 3 %: part 1 fails
    bad = [("incclip[b]", "mem1", lambda s: 0.05), ("incclip[b]", "mem3", lambda s: -0.01)]
    first = runs(range(5), base + good + bad)
    rows = {line.split(" | ")[0][2:]: line for line in report.remedy_lines("st", first, first)}
    assert rows["incclip[b]"].startswith(
        "| incclip[b] | 5.0 ± 0.0 | -1.0 ± 0.0 | 4.0 ± 0.0 | -2.0 ± 0.0 | **failed** |"
    )
    # a: +3.2 at 1 %, level at 3 %, −1.0 against er there (the threshold itself passes)
    assert rows["incclip[a]"].startswith(
        "| incclip[a] | 3.2 ± 0.2 | 0.0 ± 0.0 | 2.2 ± 0.2 | -1.0 ± 0.0 | passed |"
    )
    assert rows["incclip[a]"].endswith("| – | – | – |")  # 5 seeds only: part 2 waits for the fresh ones
    pooled = runs(range(10), base + good + bad)
    assert report.remedy_lines("st", first, pooled)[2].endswith("| 3.5 ± 0.2 | 0.0 ± 0.0 | passed |")
    # part 2 needs the 1 % interval above zero: a gain that is +3 on half the seeds and −2 on the rest fails
    noisy = runs(range(10), base + [("incclip[a]", "mem1", lambda s: 0.03 if s < 5 else -0.02), good[1]])
    assert report.remedy_lines("st", first, noisy)[2].endswith("| **failed** |")
    # a first folder with fewer than 5 seeds is not judged
    assert report.remedy_lines("st", runs(range(4), base + good), {})[2].endswith(
        "| – | – | – | – | – | – | – | – |"
    )


def test_the_novelty_rule_sums_the_four_points_and_bounds_each_loss():
    def runs(gains, seeds=range(100, 103)):
        out = {}
        for stream in ("ci", "ii"):
            for mem in ("mem1", "mem3"):
                for label, g in (("er", 0.0), ("incclip", 0.0), ("incclip[novelty]", gains[stream, mem])):
                    cells = {s: _fake(label, s, 0.3 + g) for s in seeds}
                    for m in cells.values():
                        m["chunk_reports"] = [{"novelty": None}, {"novelty": 0.5}, {"novelty": 0.7}]
                    out[stream, label, mem] = cells
        return out

    level = {("ci", "mem1"): 0.0, ("ci", "mem3"): 0.0, ("ii", "mem1"): 0.02, ("ii", "mem3"): -0.01}
    lines = report.novelty_lines(runs(level))
    assert lines[2].startswith("| ci | 1 % | 0.60 (0.50-0.70) | 0.0 ± 0.0, n=3 | 0.0 ± 0.0, n=3 |")
    assert lines[-1] == "Sum of the mean differences: +1.0 points; the rule: passed."
    # a gain elsewhere does not buy a loss of more than a point at one point
    lossy = {**level, ("ii", "mem1"): 0.05, ("ii", "mem3"): -0.02}
    assert report.novelty_lines(runs(lossy))[-1].endswith("the rule: **failed**.")
    assert report.novelty_lines(runs(level, seeds=range(100, 102)))[-1].endswith("the rule: –.")
    assert report.novelty_lines({}) == []
    # a second knob passes only with a larger sum than the first's on the same cells
    both = runs(level)
    for (stream, label, mem), cells in list(both.items()):
        if label == "incclip[novelty]":
            bump = 0.01 if (stream, mem) == ("ii", "mem1") else 0.0
            both[stream, "incclip[novelty-heldout]", mem] = {
                s: _fake("incclip[novelty-heldout]", s, report.score(m, "avg") + bump)
                for s, m in cells.items()
            }
    better = report.novelty_lines(both, "incclip[novelty-heldout]", beat="incclip[novelty]")
    assert better[-1] == (
        "Sum of the mean differences: +2.0 points (incclip[novelty]: +1.0); the rule: passed."
    )
    same = {k: v for k, v in both.items()}
    same.update({k: both[k[0], "incclip[novelty]", k[2]] for k in both if k[1] == "incclip[novelty-heldout]"})
    lines = report.novelty_lines(same, "incclip[novelty-heldout]", beat="incclip[novelty]")
    assert lines[-1].endswith("the rule: **failed**.")  # level with the first knob is not better


def test_the_novelty_confirmation_pools_each_seeds_mean_of_four_points():
    def runs(gain_of_seed, seeds):
        out = {}
        for stream in ("ci", "ii"):
            for mem in ("mem1", "mem3"):
                out[stream, "incclip", mem] = {s: _fake("incclip", s, 0.3) for s in seeds}
                out[stream, "incclip[novelty]", mem] = {
                    s: _fake("incclip[novelty]", s, 0.3 + gain_of_seed(s, stream, mem)) for s in seeds
                }
        return out

    first, fresh = range(100, 103), range(103, 106)
    # every seed gains 1-2 points on the mean of its four points: interval above zero
    steady = lambda s, stream, mem: 0.01 + 0.002 * (s % 3) + (0.04 if stream == "ii" else -0.04)  # noqa: E731
    lines = report.novelty_pooled_lines([runs(steady, first), runs(steady, fresh)])
    assert lines[0] == "Per seed: 100: +1.2, 101: +1.4, 102: +1.0, 103: +1.2, 104: +1.4, 105: +1.0."
    assert lines[-1].startswith("Pooled over 6 seeds: 1.2 ± 0.2;") and lines[-1].endswith("passed.")
    # the same mean with one seed far off: the interval spans zero
    shaky = lambda s, stream, mem: 0.13 if s == 105 else -0.01  # noqa: E731
    assert report.novelty_pooled_lines([runs(shaky, first), runs(shaky, fresh)])[-1].endswith("**failed**.")
    # fewer than six seeds: not judged
    assert report.novelty_pooled_lines([runs(steady, first)])[-1].endswith(
        "the rule (interval above zero): –."
    )
    assert report.novelty_pooled_lines([{}]) == []


def test_is_done_reruns_results_of_another_budget_or_strategy_default(tmp_path, monkeypatch):
    monkeypatch.setattr(continual, "RESULTS", tmp_path)
    cell = continual.Cell("s", 0, "er", 0.01)
    assert not continual.is_done(cell, "t")
    cell.path("t").parent.mkdir(parents=True)
    cell.path("t").write_text(json.dumps({"cell": {"common": ["--epochs", "99"]}}))
    assert not continual.is_done(cell, "t")
    today = continual.expected_strategy(cell)
    cell.path("t").write_text(json.dumps({"cell": {"common": continual.COMMON}, "strategy_config": today}))
    assert continual.is_done(cell, "t")
    # a strategy default changed since the file was made: rerun
    stale = {**today, "kd_weight": today["kd_weight"] + 1}
    cell.path("t").write_text(json.dumps({"cell": {"common": continual.COMMON}, "strategy_config": stale}))
    assert not continual.is_done(cell, "t")
    # a knob added to Strategy after the file was written counts as its default there
    older = {k: v for k, v in today.items() if k != "kd_share_cutoff"}
    cell.path("t").write_text(json.dumps({"cell": {"common": continual.COMMON}, "strategy_config": older}))
    assert continual.is_done(cell, "t")
    # a variant's --set overrides are part of what it expects
    kd2 = continual.Cell("s", 0, "incclip", 0.01, variant="kd2", sets=("kd_weight=2",))
    assert continual.expected_strategy(kd2)["kd_weight"] == 2.0
    assert continual.expected_strategy(kd2)["kd_scope"] == "replay"


def test_knob_cells_pair_with_a_reference_of_their_own_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    here = continual.environment()
    there = {**here, "cpu": "another CPU"}
    # a knob made here on seeds 0-1; incclip in the sweep made elsewhere, and again here (a rerun)
    files = {
        ("v", "incclip[kd2]", 0): (0.40, here),
        ("v", "incclip[kd2]", 1): (0.50, here),
        ("v", "incclip", 0): (0.10, there),
        ("v", "incclip", 1): (0.10, there),
        ("v-rerun-x", "incclip", 0): (0.30, here),
        ("v-rerun-x", "incclip", 2): (0.30, here),
    }
    for (folder, label, seed), (value, env) in files.items():
        f = tmp_path / folder / "stream" / label / "mem1" / f"seed{seed}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({**_fake(label, seed, value), "env": env}))
    (tmp_path / "w-rerun-x").mkdir()  # another sweep's rerun is not in v's pool
    pool = report.reference_pool("v")
    assert len(pool) == 2
    knob = pool[0][("stream", "incclip[kd2]", "mem1")]
    ref = report.matched(knob, pool, ("stream", "incclip", "mem1"))
    # seed 0 pairs with the rerun made here, seed 1 has only the other machine's
    assert {s: report.score(m, "avg") for s, m in ref.items()} == {0: 0.30, 1: 0.10}
    assert report.cross_env(knob, ref) == 1 and report.n_note(knob, ref, 2) == "n=2, 1 across environments"
    lines = "\n".join(report._ablation_lines(pool[0], "stream", ["mem1"], pool))
    assert "| incclip[kd2] | 25.0 ± " in lines and "n=2, 1 across environments |" in lines


def test_into_names_another_folder_of_the_same_sweep(tmp_path):
    args = continual.argparse.Namespace(sweep="validation-rerun", into=None)
    assert continual.folder(args) == "validation-rerun"
    args.into = "validation-rerun-xeon"
    assert continual.folder(args) == "validation-rerun-xeon"
    args.into = "test"  # another sweep's folder would mix its cells with these
    with pytest.raises(SystemExit, match="validation-rerun-TAG"):
        continual.folder(args)


def test_compare_pools_the_seeds_of_several_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    here = continual.environment()
    for folder, seed, er, inc in (("a", 0, 0.20, 0.30), ("a", 1, 0.20, 0.25), ("b", 5, 0.40, 0.30)):
        for label, value in (("er", er), ("incclip", inc)):
            f = tmp_path / folder / "stream" / label / "mem3" / f"seed{seed}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({**_fake(label, seed, value), "env": here}))
    (line,) = report.compare(["a", "b"], "incclip", "er")
    m, h = report.mean_ci([0.10, 0.05, -0.10])
    assert line == f"stream 3 %: incclip − er {report.fmt(m, h)} (n=3; seeds 0, 1, 5)"
    assert report.compare(["a"], "incclip[kd2]", "er") == []
    monkeypatch.setattr(continual, "RESULTS", tmp_path)
    assert continual.main(["compare", "--folders", "a", "b", "--a", "incclip", "--b", "er"]) == 0
    assert "seeds 0, 1, 5" in capsys.readouterr().out


def test_a_warm_base_is_pretrained_once_while_its_seed_cells_run_at_once(tmp_path, monkeypatch):
    import threading
    import time
    from types import SimpleNamespace

    made, inside, overlaps = [], [], []

    def pretrain(cell, out, sweep, args):  # stands in for the base's `ctp experiment` run
        inside.append(out)
        time.sleep(0.2)  # long enough for the other cells to arrive while it runs
        if inside.count(out) > 1:  # recorded here, asserted in the test's own thread
            overlaps.append(out)
        (out / "checkpoint").mkdir(parents=True, exist_ok=True)
        (out / "checkpoint" / "meta.json").write_text("{}")
        made.append(out)
        inside.remove(out)

    monkeypatch.setattr(continual, "_pretrain_base", pretrain)
    args = SimpleNamespace(work=tmp_path)
    warm = continual.sweeps()["long-warm"].cells
    same_seed = [c for c in warm if c.seed == 0][:3]
    other = next(c for c in warm if c.seed == 1)
    threads = [
        threading.Thread(target=continual.ensure_base, args=(c, "long-warm", args))
        for c in [*same_seed, other]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps, "two pretrainings of one base at once"
    assert sorted(made) == sorted({continual.base_dir(c, args) for c in [same_seed[0], other]})
    assert all(c.pretrained == "base" and c.stream == continual.EMOJI_LONG_WARM for c in warm)


def test_the_kd_known_rule_needs_the_real_image_gain_and_no_synthetic_loss():
    def runs(stream, seeds, gain):
        out = {}
        for mem in ("mem1", "mem3"):
            out[stream, "incclip", mem] = {s: _fake("incclip", s, 0.4 + 0.01 * (s % 3)) for s in seeds}
            out[stream, "er", mem] = {s: _fake("er", s, 0.4) for s in seeds}
            out[stream, "incclip[known]", mem] = {
                s: _fake("incclip[known]", s, 0.4 + 0.01 * (s % 3) + gain[mem]) for s in seeds
            }
        return out

    real, synthetic = range(100, 105), range(100, 103)
    up = runs("emoji-ii-10-val", real, {"mem1": 0.025, "mem3": 0.0})
    level = runs("instance-incremental-small", synthetic, {"mem1": -0.005, "mem3": 0.0})
    lines = report.known_lines(up, level)
    assert lines[2].startswith("| emoji-ii-10-val | 1 % | 2.5 ± 0.0, n=5 | ≥ +2 |")
    assert lines[-1] == "The rule: passed."
    # short of +2 at 1 % on the real-image stream, or a synthetic loss over a point: failed
    short = runs("emoji-ii-10-val", real, {"mem1": 0.015, "mem3": 0.01})
    assert report.known_lines(short, level)[-1] == "The rule: **failed**."
    lossy = runs("instance-incremental-small", synthetic, {"mem1": 0.0, "mem3": -0.02})
    assert report.known_lines(up, lossy)[-1] == "The rule: **failed**."
    # until every point has its seeds, not judged
    assert report.known_lines(up, {})[-1] == "The rule: –."


def test_the_late_slice_is_judged_against_er_at_equal_storage():
    def runs(delay_over_equal):
        out = {}
        stream = "class-incremental-small"
        for mem, equal in report.EQUAL_STORAGE.items():
            out[stream, "er", mem] = {s: _fake("er", s, 0.30) for s in range(100, 103)}
            out[stream, "er", equal] = {s: _fake("er", s, 0.34 + 0.002 * (s % 3)) for s in range(100, 103)}
            out[stream, "er[delay]", mem] = {
                s: _fake("er[delay]", s, 0.34 + 0.002 * (s % 3) + delay_over_equal) for s in range(100, 103)
            }
        return out

    lines = report.storage_lines(runs(0.01))
    assert lines[2] == "| 1 % | 4.125 % | 5.2 ± 0.5 | 1.0 ± 0.0, n=3 | its storage |"
    assert report.storage_lines(runs(0.03))[2].endswith("| a candidate |")
    assert report.storage_lines({}) == []


def test_the_style_shift_diagnostic_reads_the_gap_shifted_against_unshifted():
    seeds = range(100, 105)
    plain, shifted = "instance-incremental-small", "instance-incremental-small-shift"

    def runs(lwf_gain_shifted):
        out = {}
        for stream, gain in ((plain, -0.10), (shifted, lwf_gain_shifted)):
            out[stream, "finetune", "nomem"] = {s: _fake("finetune", s, 0.3 + 0.01 * (s % 2)) for s in seeds}
            out[stream, "lwf", "nomem"] = {s: _fake("lwf", s, 0.3 + 0.01 * (s % 2) + gain) for s in seeds}
        for mem in ("mem1", "mem3"):
            out[shifted, "er", mem] = {s: _fake("er", s, 0.4) for s in seeds}
            out[shifted, "incclip", mem] = {s: _fake("incclip", s, 0.42 + 0.01 * (s % 2)) for s in seeds}
        return out

    refs = {}  # the unshifted er and incclip come from the validation-novelty folders
    for mem in ("mem1", "mem3"):
        refs[plain, "er", mem] = {s: _fake("er", s, 0.5) for s in seeds}
        refs[plain, "incclip", mem] = {s: _fake("incclip", s, 0.44) for s in seeds}
    lines = report.shift_lines(runs(0.05), refs)
    assert lines[2] == "| lwf − finetune | – | -10.0 ± 0.0 | 5.0 ± 0.0 | 15.0 ± 0.0 (n=5) | explains it |"
    assert lines[3].startswith("| incclip − er | 1 % | -6.0 ± 0.0 | 2.4 ± ")
    assert lines[-1].endswith("lwf − finetune): explains it.")
    # lwf still behind finetune under the shift, though less than before: undecided
    assert report.shift_lines(runs(-0.02), refs)[-1].endswith("): undecided.")
    # no better under the shift than without it: the shift does not explain the split
    assert report.shift_lines(runs(-0.12), refs)[-1].endswith("): does not explain it.")
    # until every seed of the main gap is in, not judged
    assert report.shift_lines({}, refs) == []


def test_forgetting_is_not_judged_where_finetune_forgets_nothing():
    def runs(finetune_forgetting):
        out = {}
        for label, mem in (("finetune", "nomem"), ("incclip", "mem1")):
            cells = {s: _fake(label, s, 0.4) for s in range(3)}
            for m in cells.values():
                m["eval"]["synthetic"]["forgetting"] = finetune_forgetting if label == "finetune" else -0.1
            out["stream", label, mem] = cells
        return out

    # finetune's accuracy only rose (negative forgetting): 0.6 x a negative number is no bar
    accept = report.acceptance_table(runs(-0.05), ["stream"])
    not_judged = "| -10.0, finetune forgets nothing: not judged | – |"
    assert "| forgetting ≤ 0.6 × finetune's (-3.0) " + not_judged in accept
    accept = report.acceptance_table(runs(0.05), ["stream"])
    assert "| forgetting ≤ 0.6 × finetune's (3.0) | -10.0 | met |" in accept


def test_a_screened_setting_goes_on_only_with_an_interval_above_zero_at_one_share():
    stream, seeds = "class-incremental-small", range(100, 106)

    def runs(gain1, gain3):
        return {
            (stream, "incclip[bft10]", mem): {
                s: _fake("incclip", s, 0.3 + gain + 0.01 * (s % 2)) for s in seeds
            }
            for mem, gain in (("mem1", gain1), ("mem3", gain3))
        }

    refs = {}
    for mem in ("mem1", "mem3"):
        refs[stream, "incclip", mem] = {s: _fake("incclip", s, 0.3) for s in seeds}
        refs[stream, "er", mem] = {s: _fake("er", s, 0.31) for s in seeds}
    lines = report.screen_rule_lines(runs(0.05, 0.0), refs)
    assert lines[2].startswith(
        "| class-incremental-small | 1 % | incclip[bft10] | 5.5 ± 0.6 (n=6) | 4.5 ± 0.6"
    )
    assert lines[-1] == "| | | **incclip[bft10]: goes on** | | |"
    # above zero at 1 %, but more than a point lost at 3 %: stops
    assert report.screen_rule_lines(runs(0.05, -0.03), refs)[-1].endswith("stops here** | | |")
    # losses at both shares: stops
    assert report.screen_rule_lines(runs(-0.05, -0.06), refs)[-1].endswith("stops here** | | |")
    # one seed only: nothing to judge
    one = {k: {100: v[100]} for k, v in runs(0.05, 0.0).items()}
    assert report.screen_rule_lines(one, refs) == []


def test_keepings_ceiling_reads_the_task_matrix_against_the_best_baseline(tmp_path):
    def cell(label, seed, R):
        m = _fake(label, seed, 0.0)
        last = [x for x in R[-1] if x is not None]
        m["eval"]["synthetic"].update(task_matrix=R, avg_accuracy=sum(last) / len(last))
        return m

    # incclip learns each chunk to 0.6 then forgets; its middle group peaks a chunk after its own
    R = [[0.6, None, None], [0.3, 0.6, None], [0.1, 0.7, 0.6]]
    runs = {
        ("s", "incclip", "mem1"): {s: cell("incclip", s, R) for s in range(3)},
        ("s", "er", "mem1"): {s: cell("er", s, [[0.5]]) for s in range(3)},
        ("s", "finetune", "nomem"): {s: cell("finetune", s, [[0.2]]) for s in range(3)},
    }
    m = runs["s", "incclip", "mem1"][0]
    assert report.score(m, "kept") == pytest.approx(0.6)  # R[j][j]: 0.6, 0.6, 0.6
    assert report.score(m, "peak") == pytest.approx((0.6 + 0.7 + 0.6) / 3)
    lines = report._ceiling_lines(runs, "s", ["mem1"])
    # final 46.7, kept 60.0, peak 63.3; against er's 50.0: −3.3, +10.0, +13.3
    assert lines[-2] == (
        "| 1 % | er | 46.7 ± 0.0 | 60.0 ± 0.0 | 63.3 ± 0.0 | -3.3 ± 0.0 | 10.0 ± 0.0 | 13.3 ± 0.0 | 3 |"
    )
    report.plot_ceiling(runs, "s", ["mem1"], tmp_path / "ceiling.png")
    assert (tmp_path / "ceiling.png").stat().st_size > 1000
    # one chunk group (instance-incremental: every class in the first chunk): nothing to bound
    ii = [[0.4, None], [0.5, None]]
    runs["s", "incclip", "mem1"] = {s: cell("incclip", s, ii) for s in range(3)}
    assert report._ceiling_lines(runs, "s", ["mem1"]) == []


@pytest.mark.parametrize(
    "gains, verdict",
    [((0.10, 0.11), "above"), ((0.00, 0.02), "below"), ((0.03, 0.09), "undecided")],
)
def test_the_kd_past_reading_sets_the_1_percent_interval_against_the_target(gains, verdict):
    stream, seeds = "class-incremental-small", range(100, 106)
    lo, hi = gains
    runs = {
        (stream, "incclip[kdpast]", "mem1"): {
            s: _fake("incclip", s, 0.3 + (lo if s % 2 else hi)) for s in seeds
        }
    }
    refs = {
        (stream, "er", "mem1"): {s: _fake("er", s, 0.3) for s in seeds},
        (stream, "incclip", "mem1"): {s: _fake("incclip", s, 0.31) for s in seeds},
    }
    lines = report.kdpast_lines(runs, refs)
    assert lines[2].startswith(f"| {stream} | 1 % | {100 * (lo + hi) / 2:.1f} ± ")
    assert lines[-1].startswith(f"At 1 % against er's +4.6: {verdict}")
