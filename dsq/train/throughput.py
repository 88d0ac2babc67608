"""Throughput as users compare it: tokens/s per device and model FLOPs utilisation (MFU).

:func:`model_flops_per_token` counts the training FLOPs of one token the PaLM way (Chowdhery
et al. 2022, appendix B; the count Megatron-LM's MFU uses too): ``6 N`` for the matrix
multiplies of the weights (2 forward, 4 backward per weight), where ``N`` is the number of
weights that take part in a matrix multiply (QKV with its grouped key/value heads, the
attention output, the MLP: two matrices for GELU, ``fc1`` twice as wide for SwiGLU's gate and
up, the LM head; embeddings are lookups, biases and norms are left out), plus ``12 L h s`` for
attention's two ``s x s`` products (QK^T and scores x V; forward and backward, the full
square, no causal discount). Activation recompute is not counted: MFU counts the model's
FLOPs, not the hardware's.

MFU = FLOPs per token x tokens/s / (devices x peak FLOP/s of one device). The peak is
``train.peak_flops`` when set, else the bf16 dense tensor-core peak of the device from
:data:`PEAK_BF16` (by its CUDA name), else unknown (CPUs): MFU is then left out (None).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

# bf16 dense tensor-core peak FLOP/s of one device, from the vendors' data sheets; the first
# name found in the device's CUDA name wins (specific names before the ones they contain)
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),      # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def model_flops_per_token(m) -> int:
    """Training FLOPs per token of the resolved ``model`` section ``m`` (module docstring)."""
    h, L, f, s, V = m.hidden_size, m.num_layers, m.ffn_hidden_size, m.seq_len, m.vocab_size
    d = h // m.num_heads
    g = m.num_query_groups or m.num_heads
    per_layer = (h * (h + 2 * g * d)                        # QKV
                 + h * h                                    # attention output
                 + h * f * (2 if m.mlp == "swiglu" else 1)  # fc1 (gate and up for SwiGLU)
                 + f * h)                                   # fc2
    n = L * per_layer + h * V                               # + the LM head
    return 6 * n + 12 * L * h * s


def peak_flops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device: ``override`` (``train.peak_flops``), the table's value for a
    known GPU, else None."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


class Throughput:
    """Step times of this process and what they make: tokens/s (all devices and per device)
    and MFU. The mean leaves out the first step (allocation, warm-up) when there are more."""

    def __init__(self, tokens_per_step: int, devices: int, flops_per_token: int,
                 peak: Optional[float]):
        self.tokens_per_step, self.devices = tokens_per_step, devices
        self.flops_per_token, self.peak = flops_per_token, peak
        self.times: List[float] = []

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def tokens_per_s(self, last: bool = False) -> Optional[float]:
        """Mean tokens/s over the run's steps (``last``: of the last step)."""
        timed = self.times[-1:] if last else (self.times[1:] if len(self.times) > 1
                                              else self.times)
        return self.tokens_per_step * len(timed) / sum(timed) if timed else None

    def mfu(self, tokens_per_s: Optional[float]) -> Optional[float]:
        if tokens_per_s is None or self.peak is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.devices * self.peak)

    def metrics(self) -> Dict[str, float]:
        """This step's ``train/tokens_per_s``, ``train/tokens_per_s_per_device`` and
        ``train/mfu`` (when the peak is known)."""
        tps = self.tokens_per_s(last=True)
        out = {"train/tokens_per_s": tps, "train/tokens_per_s_per_device": tps / self.devices}
        if self.peak is not None:
            out["train/mfu"] = self.mfu(tps)
        return out

    def post(self) -> Dict[str, str]:
        """The progress line's fields: mean tokens/s (all devices, per device), MFU when known."""
        tps = self.tokens_per_s()
        out = {"tok/s": f"{tps:,.0f}", "tok/s/dev": f"{tps / self.devices:,.0f}"}
        if self.peak is not None:
            out["mfu"] = f"{100 * self.mfu(tps):.1f}%"
        return out

    def summary(self) -> Dict[str, Optional[float]]:
        """``summary.json``'s throughput keys (None where not measured or the peak unknown)."""
        tps = self.tokens_per_s()
        return {"tokens_per_s": tps,
                "tokens_per_s_per_device": None if tps is None else tps / self.devices,
                "mfu": self.mfu(tps), "model_flops_per_token": self.flops_per_token,
                "peak_flops": self.peak}
