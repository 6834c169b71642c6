"""CAME on DTensor params (FSDP2, HSDP, tensor-parallel placements), torch.distributed.checkpoint, FSDP1.

Two CPU processes (gloo) run every case once, in one spawn (process start-up is most of the cost on a
small machine); each case records its outcome and numbers, and the tests below read them. The reference
is single-process CAME on the whole tensors with the same gradients: a sharded step must give the same
parameters within 1e-6 (relative to the largest element) after 20 fp32 steps.
"""
import copy
import datetime
import json
import os
import time
import traceback
import warnings

import pytest
import torch

import came_kernels

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                      get_optimizer_state_dict, set_model_state_dict,
                                                      set_optimizer_state_dict)
import torch.distributed.checkpoint as dcp  # noqa: E402

WORLD = 2
TOL = 1e-6
STEPS = 20
# Every shape class under FSDP2's Shard(0) on 2 processes: uneven rows (37 -> 19 + 18), dims smaller than the
# world (rank 1 holds nothing of (1, 33), (1, 1), (1,), (1, 4, 5)), 3-D and 4-D batches, 1-D params.
FSDP_SHAPES = [(7,), (1,), (3,), (1, 33), (33, 1), (1, 1), (37, 53), (3, 5, 7), (1, 4, 5), (4, 3, 3, 3),
               (2, 1, 5, 1)]
DCP_SHAPES = [(7,), (1, 33), (33, 1), (37, 53), (3, 5, 7)]
KW = dict(lr=1e-2, weight_decay=0.1)


def _grads(shapes, t):
    """The global grads of step t: the same on every process. Step 5 is a spike (the clip acts), step 7 zero."""
    gen = torch.Generator().manual_seed(100 + t)
    scale = 1e3 if t == 5 else 0.0 if t == 7 else 1.0
    return [torch.randn(s, generator=gen) * scale for s in shapes]


class _Holder(torch.nn.Module):
    def __init__(self, shapes, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes])


def _set_grads(params, grads):
    from torch.distributed.tensor import distribute_tensor
    for p, g in zip(params, grads):
        # src_data_rank=None: every process cuts its own piece of the same global grad, no communication.
        p.grad = (distribute_tensor(g.clone(), p.device_mesh, p.placements, src_data_rank=None)
                  if came_kernels.distributed.is_dtensor(p) else g.clone())


def _train(params, opt, shapes, t0, t1):
    for t in range(t0, t1):
        _set_grads(params, _grads(shapes, t))
        opt.step()


def _full(params):
    return [p.full_tensor() if came_kernels.distributed.is_dtensor(p) else p.detach().clone() for p in params]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def _errors(got, ref):
    return [_rel(a, b) for a, b in zip(got, ref)]


def _reference(shapes, steps, **kw):
    ref = _Holder(shapes)
    opt = came_kernels.CAME(ref.parameters(), **(KW | kw))
    _train(list(ref.parameters()), opt, shapes, 0, steps)
    return ref, opt


def _save(model, opt, path):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def _load(model, opt, path):
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


# ---------------------------------------------------------------------- the cases, run on every process
def _case_fsdp2_shapes(rank, out, dirs):
    from torch.distributed.fsdp import fully_shard
    ref, ref_opt = _reference(FSDP_SHAPES, STEPS)
    model = _Holder(FSDP_SHAPES)
    fully_shard(model)
    opt = came_kernels.CAME(model.parameters(), **KW)
    params = list(model.parameters())
    _train(params, opt, FSDP_SHAPES, 0, STEPS)
    out["param_err"] = _errors(_full(params), list(ref.parameters()))
    out["state_err"], out["placements"], out["replicas_differ"] = [], [], []
    for p, q in zip(ref.parameters(), params):
        st = {k: v for k, v in opt.state[q].items() if k != "step"}
        out["state_err"].append(max(_rel(v.full_tensor(), ref_opt.state[p][k]) for k, v in st.items()))
        out["placements"].append({k: [repr(pl) for pl in v.placements] for k, v in st.items()})
        for k, v in st.items():  # a replicated statistic must be the same on every process, bit for bit
            if all(type(pl).__name__ == "Replicate" for pl in v.placements):
                pieces = [torch.empty_like(v.to_local()) for _ in range(WORLD)]
                dist.all_gather(pieces, v.to_local().contiguous())
                if not all(torch.equal(pieces[0], x) for x in pieces):
                    out["replicas_differ"].append(f"{tuple(p.shape)} {k}")
        out.setdefault("steps", []).append(float(opt.state[q]["step"]))


