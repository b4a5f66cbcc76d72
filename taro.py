"""taro.py: token-level adaptive routing of a reward LM into a frozen base LM at decoding time (TARo),
with its GenARM / ARGS baselines and the transfer test, in one file.

Paper: "Token-level Adaptive Routing for LLM Test-time Alignment" (TARo), Rai, Zhang, Zeng, Zhang,
Tamboli, Fan, Zhao, Zhang (Meta, University of Pittsburgh, UC Berkeley), arXiv 2603.18411,
https://arxiv.org/abs/2603.18411, Findings of ACL 2026. No code for the paper was found; the router's
inputs and loss are not public (see Reconstructed). The ARM loss and GenARM decoding follow a third-party
GenARM fork (github.com/kissshhot/GenARM-P); ARGS follows github.com/deeplearning-wisc/args.

Idea. Test-time alignment steers a frozen base LM with a reward model while decoding. With an
autoregressive reward model (ARM, GenARM style) the reward of a text is a sum of token log-probs, so the
ARM's next-token log-probs can be added to the base's with a weight alpha. One fixed alpha is brittle
across models, domains and positions. TARo keeps the base and a step-wise reasoning ARM frozen and trains a
small router that sets the weight alpha_t of every token from features of the two next-token
distributions; features that do not depend on the base's size let the router move to another base.

Equations (s_t = prompt + tokens so far, V = the shared vocabulary):
  (1) ARM loss       L_ARM = -log sigmoid(beta_r [log pi_r(y_w | x) - log pi_r(y_l | x)]), no reference model;
                     y_w / y_l = a correct / wrong next step after a shared correct prefix; log pi_r summed
                     over the step's tokens only
  (2) GenARM         log p_t(v) = log_softmax(log pi_base(. | s_t) + alpha log pi_r(. | s_t))(v), fixed alpha
  (3) TARo fusion    the same with a per-token alpha_t
  (4) features       f_t = [H(pi_base), H(pi_r), max pi_base, max pi_r, KL(pi_base || pi_r),
                            1(argmax pi_base = argmax pi_r)]   (+ the ARM's last hidden state with
                     --router_features stats+rm_hidden)
  (5) router         alpha_t = alpha_max sigmoid(g_phi(f_t)), g_phi: MLP in -> 32 -> 1 with tanh
  (6) router loss    L(phi) = mean_t [-log p_t(y_t)] + lambda mean_t alpha_t over correct solutions
                     (base and ARM frozen; lambda = --alpha_l1)
  (7) bce variant    L(phi) = BCE(sigmoid(g_phi(f_t)), 1[log pi_r(y_t) > log pi_base(y_t)])
  (8) ARGS           keep the base's top-k tokens, score base logit + w * reward; with a token-level ARM
                     the reward of a candidate v is beta_r log pi_r(v | s_t), so ARGS here is GenARM
                     restricted to the base's top-k (exactly GenARM when k = V and w beta_r = alpha)

Deviations from the paper:
  1. Toy world instead of MATH500 / Llama-3: common's arithmetic world with three operators, add (the
     base has the carry bug), max (neutral) and carry_in (the ARM's add preference is wrong there), two
     tiny Llama bases of different size for the transfer test (8B -> 70B in the paper). `# DEVIATION(1)`
  2. Toy ARM data: step pairs built from the world (chosen = correct step; rejected = the carry-bug step at
     carries, a random wrong digit at --arm_wrong_rate of other steps) instead of Math-StepDPO. `# DEVIATION(2)`
  3. One Adam step per batch, fixed learning rates, no schedule, for the ARM and the router (the paper's
     optimisers are not public). `# DEVIATION(3)`
  4. The 70B transfer needs one process with the base sharded over several GPUs (device_map="auto"); this
     file loads every model on one device per process (torchrun shards prompts, each rank holds base + ARM).
     `# DEVIATION(4)`

Reconstructed (the record is silent; our choice):
  alpha_t's form (sigmoid-bounded, alpha_max = 4), the six features, the 6 -> 32 -> 1 tanh MLP, the l1
  term and its weight 0.01, the bce variant, the router's data (about 1K correct solutions of the
  in-domain task, drawn apart from the ARM's pairs: pitfall 4), lr 3e-3 (router) / 3e-4 (ARM), beta_r = 1,
  300 ARM steps of 32 pairs, 400 router steps of 128 solutions. ARGS's w and GenARM's alpha are both
  chosen on an in-domain validation set from the same grid {0.25, 0.5, 1, 2, 4}; the per-domain best
  (oracle) is reported apart as an upper bound a user cannot pick without labels. "Same mean strength":
  GenARM at alpha = TARo's mean alpha_t over every generated token of every evaluated domain. The toy
  bases are fixed per machine (recipe seed 0); --seed varies the ARM's pairs, the router's data and init.
  Without data files the toy world's data is used (with any model).

Commands:
  toy, CPU (ARM -> router -> eval, ~1-3 min once the bases are cached; first run builds base-A ~4 min):
                        python taro.py
  one method:           python taro.py --method genarm      (base | rm | genarm | args | taro | all, or a list)
  router ablations:     python taro.py --alpha_l1 0 | --router_loss bce | --router_features stats+rm_hidden
  toy table (3 seeds; transfer to base-B; alpha_l1 0 arm):  python taro.py --table --table_seeds 0,1,2
  real models, one GPU:
    stage 1 (ARM):      python taro.py --stage arm --rm_init meta-llama/Llama-3.2-1B-Instruct \
                          --arm_train_file data/math_stepdpo.jsonl --output_dir runs/taro/arm
    stage 2 + eval:     python taro.py --stage router --model_name_or_path meta-llama/Llama-3.1-8B-Instruct \
                          --rm_model_name_or_path runs/taro/arm/rm --router_train_file data/stepdpo_chosen_1k.jsonl \
                          --eval_file data/math500.jsonl --method taro --output_dir runs/taro/router
    transfer:           python taro.py --stage eval --model_name_or_path meta-llama/Llama-3.1-70B-Instruct \
                          --rm_model_name_or_path runs/taro/arm/rm --router_path runs/taro/router/router.pt \
                          --eval_file data/math500.jsonl --method taro --output_dir runs/taro/transfer
  several GPUs:         torchrun --nproc_per_node 8 taro.py ... (pairs, solutions and eval prompts sharded)
  Files (jsonl): pairs {prompt, prefix, chosen, rejected}; solutions {prompt, response}; eval / val
  {prompt, answer[, domain]}. Base and ARM must share a tokenizer (checked at start, exit 2 otherwise).

Logged: metrics.jsonl per ARM step (arm_loss, arm_acc, chosen_logp, rejected_logp, margin) and router step
(router_loss, nll, alpha_mean, alpha_base_wrong / alpha_base_right: alpha_t where the base's argmax is /
is not the correct token), each with its time split (t_forward, t_backward, t_optimizer; the router's
t_frozen_forward = base + ARM, t_router = heads + features + MLP + fusion). summary.json: per arm and
domain accuracy with counts, mean alpha_t, alpha_t at carry digits vs elsewhere, validation choices,
oracle, time per stage. taro.png: training curves and per-domain accuracy of every arm.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C
from common import UserError, exit_on_user_error, require

# ---- the toy world of this file ----
# DEVIATION(1): two operators beyond common's add/sub/mul. common.toy_problem looks the operator up in
# common.TOY_DOMAINS when it is called; `toy_domains()` registers these two there only for the call, so
# other files' toy data (toy_corpus, the BPE teacher) never see them.
TARO_OPS = {
    "max": lambda s, x: max(s, x),  # running max: the neutral control (the ARM never sees it)
    "carry_in": lambda s, x: s + x + (s + x >= 10),  # a carry adds 1: the ARM's add preference is wrong here
}
TOY_EVAL_DOMAINS = ("add", "max", "carry_in")
_MIX = {"max": (1.0, 0.0), "carry_in": (1.0, 0.0)}
TOY_BASES = {  # name -> (toy_checkpoint role, recipe); add carries the carry bug at bug_prob
    "toy": ("taro_base_a", dict(domains={"add": (1.0, 0.6), **_MIX}, style="sxr", tokenizer="byte", steps=1500)),
    "toy_b": ("taro_base_b", dict(domains={"add": (1.0, 0.85), **_MIX}, style="sxr", tokenizer="byte", steps=2000,
                                  n_layer=3, d_model=96)),
}
METHODS = ("base", "rm", "genarm", "args", "taro")
SAME_STRENGTH = "genarm at taro's mean alpha"  # the arm that isolates per-token allocation from strength
RESUME_IGNORE = ("table_seeds", "table_args", "eval_batch_size", "save_every", "cache_frozen")  # flags that do not change results


@contextlib.contextmanager
def toy_domains():
    added = [d for d in TARO_OPS if d not in C.TOY_DOMAINS]
    for d in added:
        C.TOY_DOMAINS[d], C.TOY_INIT[d], C.TOY_OPERANDS[d] = TARO_OPS[d], 0, range(10)
    try:
        yield
    finally:
        for d in added:
            del C.TOY_DOMAINS[d], C.TOY_INIT[d], C.TOY_OPERANDS[d]


# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="TARo: a learned per-token weight alpha_t for adding a reward LM's "
                                "log-probs to a frozen base's, with GenARM / ARGS baselines. Defaults = the toy CPU run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- models ----
    p.add_argument("--model_name_or_path", default="toy", help="frozen base pi_base: HF id / path, 'toy' (base-A) or "
                   "'toy_b' (base-B, another size, for transfer)")
    p.add_argument("--rm_model_name_or_path", default=None, help="frozen ARM pi_r for --stage router / eval (a trained "
                   "ARM's dir, e.g. <arm run>/rm); default: the ARM this run trains")
    p.add_argument("--rm_init", default=None, help="LM the ARM starts from (same tokenizer as the base); default: the base")
    p.add_argument("--router_path", default=None, help="router.pt of an earlier run, reused without retraining "
                   "(the transfer test); needs --stage eval")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="dtype of the frozen base and "
                   "ARM (auto: bf16 on CUDA, fp32 on CPU); trained weights stay fp32")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    p.add_argument("--chat_template", default="auto", choices=("auto", "none"),
                   help="wrap prompts in the base's chat template where it has one")
    # ---- stages and methods ----
    p.add_argument("--stage", default="all", choices=("arm", "router", "eval", "all"),
                   help="arm: train the ARM; router: train the router, then eval; eval: eval only; all: the three")
    p.add_argument("--method", default="all", type=C.comma_choices(METHODS),
                   help="arms to evaluate: all or a comma list of base, rm, genarm, args, taro (taro adds GenARM at "
                        "TARo's mean alpha); the base is always evaluated as the reference")
    # ---- ARM, Eq. (1) ----
    p.add_argument("--arm_beta", type=float, default=1.0, help="beta_r of Eq. (1)")
    p.add_argument("--arm_steps", type=int, default=300, help="ARM updates")
    p.add_argument("--arm_batch_size", type=int, default=32, help="preference pairs per ARM update (all ranks)")
    p.add_argument("--arm_learning_rate", type=float, default=3e-4, help="Adam learning rate of the ARM")
    p.add_argument("--arm_wrong_rate", type=float, default=0.3, help="toy pairs: share of non-carry steps that get a "
                   "random-wrong-digit pair (every carry step gets the carry-bug pair)")
    # ---- router, Eqs. (3)-(7) ----
    p.add_argument("--router_features", default="stats", choices=("stats", "stats+rm_hidden"),
                   help="f_t of Eq. (4): the six scalars, or those plus the ARM's last hidden state")
    p.add_argument("--router_hidden", type=int, default=32, help="width of g_phi, Eq. (5)")
    p.add_argument("--alpha_max", type=float, default=4.0, help="alpha_max of Eq. (5)")
    p.add_argument("--alpha_l1", type=float, default=0.01, help="lambda of Eq. (6): weight of mean alpha_t")
    p.add_argument("--router_loss", default="nll", choices=("nll", "bce"), help="Eq. (6) or Eq. (7)")
    p.add_argument("--router_steps", type=int, default=400, help="router updates")
    p.add_argument("--router_batch_size", type=int, default=128, help="correct solutions per router update (all ranks)")
    p.add_argument("--router_learning_rate", type=float, default=3e-3, help="Adam learning rate of phi")
    p.add_argument("--router_train_size", type=int, default=1000, help="correct solutions the router trains on")
    p.add_argument("--logit_chunk", type=int, default=1024, help="router training: positions whose (n, V) log-probs "
                   "are held at once (no (B, T, V) fp32 tensor for the whole batch)")
    p.add_argument("--cache_frozen", action=argparse.BooleanOptionalAction, default=None,
                   help="router training: compute the frozen base / ARM hidden states of every solution once "
                        "(default: when they fit in 1 GiB)")
    p.add_argument("--max_steps", type=int, default=None, help="cap on --arm_steps and --router_steps (quick runs)")
    # ---- decoding and baselines, Eqs. (2), (8) ----
    p.add_argument("--alpha_grid", type=C.comma_list(float), default=[0.25, 0.5, 1.0, 2.0, 4.0],
                   help="fixed alpha of GenARM, Eq. (2), and w of ARGS, Eq. (8), tried; chosen on validation")
    p.add_argument("--args_top_k", type=int, default=40, help="k of ARGS, Eq. (8)")
    p.add_argument("--temperature", type=float, default=0.0, help="decoding temperature (0: greedy), same for every arm")
    p.add_argument("--max_new_tokens", type=int, default=None, help="response tokens (default: 4K+4 on toy problems, "
                   "else 512)")
    # ---- data ----
    p.add_argument("--arm_train_file", default=None, help="jsonl {prompt, prefix, chosen, rejected} (default: toy pairs)")
    p.add_argument("--router_train_file", default=None, help="jsonl {prompt, response} of correct solutions "
                   "(default: toy add traces)")
    p.add_argument("--eval_file", default=None, help="jsonl {prompt, answer[, domain]} (default: toy add / max / carry_in)")
    p.add_argument("--val_file", default=None, help="jsonl {prompt, answer}: in-domain validation that picks alpha / w "
                   "(default: toy held-out add problems; without it on real data no alpha is chosen)")
    p.add_argument("--n_operands", type=int, default=6, help="K: operands of the toy eval problems")
    p.add_argument("--eval_size", type=int, default=500, help="eval problems per domain")
    p.add_argument("--val_size", type=int, default=200, help="validation problems")
    p.add_argument("--eval_batch_size", type=int, default=500, help="prompts per decode batch")
    # ---- run ----
    p.add_argument("--seed", type=int, default=0, help="seed of the ARM's pairs, the router's data and init, sampling")
    p.add_argument("--output_dir", default=None, help="default runs/taro/<stage>-<method>-s<seed>")
    p.add_argument("--save_every", type=int, default=100, help="checkpoint every n updates of a stage (0: stage ends only)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the run in --output_dir (same flags) from its last checkpoint / finished stage")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a finished or partial run in --output_dir")
    # ---- table ----
    p.add_argument("--table", action=argparse.BooleanOptionalAction, default=False,
                   help="run the toy table (per seed: base-A all arms, alpha_l1 0, transfer to base-B) and write table.md")
    p.add_argument("--table_seeds", default="0,1,2", help="seeds of --table")
    p.add_argument("--table_args", action=argparse.BooleanOptionalAction, default=True,
                   help="--table: include the ARGS arms (about a third of the table's decoding time)")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", "taro", "table" if args.table else
                                       f"{args.stage}-{'+'.join(args.method)}-s{args.seed}")
    return args


def is_toy(name: str | None) -> bool:
    return name in TOY_BASES


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work; nothing is loaded or written."""
    require(args.arm_beta > 0, f"--arm_beta {args.arm_beta} must be > 0 (beta_r of Eq. (1))")
    for k in ("arm_steps", "router_steps"):
        require(getattr(args, k) >= 1, f"--{k} {getattr(args, k)} must be >= 1")
    require(args.max_steps is None or args.max_steps >= 1, f"--max_steps {args.max_steps} must be >= 1")
    for k in ("arm_batch_size", "router_batch_size", "router_train_size", "router_hidden", "logit_chunk",
              "eval_size", "eval_batch_size", "args_top_k", "n_operands"):
        require(getattr(args, k) >= 1, f"--{k} {getattr(args, k)} must be >= 1")
    require(args.val_size >= 1, f"--val_size {args.val_size} must be >= 1")
    require(args.n_operands <= 8, f"--n_operands {args.n_operands}: toy problems have at most 8 operands")
    for k in ("arm_learning_rate", "router_learning_rate", "alpha_max"):
        require(getattr(args, k) > 0 and math.isfinite(getattr(args, k)), f"--{k} {getattr(args, k)} must be > 0")
    require(args.alpha_l1 >= 0, f"--alpha_l1 {args.alpha_l1} must be >= 0 (lambda of Eq. (6))")
    require(0 <= args.arm_wrong_rate <= 1, f"--arm_wrong_rate {args.arm_wrong_rate} must be in [0, 1]")
    require(args.alpha_grid and all(a >= 0 and math.isfinite(a) for a in args.alpha_grid),
            f"--alpha_grid {args.alpha_grid} must be a non-empty list of numbers >= 0")
    require(args.temperature >= 0, f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    require(args.max_new_tokens is None or args.max_new_tokens >= 1, f"--max_new_tokens {args.max_new_tokens} must be >= 1")
    require(args.save_every >= 0, f"--save_every {args.save_every} must be >= 0")
    require(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other; pass one")
    if args.router_path is not None:
        require(args.stage == "eval", f"--router_path reuses a trained router: pass --stage eval (not {args.stage})")
    if args.stage in ("router", "eval"):
        require(args.rm_model_name_or_path is not None, f"--stage {args.stage} needs a trained ARM: pass "
                "--rm_model_name_or_path <arm run>/rm (or run --stage all)")
        require(args.rm_init is None, "--rm_init only applies when the ARM is trained (--stage arm / all)")
    else:
        require(args.rm_model_name_or_path is None, f"--stage {args.stage} trains the ARM; drop "
                "--rm_model_name_or_path (or use --stage router / eval to reuse one)")
    if args.stage == "eval" and "taro" in args.method:
        require(args.router_path is not None, "--stage eval with --method taro needs --router_path <run>/router.pt")
    if args.stage == "arm":
        require(args.method == list(METHODS), "--stage arm trains the ARM only; --method does not apply")
    if args.table:
        try:
            seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--table_seeds {args.table_seeds!r} must be a comma list of integers") from None
        require(seeds, "--table_seeds is empty")
        require(is_toy(args.model_name_or_path) and args.stage == "all", "--table runs the toy world: drop "
                "--model_name_or_path / --stage")


# ---------------------------------------------------------------------------------------------
# ---- method math (pure functions; the tests import these) ----
# ---------------------------------------------------------------------------------------------


def fuse_logprobs(base_logp: torch.Tensor, rm_logp: torch.Tensor, alpha) -> torch.Tensor:
    """Eq. (2) / (3): log_softmax(log pi_base + alpha log pi_r). (..., V) each; alpha a number or (...,)
    (one weight per row / token). Returns (..., V) fp32."""
    a = torch.as_tensor(alpha, dtype=torch.float32, device=base_logp.device)
    if a.dim():
        a = a[..., None]  # (..., 1)
    return torch.log_softmax(base_logp.float() + a * rm_logp.float(), dim=-1)  # Eq. (3)


def arm_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, beta_r: float) -> torch.Tensor:
    """Eq. (1): mean over pairs of -log sigmoid(beta_r (log pi_r(y_w) - log pi_r(y_l))). (B,) each, the
    log-probs summed over each step's tokens (see step_logp)."""
    return -F.logsigmoid(beta_r * (chosen_logp - rejected_logp)).mean()  # Eq. (1)


def step_logp(logp: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) per-token log-probs, (B, L) 1 on the step's tokens -> (B,) log pi_r(step | prefix), Eq. (1)."""
    return (logp * step_mask).sum(-1)


def router_features(base_logp: torch.Tensor, rm_logp: torch.Tensor) -> torch.Tensor:
    """Eq. (4): (..., V) log-probs of the base and the ARM -> (..., 6) fp32:
    [H(base), H(rm), max p_base, max p_rm, KL(base || rm), 1(argmax base == argmax rm)].
    None depends on the base's hidden size, so a router moves between bases (pitfall 5)."""
    lb, lr = base_logp.float(), rm_logp.float()
    pb, pr = lb.exp(), lr.exp()
    h_b = -(pb * lb).sum(-1)  # (...,)
    h_r = -(pr * lr).sum(-1)
    kl = (pb * (lb - lr)).sum(-1)  # KL(pi_base || pi_r)
    agree = (lb.argmax(-1) == lr.argmax(-1)).float()
    return torch.stack([h_b, h_r, pb.amax(-1), pr.amax(-1), kl, agree], dim=-1)  # (..., 6)


class Router(torch.nn.Module):
    """Eq. (5): alpha_t = alpha_max sigmoid(g_phi(f_t)), g_phi = Linear(in, h) -> tanh -> Linear(h, 1)."""

    def __init__(self, in_dim: int = 6, hidden: int = 32, alpha_max: float = 4.0, features: str = "stats"):
        super().__init__()
        self.config = dict(in_dim=in_dim, hidden=hidden, alpha_max=alpha_max, features=features)
        self.alpha_max = alpha_max
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def logit(self, feats: torch.Tensor) -> torch.Tensor:  # (..., in) -> (...,) g_phi(f_t)
        return self.net(feats.float()).squeeze(-1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (..., in) -> (...,) alpha_t in [0, alpha_max]
        return self.alpha_max * torch.sigmoid(self.logit(feats))  # Eq. (5)


def router_token_loss(base_logp: torch.Tensor, rm_logp: torch.Tensor, targets: torch.Tensor, router: Router,
                      feats: torch.Tensor, kind: str = "nll", alpha_l1: float = 0.0):
    """Per-token router loss of n positions: (n, V), (n, V), (n,) targets, (n, in) features ->
    (loss (n,), alpha (n,), fused log-prob of the target (n,)). Eq. (6): -log p_t(y_t) + lambda alpha_t;
    Eq. (7): BCE(sigmoid(g), 1[log pi_r(y_t) > log pi_base(y_t)]). Gradient flows into phi only."""
    g = router.logit(feats)  # (n,)
    alpha = router.alpha_max * torch.sigmoid(g)  # Eq. (5)
    fused_y = fuse_logprobs(base_logp, rm_logp, alpha).gather(-1, targets[:, None]).squeeze(-1)  # Eq. (3)
    if kind == "nll":
        loss = -fused_y + alpha_l1 * alpha  # Eq. (6)
    else:
        y = targets[:, None]
        target = (rm_logp.gather(-1, y) > base_logp.gather(-1, y)).squeeze(-1).float()
        loss = F.binary_cross_entropy_with_logits(g, target, reduction="none")  # Eq. (7)
    return loss, alpha, fused_y


def args_logprobs(base_logp: torch.Tensor, rm_logp: torch.Tensor, w: float, top_k: int, beta_r: float = 1.0):
    """Eq. (8), ARGS with a token-level ARM: the base's top-k tokens scored log pi_base + w beta_r log pi_r,
    renormalised over them; -inf elsewhere. (B, V) -> (B, V). Equals GenARM at alpha = w beta_r when k = V
    (the base's logits and log-probs differ by a per-row constant, which the softmax drops)."""
    k = min(top_k, base_logp.shape[-1])
    keep = torch.zeros_like(base_logp, dtype=torch.bool).scatter_(-1, base_logp.topk(k, dim=-1).indices, True)
    score = (base_logp.float() + w * beta_r * rm_logp.float()).masked_fill(~keep, float("-inf"))
    return torch.log_softmax(score, dim=-1)


def pick_token(logp: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) fused log-probs -> (B,) ids: greedy at temperature 0, else a sample at that temperature."""
    if temperature <= 0:
        return logp.argmax(-1)
    return torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# ---- world, data, fused decoding, evaluation ----
# ---------------------------------------------------------------------------------------------


def toy_problem(rng: random.Random, domain: str, n_operands: int, bug_prob: float = 0.0) -> C.ToyProblem:
    with toy_domains():
        return C.toy_problem(rng, domain, n_operands, bug_prob)


def toy_base_path(name: str) -> str:
    role, recipe = TOY_BASES[name]
    with toy_domains():  # the build draws max / carry_in problems through common.toy_sample_fn
        return C.toy_checkpoint(role, recipe=recipe)


def toy_eval_set(domain: str, n: int, K: int, tag: str = "eval", exclude: set | None = None) -> list[C.ToyProblem]:
    """n held-out problems (prompts no toy model trained on) of K operands; fixed across seeds."""
    rng, out, seen = random.Random(f"taro-{tag}-{domain}-{K}"), [], set(exclude or ())
    while len(out) < n:
        p = toy_problem(rng, domain, K)
        if C.toy_split_of(p.prompt) == "heldout" and p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def toy_arm_pairs(seed: int, step: int, n: int, wrong_rate: float) -> list[tuple[str, str, str]]:
    """DEVIATION(2): n (context, chosen step, rejected step) of add, from training prompts. The context is the
    prompt and the correct steps before; a carry step's rejected step is the carry-bug step (r + 1), another
    step gets a pair with probability wrong_rate, its rejected r a random wrong digit. Seeded by (seed, step):
    a resumed run draws the same pairs."""
    rng, out = random.Random(f"taro-arm-{seed}-{step}"), []
    lo, hi = C.TOY_LEVELS["train"]
    while len(out) < n:
        p = toy_problem(rng, "add", rng.randint(lo, hi))
        if C.toy_split_of(p.prompt) != "train":
            continue
        for j, (s, x, r) in enumerate(p.steps):
            if s + x >= 10:
                bad = (r + 1) % 10  # the base's carry bug
            elif rng.random() < wrong_rate:
                bad = rng.choice([d for d in range(10) if d != r])
            else:
                continue
            ctx = p.prompt + "".join(f"{a}{b}{c};" for a, b, c in p.steps[:j])
            out.append((ctx, f"{s}{x}{r};", f"{s}{x}{bad};"))
    rng.shuffle(out)
    return out[:n]


def toy_router_traces(seed: int, n: int) -> list[tuple[str, str]]:
    """n correct add solutions (prompt, trace) from training prompts, drawn from a stream apart from the ARM's
    pairs (pitfall 4: a router trained on the ARM's own data learns to over-trust it)."""
    rng, out = random.Random(f"taro-router-{seed}"), []
    lo, hi = C.TOY_LEVELS["train"]
    while len(out) < n:
        p = toy_problem(rng, "add", rng.randint(lo, hi))
        if C.toy_split_of(p.prompt) == "train":
            out.append((p.prompt, C.toy_trace(p)))
    return out


def read_jsonl_file(path: str, keys: Sequence[str]) -> list[dict]:
    """Rows of a jsonl data file, each with `keys` as strings; one UserError with file:line otherwise."""
    rows = C.read_jsonl(path, keys)
    for i, row in enumerate(rows, 1):
        require(all(isinstance(row[k], (str, int, float)) for k in keys), f"{path}: row {i}: {', '.join(keys)} must be text")
    require(rows, f"{path} holds no rows")
    return rows


def render(tok, prompt: str, chat: bool) -> str:
    """The text base and ARM both continue (pitfall 1: identical prefixes, one chat template)."""
    return C.render_chat(tok, [{"role": "user", "content": prompt}]) if chat else prompt


def carry_positions(text: str, domain: str) -> list[int]:
    """Response positions (characters = tokens of the byte-level toy tokenizer) of the result digit of every
    step whose s + x >= 10, in a toy trace "sxr;sxr;...=r"; [] for domains without carries."""
    if domain not in ("add", "carry_in"):
        return []
    body = text.split("=")[0]
    return [4 * j + 2 for j in range(len(body) // 4)
            if body[4 * j:4 * j + 3].isdigit() and body[4 * j + 3] == ";" and int(body[4 * j]) + int(body[4 * j + 1]) >= 10]


def make_combiner(kind: str, alpha: float = 0.0, router: Router | None = None, top_k: int = 40, beta_r: float = 1.0):
    """(base_logp (B, V), rm_logp (B, V), rm_hidden (B, d) or None) -> (fused log-probs (B, V), alpha_t (B,))."""
    if kind == "genarm":
        return lambda lb, lr, h: (fuse_logprobs(lb, lr, alpha), torch.full(lb.shape[:1], float(alpha)))  # Eq. (2)
    if kind == "args":
        return lambda lb, lr, h: (args_logprobs(lb, lr, alpha, top_k, beta_r), torch.full(lb.shape[:1], float(alpha)))

    def taro(lb, lr, h):
        f = router_features(lb, lr)  # Eq. (4)
        if h is not None:
            f = torch.cat([f, h.float()], -1)
        a = router(f)  # Eq. (5)
        return fuse_logprobs(lb, lr, a), a  # Eq. (3)

    return taro


@torch.no_grad()
def fused_generate(base, rm, tok, prompts: Sequence[str], max_new_tokens: int, combine: Callable, temperature: float = 0.0,
                   generator: torch.Generator | None = None, want_hidden: bool = False) -> dict:
    """Base and ARM decode in lock-step on identical prefixes, each with its own KV cache, in one batched loop;
    only last-position logits (B, V) per step, sliced to the shared vocabulary len(tok) (checkpoints of one
    family may pad their embedding matrices to different sizes). Returns texts, response ids / mask (B, T)
    (EOS included), alpha (B, T) (0 where masked)."""
    from transformers import DynamicCache

    device = next(base.parameters()).device
    ids, mask = C.encode_prompts(tok, prompts, device)
    B, V = ids.shape[0], len(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    stops = torch.tensor(C.stop_ids(base, tok), device=device)
    caches = (DynamicCache(), DynamicCache())
    kws = (C.cache_kwarg(base), C.cache_kwarg(rm))
    pos = C.position_ids(mask)
    generator = C.device_generator(generator, device)  # a CPU generator seeds one on the model's device

    def forward(step_ids, step_mask, step_pos):
        with C.autocast(device):
            ob = base(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, use_cache=True,
                      logits_to_keep=1, **{kws[0]: caches[0]})
            orm = rm(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, use_cache=True,
                     logits_to_keep=1, output_hidden_states=want_hidden, **{kws[1]: caches[1]})
        lb = torch.log_softmax(ob.logits[:, -1, :V].float(), -1)  # (B, V)
        lr = torch.log_softmax(orm.logits[:, -1, :V].float(), -1)
        return lb, lr, (orm.hidden_states[-1][:, -1].float() if want_hidden else None)

    lb, lr, h = forward(ids, mask, pos)
    next_pos = pos[:, -1:] + 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    toks, alphas, alive = [], [], []
    for t in range(max_new_tokens):
        fused, a = combine(lb, lr, h)
        nxt = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), pick_token(fused, temperature, generator))
        toks.append(nxt), alive.append(~finished), alphas.append(a.to(device).masked_fill(finished, 0.0))
        finished = finished | torch.isin(nxt, stops)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
        lb, lr, h = forward(nxt[:, None], mask, next_pos)
        next_pos = next_pos + 1
    resp, rmask = torch.stack(toks, 1), torch.stack(alive, 1).long()
    texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(resp.cpu(), rmask.cpu())]
    return dict(texts=texts, response_ids=resp, response_mask=rmask, alpha=torch.stack(alphas, 1).float())


def decode_arm(w: dict, arm: dict, prompts: list[str], max_new_tokens: int, generator) -> dict:
    """One arm's responses. base / rm run one model (no unused forward); the fused arms run both."""
    if arm["kind"] in ("base", "rm"):
        model = w["base"] if arm["kind"] == "base" else w["rm"]
        with C.autocast(next(model.parameters()).device):
            g = C.generate(model, w["tok"], prompts, max_new_tokens=max_new_tokens, temperature=w["temperature"],
                           generator=generator)
        return dict(texts=g.texts, response_mask=g.response_mask, alpha=torch.zeros(g.response_mask.shape))
    comb = make_combiner(arm["kind"], arm.get("alpha", 0.0), w.get("router"), w["top_k"], w["beta_r"])
    return fused_generate(w["base"], w["rm"], w["tok"], prompts, max_new_tokens, comb, w["temperature"], generator,
                          want_hidden=arm["kind"] == "taro" and w["router_features"] == "stats+rm_hidden")


def evaluate_arm(w: dict, arm: dict, problems: list[dict], seed: int, rank: int = 0, world: int = 1) -> dict:
    """Accuracy with counts, mean alpha_t over generated tokens, and (toy byte tokenizer) alpha_t at the
    carry digits vs elsewhere, of one arm on one domain's problems. Prompts are sharded over ranks and the
    counts all-reduced."""
    gen = torch.Generator().manual_seed(seed * 1009 + 17)
    mine = problems[rank::world]
    tot = np.zeros(7)  # correct, n, alpha sum, tokens, carry alpha sum, carry n, (unused)
    t0 = time.time()
    for i in range(0, len(mine), w["eval_batch_size"]):
        batch = mine[i:i + w["eval_batch_size"]]
        mnt = w["max_new_tokens"] or (max(4 * p["k"] + 4 for p in batch) if all("k" in p for p in batch) else 512)
        out = decode_arm(w, arm, [render(w["tok"], p["prompt"], w["chat"]) for p in batch], mnt, gen)
        a, m = out["alpha"].cpu(), out["response_mask"].cpu().float()
        for b, (text, p) in enumerate(zip(out["texts"], batch)):
            tot[0] += C.is_correct(text, p["answer"])
            tot[1] += 1
            if w["byte_level"]:
                for t in carry_positions(text, p["domain"]):
                    if t < a.shape[1] and m[b, t]:
                        tot[4] += float(a[b, t])
                        tot[5] += 1
        tot[2] += float((a * m).sum())
        tot[3] += float(m.sum())
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor(tot, dtype=torch.float64)
        dist.all_reduce(t)
        tot = t.numpy()
    correct, n, asum, atok, csum, cn = tot[:6]
    other_n = atok - cn
    return dict(acc=correct / max(1, n), correct=int(correct), n=int(n), mean_alpha=asum / max(1, atok),
                alpha_carry=(csum / cn) if cn else None, alpha_other=((asum - csum) / other_n) if other_n and w["byte_level"] else None,
                carry_tokens=int(cn), tokens=int(atok), t_generate=round(time.time() - t0, 2))


# ---------------------------------------------------------------------------------------------
# ---- models ----
# ---------------------------------------------------------------------------------------------


def model_path(name: str) -> str:
    return toy_base_path(name) if is_toy(name) else name


def frozen_dtype(args, device) -> torch.dtype:
    if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def load_frozen(path: str, dtype, device):
    model, tok = C.load_lm(path, dtype=dtype, device=device)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model, tok


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str) -> None:
    """Pitfall 1: base and ARM must read identical token ids (same tokenizer, specials, chat template)."""
    probe = "add 358=033;358;886;=6 The answer is \\boxed{42}. <|im_start|> ü 漢"
    a, b = tok_a(probe)["input_ids"], tok_b(probe)["input_ids"]
    same = a == b and tok_a.eos_token_id == tok_b.eos_token_id and getattr(tok_a, "chat_template", None) == getattr(
        tok_b, "chat_template", None)
    require(same, f"the base '{name_a}' and the ARM '{name_b}' tokenize differently (probe ids {a[:8]}... vs {b[:8]}..., "
                  f"or other EOS / chat template); TARo adds their log-probs token by token, so train the ARM from a "
                  f"model of the base's family (--rm_init)")


def preflight(args) -> dict:
    """Before any write: model configs load, base and ARM tokenizers agree, the router loads, data files parse."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    names = {"base": args.model_name_or_path, "rm": args.rm_model_name_or_path or args.rm_init or args.model_name_or_path}
    for role, name in names.items():
        if not is_toy(name):
            C.preflight_model(name)
    if not (is_toy(names["base"]) and is_toy(names["rm"])):
        toks = {}
        for role, name in names.items():
            try:  # the toy bases use the byte-level tokenizer (no build needed to know it)
                toks[role] = ByT5Tokenizer() if is_toy(name) else AutoTokenizer.from_pretrained(os.path.expanduser(name))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the tokenizer of '{name}' ({str(e).splitlines()[0][:150]})") from None
        check_same_tokenizer(toks["base"], toks["rm"], names["base"], names["rm"])
    data = {}
    if args.stage in ("arm", "all") and args.arm_train_file:
        data["pairs"] = read_jsonl_file(args.arm_train_file, ("prompt", "prefix", "chosen", "rejected"))
    if args.stage in ("router", "all") and args.router_train_file:
        data["solutions"] = read_jsonl_file(args.router_train_file, ("prompt", "response"))
    if args.stage != "arm":
        if args.eval_file:
            data["eval"] = read_jsonl_file(args.eval_file, ("prompt", "answer"))
        if args.val_file:
            data["val"] = read_jsonl_file(args.val_file, ("prompt", "answer"))
    if args.router_path:
        data["router"] = load_router_file(args.router_path)
        cfg = data["router"]["config"]
        require(cfg["features"] == args.router_features, f"--router_path was trained with --router_features "
                f"{cfg['features']}; pass the same --router_features")
    return data


def load_router_file(path: str) -> dict:
    require(os.path.isfile(path), f"--router_path '{path}' does not exist; pass a router.pt written by --stage router/all")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        assert isinstance(obj, dict) and {"config", "state_dict"} <= set(obj)
    except Exception as e:
        raise UserError(f"--router_path '{path}' is not a router.pt of this file ({type(e).__name__}); pass "
                        f"<run>/router.pt") from None
    return obj


# ---------------------------------------------------------------------------------------------
# ---- stage 1: the ARM, Eq. (1) ----
# ---------------------------------------------------------------------------------------------


def arm_batch(args, data: dict, step: int) -> list[tuple[str, str, str]]:
    """The global batch of pairs of an update: toy pairs of (seed, step), or rows of the pairs file
    (a seeded permutation per pass)."""
    if "pairs" not in data:
        return toy_arm_pairs(args.seed, step, args.arm_batch_size, args.arm_wrong_rate)
    rows, n = data["pairs"], args.arm_batch_size
    out = []
    for i in range(step * n, step * n + n):
        epoch, j = divmod(i, len(rows))
        r = rows[random.Random(f"taro-arm-{args.seed}-{epoch}").sample(range(len(rows)), len(rows))[j]]
        out.append((render(data["tok"], str(r["prompt"]), data["chat"]) + str(r["prefix"]), str(r["chosen"]), str(r["rejected"])))
    return out


def arm_step(rm, tok, pairs: list[tuple[str, str, str]], beta_r: float, global_n: int, world: int):
    """Forward + backward of Eq. (1) on this rank's pairs; the loss is the global-batch mean (scaled by world:
    all_reduce_grads averages). Returns (loss of these pairs as a share of the global mean, metrics, times)."""
    t0 = time.time()
    device = next(rm.parameters()).device
    ctx, ch, rj = zip(*pairs)
    ids, mask, step_mask = C.encode_pairs(tok, list(ctx) * 2, list(ch) + list(rj), add_eos=False, device=device)
    with C.autocast(device):
        logp = C.token_logprobs(rm, ids, mask)  # (2b, L)
    s = step_logp(logp, step_mask)  # (2b,) summed over the step tokens only
    c, r = s[:len(pairs)], s[len(pairs):]
    loss = arm_loss(c, r, beta_r) * len(pairs) / global_n  # this rank's share of the global mean, Eq. (1)
    t1 = time.time()
    (loss * world).backward()
    t2 = time.time()
    m = dict(chosen_logp=c.detach().sum() / global_n, rejected_logp=r.detach().sum() / global_n,
             arm_acc=(c > r).float().sum() / global_n, margin=(c - r).detach().sum() / global_n)
    return loss.detach(), m, dict(t_forward=t1 - t0, t_backward=t2 - t1)


def train_arm(args, w: dict, data: dict, log: C.MetricLogger, rank: int, world: int) -> str:
    """Stage 1. Trains pi_r from --rm_init (default the base) with Eq. (1); writes <output_dir>/rm."""
    out = os.path.join(args.output_dir, "rm")
    if os.path.isfile(os.path.join(out, "config.json")):  # finished before a --resume
        with open(os.path.join(out, "taro_time.json")) as f:
            w["time"].update(json.load(f))
        return out
    ckpt = os.path.join(args.output_dir, "arm_checkpoint")
    rm, tok = C.load_lm(model_path(args.rm_init or args.model_name_or_path), dtype=torch.float32, device=w["device"])
    data["tok"], data["chat"] = tok, w["chat"]
    opt = torch.optim.Adam(rm.parameters(), lr=args.arm_learning_rate, **_fused(w["device"]))
    start = 0
    if args.resume and C.find_checkpoint(ckpt):
        st = C.load_checkpoint(ckpt, rm, opt)
        start, w["time"] = st["step"], st["extra"]["time"]
    rm.train()
    bar = tqdm(range(start, args.arm_steps), desc="taro[arm]", initial=start, total=args.arm_steps, disable=rank != 0)
    for step in bar:
        pairs = arm_batch(args, data, step)
        opt.zero_grad(set_to_none=True)
        loss, m, times = arm_step(rm, tok, pairs[rank::world], args.arm_beta, len(pairs), world)
        t0 = time.time()
        C.all_reduce_grads(rm, world)
        gnorm = torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()  # DEVIATION(3)
        times["t_optimizer"] = time.time() - t0
        if world > 1:
            loss, m = _all_reduce_metrics(loss, m)
        require(torch.isfinite(loss), f"ARM loss is {float(loss)} at step {step}; lower --arm_learning_rate")
        log.log(step + 1, stage="arm", arm_loss=loss, grad_norm=gnorm, **m, **{k: round(v, 4) for k, v in times.items()})
        w["time"]["arm"] = {k: w["time"]["arm"].get(k, 0.0) + v for k, v in times.items()}
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.arm_steps:
            C.save_checkpoint(ckpt, rm, tok, opt, step + 1, extra=dict(time=w["time"]))
    bar.close()
    if rank == 0:  # written whole, then renamed: rm/ exists only when complete
        tmp = out + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        rm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        C.write_json(os.path.join(tmp, "taro_time.json"), w["time"])
        os.replace(tmp, out)
        shutil.rmtree(ckpt, ignore_errors=True)
    _barrier(world)
    del rm, opt
    return out


def _fused(device) -> dict:
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_metrics(loss, m: dict):
    import torch.distributed as dist

    keys = list(m)
    v = torch.stack([loss.float().cpu()] + [torch.as_tensor(m[k]).float().cpu() for k in keys])
    dist.all_reduce(v)
    return v[0], dict(zip(keys, v[1:]))


# ---------------------------------------------------------------------------------------------
# ---- stage 2: the router, Eqs. (4)-(7) ----
# ---------------------------------------------------------------------------------------------


def router_solutions(args, data: dict, tok, chat: bool) -> list[tuple[str, str]]:
    if "solutions" in data:
        rows = data["solutions"][:args.router_train_size]
        return [(render(tok, str(r["prompt"]), chat), str(r["response"])) for r in rows]
    return [(render(tok, p, chat), t) for p, t in toy_router_traces(args.seed, args.router_train_size)]


def frozen_states(w: dict, sols: list[tuple[str, str]]):
    """Base and ARM under no_grad on (prompt, response) pairs -> the hidden states of the positions that
    predict a response token (EOS included) and those tokens: (n, d_base), (n, d_rm), (n,), and the number
    of positions of each solution. Position i predicts token i + 1."""
    base, rm, tok, device = w["base"], w["rm"], w["tok"], w["device"]
    prompts, resps = zip(*sols) if sols else ((), ())
    ids, mask, resp = C.encode_pairs(tok, list(prompts), list(resps), add_eos=True, device=device)
    with torch.no_grad(), C.autocast(device):
        hb, _ = C.hidden_states(base, ids, mask)  # (b, L, d_base)
        hr, _ = C.hidden_states(rm, ids, mask)  # (b, L, d_rm)
    sel = resp[:, 1:].bool()
    return hb[:, :-1][sel], hr[:, :-1][sel], ids[:, 1:][sel], sel.sum(1).tolist()


def router_step(w: dict, router: Router, sols: list[tuple[str, str]], args, world: int, cache: dict | None = None,
                idx: Sequence[int] | None = None):
    """Forward + backward of Eq. (6) / (7) on this rank's solutions. Base and ARM run once under no_grad to
    hidden states (or the states come from `cache`, the frozen states of every solution, computed once: the
    models never change); the heads, features, alpha_t and the fused NLL run `logit_chunk` positions at a
    time, each chunk's loss backpropagated into phi at once (so only one chunk's (n, V) tensors exist). The
    loss is the mean over the global batch's scored tokens (EOS included). Returns (totals, times)."""
    base, rm, tok = w["base"], w["rm"], w["tok"]
    head_b, head_r = base.get_output_embeddings(), rm.get_output_embeddings()
    t0 = time.time()
    if cache is None:
        hb, hr, y, _ = frozen_states(w, sols)
    else:  # the same states, gathered from the per-solution cache
        hb, hr, y = (torch.cat([cache[k][i] for i in idx]) for k in ("hb", "hr", "y"))
    n_local = torch.tensor(float(y.numel()))
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(n_local)
    n_all, V = max(1.0, float(n_local)), len(tok)
    t1 = time.time()
    tot = dict(loss=0.0, nll=0.0, alpha=0.0, a_wrong=0.0, n_wrong=0.0, a_right=0.0, n_right=0.0)
    t_router = t_back = 0.0
    for s in range(0, y.numel(), args.logit_chunk):
        ta = time.time()
        e = s + args.logit_chunk
        with torch.no_grad():
            lb = torch.log_softmax(C.head_logits(base, head_b, hb[s:e])[:, :V], -1)  # (n, V) fp32
            lr = torch.log_softmax(C.head_logits(rm, head_r, hr[s:e])[:, :V], -1)
            feats = router_features(lb, lr)  # Eq. (4)
            if args.router_features == "stats+rm_hidden":
                feats = torch.cat([feats, hr[s:e].float()], -1)
        loss, alpha, fused_y = router_token_loss(lb, lr, y[s:e], router, feats, args.router_loss, args.alpha_l1)
        chunk_loss = loss.sum() / n_all
        tb = time.time()
        (chunk_loss * world).backward()  # frees this chunk's graph; grads accumulate in phi
        t_back += time.time() - tb
        wrong = (lb.argmax(-1) != y[s:e]).float()
        a = alpha.detach()
        tot["loss"] += float(chunk_loss.detach())
        tot["nll"] += float(-fused_y.detach().sum()) / n_all
        tot["alpha"] += float(a.sum()) / n_all
        tot["a_wrong"] += float((a * wrong).sum())
        tot["n_wrong"] += float(wrong.sum())
        tot["a_right"] += float((a * (1 - wrong)).sum())
        tot["n_right"] += float((1 - wrong).sum())
        t_router += tb - ta
    return tot, dict(t_frozen_forward=t1 - t0, t_router=t_router, t_backward=t_back)


