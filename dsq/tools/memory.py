"""Memory per GPU of a config, from its numbers alone (no model is built, nothing allocated):
the model states under DeepSpeed ZeRO and the activations one micro-batch keeps for backward
with each ``train.recompute`` mode. ``dsq config CONFIG... --world-size N --memory`` prints
:func:`memory_table`; docs/models.md explains each term.

Contracts:

* :func:`parameters` names one tensor-parallel rank's parameters and their shapes exactly as
  ``dsq.models.gpt.build_gpt`` creates them (megatron-core's names); their kinds, and so which
  ones QAdamW quantizes, are :func:`dsq.optim.param_kind`'s.
* Model states follow DeepSpeed 0.19's ZeRO-2 optimizer as :mod:`dsq.parallel.engine`
  configures it: the model's weights in the compute dtype on every rank, an fp32 master copy
  of this rank's 1/dp partition, its fp32 gradient partition (``grad_accum_dtype: fp32``), the
  optimizer's states of that partition, and the gradient buckets of backward
  (:func:`reduce_buckets`). ZeRO-0 and ZeRO-1 keep a full gradient instead, and no master copy
  under ZeRO-0.
* The gradient buckets are what ``deepspeed/runtime/zero/stage_1_and_2.py`` (DeepSpeed 0.19.8)
  allocates with ``contiguous_gradients`` (dsq sets it): ``setup_buckets`` (lines 3258-3281)
  makes one buffer of ``reduce_bucket_size`` elements (``deepspeed.reduce_bucket_size``, whole,
  whatever the model's size: ``torch.empty(int(self.reduce_bucket_size))``, line 3266) per
  communication dtype (one here: lines 609-616), and a second one when ``overlap_comm`` is on
  ("double buffers", lines 3272-3277; ``deepspeed.overlap_comm``, null: on, as on GPUs), in
  the weights' dtype (``_gradient_reduction_buffer_dtype``, lines 1253-1254, with lines
  394-404: the fp32 accumulation dtype only for bf16 ZeRO-1, which this optimizer never
  gets). bf16 weights under ZeRO-1 with fp32 accumulation go to ``BF16_Optimizer`` instead
  (``deepspeed/runtime/engine.py`` lines 2305-2310), which keeps a full fp32 gradient
  (``bf16_optimizer.py`` lines 190-191: the ``4 P`` of ZeRO-1 below) and no buckets.
  ``deepspeed.allgather_bucket_size`` allocates nothing: the updated partitions are gathered
  into the flat weights in place (``deepspeed/runtime/utils.py``, ``all_gather_dp_groups``,
  lines 1008-1054).
* Activations are what autograd holds at the end of one micro-batch's forward on a GPU, counted
  tensor by tensor (a tensor kept by several operations once): fused norms keep their input and
  fp32 per-token statistics, flash attention keeps q, k, v, its output and an fp32 log-sum-exp
  per head (no ``[s, s]`` scores), a quantized linear keeps the int8 codes and scales the
  forward made (:mod:`dsq.quant.linear`: 1 byte per element instead of 2 or 4) and, when its
  weight is quantized, the weight's codes. Scales count at the format's width
  (:func:`_scale_bytes`): fp32 for the integer and FP8 formats (a zero point more when
  asymmetric), 1 byte for MX's E8M0 and NVFP4's E4M3 block scales, plus NVFP4's one fp32
  tensor scale per tensor, as a kernel stores them (dsq's CPU simulation of the floating-point
  formats holds their scales in fp32: :class:`dsq.quant.floatfmt.FloatQTensor`). Dropout with ``p = 0`` keeps nothing; with
  ``p > 0`` a 1-byte mask. ``full`` recompute keeps each layer's input and, in backward, one
  layer's activations at a time; ``selective`` drops the attention's log-sum-exp, and its
  output where a quantized proj keeps codes of it (an unquantized proj keeps the output).
  RoPE's cos and sin tables (``[s, d]``, one pair for q and one for k) are kept per layer.

Not counted: the CUDA context, NCCL and allocator overheads, backward's temporaries.
"""

from __future__ import annotations

