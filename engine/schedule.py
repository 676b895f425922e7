"""When the loop logs, evaluates and saves: TRL's --logging_strategy / --eval_strategy / --save_strategy.

    no      never
    steps   every --logging_steps / --eval_steps / --save_steps optimizer steps (a value below 1 is a share of the
            run's total steps, rounded up, as in transformers)
    epoch   at the end of each epoch, and at the last step when --max_steps ends the run inside an epoch
    best    (--save_strategy only) after each evaluation that improves --metric_for_best_model

As transformers' DefaultFlowCallback: --eval_strategy steps also evaluates the last step, --eval_delay holds back
evaluations (in steps for `steps`, in epochs for `epoch`), --logging_first_step adds a record after step 1, and
--eval_steps defaults to --logging_steps. nanopost keeps two habits of its own: a training record at the last
step (its final loss), and, when --eval_strategy is not given at all, evaluation at the last step when the data
has a test split (plus every --eval_steps when given; --eval_steps 0: never). An explicit --eval_strategy no
never evaluates. The last step's state is the final model, so `steps` and `epoch` add no checkpoint there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def interval(value: float | None, total_steps: int) -> int:
    """An interval in optimizer steps; `value` < 1 is a ratio of the total steps (0 or None: never)."""
    if not value:
        return 0
    return max(math.ceil(value * total_steps), 1) if value < 1 else int(value)


@dataclass(frozen=True)
class Schedule:
    logging_strategy: str
    eval_strategy: str | None  # None: not given (nanopost's default, described above)
    save_strategy: str
    log_every: int
    eval_every: int
    save_every: int
    eval_at_end: bool
    logging_first_step: bool
    eval_delay: float
    total_steps: int

    @classmethod
    def of(cls, config, total_steps: int) -> Schedule:
        eval_steps = config.eval_steps
        if config.eval_strategy == "steps" and eval_steps is None:
            eval_steps = config.logging_steps  # as transformers
        if config.eval_strategy == "no":
            eval_steps = 0
        eval_at_end = config.eval_strategy == "steps" or (config.eval_strategy is None and eval_steps != 0)
        return cls(config.logging_strategy, config.eval_strategy, config.save_strategy,
                   interval(config.logging_steps, total_steps), interval(eval_steps, total_steps),
                   interval(config.save_steps, total_steps), eval_at_end, config.logging_first_step,
                   config.eval_delay, total_steps)

    def log(self, step: int, epoch_ended: bool) -> bool:
        """Write a training record after `step`."""
        last = step == self.total_steps
        if self.logging_first_step and step == 1:
            return True
        if self.logging_strategy == "steps":
            return step % self.log_every == 0 or last
        return self.logging_strategy == "epoch" and (epoch_ended or last)

    def evaluate(self, step: int, epoch: float, epoch_ended: bool) -> bool:
        """Evaluate after `step` (when the data has a test split)."""
        last = step == self.total_steps
        if self.eval_strategy in (None, "steps"):
            due = bool(self.eval_every) and step % self.eval_every == 0 or last and self.eval_at_end
            return due and self.eval_delay <= step
        return self.eval_strategy == "epoch" and (epoch_ended or last) and self.eval_delay <= epoch

    def save(self, step: int, epoch_ended: bool, improved: bool) -> bool:
        """Save a checkpoint after `step` (`improved`: this step's evaluation set a new best metric)."""
        if self.save_strategy == "steps":
            return bool(self.save_every) and step % self.save_every == 0
        if self.save_strategy == "epoch":
            return epoch_ended and step < self.total_steps
        return self.save_strategy == "best" and improved
