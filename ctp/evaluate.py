"""Zero-shot classification and image-text retrieval evaluation (CLIP_benchmark semantics).

Works with any open_clip-style model: ``encode_image(images[B,3,H,W]) -> [B,D]`` and
``encode_text(tokens[B,ctx]) -> [B,D]``; a tokenizer ``list[str] -> LongTensor[N,ctx]``; a
``preprocess`` ``PIL.Image -> Tensor[3,H,W]``. Embeddings are L2-normalised, so logits are
cosine similarities; ``logit_scale`` is left out because it does not change any ranking.

Ranking ties are counted against the query: a true match is within the top k when fewer than k
wrong candidates score at least as high as it (for real models ties do not happen and this
equals ``torch.topk``; a collapsed model with constant embeddings scores 0, not an arbitrary
index-order result).

Reported (docs/design.md, "Metrics"): classification ``acc1``, ``acc5`` (top-min(5, C)) and
``mean_per_class_recall`` (mean over the classes present in the targets of their recall, as
sklearn's ``balanced_accuracy_score`` in CLIP_benchmark); retrieval
``image_retrieval_recall@k`` (text -> image) and ``text_retrieval_recall@k`` (image -> text),
a hit when any true match is in the top k. All values are fractions in [0, 1].
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctp.data import ClassificationSet, RetrievalSet
from ctp.images import decode_image

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], Tensor]  # list of N strings -> LongTensor[N, ctx]
Preprocess = Callable[..., Tensor]  # PIL.Image -> Tensor[3, H, W]

_QUERY_BLOCK = 1024  # query rows scored at a time in retrieval_metrics (bounds [block, N] memory)


@dataclass
class ClassificationResult:
    metrics: dict[str, float]  # {"acc1", "acc5", "mean_per_class_recall"}, fractions in [0, 1]
    predictions: list[int]  # argmax class per example, dataset order
    correct: list[bool]  # top-1 correct per example, dataset order (ties count as wrong)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 on GPU for speed; CPU stays fp32 (CPU autocast is slow and changes results).
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_images(
    model: nn.Module, images: Tensor, *, device: torch.device | str, batch_size: int | None = None
) -> Tensor:
    """Preprocessed images ``[N, 3, H, W]`` -> L2-normalised embeddings ``[N, D]`` (fp32, on
    ``device``), in eval mode, ``batch_size`` at a time (default: all at once).

    The one embedding helper (with ``encode_texts``): evaluation, the teacher's targets in
    training and serving all embed through it.
    """
    return _encode(model, model.encode_image, images, device=device, batch_size=batch_size, what="images")


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokens: Tensor, *, device: torch.device | str, batch_size: int | None = None
) -> Tensor:
    """Tokenized texts ``[N, ctx]`` -> L2-normalised embeddings ``[N, D]``, as ``encode_images``."""
    return _encode(model, model.encode_text, tokens, device=device, batch_size=batch_size, what="texts")


def _encode(
    model: nn.Module,
    encode: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    device: torch.device | str,
    batch_size: int | None,
    what: str,
) -> Tensor:
    device = torch.device(device)
    step = batch_size or max(1, len(inputs))
    out: list[Tensor] = []
    with _eval_mode(model), autocast_for(device):
        for start in range(0, len(inputs), step):
            x = inputs[start : start + step].to(device)  # [B, 3, H, W] or [B, ctx]
            out.append(F.normalize(encode(x).float(), dim=-1))  # [B, D]
    if not out:
        raise ValueError(f"no {what} to embed")
    return torch.cat(out)


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: Sequence[bytes],
    *,
    preprocess: Preprocess,
    device: torch.device | str,
    batch_size: int = 256,
    keys: Sequence[str] | None = None,
) -> Tensor:
    """Encoded images -> L2-normalised embeddings ``[N, D]`` (fp32, on ``device``).

    Images are decoded one batch at a time; ``keys`` (same order) only name a bad image in
    decode errors (default: its index).
    """
    device = torch.device(device)
    if keys is not None and len(keys) != len(images):
        raise ValueError(f"{len(keys)} keys for {len(images)} images")
    out: list[Tensor] = []
    for start in range(0, len(images), batch_size):
        batch = [
            preprocess(decode_image(data, key=keys[n] if keys is not None else str(n)))
            for n, data in enumerate(images[start : start + batch_size], start=start)
        ]
        out.append(encode_images(model, torch.stack(batch), device=device))  # [B, D]
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    texts: Sequence[str],
    *,
    tokenizer: Tokenizer,
    device: torch.device | str,
    batch_size: int = 256,
) -> Tensor:
    """Texts -> L2-normalised embeddings ``[N, D]`` (fp32, on ``device``)."""
    if not texts:
        raise ValueError("no texts to embed")
    return encode_texts(model, tokenizer(list(texts)), device=device, batch_size=batch_size)


def _embed_set_images(
    model: nn.Module,
    dataset: ClassificationSet | RetrievalSet,
    preprocess: Preprocess,
    device: torch.device | str,
    batch_size: int,
) -> Tensor:
    keys = dataset.keys or None
    return embed_images(
        model, dataset.images, preprocess=preprocess, device=device, batch_size=batch_size, keys=keys
    )


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    tokenizer: Tokenizer,
    device: torch.device | str,
    batch_size: int = 256,
) -> Tensor:
    """Class weights ``[D, C]``: per class, the mean of its normalised template embeddings,
    renormalised (open_clip ``build_zero_shot_classifier``). Templates use ``{c}``."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    texts = [t.format(c=c) for c in classnames for t in templates]  # class-major
    emb = embed_texts(model, texts, tokenizer=tokenizer, device=device, batch_size=batch_size)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(emb, dim=-1).T.contiguous()  # [D, C]


