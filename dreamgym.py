"""dreamgym.py: agent RL on synthetic experience from a reasoning experience model, with sim-to-real.

Paper: "Scaling Agent Learning via Experience Synthesis" (DreamGym), Z. Chen, Z. Zhao, ... J. Weston,
D. Huynh, ICLR 2026, arXiv 2511.03773, https://arxiv.org/abs/2511.03773 (no official code).

Idea. Real agent environments are slow and costly to roll out in. An LLM *experience model* M_exp,
fine-tuned on offline real transitions, reads the task, the history, the current abstract text state,
the action and the top-k most similar real transitions from a replay buffer; it writes a reasoning
trace, then the next state, the outcome reward and done. The policy (an LM emitting text actions)
is trained with GRPO entirely inside M_exp; a curriculum asks M_exp (as task generator) for
variants of the tasks whose group rewards vary most. Sim-to-real (S2R) adds a little real RL after.

Equations implemented (numbering of this file; the paper's Eq. 4-7 where they exist):
  (1) M_exp(R_t, s_{t+1}, r_{t+1}, d | tau, {(s_i, a_i)}_{i<t}, D_k, s_t, a_t)       [paper Eq. 4]
  (2) L_SFT = -log P(R* | s, a, H, D_k) - log P(s', r, d | s, a, R*, H, D_k)          [paper Eq. 5]
      (token-mean NLL over the target tokens; inadmissible actions -> failure, r = 0, d = 1)
  (3) D_k = top-k of cos(phi(s, a), phi(s_j, a_j)) over the replay buffer, own episode excluded
  (4) V_tau = (1/n) sum_i (r_i - rbar)^2 (= p(1-p) for binary r)                      [paper Eq. 6-7]
  (5) A_i = (R_i - mean_G R) / (std_G R + 1e-6), broadcast over the action units of trajectory i
  (6) L = -token_mean(min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)) + beta KL, rho = pi/pi_old
  (7) score mode: log pi(a|s) = log_softmax over admissible a' of sum_t log p(a'_t | s, a'_<t)

Toy world (CPU, minutes): ShopLite, a web-shop-like text environment (search, result pages,
items with sizes, buy) with the WebShop-style attribute reward; M_exp and the policy are tiny
HF Llama models trained here (M_exp on a 1,024-id BPE, the policy on whole words). The same code path
takes any HF model or an OpenAI-compatible endpoint as M_exp, and any HF causal LM as the policy.

Arms (--method, comma-separated; same warm-started policy, same number of synthetic/real policy
updates): real_grpo (GRPO in the real env, stopped at --real_budget N real steps), dreamgym (all
rollouts in M_exp, 0 new real steps; the offline real steps are reported beside it), s2r (dreamgym,
then real GRPO with <= --s2r_frac x real_grpo's real steps, or x N; DEVIATION(7)), no_retrieval
(k = 0, M_exp retrained without demos), no_reasoning (M_exp retrained without R*), no_curriculum
(lambda = 0), bc (the warm start, no RL); train_exp (only fine-tune M_exp, from --offline_file or the
toy's offline data). Two diagnostic arms separate M_exp's two error sources (not in the paper):
exp_states (M_exp's states and done, the true reward rule applied to M_exp's item state at `buy`) and
exp_reward (true states: every step a real ShopLite step; M_exp's reward on each real purchase). Every
synthetic success is replayed in the real env; a failing replay is state-caused when some synthetic state
before the last action differs from the real one, else reward-caused (hallucination_split).

Deviations from the paper:
  1. Toy sizes (CPU): M_exp is a 2-layer d = 128 Llama (spec: 4 layers) fine-tuned for at most
     --exp_epochs 8 (spec: 3; at 3 its held-out loss was still falling), stopped early when its held-out
     loss (512 examples of the held-out offline trajectories, every 0.5 epoch) has not improved twice,
     best weights kept, at
     --exp_learning_rate 3e-3 (spec: 1e-3; a 2-layer model from scratch in a CPU budget; real
     models want ~1e-5, see the commands below). Offline data at about the paper's WebShop scale:
     1,500 scripted-expert + 2,000 epsilon-random trajectories (spec: 300 + 200; paper: 1.6K human
     demos + 2K oracle/random). Default run: 12 policy iterations of 4 tasks x G = 8, a quick look; the
     README table (--table) uses the spec's 40 of 8 x 8; 3 items per result page (spec: 5); demos <= 130
     characters (spec: 150).
  2. `back` always returns to the search page (WebShop returns to the previous page); M_exp would
     otherwise need the whole page history to redraw it.
  3. The reasoning target R* comes from a rule annotator (spec: an LLM annotator on GPU), and
     feasibility of generated tasks is judged by a catalogue rule (spec: the same).
  4. Greedy M_exp answers (--exp_temperature 0) are memoised by their exact prompt: identical
     prompts give identical outputs anyway, so this only saves time.
  5. Catalogue, tasks, offline data and M_exp are built once from --data_seed (0) and shared by all
     policy seeds, so seed variance covers policy init, BC, rollouts and curriculum only; s2r's
     synthetic phase is the dreamgym run of the same seed: when both run, s2r continues from dreamgym's
     checkpoint at the end of its loop (policy, AdamW, RNGs, buffer, pool, M_exp counters), which equals
     running that phase again (a test checks it). Every arm starts M_exp from the same state (its memo
     after the held-out error check, counters 0, local sampling reseeded with the policy seed), so an
     arm's numbers do not depend on which arms ran before it.
  6. The toy M_exp reads a small BPE tokenizer (1024 ids, trained in memory on its SFT texts with
     common's BPE helper) instead of bytes: byte-level sequences were ~18x longer and the byte model
     had not learned the format after 9 CPU minutes. The toy policy reads whole words (DEVIATION 9).
  7. Real-step budget: --real_budget N defaults to 5000 (spec: 20000), and s2r's real cap is
     --s2r_frac x (the real training steps real_grpo actually used in the same seed) when real_grpo
     ran in this invocation (it runs before s2r), else --s2r_frac x N (spec: s2r_frac x N). In the
     toy real_grpo ends after its --iterations updates long before N (~1,700 real steps), so
     10% of N was ~25% of what real_grpo used, not the paper's "<= 10% of its real steps". The cap
     and N are logged (summary.json, table.md).
  8. phi of Eq. (3) is the hashed bag of words only (spec also names a mean-pooled-hidden-state
     `--retriever embed`, not built here: the toy M_exp's SFT data needs the retriever before
     M_exp exists).
  9. The toy policy (2 layers, d = 64, as the spec's) reads a word-level BPE (~450 ids, trained in memory
     on ShopLite prompts and actions of the offline data; common.bpe_tokenizer(words=True)) instead of
     bytes (spec): prompts are ~2.9x shorter, so a GRPO iteration is ~3.5x faster, which is what makes the
     spec's 40 x 8 scale affordable for every arm and seed on a CPU. --policy_tokenizer byte is the spec's.

Reconstructed (the paper does not say; our choice): the M_exp text format
`<think>R</think><state>s'</state><reward>r</reward><done>d</done>`; phi = hashed bag of words (1024 dims) of (s, a),
and of (s, a, task) for `buy`; a retrieved `buy` demo shows its task ("for red shirt, under $30: item: ... | buy => done
r1"): a purchase's reward holds for its task only, and 73% of the demos of held-out failed purchases were successful
buys of other tasks, shown without their task as if they graded this purchase (with the task in the key, same-task
demos of offline buys rose from 6% to 13%; most demos still come from other tasks, now labelled as such); k = 3;
lambda_syn = 0.3; failed purchases repeated 3x in M_exp's SFT data (pitfall 1); M_task's SFT pairs map a
training task to one of its feasible one-edit variants (task_variants: an attribute changed, added or dropped,
or the price cap moved by 10), and the curriculum keeps only candidates that are variants of their seed task
(same category, 1-2 fields changed), feasible, new and not eval tasks; curriculum keeps
at most 4 variants per iteration, most constraints first; an endpoint M_task gets a system text
with the task grammar (the local M_task learns it from its `<gen_task>` SFT pairs);
synthetic buffer entries FIFO-capped at 20000 (real ones kept); a synthetic step is rewarded only
when M_exp ends the episode (r = 0 while done = 0 and on timeout, as ShopLite); GRPO std unbiased
with a group of one giving A = 0; clip 0.2 / 0.28; hallucinated success = share of 64 synthetic
successes that fail when their actions are replayed in the real env; generate mode: logp_old is
recomputed after the rollout with the update's own function and precision (so rho starts at 1),
real policies (--model_name_or_path) read a short <think>..</think><action>..</action> instruction
inside their chat template, and --offline_file rewards are made binary (r = 1 iff the raw score is
1 or "success" is true; the raw score is kept as r_raw).

Commands:
  toy CPU (bc vs real_grpo vs dreamgym vs s2r, seed 0; the first run also fine-tunes and caches M_exp):
      python dreamgym.py
  the README's main table (core arms, seeds 0-4, the spec's 40 x 8; writes table.md and dreamgym.png):
      python dreamgym.py --method bc,real_grpo,dreamgym,s2r --seeds 0,1,2,3,4 --iterations 40 --tasks_per_iter 8 \
          --real_budget 20000 --eval_every 10
  every arm incl. the ablations (retrains the no_retrieval / no_reasoning M_exps), seeds 0 1 2, 40 x 8:
      python dreamgym.py --table
  real models on a GPU (M_exp = an SFT'd HF model or an endpoint):
      python dreamgym.py --method train_exp --offline_file data/webshop_offline.jsonl \
          --exp_model_name_or_path Qwen/Qwen2.5-7B-Instruct --exp_learning_rate 1e-5 --exp_epochs 3 \
          --output_dir runs/dreamgym/mexp
      python dreamgym.py --method dreamgym,s2r --model_name_or_path meta-llama/Llama-3.2-3B-Instruct \
          --exp_model_name_or_path runs/dreamgym/mexp/exp_model --action_mode generate --horizon 15 \
          --learning_rate 1e-6
      ... or --exp_api_base http://localhost:8000/v1 --exp_api_model NAME (JSON replies)
  several GPUs / CPU processes (whole GRPO groups per rank, new transitions all-gathered):
      torchrun --nproc_per_node 8 dreamgym.py --method dreamgym ...

Logged (metrics.jsonl per iteration, summary.json per arm and seed): real success on the eval
tasks (greedy and sampled; eval uses only the real env), synthetic success, new real training
steps, offline real steps, hallucinated-success rate and its split (state- / reward-caused, with the
action type that made the first wrong state), M_exp reward error eps_R and false-success
rate on held-out real transitions, eps_P proxies (exact next state, element F1); M_exp on fresh real
transitions (metric_sets: 300 balanced purchases and 100 transitions per action type, once on training
tasks with copies of SFT transitions removed, once on the eval tasks): purchase accuracy, false and missed
successes with counts, exact next state per action type (m_train, m_new; table.md's second table); zero-variance
group share, synthetic-vs-real success gap, share of retrieved demos that are real, invalid and
malformed transitions (synthetic and, in generate mode, real), the real-step cap of real_grpo (N)
and s2r, loss, clip fraction, wall time, and where an iteration's time goes (metrics.jsonl "time_s",
summary.json "time_split", seconds): rollout_policy (the policy scoring / sampling actions), logp_old
(generate mode), world (M_exp or the real env), forward / backward / optimizer (the GRPO update),
curriculum (M_task), eval and halluc_replay (real-env diagnostics).

Runs. Bad flags, a missing model path, an unreachable endpoint (--request_timeout bounds each request)
or a bad --offline_file end the run with one line and exit 2 before anything is written. A fresh run
into an --output_dir that holds a run is refused unless --overwrite (which deletes it). --resume reads
back finished arm/seed runs (result-*.json) and continues the unfinished one from its last checkpoint
(ckpt-<arm>-s<seed>, every --eval_every iterations and at the end of its loop: policy, AdamW and every
rank's RNGs, replay-buffer additions, curriculum pool, synthetic rollouts, M_exp memo and counters, step
counters); rows logged after it are cut from metrics.jsonl, so kill -9 + --resume ends in the same
summary.json as an uninterrupted run. It refuses a directory without a checkpoint and changed flags
(all but --request_timeout, --exp_api_key_env, --real_step_delay).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zlib

import numpy as np
import torch
from tqdm.auto import tqdm

import common as C

ARMS = ("bc", "real_grpo", "dreamgym", "s2r", "exp_states", "exp_reward", "no_retrieval", "no_reasoning",
        "no_curriculum")
# The README table's scale (the spec's 40 x 8; real GRPO learns there, see the README), set by --table. The defaults
# are a smaller quick run (12 x 4).
TABLE_SCALE = dict(iterations=40, tasks_per_iter=8, real_budget=20000, eval_every=10)


# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run
    p.add_argument("--method", default="bc,real_grpo,dreamgym,s2r",
                   help=f"comma-separated arms from {','.join(ARMS)}, or train_exp (fine-tune M_exp only)")
    p.add_argument("--seeds", default="0", help="comma-separated policy seeds; each arm runs once per seed")
    p.add_argument("--seed", type=int, default=None, help="a single seed (overrides --seeds)")
    p.add_argument("--table", action="store_true",
                   help="every arm x seeds 0,1,2 at the README table's scale (--iterations 40 --tasks_per_iter 8 "
                        "--real_budget 20000 --eval_every 10 unless given); writes table.md + plot")
    p.add_argument("--output_dir", default=None, help="default runs/dreamgym/<methods>")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output_dir: finished arm/seed runs are read back, the unfinished one "
                        "continues from its last checkpoint (refused without one, or when a result flag changed)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a previous run in --output_dir (without it a fresh run there is refused)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: best available)")
    # world (ShopLite); DEVIATION(1): toy sizes
    p.add_argument("--data_seed", type=int, default=0, help="seed of catalogue, tasks, offline data and M_exp")
    p.add_argument("--n_products", type=int, default=120, help="catalogue size")
    p.add_argument("--n_train_tasks", type=int, default=300, help="training tasks")
    p.add_argument("--n_eval_tasks", type=int, default=100, help="held-out evaluation tasks (real env only)")
    p.add_argument("--page_size", type=int, default=3, help="items per result page")
    p.add_argument("--horizon", type=int, default=10, help="H, steps per episode (timeout = failure)")
    p.add_argument("--real_step_delay", type=float, default=0.0, help="seconds slept per real step (cost model)")
    p.add_argument("--n_expert", type=int, default=1500, help="scripted-expert offline trajectories")
    p.add_argument("--n_random", type=int, default=2000,
                   help="epsilon-random offline trajectories (epsilon 0.3 / 0.6 / 1.0; failures, invalid actions)")
    p.add_argument("--heldout_frac", type=float, default=0.1, help="offline trajectories held out for eps_R / eps_P")
    p.add_argument("--offline_file", default=None, help="jsonl of offline transitions (replaces the toy's)")
    # experience model M_exp (DEVIATION(1): 2 layers, 8 epochs)
    p.add_argument("--exp_model_name_or_path", default=None, help="HF M_exp (default: tiny toy M_exp, trained+cached)")
    p.add_argument("--exp_api_base", default=None, help="OpenAI-compatible endpoint for M_exp (JSON replies)")
    p.add_argument("--exp_api_model", default=None, help="model name at --exp_api_base")
    p.add_argument("--exp_api_key_env", default="OPENAI_API_KEY", help="env var holding the endpoint's key")
    p.add_argument("--request_timeout", type=float, default=120.0,
                   help="seconds one M_exp / M_task request to --exp_api_base may take, retries included")
    p.add_argument("--exp_layers", type=int, default=2, help="toy M_exp layers")
    p.add_argument("--exp_d_model", type=int, default=128, help="toy M_exp width")
    p.add_argument("--exp_vocab_size", type=int, default=1024, help="BPE vocabulary of the toy M_exp")
    p.add_argument("--exp_epochs", type=float, default=8.0,
                   help="max SFT epochs of M_exp, Eq. (2); early stopping on the held-out loss may end it sooner")
    p.add_argument("--exp_eval_every", type=float, default=0.5, help="epochs between M_exp's held-out evaluations")
    p.add_argument("--exp_patience", type=int, default=2,
                   help="held-out evaluations without improvement before M_exp's SFT stops (best weights kept)")
    p.add_argument("--exp_learning_rate", type=float, default=3e-3,
                   help="SFT learning rate of M_exp, Eq. (2) (toy from scratch; spec 1e-3; ~1e-5 for a 7B model)")
    p.add_argument("--exp_batch_size", type=int, default=32, help="SFT batch of M_exp")
    p.add_argument("--fail_oversample", type=int, default=3, help="SFT repeats of failed purchases (pitfall 1)")
    p.add_argument("--exp_temperature", type=float, default=0.0, help="sampling temperature of M_exp (0 = greedy)")
    p.add_argument("--exp_max_new_tokens", type=int, default=None,
                   help="max tokens of one M_exp answer (default 64 for the toy M_exp, 512 with --exp_api_base or "
                        "--exp_model_name_or_path: a real model's reasoning + JSON/tags need room)")
    p.add_argument("--no_reasoning", action="store_true", help="M_exp without the reasoning trace R (ablation)")
    p.add_argument("--top_k", type=int, default=3, help="k, retrieved demos per M_exp call, Eq. (3)")
    p.add_argument("--demo_bytes", type=int, default=130, help="max characters of one demo")
    p.add_argument("--buffer_add", default="synthetic", choices=["synthetic", "real", "none"],
                   help="what enters the replay buffer after each iteration")
    p.add_argument("--buffer_cap", type=int, default=20000, help="FIFO cap of synthetic buffer entries")
    p.add_argument("--exp_retries", type=int, default=2, help="retries of a malformed endpoint reply")
    # curriculum
    p.add_argument("--lambda_syn", type=float, default=0.3, help="lambda, max synthetic share of a task batch")
    p.add_argument("--curr_seeds", type=int, default=4, help="tasks with top V_tau (Eq. 4) that seed variants")
    p.add_argument("--curr_candidates", type=int, default=4, help="variants sampled per seed task")
    p.add_argument("--task_temperature", type=float, default=1.0,
                   help="sampling temperature of M_task (local and endpoint; 0 = greedy, identical candidates)")
    # policy
    p.add_argument("--model_name_or_path", default=None,
                   help="policy (default: a tiny Llama, 2 layers d 64, trained here from BC on)")
    p.add_argument("--policy_tokenizer", default="word", choices=["word", "byte"],
                   help="toy policy's tokenizer: word = BPE on whole words of ShopLite text (~2.9x fewer tokens "
                        "than bytes); byte = bytes (spec)")
    p.add_argument("--action_mode", default="score", choices=["score", "generate"], help="Eq. (7) or free text")
    p.add_argument("--max_action_tokens", type=int, default=None,
                   help="generate mode: max new tokens of one policy answer (default 32 for the toy policy, "
                        "256 with --model_name_or_path: room for <think>..</think><action>..</action>)")
    p.add_argument("--bc_trajectories", type=int, default=50, help="epsilon = 0.5 trajectories for the BC warm start")
    p.add_argument("--bc_epochs", type=int, default=10, help="BC epochs")
    # GRPO (DEVIATION(1): 12 iterations x 4 tasks)
    p.add_argument("--iterations", type=int, default=12, help="policy iterations (one GRPO update each)")
    p.add_argument("--tasks_per_iter", type=int, default=4, help="tasks per iteration")
    p.add_argument("--group_size", type=int, default=8, help="G, rollouts per task, Eq. (5)")
    p.add_argument("--temperature", type=float, default=1.0, help="policy sampling temperature")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="AdamW learning rate of the policy")
    p.add_argument("--clip_low", type=float, default=0.2, help="eps_low of Eq. (6)")
    p.add_argument("--clip_high", type=float, default=0.28, help="eps_high of Eq. (6)")
    p.add_argument("--beta", type=float, default=0.0, help="beta of Eq. (6), KL to the warm start (0 = off)")
    p.add_argument("--ppo_epochs", type=int, default=2, help="passes over each iteration's rollouts")
    p.add_argument("--num_minibatches", type=int, default=2, help="minibatches per pass")
    p.add_argument("--per_device_batch_size", type=int, default=256, help="action units per forward (memory)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--real_budget", type=int, default=5000,
                   help="N, real training steps allowed to real_grpo (DEVIATION(7): spec 20000)")
    p.add_argument("--s2r_frac", type=float, default=0.1,
                   help="s2r's real-step cap as a share of real_grpo's real steps in the same seed (when real_grpo "
                        "ran in this invocation), else of N (DEVIATION(7))")
    # eval / logging
    p.add_argument("--eval_every", type=int, default=4, help="iterations between real-env evaluations")
    p.add_argument("--n_halluc", type=int, default=64, help="synthetic successes replayed in the real env")
    p.add_argument("--n_heldout_eval", type=int, default=150, help="held-out real transitions for eps_R / eps_P")
    p.add_argument("--n_metric_buys", type=int, default=300,
                   help="balanced fresh real purchases (half failed) M_exp's purchase accuracy is measured on, on "
                        "training tasks and on new tasks (0 = skip these metrics)")
    p.add_argument("--n_metric_per_action", type=int, default=100,
                   help="fresh real transitions per other action type for M_exp's per-action state accuracy")
    args = p.parse_args(argv)
    if args.table:
        args.method, args.seeds = ",".join(ARMS), "0,1,2"
        for name, value in TABLE_SCALE.items():  # the README table's scale, where a flag was left at its default
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if args.seed is not None:
        args.seeds = str(args.seed)
    if args.exp_max_new_tokens is None:
        args.exp_max_new_tokens = 512 if (args.exp_api_base or args.exp_model_name_or_path) else 64
    if args.max_action_tokens is None:
        args.max_action_tokens = 256 if args.model_name_or_path else 32
    return args


def run_methods(args) -> list[str]:
    return [m.strip() for m in args.method.split(",") if m.strip()]


def run_seeds(args) -> list[int]:
    try:
        return [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise C.UserError(f"--seeds '{args.seeds}' is not a comma-separated list of integers; e.g. --seeds 0,1,2") \
            from None


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work, checked before anything is loaded or
    written (a UserError: one line, exit 2)."""
    req = C.require
    methods = run_methods(args)
    req(methods, f"--method is empty; pass some of {','.join(ARMS)} or train_exp")
    bad = [m for m in methods if m not in ARMS + ("train_exp",)]
    req(not bad, f"unknown --method '{bad[0] if bad else ''}'; use some of {','.join(ARMS)} or train_exp")
    req("train_exp" not in methods or methods == ["train_exp"],
        "--method train_exp only fine-tunes M_exp and runs alone; run the arms in a separate command")
    seeds = run_seeds(args)
    req(seeds and min(seeds) >= 0, f"--seeds '{args.seeds}' must list seeds >= 0")
    req(args.data_seed >= 0, f"--data_seed {args.data_seed} must be >= 0")
    for name in ("horizon", "page_size", "n_products", "n_train_tasks", "n_eval_tasks", "exp_layers", "exp_d_model",
                 "exp_batch_size", "fail_oversample", "exp_max_new_tokens", "exp_patience", "curr_candidates", "max_action_tokens",
                 "iterations", "tasks_per_iter", "group_size", "ppo_epochs", "num_minibatches", "per_device_batch_size",
                 "eval_every", "n_halluc", "n_heldout_eval", "demo_bytes"):
        req(getattr(args, name) >= 1, f"--{name} {getattr(args, name)} must be >= 1")
    for name in ("n_expert", "n_random", "top_k", "buffer_cap", "exp_retries", "curr_seeds", "bc_trajectories",
                 "bc_epochs", "real_budget", "n_metric_buys", "n_metric_per_action"):
        req(getattr(args, name) >= 0, f"--{name} {getattr(args, name)} must be >= 0")
    for name in ("heldout_frac", "exp_epochs", "exp_eval_every", "exp_learning_rate", "exp_temperature", "task_temperature", "lambda_syn",
                 "temperature", "learning_rate", "clip_low", "clip_high", "beta", "max_grad_norm", "s2r_frac",
                 "real_step_delay", "request_timeout"):
        req(math.isfinite(getattr(args, name)), f"--{name} {getattr(args, name)} must be a finite number")
    for name in ("exp_epochs", "exp_eval_every", "exp_learning_rate", "learning_rate", "max_grad_norm",
                 "request_timeout"):
        req(getattr(args, name) > 0, f"--{name} {getattr(args, name)} must be > 0")
    for name in ("exp_temperature", "task_temperature", "temperature", "clip_high", "beta", "real_step_delay"):
        req(getattr(args, name) >= 0, f"--{name} {getattr(args, name)} must be >= 0")
    req(0 <= args.heldout_frac < 1, f"--heldout_frac {args.heldout_frac} must be in [0, 1)")
    req(0 <= args.clip_low < 1, f"--clip_low {args.clip_low} must be in [0, 1) (rho is clipped at 1 - clip_low)")
    req(0 <= args.lambda_syn <= 1, f"--lambda_syn {args.lambda_syn} must be in [0, 1] (a share of the task batch)")
    req(0 < args.s2r_frac <= 1, f"--s2r_frac {args.s2r_frac} must be in (0, 1] (0 would make s2r the dreamgym arm)")
    req(args.exp_vocab_size >= 260, f"--exp_vocab_size {args.exp_vocab_size} must be >= 260 (256 bytes + 3 specials "
                                    f"+ merges)")
    # combinations
    req(not (args.exp_api_base and args.exp_model_name_or_path),
        "pass either --exp_api_base or --exp_model_name_or_path for M_exp, not both")
    req(not args.exp_api_base or args.exp_api_model, "--exp_api_base needs --exp_api_model (the model name it serves)")
    req(not (args.model_name_or_path and args.policy_tokenizer != "word"),
        "--policy_tokenizer sets the toy policy's tokenizer; --model_name_or_path brings its own, drop one of them")
    toy_exp = not (args.exp_api_base or args.exp_model_name_or_path)
    req(not toy_exp or args.exp_d_model % 4 == 0,
        f"--exp_d_model {args.exp_d_model} must be divisible by the toy M_exp's 4 attention heads")
    req(args.offline_file or args.n_expert + args.n_random >= 1,
        "--n_expert + --n_random is 0: M_exp and the replay buffer need offline trajectories (or --offline_file)")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    req(args.tasks_per_iter % world_size == 0,
        f"--tasks_per_iter {args.tasks_per_iter} must be divisible by the {world_size} ranks")
    batch = args.group_size * args.horizon * world_size  # real steps one task can take (the budget check's unit)
    if "real_grpo" in methods:
        req(args.real_budget >= batch, f"--real_budget {args.real_budget} is below one task's worst case (group_size x "
                                       f"horizon x ranks = {batch}): real_grpo would take no real step")
    if "s2r" in methods and "real_grpo" not in methods:
        cap = int(args.s2r_frac * args.real_budget)
        req(cap >= batch, f"s2r's real cap --s2r_frac x --real_budget = {cap} is below one task's worst case "
                          f"(group_size x horizon x ranks = {batch}): s2r would take no real step")


