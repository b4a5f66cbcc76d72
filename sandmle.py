"""sandmle.py: RL for ML-engineering agents on micro-scale synthetic tasks, in a real sandbox.

Paper: "Synthetic Sandbox for Training Machine Learning Engineering Agents" (SandMLE), Y. Zhou, L. Zhang, Y. Wu,
J. Liu, X. Fan, Z. Zhao, H. Yan (Meta), arXiv 2604.04872, https://arxiv.org/abs/2604.04872. Official code (RL and
evaluation only, no generator): github.com/Tonyzhou98/SandMLE, examples/deepresearch/.

Idea. RL for ML-engineering agents stalls because every step runs a full ML pipeline. SandMLE turns a few seed
tasks into many synthetic ones with the same structure ("task DNA") and a hidden rule, but only 50-200 training rows
and a medal ladder. Executing an agent's pipeline then takes a fraction of the time, which makes trajectory-wise GRPO
with a dense milestone reward affordable. Here: a generator (Strategist -> Developer -> MLOps -> gate -> Writer), a
task contract (the agent sees description.md, train.csv, test.csv without the target, sample_submission.csv; the
answers stay in the harness's memory), a real sandbox, multi-turn episodes with feedback, three rewards, masking of
infrastructure failures, and trajectory GRPO without KL.

Equations implemented (numbering of this file):
  (1) MLE-bench rank rule, N entries -> (gold, silver, bronze) ranks >= 1: N < 100: (0.1N, 0.2N, 0.4N) floored;
      100-249: (10, 0.2N, 0.4N); 250-999: (10 + 0.002N, 50, 100); >= 1000: (10 + 0.002N, 0.05N, 0.1N)
  (2) threshold_tier = the leaderboard score at that rank (best first); median = the leaderboard median
  (3) tier(s): exclusive; gold/silver/bronze if s is at least as good as the threshold (inclusive), above_median if
      strictly better than the median, else valid
  (4) dense_code:  R = 0.1 f + 1[scored] (0.2 + m), m = 0.7 gold / 0.6 silver / 0.5 bronze / 0.1 above median / 0
  (5) dense_paper: R = 0.1 f + 0.3 1[exec] + 0.1 1[> median] + 0.2 1[>= bronze] + 0.2 1[>= silver] + 0.1 1[gold]
  (6) sparse:      R = 0.1 f + 0.9 1[gold]
      f = the share of well-formed turns; the tier is that of the LAST scored submission (the code's rule)
  (7) A_i = (R_i - mean_G R) / (std_G R + 1e-6), unbiased std over the group's LIVE episodes (masked ones -- timeouts
      in > 20% of their calls, harness failures -- are in neither), a group with < 2 live episodes -> A = 0
  (8) L = -mean_seq mean_tok min(rho A, clip(rho, 1 - 0.2, 1 + 0.28) A), rho = exp(logp - logp_old), over the generated
      tokens of all turns of a trajectory (observations masked); no KL, no entropy bonus

Toy world "MicroKaggle" (numpy, CPU). Task DNA: regression (rmse | mae) or binary (auc | accuracy), d in [6, 14]
features, z = the first 3 (before scaling and permutation), hidden rule linear z.[1, -.8, .6] | interaction 2 z0 z1 |
threshold 3 1[z0 > 0 and z1 > 0] - .75 | sine 2 sin(2.5 z0), sigma = 0.5, nuisance none | 10% missing | a scaled
duplicate column, columns named with domain words. Micro train tasks: 50-200 rows; test 1,000 rows; eval tasks: new
seeds and domains, 1,000-2,000 rows (DEVIATION(1)). The agent writes one DSL line per turn, `<impute> <scale> <feats> <model>` with
impute {none, mean}, scale {none, std}, feats {raw, poly2}, model {const, ridge1, ridge10, knn5, knn15} (40 programs),
or `submit` (turn >= 2); the line is rendered into a numpy-only main.py and run in the sandbox. Observation:
`task=reg metric=rmse n=150 d=10 miss=0 lin=2 poly=1 | last: mean std raw ridge1 -> 0.71 bronze`, lin / poly = 0-3
buckets of the hold-out R^2 of a linear / poly2 ridge on the train rows (the "check the data" step). The policy is a
tiny byte-level HF Llama (2 x 128), format-pretrained (150 steps) on random valid lines, cached by
common.toy_checkpoint("sandmle_policy"). Before training the run prints the any-medal rate of the best single fixed
program and of the per-task oracle, and stops unless the gap is >= --min_gap 0.2 (pitfall 10).

Arms (--method; same initial policy and eval tasks): base (format-pretrained, no RL); seed_sft (SFT on expert
trajectories of the --num_seed_tasks 6 full-size seed tasks, x8, 100 steps at lr 1e-3; the expert is the best program
on a validation split of the seed's train rows); sandmle (GRPO from base on micro tasks, dense_code); sft_sandmle (the
same from seed_sft); sparse (sandmle with the sparse reward); full_scale (GRPO on --full_rows 20,000-row twins of the
micro tasks for the same training wall-clock as sandmle). Evaluation (greedy, each held-out task graded once):
scaffold A = the training format; scaffold B (an MLE-Dojo stand-in) = score-only feedback, 3 turns.

Real models (--agent react): a turn is <think>...</think> plus one tool call: <code>python</code> (run in the sandbox;
the last 20 lines of output come back), {"name": "Score"} (grades the last submission.csv written) or
<answer>submission</answer> (ends). Zero or two calls are malformed (an error message back, format rate down,
counted). Prompts over --max_prompt_length drop error turns first, then keep system + task + the last 2 messages.
Both agents share the sandbox, rewards, masking and GRPO.

Deviations from the paper / spec:
  1. Toy sizes: --max_steps 30 by default (spec toy 150) and eval / seed tasks with --eval_rows 1000-2000 training
     rows (spec 1,000-5,000: the harness runs all 40 programs in-process for each leaderboard, and kNN on 5,000 rows
     made the world build take minutes on the shared 2-core CPU), so that `python sandmle.py` ends in minutes;
     --table uses the same.
  2. The sandbox's limits are set by a short launcher that exec()s `python -I main.py` (spec: subprocess preexec_fn,
     which is unsafe in the sandbox's worker threads: the forked child may inherit a held lock).
  3. --sandbox zygote (default): each worker keeps one `python -I` process that imported numpy once and forks a child
     per run with the same session, limits, temp dir, environment and group kill (spec: a fresh interpreter per run,
     --sandbox fresh, whose 0.2-0.4 s numpy import here is most of a micro run). The speed benchmark always uses
     fresh interpreters and reports times with and without start-up.
  4. When this process runs as root and the user 'nobody' can execute the interpreter, sandboxed runs drop to
     'nobody' (the spec keeps the same user); otherwise (e.g. pyenv under /root, as here) they keep the same user, see
     Limits.
  5. In the toy the Developer and MLOps roles are templates (data code, evaluator); --generator llm sends the
     Strategist and the Writer to an LLM (JSON checked, <= --generator_retries 2 retries, failures counted), as the
     spec's toy does.
  6. full_scale's step count depends on measured wall-clock time, so it is the one arm whose result is not exactly
     reproducible across runs (kill -9 + --resume included); the others are. It samples its tasks from the twins of
     the first --num_full_tasks 8 micro tasks (spec: all): each twin's leaderboard runs the 40 programs on 20,000
     rows in the harness (tens of seconds each here), built on first use, outside the wall-clock budget.

Reconstructed (not public; our choice): the leaderboard has one entry per DISTINCT valid submission among the 40
programs (programs differing only in a no-op step, e.g. imputing a table without gaps, give the same file), each score
x (1 + N(0, 0.03^2)); with all 40 kept, duplicates made bronze so lenient that one kNN program medalled on 87-93% of
tasks (gap 0.07-0.13). Feature scales log-uniform in [0.2, 5] (so scaling matters for kNN); binary labels
1[f(z) + eps > median f]; missing values as 'nan' in the CSV; the seed tasks are full-size (--eval_rows); the toy
prompt shows only the last feedback (not the script's output, which says nothing to a DSL policy); GRPO takes
--num_minibatches 2 optimizer steps per batch (so the clip acts) with logp_old recomputed by the update's own
function; AdamW without weight decay; the execution cache is per arm and seed (arms stay independent); in the ReAct
path each <code> runs in a fresh copy of the public files and the harness keeps the last valid submission.csv.

Limits: a DSL policy writes no code: the toy tests sandboxed-reward RL, reward shaping, masking, transfer and speed,
not coding or long ReAct horizons. A sandboxed run as the same user could read the harness's memory through
/proc/<pid>/mem, and a process that leaves the run's session and clears its environment escapes the kill (RLIMIT_CPU
still ends it after timeout + 1 CPU seconds); a deployment runs the sandbox as another user or in a container.

Commands:
  toy CPU (base and sandmle, seed 0):   python sandmle.py
  full table (every arm x seeds 0,1,2 + the speed benchmark; table.md, sandmle.png):   python sandmle.py --table
  real model on a GPU (ReAct):
      python sandmle.py --agent react --model_name_or_path Qwen/Qwen3-8B --method sandmle --max_turns 15 \
          --num_generations 4 --tasks_per_step 16 --learning_rate 1e-6 --max_completion_length 8192 \
          --exec_timeout 300 --max_steps 80
  several GPUs (tasks sharded by rank, whole groups on one rank, metrics all-reduced):
      torchrun --nproc_per_node 8 sandmle.py --agent react --model_name_or_path Qwen/Qwen3-8B ...
  an endpoint as the policy (evaluation only) or as the generator's Strategist and Writer:
      python sandmle.py --mode eval --agent react --backend api --api_base http://localhost:8000/v1 --api_model M
      python sandmle.py --generator llm --generator_api_base http://localhost:8000/v1 --generator_api_model M

Logged: metrics.jsonl per GRPO step (reward of live episodes, medal rate, dead-group share, masked episodes, malformed
rate, executions, cache hits, loss, clip fraction, train seconds, and time_s: where the step's time went --
generation, sandbox (waiting for runs), logp_old, forward, backward, optimizer); summary.json: per arm and seed the
eval numbers under A and B (valid, above-median, any-medal, gold / silver / bronze, position score (N - pos + 1) / N,
mean reward, malformed turns), training reward first / last, dead groups, executions, cache hits, masked episodes,
steps per minute, time split; the generator's yield per stage, the fixed-vs-oracle gap, and with --speed / --table the
execution-time medians.

Runs. Bad flags, a missing model path and an endpoint that does not answer end the run with one line and exit 2
before anything is written. A fresh run into an --output_dir that holds a run is refused unless --overwrite.
Each arm/seed writes result-<arm>-s<seed>.json when done and a checkpoint ckpt-<arm>-s<seed> every --save_every
steps (policy, AdamW, sampling generator, task RNG, the sandbox cache and counters, history); --resume reads finished
runs back and continues the unfinished one; rows logged after its checkpoint are cut from metrics.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import common as C

ARMS = ("base", "seed_sft", "sandmle", "sft_sandmle", "sparse", "full_scale")

# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run
    p.add_argument("--method", default="base,sandmle", help=f"comma-separated arms from {','.join(ARMS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each arm runs once per seed")
    p.add_argument("--seed", type=int, default=None, help="a single seed (overrides --seeds)")
    p.add_argument("--table", action="store_true", help="every arm x seeds 0,1,2 and the speed benchmark -> table.md")
    p.add_argument("--mode", default="train", choices=("train", "eval"),
                   help="train: the arms; eval: evaluate one policy (--model_name_or_path or --backend api) only")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=False,
                   help="measure sandboxed execution time, micro vs --full_rows twins (on with --table)")
    p.add_argument("--output_dir", default=None, help="default runs/sandmle/<methods>")
    p.add_argument("--resume", action="store_true", help="continue the run in --output_dir (same flags)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a previous run in --output_dir")
    p.add_argument("--device", default=None, help="cpu | cuda (default: best available)")
    # world and generator
    p.add_argument("--data_seed", type=int, default=0, help="seed of the seed tasks, the generator and the eval tasks")
    p.add_argument("--num_train_tasks", type=int, default=96, help="synthetic micro training tasks")
    p.add_argument("--num_eval_tasks", type=int, default=32, help="held-out eval tasks (new seeds and domains)")
    p.add_argument("--num_seed_tasks", type=int, default=6, help="seed tasks (Seed-SFT's expert trajectories)")
    p.add_argument("--micro_rows", default="50,200", help="training rows of a micro task, lo,hi")
    p.add_argument("--eval_rows", default="1000,2000",
                   help="training rows of eval and seed tasks, lo,hi (spec 1000,5000: DEVIATION(1))")
    p.add_argument("--full_rows", type=int, default=20000, help="training rows of full_scale's twins")
    p.add_argument("--num_full_tasks", type=int, default=8,
                   help="full_scale trains on the twins of the first N micro tasks (each twin's leaderboard runs the "
                        "40 programs on --full_rows rows in the harness: built once, shared by seeds)")
    p.add_argument("--n_test", type=int, default=1000, help="test rows of every task (>= 1000: pitfall 1)")
    p.add_argument("--min_gap", type=float, default=0.2, help="required oracle - best-fixed-program medal-rate gap")
    p.add_argument("--generator", default="template", choices=("template", "llm"),
                   help="Strategist and Writer: deterministic templates, or an LLM (JSON checked)")
    p.add_argument("--generator_api_base", default=None, help="OpenAI-compatible endpoint of the generator LLM")
    p.add_argument("--generator_api_model", default=None, help="model name at --generator_api_base")
    p.add_argument("--generator_model_name_or_path", default=None, help="local HF generator LLM instead")
    p.add_argument("--generator_retries", type=int, default=2, help="retries of a generator call whose JSON fails")
    # agent and policy
    p.add_argument("--agent", default="dsl", choices=("dsl", "react"),
                   help="dsl: the toy DSL line per turn; react: <think> + <code>/Score/<answer> (real models)")
    p.add_argument("--model_name_or_path", default=None, help="HF policy (default: the format-pretrained tiny LM)")
    p.add_argument("--backend", default="local", choices=("local", "api"),
                   help="api: an endpoint policy (only --mode eval: an endpoint cannot be RL-trained)")
    p.add_argument("--api_base", default=None, help="OpenAI-compatible endpoint of the policy (--backend api)")
    p.add_argument("--api_model", default=None, help="model name at --api_base")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="env var holding the endpoints' key")
    p.add_argument("--request_timeout", type=float, default=120.0, help="seconds per endpoint request, retries included")
    p.add_argument("--max_turns", type=int, default=None, help="turns per episode (default 2 dsl, 15 react)")
    p.add_argument("--eval_turns_b", type=int, default=3, help="turns of scaffold B (score-only feedback)")
    p.add_argument("--max_completion_length", type=int, default=None, help="tokens per turn (default 32 dsl, 8192 react)")
    p.add_argument("--max_prompt_length", type=int, default=8192, help="react: prompt tokens before truncation")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of training rollouts")
    # trajectory GRPO
    p.add_argument("--reward", default="dense_code", choices=("dense_code", "dense_paper", "sparse"),
                   help="trajectory reward, Eq. (4) / (5) / (6) (the sparse arm always uses sparse)")
    p.add_argument("--num_generations", type=int, default=4, help="G, episodes per task (group), Eq. (7)")
    p.add_argument("--tasks_per_step", type=int, default=8, help="tasks per GRPO step")
    p.add_argument("--max_steps", type=int, default=30, help="GRPO steps (spec toy 150; see Deviations)")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="AdamW learning rate of GRPO")
    p.add_argument("--clip_low", type=float, default=0.2, help="eps_low of Eq. (8): rho clipped at 1 - eps_low")
    p.add_argument("--clip_high", type=float, default=0.28, help="eps_high of Eq. (8): rho clipped at 1 + eps_high")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight: 0 (the method has no KL term)")
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over a step's episodes")
    p.add_argument("--num_minibatches", type=int, default=2, help="optimizer steps per pass")
    p.add_argument("--per_device_batch_size", type=int, default=64, help="episodes per forward (accumulation)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--gen_chunks", type=int, default=2, help="generation batches per turn (the sandbox runs the "
                                                              "previous chunk's scripts meanwhile)")
    p.add_argument("--full_scale_budget_s", type=float, default=None,
                   help="full_scale's training wall-clock (default: sandmle's, same seed, this run)")
    # seed SFT
    p.add_argument("--sft_steps", type=int, default=100, help="Seed-SFT steps")
    p.add_argument("--sft_learning_rate", type=float, default=1e-3, help="Seed-SFT learning rate")
    p.add_argument("--sft_upsample", type=int, default=8, help="Seed-SFT upsampling of the expert trajectories")
    p.add_argument("--sft_batch_size", type=int, default=16, help="Seed-SFT batch size")
    # sandbox
    p.add_argument("--exec_timeout", type=float, default=20.0, help="seconds per sandboxed run (300 for real agents)")
    p.add_argument("--mem_limit_gb", type=float, default=2.0, help="RLIMIT_AS of a sandboxed run, GiB")
    p.add_argument("--fsize_limit_mb", type=float, default=50.0, help="RLIMIT_FSIZE of a sandboxed run, MB")
    p.add_argument("--sandbox_workers", type=int, default=2, help="sandboxed runs in parallel")
    p.add_argument("--sandbox", default="zygote", choices=("zygote", "fresh"),
                   help="fresh: a new `python -I` per run (the spec); zygote: a fork of a `python -I` process that "
                        "imported numpy once (same limits, session, kill; DEVIATION(3))")
    p.add_argument("--save_every", type=int, default=10, help="checkpoint every N GRPO steps (and at the end)")
    args = p.parse_args(argv)
    if args.table:
        args.method, args.seeds, args.speed = ",".join(ARMS), "0,1,2", True
    if args.seed is not None:
        args.seeds = str(args.seed)
    if args.max_turns is None:
        args.max_turns = 15 if args.agent == "react" else 2
    if args.max_completion_length is None:
        args.max_completion_length = 8192 if args.agent == "react" else 32
    return args


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work, before anything is loaded or written."""
    req = C.require
    args.methods_list = [m.strip() for m in args.method.split(",") if m.strip()]
    req(args.methods_list, f"--method is empty; pass some of {','.join(ARMS)}")
    bad = [m for m in args.methods_list if m not in ARMS]
    req(not bad, f"unknown --method '{bad[0] if bad else ''}'; use some of {','.join(ARMS)}")
    try:
        args.seeds_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise C.UserError(f"--seeds '{args.seeds}' is not a comma-separated list of integers; e.g. 0,1,2") from None
    req(args.seeds_list and min(args.seeds_list) >= 0, f"--seeds '{args.seeds}' must list seeds >= 0")
    for name in ("num_train_tasks", "num_eval_tasks", "num_seed_tasks", "full_rows", "num_full_tasks", "max_turns", "eval_turns_b",
                 "max_completion_length", "max_prompt_length", "num_generations", "tasks_per_step", "ppo_epochs",
                 "num_minibatches", "per_device_batch_size", "gen_chunks", "sft_batch_size", "sft_upsample",
                 "sandbox_workers", "save_every"):
        req(getattr(args, name) >= 1, f"--{name} {getattr(args, name)} must be >= 1")
    for name in ("max_steps", "sft_steps", "generator_retries", "data_seed"):
        req(getattr(args, name) >= 0, f"--{name} {getattr(args, name)} must be >= 0")
    for name in ("learning_rate", "sft_learning_rate", "max_grad_norm", "request_timeout", "exec_timeout",
                 "mem_limit_gb", "fsize_limit_mb", "temperature", "clip_low", "clip_high", "beta", "min_gap"):
        v = getattr(args, name)
        req(math.isfinite(v), f"--{name} {v} must be a finite number")
    for name in ("learning_rate", "sft_learning_rate", "max_grad_norm", "request_timeout", "exec_timeout",
                 "mem_limit_gb", "fsize_limit_mb"):
        req(getattr(args, name) > 0, f"--{name} {getattr(args, name)} must be > 0")
    req(args.temperature >= 0, f"--temperature {args.temperature} must be >= 0")
    req(0 <= args.clip_low < 1, f"--clip_low {args.clip_low} must be in [0, 1)")
    req(args.clip_high >= 0, f"--clip_high {args.clip_high} must be >= 0")
    req(args.beta == 0, f"--beta {args.beta}: SandMLE's GRPO has no KL term (the paper sets beta 0); pass --beta 0")
    req(args.min_gap <= 1, f"--min_gap {args.min_gap} must be <= 1 (a difference of two rates)")
    req(args.n_test >= 1000, f"--n_test {args.n_test} must be >= 1000: a small test split makes thresholds noise")
    micro = parse_range(args.micro_rows, "micro_rows")
    parse_range(args.eval_rows, "eval_rows")
    req(micro[0] >= 10, f"--micro_rows {args.micro_rows}: at least 10 training rows (the data check splits them)")
    req(args.mem_limit_gb >= 0.5, f"--mem_limit_gb {args.mem_limit_gb}: numpy alone needs ~0.5 GiB of address space")
    req("full_scale" not in args.methods_list or args.tasks_per_step <= min(args.num_full_tasks, args.num_train_tasks),
        f"--tasks_per_step {args.tasks_per_step} exceeds --num_full_tasks {args.num_full_tasks} (full_scale's pool)")
    req(args.tasks_per_step <= args.num_train_tasks,
        f"--tasks_per_step {args.tasks_per_step} exceeds --num_train_tasks {args.num_train_tasks}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    req(args.tasks_per_step % world_size == 0,
        f"--tasks_per_step {args.tasks_per_step} must be divisible by the {world_size} ranks (groups stay on one rank)")
    req(args.num_generations >= 2 or not any(m in TRAINED for m in args.methods_list),
        "--num_generations 1 gives every group A = 0: GRPO needs >= 2 episodes per task")
    # combinations
    req(args.backend == "local" or args.mode == "eval",
        "--backend api is for --mode eval (an endpoint cannot be RL-trained); pass --mode eval or --backend local")
    req(args.backend == "local" or (args.api_base and args.api_model), "--backend api needs --api_base and --api_model")
    req(args.agent == "dsl" or args.model_name_or_path or args.backend == "api",
        "--agent react needs a real model (--model_name_or_path or --backend api): the toy policy writes DSL lines")
    req(args.generator == "template" or bool(args.generator_api_base) != bool(args.generator_model_name_or_path),
        "--generator llm needs exactly one of --generator_api_base (+ --generator_api_model) or "
        "--generator_model_name_or_path")
    req(not args.generator_api_base or args.generator_api_model,
        "--generator_api_base needs --generator_api_model (the model name it serves)")
    req("full_scale" not in args.methods_list or args.full_scale_budget_s or "sandmle" in args.methods_list,
        "full_scale trains for sandmle's wall-clock: run it with sandmle (before it in --method order) or pass "
        "--full_scale_budget_s")
    if "full_scale" in args.methods_list and "sandmle" in args.methods_list and not args.full_scale_budget_s:
        req(args.methods_list.index("sandmle") < args.methods_list.index("full_scale"),
            "--method must list sandmle before full_scale (full_scale's budget is sandmle's wall-clock)")
    req(args.full_scale_budget_s is None or args.full_scale_budget_s > 0,
        f"--full_scale_budget_s {args.full_scale_budget_s} must be > 0")
    req(args.mode == "train" or args.seeds_list == args.seeds_list[:1], "--mode eval takes one seed")


