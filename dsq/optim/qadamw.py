"""QAdamW: AdamW whose moments are stored as block-wise scaled integer (or fp8) codes.

The update is AdamW with decoupled weight decay (``torch.optim.AdamW``'s formula)::

    m = b1 * m + (1 - b1) * g          v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * wd) - (lr / (1 - b1**t)) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

computed in fp32 from the *dequantized* stored moments; the new fp32 moments update the
parameter and are then requantized (as bitsandbytes and torchao do). m is signed (8 or 4
bits), v unsigned (8 bits; 4 allowed with a warning), both with one absmax scale per block of
``block_size`` elements of a parameter (default 256) or per parameter (``"tensor"``, the
study's per-tensor quantization). ``m_bits=32`` or ``v_bits=32`` keeps that moment in fp32
(the study's m8, m4 and v8 settings quantize one moment only); not both: that is
``torch.optim.AdamW``. ``m_format`` / ``v_format`` name a moment's format instead of its bits,
and add the float8 ones (``fp8e4m3``, ``fp8e5m2``: same blocks and scales, one byte per
element, reference kernel only). Formats: :mod:`dsq.optim.formats`; state layout and ZeRO
partitions: :mod:`dsq.optim.layout`; a flat tensor's state:
:class:`dsq.optim.state.MomentState`; the update kernels: :mod:`dsq.optim.kernels`; DeepSpeed
attachment: :mod:`dsq.optim.attach`. This module orchestrates a step.

Quality notes. The quantizer is linear, as in the study. Two details keep small second
moments from blowing up ``m / sqrt(v)``: v uses the full unsigned range (no wasted sign bit)
and its codes are at least 1 wherever ``v > 0``, so a dequantized v is either exactly 0 (then
m is 0 too) or at least one quantization step. ``v_domain="sqrt"`` quantizes ``sqrt(v)``
instead (same linear quantizer; recommended with 4-bit v and with per-tensor scales).

Per parameter group: ``quantize`` (bool) chooses quantized or fp32 moments (fp32 groups run
``torch._fused_adamw_``, bit-identical to ``torch.optim.AdamW(fused=True)``); ``m_bits``,
``v_bits``, ``block_size``, ``v_domain`` may differ between groups. Within a quantized group,
parameters whose numel is not a multiple of ``block_size`` keep fp32 moments.

Under DeepSpeed ZeRO-1/2 call :func:`dsq.optim.attach_to_engine` after
``deepspeed.initialize``: it tells the optimizer where each parameter lies inside the flat
fp32 partition it is handed, so that blocks follow parameters, not shards.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dsq.native import kernel_choice
from dsq.optim import kernels as K
from dsq.optim.formats import BITS, FP8, FP32, Fmt, format_bits, resolve_format
from dsq.optim.layout import (
    Layout,
    build_layout,
    check_block,
    is_quantized,
    param_layout,
    resolve_block,
)
from dsq.optim.state import MomentState

FORMAT_KEYS = ("m_bits", "v_bits", "m_format", "v_format", "block_size", "v_domain", "v_signed",
               "quantize")
CONFIG_KEYS = ("initial_lr", "betas", "eps", "weight_decay")  # kept by load_state_dict


class QAdamW(torch.optim.Optimizer):
    """AdamW with int8/int4 block-quantized moments; see the module docstring.

    Args:
        params: parameters or param groups (groups may set any of the options below).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        m_bits: bits of the first moment (signed): 8 or 4, or 32 (fp32, not quantized).
        v_bits: bits of the second moment (unsigned): 8, or 4 (warns: unstable with linear v),
            or 32 (fp32). At most one of m_bits and v_bits may be 32.
        block_size: elements per scale (even, <= 16384), ``"tensor"`` (one per parameter) or
            ``"row"`` (one per row of a weight, per parameter for 1-D ones).
        v_domain: ``"linear"`` (quantize v, the study's choice) or ``"sqrt"`` (quantize sqrt(v);
            only with a quantized v).
        v_signed: quantize v with the signed symmetric quantizer (the study's code: half the
            levels, small v flushed to 0; diverges, kept to show it). Eager kernel only.
        m_format, v_format: the moment's format by name (:data:`dsq.optim.formats.FORMATS`:
            int8, int4, fp32, fp8e4m3, fp8e5m2), None to follow m_bits / v_bits; a format sets
            the bits (``m_bits`` other than the default 8 must agree). fp8 moments run on the
            reference kernel (``auto`` picks it; ``native`` is refused).
        quantize: False keeps fp32 moments for the group.
        kernel: ``auto`` | ``native`` | ``reference`` | ``compile`` (:mod:`dsq.native.kernel_choice`).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, m_bits: int = 8,
                 v_bits: int = 8, block_size=256, v_domain: str = "linear",
                 v_signed: bool = False, quantize: bool = True, kernel: str = "auto",
                 m_format: Optional[str] = None, v_format: Optional[str] = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        m_bits=m_bits, v_bits=v_bits, block_size=block_size, v_domain=v_domain,
                        v_signed=bool(v_signed), quantize=bool(quantize), m_format=m_format,
                        v_format=v_format)
        super().__init__(params, defaults)
        for g in self.param_groups:
            _check_group(g)
        self.kernel = kernel_choice.impl(kernel)
        if self.kernel == "cpp" and any(Fmt.of(g).fp8 for g in self.param_groups if g["quantize"]):
            raise ValueError("kernel=native does not handle fp8 moments: use kernel=auto or "
                             "reference")
        self._kernels: Dict[str, object] = {}
        self._layouts: Dict[int, Layout] = {}  # id(flat tensor) -> layout
        self._dp_group: Dict[int, object] = {}  # id(flat tensor) -> process group of its exchange
        self._own = {id(p) for g in self.param_groups for p in g["params"]}

    # ------------------------------------------------------------------ layouts
    def set_flat_layout(self, flat: torch.Tensor, numels: List[int], offsets: List[int],
                        part_start: int, part_size: int, dp: int, group=None,
                        shapes: Optional[List[Tuple[int, ...]]] = None) -> Layout:
        """Declare that ``flat`` is the ZeRO partition ``[part_start, +part_size)`` of a flat
        param group whose parameters have ``numels`` at ``offsets`` (used by attach_to_engine);
        ``shapes`` (the parameters' shapes) are needed for ``block_size="row"``."""
        pg = self._group_of(flat)
        if self.state.get(flat):
            raise RuntimeError("set_flat_layout must be called before the first step")
        if pg["block_size"] == "row" and shapes is None:
            raise ValueError("block_size='row' needs the parameters' shapes")
        block = resolve_block(pg["block_size"], shapes or [])
        q = [is_quantized(n, block, pg["quantize"], j) for j, n in enumerate(numels)]
        lay = build_layout(numels, offsets, q, block, pg["m_bits"], pg["v_bits"],
                           part_start, part_size, dp)
        if flat.numel() != part_size:
            raise ValueError(f"flat tensor has {flat.numel()} elements, partition {part_size}")
        self._layouts[id(flat)] = lay
        self._dp_group[id(flat)] = group
        self._own.add(id(flat))
        return lay

    def layout(self, p: torch.Tensor, group: Optional[Dict] = None) -> Layout:
        lay = self._layouts.get(id(p))
        if lay is None:
            group = group or self._group_of(p)
            if id(p) not in self._own and group["quantize"]:
                raise RuntimeError(
                    "QAdamW was handed a tensor it was not built with (a DeepSpeed ZeRO flat "
                    "partition?): call dsq.optim.attach_to_engine(engine) right after "
                    "deepspeed.initialize so that quantization blocks follow the parameters")
            lay = param_layout(p.numel(), resolve_block(group["block_size"], [p.shape]),
                               group["m_bits"], group["v_bits"], group["quantize"])
            self._layouts[id(p)] = lay
        return lay

    def _group_of(self, p: torch.Tensor) -> Dict:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("tensor is not in any param group of this optimizer")

    def _kernel(self, device: torch.device, fmt: Fmt):
        # the study's signed v and fp8 moments: eager only (auto picks it silently)
        name = "eager" if fmt.v_signed or fmt.fp8 else self.kernel
        k = self._kernels.get((name, str(device)))
        if k is None:
            k = self._kernels[(name, str(device))] = K.get_kernel(name, device)
        return k

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: Dict) -> None:
        fmt = Fmt.of(group)
        fp32: Dict[int, List[List[torch.Tensor]]] = defaultdict(lambda: [[], [], [], []])
        hypers: Dict[int, K.Hyper] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("QAdamW does not support sparse gradients")
            lay = self.layout(p, group)
            st = self.state[p]
            if not st:
                st.update(MomentState.zeros(lay, fmt, p).state_dict())
            st["step"] += 1
            if not lay.quantized:
                lists = fp32[st["step"]]
                for lst, t in zip(lists, (p, p.grad, st["exp_avg"], st["exp_avg_sq"])):
                    lst.append(t)
                continue
            h = hypers.get(st["step"])
            if h is None:
                b1, b2 = group["betas"]
                h = hypers[st["step"]] = K.Hyper(group["lr"], b1, b2, group["eps"],
                                                 group["weight_decay"], st["step"])
            self._quantized_update(p, st, lay, fmt, h, fp32[st["step"]])
        for step, lists in fp32.items():
            _adamw_fp32(*lists, step=step, group=group)

    def _quantized_update(self, p, st, lay: Layout, fmt: Fmt, h: K.Hyper, fp32_lists) -> None:
        if p.dtype != torch.float32 or not p.is_contiguous():
            raise TypeError("quantized QAdamW states need contiguous fp32 parameters (use "
                            "DeepSpeed's fp32 master weights for bf16 training)")
        pf = p.view(-1)
        gf = p.grad.reshape(-1)
        if gf.dtype != torch.float32 or not gf.is_contiguous():
            gf = gf.float().contiguous()
        ker = self._kernel(p.device, fmt)
        state = MomentState.of(st, lay, fmt)
        splits = []
        buf = torch.zeros(lay.n_slots, 2, dtype=torch.float32, device=p.device) \
            if lay.n_slots else None
        for pc in lay.pieces:
            if pc.kind == "rows":
                continue
            a, n = pc.start, pc.length
            if pc.kind == "fp32":
                for lst, t in zip(fp32_lists, (pf[a:a + n], gf[a:a + n], *state.fp32(pc))):
                    lst.append(t)
                continue
            am, av = ker.pass1_piece(pf, gf, state, pc, h)
            splits.append((pc, am, av))
            if pc.slot >= 0:
                buf[pc.slot, 0] = am
                buf[pc.slot, 1] = av
        work = None
        if buf is not None:  # maxima of blocks cut by partition boundaries: one small all-reduce
            work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self._dp_group.get(id(p)),
                                   async_op=True)
        for pc in lay.pieces:
            if pc.kind == "rows":
                ker.rows_piece(pf, gf, state, pc, h)
        if work is not None:
            work.wait()
            gmax = buf.tolist()
        for pc, am, av in splits:
            if pc.slot >= 0:
                am, av = gmax[pc.slot]
            ker.pass2_piece(gf, state, pc, h, am, av)

    # ------------------------------------------------------------------ state
    def dequantized(self, p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 (m, v) of the flat tensor ``p`` as stored (zeros before the first step)."""
        lay = self.layout(p)
        st = self.state.get(p)
        if not st:
            return torch.zeros(lay.numel, device=p.device), torch.zeros(lay.numel, device=p.device)
        return MomentState.of(st, lay, Fmt.of(self._group_of(p))).dequantize()

    def state_dict(self):
        sd = super().state_dict()
        sd["dsq"] = {"version": 1, "layouts": [
            [self.layout(p, g).meta for p in g["params"]] for g in self.param_groups]}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict`` but keeps integer codes integer,
        refuses a checkpoint whose formats or partition layout differ from this run's, and
        keeps the hyperparameters this optimizer was built with (``CONFIG_KEYS``: betas, eps,
        weight decay, the scheduler's ``initial_lr``), so a run resumed with new ones uses
        them. The moments and step counts, and ``lr`` (the schedule's current value, which a
        scheduler rebuilt over this optimizer recomputes), are the checkpoint's."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("checkpoint has a different number of parameter groups")
        metas = state_dict.get("dsq", {}).get("layouts")
        id_map = {}
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"param group {gi}: checkpoint has {len(sg['params'])} tensors, "
                                 f"this optimizer {len(g['params'])}")
            for k in FORMAT_KEYS:
                if k in ("m_format", "v_format") and k not in sg and f"{k[0]}_bits" in sg:
                    sg = dict(sg, **{k: resolve_format(sg[f"{k[0]}_bits"], None)})  # older files
                if k in sg and sg[k] != g[k]:
                    raise ValueError(f"param group {gi}: checkpoint has {k}={sg[k]!r}, this run "
                                     f"{k}={g[k]!r}; keep the optimizer format of the checkpoint")
            for j, (pid, p) in enumerate(zip(sg["params"], g["params"])):
                id_map[pid] = p
                if metas is not None and metas[gi][j] != self.layout(p, g).meta:
                    raise ValueError(
                        f"param group {gi}: the checkpoint's optimizer state was partitioned "
                        f"differently ({_short(metas[gi][j])} vs {_short(self.layout(p, g).meta)});"
                        f" convert it with `dsq ckpt reshard`")
        state = defaultdict(dict)
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, s in state_dict["state"].items():
            p = id_map[pid]
            if s:
                g = groups[id(p)]
                state[p] = MomentState.of(s, self.layout(p, g), Fmt.of(g)).loaded(
                    p.device).state_dict()
        self.state = state
        for g, sg in zip(self.param_groups, saved_groups):
            for k, v in sg.items():
                if k != "params" and not (k in CONFIG_KEYS and k in g):
                    g[k] = tuple(v) if k == "betas" else v


def _short(meta: Dict) -> str:
    return f"dp={meta.get('dp')} partition=[{meta.get('part_start')}, +{meta.get('part_size')})"


def _check_group(g: Dict) -> None:
    for k in ("m", "v"):  # the format is the one truth; the bits follow it
        if g.get(f"{k}_format") is not None or g[f"{k}_bits"] in BITS:
            g[f"{k}_format"] = resolve_format(g[f"{k}_bits"], g.get(f"{k}_format"), k)
            g[f"{k}_bits"] = format_bits(g[f"{k}_format"])
    if g["m_bits"] not in BITS or isinstance(g["m_bits"], bool):
        raise ValueError(f"m_bits={g['m_bits']!r}: use 8 or 4, or 32 to keep m in fp32")
    if g["v_bits"] not in BITS or isinstance(g["v_bits"], bool):
        raise ValueError(f"v_bits={g['v_bits']!r}: use 8 or 4, or 32 to keep v in fp32")
    if g["m_bits"] == FP32 and g["v_bits"] == FP32:
        raise ValueError("m_bits=32 and v_bits=32 quantize neither moment: use torch.optim.AdamW "
                         "(optim.name=adamw), or quantize one moment")
    if g["v_domain"] not in ("linear", "sqrt"):
        raise ValueError(f"v_domain={g['v_domain']!r}: use linear or sqrt")
    if g["v_domain"] == "sqrt" and g["v_bits"] == FP32:
        raise ValueError("v_domain='sqrt' applies to a quantized v: with v_bits=32 use "
                         "v_domain='linear'")
    if g.get("v_signed") and (g["v_bits"] == FP32 or g["v_domain"] == "sqrt"
                              or g["v_format"] in FP8):
        raise ValueError("v_signed applies to a linearly quantized v (integer, v_bits 8 or 4, "
                         "v_domain='linear')")
    check_block(g["block_size"])
    if g["quantize"] and g["v_bits"] == 4:
        warnings.warn("QAdamW with 4-bit v: the second moment has 16 levels per block; "
                      "training may be unstable (v_domain='sqrt' helps)", stacklevel=3)
    g["betas"] = tuple(g["betas"])


def _adamw_fp32(params, grads, exp_avgs, exp_avg_sqs, step: int, group: Dict) -> None:
    """fp32 moments: torch's fused AdamW kernel (CPU and CUDA), else its foreach formula."""
    if not params:
        return
    b1, b2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    by_key = defaultdict(lambda: [[], [], [], []])
    for t in zip(params, grads, exp_avgs, exp_avg_sqs):
        for lst, x in zip(by_key[(t[0].device, t[0].dtype, t[1].dtype)], t):
            lst.append(x)
    for (dev, pdt, gdt), (ps, gs, ms, vs) in by_key.items():
        if gdt != pdt:
            gs = [g.to(pdt) for g in gs]
        if dev.type in ("cpu", "cuda") and hasattr(torch, "_fused_adamw_"):
            steps = [torch.tensor(float(step), dtype=torch.float32, device=dev) for _ in ps]
            torch._fused_adamw_(ps, gs, ms, vs, [], steps, amsgrad=False, lr=lr, beta1=b1,
                                beta2=b2, weight_decay=wd, eps=eps, maximize=False,
                                grad_scale=None, found_inf=None)
            continue
        torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2 ** 0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, -lr / bc1)


__all__ = ["QAdamW"]
