"""Shared test setup.

Without a GPU, TRITON_INTERPRET=1 is set before anything imports triton, so that backend='triton' runs
its real kernels through the interpreter on CPU tensors (that is how CI checks them). With a GPU it is left
alone, so the same tests run the compiled kernels. (`import torch` does not import triton.)
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    import came_kernels
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name, why in came_kernels.available_backends(dev).items():
            lines.append(f"  backend {name:6s} on {dev}: {'available' if why is None else 'unavailable: ' + why}")
    return lines


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234
