"""Regenerate the assistant turns of JSONL conversations with the frozen megatron target (the
paper's recipe, spec §6.1: the drafter learns what the target itself writes), optionally
capturing the target's tapped hidden states for the offline feature cache during generation.

Why not megatron.core.inference's engines. Tried on CPU with gloo (megatron-core 0.19.2):
`StaticInferenceEngine` runs on `DynamicInferenceEngine`, whose `DynamicInferenceContext`
fails at construction without an NVIDIA driver; its fallback, the legacy static batch
(`TextGenerationController.generate_all_output_tokens_static_batch`), does run the forward steps
on CPU but times every step with `torch.cuda.Event(enable_timing=True).elapsed_time`, which has
no CPU counterpart, and fails after the last step. Even on a GPU it stops on one termination id
(`tokenizer.eod`, where a target may stop on several), draws samples for the whole batch from
one generator (a conversation's sample would depend on its batch-mates, not on its id alone),
and pads prompts to the right, so a row's tokens past its prompt are computed from its
neighbours' schedule. So batches run over megatron's `StaticInferenceContext` KV cache here,
the way `megatron_dflash.evaluate` drives it:

* prompts are left-padded to the longest of the batch; every row then decodes at the same cache
  offset. An explicit mask (bool, True = masked, applied by the local backend's core attention;
  Transformer Engine would ignore it) hides the padding from real tokens and the future from
  everyone (a padding query sees the padding before it, so no row is fully masked). megatron's
  RoPE takes positions from the cache offset, so a row padded by p sits p positions later than
  alone; rotary attention depends only on relative positions, so logits agree with unpadded
  decoding up to rounding (fp32: greedy equals HF `generate` token for token, tested).
* only the last position reaches the LM head (a pre-hook on the output layer): a prefill
  produces one row of logits per prompt, not [b, s, V].
* sampling reuses megatron's `TorchSampling.filter_logits` (temperature, top-p) and draws from one
  generator per conversation, seeded from (--seed, conversation id, turn), so a sample does not
  depend on the batch, the shard or the restart.

Turns. User/system turns are kept; each assistant turn is regenerated in order with the
conversation so far as the prompt (or only the last with `last_turn_only`); a conversation that
ends with a user turn gets one new assistant turn. The prompt of a later turn is the earlier
prompt's token ids + the generated ids + the tokens of what the chat template renders between
them (checked prefix-stable, else the conversation is reported and skipped), so the ids are
exactly those generated, never re-tokenised; the feature cache stores them with a loss mask of 1
on every regenerated turn's tokens (its stop token included) and 0 elsewhere, and the features
of the last turn's generation (prefill + every decode step, plus one step that feeds the last
token) cover the whole conversation.

Sharding and resume. Conversation i belongs to generation replica i % R; each replica's leader
appends finished conversations to its own part file (flush + fsync per line); a restart reads the
part files (a torn last line is cut off) and skips the ids already there; at the end rank 0
writes `output` atomically in input order from the part files. The ranks of one replica are a
TP group, widened to the expert-parallel group for an MoE target whose experts span data-parallel
ranks (megatron's token dispatcher exchanges those ranks' tokens, so they run the same batch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.sampling.torch_sampling import TorchSampling
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_dflash.atomic import write_text
from megatron_dflash.data.conversations import (MALFORMED, TEMPLATE, UNKNOWN_FORMAT, DataReport,
                                                SampleError, iter_lines, normalize)
from megatron_dflash.targets.capture import FeatureCapture
from megatron_dflash.training.progress import _fmt

DUPLICATE_ID = "duplicate id"
# What normalize() keeps after it: an assistant turn, removed again (a trailing user turn asks for
# one new assistant turn; normalize drops turns after the last assistant turn).
_PLACEHOLDER = {"role": "assistant", "content": ""}


@dataclass
class Sampling:
    """Greedy (temperature 0) or sampled with temperature and nucleus (top-p) filtering."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, conversation_id: str, turn: int, device) -> torch.Generator | None:
        """The generator of one turn of one conversation (None when greedy)."""
        if self.greedy:
            return None
        digest = hashlib.sha256(f"{self.seed}\0{conversation_id}\0{turn}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class Generated:
    tokens: list[int]
    """New tokens, at most max_new_tokens, ending at the first stop token if one was hit."""
    features: torch.Tensor | None = None
    """[prompt + generated tokens, K*H] taps, when capturing."""


class BatchGenerator:
    """Batched generation with a frozen megatron target (local backend, one pipeline stage, any
    TP/EP) over megatron's `StaticInferenceContext`; see the module docstring for the layout.

    Args:
        target: a GPTModel from `build_target(..., backend="local")` with all its layers.
        stop_token_ids: generation of a row ends after any of these.
        layer_ids: taps to capture (DFlash target layer ids), or None for no capture.
    """

    def __init__(self, target, stop_token_ids: Iterable[int],
                 layer_ids: Sequence[int] | None = None):
        self.target = target.eval()
        self.device = next(target.parameters()).device
        self.stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=self.device)
        self.capture = FeatureCapture(target, layer_ids) if layer_ids is not None else None
        self.tp_group = target.pg_collection.tp

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = Sampling(),
                 generators: Sequence[torch.Generator | None] | None = None) -> list[Generated]:
        """Generate for every prompt (token ids) in one batch; `generators` (one per prompt) draw
        the samples unless greedy."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt is empty: generation needs at least one token")
        b, length = len(prompts), max(len(p) for p in prompts)
        total = length + max_new_tokens
        ids = torch.zeros(b, total, dtype=torch.long, device=self.device)
        padding = torch.zeros(b, total, dtype=torch.bool, device=self.device)
        for i, prompt in enumerate(prompts):
            pad = length - len(prompt)
            ids[i, pad:length] = torch.as_tensor(prompt, dtype=torch.long)
            padding[i, :pad] = True
        cache = StaticInferenceContext(b, total)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        counts = torch.zeros(b, dtype=torch.long, device=self.device)
        captured = []
        hooks = self.capture if self.capture is not None else contextlib.nullcontext()
        head = self.target.output_layer.register_forward_pre_hook(_last_position)
        try:
            with hooks:
                logits = self._forward(cache, ids[:, :length], padding, 0, captured)
                for step in range(max_new_tokens):
                    new = self._next(logits, sampling, generators)
                    new = torch.where(done, 0, new)
                    ids[:, length + step] = new
                    counts += ~done
                    done |= torch.isin(new, self.stops)
                    if bool(done.all()) or step + 1 == max_new_tokens:
                        break
                    logits = self._forward(cache, ids[:, length + step:length + step + 1],
                                           padding, length + step, captured)
                if self.capture is not None:  # the last token's taps: one more step
                    self._forward(cache, ids[:, length + step:length + step + 1], padding,
                                  length + step, captured)
        finally:
            head.remove()
        features = torch.cat(captured) if captured else None
        out = []
        for i, prompt in enumerate(prompts):
            n = int(counts[i])
            rows = (features[length - len(prompt):length + n, i] if features is not None
                    else None)
            out.append(Generated(ids[i, length:length + n].tolist(), rows))
        return out

    @torch.no_grad()
    def taps(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The captured taps [T, K*H] of each token sequence, by one batched forward (what
        `generate` captures, for conversations whose features a killed run did not write)."""
        length = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), length, dtype=torch.long, device=self.device)
        padding = torch.zeros_like(ids, dtype=torch.bool)
        for i, tokens in enumerate(sequences):
            ids[i, length - len(tokens):] = torch.as_tensor(tokens, dtype=torch.long)
            padding[i, :length - len(tokens)] = True
        captured = []
        head = self.target.output_layer.register_forward_pre_hook(_last_position)
        try:
            with self.capture:
                self._forward(StaticInferenceContext(len(sequences), length), ids, padding, 0,
                              captured)
        finally:
            head.remove()
        return [captured[0][length - len(s):, i] for i, s in enumerate(sequences)]

    def _forward(self, cache, tokens, padding, offset, captured):
        """Logits [b, V] of the last position of `tokens` [b, s] at positions offset.."""
        s = tokens.shape[1]
        keys = padding[:, None, None, :offset + s]
        query = torch.arange(offset, offset + s, device=self.device)
        mask = torch.arange(offset + s, device=self.device)[None, :] > query[:, None]
        # Padding keys are hidden from real queries; a padding query sees the padding before it.
        mask = mask[None, None] | (keys & ~padding[:, None, offset:offset + s, None])
        cache.sequence_len_offset = offset
        logits = self.target(tokens, None, attention_mask=mask, inference_context=cache)
        if self.capture is not None:
            captured.append(self.capture.features())
        return gather_from_tensor_model_parallel_region(logits, group=self.tp_group)[:, -1].float()

    @staticmethod
    def _next(logits, sampling: Sampling, generators) -> torch.Tensor:
        if sampling.greedy:
            return logits.argmax(-1)
        top_p = sampling.top_p if sampling.top_p < 1.0 else 0.0  # 0 = no nucleus filter
        filtered = TorchSampling.filter_logits(logits, sampling.temperature, 0, float(top_p))
        probs = filtered.softmax(-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g)
                          for i, g in enumerate(generators)])


