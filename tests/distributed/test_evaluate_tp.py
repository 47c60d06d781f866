"""Speculative decoding at TP=2 (vocab-parallel logits gathered for the argmax) emits exactly the
TP=1 tokens, which equal target-only greedy decoding."""
import os

import pytest
import torch
import torch.distributed as dist

from tests.interop_testing import (VOCAB, draft_config, reference_model, shared_tmp_dir,
                                   target_dir, write_reference_dir)
from megatron_dflash.evaluate import build_decoder, evaluate


@pytest.mark.world(2)
def test_tp2_decoding_equals_tp1(utils):
    with shared_tmp_dir() as shared:
        target, draft = (os.path.join(shared, n) for n in ("target", "draft"))
        cfg = draft_config()
        if dist.get_rank() == 0:
            target_dir(target, seed=31)
            write_reference_dir(draft, cfg, reference_model(cfg, 32).state_dict())
        dist.barrier()
        g = torch.Generator().manual_seed(33)
        prompts = [torch.randint(4, VOCAB, (6,), generator=g).tolist() for _ in range(2)]
        utils.initialize_model_parallel(1)
        tp1 = [d.tokens for d, _ in evaluate(build_decoder(target, draft), prompts, 16,
                                             warmup=False)[1]]
        utils.initialize_model_parallel(2)
        report, pairs = evaluate(build_decoder(target, draft), prompts, 16, warmup=False)
    assert report.lossless
    assert [d.tokens for d, _ in pairs] == tp1
