import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never download
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model, std=0.2, seed=0):
    """Give every parameter of a freshly built HF model random values (HF's init leaves norms at 1,
    biases and layer scales at constants, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if p.dim() == 1 and ('norm' in name or 'lambda' in name) and 'gemma' not in type(model).__name__.lower() else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model


def rel_err(a, b):
    """max |a - b| / max |b|"""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
