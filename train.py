"""Post-training from the command line: SFT and DPO in plain PyTorch, with TRL's flag names.

    python train.py --method sft                          # built-in tiny SmolLM3 on the bundled chat data
    python train.py --method dpo                          # built-in DPO demo (examples/dpo_demo.py)
    python train.py --method sft --model_name_or_path HuggingFaceTB/SmolLM3-3B-Base \\
        --dataset_name HuggingFaceTB/smoltalk2_everyday_convs_think
    python train.py --method dpo --model_name_or_path <sft model> --dataset_name Anthropic/hh-rlhf
    python train.py --config run.yaml --learning_rate 1e-5   # flags override the YAML file
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml train.py --method sft  # 2 processes

Bad input ends with a one-line error (exit 2), never a traceback.
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    # SIGTERM as Ctrl-C until the run installs its own handlers (engine/faults.py): one line even while importing.
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread (called in-process by a test runner's thread)
        return _main(argv)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    from engine.errors import USER_ERRORS

    try:
        from engine.config import parse_config

        config = parse_config(argv)  # flag and YAML errors surface here, before torch is imported

        from examples import dpo_demo

        if dpo_demo.is_demo(config):  # DPO with no model (the demo's SFT start) or no data (its report)
            dpo_demo.run(config)
        else:
            from engine.loop import train

            train(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as interrupted:  # engine.faults.Interrupted says what survived; a bare one is Ctrl-C
        print(f"error: {interrupted or 'interrupted'}", file=sys.stderr, flush=True)
        return getattr(interrupted, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
