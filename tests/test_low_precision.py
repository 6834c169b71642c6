"""Opt-in low-precision state: `momentum_dtype` ("bf16", "int8"), `param_rounding` ("stochastic", "kahan")
and `seed`.

The torch backend is the spec (torch_backend: philox, sr_bf16, quantize_blockwise); here it is checked
against published Philox vectors and explicit fp32 references, the Triton kernels against it (random bits,
rounding and quantization bit for bit on the same inputs; whole steps within one rounding step, since the
fp32 values they round differ in the last bits with the order of sums), and the optimizer's state,
checkpoints, validation and routing.
"""
import math

import pytest
import torch

import came_kernels
from came_kernels import functional
from came_kernels.backends import torch_backend as tb
from came_kernels.backends import cuda_backend, triton_backend
from came_testing import SHAPES_CPU, SHAPES_GPU

_GPU = torch.cuda.is_available()
DEVICE = "cuda" if _GPU else "cpu"
_TRITON = triton_backend.unavailable_reason(torch.device(DEVICE)) is None
needs_triton = pytest.mark.skipif(not _TRITON, reason="Triton (or its interpreter) is not available")
_CUDA_EXT = _GPU and cuda_backend.unavailable_reason(torch.device("cuda")) is None
# The fused backends checked against the spec: Triton everywhere (its interpreter on a CPU), the CUDA
# extension where it is built and a GPU is present.
FUSED = [pytest.param("triton", marks=needs_triton),
         pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA_EXT, reason="the CUDA extension needs a GPU "
                                                        "and a build of came_kernels._C"))]
# Every shape class, plus factored tensors with at least LOWBIT_MIN_NUMEL elements (those get the low-bit
# momentum): one whose rows are a multiple of QBLOCK wide, a batch, and the threshold itself.
LOWBIT_SHAPES = [(16, 512), (3, 40, 50), (64, 64)]
SHAPES = (SHAPES_GPU if _GPU else SHAPES_CPU) + LOWBIT_SHAPES


