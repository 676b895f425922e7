"""The README.md model card: base model, data, method and loss, hyperparameters, final metrics, how to load it,
and a `python train.py` command that reproduces the run."""

import shlex

from engine.config import parse_config
from engine.model_card import command_line, write_model_card

ARGV = ["--method", "dpo", "--model_name_or_path", "HuggingFaceTB/SmolLM3-3B", "--dataset_name",
        "trl-lib/ultrafeedback_binarized", "--beta", "0.25", "--loss_type", "sigmoid", "sft", "--loss_weights", "1",
        "0.5", "--use_peft", "--lora_r", "8", "--learning_rate", "5e-6", "--output_dir", "out/smollm3-dpo",
        "--push_to_hub", "--hub_model_id", "you/smollm3-dpo", "--hub_token", "hf_secret", "--bf16", "false"]


def test_model_card_has_every_section(tmp_path):
    config = parse_config(ARGV)
    path = write_model_card(tmp_path, config, {"eval_loss": 0.6123456789, "eval_rewards/accuracies": 0.75},
                            base_model=config.model_name_or_path, dataset=config.dataset_name,
                            repo_id=config.hub_model_id, versions={"torch": "2.13"})
    card = path.read_text()
    assert path.name == "README.md"
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM3-3B\nlibrary_name: peft\n")
    assert "datasets:\n- trl-lib/ultrafeedback_binarized\n---" in card  # a Hub id: linked in the header
    assert "# you/smollm3-dpo" in card
    assert "Direct Preference Optimization (DPO); loss: sigmoid, sft (β = 0.25)" in card
    assert "| `learning_rate` | 5e-06 |" in card and "| `loss_weights` | 1.0, 0.5 |" in card
    assert "| `lora_r` | 8 |" in card and "LoRA adapter (r = 8)" in card
    assert "| `eval_loss` | 0.612346 |" in card and "| `eval_rewards/accuracies` | 0.75 |" in card  # 6 digits
    assert 'AutoPeftModelForCausalLM.from_pretrained("you/smollm3-dpo")' in card
    assert "Framework versions: torch 2.13" in card
    assert "hf_secret" not in card  # the token is never written


def test_local_data_is_not_a_hub_link(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    config = parse_config(["--model_name_or_path", "m", "--dataset_name", str(data)])
    card = write_model_card(tmp_path, config, {}, base_model="m", dataset=str(data)).read_text()
    assert "datasets:" not in card and "library_name: transformers" in card and "(none logged)" in card
    assert 'AutoModelForCausalLM.from_pretrained("' in card


def test_the_cards_command_reproduces_the_config():
    """The command in 'How it was trained' parses back to the same config (minus the token it leaves out)."""
    config = parse_config(ARGV)
    argv = shlex.split(command_line(config).replace("\\\n", " "))[2:]
    again = parse_config([*argv, "--hub_token", "hf_secret"])
    assert again == config
