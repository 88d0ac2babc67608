"""Where QAdamW's quantized state lives: blocks follow parameters, never shards.

A *flat tensor* is what the optimizer is handed: a model parameter (no ZeRO, ZeRO-0) or, under
ZeRO-1/2, the fp32 partition that this data-parallel rank owns of a flattened param group
(DeepSpeed concatenates the group's parameters, pads the group to a multiple of
``2 * dp``, and gives rank ``r`` the elements ``[r * P, (r + 1) * P)``). The *group* geometry
(``numels`` and flat ``offsets`` of its parameters) is the same on every rank and at every
data-parallel size.

Blocks are defined on parameters: parameter ``j`` (if quantized) is cut into blocks of
``block`` elements starting at its own first element, or into one block when
``block == "tensor"`` (per-tensor scale), or, with ``block_size="row"`` (one scale per row of a
weight, the study's per-channel state scales), into rows: :func:`resolve_block` turns ``"row"``
into a list of per-parameter widths (a parameter's last dimension; its numel when 1-D), which
is what the functions here take as ``block`` then. A parameter is quantized iff its group quantizes and
its numel is a multiple of the block size (always with ``"tensor"``); other parameters keep
fp32 moments. So a block, its scale and its codes depend only on the model, not on the
data-parallel size, the ZeRO stage or the rank: a checkpoint can be resharded exactly, and DP=1
and DP=2 runs hold the same quantized state.

A rank's flat tensor is cut into *pieces*, in order:

``fp32``  elements of unquantized parameters; their m and v are slices of the ``exp_avg`` and
          ``exp_avg_sq`` fp32 tensors (``f_off``).
``rows``  ``rows`` complete blocks of ``width`` elements, updated in one fused pass.
``split`` one block that continues on another rank (the partition boundary falls inside it),
          or a per-tensor block too wide to keep in cache. Its maxima are combined across
          ranks (``slot >= 0``: index in the group's exchange buffer, one small all-reduce
          (MAX) per step and group) before it is requantized.

Storage of a flat tensor (``state[p]``): ``m_codes`` (int8, or uint8 with two 4-bit codes per
byte), ``v_codes`` (uint8, same packing), ``m_scales`` and ``v_scales`` (fp32, one per block
piece-row; a block split across ranks has its scale on each of them, identical), and
``exp_avg`` / ``exp_avg_sq`` (fp32) for the fp32 pieces. Each piece's codes start on a byte.
A moment of 32 bits (kept in fp32 while the other is quantized) has instead ``m_fp32`` /
``v_fp32``: one float per element of the quantized pieces, at the same piece offsets, and no
scales.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Union

from dsq.optim.formats import Fmt, code_len

FUSE_MAX = 16384
"""Widest block updated by the one-pass ``rows`` kernel; wider per-tensor blocks are ``split``."""

Block = Union[int, str, List[int]]


def check_block(block_size: Block) -> None:
    """Raise ValueError unless ``block_size`` (``optim.block_size``, as configured) is an even
    int in ``[2, FUSE_MAX]``, ``"tensor"`` or ``"row"``; pure (the config's validation calls
    it). Even for every format: a block's 4-bit codes are packed in pairs, and the blocks of a
    model do not depend on its moments' bits."""
    if block_size in ("tensor", "row"):
        return
    if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2
            or block_size > FUSE_MAX or block_size % 2):
        raise ValueError(f"optim.block_size={block_size!r}: use an even number of elements in "
                         f"[2, {FUSE_MAX}], 'tensor' (one scale per parameter) or 'row' (one "
                         f"per row of a weight)")


def resolve_block(block: Block, shapes: Sequence[Sequence[int]]) -> Block:
    """``"row"`` as the per-parameter widths of ``shapes`` (last dimension; numel when 1-D);
    any other block as it is."""
    if block != "row":
        return block
    out = []
    for sh in shapes:
        sh = tuple(int(d) for d in sh)
        n = 1
        for d in sh:
            n *= d
        out.append(sh[-1] if len(sh) >= 2 else n)
    return out


def _width(block: Block, j: int, numel: int) -> int:
    if block == "tensor":
        return numel
    return int(block[j]) if isinstance(block, (list, tuple)) else int(block)


def is_quantized(numel: int, block: Block, group_quantizes: bool, j: int = 0) -> bool:
    """Whether parameter ``j`` (of ``numel`` elements) keeps quantized moments: a property of
    the parameter only. Per-row widths must be even (4-bit codes are packed in pairs)."""
    if not group_quantizes or numel == 0:
        return False
    if block == "tensor":
        return True
    w = _width(block, j, numel)
    if isinstance(block, (list, tuple)) and (w < 2 or w % 2):
        return False
    return numel % w == 0


@dataclass(frozen=True)
class Piece:
    kind: str  # fp32 | rows | split
    start: int  # first element in the flat tensor
    length: int  # elements
    rows: int = 0  # rows: blocks; split: 1
    width: int = 0  # elements per block row
    f_off: int = 0  # fp32: offset in exp_avg / exp_avg_sq
    cm: int = 0  # offset (elements: bytes of codes, or floats) in m_codes / m_fp32
    cv: int = 0  # offset in v_codes / v_fp32
    s: int = 0  # offset in m_scales / v_scales (those of the quantized moments)
    block: int = -1  # global id of the (first) block of the group
    slot: int = -1  # split: index in the exchange buffer, -1 if the block is local


