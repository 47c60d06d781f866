"""Regenerate the assistant turns of JSONL conversations with the frozen megatron target (the
paper's recipe, spec §6.1: the drafter learns what the target itself writes), optionally capturing
the target's tapped hidden states for the offline feature cache during generation.

  conversations  parsing, reading, ids             turns     prompts from the chat template, accept
  parts          shards, durable part files, merge settings  what shaped the part files (resume)
  output         regenerate_to_file: the collective job, progress, feature output
Generation itself (KV cache, batching, sampling, stop tokens) is `megatron_dflash.generation`.
"""
from megatron_dflash.generation.batch import BatchGenerator, Generated, Sampling
from megatron_dflash.regeneration.conversations import (DUPLICATE_ID, Conversation,
                                                        parse_conversation, read_conversations)
from megatron_dflash.regeneration.output import FeatureOutput, ProgressLine, regenerate_to_file
from megatron_dflash.regeneration.parts import (PartWriter, Replica, generation_replica,
                                                merge_parts, part_path, parts_dir, read_part)
from megatron_dflash.regeneration.settings import Settings, SettingsMismatch
from megatron_dflash.regeneration.turns import ChatPrompts, Finished, regenerate

__all__ = ["BatchGenerator", "ChatPrompts", "Conversation", "DUPLICATE_ID", "FeatureOutput",
           "Finished", "Generated", "PartWriter", "ProgressLine", "Replica", "Sampling",
           "Settings", "SettingsMismatch", "generation_replica", "merge_parts",
           "parse_conversation", "part_path", "parts_dir", "read_conversations", "read_part",
           "regenerate", "regenerate_to_file"]
