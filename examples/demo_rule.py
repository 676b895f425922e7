"""Rule judge for the DPO demo on the bundled preference data (data/bundled/preference/).

The preference pairs teach two things, and the rule checks both, half a point each. After cutting at the first
end-of-turn token and dropping one leading `<think>...</think>` block, a completion to "What is a + b?" (or
"a - b"):
- follows the preferred format (0.5) when it is exactly one equation restating the question, `a + b = n.`,
  for some integer n (the rejected answers are often `The answer is n.`, or do not stop);
- is correct (0.5) when the last number it states is the true result.
So `a + b = c.` with the right c scores 1.0, a wrong equation 0.5, `The answer is c.` with the right c 0.5,
and anything else 0.0.

    from examples.demo_rule import score, win_rate
    score("What is 17 + 25?", "17 + 25 = 42.")          # 1.0
    score("What is 17 + 25?", "17 + 25 = 43.")          # 0.5 (format only)
    score("What is 17 + 25?", "The answer is 42.")      # 0.5 (correct only)
    judge("What is 17 + 25?", "17 + 25 = 42.", "The answer is 42.")   # 1.0: the first answer scores higher
    win_rate(policy_texts, reference_texts, prompts)    # wins + 0.5 * ties, over n

`judge` is the demo's pluggable judge for scripts/compare.py (`--judge examples.demo_rule:judge`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from data.errors import DataError

PROBLEM_RE = re.compile(r"(\d+)\s*([+-])\s*(\d+)")
THINK_BLOCK_RE = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|pad|>")

Prompt = str | Sequence[dict]


def prompt_text(prompt: Prompt) -> str:
    """The text that holds the problem: a string as is, or the last user message of a message list."""
    if isinstance(prompt, str):
        return prompt
    user_turns = [m["content"] for m in prompt if m.get("role") == "user"]
    if not user_turns:
        raise DataError(f"demo_rule: prompt {list(prompt)!r} has no user message; pass the prompt's messages")
    return user_turns[-1]


def expected_answer(prompt: Prompt) -> str:
    """The one completion that scores 1.0, e.g. `17 + 25 = 42.` for "What is 17 + 25?".

    The last `a + b` / `a - b` in the prompt text is the problem (in a rendered chat it belongs to the last
    user turn).
    """
    text = prompt_text(prompt)
    matches = PROBLEM_RE.findall(text)
    if not matches:
        raise DataError(
            f"demo_rule: no 'a + b' or 'a - b' problem in prompt {text!r}; the rule only judges the bundled "
            "arithmetic prompts (data/bundled/preference)"
        )
    a, op, b = matches[-1]
    result = int(a) + int(b) if op == "+" else int(a) - int(b)
    return f"{int(a)} {op} {int(b)} = {result}."


def clean_completion(completion: str) -> str:
    """Cut at the first stop string, drop one leading think block (empty or not), strip whitespace."""
    for stop in STOP_STRINGS:
        completion = completion.split(stop, 1)[0]
    return THINK_BLOCK_RE.sub("", completion, count=1).strip()


def follows_format(prompt: Prompt, completion: str) -> bool:
    """The completion is exactly `a op b = n.` with the question's a, op, b and some integer n."""
    a, op, b, _ = _problem(prompt)
    match = re.fullmatch(r"(\d+) ([+-]) (\d+) = (-?\d+)\.", clean_completion(completion))
    return match is not None and (int(match.group(1)), match.group(2), int(match.group(3))) == (a, op, b)


def is_correct(prompt: Prompt, completion: str) -> bool:
    """The last integer the completion states is the true result."""
    numbers = re.findall(r"-?\d+", clean_completion(completion))
    return bool(numbers) and int(numbers[-1]) == _problem(prompt)[3]


def score(prompt: Prompt, completion: str) -> float:
    """0.5 for the preferred format + 0.5 for the correct result (see the module docstring).

    Args:
        prompt: the prompt as text (plain or chat-rendered) or as a list of messages.
        completion: the generated text, decoded with or without special tokens.
    """
    return 0.5 * follows_format(prompt, completion) + 0.5 * is_correct(prompt, completion)


def _problem(prompt: Prompt) -> tuple[int, str, int, int]:
    a, op, b = expected_answer(prompt).split(" = ")[0].split(" ")
    result = int(a) + int(b) if op == "+" else int(a) - int(b)
    return int(a), op, int(b), result


def judge(prompt: Prompt, a: str, b: str) -> float:
    """How much completion `a` beats `b` under `score`: 1.0 higher, 0.5 equal, 0.0 lower (a compare judge)."""
    score_a, score_b = score(prompt, a), score(prompt, b)
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


def win_rate(
    policy_completions: Sequence[str], reference_completions: Sequence[str], prompts: Sequence[Prompt]
) -> float:
    """Share of prompts where the policy beats the reference under `score`, ties counting half.

    win_rate = (#{score(policy) > score(reference)} + 0.5 * #{score(policy) == score(reference)}) / n.
    0.5 means no difference; 1.0 means the policy is right everywhere the reference is wrong and nowhere worse.
    """
    n = len(prompts)
    if n == 0 or len(policy_completions) != n or len(reference_completions) != n:
        raise DataError(
            f"demo_rule.win_rate: need the same non-zero number of prompts ({n}), policy completions "
            f"({len(policy_completions)}) and reference completions ({len(reference_completions)})"
        )
    return sum(judge(*row) for row in zip(prompts, policy_completions, reference_completions, strict=True)) / n
