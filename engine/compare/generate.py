"""Batched generation for the comparison report: greedy or sampled completions of tokenized prompts.

    ids = generate(model, tokenizer, prompts_ids, max_new_tokens=64)                       # greedy
    ids = generate(model, tokenizer, prompts_ids, sampling=Sampling(temperature=0.7, top_p=0.9, seed=1))
    texts = decode_completions(tokenizer, ids)

Prompts are left-padded into batches (decoder-only models continue from the last real token). Each completion is
returned as the token ids the model produced, cut after its first end-of-sequence token (kept: it is part of the
answer and counts in its length), so padding never appears in a completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling settings (`--temperature`, `--top_p`, `--seed`); top-k is off, so with temperature 1
    and top_p 1 the completions are samples from the model's own distribution."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42


@torch.no_grad()
def generate(model, tokenizer, prompts_ids: list[list[int]], *, max_new_tokens: int,
             sampling: Sampling | None = None, batch_size: int = 16, desc: str = "generating",
             disable_tqdm: bool = False) -> list[list[int]]:
    """Completion token ids for every prompt: greedy when `sampling` is None, else sampled (seeded once).

    Shape:
        prompts_ids: P lists of token ids -> P lists of at most `max_new_tokens` ids, each ending at its first
        EOS (inclusive) or at `max_new_tokens`.
    """
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if sampling is None:
        decoding = dict(do_sample=False)
    else:
        # Seeded once per call: the same prompts, settings and seed give the same samples for either model.
        torch.manual_seed(sampling.seed)
        decoding = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    completions: list[list[int]] = []
    with tqdm(total=len(prompts_ids), desc=desc, unit="prompt", disable=disable_tqdm) as progress:
        for start in range(0, len(prompts_ids), batch_size):
            chunk = prompts_ids[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (b, P) left-padded
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (b, P)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True, **decoding,
            )  # (b, P + new)
            completions.extend(_cut_after_eos(row.tolist(), eos_id) for row in output[:, width:])
            progress.update(len(chunk))
    return completions


def _cut_after_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Keep the ids up to and including the first EOS; after it generate() writes only padding."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def decode_completions(tokenizer, completions: list[list[int]]) -> list[str]:
    """The completions as text, special tokens (EOS, padding) dropped."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
