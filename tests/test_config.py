"""The typed config: TRL's flag names and boolean forms, YAML with flags on top, clear errors."""

import pytest

from engine.config import TrainConfig, parse_config
from engine.errors import UserError


def test_method_defaults_follow_trl():
    """TRL 1.16: SFTConfig.learning_rate = 2e-5, DPOConfig.learning_rate = 1e-6, DPO loss_type = ["sigmoid"]."""
    sft = parse_config(["--method", "sft", "--model_name_or_path", "some/model"])
    dpo = parse_config(["--method", "dpo", "--model_name_or_path", "some/model"])
    assert sft.learning_rate == 2e-5 and sft.loss_type == ["nll"] and sft.output_dir == "output/sft"
    assert dpo.learning_rate == 1e-6 and dpo.loss_type == ["sigmoid"] and dpo.beta == 0.1
    assert sft.eval_steps is None and sft.logging_steps == 10  # evaluate at the end only (TRL: eval_strategy "no")


def test_builtin_model_defaults():
    """With no --model_name_or_path the demo's tiny models get their own defaults (BUILTIN_MODEL_DEFAULTS), for
    every flag not given; a given flag, or a named model, keeps the user's / TRL's value."""
    sft = parse_config(["--method", "sft"])
    assert (sft.learning_rate, sft.per_device_train_batch_size, sft.assistant_only_loss) == (2e-3, 32, True)
    assert parse_config(["--method", "dpo"]).learning_rate == 3e-5
    assert parse_config(["--method", "sft", "--learning_rate", "2e-5"]).learning_rate == 2e-5
    assert parse_config(["--method", "sft", "--per_device_train_batch_size", "4"]).per_device_train_batch_size == 4


@pytest.mark.parametrize("argv, expected", [
    (["--bf16"], True), (["--bf16", "False"], False), (["--bf16", "true"], True), (["--bf16", "0"], False),
])
def test_boolean_forms(argv, expected):
    """`--bf16` alone means True; `--bf16 False` / `--bf16 true` are TRL's explicit forms."""
    assert parse_config(argv).bf16 is expected


def test_lists_and_numbers():
    config = parse_config(["--method", "dpo", "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5",
                           "--learning_rate", "3e-6", "--max_steps", "7"])
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.5]
    assert config.learning_rate == 3e-6 and config.max_steps == 7


def test_yaml_then_flags(tmp_path):
    """Flags override the file; the file overrides defaults."""
    path = tmp_path / "run.yaml"
    path.write_text("method: dpo\nbeta: 0.25\nlearning_rate: 5.0e-7\nloss_type: [hinge]\n")
    config = parse_config(["--config", str(path), "--beta", "0.5"])
    assert (config.method, config.beta, config.learning_rate, config.loss_type) == ("dpo", 0.5, 5e-7, ["hinge"])


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--method", "dpo", "--beta", "0"], "--beta"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--label_smoothing", "0.5"], "--label_smoothing"),
    (["--max_steps", "abc"], "expected int"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--method", "ppo"], "--method"),
    (["--method", "dpo", "--loss_type", "sigmoid", "hinge", "--loss_weights", "1"], "one weight per loss type"),
])
def test_bad_values_are_one_line_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(argv)


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 1.0e-5\nlearnig_rate: 2\n")
    with pytest.raises(UserError, match="unknown keys learnig_rate"):
        parse_config(["--config", str(path)])


def test_direct_construction_validates():
    with pytest.raises(UserError, match="--per_device_train_batch_size"):
        TrainConfig(per_device_train_batch_size=0)