def _case_broken_all_reduce(rank, out, dirs):
    # The same run with the cross-process sums left out of one step: the check above must catch it.
    from torch.distributed.fsdp import fully_shard
    from came_kernels import distributed as cd
    shapes = [(37, 53), (3,)]
    ref, _ = _reference(shapes, 3)
    model = _Holder(shapes)
    fully_shard(model)
    opt = came_kernels.CAME(model.parameters(), **KW)
    real = cd.dist.all_reduce
    try:
        cd.dist.all_reduce = lambda *a, **k: None
        _train(list(model.parameters()), opt, shapes, 0, 1)
    finally:
        cd.dist.all_reduce = real
    _train(list(model.parameters()), opt, shapes, 1, 3)
    out["param_err"] = _errors(_full(model.parameters()), list(ref.parameters()))


def _case_fsdp2_mlp(rank, out, dirs):
    # The user's path: FSDP2 forward and backward of this process's half of the batch, the grads averaged by
    # reduce-scatter. The reference takes the same two halves one after the other and averages their grads:
    # the same sums in the same order, so the first step's grads are bitwise equal and only the optimizer
    # differs. From then on the params' last-bit differences feed back into the grads: at lr=1e-2 they grow
    # to about 1e-6 in 20 steps, at lr=1e-3 (closer to CAME's usual 2e-4) they stay near 2e-7.
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = copy.deepcopy(ref)
    fully_shard(model[0])
    fully_shard(model)
    kw = dict(KW, lr=1e-3)
    o1, o2 = came_kernels.CAME(ref.parameters(), **kw), came_kernels.CAME(model.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        x, y = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 3, generator=gen)
        for half in range(WORLD):
            torch.nn.functional.mse_loss(ref(x[half]), y[half]).backward()
        for p in ref.parameters():
            p.grad.div_(WORLD)
        torch.nn.functional.mse_loss(model(x[rank]), y[rank]).backward()
        if t == 0:
            out["first_grads_equal"] = all(torch.equal(q.grad.full_tensor(), p.grad)
                                           for p, q in zip(ref.parameters(), model.parameters()))
        o1.step()
        o2.step()
        o1.zero_grad()
        o2.zero_grad()
    out["param_err"] = _errors(_full(model.parameters()), list(ref.parameters()))


def _case_placements(rank, out, dirs):
    # Tensor-parallel style placements on a 1-D mesh and HSDP's (Replicate(), Shard(d)) on a 2-D mesh; with
    # maximize, a tensor lr and bias correction (per-tensor scalars from the step counters).
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    mesh, mesh2 = init_device_mesh("cpu", (WORLD,)), init_device_mesh("cpu", (1, WORLD))
    cases = [((37, 53), (Shard(1),), mesh), ((33, 1), (Shard(1),), mesh), ((1, 33), (Shard(1),), mesh),
             ((3, 5, 7), (Shard(1),), mesh), ((3, 5, 7), (Shard(2),), mesh), ((3, 5, 7), (Shard(0),), mesh),
             ((4, 3, 3, 3), (Shard(3),), mesh), ((4, 3, 3, 3), (Shard(1),), mesh),
             ((37, 53), (Replicate(),), mesh), ((7,), (Replicate(),), mesh), ((), (Replicate(),), mesh),
             ((37, 53), (Replicate(), Shard(0)), mesh2), ((5, 6), (Replicate(), Shard(1)), mesh2),
             ((9,), (Replicate(), Shard(0)), mesh2)]
    shapes = [s for s, _, _ in cases]
    kw = dict(maximize=True, lr=torch.tensor(1e-2), bias_correction=True)
    ref, ref_opt = _reference(shapes, STEPS, **kw)
    init = _Holder(shapes)
    params = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), m, pl, src_data_rank=None))
              for p, (_, pl, m) in zip(init.parameters(), cases)]
    opt = came_kernels.CAME(params, **(KW | kw))
    _train(params, opt, shapes, 0, STEPS)
    out["names"] = [f"{s} {pl} mesh {tuple(m.shape)}" for s, pl, m in cases]
    out["param_err"] = _errors(_full(params), list(ref.parameters()))
    # The states too: r and R only matter relative to their mean, so a wrong scale would not show in the params.
    out["state_err"] = [max(_rel(v.full_tensor(), ref_opt.state[p][k]) for k, v in opt.state[q].items() if k != "step")
                        for p, q in zip(ref.parameters(), params)]


