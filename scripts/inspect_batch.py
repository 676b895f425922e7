"""Show one training batch token by token: what each token is, whether the loss trains on it, and its log-prob.

    python scripts/inspect_batch.py --method dpo                      # the built-in DPO demo's first batch
    python scripts/inspect_batch.py --method sft --assistant_only_loss --per_device_train_batch_size 2
    python scripts/inspect_batch.py --method dpo --model_name_or_path output/sft --dataset_name my.jsonl \\
        --loss_type sigmoid sft --batch_index 3

Takes every train.py flag (same parser, `engine.config.parse_config`) plus `--batch_index K` (the K-th
micro-batch of the first epoch, in training order; default 0) and `--max_sequences N` (print only the first N
sequences of the batch). The batch is built by the same code the training loop uses (data preparation, the
seeded epoch order, the method's collator), and scored with the starting weights under no_grad.

For every sequence it prints each token with
    role     prompt | completion | assistant | text | padding. DPO: the collator's completion_mask. SFT: the
             data's structure, found by preparing the same rows again with the loss on the completion only
             (prompt/completion data) or on the assistant turns only (chat data, `{% generation %}` template);
             `text` for plain text.
    trained  `yes` if the token is a loss target (its log-prob enters the loss), `·` if not. The first token is
             never one: nothing predicts it.
    logp     log p(token | tokens before it) under the policy, for trained tokens.
and per sequence: DPO, the summed completion log-prob (policy and reference), the reward β·(logp − ref logp)
(reference-free losses: β·logp/|completion|, TRL's convention) and each pair's loss for every --loss_type;
SFT, the sequence's NLL (sum over trained tokens), their count and the mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine.errors import USER_ERRORS, UserError  # noqa: E402

ROLES = ("prompt", "completion", "assistant", "text", "padding")


@dataclass
class TokenView:
    position: int
    token_id: int
    text: str  # the token decoded on its own (special tokens kept)
    role: str  # one of ROLES
    trained: bool  # a loss target: its log-prob enters the loss
    logp: float | None  # log p(token | prefix) under the policy, for trained tokens


@dataclass
class SequenceView:
    title: str  # e.g. "pair 0 chosen (example 17)" or "row 1 (example 3)"
    tokens: list[TokenView]
    summary: dict[str, float] = field(default_factory=dict)  # per-sequence numbers (logp, reward, nll, ...)


@dataclass
class BatchView:
    method: str
    batch_index: int
    example_indices: list[int]
    sequences: list[SequenceView]
    pairs: list[dict[str, float]] = field(default_factory=list)  # DPO: per-pair rewards and losses
    notes: list[str] = field(default_factory=list)
    loss_types: list[str] = field(default_factory=list)


def inspect_batch(config, batch_index: int = 0) -> BatchView:
    """Build micro-batch `batch_index` of the first epoch exactly as `engine.loop.train` would, and score it."""
    import torch
    from accelerate.utils import set_seed

    from engine.data_order import DataOrder, grouping
    from engine.loop import make_method, micro_batches_of_epoch
    from engine.setup import build_accelerator, load_datasets, load_model_and_tokenizer

    notes = []
    if config.method == "dpo" and config.precompute_ref_log_probs:
        # The precompute pass scores the whole dataset; here the reference scores just this batch (the same
        # numbers up to padding).
        config = dataclasses.replace(config, precompute_ref_log_probs=False)
        notes.append("reference log-probs computed for this batch only (--precompute_ref_log_probs ignored)")
    if config.padding_free:
        # Same tokens, same numbers; shown one row per sequence, as the padded layout has them.
        config = dataclasses.replace(config, padding_free=False)
        notes.append("shown padded, one row per sequence (--padding_free packs them into one row: same numbers)")
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config, accelerator)
    method = make_method(config, tokenizer, accelerator)
    set_seed(config.seed)
    train_raw, _ = load_datasets(config)
    examples, report = method.prepare(train_raw, split_name=config.dataset_train_split)
    if getattr(report, "summary", None):
        notes.append(report.summary())
    data_seed = config.seed if config.data_seed is None else config.data_seed
    order = DataOrder(len(examples), config.per_device_train_batch_size, data_seed, 1, 0, False,
                      *grouping(config, examples))  # as the training loop orders them (--group_by_length too)
    batches = micro_batches_of_epoch(order.epoch_order(0), config.per_device_train_batch_size, 1, 0)
    if not 0 <= batch_index < len(batches):
        raise UserError(f"--batch_index {batch_index}: the first epoch has {len(batches)} micro-batches "
                        f"(0 to {len(batches) - 1})")
    indices = batches[batch_index]
    batch = method.collate([examples[i] for i in indices])
    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    from engine.forward import LeanCausalLM

    model = LeanCausalLM(model)  # the engine's forward: per-token statistics from the lean LM head
    if hasattr(method, "setup"):
        model = method.setup(model, examples, accelerator)
    model.eval()  # no dropout: the numbers are those of the starting weights, reproducibly
    with torch.no_grad(), accelerator.autocast():
        if config.method == "dpo":
            view = _score_dpo(method, model, batch, indices, tokenizer)
        else:
            structure = _sft_structure(report.format, train_raw, examples, config, tokenizer, accelerator, notes)
            view = _score_sft(model, batch, indices, tokenizer, structure)
    view.batch_index = batch_index
    view.notes = notes + view.notes
    return view


def _decode(tokenizer, token_ids: list[int]) -> list[str]:
    return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in token_ids]


def _score_dpo(method, model, batch, indices: list[int], tokenizer) -> BatchView:
    """Per-token log-probs, per-sequence sums, rewards and per-pair losses, with the engine's own DPO code."""
    from losses import PreferenceBatch, get_loss

    sums, stats = method.score(model, batch)  # (2B,), each (2B, T-1): position t scores token t + 1
    per_token = stats.logps  # (2B, T-1), zero off the completion
    pairs_count = len(indices)
    ref_sums = None if method.reference is None else method.reference.logps(batch)  # (2B,)
    chosen_lengths, rejected_lengths = batch["completion_mask"].sum(-1).chunk(2)
    pair = PreferenceBatch(
        chosen_logps=sums[:pairs_count], rejected_logps=sums[pairs_count:],
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        ref_chosen_logps=None if ref_sums is None else ref_sums[:pairs_count],
        ref_rejected_logps=None if ref_sums is None else ref_sums[pairs_count:],
        chosen_token_logps=per_token[:pairs_count], chosen_token_mask=stats.mask[:pairs_count],
    )
    beta = method.options.beta
    if ref_sums is None:  # reference-free (SimPO, ORPO): TRL's CPO convention, β · average log-prob
        rewards = beta * sums / batch["completion_mask"].sum(-1).clamp(min=1)
    else:
        rewards = beta * (sums - ref_sums)  # (2B,)
    losses = {name: get_loss(name).fn(pair, method.options).float().tolist() for name in method.loss_types}

    sequences = []
    for pair_index in range(pairs_count):
        for side, row in (("chosen", pair_index), ("rejected", pairs_count + pair_index)):
            ids = batch["input_ids"][row].tolist()
            attention = batch["attention_mask"][row].tolist()
            completion = batch["completion_mask"][row].tolist()
            trained = [False] + stats.mask[row].tolist()  # token t is predicted at position t - 1
            logps = [None] + per_token[row].float().tolist()
            tokens = []
            for position, (token_id, text) in enumerate(zip(ids, _decode(tokenizer, ids), strict=True)):
                role = "padding" if not attention[position] else "completion" if completion[position] else "prompt"
                tokens.append(TokenView(position, token_id, text, role, bool(trained[position]),
                                        logps[position] if trained[position] else None))
            summary = {"logp": float(sums[row])}
            if ref_sums is not None:
                summary["ref_logp"] = float(ref_sums[row])
            summary["reward"] = float(rewards[row])
            title = f"pair {pair_index} {side} (batch row {row}, example {indices[pair_index]})"
            sequences.append(SequenceView(title, tokens, summary))

    pairs = []
    for index in range(pairs_count):
        chosen, rejected = float(rewards[index]), float(rewards[pairs_count + index])
        pairs.append({"reward_chosen": chosen, "reward_rejected": rejected, "margin": chosen - rejected,
                      **{f"loss/{name}": values[index] for name, values in losses.items()}})
    notes = [] if ref_sums is not None else ["reference-free loss: rewards are β · logp / |completion|"]
    if method.config.ld_alpha is not None:
        notes.append(f"--ld_alpha {method.config.ld_alpha}: logp weighs the tokens past the shorter completion's "
                     "length by α, so it is not the plain sum of the token log-probs shown")
    return BatchView("dpo", 0, list(indices), sequences, pairs, notes, list(method.loss_types))