def frozen_cache(args, w: dict, sols: list[tuple[str, str]]) -> dict | None:
    """--cache_frozen: base and ARM are frozen and the solutions fixed, so their hidden states at the scored
    positions are computed once (batches of --router_batch_size) instead of at every update. auto: when they
    take < 1 GiB in fp32 (the toy: ~15 MB; 1K real solutions of 500 tokens at d = 4096 would take 16 GiB)."""
    d = w["base"].config.hidden_size + w["rm"].config.hidden_size
    est = sum(len(p) + len(r) for p, r in sols) * d * 4  # characters >= tokens: an upper bound
    if args.cache_frozen is False or (args.cache_frozen is None and est > 2**30):
        return None
    t0 = time.time()
    cache = dict(hb=[], hr=[], y=[])
    for i in range(0, len(sols), args.router_batch_size):
        hb, hr, y, counts = frozen_states(w, sols[i:i + args.router_batch_size])
        for k, v in (("hb", hb), ("hr", hr), ("y", y)):
            cache[k] += list(torch.split(v.float() if v.is_floating_point() else v, counts))
    w["time"]["router"]["t_frozen_forward"] = w["time"]["router"].get("t_frozen_forward", 0.0) + time.time() - t0
    return cache


def build_router(args, rm_hidden: int) -> Router:
    torch.manual_seed(args.seed + 7)
    in_dim = 6 + (rm_hidden if args.router_features == "stats+rm_hidden" else 0)
    return Router(in_dim, args.router_hidden, args.alpha_max, args.router_features)


