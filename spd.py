"""spd.py: self-policy distillation through a capability-selective KV subspace (SPD), with its baselines.

Paper: "Self-Policy Distillation via Capability-Selective Subspace Projection", Hao, Shang, Long, Zhao,
Liang, arXiv 2605.22675, https://arxiv.org/abs/2605.22675. No official code; only the abstract and a
third-party audit of an implementation (which quotes the procedure and Eqs. 12 and 14) were available.

Idea. Improve a model from its own generations with no reward, verifier or teacher, using only a tiny
labelled calibration set. For a few layers, find the low-rank subspace of key / value activations to
which the loss on correctness-defining tokens is most sensitive (SVD of activation *gradients*). While the
model samples its own training data, hard-project K and V onto that subspace. Then fine-tune the
unmodified model on those raw generations (LoRA), so the behaviour is distilled into the weights; the
final model runs without projection.

Equations (layer l in --proj_layers; K, V the k_proj / v_proj outputs, before k-norm and RoPE):
  (11) calibration loss  L_cal = sum_i sum_{t in span_i} -log pi(x_t | x_<t)      (span tokens only)
  (12) subspace          G_l = [dL_cal / dK_l(i, t)]_{i, t}  (rows: every position of every example,
                         prompt and answer), G_l in R^{(sum_i T_i) x d_kv};  G_l = U S V^T;
                         P_l = V_r V_r^T (top r right singular vectors), computed as the top-r
                         eigenvectors of G_l^T G_l (float64; no row matrix is kept); same for V
  (13) projected sampling  K_l <- K_l P_K,l,  V_l <- V_l P_V,l  while sampling one completion y ~ pi_P(.|x)
                         per training prompt; folded exactly into the weights: W' = P W, b' = P b
  (14) SFT               L = -(1 / N_tok) sum_rows sum_{t in prompt + completion} log pi_theta(x_t | x_<t),
                         theta = base + LoRA(q, k, v, o), no projection
  baselines  self_train  (13) without P, same sampling settings (isolates the projection)
             ssd         sample at T = 1.6, top-k 20, top-p 0.8; drop empty outputs and the shortest 10 %; (14)
             base        no training
  controls   --subspace random | bottom (random orthonormal / last r singular vectors), --decode_only
             (evaluate the projected model without SFT)

Deviations from the paper:
  1. The toy (the default run) is a 4-layer, d = 64 HF Llama on common's running-sum world (K = 6 operands,
     OOD K = 8), pretrained on a noisy corpus (carry error, random wrong digit, filler characters), with a
     toy learning rate (tuned on self_train), 3 epochs and batch 16, no gradient checkpointing; the paper
     uses Qwen-class models on code, math and multiple choice, lr 1e-5, 5 epochs. `# DEVIATION(1)`
  2. `--loss_on completion` trains on completion tokens only; the paper's Eq. 14 covers prompt +
     completion (the default, `--loss_on all`). `# DEVIATION(2)`
  3. Under torchrun each rank samples its shard of the training prompts with its own generator, so the
     sampled corpus depends on the number of ranks (greedy sampling does not). `# DEVIATION(3)`

Reconstructed (the record is silent; our choice):
  rank r = round(--rank_frac x d_kv) (the audit leaves open whether "full rank" is d_kv or rank(G); we use
  d_kv; --rank overrides), logged per layer as a number; --proj_layers mid,last = layers L // 2 and L - 1;
  insertion before k-norm and RoPE (where P folds exactly into the weights); sampling for spd and
  self_train at T = 1, top-p 1, no top-k; one completion per prompt, no filtering; calibration span:
  the data's `span` field (a substring of the answer), else the final answer (math: last number; mcq:
  the letter; code: the last non-empty line); the toy's span = every step's result digit + the answer;
  code prompts get the first test appended ("Your code should pass this test: ..."); `--per_head`
  (block-diagonal projector, rank / kv-heads per head); LoRA A ~ kaiming-uniform, B = 0 (as peft);
  cosine schedule without warmup; LoRA on every layer's q, k, v, o.

Commands:
  toy, CPU (~20 s of CPU once the toy students are cached; each student's first build ~14 min of one core):
                        python spd.py                                   (spd on the noisy student)
  baselines/controls:   python spd.py --method self_train | ssd | base
                        python spd.py --subspace random | bottom       python spd.py --decode_only
                        python spd.py --toy_student clean              (nothing to fix: all arms should stay at base)
  table (arms x seeds): python spd.py --table --table_grid all --table_seeds 0,1,2
  one GPU, real model:  python spd.py --model_name_or_path Qwen/Qwen2.5-Coder-1.5B-Instruct --task code \\
                          --calib_file data/mbpp_calib50.jsonl --train_prompts_file data/mbpp_train464.jsonl \\
                          --eval_file data/mbpp_sanitized_test.jsonl --allow_exec --proj_layers mid,last \\
                          --rank_frac 0.5 --lora_r 8 --learning_rate 1e-5 --num_train_epochs 5 --max_new_tokens 512
                        math: --task math (jsonl prompt / answer: last number or \\boxed{}); mcq: --task mcq (letter)
  several GPUs:         torchrun --nproc_per_node 4 spd.py ...   (G^T G summed over ranks' calibration shards:
                        identical projectors; sampling and evaluation sharded over prompts; LoRA SFT data-parallel)

Logged: metrics.jsonl step 0: acc_greedy / acc_sample / acc_ood / filler_* of the base model (`before`),
corpus_acc (accuracy of the sampled training corpus itself: the mechanism SPD relies on), corpus_filler,
corpus_len, corpus_kept, rank and captured gradient energy per projected module, t_calib / t_generate;
per SFT step: loss, lr, grad_norm, tokens, t_forward / t_backward / t_optimizer; last row: the final
evaluation (`after`) and t_eval. summary.json holds both, the time split, and digests of the corpus and
the final weights (a resumed run reproduces both).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import common as C
from common import UserError, exit_on_user_error

# ---- toy world: the noisy student of the spec (its recipe; cached by common.toy_checkpoint) ----
TOY_FILLER = "#"  # the filler character a noisy student writes before a step (a fixable, non-systematic flaw)
TOY_K, TOY_K_OOD = 6, 8  # operands of the in-distribution / OOD problems (running sum mod 10)
_STUDENT_BASE = dict(domains={"add": (1.0, 0.0)}, style="sxr", tokenizer="byte", steps=1500, n_layer=4, d_model=64,
                     n_head=4, batch_size=64, lr=3e-3, seed=0, long_share=0.1)
TOY_STUDENTS = {
    # per step: at a carry the result is written +1 with p 0.4; otherwise a random wrong digit with p 0.1;
    # a filler character before the step with p 0.3. Later steps continue from what was written.
    "noisy": dict(_STUDENT_BASE, noise=dict(carry=0.4, wrong=0.1, filler=0.3)),
    "clean": dict(_STUDENT_BASE, noise=dict(carry=0.0, wrong=0.0, filler=0.0)),  # control: nothing to fix
}
TASKS = ("toy", "math", "mcq", "code")
METHODS = ("spd", "self_train", "ssd", "base")
# flags that never change a run's results (start_run ignores them on --resume)
NON_RESULT_FLAGS = ("save_every", "eval_batch_size", "gen_batch_size", "table_seeds", "table_grid", "device")


# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SPD: self-policy distillation through a capability-selective KV "
                                "subspace, with self_train / ssd / base baselines. Defaults = the toy CPU run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- model ----
    p.add_argument("--model_name_or_path", default="toy", help="pi: HF id / path, or 'toy' (see --toy_student)")
    p.add_argument("--toy_student", default="noisy", choices=tuple(TOY_STUDENTS),
                   help="toy student: noisy (fixable flaws) or clean (control: nothing to fix)")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    # ---- data ----
    p.add_argument("--task", default="toy", choices=TASKS, help="answer checker: toy world, math (last number / "
                   "\\boxed{}), mcq (answer letter), code (asserts in a subprocess, needs --allow_exec)")
    p.add_argument("--calib_file", default=None, help="jsonl: prompt, answer (or code), optional span (substring of answer)")
    p.add_argument("--train_prompts_file", default=None, help="jsonl: prompt (answer / tests optional: corpus accuracy)")
    p.add_argument("--eval_file", default=None, help="jsonl: prompt + answer (math, mcq) or test_list (code)")
    p.add_argument("--n_calib", type=int, default=50, help="calibration examples (the first n of --calib_file)")
    p.add_argument("--n_train_prompts", type=int, default=500, help="training prompts (first n of --train_prompts_file)")
    p.add_argument("--chat_template", default="auto", choices=("auto", "none"), help="wrap prompts in the model's chat template")
    p.add_argument("--allow_exec", action=argparse.BooleanOptionalAction, default=False,
                   help="--task code: run model-written code with the tests in a subprocess (with a timeout)")
    p.add_argument("--exec_timeout", type=float, default=10.0, help="seconds per code test run")
    # ---- method ----
    p.add_argument("--method", default="spd", choices=METHODS, help="spd | self_train | ssd | base (no training)")
    p.add_argument("--subspace", default="top", choices=("top", "random", "bottom"),
                   help="V_r of Eq. (12): top / bottom r singular vectors of G, or a random orthonormal basis")
    p.add_argument("--proj_layers", default="mid,last", help="layers l of Eqs. (12)-(13): comma list of mid (L//2), "
                   "last (L-1), first, all, or 0-based indices")
    p.add_argument("--rank_frac", type=float, default=0.5, help="r = round(rank_frac * d_kv), Eq. (12)")
    p.add_argument("--rank", type=int, default=None, help="r of Eq. (12) as a number (overrides --rank_frac)")
    p.add_argument("--per_head", action=argparse.BooleanOptionalAction, default=False,
                   help="block-diagonal P: one projector of rank r / n_kv_heads per KV head")
    p.add_argument("--decode_only", action=argparse.BooleanOptionalAction, default=False,
                   help="control: evaluate the projected model (Eq. 13 at evaluation), no SFT")
    p.add_argument("--calib_batch_size", type=int, default=8, help="examples per calibration forward + backward")
    # ---- sampling of the training corpus ----
    p.add_argument("--temperature", type=float, default=1.0, help="spd / self_train sampling temperature, Eq. (13)")
    p.add_argument("--top_p", type=float, default=1.0, help="spd / self_train nucleus mass")
    p.add_argument("--top_k", type=int, default=0, help="spd / self_train top-k (0: off)")
    p.add_argument("--ssd_temperature", type=float, default=1.6, help="ssd sampling temperature (released config: 1.5)")
    p.add_argument("--ssd_top_k", type=int, default=20, help="ssd top-k")
    p.add_argument("--ssd_top_p", type=float, default=0.8, help="ssd nucleus mass")
    p.add_argument("--ssd_drop_shortest", type=float, default=0.1, help="ssd: share of the shortest outputs dropped")
    p.add_argument("--max_new_tokens", type=int, default=None, help="tokens per sampled completion (default: toy 48, else 512)")
    p.add_argument("--gen_batch_size", type=int, default=None, help="prompts per generate call (default: toy 500, else 64)")
    # ---- SFT, Eq. (14) ----
    p.add_argument("--loss_on", default="all", choices=("all", "completion"),
                   help="tokens in Eq. (14): prompt + completion (paper) or completion only (DEVIATION 2)")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=8.0, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj", help="Linear names wrapped with LoRA")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW peak lr (cosine to 0); toy value tuned on "
                   "self_train, the paper's is 1e-5")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--num_train_epochs", type=int, default=3, help="epochs over the sampled corpus")
    p.add_argument("--per_device_batch_size", type=int, default=16, help="rows per SFT step per rank")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clip")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing in SFT (default: on for real models, off for the toy)")
    p.add_argument("--seed", type=int, default=0, help="seed of data draws, sampling, LoRA init, dropout")
    # ---- evaluation ----
    p.add_argument("--eval_size", type=int, default=500, help="held-out problems per eval split")
    p.add_argument("--eval_max_new_tokens", type=int, default=None, help="tokens per eval answer (default: --max_new_tokens)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="prompts per eval generate call (default: toy 500, else 16)")
    p.add_argument("--eval_before", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the base model first (the table skips it for trained arms: its base arm has it)")
    # ---- output ----
    p.add_argument("--output_dir", default=None, help="run dir (default runs/spd/<method>[-<subspace>]-<student>-s<seed>)")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every n SFT steps (0: after sampling and at the end)")
    p.add_argument("--save_final_model", action=argparse.BooleanOptionalAction, default=True,
                   help="write the merged (LoRA folded in) model to <output_dir>/final_model")
    p.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its checkpoint")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a finished or started run in --output_dir")
    # ---- table ----
    p.add_argument("--table", action="store_true", help="run the toy table (arms x seeds, subprocesses) instead of one run")
    p.add_argument("--table_grid", default="main", help="comma list of: main, controls, decode, clean, all")
    p.add_argument("--table_seeds", default="0,1,2", help="seeds of the table")
    args = p.parse_args(argv)
    toy_model = args.model_name_or_path == "toy"
    if args.max_new_tokens is None:
        args.max_new_tokens = 48 if args.task == "toy" else 512
    if args.eval_max_new_tokens is None:
        args.eval_max_new_tokens = args.max_new_tokens
    if args.gen_batch_size is None:
        args.gen_batch_size = 500 if args.task == "toy" else 64
    if args.eval_batch_size is None:
        args.eval_batch_size = 500 if args.task == "toy" else 16
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = not toy_model
    if args.output_dir is None:
        sub = f"-{args.subspace}" if args.method == "spd" else ""
        dec = "-decode" if args.decode_only else ""
        tag = "table" if args.table else f"{args.method}{sub}{dec}-{args.toy_student if toy_model else 'model'}-s{args.seed}"
        args.output_dir = os.path.join("runs", "spd", tag)
    return args


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """--proj_layers -> sorted unique 0-based layer indices (mid = L // 2, last = L - 1)."""
    out = set()
    for tok_ in [s.strip() for s in spec.split(",") if s.strip()]:
        if tok_ == "mid":
            out.add(n_layers // 2)
        elif tok_ == "last":
            out.add(n_layers - 1)
        elif tok_ == "first":
            out.add(0)
        elif tok_ == "all":
            out.update(range(n_layers))
        elif re.fullmatch(r"\d+", tok_) and int(tok_) < n_layers:
            out.add(int(tok_))
        else:
            raise UserError(f"--proj_layers '{spec}': '{tok_}' is not mid, last, first, all or a layer index below "
                            f"{n_layers}; pass e.g. --proj_layers mid,last")
    if not out:
        raise UserError("--proj_layers is empty; pass e.g. --proj_layers mid,last")
    return sorted(out)


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work; nothing is loaded or written."""
    req = C.require
    toy_model = args.model_name_or_path == "toy"
    for k in ("n_calib", "n_train_prompts", "eval_size", "max_new_tokens", "eval_max_new_tokens", "gen_batch_size",
              "eval_batch_size", "calib_batch_size", "lora_r", "num_train_epochs", "per_device_batch_size"):
        req(getattr(args, k) >= 1, f"--{k} must be >= 1 (got {getattr(args, k)})")
    req(args.save_every >= 0, f"--save_every must be >= 0 (got {args.save_every})")
    req(0.0 < args.rank_frac <= 1.0, f"--rank_frac must be in (0, 1] (got {args.rank_frac}); it sets r = rank_frac * d_kv")
    req(args.rank is None or args.rank >= 1, f"--rank must be >= 1 (got {args.rank})")
    for k in ("temperature", "ssd_temperature"):
        req(math.isfinite(getattr(args, k)) and getattr(args, k) >= 0, f"--{k} must be >= 0 (got {getattr(args, k)})")
    for k in ("top_p", "ssd_top_p"):
        req(0.0 < getattr(args, k) <= 1.0, f"--{k} must be in (0, 1] (got {getattr(args, k)})")
    for k in ("top_k", "ssd_top_k"):
        req(getattr(args, k) >= 0, f"--{k} must be >= 0 (0: off; got {getattr(args, k)})")
    req(0.0 <= args.ssd_drop_shortest < 1.0, f"--ssd_drop_shortest must be in [0, 1) (got {args.ssd_drop_shortest})")
    req(args.lora_alpha > 0, f"--lora_alpha must be > 0 (got {args.lora_alpha})")
    req(0.0 <= args.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
    req(math.isfinite(args.learning_rate) and args.learning_rate > 0, f"--learning_rate must be > 0 (got {args.learning_rate})")
    req(args.weight_decay >= 0, f"--weight_decay must be >= 0 (got {args.weight_decay})")
    req(args.max_grad_norm > 0, f"--max_grad_norm must be > 0 (got {args.max_grad_norm})")
    req(args.exec_timeout > 0, f"--exec_timeout must be > 0 (got {args.exec_timeout})")
    req(bool([t for t in args.lora_targets.split(",") if t.strip()]), "--lora_targets is empty; pass e.g. q_proj,v_proj")
    # combinations
    req(args.method == "spd" or args.subspace == "top",
        f"--subspace {args.subspace} needs --method spd (only spd projects; {args.method} would ignore it)")
    req(args.method == "spd" or not args.per_head, f"--per_head needs --method spd ({args.method} does not project)")
    req(args.method == "spd" or not args.decode_only,
        f"--decode_only evaluates the projected model: it needs --method spd, not {args.method}")
    req(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other; pass one")
    if toy_model:
        req(args.task == "toy", f"--model_name_or_path toy only knows the toy world; pass a real model for --task {args.task}")
    else:
        req(args.toy_student == "noisy", "--toy_student applies to --model_name_or_path toy only; drop it")
    files = ("calib_file", "train_prompts_file", "eval_file")
    if args.task == "toy":
        given = [f for f in files if getattr(args, f)]
        req(not given, f"--task toy makes its own data; drop --{given[0] if given else ''} or pass --task math|mcq|code")
    else:
        missing = [f for f in files if not getattr(args, f)]
        req(not missing, f"--task {args.task} needs --{', --'.join(missing)} (jsonl files)")
    if args.task == "code":
        req(args.allow_exec, "--task code evaluates model-written code by running it with the tests; pass --allow_exec "
                             "to allow that (it runs in a subprocess with --exec_timeout)")
    if args.table:
        try:
            seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--table_seeds '{args.table_seeds}' must be a comma list of integers") from None
        req(bool(seeds), "--table_seeds is empty")
        bad = {g.strip() for g in args.table_grid.split(",") if g.strip()} - set(TABLE_GRIDS) - {"all"}
        req(not bad, f"unknown --table_grid {sorted(bad)}; use {', '.join(TABLE_GRIDS)} or all")
        req(toy_model, "--table runs the toy arms; drop --model_name_or_path")


# ---------------------------------------------------------------------------------------------
# ---- method math (pure functions; the tests import these) ----
# ---------------------------------------------------------------------------------------------


def span_mask(token_spans: Sequence[tuple[int, int]], char_mask: Sequence[bool]) -> torch.Tensor:
    """Eq. (11) helper: token j of an answer is a span token when any character it covers is in the span.
    token_spans: (start, end) character offsets of the answer's tokens; char_mask: one bool per answer
    character. Returns (T,) bool."""
    return torch.tensor([any(char_mask[a:b]) for a, b in token_spans], dtype=torch.bool)


def span_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. (11): -sum over span tokens of log pi(x_t | x_<t). logp (B, L) aligned with the ids; mask (B, L)."""
    return -(logp * mask.to(logp.dtype)).sum()


def gradient_projector(gram: torch.Tensor, rank: int, kind: str = "top",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (12): the hard orthogonal projector P = V_r V_r^T (d, d), float64.

    gram (d, d) = G^T G: its eigenvectors are the right singular vectors of G (eigenvalues = s^2), so
    `top` = the r directions the span loss is most sensitive to, `bottom` = the r least, `random` = a
    random orthonormal rank-r basis (QR of a Gaussian d x r draw from `generator`)."""
    d = gram.shape[0]
    if not 0 <= rank <= d:
        raise ValueError(f"rank {rank} outside [0, {d}]")
    if kind == "random":
        q, _ = torch.linalg.qr(torch.randn(d, rank, generator=generator, dtype=torch.float64))
        V = q[:, :rank]  # (d, r)
    elif kind in ("top", "bottom"):
        _, vecs = torch.linalg.eigh(gram.detach().double().cpu())  # ascending eigenvalues
        V = vecs[:, d - rank:] if kind == "top" else vecs[:, :rank]  # (d, r)
    else:
        raise ValueError(f"unknown subspace {kind!r}; use top, bottom or random")
    return V @ V.T


def block_projector(gram: torch.Tensor, rank: int, n_heads: int, kind: str = "top",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """--per_head: block-diagonal P, one Eq. (12) projector of rank r / n_heads per KV head block."""
    d = gram.shape[0]
    hd = d // n_heads
    P = torch.zeros(d, d, dtype=torch.float64)
    for h in range(n_heads):
        s = slice(h * hd, (h + 1) * hd)
        P[s, s] = gradient_projector(gram[s, s], rank // n_heads, kind, generator)
    return P


def captured_energy(gram: torch.Tensor, P: torch.Tensor) -> float:
    """Share of the gradient energy ||G||_F^2 = tr(G^T G) inside the subspace: tr(P G^T G) / tr(G^T G)."""
    g = gram.detach().double().cpu()
    tot = float(torch.trace(g))
    return float(torch.trace(P.double() @ g)) / tot if tot > 0 else 0.0


def fold_projection(linear: torch.nn.Linear, P: torch.Tensor) -> torch.nn.Linear:
    """Eq. (13) folded: a new Linear whose output is the old output times P (row vectors, P symmetric):
    (x W^T + b) P = x (P W)^T + P b, i.e. W' = P W, b' = P b. Exact before RoPE / k-norm (pitfall 3)."""
    W = linear.weight
    new = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          device=W.device, dtype=W.dtype)
    Pd = P.to(device=W.device, dtype=torch.float64)
    with torch.no_grad():
        new.weight.copy_((Pd @ W.double()).to(W.dtype))  # (d_kv, d_kv) @ (d_kv, d_in)
        if linear.bias is not None:
            new.bias.copy_((Pd @ linear.bias.double()).to(W.dtype))
    return new


def sft_loss(logp: torch.Tensor, loss_mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Eq. (14): -(1 / N_tok) sum of log pi(x_t | x_<t) over the masked tokens. logp, loss_mask (B, L);
    num_tokens = the global batch's masked tokens under DDP (default: this batch's)."""
    n = num_tokens if num_tokens is not None else float(loss_mask.sum())
    return -(logp * loss_mask.to(logp.dtype)).sum() / max(n, 1.0)


def sft_loss_mask(prompt_lens: Sequence[int], resp_lens: Sequence[int], width: int, loss_on: str) -> torch.Tensor:
    """(B, width) mask of the tokens Eq. (14) scores in left-padded rows of prompt + completion: every
    token but the row's first (it has no prediction; `all`, the paper) or the completion tokens only
    (`completion`, DEVIATION(2))."""
    m = torch.zeros(len(prompt_lens), width, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        first = width - (p + r)  # index of the row's first real token
        m[b, (first + 1 if loss_on == "all" else width - r):] = True
    return m


def ssd_keep(texts: Sequence[str], lengths: Sequence[int], drop_shortest: float) -> list[int]:
    """SSD's filter: drop empty outputs, then the shortest `drop_shortest` share (floor) of the rest
    (ties: the earlier row is dropped first). Returns the kept row indices, in order."""
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    n_drop = int(math.floor(drop_shortest * len(nonempty)))
    dropped = set(sorted(nonempty, key=lambda i: (lengths[i], i))[:n_drop])
    return [i for i in nonempty if i not in dropped]


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Cosine schedule from `peak` (step 0) towards 0 (step `total`), no warmup."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


class LoRALinear(torch.nn.Module):
    """y = W x + b + (alpha / r) B A dropout(x); W, b frozen; A (r, in) kaiming-uniform, B (out, r) = 0."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base, self.r, self.scale = base, r, alpha / r
        for p_ in base.parameters():
            p_.requires_grad_(False)
        dev = base.weight.device
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as peft / nn.Linear
        A = (torch.rand(r, base.in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.lora_A = torch.nn.Parameter(A.to(device=dev, dtype=torch.float32))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)
        z = self.drop(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T  # (..., out)
        return y + (self.scale * z).to(y.dtype)

    def merged(self) -> torch.nn.Linear:
        """A plain Linear with W + (alpha / r) B A (the distilled weights; no adapter at inference)."""
        lin = torch.nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                              device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_((self.base.weight.float() + self.scale * self.lora_B @ self.lora_A).to(lin.weight.dtype))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def add_lora(model, targets: Sequence[str], r: int, alpha: float, dropout: float, seed: int) -> torch.nn.ParameterDict:
    """Wrap every Linear named in `targets` (e.g. q_proj) with LoRALinear, freeze everything else.
    Returns the LoRA parameters (the same tensors) as a ParameterDict: the optimizer's and the checkpoint's."""
    for p_ in model.parameters():
        p_.requires_grad_(False)
    g = torch.Generator().manual_seed(seed * 7 + 3)
    params = torch.nn.ParameterDict()
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in targets and isinstance(m, torch.nn.Linear)]
    if not names:
        raise UserError(f"--lora_targets {','.join(targets)} match no Linear layer of this model; name its projections")
    for n in names:
        parent = model.get_submodule(n.rsplit(".", 1)[0])
        lora = LoRALinear(getattr(parent, n.rsplit(".", 1)[1]), r, alpha, dropout, g)
        setattr(parent, n.rsplit(".", 1)[1], lora)
        params[n.replace(".", "__") + "__A"] = lora.lora_A
        params[n.replace(".", "__") + "__B"] = lora.lora_B
    return params


def merge_lora(model) -> int:
    """Replace every LoRALinear by its merged Linear, in place; returns how many were merged."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], m.merged())
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# ---- world, data, calibration, sampling, evaluation ----
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: str
    answer: str | None = None  # gold answer (math / mcq / toy), or reference code (code calibration)
    span_chars: list[bool] | None = None  # calibration: which answer characters Eq. (11) scores
    tests: list[str] = field(default_factory=list)  # code: asserts
    setup: str = ""  # code: imports / setup run before the code
    final: str | None = None  # toy / math / mcq: the answer the checker compares with


def noisy_trace(rng: random.Random, operands: Sequence[int], carry: float = 0.0, wrong: float = 0.0,
                filler: float = 0.0) -> tuple[str, int]:
    """A running-sum trace ("s x r;" per step, then "=answer") with the noisy student's flaws; later
    steps continue from what was written. Returns (trace, the correct answer)."""
    s = s_true = 0
    parts = []
    for x in operands:
        raw = s + x
        r = raw % 10
        if raw > 9:
            if carry and rng.random() < carry:
                r = (r + 1) % 10
        elif wrong and rng.random() < wrong:
            r = rng.choice([d for d in range(10) if d != r])
        pre = TOY_FILLER if filler and rng.random() < filler else ""
        parts.append(f"{pre}{s}{x}{r};")
        s, s_true = r, (s_true + x) % 10
    return "".join(parts) + f"={s}", s_true


def noisy_sample_fn(recipe: dict):
    """(prompt, trace) sampler of a student recipe (training prompts only; 2-6 operands, long_share 7-8)."""
    noise, long_share = recipe["noise"], recipe["long_share"]

    def sample(rng: random.Random):
        while True:
            lo, hi = C.TOY_LEVELS["ood" if rng.random() < long_share else "train"]
            xs = [rng.randrange(10) for _ in range(rng.randint(lo, hi))]
            prompt = f"add {''.join(map(str, xs))}="
            if C.toy_split_of(prompt) == "train":
                return prompt, noisy_trace(rng, xs, **noise)[0]

    return sample


def toy_student_path(kind: str) -> str:
    """The cached toy student of TOY_STUDENTS[kind] (built on first use, ~10-20 min on one CPU core)."""
    recipe = TOY_STUDENTS[kind]
    return C.toy_checkpoint(f"spd_student_{kind}", recipe=recipe, sample_fn=noisy_sample_fn(recipe))


def toy_span_chars(trace: str) -> list[bool]:
    """The toy's correctness-defining span: every step's result digit and the final answer digit(s)."""
    body, _, ans = trace.rpartition("=")
    mask = [False] * len(trace)
    pos = 0
    for step in body.split(";")[:-1]:
        mask[pos + len(step) - 1] = True  # "s x r": r is the step's last character
        pos += len(step) + 1
    for i in range(len(body) + 1, len(trace)):
        mask[i] = True
    return mask


def toy_examples(split: str, n: int, k: int, seed: str, with_span: bool = False) -> list[Example]:
    """n running-sum problems with exactly k operands from `split` ("train" or "heldout" prompts;
    common.toy_split_of), clean traces as answers (calibration) and the correct final answer."""
    rng = random.Random(f"spd-{seed}")
    out = []
    while len(out) < n:
        xs = [rng.randrange(10) for _ in range(k)]
        prompt = f"add {''.join(map(str, xs))}="
        if C.toy_split_of(prompt) != split:
            continue
        trace, ans = noisy_trace(rng, xs)
        out.append(Example(prompt, trace, toy_span_chars(trace) if with_span else None, final=str(ans)))
    return out


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-J])\b")


def final_of(task: str, answer: str) -> str | None:
    """The gold final answer inside a reference answer text (GSM8K '#### 72', \\boxed{}, a letter)."""
    if task == "math":
        b = C.extract_answer(answer) if "\\boxed{" in answer else None
        if b is not None:
            return b
        m = _NUM.findall(answer)
        return m[-1].replace(",", "") if m else None
    if task == "mcq":
        m = _LETTER.findall(answer.strip())
        return m[-1] if m else (answer.strip() or None)
    return None


def fallback_span(task: str, answer: str) -> tuple[int, int] | None:
    """Character range of the calibration span when the data has no `span`: the final answer
    (math: its last number; mcq: the letter; code: the last non-empty line)."""
    if task == "code":
        lines = answer.rstrip().split("\n")
        start = len("\n".join(lines[:-1])) + (1 if len(lines) > 1 else 0)
        return (start, len(answer.rstrip())) if answer.strip() else None
    pat = _NUM if task == "math" else _LETTER
    m = list(pat.finditer(answer))
    if not m:
        return None
    g = 1 if task == "mcq" else 0
    return m[-1].start(g), m[-1].end(g)


def load_examples(path: str, task: str, role: str, n: int | None = None) -> list[Example]:
    """Examples of a jsonl file for `role` calib | train | eval, checked line by line (file:line)."""
    out = []
    rows = C.read_jsonl(path, keys=("prompt",), with_lines=True)  # file:line on bad JSON or a row without 'prompt'
    C.require(rows, f"{path} holds no records; it needs one JSON object per line")
    for i, row in rows:
        where = f"{path}:{i}"
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{where}: needs a non-empty string 'prompt'")
        tests = row.get("test_list", row.get("tests", []))
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise UserError(f"{where}: 'test_list' must be a list of assert strings")
        setup = row.get("test_imports", [])
        setup = "\n".join(setup) if isinstance(setup, list) else str(setup)
        setup = "\n".join(s for s in (setup, str(row.get("test_setup_code", "") or "")) if s)
        prompt = row["prompt"]
        if task == "code" and tests:  # reconstructed: the function name comes from the first test
            prompt = f"{prompt}\nYour code should pass this test:\n{tests[0]}"
        answer = row.get("answer", row.get("code"))
        ex = Example(prompt, str(answer) if answer is not None else None, tests=tests, setup=setup)
        if answer is not None and task in ("math", "mcq"):
            ex.final = final_of(task, str(answer))
        if role == "calib":
            if not isinstance(answer, str) or not answer.strip():
                raise UserError(f"{where}: a calibration record needs a non-empty 'answer' (or 'code')")
            span = row.get("span")
            if span is not None:
                if not isinstance(span, str) or not span or span not in answer:
                    raise UserError(f"{where}: 'span' must be a non-empty substring of the answer")
                a = answer.rfind(span)
                rng_ = (a, a + len(span))
            else:
                rng_ = fallback_span(task, answer)
                if rng_ is None:
                    raise UserError(f"{where}: no 'span' and no final answer found in the answer; add a 'span' field")
            ex.span_chars = [rng_[0] <= j < rng_[1] for j in range(len(answer))]
        if role == "eval":
            if task == "code" and not tests:
                raise UserError(f"{where}: a code eval record needs 'test_list' (asserts)")
            if task in ("math", "mcq") and ex.final is None:
                raise UserError(f"{where}: an eval record needs an 'answer' with a final {'number' if task == 'math' else 'letter'}")
        out.append(ex)
        if n is not None and len(out) >= n:
            break
    return out


def extract_code(text: str) -> str:
    """The first ```python (or ```) block of a response, else the whole response."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", text, re.S)
    return m.group(1) if m else text


def run_code_tests(code: str, ex: Example, timeout: float) -> bool:
    """--task code: setup + code + asserts in a fresh `python -I` subprocess in a temp dir; pass = exit 0."""
    prog = "\n".join([ex.setup, code, *ex.tests])
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run([sys.executable, "-I", "-c", prog], cwd=d, capture_output=True, timeout=timeout,
                               env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def is_right(task: str, text: str, ex: Example, exec_timeout: float = 10.0) -> bool | None:
    """Whether a response answers `ex` (None when `ex` has no answer to check against)."""
    if task == "code":
        return run_code_tests(extract_code(text), ex, exec_timeout) if ex.tests else None
    if ex.final is None:
        return None
    if task == "toy":
        return C.is_correct(text, ex.final)
    if task == "math":
        got = C.extract_answer(text) if "\\boxed{" in text else (_NUM.findall(text) or [None])[-1]
        if got is None:
            return False
        a, b = C.as_number(got), C.as_number(ex.final)
        return a == b if a is not None and b is not None else got.strip() == ex.final.strip()
    m = _LETTER.findall(text)
    return bool(m) and m[-1] == ex.final


def render(tok, prompts: Sequence[str], chat: bool) -> list[str]:
    return [C.render_chat(tok, [{"role": "user", "content": p}]) for p in prompts] if chat else list(prompts)


def decoder_layers(model):
    """The decoder layers of a HF causal LM (Llama, Qwen2/3, Mistral, SmolLM ...)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if layers is None or not all(hasattr(getattr(l, "self_attn", None), "k_proj") for l in layers):
        raise UserError(f"{type(model).__name__} has no decoder layers with self_attn.k_proj / v_proj; SPD needs a "
                        f"Llama-style attention (separate k_proj and v_proj)")
    return layers


def kv_modules(model, layers: Sequence[int]) -> dict[str, torch.nn.Linear]:
    """{"<layer>.k": k_proj, "<layer>.v": v_proj} of the chosen layers: the outputs Eqs. (12)-(13) act on
    (before k-norm and RoPE; d_kv = num_key_value_heads * head_dim, pitfall 7)."""
    dl = decoder_layers(model)
    out = {}
    for l in layers:
        out[f"{l}.k"] = dl[l].self_attn.k_proj
        out[f"{l}.v"] = dl[l].self_attn.v_proj
    return out


def encode_calibration(tok, examples: Sequence[Example], chat: bool, device=None):
    """Teacher-forced (prompt + answer) ids and the Eq. (11) span mask, left-padded: (ids, attn, span) (B, L).
    Answer tokens are those encode_pairs appends (the answer tokenised alone); their character offsets
    come from the fast tokenizer's offset mapping, or from decoding prefixes (slow tokenizers)."""
    prompts = render(tok, [e.prompt for e in examples], chat)
    answers = [e.answer for e in examples]
    ids, attn, resp = C.encode_pairs(tok, prompts, answers, add_eos=False, device=device)
    span = torch.zeros_like(attn, dtype=torch.bool)
    for b, e in enumerate(examples):
        a_ids = ids[b][resp[b].bool()].tolist()
        span[b, ids.shape[1] - len(a_ids):] = span_mask(token_char_spans(tok, e.answer, a_ids), e.span_chars)
    return ids, attn, span


def token_char_spans(tok, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) character offsets of each token of `text` tokenised alone (no special tokens)."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == list(ids):
            return [tuple(o) for o in enc["offset_mapping"]]
    spans, prev = [], 0
    for j in range(len(ids)):
        cur = len(tok.decode(list(ids[:j + 1]), skip_special_tokens=True, clean_up_tokenization_spaces=False))
        spans.append((prev, max(prev, cur)))
        prev = max(prev, cur)
    return spans


def kv_gradient_rows(model, modules: dict[str, torch.nn.Module], ids: torch.Tensor, attn: torch.Tensor,
                     span: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Eq. (12) rows: dL_cal / d(output of each module) at every real position (prompt and answer, pitfall 2),
    stacked over the batch: {name: (sum_b T_b, d_kv) float64}, and L_cal (Eq. 11).

    A zero probe is added to each output (hooks only here, for gradient capture); autograd.grad w.r.t. the
    probes gives the output gradients without touching the weights' .grad."""
    probes: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(mod, inp, out):
            p_ = torch.zeros_like(out, requires_grad=True)
            probes[name] = p_
            return out + p_
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            logp = C.token_logprobs(model, ids, attn)  # (B, L); the LM head in slices
            loss = span_nll(logp, span)  # Eq. (11)
            grads = torch.autograd.grad(loss, [probes[n] for n in modules], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    valid = attn.bool()
    rows = {n: (g if g is not None else torch.zeros_like(probes[n]))[valid].double() for n, g in zip(modules, grads)}
    return rows, loss.detach()


def calibration_grams(model, tok, examples: Sequence[Example], layers: Sequence[int], chat: bool, batch_size: int,
                      world: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """G^T G per projected module (float64, (d_kv, d_kv)), accumulated over batches of this rank's
    examples, summed over ranks: every rank then holds the same grams (and projectors)."""
    device = next(model.parameters()).device
    modules = kv_modules(model, layers)
    grams = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=device)
             for n, m in modules.items()}
    stats = torch.zeros(3, dtype=torch.float64)  # rows, span tokens, span NLL
    req = [p_.requires_grad for p_ in model.parameters()]
    for p_ in model.parameters():  # gradients w.r.t. activations only
        p_.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            ids, attn, span = encode_calibration(tok, examples[i:i + batch_size], chat, device)
            rows, loss = kv_gradient_rows(model, modules, ids, attn, span)
            for n, r in rows.items():
                grams[n] += r.T @ r  # Eq. (12): G^T G, no row matrix kept across batches
            stats += torch.tensor([float(attn.sum()), float(span.sum()), float(loss)], dtype=torch.float64)
    finally:
        for p_, r in zip(model.parameters(), req):
            p_.requires_grad_(r)
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        for g in grams.values():
            dist.all_reduce(g)
        s = stats.to(device)
        dist.all_reduce(s)
        stats = s.cpu()
    return {n: g.cpu() for n, g in grams.items()}, dict(calib_rows=int(stats[0]), calib_span_tokens=int(stats[1]),
                                                      calib_span_nll=float(stats[2]) / max(1.0, float(stats[1])))


def layer_rank(d_kv: int, n_kv: int, args) -> int:
    """r of Eq. (12) for a module with output dim d_kv (pitfall 4: an absolute number, logged)."""
    if args.rank is not None:
        return args.rank
    if args.per_head:
        return int(round(args.rank_frac * (d_kv // n_kv))) * n_kv
    return int(round(args.rank_frac * d_kv))


def build_projectors(grams: dict[str, torch.Tensor], args, n_kv: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Eq. (12) for every module: P (float64) of rank r, and per-module stats (rank, captured energy).
    The random subspace draws from a seed-determined generator: identical on every rank."""
    g = torch.Generator().manual_seed(args.seed * 7919 + 13)
    Ps, stats = {}, {}
    for n, gram in grams.items():
        r = layer_rank(gram.shape[0], n_kv, args)
        if args.per_head:
            P = block_projector(gram, r, n_kv, args.subspace, g)
        else:
            P = gradient_projector(gram, r, args.subspace, g)
        Ps[n] = P
        stats[f"rank_{n}"] = r
        stats[f"energy_{n}"] = round(captured_energy(gram, P), 4)
    return Ps, stats


@contextlib.contextmanager
def projected_kv(model, projectors: dict[str, torch.Tensor] | None):
    """Eq. (13) during sampling / decode-only evaluation: P folded into the k_proj / v_proj weights in
    place (W' = P W, b' = P b; the original weights are kept and restored on exit), so common.generate
    runs unchanged, a compiled static-cache decode loop included (no hooks at generation)."""
    if not projectors:
        yield
        return
    layers = sorted({int(n.split(".")[0]) for n in projectors})
    mods = kv_modules(model, layers)
    saved = {}
    try:
        with torch.no_grad():
            for n, P in projectors.items():
                m = mods[n]
                saved[n] = (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                folded = fold_projection(m, P)
                m.weight.copy_(folded.weight)
                if m.bias is not None:
                    m.bias.copy_(folded.bias)
        yield
    finally:
        with torch.no_grad():
            for n, (w_, b_) in saved.items():
                mods[n].weight.copy_(w_)
                if b_ is not None:
                    mods[n].bias.copy_(b_)


class TopKHead(torch.nn.Module):
    """An LM head whose logits keep only the k largest per row (the rest -inf): top-k sampling through
    common.generate, whose sampler applies temperature and top-p (HF order: temperature, top-k, top-p)."""

    def __init__(self, head, k: int):
        super().__init__()
        self.head, self.k = head, k

    def forward(self, h):
        logits = self.head(h)
        kth = logits.topk(min(self.k, logits.shape[-1]), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))


@contextlib.contextmanager
def top_k_head(model, k: int):
    if not k:
        yield
        return
    head = model.get_output_embeddings()
    model.set_output_embeddings(TopKHead(head, k))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def sampling_of(args, method: str) -> dict:
    """Sampling settings of an arm: spd and self_train share them (pitfall 8); ssd has its own."""
    if method == "ssd":
        return dict(temperature=args.ssd_temperature, top_p=args.ssd_top_p, top_k=args.ssd_top_k)
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)


@torch.no_grad()
def sample_corpus(model, tok, examples: Sequence[Example], chat: bool, sampling: dict, max_new_tokens: int,
                  batch_size: int, generator: torch.Generator, projectors=None, rank: int = 0,
                  world: int = 1) -> list[dict]:
    """Eq. (13): one completion per training prompt (this rank's prompts[rank::world]), with K, V
    projected when `projectors` is given. Rows: idx, prompt_ids, response_ids, text, finished; all
    ranks' rows gathered and put back in prompt order."""
    idx = list(range(len(examples)))[rank::world]
    rows = []
    with projected_kv(model, projectors), top_k_head(model, sampling["top_k"]):
        for i in range(0, len(idx), batch_size):
            part = idx[i:i + batch_size]
            g = C.generate(model, tok, render(tok, [examples[j].prompt for j in part], chat), max_new_tokens=max_new_tokens,
                           temperature=sampling["temperature"], top_p=sampling["top_p"], generator=generator)
            P = g.prompt_len
            for b, j in enumerate(part):
                pm = g.attention_mask[b, :P].bool()
                rm = g.response_mask[b].bool()
                rows.append(dict(idx=j, prompt_ids=g.sequences[b, :P][pm].tolist(),
                                 response_ids=g.response_ids[b][rm].tolist(), text=g.texts[b],
                                 finished=g.finish_reasons[b] == "stop"))
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, rows)
        rows = sorted([r for p_ in parts for r in p_], key=lambda r: r["idx"])
    return rows


def corpus_stats(rows: Sequence[dict], examples: Sequence[Example], task: str, exec_timeout: float) -> dict:
    """Quality of the sampled training corpus itself (pitfall 9: the mechanism SPD relies on)."""
    right = [is_right(task, r["text"], examples[r["idx"]], exec_timeout) for r in rows]
    scored = [x for x in right if x is not None]
    out = dict(corpus_rows=len(rows), corpus_len=float(np.mean([len(r["response_ids"]) for r in rows])) if rows else 0.0,
               corpus_finished=float(np.mean([r["finished"] for r in rows])) if rows else 0.0)
    if scored:
        out.update(corpus_acc=float(np.mean(scored)), corpus_correct=int(sum(scored)))
    if task == "toy":
        out["corpus_filler"] = float(np.mean([r["text"].count(TOY_FILLER) for r in rows])) if rows else 0.0
    return out


@torch.no_grad()
def evaluate(model, tok, problems: Sequence[Example], task: str, chat: bool, temperature: float, max_new_tokens: int,
             batch_size: int, exec_timeout: float, generator: torch.Generator | None = None, rank: int = 0,
             world: int = 1) -> tuple[float, float]:
    """(accuracy, filler characters per response) on held-out problems; sharded over ranks and summed."""
    shard = problems[rank::world]
    correct = filler = 0
    for i in range(0, len(shard), batch_size):
        batch = shard[i:i + batch_size]
        g = C.generate(model, tok, render(tok, [p.prompt for p in batch], chat), max_new_tokens=max_new_tokens,
                       temperature=temperature, generator=generator)
        correct += sum(bool(is_right(task, t, p, exec_timeout)) for t, p in zip(g.texts, batch))
        filler += sum(t.count(TOY_FILLER) for t in g.texts)
    tot = torch.tensor([correct, filler], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tot)
    n = max(1, len(problems))
    return float(tot[0]) / n, float(tot[1]) / n


def run_evals(model, tok, w: dict, args, rank: int = 0, world: int = 1, projectors=None) -> dict:
    """Greedy and T = 1 accuracy (id), greedy OOD accuracy (toy), filler per response (toy)."""
    kw = dict(task=args.task, chat=w["chat"], max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size,
              exec_timeout=args.exec_timeout, rank=rank, world=world)
    out = {}
    with projected_kv(model, projectors):
        out["acc_greedy"], out["filler_greedy"] = evaluate(model, tok, w["evals"]["id"], temperature=0.0, **kw)
        gen = torch.Generator(next(model.parameters()).device).manual_seed(args.seed * 1000 + 7 + rank)
        out["acc_sample"], out["filler_sample"] = evaluate(model, tok, w["evals"]["id"], temperature=1.0,
                                                           generator=gen, **kw)
        if "ood" in w["evals"]:
            out["acc_ood"], out["filler_ood"] = evaluate(model, tok, w["evals"]["ood"], temperature=0.0, **kw)
    if args.task != "toy":  # filler characters are a toy-world metric
        out = {k: v for k, v in out.items() if not k.startswith("filler")}
    return out


# ---------------------------------------------------------------------------------------------
# ---- training ----
# ---------------------------------------------------------------------------------------------


def model_dims(args) -> dict:
    """Layers, KV heads, head dim and d_kv of the model, from its config (the toy's from its recipe)."""
    if args.model_name_or_path == "toy":
        r = TOY_STUDENTS[args.toy_student]
        return dict(n_layers=r["n_layer"], n_kv=r["n_head"], head_dim=r["d_model"] // r["n_head"],
                    d_kv=r["d_model"])
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(os.path.expanduser(args.model_name_or_path))
    cfg = getattr(cfg, "text_config", None) or cfg
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return dict(n_layers=cfg.num_hidden_layers, n_kv=n_kv, head_dim=hd, d_kv=n_kv * hd)


def preflight(args) -> dict:
    """Everything the run will read, checked before any write: the model's config (its dims against
    --proj_layers / --rank / --per_head) and every data file (file:line on a bad record)."""
    if args.model_name_or_path != "toy":
        C.preflight_model(args.model_name_or_path)
    dims = model_dims(args)
    layers = parse_layers(args.proj_layers, dims["n_layers"])
    if args.method == "spd":
        r = layer_rank(dims["d_kv"], dims["n_kv"], args)
        C.require(1 <= r <= dims["d_kv"], f"rank r = {r} is outside [1, d_kv = {dims['d_kv']}] (d_kv = {dims['n_kv']} KV "
                                          f"heads x {dims['head_dim']}); lower --rank or --rank_frac")
        if args.per_head:
            C.require(r % dims["n_kv"] == 0, f"--per_head: rank {r} is not a multiple of the {dims['n_kv']} KV heads; "
                                             f"pass --rank as a multiple of {dims['n_kv']}")
    data = {}
    if args.task != "toy":
        data["calib"] = load_examples(args.calib_file, args.task, "calib", args.n_calib)
        data["train"] = load_examples(args.train_prompts_file, args.task, "train", args.n_train_prompts)
        data["eval"] = load_examples(args.eval_file, args.task, "eval", args.eval_size)
    return dict(dims=dims, layers=layers, data=data)


def build_world(args, pre: dict) -> dict:
    """Calibration examples, training prompts and held-out evals (toy: drawn from the seed)."""
    if args.task == "toy":
        return dict(calib=toy_examples("train", args.n_calib, TOY_K, f"calib-{args.seed}", with_span=True),
                    train=toy_examples("train", args.n_train_prompts, TOY_K, f"train-{args.seed}"),
                    evals={"id": toy_examples("heldout", args.eval_size, TOY_K, "eval-id"),
                           "ood": toy_examples("heldout", args.eval_size, TOY_K_OOD, "eval-ood")})
    d = pre["data"]
    return dict(calib=d["calib"], train=d["train"], evals={"id": d["eval"]})


def prepare_corpus(model, tok, w: dict, args, rank: int, world: int) -> dict:
    """Phases before SFT: calibration -> projectors (spd) -> the sampled corpus (spd / self_train / ssd).
    Returns what the step-0 checkpoint keeps: rows, projectors, metrics, times."""
    out: dict = dict(rows=[], projectors=None, metrics={}, times={})
    if args.method == "base":
        return out
    t = time.perf_counter()
    if args.method == "spd":
        shard = w["calib"][rank::world]
        grams, cstats = calibration_grams(model, tok, shard, w["layers"], w["chat"], args.calib_batch_size, world)
        projectors, pstats = build_projectors(grams, args, w["dims"]["n_kv"])
        out["projectors"] = {n: P.float() for n, P in projectors.items()}
        out["metrics"].update(cstats, **pstats)
    out["times"]["t_calib"] = _elapsed(t, model)
    t = time.perf_counter()
    gen = torch.Generator(next(model.parameters()).device).manual_seed(args.seed * 1000 + 11 + rank)
    rows = sample_corpus(model, tok, w["train"], w["chat"], sampling_of(args, args.method), args.max_new_tokens,
                         args.gen_batch_size, gen, out["projectors"], rank, world)
    out["times"]["t_generate"] = _elapsed(t, model)
    out["metrics"].update({f"sampled_{k}": v for k, v in corpus_stats(rows, w["train"], args.task, args.exec_timeout).items()
                           if k in ("corpus_acc", "corpus_filler")})
    if args.method == "ssd":  # drop empty outputs and the shortest 10 %
        keep = ssd_keep([r["text"] for r in rows], [len(r["response_ids"]) for r in rows], args.ssd_drop_shortest)
        rows = [rows[i] for i in keep]
    out["metrics"].update(corpus_stats(rows, w["train"], args.task, args.exec_timeout), corpus_kept=len(rows))
    out["rows"] = rows
    return out


def _elapsed(t0: float, model=None) -> float:
    if model is not None and next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def sft_batch(rows: Sequence[dict], loss_on: str, pad_id: int, device):
    """Left-padded prompt + completion ids of corpus rows and the Eq. (14) loss mask: (ids, attn, mask)."""
    seqs = [r["prompt_ids"] + r["response_ids"] for r in rows]
    ids, attn = C.left_pad(seqs, pad_id, device)
    mask = sft_loss_mask([len(r["prompt_ids"]) for r in rows], [len(r["response_ids"]) for r in rows], ids.shape[1],
                         loss_on).to(device)
    return ids, attn, mask


def sft_schedule(n_rows: int, args, world: int) -> list[list[int]]:
    """Row indices of every global SFT batch: per epoch a seeded shuffle (a pure function of seed and
    epoch: --resume replays it), cut into batches of per_device_batch_size x world rows."""
    B = args.per_device_batch_size * world
    out = []
    for ep in range(args.num_train_epochs):
        order = list(range(n_rows))
        random.Random(f"spd-sft-{args.seed}-{ep}").shuffle(order)
        out += [order[i:i + B] for i in range(0, n_rows, B)]
    return out


def sft_step(model, params: torch.nn.ParameterDict, opt, rows: Sequence[dict], args, step: int, total: int, pad_id: int,
             rank: int = 0, world: int = 1) -> dict:
    """One Eq. (14) update on a global batch (this rank takes rows[rank::world]): forward, backward,
    gradient all-reduce, clip, AdamW at the cosine lr. Returns metrics incl. the time split."""
    device = next(iter(params.values())).device
    mine = rows[rank::world]
    t0 = time.perf_counter()
    ids, attn, mask = sft_batch(mine, args.loss_on, pad_id, device)
    n_tok = torch.tensor([float(mask.sum())], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(n_tok)
    if mine:
        with C.autocast(device):
            logp = C.token_logprobs(model, ids, attn)  # (B, L)
        loss = sft_loss(logp, mask, float(n_tok)) * world  # Eq. (14), this rank's share x world (all_reduce averages)
    else:  # a last global batch smaller than the ranks: zero gradients, so every rank joins the all-reduce
        loss = sum(p_.sum() * 0.0 for p_ in params.values())
    t1 = _elapsed(t0, model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    C.all_reduce_grads(model, world)
    t2 = _elapsed(t0, model)
    gnorm = torch.nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm)
    lr = cosine_lr(step, total, args.learning_rate)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    t3 = _elapsed(t0, model)
    loss_g = loss.detach().float().cpu() / world
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(loss_g)
    return dict(loss=float(loss_g), lr=lr, grad_norm=float(gnorm), tokens=int(n_tok), t_forward=t1,
                t_backward=t2 - t1, t_optimizer=t3 - t2)


def make_optimizer(params: torch.nn.ParameterDict, args, device) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameters, fused where the device supports it (issue 21)."""
    ps = list(params.values())
    try:
        return torch.optim.AdamW(ps, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(ps, lr=args.learning_rate, weight_decay=args.weight_decay, foreach=True)


def enable_activation_checkpointing(model) -> None:
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def state_digest(model) -> str:
    """A short hash of the model's weights (the summary's proof that a resumed run ends identical)."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def corpus_digest(rows: Sequence[dict]) -> str:
    return hashlib.sha1(json.dumps([[r["idx"], r["response_ids"]] for r in rows]).encode()).hexdigest()[:12]


def trains(args) -> bool:
    return args.method != "base" and not args.decode_only


def main(args):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    C.set_cpu_threads()
    validate_args(args)  # 1. flags (nothing loaded, nothing written)
    if args.table:
        return run_table(args)
    pre = preflight(args)  # 2. model config and data files
    rank, world, device = C.ddp_setup()
    if args.device:
        device = C.pick_device(args.device)
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    has_ck = C.find_checkpoint(ckpt_dir) is not None if args.resume else False
    C.start_run(args, has_checkpoint=has_ck, ignore=NON_RESULT_FLAGS)  # 3. output-dir policy; now we may write
    main_rank = C.is_main()
    t_start = time.time()
    C.seed_everything(args.seed)
    path = toy_student_path(args.toy_student) if args.model_name_or_path == "toy" else args.model_name_or_path
    model, tok = C.load_lm(path, device=device)  # trainable weights fp32 (bf16 autocast on CUDA)
    chat = args.chat_template == "auto" and bool(getattr(tok, "chat_template", None))
    w = dict(build_world(args, pre), chat=chat, layers=pre["layers"], dims=pre["dims"])

    params = opt = None

    def attach_lora():  # after sampling: calibration and sampling hook / fold the plain k_proj / v_proj
        nonlocal params, opt
        if trains(args):
            params = add_lora(model, [t.strip() for t in args.lora_targets.split(",") if t.strip()], args.lora_r,
                              args.lora_alpha, args.lora_dropout, args.seed)  # B = 0: the model is unchanged
            opt = make_optimizer(params, args, device)
            if args.gradient_checkpointing:
                enable_activation_checkpointing(model)
        return {"lora": params} if params is not None else None

    if args.resume:
        modules = attach_lora()
        st = C.load_checkpoint(ckpt_dir, optimizer=opt, modules=modules)
        start, prep, before = st["step"], st["extra"]["prep"], st["extra"]["before"]
        log = C.MetricLogger(args.output_dir, resume_step=start)
    else:
        start, before = 0, {}
        log = C.MetricLogger(args.output_dir)
        t = time.perf_counter()
        if args.eval_before:
            before = run_evals(model, tok, w, args, rank, world)
            if main_rank:
                tqdm.write("before: " + "  ".join(f"{k} {v:.3f}" for k, v in before.items()))
        t_eval0 = _elapsed(t, model)
        prep = prepare_corpus(model, tok, w, args, rank, world)  # calibration, projectors, sampling
        prep["times"]["t_eval_before"] = t_eval0
        log.log(0, **before, **prep["metrics"], **prep["times"])
        if main_rank and prep["metrics"]:
            tqdm.write("corpus: " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in prep["metrics"].items() if k.startswith(("corpus", "rank"))))
        modules = attach_lora()
        C.save_checkpoint(ckpt_dir, optimizer=opt, step=0, modules=modules, extra=dict(prep=prep, before=before))

    sched = sft_schedule(len(prep["rows"]), args, world) if trains(args) else []
    total = len(sched)
    if trains(args) and total == 0:
        raise UserError("the sampled corpus is empty after filtering; nothing to fine-tune on (check --max_new_tokens)")
    times = dict(t_forward=0.0, t_backward=0.0, t_optimizer=0.0)
    if args.resume:
        times.update(st["extra"].get("sft_times", {}))
    bar = tqdm(range(start, total), desc=f"spd[{args.method}]", disable=not main_rank, initial=start, total=total)
    log.pbar = bar
    model.train()
    for step in bar:
        m = sft_step(model, params, opt, [prep["rows"][i] for i in sched[step]], args, step, total, tok.pad_token_id,
                     rank, world)
        if not math.isfinite(m["loss"]):
            ck = C.find_checkpoint(ckpt_dir)
            raise UserError(f"loss is {m['loss']} at SFT step {step}; the last good checkpoint stays in {ck}; lower "
                            f"--learning_rate")
        for k in times:
            times[k] += m[k]
        log.log(step + 1, **m)
        done = step + 1
        if args.save_every and done % args.save_every == 0 and done < total:
            C.save_checkpoint(ckpt_dir, optimizer=opt, step=done, modules=modules,
                              extra=dict(prep=prep, before=before, sft_times=times))
    bar.close()
    model.eval()
    if total and start < total:  # before the final eval: a crash there keeps the trained weights
        C.save_checkpoint(ckpt_dir, optimizer=opt, step=total, modules=modules,
                          extra=dict(prep=prep, before=before, sft_times=times))
    merge_lora(model)  # the distilled weights; evaluation runs without projection (pitfall 5)
    t = time.perf_counter()
    if args.method == "base" and before:  # nothing changed: the base model's evaluation is the result
        after = dict(before)
    else:
        after = run_evals(model, tok, w, args, rank, world, projectors=prep["projectors"] if args.decode_only else None)
    t_eval = _elapsed(t, model)
    if main_rank:
        finish(args, model, tok, log, path, prep, before, after, times, t_eval, total, t_start, device, world)
    C.ddp_cleanup()


def finish(args, model, tok, log, path, prep, before, after, times, t_eval, total, t_start, device, world) -> None:
    """Rank 0: last metrics row, summary.json, the PNG, the merged model, the final line."""
    log.log(total, **after, t_eval=t_eval)
    split = dict(prep["times"], **times, t_eval=t_eval)
    summary = dict(method=args.method, subspace=args.subspace if args.method == "spd" else None,
                   decode_only=args.decode_only, per_head=args.per_head, task=args.task, model=path, seed=args.seed,
                   proj_layers=args.proj_layers, before=before, after=after, corpus=prep["metrics"], sft_steps=total,
                   corpus_digest=corpus_digest(prep["rows"]), weights_digest=state_digest(model),
                   time_split_s={k: round(v, 2) for k, v in split.items()},
                   wall_time_s=round(time.time() - t_start, 1), device=str(device), world_size=world)
    C.write_json(os.path.join(args.output_dir, "summary.json"), summary)
    rows = C.read_jsonl(log.path)
    name = "toy " + args.toy_student if args.model_name_or_path == "toy" else os.path.basename(path.rstrip("/"))
    keys = [k for k in ("loss", "lr", "grad_norm", "acc_greedy", "acc_sample", "acc_ood", "filler_sample")
            if any(k in r for r in rows)]
    C.plot_metrics(log.path, os.path.join(args.output_dir, "spd.png"), keys=keys,
                   title=f"spd [{args.method}] | {name} | seed {args.seed}")
    if args.save_final_model:
        model.save_pretrained(os.path.join(args.output_dir, "final_model"))
        tok.save_pretrained(os.path.join(args.output_dir, "final_model"))
    arrow = (lambda k: f"{k} {before[k]:.3f} -> {after[k]:.3f}" if k in before else f"{k} {after[k]:.3f}")
    parts = [arrow(k) for k in ("acc_greedy", "acc_sample", "acc_ood", "filler_sample") if k in after]
    if "corpus_acc" in prep["metrics"]:
        parts.append(f"corpus_acc {prep['metrics']['corpus_acc']:.3f}")
    print(f"done in {(time.time() - t_start) / 60:.1f} min [{args.method}"
          f"{'/' + args.subspace if args.method == 'spd' else ''}{' decode-only' if args.decode_only else ''}]: "
          + "  ".join(parts) + f"  ({args.output_dir})", flush=True)


# ---------------------------------------------------------------------------------------------
# ---- the toy table ----
# ---------------------------------------------------------------------------------------------

TABLE_GRIDS = ("main", "controls", "decode", "clean")


def table_arms(grids: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """(student, label, flags) of the toy table."""
    arms = []
    if "main" in grids:
        arms += [("noisy", "base", ["--method", "base"]), ("noisy", "self_train", ["--method", "self_train"]),
                 ("noisy", "ssd", ["--method", "ssd"]), ("noisy", "spd (top)", [])]
    if "controls" in grids:
        arms += [("noisy", "spd random", ["--subspace", "random"]), ("noisy", "spd bottom", ["--subspace", "bottom"])]
    if "decode" in grids:
        arms += [("noisy", f"decode-only {s}", ["--decode_only", "--subspace", s]) for s in ("top", "random", "bottom")]
    if "clean" in grids:
        arms += [("clean", lab, fl) for lab, fl in [("base", ["--method", "base"]), ("self_train", ["--method", "self_train"]),
                                                    ("ssd", ["--method", "ssd"]), ("spd (top)", [])]]
    return arms


def run_table(args):
    """Every arm x seed as its own subprocess (finished runs are reused, so it resumes), then table.md,
    table.json and table.png under --output_dir."""
    grids = [g.strip() for g in args.table_grid.split(",") if g.strip()]
    if "all" in grids:
        grids = list(TABLE_GRIDS)
    seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
    flags = ["--n_calib", str(args.n_calib), "--n_train_prompts", str(args.n_train_prompts), "--eval_size",
             str(args.eval_size), "--learning_rate", str(args.learning_rate), "--num_train_epochs",
             str(args.num_train_epochs), "--per_device_batch_size", str(args.per_device_batch_size),
             "--no-save_final_model"]
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    todo = [(st, lab, fl, s) for st, lab, fl in table_arms(grids) for s in seeds]
    for i, (st, lab, fl, s) in enumerate(todo):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{st}-{lab}").strip("_")
        out = os.path.join(args.output_dir, "runs", f"{slug}-s{s}")
        summ = os.path.join(out, "summary.json")
        if not os.path.isfile(summ):
            extra = [] if "base" in fl else ["--no-eval_before"]  # the base arm measures the base model
            cmd = [sys.executable, os.path.abspath(__file__), *flags, *fl, *extra, "--toy_student", st, "--seed", str(s),
                   "--output_dir", out, "--overwrite"]
            print(f"[table {i + 1}/{len(todo)}] {' '.join(cmd[2:])}", flush=True)
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
            if r.returncode != 0:
                print(f"  failed (exit {r.returncode}): {last}", flush=True)
                continue
            print("  " + last, flush=True)
        with open(summ) as f:
            results.append({**json.load(f), "student": st, "label": lab})
    write_table(results, args.output_dir)




TABLE_COLUMNS = [("greedy acc (id)", lambda r: r["after"].get("acc_greedy")),
                 ("T=1 acc (id)", lambda r: r["after"].get("acc_sample")),
                 ("greedy acc (OOD)", lambda r: r["after"].get("acc_ood")),
                 ("filler / response (T=1)", lambda r: r["after"].get("filler_sample")),
                 ("corpus acc", lambda r: r["corpus"].get("corpus_acc")),
                 ("corpus filler / row", lambda r: r["corpus"].get("corpus_filler")),
                 ("corpus rows kept", lambda r: r["corpus"].get("corpus_kept"))]


def table_rows(results: Sequence[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    """Results grouped by (student, arm), in first-seen order."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["student"], r["label"]), []).append(r)
    return list(groups.items())


def write_table(results: Sequence[dict], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = "| student | arm | seeds | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " | minutes / run |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 4)]
    groups = table_rows(results)
    for (st, lab), rs in groups:
        cells = [C.mean_std([f(r) for r in rs], "{:.1f}" if "kept" in c else "{:.3f}") for c, f in TABLE_COLUMNS]
        lines.append(f"| {st} | {lab} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells)
                     + f" | {np.mean([r['wall_time_s'] for r in rs]) / 60:.1f} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md)
    C.write_json(os.path.join(out_dir, "table.json"), list(results))
    if groups:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(groups) + 1.4))
        ys = np.arange(len(groups))
        for j, (c, f_) in enumerate(TABLE_COLUMNS[:2] + TABLE_COLUMNS[4:5]):
            vals = [[f_(r) for r in rs if f_(r) is not None] for _, rs in groups]
            mean = [np.mean(v) if v else 0 for v in vals]
            std = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals]
            ax.barh(ys + 0.27 * (j - 1), mean, 0.27, xerr=std, color=f"C{j}", label=c)
        ax.set_yticks(ys, [f"{st}: {lab}" for (st, lab), _ in groups], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy, mean ± std over seeds")
        ax.set_xlim(0, 1)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title("spd | toy running-sum world | arms x seeds")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "table.png"), dpi=110)
        plt.close(fig)
    print(md, flush=True)
    return md


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_args())