def _sft_structure(data_format: str, train_raw, examples, config, tokenizer, accelerator,
                   notes: list[str]) -> list[list[str]] | None:
    """Per prepared example, the role of each token from the data's structure (module docstring), or None.

    The same rows are prepared again by the engine's own code with the loss restricted to the completion
    (prompt/completion data) or to the assistant turns (chat data whose template marks them with
    `{% generation %}`); the tokens that then carry a label are the completion / assistant tokens.
    """
    from data.formats import CONVERSATIONS, MESSAGES, PROMPT_COMPLETION, PROMPT_COMPLETION_CONVERSATIONAL
    from data.sft import has_generation_markers
    from engine.sft import SFTMethod

    if data_format in (PROMPT_COMPLETION, PROMPT_COMPLETION_CONVERSATIONAL):
        role, flags = "completion", {"completion_only_loss": True, "assistant_only_loss": False}
    elif data_format in (MESSAGES, CONVERSATIONS) and has_generation_markers(tokenizer.chat_template):
        role, flags = "assistant", {"completion_only_loss": None, "assistant_only_loss": True}
    else:
        return None
    try:
        structured, _ = SFTMethod(dataclasses.replace(config, **flags), tokenizer, accelerator).prepare(
            train_raw, split_name=config.dataset_train_split)
    except USER_ERRORS as error:
        notes.append(f"roles: could not find the {role} tokens ({error})")
        return None
    if len(structured) != len(examples) or any(
            a["input_ids"] != b["input_ids"] for a, b in zip(structured, examples, strict=True)):
        notes.append(f"roles: the {role} tokens could not be aligned with the prepared rows; shown as text")
        return None
    return [[role if label != -100 else "prompt" for label in example["labels"]] for example in structured]


