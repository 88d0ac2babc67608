"""Model FLOPs per token against a hand count for the tiny presets, and tokens/s per device
and MFU from step times (dsq.train.throughput)."""

from __future__ import annotations

import pytest
import torch

from dsq.config import ConfigError, load_config
from dsq.train.throughput import Throughput, model_flops_per_token, peak_flops


def test_tiny_gpt2_flops_by_hand():
    # tiny: L=2 layers, h=128, 4 heads of d=32 (no GQA: 4 key/value heads), GELU MLP f=512,
    # s=128, V=2048
    qkv = 128 * (128 + 2 * 4 * 32)        # 49,152
    proj = 128 * 128                      # 16,384
    fc1, fc2 = 128 * 512, 512 * 128       # 65,536 each
    head = 128 * 2048                     # 262,144: the LM head
    n = 2 * (qkv + proj + fc1 + fc2) + head
    assert n == 655_360
    attention = 12 * 2 * 128 * 128        # 12 L h s = 393,216
    assert model_flops_per_token(load_config([], []).model) == 6 * n + attention == 4_325_376


def test_tiny_llama_flops_by_hand():
    # llama-tiny: L=2, h=128, 4 heads of d=32 in 2 key/value groups, SwiGLU f=384, s=128,
    # V=2048
    qkv = 128 * (128 + 2 * 2 * 32)        # 32,768: K and V have 2 heads each
    proj = 128 * 128                      # 16,384
    fc1 = 128 * 2 * 384                   # 98,304: gate and up
    fc2 = 384 * 128                       # 49,152
    n = 2 * (qkv + proj + fc1 + fc2) + 128 * 2048
    assert n == 2 * 196_608 + 262_144 == 655_360  # the same matmul weights as tiny, by design
    cfg = load_config([], ["model.preset=llama-tiny"])
    assert model_flops_per_token(cfg.model) == 6 * n + 12 * 2 * 128 * 128 == 4_325_376
    # without grouped-query attention the K and V projections are twice as wide
    full = load_config([], ["model.preset=llama-tiny", "model.num_query_groups=4"]).model
    assert model_flops_per_token(full) - 4_325_376 == 6 * 2 * 128 * (2 * 2 * 32)


def test_tokens_per_second_per_device_and_mfu():
    # 4 devices, 8192 tokens per step, 1e9 FLOPs per token, peak 1e12 FLOP/s per device
    t = Throughput(8192, devices=4, flops_per_token=10**9, peak=1e12)
    for s in (5.0, 2.0, 2.0, 4.0):  # the first step is left out of the mean
        t.add(s)
    tps = 3 * 8192 / 8.0  # 3,072 tokens/s
    got = t.summary()
    assert got == {"tokens_per_s": tps, "tokens_per_s_per_device": tps / 4,
                   "mfu": 1e9 * tps / (4 * 1e12), "model_flops_per_token": 10**9,
                   "peak_flops": 1e12}
    assert got["mfu"] == pytest.approx(0.768)
    last = t.metrics()  # the last step's: 2,048 tokens/s
    assert last == {"train/tokens_per_s": 2048.0, "train/tokens_per_s_per_device": 512.0,
                    "train/mfu": 1e9 * 2048 / 4e12}
    assert t.post() == {"tok/s": "3,072", "tok/s/dev": "768", "mfu": "76.8%"}
    # peak unknown (a CPU): no MFU anywhere
    cpu = Throughput(8192, devices=2, flops_per_token=10**9, peak=None)
    cpu.add(1.0)
    assert cpu.summary()["mfu"] is None and "train/mfu" not in cpu.metrics()
    assert cpu.post() == {"tok/s": "8,192", "tok/s/dev": "4,096"}


def test_peak_flops(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2e12) == 2e12  # train.peak_flops
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA B200", 2250e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA GeForce GTX 1080", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0)) == peak, name
    assert load_config([], ["train.peak_flops=312e12"]).train.peak_flops == 312e12
    with pytest.raises(ConfigError, match="train.peak_flops"):
        load_config([], ["train.peak_flops=-1"])