import math
from fnmatch import fnmatch
from types import SimpleNamespace
from typing import Dict, List, Tuple

GiB = 1 << 30


def parameters(m, tp: int = 1) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every parameter of one tensor-parallel rank of the model ``m``
    (a resolved ``model`` section)."""
    h, f, a, V = m.hidden_size, m.ffn_hidden_size, m.num_heads, m.vocab_size
    g, d = m.num_query_groups or a, m.hidden_size // m.num_heads
    fc1 = f * (2 if m.mlp == "swiglu" else 1)
    out = [("embedding.word_embeddings.weight", (V // tp, h))]
    if m.positions == "learned":
        out.append(("embedding.position_embeddings.weight", (m.seq_len, h)))

    def norm(prefix):
        out.append((f"{prefix}.weight", (h,)))
        if m.norm == "layernorm":
            out.append((f"{prefix}.bias", (h,)))

    def linear(prefix, shape, bias):
        out.append((f"{prefix}.weight", shape))
        if m.bias:
            out.append((f"{prefix}.bias", (bias,)))

    for i in range(m.num_layers):
        p = f"decoder.layers.{i}"
        norm(f"{p}.input_layernorm")
        linear(f"{p}.self_attention.linear_qkv", ((a + 2 * g) * d // tp, h), (a + 2 * g) * d // tp)
        linear(f"{p}.self_attention.linear_proj", (h, a * d // tp), h)
        norm(f"{p}.pre_mlp_layernorm")
        linear(f"{p}.mlp.linear_fc1", (fc1 // tp, h), fc1 // tp)
        linear(f"{p}.mlp.linear_fc2", (h, f // tp), h)
    norm("decoder.final_layernorm")
    if not m.tie_embeddings:
        out.append(("output_layer.weight", (V // tp, h)))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _kind(name: str, shape) -> str:
    from dsq.optim import param_kind

    return param_kind(name, SimpleNamespace(ndim=len(shape)))


def _code_bytes(n: int, bits: int) -> int:
    return (n + 1) // 2 if bits == 4 else n


def optimizer_state_bytes(params, optim) -> float:
    """Bytes of ``optim``'s states (an ``optim`` section: adamw or qadamw) for ``params``
    (:func:`parameters`), before ZeRO divides them; ``step`` counters left out."""
    if optim.name != "qadamw":
        return 8.0 * sum(_numel(s) for _, s in params)
    from dsq.optim import QUANTIZE_KINDS

    total = 0.0
    for name, shape in params:
        n, block = _numel(shape), optim.block_size
        quantized = _kind(name, shape) in QUANTIZE_KINDS[optim.quantize]
        if block == "tensor":
            scales = 1
        elif block == "row":
            scales = n // shape[-1]
        else:
            quantized = quantized and n % block == 0  # others keep fp32 moments
            scales = n // block if quantized else 0
        if not quantized:
            total += 8 * n
            continue
        for bits in (optim.m_bits, optim.v_bits):  # fp8 formats set 8 bits: 1 byte each
            total += 4 * n if bits == 32 else _code_bytes(n, bits) + 4 * scales
    return total


def reduce_buckets(ds) -> Tuple[int, int]:
    """``(buffers, bytes of each)``: the gradient buckets DeepSpeed's ZeRO-1/2 optimizer
    allocates for backward on a GPU for the ``deepspeed`` section ``ds`` (the module
    docstring cites DeepSpeed's lines); ``(0, 0)`` under ZeRO-0."""
    bf16 = ds.precision == "bf16"
    if ds.zero_stage == 0 or (bf16 and ds.zero_stage == 1):  # no ZeRO optimizer; BF16_Optimizer
        return 0, 0
    return (2 if ds.overlap(cuda=True) else 1), ds.reduce_bucket_size * (2 if bf16 else 4)


def model_states(cfg, world_size: int) -> Dict[str, float]:
    """Bytes per GPU of weights, master weights, gradients, the gradient buckets
    (:func:`reduce_buckets`) and optimizer states (``optimizer``: the config's optimizer;
    ``adamw`` and ``qadamw``: fp32 AdamW and QAdamW with the config's qadamw keys, for
    comparison)."""
    from dataclasses import replace

    tp = cfg.parallel.tp
    dp = world_size // tp
    params = parameters(cfg.model, tp)
    n = sum(_numel(s) for _, s in params)
    c = 2 if cfg.deepspeed.precision == "bf16" else 4
    stage = cfg.deepspeed.zero_stage
    out = {"params": n, "dp": dp, "tp": tp, "weights": float(n * c),
           "master": 4.0 * n / dp if stage >= 1 else 0.0,
           "grads": 4.0 * n / dp if stage == 2 else 4.0 * n,
           "grad_bucket": float(math.prod(reduce_buckets(cfg.deepspeed)))}
    states = {name: optimizer_state_bytes(params, replace(cfg.optim, name=name))
              / (dp if stage >= 1 else 1) for name in ("adamw", "qadamw")}
    out.update(adamw=states["adamw"], qadamw=states["qadamw"],
               optimizer=states[cfg.optim.name])
    return out


def _quant_plan(cfg):
    """The config's quantization plan (:func:`dsq.quant.plan.plan_for`), or None."""
    from dsq.quant import LinearQuant
    from dsq.quant.plan import plan_for

    qc = LinearQuant.from_config(cfg.quant)
    return plan_for(qc, None) if qc.enabled else None


def _quantized(cfg, module: str) -> bool:
    """Whether ``apply_quantization`` (:mod:`dsq.models.quant_layers`) selects ``module``."""
    q = cfg.quant
    if any(fnmatch(module, p) for p in q.exclude or []):
        return False
    if module == "output_layer":
        return bool(q.lm_head)
    return any(fnmatch(module, p) for p in q.layers or ["*"])


def _scale_bytes(fmt, width: float) -> Tuple[float, float]:
    """Bytes of the scales (and zero points) of a quantized tensor: ``(per row of width
    elements, once per tensor)``. fp32 scales, but 1 byte for MX's E8M0 and NVFP4's E4M3 block
    scales and NVFP4's fp32 tensor scale once; a short last block counts whole, a square
    (``:2d``) block spans block rows."""
    k = 1 if fmt.symmetric else 2
    if fmt.granularity == "tensor":
        return 0.0, 4.0 * k
    if fmt.granularity != "group":  # token, channel
        return 4.0 * k, 0.0
    n = fmt.group_size
    blocks = math.ceil(width / n) / (n if getattr(fmt, "square", False) else 1)
    scaling = getattr(fmt, "scaling", None)
    if scaling in ("mx", "nvfp4"):
        return blocks, 4.0 if scaling == "nvfp4" else 0.0
    return 4.0 * k * blocks, 0.0


def _input_codes(cfg, plan, module: str):
    """The cast whose codes a linear keeps of its input, or None when it keeps the input."""
    from dsq.quant.plan import Saved

    cast = plan.x_for_dw if plan is not None and _quantized(cfg, module) else None
    if cast is None or cast.saved is not Saved.CODES or cast.format is None:
        return None
    return cast


def _saved_input(cfg, plan, module: str, width: float, c: int) -> float:
    """Bytes per token a linear keeps of its input (``width`` elements per token); its
    per-tensor scale: :func:`_saved_input_tensor`."""
    from dsq.quant.plan import Axis

    cast = _input_codes(cfg, plan, module)
    if cast is None:
        return width * c
    if cast.axis is Axis.ROW:
        return width + _scale_bytes(cast.format, width)[0]
    T = cfg.train.micro_batch * cfg.model.seq_len  # a column copy: scales along the tokens
    return width + width * _scale_bytes(cast.format, T)[0] / T


def _saved_input_tensor(cfg, plan, module: str) -> float:
    """Bytes a linear keeps once for its input's codes: their per-tensor scale, if any."""
    cast = _input_codes(cfg, plan, module)
    return 0.0 if cast is None else _scale_bytes(cast.format, 1)[1]


def _saved_weight(cfg, plan, module: str, shape) -> float:
    """Bytes a linear keeps of its weight: its codes when the forward's are reused."""
    from dsq.quant.plan import Saved

    cast = plan.w_for_dx if plan is not None and _quantized(cfg, module) else None
    if cast is None or cast.saved is not Saved.CODES or cast.format is None:
        return 0.0
    rows, width = shape
    per_row, per_tensor = _scale_bytes(cast.format, width)
    return rows * width + rows * per_row + per_tensor


def activations(cfg) -> Dict[str, float]:
    """Bytes one micro-batch (``train.micro_batch`` x ``model.seq_len`` tokens) keeps for
    backward on one GPU: ``layers`` (the transformer layers, every activation kept), ``layer``
    (the largest one), ``attention`` (what ``selective`` recompute drops of them),
    ``layer_input`` (what a layer keeps under ``full``), ``outside`` (embedding, final norm, LM
    head and loss), and the totals ``none``, ``selective``, ``full`` (``full_peak`` adds the
    layer recomputed in backward)."""
    m, tp = cfg.model, cfg.parallel.tp
    T = cfg.train.micro_batch * m.seq_len
    c = 2 if cfg.deepspeed.precision == "bf16" else 4
    h, f, a, V, L = m.hidden_size, m.ffn_hidden_size, m.num_heads, m.vocab_size, m.num_layers
    g, d = m.num_query_groups or a, m.hidden_size // m.num_heads
    stats = 4 if m.norm == "rmsnorm" else 8  # fp32 rstd (and mean) per token
    swiglu = m.mlp == "swiglu"
    plan = _quant_plan(cfg)
    if m.positions == "rope":
        rotated = (a + g) * d / tp * c  # q and k after the rotation
    else:
        rotated = a * d / tp * c if g < a else 0.0  # GQA's query, regrouped (a copy)
    rope = 4 * m.seq_len * d * c if m.positions == "rope" else 0  # cos, sin for q and k
    params = parameters(m, tp)

    def layer(i: int) -> Tuple[float, float]:
        """(bytes, bytes selective recompute drops) of layer ``i``."""
        p = f"decoder.layers.{i}"
        # proj's input is SDPA's output, regrouped as a view ([b, s, heads, d] in memory);
        # a quantized proj keeps codes of it instead, and then only SDPA keeps the output
        proj_codes = _input_codes(cfg, plan, f"{p}.self_attention.linear_proj") is not None
        proj = _saved_input(cfg, plan, f"{p}.self_attention.linear_proj", a * d / tp, c)
        output = a * d / tp * c
        attention = 4 * a / tp + (output if proj_codes else 0.0)  # log-sum-exp (and output)
        per_token = (
            2 * (h * c + stats)  # the two norms' inputs: the layer input and the residual
            + _saved_input(cfg, plan, f"{p}.self_attention.linear_qkv", h, c)
            + (a + 2 * g) * d / tp * c  # QKV output, kept whole by v (a view of it)
            + rotated + output + 4 * a / tp  # attention's output and log-sum-exp
            + (proj if proj_codes else 0.0)
            + _saved_input(cfg, plan, f"{p}.mlp.linear_fc1", h, c)
            # fc1's output (GELU's input; or silu's input and up), silu(gate) and up + offset
            + (f * 2 / tp * c + 2 * f / tp * c if swiglu else f / tp * c)
            + _saved_input(cfg, plan, f"{p}.mlp.linear_fc2", f / tp, c)
            + (2 * h if m.dropout > 0 else 0.0))  # the two residual dropouts' masks
        weights = sum(_saved_weight(cfg, plan, n.rsplit(".", 1)[0], s) for n, s in params
                      if n.startswith(p + ".") and n.endswith(".weight") and len(s) == 2)
        tensors = sum(_saved_input_tensor(cfg, plan, f"{p}.{n}") for n in (
            "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
            "mlp.linear_fc2"))
        return T * per_token + weights + tensors + rope, T * attention

    layers, attention = zip(*(layer(i) for i in range(L)))
    outside = (8  # token ids
               + (h if m.dropout > 0 else 0)  # embedding dropout's mask
               + h * c + stats  # final norm's input
               + _saved_input(cfg, plan, "output_layer", h, c)
               + V / tp * c  # logits, kept by the loss (its gradient takes their place)
               + 17)  # loss: target index (int64), mask (bool), row max and log-sum (fp32)
    head = (_saved_weight(cfg, plan, "output_layer", (V // tp, h))  # tied or not
            + _saved_input_tensor(cfg, plan, "output_layer"))
    positions = 8 * m.seq_len if m.positions == "learned" else 0  # one row, broadcast
    positions += 8 * cfg.train.micro_batch  # the ids are a view of seq_len + 1 per sequence
    out = {"tokens": T, "layers": sum(layers), "layer": max(layers),
           "attention": sum(attention), "layer_input": float(T * h * c),
           "outside": T * outside + head + positions}
    out["none"] = out["layers"] + out["outside"]
    out["selective"] = out["none"] - out["attention"]
    out["full"] = L * out["layer_input"] + out["outside"]
    out["full_peak"] = out["full"] + out["layer"]
    return out


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def memory_table(cfg, world_size: int) -> str:
    """The memory per GPU of ``cfg`` on ``world_size`` ranks, as Markdown: model states with
    fp32 AdamW and with QAdamW, then activations per micro-batch for each recompute mode."""
    s, act = model_states(cfg, world_size), activations(cfg)
    m, o, t = cfg.model, cfg.optim, cfg.train
    prec = cfg.deepspeed.precision
    dtype = "bf16" if prec == "bf16" else "fp32"
    bits = "/".join(f"{k} {f}" if (f := getattr(o, f"{k}_format", None) or "").startswith("fp8")
                    else f"{k}{b}" for k, b in (("m", o.m_bits), ("v", o.v_bits)))
    block = f"blocks of {o.block_size}" if isinstance(o.block_size, int) else o.block_size
    part = f"1/{s['dp']}" if cfg.deepspeed.zero_stage >= 1 else "all"
    total = {k: s["weights"] + s["master"] + s["grads"] + s["grad_bucket"] + s[k]
             for k in ("adamw", "qadamw")}
    buffers, each = reduce_buckets(cfg.deepspeed)
    buckets = (f"gradient buckets ({buffers} x {cfg.deepspeed.reduce_bucket_size:,} {dtype}"
               f"{', overlap_comm' if buffers == 2 else ''}, during backward)" if buffers else
               "gradient buckets (none: no ZeRO gradient reduction buffers)")
    lines = [
        f"{m.preset}: {s['params'] * s['tp']:,} parameters; {world_size} ranks = tp {s['tp']} x "
        f"dp {s['dp']}, ZeRO-{cfg.deepspeed.zero_stage}, {prec}; micro batch {t.micro_batch} x "
        f"{m.seq_len} tokens",
        "",
        f"| model states per GPU | AdamW (fp32 states) | QAdamW ({bits}, {block}) |",
        "| --- | ---: | ---: |",
    ]
    for label, key in ((f"weights ({dtype}, every rank)", "weights"),
                       (f"master weights (fp32, {part})", "master"),
                       (f"gradients (fp32, {part if cfg.deepspeed.zero_stage == 2 else 'all'})",
                        "grads"),
                       (buckets, "grad_bucket")):
        lines.append(f"| {label} | {_gib(s[key])} | {_gib(s[key])} |")
    lines += [f"| optimizer states ({part}) | {_gib(s['adamw'])} | {_gib(s['qadamw'])} |",
              f"| total | {_gib(total['adamw'])} | {_gib(total['qadamw'])} |",
              "",
              f"| activations per micro-batch ({act['tokens']:,} tokens) | none | selective "
              f"| full |",
              "| --- | ---: | ---: | ---: |"]
    L = m.num_layers
    rows = ((f"kept by the {L} layers", act["layers"], act["layers"] - act["attention"],
             L * act["layer_input"]),
            ("kept outside the layers", act["outside"], act["outside"], act["outside"]),
            ("one layer recomputed in backward", 0.0, 0.0, act["layer"]),
            ("peak", act["none"], act["selective"], act["full_peak"]))
    for label, *vals in rows:
        lines.append(f"| {label} | " + " | ".join(_gib(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"
