"""Next-token loss fused with the vocabulary projection, for training with large vocabularies.

cross_entropy(hidden @ weight.T, targets) needs the [tokens, vocab] logits, their log-softmax and two
gradients of that size alive at once (about 0.8 GB at 1,024 tokens x 50k vocabulary). Here the rows are
processed in chunks: each chunk's logits are formed, turned into the loss and, when gradients are needed,
straight into the gradients of hidden and weight (softmax - one_hot), then dropped. Peak memory is one chunk
of logits; the matmul work is the same three GEMMs as the unfused path.
"""

from __future__ import annotations

import torch


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, ignore_index):
        valid = targets != ignore_index
        count = valid.sum().clamp_min(1).to(torch.float32)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        weight_f32 = weight.float() if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.T).float()
            keep = valid[rows]
            safe_targets = targets[rows].masked_fill(~keep, 0)
            target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)
            # one exponential pass serves the log-normaliser and the softmax: exp(logit - max), in place
            peak = logits.amax(dim=-1, keepdim=True)
            unnormalised = logits.sub_(peak).exp_()
            sums = unnormalised.sum(dim=-1)
            log_norm = peak.squeeze(1) + sums.log()
            total += ((log_norm - target_logit) * keep).sum()
            if needs_grad:
                weights = keep / count
                probs = unnormalised.mul_((weights / sums)[:, None])  # softmax x row weight
                probs[torch.arange(probs.shape[0], device=probs.device), safe_targets] -= weights
                grad_hidden[rows] = (probs @ weight_f32).to(hidden.dtype)
                grad_weight.addmm_(probs.T, hidden[rows].float())
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = 256,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets, ignoring `ignore_index`.
    hidden [N, D], weight [V, D], targets [N]. Equal to F.cross_entropy on the full logits."""
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, ignore_index)
