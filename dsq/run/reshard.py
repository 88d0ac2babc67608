"""Offline resharding of DeepSpeed ZeRO-1/2 checkpoints for another data-parallel size
(``dsq ckpt reshard``, :func:`reshard_checkpoint`; also ``train.reshard=auto``).

Checkpoints: DeepSpeed saves the client optimizer's ``state_dict()`` (codes, scales, fp32
moments, plus the layout under the ``"dsq"`` key) in each rank's
``[bf16_]zero_pp_rank_<r>_mp_rank_<t>_optim_states.pt``; resuming with the same DP size is
plain ``engine.load_checkpoint`` and continues bit for bit. DeepSpeed refuses a checkpoint of
another DP size; :func:`reshard_checkpoint` rewrites it for the new size. Since blocks do not
depend on the partitioning, resharding is exact: codes and scales are moved, never
requantized. It also reshards torch AdamW checkpoints (element-wise states).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from dsq.run.checkpoint import MARKER
from dsq.optim.formats import Fmt
from dsq.optim.layout import layout_from_meta, n_blocks
from dsq.optim.state import MomentState

ZERO_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def _keys():
    from deepspeed.checkpoint import constants as C

    return C


def reshard_checkpoint(ckpt_dir, tag: Optional[str], new_dp: int, out_dir=None) -> Path:
    """Rewrite DeepSpeed ZeRO-1/2 checkpoint ``ckpt_dir/tag`` for ``new_dp`` data-parallel ranks
    (``tag=None``: the one named by ``ckpt_dir/latest``).

    Without ``out_dir`` the tag is converted in place (the original is kept next to it as
    ``<tag>.dp<old>``); with ``out_dir`` the converted tag is written to ``out_dir/tag`` and
    ``out_dir/latest`` names it. Files other than DeepSpeed's (RNG states, configs) are copied;
    a dsq completion marker (``dsq_complete.json``) is rewritten for the new files.
    Returns the converted tag directory. Exact: optimizer codes, scales and fp32 master
    weights are moved, never recomputed, so a resumed run continues as the original would
    have (up to the reduction order of the gradients across the new number of ranks).
    """
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"{ckpt_dir} is not a directory: give the checkpoint root "
                                f"(<train.out_dir>/checkpoints, which holds 'latest')")
    C = _keys()
    if tag is None:
        latest = Path(ckpt_dir) / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{latest} does not exist: give the tag to convert")
        tag = latest.read_text().strip()
    src = Path(ckpt_dir) / tag
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a checkpoint directory")
    if new_dp < 1:
        raise ValueError(f"new_dp={new_dp} must be >= 1")
    zero_files: Dict[int, Dict[int, Path]] = {}
    prefix = ""
    for f in src.iterdir():
        m = ZERO_RE.match(f.name)
        if m:
            prefix = m.group(1) or ""
            zero_files.setdefault(int(m.group(3)), {})[int(m.group(2))] = f
    if not zero_files:
        raise ValueError(f"{src} has no ZeRO optimizer files: ZeRO-0 checkpoints do not depend "
                         f"on the data-parallel size and need no conversion")
    old_dp = {len(v) for v in zero_files.values()}.pop()
    if out_dir is not None and Path(out_dir).resolve() == Path(ckpt_dir).resolve():
        out_dir = None  # in place (with a backup)
    final = (Path(out_dir) if out_dir is not None else Path(ckpt_dir)) / tag
    tmp = final.parent / f".{tag}.reshard"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in src.iterdir():
            if f.is_file() and not ZERO_RE.match(f.name) and f.name != MARKER:
                if MODEL_RE.match(f.name):
                    sd = torch.load(f, map_location="cpu", weights_only=False)
                    sd["dp_world_size"] = new_dp
                    torch.save(sd, tmp / f.name)
                else:
                    shutil.copy2(f, tmp / f.name)
            elif f.is_dir():
                shutil.copytree(f, tmp / f.name)
        for mp, files in zero_files.items():
            if sorted(files) != list(range(len(files))):
                raise ValueError(f"{src}: ZeRO files of mp rank {mp} are incomplete")
            model = src / f"mp_rank_{mp:02d}_model_states.pt"
            names = None
            if model.is_file():
                names = torch.load(model, map_location="cpu", weights_only=False).get(
                    "param_shapes")
            olds = [torch.load(files[r], map_location="cpu", weights_only=False)
                    for r in range(len(files))]
            news = _reshard_rank_files(olds, new_dp, names, C)
            for r, sd in enumerate(news):
                torch.save(sd, tmp / f"{prefix}zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt")
        _write_marker(src, tmp)
        if out_dir is None:
            backup = final.parent / f"{tag}.dp{old_dp}"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
        elif final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if out_dir is not None:
            (final.parent / "latest").write_text(tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_marker(src: Path, dst: Path) -> None:
    marker = src / MARKER
    if not marker.is_file():
        return
    info = json.loads(marker.read_text())
    info["files"] = {str(p.relative_to(dst)): p.stat().st_size
                     for p in sorted(dst.rglob("*")) if p.is_file()}
    (dst / MARKER).write_text(json.dumps(info, indent=1))


def _reshard_rank_files(olds: List[Dict], new_dp: int, names, C) -> List[Dict]:
    """The ZeRO files (one per new rank) of one model-parallel rank."""
    osds = [o[C.OPTIMIZER_STATE_DICT] for o in olds]
    old_dp = len(osds)
    bases = [sd[C.BASE_OPTIMIZER_STATE] for sd in osds]
    if not isinstance(bases[0], dict):
        raise ValueError("elastic ZeRO checkpoints are not supported: save with "
                         "zero_optimization.elastic_checkpoint=false")
    lean = C.ZERO_STAGE in osds[0]  # DeepSpeedZeroOptimizer stores partitions without padding
    ngroups = len(bases[0]["param_groups"])
    dsq = bases[0].get("dsq")
    new_osds = [dict(osds[0]) for _ in range(new_dp)]
    new_bases = [{"state": {}, "param_groups": bases[0]["param_groups"]} for _ in range(new_dp)]
    new_fp32 = [[] for _ in range(new_dp)]
    new_pad = [[] for _ in range(new_dp)]
    new_maps = [[] for _ in range(new_dp)]
    if dsq is not None:
        for b in new_bases:
            b["dsq"] = {"version": dsq["version"], "layouts": []}
    for i in range(ngroups):
        pid = bases[0]["param_groups"][i]["params"][0]
        metas = [b["dsq"]["layouts"][i][0] for b in bases] if dsq is not None else None
        old_parts = [sd[C.SINGLE_PARTITION_OF_FP32_GROUPS][i] for sd in osds]
        old_size = old_parts[0].numel() + (osds[0][C.GROUP_PADDINGS][i] if lean else 0)
        if metas is not None:
            L = metas[0]["offsets"][-1] + metas[0]["numels"][-1]
        else:
            L = sum(p.numel() for p in old_parts) - (0 if lean else osds[-1][C.GROUP_PADDINGS][i])
        align = 2 * new_dp
        size = -(-L // align) * align // new_dp
        flat = torch.cat([p.reshape(-1).float() for p in old_parts])[:L]
        states = [b["state"].get(pid, {}) for b in bases]
        if metas is not None:
            new_states, new_metas = _reshard_qadamw(states, metas, bases[0]["param_groups"][i],
                                                    L, new_dp, size)
        else:
            new_states = _reshard_elementwise(states, old_size, L, new_dp, size)
            new_metas = None
        for r in range(new_dp):
            a, b = r * size, min((r + 1) * size, L)
            part = flat[a:b] if b > a else flat[:0]
            pad = size - part.numel()
            if lean:
                new_fp32[r].append(part.clone())
                new_pad[r].append(pad)
            else:
                new_fp32[r].append(torch.cat([part, part.new_zeros(pad)]))
                new_pad[r].append((new_dp * size - L) if r == new_dp - 1 else 0)
            new_bases[r]["state"][pid] = new_states[r]
            if new_metas is not None:
                new_bases[r]["dsq"]["layouts"].append([new_metas[r]])
            new_maps[r].append(_slice_mapping(names[i] if names else None, metas, r, size, L))
    for r in range(new_dp):
        sd = new_osds[r]
        sd[C.BASE_OPTIMIZER_STATE] = new_bases[r]
        sd[C.SINGLE_PARTITION_OF_FP32_GROUPS] = new_fp32[r]
        sd[C.GROUP_PADDINGS] = new_pad[r]
        pc = osds[0].get(C.PARTITION_COUNT)
        sd[C.PARTITION_COUNT] = [new_dp] * len(pc) if isinstance(pc, list) else new_dp
        if C.PARAM_SLICE_MAPPINGS in sd:
            sd[C.PARAM_SLICE_MAPPINGS] = new_maps[r]
    del old_dp
    return [dict(olds[0], **{C.OPTIMIZER_STATE_DICT: sd}) for sd in new_osds]


def _slice_mapping(names, metas, r, size, L):
    """DeepSpeed's PARAM_SLICE_MAPPINGS (name -> fragment of this partition), recomputed."""
    from deepspeed.utils.tensor_fragment import fragment_address

    out = OrderedDict()
    if not names:
        return out
    numels = [int(torch.Size(s).numel()) for s in names.values()]
    offsets = metas[0]["offsets"] if metas else [sum(numels[:j]) for j in range(len(numels))]
    lo, hi = r * size, (r + 1) * size
    for (name, _), n, off in zip(names.items(), numels, offsets):
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            out[name] = fragment_address(numel=b - a, start=a - lo)
    return out


