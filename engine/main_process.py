"""Decisions only the main process can make (take the output folder's lock, check its disk), shared with all.

With several processes, an error raised on the main process alone would leave the others waiting in the next
collective until it times out. `decide_on_main(accelerator, action)` runs `action` on the main process and
broadcasts its outcome: every process returns the same value, or raises the same one-line error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from engine.errors import USER_ERRORS, UserError

T = TypeVar("T")


def decide_on_main(accelerator, action: Callable[[], T]) -> T:
    """`action()` on the main process; its result (or its user error, as one line) on every process."""
    if accelerator.num_processes == 1:
        return action()
    from accelerate.utils import broadcast_object_list

    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", action())]
        except BaseException as error:  # also a bug or a signal: the others must not wait for ever
            line = str(error) if isinstance(error, USER_ERRORS) else f"the main process stopped ({error!r})"
            broadcast_object_list([("error", line)], from_process=0)
            raise
    broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value