if _TRITON:
    import triton
    import triton.language as tl
    from came_kernels.triton_kernels import came_math as cm

    # Test kernels: the kernels' own @triton.jit helpers on given inputs.
    @triton.jit(do_not_specialize=["key", "step"])  # compiled, a step of 1 would otherwise be a constexpr
    def _bits_kernel(out, out4, idx_ptr, key, step, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        idx = tl.load(idx_ptr + offs, mask=mask, other=0)
        tl.store(out + offs, cm._random_bits(key, step, idx, cm.STREAM_PARAM).to(tl.int64), mask=mask)
        a, b, c, d = tl.philox(key, (idx & 0xFFFFFFFF).to(tl.uint32), (idx >> 32).to(tl.uint32),
                               (idx * 7 & 0xFFFFFFFF).to(tl.uint32), (idx * 13 & 0xFFFFFFFF).to(tl.uint32))
        tl.store(out4 + 4 * offs, a.to(tl.int64), mask=mask)
        tl.store(out4 + 4 * offs + 1, b.to(tl.int64), mask=mask)
        tl.store(out4 + 4 * offs + 2, c.to(tl.int64), mask=mask)
        tl.store(out4 + 4 * offs + 3, d.to(tl.int64), mask=mask)

    @triton.jit
    def _rounding_kernel(x_ptr, bits_ptr, absmax_ptr, q_in_ptr, sr_out, q_out, deq_out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        r = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.uint32)
        absmax = tl.load(absmax_ptr + offs // cm.QBLOCK, mask=mask, other=0.0)
        tl.store(sr_out + offs, cm._sr_bf16(x, r), mask=mask)
        tl.store(q_out + offs, cm._quantize(x, absmax, r), mask=mask)
        q = tl.load(q_in_ptr + offs, mask=mask, other=0)
        tl.store(deq_out + offs, cm._dequantize(q, absmax), mask=mask)


# ---------------------------------------------------------------------------------------------- Philox
# Known-answer vectors of Philox4x32-10 (Random123's kat_vectors): key (k0, k1), counter, output.
KAT = [((0x00000000, 0x00000000), (0x00000000, 0x00000000, 0x00000000, 0x00000000),
        (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
       ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff),
        (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
       ((0xa4093822, 0x299f31d0), (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344),
        (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]


@pytest.mark.parametrize("key,ctr,want", KAT)
def test_torch_philox_matches_the_published_vectors(key, ctr, want):
    k = torch.tensor(key[0] | (key[1] << 32) if key[1] < 2**31 else key[0] | ((key[1] - 2**32) << 32))
    out = tb.philox(k, torch.tensor([ctr[0]]), ctr[1], ctr[2], ctr[3])
    assert [int(x) for x in out] == list(want)


@needs_triton
def test_triton_philox_and_random_bits_equal_the_torch_ones_bit_for_bit():
    # element indices past 2^32 (the counter's high word), keys with a tensor id in the high half
    idx = torch.cat([torch.arange(3000), torch.tensor([2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3])]).to(DEVICE)
    for seed, tensor_id, step in ((0, 0, 1), (12345, 7, 1000), (2**32 - 1, 2**31 - 1, 2**24)):
        key = tb.rng_keys(seed, [tensor_id])[0]
        out = torch.empty_like(idx)
        out4 = torch.empty(idx.numel(), 4, dtype=torch.int64, device=DEVICE)
        _bits_kernel[(-(-idx.numel() // 256),)](out, out4, idx, key, step, idx.numel(), BLOCK=256)
        k = torch.tensor(key, device=DEVICE)
        want = tb.philox(k, idx & 0xFFFFFFFF, idx >> 32, step, tb.STREAM_PARAM)[0]
        assert torch.equal(out, want), (seed, tensor_id, step)
        want4 = torch.stack(tb.philox(k, idx & 0xFFFFFFFF, idx >> 32, idx * 7 & 0xFFFFFFFF, idx * 13 & 0xFFFFFFFF), 1)
        assert torch.equal(out4, want4)
        rng = torch.tensor([key, step], device=DEVICE)
        assert torch.equal(tb.random_bits(rng, 3000, tb.STREAM_PARAM, DEVICE), want[:3000])


def test_random_bits_differ_by_stream_step_seed_and_tensor():
    rng = lambda seed, tid, step: torch.tensor([tb.rng_keys(seed, [tid])[0], step])  # noqa: E731
    base = tb.random_bits(rng(0, 0, 1), 4096, 0, "cpu")
    for other in (tb.random_bits(rng(0, 0, 1), 4096, 1, "cpu"), tb.random_bits(rng(0, 0, 2), 4096, 0, "cpu"),
                  tb.random_bits(rng(1, 0, 1), 4096, 0, "cpu"), tb.random_bits(rng(0, 1, 1), 4096, 0, "cpu")):
        assert (base == other).float().mean() < 0.01
    assert 0 <= int(base.min()) and int(base.max()) < 2**32
    assert abs(base.double().mean().item() / 2**32 - 0.5) < 0.02  # uniform-ish


# -------------------------------------------------------------------------- rounding and quantization
def _awkward_values(n=4096, seed=0):
    """fp32 values with ties, exact bf16 values, zeros, subnormals, huge values, inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.logspace(-6, 6, n)[torch.randperm(n, generator=gen)]
    x[:8] = torch.tensor([0.0, -0.0, 1.0, 1.0 + 2**-8, -(1.0 + 2**-8), 1e-40, 3.0e38, -3.0e38])
    x[8:12] = torch.tensor([math.inf, -math.inf, math.nan, 65504.0])
    x[256:512] = 0.0  # an all-zero block
    return x


def test_sr_bf16_rounds_to_a_neighbour_and_is_unbiased():
    x = _awkward_values()
    finite = torch.isfinite(x)
    bits = tb.random_bits(torch.tensor([5, 1]), x.numel(), 0, "cpu")
    y = tb.sr_bf16(x, bits).float()
    down = x.to(torch.bfloat16).float()  # a neighbour; the other one is one bf16 ulp away
    assert (y[finite] == x[finite]).sum() >= (x[finite] == down[finite]).sum()  # exact values stay exact
    ulp = (x.abs().to(torch.bfloat16).float().abs() * 2**-7).clamp_min(2**-133)
    assert ((y - x).abs()[finite & (x.abs() < 3e38)] <= ulp[finite & (x.abs() < 3e38)]).all()
    assert torch.isnan(y[10]) and y[8] == math.inf and y[9] == -math.inf
    # unbiased: 1 + 0.25 ulp rounds up a quarter of the time
    v = torch.full((1 << 16,), 1.0 + 2**-9)
    r = tb.sr_bf16(v, tb.random_bits(torch.tensor([9, 3]), v.numel(), 0, "cpu")).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.double().mean().item() - (1.0 + 2**-9)) < 2e-5


def test_quantize_blockwise_round_trip_within_one_code_and_unbiased():
    m = torch.randn(3, 1000) * torch.logspace(-3, 1, 3000).view(3, 1000)
    bits = tb.random_bits(torch.tensor([1, 1]), m.numel(), 0, "cpu").view(m.shape)
    q, absmax = tb.quantize_blockwise(m, bits)
    assert q.dtype == torch.int8 and q.shape == m.shape and absmax.shape == (math.ceil(3000 / 256),)
    back = tb.dequantize_blockwise(q, absmax)
    code = (tb._blocks(torch.ones_like(m)) * absmax[:, None] / 127).reshape(-1)[:3000].view(m.shape)
    assert ((back - m).abs() <= code * (1 + 1e-6)).all()
    assert int(q.abs().max()) == 127
    # unbiased: the mean of many stochastic quantizations of one block is the block
    row = torch.linspace(-1, 1, 256)
    reps = torch.stack([tb.dequantize_blockwise(*tb.quantize_blockwise(
        row, tb.random_bits(torch.tensor([2, s]), 256, 0, "cpu"))) for s in range(1, 401)])
    assert (reps.mean(0) - row).abs().max() < 4 * (1 / 127) / math.sqrt(400)


@needs_triton
def test_triton_rounding_and_quantization_equal_the_torch_ones_bit_for_bit():
    x = _awkward_values(4096).to(DEVICE)
    bits = tb.random_bits(torch.tensor([77, 3], device=DEVICE), x.numel(), 0, DEVICE)
    bits[:4] = torch.tensor([0, 2**32 - 1, 2**31, 0x8000], device=DEVICE)  # the ends of the range
    q_ref, absmax = tb.quantize_blockwise(x, bits)
    sr, q, deq = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.int8), torch.empty_like(x)
    q_in = torch.randint(-127, 128, x.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    _rounding_kernel[(16,)](x, bits, absmax, q_in, sr, q, deq, x.numel(), BLOCK=256)
    ref = tb.sr_bf16(x, bits)
    nan = torch.isnan(x)
    assert torch.equal(sr.view(torch.int16)[~nan], ref.view(torch.int16)[~nan]) and sr[nan].isnan().all()
    assert torch.equal(q, q_ref)
    assert torch.equal(deq.view(torch.int32), tb.dequantize_blockwise(q_in, absmax).view(torch.int32))


# ---------------------------------------------------------------------------------- the spec's semantics
def _train(shapes, steps, backend="torch", dtype=torch.float32, data_seed=0, device=DEVICE, **kw):
    """`steps` steps on random grads (from data_seed); kw go to CAME (seed among them)."""
    gen = torch.Generator().manual_seed(data_seed)
    ps = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]
    opt = came_kernels.CAME(ps, **dict(dict(lr=1e-2, weight_decay=0.1, backend=backend), **kw))
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("md", ["bf16", "int8"])
def test_step_stores_the_fp32_momentum_rounded_and_updates_with_what_it_stored(md):
    # One step from a state whose momentum is exactly representable: the statistics must equal those of
    # the fp32 step bit for bit (the residual uses the unrounded m), the stored momentum must be the fp32
    # one rounded with the documented bits, and the param must move by the stored momentum.
    shape = (40, 128)
    ps, opt = _train([shape], 2, momentum_dtype=md, device="cpu")
    st = opt.state[ps[0]]
    m0 = (tb.dequantize_blockwise(st["exp_avg_q"], st["exp_avg_absmax"]) if md == "int8"
          else st["exp_avg"].float())
    p0 = ps[0].detach().clone()
    ref = {k: v.clone() for k, v in st.items() if k.startswith("exp_avg_") and k not in ("exp_avg_q", "exp_avg_absmax")}
    g = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ps[0].grad = g
    opt.step()

    p32, m32 = p0.clone(), m0.clone()
    tb.came_step([p32], [g], [m32], [ref["exp_avg_sq_row"]], [ref["exp_avg_sq_col"]], [ref["exp_avg_res_row"]],
                 [ref["exp_avg_res_col"]], [None], lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30,
                 eps2=1e-16, clip_threshold=1.0, weight_decay=0.1, maximize=False)
    for k, v in ref.items():
        assert torch.equal(st[k], v), k
    rng = torch.tensor([tb.rng_keys(0, [0])[0], 3])
    bits = tb.random_bits(rng, m32.numel(), tb.STREAM_MOMENTUM, "cpu").view(shape)
    if md == "int8":
        q, absmax = tb.quantize_blockwise(m32, bits)
        assert torch.equal(st["exp_avg_q"], q) and torch.equal(st["exp_avg_absmax"], absmax)
        stored = tb.dequantize_blockwise(q, absmax)
    else:
        assert torch.equal(st["exp_avg"].view(torch.int16), tb.sr_bf16(m32, bits).view(torch.int16))
        stored = st["exp_avg"].float()
    R, C = ref["exp_avg_res_row"], ref["exp_avg_res_col"]
    update = stored * (R / R.mean()).rsqrt()[:, None] * C.rsqrt()[None, :]
    want = p0.double() * (1 - 1e-2 * 0.1) - 1e-2 * update.double()
    assert (ps[0].detach().double() - want).abs().max() < 1e-6
    assert (p32 - ps[0].detach()).abs().max() > 0  # the update used the stored m, not the fp32 one


def test_low_bit_momentum_only_for_large_factored_tensors_and_fp64_untouched():
    shapes = [(64, 63), (64, 64), (5000,), (2, 2, 1024)]
    ps, opt = _train(shapes, 1, momentum_dtype="int8", device="cpu")
    kinds = [sorted(k for k in opt.state[p] if k.startswith("exp_avg") and k in ("exp_avg", "exp_avg_q")) for p in ps]
    assert kinds == [["exp_avg"], ["exp_avg_q"], ["exp_avg"], ["exp_avg_q"]]
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.float32
    ps, opt = _train([(64, 64)], 1, dtype=torch.float64, momentum_dtype="bf16", device="cpu")
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("md", ["bf16", "int8"])
def test_low_bit_momentum_tracks_the_fp32_run(md):
    # Not equal (rounding noise), but close: the quantization error of m is a small fraction of m.
    shapes = [(64, 256), (7,)]
    a, _ = _train(shapes, 20, device="cpu", weight_decay=0.0)
    b, _ = _train(shapes, 20, device="cpu", weight_decay=0.0, momentum_dtype=md)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    for x, y, p0 in zip(a, b, init):
        moved = (x - p0).detach()
        assert ((y - x).detach().norm() / moved.norm()) < (0.02 if md == "bf16" else 0.1)


def test_seed_changes_the_rounding_and_runs_reproduce():
    a, _ = _train([(64, 64)], 3, device="cpu", momentum_dtype="int8", seed=0)
    b, _ = _train([(64, 64)], 3, device="cpu", momentum_dtype="int8", seed=0)
    c, _ = _train([(64, 64)], 3, device="cpu", momentum_dtype="int8", seed=1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_default_state_and_update_are_unchanged():
    a, oa = _train([(64, 64), (7,)], 3, device="cpu")
    b, ob = _train([(64, 64), (7,)], 3, device="cpu", momentum_dtype="fp32", param_rounding="kahan", seed=5)
    for x, y in zip(a, b):  # fp32 params: param_rounding changes nothing, and no state is added
        assert torch.equal(x, y)
        assert set(oa.state[x]) == set(ob.state[y]) == {"step", "exp_avg", *tb.state_shapes(x.shape)}
        assert oa.state[x]["exp_avg"].dtype == torch.float32


# --------------------------------------------------------------------------------- bf16 param rounding
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_updates_below_half_an_ulp_nearest_stays_stochastic_moves_kahan_accumulates(backend):
    # A constant gradient of 1 on a 1-D param at 1.0: u_hat = 1 (clipped), m_t = 1 - 0.9^t, so the exact
    # param after T steps is 1 - lr * sum_t m_t; lr * m_t < 1e-4 is far below half a bf16 ulp at 1.0 (2^-9).
    n, steps, lr = 8192, 40, 1e-4
    exact = 1.0 - lr * sum(1 - 0.9 ** t for t in range(1, steps + 1))
    out = {}
    for rounding in ("nearest", "stochastic", "kahan"):
        p = torch.ones(n, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        opt = came_kernels.CAME([p], lr=lr, param_rounding=rounding, backend=backend)
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
            opt.step()
        out[rounding] = (p.detach().double(), opt.state[p].get("param_comp"))
    assert (out["nearest"][0] == 1.0).all()  # round to nearest never moves
    sr = out["stochastic"][0]
    assert sr.unique().numel() > 1 and abs(sr.mean().item() - exact) < 3e-4  # moves, on average as it should
    p, comp = out["kahan"]
    assert comp is not None and comp.dtype == torch.bfloat16
    assert ((p + comp.double()) - exact).abs().max() < 2e-5  # the compensation carries what rounding lost
    assert (p - exact).abs().max() <= 2**-8  # and the param itself is within an ulp


def test_kahan_tracks_fp32_params_better_than_nearest():
    # Elementwise, on random grads. (Stochastic rounding is unbiased, not closer per element: its noise is
    # about half an ulp per step; the deterministic test above shows what it buys.)
    shapes = [(64, 64), (9,)]
    ref, _ = _train(shapes, 30, device="cpu", lr=1e-3)
    err = {}
    for rounding in ("nearest", "kahan"):
        ps, _ = _train(shapes, 30, device="cpu", lr=1e-3, dtype=torch.bfloat16, param_rounding=rounding)
        err[rounding] = sum((p.double() - r.double()).norm().item() for p, r in zip(ps, ref))
    assert err["kahan"] < 0.5 * err["nearest"], err


def _assert_bf16_momenta_close(ma, mb, what):
    """Two bf16-stored momenta that saw the same grads, rounded by the same bits from fp32 values that differ in
    their last bits: a rounding that went the other way differs by one bf16 step of the value m had then, and
    carries on through beta1. That value may have been larger than m is now (m shrinks as it changes sign), so
    the step is bounded by the final |m| and by the tensor's mean |m|; a wrong element or row is off by about
    |m| itself, 30 times the bound. Stochastic rounding by the same bits rounds almost every element alike,
    unlike rounding to nearest (which differs from it in about a third of them)."""
    ulp = 2**-7 * (mb.abs() + mb.abs().mean())  # >= one bf16 step of |mb| or of the mean |mb|
    diff = (ma - mb).abs()
    assert (diff <= 3 * ulp).all(), (what, float((diff / ulp).max()))
    assert (diff <= ulp).float().mean() > 0.99, what
    assert (ma == mb).float().mean() > 0.99, what  # the same bits: rounded the same way (nearest would not be)


def test_bf16_momentum_bound_takes_rounding_that_went_the_other_way_but_not_a_wrong_element():
    # The spec against itself on grads changed in their last bits (what another summation order does to u):
    # after 6 steps a few elements' m has shrunk below an earlier rounding's step (a bound relative to the
    # final |m| alone failed here by 30-470x, as on a GPU). One element off by a tenth of its value fails.
    def train(shape, pert):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(shape, generator=gen).requires_grad_()
        opt = came_kernels.CAME([p], lr=1e-3, weight_decay=0.1, backend="torch", momentum_dtype="bf16")
        noise = 1 + pert * torch.randn(shape, generator=torch.Generator().manual_seed(7))
        for _ in range(6):
            p.grad = torch.randn(shape, generator=gen) * noise
            opt.step()
        return opt.state[p]["exp_avg"].float()
    for shape in [(3, 70, 1024), (256, 512)]:
        ma, mb = train(shape, 3e-6), train(shape, 0.0)
        assert not torch.equal(ma, mb)  # some rounding did go the other way
        _assert_bf16_momenta_close(ma, mb, shape)
        k = int(mb.abs().argmax())
        bad = ma.clone()
        bad.view(-1)[k] *= 1.1
        with pytest.raises(AssertionError):
            _assert_bf16_momenta_close(bad, mb, shape)


# ------------------------------------------------------------------------------ Triton against the spec
@needs_triton
@pytest.mark.parametrize("md,bodies", [("fp32", 0), ("bf16", 1), ("int8", 2)])
def test_triton_plans_launch_the_bodies_of_their_momentum_kinds(md, bodies):
    # LB_FP32 and LB_BF16 (no int8 momentum) launch the default bodies, capped at two programs per SM; only a
    # group with an int8 momentum takes the _lp ones (phase 4 recomputes its new m there: 237-255 registers).
    from came_kernels.triton_kernels import multi_tensor as mt
    ps, opt = _train([(16, 512), (7,)], 1, momentum_dtype=md, device="cpu")
    sts = [opt.state[p] for p in ps]
    get = lambda k: [st.get(k) for st in sts]  # noqa: E731
    exp_avgs = [st["exp_avg_q"] if "exp_avg_q" in st else st["exp_avg"] for st in sts]
    plan = mt.build_plan(ps, [torch.zeros_like(p) for p in ps], exp_avgs, get("exp_avg_sq_row"),
                         get("exp_avg_sq_col"), get("exp_avg_res_row"), get("exp_avg_res_col"), get("exp_avg_sq"),
                         get("exp_avg_absmax"))
    assert mt.lowbit_of(plan) == bodies and plan.lowbit == (md != "fp32")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("md", ["bf16", "int8"])
def test_fused_matches_torch_backend_on_every_shape_class(backend, md, dtype, monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_SCRATCH", True)
    steps = 6 if _GPU else 2
    kw = dict(momentum_dtype=md, param_rounding="stochastic" if dtype == torch.bfloat16 else "nearest",
              lr=1e-3, dtype=dtype)
    ours, o1 = _train(SHAPES, steps, backend, **kw)
    spec, o2 = _train(SHAPES, steps, "torch", **kw)
    start, _ = _train(SHAPES, 0, "torch", **kw)
    # The same random bits round fp32 values that differ in their last bits (sums in another order, and on a
    # GPU torch's own reduction order): a rounding may go the other way, by one step q of the stored format
    # (a bf16 ulp, 2^-8 relative at most; an int8 code, absmax / 127), and such differences carry over steps
    # through beta1. Bound: most elements within one step, all within a few; a wrong element, row or block
    # is off by far more. The params then differ by the updates' share of that: the same few q relative to
    # how far the spec's params moved in all (a wrong update is off by about all of it).
    q_rel = 2.0 ** -8 if md == "bf16" else 1.0 / 127
    for a, b, b0 in zip(ours, spec, start):
        what = f"{md} {dtype} {tuple(a.shape)}"
        sa, sb = o1.state[a], o2.state[b]
        assert set(sa) == set(sb), what
        if "exp_avg_q" in sa:
            ma = tb.dequantize_blockwise(sa["exp_avg_q"], sa["exp_avg_absmax"])
            mb = tb.dequantize_blockwise(sb["exp_avg_q"], sb["exp_avg_absmax"])
            step = (tb._blocks(torch.ones_like(ma)) * sb["exp_avg_absmax"][:, None] / 127).reshape(-1)[:ma.numel()]
            diff = (ma - mb).abs().reshape(-1)
            assert (diff <= 3 * step * 1.001 + 1e-6 * mb.abs().max()).all(), what
            assert (diff <= step * 1.001 + 1e-6 * mb.abs().max()).float().mean() > 0.99, what
            assert (sa["exp_avg_q"] == sb["exp_avg_q"]).float().mean() > 0.99, what
            assert torch.allclose(sa["exp_avg_absmax"], sb["exp_avg_absmax"], rtol=1e-2, atol=0), what
        else:
            ma, mb = sa["exp_avg"].float(), sb["exp_avg"].float()
            if sa["exp_avg"].dtype == torch.bfloat16:
                _assert_bf16_momenta_close(ma, mb, what)
            else:
                assert ((ma - mb).abs() <= 1e-4 * mb.abs().max()).all(), what
        moved = (b.detach().float() - b0.detach().float()).abs().max()
        eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
        scale = b.detach().abs().max().float().clamp_min(1e-6)
        err = (a.detach().float() - b.detach().float()).abs().max()
        assert err <= 2 * eps * scale + 4 * q_rel * moved, (what, float(err), float(moved))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_kahan_matches_torch_backend(backend):
    shapes = [(37, 53), (64, 64), (7,), ()]
    ours, o1 = _train(shapes, 3, backend, dtype=torch.bfloat16, param_rounding="kahan", lr=1e-3)
    spec, o2 = _train(shapes, 3, "torch", dtype=torch.bfloat16, param_rounding="kahan", lr=1e-3)
    for a, b in zip(ours, spec):
        ea = a.detach().double() + o1.state[a]["param_comp"].double()
        eb = b.detach().double() + o2.state[b]["param_comp"].double()
        assert (ea - eb).abs().max() <= 1e-5 * eb.abs().max(), tuple(a.shape)


@pytest.mark.skipif(not _CUDA_EXT, reason="the CUDA extension needs a GPU and a build")
@pytest.mark.parametrize("md,rounding,dtype", [("int8", "stochastic", torch.bfloat16),
                                               ("bf16", "kahan", torch.bfloat16),
                                               ("int8", "nearest", torch.float32)])
def test_cuda_plan_keeps_the_low_precision_buffers_right_between_steps(md, rounding, dtype, monkeypatch):
    # The extension's plan keeps the int8 maxima (zeroed before each step), the old absmax and the rng table
    # (copied from the step's rng) between steps: bit for bit what a plan made anew at every step gives.
    monkeypatch.setenv("CAME_KERNELS_CUDA_POISON", "1")
    shapes = [(37, 53), (64, 64), (3, 300, 40), (7,), (4, 3, 3, 3)]
    kw = dict(momentum_dtype=md, param_rounding=rounding, lr=1e-3, weight_decay=0.1, backend="cuda", seed=5)
    runs = []
    for fresh in (False, True):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen).to("cuda", dtype).requires_grad_() for s in shapes]
        opt = came_kernels.CAME(ps, **kw)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to("cuda", dtype)
            if fresh:
                opt._reset_caches()
            opt.step()
        runs.append((ps, opt))
    (a, oa), (b, ob) = runs
    for x, y in zip(a, b):
        assert torch.equal(x, y), tuple(x.shape)
        for k in oa.state[x]:
            assert torch.equal(oa.state[x][k], ob.state[y][k]), (k, tuple(x.shape))


@needs_triton
def test_triton_rejects_a_wrong_sized_absmax_or_compensation_before_any_change():
    p = torch.randn(64, 64, device=DEVICE)
    st = dict(m=torch.zeros(64, 64, dtype=torch.int8, device=DEVICE), r=torch.ones(64, device=DEVICE),
              c=torch.ones(64, device=DEVICE), R=torch.ones(64, device=DEVICE), C=torch.ones(64, device=DEVICE))
    before = p.clone()
    rng = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                 weight_decay=0.0, maximize=False, cache={}, rng=rng)
    args = ([p], [torch.ones_like(p)], [st["m"]], [st["r"]], [st["c"]], [st["R"]], [st["C"]], [None])
    with pytest.raises(ValueError, match=r"exp_avg_absmaxes\[0\].*expected float32 of shape \(16,\)"):
        triton_backend.came_step(*args, exp_avg_absmaxes=[torch.zeros(15, device=DEVICE)], **hyper)
    pb = p.to(torch.bfloat16)
    argsb = ([pb], [torch.ones_like(pb)]) + args[2:]
    with pytest.raises(ValueError, match=r"param_comps\[0\].*expected bfloat16 of shape \(64, 64\)"):
        triton_backend.came_step(*argsb, exp_avg_absmaxes=[torch.zeros(16, device=DEVICE)], param_rounding="kahan",
                                 param_comps=[torch.zeros(64, 63, dtype=torch.bfloat16, device=DEVICE)], **hyper)
    with pytest.raises(ValueError, match="rng, a contiguous int64 tensor of shape"):
        triton_backend.came_step(*args, exp_avg_absmaxes=[torch.zeros(16, device=DEVICE)],
                                 **dict(hyper, rng=torch.zeros(1, 2, device=DEVICE)))
    assert torch.equal(p, before) and not st["m"].any()


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("md,rounding,dtype", [("int8", "nearest", torch.float32), ("bf16", "kahan", torch.bfloat16),
                                               ("int8", "stochastic", torch.bfloat16)])
def test_resuming_from_a_checkpoint_is_bit_exact(md, rounding, dtype):
    shapes = [(64, 64), (9,), (3, 40, 50)]
    kw = dict(momentum_dtype=md, param_rounding=rounding, dtype=dtype, device="cpu", seed=3)
    ps, opt = _train(shapes, 2, **kw)
    sd = opt.state_dict()
    saved = [p.detach().clone() for p in ps]
    qs = [q.detach().clone().requires_grad_() for q in saved]
    fresh = came_kernels.CAME(qs, lr=1e-2, weight_decay=0.1, momentum_dtype=md, param_rounding=rounding,
                              backend="torch")
    fresh.load_state_dict(sd)
    for a, b in zip(ps, qs):
        for k, v in opt.state[a].items():
            assert fresh.state[b][k].dtype == v.dtype and torch.equal(fresh.state[b][k], v), k
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        for a, b in zip(ps, qs):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            b.grad = a.grad.clone()
        opt.step()
        fresh.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, qs))


def test_fp32_checkpoint_quantizes_into_low_bit_optimizers_and_back():
    shapes = [(64, 64), (9,)]
    ps, opt32 = _train(shapes, 3, device="cpu")
    m32 = opt32.state[ps[0]]["exp_avg"].clone()
    sd32 = opt32.state_dict()
    o8 = came_kernels.CAME(ps, lr=1e-2, momentum_dtype="int8")
    o8.load_state_dict(sd32)
    st = o8.state[ps[0]]
    assert set(st) >= {"exp_avg_q", "exp_avg_absmax"} and "exp_avg" not in st
    deq = tb.dequantize_blockwise(st["exp_avg_q"], st["exp_avg_absmax"])
    half_code = (tb._blocks(torch.ones_like(m32)) * st["exp_avg_absmax"][:, None] / 254).reshape(-1).view(m32.shape)
    assert ((deq - m32).abs() <= half_code * 1.001).all()  # quantized to nearest on load
    assert torch.equal(o8.state[ps[1]]["exp_avg"], opt32.state[ps[1]]["exp_avg"])  # small: fp32 as saved
    o16 = came_kernels.CAME(ps, lr=1e-2, momentum_dtype="bf16")
    o16.load_state_dict(sd32)
    assert torch.equal(o16.state[ps[0]]["exp_avg"], m32.to(torch.bfloat16))  # nearest
    # and back: an int8 checkpoint loads into an fp32 optimizer as its dequantized values
    back = came_kernels.CAME(ps, lr=1e-2)
    back.load_state_dict(o8.state_dict())
    assert back.state[ps[0]]["exp_avg"].dtype == torch.float32 and torch.equal(back.state[ps[0]]["exp_avg"], deq)
    back.load_state_dict(o16.state_dict())
    assert torch.equal(back.state[ps[0]]["exp_avg"], o16.state[ps[0]]["exp_avg"].float())
    for p in ps:
        p.grad = torch.randn_like(p)
    o8.step()  # and they step
    back.step()


def test_came_pytorch_checkpoint_loads_into_low_bit_optimizers():
    came_pytorch = pytest.importorskip("came_pytorch")
    ps = [torch.randn(64, 64, requires_grad=True), torch.randn(9, requires_grad=True)]
    theirs = came_pytorch.CAME(ps, lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    theirs.step()
    ours = came_kernels.CAME(ps, lr=1e-2, momentum_dtype="int8", seed=4)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["momentum_dtype"] == "int8" and ours.param_groups[0]["seed"] == 4
    assert "exp_avg_q" in ours.state[ps[0]]
    ours.step()


def _bad(sd, mutate):
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": [dict(g) for g in sd["param_groups"]]}
    mutate(sd["state"][0])
    return sd


@pytest.mark.parametrize("mutate,match", [
    (lambda st: st.update(exp_avg_absmax=torch.zeros(15)), r"'exp_avg_absmax' has shape \(15,\), expected \(16,\)"),
    (lambda st: st.update(exp_avg_q=st["exp_avg_q"].to(torch.int16)), r"'exp_avg_q' must be a dense torch.int8 tensor, got torch.int16"),
    (lambda st: st.update(exp_avg_q=torch.zeros(64, 63, dtype=torch.int8)), r"'exp_avg_q' has shape \(64, 63\)"),
    (lambda st: st.pop("exp_avg_absmax"), r"state keys .*'exp_avg_q'.*expected"),
    (lambda st: st.update(exp_avg=torch.zeros(64, 64)), r"state keys"),
    (lambda st: st.update(param_comp=torch.zeros(3)), r"'param_comp' has shape \(3,\), expected \(64, 64\)"),
])
def test_bad_low_bit_checkpoint_is_refused_before_anything_changes(mutate, match):
    ps, opt = _train([(64, 64), (9,)], 2, device="cpu", momentum_dtype="int8")
    sd = _bad(opt.state_dict(), mutate)
    before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    with pytest.raises(ValueError, match=r"param of shape \(64, 64\)"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[ps[0]][k], v) for k, v in before.items())


# ----------------------------------------------------------------------------- options and routing
@pytest.mark.parametrize("kw,match", [(dict(momentum_dtype="fp8"), "momentum_dtype must be one of"),
                                      (dict(param_rounding="up"), "param_rounding must be one of"),
                                      (dict(seed=-1), "seed must be an int"), (dict(seed=2**32), "seed must be an int"),
                                      (dict(seed=1.5), "seed must be an int")])
def test_bad_options_are_rejected_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        came_kernels.CAME([torch.zeros(2, 2, requires_grad=True)], lr=0.1, **kw)


def test_fp16_params_refuse_stochastic_rounding_naming_the_param():
    with pytest.raises(ValueError, match=r"param_rounding='kahan' takes bf16 params.*float16 param of shape \(3, 2\)"):
        came_kernels.CAME([torch.zeros(3, 2, dtype=torch.float16, requires_grad=True)], lr=0.1,
                          param_rounding="kahan")


def _functional_args(md="int8"):
    p = torch.randn(64, 64)
    st = {k: torch.zeros(s) for k, s in tb.state_shapes(p.shape).items()}
    q = torch.zeros(64, 64, dtype=torch.int8) if md == "int8" else torch.zeros(64, 64, dtype=torch.bfloat16)
    absmax = [torch.zeros(16)] if md == "int8" else None
    step = torch.zeros(())
    return p, st, q, absmax, step


@pytest.mark.parametrize("md", ["int8", "bf16"])
def test_cuda_backend_is_handed_the_low_precision_state(md, monkeypatch):
    # The CUDA extension takes the low-precision state (came_step_lowbit): a group the dispatcher gives it
    # goes to it with the int8 absmaxes, the Kahan compensations, param_rounding and the rng table (Philox
    # key, step), whether asked for by name or by "auto". Checked on any machine with a stand-in step.
    monkeypatch.setattr(functional, "resolve_backend", lambda *a, **k: "cuda")
    got = []
    monkeypatch.setattr(functional, "get_step_fn", lambda name, device: lambda *a, **k: got.append((name, k)))
    for backend in ("cuda", "auto"):
        got.clear()
        p, st, q, absmax, step = _functional_args(md)
        pb = p.to(torch.bfloat16)
        comp = torch.zeros_like(pb)
        functional.came([pb], [torch.ones_like(pb)], [q], [st["exp_avg_sq_row"]], [st["exp_avg_sq_col"]],
                        [st["exp_avg_res_row"]], [st["exp_avg_res_col"]], [None], [step], lr=0.1, beta1=0.9,
                        beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0, weight_decay=0.0,
                        backend=backend, exp_avg_absmaxes=absmax, param_comps=[comp], param_rounding="kahan",
                        seed=7, rng_ids=[3])
        (name, kw), = got
        assert name == "cuda", backend
        assert kw["param_rounding"] == "kahan" and kw["param_comps"][0] is comp
        assert (kw["exp_avg_absmaxes"][0] is absmax[0]) if md == "int8" else kw["exp_avg_absmaxes"] == [None]
        assert kw["rng"].tolist() == [[tb.rng_keys(7, [3])[0], 1]]


def test_cuda_backend_rejects_an_unknown_rounding_or_a_missing_rng_before_anything_changes(monkeypatch):
    # The glue's checks run before the extension is asked for anything (made to look loaded here).
    monkeypatch.setattr(cuda_backend, "_load", lambda: True)
    p, st, q, absmax, step = _functional_args("int8")
    args = ([p], [torch.ones_like(p)], [q], [st["exp_avg_sq_row"]], [st["exp_avg_sq_col"]], [st["exp_avg_res_row"]],
            [st["exp_avg_res_col"]], [None])
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                 weight_decay=0.0, maximize=False)
    with pytest.raises(ValueError, match="unknown param_rounding 'up'"):
        cuda_backend.came_step(*args, exp_avg_absmaxes=absmax, param_rounding="up", **hyper)
    with pytest.raises(ValueError, match="backend='cuda': stochastic rounding needs rng"):
        cuda_backend.came_step(*args, exp_avg_absmaxes=absmax, **hyper)
    assert not q.any()


@pytest.mark.skipif(not _GPU, reason="host syncs only exist with a GPU")
@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_low_bit_step_makes_no_host_sync(backend):
    ps = [torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True),
          torch.randn(32, device="cuda", dtype=torch.bfloat16, requires_grad=True)]
    opt = came_kernels.CAME(ps, lr=torch.tensor(1e-2, device="cuda"), momentum_dtype="int8",
                            param_rounding="stochastic", backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