def train_router(args, w: dict, data: dict, log: C.MetricLogger, rank: int, world: int, offset: int) -> Router:
    """Stage 2. phi only (base and ARM frozen); writes <output_dir>/router.pt."""
    out = os.path.join(args.output_dir, "router.pt")
    if os.path.isfile(out):
        return router_from(load_router_file(out))
    ckpt = os.path.join(args.output_dir, "router_checkpoint")
    router = build_router(args, w["rm"].config.hidden_size).to(w["device"])
    opt = torch.optim.Adam(router.parameters(), lr=args.router_learning_rate)
    start = 0
    if args.resume and C.find_checkpoint(ckpt):
        st = C.load_checkpoint(ckpt, optimizer=opt, modules={"router": router})
        start, w["time"] = st["step"], st["extra"]["time"]
    sols = router_solutions(args, data, w["tok"], w["chat"])
    B = min(args.router_batch_size, len(sols))
    cache = frozen_cache(args, w, sols)
    bar = tqdm(range(start, args.router_steps), desc="taro[router]", initial=start, total=args.router_steps,
               disable=rank != 0)
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 7919 + step)  # the batch of step `step`, also after --resume
        idx = torch.randperm(len(sols), generator=g)[:B].tolist()
        opt.zero_grad(set_to_none=True)
        mine = idx[rank::world]
        tot, times = router_step(w, router, [sols[i] for i in mine], args, world, cache, mine)
        t0 = time.time()
        C.all_reduce_grads(router, world)
        opt.step()  # DEVIATION(3)
        times["t_optimizer"] = time.time() - t0
        if world > 1:
            import torch.distributed as dist

            v = torch.tensor([tot[k] for k in tot], dtype=torch.float64)
            dist.all_reduce(v)
            tot = dict(zip(tot, v.tolist()))
        require(math.isfinite(tot["loss"]), f"router loss is {tot['loss']} at step {step}; lower --router_learning_rate")
        log.log(offset + step + 1, stage="router", router_loss=tot["loss"], nll=tot["nll"], alpha_mean=tot["alpha"],
                alpha_base_wrong=tot["a_wrong"] / max(1, tot["n_wrong"]), alpha_base_right=tot["a_right"] / max(1, tot["n_right"]),
                **{k: round(v, 4) for k, v in times.items()})
        w["time"]["router"] = {k: w["time"]["router"].get(k, 0.0) + v for k, v in times.items()}
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.router_steps:
            C.save_checkpoint(ckpt, step=step + 1, optimizer=opt, modules={"router": router}, extra=dict(time=w["time"]))
    bar.close()
    if rank == 0:
        tmp = out + f".tmp{os.getpid()}"
        torch.save(dict(config=router.config, state_dict=router.state_dict(), time=w["time"],
                        base=w["base_path"], rm=w["rm_path"]), tmp)
        os.replace(tmp, out)
        shutil.rmtree(ckpt, ignore_errors=True)
    _barrier(world)
    return router