# ---------------------------------------------------------------------------------------------
# ---- method math ----
# ---------------------------------------------------------------------------------------------


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Eq. (5): (N,) outcome rewards, groups of `group_size` consecutive rollouts -> (N,) advantages.
    A = (R - mean_G) / (std_G + 1e-6), std unbiased; a group of one (or all equal) gives 0."""
    r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1, group_size)  # (N/G, G)
    if group_size == 1:
        return torch.zeros(r.numel())
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)  # unbiased, as torch.std
    return ((r - mean) / (std + 1e-6)).reshape(-1)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 0.2, clip_high: float = 0.28, kl: torch.Tensor | None = None, beta: float = 0.0,
              normalizer: float | None = None):
    """Eq. (6): clipped-ratio GRPO loss, token (unit) mean.

    logp, logp_old, mask: (B, T) per action unit (score mode: T = 1, one unit per step; generate
    mode: one unit per action token); adv: (B,) or (B, T). normalizer: the number of units the mean
    runs over (default mask.sum(); pass the global count for minibatch / DDP accumulation).
    Returns (loss, stats) with the clip fraction."""
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)  # broadcast A_i over every unit of trajectory-step i
    mask = mask.float()
    rho = torch.exp(logp - logp_old)  # (B, T)
    surr = torch.minimum(rho * adv, torch.clamp(rho, 1 - clip_low, 1 + clip_high) * adv)
    per_unit = -surr
    if kl is not None and beta > 0:
        per_unit = per_unit + beta * kl
    n = normalizer if normalizer is not None else mask.sum().clamp(min=1.0)
    loss = (per_unit * mask).sum() / n
    with torch.no_grad():
        clipped = ((rho < 1 - clip_low) & (adv < 0)) | ((rho > 1 + clip_high) & (adv > 0))
        clip_frac = (clipped.float() * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"clip_frac": clip_frac}


def reward_variance_score(successes) -> float:
    """Eq. (4): V_tau = (1/n) sum_i (r_i - rbar)^2 over a task's n rollouts (p(1-p) when binary)."""
    r = np.asarray(list(successes), dtype=np.float64)
    return float(((r - r.mean()) ** 2).mean()) if r.size else 0.0


