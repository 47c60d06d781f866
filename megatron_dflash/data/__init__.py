"""Chat data for DFlash training: JSONL conversations -> tokens + assistant-only loss mask."""
from megatron_dflash.data.conversations import DataReport, SampleError, normalize, parse_line
from megatron_dflash.data.dataset import (ConversationDataset, IndexedConversationDataset,
                                          ResumableSampler, build_dataset, collate,
                                          encode_files, held_out_split, split_indices,
                                          write_indexed_dataset)
from megatron_dflash.data.tokenize import (ChatTemplateError, ChatTokenizer, HFChatTokenizer,
                                           SentencePieceChatTokenizer, Tokenized,
                                           load_chat_tokenizer)

__all__ = [
    "ChatTemplateError", "ChatTokenizer", "ConversationDataset", "DataReport", "HFChatTokenizer",
    "IndexedConversationDataset", "ResumableSampler", "SampleError", "SentencePieceChatTokenizer",
    "Tokenized", "build_dataset", "collate", "encode_files", "held_out_split",
    "load_chat_tokenizer", "normalize", "parse_line", "split_indices", "write_indexed_dataset",
]