def router_from(obj: dict) -> Router:
    r = Router(**obj["config"])
    r.load_state_dict(obj["state_dict"])
    return r.eval()


# ---------------------------------------------------------------------------------------------
# ---- stage 3: evaluation of every arm ----
# ---------------------------------------------------------------------------------------------


def eval_sets(args, data: dict) -> tuple[dict, list | None]:
    """{domain: [problem dicts]} and the validation problems (None: no validation set)."""
    def rows(rs, dom="eval"):
        return [dict(prompt=str(r["prompt"]), answer=str(r["answer"]), domain=str(r.get("domain", dom))) for r in rs]

    if "eval" in data:
        ev = {}
        for p in rows(data["eval"]):
            ev.setdefault(p["domain"], []).append(p)
        ev = {d: ps[:args.eval_size] for d, ps in ev.items()}
    else:
        ev = {d: [dict(prompt=p.prompt, answer=p.answer, domain=d, k=len(p.operands))
                  for p in toy_eval_set(d, args.eval_size, args.n_operands)] for d in TOY_EVAL_DOMAINS}
    if "val" in data:
        val = rows(data["val"], "val")[:args.val_size]
    elif "eval" not in data:
        taken = {p["prompt"] for p in ev["add"]}
        val = [dict(prompt=p.prompt, answer=p.answer, domain="add", k=len(p.operands))
               for p in toy_eval_set("add", args.val_size, args.n_operands, tag="val", exclude=taken)]
    else:
        val = None
    return ev, val


