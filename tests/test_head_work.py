"""The LM head does only the work its callers read (issue 11): the DPO reference computes log-probs and no metric,
and the backward of a checkpointed head chunk recomputes only what the gradient needs. Values stay bit-identical."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from losses.logps import target_token_stats

METRIC_OPS = ("argmax", "mean", "logsumexp")  # is_top1, mean_logits, and the log-sum-exp (saved by the forward)


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


def test_checkpointed_chunk_backward_recomputes_only_the_gradient_path():
    """The backward of the checkpointed chunks re-runs the head matmul, not the metrics nor the log-sum-exp (saved
    from the forward); log-probs, metrics and both gradients are bit-identical to the same chunks without
    checkpointing, computed with torch's own logsumexp and its autograd (fp32)."""
    torch.manual_seed(2)
    rows = torch.randn(300, 16, requires_grad=True)  # 3 chunks of 128 rows (the last one 44)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    upstream = torch.linspace(-1.0, 2.0, 300)  # a gradient that differs per row
    wanted = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

    def project(hidden):
        return hidden @ weight.T

    values = target_token_stats(rows, targets, project, wanted=wanted, chunk_rows=128)
    with OpCounter() as backward_ops:
        (values["logps"] * upstream).sum().backward()
    for op in METRIC_OPS:
        assert backward_ops.counts.get(op, 0) == 0, (op, backward_ops.counts)
    assert backward_ops.counts["mm"] == 3 * 3  # per chunk: the logits again, then grad of rows and of the weight
    assert backward_ops.counts.get("new_zeros", 0) == 0  # the target's gradient is added in place, no (k, V) zeros

    chunked_grads = (rows.grad.clone(), weight.grad.clone())
    rows.grad = weight.grad = None
    plain_logps, plain_metrics = [], []
    for chunk, chunk_targets in zip(rows.split(128), targets.split(128), strict=True):  # torch's autograd, no reuse
        z = project(chunk)
        lse = torch.logsumexp(z, dim=-1)
        plain_logps.append(z.gather(1, chunk_targets.unsqueeze(1)).squeeze(1) - lse)
        with torch.no_grad():
            log_p = z - lse.unsqueeze(1)
            plain_metrics.append([lse - (log_p.exp() * z).sum(-1), torch.logsumexp(2 * log_p, dim=-1), z.mean(-1),
                                  z.argmax(-1) == chunk_targets])
    plain_logps = torch.cat(plain_logps)
    (plain_logps * upstream).sum().backward()
    assert torch.equal(values["logps"], plain_logps)
    for name, *parts in zip(wanted, *plain_metrics, strict=True):
        assert torch.equal(values[name], torch.cat(parts)), name
    assert torch.equal(chunked_grads[0], rows.grad) and torch.equal(chunked_grads[1], weight.grad)
