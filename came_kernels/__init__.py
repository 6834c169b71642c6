"""came_kernels: the CAME optimizer (Luo et al., ACL 2023) with fused Triton and CUDA backends.

    opt = came_kernels.CAME(model.parameters(), lr=2e-4, weight_decay=0.01)   # instead of AdamW
"""
from .backends import BACKENDS, BackendUnavailableError, available_backends, default_backend
from .functional import came
from .optimizer import CAME

__version__ = "0.1.0"
__all__ = ["CAME", "came", "available_backends", "default_backend", "BACKENDS", "BackendUnavailableError"]
