"""The lean training step: only the target work the loss needs, the LM head and loss in bounded
memory, fixed shapes for compiled attention, micro-batches prepared ahead."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_dflash.data.dataset import build_dataset, collate
from megatron_dflash.head_loss import vocab_head_loss
from megatron_dflash.loss import per_token_loss
from megatron_dflash.sparse_attention import build_flex_block_mask
from megatron_dflash.targets import FeatureCapture, target_forward
from megatron_dflash.training.microbatches import MicroBatches
from megatron_dflash.training.prefetch import Prefetcher
from megatron_dflash.training.pretrain import parse_plan
from megatron_dflash.training.step import loss_func, prepare_microbatch, to_device
from tests.dflash_testing import pattern_dataset, tiny_target_dir
from tests.step_testing import MASK, TAPS, step_modules, step_tokens


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target"), layers=4)


def _head_case(m=37, hidden=32, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(rows=torch.randn(m, hidden, generator=g), weight=0.3 * torch.randn(vocab, hidden, generator=g),
                labels=torch.randint(0, vocab, (m,), generator=g),
                weights=torch.rand(m, generator=g) + 0.05,
                teacher=torch.randn(m, hidden, generator=g))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_chunked_head_loss_equals_unchunked(utils, alpha):
    """Loss, row gradients and argmaxes of the chunked head equal the full-logits objective."""
    utils.initialize_model_parallel(1)
    c = _head_case()
    full_rows = c["rows"].clone().requires_grad_()
    logits = F.linear(full_rows, c["weight"])
    teacher_logits = F.linear(c["teacher"], c["weight"])
    ref = (c["weights"] * per_token_loss(logits, c["labels"], teacher_logits, alpha)).sum()
    ref.backward()
    rows = c["rows"].clone().requires_grad_()
    loss, predicted, teacher_predicted = vocab_head_loss(
        rows, c["weight"], c["labels"], c["weights"], teacher_rows=c["teacher"],
        distill_weight=alpha, chunk_rows=8)
    (2.5 * loss).backward()  # the upstream gradient scales the stored row gradient
    assert (loss - ref).abs() <= 1e-6 * ref.abs()
    assert (rows.grad - 2.5 * full_rows.grad).abs().max() <= 1e-6
    assert torch.equal(predicted, logits.argmax(-1))
    assert torch.equal(teacher_predicted, teacher_logits.argmax(-1))


class _LargestTensor(TorchDispatchMode):
    """The most elements any op's new output had (views allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not func.is_view:
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_head_loss_never_holds_more_than_a_chunk_of_logits(utils):
    utils.initialize_model_parallel(1)
    c = _head_case(m=64, vocab=500)
    rows = c["rows"].clone().requires_grad_()
    with _LargestTensor() as seen:
        loss, _, _ = vocab_head_loss(rows, c["weight"], c["labels"], c["weights"],
                                     teacher_rows=c["teacher"], distill_weight=0.5, chunk_rows=16)
        loss.backward()
    assert seen.largest == 16 * 500  # one chunk of logits; never the 64 x 500 of all rows
    with pytest.raises(ValueError, match="teacher_rows"):
        vocab_head_loss(rows, c["weight"], c["labels"], c["weights"], distill_weight=0.5)


def _loss_and_grads(module, mb, alpha):
    module.draft.zero_grad()
    output = module(mb["tokens"], mb["position_ids"], mb["block_input_ids"], mb["attention_mask"],
                    mb["block_position_ids"])
    loss, report = loss_func(mb, module, 8, alpha, 16, 1.0, output)
    (loss / report["loss"][1]).backward()
    grads = {n: p.grad.clone() for n, p in module.draft.named_parameters()}
    return float(loss / report["loss"][1]), grads, report


def test_truncated_target_gives_the_same_features_and_loss(utils, target_dir):
    """Without distillation the target stops at the deepest tap: no later layer, no final norm,
    no LM head run — and the same features, loss and draft gradients as the whole target."""
    utils.initialize_model_parallel(1)
    full, cfg = step_modules(target_dir)
    lean, _ = step_modules(target_dir, last_layer=max(TAPS))
    assert len(lean.target.decoder.layers) == 3 and lean.target.decoder.final_layernorm is None
    tokens, loss_mask = step_tokens()
    positions = torch.arange(48).expand(2, 48)
    features = [target_forward(m.target, tokens, positions, FeatureCapture(m.target, TAPS))[1]
                for m in (full, lean)]
    assert torch.equal(features[0], features[1])
    mb = prepare_microbatch(tokens, loss_mask, cfg, torch.Generator().manual_seed(1))
    (loss, grads, _), (lean_loss, lean_grads, _) = (_loss_and_grads(m, mb, 0.0) for m in (full, lean))
    assert abs(loss - lean_loss) <= 1e-6
    for n, g in grads.items():
        assert (g - lean_grads[n]).abs().max() <= 1e-6, n
    flops, runs = [], []
    for m in (full, lean):
        ran = []
        for module in [m.target.output_layer, *m.target.decoder.layers]:
            module.register_forward_hook(lambda mod, a, out, ran=ran: ran.append(mod))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(mb["tokens"], mb["position_ids"], mb["block_input_ids"], mb["attention_mask"],
              mb["block_position_ids"])
        flops.append(counter.get_total_flops())
        runs.append(ran)
    # The module never runs the target's LM head; the lean target runs one layer fewer.
    assert runs[0] == list(full.target.decoder.layers) and runs[1] == list(lean.target.decoder.layers)
    assert flops[1] < flops[0]


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_padding_sequence_and_anchors_changes_nothing(utils, target_dir, attention):
    """Padding S (to a bucket) and N (to --num-anchors and the block multiple) with unkept blocks
    leaves the loss, the draft gradients and the metrics as they were (distillation on)."""
    utils.initialize_model_parallel(1)
    module, cfg = step_modules(target_dir, seed=5, attention=attention)
    tokens, loss_mask = step_tokens(seq_len=40)
    samples = [{"tokens": t, "loss_mask": m} for t, m in zip(tokens, loss_mask)]
    results = []
    for buckets, multiple in ((None, 1), ([24, 64], 64)):  # 40 -> 64 tokens; 4 -> 8 blocks
        batch = collate(samples, 0, buckets=buckets)
        mb = prepare_microbatch(batch["tokens"], batch["loss_mask"], cfg,
                                torch.Generator().manual_seed(2), attention, multiple,
                                batch["lengths"])
        assert mb["tokens"].shape[1] == (40 if buckets is None else 64)
        assert mb["block_input_ids"].shape[1] == (32 if multiple == 1 else 64)
        results.append(_loss_and_grads(module, mb, 0.5))
    (loss, grads, report), (padded_loss, padded_grads, padded_report) = results
    assert abs(loss - padded_loss) <= 1e-6 * abs(loss)
    for n, g in grads.items():
        assert (g - padded_grads[n]).abs().max() <= 1e-6, n
    assert torch.equal(report["correct"], padded_report["correct"])
    assert torch.equal(report["total"], padded_report["total"])


