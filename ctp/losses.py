"""Losses: symmetric contrastive loss with extra negative texts, and multi-modal distillation.

Shapes: B pairs in a batch, P extra negative texts (pseudo texts), D embedding size. All
features are expected L2-normalised (open_clip ``normalize=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    image_features: torch.Tensor,  # [B, D]
    text_features: torch.Tensor,  # [B, D]; row i is the caption of image i
    logit_scale: torch.Tensor,  # scalar, already exp()'d
    *,
    negative_text_features: torch.Tensor | None = None,  # [P, D]
    negative_owner: torch.Tensor | None = None,  # [P] long: image a negative was made for
    negative_weight: float = 1.0,
    new_rows: int | None = None,  # rows [0, new_rows) are new pairs, the rest replayed
) -> torch.Tensor:
    """CLIP InfoNCE, both directions, with extra negative texts on the image->text side.

    Extra negatives widen each image's softmax over texts from B to B + P columns. A pseudo text
    is a hard negative for the image it was generated for, and also an ordinary negative for
    the other images of the batch. ``negative_owner`` is accepted so a caller can restrict a
    negative to its own image (entries of other rows masked out); None keeps it for every row.
    Text->image rows are unchanged: a pseudo text has no matching image to be classified to.

    ``new_rows`` makes the loss asymmetric (ER-ACE's rule, Caccia et al. 2022, in CLIP's
    in-batch form): a new image's softmax runs over the new texts only and a new text's over
    the new images only, so new pairs never push the replayed (old) pairs or their pseudo texts
    away; replayed rows keep every column, and that is where old and new are told apart. None,
    0 or B is the ordinary loss.
    """
    logits_per_image = logit_scale * image_features @ text_features.T  # [B, B]
    b = image_features.shape[0]
    labels = torch.arange(b, device=image_features.device)
    logits_per_text = logits_per_image.T
    new = None
    if new_rows is not None and 0 < new_rows < b:
        new = labels < new_rows  # [B]
        new_vs_old = new[:, None] & ~new[None, :]  # [B, B]: a new row against a replayed column
        logits_per_image = logits_per_image.masked_fill(new_vs_old, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(new_vs_old, float("-inf"))
    loss_t2i = F.cross_entropy(logits_per_text, labels)
    if negative_text_features is not None and negative_text_features.shape[0] > 0:
        neg_logits = logit_scale * image_features @ negative_text_features.T  # [B, P]
        if negative_owner is not None:
            own = negative_owner[None, :] == labels[:, None]  # [B, P]
            neg_logits = neg_logits.masked_fill(~own, float("-inf"))
        if new is not None:  # pseudo texts are old concepts' negatives: out of new rows' softmax
            neg_logits = neg_logits.masked_fill(new[:, None], float("-inf"))
        if negative_weight != 1.0:
            # log(w) added to a logit weighs that negative's exp() term by w in the partition sum.
            neg_logits = neg_logits + torch.log(torch.tensor(negative_weight, device=neg_logits.device))
        logits_i2t = torch.cat([logits_per_image, neg_logits], dim=1)  # [B, B + P]
    else:
        logits_i2t = logits_per_image
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    return (loss_i2t + loss_t2i) / 2


def distillation_loss(
    student_logits: torch.Tensor,  # [B, B] image->text similarities of the student
    teacher_logits: torch.Tensor,  # [B, B] the same for the frozen teacher
    *,
    temperature: float = 2.0,
    gate: str = "none",
    symmetric: bool = True,
) -> torch.Tensor:
    """Multi-modal KD: KL(teacher || student) over image->text rows and text->image rows.

    Logits are divided by ``temperature`` (softer targets carry the teacher's ranking of
    non-matching pairs, which is what old knowledge looks like) and the loss is scaled by T^2
    so its gradient size does not depend on T (Hinton et al.). Zero when teacher == student.
    ``gate="confidence"`` weighs each row's KL by the teacher's probability (at temperature 1)
    of the true match, the diagonal: rows the teacher gets wrong are not copied.
    ``symmetric=False`` keeps the image->text rows only (of any [A, B] matrix, A images against B
    texts), scaled as one direction of the symmetric loss.
    """
    t = temperature
    loss = student_logits.new_zeros(())
    directions = [(student_logits, teacher_logits)]
    if symmetric:
        directions.append((student_logits.T, teacher_logits.T))
    for s, te in directions:
        te = te.detach()
        log_p_student = F.log_softmax(s / t, dim=1)
        log_p_teacher = F.log_softmax(te / t, dim=1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)  # [B]
        if gate == "confidence":
            kl = kl * te.softmax(1).diagonal()
        elif gate != "none":
            raise ValueError(f"unknown KD gate {gate!r}; expected 'none' or 'confidence'")
        loss = loss + kl.mean()
    return loss * (t * t) / 2


def feature_distillation_loss(
    student: torch.Tensor,  # [B, D] L2-normalised embeddings of the student
    teacher: torch.Tensor,  # [B, D] the teacher's, same inputs
) -> torch.Tensor:
    """Mean cosine distance 1 - <s, t>: keeps old pairs where they were in the joint space."""
    return (1 - (student * teacher.detach()).sum(-1)).mean()
