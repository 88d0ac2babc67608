"""Vocab-parallel cross entropy over row chunks, without an fp32 copy of the logits.

megatron-core's ``vocab_parallel_cross_entropy`` casts the whole ``[s, b, vocab/tp]`` logits to
fp32 and keeps the fp32 softmax for backward: at 2048 tokens x 8192 vocabulary that is two
64 MiB tensors per step, each passed over several times (max, subtract, exp, sum, divide, then
the gradient and its cast back). On a CPU those passes, and the page faults of the fresh
64 MiB buffers, cost as much as the LM head itself.

This function computes the same loss in one pass over the logits, in chunks of rows small
enough to stay in cache: per row the max and the sum of ``exp(x - max)``; the tensor-parallel
ranks combine theirs (all-reduce max, then sum), and the loss is
``log(sum) - (logit[target] - max)``. Backward keeps the logits in their own dtype plus two
fp32 numbers per row, recomputes ``softmax - onehot`` chunk by chunk and writes the gradient in
the logits' dtype (over the logits themselves with ``overwrite_logits``). Arithmetic is fp32
throughout, as in megatron-core; the two agree to fp32 rounding (tested at TP=1 and TP=2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

CHUNK_BYTES = 1 << 20  # fp32 working set of one chunk: fits in L2


def _fp32_chunks(x: Tensor):
    """Cache-sized chunks of 2-D ``x``'s rows, each copied into one reused fp32 buffer:
    ``(rows, chunk)`` pairs."""
    n, vocab = x.shape
    step = max(1, CHUNK_BYTES // (4 * vocab))
    buf = torch.empty(min(step, n), vocab, dtype=torch.float32, device=x.device)
    for i in range(0, n, step):
        chunk = buf[:min(step, n - i)]
        chunk.copy_(x[i:i + step])
        yield slice(i, i + step), chunk


def _tp(group):
    if group is None:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return None, 0
        group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return None, 0
    return group, dist.get_rank(group)


class _ChunkedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group, overwrite: bool) -> Tensor:
        group, rank = _tp(group)
        # the gradient may take the logits' place only when they are an intermediate result
        ctx.overwrite = bool(overwrite) and logits.grad_fn is not None and logits.is_contiguous()
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab)
        t = target.reshape(-1)
        start = rank * vocab
        local_target = (t >= start) & (t < start + vocab)
        idx = torch.where(local_target, t - start, torch.zeros_like(t))
        # the target's logit where this rank holds it, 0 elsewhere (summed over ranks below)
        picked = x.gather(1, idx.unsqueeze(1)).squeeze(1).float() * local_target
        n = x.shape[0]
        top = torch.empty(n, dtype=torch.float32, device=x.device)  # row max
        sums = torch.empty(n, dtype=torch.float32, device=x.device)  # sum of exp(x - max)
        for sl, c in _fp32_chunks(x):
            m = c.amax(dim=1)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            top[sl] = m
            sums[sl] = c.sub_(m.unsqueeze(1)).exp_().sum(dim=1)
        if group is not None:  # rescale every rank's sum to the global max, then add them up
            local = top.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            sums.mul_(local.sub_(top).exp_())
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=group)
        log_sum = sums.log_()
        ctx.save_for_backward(logits, idx, local_target, top, log_sum)
        # loss = log(sum(exp(x))) - x[target], shifted by the max so large logits keep precision
        return (log_sum - (picked - top)).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, idx, local_target, top, log_sum = ctx.saved_tensors
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab)
        g = grad_loss.reshape(-1).float()
        if ctx.overwrite and x.data_ptr() == logits.data_ptr():
            grad = x.detach()  # each chunk is read before it is written
        else:
            grad = torch.empty_like(x, memory_format=torch.contiguous_format)
        rows = torch.arange(x.shape[0], device=x.device)
        for sl, p in _fp32_chunks(x):
            p.sub_(top[sl].unsqueeze(1)).sub_(log_sum[sl].unsqueeze(1)).exp_()
            p[rows[:p.shape[0]], idx[sl]] -= local_target[sl].to(p.dtype)
            grad[sl] = p.mul_(g[sl].unsqueeze(1))
        return grad.view(logits.shape), None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group=None, *,
                                 overwrite_logits: bool = False) -> Tensor:
    """Per-token loss of ``logits[..., vocab/tp]`` (this rank's vocabulary shard) at ``target``
    (global token ids, shape ``logits.shape[:-1]``), fp32. ``group``: the tensor-parallel group
    (default: megatron-core's, or none when model parallelism is not initialised).

    ``overwrite_logits``: backward writes the gradient into the logits' storage instead of a
    new tensor of their size (a language model's logits are dead by then; megatron-core's own
    cross entropy likewise works in place on fp32 logits). It saves a ``tokens x vocab``
    allocation per step, and applies only when the logits are a contiguous intermediate
    result (never a leaf tensor); do not set it when the logits are used elsewhere.
    """
    return _ChunkedVocabParallelCE.apply(logits, target, group, overwrite_logits)
