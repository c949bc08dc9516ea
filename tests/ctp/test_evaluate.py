import io
import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import ctp.evaluate as evaluate_mod
from ctp.data import ClassificationSet, RetrievalSet
from ctp.evaluate import (
    ClassificationResult,
    classification_metrics,
    embed_images,
    embed_texts,
    evaluate_classification,
    evaluate_retrieval,
    retrieval_metrics,
    zero_shot_classifier,
)

# ---------------------------------------------------------------- helpers


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def solid_png(index: int, size: int = 8) -> bytes:
    """A solid image whose red channel encodes ``index`` (read back by StubCLIP)."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[..., 0] = 32 * index
    array[..., 1] = 7 * index + 3  # vary the other channels too; StubCLIP ignores them
    return png(array)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # [3, H, W]


def stub_tokenizer(texts: list[str]) -> torch.Tensor:
    """Token 0 = the N of the first "thingN" in the text."""
    return torch.tensor([[int(re.search(r"thing(\d)", t).group(1)), 0] for t in texts])


class StubCLIP(nn.Module):
    """Image of index n and any text naming "thingn" both embed to one-hot e_n: a perfect model."""

    dim = 8

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.seen_training: list[bool] = []

    def encode_image(self, images):  # [B, 3, H, W]
        self.seen_training.append(self.training)
        index = (images[:, 0, 0, 0] * 255 / 32).round().long()
        return 3.0 * F.one_hot(index, self.dim).float()  # unnormalised on purpose

    def encode_text(self, tokens):  # [B, ctx]
        self.seen_training.append(self.training)
        return 2.0 * F.one_hot(tokens[:, 0], self.dim).float()


def tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


def random_images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, size=(20 + i, 24, 3))) for i in range(n)]


# ---------------------------------------------------------------- classification_metrics


def test_classification_metrics_identity():
    metrics = classification_metrics(torch.eye(3), torch.tensor([0, 1, 2]))
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_classification_metrics_unbalanced_mean_per_class_recall():
    # Classes 0,0,0,1; the model always says class 0: acc1 = 3/4, per-class recall (1 + 0) / 2.
    logits = torch.tensor([[0.9, 0.1, 0.0]] * 4)
    metrics = classification_metrics(logits, torch.tensor([0, 0, 0, 1]))
    assert metrics["acc1"] == 0.75
    assert metrics["mean_per_class_recall"] == 0.5
    assert metrics["acc5"] == 1.0  # C = 3 < 5: top-3 covers every class


def test_classification_metrics_top5_boundary():
    logits = torch.tensor([[7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]] * 2)  # ranks 0..6 by index
    metrics = classification_metrics(logits, torch.tensor([4, 5]))  # 5th best hits, 6th misses
    assert metrics == {"acc1": 0.0, "acc5": 0.5, "mean_per_class_recall": 0.0}


def test_classification_metrics_ties_count_against_the_example():
    metrics = classification_metrics(torch.zeros(4, 10), torch.tensor([0, 1, 2, 3]))
    assert metrics == {"acc1": 0.0, "acc5": 0.0, "mean_per_class_recall": 0.0}


def test_classification_metrics_matches_topk_without_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 12, generator=g)
    targets = torch.randint(0, 12, (50,), generator=g)
    top5 = logits.topk(5, dim=1).indices
    metrics = classification_metrics(logits, targets)
    assert metrics["acc1"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert metrics["acc5"] == pytest.approx((top5 == targets[:, None]).any(1).float().mean().item())


# ---------------------------------------------------------------- retrieval_metrics


def test_retrieval_metrics_identity():
    metrics = retrieval_metrics(torch.eye(4), torch.eye(4), torch.arange(4), ks=(1, 5))
    assert metrics == {
        "image_retrieval_recall@1": 1.0,
        "text_retrieval_recall@1": 1.0,
        "image_retrieval_recall@5": 1.0,
        "text_retrieval_recall@5": 1.0,
    }


def test_retrieval_metrics_half_permuted():
    # Texts 2 and 3 lean towards each other's image: recall@1 = 0.5 both ways, recall@2 = 1.
    e = torch.eye(4)
    images = e
    texts = torch.stack([e[0], e[1], 0.8 * e[3] + 0.6 * e[2], 0.8 * e[2] + 0.6 * e[3]])
    metrics = retrieval_metrics(images, texts, torch.arange(4), ks=(1, 2, 10))
    assert metrics == {
        "image_retrieval_recall@1": 0.5,
        "text_retrieval_recall@1": 0.5,
        "image_retrieval_recall@2": 1.0,
        "text_retrieval_recall@2": 1.0,
        "image_retrieval_recall@10": 1.0,  # k clipped to the 4 candidates
        "text_retrieval_recall@10": 1.0,
    }


def test_retrieval_metrics_any_true_caption_is_a_hit():
    # Image 0 owns texts 0 and 1, image 1 owns text 2. Text 0 is closer to image 1 (a text->image
    # miss), but image 0 still finds its other caption first.
    e = torch.eye(2)
    texts = torch.stack([0.6 * e[0] + 0.8 * e[1], e[0], e[1]])
    metrics = retrieval_metrics(e, texts, torch.tensor([0, 0, 1]), ks=(1,))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@1"] == 1.0


def test_retrieval_metrics_matches_topk_reference(monkeypatch):
    monkeypatch.setattr(evaluate_mod, "_QUERY_BLOCK", 7)  # exercise the blocked scoring
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(45, 8, generator=g), dim=-1)
    t2i = torch.cat([torch.arange(20), torch.randint(0, 20, (25,), generator=g)])
    scores = texts @ images.T  # [M, N]
    positive = t2i[:, None] == torch.arange(20)[None, :]  # [M, N]
    metrics = retrieval_metrics(images, texts, t2i, ks=(1, 5, 10))
    for k in (1, 5, 10):
        # CLIP_benchmark: hit when any positive is in the top k (topk on the score rows).
        t2i_hit = positive.gather(1, scores.topk(k, dim=1).indices).any(1)
        i2t_hit = positive.T.gather(1, scores.T.topk(k, dim=1).indices).any(1)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i_hit.float().mean().item())
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t_hit.float().mean().item())


def test_retrieval_metrics_rejects_bad_index():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 1, 1]))


# ---------------------------------------------------------------- with a stub model


def test_stub_model_scores_perfectly_and_mode_is_restored():
    model = StubCLIP().train()
    classes = [f"thing{i}" for i in range(5)]
    targets = [0, 1, 2, 3, 4, 4, 2, 0]
    dataset = ClassificationSet(
        classnames=classes,
        templates=["a photo of a {c}.", "a {c} in the wild."],
        images=[solid_png(t) for t in targets],
        targets=targets,
        keys=[f"k{n}" for n in range(len(targets))],
    )
    result = evaluate_classification(
        model, dataset, preprocess=to_tensor, tokenizer=stub_tokenizer, device="cpu", batch_size=3
    )
    assert isinstance(result, ClassificationResult)
    assert result.metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert result.predictions == targets
    assert result.correct == [True] * len(targets)
    assert model.training and model.seen_training and not any(model.seen_training)

    retrieval = RetrievalSet(
        images=[solid_png(i) for i in range(6)],
        captions=[[f"thing{i} on a table", f"a picture of thing{i}"][: 1 + i % 2] for i in range(6)],
        keys=[f"r{i}" for i in range(6)],
    )
    metrics = evaluate_retrieval(
        model, retrieval, preprocess=to_tensor, tokenizer=stub_tokenizer, device="cpu", batch_size=4
    )
    assert metrics == {f"{d}_retrieval_recall@{k}": 1.0 for k in (1, 5, 10) for d in ("image", "text")}
    assert model.training

    model.eval()
    evaluate_retrieval(model, retrieval, preprocess=to_tensor, tokenizer=stub_tokenizer, device="cpu")
    assert not model.training


def test_zero_shot_classifier_is_normalised_template_mean():
    model = StubCLIP()
    # The stub embeds a text by its first "thingN": template "thing2 {c}" always gives e_2.
    weights = zero_shot_classifier(
        model, ["thing1", "thing3"], ["{c}", "thing2 {c}"], tokenizer=stub_tokenizer, device="cpu"
    )
    e = torch.eye(8)
    expected = torch.stack(
        [F.normalize(e[1] + e[2], dim=0), F.normalize(e[3] + e[2], dim=0)], dim=1
    )  # [D, C]
    torch.testing.assert_close(weights, expected)


def test_embed_images_names_the_bad_key():
    from ctp.images import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="bad-key"):
        embed_images(
            StubCLIP(),
            [solid_png(0), b"not an image"],
            preprocess=to_tensor,
            device="cpu",
            keys=["ok", "bad-key"],
        )


# ---------------------------------------------------------------- with a tiny open_clip model


def test_tiny_open_clip_classification_and_retrieval(tokenizer):
    model = tiny_clip().train()
    preprocess = open_clip.image_transform(32, is_train=False)
    images = random_images(7)

    emb = embed_images(model, images, preprocess=preprocess, device="cpu", batch_size=3)
    assert emb.shape == (7, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(7))
    # Batching must not change the result.
    torch.testing.assert_close(embed_images(model, images, preprocess=preprocess, device="cpu"), emb)
    text_emb = embed_texts(
        model, ["a dog", "a cat", "a car"], tokenizer=tokenizer, device="cpu", batch_size=2
    )
    assert text_emb.shape == (3, 32)
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))

    dataset = ClassificationSet(
        classnames=["dog", "cat", "car", "tree", "boat", "house"],
        templates=["a photo of a {c}.", "a drawing of a {c}."],
        images=images,
        targets=[0, 1, 2, 3, 4, 5, 0],
        keys=[f"s{i}" for i in range(7)],
    )
    result = evaluate_classification(
        model, dataset, preprocess=preprocess, tokenizer=tokenizer, device="cpu", batch_size=4
    )
    assert set(result.metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert len(result.predictions) == len(result.correct) == 7
    assert all(0 <= p < 6 for p in result.predictions)
    assert result.metrics["acc1"] == pytest.approx(sum(result.correct) / 7)
    assert result.correct == [p == t for p, t in zip(result.predictions, dataset.targets, strict=True)]

    retrieval = RetrievalSet(
        images=images[:5],
        captions=[
            ["a dog on grass", "a brown dog"],
            ["a cat"],
            ["a red car", "a car", "a fast car"],
            ["a tree"],
            ["a boat"],
        ],
        keys=[f"s{i}" for i in range(5)],
    )
    metrics = evaluate_retrieval(model, retrieval, preprocess=preprocess, tokenizer=tokenizer, device="cpu")
    assert set(metrics) == {f"{d}_retrieval_recall@{k}" for k in (1, 5, 10) for d in ("image", "text")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["image_retrieval_recall@5"] == 1.0  # 5 images: every text's image is in its top 5
    assert model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_open_clip_on_cuda_uses_bf16_autocast_and_returns_fp32(tokenizer):
    model = tiny_clip().cuda()
    preprocess = open_clip.image_transform(32, is_train=False)
    images = random_images(5)
    emb = embed_images(model, images, preprocess=preprocess, device="cuda", batch_size=2)
    assert emb.dtype == torch.float32 and emb.device.type == "cuda"
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5, device="cuda"))
    # bf16 autocast: close to the fp32 CPU embeddings, not equal.
    cpu = embed_images(model.cpu(), images, preprocess=preprocess, device="cpu")
    torch.testing.assert_close(emb.cpu(), cpu, atol=5e-2, rtol=0)
    dataset = RetrievalSet(
        images=images, captions=[["a dog"], ["a cat", "a kitten"], ["a car"], ["a tree"], ["a boat"]], keys=[]
    )
    metrics = evaluate_retrieval(
        model.cuda(), dataset, preprocess=preprocess, tokenizer=tokenizer, device="cuda"
    )
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
