"""The functional layer under the objectives: per-token divergences and the sampled-token estimator, each
as a plain function of tensors. One module per line of the math (each docstring holds its part):

- `divergences`: the per-token divergences, registered by name (`register_divergence`), and the math of one chunk
  of rows that every divergence kernel runs (`chunk_divergence`);
- `chunks`: how kernels walk [N, V] rows a chunk at a time, and the checks of their settings;
- `exact`: divergences over logits ([..., V] in, [...] out), their top-k form, and `masked_mean`;
- `sampled`: the sampled-token estimator's log-probs and policy-gradient loss over logits, and a task reward's
  advantage and term;
- `fused`: the same values from last hidden states and the LM head, one chunk of rows at a time;
- `tail`: a served teacher's top-k with the rest of its mass as one class (a lower bound on the exact divergence);
- `spans`: the sampled estimator over spans, for a teacher with another tokenizer.
"""

from mmopd.losses.chunks import LOGPROB_FLOOR
from mmopd.losses.divergences import (DIVERGENCES, Divergence, available_divergences, chunk_divergence,
                                      divergence_math, register_divergence, through_softmax, unregister_divergence)
from mmopd.losses.exact import masked_mean, token_divergence, topk_token_divergence
from mmopd.losses.fused import (fused_divergence_loss, fused_excluded_logsumexp, fused_gathered_logits,
                                fused_sampled_reverse_kl_loss, fused_token_divergence, fused_token_logprobs,
                                fused_topk_logits)
from mmopd.losses.sampled import (Shaping, leave_one_out_mean, policy_gradient_loss, reward_advantage,
                                  sampled_reverse_kl_loss, sampled_token_logprobs, shaped_sampled_loss)
from mmopd.losses.spans import (at_spans, lookahead, span_log_ratios, span_share, span_sums, span_targets,
                                span_token_logprobs, span_totals)
from mmopd.losses.tail import excluded_logsumexp, tail_token_divergence, teacher_tail_logprob

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "available_divergences",
    "register_divergence",
    "unregister_divergence",
    "divergence_math",
    "chunk_divergence",
    "through_softmax",
    "LOGPROB_FLOOR",
    "token_divergence",
    "sampled_token_logprobs",
    "sampled_reverse_kl_loss",
    "shaped_sampled_loss",
    "leave_one_out_mean",
    "reward_advantage",
    "policy_gradient_loss",
    "Shaping",
    "masked_mean",
    "fused_token_divergence",
    "fused_divergence_loss",
    "fused_sampled_reverse_kl_loss",
    "fused_token_logprobs",
    "topk_token_divergence",
    "fused_topk_logits",
    "fused_gathered_logits",
    "fused_excluded_logsumexp",
    "excluded_logsumexp",
    "tail_token_divergence",
    "teacher_tail_logprob",
    "span_sums",
    "span_token_logprobs",
    "span_targets",
    "lookahead",
    "span_log_ratios",
    "span_share",
    "span_totals",
    "at_spans",
]