# ---------------------------------------------------------------------------------------------
# ---- method math ----
# ---------------------------------------------------------------------------------------------

TIERS = ("gold", "silver", "bronze", "above_median", "valid")  # exclusive, best first
MEDAL_BONUS = {"gold": 0.7, "silver": 0.6, "bronze": 0.5, "above_median": 0.1, "valid": 0.0}


def medal_ranks(n: int) -> tuple[int, int, int]:
    """Eq. (1): MLE-bench rank rule -> (gold, silver, bronze) ranks (>= 1) for a leaderboard of n entries."""
    if n < 100:
        g, s, b = n // 10, n // 5, (4 * n) // 10
    elif n < 250:
        g, s, b = 10, n // 5, (4 * n) // 10
    elif n < 1000:
        g, s, b = 10 + (2 * n) // 1000, 50, 100
    else:
        g, s, b = 10 + (2 * n) // 1000, n // 20, n // 10
    return max(1, g), max(1, s), max(1, b)


def thresholds_from_leaderboard(scores, lower_is_better: bool) -> dict:
    """Eq. (2): the score at each medal rank of the leaderboard sorted best first; median = leaderboard median."""
    s = np.sort(np.asarray(scores, dtype=float))
    if not lower_is_better:
        s = s[::-1]
    g, sv, b = medal_ranks(len(s))
    return {"gold": float(s[g - 1]), "silver": float(s[sv - 1]), "bronze": float(s[b - 1]),
            "median": float(np.median(s))}


def medal_tier(score: float | None, thresholds: dict, lower_is_better: bool) -> str | None:
    """Eq. (3): exclusive tier of a score; medal tests inclusive (a score equal to gold is gold), above-median
    strict. None (no valid submission) -> None."""
    if score is None:
        return None

    def at_least(t):  # as good as t, in the metric's direction
        return score <= t if lower_is_better else score >= t

    for tier in ("gold", "silver", "bronze"):
        if at_least(thresholds[tier]):
            return tier
    beats_median = score < thresholds["median"] if lower_is_better else score > thresholds["median"]
    return "above_median" if beats_median else "valid"


def trajectory_reward(kind: str, tiers, format_rate: float) -> float:
    """Eq. (4)-(6): the trajectory reward from the tiers of its scored submissions, in order (the LAST one
    counts, as the official code; None entries are not scored), and the share of well-formed turns.
      dense_code  (4) 0.1 f + 1[scored] (0.2 + m), m = 0.7 gold / 0.6 silver / 0.5 bronze / 0.1 > median / 0
      dense_paper (5) 0.1 f + 0.3 1[exec] + 0.1 1[> median] + 0.2 1[>= bronze] + 0.2 1[>= silver] + 0.1 1[gold]
      sparse      (6) 0.1 f + 0.9 1[gold]"""
    scored = [t for t in tiers if t is not None]
    last = scored[-1] if scored else None
    r = 0.1 * float(format_rate)
    if kind == "dense_code":
        return r + (0.2 + MEDAL_BONUS[last] if last is not None else 0.0)
    if kind == "dense_paper":
        if last is None:
            return r
        rank = TIERS.index(last)  # 0 gold ... 4 valid
        return r + 0.3 + 0.1 * (rank <= 3) + 0.2 * (rank <= 2) + 0.2 * (rank <= 1) + 0.1 * (rank == 0)
    if kind == "sparse":
        return r + 0.9 * (last == "gold")
    raise ValueError(f"unknown reward kind {kind}")