def _last_position(module, args):
    """Output-layer pre-hook: only the last position's logits are needed."""
    return (args[0][-1:],) + tuple(args[1:])


# --- conversations --------------------------------------------------------------------------

@dataclass
class Conversation:
    id: str
    index: int
    """Position among the usable conversations of the input (the output's order)."""
    messages: list[dict]
    where: str = ""


def parse_conversation(raw: bytes | str) -> tuple[str | None, list[dict]]:
    """(the record's `id` or None, its messages) as `normalize` gives them, except that turns
    after the last assistant turn are kept (a trailing user turn asks for a new answer)."""
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise SampleError(MALFORMED, str(e)) from None
    key = next((k for k in ("messages", "conversations")
                if isinstance(record, dict) and isinstance(record.get(k), list)), None)
    if key is None:
        return None, normalize(record)  # raises its own error
    messages = normalize({key: [*record[key], _PLACEHOLDER]})[:-1]
    if not messages:
        raise SampleError(UNKNOWN_FORMAT, "no user or system turn")
    record_id = record.get("id")
    return (None if record_id is None else str(record_id)), messages


def read_conversations(paths: Sequence[str], report: DataReport) -> list[Conversation]:
    """The usable conversations of `paths` in order; bad lines and repeated ids go to `report`
    with their file:line. Ids: the record's `id`, else `file:line`."""
    out, seen = [], set()
    report.files = list(paths)
    for path, line, raw in iter_lines(paths):
        report.read += 1
        try:
            record_id, messages = parse_conversation(raw)
        except SampleError as e:
            report.add(path, line, e.kind, e.detail)
            continue
        cid = record_id if record_id is not None else f"{path}:{line}"
        if cid in seen:
            report.add(path, line, DUPLICATE_ID, cid)
            continue
        seen.add(cid)
        out.append(Conversation(cid, len(out), messages, f"{path}:{line}"))
    report.kept = len(out)
    return out


