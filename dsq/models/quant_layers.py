"""Quantized megatron-core tensor-parallel linears, and switching them on in a model.

:class:`QuantColumnParallelLinear` and :class:`QuantRowParallelLinear` subclass megatron-core's
layers and override only ``_forward_impl``, the local GEMM: megatron's ``forward`` keeps all
tensor-parallel communication (input copy/scatter, output gather/all-reduce). With
``qconfig`` None (the class default) they call megatron's ``_forward_impl`` unchanged and are
bit-identical to the parent classes. With a :class:`dsq.quant.LinearQuant` set, the GEMMs are
:func:`dsq.quant.quantized_linear`, plus what megatron's own Function did around them:

* column-parallel with ``allreduce_dgrad``: the input gradient is all-reduced over the TP group
  (``copy_to_tensor_model_parallel_region`` around the input: identity forward, all-reduce
  backward); the bias is added outside the quantized GEMM;
* sequence parallelism, gradient-accumulation fusion and deferred embedding wgrad are not
  supported with quantization and raise.

Tensor parallelism must not change the numbers, so a statistic whose reduced dimensions are
sharded is max-reduced over the TP group (``all_reduce(MAX)`` on autograd-free tensors):

================ ====================== ==================================================
layer            sharded operands       reduced over TP
================ ====================== ==================================================
column-parallel  W[out/tp, in]          W per-tensor
                 G[tokens, out/tp]      G per-tensor and per-token
row-parallel     W[out, in/tp]          W per-tensor and per-channel
                 X[tokens, in/tp]       X per-tensor and per-token
================ ====================== ==================================================

With ``compute: int8`` the backward GEMMs requantize per column (:mod:`dsq.quant.linear`); a
per-column statistic spans the rows, so the column-parallel ``W[out/tp, in]`` per input column is
max-reduced too (``X`` and ``G`` per column reduce over tokens, never sharded here).

Floating-point formats (:mod:`dsq.quant.floatfmt`) reduce their tensor amax (per-tensor scales,
NVFP4's tensor scale) whenever the operand is sharded, a row amax when the cast (row cast or
column copy) runs along the sharded dimension; their blocks must not straddle shards (the layer
raises, ``dsq config`` refuses first).

Group granularity needs no reduction when the group size divides the shard width (groups
never straddle ranks); otherwise the layer raises. A gated fc1 (SwiGLU, ``partition_stride=2``)
holds ``[gate_r; up_r]`` on each rank, so there the group size must divide each half. GQA's
narrower QKV (``(heads + 2 * groups) * head_dim`` outputs, whole groups per rank) and the gated
fc1 need nothing else: their maxima are over whole rows or whole sharded dimensions, which the
reductions above make TP-invariant whatever order the shards hold. Replicated operands (column-parallel X,
row-parallel G) need none. Stochastic rounding of a replicated operand draws different noise
on each rank (unbiased, but not bit-identical to TP=1).

SQNR observability: :func:`set_sqnr_capture` makes every quantized layer accumulate the signal
and noise power of each quantized operand; :func:`collect_sqnr` turns them into dB per layer
type (``qkv``, ``proj``, ``fc1``, ``fc2``, ``lm_head``), averaged over layers, and clears them.
Off (the default), nothing is computed.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections import defaultdict
from fnmatch import fnmatch
from typing import Any, ClassVar

import torch
import torch.distributed as dist

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from dsq.quant import LinearQuant, Reducers, power_db, quantized_linear

OPERANDS = ("weight", "activation", "grad")
LAYER_KINDS = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1",
               "linear_fc2": "fc2", "output_layer": "lm_head"}


def _unset(v) -> bool:
    return v is None or v is False or (type(v) is int and v == 0)


def _max_reduce(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


class _QuantLinearMixin:
    qconfig: LinearQuant | None = None
    """Formats of this layer's operands; None runs megatron's own GEMM."""
    _sqnr: dict[str, torch.Tensor] | None = None
    """SQNR accumulators while capture is on (see :func:`set_sqnr_capture`)."""
    _sharded: ClassVar[dict[str, str]] = {}
    """Operand -> its dimension sharded over TP: "rows" (dim 0) or "cols" (last dim)."""

    def _shard_width(self) -> int:
        raise NotImplementedError

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.qconfig is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        return self._quantized_forward(input, weight, *args, **kwargs)

    def _quantized_forward(self, input, weight, bias=None, gradient_accumulation_fusion=False,
                           allreduce_dgrad=False, sequence_parallel=False,
                           grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                           **other):
        name = type(self).__name__
        if sequence_parallel:
            raise NotImplementedError(f"{name}: sequence parallelism is not supported with "
                                      f"quantized linears; set sequence_parallel=False")
        if gradient_accumulation_fusion:
            raise NotImplementedError(f"{name}: gradient_accumulation_fusion is not supported "
                                      f"with quantized linears; set it to False")
        if grad_output_buffer is not None:
            raise NotImplementedError(f"{name}: defer_embedding_wgrad_compute is not supported "
                                      f"with quantized linears")
        used = sorted(k for k, v in other.items() if not _unset(v))
        if used:  # an argument of a newer megatron-core that would change the math
            raise NotImplementedError(f"{name}: megatron passed {used}, which the "
                                      f"quantized GEMM does not implement")
        group = self.tp_group  # row-parallel passes tp_group=None: the layer's group is meant
        if allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=group)
        qc = self.qconfig
        tp = group.size() if group is not None else 1
        int8 = qc.compute == "int8" or qc.is_float  # per-column statistics (column copies)
        reducers = Reducers(
            x=self._reducer(qc.activation, "activation", tp),
            w=self._reducer(qc.weight, "weight", tp),
            g=self._reducer(qc.grad, "grad", tp),
            xt=self._col_reducer(qc.activation, "activation", tp) if int8 else None,
            wt=self._col_reducer(qc.weight, "weight", tp) if int8 else None,
            gt=self._col_reducer(qc.grad, "grad", tp) if int8 else None)
        return quantized_linear(input, weight, qc, bias=bias, reducers=reducers,
                                capture=self._sqnr)

    def _reducer(self, fmt, operand: str, tp: int):
        sharded = self._sharded.get(operand)
        if fmt is None or tp == 1 or sharded is None:
            return None
        if fmt.is_float:
            return self._float_reducer(fmt, operand, tp, column=False)
        if fmt.granularity == "group":
            width = self._shard_width()
            if sharded == "cols" and width % fmt.group_size:
                raise ValueError(
                    f"{type(self).__name__}: {operand} format {fmt}: the group size must divide "
                    f"the per-rank shard width {width} (TP={tp}; of each of gate and up in a "
                    f"gated fc1) so that groups do not straddle tensor-parallel shards")
            return None
        if fmt.granularity == "tensor" or sharded == "cols":
            return functools.partial(_max_reduce, group=self.tp_group)
        return None  # per-row statistics of a row-sharded operand are local

    def _col_reducer(self, fmt, operand: str, tp: int):
        """compute=int8 requantizes per column (statistics over the rows) for backward GEMMs;
        floating-point formats make column copies."""
        if fmt is not None and fmt.is_float and tp > 1 and operand in self._sharded:
            return self._float_reducer(fmt, operand, tp, column=True)
        if fmt is None or tp == 1 or fmt.granularity in ("tensor", "group"):
            return None  # per-tensor codes are reused; group formats are simulated
        if self._sharded.get(operand) == "rows":
            return functools.partial(_max_reduce, group=self.tp_group)
        return None


    def _float_reducer(self, fmt, operand: str, tp: int, column: bool):
        """A floating-point format's cast of ``operand`` along its last dimension or, for a
        column copy, along its first: the tensor amax (tensor scaling, NVFP4's tensor scale)
        always spans the shards; a row amax when the cast runs along the sharded dimension;
        blocks (and N x N tiles) must not straddle a shard, and need none."""
        sharded = self._sharded[operand]
        along = sharded == ("rows" if column else "cols")
        if fmt.block_size and (along or fmt.square):
            width = self._shard_width()
            if width % fmt.block_size:
                raise ValueError(
                    f"{type(self).__name__}: {operand} format {fmt}: its {fmt.block_size}-element "
                    f"blocks would straddle the tensor-parallel shards of width {width} (TP={tp}; "
                    f"of each of gate and up in a gated fc1): choose a block that divides it")
        if fmt.scaling in ("tensor", "nvfp4") or (along and fmt.scaling in ("channel", "token")):
            return functools.partial(_max_reduce, group=self.tp_group)
        return None


class QuantColumnParallelLinear(_QuantLinearMixin, ColumnParallelLinear):
    """megatron ``ColumnParallelLinear`` (W sharded on ``out``) with optional quantized GEMMs."""

    _sharded: ClassVar[dict[str, str]] = {"weight": "rows", "grad": "cols"}

    def _shard_width(self) -> int:
        # a strided shard ([gate_r; up_r] of a gated fc1) holds `stride` contiguous pieces
        return self.output_size_per_partition // getattr(self.weight, "partition_stride", 1)


class QuantRowParallelLinear(_QuantLinearMixin, RowParallelLinear):
    """megatron ``RowParallelLinear`` (W sharded on ``in``) with optional quantized GEMMs."""

    _sharded: ClassVar[dict[str, str]] = {"weight": "cols", "activation": "cols"}

    def _shard_width(self) -> int:
        return self.input_size_per_partition


def _quant_layers(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLinearMixin)]


def apply_quantization(model: torch.nn.Module, quant_section: Any) -> list[str]:
    """Set ``qconfig`` on the selected linears of ``model``; return their module names.

    ``quant_section`` has ``weight, activation, grad`` (format strings/mappings/None),
    ``grad_gemms``, ``lm_head`` (bool), ``layers`` and ``exclude`` (fnmatch patterns over module
    names; defaults ``["*"]`` and ``[]``). If all three formats are None nothing is applied.
    Selected: every Quant{Column,Row}ParallelLinear matching ``layers`` and no ``exclude``
    pattern, plus the LM head (``output_layer``) when ``lm_head`` is true and it is not
    excluded. Embeddings and norms are never quantized (they are not these classes).

    megatron's ``GPTModel`` builds its ``output_layer`` as a plain ``ColumnParallelLinear``,
    outside the layer spec, so no spec provider can choose its class. It is quantized by
    setting ``module.__class__ = QuantColumnParallelLinear`` on that one instance: the subclass
    adds only class attributes and the ``_forward_impl`` override (no ``__init__``, no state),
    so parameters, hooks, state-dict keys and checkpoints stay exactly as they were.
    """
    qc = LinearQuant.from_config(quant_section)
    if not qc.enabled:
        return []
    layers = list(getattr(quant_section, "layers", None) or ["*"])
    exclude = list(getattr(quant_section, "exclude", None) or [])
    lm_head = bool(getattr(quant_section, "lm_head", False))
    names = []
    for name, m in model.named_modules():
        if any(fnmatch(name, p) for p in exclude):
            continue
        if name.rsplit(".", 1)[-1] == "output_layer" and isinstance(m, ColumnParallelLinear):
            if not lm_head:
                continue
            if type(m) is ColumnParallelLinear:
                m.__class__ = QuantColumnParallelLinear
            elif not isinstance(m, QuantColumnParallelLinear):
                raise TypeError(f"{name}: cannot quantize an LM head of class "
                                f"{type(m).__name__}")
        elif not (isinstance(m, _QuantLinearMixin) and any(fnmatch(name, p) for p in layers)):
            continue
        m.qconfig = qc
        names.append(name)
    if (qc.compute == "int8" or qc.is_float) and names:
        _report_int8(qc, names)
    return names


def _report_int8(qc: LinearQuant, names: list[str]) -> None:
    """Say once (rank 0, on stderr, whatever the warning filters) which GEMMs run as integer
    GEMMs and which in floating point; a warning where a quantized format keeps a GEMM from the
    integer path, or where int8 does not pay on this CPU."""
    from dsq.quant.plan import describe_plan

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    msg, warn = describe_plan(qc, sorted({_kind(n) for n in names}))
    from dsq.quant.fused import engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if qc.is_float:  # simulated, or FP8 GEMMs where the GPU has them
        from dsq.quant.fp8_gemm import fp8_outlook

        runs, where = fp8_outlook(device)
        warn = warn or (qc.compute == "fp8" and not runs)
        print(f"dsq: {'warning: ' if warn else ''}{msg}; {where}", file=sys.stderr, flush=True)
        return
    where = engine(device)
    if where:
        msg += f"; {where}"
    if device == "cpu":
        from dsq.quant.cpu_gemm import int8_outlook

        pays, why = int8_outlook()
        if not pays:  # the recipe trains the same, only slower than a float GEMM
            warn = True
            msg += f"; int8 does not pay on this CPU: {why}"
    print(f"dsq: {'warning: ' if warn else ''}{msg}", file=sys.stderr, flush=True)


def set_sqnr_capture(model: torch.nn.Module, on: bool) -> None:
    """Start (fresh accumulators) or stop accumulating SQNR in every quantized layer."""
    for _, m in _quant_layers(model):
        m._sqnr = {} if on and m.qconfig is not None else None


def _kind(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    return LAYER_KINDS.get(last, last)


def collect_sqnr(model: torch.nn.Module) -> dict[str, float]:
    """SQNR (dB) of each quantized operand since the last collect, e.g. ``{"qkv/weight": 38.1}``.

    Per layer, signal and noise powers are summed over the captured calls and over the
    tensor-parallel shards (so the value is that of the full, unsharded tensor), converted to dB,
    then averaged over layers of one type. Clears the accumulators (capture stays on). Under
    TP > 1 this is a collective: call it on every rank of the tensor-parallel group.
    """
    layers = [(n, m) for n, m in _quant_layers(model) if m._sqnr is not None]
    if not layers:
        return {}
    device = next((t.device for _, m in layers for t in m._sqnr.values()), torch.device("cpu"))
    zero = torch.zeros(2, device=device)
    terms = torch.stack([torch.stack([m._sqnr.get(op, zero) for op in OPERANDS])
                         for _, m in layers])  # [layers, operands, (signal, noise)]
    group = layers[0][1].tp_group
    if dist.is_available() and dist.is_initialized() and group is not None and group.size() > 1:
        dist.all_reduce(terms, group=group)
    db = power_db(terms.double()).tolist()
    sums: dict[str, list[float]] = defaultdict(list)
    for (name, m), row, t in zip(layers, db, terms.tolist()):
        m._sqnr = {}
        for op, value, (signal, noise) in zip(OPERANDS, row, t):
            if signal > 0 or noise > 0:
                sums[f"{_kind(name)}/{op}"].append(value)
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}
