import math
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from ctp.continual import memory_items_from
from ctp.models import create_model
from ctp.strategies import get_strategy
from ctp.train import augment_replay, batch_bounds, preprocess_images, train_on_chunk


def _inputs(chunk, bundle):
    images = preprocess_images([s.image for s in chunk], [s.key for s in chunk], bundle.preprocess_val)
    return images, [s.text for s in chunk]


def _fit(model, tokenizer, images, texts, strategy="finetune", **kw):
    """train_on_chunk with a named strategy and no progress bar."""
    strat = strategy if not isinstance(strategy, str) else get_strategy(strategy)
    return train_on_chunk(
        model, images=images, texts=texts, tokenizer=tokenizer, strategy=strat, progress=False, **kw
    )


def _train(chunk, strategy="finetune", seed=0, **kw):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    images, texts = _inputs(chunk, bundle)
    res = train_on_chunk(
        bundle.model,
        images=images,
        texts=texts,
        tokenizer=bundle.tokenizer,
        strategy=get_strategy(strategy),
        seed=seed,
        progress=False,
        **kw,
    )
    return bundle, res


def test_deterministic_with_a_seed(tiny_chunks):
    a, ra = _train(tiny_chunks[0], epochs=1, batch_size=32)
    b, rb = _train(tiny_chunks[0], epochs=1, batch_size=32)
    assert ra.history == rb.history
    for k, v in a.model.state_dict().items():
        assert_close(b.model.state_dict()[k], v, msg=k)
    _, rc = _train(tiny_chunks[0], epochs=1, batch_size=32, seed=1)
    assert rc.history != ra.history


def test_loss_goes_down(tiny_chunks):
    _, res = _train(tiny_chunks[0], epochs=6, batch_size=32, lr=2e-3)
    first, last = sum(res.history[:3]) / 3, sum(res.history[-3:]) / 3
    assert last < first - 0.3, res.history
    assert res.steps == 6 * 3 and res.pairs == 6 * 80  # 80 pairs, 32 per step


def test_replay_kd_and_pseudo_negatives_enter_the_step(tiny_chunks):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    teacher = create_model("ctp-vit-micro-32", seed=0).model.eval()
    images, texts = _inputs(tiny_chunks[1], bundle)
    replay = memory_items_from(tiny_chunks[0][:20], chunk=0, chunk_id="c0")
    for it in replay:
        it.pseudo_texts = ["a purple nothing", "a green thing"]
    rimg = preprocess_images([it.image for it in replay], [it.key for it in replay], bundle.preprocess_val)
    res = train_on_chunk(
        bundle.model,
        images=images,
        texts=texts,
        tokenizer=bundle.tokenizer,
        strategy=get_strategy("incclip"),
        teacher=teacher,
        replay=replay,
        replay_images=rimg,
        epochs=1,
        batch_size=32,
        progress=False,
    )
    # half of each batch replayed, one pseudo text per replayed image
    assert res.negatives_per_step == 16
    assert res.steps == 5  # 80 new pairs / 16 new per step
    # teacher == student at the start, so KD starts near zero and grows as the student moves
    assert 0 <= res.loss_kd < res.loss_clip
    er = train_on_chunk(
        create_model("ctp-vit-micro-32", seed=0).model,
        images=images,
        texts=texts,
        tokenizer=bundle.tokenizer,
        strategy=get_strategy("er"),
        replay=replay,
        replay_images=rimg,
        epochs=1,
        batch_size=32,
        progress=False,
    )
    assert er.negatives_per_step == 0 and er.loss_kd == 0


def test_a_small_memory_is_replayed_once_per_batch_and_new_pairs_fill_the_rest(tiny_chunks):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    images, texts = _inputs(tiny_chunks[1], bundle)
    replay = memory_items_from(tiny_chunks[0][:5], chunk=0, chunk_id="c0")  # 5 < half of 32
    rimg = preprocess_images([it.image for it in replay], [it.key for it in replay], bundle.preprocess_val)
    res = train_on_chunk(
        bundle.model,
        images=images,
        texts=texts,
        tokenizer=bundle.tokenizer,
        strategy=get_strategy("er"),
        replay=replay,
        replay_images=rimg,
        epochs=1,
        batch_size=32,
        progress=False,
    )
    # 5 replayed rows (each memory pair once, no duplicate columns) + 27 new pairs per step
    assert res.steps == 3  # ceil(80 / 27)
    assert res.pairs == 80 + 3 * 5  # every new pair once, 5 replayed rows per step


