"""Rows whose text holds the tokenizer's own special tokens (e.g. `<|im_end|>` written out in a message).

TRL 1.16 renders the chat template and tokenizes the result with the tokenizer's defaults, which split added special
tokens out of the text: a literal `<|im_end|>` in the content becomes the special token itself, not its characters.
nanopost does the same (parity), and says how many rows it concerns, since such a row can end a turn early.
"""

from __future__ import annotations

import json
import re
from typing import Any


def rows_with_special_tokens(rows: Any, tokenizer) -> tuple[int, list[str]]:
    """How many rows (dicts, or a `datasets.Dataset`) contain a special token of `tokenizer` in any text value, and
    which tokens were found (sorted)."""
    specials = sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", []) if str(t).strip()}, key=len,
                      reverse=True)
    if not specials:
        return 0, []
    pattern = re.compile("|".join(re.escape(token) for token in specials))
    count, found = 0, set()
    for row in rows:
        hits = set(pattern.findall(json.dumps(row, ensure_ascii=False, default=str)))
        if hits:
            count += 1
            found |= hits
    return count, sorted(found)


def special_token_note(rows: Any, tokenizer) -> str | None:
    """The note the run prints when the data holds special tokens; None when it holds none."""
    count, found = rows_with_special_tokens(rows, tokenizer)
    if not count:
        return None
    return (f"{count} training row(s) contain the tokenizer's special tokens as text ({', '.join(found)}): they are "
            "tokenized as those special tokens, as TRL does, not as plain characters")