class ChatPrompts:
    """Token ids of each turn's prompt, built from a HF tokenizer's chat template."""

    def __init__(self, tokenizer, thinking: bool | None = None):
        self.tokenizer = tokenizer
        self.template_kwargs = {} if thinking is None else {"enable_thinking": thinking}

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True,
                                                      **self.template_kwargs)
        except TemplateError as e:
            raise SampleError(TEMPLATE, str(e)) from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)


@dataclass
class _State:
    """One conversation being regenerated."""

    conversation: Conversation
    messages: list[dict]
    turns: list[int]
    """Indices (in `messages`) of the assistant turns still to generate."""
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    head: str = ""
    """The rendered text that `tokens` stand for (prompt, generation prompt, answers)."""
    stop_text: str = ""
    """The text of the stop token that ended the last answer ("" at the length limit)."""
    turn: int = 0
    features: torch.Tensor | None = None


def _plan(conversation: Conversation, last_turn_only: bool) -> _State:
    messages = [dict(m) for m in conversation.messages]
    if messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": ""})
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns[-1:] if last_turn_only else turns
    return _State(conversation, messages[:turns[-1] + 1], turns)


def _prompt(state: _State, prompts: ChatPrompts) -> list[int]:
    """The next turn's prompt: the first rendered and tokenised, later ones extended by the
    tokens of what the template puts after the tokens already there."""
    index = state.turns[0]
    text = prompts.render(state.messages[:index])
    if not state.tokens:
        state.tokens = prompts.encode(text)
        state.loss_mask = [0] * len(state.tokens)
    else:
        if not text.startswith(state.head):
            raise SampleError(TEMPLATE, "the chat template renders earlier turns differently once "
                                        "later ones follow, so the generated ids cannot be kept; "
                                        "use --last-turn-only")
        rest = text[len(state.head):]
        if state.stop_text and rest.startswith(state.stop_text):  # the template's end of turn
            rest = rest[len(state.stop_text):]
        rest = prompts.encode(rest)
        state.tokens += rest
        state.loss_mask += [0] * len(rest)
    state.head = text
    return state.tokens