def _case_errors(rank, out, dirs):
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
    mesh, mesh2 = init_device_mesh("cpu", (WORLD,)), init_device_mesh("cpu", (1, WORLD))

    def message(fn):
        try:
            fn()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    def param(shape, pl, m=mesh):
        return torch.nn.Parameter(distribute_tensor(torch.ones(shape), m, pl, src_data_rank=None))

    out["two_shard_dims"] = message(lambda: came_kernels.CAME([param((4, 6), (Shard(0), Shard(1)), mesh2)], lr=1))
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(3, 4), mesh, (Partial(),), run_check=False))
    out["partial"] = message(lambda: came_kernels.CAME([partial], lr=1))
    out["triton"] = message(lambda: came_kernels.CAME([param((4, 6), (Shard(0),))], lr=1, backend="triton"))
    out["fused"] = message(lambda: came_kernels.CAME([param((4, 6), (Shard(0),))], lr=1, fused=True))
    out["capturable"] = message(lambda: came_kernels.CAME([param((4, 6), (Shard(0),))], lr=1, capturable=True))
    out["factor_conv"] = message(lambda: came_kernels.CAME([param((4, 3, 3), (Shard(0),))], lr=1, factor_conv=True))
    out["factor_conv_2d"] = message(lambda: came_kernels.CAME([param((4, 6), (Shard(0),))], lr=1, factor_conv=True))

    # Bad grads are refused before anything changes (params, state, step counters).
    p = param((4, 6), (Shard(0),))
    opt = came_kernels.CAME([p], lr=1e-2)
    _set_grads([p], [torch.ones(4, 6)])
    opt.step()
    before = (p.to_local().clone(), {k: v.to_local().clone() if k != "step" else v.clone()
                                     for k, v in opt.state[p].items()})
    p.grad = distribute_tensor(torch.ones(4, 6), mesh, (Replicate(),), src_data_rank=None)
    out["grad_placement"] = message(opt.step)
    p.grad = torch.ones(4, 6)
    out["plain_grad"] = message(opt.step)
    opt.state[p]["exp_avg_sq_col"] = opt.state[p]["exp_avg_sq_col"].full_tensor()  # a plain state
    p.grad = distribute_tensor(torch.ones(4, 6), mesh, (Shard(0),), src_data_rank=None)
    out["plain_state"] = message(opt.step)
    after = (p.to_local(), {k: v.to_local() if came_kernels.distributed.is_dtensor(v) else v
                            for k, v in opt.state[p].items()})
    # A checkpoint whose DTensor state lives on another mesh is refused by load_state_dict, naming it.
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = distribute_tensor(torch.zeros(4, 6), mesh2, (Replicate(), Shard(0)),
                                                  src_data_rank=None)
    out["other_mesh"] = message(lambda: opt.load_state_dict(sd))
    out["untouched"] = torch.equal(before[0], after[0]) and all(
        torch.equal(before[1][k], after[1][k]) for k in before[1])


def _case_dcp(rank, out, dirs):
    # Save at step 5, go on to 10; a fresh model and optimizer loaded from the checkpoint must reach the very
    # same numbers. The checkpoint is also loaded by one process (2 -> 1) in the test below.
    from torch.distributed.fsdp import fully_shard
    model = _Holder(DCP_SHAPES)
    fully_shard(model)
    opt = came_kernels.CAME(model.parameters(), **KW)
    params = list(model.parameters())
    _train(params, opt, DCP_SHAPES, 0, 5)
    _save(model, opt, dirs["two"])
    _train(params, opt, DCP_SHAPES, 5, 10)
    other = _Holder(DCP_SHAPES, seed=9)
    fully_shard(other)
    opt2 = came_kernels.CAME(other.parameters(), **KW)
    _load(other, opt2, dirs["two"])
    _train(list(other.parameters()), opt2, DCP_SHAPES, 5, 10)
    out["bitwise"] = all(torch.equal(a, b) for a, b in zip(_full(params), _full(other.parameters())))
    out["state_types"] = sorted({type(v).__name__ for st in opt2.state.values() for k, v in st.items()
                                 if k != "step"})


