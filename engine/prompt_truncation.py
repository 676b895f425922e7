"""--max_prompt_length, as TRL < 1.0's DPOTrainer.tokenize_row applied it (the TRL version the Hugging Face course
was written for): after tokenization, the prompt keeps its last `max_prompt_length` tokens (the end of a prompt,
where the question is, matters most); chosen and rejected are untouched (--max_length then truncates the whole
sequence as TRL 1.16 does).

Pure list-in, list-out with no engine imports: it belongs with DPO tokenization in data/, where phase 2 of
issue 9 calls it (data/ may not import engine/, so it moves there when wired).
"""

from __future__ import annotations


def truncate_prompt(prompt_ids: list[int], max_prompt_length: int | None) -> list[int]:
    """The last `max_prompt_length` tokens of the prompt (all of them when None or already short enough).

    Shape:
        prompt_ids: (P,) -> (min(P, max_prompt_length),)
    """
    if max_prompt_length is None or len(prompt_ids) <= max_prompt_length:
        return list(prompt_ids)
    return list(prompt_ids[-max_prompt_length:])