def _accept(state: _State, generated: Generated, prompts: ChatPrompts, stops) -> None:
    index = state.turns.pop(0)
    stopped = bool(generated.tokens) and generated.tokens[-1] in stops
    body = generated.tokens[:-1] if stopped else generated.tokens
    content = prompts.decode(body)
    state.messages[index] = {"role": "assistant", "content": content}
    state.tokens += generated.tokens
    state.loss_mask += [1] * len(generated.tokens)
    state.head += content
    state.stop_text = prompts.decode(generated.tokens[-1:]) if stopped else ""
    state.features = generated.features
    state.turn += 1


@dataclass
class Finished:
    conversation: Conversation
    messages: list[dict] | None
    """None when skipped (`problem` says why)."""
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    features: torch.Tensor | None = None
    generated_tokens: int = 0
    problem: SampleError | None = None
    ends_batch: bool = False
    """The last conversation a batch finishes: progress is reported there, with the whole batch
    counted (its conversations all finish in the same generate call)."""


def regenerate(generator: BatchGenerator, prompts: ChatPrompts,
               conversations: Sequence[Conversation], *, batch_size: int, max_new_tokens: int,
               sampling: Sampling = Sampling(), last_turn_only: bool = False
               ) -> Iterator[Finished]:
    """Regenerate `conversations` `batch_size` at a time, turn by turn within a batch; yields
    each conversation when its last turn is done (features attached when capturing)."""
    stops = set(generator.stops.tolist())
    for start in range(0, len(conversations), batch_size):
        states = [_plan(c, last_turn_only) for c in conversations[start:start + batch_size]]
        generated = {id(s): 0 for s in states}
        while states:
            ready, batch = [], []
            for state in states:
                try:
                    batch.append(list(_prompt(state, prompts)))
                    ready.append(state)
                except SampleError as e:
                    yield Finished(state.conversation, None, problem=e)
            generators = [sampling.generator(s.conversation.id, s.turn, generator.device)
                          for s in ready]
            outputs = generator.generate(batch, max_new_tokens, sampling, generators) if ready \
                else []
            states, finished = [], []
            for state, out in zip(ready, outputs):
                _accept(state, out, prompts, stops)
                generated[id(state)] += len(out.tokens)
                if state.turns:
                    states.append(state)
                    continue
                finished.append(Finished(state.conversation, state.messages, state.tokens,
                                         state.loss_mask, state.features, generated[id(state)]))
            for i, done in enumerate(finished):
                done.ends_batch = not states and i == len(finished) - 1
                yield done


