"""rlmesh.py: RL-chosen non-uniform simulation meshes for training a PDE surrogate on fewer simulations.

Paper: "Accelerating PDE Surrogates via RL-Guided Mesh Optimization", Meng, Jiang, Zhao, Liu, Willett, Chen,
arXiv 2603.02066 (2026), https://arxiv.org/abs/2603.02066. No code or tables are public; everything below the
idea is reconstructed (see "Reconstructed").

Idea. A neural surrogate of a PDE is trained under a simulation budget. Each simulation runs on a coarse mesh
whose points an RL policy places non-uniformly, where the solution varies (coefficient jumps of Darcy flow,
shocks of Burgers). A cheap proxy (kernel ridge regression, updated in closed form) scores how much a new
simulation would improve the surrogate, so the reward needs no surrogate retraining. Claim: competitive
accuracy with far fewer simulation queries than uniform or random meshes.

Equations implemented (numbers used by the `# Eq. (n)` tags and the tests):
  (1) input a (Darcy coefficient) or u0 (Burgers) lives on a fine uniform grid, read by linear interpolation.
  (2) Darcy 1D, -(a u')' = f, u(0) = u(1) = 0, vertex-centred finite volumes on nodes x_0 = 0 < ... < x_{N-1} = 1:
        -[A_{i+1/2}(u_{i+1}-u_i)/h_i - A_{i-1/2}(u_i-u_{i-1})/h_{i-1}] = f_i (h_{i-1}+h_i)/2,
      A = a(face midpoint) ("midpoint") or h_i / int 1/a ("harmonic"). Cost = N.
  (3) Burgers 1D periodic, u_t + (u^2/2)_x = nu u_xx, cell averages U on N cells, Rusanov flux explicit,
      diffusion implicit: (I - dt nu L) U^{n+1} = U^n - dt D F(U^n). Cost = N x n_steps.
  (4) mesh from a density rho >= 0 by equidistribution: C = cumtrapz(rho)/total, xhat_i = C^{-1}(i/(N-1)),
      then h_i <- g + (1-(N-1)g) h_i (min gap g, ends fixed, order kept).
  (5) policy: rho(x) = softplus(sum_j w_j phi_j(x)) + 1e-3, w ~ N(mu(s), sigma^2 I).
  (6) proxy surrogate: kernel ridge g_D(a) = k(a, A_D)^T (K + lam I)^{-1} Y_D, RBF, median bandwidth.
  (7) proxy reward R = n_D (E(D) - E(D + (a, y))) / E(D) - c log(cost(M)/cost(uniform)), E = mean relative L2
      on validation references; E(D + (a, y)) by the rank-one update g' = g + beta_v (y - g(a)).
  (8) group advantage A = (R - mean_G R) / (std_G R + 1e-8); REINFORCE -mean A log pi(w|s) or PPO-clip.
  (9) surrogate: FNO-1D (or MLP, or kernel ridge) trained with the relative L2 loss on labels interpolated
      from each simulation's mesh to the eval grid; tested against fine-mesh references.

Deviations from the paper:
  1. 1D problems only (Darcy, Burgers); the paper's 2D Darcy (and `--pde darcy2d` of the spec) is not
     implemented here.
  2. The policy outputs a whole mesh at once (a density, Eq. 4-5), not points one at a time: raw coordinates
     as actions tangle and collapse cells.
  3. RL is a one-step contextual bandit trained once on a pool of inputs with the warm-up set as the proxy's
     data (`--rl_mode pretrain`), then frozen; `--rl_mode online` updates it per query.

Reconstructed (the public paper does not say): the solvers and their cost counts (Eq. 2-3), the density
features (1, |d log a/dx| box-smoothed over 9/65/257 fine samples, distance to the boundary; Burgers:
smoothed max(-u0', 0) and |u0|), the Gaussian policy, sigma = 0.3, the proxy reward normalisation (Eq. 7),
group advantages, the warm-up of 20 uniform queries, the classical monitor baseline (rho = 1 + beta m with
m = |d log a/dx| in 1/length units, beta tuned on validation over 0.003..1; Burgers: arc length of a pilot
solve), the random-mesh baseline (log rho = smooth Gaussian field), the toy coefficient (thresholded Gaussian
field, contrast 100) and Burgers initial field (covariance 625(-Delta+25 I)^{-2}), nu = 0.01, labels
interpolated linearly to the eval grid, FNO sizes, the default surrogate (kernel ridge, so that the default
comparison runs in well under 3 minutes on a 2-core CPU; `--surrogate fno` is the neural operator).

Commands:
  toy CPU (default comparison, all arms, seed 0, ~0.5 min):  python rlmesh.py
  full multi-seed table (+ plots):     python rlmesh.py --full_table --seeds 0,1,2 [--surrogate fno]
  Burgers, small (minutes):            python rlmesh.py --pde burgers --surrogate fno --surrogate_epochs 40
                                         --ref_cells 1024 --budget 200 --checkpoints 50,100,200 --n_test 100
                                         --n_policy_inst 40 --policy_iters 100
  Burgers at the spec's sizes:         python rlmesh.py --pde burgers --surrogate fno   (about an hour of CPU: ~750
                                         fine references on 2048 cells x ~7,000 time steps, ~3 s each; the run
                                         prints its own estimate after the validation references. Kernel ridge,
                                         the default surrogate, barely learns Burgers at T = 1: 0.52 -> 0.43 rel. L2
                                         from 50 to 400 queries, where the FNO gets 0.36 -> 0.16)
  one arm / variants:                  python rlmesh.py --method rl --rl ppo --policy mlp --rl_mode online
  GPU (surrogate training on CUDA):    python rlmesh.py --full_table --surrogate fno --surrogate_epochs 300 --device cuda
  (solvers, meshes, kernel ridge and the policy stay in float64 numpy / CPU torch; only the surrogate moves)
  torchrun (N processes, CPU gloo or one GPU each):
                                       torchrun --nproc_per_node N rlmesh.py --full_table --surrogate fno
  Under torchrun the simulations and fine references of each batch of inputs are split into N contiguous blocks
  of rows, solved one block per rank and all-gathered in order (every rank holds the same labels); the FNO / MLP
  surrogate trains data-parallel: each rank takes its share of every minibatch of --per_device_batch_size rows
  and gradients are averaged (common.all_reduce_grads), so the update equals one process's. Kernel ridge (closed
  form) runs on every rank; policy training (the rollouts' simulations included) runs on rank 0 and its policy is
  broadcast; only rank 0 logs and writes files. Labels, costs and kernel-ridge results are bit-identical to one
  process; neural-surrogate errors equal up to float32 summation order (tested with 2 CPU processes only).

Runs: flags are checked first (one line, exit 2, nothing written); an --output_dir holding a run is refused
unless --resume (the same flags; continues after the last finished arm) or --overwrite (deletes it). The
checkpoint after each arm holds every finished arm's result, so kill -9 + --resume gives the uninterrupted
summary.json; rows logged after it are cut.

Logged metrics (metrics.jsonl, one row per arm and checkpoint): arm, queries, dataset_cost, total_cost,
test_rel_l2, test_rmse, label_rel_l2; policy.jsonl: reward, advantage stats, proxy-vs-oracle rank
correlation, validation label error of the mean action; summary.json: final table, queries and total cost
each arm needs to reach uniform's final error (every arm judged per query and at equal total cost), wall time,
device, seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError, exit_on_user_error

ARMS = ("uniform", "uniform_cost", "uniform_hi", "exact", "random", "monitor", "rl", "rl_oracle")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL-guided non-uniform meshes for PDE-surrogate training data (1D toy).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- problem ----
    # DEVIATION(1): 1D only, no darcy2d
    p.add_argument("--pde", default="darcy", choices=["darcy", "burgers"], help="PDE of Eq. (2) or Eq. (3)")
    p.add_argument("--coef", default="channels", choices=["channels", "smooth"],
                   help="Darcy a: thresholded Gaussian field (a in {1, contrast}) or the control a = exp(g/std g)")
    p.add_argument("--contrast", type=float, default=100.0, help="a on the channels (1 elsewhere), Eq. (1)")
    p.add_argument("--length_scale", type=float, default=0.08, help="l of the Gaussian field of a")
    p.add_argument("--n_nodes", type=int, default=None,
                   help="N, simulation mesh nodes (Darcy default 33; Burgers default 65 = 64 cells)")
    p.add_argument("--face_coef", default="midpoint", choices=["midpoint", "harmonic"],
                   help="A_{i+1/2} of Eq. (2) for the simulations (the reference always uses harmonic)")
    p.add_argument("--quad", type=int, default=16, help="sub-points per cell for the harmonic face rule, Eq. (2)")
    p.add_argument("--fine_res", type=int, default=4097, help="fine grid of the inputs (Darcy nodes; Burgers uses fine_res-1 periodic points)")
    p.add_argument("--ref_cells", type=int, default=2048, help="Burgers reference cells (Darcy reference = fine grid)")
    p.add_argument("--nu", type=float, default=0.01, help="nu of Eq. (3)")
    p.add_argument("--t_final", type=float, default=1.0, help="T of Eq. (3)")
    p.add_argument("--cfl", type=float, default=0.5, help="CFL number for dt of Eq. (3)")
    p.add_argument("--eval_res", type=int, default=None, help="eval grid points (Darcy 129 with boundary, Burgers 128)")
    # ---- mesh and policy ----
    p.add_argument("--density_res", type=int, default=257, help="M, density grid points of Eq. (4)")
    p.add_argument("--min_gap_frac", type=float, default=0.1, help="g (N-1), minimum spacing of Eq. (4)")
    p.add_argument("--policy", default="linear", choices=["linear", "mlp"], help="mu(s) of Eq. (5)")
    p.add_argument("--state", default="a", choices=["a", "a+surrogate"],
                   help="policy features: input only, or also |d g_D(a)/dx| of the proxy (Eq. 5)")
    p.add_argument("--sigma", type=float, default=0.3, help="sigma of the Gaussian policy, Eq. (5)")
    # ---- RL ----
    p.add_argument("--rl", default="reinforce", choices=["reinforce", "ppo"], help="policy update of Eq. (8)")
    p.add_argument("--reward", default="proxy", choices=["proxy", "oracle"],
                   help="reward of the `rl` arm: Eq. (7), or -log label error vs fine solves (pilot; `rl_oracle` arm)")
    p.add_argument("--rl_mode", default="pretrain", choices=["pretrain", "online"],
                   help="train on a pool then freeze, or update per query keeping the best of G")
    p.add_argument("--policy_lr", type=float, default=0.05, help="Adam learning rate of the policy")
    p.add_argument("--policy_iters", type=int, default=300, help="RL iterations (pretrain mode)")
    p.add_argument("--instances_per_iter", type=int, default=4, help="inputs per RL iteration")
    p.add_argument("--group_size", type=int, default=8, help="G, actions per input, Eq. (8)")
    p.add_argument("--n_policy_inst", type=int, default=100, help="pool of inputs the policy trains on")
    p.add_argument("--ppo_clip", type=float, default=0.2, help="epsilon of the PPO clip")
    p.add_argument("--ppo_epochs", type=int, default=4, help="PPO epochs per group batch")
    p.add_argument("--cost_weight", type=float, default=None, help="c of Eq. (7) (Darcy default 0, Burgers 0.05)")
    p.add_argument("--krr_lambda", type=float, default=1e-3, help="lam of Eq. (6)")
    p.add_argument("--n_val", type=int, default=50, help="validation references for E of Eq. (7) and beta tuning")
    # ---- baselines ----
    p.add_argument("--method", default="all", choices=list(ARMS) + ["all"],
                   help="arm to run; `all` runs every arm (Darcy skips uniform_cost, equal to uniform there)")
    p.add_argument("--hi_factor", type=int, default=4, help="uniform_hi refines cells by this factor")
    p.add_argument("--monitor", default="auto", choices=["auto", "gradient", "pilot_solve"],
                   help="monitor m: |d log a| (|u0'|), or arc length of a uniform N/2 pilot solve; auto: gradient "
                        "for Darcy, pilot_solve for Burgers")
    p.add_argument("--monitor_betas", default="0.003,0.01,0.03,0.1,0.3,1", help="beta grid of rho = 1 + beta m (m in its units: 1/length for |d log a|), tuned on val")
    # ---- data and surrogate ----
    p.add_argument("--n_warmup", type=int, default=20, help="uniform warm-up queries (the proxy's first D)")
    p.add_argument("--budget", type=int, default=400, help="simulation queries per arm (warm-up included)")
    p.add_argument("--checkpoints", default="50,100,200,400", help="query counts at which a surrogate is trained")
    p.add_argument("--n_test", type=int, default=200, help="held-out inputs with fine references")
    p.add_argument("--surrogate", default="krr", choices=["fno", "mlp", "krr"], help="surrogate of Eq. (9)")
    p.add_argument("--fno_width", type=int, default=32, help="FNO channels")
    p.add_argument("--fno_layers", type=int, default=4, help="FNO Fourier layers")
    p.add_argument("--fno_modes", type=int, default=12, help="FNO Fourier modes kept")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate of the surrogate")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="Adam weight decay of the surrogate")
    p.add_argument("--per_device_batch_size", type=int, default=20,
                   help="surrogate minibatch; torchrun splits it across ranks (same update as one process)")
    p.add_argument("--surrogate_epochs", type=int, default=60, help="surrogate epochs, LR halved every epochs/4 (fno/mlp; krr is closed form)")
    # ---- run ----
    p.add_argument("--full_table", action=argparse.BooleanOptionalAction, default=False, help="run every arm for each of --seeds, write table.md + plots")
    p.add_argument("--seeds", default="0,1,2", help="seeds of --full_table")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs, policy noise and surrogate init")
    p.add_argument("--device", default=None, help="surrogate device (default: cuda > mps > cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: 1, or $NANOPAPERS_THREADS)")
    p.add_argument("--output_dir", default=None, help="default runs/rlmesh/<pde>_<method>_s<seed>")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the run in output_dir (same flags): skip arms finished in its checkpoint (and, with "
                        "--full_table, seeds with a result.json); refused without a checkpoint or with changed flags")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="delete a previous run in output_dir and start fresh (without it such a directory is refused)")
    args = p.parse_args(argv)
    burg = args.pde == "burgers"
    if args.n_nodes is None:
        args.n_nodes = 65 if burg else 33
    if args.eval_res is None:
        args.eval_res = 128 if burg else 129
    if args.cost_weight is None:
        args.cost_weight = 0.05 if burg else 0.0
    if args.output_dir is None:
        tag = "table" if args.full_table else f"{args.method}_s{args.seed}"
        args.output_dir = os.path.join("runs", "rlmesh", f"{args.pde}_{tag}")
    return args


# ---------------------------------------------------------------------------------------------
# ---- pure math: fields, meshes, solvers, kernel ridge, rewards ----
# ---------------------------------------------------------------------------------------------


def _eval_field(field, x: np.ndarray, periodic: bool = False) -> np.ndarray:
    """Eq. (1): a callable, or samples on a uniform grid ((M,) or (B, M)), read at x ((K,) or (B, K)) by linear
    interpolation. Non-periodic samples sit on linspace(0, 1, M); periodic ones on j/M, j < M."""
    if callable(field):
        return np.asarray(field(x), dtype=np.float64) * np.ones_like(x, dtype=np.float64)
    s = np.asarray(field, dtype=np.float64)
    if s.ndim == 1 and x.ndim == 1:
        return _eval_field(s[None], x[None], periodic)[0]
    s2 = s if s.ndim == 2 else s[None]
    x2 = x if x.ndim == 2 else np.broadcast_to(x, (s2.shape[0],) + x.shape)
    M = s2.shape[1]
    if periodic:
        pos = np.mod(x2, 1.0) * M
        i0 = np.floor(pos).astype(np.int64) % M
        i1 = (i0 + 1) % M
    else:
        pos = np.clip(x2, 0.0, 1.0) * (M - 1)
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, M - 2)
        i1 = i0 + 1
    t = pos - np.floor(pos) if periodic else pos - i0
    if s2.shape[0] == 1 and x2.shape[0] > 1:
        s2 = np.broadcast_to(s2, (x2.shape[0], M))
    return np.take_along_axis(s2, i0, 1) * (1 - t) + np.take_along_axis(s2, i1, 1) * t


def mesh_from_density(density, n_nodes: int, min_gap: float = 0.0) -> np.ndarray:
    """Eq. (4): equidistribute rho ((M,) or (B, M) on linspace(0, 1, M)) into n_nodes nodes with min gap.

    Ends are exactly 0 and 1, nodes strictly increase when min_gap > 0, a uniform rho gives linspace."""
    rho = np.asarray(density, dtype=np.float64)
    single = rho.ndim == 1
    rho = np.atleast_2d(rho)  # (B, M)
    if n_nodes < 2 or rho.shape[1] < 2:
        raise ValueError("need n_nodes >= 2 and a density with >= 2 samples")
    if min_gap < 0 or (n_nodes - 1) * min_gap >= 1:
        raise ValueError(f"min_gap {min_gap} too large for {n_nodes} nodes: need (n_nodes - 1) * min_gap < 1")
    if not np.isfinite(rho).all():
        raise ValueError("density has NaN or inf values")
    if (rho < 0).any():
        raise ValueError("density has negative values")
    M = rho.shape[1]
    x = np.linspace(0.0, 1.0, M)
    C = np.concatenate([np.zeros((rho.shape[0], 1)), np.cumsum((rho[:, 1:] + rho[:, :-1]) / 2, 1)], 1)  # (B, M)
    total = C[:, -1:]
    if (total <= 0).any():
        raise ValueError("density is zero everywhere")
    C = C / total
    t = np.linspace(0.0, 1.0, n_nodes)
    xhat = np.stack([np.interp(t, c, x) for c in C])  # (B, N): C^{-1}(i/(N-1)), linear inversion
    xhat[:, 0], xhat[:, -1] = 0.0, 1.0
    h = np.diff(xhat, axis=1)
    h = min_gap + (1.0 - (n_nodes - 1) * min_gap) * h  # Eq. (4): sum h = 1 is kept
    nodes = np.concatenate([np.zeros((h.shape[0], 1)), np.cumsum(h, 1)], 1)
    nodes[:, -1] = 1.0
    return nodes[0] if single else nodes


def interp_to_grid(nodes, values, grid, periodic: bool = False) -> np.ndarray:
    """Piecewise-linear interpolation of nodal values ((N,) or (B, N)) at grid points ((K,)); periodic wraps
    nodes that live in [0, 1) (e.g. Burgers cell centres)."""
    nodes, values = np.asarray(nodes, np.float64), np.asarray(values, np.float64)
    if nodes.ndim == 1 and values.ndim == 2:
        nodes = np.broadcast_to(nodes, values.shape)
    if nodes.ndim == 2:
        return np.stack([interp_to_grid(n, v, grid, periodic) for n, v in zip(nodes, values)])
    grid = np.asarray(grid, np.float64)
    if periodic:
        order = np.argsort(np.mod(nodes, 1.0))
        xs, vs = np.mod(nodes, 1.0)[order], values[order]
        xs = np.concatenate([xs[-1:] - 1.0, xs, xs[:1] + 1.0])
        vs = np.concatenate([vs[-1:], vs, vs[:1]])
        return np.interp(np.mod(grid, 1.0), xs, vs)
    return np.interp(grid, nodes, values)


def _thomas(lower, diag, upper, rhs):
    """Tridiagonal solve, batched over rows: (B, n) each; lower[:, 0] and upper[:, -1] unused."""
    n = diag.shape[1]
    c, d = np.empty_like(diag), np.empty_like(diag)
    c[:, 0], d[:, 0] = upper[:, 0] / diag[:, 0], rhs[:, 0] / diag[:, 0]
    for i in range(1, n):
        m = diag[:, i] - lower[:, i] * c[:, i - 1]
        c[:, i] = upper[:, i] / m
        d[:, i] = (rhs[:, i] - lower[:, i] * d[:, i - 1]) / m
    x = np.empty_like(d)
    x[:, -1] = d[:, -1]
    for i in range(n - 2, -1, -1):
        x[:, i] = d[:, i] - c[:, i] * x[:, i + 1]
    return x


def solve_darcy_1d(coef, nodes, f=1.0, face: str = "midpoint", quad: int = 16) -> np.ndarray:
    """Eq. (2): nodal u of -(a u')' = f, u(0) = u(1) = 0, on nodes (N,) or (B, N). coef: callable or fine-grid
    samples ((M,) or (B, M)); f: float or callable. float64. Cost = N per solve."""
    nodes = np.asarray(nodes, np.float64)
    single = nodes.ndim == 1
    X = np.atleast_2d(nodes)  # (B, N)
    if not callable(coef) and np.ndim(coef) == 2 and X.shape[0] == 1:
        X = np.broadcast_to(X, (np.shape(coef)[0], X.shape[1]))
        single = False
    h = np.diff(X, axis=1)  # (B, N-1)
    if (h <= 0).any():
        raise ValueError("nodes must strictly increase")
    if face == "midpoint":
        A = _eval_field(coef, X[:, :-1] + h / 2)  # (B, N-1)
    elif face == "harmonic":  # A = h / int 1/a, midpoint rule with `quad` sub-points
        q = (np.arange(quad) + 0.5) / quad
        sub = X[:, :-1, None] + h[:, :, None] * q  # (B, N-1, Q)
        inv = 1.0 / _eval_field(coef, sub.reshape(X.shape[0], -1)).reshape(sub.shape)
        A = 1.0 / inv.mean(-1)
    else:
        raise ValueError(f"face must be midpoint or harmonic, not {face}")
    w = A / h  # (B, N-1)
    xi = X[:, 1:-1]
    fi = f(xi) if callable(f) else np.full_like(xi, float(f))
    rhs = fi * (h[:, :-1] + h[:, 1:]) / 2  # (B, N-2)
    diag = w[:, :-1] + w[:, 1:]
    lower, upper = -w[:, :-1].copy(), -w[:, 1:].copy()
    u_in = _thomas(lower, diag, upper, rhs)
    u = np.concatenate([np.zeros((X.shape[0], 1)), u_in, np.zeros((X.shape[0], 1))], 1)
    return u[0] if single else u


def _cell_averages(u0, nodes: np.ndarray) -> np.ndarray:
    """Cell averages of u0 on the cells between nodes ((B, N+1)): exact for fine-grid samples (linear interpolant),
    8-point Gauss for callables."""
    dx = np.diff(nodes, axis=1)
    if callable(u0):
        g, wq = np.polynomial.legendre.leggauss(8)
        pts = nodes[:, :-1, None] + dx[:, :, None] * (g + 1) / 2
        return (_eval_field(u0, pts.reshape(len(nodes), -1)).reshape(pts.shape) * wq).sum(-1) / 2
    s = np.atleast_2d(np.asarray(u0, np.float64))
    if s.shape[0] == 1 and nodes.shape[0] > 1:
        s = np.broadcast_to(s, (nodes.shape[0], s.shape[1]))
    M = s.shape[1]  # periodic samples at j/M: cumulative integral of the linear interpolant
    cum = np.concatenate([np.zeros((len(s), 1)), np.cumsum((s + np.roll(s, -1, 1)) / 2, 1) / M], 1)  # (B, M+1)

    def integral(x):  # int_0^x u0 for x in [0, 1]
        pos = x * M
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, M - 1)
        t = pos - i0
        a = np.take_along_axis(s, i0, 1)
        b = np.take_along_axis(s, (i0 + 1) % M, 1)
        return np.take_along_axis(cum, i0, 1) + (a * t + (b - a) * t * t / 2) / M

    I = integral(nodes)
    return np.diff(I, axis=1) / dx


def _burgers_steps(U0, dx, t_final, cfl, dt_max):
    """n_steps of Eq. (3): ceil(T / min(cfl min dx / max|U0|, dt_max)); (B,) ints."""
    umax = np.maximum(np.abs(U0).max(1), 1e-12)
    dt = np.minimum(cfl * dx.min(1) / umax, dt_max)
    return np.maximum(np.ceil(t_final / dt - 1e-9), 1).astype(np.int64)


def _burgers_run(U0, dx, nu, t_final, n_steps, uniform: bool = False):
    """Time-step Eq. (3) for a batch of meshes (B, N) (each with its own dt = T/n_steps), Rusanov flux explicit,
    diffusion implicit. uniform=True: equal cells, the implicit solve diagonalised by rfft (reference)."""
    B, N = U0.shape
    dt = t_final / n_steps  # (B,)
    if uniform:
        k = np.arange(N // 2 + 1)
        lam = (2 * np.cos(2 * np.pi * k / N) - 2) / dx[:, :1] ** 2  # (B, K): eigenvalues of L
        inv_hat = 1.0 / (1.0 - dt[:, None] * nu * lam)
    else:
        g = (dx + np.roll(dx, -1, 1)) / 2  # (B, N): centre gap g_{i+1/2} between cells i and i+1 (wrapped)
        L = np.zeros((B, N, N))
        ar = np.arange(N)
        L[:, ar, (ar + 1) % N] += 1 / g / dx
        L[:, ar, ar] -= 1 / g / dx
        gm = np.roll(g, 1, 1)  # g_{i-1/2}
        L[:, ar, (ar - 1) % N] += 1 / gm / dx
        L[:, ar, ar] -= 1 / gm / dx
        Minv = np.linalg.inv(np.eye(N)[None] - (dt * nu)[:, None, None] * L)  # factored once per simulation
    U = U0.copy()
    for n in range(int(n_steps.max())):
        active = n < n_steps  # (B,)
        UR = np.roll(U, -1, 1)
        Fl = 0.25 * (U * U + UR * UR) - 0.5 * np.maximum(np.abs(U), np.abs(UR)) * (UR - U)  # Eq. (3) Rusanov
        rhs = U - dt[:, None] * (Fl - np.roll(Fl, 1, 1)) / dx
        if uniform:
            new = np.fft.irfft(np.fft.rfft(rhs, axis=1) * inv_hat, n=N, axis=1)
        else:
            new = np.einsum("bij,bj->bi", Minv, rhs)
        U = np.where(active[:, None], new, U)
    return U


def solve_burgers_1d(u0, nodes, nu: float = 0.01, t_final: float = 1.0, cfl: float = 0.5, dt_max: float = np.inf):
    """Eq. (3): periodic viscous Burgers on faces nodes ((N+1,) with x_0 = 0, x_N = 1, or (B, N+1)); u0 callable or
    periodic fine samples ((M,) or (B, M) at j/M). Returns (cell averages U (N,) or (B, N), n_steps int or (B,)).
    Cost = N x n_steps."""
    nodes = np.asarray(nodes, np.float64)
    single = nodes.ndim == 1
    X = np.atleast_2d(nodes)
    if not callable(u0) and np.ndim(u0) == 2 and X.shape[0] == 1:
        X = np.broadcast_to(X, (np.shape(u0)[0], X.shape[1]))
        single = False
    dx = np.diff(X, axis=1)
    if (dx <= 0).any():
        raise ValueError("nodes must strictly increase")
    U0 = _cell_averages(u0, X)
    n_steps = _burgers_steps(U0, dx, t_final, cfl, dt_max)
    uniform = bool(np.allclose(dx, dx[:, :1], rtol=0, atol=1e-14))
    U = _burgers_run(U0, dx, nu, t_final, n_steps, uniform=uniform)
    return (U[0], int(n_steps[0])) if single else (U, n_steps)


def rel_l2(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Relative L2 error over the last axis, (...,)."""
    return np.linalg.norm(pred - target, axis=-1) / np.maximum(np.linalg.norm(target, axis=-1), 1e-300)


def rbf_kernel(X1: np.ndarray, X2: np.ndarray, bandwidth: float) -> np.ndarray:
    """Eq. (6): k(x, y) = exp(-|x-y|^2 / (2 bw^2)); (n1, n2)."""
    d2 = (X1 * X1).sum(1)[:, None] + (X2 * X2).sum(1)[None] - 2 * X1 @ X2.T
    return np.exp(-np.maximum(d2, 0) / (2 * bandwidth ** 2))


def median_bandwidth(X: np.ndarray) -> float:
    """Median pairwise distance (the bandwidth of Eq. 6)."""
    d2 = (X * X).sum(1)[:, None] + (X * X).sum(1)[None] - 2 * X @ X.T
    iu = np.triu_indices(len(X), 1)
    return float(np.median(np.sqrt(np.maximum(d2[iu], 0)))) if len(iu[0]) else 1.0


def krr_fit_predict(X_D, Y_D, X_query, lam: float, bandwidth: float | None = None) -> np.ndarray:
    """Eq. (6): g_D(X_query) = k(X_query, X_D) (K + lam I)^{-1} Y_D; (Q, N_e)."""
    bw = median_bandwidth(X_D) if bandwidth is None else bandwidth
    Kt = rbf_kernel(X_D, X_D, bw) + lam * np.eye(len(X_D))
    return rbf_kernel(X_query, X_D, bw) @ np.linalg.solve(Kt, Y_D)


def proxy_reward(X_D, Y_D, x_new, y_new, X_val, Y_val, lam: float = 1e-3, cost_ratio=None, cost_weight: float = 0.0,
                 bandwidth: float | None = None) -> np.ndarray:
    """Eq. (7): reward of G candidate labels y_new (G, N_e) of one new input x_new (d,), given the proxy's data
    (X_D (n, d), Y_D (n, N_e)) and validation references (X_val (V, d), Y_val (V, N_e)); returns (G,).

    R = n_D (E(D) - E(D + (x, y))) / E(D) - c log(cost_ratio), E(D + (x, y)) by the rank-one update
    g'(v) = g(v) + beta_v (y - g(x)), beta_v = (k(v,x) - k_v^T Kt^{-1} k_x) / (1 + lam - k_x^T Kt^{-1} k_x)."""
    X_D, Y_D, X_val, Y_val = (np.asarray(t, np.float64) for t in (X_D, Y_D, X_val, Y_val))
    x_new, y_new = np.asarray(x_new, np.float64).reshape(1, -1), np.atleast_2d(np.asarray(y_new, np.float64))
    bw = median_bandwidth(X_D) if bandwidth is None else bandwidth
    n = len(X_D)
    Kt = rbf_kernel(X_D, X_D, bw) + lam * np.eye(n)  # (n, n)
    Kv = rbf_kernel(X_val, X_D, bw)  # (V, n)
    alpha = np.linalg.solve(Kt, Y_D)  # (n, N_e)
    pred = Kv @ alpha  # (V, N_e)
    E0 = rel_l2(pred, Y_val).mean()
    k_a = rbf_kernel(X_D, x_new, bw)[:, 0]  # (n,)
    s = np.linalg.solve(Kt, k_a)
    denom = 1.0 + lam - k_a @ s  # k(x, x) = 1 for the RBF kernel
    beta = (rbf_kernel(X_val, x_new, bw)[:, 0] - Kv @ s) / denom  # (V,)
    g_a = k_a @ alpha  # (N_e,)
    pred_new = pred[None] + beta[None, :, None] * (y_new - g_a)[:, None, :]  # (G, V, N_e)
    E1 = rel_l2(pred_new, Y_val[None]).mean(-1)  # (G,)
    R = n * (E0 - E1) / E0
    if cost_ratio is not None and cost_weight:
        R = R - cost_weight * np.log(np.asarray(cost_ratio, np.float64))
    return R


def group_advantages(R: torch.Tensor) -> torch.Tensor:
    """Eq. (8): A = (R - mean_G R) / (std_G R + 1e-8), over the last axis; (I, G)."""
    return (R - R.mean(-1, keepdim=True)) / (R.std(-1, keepdim=True) + 1e-8)


def density_from_action(w: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Eq. (5): rho = softplus(sum_j w_j phi_j) + 1e-3; w (..., F), feats (..., F, M) -> (..., M)."""
    # DEVIATION(2): the action is a whole density (then Eq. 4), not one point at a time
    z = np.einsum("...f,...fm->...m", w, feats)
    return np.logaddexp(0.0, z) + 1e-3


def gaussian_logp(w: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(w; mu, sigma^2 I) summed over the last axis (constant dropped); (...)."""
    return -((w - mu) ** 2).sum(-1) / (2 * sigma ** 2)


def policy_loss(logp_new, logp_old, adv, rl: str = "reinforce", clip: float = 0.2) -> torch.Tensor:
    """Eq. (8): REINFORCE -mean A log pi, or PPO -mean min(r A, clip(r) A) with r = pi/pi_old."""
    if rl == "reinforce":
        return -(adv * logp_new).mean()
    r = torch.exp(logp_new - logp_old)
    return -torch.minimum(r * adv, r.clamp(1 - clip, 1 + clip) * adv).mean()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# ---- torchrun: simulations sharded by rows, results all-gathered ----
# ---------------------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the torchrun process group; (0, 1) in one process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank `rank` among `world`: contiguous blocks in rank order, sizes differ by <= 1."""
    return rank * n // world, (rank + 1) * n // world


def sharded(fn, *arrays):
    """fn(*arrays) with the rows split across ranks: each rank runs fn on its block of rows, the outputs (an array or
    a tuple of arrays, row-aligned) are all-gathered and concatenated in rank order, so every rank holds what one
    process gets. Exact because the solvers treat each row on its own (Burgers takes its FFT path when every mesh
    of the batch is uniform: the batches here are all uniform or all adapted). One process: fn(*arrays)."""
    rank, world = rank_world()
    if world == 1:
        return fn(*arrays)
    lo, hi = shard_bounds(len(arrays[0]), rank, world)
    local = fn(*(a[lo:hi] for a in arrays)) if hi > lo else None
    parts = [None] * world
    dist.all_gather_object(parts, local)  # pickled: float64 labels arrive bit-exact
    parts = [p for p in parts if p is not None]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(z) for z in zip(*parts))
    return np.concatenate(parts)


def from_rank0(obj):
    """Rank 0's `obj` on every rank (what rank 0 alone computed: the policy, online-mode labels); identity in one
    process."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# ---- world: inputs, features, simulations, policy, surrogates ----
# ---------------------------------------------------------------------------------------------


def _fourier_field(rng: np.random.Generator, n: int, x: np.ndarray, length: float, modes: int = 64) -> np.ndarray:
    """g(x) = sum_j A_j cos(2 pi j x + phase_j), A_j ~ N(0, exp(-(2 pi j l)^2 / 2)); (n, len(x))."""
    j = np.arange(1, modes + 1)
    amp = rng.standard_normal((n, modes)) * np.exp(-(2 * np.pi * j * length) ** 2 / 4)
    phase = rng.uniform(0, 2 * np.pi, (n, modes))
    ang = 2 * np.pi * j[:, None] * x[None]  # (J, X): cos(t + p) = cos t cos p - sin t sin p
    return (amp * np.cos(phase)) @ np.cos(ang) - (amp * np.sin(phase)) @ np.sin(ang)


class World:
    """Inputs, references, simulations and cost accounting of one PDE toy (Eq. 1-3)."""

    def __init__(self, args):
        self.a = args
        self.burgers = args.pde == "burgers"
        self.N = args.n_nodes
        self.gap = args.min_gap_frac / (args.n_nodes - 1)
        self.xd = np.linspace(0, 1, args.density_res)
        if self.burgers:
            self.Mf = args.fine_res - 1  # periodic samples at j/Mf
            self.grid = np.arange(args.eval_res) / args.eval_res
        else:
            self.Mf = args.fine_res
            self.grid = np.linspace(0, 1, args.eval_res)
        self.xf = np.arange(self.Mf) / self.Mf if self.burgers else np.linspace(0, 1, self.Mf)

    # inputs ---------------------------------------------------------------------------------
    def sample_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, Mf) fine samples of a (Darcy) or u0 (Burgers)."""
        if self.burgers:  # u0 ~ N(0, 625 (-Delta + 25 I)^{-2}), periodic
            K = self.Mf // 2
            k = np.arange(K + 1)
            std = 25.0 / ((2 * np.pi * k) ** 2 + 25.0)
            c = (rng.standard_normal((n, K + 1)) + 1j * rng.standard_normal((n, K + 1))) * std / np.sqrt(2)
            c[:, 0] = rng.standard_normal(n) * std[0]
            c[:, -1] = 0
            return np.fft.irfft(c, n=self.Mf, axis=1) * self.Mf
        g = _fourier_field(rng, n, self.xf, self.a.length_scale)
        if self.a.coef == "channels":
            return np.where(g > 0, self.a.contrast, 1.0)
        return np.exp(g / g.std(1, keepdims=True))

    def surrogate_input(self, fields: np.ndarray) -> np.ndarray:
        """(n, Ne): log a (Darcy) or u0 (Burgers) on the eval grid, not rescaled (kernel ridge takes the median
        bandwidth, the FNO / MLP standardise their input)."""
        v = _eval_field(fields, self.grid, periodic=self.burgers)
        return v if self.burgers else np.log(v)

    # simulations ----------------------------------------------------------------------------
    def simulate(self, fields: np.ndarray, nodes: np.ndarray, face: str | None = None):
        """Solve each input on its mesh ((n, N) nodes) -> (labels on the eval grid (n, Ne), cost per solve (n,))."""
        a = self.a
        if self.burgers:
            U, n_steps = solve_burgers_1d(fields, nodes, a.nu, a.t_final, a.cfl)
            centres = (nodes[:, 1:] + nodes[:, :-1]) / 2
            return interp_to_grid(centres, U, self.grid, periodic=True), (nodes.shape[1] - 1) * n_steps
        u = solve_darcy_1d(fields, nodes, 1.0, face or a.face_coef, a.quad)
        return interp_to_grid(nodes, u, self.grid), np.full(len(nodes), nodes.shape[1], dtype=np.int64)

    def reference(self, fields: np.ndarray):
        """Fine-mesh references on the eval grid (n, Ne) and their cost per solve."""
        a = self.a
        if self.burgers:
            nodes = np.linspace(0, 1, a.ref_cells + 1)[None]
            # a batch runs until its slowest row is done: batch inputs of similar step counts (rows are independent,
            # so the result does not depend on the grouping)
            steps = _burgers_steps(_cell_averages(fields, nodes), np.diff(nodes, axis=1), a.t_final, a.cfl, np.inf)
            order = np.argsort(steps, kind="stable")
            out, cost = np.empty((len(fields), len(self.grid))), np.empty(len(fields), dtype=np.int64)
            for i in range(0, len(fields), 64):  # batches keep the FFT arrays small
                idx = order[i:i + 64]
                out[idx], cost[idx] = self.simulate(fields[idx], nodes.repeat(len(idx), 0))
            return out, cost
        nodes = np.linspace(0, 1, self.Mf)[None].repeat(len(fields), 0)
        u = solve_darcy_1d(fields, nodes, 1.0, "harmonic", a.quad)
        return interp_to_grid(nodes[0], u, self.grid), np.full(len(fields), self.Mf, dtype=np.int64)

    def uniform_nodes(self, n: int, n_nodes: int | None = None) -> np.ndarray:
        return np.linspace(0, 1, n_nodes or self.N)[None].repeat(n, 0)

    def uniform_cost_of(self, fields: np.ndarray, n_nodes: int) -> np.ndarray:
        if not self.burgers:
            return np.full(len(fields), n_nodes)
        X = self.uniform_nodes(len(fields), n_nodes)
        U0 = _cell_averages(fields, X)
        return (n_nodes - 1) * _burgers_steps(U0, np.diff(X, axis=1), self.a.t_final, self.a.cfl, np.inf)

    # features -------------------------------------------------------------------------------
    def _pool(self, d: np.ndarray, window: int) -> np.ndarray:
        """Box-smooth fine-grid values (n, Mf) over `window` samples, average-pool to the density grid, / max."""
        s = _box(d, window, self.burgers)
        stride = max((len(self.xf)) // (len(self.xd) - 1), 1)
        s = _box(s, stride + 1, self.burgers)
        s = _eval_field(s, self.xd, periodic=self.burgers)
        return s / (s.max(1, keepdims=True) + 1e-12)

    def features(self, fields: np.ndarray) -> np.ndarray:
        """phi_j(x; s) of Eq. (5) on the density grid; (n, F, M)."""
        n, M = len(fields), len(self.xd)
        out = [np.ones((n, M))]
        if self.burgers:
            du = (np.roll(fields, -1, 1) - np.roll(fields, 1, 1)) * self.Mf / 2
            for w in (9, 65, 257):
                out.append(self._pool(np.maximum(-du, 0), w))
            out.append(self._pool(np.abs(fields), 9))
        else:
            la = np.log(fields)
            d = np.abs(np.diff(la, axis=1)) * (self.Mf - 1)
            d = np.concatenate([d, d[:, -1:]], 1)
            for w in (9, 65, 257):
                out.append(self._pool(d, w))
            out.append(np.broadcast_to(np.minimum(self.xd, 1 - self.xd), (n, M)))
        return np.stack(out, 1)

    def surrogate_feature(self, pred: np.ndarray) -> np.ndarray:
        """|d g_D(a)/dx| of the proxy prediction (n, Ne) on the density grid, / max; (n, M)."""
        d = np.abs(np.gradient(pred, self.grid, axis=1))
        v = np.stack([interp_to_grid(self.grid, r, self.xd, periodic=self.burgers) for r in d])
        return v / (v.max(1, keepdims=True) + 1e-12)

    def monitor_density(self, fields: np.ndarray, beta: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Classical equidistribution baseline: rho = 1 + beta m; returns (rho (n, M), pilot cost (n,)).
        gradient: m = |d log a/dx| (Darcy) or |du0/dx| (Burgers), box-smoothed over 9 then 17 fine samples, in its
        raw units (1/length; not divided by log contrast or a max). pilot_solve: m = sqrt(1 + v'^2), v' the
        slope of a uniform pilot solve with half the cells divided by its mean |.| (cost counted)."""
        cost = np.zeros(len(fields), dtype=np.int64)
        if kind == "gradient":
            if self.burgers:
                d = np.abs(np.roll(fields, -1, 1) - np.roll(fields, 1, 1)) * self.Mf / 2
            else:
                d = np.abs(np.diff(np.log(fields), axis=1)) * (self.Mf - 1)
                d = np.concatenate([d, d[:, -1:]], 1)
            m = _eval_field(_box(_box(d, 9, self.burgers), 17, self.burgers), self.xd, periodic=self.burgers)
        else:  # arc length of a uniform pilot solve with half the cells (cost counted)
            n_pilot = (self.N - 1) // 2 + 1
            nodes = self.uniform_nodes(len(fields), n_pilot)
            y, cost = self.simulate(fields, nodes)
            du = np.gradient(y, self.grid, axis=1)
            du = du / (np.abs(du).mean(1, keepdims=True) + 1e-12)
            m = np.stack([interp_to_grid(self.grid, r, self.xd, periodic=self.burgers) for r in np.sqrt(1 + du ** 2)])
        return 1.0 + beta * m, cost

    def random_density(self, rng: np.random.Generator, n: int) -> np.ndarray:
        g = _fourier_field(rng, n, self.xd, 0.1)
        return np.exp(g / (g.std(1, keepdims=True) + 1e-12))


def _box(d: np.ndarray, window: int, periodic: bool) -> np.ndarray:
    """Moving average over `window` samples along axis 1 (wrapped or edge-padded)."""
    if window <= 1:
        return d
    h = window // 2
    pad = np.pad(d, ((0, 0), (h, h)), mode="wrap" if periodic else "edge")
    c = np.concatenate([np.zeros((len(d), 1)), np.cumsum(pad, 1)], 1)
    return (c[:, 2 * h + 1:] - c[:, :-2 * h - 1]) / (2 * h + 1)


class MeshPolicy(nn.Module):
    """Eq. (5): mu(s) = theta (linear: the same weights for every input; the features carry the input) or
    MLP(mean/max pooled features), 2 x 32 tanh; mu = 0 gives the uniform mesh."""

    def __init__(self, n_feat: int, kind: str = "linear", hidden: int = 32):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.theta = nn.Parameter(torch.zeros(n_feat, dtype=torch.float64))
        else:
            self.net = nn.Sequential(nn.Linear(2 * n_feat, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, n_feat)).double()
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, F, M) -> mu (B, F)
        if self.kind == "linear":
            return self.theta.expand(feats.shape[0], -1)
        return self.net(torch.cat([feats.mean(-1), feats.amax(-1)], -1))


class SpectralConv1d(nn.Module):
    """FNO layer (zongyi-li/fourier_neural_operator fourier_1d.py): multiply the lowest `modes` Fourier modes."""

    def __init__(self, width: int, modes: int):
        super().__init__()
        self.modes = modes
        scale = 1 / (width * width)
        self.weight = nn.Parameter(scale * torch.rand(width, width, modes, dtype=torch.cfloat))

    def forward(self, x):  # (B, C, L)
        xf = torch.fft.rfft(x)
        m = min(self.modes, xf.shape[-1])
        out = torch.zeros_like(xf)
        out[:, :, :m] = torch.einsum("bix,iox->box", xf[:, :, :m], self.weight[:, :, :m])
        return torch.fft.irfft(out, n=x.shape[-1])


class FNO1d(nn.Module):
    """Eq. (9): lift (input, x) -> width, `layers` Fourier layers with 1x1 skips and GELU, project to u."""

    def __init__(self, width=32, layers=4, modes=12, pad=0):
        super().__init__()
        self.pad = pad
        self.lift = nn.Linear(2, width)
        self.spec = nn.ModuleList(SpectralConv1d(width, modes) for _ in range(layers))
        self.skip = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(layers))
        self.proj = nn.Sequential(nn.Linear(width, 128), nn.GELU(), nn.Linear(128, 1))

    def forward(self, a, x):  # a (B, L), x (L,) -> (B, L)
        h = self.lift(torch.stack([a, x.expand_as(a)], -1)).permute(0, 2, 1)  # (B, C, L)
        if self.pad:
            h = F.pad(h, (0, self.pad))  # non-periodic Darcy: pad so the FFT does not wrap
        for i, (s, k) in enumerate(zip(self.spec, self.skip)):
            h = s(h) + k(h)
            if i < len(self.spec) - 1:
                h = F.gelu(h)
        if self.pad:
            h = h[..., :-self.pad]
        return self.proj(h.permute(0, 2, 1)).squeeze(-1)


class MLPSurrogate(nn.Module):
    def __init__(self, n: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, n))

    def forward(self, a, x):
        return self.net(a)


def surrogate_loss(out: torch.Tensor, y: torch.Tensor, batch_size: int, world_size: int = 1) -> torch.Tensor:
    """Eq. (9): mean relative L2 over a minibatch of `batch_size` rows, of which out, y (n, Ne) are this rank's n.
    The rank's mean is scaled by n * world_size / batch_size, so that averaging the ranks' gradients
    (common.all_reduce_grads) gives the one-process gradient of the whole minibatch; in one process the factor
    is exactly 1."""
    loss = (torch.linalg.norm(out - y, dim=-1) / torch.linalg.norm(y, dim=-1).clamp_min(1e-12)).mean()
    return loss * (len(out) * world_size / batch_size)


def train_eval_surrogate(args, world: World, X: np.ndarray, Y: np.ndarray, X_test: np.ndarray, Y_test: np.ndarray,
                         device, seed: int) -> dict:
    """Eq. (9): train a fresh surrogate on (X, Y) and return test relative L2 / RMSE against fine references."""
    if args.surrogate == "krr":
        pred = krr_fit_predict(X, Y, X_test, args.krr_lambda)
    else:
        torch.manual_seed(seed)
        xm, xs = X.mean(), X.std() + 1e-12
        ys = np.abs(Y).mean() + 1e-12
        Xt = torch.tensor((X - xm) / xs, dtype=torch.float32, device=device)
        Yt = torch.tensor(Y / ys, dtype=torch.float32, device=device)
        grid = torch.tensor(world.grid, dtype=torch.float32, device=device)
        if args.surrogate == "fno":
            model = FNO1d(args.fno_width, args.fno_layers, args.fno_modes, pad=0 if world.burgers else 8)
        else:
            model = MLPSurrogate(X.shape[1])
        model = model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(args.surrogate_epochs // 4, 1), gamma=0.5)
        gen = torch.Generator().manual_seed(seed)  # same seed and init on every rank: same permutation and weights
        bs = args.per_device_batch_size
        rank, world_size = rank_world()
        for _ in range(args.surrogate_epochs):
            perm = torch.randperm(len(Xt), generator=gen).to(device)
            for i in range(0, len(Xt), bs):
                idx = perm[i:i + bs]
                lo, hi = shard_bounds(len(idx), rank, world_size)  # torchrun: this rank's rows of the minibatch
                opt.zero_grad(set_to_none=True)
                if hi > lo:
                    with common.autocast(device):
                        out = model(Xt[idx[lo:hi]], grid).float()
                    loss = surrogate_loss(out, Yt[idx[lo:hi]], len(idx), world_size)
                    loss.backward()
                else:  # more ranks than rows left: contribute zeros so the all-reduce still matches
                    loss = torch.zeros((), device=device)
                    for p_ in model.parameters():
                        p_.grad = torch.zeros_like(p_)
                if world_size > 1:  # every rank sees a NaN of any rank, so all stop together
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)
                if not torch.isfinite(loss):
                    raise UserError("surrogate loss became NaN; lower --learning_rate")
                common.all_reduce_grads(model, world_size)
                opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            Xq = torch.tensor((X_test - xm) / xs, dtype=torch.float32, device=device)
            pred = np.concatenate([model(Xq[i:i + 256], grid).float().cpu().numpy() for i in range(0, len(Xq), 256)])
            pred = pred.astype(np.float64) * ys
    return {"test_rel_l2": float(rel_l2(pred, Y_test).mean()),
            "test_rmse": float(np.sqrt(((pred - Y_test) ** 2).mean()))}


# ---------------------------------------------------------------------------------------------
# ---- RL: rollouts of meshes, rewards, policy training ----
# ---------------------------------------------------------------------------------------------


class Agent:
    """The RL mesh policy with its data for the proxy reward (Eq. 5-8)."""

    def __init__(self, args, world: World, reward: str, X_D, Y_D, X_val, Y_val, gen: torch.Generator):
        self.a, self.w, self.reward, self.gen = args, world, reward, gen
        self.X_D, self.Y_D, self.X_val, self.Y_val = X_D, Y_D, X_val, Y_val
        n_feat = 5 + (args.state == "a+surrogate")
        self.policy = MeshPolicy(n_feat, args.policy)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=args.policy_lr)
        self.cost = 0  # simulation cost spent by policy training (and per-query candidates online)

    def state(self, fields: np.ndarray) -> np.ndarray:
        feats = self.w.features(fields)
        if self.a.state == "a+surrogate":
            pred = krr_fit_predict(self.X_D, self.Y_D, self.w.surrogate_input(fields), self.a.krr_lambda)
            feats = np.concatenate([feats, self.w.surrogate_feature(pred)[:, None]], 1)
        return feats

    def mean_nodes(self, fields: np.ndarray) -> np.ndarray:
        feats = self.state(fields)
        with torch.no_grad():
            mu = self.policy(torch.from_numpy(feats)).detach().numpy()
        return mesh_from_density(density_from_action(mu, feats), self.w.N, self.w.gap)

    def rollout(self, fields: np.ndarray, refs: np.ndarray | None):
        """G actions per input: returns feats, w (I, G, F), labels (I, G, Ne), cost (I, G), rewards (I, G),
        oracle rewards or None."""
        I, G = len(fields), self.a.group_size
        feats = self.state(fields)  # (I, F, M)
        with torch.no_grad():
            mu = self.policy(torch.from_numpy(feats)).detach()  # (I, F)
        w = mu[:, None] + self.a.sigma * torch.randn(I, G, mu.shape[-1], generator=self.gen, dtype=torch.float64)
        rho = density_from_action(w.numpy(), np.repeat(feats[:, None], G, 1))  # (I, G, M)
        nodes = mesh_from_density(rho.reshape(I * G, -1), self.w.N, self.w.gap)
        y, cost = self.w.simulate(np.repeat(fields, G, 0), nodes)
        y, cost = y.reshape(I, G, -1), cost.reshape(I, G)
        self.cost += int(cost.sum())
        oracle = None if refs is None else -np.log(rel_l2(y, refs[:, None]))  # (I, G)
        if self.reward == "oracle":
            R = oracle
        else:
            x_in = self.w.surrogate_input(fields)
            ucost = self.w.uniform_cost_of(fields, self.w.N)
            R = np.stack([proxy_reward(self.X_D, self.Y_D, x_in[i], y[i], self.X_val, self.Y_val, self.a.krr_lambda,
                                       cost[i] / ucost[i], self.a.cost_weight) for i in range(I)])
        return feats, w, y, cost, R, oracle

    def update(self, feats, w, R) -> dict:
        adv = group_advantages(torch.from_numpy(R))  # (I, G)
        ft = torch.from_numpy(feats)
        logp_old = gaussian_logp(w, self.policy(ft).detach()[:, None], self.a.sigma)
        for _ in range(1 if self.a.rl == "reinforce" else self.a.ppo_epochs):
            logp = gaussian_logp(w, self.policy(ft)[:, None], self.a.sigma)  # (I, G)
            loss = policy_loss(logp, logp_old, adv, self.a.rl, self.a.ppo_clip)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return {"policy_loss": loss.item(), "adv_mean": adv.mean().item()}


def train_policy(agent: Agent, fields: np.ndarray, refs: np.ndarray | None, val_fields, val_refs, rng, log) -> list:
    """Pretrain mode of Eq. (8): `policy_iters` iterations, each `instances_per_iter` inputs x G actions."""
    # DEVIATION(3): a one-step bandit trained once on a pool (proxy data = the warm-up set), then frozen
    a = agent.a
    rows = []
    bar = tqdm(range(a.policy_iters), desc="policy", leave=False, dynamic_ncols=True)
    for it in bar:
        idx = rng.choice(len(fields), a.instances_per_iter, replace=False)
        feats, w, y, cost, R, oracle = agent.rollout(fields[idx], None if refs is None else refs[idx])
        info = agent.update(feats, w, R)
        row = {"policy_iter": it, "reward": float(R.mean()), **info}
        if oracle is not None and agent.reward == "proxy":  # pitfall 7: does the proxy rank like the truth?
            row["proxy_oracle_spearman"] = float(np.mean([spearman(R[i], oracle[i]) for i in range(len(R))]))
        if it % 25 == 0 or it == a.policy_iters - 1:  # diagnostic only (not counted as cost)
            yv, _ = agent.w.simulate(val_fields, agent.mean_nodes(val_fields))
            row["val_label_rel_l2"] = float(rel_l2(yv, val_refs).mean())
            bar.set_postfix(val_label=f"{row['val_label_rel_l2']:.4f}")
        rows.append(log(row))
    return rows


# ---------------------------------------------------------------------------------------------
# ---- flags ----
# ---------------------------------------------------------------------------------------------


def _arm_list(args) -> list[str]:
    if args.method != "all":
        return [args.method]
    arms = ["uniform", "uniform_hi", "exact", "random", "monitor", "rl", "rl_oracle"]
    if args.pde == "burgers":  # after rl: it matches the rl arm's cost per query
        arms.append("uniform_cost")
    return arms


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--{flag} '{text}' must be comma-separated integers, e.g. 0,1,2") from None


def _checkpoints(args) -> list[int]:
    ks = sorted(set(_ints(args.checkpoints, "checkpoints")))
    common.require(ks and ks[0] >= 1 and ks[-1] <= args.budget,
                   f"--checkpoints {ks} must lie in 1..--budget ({args.budget}); raise --budget or lower them")
    return ks


def _betas(args) -> list[float]:
    try:
        betas = [float(b) for b in args.monitor_betas.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--monitor_betas '{args.monitor_betas}' must be comma-separated numbers, e.g. 0.01,0.1") from None
    common.require(betas and all(np.isfinite(b) and b > 0 for b in betas),
                   f"--monitor_betas '{args.monitor_betas}' must be positive numbers (rho = 1 + beta m)")
    return betas


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work, before anything is loaded or written."""
    req = common.require
    burg = args.pde == "burgers"
    # problem
    req(args.contrast > 0 and np.isfinite(args.contrast), f"--contrast {args.contrast} must be > 0 (a = contrast on the channels)")
    req(args.length_scale > 0, f"--length_scale {args.length_scale} must be > 0")
    req(args.n_nodes >= (5 if burg else 3), f"--n_nodes {args.n_nodes} must be >= {5 if burg else 3} "
        f"({'4 cells, so that the monitor pilot mesh has 2' if burg else 'one interior node'})")
    req(args.quad >= 1, f"--quad {args.quad} must be >= 1 (sub-points of the harmonic face rule)")
    req(args.density_res >= 3, f"--density_res {args.density_res} must be >= 3")
    req(args.fine_res >= 65 and (args.fine_res - 1) % (args.density_res - 1) == 0,
        f"--fine_res {args.fine_res}: need >= 65 and fine_res - 1 a multiple of --density_res - 1 (e.g. 4097 and 257)")
    req(args.fine_res > args.n_nodes, f"--fine_res {args.fine_res} must exceed --n_nodes {args.n_nodes} "
        f"(the Darcy reference lives on the fine grid)")
    if burg:
        req(args.nu >= 0 and np.isfinite(args.nu), f"--nu {args.nu} must be >= 0 (viscosity)")
        req(args.t_final > 0, f"--t_final {args.t_final} must be > 0 (zero time steps would cost nothing and say nothing)")
        req(0 < args.cfl <= 1, f"--cfl {args.cfl} must be in (0, 1] (explicit Rusanov flux: stable for cfl <= 1)")
        req(args.ref_cells > (args.n_nodes - 1) * args.hi_factor,
            f"--ref_cells {args.ref_cells} must exceed the finest simulation mesh ((n_nodes - 1) x hi_factor = "
            f"{(args.n_nodes - 1) * args.hi_factor} cells): references must be finer than what they judge")
    else:
        req(args.fine_res > (args.n_nodes - 1) * args.hi_factor + 1,
            f"--fine_res {args.fine_res} must exceed the uniform_hi mesh ({(args.n_nodes - 1) * args.hi_factor + 1} nodes)")
    req(args.eval_res >= 3, f"--eval_res {args.eval_res} must be >= 3 (Darcy's grid includes the two zero boundary "
        f"values: fewer points give a zero reference and a NaN error)")
    # mesh and policy
    req(0 <= args.min_gap_frac < 1, f"--min_gap_frac {args.min_gap_frac} must be in [0, 1): g (N-1) < 1 is needed to fit the nodes")
    req(args.sigma > 0, f"--sigma {args.sigma} must be > 0 (policy std)")
    # RL
    req(args.policy_lr > 0, f"--policy_lr {args.policy_lr} must be > 0")
    req(args.policy_iters >= 1, f"--policy_iters {args.policy_iters} must be >= 1 (0 leaves the rl arms an untrained "
        f"policy, i.e. the uniform mesh)")
    req(args.group_size >= 2, f"--group_size {args.group_size} must be >= 2 (group advantages need a spread)")
    req(1 <= args.instances_per_iter <= args.n_policy_inst,
        f"--instances_per_iter {args.instances_per_iter} must be in 1..--n_policy_inst ({args.n_policy_inst})")
    req(0 < args.ppo_clip < 1, f"--ppo_clip {args.ppo_clip} must be in (0, 1)")
    req(args.ppo_epochs >= 1, f"--ppo_epochs {args.ppo_epochs} must be >= 1")
    req(args.cost_weight >= 0, f"--cost_weight {args.cost_weight} must be >= 0 (c of Eq. 7 penalises cost)")
    req(args.krr_lambda > 0, f"--krr_lambda {args.krr_lambda} must be > 0 (ridge of Eq. 6)")
    req(args.n_val >= 2, f"--n_val {args.n_val} must be >= 2 (proxy validation error and beta tuning)")
    req(args.n_test >= 1, f"--n_test {args.n_test} must be >= 1")
    # baselines
    req(args.hi_factor >= 2, f"--hi_factor {args.hi_factor} must be >= 2 (uniform_hi refines the cells by it)")
    _betas(args)
    req(args.method != "uniform_cost", "--method uniform_cost matches the rl arm's cost per query, so it runs only "
        "after rl: use --method all --pde burgers")
    # data and surrogate
    req(args.budget >= 2, f"--budget {args.budget} must be >= 2")
    ks = _checkpoints(args)
    req(2 <= args.n_warmup <= ks[0], f"--n_warmup {args.n_warmup} must be in 2..the smallest checkpoint ({ks[0]}): "
        f"the proxy needs >= 2 points and every arm's data set starts with the same queries")
    # (checked for every surrogate: a value that is never meaningful is a typo even where krr ignores it)
    req(args.surrogate_epochs >= 1, f"--surrogate_epochs {args.surrogate_epochs} must be >= 1 (0 reports an untrained "
        f"fno / mlp surrogate)")
    req(args.per_device_batch_size >= 1, f"--per_device_batch_size {args.per_device_batch_size} must be >= 1")
    req(args.learning_rate > 0, f"--learning_rate {args.learning_rate} must be > 0")
    req(args.weight_decay >= 0, f"--weight_decay {args.weight_decay} must be >= 0")
    req(min(args.fno_width, args.fno_layers, args.fno_modes) >= 1, "--fno_width, --fno_layers, --fno_modes must be >= 1")
    # run
    if args.full_table:
        seeds = _ints(args.seeds, "seeds")
        req(seeds and len(set(seeds)) == len(seeds), f"--seeds '{args.seeds}' must list distinct seeds")
    req(args.threads is None or args.threads >= 1, f"--threads {args.threads} must be >= 1")


def preflight(args) -> None:
    """What the run will use besides flags: the surrogate's device."""
    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            raise UserError(f"--device '{args.device}' is not a torch device ({e}); use cpu, cuda or mps") from None
        common.require(dev.type != "cuda" or torch.cuda.is_available(),
                       f"--device {args.device}: CUDA is not available here; drop --device (cpu) or run on a GPU machine")
        common.require(dev.type != "mps" or torch.backends.mps.is_available(), f"--device {args.device}: MPS is not available here")


def say(msg: str) -> None:
    """tqdm.write on rank 0 only."""
    if common.is_main():
        tqdm.write(msg)


# ---------------------------------------------------------------------------------------------
# ---- one seed: shared inputs and references, one mesher per arm ----
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SeedData:
    """What every arm of one seed shares: the same query inputs in the same order, validation and test inputs
    with their fine references (test references are evaluation, not budget; validation ones are counted by the
    arms that use them)."""
    args: argparse.Namespace
    world: World
    seed: int
    ss: list
    fields: np.ndarray
    val_fields: np.ndarray
    test_fields: np.ndarray
    X_all: np.ndarray
    X_val: np.ndarray
    X_test: np.ndarray
    Y_val: np.ndarray
    Y_test: np.ndarray
    val_cost: int
    pool: tuple | None = None  # (fields, refs, ref cost) of the policy-training pool, shared by rl and rl_oracle

    def policy_pool(self):
        if self.pool is None:
            f = self.world.sample_inputs(np.random.default_rng(self.ss[4]), self.args.n_policy_inst)
            refs, cost = sharded(self.world.reference, f)
            self.pool = (f, refs, int(cost.sum()))
        return self.pool


def prepare_seed(args, seed: int) -> SeedData:
    """Inputs of one seed and the fine references of its validation and test inputs."""
    common.seed_everything(seed)
    world = World(args)
    ss = np.random.SeedSequence(seed).spawn(6)
    rng_data, rng_val, rng_test = (np.random.default_rng(s) for s in ss[:3])
    fields = world.sample_inputs(rng_data, args.budget)
    val_fields = world.sample_inputs(rng_val, args.n_val)
    test_fields = world.sample_inputs(rng_test, args.n_test)
    # torchrun: every rank draws the same inputs; `sharded` splits their solves across ranks and all-gathers
    say(f"[seed {seed}] reference solves for {args.n_val} val + {args.n_test} test inputs ...")
    t = time.time()
    Y_val, val_cost = sharded(world.reference, val_fields)
    if world.burgers:  # say what the references cost: they dominate a Burgers run
        arms = _arm_list(args)
        more = args.n_test + (args.n_policy_inst if {"rl", "rl_oracle"} & set(arms) and args.rl_mode == "pretrain"
                              else 0) + (args.budget if "exact" in arms else 0)
        per = (time.time() - t) / args.n_val
        say(f"[seed {seed}] Burgers references ({args.ref_cells} cells, ~{val_cost.mean() / args.ref_cells:.0f} time "
            f"steps each): {per:.2f} s per solve here; {more} more (test, policy pool, exact arm) take about "
            f"{per * more / 60:.1f} min")
    Y_test, _ = sharded(world.reference, test_fields)
    X_all, X_val, X_test = (world.surrogate_input(f) for f in (fields, val_fields, test_fields))
    return SeedData(args, world, seed, ss, fields, val_fields, test_fields, X_all, X_val, X_test, Y_val, Y_test,
                    int(val_cost.sum()))


class Mesher:
    """One arm: how it meshes a query (`nodes`), what it spends before the first query (`setup`, into
    `setup_cost`: validation references, tuning, policy training), and how it collects its data set (`collect`:
    labels and cost per query; per-query extras such as pilot solves go to `extra_q`). Every arm sees the same
    inputs in the same order; total cost at k queries = dataset cost[:k] + setup_cost + extra_q[:k]."""

    def __init__(self, d: SeedData, arm: str, results: dict, arm_seed: int, log_policy):
        self.d, self.arm, self.results, self.log_policy = d, arm, results, log_policy
        self.arm_seed, self.rng = arm_seed, np.random.default_rng(arm_seed)  # random meshes, policy-pool draws
        self.a, self.w = d.args, d.world
        self.setup_cost, self.info = 0, {}
        self.extra_q = np.zeros(d.args.budget, dtype=np.int64)

    def setup(self) -> None:
        pass

    def nodes(self, fields: np.ndarray):
        """-> (nodes (n, N'), pilot cost per input (n,))."""
        raise NotImplementedError

    def collect(self):
        nodes, pilot = self.nodes(self.d.fields)
        self.extra_q += np.asarray(pilot, dtype=np.int64)
        return sharded(self.w.simulate, self.d.fields, nodes)

    def example_nodes(self):
        return None

    def label_error(self) -> float:
        """Label error of this arm's meshes on the test inputs (diagnostic, not counted)."""
        y, _ = sharded(self.w.simulate, self.d.test_fields, self.nodes(self.d.test_fields)[0])
        return float(rel_l2(y, self.d.Y_test).mean())


class UniformMesher(Mesher):
    def n_nodes(self) -> int:
        return self.w.N

    def nodes(self, fields):
        return self.w.uniform_nodes(len(fields), self.n_nodes()), np.zeros(len(fields), dtype=np.int64)


class UniformHiMesher(UniformMesher):
    def n_nodes(self) -> int:
        return (self.w.N - 1) * self.a.hi_factor + 1


class UniformCostMesher(UniformMesher):
    """The largest uniform mesh whose mean cost per query, on the same query inputs, stays within the rl arm's
    (Burgers: cost = cells x time steps, and the steps depend on each input's max |u0|)."""

    def setup(self):
        target = self.results["rl"]["cost_per_query"]
        cost = lambda n: float(self.w.uniform_cost_of(self.d.fields, n).mean())  # noqa: E731
        n = self.w.N
        if cost(n) <= target:
            while cost(n + 1) <= target:
                n += 1
        else:
            while n > 3 and cost(n) > target:
                n -= 1
        self.best = n
        self.info.update(n_nodes=n, matched_cost_per_query=target)

    def n_nodes(self) -> int:
        return self.best


class ExactMesher(Mesher):
    """Fine-reference labels (the upper bound), at the reference's cost."""

    def collect(self):
        return sharded(self.w.reference, self.d.fields)

    def label_error(self) -> float:
        return 0.0  # its labels are the references themselves


class RandomMesher(Mesher):
    def nodes(self, fields):
        rho = self.w.random_density(self.rng, len(fields))
        return mesh_from_density(rho, self.w.N, self.w.gap), np.zeros(len(fields), dtype=np.int64)

    def example_nodes(self):
        return self.nodes(self.d.test_fields[:3])[0].tolist()


class MonitorMesher(Mesher):
    """Classical equidistribution: rho = 1 + beta m, beta tuned on the validation references (their cost and the
    tuning solves are counted)."""

    def setup(self):
        a, d = self.a, self.d
        self.kind = a.monitor if a.monitor != "auto" else ("pilot_solve" if self.w.burgers else "gradient")
        best = None
        for beta in _betas(a):
            rho, pc = sharded(lambda f: self.w.monitor_density(f, beta, self.kind), d.val_fields)
            yv, c = sharded(self.w.simulate, d.val_fields, mesh_from_density(rho, self.w.N, self.w.gap))
            self.setup_cost += int(c.sum() + np.sum(pc))
            err = float(rel_l2(yv, d.Y_val).mean())
            self.info[f"val_label_beta_{beta:g}"] = err
            if best is None or err < best[1]:
                best = (beta, err)
        self.setup_cost += d.val_cost
        self.beta = self.info["beta"] = best[0]
        say(f"[seed {d.seed}] monitor ({self.kind}): beta {best[0]:g} val label error {best[1]:.4f}")

    def nodes(self, fields):  # the pilot solves of `pilot_solve` are sharded too
        rho, pc = sharded(lambda g: self.w.monitor_density(g, self.beta, self.kind), fields)
        return mesh_from_density(rho, self.w.N, self.w.gap), pc

    def example_nodes(self):
        return self.nodes(self.d.test_fields[:3])[0].tolist()


class RLMesher(Mesher):
    """The method (Eq. 5-8): n_warmup uniform queries give the proxy its first data; a policy trained on a pool of
    inputs (pretrain, then frozen) or per query (online, keeping the best of G) meshes the rest."""

    def setup(self):
        a, d = self.a, self.d
        self.reward = "oracle" if self.arm == "rl_oracle" else a.reward
        nw = a.n_warmup
        self.y_w, self.c_w = sharded(self.w.simulate, d.fields[:nw], self.w.uniform_nodes(nw))
        gen = torch.Generator().manual_seed(self.arm_seed % 2 ** 63)
        self.agent = Agent(a, self.w, self.reward, d.X_all[:nw], self.y_w, d.X_val, d.Y_val, gen)
        self.setup_cost += d.val_cost  # the proxy's validation references
        if a.rl_mode != "pretrain":
            return
        # oracle reward needs the pool's fine solves (counted); the proxy uses them for diagnostics only
        pol_fields, pol_refs, pol_cost = d.policy_pool()
        if self.reward == "oracle":
            self.setup_cost += pol_cost
        if common.is_main():  # torchrun: the policy trains on rank 0 (its rollouts unsharded), then is broadcast
            train_policy(self.agent, pol_fields, pol_refs, d.val_fields, d.Y_val, self.rng, self.log_policy)
        if rank_world()[1] > 1:
            state, self.agent.cost = from_rank0((self.agent.policy.state_dict(), self.agent.cost))
            self.agent.policy.load_state_dict(state)
        self.info["policy_theta" if a.policy == "linear" else "policy"] = (
            self.agent.policy.theta.tolist() if a.policy == "linear" else "mlp")
        self.setup_cost += self.agent.cost  # every policy-training simulation

    def nodes(self, fields):
        return self.agent.mean_nodes(fields), np.zeros(len(fields), dtype=np.int64)

    def collect(self):
        a, d, nw = self.a, self.d, self.a.n_warmup
        Y, cq = np.empty((a.budget, len(self.w.grid))), np.empty(a.budget, dtype=np.int64)
        Y[:nw], cq[:nw] = self.y_w, self.c_w
        if a.rl_mode == "pretrain":
            Y[nw:], cq[nw:] = sharded(self.w.simulate, d.fields[nw:], self.agent.mean_nodes(d.fields[nw:]))
            return Y, cq
        # online: per query G candidates, proxy on the data so far, update, keep the best.
        # torchrun: rank 0 runs the sequential loop; the other ranks receive its labels and policy
        agent, main_rank = self.agent, common.is_main()
        for q in tqdm(range(nw, a.budget) if main_rank else (), desc="online", leave=False):
            agent.X_D, agent.Y_D = d.X_all[:q], Y[:q]
            ref_q = None
            if self.reward == "oracle":  # the oracle needs a fine solve of the query (counted)
                ref_q, c_ref = self.w.reference(d.fields[q:q + 1])
                self.extra_q[q] += int(c_ref.sum())
            feats, w, y, c, R, _ = agent.rollout(d.fields[q:q + 1], ref_q)
            row = agent.update(feats, w, R)
            self.log_policy({"query": q, "reward": float(R.mean()), **row})
            j = int(np.argmax(R[0]))
            Y[q], cq[q] = y[0, j], c[0, j]
            self.extra_q[q] += int(c[0].sum() - c[0, j])  # the kept candidate is the query, the rest is extra
        if rank_world()[1] > 1:
            Y, cq, self.extra_q, agent.X_D, agent.Y_D, state = from_rank0(
                (Y, cq, self.extra_q, agent.X_D, agent.Y_D, agent.policy.state_dict()))
            agent.policy.load_state_dict(state)
        return Y, cq

    def example_nodes(self):
        return self.agent.mean_nodes(self.d.test_fields[:3]).tolist()


MESHERS = {"uniform": UniformMesher, "uniform_cost": UniformCostMesher, "uniform_hi": UniformHiMesher,
           "exact": ExactMesher, "random": RandomMesher, "monitor": MonitorMesher, "rl": RLMesher,
           "rl_oracle": RLMesher}


def run_arm(d: SeedData, arm: str, results: dict, device, log, log_policy) -> dict:
    """One arm of one seed: set up its mesher, collect the data set, train and test a surrogate at each
    checkpoint; returns the arm's result (rows per checkpoint, costs, label error, mesher info)."""
    ta, a = time.time(), d.args
    arm_seed = int(np.random.SeedSequence([d.seed, ARMS.index(arm)]).generate_state(1)[0])
    mesher = MESHERS[arm](d, arm, results, arm_seed, log_policy)
    mesher.setup()
    Y, cq = mesher.collect()
    info = dict(mesher.info)
    ex = mesher.example_nodes()
    if ex is not None:
        info["nodes_example"] = ex
    label_err = mesher.label_error()
    rows = []
    for k in _checkpoints(a):
        ev = train_eval_surrogate(a, d.world, d.X_all[:k], Y[:k], d.X_test, d.Y_test, device, d.seed * 1000 + k)
        dcost = int(cq[:k].sum())
        row = log(arm=arm, queries=k, dataset_cost=dcost,
                  total_cost=dcost + mesher.setup_cost + int(mesher.extra_q[:k].sum()), label_rel_l2=label_err, **ev)
        rows.append(row)
        say(f"[seed {d.seed}] {arm:>12} queries {k:4d} cost {dcost:>9d} (total {row['total_cost']}) "
            f"test relL2 {ev['test_rel_l2']:.4f} label {label_err:.4f}")
    return {"rows": rows, "extra_cost": mesher.setup_cost, "cost_per_query": float(cq.mean()),
            "label_rel_l2": label_err, "minutes": (time.time() - ta) / 60, **info}


def reach_uniform_final(results: dict) -> None:
    """Per arm: the first checkpoint (queries, and the total cost spent by then) at which its test error reaches
    uniform's error at the full budget. Every arm is judged on both axes: per query and at equal total cost."""
    if "uniform" not in results:
        return
    target = results["uniform"]["rows"][-1]["test_rel_l2"]
    for r in results.values():
        hit = [row for row in r["rows"] if row["test_rel_l2"] <= target]
        r["queries_to_uniform_final"] = hit[0]["queries"] if hit else None
        r["total_cost_to_uniform_final"] = hit[0]["total_cost"] if hit else None


def run_seed(args, out_dir: str, seed: int, device) -> dict:
    """Every arm of one seed on the same inputs: returns {"arms": per-arm results, "examples": meshes, ...}.
    Resumable per arm: the checkpoint after each arm holds every finished arm's result (all a later arm reads)."""
    t0 = time.time()
    d = prepare_seed(args, seed)
    arms, ks = _arm_list(args), _checkpoints(args)
    main_rank = common.is_main()
    ckpt_dir = os.path.join(out_dir, "checkpoint")
    done, step = {}, 0
    if main_rank and args.resume and common.find_checkpoint(ckpt_dir):
        st = common.load_checkpoint(ckpt_dir)
        done, step = st["extra"]["done"], st["step"]
        say(f"[seed {seed}] resumed: arms done {list(done)}")
    done, step = from_rank0((done, step))
    # rows logged after the checkpoint (an unfinished arm, which restarts from scratch) are cut
    logger = common.MetricLogger(out_dir, resume_step=step - 1 if done else None)
    plog = common.MetricLogger(out_dir, resume_step=step - 1 if done else None, filename="policy.jsonl")
    bar = tqdm(total=len(arms) * len(ks), desc=f"seed {seed}", dynamic_ncols=True, disable=not main_rank)
    bar.update(sum(len(ks) for arm in arms if arm in done))
    logger.pbar = bar
    results = dict(done)
    for arm in arms:
        if arm in done:
            continue
        counter = {"step": step}

        def log(**row):
            out = logger.log(counter["step"], **row)
            counter["step"] += 1
            bar.update(1)
            return out

        results[arm] = run_arm(d, arm, results, device, log, lambda r, arm=arm, s=step: plog.log(s, arm=arm, **r))
        step = counter["step"]
        common.save_checkpoint(ckpt_dir, step=step, extra={"done": results})
    bar.close()
    reach_uniform_final(results)
    every = max(len(d.world.xf) // 1024, 1)
    examples = {"x": d.world.xf[::every].tolist(), "inputs": d.test_fields[:3, ::every].tolist(),
                "grid": d.world.grid.tolist(), "refs": d.Y_test[:3].tolist()}
    return {"seed": seed, "arms": results, "examples": examples, "minutes": (time.time() - t0) / 60}


# ---------------------------------------------------------------------------------------------
# ---- plots and tables ----
# ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(per_seed: list[dict], path: str, title: str, meshes: bool = True) -> str:
    """Test error vs queries / dataset cost / total cost (mean ± std over seeds), and a few meshes."""
    plt = _plt()
    arms = list(per_seed[0]["arms"])
    color = {arm: f"C{i}" for i, arm in enumerate(arms)}
    nrow = 2 if meshes else 1
    fig, axes = plt.subplots(nrow, 3, figsize=(15, 4.2 * nrow), squeeze=False)
    for arm in arms:
        rows = [r["arms"][arm]["rows"] for r in per_seed if arm in r["arms"]]
        err = np.array([[row["test_rel_l2"] for row in rr] for rr in rows])
        for ax, key in zip(axes[0], ("queries", "dataset_cost", "total_cost")):
            xs = np.array([[row[key] for row in rr] for rr in rows]).mean(0)
            ax.errorbar(xs, err.mean(0), yerr=err.std(0) if len(err) > 1 else None, marker="o", ms=3, capsize=2,
                        label=arm, color=color[arm])
    for ax, key in zip(axes[0], ("simulation queries", "dataset cost (nodes x steps)", "total cost incl. val/pilot/policy")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("surrogate test rel. L2")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    if meshes:
        ex = per_seed[0]["examples"]
        burg = "burgers" in title
        shown = [a for a in ("rl", "rl_oracle", "monitor") if "nodes_example" in per_seed[0]["arms"].get(a, {})]
        for j, ax in enumerate(axes[1]):
            if j >= len(ex["inputs"]):
                ax.axis("off")
                continue
            inp = np.asarray(ex["inputs"][j])
            inp = inp if burg else np.log10(inp)
            ax.plot(ex["x"], inp, color="0.6", lw=1, label="u0" if burg else "log10 a")
            lo, hi = inp.min(), inp.max() + 1e-9
            span = hi - lo
            ax.set_ylim(lo - span * (0.15 + 0.15 * len(shown)), hi + 0.1 * span)
            for i, arm in enumerate(shown):  # one row of node ticks per arm, below the input
                nodes = np.asarray(per_seed[0]["arms"][arm]["nodes_example"][j])
                ax.plot(nodes, np.full_like(nodes, lo - span * 0.15 * (i + 1)), "|", color=color[arm], ms=10, mew=1.5,
                        label=f"{arm} nodes")
            ax2 = ax.twinx()
            ax2.plot(ex["grid"], ex["refs"][j], color="k", lw=1.5, label="reference u" + ("(T)" if burg else ""))
            ax2.set_ylabel("u")
            ax.set_xlabel("x")
            ax.set_title(f"test input {j}: mesh nodes (ticks, seed {per_seed[0]['seed']})", fontsize=9)
            if j == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table_markdown(per_seed: list[dict], args) -> str:
    arms = list(per_seed[0]["arms"])
    ks = [row["queries"] for row in per_seed[0]["arms"][arms[0]]["rows"]]

    def ms(v):
        v = np.asarray([x for x in v if x is not None], dtype=float)
        if not len(v):
            return "never"
        return f"{v.mean():.4f} ± {v.std():.4f}" if len(v) > 1 else f"{v.mean():.4f}"

    seeds = [r["seed"] for r in per_seed]
    if args.pde == "darcy":
        what = (f"Darcy ({args.coef}, contrast {args.contrast:g}), N = {args.n_nodes} nodes, face rule "
                f"`{args.face_coef}` (references: {args.fine_res} nodes, harmonic)")
    else:
        what = f"Burgers (nu {args.nu:g}, T {args.t_final:g}), {args.n_nodes - 1} cells (references: {args.ref_cells} cells)"
    epochs = "" if args.surrogate == "krr" else f" ({args.surrogate_epochs} epochs)"
    lines = [f"{what}, surrogate {args.surrogate}{epochs}, seeds {seeds}, mean ± std over seeds; cost = nodes "
             f"(Darcy) or cells x time steps (Burgers); total cost adds validation, pilot and policy-training solves.", "",
             "| arm | " + " | ".join(f"test relL2 @ {k}" for k in ks) +
             " | label relL2 | cost/query | dataset cost @ budget | total cost @ budget | queries to uniform's final "
             "| total cost to uniform's final |",
             "|---" * (len(ks) + 7) + "|"]
    for arm in arms:
        rs = [r["arms"][arm] for r in per_seed]
        cells = [ms([r["rows"][i]["test_rel_l2"] for r in rs]) for i in range(len(ks))]
        q = [r.get("queries_to_uniform_final") for r in rs]
        qs = ", ".join("—" if v is None else str(v) for v in q)
        tc = ", ".join("—" if v is None else str(v) for v in (r.get("total_cost_to_uniform_final") for r in rs))
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {ms([r['label_rel_l2'] for r in rs])} | "
                     f"{np.mean([r['cost_per_query'] for r in rs]):.0f} | "
                     f"{np.mean([r['rows'][-1]['dataset_cost'] for r in rs]):.0f} | "
                     f"{np.mean([r['rows'][-1]['total_cost'] for r in rs]):.0f} | {qs} | {tc} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------


def has_checkpoint(args) -> bool:
    """Whether output_dir holds something --resume can continue: a complete per-arm checkpoint (or, with
    --full_table, a finished seed's result.json)."""
    out = args.output_dir
    if not args.full_table:
        return common.find_checkpoint(os.path.join(out, "checkpoint")) is not None
    return any(os.path.isfile(os.path.join(out, f"seed{s}", "result.json"))
               or common.find_checkpoint(os.path.join(out, f"seed{s}", "checkpoint")) is not None
               for s in _ints(args.seeds, "seeds"))


def main(args):
    t0 = time.time()
    common.set_cpu_threads(args.threads)
    validate_args(args)  # nothing loaded or written yet
    preflight(args)
    _, world_size, _ = common.ddp_setup()  # torchrun: gloo on CPU, nccl on GPU; one process: no-op
    # output-dir policy: a finished run is refused unless --resume (same flags) or --overwrite; writes args.json
    common.start_run(args, has_checkpoint=has_checkpoint(args), ignore=("threads",))
    device = common.pick_device(args.device)  # this rank's GPU under torchrun; only the surrogate uses it
    main_rank = common.is_main()  # rank 0 alone writes files and prints
    if args.full_table:
        seeds = _ints(args.seeds, "seeds")
        per_seed = []
        for s in seeds:
            res_path = os.path.join(args.output_dir, f"seed{s}", "result.json")
            reused = None
            if main_rank and args.resume and os.path.isfile(res_path):  # a finished seed is reused as is
                with open(res_path) as f:
                    reused = json.load(f)
            reused = from_rank0(reused)  # rank 0 decides, so all ranks skip or run the seed together
            if reused is not None:
                per_seed.append(reused)
                continue
            per_seed.append(run_seed(args, os.path.join(args.output_dir, f"seed{s}"), s, device))
            if main_rank:
                common.write_json(res_path, per_seed[-1])
    else:
        seeds = [args.seed]
        per_seed = [run_seed(args, args.output_dir, args.seed, device)]
        # the top-level metrics.jsonl sits in output_dir already (run_seed wrote it there)
    out = args.output_dir
    minutes = (time.time() - t0) / 60
    md = table_markdown(per_seed, args)
    summary = {"seeds": seeds, "device": str(device), "world_size": world_size, "wall_minutes": minutes, "table": md,
               "final": {arm: {"test_rel_l2": [r["arms"][arm]["rows"][-1]["test_rel_l2"] for r in per_seed],
                               "label_rel_l2": [r["arms"][arm]["label_rel_l2"] for r in per_seed],
                               "total_cost": [r["arms"][arm]["rows"][-1]["total_cost"] for r in per_seed],
                               "queries_to_uniform_final": [r["arms"][arm].get("queries_to_uniform_final")
                                                            for r in per_seed],
                               "total_cost_to_uniform_final": [r["arms"][arm].get("total_cost_to_uniform_final")
                                                               for r in per_seed]}
                         for arm in per_seed[0]["arms"]},
               "seed": seeds[0] if len(seeds) == 1 else seeds}
    if not main_rank:  # the other ranks return the same summary and write nothing
        common.ddp_cleanup()
        return summary
    if args.full_table:  # one merged metrics.jsonl at the top level too
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            for r in per_seed:
                for arm in r["arms"].values():
                    for row in arm["rows"]:
                        f.write(json.dumps({**row, "seed": r["seed"]}) + "\n")
    title = f"rlmesh | {args.surrogate} on {args.pde} | seed {','.join(map(str, seeds))}"
    plot_curves(per_seed, os.path.join(out, "rlmesh.png"), title)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    summary["wall_minutes"] = minutes = (time.time() - t0) / 60
    common.write_json(os.path.join(out, "summary.json"), summary)
    tqdm.write(md)
    tqdm.write(f"wrote {out}/summary.json, table.md, rlmesh.png in {minutes:.1f} min")
    common.ddp_cleanup()
    return summary


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_args())