def grpo_advantages(rewards, group_size: int, live=None) -> torch.Tensor:
    """Eq. (7): (N,) trajectory rewards in groups of `group_size` consecutive episodes -> (N,) advantages
    A_i = (R_i - mean_G) / (std_G + 1e-6), std unbiased, over the LIVE episodes of the group only; masked
    episodes (timeouts, harness failures) get A = 0 and enter neither mean nor std; a group with < 2 live -> 0."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1, group_size)  # (N/G, G)
    m = (torch.ones_like(r) if live is None else torch.as_tensor(live, dtype=torch.float64).reshape(r.shape))
    n = m.sum(1, keepdim=True)  # (N/G, 1) live episodes per group
    mean = (r * m).sum(1, keepdim=True) / n.clamp(min=1)
    var = (((r - mean) * m) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    adv = (r - mean) / (var.sqrt() + 1e-6) * m
    adv = torch.where(n >= 2, adv, torch.zeros_like(adv))
    return adv.reshape(-1).float()


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 0.2, clip_high: float = 0.28, normalizer: float | None = None):
    """Eq. (8): L = -mean_seq mean_tok min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - logp_old),
    no KL, no entropy bonus. logp, logp_old, mask: (B, T) over the generated tokens of all turns of B trajectories
    (observations masked); adv: (B,). normalizer: the number of sequences the mean runs over (default B; the global
    live count for DDP). Returns (loss, clip fraction)."""
    mask = mask.float()
    rho = torch.exp(logp - logp_old)  # (B, T)
    a = adv[:, None]
    surr = torch.minimum(rho * a, torch.clamp(rho, 1 - clip_low, 1 + clip_high) * a)  # (B, T)
    per_seq = -(surr * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B,) token mean per trajectory
    n = float(normalizer) if normalizer is not None else max(1, logp.shape[0])
    loss = per_seq.sum() / n
    with torch.no_grad():
        clipped = ((rho < 1 - clip_low) & (a < 0)) | ((rho > 1 + clip_high) & (a > 0))
        clip_frac = (clipped.float() * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, float(clip_frac)


def position_score(score: float | None, leaderboard, lower_is_better: bool) -> float:
    """(N - pos + 1) / N, pos = 1 + the leaderboard entries strictly better than the score; no submission -> 0."""
    if score is None:
        return 0.0
    lb = np.asarray(leaderboard, dtype=float)
    better = int((lb < score).sum() if lower_is_better else (lb > score).sum())
    n = len(lb)
    return (n - (better + 1) + 1) / n


# ---------------------------------------------------------------------------------------------
# ---- world: MicroKaggle tasks, DSL programs, thresholds ----
# ---------------------------------------------------------------------------------------------

TASK_TYPES = {"reg": ("rmse", "mae"), "bin": ("auc", "accuracy")}
LOWER_IS_BETTER = {"rmse": True, "mae": True, "auc": False, "accuracy": False}
RULES = ("linear", "interaction", "threshold", "sine")
NUISANCES = ("none", "missing", "duplicate")
DOMAINS = {  # domain -> column words (the names carry no information about the rule)
    "retail": ["basket", "visits", "discount", "tenure", "region_idx", "promo", "returns", "footfall", "rating",
               "stock", "price_idx", "weekday", "loyalty", "reviews", "clicks"],
    "clinic": ["age_z", "bmi", "glucose", "pressure", "heart_rate", "chol", "steps", "sleep", "dose", "visits",
               "lab_a", "lab_b", "lab_c", "score_q", "weight_d"],
    "energy": ["temp", "humidity", "wind", "load", "solar", "hour_idx", "price", "demand_lag", "pressure", "cloud",
               "rain", "grid_a", "grid_b", "tariff", "usage"],
    "logistics": ["distance", "weight", "volume", "stops", "traffic", "fuel", "driver_exp", "hub_load", "delay_lag",
                  "route_len", "priority", "pallets", "temp_zone", "tolls", "idle"],
    "finance": ["income", "debt", "util", "inquiries", "tenure", "balance", "limit", "late_30", "late_60",
                "accounts", "age_file", "volatility", "spread", "momentum", "liquidity"],
    "agri": ["rainfall", "soil_ph", "nitrogen", "sun_hours", "seed_rate", "slope", "elevation", "irrigation",
             "pest_idx", "temp_max", "temp_min", "humus", "clay", "wind_exp", "yield_lag"],
    "telecom": ["calls", "minutes", "data_gb", "dropped", "tenure", "plan_idx", "complaints", "roaming", "sms",
                "latency", "jitter", "devices", "bill", "discount", "night_use"],
    "housing": ["area", "rooms", "age_b", "floor", "dist_center", "noise", "green", "school_idx", "crime_idx",
                "transit", "parking", "view", "renov", "tax", "heating"],
}
SEED_DOMAINS = ("retail", "clinic", "energy", "logistics", "finance", "agri")  # seeds and micro tasks
EVAL_DOMAINS = ("telecom", "housing")  # held-out domains (new seeds too)
IMPUTE, SCALE, FEATS, MODELS = ("none", "mean"), ("none", "std"), ("raw", "poly2"), ("const", "ridge1", "ridge10",
                                                                                    "knn5", "knn15")
PROGRAMS = tuple(f"{i} {s} {f} {m}" for i in IMPUTE for s in SCALE for f in FEATS for m in MODELS)  # 40 DSL lines
NOISE = 0.5  # sigma of y = f(z) + eps


def rule_value(rule: str, z: np.ndarray) -> np.ndarray:
    """Hidden rule f(z), z = x[:, :3] (N, 3) -> (N,)."""
    if rule == "linear":
        return z @ np.array([1.0, -0.8, 0.6])
    if rule == "interaction":
        return 2.0 * z[:, 0] * z[:, 1]
    if rule == "threshold":
        return 3.0 * ((z[:, 0] > 0) & (z[:, 1] > 0)) - 0.75
    if rule == "sine":
        return 2.0 * np.sin(2.5 * z[:, 0])
    raise ValueError(f"unknown rule {rule}")


@dataclasses.dataclass
class DNA:
    """The Strategist's task DNA: what the Developer builds and the MLOps evaluator grades."""
    task_type: str
    metric: str
    n_train: int
    n_features: int
    rule_family: str
    nuisance: str
    domain: str
    noise: float = NOISE

    @property
    def lower_is_better(self) -> bool:
        return LOWER_IS_BETTER[self.metric]


def make_data(dna: DNA, seed: int, n_test: int = 1000):
    """Developer: seeded data of a DNA -> (X (n, d'), y (n,), Xt (n_test, d'), yt (n_test,), column names).
    Features are N(0, 1) times a per-column scale (log-uniform in [0.2, 5], so kNN needs scaling); the rule reads
    the first 3 standardised columns before scaling; columns are then permuted; 'missing' blanks 10% of the
    entries (NaN), 'duplicate' appends 3 x a rule column."""
    rng = np.random.default_rng(seed)
    n, d = dna.n_train + n_test, dna.n_features
    z = rng.standard_normal((n, d))
    f = rule_value(dna.rule_family, z[:, :3])
    y = f + dna.noise * rng.standard_normal(n)
    if dna.task_type == "bin":
        y = (y > np.median(f)).astype(float)
    x = z * np.exp(rng.uniform(np.log(0.2), np.log(5.0), d))
    if dna.nuisance == "duplicate":
        x = np.concatenate([x, 3.0 * x[:, :1]], 1)
    x = x[:, rng.permutation(x.shape[1])]
    if dna.nuisance == "missing":
        x[rng.random(x.shape) < 0.1] = np.nan
    words = DOMAINS[dna.domain]
    cols = [words[j % len(words)] + ("" if j < len(words) else f"_{j // len(words)}") for j in range(x.shape[1])]
    return x[:dna.n_train], y[:dna.n_train], x[dna.n_train:], y[dna.n_train:], cols


# The DSL's pipeline pieces, as numpy source. The sandboxed main.py is rendered from them (render_script), and the
# harness runs the same source in-process for the leaderboard (run_program), so the two cannot drift apart.
PIECES = {
    "impute": {"none": "",
               "mean": "mu = np.nanmean(X, 0)\nX = np.where(np.isnan(X), mu, X)\nXt = np.where(np.isnan(Xt), mu, Xt)\n"},
    "scale": {"none": "",
              "std": "m, s = X.mean(0), X.std(0) + 1e-8\nX = (X - m) / s\nXt = (Xt - m) / s\n"},
    "feats": {"raw": "",
              "poly2": "iu = np.triu_indices(X.shape[1])\n"
                       "X = np.hstack([X, (X[:, :, None] * X[:, None, :])[:, iu[0], iu[1]]])\n"
                       "Xt = np.hstack([Xt, (Xt[:, :, None] * Xt[:, None, :])[:, iu[0], iu[1]]])\n"},
    "model": {"const": "pred = np.full(len(Xt), y.mean())\n",
              **{f"ridge{lam}": f"mx, my = X.mean(0), y.mean()\nA = X - mx\n"
                                f"w = np.linalg.solve(A.T @ A + {lam}.0 * np.eye(A.shape[1]), A.T @ (y - my))\n"
                                f"pred = (Xt - mx) @ w + my\n" for lam in (1, 10)},
              **{f"knn{k}": f"k = min({k}, len(X))\n"
                            f"A, B = Xt.astype(np.float32), X.astype(np.float32)\n"
                            f"D = (A ** 2).sum(1)[:, None] + (B ** 2).sum(1)[None, :] - 2.0 * A @ B.T\n"
                            f"nn = np.argpartition(D, k - 1, axis=1)[:, :k]\npred = y[nn].mean(1)\n"
                 for k in (5, 15)}},
}
SCRIPT_HEAD = """# main.py rendered from the DSL line: {line}
import time
import numpy as np
t0 = time.perf_counter()
tr = np.loadtxt("train.csv", delimiter=",", skiprows=1, ndmin=2)
te = np.loadtxt("test.csv", delimiter=",", skiprows=1, ndmin=2)
X, y, ids, Xt = tr[:, 1:-1], tr[:, -1], te[:, 0], te[:, 1:]
"""
SCRIPT_TAIL = """with open("submission.csv", "w") as f:
    f.write("id,target\\n" + "".join(f"{{int(i)}},{{p:.6g}}\\n" for i, p in zip(ids, pred)))
print(f"rows={{len(X)}} fit_s={{time.perf_counter() - t0:.4f}}")
"""


def parse_line(text: str) -> tuple[str, ...] | None:
    """A DSL line `<impute> <scale> <feats> <model>` or `submit` -> its tokens; anything else -> None."""
    toks = text.strip().split()
    if toks == ["submit"]:
        return ("submit",)
    if len(toks) == 4 and toks[0] in IMPUTE and toks[1] in SCALE and toks[2] in FEATS and toks[3] in MODELS:
        return tuple(toks)
    return None


def program_body(prog: tuple[str, ...]) -> str:
    return "".join(PIECES[k][v] for k, v in zip(("impute", "scale", "feats", "model"), prog))


def render_script(prog: tuple[str, ...]) -> str:
    """The numpy-only main.py of a DSL program (what the sandbox runs)."""
    return SCRIPT_HEAD.format(line=" ".join(prog)) + program_body(prog) + SCRIPT_TAIL.format()


def run_program(prog: tuple[str, ...], X: np.ndarray, y: np.ndarray, Xt: np.ndarray) -> np.ndarray:
    """The same pipeline in-process (harness only: leaderboards, the expert, the gap check)."""
    ns = {"np": np, "X": X.copy(), "y": y, "Xt": Xt.copy()}
    with np.errstate(all="ignore"):
        exec(program_body(prog), ns)  # noqa: S102 -- our own template source, never agent text
    return ns["pred"]


def metric_score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The grader's metric: rmse / mae (lower is better), auc (Mann-Whitney, ties halved) / accuracy at 0.5."""
    if metric == "rmse":
        return float(np.sqrt(np.mean((pred - y) ** 2)))
    if metric == "mae":
        return float(np.mean(np.abs(pred - y)))
    if metric == "accuracy":
        return float(np.mean((pred > 0.5) == (y > 0.5)))
    if metric == "auc":
        pos, neg = pred[y > 0.5], pred[y <= 0.5]
        if len(pos) == 0 or len(neg) == 0:
            return 0.5
        order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
        allv = np.concatenate([pos, neg])[order]
        ranks = np.empty(len(allv))
        # average ranks over ties
        _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
        cum = np.cumsum(counts)
        avg = cum - (counts - 1) / 2.0
        ranks[order] = avg[inv]
        return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
    raise ValueError(metric)


def r2_bucket(r2: float) -> int:
    """0-3 bucket of a hold-out R^2 (the observation's lin / poly fields)."""
    return int(np.digitize(r2, [0.25, 0.5, 0.75]))


def data_check(X: np.ndarray, y: np.ndarray) -> dict:
    """The agent's 'check the data' step, from the public train rows only: hold-out R^2 (last 30% of rows) of a
    linear ridge and of a poly2 ridge, as 0-3 buckets."""
    cut = max(2, int(0.7 * len(X)))
    out = {}
    for name, prog in (("lin", ("mean", "std", "raw", "ridge1")), ("poly", ("mean", "std", "poly2", "ridge10"))):
        pred = run_program(prog, X[:cut], y[:cut], X[cut:])
        resid = float(np.mean((y[cut:] - pred) ** 2)) if np.all(np.isfinite(pred)) else float("inf")
        var = float(np.var(y[cut:])) + 1e-12
        out[name] = r2_bucket(1.0 - resid / var)
    return out


@dataclasses.dataclass
class Task:
    """One task. `public` is all the agent (and the sandbox) ever sees; answers, leaderboard and thresholds live
    only in the harness's memory (pitfall 2: never written to disk)."""
    task_id: str
    dna: DNA
    public: dict  # file name -> bytes: description.md, train.csv, test.csv, sample_submission.csv
    obs: str  # the toy observation's task part (public: from the DNA's visible fields and the train rows)
    test_ids: np.ndarray
    answers: np.ndarray
    leaderboard: np.ndarray
    thresholds: dict  # gold, silver, bronze, median
    program_scores: dict  # DSL line -> test score (None: invalid submission)
    seed: int = 0

    @property
    def lower_is_better(self) -> bool:
        return self.dna.lower_is_better


def csv_bytes(ids: np.ndarray, X: np.ndarray, cols: list[str], y: np.ndarray | None = None) -> bytes:
    head = "id," + ",".join(cols) + (",target" if y is not None else "")
    buf = io.StringIO()
    M = np.column_stack([ids, X] + ([y] if y is not None else []))
    np.savetxt(buf, M, delimiter=",", header=head, comments="", fmt=["%d"] + ["%.6g"] * (M.shape[1] - 1))
    return buf.getvalue().encode()


# ---- the generator: Strategist -> Developer -> MLOps -> Writer, then the gate ----

LEAK_WORDS = tuple(RULES) + ("sin(", "sine", "2.5", "0.75", "-0.8", "interaction", "threshold", "hidden rule", "noise")


def seed_dnas(n: int, data_seed: int, rows: tuple[int, int]) -> list[DNA]:
    """The few seed tasks (full-size, the 'MLE-bench' tasks the generator starts from): one per seed domain."""
    rng = random.Random(f"seeds-{data_seed}")
    out = []
    for i in range(n):
        tt = ("reg", "bin")[i % 2]
        out.append(DNA(tt, rng.choice(TASK_TYPES[tt]), rng.randint(*rows), rng.randint(6, 14), rng.choice(RULES),
                       rng.choice(NUISANCES), SEED_DOMAINS[i % len(SEED_DOMAINS)]))
    return out