def fixed_arms(kind: str, grid: Sequence[float]) -> list[dict]:
    key = "a" if kind == "genarm" else "w"
    return [dict(kind=kind, alpha=a, label=f"{kind} {key}={a:g}") for a in grid]


def run_evals(args, w: dict, evals: dict, val: list | None, rank: int, world: int) -> dict:
    """Every arm of --method on every domain; each result is stored in eval.json as soon as it exists, so a
    resumed run skips finished arms. Returns {label: {domain: result}} plus choices."""
    path = os.path.join(args.output_dir, "eval.json")
    res = {}
    if rank == 0 and args.resume and os.path.isfile(path):
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"'{path}' is unreadable ({e}); delete it to redo the evals") from None
    res = _broadcast(res, world)

    def run(arm: dict, problems: dict) -> dict:
        key = arm["label"]
        if key not in res:
            res[key] = {d: evaluate_arm(w, arm, ps, args.seed, rank, world) for d, ps in problems.items()}
            if rank == 0:
                C.write_json(path, res)
            accs = "  ".join(f"{d} {r['acc']:.3f}" for d, r in res[key].items())
            if rank == 0:
                tqdm.write(f"[eval] {key:<28} {accs}  mean alpha {np.mean([r['mean_alpha'] for r in res[key].values()]):.3f}")
        return res[key]

    run(dict(kind="base", label="base"), evals)
    if "rm" in args.method:
        run(dict(kind="rm", label="rm"), evals)
    for kind in ("genarm", "args"):
        if kind in args.method:
            for arm in fixed_arms(kind, args.alpha_grid):
                if val is not None:
                    run({**arm, "label": "val: " + arm["label"]}, {"val": val})
                run(arm, evals)
    if "taro" in args.method:
        run(dict(kind="taro", label="taro"), evals)
        mean_a = taro_mean_alpha(res["taro"])
        run(dict(kind="genarm", alpha=mean_a, label=SAME_STRENGTH), evals)
    return res


