"""Activation recompute (``train.recompute``) gives the same loss and gradients as keeping the
activations, bit for bit, with quantized layers and stochastic rounding, at TP=1 and TP=2.

One 2-process gloo run (the module fixture ``results``): each rank builds gpt2 ``tiny`` and
``llama-tiny`` (32 positions) from one seed, with each recipe (one adds dropout), each
recompute mode and each engine (:mod:`dsq.models.recompute`), at TP=1 and then TP=2, runs one
batch forward and backward, and compares its loss and its own gradient shards with
``none``'s. At TP=1 it also measures what a forward leaves allocated for backward (glibc's
``mallinfo2``: heap in use plus mapped chunks, after a warm-up step) with 4 x 64 tokens on the
torch engine: what recompute saves.

megatron's engine (``tensor_parallel.checkpoint``) reads the CUDA generator's state, which a
torch without CUDA refuses; on such a build the worker checks that refusal, then stands in
no-ops for megatron's two CUDA-generator functions, so the rest of megatron's path (its block
and attention checkpointing, reentrant backward, fork of the CPU generator) runs here too.
"""

from __future__ import annotations

import ctypes
import gc
import warnings

import pytest
import torch
import torch.distributed as dist

from tests.conftest import ROOT
from tests.dist_utils import spawn

pytestmark = pytest.mark.slow  # one 2-process gloo run for the module

PRESETS = ("tiny", "llama-tiny")
W8A8G8 = str(ROOT / "configs/recipes/w8a8g8.yaml")
SR = ["quant.weight=int8:channel:stochastic", "quant.activation=int8:token:stochastic",
      "quant.grad=int8:token:stochastic"]
RECIPES = {  # name -> (config files, overrides)
    "baseline": ([], []),
    "w8a8g8": ([W8A8G8], []),
    "w8a8g8-sr": ([W8A8G8], SR),  # stochastic rounding of all three operands
    "w8a8g8-sr-int8": ([W8A8G8], SR + ["quant.compute=int8"]),
    "w8a8g8-sr-dropout": ([W8A8G8], SR + ["model.dropout=0.1"]),  # more draws, same generator
}
MODES = ("none", "selective", "full")
ENGINES = ("torch", "megatron")


def _cfg(preset, recipe, seq_len=32):
    from dsq.config import load_config

    files, overrides = RECIPES[recipe]
    return load_config(files, [f"model.preset={preset}", f"model.seq_len={seq_len}",
                               *overrides])


