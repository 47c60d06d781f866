"""The DFlash loss, its gradient and metrics with the vocabulary split over TP=2 equal TP=1."""
import pytest
import torch
import torch.distributed as dist

from megatron_dflash.anchors import (block_labels, block_loss_mask, block_loss_weights,
                                     block_positions)
from tests.loss_testing import accuracy_counts, dflash_loss

SEQ, B, V = 16, 4, 12


def make_case():
    g = torch.Generator().manual_seed(0)  # identical on every rank
    tokens = torch.randint(0, V, (2, SEQ), generator=g)
    loss_mask = torch.rand(2, SEQ, generator=g) < 0.8
    anchors = torch.tensor([[0, 3, 9, 12], [2, 6, 7, 0]])
    keep = torch.tensor([[True, True, True, True], [True, True, True, False]])
    mask = block_loss_mask(loss_mask, anchors, keep, B)
    logits = 3 * torch.randn(4 * B, 2, V, generator=g)
    # Argmax ties across the two vocabulary shards: both TP layouts must pick the lower id.
    logits[5, 0, 1] = logits[5, 0, 7] = logits[9, 1, 2] = logits[9, 1, 8] = 20.0
    return dict(logits=logits, target_logits=3 * torch.randn(SEQ, 2, V, generator=g),
                labels=block_labels(tokens, anchors, B), positions=block_positions(anchors, B),
                mask=mask, weights=block_loss_weights(mask, B, 7.0))


def run(c, logits, target_logits, alpha, tp_group):
    logits = logits.clone().requires_grad_()
    loss_sum, weight_sum = dflash_loss(logits, c["labels"], c["weights"], distill_weight=alpha,
                                       target_logits=target_logits, label_positions=c["positions"],
                                       tp_group=tp_group)
    loss_sum.backward()
    correct, total = accuracy_counts(logits.detach(), c["labels"], c["mask"], B, tp_group)
    return loss_sum.detach(), weight_sum, logits.grad, correct, total


@pytest.mark.world(2)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.35])
def test_vocab_parallel_loss_grads_and_metrics_match_tp1(utils, alpha):
    utils.initialize_model_parallel(tp=2)
    rank = dist.get_rank()
    solo = [dist.new_group([r]) for r in range(2)][rank]   # TP=1 on this rank alone
    c = make_case()
    shard = slice(rank * V // 2, (rank + 1) * V // 2)
    loss1, wsum1, grad1, correct1, total1 = run(c, c["logits"], c["target_logits"], alpha, solo)
    loss2, wsum2, grad2, correct2, total2 = run(c, c["logits"][..., shard],
                                                c["target_logits"][..., shard], alpha, None)
    # The sum (~100) is compared to a few fp32 ulps; the weighted mean megatron reports, to 1e-5.
    torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss2 / wsum2, loss1 / wsum1, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad2, grad1[..., shard], rtol=0, atol=1e-5)
    assert torch.equal(wsum2, wsum1)
    assert torch.equal(correct2, correct1) and torch.equal(total2, total1)
    assert total1.sum() > correct1.sum() > 0


@pytest.mark.world(2)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.35])
def test_chunked_head_loss_at_tp2_equals_unchunked_tp1(utils, alpha):
    """The chunked LM head + loss with the vocabulary split over TP=2 (rows replicated, their
    gradient reduced by the TP copy's backward) equals the unchunked full-vocabulary objective:
    loss, row gradients and both argmaxes (ties across shards included)."""
    from megatron.core import tensor_parallel

    from megatron_dflash.head_loss import vocab_head_loss
    from megatron_dflash.loss import per_token_loss

    utils.initialize_model_parallel(tp=2)
    rank = dist.get_rank()
    solo = [dist.new_group([r]) for r in range(2)][rank]
    g = torch.Generator().manual_seed(1)
    m, hidden = 23, 8
    rows, teacher = torch.randn(m, hidden, generator=g), torch.randn(m, hidden, generator=g)
    weight = torch.randn(V, hidden, generator=g)
    weight[7] = weight[1]  # the draft's argmax ties across the two shards on some rows
    labels, weights = torch.randint(0, V, (m,), generator=g), torch.rand(m, generator=g) + 0.1
    full = rows.clone().requires_grad_()
    logits, teacher_logits = full @ weight.t(), teacher @ weight.t()
    ref = (weights * per_token_loss(logits, labels, teacher_logits, alpha, solo)).sum()
    ref.backward()
    mine = rows.clone().requires_grad_()
    shard = weight[rank * V // 2:(rank + 1) * V // 2]
    loss, predicted, teacher_predicted = vocab_head_loss(
        tensor_parallel.copy_to_tensor_model_parallel_region(mine), shard, labels, weights,
        teacher_rows=teacher, distill_weight=alpha, chunk_rows=5)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mine.grad, full.grad, rtol=0, atol=1e-6)
    assert torch.equal(predicted, logits.argmax(-1))
    assert torch.equal(teacher_predicted, teacher_logits.argmax(-1))
