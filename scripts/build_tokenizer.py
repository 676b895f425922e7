"""Build the shipped tokenizer, data/assets/tokenizer/, from the bundled data (deterministic, offline).

    python scripts/make_data.py          # first: the tokenizer is trained on the bundled text
    python scripts/build_tokenizer.py    # writes data/assets/tokenizer/
    python scripts/build_tokenizer.py --data data/bundled --out /tmp/tok

What it builds:
- Byte-level BPE (GPT-2 byte alphabet, so any text encodes) with VOCAB_SIZE entries, trained with the
  `tokenizers` library on the message text of data/bundled/. Digits are split one per token before BPE, so
  `42` is `4`, `2`: a tiny model learns column arithmetic far more easily than from merged digit groups.
- Special tokens at fixed ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>` (eos), 3 `<|pad|>` (pad,
  distinct from eos so padding never masks a real end of turn), and the non-special added tokens 4 `<think>`,
  5 `</think>` (kept by `decode(skip_special_tokens=True)`, as in SmolLM3). No BOS token.
- A short SmolLM3-style ChatML template (CHAT_TEMPLATE below), saved as chat_template.jinja.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "data" / "bundled"
DEFAULT_OUT = REPO_ROOT / "data" / "assets" / "tokenizer"

VOCAB_SIZE = 1024  # includes the 6 special/added tokens. The bundled text supports ~1.1k merges seen twice or
# more; 1024 is reachable with min_frequency=2, so the size is exact, and a multiple of 64 for the embedding.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
THINK_TOKENS = ["<think>", "</think>"]
MODEL_MAX_LENGTH = 1024

# SmolLM3-style ChatML, shortened. Reasoning mode: `/think` (default) or `/no_think`, read from the system
# prompt (which wins) or from `enable_thinking=False`; the flag is removed from the rendered system text and an
# empty system turn is not rendered. In /no_think mode every assistant turn, and the generation prompt, opens
# with an empty think block, so the generation prompt is always a token prefix of the full conversation.
# `{% generation %}` wraps the assistant content *and* its `<|im_end|>\n`: the model is trained to stop (TRL's
# `is_chat_template_stop_token_trained` checks this). In /no_think mode it also wraps the inserted empty think block:
# that block is part of the assistant's turn (SmolLM3's rule), so markers and prefix rendering give the same mask.
CHAT_TEMPLATE = """\
{#- nanopost ChatML template (SmolLM3 style). Modes: /think (default), /no_think. -#}
{%- set ns = namespace(mode="/think", system="") -%}
{%- if enable_thinking is defined and enable_thinking is false -%}
    {%- set ns.mode = "/no_think" -%}
{%- endif -%}
{%- if messages and messages[0].role == "system" -%}
    {%- set system_text = messages[0].content -%}
    {%- if "/no_think" in system_text -%}
        {%- set ns.mode = "/no_think" -%}
    {%- elif "/think" in system_text -%}
        {%- set ns.mode = "/think" -%}
    {%- endif -%}
    {%- set ns.system = system_text.replace("/no_think", "").replace("/think", "").strip() -%}
{%- endif -%}
{%- set think_prefix = "<think>\\n\\n</think>\\n" if ns.mode == "/no_think" else "" -%}
{%- if ns.system -%}
    {{- "<|im_start|>system\\n" + ns.system + "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == "assistant" -%}
        {{- "<|im_start|>assistant\\n" -}}
        {%- generation -%}
            {{- think_prefix + message.content + "<|im_end|>\\n" -}}
        {%- endgeneration -%}
    {%- elif not (message.role == "system" and loop.first) -%}
        {{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\\n" + think_prefix -}}
{%- endif -%}
"""


def iter_texts(data_dir: Path) -> Iterator[str]:
    """Every message's role and text in the bundled jsonl files, in sorted file order, without think markers.

    Roles are included so `system`, `user` and `assistant` (rendered by the chat template) are single tokens.
    """
    files = sorted(data_dir.rglob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no .jsonl files under {data_dir}; run scripts/make_data.py first")
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("messages", "prompt", "chosen", "rejected"):
                for message in row.get(key, []):
                    yield message["role"]
                    text = message["content"]
                    for token in THINK_TOKENS:
                        text = text.replace(token, "")
                    yield text


def build(data_dir: Path = DEFAULT_DATA) -> PreTrainedTokenizerFast:
    """Train the BPE and wrap it as a `PreTrainedTokenizerFast` with the special tokens and chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps whitespace tokens' offsets, so char_to_token (used for assistant masks) never
    # misses the `\n` that ends an assistant turn.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS + THINK_TOKENS,  # ids 0..5, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(data_dir), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    # The trainer registers all six as special; <think> and </think> are ordinary added tokens (SmolLM3 keeps
    # them in decoded text), so re-register them as non-special at their existing ids.
    wrapped.add_tokens([AddedTokenSpec(t) for t in THINK_TOKENS])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def AddedTokenSpec(content: str):  # noqa: N802 - reads like the AddedToken constructor it wraps
    from tokenizers import AddedToken

    return AddedToken(content, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)


def save(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """`save_pretrained`, then make tokenizer_config.json loadable by transformers 4.x as well as 5.x.

    transformers 5 writes `tokenizer_class: TokenizersBackend` and a list under `extra_special_tokens`;
    4.x knows neither. `PreTrainedTokenizerFast` + `additional_special_tokens` load the same in both.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if extra is not None:
        config["additional_special_tokens"] = extra
    config.pop("backend", None)
    config_path.write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .jsonl files to train on")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/assets/tokenizer)"
    )
    args = parser.parse_args()
    tokenizer = build(args.data)
    save(tokenizer, args.out)
    print(f"{args.out}: vocab {len(tokenizer)}, eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}")


if __name__ == "__main__":
    main()
