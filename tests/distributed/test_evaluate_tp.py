"""Speculative decoding at TP=2 (vocab-parallel argmax, or a DFlash2 draft's vocab-parallel
selector walk: codebooks split over the vocabulary) proposes and emits exactly the TP=1 tokens,
which equal target-only greedy decoding."""
import os

import pytest
import torch
import torch.distributed as dist

from tests.interop_testing import (VOCAB, draft_config, reference_model, shared_tmp_dir,
                                   target_dir, write_reference_dir)
from megatron_dflash.evaluate import build_decoder, evaluate
from tests.dflash2_testing import dflash2_config, file_tensors, reference_dflash2


@pytest.mark.world(2)
@pytest.mark.parametrize("variant", ["dflash", "dflash2"])
def test_tp2_decoding_equals_tp1(utils, variant):
    with shared_tmp_dir() as shared:
        target, draft = (os.path.join(shared, n) for n in ("target", "draft"))
        if dist.get_rank() == 0:
            target_dir(target, seed=31)
            if variant == "dflash":
                cfg = draft_config()
                write_reference_dir(draft, cfg, reference_model(cfg, 32).state_dict())
            else:
                cfg = dflash2_config()
                write_reference_dir(draft, cfg, file_tensors(reference_dflash2(cfg, 32)))
        dist.barrier()
        g = torch.Generator().manual_seed(33)
        prompts = [torch.randint(4, VOCAB, (6,), generator=g).tolist() for _ in range(2)]
        utils.initialize_model_parallel(1)
        tp1, proposed1 = _recorded(build_decoder(target, draft), prompts)
        utils.initialize_model_parallel(2)
        tp2, proposed2 = _recorded(build_decoder(target, draft), prompts)
    assert tp2[0].lossless
    assert [d.tokens for d, _ in tp2[1]] == [d.tokens for d, _ in tp1[1]]
    assert proposed2 == proposed1 and len(proposed1) > 4


def _recorded(decoder, prompts):
    """(evaluate's result, every block the draft proposed)."""
    proposed, propose = [], decoder.draft.propose

    def record(*args):
        tokens = propose(*args)
        proposed.append(tokens.tolist())
        return tokens
    decoder.draft.propose = record
    return evaluate(decoder, prompts, 16, warmup=False), proposed
