import math

import pytest
import torch

from ctp.continual import ContinualLearner, TrainConfig, merge_weights
from ctp.memory import InProcessMemory
from ctp.models import create_model
from ctp.pseudo_texts import TokenEditGenerator
from ctp.strategies import STRATEGIES, get_strategy


def _learner(strategy, memory_size=40, strategy_kw=None, **cfg):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    strat = get_strategy(strategy, **(strategy_kw or {}))
    return ContinualLearner(
        bundle=bundle,
        strategy=strat,
        memory=InProcessMemory(max_items=memory_size, policy="class_balanced"),
        generator=TokenEditGenerator() if strat.pseudo_texts else None,
        config=TrainConfig(epochs=1, batch_size=32, progress=False, pseudo_margin=-1.0, **cfg),
    )


def test_incclip_over_two_chunks(tiny_chunks):
    # a memory of 40 after an 80-pair chunk holds 50 % of the stream: a cutoff of 1.0 keeps KD on
    learner = _learner("incclip", strategy_kw={"kd_share_cutoff": 1.0})
    r0 = learner.learn_chunk(tiny_chunks[0])
    assert r0.train.loss_kd == 0  # nothing learned before chunk 0: no teacher
    assert r0.memory_items == 40 and r0.pseudo == {}
    labels0 = {s.label for s in tiny_chunks[0]}
    assert set(learner.memory.label_counts()) == labels0
    r1 = learner.learn_chunk(tiny_chunks[1])
    # pseudo texts were made for the memory snapshot with the pre-chunk model, then replayed
    assert r1.pseudo["items"] == 40 and r1.pseudo["kept"] > 0
    assert r1.train.negatives_per_step > 0
    assert r1.train.loss_kd > 0 and r1.kd_weight == pytest.approx(0.5) and r1.memory_share == 0.5
    cached = [it for it in learner.memory.get(learner.memory.keys()) if it.chunk == 0]
    assert cached and all(it.pseudo_version == 1 for it in cached)
    # class-balanced memory now holds both chunks' classes
    assert set(learner.memory.label_counts()) == labels0 | {s.label for s in tiny_chunks[1]}


def test_incclip_default_has_no_kd_while_memory_holds_a_large_share(tiny_chunks):
    learner = _learner("incclip")  # kd_rule=cutoff at 10 %; the memory holds 50 % here
    learner.learn_chunk(tiny_chunks[0])
    r1 = learner.learn_chunk(tiny_chunks[1])
    assert r1.kd_weight == 0 and r1.train.loss_kd == 0
    assert r1.pseudo["kept"] > 0 and r1.train.negatives_per_step > 0  # pseudo texts stay on


@pytest.mark.parametrize("cutoff, on", [(None, True), (1.0, True), (0.1, False)])
def test_pt_share_cutoff_drops_pseudo_texts_while_memory_holds_a_large_share(tiny_chunks, cutoff, on):
    learner = _learner("incclip", strategy_kw={"pt_share_cutoff": cutoff})  # memory share 50 %
    learner.learn_chunk(tiny_chunks[0])
    r1 = learner.learn_chunk(tiny_chunks[1])
    assert r1.memory_share == 0.5
    assert (r1.train.negatives_per_step > 0) is on and bool(r1.pseudo) is on
    assert learner.strategy.pseudo_texts  # switched off for that chunk only


def test_refresh_schedule_amortises_generation(tiny_chunks):
    learner = _learner("incclip", refresh_every=5)
    learner.learn_chunk(tiny_chunks[0])
    r1 = learner.learn_chunk(tiny_chunks[1])
    r2 = learner.learn_chunk(tiny_chunks[1][:40])
    assert r1.pseudo["items"] == 40
    # at chunk 2 only the items that entered memory after chunk 0 have no texts yet
    fresh = r2.pseudo.get("items", 0)
    assert 0 < fresh < 40


@pytest.mark.parametrize("name", ["finetune", "lwf", "joint"])
def test_strategies_without_memory_leave_it_empty(tiny_chunks, name):
    learner = _learner(name)
    learner.learn_chunk(tiny_chunks[0])
    r = learner.learn_chunk(tiny_chunks[1])
    assert len(learner.memory) == 0
    if name == "joint":  # trains on both chunks at chunk 1
        assert r.train.steps == 5  # 160 pairs / 32
    if name == "lwf":
        assert r.train.loss_kd > 0