# --- layout, part files, merge --------------------------------------------------------------

@dataclass
class Replica:
    """This rank's generation replica: which conversations it takes and whether it writes."""

    index: int
    count: int
    leader: bool


def generation_replica() -> Replica:
    """Replicas are the data-parallel ranks, grouped so that an expert-parallel group that spans
    data-parallel ranks (EP x expert-TP wider than TP) runs one batch."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    span = max(1, parallel_state.get_expert_model_parallel_world_size()
               * parallel_state.get_expert_tensor_parallel_world_size() // tp)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    return Replica(dp_rank // span, max(1, dp // span),
                   parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank % span == 0)


def parts_dir(output: str) -> str:
    return output + ".parts"


def part_path(output: str, replica: int) -> str:
    return os.path.join(parts_dir(output), f"part-{replica:05d}.jsonl")


def read_part(path: str) -> dict[str, dict]:
    """The records of a part file by id; a torn last line (a kill mid-write) is cut off."""
    if not os.path.isfile(path):
        return {}
    records, good = {}, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            record = json.loads(raw)
            records[record["id"]] = record
            good += len(raw)
    if good != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


class PartWriter:
    """Appends finished conversations to one replica's part file, one durable line each."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def merge_parts(output: str, conversations: Sequence[Conversation], replicas: int) -> int:
    """Write `output` ({"id", "messages"} per line, input order) from the part files, atomically;
    returns the number of conversations written (skipped ones are left out). Raises if an id is
    missing or appears in two part files."""
    records: dict[str, dict] = {}
    for r in range(replicas):
        for cid, record in read_part(part_path(output, r)).items():
            if cid in records:
                raise RuntimeError(f"{output}: id {cid!r} is in two part files")
            records[cid] = record
    missing = [c.id for c in conversations if c.id not in records]
    if missing:
        raise RuntimeError(f"{output}: {len(missing)} conversations were not generated "
                           f"(first: {missing[0]!r})")
    lines = [json.dumps({"id": c.id, "messages": records[c.id]["messages"]}, ensure_ascii=False)
             for c in conversations if records[c.id].get("messages") is not None]
    write_text(output, "".join(line + "\n" for line in lines))
    return len(lines)


class ProgressLine:
    """Rank 0's progress: conversations of its shard done/total, generated tokens/s, ETA."""

    def __init__(self, total: int, done: int, replicas: int, interval: float = 10.0):
        self.total, self.done, self.replicas, self.interval = total, done, replicas, interval
        self.start_done, self.tokens, self.start = done, 0, time.time()
        self.last = self.start
        self.active = dist.get_rank() == 0

    def update(self, conversations: int, tokens: int, report: bool = True,
               force: bool = False) -> None:
        """Count; print when `report` and the interval has passed, or when `force`."""
        self.done += conversations
        self.tokens += tokens
        now = time.time()
        if not self.active or not (force or (report and now - self.last >= self.interval)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        shard = f" (rank 0's shard of {self.replicas})" if self.replicas > 1 else ""
        print(f" regenerate | conversations: {self.done}/{self.total}{shard} |"
              f" generated tokens/s: {self.tokens / elapsed:.1f} | ETA {_fmt(eta)}", flush=True)


@dataclass
class FeatureOutput:
    """Where and how the regenerated conversations' taps go (`megatron_dflash.feature_cache`)."""

    directory: str
    manifest: dict
    """`cache_manifest(...)` of the target, taps, sequence length and dtype."""

    @property
    def seq_length(self) -> int:
        return self.manifest["seq_length"]


@contextlib.contextmanager
def _feature_writer(features: FeatureOutput | None, replica: Replica):
    """Each replica leader's FeatureCacheWriter (collective: every rank enters and leaves);
    replica 0's leader (rank 0) opens the cache first and publishes it last."""
    from megatron_dflash.feature_cache import FeatureCacheWriter

    if features is None:
        yield None
        return
    writer = (FeatureCacheWriter(features.directory, manifest=features.manifest,
                                 rank=replica.index) if replica.leader else None)
    first = dist.get_rank() == 0
    for turn in (True, False):  # rank 0 enters first, then the others
        if writer is not None and first == turn:
            writer.__enter__()
        dist.barrier()
    try:
        yield writer
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)
        raise
    for turn in (False, True):  # the others close, then rank 0 publishes
        if writer is not None and first == turn:
            writer.__exit__(None, None, None)
        dist.barrier()


