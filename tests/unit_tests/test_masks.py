"""The dense DFlash training mask against the per-entry rule of dflash_spec §5.2."""
import torch

from megatron_dflash.masks import block_context_lengths, dflash_attention_mask

SEQ, B = 12, 4


def reference_masked(anchors, keep, q, kv):
    """True = masked, one (query, key) pair at a time: context strictly before the kept block's
    anchor, plus the block's own slots (the only thing an unkept block sees)."""
    j = q // B
    if kv < SEQ:
        return not (keep[j] and kv < anchors[j])
    return (kv - SEQ) // B != j


def build(anchors, keep):
    return dflash_attention_mask(torch.tensor(anchors), torch.tensor(keep), SEQ, B)


def test_mask_matches_the_per_entry_rule():
    anchors = [[0, 3, 3, 8], [5, 0, 0, 0]]
    keep = [[True, True, True, True], [True, False, False, False]]
    mask = build(anchors, keep)
    n = len(anchors[0])
    assert mask.shape == (2, 1, n * B, SEQ + n * B) and mask.dtype == torch.bool
    for row in range(2):
        expected = [[reference_masked(anchors[row], keep[row], q, kv) for kv in range(SEQ + n * B)]
                    for q in range(n * B)]
        assert mask[row, 0].tolist() == expected


def test_context_is_strictly_before_the_anchor():
    mask = build([[0, 5]], [[True, True]])[0, 0]
    assert mask[:B, :SEQ].all()                      # anchor 0 sees no context
    assert not mask[B:, :5].any() and mask[B:, 5:SEQ].all()   # anchor 5 sees 0..4, never 5


def test_blocks_see_their_own_block_bidirectionally_and_no_other():
    mask = build([[2, 2, 6]], [[True, True, True]])[0, 0]
    blocks = mask[:, SEQ:].view(3, B, 3, B)
    for i in range(3):
        for j in range(3):
            assert blocks[i, :, j].all() if i != j else not blocks[i, :, j].any()


def test_unkept_blocks_see_only_themselves_so_every_row_is_finite():
    anchors, keep = torch.tensor([[7, 0]]), torch.tensor([[True, False]])
    mask = dflash_attention_mask(anchors, keep, SEQ, B)[0, 0]
    assert mask[B:, :SEQ].all() and not mask[B:, SEQ + B:].any() and mask[B:, SEQ:SEQ + B].all()
    assert (~mask).any(-1).all()
    assert block_context_lengths(anchors, keep).tolist() == [[7, 0]]
