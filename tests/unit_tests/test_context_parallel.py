"""Context parallelism without a world: how the blocks are dealt to CP ranks, the padding that
makes the split possible, the flags refused before anything is built (one line each), and what
CP saves in the analytic memory model. The layouts themselves: tests/distributed/
test_context_parallel.py."""
import pytest
import torch

from megatron_dflash.anchors import pad_blocks, sample_anchors
from megatron_dflash.context_parallel import block_multiple, blocks_of_rank, sequence_multiple
from megatron_dflash.step_memory import Layout, Shapes, step_memory
from megatron_dflash.training.pretrain import parse_plan
from tests.dflash_testing import tiny_deepseek_dir
from tests.training_testing import flags


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_blocks_are_dealt_once_and_evenly(cp):
    """Every kept block goes to exactly one rank; each rank gets N/CP slots (one shape), kept
    ones first and ascending, within one kept block and about the same anchor sum (context
    attended to) of every other rank's."""
    loss_mask = torch.zeros(3, 400, dtype=torch.bool)
    loss_mask[0, 10:] = loss_mask[1, 200:] = loss_mask[2, 390:] = True  # 383, 193, 3 eligible
    anchors, keep = sample_anchors(loss_mask, 8, 48, torch.Generator().manual_seed(0))
    anchors, keep = pad_blocks(anchors, keep, 8, block_multiple(1, 8, cp))
    shares = [blocks_of_rank(anchors, keep, r, cp) for r in range(cp)]
    assert all(a.shape == (3, anchors.shape[1] // cp) for a, _ in shares)
    for row in range(3):
        kept = [a[row][k[row]] for a, k in shares]
        assert sorted(torch.cat(kept).tolist()) == anchors[row][keep[row]].tolist()
        assert max(map(len, kept)) - min(map(len, kept)) <= 1
        for (a, k), mine in zip(shares, kept):
            assert k[row].tolist() == sorted(k[row].tolist(), reverse=True)  # a kept prefix
            assert mine.tolist() == sorted(mine.tolist())
        if len(kept[0]) >= 8:  # balanced causal work: the anchor sums agree within 10%
            sums = [float(k.sum()) for k in kept]
            assert max(sums) <= 1.1 * min(sums)


def test_lengths_and_blocks_split_evenly():
    for multiple, cp in ((1, 2), (2, 2), (16, 4), (1, 3)):
        s = sequence_multiple(multiple, cp)
        assert s % (2 * cp) == 0 and (s // cp) % multiple == 0
        n = block_multiple(multiple, 8, cp) // 8
        assert n % (2 * cp) == 0 and (n // cp * 8) % multiple == 0
    assert sequence_multiple(16, 1) == 16 and block_multiple(16, 8, 1) == 16


def _error(argv, capsys, world_size) -> str:
    with pytest.raises(SystemExit):
        parse_plan(argv, world_size=world_size)
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra,world,message", [
    (["--context-parallel-size", "0"], 1, "--context-parallel-size=0 must be >= 1"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"], 2,
     "world size 2 is not divisible by --tensor-model-parallel-size x "
     "--pipeline-model-parallel-size x --context-parallel-size = 2 x 1 x 2"),
    (["--context-parallel-size", "2", "--cp-comm-type", "ring"], 2, "--cp-comm-type"),
])
def test_bad_layouts_fail_up_front(target, data, extra, world, message, capsys):
    assert message in _error(flags(target, data[0]) + extra, capsys, world)


def test_unsplit_targets_and_the_embedded_default_are_refused(tmp_path, capsys):
    """The local backend splits the sequence only in its SDPA core attention; the embedded
    default regenerates and decodes, which CP does not split."""
    mla = tiny_deepseek_dir(tmp_path / "deepseek")
    line = _error(["--target", mla, "--mask-token-id", "3", "--train-data", "chat.jsonl",
                   "--context-parallel-size", "2"], capsys, 2)
    assert "--context-parallel-size=2: the target" in line and "multi-latent attention" in line
    assert _error(["--context-parallel-size", "2"], capsys, 2).endswith(
        "--context-parallel-size=2: the embedded default regenerates its data and measures "
        "decoding, which do not split the sequence; pass --train-data")


def test_memory_model_splits_the_target_and_the_blocks():
    """CP divides the target's activations and the draft's block tokens, shards the optimizer
    like DP, and leaves the weights and the draft's whole context on every rank."""
    m = Shapes(hidden=4096, ffn=12288, heads=32, groups=8, head_dim=128, vocab=151936,
               layers=34, taps=5, draft_layers=5, draft_ffn=12288, draft_heads=32,
               draft_groups=8, draft_head_dim=128)
    one, four = (step_memory(m, Layout(cp=cp, dp=8 // cp), 131072, 512, 16) for cp in (1, 4))
    assert four["target forward"] * 4 == one["target forward"]
    assert four["draft blocks"] * 4 == one["draft blocks"]
    for term in ("target weights", "draft weights, grads", "optimizer shard"):
        assert four[term] == one[term]
    assert 0.8 < four["draft context"] / one["draft context"] < 1
    assert four["peak"] < one["peak"] < 80e9
