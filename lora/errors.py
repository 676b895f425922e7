"""The lora package's own error: a LoRA setting or adapter folder that cannot be used, said in one line."""


class LoRAError(ValueError):
    """Bad LoRA setting, target pattern or adapter folder. The CLI prints it on one line and exits 2."""