def taro_mean_alpha(per_domain: dict) -> float:
    """TARo's mean alpha_t over every generated token of every evaluated domain (token-weighted, rounded)."""
    tokens = sum(r["tokens"] for r in per_domain.values())
    return round(sum(r["mean_alpha"] * r["tokens"] for r in per_domain.values()) / tokens, 4) if tokens else 0.0


def choices(args, res: dict, domains: Sequence[str]) -> dict:
    """Validation-chosen alpha / w per fixed-weight baseline (ties: the smaller weight) and the per-domain
    oracle (best on the eval set itself: an upper bound, pitfall 7)."""
    out = {}
    for kind in ("genarm", "args"):
        arms = [a for a in fixed_arms(kind, args.alpha_grid) if a["label"] in res]
        if not arms:
            continue
        vals = [(res["val: " + a["label"]]["val"]["acc"], -a["alpha"], a) for a in arms if "val: " + a["label"] in res]
        chosen = max(vals, key=lambda v: (v[0], v[1]))[2] if vals else None
        oracle = {d: max(((res[a["label"]][d]["acc"], -a["alpha"], a["alpha"]) for a in arms))[::2] for d in domains}
        out[kind] = dict(chosen=chosen["alpha"] if chosen else None, chosen_label=chosen["label"] if chosen else None,
                         oracle={d: dict(alpha=v[1], acc=v[0]) for d, v in oracle.items()})
    return out


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------