def _score_sft(model, batch, indices: list[int], tokenizer, structure) -> BatchView:
    """Per-token log-probs and per-sequence NLL with the engine's lean LM head (engine/forward.py)."""
    import torch

    stats = model(batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                  position_ids=batch.get("position_ids"))  # each (B, T-1), position t scoring token t + 1
    per_token, target_mask = stats.logps, stats.mask  # (B, T-1), zero (False) off the targets
    attention = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    sequences, notes = [], []
    if batch["input_ids"].shape[0] == 1 and "position_ids" in batch and len(indices) > 1:
        notes.append(f"padding-free packed batch: the {len(indices)} examples are one row")
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row].tolist()
        trained = [False] + target_mask[row].tolist()
        logps = [None] + per_token[row].float().tolist()
        example_roles = None
        if structure is not None:  # padding-free packing: the examples of the batch concatenated in one row
            example_roles = (structure[indices[row]] if batch["input_ids"].shape[0] == len(indices)
                             else [role for index in indices for role in structure[index]])
        tokens = []
        for position, (token_id, text) in enumerate(zip(ids, _decode(tokenizer, ids), strict=True)):
            if not attention[row, position]:
                role = "padding"
            elif example_roles is not None and position < len(example_roles):
                role = example_roles[position]
            else:
                role = "text"
            tokens.append(TokenView(position, token_id, text, role, bool(trained[position]),
                                    logps[position] if trained[position] else None))
        nll = -float(per_token[row].sum())
        count = int(target_mask[row].sum())
        summary = {"nll": nll, "trained_tokens": float(count), "mean_nll": nll / count if count else 0.0}
        title = f"row {row} (example {indices[row]})" if batch["input_ids"].shape[0] == len(indices) else f"row {row}"
        sequences.append(SequenceView(title, tokens, summary))
    return BatchView("sft", 0, list(indices), sequences, [], notes, ["nll"])


# ---------------------------------------------------------------------- printing


def render(view: BatchView, max_sequences: int | None = None) -> str:
    """The human-readable report (what the command prints)."""
    lines = [f"method {view.method}, micro-batch {view.batch_index} of epoch 0, examples {view.example_indices}, "
             f"loss {' + '.join(view.loss_types)}"]
    lines += [f"note: {note}" for note in view.notes]
    shown = view.sequences if max_sequences is None else view.sequences[:max_sequences]
    for sequence in shown:
        counts = {role: sum(t.role == role for t in sequence.tokens) for role in ROLES}
        trained = sum(t.trained for t in sequence.tokens)
        lines += ["", f"=== {sequence.title}: " + ", ".join(f"{n} {r}" for r, n in counts.items() if n)
                  + f"; {trained} trained"]
        lines.append("  " + "  ".join(f"{key} {value:.6g}" for key, value in sequence.summary.items()))
        lines.append(f"  {'pos':>4}  {'id':>6}  {'token':<24} {'role':<10} {'trained':<7}  logp")
        for token in sequence.tokens:
            logp = "" if token.logp is None else f"{token.logp:.4f}"
            lines.append(f"  {token.position:>4}  {token.token_id:>6}  {repr(token.text):<24} {token.role:<10} "
                         f"{'yes' if token.trained else '·':<7}  {logp}".rstrip())
    if view.pairs:
        lines += ["", "=== pairs: margin = reward_chosen − reward_rejected; loss/<name> = that loss of the pair"]
        for index, pair in enumerate(view.pairs):
            lines.append(f"  pair {index}: " + "  ".join(f"{key} {value:.6g}" for key, value in pair.items()))
    if max_sequences is not None and len(view.sequences) > max_sequences:
        lines.append(f"\n({len(view.sequences) - max_sequences} more sequences not shown; --max_sequences)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inspect_batch.py", add_help=False, allow_abbrev=False,
        description="Print one training batch token by token (roles, loss mask, log-probs). Takes every "
                    "train.py flag (python train.py --help) plus the two below.")
    parser.add_argument("--batch_index", type=int, default=0, help="which micro-batch of epoch 0 (default 0)")
    parser.add_argument("--max_sequences", type=int, default=None, help="print only the first N sequences")
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    own, rest = parser.parse_known_args(argv)
    if own.help:
        parser.print_help()
        return 0
    try:
        from engine.config import parse_config
        from examples.dpo_demo import with_starting_model

        config = with_starting_model(parse_config(rest))  # DPO with no model: the demo's SFT model, as train.py
        view = inspect_batch(config, own.batch_index)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(render(view, own.max_sequences), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
