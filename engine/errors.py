"""User-facing errors: one line that names the problem and the fix, printed without a traceback.

Each package raises its own error (data/: `DataError`, losses/: `LossError`, lora/: `LoRAError`, engine/:
`UserError`), so that no lower package reaches up into the engine. `USER_ERRORS` is the tuple the CLI turns into
one `error:` line and exit 2.
"""

from data.errors import DataError
from lora.errors import LoRAError
from losses.errors import LossError


class UserError(Exception):
    """Bad input from the user (flags, files, checkpoints). `train.py` prints it on one line and exits 2."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, DataError, LossError, LoRAError)
