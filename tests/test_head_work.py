"""The LM head does only the work its callers read (issue 11): the DPO reference computes log-probs and no metric,
Values stay bit-identical."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it, by name ("aten.argmax.default" -> "argmax")."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _pairs_batch():
    torch.manual_seed(1)
    input_ids = torch.randint(0, 96, (4, 12))  # 2 pairs: [chosen; rejected]
    completion_mask = torch.zeros(4, 12, dtype=torch.long)
    completion_mask[:, 5:] = 1
    return {"input_ids": input_ids, "completion_mask": completion_mask, "attention_mask": torch.ones(4, 12)}


def test_reference_scoring_computes_no_metric_and_the_same_log_probs():
    """`DPOMethod.sequence_logps` (how every reference is scored) runs no argmax / mean over the logits, and its
    sums are bit-identical to the policy's scoring of the same model (which computes the metrics too)."""
    from engine.config import parse_config
    from engine.dpo import DPOMethod

    method = DPOMethod(parse_config(["--method", "dpo"]), tokenizer=None, accelerator=None)
    model, batch = _tiny_llama(), _pairs_batch()
    with torch.no_grad():
        with OpCounter() as reference_ops:
            reference_sums = method.sequence_logps(model, batch)
        with OpCounter() as policy_ops:
            policy_sums, stats = method.score(model, batch)
    assert reference_ops.counts.get("argmax", 0) == 0 and policy_ops.counts["argmax"] == 1  # top-1 hits
    assert policy_ops.counts["mean"] - reference_ops.counts["mean"] == 1  # the mean logit (the rest: RMSNorm's)
    assert stats.entropy is not None  # the policy's metrics are still there
    assert torch.equal(reference_sums, policy_sums)
