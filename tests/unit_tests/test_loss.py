"""DFlash loss and metrics at TP=1 against direct per-token computations."""
import math

import pytest
import torch

from megatron_dflash.anchors import (block_labels, block_loss_mask, block_loss_weights,
                                     block_positions)
from megatron_dflash.loss import block_acceptance_lengths
from tests.loss_testing import (accuracy_counts, cross_entropy_per_token, dflash_loss,
                                distillation_per_token)

SEQ, B, V = 10, 4, 11


def make_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2, SEQ), generator=g)
    loss_mask = torch.ones(2, SEQ, dtype=torch.bool)
    loss_mask[1, 7] = False
    anchors = torch.tensor([[0, 2, 6], [1, 5, 0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    mask = block_loss_mask(loss_mask, anchors, keep, B)
    return dict(
        logits=2 * torch.randn(3 * B, 2, V, generator=g),
        target_logits=2 * torch.randn(SEQ, 2, V, generator=g),
        labels=block_labels(tokens, anchors, B),
        positions=block_positions(anchors, B),
        mask=mask,
        weights=block_loss_weights(mask, B, 7.0),
    )


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def reference_terms(c):
    """Per token (batch, slot): (weight, CE, KD) in python floats."""
    terms = []
    for bi in range(2):
        for q in range(3 * B):
            student = log_softmax(c["logits"][q, bi].tolist())
            teacher_row = max(int(c["positions"][bi, q]) - 1, 0)
            teacher_logits = c["target_logits"][teacher_row, bi].tolist()
            teacher = [math.exp(x) for x in log_softmax(teacher_logits)]
            ce = -student[int(c["labels"][bi, q])]
            kd = -sum(p * s for p, s in zip(teacher, student))
            terms.append((float(c["weights"][bi, q]), ce, kd))
    return terms


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_equals_per_token_computation(utils, alpha):
    utils.initialize_model_parallel(1, 1)
    c = make_case()
    terms = reference_terms(c)
    loss_sum, weight_sum = dflash_loss(c["logits"], c["labels"], c["weights"], distill_weight=alpha,
                                       target_logits=c["target_logits"],
                                       label_positions=c["positions"])
    expected = sum(w * ((1 - alpha) * ce + alpha * kd) for w, ce, kd in terms)
    assert weight_sum.item() == pytest.approx(sum(w for w, _, _ in terms), abs=1e-6)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_every_token_to_1e_6(utils):
    utils.initialize_model_parallel(1, 1)
    c = make_case(1)
    terms = reference_terms(c)
    ce = cross_entropy_per_token(c["logits"], c["labels"]).flatten().tolist()
    kd = distillation_per_token(c["logits"], c["target_logits"], c["positions"]).flatten().tolist()
    # fp32 results: 1e-6 relative is a few ulps.
    assert ce == pytest.approx([t[1] for t in terms], rel=1e-6, abs=1e-6)
    assert kd == pytest.approx([t[2] for t in terms], rel=1e-6, abs=1e-6)


def test_gradients_match_autograd_and_logits_are_left_intact(utils):
    utils.initialize_model_parallel(1, 1)
    c = make_case(2)
    logits = c["logits"].clone().requires_grad_()
    loss_sum, _ = dflash_loss(logits, c["labels"], c["weights"], distill_weight=0.4,
                              target_logits=c["target_logits"], label_positions=c["positions"])
    loss_sum.backward()
    assert torch.equal(logits.detach(), c["logits"])

    ref = c["logits"].double().requires_grad_()
    log_p = ref.log_softmax(-1)                                          # [Q, b, V]
    ce = -log_p.gather(-1, c["labels"].t()[..., None]).squeeze(-1)
    rows = (c["positions"] - 1).clamp(min=0).t()
    teacher = c["target_logits"].double()[rows, torch.arange(2)].softmax(-1)
    kd = -(teacher * log_p).sum(-1)
    (c["weights"].t().double() * (0.6 * ce + 0.4 * kd)).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=0, atol=1e-6)


def test_distill_weight_is_checked(utils):
    utils.initialize_model_parallel(1, 1)
    c = make_case()
    with pytest.raises(ValueError, match="distill_weight"):
        dflash_loss(c["logits"], c["labels"], c["weights"], distill_weight=1.5)
    with pytest.raises(ValueError, match="target_logits"):
        dflash_loss(c["logits"], c["labels"], c["weights"], distill_weight=0.5)


def test_accuracy_and_acceptance_length_on_a_known_case(utils):
    utils.initialize_model_parallel(1, 1)
    # Two blocks of 4. Slots 1..3 are right in block 0: yes, yes, no; in block 1: yes, no, yes,
    # but block 1's slot 3 is unsupervised. Slot 0 is always right and never counted.
    labels = torch.tensor([[1, 2, 3, 4, 5, 0, 1, 2]])
    right = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    predicted = torch.where(right, labels[0], (labels[0] + 1) % 6)
    logits = torch.nn.functional.one_hot(predicted, 6).float()[:, None] * 3 + 0.1   # [Q, 1, V]
    correct, total = accuracy_counts(logits, labels, mask, 4)
    assert correct.tolist() == [2, 1, 0] and total.tolist() == [2, 2, 1]
    # Exact per-block acceptance: block 0 accepts slots 1, 2 (then a miss) -> 3; block 1 accepts
    # slot 1, misses slot 2 -> 2; τ̂ = 2.5. The marginal product 1 + 1 + 0.5·1 + 0 says 2.5 too
    # here, but not in general:
    hits = (right & mask[0]).view(2, 4)[:, 1:]
    assert block_acceptance_lengths(hits).tolist() == [3, 2]
    # Two blocks, one all right and one all wrong: marginal accuracies 0.5 each, so the product
    # formula gives 1 + 0.5 + 0.25 + 0.125 = 1.875, while the blocks accept 4 and 1: τ̂ = 2.5.
    hits = torch.tensor([[True, True, True], [False, False, False]])
    assert block_acceptance_lengths(hits).float().mean().item() == 2.5
    marginal = hits.float().mean(0)
    assert 1 + marginal.cumprod(0).sum().item() == pytest.approx(1.875)


def test_target_greedy_labels_are_the_targets_next_token_argmax(utils):
    from tests.loss_testing import target_greedy_labels
    utils.initialize_model_parallel(1)
    g = torch.Generator().manual_seed(0)
    target_logits = torch.randn(12, 2, 50, generator=g)  # [S, b, V]
    label_positions = torch.tensor([[0, 1, 2, 5], [7, 8, 9, 11]])  # a_j + k
    got = target_greedy_labels(target_logits, label_positions)
    rows = (label_positions - 1).clamp(min=0)
    expected = torch.stack([target_logits[rows[b], b].argmax(-1) for b in range(2)])
    assert torch.equal(got, expected)
