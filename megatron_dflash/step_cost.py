"""What one DFlash training step costs: its FLOPs, and its time and peak memory measured so that
counting FLOPs can never discard them. The benchmark (`tools/benchmark_dflash.py`, and SpecForge's
side in `tools/specforge_baseline.py`) reports MFU = useful FLOPs / step time / device peak.

Useful FLOPs per step (`step_flops` with its defaults; a multiply-add is 2). Only the work the
objective needs, whoever runs it: neither masked-out attention, nor the unused query rows of the
context, nor target layers past the deepest tap, nor any target LM head counts. S = sequence,
Q = N*B block tokens, c_j = context block j sees (its anchor, 0 when unkept), M = supervised slots
(at most N*(B-1)), H hidden, V vocab, q/kv = query/key-value width (heads x head_dim), F = FFN
width, K taps, L' = deepest tap + 1:
  target forward   L' x per layer 2S*H*(2q + 2kv) + 6S*H*F + 2q*S*(S+1) (causal attention)
  draft forward    fc 2S*K*H*H; per layer 2Q*H*(2q + 2kv) + 2S*H*2kv (context K/V) + 6Q*H*F
                   + 4q*P, P = B*sum_j(c_j + B) visible (query, key) pairs
  draft backward   2x the layers and attention; 1x fc (weight gradient only: its input is the
                   frozen target's)
  draft LM head    2M*H*V forward + 2M*H*V input gradient (the head is frozen)

Executed FLOPs, analytic (`step_flops` told what an implementation runs instead): the same parts
with the target layers it runs (`target_layers`, and `target_head_rows` rows of the target's LM
head); the attention pairs its kernel computes (`flex_attention_pairs`: every 128x128 tile that
FlexAttention's BlockMask does not skip, partial tiles in full; `gather_attention_pairs`: the CPU
gather path's chunks; `dense_attention_pairs`: all Q x (S+Q)); the draft LM head over the rows it
projects (`head_rows`) times its passes (`head_passes`: forward and input gradient = 2, plus 1
when it is recomputed in backward); the context's query rows where the draft's fused QKV
projection makes them (`context_queries`: 2S*H*q per layer, 2x in backward). Attention backward
stays 2x its forward (a flash kernel's recomputed scores are not counted).

Counted FLOPs (`count_flops`): one step under torch's `FlopCounterMode`, which sees what goes
through the dispatcher — not Transformer Engine's GEMMs, nor FlexAttention (a higher-order op
that torch 2.11's counter rejects with a TypeError, and that dynamo does not compile under the
mode). A failure comes back as its reason, never raised.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Callable

import torch
from torch.utils import flop_counter

from megatron_dflash.sparse_attention import GATHER_CHUNK_QUERIES, chunk_prefixes

# FlexAttention's BlockMask tile (queries x keys) in torch 2.11.
FLEX_TILE = 128


def step_flops(t, d, vocab: int, seq_len: int, context_lengths: torch.Tensor, supervised: int, *,
               target_layers: int | None = None, target_head_rows: int = 0,
               attention_pairs: int | None = None, head_rows: int | None = None,
               head_passes: int = 2, context_queries: bool = False) -> dict:
    """FLOPs of one step by part (see the module docstring): useful with the defaults, executed
    when told what an implementation runs. `t` is the target's TransformerConfig, `d` the
    resolved DFlashConfig, `context_lengths` [b, N] what each block sees, `supervised` the number
    of supervised block slots (M); `target_layers` default L', `attention_pairs` default the
    visible pairs, `head_rows` default M; `context_queries`: the draft's fused QKV projection
    also makes the context's (unused) query rows. DFlash2's convolutions and selector are not
    counted."""
    b, n = context_lengths.shape
    S, B, H = seq_len, d.block_size, t.hidden_size
    Q = n * B
    tq, tkv = t.num_attention_heads * t.kv_channels, t.num_query_groups * t.kv_channels
    dq, dkv = d.num_attention_heads * d.head_dim, d.num_key_value_heads * d.head_dim
    target_layer = 2 * S * H * (2 * tq + 2 * tkv) + 6 * S * H * t.ffn_hidden_size \
        + 2 * tq * S * (S + 1)
    draft_layer = 2 * Q * H * (2 * dq + 2 * dkv) + 2 * S * H * (2 * dkv + context_queries * dq) \
        + 6 * Q * H * d.ffn_hidden_size
    visible = B * (int(context_lengths.sum()) + b * n * B)  # (query, key) pairs, whole batch
    pairs = visible if attention_pairs is None else attention_pairs
    attention = 4 * dq * pairs
    fc = 2 * S * len(d.target_layer_ids) * H * H
    layers = max(d.target_layer_ids) + 1 if target_layers is None else target_layers
    out = {
        "target_forward": b * layers * target_layer + 2 * target_head_rows * H * vocab,
        "draft_forward": d.num_draft_layers * (b * draft_layer + attention) + b * fc,
        "draft_backward": 2 * d.num_draft_layers * (b * draft_layer + attention) + b * fc,
        "draft_lm_head": head_passes * 2 * (supervised if head_rows is None else head_rows)
        * H * vocab,
    }
    out["total"] = sum(out.values())
    out["draft_attention_density"] = pairs / dense_attention_pairs(b, n, S, B)
    return out


def dense_attention_pairs(batch: int, num_blocks: int, seq_len: int, block_size: int) -> int:
    """(query, key) pairs of the dense DFlash attention: every block token against every key."""
    q = num_blocks * block_size
    return batch * q * (seq_len + q)


def flex_attention_pairs(context_lengths: torch.Tensor, seq_len: int, block_size: int,
                         tile: int = FLEX_TILE) -> int:
    """(query, key) pairs FlexAttention computes for the DFlash mask: for each tile of `tile`
    queries (the last padded up), every `tile`-key tile holding a key one of its blocks sees —
    the context tiles up to the largest c_j of its blocks and the tiles of their own block keys —
    each in full."""
    b, n = context_lengths.shape
    pairs = 0
    for start in range(0, n * block_size, tile):
        first, last = start // block_size, min(n, -(-(start + tile) // block_size)) - 1
        context = -(-context_lengths[:, first:last + 1].amax(1) // tile)  # [b] tiles
        own_lo = (seq_len + first * block_size) // tile
        own_hi = (seq_len + (last + 1) * block_size - 1) // tile
        overlap = (context - own_lo).clamp(0, own_hi - own_lo + 1)
        pairs += int((context + (own_hi - own_lo + 1) - overlap).sum())
    return pairs * tile * tile


def gather_attention_pairs(context_lengths: torch.Tensor, block_size: int,
                           chunk_queries: int = GATHER_CHUNK_QUERIES) -> int:
    """(query, key) pairs `sparse_attention.gather_block_attention` computes: each chunk of
    consecutive blocks against the context prefix its blocks share and its own block keys."""
    b, n = context_lengths.shape
    per_chunk = max(1, chunk_queries // block_size)
    prefixes = chunk_prefixes(context_lengths, per_chunk)
    return sum(b * min(per_chunk, n - start) * block_size * (prefix + block_size)
               for start, prefix in zip(range(0, n, per_chunk), prefixes))


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode has no formula for torch's CPU flash attention (SDPA on CPU): count its
    two matmuls per (query, key) pair as torch counts GPU SDPA (backward: four), GQA included,
    halved when causal (the kernel skips the masked half)."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    def matmuls(query, key, value, is_causal):  # shapes
        b, heads, s_q, d = query
        return 2 * b * heads * s_q * key[-2] * (d + value[-1]) // (2 if is_causal else 1)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_val=None,
                 **kwargs):
        return matmuls(query, key, value, is_causal)

    @flop_counter.register_flop_formula(
        aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                  *args, out_val=None, **kwargs):
        return 2 * matmuls(query, key, value, is_causal)


def count_flops(step: Callable[[], object]) -> dict:
    """Run `step` once under FlopCounterMode: {"counted_flops": n}, or {"counter_error": why}
    when the step fails under the counter (the failure is the count's, not the measurement's)."""
    _register_cpu_attention_flops()
    try:
        with flop_counter.FlopCounterMode(display=False) as counter:
            step()
    except Exception as error:  # noqa: BLE001 — whatever it is, it is recorded
        return {"counter_error": f"{type(error).__name__}: {error}"[:500]}
    return {"counted_flops": counter.get_total_flops()}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    """This process's peak: the CUDA allocator's, or the peak RSS on CPU (weights included)."""
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return peak / 2**30


def measure_step(step: Callable[[], object], warmup: int, steps: int,
                 record: Callable[[dict], None], count_with: Callable[[], object] | None) -> dict:
    """Seconds per step over `steps` (>= 1) after `warmup`, the last step's loss, the peak memory
    and the process's CPU seconds per step (all its threads: on a shared CPU, wall time well
    above CPU time / threads means the step waited for the cores), handed to `record` (to be
    written down) before anything is counted; then, unless
    `count_with` is None (the counter cannot see this step), one more step, `count_with`, under
    `count_flops`, its count or failure recorded too."""
    for _ in range(warmup):
        step()
    synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    synchronize()
    result = {"seconds": (time.perf_counter() - start) / steps, "loss": float(loss),
              "peak_memory_gib": peak_memory_gib(),
              "process_cpu_seconds": (time.process_time() - cpu) / steps}
    record(result)
    if count_with is not None:
        result.update(count_flops(count_with))
        record(result)
    return result


def add_case_arguments(p: argparse.ArgumentParser) -> None:
    """The flags both sides' one-case scripts share (`tools/benchmark_step.py`,
    `tools/specforge_baseline.py`), so the benchmark hands them one shape the same way."""
    p.add_argument("--target-config", required=True,
                   help="directory of the target's HF config.json (weights are random)")
    p.add_argument("--seq-length", type=int, default=3072)
    p.add_argument("--num-anchors", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-draft-layers", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="write the result here (before counting, after)")
    p.add_argument("--break-flop-counter", action="store_true", help=argparse.SUPPRESS)  # tests


def json_recorder(path: str | None, result: dict) -> Callable[[dict], None]:
    """A `measure_step` record function: merges into `result` and rewrites `path` whole each
    time (None: nowhere), so a case stopped later keeps what it measured."""
    def record(update: dict) -> None:
        result.update(update)
        if path:
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
    return record