def _case_dcp_from_one_process(rank, out, dirs):
    # 1 -> 2: a checkpoint saved by one process without FSDP, loaded into FSDP2 on two.
    from torch.distributed.fsdp import fully_shard
    ref, _ = _reference(DCP_SHAPES, 10)
    model = _Holder(DCP_SHAPES, seed=9)
    fully_shard(model)
    opt = came_kernels.CAME(model.parameters(), **KW)
    _load(model, opt, dirs["one"])
    _train(list(model.parameters()), opt, DCP_SHAPES, 5, 10)
    out["param_err"] = _errors(_full(model.parameters()), list(ref.parameters()))


def _case_full_state_dict(rank, out, dirs):
    # CAME.load_state_dict of an ordinary (plain tensor) state dict into FSDP2: each process takes its piece.
    from torch.distributed.fsdp import fully_shard
    ref, ref_opt = _reference(DCP_SHAPES, 5)
    model = _Holder(DCP_SHAPES, seed=9)
    fully_shard(model)
    set_model_state_dict(model, ref.state_dict(), options=StateDictOptions(full_state_dict=True))
    opt = came_kernels.CAME(model.parameters(), **KW)
    opt.load_state_dict(ref_opt.state_dict())
    _train(list(ref.parameters()), ref_opt, DCP_SHAPES, 5, 10)
    _train(list(model.parameters()), opt, DCP_SHAPES, 5, 10)
    out["param_err"] = _errors(_full(model.parameters()), list(ref.parameters()))
    # And back: the DTensor state dict into an optimizer of plain params gathers each state whole.
    plain = _Holder(DCP_SHAPES, seed=9)
    plain_opt = came_kernels.CAME(plain.parameters(), **KW)
    plain_opt.load_state_dict(opt.state_dict())
    out["gathered_state_err"] = max(
        _rel(plain_opt.state[q][k], v.full_tensor()) for p, q in zip(model.parameters(), plain.parameters())
        for k, v in opt.state[p].items() if k != "step")
    out["gathered_types"] = sorted({type(v).__name__ for st in plain_opt.state.values() for v in st.values()})


def _case_grad_scaler(rank, out, dirs):
    # GradScaler's contract (see CAME.step): grads scaled by 4 with grad_scale=4 step as the plain grads do,
    # and a step with found_inf set (on any process) changes nothing, step counters included.
    from torch.distributed.fsdp import fully_shard
    shapes = [(37, 53), (7,)]
    models = [_Holder(shapes), _Holder(shapes)]
    opts = []
    for m in models:
        fully_shard(m)
        opts.append(came_kernels.CAME(m.parameters(), **KW))
    for t in range(3):
        grads = _grads(shapes, t)
        _set_grads(list(models[0].parameters()), grads)
        _set_grads(list(models[1].parameters()), [g * 4 for g in grads])
        opts[1].grad_scale, opts[1].found_inf = torch.tensor([4.0]), torch.tensor([0.0])
        opts[0].step()
        opts[1].step()
    out["scaled_equal"] = all(torch.equal(a, b) for a, b in zip(*map(_full, (m.parameters() for m in models))))
    before = [p.full_tensor() for p in models[1].parameters()]
    steps = [float(st["step"]) for st in opts[1].state.values()]
    # torch.amp.GradScaler sees only this process's grads: an inf on one process must skip the step on all.
    _set_grads(list(models[1].parameters()), _grads(shapes, 3))
    opts[1].found_inf = torch.tensor([1.0 if rank == 0 else 0.0])
    opts[1].step()
    out["skipped"] = all(torch.equal(a, b.full_tensor()) for a, b in zip(before, models[1].parameters())) and \
        steps == [float(st["step"]) for st in opts[1].state.values()]


