"""Helpers shared by the test modules (not a test module itself): the shape classes every fused path is
tested on, the backend contract's state and lists, and one step of a backend."""
import torch

# Every shape class: 0-d, 1-D, 1xN, Nx1, 1x1, ragged 2-D (N not a multiple of any tile or vector width),
# 3-D, 4-D, several stripes per matrix (M > 64), a flat tensor of several chunks, vector-friendly widths,
# tall matrices (more than 64 stripes; a batch whose rows do not start aligned).
SHAPES_GPU = [(), (7,), (1, 33), (33, 1), (1, 1), (37, 53), (129, 257), (3, 5, 7), (4, 3, 3, 3), (2, 1, 5, 1),
              (200, 64), (40000,), (3, 70, 1024), (4100, 8), (2, 2053, 6), (3, 8193)]
# Small enough for Triton's interpreter (about 5 ms per program).
SHAPES_CPU = [(), (7,), (1, 33), (33, 1), (1, 1), (37, 53), (129, 70), (3, 5, 7), (4, 3, 3, 3), (2, 1, 5, 1),
              (20000,)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
             weight_decay=0.0, maximize=False)


def new_state(p, gen=None):
    """The state of param p as a dict m, r, c, R, C (ndim >= 2) or m, v: zeros, or (with a generator) random
    values, so that the EMAs carry history and a kernel that skipped an element or read the wrong one gives
    a different number rather than the same zero."""
    def make(shape, positive):
        if gen is None:
            return torch.zeros(shape, device=p.device)
        x = torch.rand(shape, generator=gen) + 0.5 if positive else torch.randn(shape, generator=gen)
        return x.to(p.device)
    st = {"m": make(p.shape, False)}
    if p.ndim >= 2:
        st.update(r=make(p.shape[:-1], True), R=make(p.shape[:-1], True),
                  c=make(p.shape[:-2] + p.shape[-1:], True), C=make(p.shape[:-2] + p.shape[-1:], True))
    else:
        st["v"] = make(p.shape, True)
    return st


def state_lists(sts):
    """exp_avgs, rows, cols, res_rows, res_cols, sqs in the backend contract's order, None where absent."""
    return ([s["m"] for s in sts], [s.get("r") for s in sts], [s.get("c") for s in sts], [s.get("R") for s in sts],
            [s.get("C") for s in sts], [s.get("v") for s in sts])


def backend_step(mod, ps, gs, sts, cache=None, hyper=HYPER, **kw):
    """One `came_step` of backend module `mod` with the states `sts` (see new_state)."""
    mod.came_step(ps, gs, *state_lists(sts), cache={} if cache is None else cache, **(hyper | kw))


def fused_backend_params():
    """pytest params for the fused backends ("triton", "cuda"), each skipped with its reason where it cannot
    run (on a CPU, Triton runs through its interpreter)."""
    import pytest
    import came_kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for name in ("triton", "cuda"):
        why = came_kernels.backends.unavailable_reason(name, device)
        out.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out