def has_progress(out: str) -> bool:
    return any(os.path.exists(os.path.join(out, f)) for f in ("rm", "router.pt", "eval.json")) or any(
        C.find_checkpoint(os.path.join(out, c)) for c in ("arm_checkpoint", "router_checkpoint"))


def setup_world(args, device, data: dict) -> dict:
    base_path = model_path(args.model_name_or_path)
    w = dict(device=device, base_path=base_path, temperature=args.temperature, top_k=args.args_top_k,
             beta_r=args.arm_beta, router_features=args.router_features, eval_batch_size=args.eval_batch_size,
             max_new_tokens=args.max_new_tokens, time=dict(arm={}, router={}))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    w["chat"] = args.chat_template == "auto" and bool(getattr(tok, "chat_template", None))
    return w


def load_pair(args, w: dict, rm_path: str) -> None:
    """Base and ARM, frozen, in --dtype; the tokenizer check again on the loaded objects."""
    dt = frozen_dtype(args, w["device"])
    w["base"], w["tok"] = load_frozen(w["base_path"], dt, w["device"])
    w["rm"], rm_tok = load_frozen(rm_path, dt, w["device"])
    w["rm_path"] = rm_path
    check_same_tokenizer(w["tok"], rm_tok, w["base_path"], rm_path)
    w["byte_level"] = type(w["tok"]).__name__.startswith("ByT5")


def main(args):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    C.set_cpu_threads()
    validate_args(args)  # 1. flags, nothing loaded or written
    if args.table:
        return run_table(args)
    data = preflight(args)  # 2. models, tokenizers, router, data files
    rank, world, device = C.ddp_setup()
    # 3. args.json (rank 0 decides; under torchrun every rank stops on its refusal)
    C.start_run(args, has_checkpoint=has_progress(args.output_dir), ignore=RESUME_IGNORE)
    if args.device:
        device = C.pick_device(args.device)
    if args.max_steps:
        args.arm_steps, args.router_steps = min(args.arm_steps, args.max_steps), min(args.router_steps, args.max_steps)
    t0 = time.time()
    C.seed_everything(args.seed)
    w = setup_world(args, device, data)
    offset = args.arm_steps if args.stage in ("arm", "all") else 0
    log = C.MetricLogger(args.output_dir, resume_step=resume_step(args, offset) if args.resume else None)
    rm_path = args.rm_model_name_or_path
    if args.stage in ("arm", "all"):
        t = time.time()
        rm_path = w["rm_path"] = train_arm(args, w, data, log, rank, world)
        w["time"]["arm_stage_s"] = round(time.time() - t, 1)
        if args.stage == "arm":
            finish(args, w, {}, None, t0, rank)
            return C.ddp_cleanup()
    load_pair(args, w, model_path(rm_path))
    if args.stage in ("router", "all"):
        t = time.time()
        w["router"] = train_router(args, w, data, log, rank, world, offset).to(device)
        w["time"]["router_stage_s"] = round(time.time() - t, 1)
    elif "router" in data:
        w["router"] = router_from(data["router"]).to(device)
    t = time.time()
    evals, val = eval_sets(args, data)
    res = run_evals(args, w, evals, val, rank, world)
    w["time"]["eval_stage_s"] = round(time.time() - t, 1)
    finish(args, w, res, list(evals), t0, rank)
    C.ddp_cleanup()


def resume_step(args, offset: int) -> int:
    """The metrics.jsonl row to keep up to: the stage boundary or checkpoint the resumed run continues from."""
    out = args.output_dir
    if os.path.isfile(os.path.join(out, "router.pt")):
        return offset + args.router_steps
    ck = C.checkpoint_step(os.path.join(out, "router_checkpoint"))
    if ck is not None:
        return offset + ck
    if os.path.isfile(os.path.join(out, "rm", "config.json")):
        return offset
    ck = C.checkpoint_step(os.path.join(out, "arm_checkpoint"))
    return ck if ck is not None else 0


def finish(args, w: dict, res: dict, domains: list | None, t0: float, rank: int) -> None:
    if rank != 0:
        return
    rows = C.read_jsonl(os.path.join(args.output_dir, "metrics.jsonl"))
    ch = choices(args, res, domains) if domains else {}
    summary = dict(stage=args.stage, method=args.method, seed=args.seed, base=w["base_path"],
                   rm=w.get("rm_path"), router=args.router_path or (os.path.join(args.output_dir, "router.pt")
                                                                    if args.stage in ("router", "all") else None),
                   alpha_l1=args.alpha_l1, router_loss=args.router_loss, router_features=args.router_features,
                   results={k: v for k, v in res.items() if not k.startswith("val: ")},
                   val={k[5:]: v["val"]["acc"] for k, v in res.items() if k.startswith("val: ")}, choices=ch,
                   taro_mean_alpha=taro_mean_alpha(res["taro"]) if "taro" in res else None,
                   last_train=_last_train(rows), time=w["time"], wall_time_s=round(time.time() - t0, 1),
                   device=str(w["device"]))
    C.write_json(os.path.join(args.output_dir, "summary.json"), summary)
    name = os.path.basename(w["base_path"].rstrip("/"))
    plot_run(rows, summary, os.path.join(args.output_dir, "taro.png"), f"taro | {name} | seed {args.seed}")
    print(final_line(summary, domains, t0), flush=True)


def _last_train(rows: list[dict]) -> dict:
    keys = ("arm_loss", "arm_acc", "chosen_logp", "rejected_logp", "router_loss", "nll", "alpha_mean",
            "alpha_base_wrong", "alpha_base_right")
    return {k: v for r in rows for k, v in r.items() if k in keys}


