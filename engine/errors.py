"""User-facing errors: one line that names the problem and the fix, printed without a traceback."""


class UserError(Exception):
    """Bad input from the user (flags, files, data rows). `train.py` prints it on one line and exits 2."""
