"""`PrepReport`: what SFT or DPO preparation did to the rows, so that nothing is dropped or cut silently."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.formats import CONVERSATIONAL_FORMATS

NO_TARGET = "no target token"
NO_TARGET_AFTER_TRUNCATION = "no target token left after truncation to max_length"
PROMPT_TOO_LONG = "prompt of max_length tokens or more"
IDENTICAL_PAIR = "chosen == rejected"
"""Reasons a row is dropped (keys of `PrepReport.dropped`)."""


@dataclass
class PrepReport:
    """What preparation did, by input row (0-based indices), for the run log and for callers that warn or fail.

    Attributes:
        method: "sft" or "dpo".
        format: The detected format: an SFT format (a key of `data.formats.SFT_FORMATS`), or for DPO "text" /
            "conversational".
        num_rows: Rows read.
        max_length, truncation_mode: As requested (DPO truncates in the collator; SFT here).
        completion_only_loss, assistant_only_loss: SFT's resolved loss masks.
        packing, packing_strategy, padding_free: SFT packing, and whether the collator must run padding-free
            (TRL: `bfd` / `bfd_split` packing).
        prompt_source: DPO: where the prompt came from: the `prompt` column ("column"), the common start of chosen
            and rejected ("extracted"), or that while ignoring a text `prompt` next to whole conversations
            ("extracted_ignoring_prompt_column").
        kept_rows: DPO: the input row of each prepared example, in output order.
        dropped: Rows removed, by reason (the constants above).
        truncated_rows: Rows longer than `max_length` (SFT: cut here, or split by `bfd_split` packing; not counted
            for `wrapped` packing, which cuts every row; DPO: kept rows the collator will cut), and
            `num_truncated_tokens` the tokens that are cut.
        prompt_boundary_rows: Rows whose tokenized prompt is not a prefix of the tokenized prompt + completion
            (tokens merged across the boundary, or the template renders the prompt alone differently): the
            completion starts where they diverge.
        truncated_prompt_rows: DPO: rows whose prompt was cut to its last `max_prompt_length` tokens, and
            `num_prompt_tokens_cut` the prompt tokens removed.
        num_eos_appended: Text rows / completions that got the EOS token appended.
        num_no_target_kept: SFT rows without any target token that are kept (TRL drops them only when truncating
            without packing); they add no loss.
        num_examples, num_tokens, num_target_tokens: Examples produced (packed rows when packing), their tokens
            and the tokens that carry loss.
        warnings: Anything else a user should know (one line each).
    """

    method: str
    format: str
    num_rows: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    completion_only_loss: bool = False
    assistant_only_loss: bool = False
    packing: bool = False
    packing_strategy: str | None = None
    padding_free: bool = False
    prompt_source: str | None = None
    kept_rows: list[int] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    truncated_rows: list[int] = field(default_factory=list)
    num_truncated_tokens: int = 0
    prompt_boundary_rows: list[int] = field(default_factory=list)
    truncated_prompt_rows: list[int] = field(default_factory=list)
    num_prompt_tokens_cut: int = 0
    num_eos_appended: int = 0
    num_no_target_kept: int = 0
    num_examples: int = 0
    num_tokens: int = 0
    num_target_tokens: int = 0
    warnings: list[str] = field(default_factory=list)

    def drop(self, row: int, reason: str) -> None:
        self.dropped.setdefault(reason, []).append(row)

    @property
    def conversational(self) -> bool:
        return self.format == "conversational" or self.format in CONVERSATIONAL_FORMATS

    @property
    def num_dropped(self) -> int:
        return sum(len(rows) for rows in self.dropped.values())

    @property
    def dropped_rows(self) -> list[int]:
        """The first 20 dropped rows, whatever the reason."""
        return sorted(row for rows in self.dropped.values() for row in rows)[:20]

    @property
    def dropped_reasons(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.dropped.items()}

    @property
    def dropped_prompt_too_long(self) -> list[int]:
        return sorted(self.dropped.get(PROMPT_TOO_LONG, []))

    @property
    def skipped_identical(self) -> list[int]:
        return sorted(self.dropped.get(IDENTICAL_PAIR, []))

    @property
    def num_truncated(self) -> int:
        return len(self.truncated_rows)

    @property
    def num_prompt_not_prefix(self) -> int:
        return len(self.prompt_boundary_rows)

    @property
    def num_kept(self) -> int:
        return len(self.kept_rows)

    def summary(self) -> str:
        """One line for the run log."""

        def rows(count: int) -> str:
            return f"{count} row" + ("" if count == 1 else "s")

        source = f", prompt {self.prompt_source.replace('_', ' ')}" if self.prompt_source not in (None, "column") else ""
        parts = [f"{rows(self.num_rows)} ({self.format}{source}) -> {self.num_examples} examples"]
        if self.packing:
            parts.append(f"packed ({self.packing_strategy}, {self.max_length} tokens per row)")
        parts.append(f"{self.num_target_tokens}/{self.num_tokens} tokens carry loss")
        if self.completion_only_loss:
            parts.append("completion-only loss")
        if self.assistant_only_loss:
            parts.append("assistant-only loss")
        if self.num_eos_appended:
            parts.append(f"EOS appended to {rows(self.num_eos_appended)}")
        if self.truncated_prompt_rows:
            parts.append(f"{rows(len(self.truncated_prompt_rows))} with the prompt cut to its last max_prompt_length "
                         f"tokens ({self.num_prompt_tokens_cut} prompt tokens cut)")
        if self.num_truncated:
            where = " by the collator" if self.method == "dpo" else ""
            parts.append(f"{rows(self.num_truncated)} over max_length={self.max_length} "
                         f"({self.num_truncated_tokens} tokens cut{where})")
        if self.num_dropped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.dropped_reasons.items())
            parts.append(f"{rows(self.num_dropped)} dropped ({reasons}; first: {self.dropped_rows[:5]})")
        if self.num_no_target_kept:
            parts.append(f"{rows(self.num_no_target_kept)} without any target token (kept, as TRL does; no loss)")
        if self.num_prompt_not_prefix:
            parts.append(f"{rows(self.num_prompt_not_prefix)} where prompt tokens merge with the completion "
                         "(the completion starts where the tokens diverge)")
        return "; ".join(parts + [f"warning: {warning}" for warning in self.warnings])