def test_all_named_strategies_exist():
    assert {"finetune", "er", "lwf", "incclip", "joint"} <= set(STRATEGIES)
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("ewc")


def test_merge_weights_interpolates():
    a = create_model("ctp-vit-micro-32", seed=0).model
    b = create_model("ctp-vit-micro-32", seed=1).model
    expected = 0.25 * a.state_dict()["text_projection"] + 0.75 * b.state_dict()["text_projection"]
    merge_weights(a, b, alpha=0.25)
    torch.testing.assert_close(a.state_dict()["text_projection"], expected)


def test_memory_strategy_requires_memory():
    with pytest.raises(ValueError, match="memory"):
        ContinualLearner(
            bundle=create_model("ctp-vit-micro-32"),
            strategy=get_strategy("er"),
            memory=None,
            generator=None,
            config=TrainConfig(),
        )


def test_kd_weight_rules():
    from dataclasses import replace

    from ctp.continual import kd_weight_for_chunk

    inc = get_strategy("incclip_constkd", kd_weight=2.0)
    assert inc.kd_rule == "constant"
    assert kd_weight_for_chunk(inc, memory_items=10, seen=1000) == (2.0, 0.01)
    assert get_strategy("incclip").kd_rule == "cutoff"  # the default (docs/results.md)
    share = replace(inc, kd_rule="share")
    w, rho = kd_weight_for_chunk(share, memory_items=10, seen=1000)
    assert rho == 0.01 and w == pytest.approx(2.0 * 0.99)
    assert kd_weight_for_chunk(share, memory_items=400, seen=400) == (0.0, 1.0)  # memory holds the whole past
    assert kd_weight_for_chunk(share, memory_items=0, seen=0) == (2.0, None)  # pretrained base, empty memory
    assert kd_weight_for_chunk(get_strategy("er"), memory_items=10, seen=100) == (0.0, 0.1)
    cutoff = replace(inc, kd_rule="cutoff", kd_share_cutoff=0.1)
    assert kd_weight_for_chunk(cutoff, memory_items=10, seen=1000)[0] == pytest.approx(2.0 * 0.9)
    assert kd_weight_for_chunk(cutoff, memory_items=100, seen=1000)[0] == 0.0  # at the cutoff: no KD
    assert kd_weight_for_chunk(cutoff, memory_items=300, seen=1000)[0] == 0.0  # above: still none
    assert kd_weight_for_chunk(cutoff, memory_items=0, seen=0) == (2.0, None)
    with pytest.raises(ValueError, match="kd_share_cutoff"):
        kd_weight_for_chunk(replace(cutoff, kd_share_cutoff=0.0), memory_items=1, seen=2)
    with pytest.raises(ValueError, match="kd_rule"):
        kd_weight_for_chunk(replace(inc, kd_rule="sometimes"), memory_items=1, seen=2)


def test_share_rule_and_feature_kd_in_the_learner(tiny_chunks):
    from dataclasses import replace

    learner = _learner("incclip", memory_size=20)
    learner.strategy = replace(learner.strategy, kd_rule="share", kd_gate="confidence", feature_kd_weight=1.0)
    learner.learn_chunk(tiny_chunks[0])
    r1 = learner.learn_chunk(tiny_chunks[1])
    seen = len(tiny_chunks[0])
    assert r1.memory_share == pytest.approx(20 / seen)
    assert r1.kd_weight == pytest.approx(1.0 - 20 / seen)
    assert r1.train.loss_kd > 0


