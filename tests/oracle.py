"""A float64 CAME oracle written from the paper (Luo et al. 2023, Algorithm 1) and the reference semantics in CONTRIBUTING.md.

Deliberately naive: no in-place ops, no buffers, explicit formulas, one tensor at a time, float64 all the
way. Every backend is compared against it. It shares no code with the package.
"""
import math

import torch


class OracleCAME:
    def __init__(self, params, lr, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999),
                 weight_decay=0.0, maximize=False, bias_correction=()):
        """bias_correction: the statistics divided by 1 - beta^t ("exp_avg": m in the update only,
        "exp_avg_sq": c or v, "exp_avg_res": C); True for all three."""
        self.p = [p.detach().to(torch.float64).clone() for p in params]
        if bias_correction is True:
            bias_correction = ("exp_avg", "exp_avg_sq", "exp_avg_res")
        self.bc = set(bias_correction or ())
        self.t = 0
        self.lr, self.eps, self.d, self.betas, self.wd, self.maximize = lr, eps, clip_threshold, betas, weight_decay, maximize
        self.state = [self._init(p) for p in self.p]

    @staticmethod
    def _init(p):
        st = {"m": torch.zeros_like(p)}
        if p.ndim >= 2:
            st["r"] = torch.zeros(p.shape[:-1], dtype=p.dtype)
            st["c"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=p.dtype)
            st["R"] = torch.zeros(p.shape[:-1], dtype=p.dtype)
            st["C"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=p.dtype)
        else:
            st["v"] = torch.zeros_like(p)
        return st

    @staticmethod
    def _inv_sqrt_factored(row, col):
        # 1/sqrt(V) with V = row col^T / mean(row): the rank-1 (per matrix) reconstruction of the paper
        V = row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(dim=-1, keepdim=True).unsqueeze(-1)
        return 1.0 / torch.sqrt(V)

    def step(self, grads):
        b1, b2, b3 = self.betas
        self.t += 1
        t = self.t
        # Each corrected statistic is divided by its EMA's weight sum; the row statistics r and R are left
        # as they are: their correction cancels in r / mean(r).
        w1 = 1 - b1 ** t if "exp_avg" in self.bc else 1.0
        w2 = 1 - b2 ** t if "exp_avg_sq" in self.bc else 1.0
        w3 = 1 - b3 ** t if "exp_avg_res" in self.bc else 1.0
        e1, e2 = self.eps
        for i, (p, g) in enumerate(zip(self.p, grads)):
            g = g.detach().to(torch.float64)
            if self.maximize:
                g = -g
            st = self.state[i]
            if p.ndim >= 2:
                sq = g * g + e1
                st["r"] = b2 * st["r"] + (1 - b2) * sq.mean(dim=-1)
                st["c"] = b2 * st["c"] + (1 - b2) * sq.mean(dim=-2)
                u = g * self._inv_sqrt_factored(st["r"], st["c"] / w2)
            else:
                st["v"] = b2 * st["v"] + (1 - b2) * (g * g + e1)
                u = g / torch.sqrt(st["v"] / w2)
            rms = math.sqrt(float((u * u).sum()) / u.numel())
            u_hat = u / max(1.0, rms / self.d)
            st["m"] = b1 * st["m"] + (1 - b1) * u_hat
            if p.ndim >= 2:
                res = (u_hat - st["m"]) ** 2 + e2
                st["R"] = b3 * st["R"] + (1 - b3) * res.mean(dim=-1)
                st["C"] = b3 * st["C"] + (1 - b3) * res.mean(dim=-2)
                update = (st["m"] / w1) * self._inv_sqrt_factored(st["R"], st["C"] / w3)
            else:
                update = st["m"] / w1
            self.p[i] = p - self.lr * self.wd * p - self.lr * update


def rel_err(x, ref):
    """max|x - ref| / max|ref|, in float64; inf when x has NaN/inf that ref does not."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    scale = ref.abs().max().item() or 1.0
    return (x - ref).abs().max().item() / scale


def assert_close_rel(x, ref, tol, what=""):
    err = rel_err(x, ref)
    if not err <= tol:
        diff = (x.detach().double().cpu() - ref.detach().double().cpu()).abs()
        bad = (diff > tol * (ref.abs().max().item() or 1.0)) | ~torch.isfinite(x.detach().double().cpu())
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}; {int(bad.sum())} of {x.numel()} "
                             f"elements off, first at {idx}")