def _case_fsdp1(rank, out, dirs):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = FSDP(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), device_id=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = came_kernels.CAME(model.parameters(), lr=1e-2)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught if "CAME" in str(w.message)]
    out["shapes"] = [tuple(p.shape) for p in model.parameters()]


CASES = [_case_fsdp2_shapes, _case_broken_all_reduce, _case_fsdp2_mlp, _case_placements, _case_errors, _case_dcp,
         _case_dcp_from_one_process, _case_full_state_dict, _case_grad_scaler, _case_fsdp1]


def _worker(rank, init_file, dirs, outdir):
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a mismatched collective fails, not hangs
    results = {}
    try:
        for case in CASES:
            out = results[case.__name__] = {}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # DCP's and FSDP's notices; _case_fsdp1 records its own
                    case(rank, out, dirs)
            except Exception:
                out["exception"] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run every case on WORLD processes; {case name: outcome} of rank 0 (rank 1's must agree)."""
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp("dist")
    dirs = {"one": str(tmp / "ckpt_one"), "two": str(tmp / "ckpt_two")}
    # The checkpoint for 1 -> 2: one process, no process group, no FSDP, saved at step 5.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _Holder(DCP_SHAPES)
        opt = came_kernels.CAME(model.parameters(), **KW)
        _train(list(model.parameters()), opt, DCP_SHAPES, 0, 5)
        _save(model, opt, dirs["one"])
    ctx = mp.spawn(_worker, args=(str(tmp / "init"), dirs, str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    # join() returns True once all have exited, False when one exits or the time is up; raises if one failed.
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within 240 s")
    ranks = [json.load(open(tmp / f"rank{r}.json")) for r in range(WORLD)]
    return dict(ranks[0], _ranks=ranks, _dirs=dirs)


def _outcome(world, name):
    out = world[name]
    for r, other in enumerate(world["_ranks"]):
        assert "exception" not in other[name], f"rank {r}:\n{other[name]['exception']}"
    return out


# ---------------------------------------------------------------------- the tests
def test_fsdp2_matches_single_process_for_every_shape_class(world):
    out = _outcome(world, "_case_fsdp2_shapes")
    for shape, err, serr in zip(FSDP_SHAPES, out["param_err"], out["state_err"]):
        assert err <= TOL, f"param {shape}: relative error {err:.2e} after {STEPS} steps"
        assert serr <= 1e-5, f"state of {shape}: relative error {serr:.2e}"
    assert out["steps"] == [float(STEPS)] * len(FSDP_SHAPES)
    assert not out["replicas_differ"], out["replicas_differ"]
    by_shape = dict(zip(FSDP_SHAPES, out["placements"]))
    assert by_shape[(37, 53)] == {"exp_avg": ["Shard(dim=0)"], "exp_avg_sq_row": ["Shard(dim=0)"],
                                  "exp_avg_sq_col": ["Replicate()"], "exp_avg_res_row": ["Shard(dim=0)"],
                                  "exp_avg_res_col": ["Replicate()"]}
    assert set(map(tuple, by_shape[(3, 5, 7)].values())) == {("Shard(dim=0)",)}  # the batch dim: all local
    assert by_shape[(7,)] == {"exp_avg": ["Shard(dim=0)"], "exp_avg_sq": ["Shard(dim=0)"]}


def test_the_parity_check_catches_a_missing_all_reduce(world):
    # The test above must be able to fail: one step without the cross-process sums is far off.
    out = _outcome(world, "_case_broken_all_reduce")
    assert min(out["param_err"]) > 100 * TOL, out["param_err"]


def test_fsdp2_model_on_a_split_batch_matches_one_process_on_the_whole_batch(world):
    out = _outcome(world, "_case_fsdp2_mlp")
    assert out["first_grads_equal"]
    assert max(out["param_err"]) <= TOL, out["param_err"]


def test_column_row_batch_replicate_and_hsdp_placements_are_exact(world):
    out = _outcome(world, "_case_placements")
    for name, err, serr in zip(out["names"], out["param_err"], out["state_err"]):
        assert err <= TOL, f"{name}: relative error {err:.2e} after {STEPS} steps"
        assert serr <= 1e-5, f"state of {name}: relative error {serr:.2e}"


def test_unsupported_placements_and_fused_backends_are_refused_by_name(world):
    out = _outcome(world, "_case_errors")
    assert out["two_shard_dims"].startswith("ValueError") and "param of shape (4, 6)" in out["two_shard_dims"] \
        and "more than one mesh dim" in out["two_shard_dims"], out["two_shard_dims"]
    assert out["partial"].startswith("ValueError") and "placement Partial(sum) in" in out["partial"], out["partial"]
    for key in ("triton", "fused"):
        assert out[key].startswith("BackendUnavailableError") and "DTensor" in out[key], out[key]
    for key in ("capturable", "factor_conv"):
        assert out[key].startswith("ValueError") and f"{key}=True" in out[key] and "DTensor" in out[key], out[key]
    assert out["factor_conv_2d"] == "no error"


def test_bad_grads_and_states_are_refused_before_anything_changes(world):
    out = _outcome(world, "_case_errors")
    assert out["grad_placement"].startswith("RuntimeError") and "Replicate()" in out["grad_placement"] \
        and "param of shape (4, 6)" in out["grad_placement"], out["grad_placement"]
    assert out["plain_grad"].startswith("RuntimeError") and "plain" in out["plain_grad"], out["plain_grad"]
    assert out["plain_state"].startswith("RuntimeError") and "exp_avg_sq_col" in out["plain_state"], \
        out["plain_state"]
    assert out["untouched"]
    assert out["other_mesh"].startswith("ValueError") and "'exp_avg'" in out["other_mesh"] \
        and "mesh" in out["other_mesh"], out["other_mesh"]


def test_dcp_save_load_continues_identically(world):
    out = _outcome(world, "_case_dcp")
    assert out["bitwise"]
    assert out["state_types"] == ["DTensor"]


def test_dcp_checkpoint_of_one_process_loads_into_two(world):
    out = _outcome(world, "_case_dcp_from_one_process")
    assert max(out["param_err"]) <= TOL, out["param_err"]


def test_dcp_checkpoint_of_two_processes_loads_into_one(world):
    _outcome(world, "_case_dcp")  # it wrote the checkpoint
    ref, _ = _reference(DCP_SHAPES, 10)
    model = _Holder(DCP_SHAPES, seed=9)
    opt = came_kernels.CAME(model.parameters(), **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... uninitialized, assuming ... a single process"
        _load(model, opt, world["_dirs"]["two"])
    assert all(type(v) is torch.Tensor for st in opt.state.values() for v in st.values())
    _train(list(model.parameters()), opt, DCP_SHAPES, 5, 10)
    assert max(_errors(_full(model.parameters()), list(ref.parameters()))) <= TOL


def test_plain_state_dict_loads_into_fsdp2_and_back(world):
    out = _outcome(world, "_case_full_state_dict")
    assert max(out["param_err"]) <= TOL, out["param_err"]
    assert out["gathered_state_err"] == 0.0 and out["gathered_types"] == ["Tensor"]


def test_grad_scaler_unscales_and_skips(world):
    out = _outcome(world, "_case_grad_scaler")
    assert out["scaled_equal"] and out["skipped"]


def test_fsdp1_flat_parameters_warn_once(world):
    out = _outcome(world, "_case_fsdp1")
    assert all(len(s) == 1 for s in out["shapes"])  # what CAME sees under FSDP1: 1-D shards
    assert len(out["warnings"]) == 1, out["warnings"]
    assert out["warnings"][0].startswith("UserWarning") and "fully_shard" in out["warnings"][0]


@pytest.mark.parametrize("marker", ["_is_flat_param", "_fsdp_flattened"])  # FlatParameter, use_orig_params
def test_flat_parameter_marker_warns_once_without_a_process_group(marker):
    p = torch.nn.Parameter(torch.ones(6))
    setattr(p, marker, True)
    with pytest.warns(UserWarning, match="FSDP1 flat parameters") as caught:
        opt = came_kernels.CAME([p], lr=1e-2)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert len([w for w in caught if "FSDP1" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        came_kernels.CAME([torch.nn.Parameter(torch.ones(2, 3))], lr=1e-2)  # no warning for plain params
