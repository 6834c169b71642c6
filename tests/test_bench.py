"""The benchmark tool's plumbing at tiny sizes: rows, units, JSON. No timing is asserted (bench/ measures it)."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import converge, memory, shapes, step, study, utils  # noqa: E402


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_args(p)
    return p.parse_args(argv)


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_shape_sets_have_the_published_parameter_counts():
    assert shapes.numel(shapes.shape_set("gpt2")) == 124_439_808
    assert shapes.numel(shapes.shape_set("tinyllama")) == 1_100_048_384
    assert shapes.numel(shapes.shape_set("resnet50")) == 25_557_032
    # Scaling shrinks widths but keeps the structure (same number of tensors, same ranks).
    for name in shapes.SETS:
        full, small = shapes.shape_set(name), shapes.shape_set(name, 16)
        assert [len(s) for s in full] == [len(s) for s in small]
        assert shapes.numel(small) < shapes.numel(full) / 50


@pytest.fixture(scope="module")
def step_payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("step")
    args = _args(step, ["--sets", "gpt2,resnet50", "--scale", "64", "--dtype", "fp32,bf16", "--device", "cpu",
                        "--warmup", "1", "--iters", "3", "--max-seconds", "0.2", "--out", str(out)])
    payload = step.run(args)
    return payload, out


def test_step_bench_has_a_sane_row_for_every_optimizer(step_payload):
    payload, out = step_payload
    specs, skipped = utils.optimizer_specs(torch.device("cpu"))
    names = {s.name for s in specs}
    assert {"adamw[fused]", "adamw[foreach]", "adafactor", "came[torch]"} <= names
    assert "came[cuda]" in skipped and "adamw8bit[bnb]" in skipped  # with the reason, not silently
    for set_name in ("gpt2", "resnet50"):
        for dtype in ("fp32", "bf16"):
            rows = {r["optimizer"]: r for r in payload["rows"] if (r["set"], r["dtype"]) == (set_name, dtype)}
            assert set(rows) == names
            for r in rows.values():
                assert "error" not in r, r
                assert _finite(r["ms"]) and r["ms"] > 0
                assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["timed_steps"] >= 3  # the spread is shown
                assert _finite(r["x_adamw"]) and r["x_adamw"] > 0
                assert _finite(r["state_bytes_per_param"]) and r["state_bytes_per_param"] > 0
                assert r["peak_transient_bytes"] is None or r["peak_transient_bytes"] >= 0
            assert rows["adamw[fused]"]["x_adamw"] == 1.0
    # One table string with every optimizer in it.
    text = step.table(payload)
    assert all(n in text for n in names)


def test_step_bench_state_bytes_per_param_from_real_tensors(step_payload):
    payload, _ = step_payload
    row = {(r["set"], r["dtype"], r["optimizer"]): r for r in payload["rows"]}
    # AdamW fp32: exp_avg + exp_avg_sq = 8 B/param, plus a 4-byte `step` scalar per tensor.
    r = row[("gpt2", "fp32", "adamw[fused]")]
    assert r["state_bytes_per_param"] == pytest.approx(8 + 4 * r["tensors"] / r["numel"], rel=1e-6)
    # CAME on a set of matrices keeps one full-size momentum plus row/col statistics: well under AdamW.
    came = row[("gpt2", "fp32", "came[torch]")]["state_bytes_per_param"]
    assert 4 <= came < 0.75 * r["state_bytes_per_param"]
    # bf16 params: CAME's momentum and statistics stay fp32.
    assert set(row[("gpt2", "bf16", "came[torch]")]["state_dtypes"].values()) == {"float32"}


def test_step_bench_writes_json_and_png(step_payload):
    payload, out = step_payload
    with open(out / "step.json") as f:
        saved = json.load(f)
    assert saved["benchmark"] == "step" and len(saved["rows"]) == len(payload["rows"])
    assert saved["env"]["commit"] and saved["methods"]["peak_transient"]
    pytest.importorskip("matplotlib")
    assert (out / "step.png").stat().st_size > 1000


def test_converge_runs_a_few_steps_with_finite_losses(tmp_path):
    args = _args(converge, ["--size", "tiny", "--steps", "3", "--corpus-mb", "0.3", "--device", "cpu",
                            "--out", str(tmp_path), "--no-plot"])
    payload = converge.run(args)
    assert set(payload["runs"]) == {"AdamW", "Adafactor", "CAME[auto]"}
    for r in payload["runs"].values():
        assert len(r["train_loss"]) == 3 and all(math.isfinite(x) for x in r["train_loss"])
        assert r["val_loss"] and all(math.isfinite(x) for x in r["val_loss"])
    assert payload["corpus"]["train_files"] > 0 and payload["corpus"]["val_files"] > 0
    with open(tmp_path / "converge.json") as f:
        assert json.load(f)["runs"]["AdamW"]["val_loss"] == payload["runs"]["AdamW"]["val_loss"]


def test_converge_starts_every_optimizer_from_the_same_weights_and_batches(tmp_path):
    # Same seed, same init, same first batch: the loss before the first update is identical.
    args = _args(converge, ["--size", "tiny", "--steps", "1", "--corpus-mb", "0.3", "--device", "cpu",
                            "--out", str(tmp_path), "--no-plot"])
    first = [r["train_loss"][0] for r in converge.run(args)["runs"].values()]
    assert first[0] == first[1] == first[2]


def test_study_runs_low_precision_labels_at_the_lr_of_their_sweep_and_bf16_models_in_bf16(tmp_path, monkeypatch):
    # The study's bookkeeping with training stubbed: CAME's sweep picks 2.5e-4; the labels that follow it run
    # there (no sweep of their own), with the model dtype of the label; a follower without its lead is refused.
    calls = []

    def fake(label, make_opt, train, val, cfg, device, seed, model="gpt", param_dtype=None):
        lr = float(label.split()[-1])
        calls.append((label.rsplit(" ", 1)[0], lr, param_dtype))
        loss = 1.0 + abs(math.log(lr / 2.5e-4))
        return dict(val_step=[cfg["steps"]], val_loss=[loss], final_val_loss=loss, best_val_loss=loss, wall_s=0.0,
                    optimizer_s=0.0, state_bytes=4, params=1)
    monkeypatch.setattr(converge, "train_one", fake)
    monkeypatch.setattr(converge, "stdlib_corpus", lambda mb: (None, None, {}))
    args = _args(study, ["--horizons", "5", "--seeds", "0", "--device", "cpu", "--out", str(tmp_path), "--no-plot",
                         "--optims", "CAME,CAME[int8 m],CAME[bf16 p SR]"])
    payload = study.run(args)
    assert payload["best_lr"] == {"CAME": 2.5e-4, "CAME[int8 m]": 2.5e-4, "CAME[bf16 p SR]": 2.5e-4}
    assert {lr for name, lr, _ in calls if name != "CAME"} == {2.5e-4}
    assert {name: dt for name, _, dt in calls} == {"CAME": None, "CAME[int8 m]": None,
                                                   "CAME[bf16 p SR]": torch.bfloat16}
    with pytest.raises(ValueError, match="add it"):
        study.run(_args(study, ["--horizons", "5", "--device", "cpu", "--out", str(tmp_path), "--no-plot",
                                "--optims", "CAME[int8 m]"]))


def test_study_refine_extends_the_fine_grid_while_its_best_is_at_an_end():
    calls = []
    loss = lambda lr: calls.append(lr) or (lr - 5e-3) ** 2  # noqa: E731  best at 5e-3
    got = study.refine_lr(loss, 2e-3, [0.7, 1.4], max_extensions=2)
    assert sorted(got) == [0.0014, 0.002, 0.0028, 0.00392, 0.00549]  # two extensions up, then the cap
    assert len(calls) == len(got)
    got = study.refine_lr(lambda lr: (lr - 2e-3) ** 2, 2e-3, [0.7, 1.4])
    assert sorted(got) == [0.0014, 0.002, 0.0028]  # best in the middle: no extension


def test_study_refine_picks_the_lr_by_the_mean_over_seeds(tmp_path):
    args = _args(study, ["--size", "tiny", "--corpus-mb", "0.3", "--device", "cpu", "--out", str(tmp_path),
                         "--no-plot", "--optims", "AdamW,CAME+bc[b3=0.999]", "--horizons", "3", "--seeds", "0,1",
                         "--refine", "0.5"])
    payload = study.run(args)
    for label, fine in payload["refine"].items():
        assert len(fine) >= 2
        best = min(fine, key=fine.get)
        assert payload["best_lr"][label] == float(best)
        runs = payload["final"]["3"][label]
        assert len(runs) == 2 and fine[best] == pytest.approx(sum(r["best_val_loss"] for r in runs) / 2)
    assert "fine grid" in study.table(payload)


def test_memory_table_from_real_allocations(tmp_path):
    args = _args(memory, ["--sets", "gpt2", "--scale", "32", "--device", "cpu", "--out", str(tmp_path),
                          "--no-plot"])
    rows = {r["optimizer"]: r for r in memory.run(args)["rows"]}
    assert rows["AdamW"]["bytes_per_param"] == pytest.approx(8, abs=0.05)
    assert rows["CAME"]["bytes_per_param"] < 0.75 * rows["AdamW"]["bytes_per_param"]
    # At 1/32 width most tensors are under LOWBIT_MIN_NUMEL and keep an fp32 momentum: smaller, not halved.
    assert rows["CAME, int8 momentum"]["bytes_per_param"] < rows["CAME, bf16 momentum"]["bytes_per_param"] \
        < rows["CAME"]["bytes_per_param"]
    assert (tmp_path / "memory.json").exists()


def test_cli_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    for sub in ("step", "converge", "memory", "all"):
        assert sub in out


def test_gpu_check_script_parses_and_its_optimizer_list_resolves():
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    lists = [chunk.split("'", 1)[0].split(",") for chunk in text.split("--optim '")[1:]]
    assert len(lists) == 4  # the main step benchmark, ResNet-50, the low-precision momentum (steps, phases)
    for optim in lists:  # every name resolves (an unknown one raises)
        specs, skipped = utils.optimizer_specs(torch.device("cpu"), select=optim)
        assert {s.name for s in specs} | set(skipped) == set(optim)
    specs, skipped = utils.optimizer_specs(torch.device("cpu"), select=lists[0])
    assert {s.name for s in specs} | set(skipped) >= {"came[cuda]", "came[triton]", "adamw[fused]", "adafactor"}
    assert "adamw[foreach]" not in {s.name for s in specs}  # brackets are literal, not a character class
    names = {s.name for s in utils.optimizer_specs(torch.device("cpu"), select=["came*"])[0]}
    assert "came[torch]" in names and all(n.startswith("came") for n in names)


def test_a_busy_machine_or_a_wide_spread_is_flagged():
    rows = [{"set": "gpt2", "dtype": "fp32", "optimizer": "x", "ms": 1.0, "ms_max": 5.0, "timed_steps": 5}]
    assert any("busy" in w for w in step._busy_reasons([], torch.device("cpu"), 1.5, 0.2))
    assert any("twice the median" in w for w in step._busy_reasons(rows, torch.device("cpu"), 0.1, 0.1))
    assert step._busy_reasons([dict(rows[0], ms_max=1.2)], torch.device("cpu"), 0.1, 0.1) == []


def test_host_bench_stubs_the_device_work_and_reports_every_optimizer(tmp_path):
    from bench import host
    payload = host.run(_args(host, ["--sets", "gpt2", "--iters", "3", "--warmup", "1", "--out", str(tmp_path)]))
    rows = {r["optimizer"]: r for r in payload["rows"]}
    came = {"came[torch]", "came[triton]"}
    py = {n + ", py checks" for n in came} if payload["checks"] == "cpp" else set()  # the Python fallback too
    assert set(rows) == {"adamw[fused]"} | came | py
    for r in rows.values():
        assert "error" not in r, r
        assert 0 < r["us_min"] <= r["us_median"] <= r["us_max"]


def test_a_bad_option_value_is_one_line_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "bench", "step", "--sets", "foo"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown shape set 'foo'" in out.stderr and "Traceback" not in out.stderr


def test_triton_sweep_drives_every_phase_launcher(monkeypatch):
    # The sweep times the package's own phase launchers; run it at tiny shapes (the Triton interpreter on a
    # CPU) with a timer that only calls, so that a launcher signature change fails here and not on a GPU.
    from came_kernels.backends import triton_backend
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    why = triton_backend.unavailable_reason(torch.device(dev))
    if why is not None:
        pytest.skip(why)
    from bench import triton_sweep
    calls = []
    out, plan = triton_sweep.sweep_one([(5, 7), (3, 4, 6), (9,)], torch.float32, 1, 1000.0, device=dev,
                                       timer=lambda fn, reps: (calls.append(fn()), 2.0)[1])
    assert set(out) == {"sq_stats", "clip_stats", "momentum_res", "param_step"} and len(calls) == 4
    assert all(v.strip().startswith("2") for v in out.values()), out
    assert plan.n_blocks > 0


def test_low_precision_momentum_rows_only_when_named():
    from bench import utils as u
    default, _ = u.optimizer_specs(torch.device("cpu"))
    assert not any("bf16m" in s.name or "int8m" in s.name for s in default)
    specs, _ = u.optimizer_specs(torch.device("cpu"), select=["came-bf16m[torch]", "came-int8m[torch]"])
    assert [s.name for s in specs] == ["came-bf16m[torch]", "came-int8m[torch]"]
    p = torch.nn.Parameter(torch.randn(300, 64))  # (small tensors keep an fp32 momentum)
    opt = specs[1].make([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg_q"].dtype == torch.int8


def test_phase_bytes_count_the_momentum_as_stored():
    # fp32, bf16 (exp_avg) and int8 codes (exp_avg_q): 4, 2 and 1 B per element read and written in phase 3,
    # read in phase 4, with bf16 params and grads.
    from bench import phases
    got = {}
    for name in ("came[torch]", "came-bf16m[torch]", "came-int8m[torch]"):
        (spec,), _ = utils.optimizer_specs(torch.device("cpu"), select=[name])
        p = torch.nn.Parameter(torch.randn(300, 64, dtype=torch.bfloat16))
        opt = spec.make([p])
        p.grad = torch.randn_like(p)
        opt.step()
        got[name] = phases.phase_bytes([p], opt)
    n = 300 * 64
    assert [got[k]["momentum_res"] for k in got] == [n * (2 + 8), n * (2 + 4), n * (2 + 2)]
    assert [got[k]["param_step"] for k in got] == [n * (4 + 4), n * (2 + 4), n * (1 + 4)]


def test_phase_table_compares_with_a_reference_from_the_same_device_only(tmp_path):
    from bench import phases

    def payload(device, commit, us):
        rows = [dict(set="gpt2", dtype="bf16", optimizer="came[cuda]", phase="sq_stats", us=us, launches=2,
                     bytes=250_000_000, gbs=1.0, pct_copy=1.0)]
        return {"env": {"device": device, "commit": commit}, "copy_bandwidth_gbs": 4000.0, "steps": 5, "rows": rows}

    ref = payload("NVIDIA H200", "aaaaaaa", 200.0)
    same = phases.table(payload("NVIDIA H200", "bbbbbbb", 150.0), ref)
    assert "us at aaaaaaa" in same and "-25%" in same
    other = phases.table(payload("NVIDIA H100 80GB HBM3", "bbbbbbb", 150.0), ref)
    assert "us at aaaaaaa" not in other and "not compared with commit aaaaaaa" in other
    # the script's path: a saved phases.json shown against the committed reference, no GPU needed
    saved = tmp_path / "phases.json"
    saved.write_text(json.dumps(payload("NVIDIA H200", "bbbbbbb", 100.0)))
    refs = sorted(os.listdir(os.path.join(REPO, "bench", "reference")))
    assert "phases_h200_6a8d8cc.json" in refs
    out = subprocess.run([sys.executable, "-m", "bench", "phases", "--show", str(saved), "--compare",
                          os.path.join(REPO, "bench", "reference", "phases_h200_6a8d8cc.json")], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "us at 6a8d8cc" in out and "-54%" in out  # 217.3 us for GPT-2 bf16 sq_stats (cuda) then
