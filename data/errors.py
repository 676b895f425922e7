"""The data package's own error: a bad row, file, column or data setting, said in one line."""


class DataError(ValueError):
    """Bad training data or data setting. The message names the row, the field and the fix; the CLI prints it
    on one line and exits 2."""
