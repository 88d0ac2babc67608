"""GPU tests (marker ``gpu``): collected everywhere, skipped with the reason "no CUDA device"
where PyTorch sees no GPU. ``launch/gpu_check.sh`` runs them on a GPU machine."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda():
    return torch.device("cuda", torch.cuda.current_device())