def test_augment_replay_crops_and_flips_each_image_its_own_way():
    x = torch.randn(16, 3, 32, 32)
    flips = augment_replay(x, min_scale=1.0, generator=torch.Generator().manual_seed(0))
    # scale 1: each image is itself or its mirror image, and both happen
    same = [torch.allclose(a, b, atol=1e-5) for a, b in zip(flips, x, strict=True)]
    mirror = [torch.allclose(a, b.flip(-1), atol=1e-5) for a, b in zip(flips, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirror, strict=True)) and any(same) and any(mirror)
    a = augment_replay(x, min_scale=0.6, generator=torch.Generator().manual_seed(1))
    b = augment_replay(x, min_scale=0.6, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)  # seeded: the same crops again
    assert not torch.allclose(a, x, atol=1e-3) and not torch.allclose(a, x.flip(-1), atol=1e-3)
    # a crop zooms in: a smooth ramp along the width spans less of its range afterwards
    ramp = torch.linspace(-1, 1, 32).expand(4, 3, 32, 32).contiguous()
    z = augment_replay(ramp, min_scale=0.5, generator=torch.Generator().manual_seed(2))
    assert (z.amax(-1) - z.amin(-1)).mean() < (ramp.amax(-1) - ramp.amin(-1)).mean()


def _replay_run(chunks, strategy="er", *, replayed=20, **kw):
    """One chunk of ``strategy`` (with ``kw`` set) replaying ``replayed`` pairs of chunk 0:
    (ChunkResult, the trained weights flattened)."""
    bundle = create_model("ctp-vit-micro-32", seed=0)
    images, texts = _inputs(chunks[1], bundle)
    replay = memory_items_from(chunks[0][:replayed], chunk=0, chunk_id="c0")
    rimg = (
        preprocess_images([it.image for it in replay], [it.key for it in replay], bundle.preprocess_val)
        if replay
        else None
    )
    res = _fit(
        bundle.model,
        bundle.tokenizer,
        images,
        texts,
        get_strategy(strategy, **kw),
        replay=replay,
        replay_images=rimg,
        batch_size=32,
    )
    return res, torch.cat([p.detach().flatten() for p in bundle.model.parameters()])


def test_replay_crop_changes_the_replayed_rows_only(tiny_chunks):
    plain, w_plain = _replay_run(tiny_chunks)
    crop, w_crop = _replay_run(tiny_chunks, replay_crop=0.6)
    assert crop.steps == plain.steps and crop.pairs == plain.pairs  # same batches, other pixels
    assert not torch.allclose(w_plain, w_crop)
    with pytest.raises(ValueError, match="replay_crop"):
        _replay_run(tiny_chunks, replay_crop=0.0)


def test_asymmetric_contrast_changes_replay_steps_and_nothing_without_replay(tiny_chunks):
    plain, w_plain = _replay_run(tiny_chunks)
    ace, w_ace = _replay_run(tiny_chunks, contrast="asymmetric")
    assert ace.steps == plain.steps and ace.pairs == plain.pairs
    assert not torch.allclose(w_plain, w_ace)
    # nothing replayed: every row is new and the loss is CLIP's own, bit for bit
    _, w_alone = _replay_run(tiny_chunks, replayed=0)
    _, w_alone_ace = _replay_run(tiny_chunks, replayed=0, contrast="asymmetric")
    assert torch.equal(w_alone, w_alone_ace)
    with pytest.raises(ValueError, match="contrast"):
        _replay_run(tiny_chunks, contrast="sideways")