def strategist_template(seed: DNA, rng: random.Random, rows: tuple[int, int], domains) -> DNA:
    """Reference Strategist (deterministic template): the seed's task DNA (type, metric) with a new hidden rule,
    width, nuisance, size and domain."""
    return DNA(seed.task_type, seed.metric, rng.randint(*rows), rng.randint(6, 14), rng.choice(RULES),
               rng.choice(NUISANCES), rng.choice(domains))


def strategist_prompt(seed: DNA, rows: tuple[int, int]) -> str:
    return (f"You design synthetic tabular ML tasks. Seed task: {json.dumps(dataclasses.asdict(seed))}.\n"
            f"Propose ONE new task with the same task_type and metric. Reply with one JSON object with keys "
            f"task_type, metric, n_train ({rows[0]}-{rows[1]}), n_features (6-14), rule_family (one of "
            f"{', '.join(RULES)}), nuisance (one of {', '.join(NUISANCES)}), domain (one of {', '.join(DOMAINS)}).")


def parse_strategist(text: str, seed: DNA, rows: tuple[int, int]) -> DNA:
    """The Strategist's JSON, checked field by field (ValueError names the first bad one)."""
    obj = C.first_json_object(text)
    try:
        dna = DNA(str(obj["task_type"]), str(obj["metric"]), int(obj["n_train"]), int(obj["n_features"]),
                  str(obj["rule_family"]), str(obj["nuisance"]), str(obj["domain"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"missing or bad field ({e})") from None
    checks = [(dna.task_type == seed.task_type and dna.metric == seed.metric, "task DNA changed"),
              (rows[0] <= dna.n_train <= rows[1], "n_train"), (6 <= dna.n_features <= 14, "n_features"),
              (dna.rule_family in RULES, "rule_family"), (dna.nuisance in NUISANCES, "nuisance"),
              (dna.domain in DOMAINS, "domain")]
    bad = [name for ok, name in checks if not ok]
    if bad:
        raise ValueError(f"bad field: {bad[0]}")
    return dna


def writer_template(dna: DNA, cols: list[str], n_test: int) -> str:
    """Reference Writer: description.md from the visible DNA only (never the rule, the noise or the nuisance)."""
    direction = "lower is better" if dna.lower_is_better else "higher is better"
    what = "a numeric target" if dna.task_type == "reg" else "a binary target (0/1; submit a score or probability)"
    return (f"# {dna.domain.title()} prediction\n\nPredict {what} for each row of test.csv ({n_test} rows) from "
            f"{len(cols)} feature columns: {', '.join(cols)}. train.csv has {dna.n_train} rows with the target.\n\n"
            f"Metric: {dna.metric} ({direction}). Write submission.csv with the columns id,target, one row per test id "
            f"(see sample_submission.csv).\n")


def writer_prompt(dna: DNA, cols: list[str], n_test: int) -> str:
    visible = {"task_type": dna.task_type, "metric": dna.metric, "n_train": dna.n_train, "n_test": n_test,
               "columns": cols, "domain": dna.domain}
    return (f"Write the description.md of a Kaggle-style tabular task: {json.dumps(visible)}. Name the metric, its "
            f"direction and the submission format (id,target). Reply with one JSON object {{\"description\": \"...\"}}.")


def parse_writer(text: str, dna: DNA) -> str:
    desc = C.first_json_object(text).get("description")
    if not isinstance(desc, str) or len(desc.strip()) < 20:
        raise ValueError("no description")
    low = desc.lower()
    leak = [w for w in LEAK_WORDS if w in low]
    if leak:
        raise ValueError(f"description leaks '{leak[0]}'")
    if dna.metric not in low:
        raise ValueError("description does not name the metric")
    return desc


def ask_llm(llm, prompt: str, parse, retries: int, counts: dict, role: str):
    """One LLM role call: JSON checked by `parse`, <= `retries` retries; failures counted (None returned)."""
    for _ in range(retries + 1):
        counts[f"{role}_calls"] = counts.get(f"{role}_calls", 0) + 1
        text = llm.chat([[{"role": "user", "content": prompt}]], n=1, temperature=0.7, max_tokens=400)[0][0]
        try:
            return parse(text)
        except ValueError:
            counts[f"{role}_bad"] = counts.get(f"{role}_bad", 0) + 1
    counts[f"{role}_failed"] = counts.get(f"{role}_failed", 0) + 1
    return None


def leaderboard_of(program_scores: dict, lower_is_better: bool, rng: np.random.Generator) -> np.ndarray:
    """Leaderboard (reconstructed): one entry per DISTINCT valid submission among the 40 DSL programs (programs that
    differ only in a no-op step give the same file), each score x (1 + N(0, 0.03^2))."""
    distinct = sorted({round(v, 9) for v in program_scores.values() if v is not None})
    base = np.array(distinct, dtype=float)
    return base * (1.0 + 0.03 * rng.standard_normal(len(base)))


def gate(th: dict, lower_is_better: bool, const_score: float) -> str | None:
    """Monotone-ladder gate: median < bronze < silver < gold strictly in the better direction, and the median
    beats the constant sample submission. Returns the reason of a rejection, or None."""
    seq = [th["median"], th["bronze"], th["silver"], th["gold"]]
    sign = -1.0 if lower_is_better else 1.0
    if not all(sign * (b - a) > 0 for a, b in zip(seq, seq[1:])):
        return "ladder not strictly monotone"
    if not sign * (th["median"] - const_score) > 0:
        return "median does not beat the sample submission"
    return None


def build_task(task_id: str, dna: DNA, seed: int, n_test: int, description: str | None = None,
               check_gate: bool = True) -> tuple[Task | None, str, dict]:
    """Developer + MLOps (+ the template Writer unless `description` is given): data, leaderboard, thresholds,
    the gate. Returns (task or None, the stage that failed or 'ok', timings)."""
    t0 = time.perf_counter()
    X, y, Xt, yt, cols = make_data(dna, seed, n_test)
    if not (np.isfinite(y).all() and len(np.unique(y)) > 1):
        return None, "developer", {}
    scores = {}
    gaps = bool(np.isnan(X).any() or np.isnan(Xt).any())
    for line in sorted(PROGRAMS, key=lambda ln: ln.split()[0] != "mean"):  # mean-impute programs first
        if line.startswith("none ") and not gaps:  # imputing a table without gaps is a no-op: the same file
            scores[line] = scores["mean" + line[4:]]
            continue
        pred = run_program(tuple(line.split()), X, y, Xt)
        scores[line] = metric_score(dna.metric, yt, pred) if np.all(np.isfinite(pred)) else None
    scores = {line: scores[line] for line in PROGRAMS}
    t_lb = time.perf_counter() - t0
    lb = leaderboard_of(scores, dna.lower_is_better, np.random.default_rng(seed + 7919))
    if len(lb) < 3:
        return None, "mlops", {}
    th = thresholds_from_leaderboard(lb, dna.lower_is_better)  # Eq. (1)-(2)
    const = metric_score(dna.metric, yt, np.full(len(yt), y.mean()))  # the sample submission's score
    reason = gate(th, dna.lower_is_better, const) if check_gate else None
    if reason is not None:
        return None, "gate", {"reason": reason}
    ids = np.arange(len(yt)) + 10_000
    public = {"description.md": (description or writer_template(dna, cols, n_test)).encode(),
              "train.csv": csv_bytes(np.arange(len(y)), X, cols, y), "test.csv": csv_bytes(ids, Xt, cols)}
    public["sample_submission.csv"] = ("id,target\n" + "".join(f"{i},{y.mean():.4g}\n" for i in ids)).encode()
    chk = data_check(X, y)
    obs = (f"task={dna.task_type} metric={dna.metric} n={dna.n_train} d={X.shape[1]} "
           f"miss={int(np.isnan(X).any())} lin={chk['lin']} poly={chk['poly']}")
    task = Task(task_id, dna, public, obs, ids, yt, lb, th, scores, seed)
    return task, "ok", {"leaderboard_s": t_lb}


@dataclasses.dataclass
class TaskSet:
    tasks: list
    yield_counts: dict  # stage -> tasks that passed it
    llm_counts: dict


def generate_tasks(split: str, n: int, data_seed: int, rows: tuple[int, int], domains, seeds: list[DNA],
                   n_test: int = 1000, llm=None, retries: int = 2, max_tries: int | None = None) -> TaskSet:
    """The generator: seed -> Strategist -> Developer -> MLOps -> gate -> Writer, until n tasks pass (at most
    `max_tries` proposals). The yield per stage is counted. `llm` (an LLM or None = the templates) plays the
    Strategist and the Writer."""
    counts = {"proposed": 0, "strategist": 0, "developer": 0, "mlops": 0, "gate": 0, "writer": 0}
    llm_counts: dict = {}
    tasks = []
    max_tries = max_tries or 6 * n + 10
    for k in range(max_tries):
        if len(tasks) >= n:
            break
        rng = random.Random(f"{split}-{data_seed}-{k}")
        seed_dna = seeds[k % len(seeds)]
        counts["proposed"] += 1
        if llm is None:
            dna = strategist_template(seed_dna, rng, rows, domains)
        else:
            dna = ask_llm(llm, strategist_prompt(seed_dna, rows), lambda t: parse_strategist(t, seed_dna, rows),
                          retries, llm_counts, "strategist")
            if dna is None:
                continue
        counts["strategist"] += 1
        task, stage, _ = build_task(f"{split}-{k}", dna, zlib_seed(f"{split}-{data_seed}-{k}"), n_test)
        passed = {"developer": 0, "mlops": 1, "gate": 2, "ok": 3}[stage]
        for st in ("developer", "mlops", "gate")[:passed]:
            counts[st] += 1
        if task is None:
            continue
        if llm is not None:  # the Writer rewrites description.md; the template one is the fallback-free default
            cols = task.public["test.csv"].split(b"\n", 1)[0].decode().split(",")[1:]
            desc = ask_llm(llm, writer_prompt(dna, cols, n_test), lambda t: parse_writer(t, dna), retries,
                           llm_counts, "writer")
            if desc is None:
                continue
            task.public["description.md"] = desc.encode()
        counts["writer"] += 1
        tasks.append(task)
    return TaskSet(tasks, counts, llm_counts)


def zlib_seed(s: str) -> int:
    return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16)


def full_twin(task: Task, rows: int, n_test: int = 1000) -> Task:
    """The full-size twin of a micro task: the same DNA and seed with `rows` training rows (full_scale arm, the
    speed measurement). Its leaderboard is computed here in the harness (not the gate: it is the micro task's
    twin, not a new task)."""
    twin, stage, _ = build_task(task.task_id + f"-full{rows}", dataclasses.replace(task.dna, n_train=rows),
                                task.seed, n_test, check_gate=False)
    if twin is None:
        raise RuntimeError(f"the {rows}-row twin of {task.task_id} failed its {stage} stage")
    return twin


# ---------------------------------------------------------------------------------------------
# ---- sandbox: a fresh temp dir, python -I, a new session, rlimits, a killed process group ----
# ---------------------------------------------------------------------------------------------

# Sets the limits, drops root, then exec()s the agent's script in the same (new-session) process. DEVIATION(2):
# a launcher instead of preexec_fn, which is unsafe with the sandbox's worker threads (a fork may copy a held lock).
LAUNCHER = """import os, resource, sys
cpu, mem, fsize, nproc, uid = (int(a) for a in sys.argv[1:6])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.execv(sys.executable, [sys.executable, "-I", "main.py"])
"""
NOBODY = 65534


def can_drop_root() -> bool:
    """Whether the sandbox can run as 'nobody': we are root and nobody can execute this interpreter (an
    interpreter under /root, e.g. pyenv, is not reachable: then the sandbox runs as the same user, see Limits)."""
    if os.geteuid() != 0:
        return False
    probe = LAUNCHER.replace('[sys.executable, "-I", "main.py"]', '[sys.executable, "-I", "-c", "pass"]')
    try:
        r = subprocess.run([sys.executable, "-I", "-c", probe, "5", str(2**31), str(2**20), "64", str(NOBODY)],
                           cwd="/", env={"PATH": os.environ.get("PATH", "")}, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@dataclasses.dataclass
class ExecResult:
    """One sandboxed run, graded by the harness. status: ok (a valid submission, scored) | invalid (no / bad
    submission: rows, ids, NaN) | error (the script failed: exit status != 0) | timeout | harness_error.
    Only timeout and harness_error mask an episode (they are not the agent's fault)."""
    status: str
    score: float | None = None
    tier: str | None = None
    tail: str = ""
    wall_s: float = 0.0
    fit_s: float | None = None  # the script's own time after its imports (start-up excluded)
    oom: bool = False
    fsize: bool = False
    survivors: int = 0  # processes still alive after the script ended (killed by the harness)
    escaped: int = 0  # processes still alive after the kill (must be 0)
    cached: bool = False


def _session_pids(sid: int, marker: str) -> list[int]:
    """Processes of the run: its session, or carrying its environment marker (a child that left the session)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
            if stat[0] == b"Z":
                continue
            if int(stat[3]) == sid:
                out.append(int(name))
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _kill_run(pid: int, marker: str) -> tuple[int, int]:
    """Kill the run's process group and every process carrying its marker; (killed, still alive after)."""
    killed = 0
    for _ in range(20):
        pids = [p for p in _session_pids(pid, marker) if p != os.getpid()]
        if not pids:
            return killed, 0
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        killed = max(killed, len(pids))
        time.sleep(0.02)
    return killed, len(_session_pids(pid, marker))


def check_submission(data: bytes | None, ids: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Parse submission.csv (id,target): exactly the test ids, once each, finite targets -> (pred in test-id
    order, 'ok') or (None, why)."""
    if data is None:
        return None, "no submission.csv"
    try:
        lines = data.decode("utf-8").strip().splitlines()
    except UnicodeDecodeError:
        return None, "submission.csv is not UTF-8"
    if not lines or lines[0].replace(" ", "").lower() != "id,target":
        return None, "header must be id,target"
    got = {}
    for ln in lines[1:]:
        parts = ln.split(",")
        if len(parts) != 2:
            return None, "rows must have 2 fields"
        try:
            i, v = int(float(parts[0])), float(parts[1])
        except ValueError:
            return None, "non-numeric value"
        if not math.isfinite(v):
            return None, "NaN or inf in target"
        if i in got:
            return None, "duplicate id"
        got[i] = v
    if len(got) != len(ids) or set(got) != set(int(i) for i in ids):
        return None, f"{len(got)} rows / ids do not match the {len(ids)} test ids"
    return np.array([got[int(i)] for i in ids]), "ok"


def grade(task: Task, data: bytes | None) -> tuple[float | None, str | None, str]:
    """The harness grader: (score, tier, message) of a submission file's bytes; answers never leave this call."""
    pred, why = check_submission(data, task.test_ids)
    if pred is None:
        return None, None, why
    score = metric_score(task.dna.metric, task.answers, pred)
    return score, medal_tier(score, task.thresholds, task.lower_is_better), "ok"  # Eq. (3)


def run_sandboxed(public: dict, script: str, timeout: float, mem_bytes: int, fsize_bytes: int,
                  nproc: int = 256, drop_root: bool = False, zygote=None) -> tuple[ExecResult, bytes | None]:
    """Run `script` as main.py in a fresh temp dir holding only the public files: `python -I` (a fresh interpreter,
    or a fork of a `python -I` zygote), a new session, CPU / address-space / file-size / process limits, a minimal
    environment (PATH, HOME = the temp dir, one BLAS thread), the process group (and any process carrying the run's
    marker) killed at the end. Returns the result (status ok / error / timeout / harness_error, before grading)
    and submission.csv's bytes."""
    t0 = time.perf_counter()
    marker = uuid.uuid4().hex
    uid = NOBODY if drop_root else -1
    try:
        tmpd = tempfile.TemporaryDirectory(prefix="sandmle-")
        outf = tempfile.NamedTemporaryFile(prefix="sandmle-out-")
    except OSError as e:
        return ExecResult("harness_error", tail=f"harness: {e}"), None
    with tmpd as tmp, outf as out:
        try:
            for name, data in {**public, "main.py": script.encode()}.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            if uid >= 0:
                for name in os.listdir(tmp):
                    os.chown(os.path.join(tmp, name), uid, uid)
                os.chown(tmp, uid, uid)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SANDMLE_RUN": marker}
            cpu = int(math.ceil(timeout)) + 1
            if zygote is not None:
                rep = zygote.run({"out": out.name, "cpu": cpu, "mem": mem_bytes, "fsize": fsize_bytes, "nproc": nproc,
                                  "uid": uid, "cwd": tmp, "env": env, "timeout": timeout})
                pid, rc = rep["pid"], rep["rc"]
                status = "timeout" if rep["timeout"] else "ok"
                rc = None if rep["timeout"] else rc
            else:
                p = subprocess.Popen([sys.executable, "-I", "-c", LAUNCHER, str(cpu), str(mem_bytes), str(fsize_bytes),
                                      str(nproc), str(uid)], cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
                pid, status = p.pid, "ok"
                try:
                    rc = p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    status, rc = "timeout", None
        except (OSError, ValueError) as e:
            return ExecResult("harness_error", tail=f"harness: {e}", wall_s=time.perf_counter() - t0), None
        survivors, escaped = _kill_run(pid, "SANDMLE_RUN=" + marker)
        if zygote is None and rc is None:
            p.wait()
            survivors = max(0, survivors - 1)  # the script itself is not a survivor
        wall = time.perf_counter() - t0
        out.seek(0, os.SEEK_END)
        out.seek(max(0, out.tell() - 8192))
        tail = "\n".join(out.read().decode("utf-8", "replace").splitlines()[-20:])
        sub_path = os.path.join(tmp, "submission.csv")
        sub = None
        if status == "ok" and os.path.isfile(sub_path) and os.path.getsize(sub_path) <= fsize_bytes:
            with open(sub_path, "rb") as f:
                sub = f.read()
    if status == "ok" and rc != 0:
        status = "error"
    m = re.search(r"fit_s=([0-9.]+)", tail)
    res = ExecResult(status, tail=tail, wall_s=wall, fit_s=float(m.group(1)) if m else None, survivors=survivors,
                     escaped=escaped, oom="MemoryError" in tail or "Unable to allocate" in tail,
                     fsize=rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File too large" in tail)
    return res, sub


class Sandbox:
    """The harness's execution service: a thread pool of `workers` sandboxed runs, a cache keyed by hash(task id,
    script) (seeded scripts are deterministic), the grader, and counters. `submit` returns a future; cache hits and
    in-flight duplicates are decided in submission order (deterministic counts)."""

    def __init__(self, timeout: float, mem_bytes: int, fsize_bytes: int, workers: int, drop_root: bool | None = None,
                 mode: str = "zygote"):
        self.timeout, self.mem, self.fsize, self.mode = timeout, mem_bytes, fsize_bytes, mode
        self.drop_root = can_drop_root() if drop_root is None else drop_root
        self._local = threading.local()
        self._zygotes: list = []
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.cache: dict = {}  # key -> result dict (graded)
        self.inflight: dict = {}
        self.counts = {"executions": 0, "cache_hits": 0, "timeouts": 0, "harness_errors": 0, "errors": 0,
                       "invalid": 0, "oom": 0, "fsize": 0, "survivors": 0, "escaped": 0}
        self.seconds = 0.0  # wall seconds of sandboxed runs (summed over workers)
        self.walls: list = []
        self.fits: list = []

    @staticmethod
    def key(task_id: str, script: str) -> str:
        return hashlib.sha1(f"{task_id}\0{script}".encode()).hexdigest()

    def _zygote(self):
        if self.mode != "zygote":
            return None
        z = getattr(self._local, "zygote", None)
        if z is None or z.p.poll() is not None:
            z = self._local.zygote = Zygote()
            self._zygotes.append(z)
        return z

    def _run(self, task: Task, script: str) -> ExecResult:
        try:
            z = self._zygote()
        except OSError as e:
            return ExecResult("harness_error", tail=f"harness: {e}")
        res, sub = run_sandboxed(task.public, script, self.timeout, self.mem, self.fsize, drop_root=self.drop_root,
                                 zygote=z)
        if res.status == "ok":
            res.score, res.tier, why = grade(task, sub)
            if res.score is None:
                res.status, res.tail = "invalid", (res.tail + f"\nsubmission invalid: {why}")[-4000:]
        return res

    def submit(self, task: Task, script: str):
        from concurrent.futures import Future

        k = self.key(task.task_id, script)
        if k in self.cache:
            self.counts["cache_hits"] += 1
            fut = Future()
            fut.set_result(dataclasses.replace(ExecResult(**self.cache[k]), cached=True))
            return fut
        if k in self.inflight:
            self.counts["cache_hits"] += 1
            return self.inflight[k]
        self.counts["executions"] += 1
        fut = self.pool.submit(self._run, task, script)
        self.inflight[k] = fut
        return fut

    def collect(self, fut) -> ExecResult:
        """Wait for a future; bookkeeping of fresh runs happens once, here, in the main thread."""
        res = fut.result()
        if res.cached:
            return res
        for k, f in list(self.inflight.items()):
            if f is fut:
                del self.inflight[k]
                if res.status not in ("timeout", "harness_error"):  # never cache infrastructure failures
                    self.cache[k] = {f.name: getattr(res, f.name) for f in dataclasses.fields(res) if f.name != "cached"}
                self._count(res)
        return res

    def _count(self, res: ExecResult) -> None:
        c = self.counts
        c["timeouts"] += res.status == "timeout"
        c["harness_errors"] += res.status == "harness_error"
        c["errors"] += res.status == "error"
        c["invalid"] += res.status == "invalid"
        c["oom"] += res.oom
        c["fsize"] += res.fsize
        c["survivors"] += res.survivors
        c["escaped"] += res.escaped
        self.seconds += res.wall_s
        self.walls.append(res.wall_s)
        if res.fit_s is not None:
            self.fits.append(res.fit_s)

    def state(self) -> dict:
        return {"cache": self.cache, "counts": dict(self.counts)}

    def load_state(self, st: dict) -> None:
        self.cache, self.counts = dict(st["cache"]), dict(st["counts"])

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for z in self._zygotes:
            z.close()


# A zygote: one `python -I` process per sandbox worker that imports numpy once, then forks a child per run. The
# child gets what a fresh run gets (a new session, the rlimits, the temp dir as cwd, the minimal environment,
# root dropped where possible, output to a file) and runs main.py with runpy; the zygote kills the child's group
# at the timeout and reports its exit status. It never holds task data. DEVIATION(3): the spec starts a fresh
# interpreter per run (0.2-0.4 s of numpy import here, most of a micro run); --sandbox fresh does exactly that.
ZYGOTE = r"""
import json, os, resource, runpy, signal, sys, time, traceback
import numpy  # noqa: F401  (preloaded: the start-up cost a fresh run pays each time)
inp, outp = sys.stdin.buffer, sys.stdout.buffer
while True:
    line = inp.readline()
    if not line:
        break
    req = json.loads(line)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            fd = os.open(req["out"], os.O_WRONLY | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            nul = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nul, 0)
            resource.setrlimit(resource.RLIMIT_CPU, (req["cpu"], req["cpu"] + 1))
            resource.setrlimit(resource.RLIMIT_AS, (req["mem"], req["mem"]))
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            resource.setrlimit(resource.RLIMIT_NPROC, (req["nproc"], req["nproc"]))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if req["uid"] >= 0:
                os.setgroups([])
                os.setgid(req["uid"])
                os.setuid(req["uid"])
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.argv = ["main.py"]
            runpy.run_path("main.py", run_name="__main__")
            sys.stdout.flush()
            os._exit(0)
        except SystemExit as e:
            sys.stdout.flush()
            os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    status = None
    while time.perf_counter() - t0 < req["timeout"]:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        time.sleep(0.002)
    timed_out = status is None
    if timed_out:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    outp.write((json.dumps({"pid": pid, "rc": status, "timeout": timed_out,
                            "wall": time.perf_counter() - t0}) + "\n").encode())
    outp.flush()
"""


class Zygote:
    """The harness side of one zygote process (one per sandbox worker thread)."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-I", "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, cwd="/", env={"PATH": os.environ.get("PATH", ""),
                                                                          "OMP_NUM_THREADS": "1",
                                                                          "OPENBLAS_NUM_THREADS": "1",
                                                                          "MKL_NUM_THREADS": "1"},
                                  start_new_session=True)

    def run(self, req: dict) -> dict:
        self.p.stdin.write((json.dumps(req) + "\n").encode())
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise OSError("the sandbox zygote died")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.p.stdin.close()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.p.wait(timeout=5)
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


# ---------------------------------------------------------------------------------------------
# ---- agents, episodes, rollouts ----
# ---------------------------------------------------------------------------------------------

TIER_TEXT = {"gold": "gold", "silver": "silver", "bronze": "bronze", "above_median": "below bronze",
             "valid": "below median"}


@dataclasses.dataclass
class Turn:
    prompt: object  # str (toy) or a list of chat messages (react)
    text: str
    prompt_ids: list | None
    resp_ids: list | None
    well_formed: bool
    action: str  # run | score | answer | submit | malformed
    result: ExecResult | None = None


@dataclasses.dataclass
class Episode:
    task: Task
    group: int
    turns: list = dataclasses.field(default_factory=list)
    done: bool = False
    tiers: list = dataclasses.field(default_factory=list)  # tiers of the scored submissions, in order
    scores: list = dataclasses.field(default_factory=list)
    feedback: str = "-"
    messages: list = dataclasses.field(default_factory=list)  # react: the conversation so far
    last_file: ExecResult | None = None  # react: the last run that wrote a valid submission
    calls: int = 0
    timeouts: int = 0
    harness_errors: int = 0
    score_calls: int = 0

    @property
    def masked(self) -> bool:
        """Timed out (> 20% of its calls) or failed in the harness: dropped from loss and statistics."""
        return self.harness_errors > 0 or (self.calls > 0 and self.timeouts / self.calls > 0.2)

    @property
    def format_rate(self) -> float:
        return sum(t.well_formed for t in self.turns) / max(1, len(self.turns))

    def final(self) -> tuple[float | None, str | None]:
        """(score, tier) of the last scored submission (react: else the final file)."""
        if self.scores:
            return self.scores[-1], self.tiers[-1]
        if self.last_file is not None:
            return self.last_file.score, self.last_file.tier
        return None, None

    def reward(self, kind: str) -> float:
        _, tier = self.final()
        return trajectory_reward(kind, [tier] if tier is not None else [], self.format_rate)  # Eq. (4)-(6)


class DSLAgent:
    """The toy agent format: one DSL line per turn (or `submit` from turn 2), observations as in the spec.
    scaffold A: feedback = the line, its test score and the tier text; B (MLE-Dojo stand-in): the score only."""

    def __init__(self, scaffold: str = "A"):
        self.scaffold = scaffold

    def prompt(self, ep: Episode, turn: int) -> str:
        return f"{ep.task.obs} | last: {ep.feedback}\n> "

    def parse(self, text: str, turn: int):
        prog = parse_line(text.split("\n")[0])
        if prog is None or (prog == ("submit",) and turn == 0):
            return "malformed", None
        if prog == ("submit",):
            return "submit", None
        return "run", render_script(prog)

    def observe(self, ep: Episode, turn: Turn, res: ExecResult | None) -> None:
        line = turn.text.split("\n")[0].strip()
        if turn.action == "malformed":
            ep.feedback = "unparsable line"
            return
        if turn.action == "submit":
            ep.done = True
            return
        if res.status == "ok":
            ep.scores.append(res.score)
            ep.tiers.append(res.tier)
            ep.feedback = f"{line} -> {res.score:.3g}" + (f" {TIER_TEXT[res.tier]}" if self.scaffold == "A" else "")
        else:
            ep.feedback = f"{line} -> {res.status}"


REACT_SYSTEM = """You are an expert machine-learning engineer solving a Kaggle-style task in a sandbox. The working \
directory holds description.md, train.csv, test.csv (no target) and sample_submission.csv. Each turn: think inside \
<think>...</think>, then make exactly ONE tool call:
- <code>python code</code>: runs as main.py in a fresh copy of the directory (numpy only, one thread); you see the \
last 20 lines of its output; write submission.csv (id,target) to submit predictions;
- {"name": "Score"}: grades the last submission.csv you wrote on the test set;
- <answer>submission</answer>: ends the task with the last submission.csv."""


class ReActAgent:
    """The real-model format (reimpl of the released scaffold): <think> plus one tool call per turn."""

    def __init__(self, scaffold: str = "A", tok=None, max_prompt_length: int = 8192):
        self.scaffold, self.tok, self.max_prompt_length = scaffold, tok, max_prompt_length

    def task_message(self, task: Task) -> str:
        head = b"\n".join(task.public["train.csv"].split(b"\n")[:4]).decode()
        return (task.public["description.md"].decode() + f"\n\nFiles: {', '.join(sorted(task.public))}.\n"
                f"train.csv starts:\n{head}\n")

    def prompt(self, ep: Episode, turn: int) -> list:
        if not ep.messages:
            ep.messages = [{"role": "system", "content": REACT_SYSTEM},
                           {"role": "user", "content": self.task_message(ep.task)}]
        return truncate_messages(ep.messages, self.tok, self.max_prompt_length)

    def parse(self, text: str, turn: int):
        think = re.search(r"<think>(.*?)</think>", text, re.S)
        codes = re.findall(r"<code>(.*?)</code>", text, re.S)
        n_score = len(re.findall(r"\{\s*\"name\"\s*:\s*\"Score\"\s*\}", text))
        answers = re.findall(r"<answer>(.*?)</answer>", text, re.S)
        n_calls = len(codes) + n_score + len(answers)
        if n_calls != 1 or think is None or not think.group(1).strip():
            return "malformed", n_calls
        if codes:
            return "run", codes[0]
        return ("score", None) if n_score else ("answer", None)

    def observe(self, ep: Episode, turn: Turn, res: ExecResult | None) -> None:
        ep.messages = ep.messages + [{"role": "assistant", "content": turn.text}]
        if turn.action == "malformed":
            msg = ("Error: malformed turn; write a non-empty <think>...</think> and exactly one tool call "
                   "(<code>...</code>, {\"name\": \"Score\"} or <answer>submission</answer>).")
        elif turn.action == "answer":
            ep.done = True
            return
        elif turn.action == "score":
            ep.score_calls += 1
            f = ep.last_file
            if f is None:
                msg = "Score: no valid submission.csv yet."
            else:
                ep.scores.append(f.score)
                ep.tiers.append(f.tier)
                msg = f"Score: {f.score:.4g}" + (f" ({TIER_TEXT[f.tier]})" if self.scaffold == "A" else "")
        else:
            if res.status == "ok":
                ep.last_file = res
            msg = f"[{res.status}]\n{res.tail}" if res.tail else f"[{res.status}]"
        ep.messages = ep.messages + [{"role": "user", "content": msg}]


def _n_tokens(tok, messages: list) -> int:
    return len(tok(C.render_chat(tok, messages))["input_ids"]) if tok is not None else sum(
        len(m["content"]) for m in messages) // 4


def truncate_messages(messages: list, tok, max_len: int) -> list:
    """Over `max_len` tokens: drop (assistant, error feedback) pairs first, oldest first; then keep system + task +
    the last 2 messages."""
    if _n_tokens(tok, messages) <= max_len:
        return messages
    msgs = list(messages)
    i = 2
    while i + 1 < len(msgs) and _n_tokens(tok, msgs) > max_len:
        if msgs[i + 1]["content"].startswith(("Error:", "[error]", "[timeout]")):
            del msgs[i:i + 2]
        else:
            i += 2
    if _n_tokens(tok, msgs) > max_len:
        msgs = msgs[:2] + msgs[-2:] if len(msgs) > 4 else msgs
    return msgs


class LocalPolicy:
    """A local HF policy: batched sampling with C.generate; keeps prompt and response ids for the update."""

    def __init__(self, model, tok, max_new_tokens: int, gen: torch.Generator):
        self.model, self.tok, self.max_new_tokens, self.gen = model, tok, max_new_tokens, gen

    def act(self, prompts: list, temperature: float) -> list[tuple[str, list, list]]:
        texts = [C.render_chat(self.tok, p) if isinstance(p, list) else p for p in prompts]
        g = C.generate(self.model, self.tok, texts, max_new_tokens=self.max_new_tokens, temperature=temperature,
                       generator=self.gen)
        P = g.prompt_len
        out = []
        for i in range(len(texts)):
            p_ids = g.sequences[i, :P][g.attention_mask[i, :P].bool()].tolist()
            r_ids = g.response_ids[i][g.response_mask[i].bool()].tolist()
            out.append((g.texts[i], p_ids, r_ids))
        return out


class EndpointPolicy:
    """An OpenAI-compatible endpoint as the policy (evaluation only: it cannot be RL-trained)."""

    def __init__(self, llm, max_new_tokens: int):
        self.llm, self.max_new_tokens = llm, max_new_tokens

    def act(self, prompts: list, temperature: float) -> list[tuple[str, None, None]]:
        chats = [p for p in prompts if isinstance(p, list)]
        if chats and len(chats) == len(prompts):
            texts = [o[0] for o in self.llm.chat(prompts, n=1, temperature=temperature, max_tokens=self.max_new_tokens)]
        else:
            texts = [o[0] for o in self.llm.complete(prompts, n=1, temperature=temperature,
                                                     max_tokens=self.max_new_tokens, stop=["\n"])]
        return [(t, None, None) for t in texts]


PhaseTimer = C.PhaseTimer  # seconds per named phase (generation, sandbox, logp_old, forward, backward, optimizer)


def rollout(policy, agent, sandbox: Sandbox, tasks: list, group_size: int, max_turns: int, temperature: float,
            timer: PhaseTimer | None = None, gen_chunks: int = 2) -> list[Episode]:
    """Multi-turn episodes of `group_size` per task. Each turn: the live episodes are generated for in
    `gen_chunks` batches; a chunk's scripts go to the sandbox pool at once, so they run while the next chunk is
    generated; then every result is collected and fed back."""
    timer = timer or PhaseTimer()
    eps = [Episode(task=t, group=gi) for gi, t in enumerate(tasks) for _ in range(group_size)]
    for turn in range(max_turns):
        live = [e for e in eps if not e.done]
        if not live:
            break
        pending = []
        size = max(1, math.ceil(len(live) / max(1, gen_chunks)))
        for s in range(0, len(live), size):
            chunk = live[s:s + size]
            prompts = [agent.prompt(e, turn) for e in chunk]
            with timer("generation"):
                outs = policy.act(prompts, temperature)
            for e, p, (text, p_ids, r_ids) in zip(chunk, prompts, outs):
                action, payload = agent.parse(text, turn)
                t = Turn(p, text, p_ids, r_ids, action != "malformed", action)
                e.turns.append(t)
                fut = None
                if action == "run":
                    e.calls += 1
                    fut = sandbox.submit(e.task, payload)
                pending.append((e, t, fut))
        with timer("sandbox"):
            for e, t, fut in pending:
                res = sandbox.collect(fut) if fut is not None else None
                t.result = res
                if res is not None:
                    e.timeouts += res.status == "timeout"
                    e.harness_errors += res.status == "harness_error"
                agent.observe(e, t, res)
    return eps


# ---------------------------------------------------------------------------------------------
# ---- policy: the toy checkpoint, seed SFT, the trajectory GRPO update, evaluation ----
# ---------------------------------------------------------------------------------------------

POLICY_RECIPE = dict(n_layer=2, d_model=128, n_head=4, tokenizer="byte", steps=150, batch_size=64, lr=3e-3, seed=0,
                     world="sandmle-dsl-v1")  # names everything the format pretraining depends on


def random_obs(rng: random.Random) -> str:
    tt = rng.choice(list(TASK_TYPES))
    return (f"task={tt} metric={rng.choice(TASK_TYPES[tt])} n={rng.randint(50, 5000)} d={rng.randint(6, 15)} "
            f"miss={rng.randint(0, 1)} lin={rng.randint(0, 3)} poly={rng.randint(0, 3)}")


def format_sample(rng: random.Random) -> tuple[str, str]:
    """Format pretraining pair: a random observation (turn 1, or a later turn with A- or B-style feedback) and a
    random valid DSL line (or `submit` after turn 1): the base policy knows the format, not which line is good."""
    fb = "-"
    if rng.random() < 0.5:
        fb = f"{rng.choice(PROGRAMS)} -> {rng.uniform(0, 3):.3g}"
        if rng.random() < 0.7:
            fb += " " + rng.choice(list(TIER_TEXT.values()))
    line = "submit" if fb != "-" and rng.random() < 0.3 else rng.choice(PROGRAMS)
    return f"{random_obs(rng)} | last: {fb}\n> ", line


def toy_policy_path() -> str:
    return C.toy_checkpoint("sandmle_policy", recipe=POLICY_RECIPE, sample_fn=format_sample)


def expert_line(task: Task) -> str:
    """Seed-SFT expert: the best DSL program on a 70/30 validation split of the task's train rows (no test)."""
    X, y = task_arrays(task)
    cut = max(2, int(0.7 * len(X)))
    best, best_s = None, None
    for line in PROGRAMS:
        pred = run_program(tuple(line.split()), X[:cut], y[:cut], X[cut:])
        if not np.all(np.isfinite(pred)):
            continue
        s = metric_score(task.dna.metric, y[cut:], pred)
        if best_s is None or (s < best_s if task.lower_is_better else s > best_s):
            best, best_s = line, s
    return best


def task_arrays(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of the public train.csv (what an agent's script reads)."""
    tr = np.loadtxt(io.BytesIO(task.public["train.csv"]), delimiter=",", skiprows=1, ndmin=2)
    return tr[:, 1:-1], tr[:, -1]


def seed_sft_pairs(seed_tasks: list, upsample: int) -> list[tuple[str, str]]:
    """Expert trajectories of the seed tasks (turn 1: the expert line; turn 2: submit), upsampled."""
    agent, pairs = DSLAgent("A"), []
    for t in seed_tasks:
        line = expert_line(t)
        score = t.program_scores[line]
        tier = medal_tier(score, t.thresholds, t.lower_is_better)
        ep = Episode(task=t, group=0)
        p1 = agent.prompt(ep, 0)
        ep.feedback = f"{line} -> {score:.3g} {TIER_TEXT[tier]}"
        pairs += [(p1, line), (agent.prompt(ep, 1), "submit")]
    return pairs * upsample


def seed_sft(model, tok, pairs, steps: int, lr: float, batch_size: int, seed: int):
    """Seed-SFT: teacher-forced NLL on the expert pairs (common.pretrain_lm: AdamW, warmup + cosine)."""
    return C.pretrain_lm(model, tok, lambda rng: rng.choice(pairs), steps=steps, batch_size=batch_size, lr=lr,
                         seed=seed, desc="seed_sft")


def pack_trajectories(eps: list, tok, device):
    """Rows = every generated turn of every episode: (ids, attn, resp) left-padded, and the episode of each row."""
    rows, resp_lens, owner = [], [], []
    for k, e in enumerate(eps):
        for t in e.turns:
            if t.resp_ids:
                rows.append(t.prompt_ids + t.resp_ids)
                resp_lens.append(len(t.resp_ids))
                owner.append(k)
    ids, attn = C.left_pad(rows, tok.pad_token_id, device)
    L = ids.shape[1]
    resp = (torch.arange(L, device=ids.device)[None] >= L - torch.tensor(resp_lens, device=ids.device)[:, None]).long()
    return ids, attn, resp, owner


def seq_logp(model, ids, attn, resp, owner, n_eps: int):
    """(n_eps, T) log-probs of each episode's generated tokens (all turns concatenated) and the (n_eps, T) mask."""
    logp = C.token_logprobs(model, ids, attn)  # (R, L)
    per = [[] for _ in range(n_eps)]
    for r, k in enumerate(owner):
        per[k].append(logp[r][resp[r].bool()])
    cat = [torch.cat(p) if p else logp.new_zeros(0) for p in per]
    T = max(1, max(len(c) for c in cat))
    out = logp.new_zeros((n_eps, T))
    mask = torch.zeros((n_eps, T), device=logp.device)
    for k, c in enumerate(cat):
        out[k, :len(c)] = c
        mask[k, :len(c)] = 1
    return out, mask


def grpo_update(model, tok, opt, eps: list, adv: torch.Tensor, args, device, world_size: int = 1,
                rng: random.Random | None = None, timer: PhaseTimer | None = None) -> dict:
    """One trajectory-GRPO update (Eq. 8) over this rank's live episodes: ppo_epochs x num_minibatches optimizer
    steps; logp_old from the same function before the first step (rho starts at 1). Masked episodes are left out."""
    timer = timer or PhaseTimer()
    rng = rng or random.Random(0)
    live = [(e, float(a)) for e, a in zip(eps, adv.tolist()) if not e.masked and any(t.resp_ids for t in e.turns)]
    stats = {"loss": 0.0, "clip_frac": 0.0, "updates": 0}
    if not live and world_size == 1:  # under DDP every rank still joins each step's collectives
        return stats
    model.train()
    with timer("logp_old"), torch.no_grad():
        old = {}
        for s in range(0, len(live), args.per_device_batch_size):
            part = [e for e, _ in live[s:s + args.per_device_batch_size]]
            lp, mk = seq_logp(model, *pack_trajectories(part, tok, device), len(part))
            for j, e in enumerate(part):
                old[id(e)] = lp[j][mk[j].bool()]
    for _ in range(args.ppo_epochs):
        order = list(range(len(live)))
        rng.shuffle(order)
        for mb in (order[i::args.num_minibatches] for i in range(args.num_minibatches)):
            n_global = float(C.all_reduce_sum(torch.tensor(float(len(mb))), world_size))
            if n_global == 0:
                continue
            opt.zero_grad(set_to_none=True)
            for s in range(0, len(mb), args.per_device_batch_size):
                part = [live[i] for i in mb[s:s + args.per_device_batch_size]]
                es = [e for e, _ in part]
                with timer("forward"):
                    lp, mk = seq_logp(model, *pack_trajectories(es, tok, device), len(es))
                    lp_old = torch.zeros_like(lp)
                    for j, e in enumerate(es):
                        lp_old[j, :int(mk[j].sum())] = old[id(e)]
                    a = torch.tensor([x for _, x in part], device=lp.device)
                    loss, clip = grpo_loss(lp, lp_old, a, mk, args.clip_low, args.clip_high,  # Eq. (8)
                                           normalizer=n_global / world_size)
                if not torch.isfinite(loss):
                    raise FloatingPointError("NaN GRPO loss")
                with timer("backward"):
                    loss.backward()
                stats["loss"] += loss.item() / world_size
                stats["clip_frac"] += clip * len(part)
            with timer("optimizer"):
                if world_size > 1:  # a rank without episodes in this minibatch contributes zeros
                    for p in model.parameters():
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                C.all_reduce_grads(model, world_size)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                opt.step()
            stats["updates"] += 1
    model.eval()
    stats["clip_frac"] /= max(1, len(live) * args.ppo_epochs)
    return stats


def episode_stats(eps: list, kind: str) -> dict:
    """Eval / training numbers of a list of episodes (masked ones excluded from the rates, and counted)."""
    live = [e for e in eps if not e.masked]
    n = max(1, len(live))
    tiers = [e.final()[1] for e in live]
    out = {"n": len(live), "masked": len(eps) - len(live),
           "valid": sum(t is not None for t in tiers) / n,
           "above_median": sum(t in ("gold", "silver", "bronze", "above_median") for t in tiers) / n,
           "any_medal": sum(t in ("gold", "silver", "bronze") for t in tiers) / n,
           "gold": sum(t == "gold" for t in tiers) / n, "silver": sum(t == "silver" for t in tiers) / n,
           "bronze": sum(t == "bronze" for t in tiers) / n,
           "position": sum(position_score(e.final()[0], e.task.leaderboard, e.task.lower_is_better) for e in live) / n,
           "reward": sum(e.reward(kind) for e in live) / n,
           "format_rate": sum(e.format_rate for e in live) / n,
           "malformed": sum(not t.well_formed for e in eps for t in e.turns)}
    return out


def evaluate(policy, agent, sandbox: Sandbox, tasks: list, max_turns: int, kind: str) -> dict:
    """Greedy episodes, one per held-out task (graded once per run)."""
    eps = rollout(policy, agent, sandbox, tasks, 1, max_turns, temperature=0.0)
    return episode_stats(eps, kind)


# ---------------------------------------------------------------------------------------------
# ---- world setup, gap check, speed ----
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    train: TaskSet
    eval: TaskSet
    seeds: list  # seed Task objects (full-size)
    build_s: float
    twins: dict = dataclasses.field(default_factory=dict)  # task_id -> full-size twin (built lazily)


def parse_range(text: str, name: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in str(text).split(","))
    except ValueError:
        raise C.UserError(f"--{name} '{text}' must be two integers 'lo,hi', e.g. 50,200") from None
    C.require(1 <= a <= b, f"--{name} '{text}' must satisfy 1 <= lo <= hi")
    return a, b


def generator_llm(args):
    """The LLM of --generator llm: an endpoint or a local HF model (Strategist and Writer roles)."""
    if args.generator_api_base:
        return C.LLM.from_endpoint(args.generator_api_base, args.generator_api_model,
                                   os.environ.get(args.api_key_env), timeout=args.request_timeout,
                                   deadline=args.request_timeout)
    return C.LLM.from_hf(args.generator_model_name_or_path, device="cpu", seed=args.data_seed)


def build_world(args) -> World:
    t0 = time.time()
    micro, evr = parse_range(args.micro_rows, "micro_rows"), parse_range(args.eval_rows, "eval_rows")
    sdna = seed_dnas(args.num_seed_tasks, args.data_seed, evr)
    seeds = [build_task(f"seed-{i}", d, zlib_seed(f"seed-{args.data_seed}-{i}"), args.n_test, check_gate=False)[0]
             for i, d in enumerate(sdna)]
    llm = generator_llm(args) if args.generator == "llm" else None
    train = generate_tasks("train", args.num_train_tasks, args.data_seed, micro, SEED_DOMAINS, sdna, args.n_test,
                           llm=llm, retries=args.generator_retries)
    evs = generate_tasks("eval", args.num_eval_tasks, args.data_seed, evr, EVAL_DOMAINS, sdna, args.n_test)
    C.require(len(train.tasks) >= args.tasks_per_step,
              f"the generator produced {len(train.tasks)} train tasks (yield {train.yield_counts}), fewer than "
              f"--tasks_per_step {args.tasks_per_step}; raise --num_train_tasks or check the generator LLM")
    C.require(len(evs.tasks) >= 1, "the generator produced no eval task")
    return World(train, evs, seeds, time.time() - t0)


def fixed_vs_oracle(tasks: list) -> dict:
    """Any-medal rate of the best single DSL program over the tasks, and of the per-task best (the oracle)."""
    medal = {line: [medal_tier(t.program_scores[line], t.thresholds, t.lower_is_better) in ("gold", "silver",
                                                                                           "bronze")
                    for t in tasks] for line in PROGRAMS}
    best = max(PROGRAMS, key=lambda ln: (sum(medal[ln]), ln))
    oracle = float(np.mean([any(medal[ln][k] for ln in PROGRAMS) for k in range(len(tasks))]))
    fixed = float(np.mean(medal[best]))
    return {"best_fixed_program": best, "best_fixed_medal": fixed, "oracle_medal": oracle, "gap": oracle - fixed}


def twin_of(world: World, task: Task, rows: int) -> Task:
    if task.task_id not in world.twins:
        world.twins[task.task_id] = full_twin(task, rows, len(task.test_ids))
    return world.twins[task.task_id]


def speed_benchmark(world: World, args, n_tasks: int = 6) -> dict:
    """Sandboxed execution time of the same DSL pipelines on micro tasks and their full-size twins: medians of the
    wall time (with interpreter start-up) and of the script's own time after its imports (without)."""
    progs = [("mean", "std", "raw", "ridge1"), ("mean", "std", "poly2", "ridge10"), ("mean", "std", "raw", "knn5"),
             ("mean", "std", "poly2", "knn15")]
    rows = {"micro": {"wall": [], "fit": []}, "full": {"wall": [], "fit": []}}
    per_model = {" ".join(p): {"micro": [], "full": []} for p in progs}
    drop = can_drop_root()
    for t in world.train.tasks[:n_tasks]:
        X, y, Xt, _, cols = make_data(dataclasses.replace(t.dna, n_train=args.full_rows), t.seed, args.n_test)
        ids = np.arange(len(Xt)) + 10_000
        full_pub = {"train.csv": csv_bytes(np.arange(len(y)), X, cols, y), "test.csv": csv_bytes(ids, Xt, cols)}
        for p in progs:
            for size, pub in (("micro", t.public), ("full", full_pub)):
                res, _ = run_sandboxed(pub, render_script(p), args.exec_timeout * 3, int(args.mem_limit_gb * 2**30),
                                       int(args.fsize_limit_mb * 2**20), drop_root=drop)
                if res.status == "ok":
                    rows[size]["wall"].append(res.wall_s)
                    rows[size]["fit"].append(res.fit_s)
                    per_model[" ".join(p)][size].append(res.wall_s)
    med = {f"{s}_{k}_median_s": float(np.median(v[k])) if v[k] else None for s, v in rows.items() for k in v}
    out = {**med, "n_runs": {s: len(v["wall"]) for s, v in rows.items()}, "full_rows": args.full_rows}
    if med["micro_wall_median_s"] and med["full_wall_median_s"]:
        out["speedup_with_startup"] = med["full_wall_median_s"] / med["micro_wall_median_s"]
        out["speedup_without_startup"] = med["full_fit_median_s"] / max(1e-9, med["micro_fit_median_s"])
    out["per_program_speedup_with_startup"] = {
        k: float(np.median(v["full"]) / np.median(v["micro"])) for k, v in per_model.items() if v["full"] and v["micro"]}
    return out


# ---------------------------------------------------------------------------------------------
# ---- one arm x seed, in named phases ----
# ---------------------------------------------------------------------------------------------

TRAINED = ("sandmle", "sft_sandmle", "sparse", "full_scale")


def arm_reward(arm: str, args) -> str:
    return "sparse" if arm == "sparse" else args.reward


def make_policy(args, device, seed: int):
    """The arm's starting policy: the format-pretrained toy model (or --model_name_or_path)."""
    path = args.model_name_or_path or toy_policy_path()
    model, tok = C.load_lm(path, device=device)
    return model, tok


def make_agent(args, scaffold: str, tok):
    if args.agent == "react":
        return ReActAgent(scaffold, tok, args.max_prompt_length)
    return DSLAgent(scaffold)


def new_sandbox(args) -> Sandbox:
    return Sandbox(args.exec_timeout, int(args.mem_limit_gb * 2**30), int(args.fsize_limit_mb * 2**20),
                   args.sandbox_workers, mode=args.sandbox)


class ArmRun:
    """One (arm, seed): setup -> (seed SFT) -> (GRPO steps, checkpointed) -> evaluation under scaffolds A and B."""

    def __init__(self, arm, seed, args, world, logger, device, out_dir, log_step, rank=0, world_size=1,
                 budget_s=None):
        self.arm, self.seed, self.args, self.world, self.logger = arm, seed, args, world, logger
        self.device, self.out_dir, self.log_step0, self.rank, self.world_size = device, out_dir, log_step, rank, world_size
        self.budget_s = budget_s
        self.ckpt = os.path.join(out_dir, f"ckpt-{arm}-s{seed}")
        self.timer = PhaseTimer()
        self.kind = arm_reward(arm, args)

    def setup(self):
        args = self.args
        C.seed_everything(self.seed)
        self.model, self.tok = make_policy(args, self.device, self.seed)
        if self.arm in ("seed_sft", "sft_sandmle"):
            pairs = seed_sft_pairs(self.world.seeds, args.sft_upsample)
            seed_sft(self.model, self.tok, pairs, args.sft_steps, args.sft_learning_rate, args.sft_batch_size, self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.task_rng = random.Random(f"tasks-{self.seed}")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.learning_rate, weight_decay=0.0)
        self.sandbox = new_sandbox(args)
        self.step, self.train_s, self.hist = 0, 0.0, []
        if args.resume and C.find_checkpoint(self.ckpt):
            st = C.load_checkpoint(self.ckpt, model=self.model, optimizer=self.opt)
            ex = st["extra"]
            self.step, self.train_s, self.hist = st["step"], ex["train_s"], ex["hist"]
            self.gen.set_state(ex["gen"])
            self.task_rng.setstate(ex["task_rng"])
            self.sandbox.load_state(ex["sandbox"])
            self.timer.seconds = ex["time_split"]
            tqdm_write(f"[{self.arm}-s{self.seed}] resumed at step {self.step}")

    def save(self):
        C.save_checkpoint(self.ckpt, self.model, self.tok, self.opt, step=self.step, extra=dict(
            train_s=self.train_s, hist=self.hist, gen=self.gen.get_state(), task_rng=self.task_rng.getstate(),
            sandbox=self.sandbox.state(), time_split=self.timer.seconds))

    def step_tasks(self) -> list:
        pool = self.world.train.tasks
        if self.arm == "full_scale":  # the twins of the first --num_full_tasks micro tasks (built once, shared)
            pool = pool[:self.args.num_full_tasks]
        tasks = self.task_rng.sample(pool, self.args.tasks_per_step)
        tasks = tasks[self.rank::self.world_size]  # whole groups stay on one rank
        if self.arm == "full_scale":  # a twin's leaderboard is built on first use: outside the wall-clock budget
            t0 = time.time()
            tasks = [twin_of(self.world, t, self.args.full_rows) for t in tasks]
            self.twin_s = getattr(self, "twin_s", 0.0) + time.time() - t0
        return tasks

    def train_step(self, bar) -> dict:
        args, G = self.args, self.args.num_generations
        tasks = self.step_tasks()
        t0 = time.time()
        policy = LocalPolicy(self.model, self.tok, args.max_completion_length, self.gen)
        agent = make_agent(args, "A", self.tok)
        ex0, hit0 = self.sandbox.counts["executions"], self.sandbox.counts["cache_hits"]
        eps = rollout(policy, agent, self.sandbox, tasks, G, args.max_turns, args.temperature, self.timer,
                      args.gen_chunks)
        rewards = [e.reward(self.kind) for e in eps]
        live = [not e.masked for e in eps]
        adv = grpo_advantages(rewards, G, live)  # Eq. (7)
        st = grpo_update(self.model, self.tok, self.opt, eps, adv, args, self.device, self.world_size,
                         random.Random(f"mb-{self.seed}-{self.step}"), self.timer)
        self.train_s += time.time() - t0
        local = {"reward_sum": sum(r for r, l in zip(rewards, live) if l), "live": sum(live), "eps": len(eps),
                 "dead": sum(len({round(rewards[g * G + i], 9) for i in range(G) if live[g * G + i]}) <= 1
                             for g in range(len(tasks))), "groups": len(tasks),
                 "medal": sum(e.final()[1] in ("gold", "silver", "bronze") for e, l in zip(eps, live) if l),
                 "malformed": sum(not t.well_formed for e in eps for t in e.turns),
                 "turns": sum(len(e.turns) for e in eps)}
        tot = {k: sum(d[k] for d in C.all_gather_objects(local, self.world_size)) for k in local}
        self.step += 1
        row = {"arm": self.arm, "seed": self.seed, "arm_step": self.step,
               "reward": tot["reward_sum"] / max(1, tot["live"]), "medal_rate": tot["medal"] / max(1, tot["live"]),
               "dead_groups": tot["dead"] / max(1, tot["groups"]), "masked": tot["eps"] - tot["live"],
               "malformed_rate": tot["malformed"] / max(1, tot["turns"]),
               "executions": self.sandbox.counts["executions"] - ex0, "cache_hits": self.sandbox.counts["cache_hits"] - hit0,
               "loss": st["loss"], "clip_frac": st["clip_frac"], "train_s": self.train_s,
               "time_s": {k: round(v, 3) for k, v in self.timer.seconds.items()}}
        self.hist.append({k: row[k] for k in ("reward", "medal_rate", "dead_groups", "masked", "executions",
                                               "cache_hits", "malformed_rate")})
        return row

    def train(self, bar):
        args = self.args
        while self.step < args.max_steps:
            if self.arm == "full_scale" and self.train_s >= self.budget_s:
                break
            row = self.train_step(bar)
            self.logger.log(self.log_step0 + self.step, **row)
            bar.update(1)
            if self.step % args.save_every == 0 or self.step == args.max_steps:
                self.save()
        if self.step and self.step % args.save_every and self.rank == 0:
            self.save()

    def evaluate(self, eval_sandbox: Sandbox) -> dict:
        args = self.args
        policy = LocalPolicy(self.model, self.tok, args.max_completion_length, self.gen)
        with self.timer("eval"):
            a = evaluate(policy, make_agent(args, "A", self.tok), eval_sandbox, self.world.eval.tasks, args.max_turns,
                         args.reward)
            b = evaluate(policy, make_agent(args, "B", self.tok), eval_sandbox, self.world.eval.tasks,
                         args.eval_turns_b, args.reward)
        return {"A": a, "B": b}

    def result(self, ev: dict, t_start: float) -> dict:
        c = self.sandbox.counts
        h = self.hist
        first, last = h[:3], h[-3:]
        res = {"arm": self.arm, "seed": self.seed, "steps": self.step, "reward_kind": self.kind,
               "eval_A": ev["A"], "eval_B": ev["B"],
               "train_reward_first": float(np.mean([x["reward"] for x in first])) if h else None,
               "train_reward_last": float(np.mean([x["reward"] for x in last])) if h else None,
               "dead_groups_first": float(np.mean([x["dead_groups"] for x in first])) if h else None,
               "dead_groups_last": float(np.mean([x["dead_groups"] for x in last])) if h else None,
               "dead_groups_mean": float(np.mean([x["dead_groups"] for x in h])) if h else None,
               "executions": c["executions"], "cache_hits": c["cache_hits"], "masked_episodes": sum(x["masked"] for x in h),
               "timeouts": c["timeouts"], "harness_errors": c["harness_errors"], "train_s": self.train_s,
               "steps_per_min": self.step / (self.train_s / 60) if self.train_s else None,
               "budget_s": self.budget_s, "log_step_end": self.log_step0 + self.step,
               "twin_build_s": getattr(self, "twin_s", 0.0),
               "time_split": {k: round(v, 2) for k, v in self.timer.seconds.items()},
               "minutes": (time.time() - t_start) / 60}
        return res


def tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm

    if C.is_main():
        tqdm.write(msg)


def run_arm(arm, seed, args, world, logger, bar, device, out_dir, log_step, eval_sandbox, rank=0, world_size=1,
            budget_s=None) -> dict:
    t0 = time.time()
    run = ArmRun(arm, seed, args, world, logger, device, out_dir, log_step, rank, world_size, budget_s)
    run.setup()
    if arm in TRAINED:
        run.train(bar)
    ev = run.evaluate(eval_sandbox)
    run.sandbox.close()
    return run.result(ev, t0)


# ---------------------------------------------------------------------------------------------
# ---- table and plot ----
# ---------------------------------------------------------------------------------------------




def results_table(results: list[dict]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    cols = [("valid A", lambda r: r["eval_A"]["valid"]), ("> median A", lambda r: r["eval_A"]["above_median"]),
            ("any medal A", lambda r: r["eval_A"]["any_medal"]), ("gold A", lambda r: r["eval_A"]["gold"]),
            ("position A", lambda r: r["eval_A"]["position"]), ("any medal B", lambda r: r["eval_B"]["any_medal"]),
            ("position B", lambda r: r["eval_B"]["position"]), ("steps", lambda r: r["steps"]),
            ("train reward first→last", None), ("dead groups", lambda r: r["dead_groups_mean"]),
            ("executions", lambda r: r["executions"]), ("cache hits", lambda r: r["cache_hits"]),
            ("masked", lambda r: r["masked_episodes"]), ("minutes", lambda r: r["minutes"])]
    lines = [f"seeds {','.join(map(str, seeds))}; mean ± std over seeds; eval on held-out tasks (greedy, graded "
             f"once); A = training scaffold, B = score-only feedback, 3 turns", "",
             "| arm | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for a in arms:
        rs = [r for r in results if r["arm"] == a]
        cells = []
        for name, f in cols:
            if f is None:
                cells.append(f"{C.mean_std([r['train_reward_first'] for r in rs], '{:.2f}', ddof=0)} → "
                             f"{C.mean_std([r['train_reward_last'] for r in rs], '{:.2f}', ddof=0)}" if rs[0]["steps"] else "-")
            elif name in ("steps", "executions", "cache hits", "masked"):
                cells.append(C.mean_std([f(r) for r in rs], "{:.0f}", ddof=0))
            elif name == "minutes":
                cells.append(C.mean_std([f(r) for r in rs], "{:.1f}", ddof=0))
            else:
                cells.append(C.mean_std([f(r) for r in rs], ddof=0))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(metrics_path: str, results: list[dict], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = C.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for arm in dict.fromkeys(r.get("arm") for r in rows):
        for seed in sorted({r["seed"] for r in rows if r.get("arm") == arm}):
            rs = [r for r in rows if r.get("arm") == arm and r["seed"] == seed]
            x = [r["arm_step"] for r in rs]
            axes[0].plot(x, [r["reward"] for r in rs], label=f"{arm} s{seed}", alpha=0.8)
            axes[1].plot(x, [r["dead_groups"] for r in rs], label=f"{arm} s{seed}", alpha=0.8)
    axes[0].set(xlabel="GRPO step", ylabel="train reward (live episodes)", title="training reward")
    axes[1].set(xlabel="GRPO step", ylabel="share of dead groups", title="dead groups (all rewards equal)")
    arms = list(dict.fromkeys(r["arm"] for r in results))
    for k, (sc, off) in enumerate((("eval_A", -0.2), ("eval_B", 0.2))):
        vals = [[r[sc]["any_medal"] for r in results if r["arm"] == a] for a in arms]
        axes[2].bar(np.arange(len(arms)) + off, [np.mean(v) for v in vals], width=0.4,
                    yerr=[np.std(v) for v in vals], label=f"scaffold {sc[-1]}")
    axes[2].set_xticks(np.arange(len(arms)), arms, rotation=30, fontsize=8)
    axes[2].set(ylabel="any-medal rate (held-out)", title="evaluation")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------

RESULT_NEUTRAL_FLAGS = ("request_timeout", "api_key_env", "sandbox_workers", "device")


def policy_endpoint(args) -> C.LLM:
    return C.LLM.from_endpoint(args.api_base, args.api_model, os.environ.get(args.api_key_env),
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


def resume_point(out_dir: str, runs: list) -> tuple[bool, int]:
    """(anything to resume from, the metrics.jsonl step to keep rows up to)."""
    step, found = 0, False
    for arm, seed in runs:
        path = _result_path(out_dir, arm, seed)
        if os.path.isfile(path):
            step, found = int(_read_json(path)["log_step_end"]), True
            continue
        ck = C.checkpoint_step(os.path.join(out_dir, f"ckpt-{arm}-s{seed}"))
        if ck is not None:
            step, found = step + ck, True
        break
    return found, step


def eval_only(args, world: World, out_dir: str, device, t_start: float) -> None:
    """--mode eval: one policy (local or endpoint) on the held-out tasks under scaffolds A and B."""
    if args.backend == "api":
        policy, tok = EndpointPolicy(policy_endpoint(args), args.max_completion_length), None
    else:
        model, tok = make_policy(args, device, args.seeds_list[0])
        policy = LocalPolicy(model, tok, args.max_completion_length, torch.Generator().manual_seed(args.seeds_list[0]))
    sb = new_sandbox(args)
    a = evaluate(policy, make_agent(args, "A", tok), sb, world.eval.tasks, args.max_turns, args.reward)
    b = evaluate(policy, make_agent(args, "B", tok), sb, world.eval.tasks, args.eval_turns_b, args.reward)
    sb.close()
    C.MetricLogger(out_dir).log(0, **{f"A_{k}": v for k, v in a.items()}, **{f"B_{k}": v for k, v in b.items()})
    C.plot_metrics(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "sandmle.png"),
                   title=f"sandmle | eval | {args.api_model or args.model_name_or_path or 'tiny-lm'}")
    C.write_json(os.path.join(out_dir, "summary.json"), dict(mode="eval", eval_A=a, eval_B=b, sandbox=sb.counts,
                                                             wall_s=time.time() - t_start))
    print(f"eval: any-medal A {a['any_medal']:.3f} B {b['any_medal']:.3f}; valid A {a['valid']:.3f}; malformed "
          f"turns {a['malformed']}")


def main(args):
    t_start = time.time()
    C.set_cpu_threads()
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # 1. flags; 2. preflight (models, endpoints), nothing written; 3. the world (generator), the gap check;
    # 4. the output-dir policy, args.json
    validate_args(args)
    methods, seeds = args.methods_list, args.seeds_list
    args.output_dir = out_dir = args.output_dir or os.path.join("runs", "sandmle", "table" if args.table else
                                                               ("eval" if args.mode == "eval" else "_".join(methods)))
    C.preflight_model(args.model_name_or_path)
    C.preflight_model(args.generator_model_name_or_path)
    if args.backend == "api":
        C.preflight_endpoint(policy_endpoint(args), route="chat" if args.agent == "react" else "completions",
                             deadline=min(30.0, args.request_timeout))
    if args.generator == "llm" and args.generator_api_base:
        C.preflight_endpoint(generator_llm(args), route="chat", deadline=min(30.0, args.request_timeout))
    world = build_world(args)
    gap = fixed_vs_oracle(world.train.tasks)
    gap_eval = fixed_vs_oracle(world.eval.tasks)
    print(f"world: {len(world.train.tasks)} train / {len(world.eval.tasks)} eval tasks in {world.build_s:.1f}s; "
          f"yield {world.train.yield_counts}; best fixed program '{gap['best_fixed_program']}' medals "
          f"{gap['best_fixed_medal']:.2f}, oracle {gap['oracle_medal']:.2f} (eval: {gap_eval['best_fixed_medal']:.2f} "
          f"vs {gap_eval['oracle_medal']:.2f})", flush=True)
    C.require(gap["gap"] >= args.min_gap, f"degenerate world: the best fixed program medals on "
              f"{gap['best_fixed_medal']:.2f} of the train tasks and the oracle on {gap['oracle_medal']:.2f} (gap "
              f"{gap['gap']:.2f} < --min_gap {args.min_gap}): RL would learn nothing; change --data_seed or the world")
    runs = [(a, s) for s in seeds for a in methods]
    has_ckpt, resume_step = resume_point(out_dir, runs) if args.resume else (False, 0)
    rank, world_size, device = C.ddp_setup()
    if args.device:
        device = torch.device(args.device)
    C.start_run(args, has_checkpoint=has_ckpt, ignore=RESULT_NEUTRAL_FLAGS)
    if args.mode == "eval":
        eval_only(args, world, out_dir, device, t_start)
        return
    speed = speed_benchmark(world, args) if args.speed and rank == 0 else None
    if speed:
        print(f"speed: median sandboxed run (fresh interpreter) micro {speed['micro_wall_median_s']:.2f}s vs "
              f"{args.full_rows} rows {speed['full_wall_median_s']:.2f}s: {speed['speedup_with_startup']:.1f}x with "
              f"start-up; script time after imports {speed['micro_fit_median_s']:.3f}s vs "
              f"{speed['full_fit_median_s']:.3f}s: {speed['speedup_without_startup']:.1f}x without", flush=True)
    toy_policy_path() if not args.model_name_or_path else None
    total = sum(args.max_steps for a, _ in runs if a in TRAINED)
    bar = tqdm(total=total, desc="sandmle", disable=not C.is_main(), dynamic_ncols=True)
    logger = C.MetricLogger(out_dir, pbar=bar, resume_step=resume_step if args.resume else None)
    eval_sandbox = new_sandbox(args)
    results, log_step, train_s = [], 0, {}
    for arm, seed in runs:
        path = _result_path(out_dir, arm, seed)
        if args.resume and os.path.isfile(path):
            res = _read_json(path)
            tqdm.write(f"[{arm}-s{seed}] finished earlier: read back from {path}")
        else:
            budget = args.full_scale_budget_s or train_s.get(seed) if arm == "full_scale" else None
            res = run_arm(arm, seed, args, world, logger, bar, device, out_dir, log_step, eval_sandbox, rank,
                          world_size, budget)
            ea, eb = res["eval_A"], res["eval_B"]
            tqdm.write(f"[{arm}-s{seed}] any-medal A {ea['any_medal']:.3f} (valid {ea['valid']:.3f}, position "
                       f"{ea['position']:.3f}), B {eb['any_medal']:.3f}; steps {res['steps']}, executions "
                       f"{res['executions']}, cache hits {res['cache_hits']}, {res['minutes']:.1f} min")
            if rank == 0:
                C.write_json(path, res)
        log_step = res["log_step_end"]
        if arm == "sandmle":
            train_s[seed] = res["train_s"]
        results.append(res)
    bar.close()
    eval_sandbox.close()
    if rank == 0:
        title = f"sandmle | {args.model_name_or_path or 'tiny-lm'} | seed {','.join(map(str, seeds))}"
        plot_results(os.path.join(out_dir, "metrics.jsonl"), results, os.path.join(out_dir, "sandmle.png"), title)
        table = results_table(results)
        with open(os.path.join(out_dir, "table.md"), "w") as f:
            f.write(f"`python sandmle.py {' '.join(sys.argv[1:])}`\n\n{table}")
        print(table)
        C.write_json(os.path.join(out_dir, "summary.json"), dict(
            results=results, table=table, gap_train=gap, gap_eval=gap_eval, yield_train=world.train.yield_counts,
            yield_eval=world.eval.yield_counts, generator_llm=world.train.llm_counts, speed=speed,
            world_build_s=world.build_s, wall_s=time.time() - t_start, device=str(device), seeds=seeds,
            methods=methods))
        by = {a: [r["eval_A"]["any_medal"] for r in results if r["arm"] == a] for a in methods}
        bad = {a: sum(r["eval_A"]["malformed"] for r in results if r["arm"] == a) for a in methods}
        print("result: held-out any-medal (scaffold A) " + ", ".join(f"{a} {np.mean(v):.3f}" for a, v in by.items())
              + "; malformed eval turns (A, summed over seeds) " + ", ".join(f"{a} {n}" for a, n in bad.items()))
    C.ddp_cleanup()


if __name__ == "__main__":
    with C.exit_on_user_error():
        main(parse_args())
