"""The losses package's own error: an unknown loss name or an option a loss cannot take, said in one line."""


class LossError(ValueError):
    """Unknown `--loss_type` or an option out of a loss's range. The CLI prints it on one line and exits 2."""
