"""Linear (uniform) quantization of linear-layer operands, after Chitsaz et al. (EMNLP 2024).

* :mod:`dsq.quant.format`: :class:`QuantFormat`, the number formats and their short strings;
* :mod:`dsq.quant.functional`: quantize / dequantize / fake-quantize and SQNR;
* :mod:`dsq.quant.matmul`: the autograd Function of the three quantized GEMMs and
  :class:`LinearQuant`, the formats of one linear layer.

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
from dsq.quant.matmul import LinearQuant, quantized_linear

__all__ = [
    "LinearQuant",
    "QTensor",
    "QuantFormat",
    "dequantize",
    "fake_quantize",
    "power_db",
    "quantize",
    "quantized_linear",
    "signal_noise",
    "sqnr_db",
]