def regenerate_to_file(generator: BatchGenerator, prompts: ChatPrompts,
                       conversations: Sequence[Conversation], output: str, *, batch_size: int,
                       max_new_tokens: int, sampling: Sampling = Sampling(),
                       last_turn_only: bool = False, features: FeatureOutput | None = None,
                       log_interval: float = 10.0) -> int:
    """Regenerate this replica's shard of `conversations` (resuming from its part file), then
    rank 0 merges every part into `output`; with `features`, also write the feature cache.
    Collective over the world. Returns the number of conversations in `output`."""
    replica = generation_replica()
    path = part_path(output, replica.index)
    done = read_part(path) if replica.leader else {}  # the leader cuts a torn line first
    dist.barrier()
    done = done or read_part(path)
    mine = [c for c in conversations if c.index % replica.count == replica.index]
    todo = [c for c in mine if c.id not in done]
    progress = ProgressLine(len(mine), len(mine) - len(todo), replica.count, log_interval)
    parts = PartWriter(path) if replica.leader else None
    try:
        with _feature_writer(features, replica) as cache:
            if features is not None:
                _rewrite_done_features(generator, cache, [c for c in mine if c.id in done],
                                       done, features, batch_size)
            for result in regenerate(generator, prompts, todo, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, sampling=sampling,
                                     last_turn_only=last_turn_only):
                conversation = result.conversation
                record = {"id": conversation.id, "index": conversation.index}
                if result.messages is None:
                    record["skipped"] = str(result.problem)
                    if replica.leader:
                        print(f"regenerate: {conversation.where}: {result.problem} (skipped)",
                              flush=True)
                else:
                    record["messages"] = result.messages
                    if features is not None:
                        record |= {"tokens": result.tokens, "loss_mask": result.loss_mask}
                        if cache is not None:
                            _add(cache, conversation.id, result.tokens, result.loss_mask,
                                 result.features, features.seq_length)
                if parts is not None:
                    parts.write(record)
                progress.update(1, result.generated_tokens, report=result.ends_batch)
    finally:
        if parts is not None:
            parts.close()
    progress.update(0, 0, force=True)
    dist.barrier()
    written = merge_parts(output, conversations, replica.count) if dist.get_rank() == 0 else 0
    dist.barrier()
    return written


def _add(cache, sample_id, tokens, loss_mask, taps, seq_length) -> None:
    """One sample into the cache, truncated to the cache's sequence length."""
    cache.add(sample_id, torch.tensor(tokens[:seq_length]), torch.tensor(loss_mask[:seq_length]),
              taps[:seq_length])


def _rewrite_done_features(generator, cache, conversations, done, features, batch_size) -> None:
    """Taps of the conversations a killed run finished (their features died with its writer),
    recomputed from the exact token ids its part file kept."""
    kept = [c for c in conversations if done[c.id].get("messages") is not None]
    lacking = [c.id for c in kept if "tokens" not in done[c.id]]
    if lacking:
        raise ValueError(f"--offline-features: the part files hold conversations written without "
                         f"--offline-features (first: {lacking[0]!r}); their token ids are "
                         "unknown: remove the part files to start afresh")
    for start in range(0, len(kept), batch_size):
        batch = kept[start:start + batch_size]
        sequences = [done[c.id]["tokens"][:features.seq_length] for c in batch]
        for c, taps in zip(batch, generator.taps(sequences)):
            if cache is not None:
                _add(cache, c.id, done[c.id]["tokens"], done[c.id]["loss_mask"], taps,
                     features.seq_length)
