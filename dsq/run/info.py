"""What a run records about itself: the code and library versions (MLflow params), the nodes it
spans, and the peak memory of this process (host RSS, GPU allocation)."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Dict

import torch


def run_provenance() -> Dict[str, str]:
    """Code and library versions of this run, as MLflow params."""
    import subprocess

    import deepspeed
    import megatron.core

    import dsq

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(dsq.__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"dsq.git_commit": commit or "unknown", "dsq.version": dsq.__version__,
            "versions.torch": torch.__version__, "versions.deepspeed": deepspeed.__version__,
            "versions.megatron_core": megatron.core.__version__}


def num_nodes() -> int:
    """Nodes the ranks span: SLURM's count for the job step (slurm/pretrain.sbatch), else 1."""
    for key in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(dev: torch.device) -> int:
    """Peak bytes allocated by PyTorch on ``dev`` (0 off CUDA)."""
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0
