import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ctp.losses import contrastive_loss, distillation_loss, feature_distillation_loss


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=1, keepdim=True)


def test_contrastive_loss_hand_computed():
    img = _unit([1, 0], [0, 1])
    txt = _unit([1, 0], [1, 1])
    scale = torch.tensor(2.0, dtype=torch.float64)
    s = 2 * img @ txt.T  # [[2, sqrt2], [0, sqrt2]]
    r2 = math.sqrt(2)
    i2t = (-(2 - math.log(math.exp(2) + math.exp(r2))) - (r2 - math.log(1 + math.exp(r2)))) / 2
    t2i = (-(2 - math.log(math.exp(2) + 1)) - (r2 - math.log(math.exp(r2) + math.exp(r2)))) / 2
    assert_close(s, torch.tensor([[2, r2], [0, r2]], dtype=torch.float64))
    assert_close(contrastive_loss(img, txt, scale), torch.tensor((i2t + t2i) / 2, dtype=torch.float64))


def test_extra_negatives_only_widen_image_rows():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    neg = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    base = contrastive_loss(img, txt, scale)
    with_neg = contrastive_loss(img, txt, scale, negative_text_features=neg)
    logits = scale * img @ torch.cat([txt, neg]).T
    expected = (
        F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy((scale * img @ txt.T).T, torch.arange(4))
    ) / 2
    assert_close(with_neg, expected)
    assert with_neg > base  # more negatives can only raise the loss


def test_negative_owner_masks_other_rows():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    neg = F.normalize(torch.randn(2, 8, generator=g), dim=1)
    scale = torch.tensor(5.0)
    owner = torch.tensor([0, 2])
    got = contrastive_loss(img, txt, scale, negative_text_features=neg, negative_owner=owner)
    rows = []
    for i in range(3):
        cols = [scale * img[i] @ txt.T] + [
            scale * (img[i] @ neg[p]).reshape(1) for p in range(2) if owner[p] == i
        ]
        rows.append(F.cross_entropy(torch.cat(cols)[None], torch.tensor([i])))
    i2t = torch.stack(rows).mean()
    t2i = F.cross_entropy((scale * img @ txt.T).T, torch.arange(3))
    assert_close(got, (i2t + t2i) / 2)


def test_asymmetric_contrast_new_rows_see_only_new_columns():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    neg = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    owner = torch.tensor([3, 4, 4, 0])  # the last is a new image's: masked on both counts
    scale = torch.tensor(5.0)
    got = contrastive_loss(img, txt, scale, negative_text_features=neg, negative_owner=owner, new_rows=3)
    s = scale * img @ txt.T
    rows_i2t, rows_t2i = [], []
    for i in range(5):
        new = i < 3
        cols = list(range(3)) if new else list(range(5))
        own_neg = [] if new else [scale * img[i] @ neg[p] for p in range(4) if owner[p] == i]
        logits = torch.cat([s[i, cols], torch.stack(own_neg)]) if own_neg else s[i, cols]
        rows_i2t.append(F.cross_entropy(logits[None], torch.tensor([cols.index(i)])))
        rows_t2i.append(F.cross_entropy(s[cols, i][None], torch.tensor([cols.index(i)])))
    expected = (torch.stack(rows_i2t).mean() + torch.stack(rows_t2i).mean()) / 2
    assert_close(got, expected)
    # all rows new (nothing replayed), or no split given: CLIP's own loss
    plain = contrastive_loss(img, txt, scale)
    assert_close(contrastive_loss(img, txt, scale, new_rows=5), plain)
    full = contrastive_loss(img, txt, scale, negative_text_features=neg, negative_owner=owner)
    assert not torch.isclose(got, full)


def test_hard_negative_gets_gradient_away_from_image():
    img = _unit([1, 0, 0]).requires_grad_(True)
    txt = _unit([1, 0, 0])
    neg = _unit([1, 1, 0]).requires_grad_(True)
    contrastive_loss(img, txt, torch.tensor(10.0, dtype=torch.float64), negative_text_features=neg).backward()
    # descending the loss moves the negative away from the image: d loss / d neg . img > 0
    assert float(neg.grad @ img.detach().T) > 0


def test_kd_zero_when_teacher_equals_student():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g)
    assert_close(distillation_loss(logits, logits.clone()), torch.tensor(0.0))


def test_kd_hand_computed_and_symmetric_directions():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    T = 1.0

    def kl(p_logits, q_logits):  # KL(softmax(q) || softmax(p)) per row, mean over rows
        p = F.log_softmax(p_logits, 1)
        q = F.log_softmax(q_logits, 1)
        return (q.exp() * (q - p)).sum(1).mean()

    expected = (kl(s, t) + kl(s.T, t.T)) / 2
    assert_close(distillation_loss(s, t, temperature=T), expected)
    # temperature: logits / T and a T^2 factor
    assert_close(distillation_loss(s, t, temperature=2.0), 4 * (kl(s / 2, t / 2) + kl(s.T / 2, t.T / 2)) / 2)


def test_kd_gradient_flows_to_student_only():
    s = torch.randn(4, 4, requires_grad=True)
    t = torch.randn(4, 4, requires_grad=True)
    distillation_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_confidence_gate_weighs_rows_by_teacher_true_match_probability():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # sure of row 0, undecided on row 1

    def kl_rows(p_logits, q_logits):
        p, q = F.log_softmax(p_logits, 1), F.log_softmax(q_logits, 1)
        return (q.exp() * (q - p)).sum(1)

    w_i2t, w_t2i = t.softmax(1).diagonal(), t.T.softmax(1).diagonal()
    expected = ((kl_rows(s, t) * w_i2t).mean() + (kl_rows(s.T, t.T) * w_t2i).mean()) / 2
    assert_close(distillation_loss(s, t, temperature=1.0, gate="confidence"), expected)
    assert distillation_loss(s, t, temperature=1.0, gate="confidence") < distillation_loss(
        s, t, temperature=1.0
    )
    with pytest.raises(ValueError, match="gate"):
        distillation_loss(s, t, gate="sometimes")


def test_feature_kd_zero_at_teacher_and_positive_away():
    a = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert_close(feature_distillation_loss(a, a.clone()), torch.tensor(0.0))
    assert feature_distillation_loss(a, -a) > 1.9  # opposite directions: distance 2


def test_one_directional_distillation_on_a_rectangular_matrix():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)  # 3 images against 5 texts
    assert distillation_loss(teacher, teacher, symmetric=False) == pytest.approx(0.0, abs=1e-6)
    one = distillation_loss(student, teacher, temperature=2.0, symmetric=False)
    assert one > 0
    # the image->text half of the symmetric loss (the text->image half is computed separately here)
    log_s, log_t = F.log_softmax(student / 2, 1), F.log_softmax(teacher / 2, 1)
    rows = (log_t.exp() * (log_t - log_s)).sum(1).mean() * 4 / 2
    assert one == pytest.approx(rows.item(), rel=1e-5)
