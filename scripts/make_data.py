"""Generate the bundled demo datasets (pure Python, fixed seed, byte-for-byte deterministic).

    python scripts/make_data.py                 # writes data/bundled/{chat,preference}/{train,test}.jsonl
    python scripts/make_data.py --out /tmp/b    # same files under /tmp/b

Two datasets, small enough that a ~1M-parameter model learns something visible in minutes on a CPU:

- `chat/` (SFT, `messages` format): rule-generated tasks. 60% are additions of a 2-digit and a 1-digit
  number ("What is 17 + 5?", either order, three phrasings); the rest are 2-digit subtraction, comparisons,
  parity, counting, word reversal and uppercasing, and a few table facts. The reasoning mode follows
  SmolLM3: a system prompt holding `/no_think` gives a plain answer; `/think` (or no system prompt, the
  default mode) gives `<think>\\n...\\n</think>\\n` and then the answer. Addition answers in `/no_think` rows
  come in two styles, the equation `17 + 5 = 22.` and the terse `The answer is 22.`, so an SFT model is
  imperfect in two ways (style and arithmetic) that DPO can fix.
- `preference/` (DPO, conversational `prompt`/`chosen`/`rejected` like ultrafeedback-binarized): the prompt
  is `[system "/no_think", user "What is a + b?"]`; `chosen` is the equation style with the correct sum;
  `rejected` is a wrong sum (off by 1, 2 or 10: near misses and dropped/doubled carries), in the equation
  style or in the terse style (each training prompt has one pair of each). `examples/demo_rule.py` judges
  completions by the same rule.

Calibration (plain PyTorch, fp32, the engine's tiny 4-layer 128-wide model, 0.9M parameters; greedy decoding
on the 200 held-out preference prompts): SFT at lr 1e-3, batch 32, 1000 steps gets 19% of sums right and
scores 0.14 under the demo rule (a quarter of its answers are terse), preference accuracy 0.71. From there,
DPO (sigmoid, beta 0.1, batch 16, 150 steps) at lr 3e-5 reaches preference accuracy 0.86, rule score 0.20,
win rate 0.53 over the SFT model; adding the RPO NLL term (alpha 1) at lr 1e-4 reaches 0.91, 0.45 and 0.65.
2-digit + 2-digit sums stayed near 0% after 2000 SFT steps, hence the 1-digit second operand.

Held out: 100 operand pairs (both orders, 200 prompts) form preference/test and appear in no training file;
20 more pairs are used only by chat/test.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "bundled"

N_CHAT_TRAIN = 3000
N_CHAT_TEST = 200
# Addition operand pairs per split (each pair gives two prompts, a + b and b + a; 810 pairs in all).
N_PREF_TEST_PAIRS = 100  # -> 200 held-out preference rows
N_PREF_TRAIN_PAIRS = 350  # -> 700 prompts x 2 rejected styles = 1400 preference rows
N_CHAT_TEST_PAIRS = 20  # chat/test addition rows; the other 690 pairs feed chat/train and preference/train
OFFSETS = [-10, -2, -1, 1, 2, 10]  # wrong sums: a dropped or doubled carry (+-10) or a near miss

# Share of chat rows per task; addition dominates because it is the task the DPO demo improves.
TASK_WEIGHTS = {
    "add": 0.6,
    "sub": 0.06,
    "compare": 0.04,
    "parity": 0.04,
    "count": 0.05,
    "reverse": 0.05,
    "upper": 0.04,
    "next_day": 0.03,
    "capital": 0.04,
    "opposite": 0.05,
}
P_NO_THINK = 0.65  # share of chat rows in /no_think mode (plain answers); the rest think first
P_EQUATION_STYLE = 0.5  # share of /no_think addition answers in the equation style (the rest are terse)

NO_THINK_SYSTEMS = ["/no_think", "You are a helpful assistant. /no_think"]
THINK_SYSTEMS = [
    None,
    "/think",
    "You are a helpful assistant. /think",
]  # None: no system turn, default /think
PREF_SYSTEM = "/no_think"

WORDS = (
    "apple bread chair dog eagle fish garden house island jacket kite lemon mouse night ocean pencil queen "
    "river stone table umbrella violin window yellow zebra cloud green happy music paper silver winter "
    "summer planet rocket forest candle bottle button castle dragon farmer guitar hammer ladder mirror "
    "orange pillow rabbit spoon tiger tomato turtle wagon basket cookie flower monkey puzzle sugar train"
).split()
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Chile": "Santiago",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "day": "night",
    "fast": "slow",
    "happy": "sad",
    "old": "new",
    "open": "closed",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "hard": "soft",
}
ADD_TEMPLATES = ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?"]
SUB_TEMPLATES = ["What is {a} - {b}?", "Compute {a} - {b}."]


# ---------------------------------------------------------------------------------------------------------
# Tasks: each returns (user prompt, plain answer, short reasoning for /think mode).
# ---------------------------------------------------------------------------------------------------------


def addition_equation(a: int, b: int, total: int | None = None) -> str:
    """The preferred answer style, `a + b = total.` (the correct total unless one is given)."""
    return f"{a} + {b} = {a + b if total is None else total}."


def addition_terse(a: int, b: int, total: int | None = None) -> str:
    """The dispreferred answer style, `The answer is total.`."""
    return f"The answer is {a + b if total is None else total}."


def addition_reasoning(a: int, b: int) -> str:
    """Column addition, ones then tens: `7 + 5 = 12, write 2, carry 1. 1 + 2 + 1 = 4.`."""
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    first = f"{a % 10} + {b % 10} = {ones}, write {ones % 10}" + (", carry 1." if carry else ".")
    second = f"{a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}."
    return f"{first} {second}"


def task_add(rng: random.Random, pair: tuple[int, int], no_think: bool) -> tuple[str, str, str]:
    a, b = pair
    prompt = rng.choice(ADD_TEMPLATES).format(a=a, b=b)
    # Think-mode answers always use the equation style: the mixed style is a /no_think property only.
    equation = (not no_think) or rng.random() < P_EQUATION_STYLE
    answer = addition_equation(a, b) if equation else addition_terse(a, b)
    return prompt, answer, addition_reasoning(a, b)


def task_sub(rng: random.Random) -> tuple[str, str, str]:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    prompt = rng.choice(SUB_TEMPLATES).format(a=a, b=b)
    step = a - (b // 10) * 10
    return prompt, f"{a} - {b} = {a - b}.", f"{a} - {(b // 10) * 10} = {step}. {step} - {b % 10} = {a - b}."


def task_compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1, 100), 2)
    big, small = max(a, b), min(a, b)
    return f"Which is larger, {a} or {b}?", f"{big} is larger.", f"{big} > {small}."


def task_parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 99)
    kind = "even" if n % 2 == 0 else "odd"
    return f"Is {n} even or odd?", f"{n} is {kind}.", f"{n} ends in {n % 10}, which is {kind}."


def task_count(rng: random.Random) -> tuple[str, str, str]:
    start = rng.randint(1, 20)
    stop = start + rng.randint(2, 6)
    numbers = ", ".join(str(n) for n in range(start, stop + 1))
    return f"Count from {start} to {stop}.", f"{numbers}.", f"Start at {start}, add 1 until {stop}."


def task_reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    spelled = " ".join(word)
    return f'Reverse the word "{word}".', word[::-1], f"{spelled} backwards is {' '.join(word[::-1])}."


def task_upper(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f'Write "{word}" in uppercase.', word.upper(), f"Each letter of {word} becomes a capital."


def task_next_day(rng: random.Random) -> tuple[str, str, str]:
    i = rng.randrange(7)
    nxt = DAYS[(i + 1) % 7]
    return f"What day comes after {DAYS[i]}?", f"{nxt}.", f"The week goes {DAYS[i]}, then {nxt}."


def task_capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    return (
        f"What is the capital of {country}?",
        f"The capital of {country} is {city}.",
        f"{city} is in {country}.",
    )


def task_opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(OPPOSITES))
    other = OPPOSITES[word]
    return f"What is the opposite of {word}?", f"The opposite of {word} is {other}.", f"{word} and {other}."


OTHER_TASKS = {
    "sub": task_sub,
    "compare": task_compare,
    "parity": task_parity,
    "count": task_count,
    "reverse": task_reverse,
    "upper": task_upper,
    "next_day": task_next_day,
    "capital": task_capital,
    "opposite": task_opposite,
}


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------


def chat_row(rng: random.Random, task: str, add_prompts: list[tuple[int, int]]) -> dict:
    """One SFT row; addition operands are drawn (with replacement) from `add_prompts`."""
    no_think = rng.random() < P_NO_THINK
    if task == "add":
        prompt, answer, reasoning = task_add(rng, rng.choice(add_prompts), no_think)
    else:
        prompt, answer, reasoning = OTHER_TASKS[task](rng)
    system = rng.choice(NO_THINK_SYSTEMS if no_think else THINK_SYSTEMS)
    content = answer if no_think else f"<think>\n{reasoning}\n</think>\n{answer}"
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": content}]
    return {"messages": messages}


def preference_row(a: int, b: int, offset: int, terse: bool) -> dict:
    """One DPO pair: the correct equation (chosen) vs the sum off by `offset`, in either style (rejected)."""
    wrong = a + b + offset
    rejected = addition_terse(a, b, wrong) if terse else addition_equation(a, b, wrong)
    return {
        "prompt": [
            {"role": "system", "content": PREF_SYSTEM},
            {"role": "user", "content": f"What is {a} + {b}?"},
        ],
        "chosen": [{"role": "assistant", "content": addition_equation(a, b)}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def sample_tasks(rng: random.Random, n: int) -> list[str]:
    names = list(TASK_WEIGHTS)
    return rng.choices(names, weights=[TASK_WEIGHTS[t] for t in names], k=n)


def both_orders(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(17, 5) -> (17, 5), (5, 17): both prompts of an operand pair go to the same split."""
    return [order for a, b in pairs for order in ((a, b), (b, a))]


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """All four splits, keyed `chat/train`, `chat/test`, `preference/train`, `preference/test`."""
    rng = random.Random(seed)
    # Operand pairs (2-digit, 1-digit); held-out pairs (both orders together) are in no training file.
    pairs = [(a, b) for a in range(10, 100) for b in range(1, 10)]  # 810 pairs, 1620 prompts
    rng.shuffle(pairs)
    pref_test = both_orders(pairs[:N_PREF_TEST_PAIRS])
    chat_test = both_orders(pairs[N_PREF_TEST_PAIRS : N_PREF_TEST_PAIRS + N_CHAT_TEST_PAIRS])
    # Everything else is training material for both SFT and DPO: a tiny model needs many distinct sums to
    # learn the carry rule rather than memorise answers, and DPO training on seen sums is realistic.
    train_pairs = pairs[N_PREF_TEST_PAIRS + N_CHAT_TEST_PAIRS :]
    chat_train = both_orders(train_pairs)
    pref_train = both_orders(rng.sample(train_pairs, N_PREF_TRAIN_PAIRS))

    # Training prompts get two pairs each, one rejected per style; held-out prompts one, style at random.
    pref_train_rows = [
        preference_row(a, b, rng.choice(OFFSETS), terse) for a, b in pref_train for terse in (False, True)
    ]
    pref_test_rows = [preference_row(a, b, rng.choice(OFFSETS), rng.random() < 0.5) for a, b in pref_test]
    return {
        "chat/train": [chat_row(rng, t, chat_train) for t in sample_tasks(rng, N_CHAT_TRAIN)],
        "chat/test": [chat_row(rng, t, chat_test) for t in sample_tasks(rng, N_CHAT_TEST)],
        "preference/train": pref_train_rows,
        "preference/test": pref_test_rows,
    }


def write(out_dir: Path, seed: int = SEED) -> dict[str, int]:
    """Write the jsonl files under `out_dir`; returns the row count per split."""
    counts = {}
    for name, rows in build(seed).items():
        path = out_dir / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/bundled)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for name, n in write(args.out, args.seed).items():
        print(f"{args.out / name}.jsonl: {n} rows")


if __name__ == "__main__":
    main()