class _OneHot(torch.nn.Module):
    """Images and 'tokens' are the same one-hot codes: pair i matches caption i exactly."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(100.0).log())

    def encode_image(self, x):
        return x.flatten(1).float()

    def encode_text(self, t):
        return t.float()


def _codes(n):
    return torch.eye(n)


def test_caption_fit_is_one_for_matched_pairs_and_chance_for_unrelated_ones():
    from ctp.continual import caption_fit

    model, codes = _OneHot(), _codes(32)
    gen = torch.Generator().manual_seed(0)
    assert caption_fit(model, codes, codes, block=8, device="cpu", generator=gen) > 0.99
    # every caption equally far from every image: the fit is chance, 1 / block
    flat = torch.ones(32, 32)
    assert caption_fit(model, codes, flat, block=8, device="cpu", generator=gen) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="block"):
        caption_fit(model, codes, codes, block=1, device="cpu", generator=gen)


def test_chunk_novelty_is_zero_for_pairs_fit_as_well_as_memory_and_one_for_unfit():
    from ctp.continual import chunk_novelty

    model, codes = _OneHot(), _codes(32)
    kw = dict(replay_images=codes[:16], replay_tokens=codes[:16], block=64, device="cpu", seed=0)
    assert chunk_novelty(model, images=codes[16:], tokens=codes[16:], **kw) == pytest.approx(0, abs=1e-3)
    # new captions the model cannot tell apart: fit at chance (1/16) against memory's ~1
    nu = chunk_novelty(model, images=codes[16:], tokens=torch.ones(16, 32), **kw)
    assert nu == pytest.approx(1 - 1 / 16, abs=1e-3)
    assert chunk_novelty(model, images=codes[:1], tokens=codes[:1], **kw) is None  # one new pair


def test_hold_out_takes_a_seeded_capped_share_for_heldout_novelty_only():
    from ctp.continual import hold_out

    held = get_strategy("incclip", kd_novelty=True, novelty_reference="heldout")
    assert len(hold_out(400, held, seed=1)) == 50  # 1/8
    assert hold_out(400, held, seed=1) == hold_out(400, held, seed=1) != hold_out(400, held, seed=2)
    assert len(hold_out(4000, held, seed=1)) == 128  # the cap
    assert (
        len(
            hold_out(
                10,
                get_strategy("incclip", kd_novelty=True, novelty_reference="heldout", novelty_heldout=0.9),
                seed=1,
            )
        )
        == 8
    )  # two left to train
    assert hold_out(8, held, seed=1) == []  # one pair is no reference
    assert hold_out(400, get_strategy("incclip", kd_novelty=True), seed=1) == []  # memory reference
    assert hold_out(400, get_strategy("er"), seed=1) == []
    # plain replay with the held-out slice (the delay's control) holds out as much
    assert len(hold_out(400, get_strategy("er", novelty_reference="heldout"), seed=1)) == 50
    with pytest.raises(ValueError, match="novelty_reference"):
        _learner("incclip", strategy_kw={"novelty_reference": "future"})


def test_chunk_novelty_averages_several_orders_of_a_small_reference():
    from ctp.continual import chunk_novelty

    model, codes = _OneHot(), _codes(32)
    kw = dict(images=codes[8:], tokens=codes[8:], block=64, device="cpu", seed=0)
    # the reference's fit from one order or from eight: both ~1 for pairs the model matches
    for draws in (1, 8):
        nu = chunk_novelty(
            model, replay_images=codes[:8], replay_tokens=codes[:8], reference_draws=draws, **kw
        )
        assert nu == pytest.approx(0, abs=1e-3)
    half = torch.cat([codes[:4], torch.ones(4, 32)])  # half the reference's captions unmatched
    nu = chunk_novelty(model, replay_images=codes[:8], replay_tokens=half, reference_draws=8, **kw)
    assert nu == 0  # the new pairs fit better than the reference: clipped at 0


def test_heldout_novelty_trains_the_previous_chunks_slice_with_the_next(tiny_chunks):
    kw = {"kd_share_cutoff": 1.0, "kd_novelty": True, "novelty_reference": "heldout", "novelty_heldout": 0.25}
    learner = _learner("incclip", strategy_kw=kw)
    n0, n1 = len(tiny_chunks[0]), len(tiny_chunks[1])
    r0 = learner.learn_chunk(tiny_chunks[0], chunk_id="c0")
    k0 = round(n0 * 0.25)
    assert r0.heldout == k0 and r0.novelty is None  # no teacher before the first chunk
    held0 = {s.key for s in learner._heldout}
    assert len(held0) == k0
    # held-out pairs were not offered to the memory with their own chunk
    assert not {k.split("/", 1)[1] for k in learner.memory.keys()} & held0
    r1 = learner.learn_chunk(tiny_chunks[1], chunk_id="c1")
    assert r1.novelty is not None and 0 <= r1.novelty <= 1
    assert r1.memory_share == pytest.approx(40 / (n0 - k0))  # only trained pairs were offered
    assert r1.kd_weight == pytest.approx((1 - r1.memory_share) * r1.novelty)  # cutoff 1.0, times nu
    # chunk 1 trained on its own pairs less its held-out slice, plus chunk 0's slice: each new
    # pair once an epoch, beside the replayed rows
    new_rows = r1.train.pairs - r1.train.steps * min(16, 40)  # 16 replayed rows a batch of 32
    assert new_rows == n1 - r1.heldout + k0
    # chunk 0's slice was offered once trained, under its own chunk's id
    assert learner.memory.seen() == n0 - k0 + n1 - r1.heldout + k0


def test_kd_novelty_scales_the_chunks_kd_weight(tiny_chunks):
    learner = _learner("incclip", strategy_kw={"kd_share_cutoff": 1.0, "kd_novelty": True})
    learner.learn_chunk(tiny_chunks[0])
    r1 = learner.learn_chunk(tiny_chunks[1])
    assert r1.novelty is not None and 0 <= r1.novelty <= 1
    assert r1.kd_weight == pytest.approx(0.5 * r1.novelty)  # the cutoff's 0.5 times nu
    plain = _learner("incclip", strategy_kw={"kd_share_cutoff": 1.0})
    plain.learn_chunk(tiny_chunks[0])
    assert plain.learn_chunk(tiny_chunks[1]).novelty is None  # measured only when asked for


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_kd_known_trains_a_chunk_of_new_classes_exactly_as_without_it(tiny_chunks):
    # the tiny stream is class-incremental: chunk 1 brings labels chunk 0 did not have
    assert not {s.label for s in tiny_chunks[0]} & {s.label for s in tiny_chunks[1]}
    runs = {}
    for known in (False, True):
        learner = _learner("incclip", strategy_kw={"kd_share_cutoff": 1.0, "kd_known": known})
        learner.learn_chunk(tiny_chunks[0], chunk_id="c0")
        runs[known] = (learner, learner.learn_chunk(tiny_chunks[1], chunk_id="c1"))
    (plain, r_plain), (gated, r_gated) = runs[False], runs[True]
    assert r_plain.known is None and r_gated.known == 0.0
    assert r_gated.train.loss_kd > 0 and r_gated.train.history == r_plain.train.history
    assert _states_equal(plain.bundle.model, gated.bundle.model)


def test_kd_known_distils_the_new_pairs_of_known_classes(tiny_chunks):
    from dataclasses import replace

    # chunk 0's classes again, under new keys (the memory offers each pair once), half unlabelled
    again = [
        replace(s, key=f"again-{s.key}", label=s.label if i % 2 else None)
        for i, s in enumerate(tiny_chunks[0])
    ]
    runs = {}
    for known in (False, True):
        learner = _learner("incclip", strategy_kw={"kd_share_cutoff": 1.0, "kd_known": known})
        learner.learn_chunk(tiny_chunks[0], chunk_id="c0")
        runs[known] = (learner, learner.learn_chunk(again, chunk_id="c1"))
    (plain, r_plain), (gated, r_gated) = runs[False], runs[True]
    assert r_gated.known == pytest.approx(sum(s.label is not None for s in again) / len(again))
    # more rows in the KD term, a different model; and the loss stays finite
    assert r_gated.train.history != r_plain.train.history
    assert math.isfinite(r_gated.train.loss) and r_gated.train.loss_kd > 0
    assert not _states_equal(plain.bundle.model, gated.bundle.model)


def test_incclip_known_is_incclip_with_kd_known():
    from dataclasses import replace

    named = get_strategy("incclip_known")
    assert named.kd_known and not get_strategy("incclip").kd_known
    assert named == replace(get_strategy("incclip", kd_known=True), name="incclip_known")


def test_balanced_fine_tuning_trains_on_the_memory_after_the_chunk(tiny_chunks):
    runs = {}
    for epochs in (0, 3):
        learner = _learner("er", strategy_kw={"balance_epochs": epochs}, replay_pool=32)
        reports = [learner.learn_chunk(c, chunk_id=f"c{i}") for i, c in enumerate(tiny_chunks[:2])]
        runs[epochs] = (learner, reports)
    (plain, r_plain), (bal, r_bal) = runs[0], runs[3]
    assert all(r.balance is None for r in r_plain)
    # the chunk's own update is the same; then 3 passes over the memory (replay_pool caps it at 32)
    assert r_bal[0].train.history == r_plain[0].train.history
    assert r_bal[0].balance.pairs == 3 * 32 and r_bal[0].balance.steps == 3
    assert math.isfinite(r_bal[0].balance.loss)
    assert not _states_equal(plain.bundle.model, bal.bundle.model)
    d = r_bal[1].to_dict()
    assert d["balance"]["pairs"] == 96 and "history" not in d["balance"] and "history" not in d["train"]
    assert r_plain[1].to_dict()["balance"] is None


def test_balanced_fine_tuning_needs_a_positive_learning_rate(tiny_chunks):
    learner = _learner("er", strategy_kw={"balance_epochs": 1, "balance_lr": 0})
    with pytest.raises(ValueError, match="balance_lr"):
        learner.learn_chunk(tiny_chunks[0])


def test_fit_gain_is_zero_against_itself_and_positive_over_a_model_that_fits_worse():
    from ctp.continual import fit_gain

    class _Blurred(_OneHot):  # every image nearly the same vector: a worse fit of the same pairs
        def encode_image(self, x):
            return x.flatten(1).float() * 0.02 + 1

    codes = _codes(32)
    kw = dict(images=codes, tokens=codes, block=8, device="cpu", seed=3)
    assert fit_gain(_OneHot(), _OneHot(), **kw) == pytest.approx(0.0, abs=1e-7)
    assert fit_gain(_OneHot(), _Blurred(), **kw) > 0.05
    assert fit_gain(_Blurred(), _OneHot(), **kw) == pytest.approx(-fit_gain(_OneHot(), _Blurred(), **kw))
    assert fit_gain(_OneHot(), _OneHot(), **{**kw, "images": codes[:1], "tokens": codes[:1]}) is None


@pytest.mark.parametrize("threshold, on", [(1.0, True), (-1.0, False)])
def test_kd_headroom_gates_kd_known_per_chunk(tiny_chunks, threshold, on):
    from dataclasses import replace

    # chunk 0's classes again under new keys: a chunk of known classes, where kd_known acts
    again = [replace(s, key=f"again-{s.key}") for s in tiny_chunks[0]]
    runs = {}
    for name, kw in (("gated", {"kd_headroom": threshold}), ("known", {}), ("plain", {"kd_known": False})):
        learner = _learner("incclip", strategy_kw={"kd_share_cutoff": 1.0, "kd_known": True, **kw})
        r0 = learner.learn_chunk(tiny_chunks[0], chunk_id="c0")
        runs[name] = (learner, r0, learner.learn_chunk(again, chunk_id="c1"))
    gated, r0, r1 = runs["gated"]
    assert r0.headroom is None  # nothing before the first chunk to compare with
    assert isinstance(r1.headroom, float) and -1 < r1.headroom < 1
    assert runs["known"][2].headroom is None  # not measured without the knob
    same = runs["known"] if on else runs["plain"]  # g < threshold: kd_known on; else off
    assert (r1.known is not None) is on
    assert r1.train.history == same[2].train.history
    assert _states_equal(gated.bundle.model, same[0].bundle.model)


def test_text_lr_zero_freezes_the_text_tower_after_the_first_chunk(tiny_chunks):
    learner = _learner("er", strategy_kw={"text_lr": 0.0})
    model = learner.bundle.model

    def snapshot():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    before0 = snapshot()
    learner.learn_chunk(tiny_chunks[0], chunk_id="c0")  # nothing learned before: the text tower trains
    after0 = snapshot()
    learner.learn_chunk(tiny_chunks[1], chunk_id="c1")
    after1 = snapshot()
    text = [n for n in after1 if not n.startswith("visual") and n != "logit_scale"]
    assert "token_embedding.weight" in text and "text_projection" in text
    assert any(not torch.equal(before0[n], after0[n]) for n in text)
    assert all(torch.equal(after0[n], after1[n]) for n in text)
    assert any(not torch.equal(after0[n], after1[n]) for n in after1 if n.startswith("visual"))


def test_param_groups_scale_the_text_tower_only():
    from ctp.train import param_groups

    model = create_model("ctp-vit-micro-32", seed=0).model
    names = {id(p): n for n, p in model.named_parameters()}
    plain = param_groups(model, 0.1)
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0]  # decay, no decay: as open_clip groups them
    for g in param_groups(model, 0.1, text_lr_scale=0.1):
        tower = {not names[id(p)].startswith("visual") and names[id(p)] != "logit_scale" for p in g["params"]}
        assert tower == {g["lr_scale"] == 0.1}


def _off_and_on(tiny_chunks, knob, off, on, memory_size=40, **strategy_kw):
    """incclip over two chunks with ``knob`` at ``off`` and at ``on``, all else alike: per setting
    (learner, report of chunk 0, report of chunk 1)."""
    runs = []
    for value in (off, on):
        learner = _learner("incclip", memory_size=memory_size, strategy_kw={**strategy_kw, knob: value})
        r0 = learner.learn_chunk(tiny_chunks[0], chunk_id="c0")
        runs.append((learner, r0, learner.learn_chunk(tiny_chunks[1], chunk_id="c1")))
    return runs


@pytest.mark.parametrize(
    "knob",
    [
        "kd_views",  # views of the replayed images against every text of the batch
        "kd_names",  # every image's softmax over the class names the teacher knows
    ],
)
def test_kd_views_and_kd_names_add_a_distillation_term_on_the_same_batches(tiny_chunks, knob):
    # a cutoff of 1.0 keeps KD on at a memory share of 50 %
    (plain, p0, p1), (on, k0, k1) = _off_and_on(tiny_chunks, knob, 0.0, 1.0, kd_share_cutoff=1.0)
    assert len({s.label for s in tiny_chunks[0]}) >= 2  # the teacher knows two names or more
    # no teacher before the first chunk: the same update bit for bit
    assert k0.train.history == p0.train.history
    # then one more KD term, on the same batches (same pairs, same negatives)
    assert k1.train.pairs == p1.train.pairs and k1.train.negatives_per_step == p1.train.negatives_per_step
    # a different model, a larger KD loss, still finite
    assert k1.train.history != p1.train.history and math.isfinite(k1.train.loss)
    assert k1.train.loss_kd > p1.train.loss_kd > 0
    assert not _states_equal(plain.bundle.model, on.bundle.model)


@pytest.mark.parametrize("knob", ["kd_views", "kd_names"])
def test_kd_views_and_kd_names_follow_the_kd_rule(tiny_chunks, knob):
    (_, _, off), (_, _, on) = _off_and_on(tiny_chunks, knob, 0.0, 1.0)  # cutoff 10 %, share 50 %: no KD
    assert on.kd_weight == 0 and on.train.history == off.train.history


def test_kd_past_draws_the_kd_rows_from_every_pair_trained_so_far(tiny_chunks):
    # a cutoff of 1.0 keeps KD on at a memory share of 50 %; a memory of 8 pairs, a past of 80
    (plain, p0, p1), (oracle, o0, o1) = _off_and_on(
        tiny_chunks, "kd_past", False, True, memory_size=8, kd_share_cutoff=1.0
    )
    # no teacher before the first chunk: the same update bit for bit, and the past is kept
    assert o0.train.history == p0.train.history
    assert len(oracle._past) == len(tiny_chunks[0]) + len(tiny_chunks[1]) and not plain._past
    # then the KD term sees 16 past pairs a step (a full replay share of 32) beside the batch
    assert o1.train.steps == p1.train.steps
    assert o1.train.pairs == p1.train.pairs + 16 * o1.train.steps
    assert o1.train.history != p1.train.history and o1.train.loss_kd > 0
    assert not _states_equal(plain.bundle.model, oracle.bundle.model)
    # replay and pseudo texts are untouched: the same negatives a step
    assert o1.train.negatives_per_step == p1.train.negatives_per_step


def test_kd_past_takes_the_replay_scope_only(tiny_chunks):
    learner = _learner("incclip", strategy_kw={"kd_share_cutoff": 1.0, "kd_past": True, "kd_views": 1.0})
    with pytest.raises(ValueError, match="kd_past"):  # refused before anything trains
        learner.learn_chunk(tiny_chunks[0], chunk_id="c0")
