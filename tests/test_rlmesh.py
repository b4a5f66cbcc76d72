"""Tests of rlmesh.py: solver convergence orders against analytic / manufactured solutions, mesh invariants,
interpolation, the proxy reward against a full kernel-ridge refit, the policy update; whole arms against a plain
reference written here (loops: dense FV / Rusanov solves, kernel ridge, errors, costs); hand cost totals of every
arm; every arm-defining flag changes its arm; bad input refused before any write; the output-dir / resume policy;
kill -9 + --resume (slow); torchrun == one process (slow); a smoke run.

Breakages these tests were seen to catch (each line broken in a copy of rlmesh.py, the tests run, and they
failed; the test that caught it in brackets):
- references with midpoint instead of harmonic faces, or on a grid of half the nodes [darcy plain reference];
- an arm's total cost without its policy-training solves, without its validation references (rl; monitor), or
  without the oracle pool's references (rl_oracle) [darcy plain reference: hand totals];
- the monitor keeping the worst beta instead of the best [darcy plain reference: argmin of recomputed errors];
- label error measured on the validation inputs instead of the test inputs [darcy plain reference];
- warm-up queries of the rl arms not on the uniform N-node mesh [darcy plain reference: rl totals];
- uniform_hi ignoring --hi_factor [darcy plain reference; flag test];
- Burgers reference batches (sorted by step count) written back to the wrong rows, and Burgers cost counted as
  nodes x steps instead of cells x steps [burgers plain solver];
- the monitor's pilot solves charged all up front instead of per query, and uniform_cost matched on the
  validation inputs instead of the query inputs [burgers uniform_cost / monitor];
- online RL charging the kept candidate as extra too, or not charging the oracle's per-query reference [online];
- --ppo_clip, --krr_lambda, --sigma (rollout noise), --cost_weight read nowhere [flag test];
- rows logged after the checkpoint kept on resume; --resume accepted without a checkpoint [output-dir test].
Not caught (by design): the surrogate's training seed no longer depending on the checkpoint size (kernel ridge,
the default surrogate used here, has no seed).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rlmesh as R  # noqa: E402
from conftest import run_cli  # noqa: E402

torch.set_num_threads(1)


def _mapped(n_nodes):  # smooth non-uniform mesh x = xi - 0.15 sin(2 pi xi) / pi
    xi = np.linspace(0, 1, n_nodes)
    return xi - 0.15 * np.sin(2 * np.pi * xi) / np.pi


def _order(errs):
    return np.log2(np.asarray(errs[:-1]) / np.asarray(errs[1:]))


# ---- Eq. (4): meshes ----------------------------------------------------------------------------


def _check_mesh(nodes, gap):
    assert nodes[..., 0].tolist() == np.zeros(nodes.shape[:-1]).tolist()
    assert nodes[..., -1].tolist() == np.ones(nodes.shape[:-1]).tolist()
    h = np.diff(nodes, axis=-1)
    assert (h > 0).all()
    assert h.min() >= gap - 1e-12


@pytest.mark.parametrize("gap_frac", [0.0, 0.1, 0.5])
def test_mesh_invariants_on_hard_densities(gap_frac):
    M, N = 257, 33
    gap = gap_frac / (N - 1)
    x = np.linspace(0, 1, M)
    rng = np.random.default_rng(0)
    spiky = np.full(M, 1e-3)
    spiky[[10, 11, 200]] = 1e4
    wide = 10.0 ** rng.uniform(-8, 8, M)
    mostly_zero = np.zeros(M)
    mostly_zero[100:104] = 1.0
    for rho in (np.ones(M), np.where(x < 0.5, 3.0, 1.0), spiky, wide, mostly_zero):
        if gap == 0 and rho is mostly_zero:
            continue  # zero density with no gap legitimately stacks nodes
        _check_mesh(R.mesh_from_density(rho, N, gap), gap)
    batch = R.mesh_from_density(np.stack([spiky, wide, np.ones(M)]), N, gap)  # (B, M) -> (B, N)
    assert batch.shape == (3, N)
    _check_mesh(batch, gap)


def test_uniform_density_gives_linspace_and_step_density_puts_three_quarters_left():
    for gap in (0.0, 0.1 / 32):
        np.testing.assert_allclose(R.mesh_from_density(np.full(257, 2.5), 33, gap), np.linspace(0, 1, 33), atol=1e-12)
    N, M = 41, 257
    x = np.linspace(0, 1, M)
    nodes = R.mesh_from_density(np.where(x < 0.5, 3.0, 1.0), N, 0.0)
    # 3/4 of the mass sits on [0, 0.5): node 0.75 (N-1) is at 0.5, up to the trapezoid smearing of one grid cell
    assert abs(nodes[int(0.75 * (N - 1))] - 0.5) < 1.0 / (M - 1)
    # left part: 3x denser
    h = np.diff(nodes)
    assert abs(h[2] / h[-3] - 1 / 3) < 1e-9


def test_mesh_errors():
    for bad, kw in ((np.ones(9), {"min_gap": 1 / 8}), (np.array([1.0, np.nan, 1.0]), {}), (np.zeros(9), {}),
                    (np.array([1.0, -1.0, 1.0]), {})):
        with pytest.raises(ValueError):
            R.mesh_from_density(bad, 9, **kw)


def test_zero_policy_action_gives_uniform_mesh():
    feats = np.random.default_rng(0).uniform(size=(5, 257))
    rho = R.density_from_action(np.zeros(5), feats)  # Eq. (5) with mu = 0
    np.testing.assert_allclose(R.mesh_from_density(rho, 33, 0.1 / 32), np.linspace(0, 1, 33), atol=1e-12)


# ---- interpolation --------------------------------------------------------------------------------


def test_interp_to_grid_exact_for_linear_and_periodic_constants():
    rng = np.random.default_rng(1)
    nodes = np.sort(np.concatenate([[0, 1], rng.uniform(0, 1, 20)]))
    grid = np.linspace(0, 1, 129)
    np.testing.assert_allclose(R.interp_to_grid(nodes, 3 * nodes - 1, grid), 3 * grid - 1, atol=1e-12)
    centres = np.sort(rng.uniform(0, 1, 17))
    np.testing.assert_allclose(R.interp_to_grid(centres, np.full(17, 2.5), np.arange(128) / 128, periodic=True),
                               2.5, atol=1e-12)
    # periodic linear interpolation across the wrap: midway between the last and the first centre
    c = np.array([0.1, 0.5, 0.9])
    assert abs(R.interp_to_grid(c, np.array([1.0, 0.0, 3.0]), np.array([0.0]), periodic=True)[0] - 2.0) < 1e-12


# ---- Eq. (2): Darcy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("face", ["midpoint", "harmonic"])
def test_darcy_second_order_on_mapped_meshes(face):
    a = lambda x: 1 + 0.5 * np.sin(2 * np.pi * x)  # noqa: E731
    u = lambda x: np.sin(np.pi * x)  # noqa: E731
    # f = -(a u')' for the manufactured u = sin(pi x)
    f = lambda x: -(np.pi * np.cos(2 * np.pi * x) * np.pi * np.cos(np.pi * x) - a(x) * np.pi ** 2 * np.sin(np.pi * x))  # noqa
    errs = [np.abs(R.solve_darcy_1d(a, _mapped(n), f, face) - u(_mapped(n))).max() for n in (33, 65, 129)]
    assert (_order(errs) >= 1.8).all(), errs


def test_darcy_exact_with_jump_on_a_node_harmonic():
    rng = np.random.default_rng(2)
    s = 0.37
    x = np.sort(np.concatenate([[0.0, 1.0, s], rng.uniform(0, 1, 25)]))
    a = lambda z: np.where(z < s, 1.0, 100.0)  # noqa: E731

    def closed(z, C):  # u(z) = int_0^z (C - t) / a(t) dt (flux a u' = C - t)
        z1, z2 = np.minimum(z, s), np.maximum(z - s, 0)
        return C * z1 - z1 ** 2 / 2 + (C * z2 - ((s + z2) ** 2 - s ** 2) / 2) / 100

    C = -closed(1.0, 0.0) / (closed(1.0, 1.0) - closed(1.0, 0.0))  # u(1) = 0
    np.testing.assert_allclose(R.solve_darcy_1d(a, x, 1.0, "harmonic"), closed(x, C), atol=1e-10)


def test_darcy_samples_equal_callable_and_batch_equals_loop():
    xf = np.linspace(0, 1, 4097)
    a_s = 1 + 0.5 * np.sin(2 * np.pi * xf)
    a_c = lambda x: 1 + 0.5 * np.sin(2 * np.pi * x)  # noqa: E731
    nodes = _mapped(33)
    np.testing.assert_allclose(R.solve_darcy_1d(a_s, nodes), R.solve_darcy_1d(a_c, nodes), rtol=1e-5)
    coefs = np.stack([a_s, 2 * a_s])
    batch = R.solve_darcy_1d(coefs, np.stack([nodes, np.linspace(0, 1, 33)]), face="harmonic")
    np.testing.assert_allclose(batch[1], R.solve_darcy_1d(2 * a_s, np.linspace(0, 1, 33), face="harmonic"), rtol=1e-12)
    np.testing.assert_allclose(batch[0], R.solve_darcy_1d(a_s, nodes, face="harmonic"), rtol=1e-12)


# ---- Eq. (3): Burgers ----------------------------------------------------------------------------


def _grf_u0(seed, M=4096):
    rng = np.random.default_rng(seed)
    k = np.arange(M // 2 + 1)
    c = (rng.standard_normal(k.size) + 1j * rng.standard_normal(k.size)) * 25 / ((2 * np.pi * k) ** 2 + 25)
    c[0], c[-1] = 0.3, 0
    return np.fft.irfft(c, n=M) * M / np.sqrt(2)


def test_burgers_conserves_mass_and_keeps_the_max_principle():
    u0 = _grf_u0(0)
    rng = np.random.default_rng(3)
    nodes = np.sort(np.concatenate([[0, 1], rng.uniform(0.01, 0.99, 47)]))
    dx = np.diff(nodes)
    U0 = R._cell_averages(u0, nodes[None])[0]
    U, n_steps = R.solve_burgers_1d(u0, nodes, nu=0.01, t_final=0.5)
    assert n_steps > 1
    assert abs((U * dx).sum() - (U0 * dx).sum()) < 1e-12
    assert np.abs(U).max() <= np.abs(U0).max() + 1e-12
    # cell averages of the fine samples are exact for the linear interpolant: uniform cells of the fine grid
    np.testing.assert_allclose(R._cell_averages(u0, np.linspace(0, 1, 4097)[None])[0], (u0 + np.roll(u0, -1)) / 2,
                               atol=1e-12)


def test_burgers_heat_limit_first_order_on_mapped_meshes():
    nu, T = 0.05, 0.5
    errs = []
    for n_cells in (32, 64, 128):
        x = _mapped(n_cells + 1)
        dx = np.diff(x)
        U, _ = R.solve_burgers_1d(lambda z: 1e-3 * np.sin(2 * np.pi * z), x, nu, T, dt_max=dx.min())
        exact = 1e-3 * (np.cos(2 * np.pi * x[:-1]) - np.cos(2 * np.pi * x[1:])) / (2 * np.pi * dx)
        errs.append(np.abs(U - exact * np.exp(-4 * np.pi ** 2 * nu * T)).max())
    assert (_order(errs) >= 0.8).all(), errs


def test_burgers_shock_error_falls_with_resolution_and_uniform_fft_path_matches_dense():
    u0 = lambda z: np.sin(2 * np.pi * z) + 0.5  # noqa: E731  (shock forms at t ~ 1 / (2 pi))
    nu, T = 0.01, 0.4
    ref, _ = R.solve_burgers_1d(u0, np.linspace(0, 1, 2049), nu, T)
    errs = []
    for n in (32, 64, 128):
        U, _ = R.solve_burgers_1d(u0, np.linspace(0, 1, n + 1), nu, T)
        errs.append(np.abs(U - ref.reshape(n, -1).mean(1)).mean())
    assert errs[0] > errs[1] > errs[2], errs
    # the rfft-diagonalised implicit step (uniform cells) equals the dense one
    x = np.linspace(0, 1, 65)[None]
    U0 = R._cell_averages(u0, x)
    dx = np.diff(x, axis=1)
    ns = R._burgers_steps(U0, dx, T, 0.5, np.inf)
    np.testing.assert_allclose(R._burgers_run(U0, dx, nu, T, ns, uniform=True),
                               R._burgers_run(U0, dx, nu, T, ns, uniform=False), atol=1e-10)


def test_burgers_steps_grow_as_min_gap_shrinks():
    rho = np.full(257, 1e-3)
    rho[120:124] = 1e3
    steps = [R.solve_burgers_1d(lambda z: np.sin(2 * np.pi * z), R.mesh_from_density(rho, 65, f / 64), 0.01, 0.1)[1]
             for f in (0.5, 0.1, 0.02)]
    assert steps[0] < steps[1] < steps[2], steps


# ---- Eq. (6)-(8): proxy reward and policy ------------------------------------------------------


def _krr_problem(seed=0, n=15, d=6, ne=5, V=8):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, ne))
    f = lambda X: np.tanh(X @ W) + 0.1  # noqa: E731
    X_D, X_val, x_new = rng.standard_normal((n, d)), rng.standard_normal((V, d)), rng.standard_normal(d)
    return f, X_D, f(X_D), x_new, X_val, f(X_val)


def test_proxy_reward_equals_full_refit():
    f, X_D, Y_D, x_new, X_val, Y_val = _krr_problem()
    lam = 1e-3
    bw = R.median_bandwidth(X_D)
    y_new = f(x_new[None]) + np.random.default_rng(1).normal(0, 0.2, (4, Y_D.shape[1]))  # (G, N_e)
    cost_ratio = np.array([1.0, 2.0, 0.5, 1.0])
    got = R.proxy_reward(X_D, Y_D, x_new, y_new, X_val, Y_val, lam, cost_ratio, 0.05, bandwidth=bw)
    E0 = R.rel_l2(R.krr_fit_predict(X_D, Y_D, X_val, lam, bw), Y_val).mean()
    for g in range(4):
        pred = R.krr_fit_predict(np.vstack([X_D, x_new]), np.vstack([Y_D, y_new[g]]), X_val, lam, bw)
        E1 = R.rel_l2(pred, Y_val).mean()
        want = len(X_D) * (E0 - E1) / E0 - 0.05 * np.log(cost_ratio[g])
        assert abs(got[g] - want) < 1e-8


def test_proxy_reward_prefers_exact_labels_and_penalises_cost():
    f, X_D, Y_D, x_new, X_val, Y_val = _krr_problem(seed=3)
    y = f(x_new[None])[0]
    r = R.proxy_reward(X_D, Y_D, x_new, np.stack([y, y + 0.1]), X_val, Y_val, 1e-3)
    assert r[0] > r[1]
    r = R.proxy_reward(X_D, Y_D, x_new, np.stack([y, y]), X_val, Y_val, 1e-3, np.array([1.0, 3.0]), 0.05)
    assert r[0] > r[1]
    assert abs((r[0] - r[1]) - 0.05 * np.log(3.0)) < 1e-12


def test_group_advantages_and_ppo_matches_reinforce_on_policy():
    Rw = torch.randn(4, 8, dtype=torch.float64)
    A = R.group_advantages(Rw)
    assert A.mean(-1).abs().max() < 1e-12
    assert torch.allclose(A.std(-1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, 5, dtype=torch.float64)
    grads = []
    for rl in ("reinforce", "ppo"):
        logp = R.gaussian_logp(w, theta, 0.3)
        R.policy_loss(logp, logp.detach(), A, rl).backward()
        grads.append(theta.grad.clone())
        theta.grad = None
    torch.testing.assert_close(grads[0], grads[1])  # ratio 1 at the first PPO epoch: same gradient


def test_reinforce_with_oracle_reward_beats_uniform_labels():
    args = R.parse_args(["--policy_iters", "50", "--instances_per_iter", "4"])
    world = R.World(args)
    rng = np.random.default_rng(0)
    fields = world.sample_inputs(rng, 5)
    refs, _ = world.reference(fields)
    gen = torch.Generator().manual_seed(0)
    X = world.surrogate_input(fields)
    agent = R.Agent(args, world, "oracle", X, refs, X, refs, gen)
    rows = R.train_policy(agent, fields, refs, fields, refs, rng, lambda r: r)
    assert len(rows) == 50
    uni = R.rel_l2(world.simulate(fields, world.uniform_nodes(5))[0], refs).mean()
    learned = R.rel_l2(world.simulate(fields, agent.mean_nodes(fields))[0], refs).mean()
    assert learned < 0.7 * uni, (learned, uni)
    assert agent.cost == 50 * 4 * 8 * 33  # every candidate simulation is counted


# ---- torchrun: sharded simulations, data-parallel surrogate ---------------------------------------


def test_shards_cover_rows_in_order_and_simulations_are_row_independent():
    for n, world in ((10, 2), (7, 3), (3, 4), (400, 8)):
        bounds = [R.shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    # `sharded` solves blocks of rows on different ranks: each block must give the bits of the whole batch
    small = ["--fine_res", "513", "--ref_cells", "256"]
    for pde in ("darcy", "burgers"):
        world = R.World(R.parse_args(["--pde", pde] + small))
        rng = np.random.default_rng(0)
        fields = world.sample_inputs(rng, 5)
        nodes = R.mesh_from_density(world.random_density(rng, 5), world.N, world.gap)
        for fn, arrays in ((world.simulate, (fields, nodes)), (world.reference, (fields,))):
            whole = fn(*arrays)
            parts = [fn(*(a[lo:hi] for a in arrays)) for lo, hi in (R.shard_bounds(5, r, 2) for r in range(2))]
            for w, p in zip(whole, zip(*parts)):
                assert np.array_equal(w, np.concatenate(p)), (pde, fn.__name__)
        assert R.sharded(world.simulate, fields, nodes)[0].tolist() == world.simulate(fields, nodes)[0].tolist()


def test_sharded_surrogate_loss_gradients_average_to_the_one_process_gradient():
    torch.manual_seed(0)
    model = R.FNO1d(width=8, layers=2, modes=4, pad=8)
    x, grid = torch.randn(7, 33), torch.linspace(0, 1, 33)
    y = torch.randn(7, 33)

    def grads(rows, world):
        model.zero_grad()
        R.surrogate_loss(model(x[rows], grid), y[rows], 7, world).backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads(slice(0, 7), 1)
    ranks = [grads(slice(*R.shard_bounds(7, r, 2)), 2) for r in range(2)]  # 3 and 4 rows
    for g, g0, g1 in zip(full, *ranks):
        torch.testing.assert_close((g0 + g1) / 2, g, atol=1e-6, rtol=1e-5)  # what all_reduce_grads computes


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 CPU ranks: labels, costs, policy log bit-identical to one process; FNO (data-parallel) errors within
    float32 summation noise; only rank 0 writes and prints."""
    cfg = ["--method", "all", "--budget", "40", "--checkpoints", "20,40", "--n_test", "20", "--n_val", "10",
           "--policy_iters", "5", "--n_policy_inst", "20", "--surrogate", "fno", "--surrogate_epochs", "5",
           "--per_device_batch_size", "19"]  # 20 = 19 + 1: a minibatch of one row leaves rank 0 empty
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = os.path.join(ROOT, "rlmesh.py")
    one = subprocess.run([sys.executable, script, *cfg, "--output_dir", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                          *cfg, "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("wrote ") == 1  # the final table is printed by rank 0 only
    rows1 = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    rows2 = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(rows1) == len(rows2) == 14
    for a, b in zip(rows1, rows2):
        for k in ("arm", "queries", "dataset_cost", "total_cost", "label_rel_l2"):
            assert a[k] == b[k], (k, a, b)  # sharded solves: the same labels and costs, bit for bit
        for k in ("test_rel_l2", "test_rmse"):
            # float32 summation order only (~2e-9 measured); a gradient scaled 1/2 on each rank gave 4e-5
            assert abs(a[k] - b[k]) <= 1e-6 * abs(a[k]), (k, a, b)
    assert (tmp_path / "one" / "policy.jsonl").read_text() == (tmp_path / "two" / "policy.jsonl").read_text()
    assert json.load(open(tmp_path / "two" / "summary.json"))["world_size"] == 2


# ---- runs ------------------------------------------------------------------------------------


# slow: every arm as a subprocess run (~10 s); the arms are pinned in-process against plain references
@pytest.mark.slow
def test_smoke_run_all_arms(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "rlmesh.py"), "--method", "all", "--budget", "40", "--checkpoints",
           "20,40", "--n_test", "20", "--n_val", "10", "--policy_iters", "5", "--surrogate_epochs", "5",
           "--surrogate", "fno", "--n_policy_inst", "20", "--output_dir", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("args.json", "metrics.jsonl", "summary.json", "rlmesh.png", "table.md"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    arms = {r["arm"] for r in rows}
    assert arms == {"uniform", "uniform_hi", "exact", "random", "monitor", "rl", "rl_oracle"}
    for r in rows:
        assert np.isfinite(r["test_rel_l2"]) and r["total_cost"] >= r["dataset_cost"] > 0
    summ = json.load(open(out / "summary.json"))
    assert summ["final"]["uniform"]["label_rel_l2"][0] > summ["final"]["uniform_hi"]["label_rel_l2"][0]


def test_bad_flags_raise_user_error_before_writing(tmp_path):
    for argv in (["--budget", "30", "--checkpoints", "50"], ["--min_gap_frac", "1.0"], ["--n_warmup", "80"]):
        with pytest.raises(R.UserError):
            R.main(R.parse_args(argv + ["--output_dir", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # argparse: unknown choice
        R.parse_args(["--method", "nope"])


# ---- wiring: one arm against a plain reference written here (loops, nothing from rlmesh) ------------

TINY = ["--fine_res", "257", "--density_res", "129", "--eval_res", "17", "--n_nodes", "9", "--budget", "8",
        "--checkpoints", "4,8", "--n_warmup", "4", "--n_test", "5", "--n_val", "4", "--quad", "4", "--hi_factor", "2",
        "--policy_iters", "3", "--n_policy_inst", "4", "--instances_per_iter", "2", "--group_size", "3"]
TINY_B = ["--pde", "burgers", "--fine_res", "129", "--density_res", "65", "--ref_cells", "32", "--n_nodes", "9",
          "--eval_res", "16", "--t_final", "0.1", "--budget", "8", "--checkpoints", "4,8", "--n_warmup", "4",
          "--n_test", "4", "--n_val", "3", "--hi_factor", "2", "--policy_iters", "2", "--n_policy_inst", "3",
          "--instances_per_iter", "1", "--group_size", "2", "--monitor_betas", "0.1,1"]


def _arm(argv, tmp_path, name="run"):
    """run_seed in process: {arm: result} for the arms of argv."""
    args = R.parse_args(argv + ["--output_dir", str(tmp_path / name)])
    return R.run_seed(args, str(tmp_path / name), args.seed, torch.device("cpu"))["arms"]


def _lin(s, x, periodic=False):  # linear interpolation of fine samples at one point
    M = len(s)
    if periodic:
        pos = (x % 1.0) * M
        i = int(np.floor(pos))
        t = pos - i
        return s[i % M] * (1 - t) + s[(i + 1) % M] * t
    pos = min(max(x, 0.0), 1.0) * (M - 1)
    i = min(int(np.floor(pos)), M - 2)
    t = pos - i
    return s[i] * (1 - t) + s[i + 1] * t


def _darcy_plain(a, nodes, face, quad):  # dense FV matrix, one row at a time
    N = len(nodes)
    A, b = np.zeros((N, N)), np.zeros(N)
    A[0, 0] = A[-1, -1] = 1.0
    w = []
    for i in range(N - 1):
        h = nodes[i + 1] - nodes[i]
        if face == "midpoint":
            c = _lin(a, nodes[i] + h / 2)
        else:
            c = 1.0 / (sum(1.0 / _lin(a, nodes[i] + h * (q + 0.5) / quad) for q in range(quad)) / quad)
        w.append(c / h)
    for i in range(1, N - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = -w[i - 1], w[i - 1] + w[i], -w[i]
        b[i] = (nodes[i + 1] - nodes[i - 1]) / 2
    return np.linalg.solve(A, b)


def _interp(xs, vs, x):  # piecewise linear, xs increasing, x in [xs[0], xs[-1]]
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return vs[i] * (1 - t) + vs[i + 1] * t
    raise ValueError(x)


def _krr_plain(X, Y, Xq, lam):
    n = len(X)
    dist = sorted(np.sqrt(((X[i] - X[j]) ** 2).sum()) for i in range(n) for j in range(i + 1, n))
    bw = float(np.median(dist))
    K = np.array([[np.exp(-((X[i] - X[j]) ** 2).sum() / (2 * bw * bw)) + (lam if i == j else 0) for j in range(n)]
                  for i in range(n)])
    alpha = np.linalg.solve(K, Y)
    return np.array([sum(np.exp(-((q - X[j]) ** 2).sum() / (2 * bw * bw)) * alpha[j] for j in range(n)) for q in Xq])


def _rel(p, y):
    return float(np.mean([np.sqrt(((p[i] - y[i]) ** 2).sum() / (y[i] ** 2).sum()) for i in range(len(y))]))


def test_darcy_uniform_exact_and_hi_arms_match_a_plain_reference(tmp_path):
    """Whole arms (labels, references, kernel ridge, test error, RMSE, costs) against loops written here."""
    args = R.parse_args(TINY)
    d = R.prepare_seed(args, 0)  # the inputs only; everything else is recomputed below
    grid = [i / 16 for i in range(17)]
    fine = [i / 256 for i in range(257)]

    def labels(fields, nodes, face):
        out = []
        for f in fields:
            u = _darcy_plain(f, nodes, face, 4)
            out.append([_interp(nodes, u, g) for g in grid])
        return np.array(out)

    ref = lambda fs: labels(fs, fine, "harmonic")  # noqa: E731  4097 -> here 257 nodes, harmonic faces
    Y_test = ref(d.test_fields)
    X = np.log(np.array([[_lin(f, g) for g in grid] for f in d.fields]))
    Xt = np.log(np.array([[_lin(f, g) for g in grid] for f in d.test_fields]))
    arms = _arm(TINY + ["--method", "all"], tmp_path)
    for arm, nodes, cost in (("uniform", [i / 8 for i in range(9)], 9), ("uniform_hi", [i / 16 for i in range(17)], 17),
                             ("exact", fine, 257)):
        Y = ref(d.fields) if arm == "exact" else labels(d.fields, nodes, "midpoint")
        label = 0.0 if arm == "exact" else _rel(labels(d.test_fields, nodes, "midpoint"), Y_test)
        assert abs(arms[arm]["label_rel_l2"] - label) < 1e-9 * max(label, 1), arm
        for row, k in zip(arms[arm]["rows"], (4, 8)):
            pred = _krr_plain(X[:k], Y[:k], Xt, 1e-3)
            assert row["queries"] == k
            assert abs(row["test_rel_l2"] - _rel(pred, Y_test)) < 1e-8, (arm, k)
            assert abs(row["test_rmse"] - np.sqrt(((pred - Y_test) ** 2).mean())) < 1e-10, (arm, k)
            assert row["dataset_cost"] == row["total_cost"] == k * cost, (arm, k)
    # hand totals of the arms that spend beyond their data set (Darcy: cost = nodes per solve)
    val = 4 * 257  # 4 validation references
    for k, row in zip((4, 8), arms["monitor"]["rows"]):
        assert row["total_cost"] == k * 9 + 6 * 4 * 9 + val  # 6 betas x 4 val solves, then the val references
    for k, row in zip((4, 8), arms["rl"]["rows"]):
        assert row["total_cost"] == k * 9 + val + 3 * 2 * 3 * 9  # policy_iters x instances x G solves
    for k, row in zip((4, 8), arms["rl_oracle"]["rows"]):
        assert row["total_cost"] == k * 9 + val + 3 * 2 * 3 * 9 + 4 * 257  # + the pool's fine references
    assert arms["random"]["rows"][-1]["total_cost"] == 8 * 9
    # the monitor's beta: the argmin of its validation label errors, recomputed with the plain solver
    Y_val = ref(d.val_fields)
    errs = {}
    for beta in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
        rho, _ = d.world.monitor_density(d.val_fields, beta, "gradient")
        nodes = R.mesh_from_density(rho, 9, 0.1 / 8)
        errs[beta] = _rel(np.array([[_interp(n, _darcy_plain(f, n, "midpoint", 4), g) for g in grid]
                                    for f, n in zip(d.val_fields, nodes)]), Y_val)
        assert abs(arms["monitor"][f"val_label_beta_{beta:g}"] - errs[beta]) < 1e-9
    assert arms["monitor"]["beta"] == min(errs, key=errs.get)


def _burgers_plain(u0, nodes, nu, T, cfl):  # loops: cell averages, Rusanov explicit, diffusion implicit (dense)
    N, M = len(nodes) - 1, len(u0)
    dx = [nodes[i + 1] - nodes[i] for i in range(N)]
    U = []
    for i in range(N):  # exact average of the periodic linear interpolant: trapezoid over its breakpoints
        pts = sorted({nodes[i], nodes[i + 1], *[j / M for j in range(M + 1) if nodes[i] < j / M < nodes[i + 1]]})
        vals = [_lin(u0, x, periodic=True) for x in pts]
        U.append(sum((pts[j + 1] - pts[j]) * (vals[j] + vals[j + 1]) / 2 for j in range(len(pts) - 1)) / dx[i])
    steps = int(np.ceil(T / (cfl * min(dx) / max(abs(u) for u in U)) - 1e-9))
    dt = T / steps
    g = [(dx[i] + dx[(i + 1) % N]) / 2 for i in range(N)]
    A = np.eye(N)
    for i in range(N):
        A[i, (i + 1) % N] -= dt * nu / (g[i] * dx[i])
        A[i, i] += dt * nu / (g[i] * dx[i]) + dt * nu / (g[i - 1] * dx[i])
        A[i, (i - 1) % N] -= dt * nu / (g[i - 1] * dx[i])
    for _ in range(steps):
        F = [0.25 * (U[i] ** 2 + U[(i + 1) % N] ** 2) - 0.5 * max(abs(U[i]), abs(U[(i + 1) % N])) * (U[(i + 1) % N] - U[i])
             for i in range(N)]
        U = list(np.linalg.solve(A, [U[i] - dt * (F[i] - F[i - 1]) / dx[i] for i in range(N)]))
    return U, steps


def test_burgers_uniform_arm_and_reference_match_a_plain_solver(tmp_path):
    args = R.parse_args(TINY_B)
    d = R.prepare_seed(args, 0)
    grid = [i / 16 for i in range(16)]

    def labels(fields, cells):
        nodes = [i / cells for i in range(cells + 1)]
        out, costs = [], []
        for f in fields:
            U, steps = _burgers_plain(f, nodes, 0.01, 0.1, 0.5)
            xs = [(nodes[i] + nodes[i + 1]) / 2 for i in range(cells)]
            xs, vs = [xs[-1] - 1] + xs + [xs[0] + 1], [U[-1]] + U + [U[0]]
            out.append([_interp(xs, vs, g) for g in grid])
            costs.append(cells * steps)
        return np.array(out), costs

    Y_test, _ = labels(d.test_fields, 32)  # references: 32 cells here
    np.testing.assert_allclose(d.Y_test, Y_test, rtol=1e-9, atol=1e-12)
    _, val_costs = labels(d.val_fields, 32)
    assert d.val_cost == sum(val_costs)
    Y, costs = labels(d.fields, 8)
    arms = _arm(TINY_B + ["--method", "uniform"], tmp_path)
    Yt, _ = labels(d.test_fields, 8)
    assert abs(arms["uniform"]["label_rel_l2"] - _rel(Yt, Y_test)) < 1e-9
    X = np.array([[_lin(f, g, periodic=True) for g in grid] for f in d.fields])
    Xt = np.array([[_lin(f, g, periodic=True) for g in grid] for f in d.test_fields])
    for row, k in zip(arms["uniform"]["rows"], (4, 8)):
        assert row["dataset_cost"] == row["total_cost"] == sum(costs[:k])  # cells x time steps, per input
        assert abs(row["test_rel_l2"] - _rel(_krr_plain(X[:k], Y[:k], Xt, 1e-3), Y_test)) < 1e-8


def test_burgers_uniform_cost_matches_rl_on_the_same_inputs_and_monitor_pilots_count_per_query(tmp_path):
    arms = _arm(TINY_B + ["--method", "all"], tmp_path)
    d = R.prepare_seed(R.parse_args(TINY_B), 0)
    target = arms["rl"]["cost_per_query"]
    n = arms["uniform_cost"]["n_nodes"]

    def mean_cost(n_nodes):  # plain: cells x ceil(T / (cfl min dx / max |cell average|)) on the query inputs
        cells = n_nodes - 1
        tot = 0
        for f in d.fields:
            U = [np.mean([_lin(f, (i + (j + 0.5) / 64) / cells, periodic=True) for j in range(64)]) for i in range(cells)]
            tot += cells * int(np.ceil(0.1 / (0.5 / cells / max(abs(u) for u in U)) - 1e-9))
        return tot / len(d.fields)

    assert arms["uniform_cost"]["cost_per_query"] <= target < mean_cost(n + 1), (n, target)
    # monitor (pilot_solve on Burgers): pilot solves are paid per query, so total - dataset grows with k
    rows = arms["monitor"]["rows"]
    pilot = [R.World(R.parse_args(TINY_B)).simulate(d.fields[i:i + 1], np.linspace(0, 1, 5)[None])[1][0]
             for i in range(8)]  # 4-cell uniform pilot of each query
    assert (rows[1]["total_cost"] - rows[1]["dataset_cost"]) - (rows[0]["total_cost"] - rows[0]["dataset_cost"]) \
        == sum(pilot[4:8])


def test_online_rl_costs_every_candidate_and_keeps_the_best(tmp_path):
    """--rl_mode online: per query after the warm-up, G candidates are solved; the kept one is the query, the other
    G - 1 are extra; the oracle reward adds one fine reference per query. Darcy: cost = nodes."""
    val = 4 * 257
    arms = _arm(TINY + ["--method", "all", "--rl_mode", "online"], tmp_path)
    for k, row in zip((4, 8), arms["rl"]["rows"]):
        assert row["dataset_cost"] == 9 * k
        assert row["total_cost"] == 9 * k + val + (k - 4) * (3 - 1) * 9  # queries 4..k-1 are online
    for k, row in zip((4, 8), arms["rl_oracle"]["rows"]):
        assert row["total_cost"] == 9 * k + val + (k - 4) * ((3 - 1) * 9 + 257)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "policy.jsonl")]
    assert sorted(r["query"] for r in rows if r["arm"] == "rl") == [4, 5, 6, 7]


# ---- every arm- or ablation-defining flag changes that arm's result --------------------------------


class _fingerprint:
    """An arm's rows; two compare equal unless some value differs by more than 1e-6 relative (float noise, e.g.
    Adam's epsilon under a rescaled gradient, must not count as a flag changing the result)."""

    def __init__(self, res):
        self.v = np.array([(r["test_rel_l2"], r["total_cost"], r["label_rel_l2"]) for r in res["rows"]], dtype=float)

    def __eq__(self, other):
        return bool(np.allclose(self.v, other.v, rtol=1e-6, atol=0))

    def __repr__(self):
        return repr(self.v.tolist())


FLAG_CASES = [  # (arm, extra flags): each must change the arm's rows against TINY
    ("uniform_hi", ["--hi_factor", "3"]), ("uniform", ["--face_coef", "harmonic"]), ("uniform", ["--coef", "smooth"]),
    ("uniform", ["--contrast", "10"]), ("uniform", ["--length_scale", "0.2"]), ("uniform", ["--n_nodes", "7"]),
    ("uniform", ["--krr_lambda", "0.1"]), ("uniform", ["--surrogate", "mlp", "--surrogate_epochs", "1"]),
    ("monitor", ["--monitor_betas", "1"]), ("monitor", ["--monitor", "pilot_solve"]), ("random", ["--min_gap_frac", "0.5"]),
    ("rl", ["--rl", "ppo"]), ("rl", ["--policy", "mlp"]), ("rl", ["--state", "a+surrogate"]), ("rl", ["--reward", "oracle"]),
    ("rl", ["--rl_mode", "online"]), ("rl", ["--sigma", "1.0"]), ("rl", ["--policy_lr", "0.5"]),
    ("rl", ["--group_size", "4"]), ("rl", ["--instances_per_iter", "3"]), ("rl", ["--n_policy_inst", "6"]),
    ("rl", ["--policy_iters", "4"]), ("rl", ["--n_warmup", "3"]), ("rl", ["--density_res", "65"]),
]


def test_every_arm_flag_changes_the_arm(tmp_path):
    base = {}
    for i, (arm, extra) in enumerate(FLAG_CASES):
        if arm not in base:
            base[arm] = _fingerprint(_arm(TINY + ["--method", arm, "--policy_lr", "0.3"], tmp_path, f"b{arm}")[arm])
        argv = TINY + ["--method", arm, "--policy_lr", "0.3"] + extra
        got = _fingerprint(_arm(argv, tmp_path, f"f{i}")[arm])
        assert got != base[arm], (arm, extra)
    # PPO's own knobs, against PPO; the cost weight on Burgers (Darcy meshes all cost N, so c log 1 = 0 there)
    ppo = TINY + ["--method", "rl", "--rl", "ppo", "--policy_lr", "0.3"]
    p0 = _fingerprint(_arm(ppo, tmp_path, "p0")["rl"])
    assert _fingerprint(_arm(ppo + ["--ppo_epochs", "1"], tmp_path, "p1")["rl"]) != p0
    assert _fingerprint(_arm(ppo + ["--ppo_clip", "0.01"], tmp_path, "p2")["rl"]) != p0
    cw = TINY_B + ["--method", "rl", "--policy_lr", "1", "--group_size", "4"]
    b0 = _fingerprint(_arm(cw, tmp_path, "c0")["rl"])
    assert _fingerprint(_arm(cw + ["--cost_weight", "100"], tmp_path,
                             "c1")["rl"]) != b0
    for extra in (["--nu", "0.05"], ["--cfl", "0.25"], ["--ref_cells", "64"]):
        assert _fingerprint(_arm(TINY_B + ["--method", "uniform"] + extra, tmp_path, "u" + extra[0])["uniform"]) != \
            _fingerprint(_arm(TINY_B + ["--method", "uniform"], tmp_path, "u0")["uniform"]), extra


def test_every_flag_is_read_outside_parse_args():
    """A flag that nothing reads cannot change a result: each dest must appear as `.dest` in the code."""
    import inspect
    import re

    src = inspect.getsource(R).replace(inspect.getsource(R.parse_args), "")
    dests = re.findall(r'p\.add_argument\("--(\w+)"', inspect.getsource(R.parse_args))
    assert len(dests) > 40
    for dest in dests:
        if dest == "overwrite":  # read by common.start_run only
            continue
        assert re.search(rf"\.{dest}\b", src), dest


# ---- bad input: one line, exit 2, nothing written; the output-dir policy ----------------------------

BAD = [["--pde", "burgers", "--cfl", "0"], ["--surrogate_epochs", "0"], ["--eval_res", "1"],
       ["--per_device_batch_size", "0"], ["--hi_factor", "0"], ["--contrast", "0"],
       ["--pde", "burgers", "--nu", "-0.01"], ["--pde", "burgers", "--t_final", "0"], ["--policy_iters", "0"],
       ["--sigma", "0"], ["--krr_lambda", "0"], ["--monitor_betas", "0.1,-1"], ["--monitor_betas", "a"],
       ["--method", "uniform_cost"], ["--n_warmup", "1"], ["--budget", "30", "--checkpoints", "50"],
       ["--min_gap_frac", "1.0"], ["--group_size", "1"], ["--instances_per_iter", "0"], ["--cost_weight", "-1"],
       ["--pde", "burgers", "--ref_cells", "128"], ["--full_table", "--seeds", "0,0"], ["--ppo_clip", "0"],
       ["--device", "cuda:7" if not torch.cuda.is_available() else "nope"], ["--n_nodes", "2"]]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_is_refused_before_anything_is_written(argv, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(R.UserError) as e:
        R.main(R.parse_args(argv + ["--output_dir", str(out)]))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    assert not out.exists()


def _cli(argv, timeout=60):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "rlmesh.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_cli_bad_input_and_unwritable_dir_one_line_exit_2(tmp_path):
    blocker = tmp_path / "file"  # a file where a parent directory should be: unwritable even for root
    blocker.write_text("")
    for argv, out in ((["--pde", "burgers", "--cfl", "0"], tmp_path / "a"), ([], blocker / "run")):
        p = run_cli(R, argv + ["--output_dir", str(out)])
        assert p.returncode == 2, p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
        assert not out.exists()


def test_output_dir_policy_and_resume_refusals(tmp_path):
    out = str(tmp_path / "r")
    argv = TINY + ["--method", "uniform", "--output_dir", out]
    with pytest.raises(R.UserError, match="no run"):  # --resume into an empty directory
        R.main(R.parse_args(argv + ["--resume"]))
    first = R.main(R.parse_args(argv))
    with pytest.raises(R.UserError, match="already holds a run"):  # a fresh run into a finished one
        R.main(R.parse_args(argv))
    with pytest.raises(R.UserError, match="--contrast 100.0 -> 10.0"):  # resume with a changed result flag
        R.main(R.parse_args(argv + ["--resume", "--contrast", "10"]))
    with pytest.raises(R.UserError, match="--budget 8 -> 12"):
        R.main(R.parse_args(argv + ["--resume", "--budget", "12", "--checkpoints", "4,12"]))
    # rows logged after the checkpoint (a killed arm's) are cut on resume; the finished arm is not re-run
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 2, "arm": "ghost", "test_rel_l2": 9.0}) + "\n")
    again = R.main(R.parse_args(argv + ["--resume"]))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["arm"] for r in rows] == ["uniform", "uniform"]
    assert again["final"] == first["final"]
    shutil.rmtree(os.path.join(out, "checkpoint"))
    with pytest.raises(R.UserError, match="no checkpoint"):  # a run killed before its first checkpoint
        R.main(R.parse_args(argv + ["--resume"]))
    assert R.main(R.parse_args(argv + ["--overwrite", "--contrast", "10"]))["final"] != first["final"]
    assert json.load(open(os.path.join(out, "args.json")))["contrast"] == 10.0


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_summary(tmp_path):
    cfg = ["--method", "all", "--budget", "40", "--checkpoints", "20,40", "--n_test", "10", "--n_val", "10",
           "--policy_iters", "30", "--n_policy_inst", "20", "--fine_res", "1025"]
    assert _cli(cfg + ["--output_dir", str(tmp_path / "full")], timeout=300).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "rlmesh.py"), *cfg, "--output_dir", str(out)], env=env,
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    t0 = time.time()
    while not (out / "checkpoint" / "COMPLETE").exists() and p.poll() is None and time.time() - t0 < 200:
        time.sleep(0.02)
    assert p.poll() is None, "finished before the kill"
    p.kill()  # SIGKILL
    p.wait()
    assert not (out / "summary.json").exists()
    r = _cli(cfg + ["--output_dir", str(out), "--resume"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed: arms done" in r.stdout + r.stderr
    a, b = (json.load(open(d / "summary.json")) for d in (tmp_path / "full", out))
    a.pop("wall_minutes"), b.pop("wall_minutes")
    assert a == b
    strip = lambda path: [json.loads(line) for line in open(path)]  # noqa: E731
    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(out / "metrics.jsonl")
    assert strip(tmp_path / "full" / "policy.jsonl") == strip(out / "policy.jsonl")
