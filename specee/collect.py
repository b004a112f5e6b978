"""Collection for training predictors: greedy continuations at full depth, then teacher-forced features.

1. ``generate_chunks``: greedy continuations of the prompts, one file per chunk (resumable).
2. ``collect_chunks``: per generated token, each layer's normed argmax (the label: it equals the final
   argmax), the draft source's k candidates and their logits at every layer (k rows of the head),
   streamed to disk per chunk (resumable; the file name carries a hash of the draft's tables).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .drafts import DraftSource, HybridSource, NGramSource, merge_candidates
from .models import DecoderAdapter


def _progress(iterable, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


# --------------------------------------------------------------------------------------------- 1. generate
def _encode_ids(rows: list[list[int]], pad: int):
    """Left-pad token-id prompts: -> input_ids, attention_mask [B, P]."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        mask[b, P - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate_chunks(model, tokenizer, prompts, work: Path, cfg) -> list[dict]:
    """Greedy continuations, one file per chunk of prompts (skipped when present: resumable).

    ``prompts``: texts (encoded with the tokenizer's chat template) or, with ``tokenizer=None``, token-id lists.
    """
    from .prompts import encode

    work.mkdir(parents=True, exist_ok=True)
    n_chunks = math.ceil(len(prompts) / cfg.chunk_prompts)
    seqs = []
    gc = model.generation_config
    eos = tokenizer.eos_token_id if tokenizer is not None else gc.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    pad = tokenizer.pad_token_id if tokenizer is not None else (gc.pad_token_id or 0)
    for c in _progress(range(n_chunks), desc="specee train: generate", unit="chunk"):
        path = work / f"gen-{c:05d}.pt"
        if not path.exists():
            rows = []
            chunk = prompts[c * cfg.chunk_prompts:(c + 1) * cfg.chunk_prompts]
            for i in range(0, len(chunk), cfg.batch_size):
                batch = chunk[i:i + cfg.batch_size]
                ids, mask = encode(tokenizer, batch) if tokenizer is not None else _encode_ids(batch, pad)
                out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                                     max_new_tokens=cfg.max_new_tokens, pad_token_id=pad)
                P = ids.shape[1]
                for b in range(ids.shape[0]):
                    gen = out[b, P:].tolist()
                    cut = next((j + 1 for j, t in enumerate(gen) if t in eos), len(gen))
                    rows.append(dict(prompt=ids[b][mask[b].bool()].tolist(), gen=gen[:cut]))
            torch.save(rows, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        seqs += torch.load(path)
    return seqs


def split_sequences(n: int, splits, seed: int) -> dict[str, list[int]]:
    """Seeded split of sequence indices into train / val / calib."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a = int(round(splits[0] * n))
    b = a + max(1, int(round(splits[1] * n))) if n >= 3 else a
    return {"train": sorted(perm[:a]), "val": sorted(perm[a:b]), "calib": sorted(perm[b:])}


def propose_sequence(source: DraftSource, prompt, gen, probe_hidden, adapter) -> torch.Tensor:
    """Candidates for generated tokens 0..T-1 as decoding would propose them. probe_hidden [T, d] or None."""
    T = len(gen)
    source.reset(1)
    source.feed(torch.tensor([prompt]))
    ngram = source.ngram if isinstance(source, HybridSource) else source if isinstance(source, NGramSource) else None
    lookups = []
    for t in range(T):
        if ngram is not None:
            lookups.append(ngram.lookup(0) if isinstance(source, HybridSource) else ngram.candidates(0))
        source.feed(torch.tensor([[gen[t]]]))
    if isinstance(source, NGramSource):
        return torch.tensor(lookups, dtype=torch.long)
    probe = source.probe if isinstance(source, HybridSource) else source
    top = probe.topk(adapter.final_norm(probe_hidden), adapter).cpu()
    if isinstance(source, HybridSource):
        return merge_candidates(lookups, top, source.k)
    return top


# ---------------------------------------------------------------------------------------------- 2. collect
@torch.no_grad()
def teacher_forced(model, seq: dict, adapter=None):
    """Run prompt + generation once at full depth. Returns (hidden [T, L, d] of the states that predict
    gen[0..T-1], their per-layer normed argmax [T, L])."""
    a = adapter or DecoderAdapter(model)
    T, P = len(seq["gen"]), len(seq["prompt"])
    ids = torch.tensor([seq["prompt"] + seq["gen"]], device=a.device)
    caps = []
    hooks = [layer.register_forward_hook(lambda m_, i_, o: caps.append(o[0] if isinstance(o, tuple) else o))
             for layer in a.layers]
    try:
        model.model(ids)
    finally:
        for h in hooks:
            h.remove()
    hs = torch.stack([h[0, P - 1:P - 1 + T] for h in caps], 1)  # [T, L, d]
    normed = a.final_norm(hs)
    W = a.lm_head.weight
    argmax = torch.stack([(normed[:, l] @ W.T).argmax(-1) for l in range(a.num_layers)], 1)
    return hs, argmax


@torch.no_grad()
def candidates_and_logits(source: DraftSource, seq: dict, hs, adapter):
    """The source's candidates for each generated token and their logits at every layer: [T, k], [T, L, k]."""
    probe_h = hs[:, source.layer] if source.layer is not None else None
    cands = propose_sequence(source, seq["prompt"], seq["gen"], probe_h, adapter).to(hs.device)
    cl = torch.einsum("tld,tkd->tlk", adapter.final_norm(hs).float(), adapter.lm_head.weight[cands].float())
    return cands, cl


@torch.no_grad()
def collect_chunks(model, seqs, work: Path, draft: DraftSource, cfg, tag: str) -> dict:
    """Per generated token (t >= 1: t = 0 comes from the prefill, which never exits): final token,
    per-layer argmax, candidates and their per-layer logits. One file per chunk; resumable."""
    a = DecoderAdapter(model)
    n_chunks = math.ceil(len(seqs) / cfg.chunk_prompts)
    parts = []
    for c in _progress(range(n_chunks), desc=f"specee train: collect ({tag})", unit="chunk"):
        path = work / f"feat-{tag}-{c:05d}.pt"
        if not path.exists():
            rows = dict(final=[], argmax=[], cands=[], cand_logits=[], seq=[], pos=[])
            for s_idx in range(c * cfg.chunk_prompts, min(len(seqs), (c + 1) * cfg.chunk_prompts)):
                s = seqs[s_idx]
                T = len(s["gen"])
                if T < 2:
                    continue
                hs, argmax = teacher_forced(model, s, a)
                cands, cl = candidates_and_logits(draft, s, hs, a)
                sl = slice(1, T)
                rows["final"].append(argmax[sl, -1].cpu())
                rows["argmax"].append(argmax[sl].int().cpu())
                rows["cands"].append(cands[sl].cpu())
                rows["cand_logits"].append(cl[sl].cpu())
                rows["seq"].append(torch.full((T - 1,), s_idx, dtype=torch.int32))
                rows["pos"].append(torch.arange(1, T, dtype=torch.int32))
            out = {k: (torch.cat(v) if v else torch.zeros(0)) for k, v in rows.items()}
            torch.save(out, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        parts.append(torch.load(path))
    parts = [p for p in parts if p["final"].numel()]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def oracle_exits(data) -> torch.Tensor:
    """0-based oracle exit layer per token: the first layer whose argmax equals the final one."""
    return (data["argmax"] == data["final"][:, None].int()).int().argmax(1)


def subset(data, seq_ids) -> dict:
    keep = torch.isin(data["seq"], torch.tensor(seq_ids, dtype=data["seq"].dtype))
    return {k: v[keep] for k, v in data.items()}
