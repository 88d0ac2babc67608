"""Every recipe of ``configs/recipes/`` (quantization, optimizer states, the study's) builds
llama-tiny and trains it: a few optimizer steps on one batch, in this process, with the model,
quantized linears and optimizer ``dsq train`` builds from the same config files (its DeepSpeed
engine left out: the launcher runs are tests/e2e/test_llama.py). The loss starts at ln(vocab),
stays finite and falls by more than a nat in 6 steps on the one batch (2.2 to 2.7 nats; 1.2
for the study's signed-v m8v8, which already bumps up at step 4)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import ROOT

RECIPES = sorted((ROOT / "configs/recipes").rglob("*.yaml"))
STEPS = 6


def test_every_recipe_is_here():
    names = {p.relative_to(ROOT / "configs/recipes").as_posix() for p in RECIPES}
    assert {"baseline.yaml", "w8a8g8.yaml", "optim/m8v8.yaml", "study/m8v8.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES,
                         ids=lambda p: p.relative_to(ROOT / "configs/recipes").as_posix())
def test_recipe_trains_llama_tiny(dist_one, recipe):
    from dsq.config import load_config
    from dsq.models.gpt import build_gpt
    from dsq.models.quant_layers import apply_quantization
    from dsq.optim import build_optimizer

    cfg = load_config([str(ROOT / "configs/tiny.yaml"), str(recipe)],
                      ["model.preset=llama-tiny", "model.seq_len=32"])
    model = build_gpt(cfg.model, "fp32", seed=0).train()
    quantized = apply_quantization(model, cfg.quant)
    if cfg.quant.weight or cfg.quant.activation or cfg.quant.grad:
        assert len(quantized) == 2 * 4 + 1  # QKV, proj, fc1, fc2 per layer, and the LM head
    opt = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=g)
    pos = torch.arange(32).expand(4, -1)
    losses = []
    for _ in range(STEPS):
        loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:]).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    name = recipe.relative_to(ROOT / "configs/recipes").as_posix()
    print(f"{name}: " + " ".join(f"{x:.3f}" for x in losses))
    assert all(math.isfinite(x) for x in losses), losses
    assert abs(losses[0] - math.log(cfg.model.vocab_size)) < 0.1  # a fresh model: uniform
    assert losses[-1] < losses[0] - 1.0, losses