def _target_rank(logits: Tensor, targets: Tensor) -> Tensor:
    """Per row, how many other classes score at least the target's logit: [N] long."""
    target_logit = logits.gather(1, targets[:, None])  # [N, 1]
    return (logits >= target_logit).sum(dim=1) - 1  # minus the target itself


def classification_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """``logits [N, C]``, ``targets [N]`` -> ``{"acc1", "acc5", "mean_per_class_recall"}``.

    ``acc5`` is top-min(5, C) accuracy; mean per-class recall averages over the classes that
    occur in ``targets``.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"need logits [N, C] and targets [N], N > 0; got {logits.shape}, {targets.shape}")
    targets = targets.to(logits.device, torch.long)
    rank = _target_rank(logits.float(), targets)  # [N]
    top1 = rank < 1
    top5 = rank < min(5, logits.shape[1])
    classes = targets.unique()  # sorted classes present
    per_class = torch.stack([top1[targets == c].float().mean() for c in classes])  # [C_present]
    return {
        "acc1": top1.float().mean().item(),
        "acc5": top5.float().mean().item(),
        "mean_per_class_recall": per_class.mean().item(),
    }


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways from embeddings ``image_emb [N, D]``, ``text_emb [M, D]``.

    ``text_to_image [M]`` gives the true image of each text (an image may own several texts).
    ``image_retrieval_recall@k``: fraction of texts whose image is in their top k images;
    ``text_retrieval_recall@k``: fraction of images with any of their texts in their top k
    texts. k larger than the candidate count is clipped to it.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({n_txt},)")
    if n_img == 0 or n_txt == 0:
        raise ValueError("need at least one image and one text")
    text_to_image = text_to_image.to(image_emb.device, torch.long)
    image_emb, text_emb = image_emb.float(), text_emb.float().to(image_emb.device)

    # text -> image: rank of the one true image among all images.
    t2i_rank = torch.cat(
        [
            _target_rank(text_emb[s : s + _QUERY_BLOCK] @ image_emb.T, text_to_image[s : s + _QUERY_BLOCK])
            for s in range(0, n_txt, _QUERY_BLOCK)
        ]
    )  # [M]

    # image -> text: rank of the best-scoring true text among all texts.
    i2t_rank = []
    for s in range(0, n_img, _QUERY_BLOCK):
        scores = image_emb[s : s + _QUERY_BLOCK] @ text_emb.T  # [B, M]
        positive = (
            text_to_image[None, :] == torch.arange(s, s + scores.shape[0], device=scores.device)[:, None]
        )
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # [B, 1]
        rank = ((scores >= best) & ~positive).sum(dim=1)  # wrong texts at least as close
        rank[~positive.any(dim=1)] = n_txt  # an image without texts never hits
        i2t_rank.append(rank)
    i2t = torch.cat(i2t_rank)  # [N]

    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (t2i_rank < min(k, n_img)).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (i2t < min(k, n_txt)).float().mean().item()
    return metrics


def evaluate_classification(
    model: nn.Module,
    dataset: ClassificationSet,
    *,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    device: torch.device | str,
    batch_size: int = 256,
) -> ClassificationResult:
    """Zero-shot classification of ``dataset`` over all its class names."""
    if len(dataset.images) != len(dataset.targets):
        raise ValueError(f"{len(dataset.images)} images but {len(dataset.targets)} targets")
    classifier = zero_shot_classifier(
        model,
        dataset.classnames,
        dataset.templates,
        tokenizer=tokenizer,
        device=device,
        batch_size=batch_size,
    )  # [D, C]
    image_emb = _embed_set_images(model, dataset, preprocess, device, batch_size)  # [N, D]
    logits = image_emb @ classifier  # [N, C] cosine similarities
    targets = torch.tensor(dataset.targets, dtype=torch.long, device=logits.device)
    metrics = classification_metrics(logits, targets)
    correct = _target_rank(logits, targets) == 0
    log.info(
        "classification: %d images, %d classes: %s",
        len(dataset.images),
        len(dataset.classnames),
        {k: round(v, 4) for k, v in metrics.items()},
    )
    return ClassificationResult(
        metrics=metrics,
        predictions=logits.argmax(dim=1).tolist(),
        correct=correct.tolist(),
    )


def evaluate_retrieval(
    model: nn.Module,
    dataset: RetrievalSet,
    *,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    device: torch.device | str,
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-text retrieval on ``dataset``; all captions are flattened into one text pool."""
    if len(dataset.images) != len(dataset.captions):
        raise ValueError(f"{len(dataset.images)} images but {len(dataset.captions)} caption lists")
    texts = [caption for captions in dataset.captions for caption in captions]
    text_to_image = torch.tensor(
        [n for n, captions in enumerate(dataset.captions) for _ in captions], dtype=torch.long
    )  # [M]
    image_emb = _embed_set_images(model, dataset, preprocess, device, batch_size)  # [N, D]
    text_emb = embed_texts(model, texts, tokenizer=tokenizer, device=device, batch_size=batch_size)  # [M, D]
    metrics = retrieval_metrics(image_emb, text_emb, text_to_image, ks)
    log.info(
        "retrieval: %d images, %d texts: %s",
        len(dataset.images),
        len(texts),
        {k: round(v, 4) for k, v in metrics.items()},
    )
    return metrics
