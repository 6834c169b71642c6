"""Shared by the fused backends: run non-contiguous tensors on contiguous copies, then write them back.

The kernels index contiguous [B, M, N] views. A non-contiguous tensor (a channels_last conv weight, a
transposed view) runs on a contiguous copy that is written back after the step: a full-size temporary for
that tensor only. Contiguous tensors, the usual case, cost one is_contiguous() check each.
"""
from __future__ import annotations

from torch import Tensor

# Position of the grads in the contract's list order (params, grads, exp_avgs, ...): only read, never written.
_GRADS = 1


def contiguous_lists(lists: list) -> tuple[list, list[tuple[Tensor, Tensor]]]:
    """(lists with contiguous tensors, [(original, copy)] to copy back after the step)."""
    write_back = []
    out = []
    for k, lst in enumerate(lists):
        if any(x is not None and not x.is_contiguous() for x in lst):
            copies = [x if x is None or x.is_contiguous() else x.contiguous() for x in lst]
            if k != _GRADS:
                write_back += [(x, y) for x, y in zip(lst, copies) if y is not x]
            lst = copies
        out.append(lst)
    return out, write_back


def write_back_(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for orig, copy in pairs:
        orig.copy_(copy)