def test_kd_scopes_distill_different_similarities(tiny_chunks):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    images, texts = _inputs(tiny_chunks[1], bundle)
    replay = memory_items_from(tiny_chunks[0][:20], chunk=0, chunk_id="c0")
    rimg = preprocess_images([it.image for it in replay], [it.key for it in replay], bundle.preprocess_val)
    teacher = create_model("ctp-vit-micro-32", seed=1).model.eval()  # another model: KD > 0 at once
    kd = {}
    for scope in ("batch", "replay", "anchor"):
        res = train_on_chunk(
            create_model("ctp-vit-micro-32", seed=0).model,
            images=images,
            texts=texts,
            tokenizer=bundle.tokenizer,
            strategy=get_strategy("er_kd", kd_scope=scope),
            teacher=teacher,
            replay=replay,
            replay_images=rimg,
            epochs=1,
            batch_size=32,
            progress=False,
        )
        kd[scope] = res.loss_kd
        assert res.loss_kd > 0 and math.isfinite(res.loss)
    assert len({round(v, 6) for v in kd.values()}) == 3  # three different KD targets
    with pytest.raises(ValueError, match="kd_scope"):
        train_on_chunk(
            bundle.model,
            images=images,
            texts=texts,
            tokenizer=bundle.tokenizer,
            strategy=get_strategy("er_kd", kd_scope="everything"),
            teacher=teacher,
            replay=replay,
            replay_images=rimg,
            progress=False,
        )


def test_batch_bounds_never_leave_a_lone_last_row():
    assert batch_bounds(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert batch_bounds(129, 64, min_last=2) == [(0, 64), (64, 129)]  # the lone row joins
    assert batch_bounds(129, 64, min_last=1) == [(0, 64), (64, 128), (128, 129)]
    assert batch_bounds(1, 64, min_last=2) == []  # one pair alone: nothing to contrast
    assert batch_bounds(0, 64) == []


def test_a_chunk_one_pair_over_the_batch_trains_a_batchnorm_tower(tiny_chunks):
    """ModifiedResNet (the default preset) has BatchNorm, which cannot train on a batch of one:
    a chunk of 33 pairs at batch 32 once crashed joint training on emoji-ci-10, seed 0."""
    bundle = create_model("ctp-rn-tiny-32", seed=0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bundle.model.modules())
    chunk = tiny_chunks[0][:33]
    images, texts = _inputs(chunk, bundle)
    res = _fit(bundle.model, bundle.tokenizer, images, texts, batch_size=32)
    assert res.steps == 1 and res.pairs == 33 and math.isfinite(res.loss)
    one = _fit(bundle.model, bundle.tokenizer, images[:1], texts[:1])
    assert one.steps == 0 and one.pairs == 0  # a lone pair is skipped, not a crash


def test_replay_needs_images(tiny_chunks):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    images, texts = _inputs(tiny_chunks[0], bundle)
    replay = memory_items_from(tiny_chunks[0][:4], chunk=0, chunk_id="c0")
    with pytest.raises(ValueError, match="replay_images"):
        train_on_chunk(
            bundle.model,
            images=images,
            texts=texts,
            tokenizer=bundle.tokenizer,
            strategy=get_strategy("er"),
            replay=replay,
            progress=False,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, images, texts, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bundle = create_model("ctp-vit-micro-32", seed=0)
        res = _fit(bundle.model, bundle.tokenizer, images, texts, epochs=1, batch_size=16)
        out[rank] = ({k: v.clone() for k, v in bundle.model.state_dict().items()}, res.steps, res.pairs)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tiny_chunks):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    images, texts = _inputs(tiny_chunks[0], bundle)
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), images, texts, out), nprocs=2, join=True)
    (s0, steps0, pairs0), (s1, steps1, pairs1) = out[0], out[1]
    assert steps0 == steps1 == 3  # 80 pairs / 2 ranks / 16 per step
    assert pairs0 == pairs1 == 80
    for k in s0:
        assert_close(s0[k], s1[k], msg=k)  # DDP averaged the gradients: replicas identical
    assert not torch.equal(s0["text_projection"], bundle.model.state_dict()["text_projection"])


def test_random_is_untouched_by_seeded_model_creation():
    state = random.getstate()
    torch_state = torch.random.get_rng_state()
    create_model("ctp-vit-micro-32", seed=5)
    assert random.getstate() == state
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_known_rows_must_mark_every_pair(tiny_chunks):
    bundle = create_model("ctp-vit-micro-32", seed=0)
    images, texts = _inputs(tiny_chunks[0], bundle)
    with pytest.raises(ValueError, match="known_rows"):
        _fit(
            bundle.model,
            bundle.tokenizer,
            images,
            texts,
            strategy="incclip",
            known_rows=torch.ones(3, dtype=torch.bool),
        )
