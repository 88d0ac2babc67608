"""Linear (uniform) quantization of linear-layer operands, after Chitsaz et al. (EMNLP 2024).

* :mod:`dsq.quant.format`: :class:`QuantFormat`, the number formats and their short strings;
* :mod:`dsq.quant.floatfmt`: the floating-point formats (FP8, MXFP8/6/4, NVFP4), parsed by
  :meth:`QuantFormat.parse` too, and their quantizer;
* :mod:`dsq.quant.functional`: quantize / dequantize / fake-quantize and SQNR;
* :mod:`dsq.quant.recipe`: :class:`LinearQuant` (the formats of one linear layer and how its
  backward uses them) and :class:`Reducers`, as plain data;
* :mod:`dsq.quant.plan`: the recipe's plan, one cast per operand of each GEMM (format, axis,
  what backward keeps, packing, integer or float GEMM, and why), as plain data;
* :mod:`dsq.quant.linear`: :func:`quantized_linear`, the three quantized GEMMs run as the
  plan says (a simulated and an integer autograd Function);
* :mod:`dsq.quant.float_linear`: the GEMMs of floating-point recipes (column copies per GEMM),
  :mod:`dsq.quant.fp8_gemm` their ``torch._scaled_mm`` FP8 GEMMs on GPUs;
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