def _reshard_elementwise(states: List[Dict], old_size: int, L: int, new_dp: int, size: int):
    """States of element-wise optimizers (torch AdamW): partition-shaped tensors are cut anew."""
    out = [dict() for _ in range(new_dp)]
    for k, v0 in states[0].items():
        if torch.is_tensor(v0) and v0.dim() == 1 and v0.numel() == old_size:
            full = torch.cat([s[k] for s in states])[:L]
            full = torch.cat([full, full.new_zeros(new_dp * size - L)])
            for r in range(new_dp):
                out[r][k] = full[r * size:(r + 1) * size].clone()
        else:
            for r in range(new_dp):
                out[r][k] = v0
    return out


def _reshard_qadamw(states: List[Dict], metas: List[Dict], group: Dict, L: int, new_dp: int,
                    size: int):
    """Global per-element codes (values of a 32-bit moment) and per-block scales from the old
    partitions, cut anew; each partition's state is read and written as a
    :class:`~dsq.optim.state.MomentState`."""
    fmt = Fmt.of(group)
    # per element: codes (int16), or the values of a 32-bit (fp32) moment
    qm, qv = (torch.zeros(L, dtype=torch.int16 if mo.quantized else torch.float32)
              for mo in (fmt.m, fmt.v))
    fm, fv = torch.zeros(L), torch.zeros(L)
    nb = n_blocks(metas[0])
    gsm, gsv = torch.zeros(nb), torch.zeros(nb)
    steps = {s["step"] for s in states if s}
    if len(steps) > 1:
        raise ValueError(f"ranks of the checkpoint are at different steps {sorted(steps)}")
    for st, meta in zip(states, metas):
        if not st:
            continue
        old = MomentState.of(st, layout_from_meta(meta), fmt)
        lo = meta["part_start"]
        for pc in old.lay.pieces:
            a, n = lo + pc.start, pc.length
            if pc.kind == "fp32":
                fm[a:a + n], fv[a:a + n] = old.fp32(pc)
                continue
            qm[a:a + n], qv[a:a + n] = old.piece_codes(pc)
            for glob, sc in zip((gsm, gsv), old.scales(pc)):
                if sc is not None:
                    glob[pc.block:pc.block + pc.rows] = sc
    out_states, out_metas = [], []
    for r in range(new_dp):
        meta = dict(metas[0], part_start=r * size, part_size=size, dp=new_dp)
        out_metas.append(meta)
        if not steps:  # no step taken yet: state is created lazily
            out_states.append({})
            continue
        new = MomentState.zeros(layout_from_meta(meta), fmt, torch.zeros(size))
        new.step = next(iter(steps))
        for pc in new.lay.pieces:
            a, n = r * size + pc.start, pc.length
            if pc.kind == "fp32":
                for t, full in zip(new.fp32(pc), (fm, fv)):
                    t.copy_(full[a:a + n])
                continue
            new.set_piece_codes(pc, qm[a:a + n], qv[a:a + n])
            for glob, sc in zip((gsm, gsv), new.scales(pc)):
                if sc is not None:
                    sc.copy_(glob[pc.block:pc.block + pc.rows])
        out_states.append(new.state_dict())
    return out_states, out_metas


def main(argv=None) -> None:
    """``dsq ckpt reshard CKPT_DIR --dp N [--tag TAG] [--out DIR]`` (also
    ``python -m dsq.run.reshard ...``)."""
    from dsq.log import ArgParser

    ap = ArgParser(prog="dsq ckpt reshard", description=reshard_checkpoint.__doc__
                                 .split("\n\n")[0])
    ap.add_argument("ckpt_dir", help="DeepSpeed checkpoint root (holds the tag directories)")
    ap.add_argument("--dp", type=int, required=True, help="new data-parallel size")
    ap.add_argument("--tag", default=None, help="tag to convert (default: the one in 'latest')")
    ap.add_argument("--out", default=None,
                    help="write the converted tag here instead of converting in place")
    args = ap.parse_args(argv)
    print(reshard_checkpoint(args.ckpt_dir, args.tag, args.dp, args.out))


if __name__ == "__main__":
    main()