def _plan(target_dir, data, *extra):
    """The run's plan and its training data (blocks of 8, taps `TAPS`, 4 anchors)."""
    plan = parse_plan(["--target", target_dir, "--mask-token-id", str(MASK), "--train-data", *data,
                       "--seq-length", "48", "--block-size", "8", "--num-anchors", "4",
                       "--target-layer-ids", *map(str, TAPS), "--micro-batch-size", "2",
                       "--global-batch-size", "2", *extra])
    return plan, build_dataset(plan.data.train, None, 48)[0]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Conversations of 20, 32 and 48 tokens."""
    d = tmp_path_factory.mktemp("mixed")
    return [pattern_dataset(d / f"n{n}", 6, n, seed=n) for n in (20, 32, 48)]


@pytest.mark.parametrize("buckets,lengths", [(1, {48}), (3, {16, 32, 48})])
def test_microbatches_have_one_shape_per_bucket(utils, target_dir, mixed_data, buckets, lengths):
    utils.initialize_model_parallel(1)
    plan, train = _plan(target_dir, mixed_data, "--seq-length-buckets", str(buckets))
    batches = MicroBatches(train, plan, 0, 0)
    shapes = {}
    for _ in range(9):
        mb = batches.next()
        s = mb["tokens"].shape[1]
        shapes.setdefault(s, set()).add((tuple(mb["block_input_ids"].shape),
                                         tuple(mb["attention_mask"].anchors.shape),
                                         tuple(mb["block_position_ids"].shape)))
    assert set(shapes) <= lengths and max(shapes) == 48
    assert all(len(v) == 1 for v in shapes.values()), shapes
    assert {v.pop()[0] for v in shapes.values()} == {(2, 32)}  # N = --num-anchors always


def test_flex_block_mask_is_traced_once_across_microbatches(utils, target_dir, mixed_data):
    """The block masks of every micro-batch of a run, for a full and a causal sliding-window
    layer alike, go through one compiled graph: their varying data (anchors, the layer's
    causality and window) are tensors, and the shapes are fixed (dynamo's counters; the eager
    backend, since inductor cannot compile FlexAttention's CPU kernels here — the guards are the
    same)."""
    utils.initialize_model_parallel(1)
    plan, train = _plan(target_dir, mixed_data, "--attention", "sparse",
                        "--num-anchors", "12",  # 20-token samples hold 8
                        "--num-draft-layers", "2", "--draft-layer-types", "sliding", "full",
                        "--draft-sliding-window", "12")
    kinds = plan.dflash.layer_attentions()
    assert [(k.causal, k.window) for k in kinds] == [(True, 12), (False, None)]
    batches = MicroBatches(train, plan, 0, 0)
    torch._dynamo.reset()
    counters.clear()
    create = torch.compile(create_block_mask, backend="eager")
    eligible = set()
    for _ in range(9):
        mask = batches.next()["attention_mask"]
        eligible.add(int(mask.keep.sum()))
        for kind in kinds:
            build_flex_block_mask(mask.for_layer(kind), create)
    assert len(eligible) > 1  # the data really varied (some samples hold fewer anchors)
    assert counters["stats"]["unique_graphs"] == 1


def test_prefetched_microbatches_are_the_same_and_on_the_device(utils, target_dir, mixed_data):
    """Prepared ahead in a thread: the same micro-batches, in order, each with the data position
    after it, handed out on the device asked for; a producer error reaches the consumer."""
    utils.initialize_model_parallel(1)
    plan, train = _plan(target_dir, mixed_data, "--attention", "sparse")
    expected = MicroBatches(train, plan, 0, 0)
    with MicroBatches(train, plan, 0, 0).prefetcher(torch.device("cpu"), depth=3) as ahead:
        for i in range(5):
            mb, position = ahead.next()
            want = expected.next()
            assert position == expected.sampler.consumed_samples == 2 * (i + 1)
            assert torch.equal(mb["tokens"], want["tokens"])
            assert torch.equal(mb["attention_mask"].anchors, want["attention_mask"].anchors)
    on_meta = to_device(want, torch.device("meta"))
    assert {v.device.type for k, v in on_meta.items() if k != "attention_mask"} == {"meta"}
    assert on_meta["attention_mask"].anchors.is_meta

    def broken():
        raise OSError("disk gone")
    with Prefetcher(broken, torch.device("cpu")) as ahead, pytest.raises(OSError, match="disk"):
        ahead.next()
