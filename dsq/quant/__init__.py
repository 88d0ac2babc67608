"""Linear (uniform) quantization of linear-layer operands, after Chitsaz et al. (EMNLP 2024).

* :mod:`dsq.quant.format`: :class:`QuantFormat`, the number formats and their short strings;
* :mod:`dsq.quant.functional`: quantize / dequantize / fake-quantize and SQNR;
* :mod:`dsq.quant.recipe`: :class:`LinearQuant` (the formats of one linear layer and how its
  backward uses them), :class:`Reducers` and the per-GEMM plan, as plain data;
* :mod:`dsq.quant.linear`: :func:`quantized_linear`, the one autograd Function of the three
  quantized GEMMs (simulated or integer);
* :mod:`dsq.quant.fused`, :mod:`dsq.quant.gemm`, :mod:`dsq.quant.cpu_kernels`,
  :mod:`dsq.quant.cpu_gemm`: the kernels.

Pure PyTorch, no ``torch.distributed``: tensor-parallel statistics are reduced through hooks
supplied by the caller (:mod:`dsq.models.quant_layers`).
"""

from dsq.quant.format import QuantFormat
from dsq.quant.functional import (
    QTensor,
    dequantize,
    fake_quantize,
    power_db,
    quantize,
    signal_noise,
    sqnr_db,
)
from dsq.quant.linear import quantized_linear
from dsq.quant.recipe import LinearQuant, Reducers

__all__ = [
    "LinearQuant",
    "QTensor",
    "QuantFormat",
    "Reducers",
    "dequantize",
    "fake_quantize",
    "power_db",
    "quantize",
    "quantized_linear",
    "signal_noise",
    "sqnr_db",
]
