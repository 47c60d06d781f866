"""What one DFlash training step holds in memory per rank, written out: the analytic model that
`tools/measure_memory.py` prints for a Qwen3-8B-like target at long sequences and checks against
runs measured on the CPU at small widths.

Notation (per rank, micro-batch b): S tokens per sequence; TP, PP, CP, DP the parallel sizes;
s = S/CP the target's tokens on the rank (megatron's load-balanced chunks) and s' = s/TP under
sequence parallelism (else s) its residual stream; S' = S/TP under SP (else S) the draft's
context rows; Q = N*B/CP the rank's block tokens (N blocks of B, dealt over CP), Q' likewise;
M <= Q(B-1)/B the supervised rows; H hidden, F FFN width, q = heads*head_dim and g = query
groups*head_dim (the K or the V width), all per TP rank where TP splits them (F, q, g of the
target as t_F, t_q, t_g, of the draft as F, q, g); K taps; L_d draft layers; V/TP the vocabulary slice; e bytes per element (2 bf16, 4 fp32).

  static    W_target*e + W_draft*(e + 4 + o/(DP*CP))      weights; the draft's fp32 gradient
            buffer; the distributed optimizer's shard (o = 12 in bf16: fp32 master + Adam m, v;
            o = 8 in fp32). CP shares the optimizer like DP, not the weights.
  target    b*e*[s'*H*(K + 2) + s*5*t_F]                   one layer under no_grad: the taps
            captured so far, residual + normed input, SwiGLU's fc1 out (2F), silu, product, and
            one more F-wide temporary; its attention (when larger): b*e*s*2*(t_q + 2t_g) +
            b*e*S*2*t_g (K/V gathered over CP: local backend) + 6*b*s*S bytes (the local
            backend's bool mask and SDPA's float copy, when CP > 1 or a window needs a mask);
            PP > 1: + b*e*s'*H*(1 + K), the payload received from the previous stage
  draft     b*e*[s'*H*(1 + K)                              the target's output and its taps
                 + S'*H*(K + 2 + n)                        the gathered taps (fc's saved input),
                                                           fc out, the context (n = 1: the local
                                                           norm's saved intermediate, 0 with TE)
                 + L_d*S*((q + 2g) + 3g + a*2q)            per layer, the context's fused QKV
                                                           (kept by the k-norm's view), k-norm,
                                                           rotated K, V; a = 1 for the CPU gather
                                                           attention (K/V expanded to every head)
                 + L_d*Q'*(8H) + L_d*Q*(5F + q + 2g + 4q)]  per layer, the block tokens' norms,
                                                           residuals, SwiGLU, QKV, q/k, out
            + L_d*4*b*Q*(S + B)*heads   (CPU gather attention: its fp32 probabilities; FlexAttention
                                         on GPU keeps O(Q + S))
            + b*e*M*H*(2 + d) + 16*b*R*V/TP    the loss: the rows, their gradient (+ the teacher's
                                               rows, d = 1 when distilling, and under CP the
                                               target's output gathered: 2*b*e*S'*H); a chunk of R
                                               rows of fp32 logits, softmax, gradient, teacher
            (or, when larger, 6*b*min(Q, 256)*(S + B)*heads: the CPU gather attention's scores
             of one chunk in flight)
  peak      static + max(target, draft)

Transformer Engine's layers keep at most what the local layers keep (fused norms and SwiGLU), so
with `gpu=True` (TE's flash CP attention for the target, FlexAttention for the draft) the model
is an upper bound; with `gpu=False` it models the local backend on the CPU, which the tool
measures.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class Shapes:
    """Target and draft sizes the model needs (whole, before any split)."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    layers: int
    """Target layers built: up to the deepest tap, or all of them (+ final norm) to distil."""
    taps: int
    draft_layers: int
    draft_ffn: int
    draft_heads: int
    draft_groups: int
    draft_head_dim: int
    tied: bool = False
    final_norm: bool = False
    qk_norm: bool = True


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False


