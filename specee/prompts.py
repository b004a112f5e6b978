"""Prompt files (JSONL) and batching with the chat template and left padding.

A line may hold ``{"prompt": ...}``, Spec-Bench's ``{"turns": [...], "category": ...}`` (first turn)
or GSM8K's ``{"question": ...}``. The demo prompts ship inside the package (a user's machine has no
../shared); they are first turns of Spec-Bench questions (Apache-2.0).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch


@dataclass
class Prompt:
    text: str
    category: str = "default"


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Read prompts from a JSONL file; ``None`` gives the demo prompts shipped with specee."""
    if path is None:
        lines = resources.files("specee.data").joinpath("demo_prompts.jsonl").read_text().splitlines()
        where = "specee/data/demo_prompts.jsonl"
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"prompt file {p} does not exist; give a JSONL file with one prompt per line.")
        lines, where = p.read_text().splitlines(), str(p)
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("prompt") or (row.get("turns") or [None])[0] or row.get("question")
        if not text:
            raise ValueError(f"{where}:{n} has no 'prompt', 'turns' or 'question' field.")
        out.append(Prompt(text, row.get("category", "default")))
        if limit is not None and len(out) >= limit:
            break
    return out


def encode(tokenizer, texts: list[str], device=None, chat: bool = True):
    """Tokenize a batch with the chat template (when the tokenizer has one) and left padding.

    Returns input_ids, attention_mask: LongTensor [batch, max_len].
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False) for t in texts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def new_tokens(sequences: torch.Tensor, prompt_len: int, eos_token_id=None) -> list[list[int]]:
    """The generated ids of each row, up to and including its first EOS (the rest is padding)."""
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows
