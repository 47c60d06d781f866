"""Anchors and block inputs/labels/weights, against dflash_spec §6.3 (a) (no "-1") and §6.4."""
import math

import pytest
import torch

from megatron_dflash.anchors import (block_input_ids, block_labels, block_loss_mask,
                                     block_loss_weights, block_position_ids, block_positions,
                                     sample_anchors)

MASK = 99


def gen(seed):
    return torch.Generator().manual_seed(seed)


def eligible_sets(loss_mask, block_size):
    seq_len = loss_mask.shape[1]
    return [{a for a in range(seq_len) if row[a] and a + block_size <= seq_len}
            for row in loss_mask.tolist()]


def test_anchors_are_distinct_sorted_eligible_and_fewer_when_scarce():
    seq_len, block_size = 20, 4
    loss_mask = torch.zeros(3, seq_len, dtype=torch.long)
    loss_mask[0, 5:] = 1       # response 5..19: anchors 5..16 fit (12)
    loss_mask[1, 15:] = 1      # 15, 16 fit; 17..19 would overrun the sequence (2)
    loss_mask[2, [3, 9]] = 1   # two isolated response tokens (2)
    sets = eligible_sets(loss_mask, block_size)
    anchors, keep = sample_anchors(loss_mask, block_size, num_anchors=6, generator=gen(0))
    assert anchors.shape == keep.shape == (3, 6) and anchors.dtype == torch.long
    for row, (a, k, allowed) in enumerate(zip(anchors.tolist(), keep.tolist(), sets)):
        n = min(6, len(allowed))
        assert k == [True] * n + [False] * (6 - n)
        assert a[n:] == [0] * (6 - n)
        assert set(a[:n]) <= allowed and len(set(a[:n])) == n and a[:n] == sorted(a[:n])
    assert set(anchors[1, :2].tolist()) == {15, 16} and set(anchors[2, :2].tolist()) == {3, 9}


def test_batch_width_is_largest_eligible_count_not_minus_one():
    loss_mask = torch.zeros(2, 12, dtype=torch.bool)
    loss_mask[0, 2:5] = True   # 3 eligible
    loss_mask[1, 7] = True     # 1 eligible
    anchors, keep = sample_anchors(loss_mask, 4, num_anchors=512, generator=gen(1))
    assert anchors.shape == (2, 3)
    assert anchors[0].tolist() == [2, 3, 4] and keep[0].all()
    assert anchors[1].tolist() == [7, 0, 0] and keep[1].tolist() == [True, False, False]


def test_no_eligible_position_gives_no_blocks():
    loss_mask = torch.ones(2, 6, dtype=torch.bool)
    anchors, keep = sample_anchors(loss_mask, 8, num_anchors=4, generator=gen(0))
    assert anchors.shape == keep.shape == (2, 0)


def test_generator_makes_draws_reproducible():
    loss_mask = torch.ones(4, 64, dtype=torch.bool)
    a1, _ = sample_anchors(loss_mask, 4, 8, gen(1234))
    a2, _ = sample_anchors(loss_mask, 4, 8, gen(1234))
    a3, _ = sample_anchors(loss_mask, 4, 8, gen(1235))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)


def test_draws_are_uniform_over_eligible_positions():
    # 6 eligible positions, 2 drawn per row: each position is chosen with probability 1/3.
    rows = 6000
    loss_mask = torch.zeros(rows, 12, dtype=torch.bool)
    loss_mask[:, 3:9] = True
    anchors, keep = sample_anchors(loss_mask, 4, 2, gen(7))
    assert keep.all()
    freq = torch.bincount(anchors.flatten(), minlength=12).float() / rows
    assert freq[:3].sum() == 0 and freq[9:].sum() == 0
    assert torch.allclose(freq[3:9], torch.full((6,), 1 / 3), atol=0.025)  # ~4 sigma
    pairs = torch.bincount(anchors[:, 0] * 12 + anchors[:, 1], minlength=144).float() / rows
    assert (pairs > 0).sum() == 15 and pairs.max() < 1 / 15 + 0.02  # all C(6,2) pairs, evenly


def test_block_inputs_labels_and_weights_follow_the_formula():
    seq_len, block_size, gamma = 10, 4, 2.0
    tokens = torch.arange(100, 100 + seq_len)[None]
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 1]])
    anchors, keep = torch.tensor([[1, 6, 0]]), torch.tensor([[True, True, False]])
    positions = block_positions(anchors, block_size)
    assert positions.tolist() == [[1, 2, 3, 4, 6, 7, 8, 9, 0, 1, 2, 3]]
    position_ids = block_position_ids(seq_len, anchors, block_size)
    assert position_ids.tolist() == [list(range(10)) + positions[0].tolist()]
    ids = block_input_ids(tokens, anchors, keep, block_size, MASK)
    assert ids.tolist() == [[101, MASK, MASK, MASK, 106, MASK, MASK, MASK, MASK, MASK, MASK, MASK]]
    labels = block_labels(tokens, anchors, block_size)
    assert labels.tolist() == [[101, 102, 103, 104, 106, 107, 108, 109, 100, 101, 102, 103]]
    mask = block_loss_mask(loss_mask, anchors, keep, block_size)
    # slot 0 never; loss_mask[4] = 0; the unkept block never.
    assert mask.int().tolist() == [[0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0]]
    w = block_loss_weights(mask, block_size, gamma)
    d = [math.exp(-(k - 1) / gamma) for k in range(block_size)]
    expected = [0, d[1], d[2], 0, 0, d[1], d[2], d[3], 0, 0, 0, 0]
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([expected]), rtol=0, atol=1e-7)


def test_slots_past_the_end_are_not_supervised():
    # Anchors from another sampler may run past S: those slots get weight 0.
    tokens, loss_mask = torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool)
    anchors, keep = torch.tensor([[4]]), torch.tensor([[True]])
    assert block_labels(tokens, anchors, 4).tolist() == [[4, 5, 5, 5]]
    assert block_loss_mask(loss_mask, anchors, keep, 4).tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("block_size,gamma,expected", [
    (16, 7.0, [0, 1.0, .867, .751, .651, .565, .490, .424, .368, .319, .276, .240, .208, .180,
               .156, .135]),
    (8, 4.0, [0, 1, .779, .607, .472, .368, .287, .223]),
])
def test_paper_decay_values(block_size, gamma, expected):
    mask = torch.ones(1, 2 * block_size, dtype=torch.bool)
    mask[:, ::block_size] = False
    w = block_loss_weights(mask, block_size, gamma)
    torch.testing.assert_close(w, torch.tensor([expected * 2]), rtol=0, atol=5e-4)