def target_parameters(m: Shapes, tp: int = 1, pp: int = 1, stage: int | None = None) -> int:
    """The target's parameters on one TP rank of a stage (default: the last, which the draft
    shares): its layers, the embedding on the first stage, the output layer on the last."""
    stage = pp - 1 if stage is None else stage
    per_stage = -(-m.layers // pp) if pp > 1 else m.layers
    layers = max(0, min(m.layers, (stage + 1) * per_stage) - stage * per_stage)
    q, g = m.heads * m.head_dim, m.groups * m.head_dim
    layer = (m.hidden * (q + 2 * g) + q * m.hidden + 3 * m.hidden * m.ffn) // tp \
        + 2 * m.hidden + (2 * m.head_dim if m.qk_norm else 0)
    embedding = m.vocab * m.hidden // tp
    out = layers * layer
    out += embedding if stage == 0 else 0
    if stage == pp - 1:
        out += (0 if m.tied and pp == 1 else embedding) + (m.hidden if m.final_norm else 0)
    return out


def draft_parameters(m: Shapes, tp: int = 1) -> int:
    """The draft's parameters on one TP rank: fc and the norms whole, the layers split."""
    q, g = m.draft_heads * m.draft_head_dim, m.draft_groups * m.draft_head_dim
    layer = (m.hidden * (q + 2 * g) + q * m.hidden + 3 * m.hidden * m.draft_ffn) // tp \
        + 2 * m.hidden + 2 * m.draft_head_dim
    return m.taps * m.hidden * m.hidden + 2 * m.hidden + m.draft_layers * layer


def step_memory(m: Shapes, layout: Layout, seq_len: int, num_blocks: int, block_size: int, *,
                micro_batch: int = 1, bf16: bool = True, distill: bool = False,
                chunk_rows: int = 512, gpu: bool = True, window: bool = False) -> dict:
    """Bytes per rank of the last pipeline stage (which holds the draft), by term of the module
    docstring, and their `peak`."""
    L, b = layout, micro_batch
    e = 2 if bf16 else 4
    H, tp = m.hidden, L.tp
    s = seq_len // L.cp
    s_r = s // tp if L.sp else s
    S, S_r = seq_len, seq_len // tp if L.sp else seq_len
    Q = num_blocks * block_size // L.cp
    Q_r = Q // tp if L.sp else Q
    M = Q * (block_size - 1) // block_size
    tq, tg = m.heads * m.head_dim // tp, max(1, m.groups // tp) * m.head_dim
    q, g = m.draft_heads * m.draft_head_dim // tp, max(1, m.draft_groups // tp) * m.draft_head_dim
    heads = m.draft_heads // tp
    w_d = draft_parameters(m, tp)
    out = {
        "target weights": target_parameters(m, tp, L.pp) * e,
        "draft weights, grads": w_d * (e + 4),
        "optimizer shard": w_d * (12 if bf16 else 8) // (L.dp * L.cp),
    }
    mlp = b * e * (s_r * H * (m.taps + 2) + s * 5 * m.ffn // tp)
    attention = b * e * (s_r * H * (m.taps + 2) + 2 * s * (tq + 2 * tg) + S * 2 * tg
                         * (L.cp > 1)) + (6 * b * s * S if not gpu and (L.cp > 1 or window)
                                          else 0)
    out["target forward"] = max(mlp, attention) + (b * e * s_r * H * (1 + m.taps)
                                                   if L.pp > 1 else 0)
    gather = 0 if gpu else 1
    context = b * e * (s_r * H * (1 + m.taps) + S_r * H * (m.taps + 2 + gather)
                       + m.draft_layers * S * ((q + 2 * g) + 3 * g + gather * 2 * q))
    blocks = b * e * m.draft_layers * (Q_r * 8 * H + Q * (5 * m.draft_ffn // tp + q + 2 * g
                                                          + 4 * q))
    probabilities = 0 if gpu else 4 * b * m.draft_layers * Q * (S + block_size) * heads
    loss = b * e * (M * H * (2 + distill) + distill * (L.cp > 1) * 2 * S_r * H) \
        + 16 * b * min(M, chunk_rows) * m.vocab // tp
    in_flight = 0 if gpu else 6 * b * min(Q, 256) * (S + block_size) * heads
    out["draft context"] = context
    out["draft blocks"] = blocks + probabilities
    out["draft loss / attention in flight"] = loss + in_flight
    static = sum(out[k] for k in ("target weights", "draft weights, grads", "optimizer shard"))
    draft = context + blocks + probabilities + max(loss, in_flight)
    out["peak"] = static + max(out["target forward"], draft)
    return out