def final_line(s: dict, domains, t0: float) -> str:
    if not s["results"]:
        return f"done in {(time.time() - t0) / 60:.1f} min: ARM trained ({s['last_train']})  ({s['rm']})"

    def accs(label):
        r = s["results"].get(label)
        return "/".join(f"{r[d]['acc']:.2f}" for d in domains) if r else None

    parts = [f"base {accs('base')}"]
    for kind in ("genarm", "args"):
        c = s["choices"].get(kind, {})
        if c.get("chosen_label"):
            parts.append(f"{kind} (val {c['chosen']:g}) {accs(c['chosen_label'])}")
    if "taro" in s["results"]:
        parts.append(f"taro {accs('taro')} (mean alpha {s['taro_mean_alpha']:.2f})")
        parts.append(f"genarm at that alpha {accs(SAME_STRENGTH)}")
    return f"done in {(time.time() - t0) / 60:.1f} min, acc {'/'.join(domains)}: " + "  ".join(parts)


def plot_run(rows: list[dict], summary: dict, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, ax, lab in (("arm_loss", axes[0], "ARM loss, Eq. (1)"), ("router_loss", axes[1], "router loss, Eq. (6)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        if key == "router_loss":
            pts = [(r["step"], r["alpha_mean"]) for r in rows if "alpha_mean" in r]
            if pts:
                ax2 = ax.twinx()
                ax2.plot(*zip(*pts), color="C1", lw=1)
                ax2.set_ylabel("mean alpha_t", color="C1")
        ax.set(xlabel="update", ylabel=lab, title=lab)
        ax.grid(alpha=0.3)
    res = summary["results"]
    if res:
        labels, doms = list(res), list(next(iter(res.values())))
        ys = np.arange(len(labels))
        for j, d in enumerate(doms):
            axes[2].barh(ys + (j - (len(doms) - 1) / 2) * 0.8 / len(doms), [res[l][d]["acc"] for l in labels],
                         0.8 / len(doms), label=d)
        axes[2].set_yticks(ys, labels, fontsize=7)
        axes[2].invert_yaxis()
        axes[2].set(xlabel="greedy accuracy", xlim=(0, 1), title="accuracy per arm and domain")
        axes[2].legend(fontsize=7)
    else:
        axes[2].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ---- the toy table ----
# ---------------------------------------------------------------------------------------------


def table_runs(out: str, seed: int, with_args: bool = True) -> list[tuple[str, list[str]]]:
    """(run name, flags) of one seed: base-A with every arm; the router again with alpha_l1 0 (same ARM);
    base-B with the ARM and router of base-A, not retrained (transfer)."""
    a = os.path.join(out, "runs", f"A-s{seed}")
    args_ = ",args" if with_args else ""
    return [(f"A-s{seed}", ["--method", "base,rm,genarm,taro" + args_]),
            (f"A_l1_0-s{seed}", ["--stage", "router", "--rm_model_name_or_path", os.path.join(a, "rm"), "--alpha_l1", "0",
                                  "--method", "taro"]),
            (f"B-s{seed}", ["--stage", "eval", "--model_name_or_path", "toy_b", "--rm_model_name_or_path",
                            os.path.join(a, "rm"), "--router_path", os.path.join(a, "router.pt"), "--method",
                            "genarm,taro" + args_])]


def run_table(args):
    """Every seed's runs as subprocesses (finished ones are skipped, so it resumes), then table.md / .json / .png."""
    seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
    keep = ["--arm_steps", str(args.arm_steps), "--router_steps", str(args.router_steps), "--eval_size",
            str(args.eval_size), "--val_size", str(args.val_size)] + (["--max_steps", str(args.max_steps)] if args.max_steps else [])
    os.makedirs(args.output_dir, exist_ok=True)
    summaries = {}
    for s in seeds:
        for name, flags in table_runs(args.output_dir, s, args.table_args):
            out = os.path.join(args.output_dir, "runs", name)
            summ = os.path.join(out, "summary.json")
            if not os.path.isfile(summ):
                cmd = [sys.executable, os.path.abspath(__file__), *keep, *flags, "--seed", str(s), "--output_dir", out]
                cmd += ["--resume"] if os.path.isfile(os.path.join(out, "args.json")) and has_progress(out) else ["--overwrite"]
                print(f"[table] {' '.join(cmd[2:])}", flush=True)
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
                require(r.returncode == 0, f"table run {name} failed (exit {r.returncode}): {last}")
                print("  " + last, flush=True)
            with open(summ) as f:
                summaries[name] = json.load(f)
    md = write_table(summaries, seeds, args.output_dir)
    print(md, flush=True)




def table_rows(summaries: dict, prefix: str, seeds: list[int]) -> list[tuple[str, dict]]:
    """(row label, {column: [per-seed values]}) of one base's runs: every arm as logged, then the validation
    choice and the per-domain oracle of each fixed-weight baseline."""
    runs = [summaries[f"{prefix}-s{s}"] for s in seeds if f"{prefix}-s{s}" in summaries]
    if not runs:
        return []
    doms = list(next(iter(runs[0]["results"].values())))
    labels = list(runs[0]["results"])
    rows = []
    for lab in labels:
        col = {d: [r["results"][lab][d]["acc"] for r in runs] for d in doms}
        col["mean_alpha"] = [float(np.mean([r["results"][lab][d]["mean_alpha"] for d in doms])) for r in runs]
        col["alpha_carry"] = [r["results"][lab].get("add", {}).get("alpha_carry") for r in runs]
        col["alpha_other"] = [r["results"][lab].get("add", {}).get("alpha_other") for r in runs]
        rows.append((lab, col))
    for kind in ("genarm", "args"):
        if all(kind in r["choices"] and r["choices"][kind]["chosen_label"] for r in runs):
            col = {d: [r["results"][r["choices"][kind]["chosen_label"]][d]["acc"] for r in runs] for d in doms}
            col["picked"] = [r["choices"][kind]["chosen"] for r in runs]
            rows.append((f"{kind}, alpha chosen on add validation", col))
        if all(kind in r["choices"] for r in runs):
            col = {d: [r["choices"][kind]["oracle"][d]["acc"] for r in runs] for d in doms}
            col["picked"] = [";".join(f"{r['choices'][kind]['oracle'][d]['alpha']:g}" for d in doms) for r in runs]
            rows.append((f"{kind}, per-domain oracle alpha (upper bound)", col))
    return rows


def write_table(summaries: dict, seeds: list[int], out: str) -> str:
    parts = []
    for prefix, title in (("A", "base-A (2 layers, d 64): every arm"), ("A_l1_0", "base-A, router with alpha_l1 = 0"),
                          ("B", "base-B (3 layers, d 96), ARM and router of base-A not retrained (transfer)")):
        rows = table_rows(summaries, prefix, seeds)
        if not rows:
            continue
        doms = [k for k in rows[0][1] if k not in ("mean_alpha", "alpha_carry", "alpha_other", "picked")]
        runs = [summaries[f"{prefix}-s{s}"] for s in seeds if f"{prefix}-s{s}" in summaries]
        n = sorted({v["n"] for r in runs for v in r["results"][rows[0][0]].values() if "n" in v})
        parts.append(f"**{title}** (greedy accuracy, mean ± std over seeds {','.join(map(str, seeds))}; "
                     f"{'/'.join(map(str, n)) or '?'} held-out problems per domain)\n")
        parts.append("| arm | " + " | ".join(doms) + " | mean α_t | α_t carry digits (add) | α_t elsewhere (add) | α picked per seed |")
        parts.append("|---" * (len(doms) + 5) + "|")
        for lab, col in rows:
            picked = ", ".join(str(p) for p in col.get("picked", [])) or ""
            parts.append(f"| {lab} | " + " | ".join(C.mean_std(col[d]) for d in doms) + " | " +
                         " | ".join(C.mean_std(col.get(k, [])) for k in ("mean_alpha", "alpha_carry", "alpha_other")) +
                         f" | {picked} |")
        mins = [summaries[f"{prefix}-s{s}"]["wall_time_s"] / 60 for s in seeds if f"{prefix}-s{s}" in summaries]
        parts.append(f"\nminutes per run: {np.mean(mins):.1f}\n")
    md = "\n".join(parts) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    C.write_json(os.path.join(out, "table.json"), summaries)
    plot_table(summaries, seeds, os.path.join(out, "table.png"))
    return md


def plot_table(summaries: dict, seeds: list[int], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, table_rows(summaries, p, seeds)) for p in ("A", "B")]
    panels = [(p, rows) for p, rows in panels if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6), squeeze=False)
    for ax, (prefix, rows) in zip(axes[0], panels):
        doms = [k for k in rows[0][1] if k not in ("mean_alpha", "alpha_carry", "alpha_other", "picked")]
        ys = np.arange(len(rows))
        for j, d in enumerate(doms):
            m = [np.mean(col[d]) for _, col in rows]
            sd = [np.std(col[d], ddof=1) if len(col[d]) > 1 else 0 for _, col in rows]
            ax.barh(ys + (j - (len(doms) - 1) / 2) * 0.8 / len(doms), m, 0.8 / len(doms), xerr=sd, label=d)
        ax.set_yticks(ys, [lab for lab, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="greedy accuracy, mean ± std over seeds", title=f"base-{prefix}")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"taro | toy add / max / carry_in | seeds {','.join(map(str, seeds))}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_args())