def score_mode_logp(seq_logp: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Eq. (7): (sum_n counts,) summed action log-probs -> per state the log-softmax over its
    admissible actions (a list of (counts[i],) tensors)."""
    out, i = [], 0
    for n in counts:
        out.append(torch.log_softmax(seq_logp[i:i + n], 0))
        i += n
    return out


ACTION_TYPES = ("search", "click", "select", "buy", "back", "next")
_WORD = re.compile(r"\$?\d+|[a-z]+|\[[a-z]+\]")


def hashed_bow(text: str, dim: int = 1024) -> np.ndarray:
    """phi of Eq. (3): L2-normalised hashed bag of words (crc32, so it is the same in every process)."""
    v = np.zeros(dim, dtype=np.float32)
    for w in _WORD.findall(text.lower()):
        v[zlib.crc32(w.encode()) % dim] += 1.0
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def phi_text(state: str, action: str, task: str = "") -> str:
    # action words count twice: the action decides which transition is relevant. A purchase's reward
    # depends on the task, so a buy's key carries the task (reconstructed): buys of the same item for the
    # same or a similar task rank first (demo_text shows that task next to the reward).
    return f"{state} {action} {action}" + (f" {task}" if action == "buy" and task else "")


def element_f1(pred: str, real: str) -> float:
    """eps_P proxy: F1 between the element sets of two states (items, buttons, header)."""
    a, b = set(state_elements(pred)), set(state_elements(real))
    if not a and not b:
        return 1.0
    inter = len(a & b)
    if inter == 0:
        return 0.0
    p, r = inter / len(a), inter / len(b)
    return 2 * p * r / (p + r)


def state_elements(state: str) -> list[str]:
    return [e.strip() for e in re.split(r"\s*\|\s*|\s+(?=\[)|:\s+", state) if e.strip()]


# ---------------------------------------------------------------------------------------------
# ---- world: ShopLite ----
# ---------------------------------------------------------------------------------------------

CATEGORIES = ("shirt", "pants", "shoes", "hat", "bag", "jacket")
COLOURS = ("red", "blue", "green", "black", "white", "grey")
MATERIALS = ("cotton", "wool", "leather", "linen")
SIZES = ("S", "M", "L", "XL")
SEARCH_STATE, DONE_STATE, FAILURE_STATE = "search: [search box]", "done", "failure"


@dataclasses.dataclass(frozen=True)
class Product:
    pid: int
    category: str
    colour: str
    material: str
    sizes: tuple
    price: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.material} {self.category}"


@dataclasses.dataclass(frozen=True)
class Task:
    category: str
    cap: int
    colour: str | None = None
    material: str | None = None
    size: str | None = None

    @property
    def text(self) -> str:
        words = " ".join(w for w in (self.colour, self.material, self.category) if w)
        size = f", size {self.size}" if self.size else ""
        return f"buy a {words}{size}, under ${self.cap}"

    @property
    def n_constraints(self) -> int:
        return 2 + sum(x is not None for x in (self.colour, self.material, self.size))


_TASK_RE = re.compile(r"^buy a (?:(%s) )?(?:(%s) )?(%s)(?:, size (%s))?, under \$(\d{1,3})$" % (
    "|".join(COLOURS), "|".join(MATERIALS), "|".join(CATEGORIES), "|".join(SIZES)))


def parse_task(text: str) -> Task | None:
    m = _TASK_RE.match(text.strip())
    if not m:
        return None
    colour, material, category, size, cap = m.groups()
    return Task(category, int(cap), colour, material, size)


def satisfies(task: Task, p: Product) -> bool:
    return (p.category == task.category and p.price <= task.cap and (task.colour is None or p.colour == task.colour)
            and (task.material is None or p.material == task.material) and (task.size is None or task.size in p.sizes))


def make_catalogue(n: int, seed: int) -> list[Product]:
    rng = random.Random(f"catalogue-{seed}")
    out = []
    for i in range(n):
        sizes = tuple(s for s in SIZES if rng.random() < 0.55) or (rng.choice(SIZES),)
        out.append(Product(i, rng.choice(CATEGORIES), rng.choice(COLOURS), rng.choice(MATERIALS), sizes,
                           rng.randint(5, 100)))
    return out


def shop_reward(task: Task, p: Product, size: str | None) -> float:
    """WebShop-style (simplified) score of buying product p with selected `size` for `task`:
    r = 1[category] * (matched colour/material + matched size + 1[price <= cap]) / (#attr + #size + 1).
    An asked size never selected counts as unmatched. Success (the RL reward) is r == 1."""
    r_type = float(p.category == task.category)
    attrs = [(task.colour, p.colour), (task.material, p.material)]
    n_attr = sum(a is not None for a, _ in attrs)
    matched = sum(a == b for a, b in attrs if a is not None)
    n_size = int(task.size is not None)
    matched += int(task.size is not None and size == task.size and size in p.sizes)
    matched += int(p.price <= task.cap)
    return r_type * matched / (n_attr + n_size + 1)


def task_queries(task_text: str) -> list[str]:
    """The 6 search queries admissible for a task: 4 combinations of its words + 2 distractors.
    A deterministic function of the task text, so the real env and M_exp agree on them."""
    t = parse_task(task_text)
    if t is None:
        return []
    rng = random.Random(f"q-{task_text}")
    combos = []
    for words in ((t.colour, t.material, t.category), (t.material, t.category), (t.colour, t.category),
                  (t.category,), (t.colour, t.material)):
        q = " ".join(w for w in words if w)
        if q and q not in combos:
            combos.append(q)
    while len(combos) < 4:
        q = f"{rng.choice(COLOURS + MATERIALS)} {t.category}"
        if q not in combos:
            combos.append(q)
    combos = combos[:4]
    others = [c for c in CATEGORIES if c != t.category]
    while len(combos) < 6:
        q = f"{rng.choice(COLOURS)} {rng.choice(others)}"
        if q not in combos:
            combos.append(q)
    rng.shuffle(combos)
    return combos


def admissible(state: str, task_text: str) -> list[str]:
    """The one admissible-action parser shared by the real env and M_exp's synthetic states
    (pitfall 5: both state spaces must parse the same way). [] = terminal or unparsable state."""
    s = state.strip()
    if s.startswith("search:"):
        return [f"search[{q}]" for q in task_queries(task_text)]
    if s.startswith("results"):
        acts = [f"click[{i}]" for i in dict.fromkeys(re.findall(r"\[(\d)\]", s))]
        acts += ["next"] * ("[next]" in s) + ["back"] * ("[back]" in s)
        return acts
    if s.startswith("item:"):
        m = re.search(r"sizes\{([A-Z,]*)\}", s)
        acts = [f"select[{x}]" for x in (m.group(1).split(",") if m else []) if x in SIZES]
        acts += ["buy"] * ("[buy]" in s) + ["back"] * ("[back]" in s)
        return acts
    return []


@dataclasses.dataclass
class Episode:
    task: str
    ep_id: str
    state: str = SEARCH_STATE
    t: int = 0
    done: bool = False
    history: list = dataclasses.field(default_factory=list)  # actions taken
    # real-env internals (unused by synthetic episodes)
    query: str = ""
    page: int = 1
    shown: list = dataclasses.field(default_factory=list)
    item: int | None = None
    size: str | None = None


class ShopLite:
    """The real environment. step() is the only thing that counts as real interaction:
    `real_steps` (training) and `diag_steps` (evaluation, hallucination replay) are counted apart."""

    def __init__(self, catalogue: list[Product], page_size: int = 3, horizon: int = 10, delay: float = 0.0):
        self.catalogue, self.page_size, self.horizon, self.delay = catalogue, page_size, horizon, delay
        self.real_steps = 0
        self.diag_steps = 0
        self._search_cache: dict[str, list[int]] = {}

    def search(self, query: str) -> list[int]:
        """Product ids for a query: keyword overlap with the product name, top 2 pages."""
        if query not in self._search_cache:
            q = set(query.split())
            scored = [(-len(q & set(p.name.split())), p.pid) for p in self.catalogue]
            self._search_cache[query] = [pid for s, pid in sorted(scored) if s < 0][: 2 * self.page_size]
        return self._search_cache[query]

    def reset(self, task: str, ep_id: str = "") -> Episode:
        return Episode(task=task, ep_id=ep_id)

    def _results_state(self, ep: Episode) -> str:
        ids = self.search(ep.query)
        page = ids[(ep.page - 1) * self.page_size: ep.page * self.page_size]
        ep.shown = page
        items = " | ".join(f"[{i + 1}] {self.catalogue[pid].name} ${self.catalogue[pid].price}" for i, pid in enumerate(page))
        nxt = " [next]" if ep.page == 1 and len(ids) > self.page_size else ""
        return f"results p{ep.page}: {items}{nxt} [back]" if page else f"results p{ep.page}: none [back]"

    def _item_state(self, ep: Episode) -> str:
        p = self.catalogue[ep.item]
        sel = f" sel{{{ep.size}}}" if ep.size else ""
        return f"item: {p.name} ${p.price} sizes{{{','.join(p.sizes)}}}{sel} [buy] [back]"

    def step(self, ep: Episode, action: str, diag: bool = False):
        """One real transition. Returns (next_state, r, done, info); r is the WebShop-style score
        (non-zero only on `buy`), info["success"] = 1.0 iff r == 1 (the RL outcome reward).
        An inadmissible action -> the failure state, r = 0, done. Reaching the horizon -> done, r = 0."""
        if ep.done:
            raise ValueError("step() on a finished episode")
        if diag:
            self.diag_steps += 1
        else:
            self.real_steps += 1
        if self.delay:
            time.sleep(self.delay)
        task = parse_task(ep.task)
        acts = admissible(ep.state, ep.task)
        ep.t += 1
        ep.history.append(action)
        info = {"valid": action in acts, "success": 0.0, "timeout": False}
        r = 0.0
        if not info["valid"]:
            ep.state, ep.done = FAILURE_STATE, True
            return ep.state, 0.0, True, info
        if action.startswith("search["):
            ep.query, ep.page = action[7:-1], 1
            ep.state = self._results_state(ep)
        elif action == "next":
            ep.page = 2
            ep.state = self._results_state(ep)
        elif action == "back":  # DEVIATION(2): back goes to the search page
            ep.state, ep.item, ep.size = SEARCH_STATE, None, None
        elif action.startswith("click["):
            ep.item, ep.size = ep.shown[int(action[6:-1]) - 1], None
            ep.state = self._item_state(ep)
        elif action.startswith("select["):
            ep.size = action[7:-1]
            ep.state = self._item_state(ep)
        elif action == "buy":
            r = shop_reward(task, self.catalogue[ep.item], ep.size)
            info["success"] = float(r == 1.0)
            ep.state, ep.done = DONE_STATE, True
        if not ep.done and ep.t >= self.horizon:  # timeout = failure
            ep.done, info["timeout"] = True, True
        return ep.state, r, ep.done, info


def make_tasks(shop: ShopLite, n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train / eval task texts; every task is feasible and findable by one of its queries."""
    rng = random.Random(f"tasks-{seed}")
    seen, out = set(), []
    for _ in range(200 * (n_train + n_eval)):
        if len(out) == n_train + n_eval:
            break
        p = rng.choice(shop.catalogue)
        extra = rng.sample(["colour", "material", "size"], rng.choice([0, 1, 1, 2, 2]))
        t = Task(p.category, int(math.ceil((p.price + 1) / 10) * 10), p.colour if "colour" in extra else None,
                 p.material if "material" in extra else None, rng.choice(p.sizes) if "size" in extra else None)
        if t.text in seen or expert_plan(shop, t.text) is None:
            continue
        seen.add(t.text)
        out.append(t.text)
    if len(out) < n_train + n_eval:
        raise C.UserError(f"the catalogue of {len(shop.catalogue)} products yields only {len(out)} distinct feasible "
                          f"tasks, not --n_train_tasks + --n_eval_tasks = {n_train + n_eval}; raise --n_products or "
                          f"ask for fewer tasks")
    return out[:n_train], out[n_train:]


def expert_plan(shop: ShopLite, task_text: str):
    """(query, page, index) of the first satisfying product reachable through the task's queries."""
    task = parse_task(task_text)
    for q in task_queries(task_text):
        for j, pid in enumerate(shop.search(q)):
            if satisfies(task, shop.catalogue[pid]):
                return q, 1 + j // shop.page_size, 1 + j % shop.page_size
    return None


def expert_action(shop: ShopLite, ep: Episode) -> str:
    """Scripted expert (uses the env's internals: an oracle, used for offline data only)."""
    task = parse_task(ep.task)
    s = ep.state
    if s.startswith("search:"):
        plan = expert_plan(shop, ep.task)
        return f"search[{plan[0]}]" if plan else "search[" + task_queries(ep.task)[0] + "]"
    if s.startswith("results"):
        for i, pid in enumerate(ep.shown):
            if satisfies(task, shop.catalogue[pid]):
                return f"click[{i + 1}]"
        return "next" if "[next]" in s else "back"
    if s.startswith("item:"):
        if not satisfies(task, shop.catalogue[ep.item]):
            return "back"
        if task.size and ep.size != task.size:
            return f"select[{task.size}]"
        return "buy"
    return "back"


def annotate(task_text: str, state: str, action: str, next_state: str, shop: ShopLite | None = None,
             ep: Episode | None = None) -> str:
    """DEVIATION(3): rule annotator, the reasoning target R* (stand-in for the paper's LLM annotator). The buy check
    puts each task field next to the item's (pitfall: reward hallucination)."""
    if next_state == FAILURE_STATE and action not in admissible(state, task_text):
        return "not admissible; fail"
    if action.startswith("search["):
        return f"list items for {action[7:-1]}"
    if action == "next":
        return "page 2"
    if action == "back":
        return "back to search"
    if action.startswith("click["):
        m = re.search(r"\[%s\] ([^$|]*)\$" % re.escape(action[6:-1]), state)
        return f"open {m.group(1).strip()}" if m else "open item"
    if action.startswith("select["):
        return f"size {action[7:-1]}"
    if action == "buy":
        task = parse_task(task_text)
        m = re.match(r"item: (\w+) (\w+) (\w+) \$(\d+) sizes\{[A-Z,]*\}(?: sel\{(\w+)\})?", state)
        if task is None or m is None:
            return "buy; fail"
        colour, material, category, price, sel = m.groups()
        checks = [f"{task.category}/{category} " + ("ok" if task.category == category else "no")]
        if task.colour:
            checks.append(f"{task.colour}/{colour} " + ("ok" if task.colour == colour else "no"))
        if task.material:
            checks.append(f"{task.material}/{material} " + ("ok" if task.material == material else "no"))
        if task.size:
            checks.append(f"{task.size}/{sel or '-'} " + ("ok" if task.size == sel else "no"))
        checks.append(f"{price}<={task.cap} " + ("ok" if int(price) <= task.cap else "no"))
        ok = all(c.endswith("ok") for c in checks)
        return "; ".join(checks) + ("; success" if ok else "; fail")
    return "?"


def collect_trajectories(shop: ShopLite, tasks: list[str], n: int, eps_choices, rng: random.Random, prefix: str,
                         invalid_prob: float = 0.0) -> list[list[dict]]:
    """Scripted / epsilon-noisy real trajectories (counted as offline real steps by the caller)."""
    out = []
    for j in range(n):
        task = tasks[j % len(tasks)] if j < len(tasks) else rng.choice(tasks)
        eps = rng.choice(eps_choices)
        ep = shop.reset(task, f"{prefix}{j}")
        traj = []
        while not ep.done:
            s, hist = ep.state, list(ep.history)
            acts = admissible(s, task)
            if rng.random() < eps:
                if rng.random() < invalid_prob:
                    a = rng.choice(["checkout", "click[7]", "search[]"])
                elif "buy" in acts and rng.random() < 0.7:  # careless purchases: failed buys teach M_exp (pitfall 1)
                    a = "buy"
                else:
                    a = rng.choice(acts)
            else:
                a = expert_action(shop, ep)
            s2, r, done, info = shop.step(ep, a)
            traj.append(dict(task=task, ep=ep.ep_id, hist=hist, s=s, a=a, s2=s2, r=info["success"], r_raw=r,
                             d=float(s2 in (DONE_STATE, FAILURE_STATE)), R=annotate(task, s, a, s2), real=True))
        out.append(traj)
    return out


# ---------------------------------------------------------------------------------------------
# ---- experience model, replay buffer, curriculum ----
# ---------------------------------------------------------------------------------------------


def demo_text(t: dict, limit: int) -> str:
    """A retrieved transition as M_exp reads it (a search needs no source state; the rest do). A buy
    names its task: its reward r holds for that task only (reconstructed, see phi_text)."""
    src = "" if t["a"].startswith("search[") else f"{t['s'][:60]} | "
    if t["a"] == "buy":
        src = f"for {re.sub(r'^buy a ', '', t['task'])}: {src}"
    return f"{src}{t['a']} => {t['s2']} r{int(t['r'])}"[:limit]


def demo_key(t: dict) -> tuple:
    """What a demo tells M_exp: retrieval skips duplicates of it (they carry no information)."""
    return t["s"], t["a"], t["s2"], t["r"], t["task"] if t["a"] == "buy" else None


def exp_prompt(task: str, hist: list[str], demos: list[str], state: str, action: str) -> str:
    """Eq. (1) input: demos D_k, task tau, last 3 actions, s_t, a_t."""
    lines = [f"ex: {d}" for d in demos]
    lines += [f"task: {task}", f"hist: {';'.join(hist[-3:])}", f"state: {state}", f"act: {action}", ">"]
    return "\n".join(lines)


def exp_target(R: str, s2: str, r: float, d: float, reasoning: bool = True) -> str:
    """Eq. (1) output (reconstructed format)."""
    think = f"<think>{R}</think>" if reasoning else ""
    return f"{think}<state>{s2}</state><reward>{int(r)}</reward><done>{int(d)}</done>"


_EXP_RE = re.compile(r"<state>(.*?)</state>\s*<reward>\s*([0-9.]+)\s*</reward>\s*<done>\s*([01])\s*</done>", re.S)


def parse_exp_output(text: str):
    """-> (reasoning, next_state, reward, done) or None when malformed. Accepts the tag format or
    the endpoint's JSON {reasoning, next_state, reward, done}."""
    m = _EXP_RE.search(text)
    if m:
        t = re.search(r"<think>(.*?)</think>", text, re.S)
        try:
            r = float(m.group(2))
        except ValueError:
            return None
        return (t.group(1) if t else ""), m.group(1).strip(), float(r >= 0.5), float(m.group(3))
    s = text.strip()
    if s.startswith("```"):
        s = re.sub(r"^```(?:json)?|```$", "", s.strip(), flags=re.M).strip()
    try:
        obj = json.loads(s[s.find("{"): s.rfind("}") + 1]) if "{" in s else None
        r, d = float(obj["reward"]), float(obj["done"])
        return str(obj.get("reasoning", "")), str(obj["next_state"]).strip(), float(r >= 0.5), float(d >= 0.5)
    except (ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError):
        return None


def task_gen_prompt(seed_task: str) -> str:
    return f"<gen_task> {seed_task}\n>"


class ReplayBuffer:
    """Transitions for retrieval (Eq. 3): real ones kept, synthetic ones FIFO-capped.
    Evaluation tasks may never enter (pitfall 4): add() raises if one does."""

    def __init__(self, forbidden_tasks=(), cap: int = 20000, dim: int = 1024, embed_fn=None):
        self.forbidden = set(forbidden_tasks)
        self.cap, self.dim, self.embed_fn = cap, dim, embed_fn
        self.real: list[dict] = []
        self.syn: list[dict] = []
        self._keys_real: list[np.ndarray] = []
        self._keys_syn: list[np.ndarray] = []
        self._mat = None

    def __len__(self):
        return len(self.real) + len(self.syn)

    def _key(self, texts: list[str]) -> list[np.ndarray]:
        if self.embed_fn is not None:
            return list(self.embed_fn(texts))
        return [hashed_bow(t, self.dim) for t in texts]

    def add(self, transitions: list[dict]) -> None:
        bad = [t["task"] for t in transitions if t["task"] in self.forbidden]
        if bad:
            raise ValueError(f"evaluation task would enter the replay buffer: {bad[0]!r}")
        keys = self._key([phi_text(t["s"], t["a"], t["task"]) for t in transitions])
        for t, k in zip(transitions, keys):
            (self.real if t.get("real") else self.syn).append(t)
            (self._keys_real if t.get("real") else self._keys_syn).append(k)
        if len(self.syn) > self.cap:
            drop = len(self.syn) - self.cap
            self.syn, self._keys_syn = self.syn[drop:], self._keys_syn[drop:]
        self._mat = None

    def entries(self) -> list[dict]:
        return self.real + self.syn

    def retrieve(self, queries: list[tuple], k: int) -> list[list[dict]]:
        """queries: (state, action, episode id[, task]) -> for each, the k nearest transitions by cosine
        of phi(s, a[, task]), excluding transitions of the query's own episode."""
        if k <= 0 or len(self) == 0 or not queries:
            return [[] for _ in queries]
        if self._mat is None:
            self._mat = torch.from_numpy(np.stack(self._keys_real + self._keys_syn))  # (N, D)
        ents = self.entries()
        keys = self._key([phi_text(*x[:2], *x[3:4]) for x in queries])
        out = []
        m = min(len(ents), max(64, 16 * k))
        for c in range(0, len(queries), 512):  # chunks: a (Q, N) similarity matrix of the whole SFT set is GBs
            sims = torch.from_numpy(np.stack(keys[c:c + 512])) @ self._mat.T  # (Q, N)
            # the m best and everything tied with the m-th: sorting only these (stable, by index on ties) gives
            # the same prefix as a stable sort of the whole row
            thr = torch.topk(sims, m, dim=1).values[:, -1:]
            for i, ep in enumerate(x[2] for x in queries[c:c + 512]):
                cand = torch.nonzero(sims[i] >= thr[i]).flatten()
                order = cand[torch.sort(sims[i][cand], descending=True, stable=True).indices].tolist()
                picked = self._pick(ents, order, ep, k)
                if len(picked) < k and len(order) < len(ents):  # all near ones were own-episode or duplicates
                    picked = self._pick(ents, torch.sort(sims[i], descending=True, stable=True).indices.tolist(), ep, k)
                out.append(picked)
        return out

    @staticmethod
    def _pick(ents: list[dict], order: list[int], ep: str, k: int) -> list[dict]:
        picked, seen = [], set()
        for j in order:
            e = ents[j]
            key = demo_key(e)
            if e["ep"] != ep and key not in seen:  # own episode excluded; duplicates carry no information
                picked.append(e)
                seen.add(key)
                if len(picked) == k:
                    break
        return picked


class ExperienceModel:
    """M_exp behind one interface: a local HF causal LM (tag format) or an OpenAI-compatible
    endpoint (JSON format, through common.LLM). step() answers a batch of Eq. (1) prompts;
    gen_tasks() is M_task (same weights, prefix <gen_task>)."""

    SYSTEM = ("You simulate a web shop. Given demos, the task, history, the current state and an action, "
              "reason about the action's effect, then answer only JSON: {\"reasoning\": str, \"next_state\": str, "
              "\"reward\": 0 or 1 (1 only if this action completes the task), \"done\": 0 or 1}.")
    # M_task on an endpoint: the local M_task learns the grammar from its <gen_task> SFT pairs, an endpoint reads it
    TASK_SYSTEM = ("You write shopping tasks for a web-shop simulator. Given a seed task, write one new task of "
                   "similar or slightly higher difficulty (add or change a constraint). Grammar, exactly: "
                   "'buy a [COLOUR ][MATERIAL ]CATEGORY[, size SIZE], under $CAP' with COLOUR in "
                   f"{'|'.join(COLOURS)}, MATERIAL in {'|'.join(MATERIALS)}, CATEGORY in {'|'.join(CATEGORIES)}, "
                   f"SIZE in {'|'.join(SIZES)}, CAP an integer 5-100. Example: 'buy a red cotton shirt, size M, "
                   "under $30'. Answer with the task line only.")

    def __init__(self, llm: C.LLM, reasoning: bool = True, temperature: float = 0.0, max_new_tokens: int = 160,
                 retries: int = 2, seed: int = 0, task_temperature: float = 1.0):
        self.llm, self.reasoning, self.temperature = llm, reasoning, temperature
        self.task_temperature = task_temperature
        self.max_new_tokens, self.retries = max_new_tokens, retries
        self.calls = 0
        self.malformed = 0
        self.retried = 0
        self._memo: dict[str, tuple] = {}

    def state(self) -> dict:
        """Counters, memo and the local model's sampling generator (M_task, exp_temperature > 0): what a
        checkpoint needs so the resumed arm gets the same answers and counts."""
        local = getattr(self.llm, "is_local", False)
        return dict(calls=self.calls, malformed=self.malformed, retried=self.retried, memo=dict(self._memo),
                    llm_gen=self.llm.rng_state() if local else None)

    def set_state(self, d: dict) -> None:
        self.calls, self.malformed, self.retried, self._memo = d["calls"], d["malformed"], d["retried"], dict(d["memo"])
        if d.get("llm_gen") is not None:
            self.llm.set_rng_state(d["llm_gen"])

    def reset(self, memo: dict, seed: int) -> None:
        """Start of an arm: counters 0, the given memo, local sampling reseeded with the policy seed."""
        self.set_state(dict(calls=0, malformed=0, retried=0, memo=memo, llm_gen=None))
        if getattr(self.llm, "is_local", False):
            self.llm.reseed(seed)

    def _ask(self, prompts: list[str], temperature: float, max_tokens: int, json_mode: bool) -> list[str]:
        if self.llm.client is not None:
            convs = [[{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": p}] if json_mode
                     else [{"role": "user", "content": p}] for p in prompts]
            return [o[0] for o in self.llm.chat(convs, n=1, temperature=temperature, max_tokens=max_tokens)]
        return [o[0] for o in self.llm.complete(prompts, n=1, temperature=temperature, max_tokens=max_tokens)]

    def step(self, prompts: list[str]) -> list[tuple | None]:
        """Eq. (1) for a batch -> (R, s', r, d) per prompt, or None = malformed after retries
        (the caller turns it into the failure transition and counts it)."""
        memo = self.temperature <= 0  # DEVIATION(4): greedy answers memoised by prompt
        todo = list(dict.fromkeys(p for p in prompts if not (memo and p in self._memo)))
        res: dict[str, tuple | None] = {}
        for attempt in range(self.retries + 1):
            if not todo:
                break
            self.calls += len(todo)
            outs = self._ask(todo, self.temperature, self.max_new_tokens, json_mode=True)
            again = []
            for p, o in zip(todo, outs):
                parsed = parse_exp_output(o)
                if parsed is None and attempt < self.retries and self.llm.client is not None:
                    again.append(p)  # endpoints glitch: ask again; a local greedy model would repeat itself
                    self.retried += 1
                else:
                    res[p] = parsed
                    self.malformed += parsed is None
            todo = again
        if memo:
            if len(self._memo) > 50000:
                self._memo.clear()
            self._memo.update(res)
            return [self._memo[p] for p in prompts]
        return [res[p] for p in prompts]

    def gen_tasks(self, seeds: list[str], n: int) -> list[list[str]]:
        """M_task: n sampled variants of each seed task at --task_temperature (text, unfiltered)."""
        if not seeds or n <= 0:
            return []
        self.calls += len(seeds) * n
        if self.llm.client is not None:  # an endpoint reads the grammar (TASK_SYSTEM), one request per sample
            convs = [[{"role": "system", "content": self.TASK_SYSTEM}, {"role": "user", "content": f"Seed task: {s}"}]
                     for s in seeds for _ in range(n)]
            outs = [o[0] for o in self.llm.chat(convs, n=1, temperature=self.task_temperature, max_tokens=48)]
        else:
            outs = self._ask([task_gen_prompt(s) for s in seeds for _ in range(n)], self.task_temperature, 48,
                             json_mode=False)
        outs = [o.strip().splitlines()[0].strip(" '\"`.") if o.strip() else "" for o in outs]
        return [outs[i * n:(i + 1) * n] for i in range(len(seeds))]


def task_edits(a: str, b: str) -> int | None:
    """How many of a task's fields (category, colour, material, size, price cap) differ between two task texts
    (None when one does not parse): a variant of a seed task differs from it in 1 or 2 fields, never the category."""
    ta, tb = parse_task(a), parse_task(b)
    if ta is None or tb is None:
        return None
    return sum(getattr(ta, f) != getattr(tb, f) for f in ("category", "colour", "material", "size", "cap"))


def task_variants(task_text: str, catalogue: list[Product], forbidden=()) -> list[str]:
    """Every one-edit variant of a task that some catalogue product satisfies (DEVIATION(3): feasibility by
    catalogue rule): one attribute (colour, material, size) changed to another value, added (at most 2
    attributes, as make_tasks writes them) or dropped, or the price cap moved by -10 / +10 (5-100). The category
    stays. These are M_task's SFT targets (seed -> variant): a variant shares the seed task's other fields."""
    t = parse_task(task_text)
    if t is None:
        return []
    out = []
    n_attr = sum(x is not None for x in (t.colour, t.material, t.size))
    cands = []
    for field, values in (("colour", COLOURS), ("material", MATERIALS), ("size", SIZES)):
        cur = getattr(t, field)
        if cur is not None:
            cands.append(dataclasses.replace(t, **{field: None}))
        if cur is not None or n_attr < 2:
            cands += [dataclasses.replace(t, **{field: v}) for v in values if v != cur]
    cands += [dataclasses.replace(t, cap=c) for c in (t.cap - 10, t.cap + 10) if 5 <= c <= 100]
    for v in cands:
        if v.text != task_text and v.text not in forbidden and any(satisfies(v, p) for p in catalogue):
            out.append(v.text)
    return list(dict.fromkeys(out))


def curriculum_variants(candidates: list[str], catalogue: list[Product], eval_tasks: set, known: set,
                        seeds: list[str] | None = None) -> list[str]:
    """Keep parsable, feasible (some product meets every constraint), non-eval, new variants,
    most constraints first (paper: prefer harder medium-difficulty tasks; pitfall 7). With `seeds` (the seed task
    each candidate was generated from) a candidate must also be a variant of its seed: same category, 1-2 fields
    changed (a random task of the same category is not a variant)."""
    keep = []
    for i, c in enumerate(dict.fromkeys(candidates) if seeds is None else candidates):
        t = parse_task(c)
        if t is None or c in eval_tasks or c in known or t.text != c or c in keep:
            continue
        if seeds is not None and not (1 <= (task_edits(seeds[i], c) or 0) <= 2
                                      and parse_task(seeds[i]).category == t.category):
            continue
        if any(satisfies(t, p) for p in catalogue):  # DEVIATION(3): feasibility by catalogue rule
            keep.append(c)
    return sorted(keep, key=lambda c: -parse_task(c).n_constraints)


def exp_sft_examples(trajs: list[list[dict]], buffer: ReplayBuffer, k: int, demo_bytes: int, reasoning: bool,
                     train_tasks: list[str], rng: random.Random, fail_oversample: int = 1,
                     catalogue: list[Product] | None = None, forbidden=()) -> list[tuple[str, str]]:
    """(prompt, target) pairs for Eq. (2), demos retrieved as at rollout time (own episode excluded),
    plus len // 6 M_task pairs: a train task -> one of its feasible one-edit variants (task_variants on
    `catalogue`, never a `forbidden` (eval) task). Without a catalogue (an --offline_file run) no M_task pairs."""
    flat = [t for tr in trajs for t in tr]
    # pitfall 1: failed purchases are rare in the offline data; repeat them so M_exp sees failures
    flat += [t for t in flat if t["a"] == "buy" and t["r"] == 0] * max(0, fail_oversample - 1)
    demos = buffer.retrieve([(t["s"], t["a"], t["ep"], t["task"]) for t in flat], k)
    ex = [(exp_prompt(t["task"], t["hist"], [demo_text(d, demo_bytes) for d in ds], t["s"], t["a"]),
           exp_target(t["R"], t["s2"], t["r"], t["d"], reasoning)) for t, ds in zip(flat, demos)]
    seeds = [t for t in train_tasks if parse_task(t) is not None] if catalogue else []
    variants: dict[str, list[str]] = {}
    for _ in range(len(flat) // 6 if seeds else 0):
        a = rng.choice(seeds)
        if a not in variants:
            variants[a] = task_variants(a, catalogue, forbidden)
        if variants[a]:
            ex.append((task_gen_prompt(a), rng.choice(variants[a])))
    return ex


@torch.no_grad()
def exp_val_loss(model, tok, val: list[tuple[str, str]], device, batch_size: int = 64) -> float:
    """Token-mean NLL of the target tokens over held-out (prompt, target) pairs (M_exp's early-stopping metric)."""
    model.eval()
    tot, n = 0.0, 0.0
    for i in range(0, len(val), batch_size):
        b = val[i:i + batch_size]
        ids, mask, resp = C.encode_pairs(tok, [x[0] for x in b], [x[1] for x in b], device=device)
        with C.autocast(device):
            logp = C.token_logprobs(model, ids, mask)
        tot += float(-(logp.float() * resp).sum())
        n += float(resp.sum())
    model.train()
    return tot / max(n, 1.0)


def train_exp_model(model, tok, examples: list[tuple[str, str]], epochs: float, lr: float, batch_size: int,
                    seed: int, device, desc: str = "M_exp SFT", val: list | None = None, eval_every: float = 0.5,
                    patience: int = 2, info: dict | None = None) -> list[float]:
    """Eq. (2): token-mean NLL of the target tokens (R*, s', r, d); AdamW, warmup + cosine over at most `epochs`.
    With `val` (held-out pairs): the held-out loss every `eval_every` epochs; training stops once it has not
    improved for `patience` evaluations and the best weights are restored (early stopping). `info` receives
    steps, the held-out curve, best step and loss."""
    rng = random.Random(seed)
    info = {} if info is None else info
    every = max(1, int(round(eval_every * len(examples) / batch_size))) if val else 0
    best, best_step, best_state, bad, curve = float("inf"), 0, None, 0, []
    steps = max(1, int(math.ceil(epochs * len(examples) / batch_size)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    order, losses = [], []
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not C.is_main())
    for step in bar:
        if len(order) < batch_size:
            idx = list(range(len(examples)))
            rng.shuffle(idx)
            order += idx
        batch = [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]
        ids, mask, resp = C.encode_pairs(tok, [b[0] for b in batch], [b[1] for b in batch], device=device)
        with C.autocast(device):
            logp = C.token_logprobs(model, ids, mask)  # (B, L)
        loss = -(logp * resp).sum() / resp.sum()
        if not torch.isfinite(loss):
            raise C.UserError("M_exp SFT loss is NaN; lower --exp_learning_rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if every and ((step + 1) % every == 0 or step + 1 == steps):
            v = exp_val_loss(model, tok, val, device)
            curve.append((step + 1, round(v, 5)))
            if v < best - 1e-4:
                best, best_step, bad = v, step + 1, 0
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    info.update(steps=len(losses), max_steps=steps, val_curve=curve, best_step=best_step,
                best_val=round(best, 5) if curve else None, stopped_early=len(losses) < steps)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# ---- worlds (real / synthetic), policy, rollouts, evaluation ----
# ---------------------------------------------------------------------------------------------


class RealWorld:
    """GRPO in the real env: every step is a real interaction (diag=True: evaluation / diagnostics).
    stats counts the steps and the invalid ones (generate mode: unparsable or inadmissible text,
    which ShopLite turns into the failure transition)."""
    synthetic = False

    def __init__(self, shop: ShopLite, diag: bool = False):
        self.shop, self.diag = shop, diag
        self.stats = {"invalid": 0, "steps": 0}

    def reset(self, task: str, ep_id: str) -> Episode:
        return self.shop.reset(task, ep_id)

    def step_batch(self, eps: list[Episode], actions: list[str]):
        out = []
        for ep, a in zip(eps, actions):
            s2, r, d, info = self.shop.step(ep, a, diag=self.diag)
            self.stats["steps"] += 1
            self.stats["invalid"] += not info["valid"]
            out.append((s2, info["success"], d, info))
        return out


_ITEM_RE = re.compile(r"item: (\w+) (\w+) (\w+) \$(\d+) sizes\{([A-Z,]*)\}(?: sel\{(\w+)\})?")


def true_success(task_text: str, state: str) -> float:
    """The real reward rule applied to a (possibly synthetic) item state: 1.0 iff buying the item the state shows,
    with the size it shows selected, meets every constraint of the task (shop_reward == 1); 0.0 when the state
    is not an item page. Used by the exp_states diagnostic arm (M_exp's states, the true reward)."""
    t, m = parse_task(task_text), _ITEM_RE.match(state.strip())
    if t is None or m is None:
        return 0.0
    colour, material, category, price, sizes, sel = m.groups()
    p = Product(-1, category, colour, material, tuple(x for x in sizes.split(",") if x), int(price))
    return float(shop_reward(t, p, sel) == 1.0)


class DreamWorld:
    """Rollouts inside M_exp: the rule sends inadmissible actions to the failure state, everything
    else is M_exp's answer to Eq. (1) with demos retrieved from the buffer. Never touches ShopLite.
    reward="true" (the exp_states diagnostic arm): M_exp's states and done, but the reward of an episode that
    ends on `buy` is the real rule on M_exp's item state (true_success), 0 on any other end."""
    synthetic = True

    def __init__(self, expm: ExperienceModel, buffer: ReplayBuffer, top_k: int, demo_bytes: int, horizon: int,
                 reward: str = "exp"):
        self.expm, self.buffer, self.k, self.demo_bytes, self.horizon = expm, buffer, top_k, demo_bytes, horizon
        self.reward = reward
        self.stats = {"invalid": 0, "malformed": 0, "demos": 0, "real_demos": 0, "steps": 0}

    def reset(self, task: str, ep_id: str) -> Episode:
        return Episode(task=task, ep_id=ep_id)

    def step_batch(self, eps: list[Episode], actions: list[str]):
        out: list = [None] * len(eps)
        ask = []
        for i, (ep, a) in enumerate(zip(eps, actions)):
            if a not in admissible(ep.state, ep.task):
                out[i] = (FAILURE_STATE, 0.0, True, {"valid": False, "R": "not admissible; fail"})
                self.stats["invalid"] += 1
            else:
                ask.append(i)
        answers = predict_transitions(self.expm, self.buffer, [dict(task=eps[i].task, hist=eps[i].history,
                                      s=eps[i].state, a=actions[i], ep=eps[i].ep_id) for i in ask], self.k,
                                      self.demo_bytes, self.stats)
        for i, ans in zip(ask, answers):
            if ans is None:
                self.stats["malformed"] += 1
                out[i] = (FAILURE_STATE, 0.0, True, {"valid": True, "malformed": True, "R": ""})
            else:
                R, s2, r, d = ans
                d = bool(d) or s2 in (DONE_STATE, FAILURE_STATE)
                if self.reward == "true":  # M_exp's state, the real reward rule
                    r = true_success(eps[i].task, eps[i].state) if actions[i] == "buy" else 0.0
                out[i] = (s2, r if d else 0.0, d, {"valid": True, "R": R})  # outcome reward: only when it ends
        for i, ep in enumerate(eps):
            s2, r, d, info = out[i]
            ep.t += 1
            ep.history.append(actions[i])
            ep.state = s2
            if not d and ep.t >= self.horizon:  # timeout = failure, r = 0 (as ShopLite.step)
                d, r, info["timeout"] = True, 0.0, True
            ep.done = d
            out[i] = (s2, r, d, info)
            self.stats["steps"] += 1
        return out


class ExpRewardWorld:
    """The exp_reward diagnostic arm: true states (every step is a real ShopLite step, counted as a real training
    step), but the reward of a valid `buy` is M_exp's answer to Eq. (1) on that real state (demos retrieved as in
    DreamWorld); every other end gives 0, as in ShopLite. Its rollouts count as synthetic (the reward is M_exp's):
    their successes are replayed for the hallucination split, which can only find reward-caused errors here."""
    synthetic = True

    def __init__(self, shop: ShopLite, expm: ExperienceModel, buffer: ReplayBuffer, top_k: int, demo_bytes: int):
        self.shop, self.expm, self.buffer, self.k, self.demo_bytes = shop, expm, buffer, top_k, demo_bytes
        self.stats = {"invalid": 0, "malformed": 0, "demos": 0, "real_demos": 0, "steps": 0}

    def reset(self, task: str, ep_id: str) -> Episode:
        return self.shop.reset(task, ep_id)

    def step_batch(self, eps: list[Episode], actions: list[str]):
        pre = [(ep.state, list(ep.history)) for ep in eps]
        out, ask = [], []
        for i, (ep, a) in enumerate(zip(eps, actions)):
            s2, _, d, info = self.shop.step(ep, a)
            self.stats["steps"] += 1
            self.stats["invalid"] += not info["valid"]
            out.append([s2, 0.0, d, {"valid": info["valid"], "R": ""}])
            if a == "buy" and info["valid"]:
                ask.append(i)
        answers = predict_transitions(self.expm, self.buffer, [dict(task=eps[i].task, hist=pre[i][1], s=pre[i][0],
                                      a=actions[i], ep=eps[i].ep_id) for i in ask], self.k, self.demo_bytes,
                                      self.stats)
        for i, ans in zip(ask, answers):
            self.stats["malformed"] += ans is None
            out[i][1] = ans[2] if ans is not None else 0.0
            out[i][3]["R"] = ans[0] if ans is not None else ""
        return [tuple(o) for o in out]


def policy_prompt(task: str, state: str, acts: list[str] | None = None, instruct: bool = False) -> str:
    """instruct: a real policy (--model_name_or_path, generate mode) reads the answer format it is
    parsed with; the toy policy learns its terse format from the BC warm start."""
    if acts is None:  # score mode: the actions are scored, not listed
        return f"{task}\n{state}\n>"
    if instruct:
        return (f"You are shopping in a web shop. Task: {task}\nCurrent page: {state}\n"
                f"Admissible actions: {' | '.join(acts)}\nThink briefly inside <think>...</think>, then answer "
                f"with exactly one admissible action inside <action>...</action>.")
    return f"{task}\n{state}\nacts: {' | '.join(acts)}\n>"


def chat_prompts(tok, texts: list[str]) -> list[str]:
    """Generate mode: wrap each prompt as a user turn in the tokenizer's chat template when it has one
    (common.render_chat; the toy byte tokenizer has none). common's encoders keep a single BOS
    when the rendered template already starts with one."""
    if not getattr(tok, "chat_template", None):
        return texts
    return [C.render_chat(tok, [{"role": "user", "content": t}]) for t in texts]


def parse_action_text(text: str) -> str:
    m = re.search(r"<action>(.*?)</action>", text, re.S)
    return (m.group(1) if m else text.strip().splitlines()[0] if text.strip() else "").strip()


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def score_actions(policy, tok, prompts: list[str], action_lists: list[list[str]], device) -> list[torch.Tensor]:
    """Eq. (7): per prompt, (n_actions,) log pi(a|s) renormalised over the admissible actions.
    Differentiable when grad is on. The state prompt is run once and its KV cache shared by its
    actions (same numbers as token_logprobs on (prompt + action) pairs, ~4x fewer tokens; a test
    checks the two agree)."""
    from transformers import DynamicCache

    ids, mask = C.encode_prompts(tok, prompts, device)  # (B, P)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with C.autocast(device):
        out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                     **{_cache_kw(policy): cache})
    first_lp = torch.log_softmax(out.logits[:, -1].float(), -1)  # (B, V): distribution of each action's 1st token
    owner = torch.tensor([i for i, acts in enumerate(action_lists) for _ in acts], device=device)  # (N,)
    rows = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for acts in action_lists for a in acts]
    La = max(map(len, rows))
    aid = torch.full((len(rows), La), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros((len(rows), La), dtype=torch.long)
    for j, r in enumerate(rows):
        aid[j, :len(r)] = torch.tensor(r)
        am[j, :len(r)] = 1
    aid, am = aid.to(device), am.to(device)
    cache.batch_select_indices(owner)  # each action continues its own state's cache
    apos = mask.sum(1)[owner, None] + torch.arange(La, device=device)[None]
    with C.autocast(device):
        out2 = policy(input_ids=aid, attention_mask=torch.cat([mask[owner], am], 1), position_ids=apos,
                      use_cache=True, **{_cache_kw(policy): cache})
    lp_rest = torch.log_softmax(out2.logits[:, :-1].float(), -1).gather(-1, aid[:, 1:, None]).squeeze(-1)  # (N, La-1)
    lp = torch.cat([first_lp[owner].gather(-1, aid[:, :1]), lp_rest], 1) * am  # (N, La)
    return score_mode_logp(lp.sum(1), [len(a) for a in action_lists])


def score_actions_pairs(policy, tok, prompts: list[str], action_lists: list[list[str]], device) -> list[torch.Tensor]:
    """Reference of score_actions: token_logprobs on (state prompt + action) pairs."""
    flat_p = [p for p, acts in zip(prompts, action_lists) for _ in acts]
    flat_a = [a for acts in action_lists for a in acts]
    ids, mask, resp = C.encode_pairs(tok, flat_p, flat_a, device=device)
    with C.autocast(device):
        logp = C.token_logprobs(policy, ids, mask)  # (N, L)
    seq = (logp.float() * resp).sum(1)  # (N,)
    return score_mode_logp(seq, [len(a) for a in action_lists])


PhaseTimer = C.PhaseTimer  # seconds per named phase of an iteration (rollout_policy, logp_old, forward, ...)


@dataclasses.dataclass
class Unit:
    """One action unit of a trajectory (score mode: a step; generate mode: a step's tokens)."""
    prompt: str
    actions: list
    idx: int
    logp_old: float | torch.Tensor
    ids: torch.Tensor | None = None  # generate mode: prompt+response ids
    resp_mask: torch.Tensor | None = None  # generate mode: tokens that carry advantage


@dataclasses.dataclass
class Trajectory:
    task: str
    ep_id: str
    synthetic: bool
    units: list = dataclasses.field(default_factory=list)
    transitions: list = dataclasses.field(default_factory=list)
    reward: float = 0.0


def _action_token_mask(tok, resp_ids: list[int]) -> list[int]:
    """Generate mode: tokens inside <action>..</action> carry the advantage; all if there are no tags."""
    text = tok.decode(resp_ids, skip_special_tokens=True)
    if "<action>" not in text:
        return [1] * len(resp_ids)
    mask = []
    for j in range(len(resp_ids)):
        before = tok.decode(resp_ids[:j], skip_special_tokens=True)
        mask.append(int("<action>" in before and "</action>" not in before))
    return mask


@torch.no_grad()
def rollout(policy, tok, world, tasks: list[str], group_size: int, temperature: float, gen: torch.Generator,
            action_mode: str, device, ep_prefix: str, max_action_tokens: int = 32, instruct: bool = False,
            logp_batch_size: int = 256, need_logp_old: bool = True, timer: PhaseTimer | None = None) -> list[Trajectory]:
    """G rollouts per task, all live episodes stepped together; logp_old taken here (pitfall 9).
    Generate mode: `instruct` adds the answer-format instruction (real policies), the chat template is
    applied when the tokenizer has one, and logp_old is recomputed after sampling (set_logp_old).
    `timer` (optional) gets the seconds of the policy's sampling ("rollout_policy"), of the logp_old
    recomputation ("logp_old") and of the world's steps ("world": M_exp or the real env)."""
    timer = timer or PhaseTimer()
    eps, trajs = [], []
    for ti, task in enumerate(tasks):
        for g in range(group_size):
            ep_id = f"{ep_prefix}-{ti}-{g}"
            eps.append(world.reset(task, ep_id))
            trajs.append(Trajectory(task, ep_id, world.synthetic))
    while True:
        live = [i for i, e in enumerate(eps) if not e.done]
        if not live:
            break
        acts_l = [admissible(eps[i].state, eps[i].task) for i in live]
        for i, acts in zip(live, acts_l):
            if not acts:  # unparsable synthetic state: the episode fails
                eps[i].done = True
        keep = [(i, acts) for i, acts in zip(live, acts_l) if acts]
        if not keep:
            break
        live, acts_l = [k[0] for k in keep], [k[1] for k in keep]
        chosen, units = [], []
        if action_mode == "score":
            prompts = [policy_prompt(eps[i].task, eps[i].state) for i in live]
            with timer("rollout_policy"):
                logps = score_actions(policy, tok, prompts, acts_l, device)
            for j, lp in enumerate(logps):
                if temperature <= 0:
                    k = int(lp.argmax())
                else:
                    k = int(torch.multinomial(torch.softmax(lp / temperature, 0).cpu(), 1, generator=gen))
                chosen.append(acts_l[j][k])
                units.append(Unit(prompts[j], acts_l[j], k, float(lp[k])))
        else:
            prompts = chat_prompts(tok, [policy_prompt(eps[i].task, eps[i].state, acts, instruct)
                                         for i, acts in zip(live, acts_l)])
            with timer("rollout_policy"):
                g = C.generate(policy, tok, prompts, max_new_tokens=max_action_tokens, temperature=temperature,
                               generator=gen, stop_strings=("</action>",) if instruct else ())
            for j in range(len(live)):
                m = g.response_mask[j].bool()
                rid = g.response_ids[j][m].tolist()
                seq = torch.cat([g.sequences[j, :g.prompt_len][g.attention_mask[j, :g.prompt_len].bool()],
                                 g.response_ids[j][m]]).cpu()
                amask = torch.tensor([0] * (len(seq) - len(rid)) + _action_token_mask(tok, rid))
                chosen.append(parse_action_text(g.texts[j]))
                units.append(Unit(prompts[j], acts_l[j], -1, g.logprobs[j][m].cpu(), ids=seq, resp_mask=amask))
            if need_logp_old:
                with timer("logp_old"):
                    set_logp_old(policy, tok, units, device, logp_batch_size)
        before = [(eps[i].state, list(eps[i].history)) for i in live]
        with timer("world"):
            results = world.step_batch([eps[i] for i in live], chosen)
        for j, i in enumerate(live):
            s2, r, d, info = results[j]
            trajs[i].units.append(units[j])
            trajs[i].transitions.append(dict(task=eps[i].task, ep=eps[i].ep_id, hist=before[j][1], s=before[j][0],
                                             a=chosen[j], s2=s2, r=float(r), d=float(d), R=info.get("R", ""),
                                             real=not world.synthetic))
            if d:
                trajs[i].reward = float(r)
    return trajs


def policy_logp_units(policy, tok, units: list[Unit], device, action_mode: str):
    """(logp (B, T), logp_old (B, T), mask (B, T)) of a list of units under the current policy."""
    if action_mode == "score":
        lps = score_actions(policy, tok, [u.prompt for u in units], [u.actions for u in units], device)
        logp = torch.stack([lp[u.idx] for lp, u in zip(lps, units)])[:, None]  # (B, 1)
        old = torch.tensor([u.logp_old for u in units], device=logp.device)[:, None]
        return logp, old, torch.ones_like(logp)
    logp, amask = _generate_logp(policy, tok, units, device)
    L = logp.shape[1]
    old = torch.zeros_like(logp)
    for b, u in enumerate(units):
        T = len(u.logp_old)  # the whole prompt+response (set_logp_old) or the response only
        old[b, L - T:] = u.logp_old.to(device)
    return logp, old, amask


def _generate_logp(policy, tok, units: list[Unit], device):
    """Generate mode: (logp (B, L), action mask (B, L)) of the units' prompt+response ids, left-padded,
    under the autocast the update uses."""
    ids, mask = C.left_pad([u.ids.tolist() for u in units], tok.pad_token_id, device)
    with C.autocast(device):
        logp = C.token_logprobs(policy, ids, mask).float()  # (B, L)
    L = ids.shape[1]
    amask = torch.zeros_like(logp)
    for b, u in enumerate(units):
        amask[b, L - len(u.ids):] = u.resp_mask.to(device).float()
    return logp, amask


@torch.no_grad()
def set_logp_old(policy, tok, units: list[Unit], device, batch_size: int = 256) -> None:
    """Generate mode: logp_old of each unit (its whole prompt+response ids) from the function and precision
    the update uses (token_logprobs under autocast). C.generate's own log-probs come from fp32 cached decode
    steps; under bf16 autocast in the update they differ, so rho would not start at 1 (pitfall 9)."""
    for s in range(0, len(units), batch_size):
        chunk = units[s:s + batch_size]
        logp, _ = _generate_logp(policy, tok, chunk, device)
        L = logp.shape[1]
        for b, u in enumerate(chunk):
            u.logp_old = logp[b, L - len(u.ids):].cpu()


def grpo_update(policy, tok, opt, trajs: list[Trajectory], group_size: int, args, device, world_size: int,
                gen: random.Random, ref_policy=None, timer: PhaseTimer | None = None) -> dict:
    """One GRPO update (Eq. 5-6) over this rank's trajectories: ppo_epochs x num_minibatches steps.
    The loss is normalised by the global unit count of the minibatch, so the DDP gradient (averaged
    by all_reduce_grads after scaling by world_size) equals the single-process one. `timer` gets the
    seconds of "forward" (log-probs, the reference's when beta > 0, the loss), "backward" and "optimizer"
    (gradient all-reduce, clipping, AdamW)."""
    timer = timer or PhaseTimer()
    adv = grpo_advantages(torch.tensor([t.reward for t in trajs]), group_size)
    units = [(u, float(a)) for t, a in zip(trajs, adv) for u in t.units]
    stats = {"loss": 0.0, "clip_frac": 0.0, "n": 0}
    if not units:
        return stats
    policy.train()
    for _ in range(args.ppo_epochs):
        order = list(range(len(units)))
        gen.shuffle(order)
        mbs = [order[i::args.num_minibatches] for i in range(args.num_minibatches)]
        for mb in mbs:
            n_local = torch.tensor(float(len(mb) if args.action_mode == "score" else
                                         sum(float(units[i][0].resp_mask.sum()) for i in mb)))
            n_global = C.all_reduce_sum(n_local, world_size)
            if n_global <= 0:
                continue
            opt.zero_grad(set_to_none=True)
            for s in range(0, len(mb), args.per_device_batch_size):
                chunk = [units[i] for i in mb[s:s + args.per_device_batch_size]]
                with timer("forward"):
                    logp, old, mask = policy_logp_units(policy, tok, [u for u, _ in chunk], device, args.action_mode)
                    a = torch.tensor([x for _, x in chunk], device=logp.device)
                    kl = None
                    if ref_policy is not None and args.beta > 0:  # the reference forward only where the loss uses it
                        with torch.no_grad():
                            ref, _, _ = policy_logp_units(ref_policy, tok, [u for u, _ in chunk], device,
                                                          args.action_mode)
                        kl = torch.exp(ref - logp) - (ref - logp) - 1  # k3 estimate of KL(pi || ref)
                    loss, st = grpo_loss(logp, old, a, mask, args.clip_low, args.clip_high, kl, args.beta,
                                         normalizer=float(n_global) / world_size)
                if not torch.isfinite(loss):
                    raise FloatingPointError("NaN GRPO loss")
                with timer("backward"):
                    loss.backward()
                stats["loss"] += loss.item() / world_size
                stats["clip_frac"] += float(st["clip_frac"]) * len(chunk)
                stats["n"] += len(chunk)
            with timer("optimizer"):
                C.all_reduce_grads(policy, world_size)
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                opt.step()
    policy.eval()
    stats["loss"] /= args.ppo_epochs * args.num_minibatches
    stats["clip_frac"] /= max(1, stats["n"])
    return stats


def evaluate(ctx, tasks: list[str], greedy: bool = True, stats: dict | None = None) -> float:
    """Real success on the evaluation tasks. Uses only the real env (ctx.shop, diagnostic counter);
    M_exp is never called here. Tasks are sharded over ranks, successes summed; `stats` (optional)
    receives the number of invalid answers (generate mode: unparsable or inadmissible)."""
    world = RealWorld(ctx.shop, diag=True)
    mine = tasks[ctx.rank::ctx.world_size]
    gen = torch.Generator().manual_seed(12345 + ctx.rank)
    a = ctx.args
    trajs = rollout(ctx.policy, ctx.tok, world, mine, 1, 0.0 if greedy else 1.0, gen, a.action_mode, ctx.device,
                    "eval", max_action_tokens=a.max_action_tokens, instruct=is_instruct(a), need_logp_old=False)
    tot = C.all_reduce_sum(torch.tensor([float(sum(t.reward for t in trajs)), float(len(trajs)),
                                        float(world.stats["invalid"])]), ctx.world_size)
    if stats is not None:
        stats["invalid"] = int(tot[2])
    return float(tot[0] / tot[1].clamp(min=1))


def is_instruct(args) -> bool:
    """A real policy in generate mode reads the <think>..</think><action>..</action> instruction."""
    return args.action_mode == "generate" and bool(args.model_name_or_path)


def bc_warm_start(policy, tok, trajs: list[list[dict]], epochs: int, lr: float, device, action_mode: str, seed: int,
                  instruct: bool = False):
    """Behaviour cloning of the warm start (all arms): NLL of the taken (admissible) actions. Generate mode
    uses the rollout's prompts (instruction, chat template); with `instruct` the target is <action>a</action>."""
    pairs = [(t["task"], t["s"], t["a"]) for tr in trajs for t in tr if t["a"] in admissible(t["s"], t["task"])]
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    rng = random.Random(seed)
    policy.train()
    for _ in range(epochs):
        rng.shuffle(pairs)
        for s in range(0, len(pairs), 32):
            b = pairs[s:s + 32]
            acts = [admissible(st, tk) for tk, st, _ in b]
            if action_mode == "score":
                lps = score_actions(policy, tok, [policy_prompt(tk, st) for tk, st, _ in b], acts, device)
                loss = -torch.stack([lp[a_l.index(a)] for lp, a_l, (_, _, a) in zip(lps, acts, b)]).mean()
            else:
                prompts = chat_prompts(tok, [policy_prompt(tk, st, al, instruct) for (tk, st, _), al in zip(b, acts)])
                ids, mask, resp = C.encode_pairs(tok, prompts, [f"<action>{a}</action>" if instruct else a
                                                                for _, _, a in b], device=device)
                loss = -(C.token_logprobs(policy, ids, mask) * resp).sum() / resp.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
    policy.eval()


# ---------------------------------------------------------------------------------------------
# ---- world setup, M_exp cache, metrics of M_exp ----
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    shop: ShopLite
    train_tasks: list
    eval_tasks: list
    offline: list  # trajectories (lists of transition dicts) used for SFT + buffer
    heldout: list  # held-out real trajectories (eps_R / eps_P)
    bc: list  # epsilon = 0.5 trajectories for the warm start
    offline_steps: int
    bc_cache: dict = dataclasses.field(default_factory=dict)  # (seed, policy kind) -> warm-start weights
    metric_sets: dict | None = None  # fresh real transitions M_exp is measured on (metric_sets())
    metric_steps: int = 0  # real (diagnostic) steps they took


OFFLINE_HORIZON = 10  # the offline data's episode limit, independent of --horizon (M_exp's data stays the same)


def build_world(args) -> World:
    # DEVIATION(5): one world (catalogue, tasks, offline data) per --data_seed, shared by policy seeds
    shop = ShopLite(make_catalogue(args.n_products, args.data_seed), args.page_size, args.horizon, args.real_step_delay)
    train, ev = make_tasks(shop, args.n_train_tasks, args.n_eval_tasks, args.data_seed)
    rng = random.Random(f"offline-{args.data_seed}")
    # offline data in a shop with a fixed episode limit: --horizon (a rule in both worlds) does not change it
    data_shop = ShopLite(shop.catalogue, args.page_size, OFFLINE_HORIZON)
    if args.offline_file:
        offline = load_offline_file(args.offline_file)
        data_shop.real_steps = sum(len(t) for t in offline)
    else:
        offline = collect_trajectories(data_shop, train, args.n_expert, [0.0], rng, "exp")
        offline += collect_trajectories(data_shop, train, args.n_random, [0.3, 0.6, 1.0], rng, "rnd",
                                        invalid_prob=0.05)
    rng.shuffle(offline)
    n_held = int(round(args.heldout_frac * len(offline)))
    heldout, offline = offline[:n_held], offline[n_held:]
    bc = collect_trajectories(shop, train, args.bc_trajectories, [0.5], rng, "bc")  # the policy's: at --horizon
    # every offline transition was one real step (held-out and BC included)
    offline_steps, shop.real_steps = data_shop.real_steps + shop.real_steps, 0
    return World(shop, train, ev, offline, heldout, bc, offline_steps)


def _history_action(h) -> str:
    """One history entry -> the action M_exp's prompt lists: an action string, an (s, a) pair, or
    {"action": a}."""
    if isinstance(h, str):
        return h
    if isinstance(h, (list, tuple)) and len(h) == 2 and isinstance(h[1], str):
        return h[1]
    if isinstance(h, dict) and isinstance(h.get("action"), str):
        return h["action"]
    raise ValueError(f"history entry {h!r} is not an action, an (s, a) pair or {{'action': a}}")


def load_offline_file(path: str) -> list[list[dict]]:
    """jsonl rows {task, history, state, action, reasoning, next_state, reward, done, episode[, success]} ->
    trajectories; a malformed row raises UserError with its line number. The outcome reward r is 1 iff the
    task succeeded ("success" when given, else raw reward == 1; a WebShop score 0.67 is a failure); the raw
    score is kept as r_raw. history: actions, (state, action) pairs or {"action": a} objects."""
    if not os.path.isfile(path):
        raise C.UserError(f"--offline_file '{path}' does not exist; pass a jsonl of offline transitions")
    by_ep: dict[str, list[dict]] = {}
    need = ("task", "state", "action", "next_state", "reward", "done")
    for i, line in enumerate(C.read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            o = json.loads(line)
            if not isinstance(o, dict):
                raise ValueError("not a JSON object")
            miss = [k for k in need if k not in o]
            if miss:
                raise ValueError(f"missing {miss}")
            r_raw, done = float(o["reward"]), float(o["done"])
            if not (math.isfinite(r_raw) and math.isfinite(done)):
                raise ValueError("reward / done not finite")
            success = float(bool(o["success"])) if "success" in o else float(r_raw >= 1.0)
            hist = o.get("history") or []
            if not isinstance(hist, list):
                raise ValueError("history is not a list")
            hist = [_history_action(h) for h in hist]
            if not all(isinstance(o[k], str) for k in ("task", "state", "action", "next_state")):
                raise ValueError("task, state, action and next_state must be strings")
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise C.UserError(f"{path}:{i}: bad offline transition ({e}); each line needs {list(need)}, "
                              f"reward and done numbers") from None
        ep = str(o.get("episode", i))
        by_ep.setdefault(ep, []).append(dict(task=o["task"], ep=ep, hist=hist, s=o["state"], a=o["action"],
                                             s2=o["next_state"], r=success, r_raw=r_raw, d=done,
                                             R=str(o.get("reasoning", "")), real=True))
    if not by_ep:
        raise C.UserError(f"--offline_file '{path}' holds no transitions; pass a jsonl with one transition per line")
    return list(by_ep.values())


def exp_variant(arm: str, args) -> dict:
    """Which M_exp an arm uses (ablations retrain it)."""
    return {"top_k": 0 if arm == "no_retrieval" else args.top_k,
            "reasoning": not (args.no_reasoning or arm == "no_reasoning")}


def make_buffer(world: World, args, forbidden) -> ReplayBuffer:
    buf = ReplayBuffer(forbidden_tasks=forbidden, cap=args.buffer_cap)
    buf.add([t for tr in world.offline for t in tr])
    return buf


def toy_exp_lm(args, corpus: list[str]):
    """The toy M_exp: a tiny randomly initialised Llama (as common.tiny_lm builds it) with a small BPE
    tokenizer trained in memory on the SFT texts (common's BPE helper; vocabulary --exp_vocab_size).
    DEVIATION(6): bytes made M_exp's sequences ~18x longer and it did not learn in a CPU budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = C.bpe_tokenizer(corpus, vocab_size=args.exp_vocab_size)
    d = args.exp_d_model
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=args.exp_layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(args.data_seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def exp_sft_data(world: World, args, variant: dict) -> tuple[list, list]:
    """(SFT examples, held-out examples for early stopping) of a toy M_exp variant: the offline trajectories
    with their retrieved demos and the M_task pairs; the held-out trajectories (at most 512 examples, no
    oversampling, no M_task pairs) give the held-out loss that stops the fine-tuning."""
    buf = make_buffer(world, args, set(world.eval_tasks))
    ex = exp_sft_examples(world.offline, buf, variant["top_k"], args.demo_bytes, variant["reasoning"],
                          world.train_tasks, random.Random(args.data_seed), args.fail_oversample,
                          catalogue=None if args.offline_file else world.shop.catalogue)
    val = exp_sft_examples(world.heldout, buf, variant["top_k"], args.demo_bytes, variant["reasoning"],
                           world.train_tasks, random.Random(args.data_seed), 1)
    random.Random(f"val-{args.data_seed}").shuffle(val)
    return ex, val[:512]


def exp_cache_key(world: World, args, variant: dict) -> tuple[str, dict]:
    """(key, recipe) of a toy M_exp. The key holds only what changes the model: the inputs of its SFT and
    held-out examples (offline and held-out trajectories, training tasks, catalogue; the retrieval variant, demo
    length and oversampling that turn them into prompts), the architecture, the recipe and the init seed. Flags
    that do not change these (--n_eval_tasks, --horizon, --iterations, the policy's flags) reuse the cached M_exp.
    (v: bumped when the code that writes the examples changes.)"""
    data = json.dumps([world.offline, world.heldout, world.train_tasks,
                       [dataclasses.astuple(p) for p in world.shop.catalogue], bool(args.offline_file)])
    cfg = dict(v=5, data=hashlib.sha1(data.encode()).hexdigest()[:16], fail_over=args.fail_oversample,
               demo=args.demo_bytes, vocab=args.exp_vocab_size, init_seed=args.data_seed, layers=args.exp_layers,
               d=args.exp_d_model, epochs=args.exp_epochs, lr=args.exp_learning_rate, bs=args.exp_batch_size,
               eval_every=args.exp_eval_every, patience=args.exp_patience, **variant)
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10], cfg


def load_or_train_exp(world: World, args, variant: dict, device):
    """The toy M_exp for a variant, fine-tuned once and cached under toy_cache_dir()/dreamgym-<hash>
    (like common.toy_checkpoint); or an HF path / endpoint from the flags."""
    if args.exp_api_base:
        llm = exp_endpoint(args)
        return ExperienceModel(llm, variant["reasoning"], args.exp_temperature, args.exp_max_new_tokens,
                               args.exp_retries, task_temperature=args.task_temperature), "endpoint"
    if args.exp_model_name_or_path:
        model, tok = C.load_lm(args.exp_model_name_or_path, device=device)
        return ExperienceModel(C.LLM(model=model, tokenizer=tok), variant["reasoning"], args.exp_temperature,
                               args.exp_max_new_tokens, args.exp_retries, task_temperature=args.task_temperature), \
            args.exp_model_name_or_path
    key, cfg = exp_cache_key(world, args, variant)
    root = C.toy_cache_dir()
    path = os.path.join(root, f"dreamgym-mexp-{key}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".dreamgym-mexp-{key}.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        # under torchrun rank 0 builds (transformers' save_pretrained is rank-aware), the others wait below
        if C.is_main() and not os.path.isfile(os.path.join(path, "config.json")):
            t0 = time.time()
            tqdm.write(f"[dreamgym] fine-tuning M_exp {variant} (cached afterwards) -> {path}")
            ex, val = exp_sft_data(world, args, variant)
            model, tok = toy_exp_lm(args, [p + t for p, t in ex])
            model.to(device)
            info: dict = {}
            losses = train_exp_model(model, tok, ex, args.exp_epochs, args.exp_learning_rate, args.exp_batch_size,
                                     args.data_seed, device, val=val, eval_every=args.exp_eval_every,
                                     patience=args.exp_patience, info=info)
            tmp = path + f".tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            C.write_json(os.path.join(tmp, "sft.json"), {"config": cfg, "examples": len(ex), "val_examples": len(val),
                                                          "final_loss": float(np.mean(losses[-10:])),
                                                          "seconds": time.time() - t0, **info})
            os.replace(tmp, path)
            tqdm.write(f"[dreamgym] M_exp trained in {time.time() - t0:.0f}s ({info.get('steps')} steps, best held-out "
                       f"loss {info.get('best_val')} at step {info.get('best_step')}), final loss "
                       f"{np.mean(losses[-10:]):.3f}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    model, tok = C.load_lm(path, device=device)
    return ExperienceModel(C.LLM(model=model, tokenizer=tok, batch_size=64), variant["reasoning"], args.exp_temperature,
                           args.exp_max_new_tokens, args.exp_retries, task_temperature=args.task_temperature), path


def predict_transitions(expm: ExperienceModel, buffer: ReplayBuffer, transitions: list[dict], k: int,
                        demo_bytes: int, stats: dict | None = None) -> list:
    """M_exp's answer (R, s', r, d) or None for each transition (dicts with task, hist, s, a, ep), with its k
    retrieved demos (own episode excluded), as in SFT: the one prompt path of the synthetic worlds and of the
    M_exp metrics. `stats` (a world's counters) gets the number of demos and of real ones among them."""
    if not transitions:
        return []
    demos = buffer.retrieve([(t["s"], t["a"], t["ep"], t["task"]) for t in transitions], k)
    if stats is not None:
        stats["demos"] += sum(len(ds) for ds in demos)
        stats["real_demos"] += sum(bool(d.get("real")) for ds in demos for d in ds)
    return expm.step([exp_prompt(t["task"], t["hist"], [demo_text(d, demo_bytes) for d in ds], t["s"], t["a"])
                      for t, ds in zip(transitions, demos)])


def exp_model_error(expm: ExperienceModel, buffer: ReplayBuffer, heldout: list[list[dict]], k: int, demo_bytes: int,
                    n_max: int) -> dict:
    """eps_R = mean |r_hat - r|, false-success rate on failed purchases, buy accuracy, and eps_P proxies
    (exact next state, element F1) on held-out real transitions (valid actions; M_exp's job)."""
    flat = [t for tr in heldout for t in tr if t["a"] in admissible(t["s"], t["task"])]
    buys = [t for t in flat if t["a"] == "buy"]
    rest = [t for t in flat if t["a"] != "buy"]
    sample = buys[: n_max // 2] + rest[: n_max - min(len(buys), n_max // 2)]
    if not sample:
        return {}
    ans = predict_transitions(expm, buffer, sample, k, demo_bytes)
    err, exact, f1, fs, nf, acc, nb = [], [], [], 0, 0, 0, 0
    for t, a in zip(sample, ans):
        r_hat, s_hat = (a[2], a[1]) if a is not None else (0.0, FAILURE_STATE)
        err.append(abs(r_hat - t["r"]))
        exact.append(float(s_hat == t["s2"]))
        f1.append(element_f1(s_hat, t["s2"]))
        if t["a"] == "buy":
            nb += 1
            acc += r_hat == t["r"]
            if t["r"] == 0:
                nf += 1
                fs += r_hat == 1
    # a rate comes with its count: false successes among the held-out failed purchases ("7/10")
    return {"eps_R": float(np.mean(err)), "false_success": fs / nf if nf else None, "false_success_n": fs,
            "failed_buys": nf, "buy_acc": acc / nb if nb else None, "n_buys": nb,
            "eps_P_exact": float(np.mean(exact)), "eps_P_f1": float(np.mean(f1)), "n_heldout": len(sample),
            "buy_success_base": float(np.mean([t["r"] for t in buys])) if buys else None}


def action_type(action: str) -> str:
    """search / click / select / buy / back / next, or "invalid" for anything else."""
    typ = action.split("[")[0]
    return typ if typ in ACTION_TYPES else "invalid"


def metric_transitions(shop: ShopLite, tasks: list[str], n_buys: int, n_per_action: int, rng: random.Random,
                       prefix: str, exclude=frozenset()) -> dict[str, list[dict]]:
    """Fresh real transitions to measure M_exp on (diagnostic steps, never in its SFT data or the buffer):
    n_buys purchases, half successful and half failed (balanced), and up to n_per_action valid transitions of
    each other action type, from expert and epsilon-random episodes (epsilon 0, 0.3, 0.6, 1) on `tasks`, 100
    episodes at a time until the quotas are met (at most 40 batches). `exclude`: (task, last 3 actions, s, a)
    keys of the SFT transitions; a transition with such a key is an exact copy of a training example and skipped."""
    ok, fail = [], []
    other: dict[str, list[dict]] = {t: [] for t in ACTION_TYPES if t != "buy"}
    real0 = shop.real_steps
    for b in range(40):
        for tr in collect_trajectories(shop, rng.sample(tasks, len(tasks)), 100, [0.0, 0.3, 0.6, 1.0], rng,
                                       f"{prefix}{b}-"):
            for t in tr:
                if t["a"] not in admissible(t["s"], t["task"]) or sft_key(t) in exclude:
                    continue
                typ = action_type(t["a"])
                (ok if t["r"] == 1 else fail).append(t) if typ == "buy" else other[typ].append(t)
        if (len(ok) >= n_buys // 2 and len(fail) >= n_buys - n_buys // 2
                and all(len(v) >= n_per_action for k, v in other.items() if k != "next")):
            break
    shop.diag_steps += shop.real_steps - real0  # measurement, not training
    shop.real_steps = real0
    out = {"buy": ok[: n_buys // 2] + fail[: n_buys - n_buys // 2]}
    out.update({k: v[:n_per_action] for k, v in other.items()})
    return out


def sft_key(t: dict) -> tuple:
    return t["task"], tuple(t["hist"][-3:]), t["s"], t["a"]


def exp_metrics(expm: ExperienceModel, buffer: ReplayBuffer, sets: dict[str, list[dict]], k: int,
                demo_bytes: int) -> dict:
    """M_exp on fresh real transitions (metric_transitions), by action type: exact next-state accuracy
    (state_acc[type], with n[type]); on the purchases also reward accuracy (buy_acc), false successes (a failed
    purchase called a success: false_success = fs / failed) and missed successes (missed = ms / succeeded)."""
    flat = [t for typ in ACTION_TYPES for t in sets.get(typ, [])]
    if not flat:
        return {}
    ans = predict_transitions(expm, buffer, flat, k, demo_bytes)
    acc: dict[str, list[float]] = {}
    fs = nf = ms = ns = right = 0
    for t, a in zip(flat, ans):
        r_hat, s_hat = (a[2], a[1]) if a is not None else (0.0, FAILURE_STATE)
        typ = action_type(t["a"])
        acc.setdefault(typ, []).append(float(s_hat == t["s2"]))
        if typ == "buy":
            right += r_hat == t["r"]
            if t["r"] == 0:
                nf, fs = nf + 1, fs + (r_hat == 1)
            else:
                ns, ms = ns + 1, ms + (r_hat == 0)
    nb = nf + ns
    return {"buy_acc": right / nb if nb else None, "n_buys": nb, "false_success": fs / nf if nf else None,
            "false_success_n": fs, "failed_buys": nf, "missed": ms / ns if ns else None, "missed_n": ms,
            "ok_buys": ns, "state_acc": {k2: float(np.mean(v)) for k2, v in acc.items()},
            "n": {k2: len(v) for k2, v in acc.items()}}


def metric_sets(world: World, args) -> dict:
    """The two measurement sets of M_exp (built once per world): "train" = fresh episodes on training tasks with
    exact copies of SFT transitions removed (held-out transitions of training tasks), "new" = episodes on the
    evaluation tasks (new tasks; measured only, never in the buffer)."""
    if world.metric_sets is None:
        rng, d0 = random.Random(f"metrics-{args.data_seed}"), world.shop.diag_steps
        seen = {sft_key(t) for tr in world.offline for t in tr}
        world.metric_sets = {
            "train": metric_transitions(world.shop, world.train_tasks, args.n_metric_buys, args.n_metric_per_action,
                                        rng, "mtr", exclude=seen),
            "new": metric_transitions(world.shop, world.eval_tasks, args.n_metric_buys, args.n_metric_per_action,
                                      rng, "mnew")}
        world.metric_steps = world.shop.diag_steps - d0  # reported apart: not an arm's diagnostic steps
        world.shop.diag_steps = d0
    return world.metric_sets


def hallucination_split(shop: ShopLite, trajs: list[Trajectory], n: int) -> dict:
    """The last n synthetic successes replayed in the real env (diag steps). A replay that fails is a hallucinated
    success; it is state-caused when some synthetic state before the final action differs from the real state
    the same actions reach (counted by the type of the action that produced the first wrong state), else
    reward-caused (every state right, the reward wrong). -> {rate, n, state, reward, first_wrong: {type: count}};
    rate None without a synthetic success."""
    succ = [t for t in trajs if t.synthetic and t.reward >= 1][-n:]
    out = dict(rate=None, n=len(succ), state=0, reward=0, first_wrong={})
    if not succ:
        return out
    fails = 0
    for t in succ:
        ep = shop.reset(t.task, "halluc")
        r, wrong = 0.0, None
        for j, tr in enumerate(t.transitions):
            if ep.done:
                break
            if wrong is None and ep.state != tr["s"]:
                wrong = action_type(t.transitions[j - 1]["a"]) if j else "reset"
            _, _, _, info = shop.step(ep, tr["a"], diag=True)
            r = info["success"]
        if r < 1:
            fails += 1
            if wrong is None:
                out["reward"] += 1
            else:
                out["state"] += 1
                out["first_wrong"][wrong] = out["first_wrong"].get(wrong, 0) + 1
    out["rate"] = fails / len(succ)
    return out



# ---------------------------------------------------------------------------------------------
# ---- training: one arm x seed, in named phases ----
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    shop: ShopLite
    policy: object
    tok: object
    device: torch.device
    rank: int = 0
    world_size: int = 1


EXP_ARMS = ("dreamgym", "s2r", "exp_states", "exp_reward", "no_retrieval", "no_reasoning", "no_curriculum")  # use M_exp


def policy_corpus(world: World, n: int = 300) -> list[str]:
    """Texts the toy policy's word tokenizer is trained on: the score-mode prompts and admissible actions of
    the first n offline trajectories (training tasks only; the same for every policy seed)."""
    return [policy_prompt(t["task"], t["s"]) + " " + " ".join(admissible(t["s"], t["task"]))
            for tr in world.offline[:n] for t in tr]


def make_policy(args, device, seed: int, world: World):
    """The policy: an HF model (--model_name_or_path) or the toy one (2 layers, d 64). DEVIATION(9): the toy
    policy reads whole words (a BPE with a word pre-split, trained in memory on policy_corpus) unless
    --policy_tokenizer byte; its prompts are ~2.9x shorter than bytes, so a GRPO iteration is ~3.5x faster."""
    if args.model_name_or_path:
        policy, tok = C.load_lm(args.model_name_or_path, device=device)
    elif args.policy_tokenizer == "byte":
        policy, tok = C.tiny_lm(n_layer=2, d_model=64, seed=seed)
        policy.to(device)
    else:
        policy, tok = C.tiny_lm(n_layer=2, d_model=64, seed=seed, tokenizer="bpe", bpe_corpus=policy_corpus(world),
                                bpe_vocab_size=512, bpe_words=True)
        policy.to(device)
    return policy, tok


def warm_start_policy(args, world: World, device, seed: int):
    """The policy every arm of a seed starts from: BC on the epsilon = 0.5 trajectories, run once per seed and
    world (world.bc_cache); deterministic, so a resumed process recomputes the same weights."""
    policy, tok = make_policy(args, device, seed, world)
    key = (seed, args.model_name_or_path, args.policy_tokenizer, args.action_mode, args.bc_epochs)
    if key not in world.bc_cache:
        bc_warm_start(policy, tok, world.bc, args.bc_epochs, 3e-3 if not args.model_name_or_path else args.learning_rate,
                      device, args.action_mode, seed, instruct=is_instruct(args))
        world.bc_cache[key] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    policy.load_state_dict(world.bc_cache[key])
    return policy, tok


def experience_model(world: World, args, variant: dict, device, exp_cache: dict):
    """(M_exp, its name, its held-out errors, its memo right after measuring them) of a variant: loaded or
    fine-tuned and measured once per invocation; every arm that uses it starts from that same state."""
    vkey = json.dumps(variant, sort_keys=True)
    if vkey not in exp_cache:
        expm, path = load_or_train_exp(world, args, variant, device)
        buf = make_buffer(world, args, set(world.eval_tasks))
        err = exp_model_error(expm, buf, world.heldout, variant["top_k"], args.demo_bytes, args.n_heldout_eval)
        if args.n_metric_buys > 0:
            sets = metric_sets(world, args)
            err.update(m_train=exp_metrics(expm, buf, sets["train"], variant["top_k"], args.demo_bytes),
                       m_new=exp_metrics(expm, buf, sets["new"], variant["top_k"], args.demo_bytes),
                       metric_real_steps=world.metric_steps)
        exp_cache[vkey] = (expm, path, err, dict(expm._memo))
    return exp_cache[vkey]


def task_batch(args, world: World, syn_pool: list[str], rng: random.Random, use_curriculum: bool, n: int) -> list[str]:
    """A task batch: at most lambda_syn x n curriculum variants, the rest real training tasks."""
    n_syn = min(len(syn_pool), int(math.floor(args.lambda_syn * n))) if use_curriculum else 0
    syn = syn_pool[-n_syn:] if n_syn else []
    return syn + rng.sample(world.train_tasks, n - n_syn)


def curriculum_seeds(groups: list[tuple[str, list[float]]], n: int) -> list[str]:
    """Eq. (4): the n tasks of an iteration's groups with the highest reward variance V_tau, V_tau > 0 only
    (an all-equal group says nothing about difficulty); ties broken by task text, descending."""
    scored = sorted(((reward_variance_score(r), t) for t, r in groups), reverse=True)
    return [t for v, t in scored if v > 0][:n]


def real_step_cap(arm: str, args, real_ref: int | None) -> tuple[int, str | None]:
    """(real training steps an arm may spend, what they are measured against). real_grpo: N. s2r:
    DEVIATION(7), --s2r_frac x the real steps real_grpo used in the same seed (real_ref) when it ran in
    this invocation, else x N: N is not binding in the toy, so 10% of N was ~25% of real_grpo's use."""
    if arm == "real_grpo":
        return args.real_budget, "N"
    if arm == "s2r":
        if real_ref:
            return int(args.s2r_frac * real_ref), "real_grpo"
        return int(args.s2r_frac * args.real_budget), "N"
    return 0, None


def json_clean(x):
    """NaN / inf -> None (summary.json stays JSON), tuples -> lists, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


class ArmRun:
    """One arm x seed on this rank. Phases: setup (__init__), start / restore, then per iteration
    synthetic_iteration (rollouts in M_exp, GRPO, buffer, curriculum) or real_iteration (rollouts in
    ShopLite within the real-step cap, GRPO), evaluate, save; finish (final evaluation, hallucination
    replay, the result row). Everything an iteration reads from the past lives here and goes into the
    checkpoint (state_dict), so kill -9 + --resume gives the uninterrupted numbers."""

    def __init__(self, arm: str, seed: int, args, world: World, exp_cache: dict, device, rank: int = 0,
                 world_size: int = 1, out_dir: str | None = None, real_ref: int | None = None, log_step: int = 0):
        self.t_start = time.time()
        self.arm, self.seed, self.args, self.world, self.device = arm, seed, args, world, device
        self.rank, self.world_size, self.real_ref = rank, world_size, real_ref
        self.tag = f"{arm}-s{seed}"
        self.ckpt_dir = os.path.join(out_dir, f"ckpt-{self.tag}") if out_dir else None
        C.seed_everything(seed)
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)  # policy sampling
        self.rng = random.Random(f"{seed}-{rank}")  # task batches, minibatch order
        world.shop.real_steps = world.shop.diag_steps = 0
        self.policy, self.tok = warm_start_policy(args, world, device, seed)
        self.ref_policy = copy.deepcopy(self.policy).eval() if args.beta > 0 else None
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
        self.ctx = Ctx(args, world.shop, self.policy, self.tok, device, rank, world_size)
        self.uses_exp = arm in EXP_ARMS
        self.expm = self.buffer = self.dream = self.exp_path = None
        self.exp_err: dict = {}
        if self.uses_exp:
            variant = exp_variant(arm, args)
            self.expm, self.exp_path, self.exp_err, memo = experience_model(world, args, variant, device, exp_cache)
            self.expm.reset(memo, seed)  # an arm's M_exp answers depend on that arm only, not on earlier arms
            self.buffer = make_buffer(world, args, set(world.eval_tasks))
            self.n_offline = len(self.buffer.real)
            if arm == "exp_reward":  # diagnostic: true states, M_exp's reward
                self.dream = ExpRewardWorld(world.shop, self.expm, self.buffer, variant["top_k"], args.demo_bytes)
            else:  # exp_states (diagnostic): M_exp's states, the true reward
                self.dream = DreamWorld(self.expm, self.buffer, variant["top_k"], args.demo_bytes, args.horizon,
                                        reward="true" if arm == "exp_states" else "exp")
        self.real_w = RealWorld(world.shop)  # one real world per arm: its invalid-action counter spans the run
        self.n_syn_iters = args.iterations if self.uses_exp else 0
        self.n_real_iters = {"real_grpo": args.iterations, "s2r": 10 ** 6}.get(arm, 0)  # s2r: until its real cap
        self.real_cap, self.cap_basis = real_step_cap(arm, args, real_ref)
        self.use_curr = arm != "no_curriculum" and args.lambda_syn > 0
        self.per_rank_tasks = max(1, args.tasks_per_iter // world_size)
        # carried from iteration to iteration (state_dict)
        self.it, self.log_step, self.saved_it = 0, log_step, None
        self.syn_pool: list[str] = []
        self.curve: list = []  # (iteration, greedy real success, sampled real success or None)
        self.zero_var: list[float] = []
        self.syn_succ: list[float] = []
        self.syn_trajs: list[Trajectory] = []  # the last synthetic rollouts, for the hallucination replay
        self.eval_invalid = 0
        self.timer = PhaseTimer()
        self.elapsed = 0.0  # seconds spent in earlier processes (resume; s2r: dreamgym's synthetic phase)

    # ---- state (checkpoint) ----

    def state_dict(self) -> dict:
        d = dict(it=self.it, log_step=self.log_step, gen=self.gen.get_state(), rng=self.rng.getstate(),
                 syn_pool=list(self.syn_pool), curve=list(self.curve), zero_var=list(self.zero_var),
                 syn_succ=list(self.syn_succ), syn_trajs=list(self.syn_trajs), eval_invalid=self.eval_invalid,
                 real_steps=self.world.shop.real_steps, diag_steps=self.world.shop.diag_steps,
                 real_stats=dict(self.real_w.stats), timer=dict(self.timer.seconds),
                 elapsed=self.elapsed + time.time() - self.t_start)
        if self.uses_exp:
            d.update(dream_stats=dict(self.dream.stats), exp=self.expm.state(),
                     buffer_real=self.buffer.real[self.n_offline:], buffer_syn=list(self.buffer.syn))
        return d

    def load_state_dict(self, d: dict, own: bool = True) -> None:
        """own=False: s2r takes over dreamgym's state at the end of its synthetic phase (same seed, same
        computation) but keeps its own metrics.jsonl steps."""
        self.it = d["it"]
        self.log_step = d["log_step"] if own else self.log_step + d["it"]
        self.gen.set_state(d["gen"])
        self.rng.setstate(d["rng"])
        self.syn_pool, self.curve, self.zero_var = list(d["syn_pool"]), list(d["curve"]), list(d["zero_var"])
        self.syn_succ, self.syn_trajs, self.eval_invalid = list(d["syn_succ"]), list(d["syn_trajs"]), d["eval_invalid"]
        self.world.shop.real_steps, self.world.shop.diag_steps = d["real_steps"], d["diag_steps"]
        self.real_w.stats = dict(d["real_stats"])
        self.timer = PhaseTimer(seconds=d["timer"])
        self.elapsed = d["elapsed"]
        if self.uses_exp:
            self.dream.stats = dict(d["dream_stats"])
            self.expm.set_state(d["exp"])
            self.buffer.add(list(d["buffer_real"]) + list(d["buffer_syn"]))

    def save(self) -> None:
        """Checkpoint: the policy, AdamW and every rank's state_dict (rank 0 writes; all ranks wait)."""
        ranks = C.all_gather_objects(self.state_dict(), self.world_size)
        if self.rank == 0:
            C.save_checkpoint(self.ckpt_dir, self.policy, self.tok, self.opt, step=self.log_step,
                              extra=dict(arm=self.arm, seed=self.seed, ranks=ranks))
        _barrier(self.world_size)
        self.saved_it = self.it

    def restore(self, ckpt_dir: str, own: bool = True) -> bool:
        """Load the newest complete checkpoint in ckpt_dir (False when there is none)."""
        if C.find_checkpoint(ckpt_dir) is None:
            return False
        st = C.load_checkpoint(ckpt_dir, model=self.policy, optimizer=self.opt)
        ranks = st["extra"]["ranks"]
        C.require(len(ranks) == self.world_size, f"{ckpt_dir} was written by {len(ranks)} ranks, this run has "
                                                 f"{self.world_size}; resume with the same number of processes")
        self.load_state_dict(ranks[self.rank], own=own)
        self.saved_it = self.it if own else None
        return True

    # ---- phases ----

    def start(self, resume: bool, dream_ckpt: str | None = None) -> None:
        """Resume from this arm's checkpoint; or (s2r) take over dreamgym's synthetic phase; or evaluate the
        warm start (iteration 0)."""
        if resume and self.restore(self.ckpt_dir):
            tqdm.write(f"[{self.tag}] resumed at iteration {self.it}")
        elif dream_ckpt is not None:
            C.require(self.restore(dream_ckpt, own=False), f"no checkpoint in {dream_ckpt} for s2r's synthetic phase")
            C.require(self.it == self.n_syn_iters, f"{dream_ckpt} holds iteration {self.it}, not the end of dreamgym's "
                                                   f"{self.n_syn_iters} synthetic iterations")
            tqdm.write(f"[{self.tag}] synthetic phase = the dreamgym-s{self.seed} run; real phase follows")
        else:
            self.evaluate()

    def evaluate(self, sampled: bool = False) -> float:
        """Real success on the eval tasks (real env only, diagnostic steps), appended to the curve."""
        with self.timer("eval"):
            stats = {"invalid": 0}
            g = evaluate(self.ctx, self.world.eval_tasks, greedy=True, stats=stats)
            s = evaluate(self.ctx, self.world.eval_tasks, greedy=False) if sampled else None
        self.eval_invalid = stats["invalid"]
        self.curve.append((self.it, g, s))
        tqdm.write(f"[{self.tag}] iter {self.it:3d}  real success greedy {g:.3f}" + (f" sampled {s:.3f}" if sampled else "")
                   + f"  real train steps {self.world.shop.real_steps}"
                   + (f"  invalid answers {self.eval_invalid}" if self.args.action_mode == "generate" else ""))
        return g

    def real_steps_total(self) -> int:
        return int(C.all_reduce_sum(torch.tensor(float(self.world.shop.real_steps)), self.world_size).item())

    def iterate(self) -> dict | None:
        """One policy iteration -> its metrics row (with the seconds of each phase); None when the arm is done."""
        before = dict(self.timer.seconds)
        if self.it < self.n_syn_iters:
            row = self.synthetic_iteration()
        elif self.it < self.n_syn_iters + self.n_real_iters:
            row = self.real_iteration()
        else:
            row = None
        if row is None:
            return None
        self.it += 1
        if self.it % self.args.eval_every == 0:
            row.update(real_success=self.evaluate())
            if self.args.action_mode == "generate":
                row.update(eval_invalid=self.eval_invalid)
        # seconds per phase of this iteration (a dict: kept off the progress bar and the metric plots)
        row["time_s"] = {k: round(v - before.get(k, 0.0), 4) for k, v in self.timer.seconds.items()
                         if v > before.get(k, 0.0)}
        return row

    def rollout_and_update(self, world, tasks: list[str], phase: str):
        """G rollouts per task in `world`, one GRPO update, group statistics gathered from every rank."""
        a, G = self.args, self.args.group_size
        trajs = rollout(self.policy, self.tok, world, tasks, G, a.temperature, self.gen, a.action_mode, self.device,
                        f"{self.tag}-{self.it}-r{self.rank}", max_action_tokens=a.max_action_tokens,
                        instruct=is_instruct(a), logp_batch_size=a.per_device_batch_size, timer=self.timer)
        try:
            stats = grpo_update(self.policy, self.tok, self.opt, trajs, G, a, self.device, self.world_size, self.rng,
                                self.ref_policy, timer=self.timer)
        except FloatingPointError:
            raise C.UserError(f"NaN loss in {self.tag} at iteration {self.it}; last good checkpoint kept in "
                              f"{self.ckpt_dir}; lower --learning_rate") from None
        groups = [(t.task, [x.reward for x in trajs[i:i + G]]) for i, t in enumerate(trajs) if i % G == 0]
        groups = [g for part in C.all_gather_objects(groups, self.world_size) for g in part]
        zv = float(np.mean([reward_variance_score(r) == 0 for _, r in groups]))
        succ = float(np.mean([x for _, r in groups for x in r]))
        self.zero_var.append(zv)
        row = dict(arm=self.arm, seed=self.seed, iteration=self.it + 1, phase=phase, rollout_success=succ,
                   zero_var_share=zv, real_train_steps=self.real_steps_total(), loss=stats["loss"],
                   clip_frac=stats["clip_frac"])
        return trajs, groups, row

    def synthetic_iteration(self) -> dict:
        """DreamGym: GRPO on rollouts inside M_exp (at most lambda_syn of the tasks from the curriculum);
        the new transitions join the replay buffer (--buffer_add synthetic); the curriculum grows."""
        tasks = task_batch(self.args, self.world, self.syn_pool, self.rng, self.use_curr, self.per_rank_tasks)
        trajs, groups, row = self.rollout_and_update(self.dream, tasks, "synthetic")
        self.syn_succ.append(row["rollout_success"])
        self.syn_trajs = (self.syn_trajs + trajs)[-4 * self.args.n_halluc:]
        new = [tr for t in trajs for tr in t.transitions]
        new = [t for part in C.all_gather_objects(new, self.world_size) for t in part]
        if self.args.buffer_add == "synthetic":
            self.buffer.add([{**t, "real": False} for t in new])
        st = self.dream.stats
        row.update(syn_pool=len(self.syn_pool), invalid=st["invalid"], malformed=st["malformed"],
                   real_demo_share=st["real_demos"] / max(1, st["demos"]), exp_calls=self.expm.calls)
        if self.use_curr:
            row.update(self.curriculum(groups))
        return row

    def curriculum(self, groups: list) -> dict:
        """Eq. (4): M_task proposes variants of the highest-variance tasks; parsable, feasible, new, non-eval
        ones join the pool (at most curr_seeds per iteration, 32 kept)."""
        with self.timer("curriculum"):
            seeds = curriculum_seeds(groups, self.args.curr_seeds)
            pairs = [(s, c) for s, cs in zip(seeds, self.expm.gen_tasks(seeds, self.args.curr_candidates)) for c in cs]
            cands = [c for _, c in pairs]
            keep = curriculum_variants(cands, self.world.shop.catalogue, set(self.world.eval_tasks),
                                       set(self.world.train_tasks) | set(self.syn_pool), seeds=[s for s, _ in pairs])
            self.syn_pool = (self.syn_pool + keep[: self.args.curr_seeds])[-32:]
        return dict(curr_candidates=len(cands), curr_kept=len(keep))

    def real_iteration(self) -> dict | None:
        """Real GRPO (real_grpo; s2r after its synthetic phase) while a worst-case task batch fits in the
        real-step cap; None when it does not (the arm ends)."""
        a = self.args
        left = self.real_cap - self.real_steps_total()
        n_tasks = min(self.per_rank_tasks, int(left // (a.group_size * a.horizon * self.world_size)))
        if n_tasks <= 0:
            return None
        tasks = task_batch(a, self.world, self.syn_pool, self.rng, False, n_tasks)
        trajs, _, row = self.rollout_and_update(self.real_w, tasks, "real")
        row.update(invalid=self.real_w.stats["invalid"], real_cap=self.real_cap)
        if a.buffer_add == "real" and self.buffer is not None:
            self.buffer.add([tr for t in trajs for tr in t.transitions])
        return row

    def finish(self) -> dict:
        """Final evaluation (greedy and sampled), the hallucination replay, and the arm's result row."""
        if self.curve and self.curve[-1][0] == self.it:
            self.curve.pop()
        self.evaluate(sampled=True)
        with self.timer("halluc_replay"):
            hs = hallucination_split(self.world.shop, self.syn_trajs, self.args.n_halluc) if self.uses_exp else None
        halluc, n_h = (hs["rate"], hs["n"]) if hs else (None, 0)
        batch = self.args.group_size * self.args.horizon * self.world_size
        if self.arm == "s2r" and self.real_cap < batch:
            tqdm.write(f"[{self.tag}] took no real step: its real cap {self.real_cap} is below one task's worst case "
                       f"(group_size x horizon x ranks = {batch}); raise --s2r_frac")
        g, s = self.curve[-1][1], self.curve[-1][2]
        syn_last = float(np.mean(self.syn_succ[-3:])) if self.syn_succ else None
        res = dict(arm=self.arm, seed=self.seed, real_success=g, real_success_sampled=s,
                   real_train_steps=self.real_steps_total(), offline_real_steps=self.world.offline_steps,
                   diag_real_steps=self.world.shop.diag_steps, iterations=self.it, halluc_success=halluc,
                   halluc_n=n_h, halluc_state=hs["state"] if hs else None, halluc_reward=hs["reward"] if hs else None,
                   halluc_first_wrong=hs["first_wrong"] if hs else None, syn_success_last=syn_last,
                   syn_real_gap=syn_last - s if syn_last is not None else None,
                   zero_var_share=float(np.mean(self.zero_var)) if self.zero_var else None, curve=self.curve,
                   real_budget=self.args.real_budget, real_step_cap=self.real_cap if self.cap_basis else None,
                   real_cap_basis=self.cap_basis, real_ref_steps=self.real_ref,
                   real_invalid=int(C.all_reduce_sum(torch.tensor(float(self.real_w.stats["invalid"])),
                                                    self.world_size).item()),
                   eval_invalid=self.eval_invalid, log_step_end=self.log_step,
                   time_split={k: round(v, 2) for k, v in sorted(self.timer.seconds.items())},
                   minutes=(self.elapsed + time.time() - self.t_start) / 60)
        if self.uses_exp:
            res.update(self.exp_err, exp_model=self.exp_path, exp_calls=self.expm.calls,
                       malformed=self.dream.stats["malformed"], invalid=self.dream.stats["invalid"],
                       real_demo_share=self.dream.stats["real_demos"] / max(1, self.dream.stats["demos"]))
        return json_clean(res)


def run_arm(arm: str, seed: int, args, world: World, exp_cache: dict, logger, bar, device, rank: int = 0,
            world_size: int = 1, out_dir: str | None = None, real_ref: int | None = None, log_step: int = 0,
            dream_ckpt: str | None = None) -> dict:
    """One arm x seed: start (resume / s2r's takeover of dreamgym / eval of the warm start), iterations
    (row logged, checkpoint every --eval_every), a checkpoint at the end of the loop (s2r's synthetic
    phase starts from dreamgym's), finish. real_ref: the real training steps real_grpo used in this seed
    when it ran in this invocation (s2r's cap, DEVIATION(7)); log_step: metrics.jsonl step before it."""
    run = ArmRun(arm, seed, args, world, exp_cache, device, rank, world_size, out_dir, real_ref, log_step)
    run.start(args.resume, dream_ckpt)
    if bar is not None:
        bar.update(max(0, run.log_step - bar.n))
    while (row := run.iterate()) is not None:
        run.log_step += 1
        logger.log(run.log_step, **row)
        if bar is not None:
            bar.update(1)
        if run.ckpt_dir and run.it % args.eval_every == 0:
            run.save()
    if run.ckpt_dir and run.saved_it != run.it:
        run.save()
    return run.finish()


# ---------------------------------------------------------------------------------------------
# ---- table and plot ----
# ---------------------------------------------------------------------------------------------


def malformed_cell(rs: list[dict]) -> str:
    """M_exp replies still unparsable after --exp_retries, over M_exp calls (summed over the runs): 'a/b (rate)',
    or '-' for arms without M_exp."""
    if not any("malformed" in r for r in rs):
        return "-"
    bad, calls = sum(r.get("malformed", 0) for r in rs), sum(r.get("exp_calls", 0) for r in rs)
    return f"{bad}/{calls} ({bad / max(1, calls):.1%})"


def results_table(results: list[dict]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in results))
    cols = [("real success (greedy)", "real_success"), ("real success (sampled)", "real_success_sampled"),
            ("new real steps", "real_train_steps"), ("real step cap", "real_step_cap"),
            ("halluc. success", "halluc_success"), ("halluc.: state / reward-caused", "halluc_split"),
            ("zero-var groups", "zero_var_share"), ("syn-real gap", "syn_real_gap"), ("M_exp malformed", "malformed"),
            ("inadmissible eval answers", "eval_invalid"), ("minutes", "minutes")]
    seeds = sorted({r["seed"] for r in results})
    caps = []  # DEVIATION(7): s2r's cap = s2r_frac x real_grpo's real steps of the seed, else x N
    for r in results:
        if r["arm"] == "s2r" and r.get("real_step_cap") is not None:
            basis = (f"real_grpo's {r['real_ref_steps']} real steps" if r.get("real_cap_basis") == "real_grpo"
                     else f"N = {r['real_budget']}")
            caps.append(f"seed {r['seed']} {r['real_step_cap']} (s2r_frac x {basis})")
    budget = next((r["real_budget"] for r in results if "real_budget" in r), None)
    lines = [f"seeds {','.join(map(str, seeds))}; mean ± std over seeds; offline real steps (all arms, M_exp SFT + "
             f"buffer + BC): {results[0]['offline_real_steps']}"
             + (f"; real_grpo budget N = {budget}" if budget is not None else "")
             + (f"; s2r real cap: {', '.join(caps)}" if caps else ""), "",
             "| arm | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for a in arms:
        rs = [r for r in results if r["arm"] == a]
        cells = []
        for _, k in cols:
            vals = [r.get(k) for r in rs]
            if k == "real_train_steps":
                cells.append(f"{np.mean(vals):.0f}")
            elif k == "real_step_cap":
                v = [x for x in vals if x is not None]
                cells.append(f"{np.mean(v):.0f}" if v else "-")
            elif k == "halluc_split":  # hallucinated successes by cause, summed over seeds (hallucination_split)
                st, rw = [r.get("halluc_state") for r in rs], [r.get("halluc_reward") for r in rs]
                cells.append("-" if any(x is None for x in st + rw) or not sum(r.get("halluc_n") or 0 for r in rs)
                             else f"{sum(st)} / {sum(rw)}")
            elif k == "malformed":  # M_exp replies unparsable after retries / M_exp calls, summed over seeds
                cells.append(malformed_cell(rs))
            elif k == "eval_invalid":
                cells.append(f"{sum(vals)}")
            else:
                cells.append(C.mean_std(vals, ddof=1))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def exp_table(results: list[dict]) -> str:
    """M_exp's own errors, one row per M_exp and measurement set (fresh real transitions, metric_sets): purchase
    accuracy on balanced purchases, false successes (failed purchases called a success) and missed successes
    with their counts, exact next state per action type. '' when no arm measured an M_exp."""
    rows, seen = [], set()
    for r in results:
        name = r.get("exp_model")
        if not name or name in seen or not r.get("m_train"):
            continue
        seen.add(name)
        arms = ",".join(dict.fromkeys(x["arm"] for x in results if x.get("exp_model") == name))
        for label, key in (("held-out, training tasks", "m_train"), ("new tasks", "m_new")):
            m = r[key]
            acc = " | ".join(f"{m['state_acc'][t]:.2f} ({m['n'][t]})" if t in m["state_acc"] else "-"
                             for t in ACTION_TYPES)
            f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731 (no purchase of that kind)
            rows.append(f"| {arms} | {label} | {f(m['buy_acc'])} ({m['n_buys']}) | {f(m['false_success'])} "
                        f"({m['false_success_n']}/{m['failed_buys']}) | {f(m['missed'])} ({m['missed_n']}/"
                        f"{m['ok_buys']}) | {acc} |")
    if not rows:
        return ""
    head = ("| M_exp of | transitions | purchase acc. (n) | false success | missed success | "
            + " | ".join(f"exact s' {t}" for t in ACTION_TYPES) + " |")
    return "\n".join([head, "|---" * (5 + len(ACTION_TYPES)) + "|"] + rows) + "\n"


def final_line(results: list[dict], wall_s: float, out_dir: str) -> str:
    """The last stdout line: each arm's real success (mean over seeds), M_exp's malformed replies / calls and
    the inadmissible answers of the final evals, so a run on a real model shows its failure rates."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    parts = []
    for a in arms:
        rs = [r for r in results if r["arm"] == a]
        bad = malformed_cell(rs)
        parts.append(f"{a} {np.mean([r['real_success'] for r in rs]):.3f}" + ("" if bad == "-" else f" (M_exp malformed {bad})"))
    inval = sum(r.get("eval_invalid", 0) for r in results)
    return (f"done in {wall_s / 60:.1f} min: real success " + ", ".join(parts)
            + f"; inadmissible eval answers {inval}  ({out_dir})")


def plot_results(results: list[dict], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for a in arms:
        rs = [r for r in results if r["arm"] == a]
        xs = sorted({x for r in rs for x, _, _ in r["curve"]})
        ys = [np.mean([g for r in rs for x2, g, _ in r["curve"] if x2 == x]) for x in xs]
        ax1.plot(xs, ys, marker="o", label=a)
    ax1.set_xlabel("policy iteration")
    ax1.set_ylabel("real success, eval tasks (greedy)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    means = [np.mean([r["real_success"] for r in results if r["arm"] == a]) for a in arms]
    finals = [[r["real_success"] for r in results if r["arm"] == a] for a in arms]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in finals]  # sample std, as the table
    ax2.bar(range(len(arms)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax2.set_xticks(range(len(arms)))
    ax2.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("final real success (mean ± std over seeds)")
    for i, a in enumerate(arms):
        rs = [r for r in results if r["arm"] == a]
        steps = np.mean([r["real_train_steps"] for r in rs])
        bad = malformed_cell(rs)  # M_exp's malformed replies / calls, shown on the bar (issue 9)
        ax2.text(i, means[i] + stds[i] + 0.01, f"{steps:.0f} real" + ("" if bad == "-" else f"\nmalf. {bad.split()[0]}"),
                 ha="center", fontsize=7)
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------

# flags that do not change any result: a resumed run may change them
RESULT_NEUTRAL_FLAGS = ("request_timeout", "exp_api_key_env", "real_step_delay")


def exp_endpoint(args) -> C.LLM:
    """The M_exp / M_task endpoint; --request_timeout bounds each request, retries included."""
    return C.LLM.from_endpoint(args.exp_api_base, args.exp_api_model, os.environ.get(args.exp_api_key_env),
                               timeout=args.request_timeout, deadline=args.request_timeout)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise C.UserError(f"'{path}' is unreadable or not JSON ({e}); delete it to rerun that arm, or start again "
                          f"with --overwrite") from None


def _result_path(out_dir: str, arm: str, seed: int) -> str:
    return os.path.join(out_dir, f"result-{arm}-s{seed}.json")


def _ckpt_dir(out_dir: str, arm: str, seed: int) -> str:
    return os.path.join(out_dir, f"ckpt-{arm}-s{seed}")


def resume_point(out_dir: str, runs: list[tuple[str, int]]) -> tuple[bool, int]:
    """(anything to resume from, the metrics.jsonl step to keep rows up to): the end of the last finished
    arm/seed run (its result file), or the checkpoint of the first unfinished one."""
    step, found = 0, False
    for arm, seed in runs:
        path = _result_path(out_dir, arm, seed)
        if os.path.isfile(path):
            step, found = int(_read_json(path).get("log_step_end", step)), True
            continue
        ck = C.checkpoint_step(_ckpt_dir(out_dir, arm, seed))
        if ck is not None:
            step, found = ck, True
        break
    return found, step


def train_exp_only(args, world: World, out_dir: str, device, rank: int, t_start: float) -> None:
    """--method train_exp: fine-tune M_exp (Eq. 2) on the offline data and save it as an HF directory."""
    variant = exp_variant("dreamgym", args)
    if args.exp_model_name_or_path:
        model, tok = C.load_lm(args.exp_model_name_or_path, device=device)
    buf = make_buffer(world, args, set(world.eval_tasks))
    ex, val = exp_sft_data(world, args, variant)
    if not args.exp_model_name_or_path:
        model, tok = toy_exp_lm(args, [p + t for p, t in ex])
        model.to(device)
    info: dict = {}
    losses = train_exp_model(model, tok, ex, args.exp_epochs, args.exp_learning_rate, args.exp_batch_size,
                             args.data_seed, device, val=val, eval_every=args.exp_eval_every,
                             patience=args.exp_patience, info=info)
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "exp_model"))
        tok.save_pretrained(os.path.join(out_dir, "exp_model"))
        expm = ExperienceModel(C.LLM(model=model, tokenizer=tok), variant["reasoning"], 0.0,
                               args.exp_max_new_tokens, task_temperature=args.task_temperature)
        err = exp_model_error(expm, buf, world.heldout, variant["top_k"], args.demo_bytes, args.n_heldout_eval)
        C.write_json(os.path.join(out_dir, "summary.json"), json_clean(dict(
            method="train_exp", final_loss=float(np.mean(losses[-10:])), examples=len(ex), sft=info,
            wall_s=time.time() - t_start, device=str(device), seed=args.data_seed, **err)))
        C.MetricLogger(out_dir).log(len(losses), **json_clean(dict(loss=float(np.mean(losses[-10:])), **err)))
        C.plot_metrics(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "dreamgym.png"),
                       title=f"dreamgym | train_exp | seed {args.data_seed}")


def main(args):
    t_start = time.time()
    C.set_cpu_threads()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the one tqdm bar readable (no weight-loading bars)
    # 1. flags; 2. preflight of everything the run uses (models, endpoint, data: the world is built here,
    # --offline_file parsed), nothing written yet; 3. the output-dir policy, args.json
    validate_args(args)
    methods, seeds = run_methods(args), run_seeds(args)
    args.output_dir = out_dir = args.output_dir or os.path.join("runs", "dreamgym",
                                                               "table" if args.table else "_".join(methods))
    C.preflight_model(args.exp_model_name_or_path)
    C.preflight_model(args.model_name_or_path)
    if args.exp_api_base:
        C.preflight_endpoint(exp_endpoint(args), route="chat", deadline=min(30.0, args.request_timeout))
    world = build_world(args)
    methods = sorted(methods, key=(ARMS + ("train_exp",)).index)
    runs = [(a, s) for s in seeds for a in methods if a != "train_exp"]
    has_ckpt, resume_step = resume_point(out_dir, runs) if args.resume else (False, 0)
    rank, world_size, device = C.ddp_setup()
    if args.device:
        device = torch.device(args.device)
    C.start_run(args, has_checkpoint=has_ckpt, ignore=RESULT_NEUTRAL_FLAGS)
    if methods == ["train_exp"]:
        train_exp_only(args, world, out_dir, device, rank, t_start)
        C.ddp_cleanup()
        return
    # bar = metrics.jsonl steps; s2r: its synthetic iterations + up to as many real ones (its cap decides)
    n_updates = sum(args.iterations * (1 + (a == "s2r")) for a, _ in runs if a != "bc")
    bar = tqdm(total=n_updates, desc="dreamgym", disable=not C.is_main(), dynamic_ncols=True)
    logger = C.MetricLogger(out_dir, pbar=bar, resume_step=resume_step if args.resume else None)
    results, exp_cache = [], {}
    real_used: dict[int, int] = {}  # seed -> real training steps real_grpo used (s2r's cap basis, DEVIATION(7))
    log_step = 0
    for arm, seed in runs:
        res_path = _result_path(out_dir, arm, seed)
        if args.resume and os.path.isfile(res_path):
            res = _read_json(res_path)
            tqdm.write(f"[{arm}-s{seed}] finished earlier: read back from {res_path}")
        else:
            # s2r takes over the dreamgym run of its seed when that ran in this invocation (DEVIATION(5))
            dream_ckpt = _ckpt_dir(out_dir, "dreamgym", seed) if arm == "s2r" and "dreamgym" in methods else None
            res = run_arm(arm, seed, args, world, exp_cache, logger, bar, device, rank, world_size, out_dir,
                          real_ref=real_used.get(seed), log_step=log_step, dream_ckpt=dream_ckpt)
            tqdm.write(f"[{arm}-s{seed}] real success {res['real_success']:.3f} (sampled "
                       f"{res['real_success_sampled']:.3f}), new real steps {res['real_train_steps']}"
                       + (f" (cap {res['real_step_cap']})" if res.get("real_step_cap") is not None else "")
                       + (f", halluc {res['halluc_success']:.3f} of {res['halluc_n']}"
                          if res.get("halluc_success") is not None else "") + f", {res['minutes']:.1f} min")
            if rank == 0:
                C.write_json(res_path, res)
        log_step = res["log_step_end"]
        if bar.n < log_step:
            bar.update(log_step - bar.n)
        if arm == "real_grpo":
            real_used[seed] = int(res["real_train_steps"])
        results.append(res)
    bar.close()
    if rank == 0:
        model_name = args.model_name_or_path or "tiny-lm"
        title = f"dreamgym | {model_name} | seed {','.join(map(str, seeds))}"
        plot_results(results, os.path.join(out_dir, "dreamgym.png"), title)
        table = results_table(results)
        et = exp_table(results)
        if et:
            table += "\nM_exp on fresh real transitions (exact next state and reward; counts in brackets):\n\n" + et
        with open(os.path.join(out_dir, "table.md"), "w") as f:
            f.write(f"`python dreamgym.py {' '.join(sys.argv[1:])}`\n\n{table}")
        print(table)
        C.write_json(os.path.join(out_dir, "summary.json"), json_clean(dict(
            results=results, table=table, wall_s=time.time() - t_start, device=str(device), seeds=seeds,
            offline_real_steps=world.offline_steps, methods=methods, real_budget=args.real_budget,
            s2r_frac=args.s2r_frac,
            s2r_real_cap={r["seed"]: r.get("real_step_cap") for r in results if r["arm"] == "s2r"})))
        if len(seeds) == 1:  # what one seed can show: its eval noise, measured from its own numbers
            p = max(r["real_success"] for r in results)
            se = math.sqrt(p * (1 - p) / max(1, args.n_eval_tasks))
            print(f"note: one seed; a greedy success of {p:.2f} on {args.n_eval_tasks} eval tasks has a binomial standard "
                  f"error of {se:.3f}, and policy seeds spread further; compare arms over seeds (--seeds 0,1,2, "
                  f"README table) before reading a difference.")
        print(final_line(results, time.time() - t_start, out_dir), flush=True)
    C.ddp_cleanup()


if __name__ == "__main__":
    with C.exit_on_user_error():
        main(parse_args())
