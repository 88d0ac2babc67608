"""dsq's chunked vocab-parallel cross entropy against torch's and megatron-core's, TP=1 and 2."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import gather, megatron_tp_groups, spawn

S, B, V = 37, 3, 128  # 111 rows: chunks of 5 rows leave a tail of 1


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, B, V, generator=g) * 8
    logits[3, 1] += 1e4  # one row far from zero: the max shift keeps exp finite
    logits[5, 2, 7] = 60.0  # one dominant logit: the loss there is ~0
    target = torch.randint(0, V, (S, B), generator=g)
    target[5, 2] = 7
    weight = torch.rand(S, B, generator=g)  # d(sum(loss * weight)) / d logits
    return logits, target, weight


def _reference(logits, target, weight):
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x.view(-1, V), target.view(-1), reduction="none").view(S, B)
    (loss * weight.double()).sum().backward()
    return loss.detach(), x.grad


def _run(fn, logits, target, weight):
    x = logits.clone().requires_grad_()
    loss = fn(x, target)
    (loss.float() * weight).sum().backward()
    return loss.detach(), x.grad


def _worker(rank, world, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

        from dsq.models import loss as dsq_loss
        from dsq.models.gpt import build_gpt
    solo, tp2 = megatron_tp_groups(rank, world)
    dsq_loss.CHUNK_BYTES = 4 * (V // 2) * 5  # 5 rows per chunk at TP=2, 2-3 at TP=1
    logits, target, weight = _data()
    out = {"ref": _reference(logits, target, weight)}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype)
            shard = x.chunk(2, -1)[rank].contiguous()
            out[f"tp1/{dtype}"] = _run(
                lambda a, t: dsq_loss.vocab_parallel_cross_entropy(a, t, solo), x, target, weight)
            got = _run(lambda a, t: dsq_loss.vocab_parallel_cross_entropy(a, t, tp2), shard,
                       target, weight)
            want = _run(megatron_ce, shard, target, weight)
            out[f"tp2/{dtype}"] = (got[0], gather(got[1], tp2, -1), got[1].dtype)
            out[f"megatron-tp2/{dtype}"] = (want[0], want[1])
            out[f"shard-grad/{dtype}"] = (got[1], want[1])
        # the model's loss is the cross entropy of its own logits
        cfg = SimpleNamespace(num_layers=1, hidden_size=64, num_heads=4, ffn_hidden_size=128,
                              seq_len=16, vocab_size=V, tie_embeddings=False, dropout=0.0,
                              init_std=0.02)
        model = build_gpt(cfg, "fp32", seed=0)
        ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(16).expand(2, -1)
        with torch.no_grad():
            loss = model(ids, pos, None, labels=ids.roll(-1, 1))
            logits_shard = model(ids, pos, None)  # [b, s, V/2]
            want = megatron_ce(logits_shard.transpose(0, 1).contiguous(),
                               ids.roll(-1, 1).t().contiguous()).t()
        out["model"] = (type(model).__name__, loss, want)
    finally:
        parallel_state.destroy_model_parallel()
    if rank == 0:
        torch.save(out, path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("ce") / "results.pt"
    spawn(_worker, str(path), world_size=2)
    return torch.load(path, weights_only=False)


def _close(got, want, rtol):
    err = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    assert err < rtol, err
    return err


@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_fp32_matches_torch(results, tp):
    ref_loss, ref_grad = results["ref"]
    loss, grad = results[f"{tp}/{torch.float32}"][:2]
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    _close(loss, ref_loss, 1e-6)
    _close(grad, ref_grad, 1e-6)
    assert float(loss[5, 2]) < 1e-6 and torch.isfinite(loss).all()


@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_bf16_logits_give_bf16_grads_at_bf16_rounding(results, tp):
    x = _data()[0].bfloat16().float()
    ref_loss, ref_grad = _reference(x, *_data()[1:])
    loss, grad = results[f"{tp}/{torch.bfloat16}"][:2]
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    _close(loss, ref_loss, 1e-6)  # fp32 arithmetic on the bf16 logits
    _close(grad, ref_grad, 2 ** -8)  # only the gradient's own rounding to bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp2_matches_megatron(results, dtype):
    loss, grad = results[f"tp2/{dtype}"][:2]
    m_loss, m_grad = results[f"megatron-tp2/{dtype}"]
    _close(loss, m_loss, 1e-6)
    mine, theirs = results[f"shard-grad/{dtype}"]
    assert mine.dtype == theirs.dtype == dtype
    _close(mine, theirs, 1e-6 if dtype == torch.float32 else 2 ** -7)


def test_model_uses_it(results):
    name, loss, want = results["model"]
    assert name == "DsqGPTModel"
    assert loss.shape == want.shape == (2, 16)
    _close(loss, want, 1e-6)


def test_overwrite_logits_puts_the_same_gradient_in_their_storage():
    from dsq.models.loss import vocab_parallel_cross_entropy as ce

    logits, target, weight = _data()
    for dtype in (torch.float32, torch.bfloat16):
        ref_loss, ref_grad = _reference(logits.to(dtype).float() * 2, target, weight)
        x = logits.to(dtype).clone().requires_grad_()
        y = x * 2  # an intermediate result, as a model's logits are
        seen = {}
        y.register_hook(lambda g: seen.update(grad=g.clone(), ptr=g.data_ptr()))
        loss = ce(y, target, overwrite_logits=True)
        (loss * weight).sum().backward()
        assert seen["ptr"] == y.data_ptr()  # the gradient lives where the logits were
        assert not seen["grad"].requires_grad
        tol = 1e-6 if dtype == torch.float32 else 2 ** -7
        _close(seen["grad"], ref_grad, tol)
        _close(x.grad, 2 * ref_grad, tol)
        _close(loss, ref_loss, 1e-6)
    # a leaf tensor is never overwritten
    x = logits.clone().requires_grad_()
    (ce(x, target, overwrite_logits=True) * weight).sum().backward()
    assert torch.equal(x.detach(), logits)
    _close(x.grad, _reference(logits, target, weight)[1], 1e-6)