@dataclass
class Layout:
    numel: int
    pieces: List[Piece]
    n_fp32: int
    m_code_len: int  # elements of m_codes (or m_fp32)
    v_code_len: int  # elements of v_codes (or v_fp32)
    n_scales: int  # scales per quantized moment
    n_slots: int  # straddling blocks of the whole group (same on every rank); 0: no exchange
    meta: Dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """Whether the state has the quantized format: some parameter of the *group* (not
        necessarily of this partition) is quantized. Identical on all ranks, so they agree on
        taking part in the exchange of block maxima."""
        return any(self.meta.get("quantized", ()))

    def state_bytes(self) -> int:
        """Bytes of the state of this layout (:attr:`dsq.optim.state.MomentState.nbytes`)."""
        fmt = Fmt.of(self.meta)
        if not self.quantized:
            return 8 * self.numel
        scaled = fmt.m_q + fmt.v_q
        return (self.m_code_len * fmt.m.dtype.itemsize + self.v_code_len * fmt.v.dtype.itemsize
                + 4 * scaled * self.n_scales + 8 * self.n_fp32)


def _param_blocks(numels, quantized, block):
    """Per parameter: (block width, first global block id); width 0 if unquantized."""
    out, nb = [], 0
    for j, (n, q) in enumerate(zip(numels, quantized)):
        if not q:
            out.append((0, -1))
            continue
        w = _width(block, j, n)
        out.append((w, nb))
        nb += n // w
    return out


def straddling_blocks(numels, offsets, quantized, block, part_size: int, dp: int) -> List[int]:
    """Global ids of blocks that contain a partition boundary, sorted (identical on all ranks)."""
    starts = list(offsets)
    pb = _param_blocks(numels, quantized, block)
    out = set()
    for r in range(1, dp):
        b = r * part_size
        j = bisect_right(starts, b) - 1
        if j < 0 or not quantized[j] or b >= offsets[j] + numels[j]:
            continue
        w, base = pb[j]
        rel = b - offsets[j]
        if rel % w:
            out.add(base + rel // w)
    return sorted(out)


def build_layout(numels: Sequence[int], offsets: Sequence[int], quantized: Sequence[bool],
                 block: Block, m_bits: int, v_bits: int, part_start: int, part_size: int,
                 dp: int = 1) -> Layout:
    """Pieces of the flat tensor ``[part_start, part_start + part_size)`` of a group."""
    numels, offsets, quantized = list(map(int, numels)), list(map(int, offsets)), list(quantized)
    pb = _param_blocks(numels, quantized, block)
    slots = {b: i for i, b in enumerate(
        straddling_blocks(numels, offsets, quantized, block, part_size, dp))}
    lo, hi = part_start, part_start + part_size
    pieces: List[Piece] = []
    f = cm = cv = s = 0

    def add_fp32(a, b):
        nonlocal f
        pieces.append(Piece("fp32", a - lo, b - a, f_off=f))
        f += b - a

    def add_q(kind, a, rows, width, length, blk):
        nonlocal cm, cv, s
        last = pieces[-1] if pieces else None
        if (kind == "rows" and last is not None and last.kind == "rows" and last.width == width
                and last.start + last.length == a - lo):
            # contiguous complete blocks of the next parameter: extend the fused piece
            pieces[-1] = Piece("rows", last.start, last.length + length, last.rows + rows, width,
                               cm=last.cm, cv=last.cv, s=last.s, block=last.block)
        else:
            pieces.append(Piece(kind, a - lo, length, rows, width, cm=cm, cv=cv, s=s, block=blk,
                                slot=slots.get(blk, -1) if kind == "split" else -1))
        cm += rows * code_len(width, m_bits) if kind == "rows" else code_len(length, m_bits)
        cv += rows * code_len(width, v_bits) if kind == "rows" else code_len(length, v_bits)
        s += rows

    for n, off, q, (w, base) in zip(numels, offsets, quantized, pb):
        a, b = max(lo, off), min(hi, off + n)
        if a >= b:
            continue
        if not q:
            add_fp32(a, b)
            continue
        k1 = (b - 1 - off) // w  # last block touched
        x = a
        while x < b:
            k = (x - off) // w
            bs, be = off + k * w, off + (k + 1) * w
            if bs >= a and be <= b and (w <= FUSE_MAX):
                # run of complete blocks
                kend = min(k1, (b - off) // w - 1)
                rows = kend - k + 1
                add_q("rows", x, rows, w, rows * w, base + k)
                x = off + (kend + 1) * w
            else:
                e = min(b, be)
                add_q("split", x, 1, w, e - x, base + k)
                x = e
    # padding at the end of the group (last rank): nothing is stored for it
    meta = dict(numels=numels, offsets=offsets, quantized=quantized, block=block,
                m_bits=m_bits, v_bits=v_bits, part_start=part_start, part_size=part_size, dp=dp)
    return Layout(part_size, pieces, f, cm, cv, s, len(slots), meta)


def param_layout(numel: int, block: Block, m_bits: int, v_bits: int, quantize: bool) -> Layout:
    """Layout of a whole parameter (no ZeRO partitioning); ``block`` resolved
    (:func:`resolve_block`)."""
    return build_layout([numel], [0], [is_quantized(numel, block, quantize)], block, m_bits,
                        v_bits, 0, numel, 1)


def n_blocks(meta: Dict) -> int:
    """Blocks of the whole group described by a layout's ``meta``."""
    pb = _param_blocks(meta["numels"], meta["quantized"], meta["block"])
    return sum(n // w for n, (w, _) in zip(meta["numels"], pb) if w)


def layout_from_meta(meta: Dict) -> Layout:
    return build_layout(meta["numels"], meta["offsets"], meta["quantized"], meta["block"],
                        meta["m_bits"], meta["v_bits"], meta["part_start"], meta["part_size"],
                        meta["dp"])