class _MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc_in_use():
    """Bytes the C heap has handed out (``mallinfo2``), or None off glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _build(preset, recipe, mode, engine, seq_len=32):
    from dsq.models.gpt import build_gpt
    from dsq.models.quant_layers import apply_quantization
    from dsq.models.recompute import Recompute

    cfg = _cfg(preset, recipe, seq_len)
    engine = "torch" if engine == "-" else engine  # "-": none, no engine
    model = build_gpt(cfg.model, "fp32", seed=0, recompute=Recompute(mode, engine))
    apply_quantization(model, cfg.quant)
    return cfg, model


def _batch(cfg, batch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len + 1), generator=g)
    return ids[:, :-1], torch.arange(cfg.model.seq_len).expand(batch, -1), ids[:, 1:]


def _step(preset, recipe, mode, engine):
    """(loss, {param: this rank's gradient}, model) of one forward and backward."""
    cfg, model = _build(preset, recipe, mode, engine)
    ids, pos, labels = _batch(cfg, 2)
    torch.manual_seed(1)  # the stochastic rounding's draws
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return float(loss.detach()), grads, model


def _held_after_forward(preset, recipe, mode, engine):
    """Bytes a forward of 4 x 64 tokens leaves allocated until its backward."""
    cfg, model = _build(preset, recipe, mode, engine, seq_len=64)
    ids, pos, labels = _batch(cfg, 4)
    for _ in range(2):  # the first step allocates the gradients and one-time state
        gc.collect()
        before = _malloc_in_use()
        loss = model(ids, pos, None, labels=labels).float().mean()
        held = _malloc_in_use() - before
        loss.backward()
        del loss
    return held


def _compare(ref, got):
    """(bit-identical loss and gradients, largest absolute gradient difference)."""
    same = ref[0] == got[0] and ref[1].keys() == got[1].keys() and all(
        torch.equal(got[1][k], v) for k, v in ref[1].items())
    worst = max(float((got[1][k] - v).abs().max()) for k, v in ref[1].items())
    return same, worst


def _megatron_refused(out):
    """megatron's engine on a torch without CUDA: the error it stops with."""
    from megatron.core.tensor_parallel import random as mrandom

    try:
        _step("tiny", "baseline", "full", "megatron")
        out["megatron_cpu_error"] = None
    except (AssertionError, RuntimeError) as e:
        out["megatron_cpu_error"] = str(e)
    mrandom._unset_checkpointing()  # left set by the failed checkpoint


def _megatron_on_cpu():
    """No-ops for megatron's two CUDA-generator functions (its CPU generator fork stays)."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None


def _no_rng_replay(out, ref):
    """The torch engine without replaying the random numbers: the test must see that."""
    from torch.utils.checkpoint import checkpoint

    from dsq.models import recompute

    keep = recompute.recomputed
    recompute.recomputed = lambda fn, *a, **k: checkpoint(
        fn, *a, use_reentrant=False, preserve_rng_state=False, **k)
    try:
        out["no_replay"] = _compare(ref, _step("tiny", "w8a8g8-sr", "full", "torch"))
    finally:
        recompute.recomputed = keep


def _cases(tp, out):
    for preset in PRESETS:
        for recipe in RECIPES:
            ref = _step(preset, recipe, "none", "torch")
            out["cases"][(tp, preset, recipe, "none", "-")] = (ref[0], True, 0.0)
            if (tp, preset, recipe) == (1, "tiny", "w8a8g8-sr"):
                _no_rng_replay(out, ref)
            for mode in MODES[1:]:
                for engine in ENGINES:
                    got = _step(preset, recipe, mode, engine)
                    out["cases"][(tp, preset, recipe, mode, engine)] = (
                        got[0], *_compare(ref, got))
                    layer = got[2].decoder.layers[0]
                    out["classes"][(mode, engine)] = (
                        type(layer).__name__, layer.config.recompute_granularity,
                        layer.self_attention.core_attention.recompute,
                        bool(layer.self_attention.checkpoint_core_attention))


def _worker(rank, world, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    out = {"cases": {}, "classes": {}}
    warnings.simplefilter("ignore")  # megatron's selective-recompute notice about TE
    try:
        for tp in (1, 2):
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            if tp == 1 and not torch.cuda.is_available():
                if rank == 0:
                    _megatron_refused(out)
                _megatron_on_cpu()
            # TP=1 is the same work on every rank: rank 0's is enough
            if tp == 2 or rank == 0:
                _cases(tp, out)
            if tp == 1 and rank == 0 and _malloc_in_use() is not None:
                out["held"] = {(p, r, m): _held_after_forward(p, r, m, "torch")
                               for p in PRESETS for r in ("baseline", "w8a8g8") for m in MODES}
            parallel_state.destroy_model_parallel()
    finally:
        parallel_state.destroy_model_parallel()
    everyone = [None] * world
    dist.all_gather_object(everyone, out)
    if rank == 0:
        torch.save(everyone, path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("recompute") / "results.pt"
    spawn(_worker, str(path), world_size=2)
    return torch.load(path, weights_only=False)


CASES = [(tp, p, r, m, e) for tp in (1, 2) for p in PRESETS for r in RECIPES
         for m in MODES[1:] for e in ENGINES]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "tp{}-{}-{}-{}-{}".format(*c))
def test_recompute_is_bit_identical_to_keeping(results, case):
    tp, preset, recipe, mode, engine = case
    ranks = [r for r, out in enumerate(results) if case in out["cases"]]
    assert ranks == ([0] if tp == 1 else [0, 1])
    for rank in ranks:
        out = results[rank]
        loss, same, worst = out["cases"][case]
        ref = out["cases"][(tp, preset, recipe, "none", "-")][0]
        assert same, f"rank {rank}: loss {loss!r} vs {ref!r}, gradients differ by {worst:.3g}"


def test_recipes_differ_so_the_comparison_means_something(results):
    for tp in (1, 2):
        for preset in PRESETS:
            losses = {r: results[0]["cases"][(tp, preset, r, "none", "-")][0] for r in RECIPES}
            assert len(set(losses.values())) == len(RECIPES), losses
            assert 7.0 < losses["baseline"] < 8.5  # ~ln(2048) = 7.62 at init


def test_without_rng_replay_stochastic_rounding_gradients_differ(results):
    same, worst = results[0]["no_replay"]
    assert not same and worst > 0


def test_each_engine_recomputes_its_regions(results):
    c = results[0]["classes"]
    # torch engine: dsq's layer class / attention flag; megatron's switches stay off
    assert c[("full", "torch")] == ("RecomputedTransformerLayer", None, False, False)
    assert c[("selective", "torch")] == ("TransformerLayer", None, True, False)
    # megatron engine: its switches; dsq's classes stay plain
    assert c[("full", "megatron")] == ("TransformerLayer", "full", False, False)
    assert c[("selective", "megatron")] == ("TransformerLayer", "selective", False, True)


def test_megatron_engine_needs_cuda(results):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: megatron's engine runs as it is")
    assert "CUDA" in results[0]["megatron_cpu_error"]


@pytest.mark.parametrize("preset", PRESETS)
def test_recompute_holds_fewer_bytes_for_backward(results, preset):
    """full keeps each layer's input only; selective, the attention's q, k, v instead of its
    output: that output is kept anyway by an unquantized proj (its input), so selective saves
    only the softmax statistics there; with a quantized proj (int8 codes) it saves the output."""
    if "held" not in results[0]:
        pytest.skip("no glibc mallinfo2 here")
    mib = 2**20
    for recipe in ("baseline", "w8a8g8"):
        held = {m: results[0]["held"][(preset, recipe, m)] / mib for m in MODES}
        print(f"{preset} {recipe}, 4 x 64 tokens: MiB held for backward " + ", ".join(
            f"{m} {b:.2f}" for m, b in held.items()))
        attention_out = 2 * 4 * 64 * 128 * 4 / mib  # 2 layers' [tokens, hidden] fp32
        assert held["full"] < 0.6 * held["none"]
        if recipe == "baseline":
            assert held["selective"] < held["none"] + 0.05
        else:
            assert held["selective"] < held["none"] - 0.9 * attention_out
