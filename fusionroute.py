"""fusionroute.py: token-level expert routing plus a complementary router logit (FusionRoute), trained by
SFT + Complemented DPO, with every collaboration baseline (experts alone, sequence-level selection,
token-level confidence routing, routing without complement, direct fine-tuning, weight merging), in one file.

Paper: "Token-Level LLM Collaboration via FusionRoute", Xiong, Zhou, Zeng, Chen, Huang, Bi, Zhang, Zhao
(Meta AI, Meta TBD Lab, CMU, UChicago, UMD), arXiv 2601.05106, https://arxiv.org/abs/2601.05106; code announced
at github.com/xiongny/FusionRoute (not readable here). The method's structure is known from the abstract and
several consistent secondary reviews; no numeric table was available.

Idea. Several frozen domain experts share one tokenizer. A router LM (theta) with a linear head W picks one
expert per decoding step from its own final hidden state, and adds its own next-token log-probs to that
expert's: the decoded distribution is the renormalised product of router and expert. Pure routing cannot
reach the optimal policy unless, at every state, some expert is optimal (global coverage); the trainable
complementary logits repair states no expert covers. Training: SFT (LM loss + a routing loss on informative
tokens), then Complemented DPO (DPO on the fused policy, experts and W fixed), mixed with SFT batches.

Equations (s_t = prompt + tokens so far; l_theta,t / l_i,t = log_softmax of router / expert i logits at t):
  (1) routing scores   w_t = W h_t, h_t the router's final hidden state (the LM head's input); I*_t = argmax_i w_t,i
  (2) fusion           log pi_final(. | s_t) = log_softmax(l_theta,t + l_{I*_t},t)        (--fusion sum)
                       ablations: l_{I*_t},t alone (expert_only = route_only), l_theta,t alone (router_only)
  (3) LM loss          L_LM = mean_t -l_theta,t(y_t)     (--sft_lm_target router)
                       or mean_t -log pi_final(y_t | s_t) with I*_t under no_grad (--sft_lm_target fused)
  (4) routing target   i*_t = argmax_i l_i,t(y_t); informative_t = [the experts' argmax tokens are not all equal]
                       (--informative disagree; all: every position)
  (5) routing loss     L_route = mean over informative t of CE(softmax(w_t), i*_t)              (--route_loss ce)
                       or -log sum_i softmax(w_t)_i exp(l_i,t(y_t))                              (marginal)
  (6) SFT              L_SFT = L_LM + lambda L_route                                              (lambda = --route_weight)
  (7) fused sequence   logp_final(y | x) = sum_t log pi_final(y_t | s_t), I*_t along y under no_grad
  (8) CDPO             L_CDPO = -log sigmoid(beta [(logp_final(y_w) - logp_ref(y_w)) - (logp_final(y_l) - logp_ref(y_l))])
                       ref = the fused policy of the stage-1 router with the same experts; W frozen
  (9) stage 2          L = L_CDPO + mu L_SFT (an SFT batch in every step; mu = --sft_mix)
  (10) gradient        d log pi_final(y_t) / d l_theta,t = onehot(y_t) - pi_final(. | s_t): it vanishes where the
                       chosen expert is confident and right, so CDPO's updates land where experts are weak
  (11) merging         merge_avg = mean_i theta_i;  merge_ta = theta_0 + s sum_i (theta_i - theta_0)  (s = --ta_scale)

Deviations from the paper:
  1. Toy world instead of GSM8K / MATH500 / MBPP / HumanEval / IFEval on Llama-3 / Gemma-2: chained digit
     operators written one step per 5 tokens "s op x r;" (start state s0 in the prompt), three memorisation-heavy
     table operators a, b, c (r = T_op[s][x], fixed random 10 x 10 tables) plus a held-out operator d (r = x)
     that no expert knows (--toy_ops tables), and an arithmetic control (sum / max / difference mod 10, held-out
     product mod 10; --toy_ops arith). Tiny Llama models (2 layers, d = 64). `# DEVIATION(1)`
  2. Routing accuracy is measured on the result digit of every step whose operator has an expert, against that
     operator's expert (the experts disagree there and agree on the copied digits); the paper reports task
     scores only. `# DEVIATION(2)`
  3. seq_select's `loglik` selector scores each expert's full answer by its mean token log-prob under the
     trained router LM (the paper uses a reward model); token_conf decodes each token from the expert with the
     highest max-probability (a stand-in for Collab-style controlled decoding). `# DEVIATION(3)`
  4. Constant learning rate AdamW (no schedule) in both stages; losses are per-token means over the global
     batch (Eq. (3) sums in the spec; a mean keeps the scale independent of the answer length). `# DEVIATION(4)`
  5. CDPO pairs: y_w = the reference answer, y_l = the stage-1 fused model's own greedy wrong answer, on
     training prompts (the paper's preference data is not public). `# DEVIATION(5)`

Reconstructed (the record is silent; our choice):
  lambda = 1, beta = 0.1, mu = 1, lr 3e-3 (toy) for the router LM and W, the disagreement test of Eq. (4), the
  target i*_t of Eq. (4), the marginal variant of Eq. (5), the reference of Eq. (8), I*_t of Eq. (3) fused from
  the router's own W (as at decoding). Toy sizes follow the spec: theta_0 200 steps on a, b, c; experts theta_0
  + 1500 steps on one operator each; SFT 150 steps x 64 on 300 problems (40 % single-operator over a-d, 40 %
  hybrid over a-d, 20 % hybrid over a-c); CDPO 100 steps on 300 pairs; direct_ft = theta_0 trained with L_LM
  alone on the same data for the same steps (and the CDPO stage's SFT batches when --stage both). The toy
  models are fixed per machine (recipe seed 0); --seed varies the SFT data, W's init, batches and pairs.

Commands:
  toy, CPU (SFT + eval of every arm, ~1-3 min once cached; first run builds theta_0 and 3 experts):
                          python fusionroute.py
  with CDPO:              python fusionroute.py --stage both
  ablations:              python fusionroute.py --informative all | --route_loss marginal | --sft_lm_target fused
  control world:          python fusionroute.py --toy_ops arith
  toy table (3 seeds, both worlds, ablations):  python fusionroute.py --table
  real models, one GPU (shared Qwen2.5 tokenizer):
    python fusionroute.py --router_init Qwen/Qwen2.5-1.5B-Instruct \
      --experts Qwen/Qwen2.5-Math-1.5B-Instruct,Qwen/Qwen2.5-Coder-1.5B-Instruct,Qwen/Qwen2.5-1.5B-Instruct \
      --train_file data/sft_mix.jsonl --pref_file data/pairs.jsonl --eval_file data/gsm8k_test.jsonl \
      --stage both --per_device_batch_size 4 --learning_rate 1e-5 --method fusionroute,route_only
  8B experts:             ... --lora_r 16 (in-file LoRA on the router LM's linear layers; experts bf16, no_grad)
  several GPUs:           torchrun --nproc_per_node 4 fusionroute.py ... (DDP over data; experts replicated)
  Files (jsonl): train {prompt, response[, answer]}; pref {prompt, chosen, rejected}; eval {prompt, answer[, domain]}.
  Router and every expert must encode a probe identically (checked at start; exit 2 naming the model).

Logged: metrics.jsonl per update (stage, loss, lm_loss, route_loss, route_acc (argmax w_t = i*_t on informative
positions), informative share, CDPO loss / accuracy / margin, and the time split t_expert_forward (experts, no
grad), t_forward (router), t_backward, t_optimizer). summary.json: per arm and test set accuracy with counts,
routing accuracy with counts, switches per response, the sanity gates, time per stage. fusionroute.png:
training curves and accuracy per arm and test set.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
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
# DEVIATION(1): a step is "s op x r;" (5 byte tokens), the prompt "s0|op1x1op2x2...=" gives the start state and
# every step's operator and operand, so one problem can switch operator per step. Only the result digit r needs
# the operator's knowledge; s, op and x are copies. These operators live in this file (common's world has no
# per-step operators).
EXPERT_OPS = ("a", "b", "c")  # one expert each
HELD_OUT_OP = "d"  # no expert knows it; it first appears in the router's SFT data
TOY_OPS = ("tables", "arith")
TABLE_SEED = 1234  # the tables are fixed (not --seed): the toy experts are cached per machine
TOY_K = (3, 6)  # operands per problem (train and test)
TOY_VERSION = 1  # bump when the toy world changes: keys the cached toy models


def op_table(op: str) -> list[list[int]]:
    rng = random.Random(f"fusionroute-table-{TABLE_SEED}-{op}")
    return [[rng.randrange(10) for _ in range(10)] for _ in range(10)]


_TABLES = {op: op_table(op) for op in EXPERT_OPS}
ARITH = {"a": lambda s, x: (s + x) % 10, "b": lambda s, x: max(s, x), "c": lambda s, x: (s - x) % 10,
         "d": lambda s, x: (s * x) % 10}


def apply_op(ops: str, op: str, s: int, x: int) -> int:
    """r of one step: tables -> T_op[s][x] for a, b, c and r = x for the held-out d; arith -> ARITH."""
    if ops == "arith":
        return ARITH[op](s, x)
    return x if op == HELD_OUT_OP else _TABLES[op][s][x]


class Problem:
    """A chained-operator problem: start state s0, steps [(op, x)]; .steps holds (s, op, x, r)."""

    def __init__(self, ops: str, s0: int, pairs: Sequence[tuple[str, int]]):
        self.ops, self.s0, self.pairs = ops, s0, list(pairs)
        s, self.steps = s0, []
        for op, x in self.pairs:
            r = apply_op(ops, op, s, x)
            self.steps.append((s, op, x, r))
            s = r
        self.answer = s

    @property
    def prompt(self) -> str:
        return f"{self.s0}|" + "".join(f"{op}{x}" for op, x in self.pairs) + "="

    @property
    def trace(self) -> str:
        return "".join(f"{s}{op}{x}{r};" for s, op, x, r in self.steps) + f"={self.answer}"

    @property
    def kind(self) -> str:
        used = sorted({op for op, _ in self.pairs})
        return used[0] if len(used) == 1 else "hyb"


def draw_problem(rng: random.Random, ops: str, pool: Sequence[str], k: int, split: str, hybrid: bool) -> Problem:
    """One problem of k steps from `pool`: one operator for all steps, or (hybrid) a fresh operator per step with
    at least two distinct ones; from training or held-out prompts (common.toy_split_of)."""
    while True:
        if hybrid:
            seq = [rng.choice(pool) for _ in range(k)]
            if len(set(seq)) < 2:
                continue
        else:
            seq = [rng.choice(pool)] * k
        p = Problem(ops, rng.randrange(10), [(op, rng.randrange(10)) for op in seq])
        if C.toy_split_of(p.prompt) == split:
            return p


def sft_problem(rng: random.Random, ops: str) -> Problem:
    """The router's SFT mixture: 40 % single-operator over a-d, 40 % hybrid over a-d, 20 % hybrid over a-c."""
    u, k = rng.random(), rng.randint(*TOY_K)
    if u < 0.4:
        return draw_problem(rng, ops, EXPERT_OPS + (HELD_OUT_OP,), k, "train", hybrid=False)
    if u < 0.8:
        return draw_problem(rng, ops, EXPERT_OPS + (HELD_OUT_OP,), k, "train", hybrid=True)
    return draw_problem(rng, ops, EXPERT_OPS, k, "train", hybrid=True)


def toy_sft_set(ops: str, seed: int, n: int) -> list[Problem]:
    rng = random.Random(f"fusionroute-sft-{ops}-{seed}")
    return [sft_problem(rng, ops) for _ in range(n)]


TEST_SETS = ("a", "b", "c", "d", "hyb3", "hyb4")


def toy_test_set(ops: str, name: str, n: int) -> list[Problem]:
    """n held-out problems of one test set (fixed across seeds): one operator (a, b, c, d), hyb3 (a-c mixed per
    step) or hyb4 (a-d mixed)."""
    rng, out, seen = random.Random(f"fusionroute-test-{ops}-{name}"), [], set()
    pool = {"hyb3": EXPERT_OPS, "hyb4": EXPERT_OPS + (HELD_OUT_OP,)}.get(name, (name,))
    while len(out) < n:
        p = draw_problem(rng, ops, pool, rng.randint(*TOY_K), "heldout", hybrid=name.startswith("hyb"))
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def theta0_sample_fn(ops: str) -> Callable:
    """theta_0's corpus: the format on a, b, c only (single and hybrid), d never shown (the spec's rule)."""
    def sample(rng: random.Random):
        p = draw_problem(rng, ops, EXPERT_OPS, rng.randint(*TOY_K), "train", hybrid=rng.random() < 0.5)
        return p.prompt, p.trace
    return sample


def expert_sample_fn(ops: str, op: str) -> Callable:
    def sample(rng: random.Random):
        p = draw_problem(rng, ops, (op,), rng.randint(*TOY_K), "train", hybrid=False)
        return p.prompt, p.trace
    return sample


def theta0_recipe(ops: str, steps: int = 200) -> dict:
    return dict(world="fusionroute", version=TOY_VERSION, toy_ops=ops, table_seed=TABLE_SEED, corpus="theta0-abc",
                domains={}, style="fusionroute", tokenizer="byte", steps=steps)


def expert_recipe(ops: str, op: str, steps: int = 1500) -> dict:
    return dict(world="fusionroute", version=TOY_VERSION, toy_ops=ops, table_seed=TABLE_SEED, corpus=f"single-{op}",
                steps=steps, batch_size=64, lr=3e-3, seed=0)


def toy_theta0(ops: str, steps: Sequence[int] = (200, 1500)) -> str:
    return C.toy_checkpoint(f"fusionroute_theta0_{ops}", recipe=theta0_recipe(ops, steps[0]), sample_fn=theta0_sample_fn(ops))


def toy_expert(ops: str, op: str, steps: Sequence[int] = (200, 1500)) -> str:
    """theta_0 + 1500 steps on one operator, cached under common.toy_cache_dir(). common.toy_checkpoint builds
    from a random init only, so this file fine-tunes from theta_0 itself (same lock / temp-dir / rename
    protocol); the key covers the recipe and theta_0's path (which hashes theta_0's recipe)."""
    init = toy_theta0(ops, steps)
    recipe = {**expert_recipe(ops, op, steps[1]), "init": os.path.basename(init)}
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    root = C.toy_cache_dir()
    role = f"fusionroute_expert_{ops}_{op}"
    path = os.path.join(root, f"{role}-{key}")
    with open(os.path.join(root, f".{role}-{key}.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(path, "config.json")):
            t0 = time.time()
            print(f"[toy] building '{role}' (theta_0 + {recipe['steps']} steps) -> {path}", file=sys.stderr, flush=True)
            tmp = path + f".tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            C.set_cpu_threads()
            model, tok = C.load_lm(init, dtype=torch.float32, device="cpu")
            C.pretrain_lm(model, tok, expert_sample_fn(ops, op), steps=recipe["steps"], batch_size=recipe["batch_size"],
                          lr=recipe["lr"], seed=recipe["seed"], desc=f"toy {role}")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, path)
            print(f"[toy] built '{role}' in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return path


ARMS = ("expert", "seq_select", "token_conf", "route_only", "direct_ft", "merge_avg", "merge_ta", "fusionroute")
RESUME_IGNORE = ("eval_batch_size", "save_every", "table_seeds", "table_sets", "table_runs", "device")  # flags that do not change results


# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FusionRoute: a router LM picks one frozen expert per token and adds its own "
                                "log-probs (SFT + CDPO), with every collaboration baseline. Defaults = the toy CPU run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- models ----
    p.add_argument("--router_init", default="toy", help="router LM theta's initialisation: HF id / path, or 'toy' "
                   "(theta_0 of the toy world)")
    p.add_argument("--experts", default="toy", help="comma list of frozen experts E_1..E_n (HF ids / paths, one "
                   "tokenizer with the router), or 'toy' (the three toy experts of --toy_ops)")
    p.add_argument("--base_model", default=None, help="theta_0 the experts were fine-tuned from, for merge_ta, Eq. (11) "
                   "(default: --router_init; merging is meaningful only for experts of one init, pitfall 9)")
    p.add_argument("--router_path", default=None, help="router_sft.pt of an earlier run (same --router_init and "
                   "--experts): --stage cdpo starts from it")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="dtype of the frozen experts "
                   "(auto: bf16 on CUDA, fp32 on CPU); trained weights stay fp32")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    p.add_argument("--chat_template", default="auto", choices=("auto", "none"),
                   help="wrap prompts in the router's chat template where it has one (the same for every model)")
    p.add_argument("--lora_r", type=int, default=0, help="rank of in-file LoRA on the router LM's linear layers "
                   "(0: full fine-tuning); for 8B routers / experts")
    p.add_argument("--lora_alpha", type=float, default=32.0, help="LoRA scale numerator (scale = alpha / r)")
    # ---- method, Eqs. (1)-(9) ----
    p.add_argument("--stage", default="sft", choices=("sft", "cdpo", "both"),
                   help="sft: stage 1 (Eq. (6)); cdpo: stage 2 (Eq. (9)) from --router_path; both: 1 then 2")
    p.add_argument("--fusion", default="sum", choices=("sum", "expert_only", "router_only"),
                   help="Eq. (2) of the fusionroute arm: l_theta + l_I*, the expert alone, or the router alone")
    p.add_argument("--route_weight", type=float, default=1.0, help="lambda of Eq. (6)")
    p.add_argument("--sft_lm_target", default="router", choices=("router", "fused"), help="L_LM of Eq. (3): the "
                   "router's own head, or the fused distribution")
    p.add_argument("--route_loss", default="ce", choices=("ce", "marginal"), help="L_route of Eq. (5)")
    p.add_argument("--informative", default="disagree", choices=("disagree", "all"),
                   help="positions of L_route, Eq. (4): where the experts' argmax tokens differ, or all")
    p.add_argument("--beta", type=float, default=0.1, help="beta of Eq. (8)")
    p.add_argument("--sft_mix", type=float, default=1.0, help="mu of Eq. (9): weight of the SFT batch in stage 2")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="AdamW learning rate of theta and W (both stages)")
    p.add_argument("--per_device_batch_size", type=int, default=64, help="SFT rows per process per update")
    p.add_argument("--pref_batch_size", type=int, default=32, help="CDPO pairs per process per update")
    p.add_argument("--sft_steps", type=int, default=150, help="stage-1 updates (direct_ft gets the same)")
    p.add_argument("--cdpo_steps", type=int, default=100, help="stage-2 updates")
    p.add_argument("--max_steps", type=int, default=None, help="cap on --sft_steps and --cdpo_steps (quick runs)")
    p.add_argument("--logit_chunk", type=int, default=1024, help="positions whose (n, V) log-probs are held at once "
                   "(fused log-probs chunk by chunk over T)")
    # ---- decoding and baselines ----
    p.add_argument("--method", default="all", type=C.comma_choices(ARMS), help="arms to evaluate: all or a comma list of " + ", ".join(ARMS))
    p.add_argument("--seq_selector", default="both", choices=("both", "oracle", "loglik"),
                   help="seq_select: a correct expert answer if any (oracle), or the highest mean log-prob under the router LM")
    p.add_argument("--ta_scale", type=float, default=0.5, help="s of merge_ta, Eq. (11)")
    p.add_argument("--lazy_experts", action=argparse.BooleanOptionalAction, default=False,
                   help="decoding: run (and prefill / catch up) an expert only at steps where some row selects it")
    p.add_argument("--temperature", type=float, default=0.0, help="decoding temperature (0: greedy), same for every arm")
    p.add_argument("--max_new_tokens", type=int, default=None, help="response tokens (default: 5K+3 on toy problems, else 512)")
    # ---- data ----
    p.add_argument("--toy_ops", default="tables", choices=TOY_OPS, help="toy operators: memorisation tables a, b, c + held-out "
                   "d (r = x), or the arithmetic control (sum, max, difference mod 10 + held-out product mod 10)")
    p.add_argument("--toy_steps", type=C.comma_list(int), default=[200, 1500], help="toy models: pretraining steps of theta_0, "
                   "then of each expert from theta_0 (smaller = another cached build)")
    p.add_argument("--sanity_gates", action=argparse.BooleanOptionalAction, default=True, help="toy: stop unless each "
                   "expert scores >= 0.95 on its operator and <= 0.3 on the other experts' (pitfall 8)")
    p.add_argument("--train_file", default=None, help="jsonl {prompt, response[, answer]} (default: toy SFT set)")
    p.add_argument("--pref_file", default=None, help="jsonl {prompt, chosen, rejected} for CDPO (default: pairs from the "
                   "stage-1 model's wrong answers on training prompts; needs 'answer' in --train_file rows)")
    p.add_argument("--eval_file", default=None, help="jsonl {prompt, answer[, domain]} (default: toy test sets)")
    p.add_argument("--train_size", type=int, default=300, help="SFT problems (toy) / first rows of --train_file")
    p.add_argument("--num_pairs", type=int, default=300, help="CDPO pairs (at most)")
    p.add_argument("--eval_size", type=int, default=300, help="problems per test set")
    p.add_argument("--eval_batch_size", type=int, default=300, help="prompts per decode batch")
    # ---- run ----
    p.add_argument("--seed", type=int, default=0, help="seed of the SFT data, W's init, batches, pairs, sampling")
    p.add_argument("--output_dir", default=None, help="default runs/fusionroute/<toy_ops>-<stage>-s<seed>")
    p.add_argument("--save_every", type=int, default=50, help="checkpoint every n updates of a stage (0: stage ends only)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the run in --output_dir (same flags) from its last checkpoint / finished stage")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a finished or partial run in --output_dir")
    # ---- table ----
    p.add_argument("--table", action=argparse.BooleanOptionalAction, default=False,
                   help="run the toy table (per seed and operator set: every arm with --stage both, then the "
                        "--informative all, --route_loss marginal and --sft_lm_target fused ablations) and write table.md")
    p.add_argument("--table_seeds", default="0,1,2", help="seeds of --table")
    p.add_argument("--table_sets", default="tables,arith", help="operator sets of --table")
    p.add_argument("--table_runs", default="main,informative_all,route_marginal,lm_fused", help="runs of --table per set "
                   "and seed (others are only aggregated where their summary.json exists)")
    args = p.parse_args(argv)
    if args.output_dir is None:
        name = "table" if args.table else f"{args.toy_ops if is_toy(args) else 'real'}-{args.stage}-s{args.seed}"
        args.output_dir = os.path.join("runs", "fusionroute", name)
    return args


def is_toy(args) -> bool:
    return args.router_init == "toy" and args.experts == "toy"


def expert_names(args) -> list[str]:
    return [f"toy:{op}" for op in EXPERT_OPS] if args.experts == "toy" else [e.strip() for e in args.experts.split(",") if e.strip()]


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work; nothing is loaded or written."""
    require((args.router_init == "toy") == (args.experts == "toy"), "--router_init toy and --experts toy go together "
            "(the toy router starts from the experts' theta_0); pass real models for both")
    names = expert_names(args)
    require(len(names) >= 2, f"--experts {args.experts!r}: FusionRoute routes between at least 2 experts")
    require(len(set(names)) == len(names), f"--experts {args.experts!r} names a model twice")
    for k in ("per_device_batch_size", "pref_batch_size", "sft_steps", "cdpo_steps", "logit_chunk", "train_size",
              "num_pairs", "eval_size", "eval_batch_size"):
        require(getattr(args, k) >= 1, f"--{k} {getattr(args, k)} must be >= 1")
    require(args.max_steps is None or args.max_steps >= 1, f"--max_steps {args.max_steps} must be >= 1")
    for k in ("learning_rate", "beta"):
        v = getattr(args, k)
        require(v > 0 and math.isfinite(v), f"--{k} {v} must be a finite number > 0")
    for k in ("route_weight", "sft_mix", "ta_scale"):
        v = getattr(args, k)
        require(v >= 0 and math.isfinite(v), f"--{k} {v} must be a finite number >= 0")
    require(args.temperature >= 0 and math.isfinite(args.temperature), f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    require(args.max_new_tokens is None or args.max_new_tokens >= 1, f"--max_new_tokens {args.max_new_tokens} must be >= 1")
    require(args.lora_r >= 0, f"--lora_r {args.lora_r} must be >= 0 (0 = full fine-tuning)")
    require(args.lora_alpha > 0, f"--lora_alpha {args.lora_alpha} must be > 0")
    require(args.save_every >= 0, f"--save_every {args.save_every} must be >= 0")
    require(len(args.toy_steps) == 2 and min(args.toy_steps) >= 1, f"--toy_steps {args.toy_steps} must be two "
            "positive integers: theta_0 steps, expert steps")
    require(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other; pass one")
    if args.stage == "cdpo":
        require(args.router_path is not None, "--stage cdpo starts from a stage-1 router: pass --router_path "
                "<run>/router_sft.pt (or use --stage both)")
    else:
        require(args.router_path is None, f"--router_path is the start of --stage cdpo; drop it for --stage {args.stage}")
    if args.route_weight == 0:
        require(False, "--route_weight 0 leaves W untrained (argmax is not differentiable, pitfall 6: routing learns "
                "only through L_route); use --method direct_ft for a router without routing")
    if not is_toy(args):
        require(args.train_file is not None or args.stage == "cdpo", "real models need --train_file (SFT rows)")
        require(args.eval_file is not None, "real models need --eval_file (jsonl {prompt, answer[, domain]})")
        require(args.toy_ops == "tables", "--toy_ops applies to the toy world only")
    else:
        for k in ("train_file", "pref_file", "eval_file", "base_model"):
            require(getattr(args, k) is None, f"--{k} needs real models (--router_init / --experts); the toy world "
                    "makes its own data")
    if args.table:
        try:
            seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--table_seeds {args.table_seeds!r} must be a comma list of integers") from None
        sets = [s.strip() for s in args.table_sets.split(",") if s.strip()]
        require(seeds and sets and all(s in TOY_OPS for s in sets), f"--table_seeds / --table_sets {args.table_seeds!r} / "
                f"{args.table_sets!r}: integers / a comma list of {', '.join(TOY_OPS)}")
        runs = [r for r in args.table_runs.split(",") if r.strip()]
        require(runs and all(r in dict(TABLE_RUNS) for r in runs), f"--table_runs {args.table_runs!r}: a comma list of "
                f"{', '.join(dict(TABLE_RUNS))}")
        require(is_toy(args) and args.stage != "cdpo", "--table runs the toy world: drop --router_init / --experts / --stage cdpo")


# ---------------------------------------------------------------------------------------------
# ---- method math (pure functions; the tests import these) ----
# ---------------------------------------------------------------------------------------------


def fuse_logprobs(router_logp: torch.Tensor, expert_logp: torch.Tensor) -> torch.Tensor:
    """Eq. (2): log pi_final = log_softmax(l_theta + l_I*). (..., V) each -> (..., V) fp32. The product of two
    normalised distributions is not normalised (pitfall 2): the log_softmax renormalises it."""
    return torch.log_softmax(router_logp.float() + expert_logp.float(), dim=-1)  # Eq. (2)


def combine_logprobs(router_logp: torch.Tensor | None, expert_logp: torch.Tensor | None, fusion: str) -> torch.Tensor:
    """--fusion: sum = Eq. (2); expert_only = the chosen expert alone (route_only); router_only = the router alone."""
    if fusion == "sum":
        return fuse_logprobs(router_logp, expert_logp)
    return torch.log_softmax((expert_logp if fusion == "expert_only" else router_logp).float(), -1)


def routing_targets(expert_gold_logp: torch.Tensor, expert_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (4): (..., n) gold-token log-probs l_i,t(y_t) of every expert and (..., n) their argmax tokens ->
    targets i*_t (...,) = argmax_i l_i,t(y_t), informative (...,) bool = the argmax tokens are not all equal."""
    targets = expert_gold_logp.argmax(-1)  # Eq. (4)
    informative = (expert_argmax != expert_argmax[..., :1]).any(-1)
    return targets, informative


def route_loss(scores: torch.Tensor, targets: torch.Tensor, kind: str = "ce",
               expert_gold_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (5), per position: (N, n) routing scores w_t, (N,) targets i*_t -> (N,) CE(softmax(w_t), i*_t); or
    kind "marginal": -log sum_i softmax(w_t)_i exp(l_i,t(y_t)) with (N, n) gold log-probs. The caller averages
    over informative positions."""
    if kind == "ce":
        return F.cross_entropy(scores.float(), targets, reduction="none")  # Eq. (5)
    return -torch.logsumexp(torch.log_softmax(scores.float(), -1) + expert_gold_logp.float(), -1)  # Eq. (5), marginal


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. (8), per pair: (B,) sequence log-probs of the fused policy and the fused reference ->
    (B,) -log sigmoid(beta [(pi_w - ref_w) - (pi_l - ref_l)])."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)  # Eq. (8)


def _fused_chunk(router_logits: Callable, h: torch.Tensor, le: torch.Tensor | None, y: torch.Tensor, fusion: str):
    lr = torch.log_softmax(router_logits(h).float(), -1) if fusion != "expert_only" else None  # (c, V)
    return combine_logprobs(lr, le, fusion).gather(-1, y[:, None]).squeeze(-1)  # Eq. (2), (c,)


def fused_gold_logp(router_logits: Callable[[torch.Tensor], torch.Tensor], router_h: torch.Tensor,
                    expert_logits: Sequence[Callable[[int, int], torch.Tensor]], choice: torch.Tensor,
                    targets: torch.Tensor, chunk: int, fusion: str = "sum") -> torch.Tensor:
    """Eq. (2) / (7) at N flattened positions, `chunk` positions at a time: router_logits maps (c, d) router hidden
    states to (c, V) logits; router_h (N, d) (with grad); expert_logits[i](s, e) -> (e - s, V) logits of frozen
    expert i at positions s:e; choice (N,) I*_t; targets (N,) y_t -> (N,) log pi_final(y_t | s_t). Only (chunk, V)
    tensors exist at once, never (B, T, V) per expert: the expert part runs under no_grad and the router part under
    activation checkpointing when grad is on (its (chunk, V) tensors are recomputed in backward)."""
    out = []
    for s in range(0, targets.numel(), chunk):
        e = min(targets.numel(), s + chunk)
        le = None
        if fusion != "router_only":
            with torch.no_grad():
                c = choice[s:e]
                for i, fn in enumerate(expert_logits):
                    rows = (c == i).nonzero().squeeze(-1)
                    if rows.numel():
                        li = torch.log_softmax(fn(s, e)[rows].float(), -1)  # (r, V) l_i at the rows routed to i
                        le = li.new_zeros((e - s, li.shape[-1])) if le is None else le
                        le[rows] = li
        if torch.is_grad_enabled() and router_h.requires_grad:
            lp = torch.utils.checkpoint.checkpoint(_fused_chunk, router_logits, router_h[s:e], le, targets[s:e], fusion,
                                                   use_reentrant=False)
        else:
            lp = _fused_chunk(router_logits, router_h[s:e], le, targets[s:e], fusion)
        out.append(lp)
    return torch.cat(out) if out else router_h.new_zeros(0)


def merge_state_dicts(expert_sds: Sequence[dict], base_sd: dict | None = None, ta_scale: float = 0.5) -> dict:
    """Eq. (11): the uniform average of the experts (base_sd None), or task arithmetic
    theta_0 + s sum_i (theta_i - theta_0). Float tensors only; others are taken from the first expert."""
    out = {}
    for k, v in expert_sds[0].items():
        if not torch.is_floating_point(v):
            out[k] = v.clone()
        elif base_sd is None:
            out[k] = sum(sd[k].float() for sd in expert_sds) / len(expert_sds)  # Eq. (11), merge_avg
        else:
            out[k] = base_sd[k].float() + ta_scale * sum(sd[k].float() - base_sd[k].float() for sd in expert_sds)
        out[k] = out[k].to(v.dtype)
    return out


def switches(choice: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) chosen experts, (B, T) response mask -> (B,) changes of the chosen expert between consecutive
    generated tokens."""
    both = mask[:, 1:].bool() & mask[:, :-1].bool()
    return ((choice[:, 1:] != choice[:, :-1]) & both).sum(-1)


# ---------------------------------------------------------------------------------------------
# ---- models: the router (theta + W), in-file LoRA, experts, merging ----
# ---------------------------------------------------------------------------------------------


class Router(torch.nn.Module):
    """The router LM theta and its routing head W in R^{n x d} (Eq. (1)); W reads the final hidden state h_t that
    feeds the LM head, in fp32."""

    def __init__(self, lm, n_experts: int, seed: int = 0):
        super().__init__()
        self.lm = lm
        self.W = torch.nn.Linear(lm.config.hidden_size, n_experts, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.W.weight.copy_(torch.randn(self.W.weight.shape, generator=g) * 0.02)
        self.W.to(next(lm.parameters()).device)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, d)
        h, _ = C.hidden_states(self.lm, ids, mask)
        return h

    def scores(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., n) w_t, Eq. (1)
        return self.W(h.float())

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., V) fp32 router logits
        return C.head_logits(self.lm, self.lm.get_output_embeddings(), h)


class LoRALinear(torch.nn.Module):
    """y = base(x) + (alpha / r) B A x with base frozen, A (r, in) random, B (out, r) zero (in-file; no peft)."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        for p_ in base.parameters():
            p_.requires_grad_(False)
        dev = base.weight.device
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features, device=dev) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=dev))

    def forward(self, x):
        return self.base(x) + (x.to(self.A.dtype) @ self.A.t() @ self.B.t()).to(x.dtype) * self.scale


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(lm, r: int, alpha: float) -> int:
    """Wrap the attention / MLP projections of `lm` in LoRALinear; freeze everything else. Returns the count."""
    for p_ in lm.parameters():
        p_.requires_grad_(False)
    n = 0
    for name, mod in list(lm.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                setattr(mod, child_name, LoRALinear(child, r, alpha))
                n += 1
    return n


def merge_lora(lm) -> None:
    """Fold every LoRALinear back into a plain Linear (W + scale B A), so save_pretrained writes a normal model."""
    for mod in list(lm.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += (child.scale * child.B @ child.A).to(child.base.weight.dtype)
                setattr(mod, child_name, child.base)


def frozen_dtype(args, device) -> torch.dtype:
    if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def model_paths(args) -> dict:
    """{'router_init', 'experts': [...], 'base'}: toy names resolved to cached toy models (built on first use)."""
    if is_toy(args):
        init = toy_theta0(args.toy_ops, args.toy_steps)
        return dict(router_init=init, experts=[toy_expert(args.toy_ops, op, args.toy_steps) for op in EXPERT_OPS], base=init)
    return dict(router_init=args.router_init, experts=expert_names(args), base=args.base_model or args.router_init)


def load_frozen(path: str, dtype, device):
    """An expert: frozen (no grad), eval mode, in `dtype` (bf16 on CUDA)."""
    model, tok = C.load_lm(path, dtype=dtype, device=device)
    model.eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model, tok


PROBE = "3|a3b5= 3a39; The answer is \\boxed{42}. <|im_start|>user\nü 漢 def f(x): return x**2"


def check_tokenizers(toks: dict) -> None:
    """Pitfall 1: logit addition needs identical token ids, vocabularies, EOS and chat templates. {name: tokenizer}."""
    items = list(toks.items())
    ref_name, ref = items[0]
    ref_ids = ref(PROBE, add_special_tokens=False)["input_ids"]
    for name, tok in items[1:]:
        ids = tok(PROBE, add_special_tokens=False)["input_ids"]
        require(ids == ref_ids, f"'{name}' encodes a probe string differently from '{ref_name}' ({ids[:6]}... vs "
                f"{ref_ids[:6]}...); FusionRoute adds log-probs token by token: use models of one tokenizer family")
        require(len(tok) == len(ref), f"'{name}' has vocabulary size {len(tok)}, '{ref_name}' {len(ref)}; use models "
                "of one tokenizer family")
        require(tok.eos_token_id == ref.eos_token_id, f"'{name}' has EOS id {tok.eos_token_id}, '{ref_name}' "
                f"{ref.eos_token_id}; use models of one tokenizer family")


def merged_model(paths: dict, kind: str, ta_scale: float, device):
    """merge_avg / merge_ta of the experts (Eq. (11)), as an fp32 model of the first expert's architecture."""
    from transformers import AutoModelForCausalLM

    sds = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict() for p in paths["experts"]]
    base_sd = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).state_dict() if kind == "merge_ta" else None
    model, tok = C.load_lm(paths["experts"][0], dtype=torch.float32, device="cpu")
    model.load_state_dict(merge_state_dicts(sds, base_sd, ta_scale))
    return model.to(device).eval(), tok


# ---------------------------------------------------------------------------------------------
# ---- decoding: router + one KV cache per expert, in lock-step ----
# ---------------------------------------------------------------------------------------------


class _Stream:
    """One model's incremental forward over a growing left-padded batch: `fed` positions are in its KV cache;
    `advance(seq, mask, pos)` feeds the positions it has not seen (the whole prompt the first time = prefill; the
    tokens since its last use under --lazy_experts; one token otherwise) and returns the last hidden state."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.cache, self.fed = model, DynamicCache(), 0
        self.backbone, self.head = C.backbone_and_head(model)
        self.kw = C.cache_kwarg(self.backbone)

    def advance(self, seq, mask, pos) -> torch.Tensor:
        L = seq.shape[1]
        with C.autocast(seq.device):
            out = self.backbone(input_ids=seq[:, self.fed:L], attention_mask=mask[:, :L], position_ids=pos[:, self.fed:L],
                                use_cache=True, **{self.kw: self.cache})
        self.fed = L
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return h[:, -1]  # (B, d)

    def logp(self, h: torch.Tensor, V: int) -> torch.Tensor:  # (B, d) -> (B, V) fp32
        return torch.log_softmax(C.head_logits(self.model, self.head, h)[:, :V], -1)


def pick_token(logp: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logp.argmax(-1)
    return torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def fused_generate(router: Router | None, experts: Sequence, tok, prompts: Sequence[str], max_new_tokens: int,
                   mode: str = "sum", temperature: float = 0.0, generator=None, lazy: bool = False) -> dict:
    """Token-level collaboration decoding. mode: sum | expert_only | router_only (Eq. (2) with I*_t = argmax W h_t,
    Eq. (1)), or token_conf (training-free: the expert with the highest max-probability decodes; no router).
    The router (when used) runs every step; experts run every step, or with `lazy` only at steps where some row
    selects one, catching up the tokens it missed (pitfall 7: a skipped expert's cache is stale until then).
    Logits are sliced to the shared vocabulary len(tok). Returns texts, response_ids / response_mask (B, T),
    choice (B, T) (-1 after a row ended), logprobs (B, T) of the decoded distribution at the chosen tokens,
    expert_forwards (token positions the experts processed)."""
    device = next(experts[0].parameters()).device
    seq, mask = C.encode_prompts(tok, prompts, device)
    B, V, n = seq.shape[0], len(tok), len(experts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    stops = torch.tensor(C.stop_ids(experts[0], tok), device=device)
    pos = C.position_ids(mask)
    generator = C.device_generator(generator, device)
    use_router = mode != "token_conf"
    rstream = _Stream(router.lm) if use_router else None
    streams = [_Stream(m) for m in experts]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    toks, alive, choices, logps, fed = [], [], [], [], 0
    for t in range(max_new_tokens):
        lr = choice = None
        if use_router:
            h = rstream.advance(seq, mask, pos)
            lr = rstream.logp(h, V)
            choice = router.scores(h).argmax(-1)  # I*_t, Eq. (1)
        need = range(n) if (not lazy or mode == "token_conf" or choice is None) else sorted(set(choice[~finished].tolist()))
        if mode == "router_only":
            need = []  # the router alone decodes: no expert forward at all
        le_all = {}
        for i in need:
            before = streams[i].fed
            le_all[i] = streams[i].logp(streams[i].advance(seq, mask, pos), V)  # (B, V)
            fed += (seq.shape[1] - before) * B
        if mode == "token_conf":
            conf = torch.stack([le_all[i].amax(-1) for i in range(n)], -1)  # (B, n) max log-prob
            choice = conf.argmax(-1)
        le = None
        if need:
            le = torch.zeros((B, V), device=device)
            for i in need:
                le = torch.where((choice == i)[:, None], le_all[i], le)
        fused = combine_logprobs(lr, le, "expert_only" if mode == "token_conf" else mode)  # Eq. (2)
        nxt = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), pick_token(fused, temperature, generator))
        toks.append(nxt), alive.append(~finished), choices.append(choice.masked_fill(finished, -1))
        logps.append(fused.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(finished, 0.0))
        finished = finished | torch.isin(nxt, stops)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        seq = torch.cat([seq, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    resp, rmask = torch.stack(toks, 1), torch.stack(alive, 1).long()
    texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(resp.cpu(), rmask.cpu())]
    return dict(texts=texts, response_ids=resp, response_mask=rmask, choice=torch.stack(choices, 1),
                logprobs=torch.stack(logps, 1), expert_forwards=fed)


# ---------------------------------------------------------------------------------------------
# ---- data ----
# ---------------------------------------------------------------------------------------------


def render(tok, prompt: str, chat: bool) -> str:
    """The text router and experts all continue (pitfall 1: one chat template, identical prefixes)."""
    return C.render_chat(tok, [{"role": "user", "content": prompt}]) if chat else prompt


def read_rows(path: str, keys: Sequence[str]) -> list[dict]:
    rows = C.read_jsonl(path, keys, with_lines=True)
    for line, row in rows:
        require(all(isinstance(row[k], (str, int, float)) for k in keys), f"{path}:{line}: {', '.join(keys)} must be text")
    require(rows, f"{path} holds no rows")
    return [r for _, r in rows]


def train_rows(args, data: dict, tok, chat: bool) -> list[dict]:
    """SFT rows {prompt (rendered), response, answer, problem}: the toy SFT set or --train_file's first rows."""
    if "train" in data:
        return [dict(prompt=render(tok, str(r["prompt"]), chat), response=str(r["response"]), answer=r.get("answer"),
                     problem=None) for r in data["train"][:args.train_size]]
    return [dict(prompt=p.prompt, response=p.trace, answer=p.answer, problem=p)
            for p in toy_sft_set(args.toy_ops, args.seed, args.train_size)]


def eval_sets(args, data: dict, tok, chat: bool) -> dict[str, list[dict]]:
    """{test set: [{prompt, answer, problem}]}: the toy's six test sets, or --eval_file grouped by 'domain'."""
    if "eval" in data:
        out: dict[str, list[dict]] = {}
        for r in data["eval"]:
            out.setdefault(str(r.get("domain", "all")), []).append(
                dict(prompt=render(tok, str(r["prompt"]), chat), answer=r["answer"], problem=None))
        return {k: v[:args.eval_size] for k, v in out.items()}
    return {name: [dict(prompt=p.prompt, answer=p.answer, problem=p) for p in toy_test_set(args.toy_ops, name, args.eval_size)]
            for name in TEST_SETS}


def batch_indices(seed: int, tag: str, step: int, n_rows: int, size: int) -> list[int]:
    """The global batch of an update: rows step*size ... of a seeded permutation per pass over the data, so a
    resumed run draws the same batches and the batch does not depend on the number of ranks."""
    out = []
    for i in range(step * size, step * size + size):
        epoch, j = divmod(i, n_rows)
        out.append(random.Random(f"fusionroute-{tag}-{seed}-{epoch}").sample(range(n_rows), n_rows)[j])
    return out


def max_tokens(args, rows: Sequence[dict]) -> int:
    if args.max_new_tokens:
        return args.max_new_tokens
    if all(r.get("problem") is not None for r in rows):
        return max(5 * len(r["problem"].steps) + 3 for r in rows)  # "s op x r;" per step, "=r", EOS
    return 512


# ---------------------------------------------------------------------------------------------
# ---- per-token expert statistics and fused sequence log-probs ----
# ---------------------------------------------------------------------------------------------


def response_positions(tok, prompts, responses, device, add_eos=True):
    """ids, mask (B, L) and the flattened positions that predict a response token (EOS included): sel (B, L-1)
    bool, y (N,) those tokens (row-major, ascending positions)."""
    ids, mask, resp = C.encode_pairs(tok, list(prompts), list(responses), add_eos=add_eos, device=device)
    sel = resp[:, 1:].bool()
    return ids, mask, sel, ids[:, 1:][sel]


def expert_hidden(experts, ids, mask, sel) -> list[torch.Tensor]:
    """Each frozen expert's final hidden states at the selected positions: n x (N, d_i), under no_grad."""
    out = []
    with torch.no_grad(), C.autocast(ids.device):
        for m in experts:
            h, _ = C.hidden_states(m, ids, mask)
            out.append(h[:, :-1][sel])
    return out


def expert_logit_fns(experts, hs: Sequence[torch.Tensor], V: int) -> list[Callable]:
    return [lambda s, e, m=m, h=h: C.head_logits(m, m.get_output_embeddings(), h[s:e])[:, :V] for m, h in zip(experts, hs)]


@torch.no_grad()
def expert_token_stats(experts, tok, rows: Sequence[dict], batch_size: int, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per SFT row: (R, n) gold-token log-probs l_i,t(y_t) and (R, n) argmax tokens of every expert at its R
    response positions (EOS included), computed once (the experts are frozen and the rows fixed): the routing
    targets of Eq. (4) need only these, never the full (T, V) distributions."""
    out, V = [], None
    device = next(experts[0].parameters()).device
    for b in range(0, len(rows), batch_size):
        chunk_rows = rows[b:b + batch_size]
        ids, mask, sel, y = response_positions(tok, [r["prompt"] for r in chunk_rows], [r["response"] for r in chunk_rows], device)
        V = V or len(tok)
        gold, amax = [], []
        for fn in expert_logit_fns(experts, expert_hidden(experts, ids, mask, sel), V):
            g, a = [], []
            for s in range(0, y.numel(), chunk):
                e = min(y.numel(), s + chunk)
                lp = torch.log_softmax(fn(s, e).float(), -1)
                g.append(lp.gather(-1, y[s:e, None]).squeeze(-1)), a.append(lp.argmax(-1))
            gold.append(torch.cat(g)), amax.append(torch.cat(a))
        gold, amax = torch.stack(gold, -1).cpu(), torch.stack(amax, -1).cpu()  # (N, n)
        counts = sel.sum(1).tolist()
        out += list(zip(gold.split(counts), amax.split(counts)))
    return out


def sequence_fused_logp(router: Router, experts, tok, prompts, responses, chunk: int, fusion: str = "sum",
                        add_eos=True, hs_experts=None):
    """Eq. (7): (B,) sum over response tokens of log pi_final(y_t | s_t), I*_t = argmax W h_t along y under
    no_grad, the experts frozen. Grad flows into the router LM only where grad is enabled. Also returns the
    expert forward time."""
    device = next(router.parameters()).device
    ids, mask, sel, y = response_positions(tok, prompts, responses, device, add_eos)
    t0 = time.time()
    hs = expert_hidden(experts, ids, mask, sel) if fusion != "router_only" else []
    t_exp = time.time() - t0
    with C.autocast(device):
        h = router.hidden(ids, mask)[:, :-1][sel]  # (N, d)
    with torch.no_grad():
        choice = router.scores(h).argmax(-1)  # I*_t along y, no gradient path to W (pitfall 6)
    lp = fused_gold_logp(router.logits, h, expert_logit_fns(experts, hs, len(tok)), choice, y, chunk, fusion)  # (N,)
    row = torch.repeat_interleave(torch.arange(ids.shape[0], device=device), sel.sum(1))
    return torch.zeros(ids.shape[0], device=device).index_add(0, row, lp), t_exp


# ---------------------------------------------------------------------------------------------
# ---- training steps: stage 1 (Eq. (6)), direct_ft, stage 2 (Eq. (9)) ----
# ---------------------------------------------------------------------------------------------


def global_counts(args, stats: Sequence[tuple]) -> tuple[float, float]:
    """(response tokens, informative positions) of the whole global batch: the denominators of the per-token
    means (DEVIATION(4)), known from the cached stats before any forward, the same on every rank."""
    n_tok = sum(g.shape[0] for g, _ in stats)
    n_inf = n_tok if args.informative == "all" else sum(int(routing_targets(g, a)[1].sum()) for g, a in stats)
    return max(1.0, float(n_tok)), max(1.0, float(n_inf))


def sft_loss(args, router: Router, experts, tok, rows: Sequence[dict], stats: Sequence[tuple], n_tok: float, n_inf: float):
    """Eq. (6) on this rank's rows, as their share of the global-batch mean: L_LM (Eq. (3)) over n_tok global
    response tokens + lambda L_route (Eq. (5)) over n_inf global informative positions. Returns (loss, metrics
    as global sums, t_expert_forward)."""
    device = next(router.parameters()).device
    ids, mask, sel, y = response_positions(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], device)
    gold = torch.cat([g for g, _ in stats]).to(device)  # (N, n)
    amax = torch.cat([a for _, a in stats]).to(device)
    t0 = time.time()
    hs = expert_hidden(experts, ids, mask, sel) if args.sft_lm_target == "fused" else []
    t_exp = time.time() - t0
    with C.autocast(device):
        h = router.hidden(ids, mask)[:, :-1][sel]  # (N, d)
    scores = router.scores(h)  # (N, n), Eq. (1)
    targets, inf = routing_targets(gold, amax)  # Eq. (4)
    if args.informative == "all":
        inf = torch.ones_like(inf)
    per = route_loss(scores, targets, args.route_loss, gold)  # Eq. (5)
    l_route = (per * inf).sum() / n_inf
    choice = scores.detach().argmax(-1)
    fusion = "sum" if args.sft_lm_target == "fused" else "router_only"
    lp = fused_gold_logp(router.logits, h, expert_logit_fns(experts, hs, len(tok)), choice, y, args.logit_chunk, fusion)
    l_lm = -lp.sum() / n_tok  # Eq. (3)
    loss = l_lm + args.route_weight * l_route  # Eq. (6)
    hit = ((choice == targets) & inf).sum()
    m = dict(lm_loss=l_lm.detach(), route_loss=l_route.detach(), route_hits=hit.float(), informative=inf.sum().float())
    return loss, m, t_exp


def lm_only_loss(model, tok, rows: Sequence[dict], n_tok: float, chunk: int):
    """direct_ft: L_LM of the LM alone (no experts, no routing), the share of the global-batch mean."""
    device = next(model.parameters()).device
    ids, mask, resp = C.encode_pairs(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], device=device)
    with C.autocast(device):
        logp = C.token_logprobs(model, ids, mask, chunk_size=chunk)  # (B, L)
    l_lm = -(logp * resp).sum() / n_tok
    return l_lm, dict(lm_loss=l_lm.detach())


def cdpo_loss(args, router: Router, experts, tok, pairs: Sequence[dict]):
    """Eq. (8) on this rank's pairs (their share of the global-batch mean is taken by the caller): the fused
    policy's sequence log-probs against the cached reference. Returns (per-pair loss, margins, t_expert_forward)."""
    prompts = [p["prompt"] for p in pairs]
    pw, t1 = sequence_fused_logp(router, experts, tok, prompts, [p["chosen"] for p in pairs], args.logit_chunk,
                                 add_eos=[p["chosen_eos"] for p in pairs])
    pl, t2 = sequence_fused_logp(router, experts, tok, prompts, [p["rejected"] for p in pairs], args.logit_chunk,
                                 add_eos=[p["rejected_eos"] for p in pairs])
    dev = pw.device
    rw = torch.tensor([p["ref_chosen"] for p in pairs], device=dev)
    rl = torch.tensor([p["ref_rejected"] for p in pairs], device=dev)
    loss = dpo_loss(pw, pl, rw, rl, args.beta)  # Eq. (8)
    margin = (pw - rw) - (pl - rl)
    return loss, margin.detach(), t1 + t2


def _fused_opt(device) -> dict:
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def _all_reduce(values: dict, world: int) -> dict:
    """Sum 0-d metric tensors over ranks (each rank's values are its shares of global sums)."""
    if world == 1:
        return values
    import torch.distributed as dist

    keys = list(values)
    v = torch.stack([torch.as_tensor(values[k]).float().cpu() for k in keys])
    dist.all_reduce(v)
    return dict(zip(keys, v))


def train_loop(args, name: str, module: torch.nn.Module, step_fn: Callable, steps: int, w: dict, log: C.MetricLogger,
               offset: int) -> None:
    """The update loop shared by every trained part: AdamW on the module's trainable parameters, gradient averaging
    over ranks, clipping, a NaN stop, metrics.jsonl rows (step = offset + update), checkpoints every --save_every
    updates (module state, optimizer, RNGs) and resume from the newest complete one. step_fn(step) does the forward
    and backward of one update on this rank and returns (global-mean loss, metrics, times)."""
    device, rank, world = w["device"], w["rank"], w["world"]
    ckpt = os.path.join(args.output_dir, f"{name}_checkpoint")
    params = [p_ for p_ in module.parameters() if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0, **_fused_opt(device))  # DEVIATION(4)
    start = 0
    if args.resume and C.find_checkpoint(ckpt):
        st = C.load_checkpoint(ckpt, optimizer=opt, modules={name: module})
        start = st["step"]
        w["time"][name] = st["extra"]["time"]
    module.train()
    bar = tqdm(range(start, steps), desc=f"fusionroute[{name}]", initial=start, total=steps, disable=rank != 0)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss, m, times = step_fn(step)
        t0 = time.time()
        C.all_reduce_grads(module, world)
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times["t_optimizer"] = time.time() - t0
        m = _all_reduce(dict(loss=loss.detach(), **m), world)
        require(bool(torch.isfinite(m["loss"])), f"{name} loss is {float(m['loss'])} at update {step}; lower "
                f"--learning_rate (the last good checkpoint is kept in {ckpt})")
        row = log.log(offset + step + 1, stage=name, grad_norm=gnorm, **metrics_row(m),
                      **{k: round(v, 4) for k, v in times.items()})
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "route_acc", "cdpo_acc") if k in row}, refresh=False)
        w["time"][name] = {k: w["time"].get(name, {}).get(k, 0.0) + v for k, v in times.items()}
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            C.save_checkpoint(ckpt, optimizer=opt, step=step + 1, extra=dict(time=w["time"][name]), modules={name: module})
    bar.close()
    module.eval()


def metrics_row(m: dict) -> dict:
    """Global sums -> the logged rates: routing accuracy on informative positions, informative share, CDPO accuracy."""
    out = {k: v for k, v in m.items() if k not in ("route_hits", "informative", "tokens", "cdpo_hits", "pairs", "margin_sum")}
    if "route_hits" in m:
        out["route_acc"] = float(m["route_hits"]) / max(1.0, float(m["informative"]))
        out["informative_share"] = float(m["informative"]) / max(1.0, float(m["tokens"]))
    if "cdpo_hits" in m:
        out["cdpo_acc"] = float(m["cdpo_hits"]) / max(1.0, float(m["pairs"]))
        out["cdpo_margin"] = float(m["margin_sum"]) / max(1.0, float(m["pairs"]))
    return out


def sft_step_fn(args, w: dict, router: Router, rows: list[dict], stats: list[tuple], tag: str = "sft",
                scale: float = 1.0) -> Callable:
    """Stage 1 (Eq. (6)): one update's forward + backward on this rank's share of the global batch (gradient
    times `scale`: mu of Eq. (9) when it is stage 2's SFT batch)."""
    rank, world = w["rank"], w["world"]
    size = args.per_device_batch_size * world

    def step(k: int):
        idx = batch_indices(args.seed, tag, k, len(rows), size)
        n_tok, n_inf = global_counts(args, [stats[i] for i in idx])
        mine = idx[rank::world]
        t0 = time.time()
        loss, m, t_exp = sft_loss(args, router, w["experts"], w["tok"], [rows[i] for i in mine], [stats[i] for i in mine],
                                  n_tok, n_inf)
        t1 = time.time()
        (loss * (world * scale)).backward()  # all_reduce_grads averages: the exact single-process gradient
        m["tokens"] = torch.tensor(n_tok / world)  # summed over ranks -> n_tok
        return loss.detach(), m, dict(t_expert_forward=t_exp, t_forward=t1 - t0 - t_exp, t_backward=time.time() - t1)

    return step


def direct_step_fn(args, w: dict, model, rows: list[dict], stats: list[tuple]) -> Callable:
    """direct_ft: the router's data and budget, L_LM only, no experts. Its batches are the stage-1 batches (and,
    when CDPO runs, the stage-2 SFT batches after them)."""
    rank, world = w["rank"], w["world"]
    size = args.per_device_batch_size * world

    def step(k: int):
        tag, kk = ("sft", k) if k < w["sft_steps"] else ("cdpo_sft", k - w["sft_steps"])
        idx = batch_indices(args.seed, tag, kk, len(rows), size)
        n_tok = float(sum(stats[i][0].shape[0] for i in idx))
        t0 = time.time()
        loss, m = lm_only_loss(model, w["tok"], [rows[i] for i in idx[rank::world]], n_tok, args.logit_chunk)
        t1 = time.time()
        (loss * world).backward()
        return loss.detach(), m, dict(t_forward=t1 - t0, t_backward=time.time() - t1)

    return step


def cdpo_step_fn(args, w: dict, router: Router, pairs: list[dict], rows: list[dict], stats: list[tuple]) -> Callable:
    """Stage 2 (Eq. (9)): L_CDPO of a pair batch + mu L_SFT of an SFT batch, W frozen, the experts frozen."""
    rank, world = w["rank"], w["world"]
    sft = sft_step_fn(args, w, router, rows, stats, tag="cdpo_sft", scale=args.sft_mix)
    psize = args.pref_batch_size * world

    def step(k: int):
        idx = batch_indices(args.seed, "pairs", k, len(pairs), psize)
        mine = [pairs[i] for i in idx[rank::world]]
        t0 = time.time()
        per, margin, t_exp = cdpo_loss(args, router, w["experts"], w["tok"], mine)
        l_cdpo = per.sum() / psize  # this rank's share of the global mean, Eq. (8)
        t1 = time.time()
        (l_cdpo * world).backward()
        t2 = time.time()
        if args.sft_mix > 0:  # Eq. (9): the SFT batch keeps L_route and L_LM in the update (pitfall 4)
            l_sft, m, ts = sft(k)
        else:
            l_sft, m, ts = torch.tensor(0.0), {}, dict(t_expert_forward=0.0, t_forward=0.0, t_backward=0.0)
        m = {f"sft_{k_}" if k_ in ("lm_loss", "route_loss") else k_: v for k_, v in m.items()}
        m.update(cdpo_loss=l_cdpo.detach(), cdpo_hits=(margin > 0).float().sum(), pairs=torch.tensor(float(len(mine))),
                 margin_sum=margin.sum())
        times = dict(t_expert_forward=t_exp + ts["t_expert_forward"], t_forward=t1 - t0 - t_exp + ts["t_forward"],
                     t_backward=t2 - t1 + ts["t_backward"])
        return l_cdpo.detach() + args.sft_mix * l_sft, m, times

    return step


# ---------------------------------------------------------------------------------------------
# ---- evaluation: accuracy, routing accuracy, switches ----
# ---------------------------------------------------------------------------------------------


def routed_positions(problem: Problem) -> list[tuple[int, int]]:
    """DEVIATION(2): (response token position, expert index) of the result digit of every step whose operator
    has an expert; a step is 5 byte tokens "s op x r;", r at 5j + 3. The held-out operator has no right expert."""
    return [(5 * j + 3, EXPERT_OPS.index(op)) for j, (_, op, _, _) in enumerate(problem.steps) if op in EXPERT_OPS]


def score_batch(rows: Sequence[dict], texts: Sequence[str], choice: torch.Tensor | None, mask: torch.Tensor | None) -> np.ndarray:
    """Totals of one decoded batch: [correct, n, routed right, routed positions, switches, responses with a choice]."""
    tot = np.zeros(6)
    for b, (row, text) in enumerate(zip(rows, texts)):
        tot[0] += C.is_correct(text, row["answer"])
        tot[1] += 1
        if choice is None:
            continue
        if row.get("problem") is not None:
            for t, want in routed_positions(row["problem"]):
                if t < choice.shape[1] and mask[b, t]:
                    tot[2] += int(choice[b, t]) == want
                    tot[3] += 1
        tot[5] += 1
    if choice is not None:
        tot[4] += float(switches(choice, mask).sum())
    return tot


def totals_to_result(tot: np.ndarray, t: float, forwards: float) -> dict:
    correct, n, rr, rn, sw, ns = tot
    return dict(acc=correct / max(1, n), correct=int(correct), n=int(n), route_acc=(rr / rn) if rn else None,
                routed_right=int(rr), routed_n=int(rn), switches=(sw / ns) if ns else None,
                expert_token_forwards=int(forwards), t_decode=round(t, 2))


def decode_arm(args, w: dict, arm: str, prompts: list[str], mnt: int, gen) -> dict:
    """One arm's responses: a single LM (expert, merge, direct_ft) through common.generate, or the collaboration
    decoder (route_only / fusionroute with the trained router, token_conf without one)."""
    if arm in w["single_lms"]:
        model = w["single_lms"][arm]()
        with C.autocast(next(model.parameters()).device):
            g = C.generate(model, w["tok"], prompts, max_new_tokens=mnt, temperature=args.temperature, generator=gen)
        return dict(texts=g.texts, choice=None, response_mask=g.response_mask, expert_forwards=0)
    mode = {"token_conf": "token_conf", "route_only": "expert_only"}.get(arm.split(" ")[0], args.fusion)
    return fused_generate(w.get("router"), w["experts"], w["tok"], prompts, mnt, mode, args.temperature, gen,
                          lazy=args.lazy_experts)


def evaluate_arm(args, w: dict, arm: str, sets: dict[str, list[dict]]) -> dict:
    """{set: result} of one arm; prompts sharded over ranks, totals all-reduced. Expert arms keep their texts in
    w['expert_texts'] for seq_select."""
    out = {}
    for name, rows in sets.items():
        gen = torch.Generator().manual_seed(args.seed * 1009 + 17)
        mine, tot, fwd, t0 = rows[w["rank"]::w["world"]], np.zeros(6), 0.0, time.time()
        texts = []
        for i in range(0, len(mine), args.eval_batch_size):
            batch = mine[i:i + args.eval_batch_size]
            o = decode_arm(args, w, arm, [r["prompt"] for r in batch], max_tokens(args, batch), gen)
            m = o["response_mask"].cpu()
            tot += score_batch(batch, o["texts"], None if o["choice"] is None else o["choice"].cpu(), m)
            fwd += o["expert_forwards"]
            texts += o["texts"]
        if arm.startswith("expert:"):
            w["expert_texts"].setdefault(name, {})[arm] = texts
        tot, fwd = _sum_ranks(tot, fwd, w["world"])
        out[name] = totals_to_result(tot, time.time() - t0, fwd)
    return out


def _sum_ranks(tot: np.ndarray, fwd: float, world: int):
    if world == 1:
        return tot, fwd
    import torch.distributed as dist

    t = torch.tensor(list(tot) + [fwd], dtype=torch.float64)
    dist.all_reduce(t)
    return t[:-1].numpy(), float(t[-1])


@torch.no_grad()
def mean_token_logp(model, tok, prompts: list[str], responses: list[str], chunk: int) -> torch.Tensor:
    """(B,) mean log-prob of each response's tokens (EOS included) under `model`: seq_select's loglik score."""
    ids, mask, resp = C.encode_pairs(tok, prompts, responses, device=next(model.parameters()).device)
    with C.autocast(ids.device):
        logp = C.token_logprobs(model, ids, mask, chunk_size=chunk)
    return (logp * resp).sum(-1) / resp.sum(-1).clamp(min=1)


def seq_select(args, w: dict, sets: dict[str, list[dict]], selector: str) -> dict:
    """Sequence-level collaboration: every expert writes a full answer (the expert arms' texts); `oracle` takes a
    correct one if any (the upper bound of any selector), `loglik` the highest mean log-prob under the router LM
    (DEVIATION(3))."""
    out = {}
    for name, rows in sets.items():
        mine = rows[w["rank"]::w["world"]]
        cand = [w["expert_texts"][name][a] for a in w["expert_arms"]]  # n x [texts]
        n, tot, t0 = len(cand), np.zeros(6), time.time()
        for i in range(0, len(mine), args.eval_batch_size):
            batch = mine[i:i + args.eval_batch_size]
            texts = [[c[i + b] for c in cand] for b in range(len(batch))]  # (b, n)
            if selector == "oracle":
                picks = [next((t for t in ts if C.is_correct(t, r["answer"])), ts[0]) for ts, r in zip(texts, batch)]
            else:
                s = mean_token_logp(w["router"].lm, w["tok"], [r["prompt"] for r in batch for _ in range(n)],
                                    [t for ts in texts for t in ts], args.logit_chunk).view(len(batch), n)
                picks = [ts[int(k)] for ts, k in zip(texts, s.argmax(-1))]
            tot += score_batch(batch, picks, None, None)
        tot, _ = _sum_ranks(tot, 0.0, w["world"])
        out[name] = totals_to_result(tot, time.time() - t0, 0.0)
    return out


def sanity_gates(res: dict, w: dict) -> dict:
    """Pitfall 8: each toy expert >= 0.95 on its operator and <= 0.3 on the other experts' operators."""
    out = {}
    for i, op in enumerate(EXPERT_OPS):
        r = res[w["expert_arms"][i]]
        own = r[op]["acc"]
        other = max(r[o]["acc"] for o in EXPERT_OPS if o != op)
        out[op] = dict(own=own, max_other=other, ok=own >= 0.95 and other <= 0.3)
    return out


# ---------------------------------------------------------------------------------------------
# ---- setup, preflight, stages ----
# ---------------------------------------------------------------------------------------------


def preflight(args) -> dict:
    """Before any write: model configs load, every tokenizer encodes a probe identically, data files parse, the
    stage-1 router file loads."""
    from transformers import AutoTokenizer

    data = {}
    if not is_toy(args):
        names = [args.router_init] + expert_names(args) + ([args.base_model] if args.base_model else [])
        for name in names:
            C.preflight_model(name)
        toks = {}
        for name in names:
            try:
                toks[name] = AutoTokenizer.from_pretrained(os.path.expanduser(name))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the tokenizer of '{name}' ({str(e).splitlines()[0][:150]})") from None
        check_tokenizers(toks)
        if {"merge_avg", "merge_ta"} & set(args.method):  # pitfall 9: merging needs one architecture (and one init)
            from transformers import AutoConfig

            keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
            cfgs = {n: AutoConfig.from_pretrained(os.path.expanduser(n)) for n in expert_names(args) + [args.base_model or args.router_init]}
            shapes = {n: tuple(getattr(c, k, None) for k in keys) for n, c in cfgs.items()}
            ref = next(iter(shapes.values()))
            bad = [n for n, v in shapes.items() if v != ref]
            require(not bad, f"merge_avg / merge_ta average weights, but '{bad[0] if bad else ''}' has another architecture "
                    f"({dict(zip(keys, shapes[bad[0]])) if bad else ''}); drop them from --method or pass experts "
                    "fine-tuned from one --base_model")
        if args.train_file:
            data["train"] = read_rows(args.train_file, ("prompt", "response"))
        if args.pref_file:
            data["pref"] = read_rows(args.pref_file, ("prompt", "chosen", "rejected"))
        elif args.stage != "sft":
            require(args.train_file and all("answer" in r for r in data["train"]), "CDPO needs --pref_file, or "
                    "'answer' in every --train_file row (pairs from the stage-1 model's wrong answers)")
        data["eval"] = read_rows(args.eval_file, ("prompt", "answer"))
    if args.router_path:
        require(os.path.isfile(args.router_path), f"--router_path '{args.router_path}' does not exist; pass the "
                "router_sft.pt of a --stage sft / both run")
        data["router_state"] = C.load_file(args.router_path)
        require(isinstance(data["router_state"], dict) and "W.weight" in data["router_state"],
                f"--router_path '{args.router_path}' is not a router_sft.pt of this file")
    return data


def has_progress(out: str) -> bool:
    return any(os.path.exists(os.path.join(out, f)) for f in ("router_sft.pt", "eval.json")) or any(
        C.find_checkpoint(os.path.join(out, f"{s}_checkpoint")) for s in ("sft", "cdpo", "direct_ft"))


def save_state(path: str, module: torch.nn.Module) -> None:
    """A stage's result, written whole then renamed (a kill never leaves half of it)."""
    if C.is_main():
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(module.state_dict(), tmp)
        os.replace(tmp, path)


def setup_world(args, device, data: dict, rank: int, world: int) -> dict:
    """Tokenizer, frozen experts (bf16 on CUDA, no grad), the router (theta from --router_init, W), data rows."""
    paths = model_paths(args)
    dt = frozen_dtype(args, device)
    experts, toks = [], {}
    for p_ in paths["experts"]:
        m, t = load_frozen(p_, dt, device)
        experts.append(m)
        toks[p_] = t
    lm, tok = C.load_lm(paths["router_init"], dtype=torch.float32, device=device)
    check_tokenizers({paths["router_init"]: tok, **toks})  # again on the loaded objects
    chat = args.chat_template == "auto" and getattr(tok, "chat_template", None) is not None
    w = dict(device=device, rank=rank, world=world, paths=paths, experts=experts, tok=tok, chat=chat, time={},
             expert_texts={}, sft_steps=args.sft_steps)
    w["expert_arms"] = [f"expert:{op}" for op in EXPERT_OPS] if is_toy(args) else [
        f"expert:{os.path.basename(p_.rstrip('/'))}" for p_ in paths["experts"]]
    w["router"] = new_router(args, lm)
    w["rows"] = train_rows(args, data, tok, chat)
    w["sets"] = eval_sets(args, data, tok, chat)
    single = {a: (lambda m=m: m) for a, m in zip(w["expert_arms"], experts)}
    w["single_lms"] = single
    return w


def new_router(args, lm) -> Router:
    if args.lora_r:
        apply_lora(lm, args.lora_r, args.lora_alpha)
    return Router(lm, len(expert_names(args)), seed=args.seed)


def stage_sft(args, w: dict, log: C.MetricLogger, stats: list) -> None:
    """Stage 1: Eq. (6) for --sft_steps updates; result router_sft.pt."""
    path = os.path.join(args.output_dir, "router_sft.pt")
    if os.path.isfile(path):  # finished before a --resume
        w["router"].load_state_dict(torch.load(path, map_location=w["device"]))
        return
    t = time.time()
    train_loop(args, "sft", w["router"], sft_step_fn(args, w, w["router"], w["rows"], stats), args.sft_steps, w, log, 0)
    save_state(path, w["router"])
    w["time"]["sft_stage_s"] = round(time.time() - t, 1)


@torch.no_grad()
def build_pairs(args, w: dict, data: dict) -> list[dict]:
    """DEVIATION(5): CDPO pairs (--pref_file rows, or y_w = the reference answer and y_l = the stage-1 fused
    model's greedy wrong answer on training prompts) and the reference's sequence log-probs (Eq. (8): the fused
    stage-1 model with the same experts, pitfall 5), computed once."""
    router, tok = w["router"], w["tok"]
    if "pref" in data:
        pairs = [dict(prompt=render(tok, str(r["prompt"]), w["chat"]), chosen=str(r["chosen"]), rejected=str(r["rejected"]),
                      chosen_eos=True, rejected_eos=True) for r in data["pref"][:args.num_pairs]]
    else:
        if "train" in data:
            cands = [r for r in w["rows"] if r.get("answer") is not None]
        else:
            rng = random.Random(f"fusionroute-pairs-{args.toy_ops}-{args.seed}")
            cands = [(lambda p: dict(prompt=p.prompt, response=p.trace, answer=p.answer, problem=p))(sft_problem(rng, args.toy_ops))
                     for _ in range(20 * args.num_pairs)]
        pairs, stop_ids = [], set(C.stop_ids(w["experts"][0], tok))
        for i in range(0, len(cands), args.eval_batch_size):
            batch = cands[i:i + args.eval_batch_size]
            o = fused_generate(router, w["experts"], tok, [r["prompt"] for r in batch], max_tokens(args, batch), "sum",
                               0.0, None, lazy=args.lazy_experts)
            for b, (r, text) in enumerate(zip(batch, o["texts"])):
                if not C.is_correct(text, r["answer"]):
                    n_tok = int(o["response_mask"][b].sum())
                    ended = n_tok > 0 and int(o["response_ids"][b, n_tok - 1]) in stop_ids
                    pairs.append(dict(prompt=r["prompt"], chosen=r["response"], rejected=text, chosen_eos=True, rejected_eos=ended))
            if len(pairs) >= args.num_pairs:
                break
        pairs = pairs[:args.num_pairs]
    require(pairs, "no CDPO pairs: the stage-1 model answered every candidate correctly (pass --pref_file)")
    for i in range(0, len(pairs), args.eval_batch_size):
        chunk = pairs[i:i + args.eval_batch_size]
        for key in ("chosen", "rejected"):
            lp, _ = sequence_fused_logp(router, w["experts"], tok, [p["prompt"] for p in chunk], [p[key] for p in chunk],
                                        args.logit_chunk, add_eos=[p[f"{key}_eos"] for p in chunk])
            for p, v in zip(chunk, lp.tolist()):
                p[f"ref_{key}"] = v
    return pairs


def stage_cdpo(args, w: dict, data: dict, log: C.MetricLogger, stats: list, offset: int) -> None:
    """Stage 2: Eq. (9) for --cdpo_steps updates, W frozen (its routing still moves with h_t: pitfall 4, hence
    the SFT batch with L_route in every update); result router_cdpo.pt."""
    path = os.path.join(args.output_dir, "router_cdpo.pt")
    if os.path.isfile(path):
        w["router"].load_state_dict(torch.load(path, map_location=w["device"]))
        return
    t = time.time()
    ppath = os.path.join(args.output_dir, "pairs.json")
    if os.path.isfile(ppath):
        with open(ppath) as f:
            pairs = json.load(f)
    else:
        pairs = build_pairs(args, w, data)
        if C.is_main():
            C.write_json(ppath, pairs)
    w["n_pairs"] = len(pairs)
    w["router"].W.weight.requires_grad_(False)  # Eq. (8): W frozen, only theta is updated
    train_loop(args, "cdpo", w["router"], cdpo_step_fn(args, w, w["router"], pairs, w["rows"], stats), args.cdpo_steps,
               w, log, offset)
    save_state(path, w["router"])
    w["time"]["cdpo_stage_s"] = round(time.time() - t, 1)


def stage_direct_ft(args, w: dict, log: C.MetricLogger, stats: list, offset: int):
    """direct_ft: the router's initialisation trained with L_LM alone on the same rows and batches, for the same
    number of updates (stage 1, plus stage 2's SFT batches when CDPO runs); result direct_ft.pt."""
    lm, _ = C.load_lm(w["paths"]["router_init"], dtype=torch.float32, device=w["device"])
    if args.lora_r:
        apply_lora(lm, args.lora_r, args.lora_alpha)
    path = os.path.join(args.output_dir, "direct_ft.pt")
    if os.path.isfile(path):
        lm.load_state_dict(torch.load(path, map_location=w["device"]))
        return lm.eval()
    t = time.time()
    steps = (args.sft_steps if args.stage != "cdpo" else 0) + (args.cdpo_steps if args.stage != "sft" else 0)
    w["sft_steps"] = args.sft_steps if args.stage != "cdpo" else 0
    train_loop(args, "direct_ft", lm, direct_step_fn(args, w, lm, w["rows"], stats), steps, w, log, offset)
    save_state(path, lm)
    w["time"]["direct_ft_stage_s"] = round(time.time() - t, 1)
    return lm.eval()


def resume_step(args) -> int:
    """The metrics.jsonl row to keep up to: rows are numbered sft 1..S, cdpo S+1..S+D, direct_ft after them."""
    out, S, D = args.output_dir, args.sft_steps if args.stage != "cdpo" else 0, args.cdpo_steps if args.stage != "sft" else 0
    for name, off, done in (("direct_ft", S + D, "direct_ft.pt"), ("cdpo", S, "router_cdpo.pt"), ("sft", 0, "router_sft.pt")):
        if os.path.isfile(os.path.join(out, done)):
            return off + (S if name == "sft" else D if name == "cdpo" else S + D)
        ck = C.checkpoint_step(os.path.join(out, f"{name}_checkpoint"))
        if ck is not None:
            return off + ck
    return 0


def run_arms(args, w: dict, res: dict, arms: list[str], save) -> None:
    """Evaluate each arm not yet in `res` (finished arms survive a --resume in eval.json)."""
    for arm in arms:
        if arm in res:
            continue
        t = time.time()
        if arm.startswith("seq_select"):
            res[arm] = seq_select(args, w, w["sets"], arm.split("(")[1].rstrip(")"))
        else:
            res[arm] = evaluate_arm(args, w, arm, w["sets"])
        tqdm.write(f"[eval] {arm}: " + "  ".join(f"{k} {v['acc']:.2f}" for k, v in res[arm].items()) +
                   f"  ({time.time() - t:.0f}s)") if w["rank"] == 0 else None
        save()


def main(args):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    C.set_cpu_threads()
    validate_args(args)  # 1. flags; nothing loaded or written
    if args.table:
        return run_table(args)
    data = preflight(args)  # 2. models, tokenizers, data files, the stage-1 router
    rank, world, device = C.ddp_setup()
    C.start_run(args, has_checkpoint=has_progress(args.output_dir), ignore=RESUME_IGNORE)  # 3. args.json
    if args.device:
        device = C.pick_device(args.device)
    if args.max_steps:
        args.sft_steps, args.cdpo_steps = min(args.sft_steps, args.max_steps), min(args.cdpo_steps, args.max_steps)
    t0 = time.time()
    C.seed_everything(args.seed)
    w = setup_world(args, device, data, rank, world)
    log = C.MetricLogger(args.output_dir, resume_step=resume_step(args) if args.resume else None)
    epath = os.path.join(args.output_dir, "eval.json")
    tpath = os.path.join(args.output_dir, f"expert_texts.rank{rank}.json")  # this rank's shard of every expert answer
    res = {}
    if args.resume and os.path.isfile(epath):
        with open(epath) as f:
            res = json.load(f)
        with open(tpath) as f:
            w["expert_texts"] = json.load(f)

    def save():
        C.write_json(tpath, w["expert_texts"])
        if rank == 0:
            C.write_json(epath, res)

    # the experts first: the sanity gates stop a toy run before any training (pitfall 8)
    if is_toy(args) or "expert" in args.method or "seq_select" in args.method:
        run_arms(args, w, res, w["expert_arms"], save)
    gates = sanity_gates(res, w) if is_toy(args) else None
    if gates:
        print("[gates] " + "  ".join(f"expert {op}: own {g['own']:.2f}, others <= {g['max_other']:.2f}"
                                     f" {'ok' if g['ok'] else 'FAILED'}" for op, g in gates.items()), flush=True)
        require(not args.sanity_gates or all(g["ok"] for g in gates.values()), "sanity gates failed (pitfall 8: each "
                "toy expert must score >= 0.95 on its operator and <= 0.3 on the others'); rebuild the experts with "
                "more --toy_steps, or pass --no-sanity_gates")
    t = time.time()
    stats = expert_token_stats(w["experts"], w["tok"], w["rows"], args.eval_batch_size, args.logit_chunk)
    w["time"]["expert_stats_s"] = round(time.time() - t, 1)
    router_arms = [a for a in ("route_only", "fusionroute") if a in args.method]
    if args.stage in ("sft", "both"):
        stage_sft(args, w, log, stats)
    else:
        w["router"].load_state_dict(data["router_state"])
    if args.stage == "both":  # the stage-1 router's arms: the --stage sft ablation inside the same run
        run_arms(args, w, res, [f"{a} (sft)" for a in router_arms], save)
    if args.stage in ("cdpo", "both"):
        stage_cdpo(args, w, data, log, stats, args.sft_steps if args.stage == "both" else 0)
    run_arms(args, w, res, router_arms + [f"seq_select ({s})" for s in ("oracle", "loglik") if args.seq_selector in
                                          ("both", s)] * ("seq_select" in args.method) + ["token_conf"] * ("token_conf" in args.method), save)
    for kind in ("merge_avg", "merge_ta"):
        if kind in args.method and kind not in res:
            merged = merged_model(w["paths"], kind, args.ta_scale, device)[0]
            w["single_lms"][kind] = lambda m=merged: m
            run_arms(args, w, res, [kind], save)
            del w["single_lms"][kind], merged
    if "direct_ft" in args.method and "direct_ft" not in res:
        S = args.sft_steps if args.stage != "cdpo" else 0
        D = args.cdpo_steps if args.stage != "sft" else 0
        lm = stage_direct_ft(args, w, log, stats, S + D)
        w["single_lms"]["direct_ft"] = lambda: lm
        run_arms(args, w, res, ["direct_ft"], save)
    finish(args, w, res, gates, t0)
    C.ddp_cleanup()


# ---------------------------------------------------------------------------------------------
# ---- summary, plot, final line ----
# ---------------------------------------------------------------------------------------------


def finish(args, w: dict, res: dict, gates: dict | None, t0: float) -> None:
    if w["rank"] != 0:
        return
    rows = C.read_jsonl(os.path.join(args.output_dir, "metrics.jsonl"))
    summary = dict(stage=args.stage, method=args.method, seed=args.seed, toy_ops=args.toy_ops if is_toy(args) else None,
                   fusion=args.fusion, informative=args.informative, route_loss=args.route_loss,
                   sft_lm_target=args.sft_lm_target, router_init=w["paths"]["router_init"], experts=w["paths"]["experts"],
                   results=res, gates=gates, n_pairs=w.get("n_pairs"), last_train=last_train(rows), time=w["time"],
                   wall_time_s=round(time.time() - t0, 1), device=str(w["device"]))
    C.write_json(os.path.join(args.output_dir, "summary.json"), summary)
    name = "toy " + args.toy_ops if is_toy(args) else os.path.basename(args.router_init.rstrip("/"))
    plot_run(rows, res, os.path.join(args.output_dir, "fusionroute.png"), f"fusionroute | {name} | seed {args.seed}")
    print(final_line(summary, t0), flush=True)


def last_train(rows: list[dict]) -> dict:
    """The last logged value of each training metric, per stage."""
    out: dict = {}
    for r in rows:
        out.setdefault(r.get("stage", "?"), {}).update({k: v for k, v in r.items() if k not in ("step", "stage")})
    return out


def final_line(s: dict, t0: float) -> str:
    res = s["results"]
    sets = list(next(iter(res.values()))) if res else []

    def accs(label):
        return "/".join(f"{res[label][k]['acc']:.2f}" for k in sets)

    show = [a for a in ("fusionroute", "fusionroute (sft)", "route_only", "direct_ft", "seq_select (oracle)", "token_conf",
                        "merge_avg") if a in res]
    best = max((a for a in res if a.startswith("expert:")), key=lambda a: np.mean([res[a][k]["acc"] for k in sets]),
               default=None)
    parts = [f"{a} {accs(a)}" for a in show] + ([f"best expert ({best}) {accs(best)}"] if best else [])
    ra = res.get("fusionroute", {})
    routed = [v for v in ra.values() if v.get("route_acc") is not None]
    extra = ""
    if routed:
        extra = (f"  | fusionroute routing acc {sum(v['routed_right'] for v in routed) / max(1, sum(v['routed_n'] for v in routed)):.2f}"
                 f", switches/response {np.mean([v['switches'] for v in ra.values()]):.1f}")
    return f"done in {(time.time() - t0) / 60:.1f} min, acc {'/'.join(sets)}: " + "  ".join(parts) + extra


def plot_run(rows: list[dict], res: dict, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for stage, c in (("sft", "C0"), ("cdpo", "C1"), ("direct_ft", "C2")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("stage") == stage]
        if pts:
            axes[0].plot(*zip(*pts), lw=1, color=c, label=f"{stage} loss")
        pts = [(r["step"], r["route_acc"]) for r in rows if r.get("stage") == stage and "route_acc" in r]
        if pts:
            axes[1].plot(*zip(*pts), lw=1, color=c, label=f"{stage}: routing acc (informative)")
        pts = [(r["step"], r["cdpo_acc"]) for r in rows if r.get("stage") == stage and "cdpo_acc" in r]
        if pts:
            axes[1].plot(*zip(*pts), lw=1, color="C3", label="cdpo: pair accuracy")
    axes[0].set(xlabel="update", ylabel="loss", title="training loss (Eqs. (6), (9); direct_ft L_LM)", yscale="log")
    axes[1].set(xlabel="update", ylabel="rate", title="routing accuracy, Eq. (4) targets; CDPO accuracy", ylim=(0, 1.02))
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    if res:
        labels, sets = list(res), list(next(iter(res.values())))
        ys = np.arange(len(labels))
        for j, k in enumerate(sets):
            axes[2].barh(ys + (j - (len(sets) - 1) / 2) * 0.8 / len(sets), [res[a][k]["acc"] for a in labels],
                         0.8 / len(sets), label=k)
        axes[2].set_yticks(ys, labels, fontsize=7)
        axes[2].invert_yaxis()
        axes[2].set(xlabel="final-answer accuracy", xlim=(0, 1), title="accuracy per arm and test set")
        axes[2].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ---- the toy table ----
# ---------------------------------------------------------------------------------------------


TABLE_RUNS = (("main", ["--stage", "both"]),
              ("informative_all", ["--stage", "both", "--informative", "all", "--method", "route_only,fusionroute"]),
              ("route_marginal", ["--stage", "both", "--route_loss", "marginal", "--method", "route_only,fusionroute"]),
              ("lm_fused", ["--stage", "both", "--sft_lm_target", "fused", "--method", "route_only,fusionroute"]))


def run_table(args):
    """Every (operator set, seed, run) as a subprocess (finished ones are skipped, so it resumes), then table.md,
    table.json and table.png."""
    seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
    sets = [s.strip() for s in args.table_sets.split(",") if s.strip()]
    keep = ["--sft_steps", str(args.sft_steps), "--cdpo_steps", str(args.cdpo_steps), "--eval_size", str(args.eval_size),
            "--train_size", str(args.train_size), "--num_pairs", str(args.num_pairs)]
    keep += ["--max_steps", str(args.max_steps)] if args.max_steps else []
    keep += ["--toy_steps", ",".join(map(str, args.toy_steps))] + ([] if args.sanity_gates else ["--no-sanity_gates"])
    os.makedirs(args.output_dir, exist_ok=True)
    summaries = {}
    for ops in sets:
        for s in seeds:
            for name, flags in TABLE_RUNS:
                if name == "main" and args.method != list(ARMS):  # a subset of arms (quick tables, tests)
                    flags = flags + ["--method", ",".join(args.method)]
                key = f"{ops}-{name}-s{s}"
                out = os.path.join(args.output_dir, "runs", key)
                summ = os.path.join(out, "summary.json")
                if name not in args.table_runs.split(",") and not os.path.isfile(summ):
                    continue
                if not os.path.isfile(summ):
                    cmd = [sys.executable, os.path.abspath(__file__), *keep, *flags, "--toy_ops", ops, "--seed", str(s),
                           "--output_dir", out]
                    cmd += ["--resume"] if os.path.isfile(os.path.join(out, "args.json")) and has_progress(out) else ["--overwrite"]
                    print(f"[table] {' '.join(cmd[2:])}", flush=True)
                    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
                    require(r.returncode == 0, f"table run {key} failed (exit {r.returncode}): {last}")
                    print("  " + last, flush=True)
                with open(summ) as f:
                    summaries[key] = json.load(f)
    md = write_table(summaries, sets, seeds, args.output_dir)
    print(md, flush=True)




def table_rows(summaries: dict, ops: str, seeds: list[int]) -> list[tuple[str, dict]]:
    """(row label, {column: [per-seed values]}) of one operator set: every arm of the main run, then the
    ablation runs' router arms. Columns: each test set's accuracy, routing accuracy (pooled over test sets), and
    switches per response (mean over test sets)."""
    rows = []
    for name, _ in TABLE_RUNS:
        runs = [summaries[k] for s in seeds if (k := f"{ops}-{name}-s{s}") in summaries]
        if not runs:
            continue
        labels = [a for a in runs[0]["results"] if name == "main" or not a.startswith("expert:")]
        for lab in labels:
            col = {k: [r["results"][lab][k]["acc"] for r in runs] for k in TEST_SETS}
            col["route_acc"] = [(sum(v["routed_right"] for v in r["results"][lab].values()) /
                                 max(1, sum(v["routed_n"] for v in r["results"][lab].values())))
                                if any(v["routed_n"] for v in r["results"][lab].values()) else None for r in runs]
            col["switches"] = [np.mean([v["switches"] for v in r["results"][lab].values()])
                               if all(v["switches"] is not None for v in r["results"][lab].values()) else None for r in runs]
            col["minutes"] = [r["wall_time_s"] / 60 for r in runs]
            rows.append((lab if name == "main" else f"{lab}, {name.replace('_', ' ')}", col))
    return rows


def write_table(summaries: dict, sets: list[str], seeds: list[int], out: str) -> str:
    parts = []
    for ops in sets:
        rows = table_rows(summaries, ops, seeds)
        if not rows:
            continue
        n = sorted({v["n"] for k, s in summaries.items() if k.startswith(ops) for r in s["results"].values() for v in r.values()})
        parts.append(f"**--toy_ops {ops}** (greedy final-answer accuracy, mean ± std over seeds {','.join(map(str, seeds))}; "
                     f"{'/'.join(map(str, n))} held-out problems per test set; routing accuracy at result digits of expert "
                     f"operators, pooled over test sets)\n")
        parts.append("| arm | " + " | ".join(TEST_SETS) + " | routing acc | switches / response |")
        parts.append("|---" * (len(TEST_SETS) + 3) + "|")
        for lab, col in rows:
            parts.append(f"| {lab} | " + " | ".join(C.mean_std(col[k]) for k in TEST_SETS) + f" | {C.mean_std(col['route_acc'])} | "
                         f"{C.mean_std(col['switches'])} |")
        mins = {name: np.mean([summaries[f"{ops}-{name}-s{s}"]["wall_time_s"] / 60 for s in seeds if f"{ops}-{name}-s{s}" in summaries])
                for name, _ in TABLE_RUNS if any(f"{ops}-{name}-s{s}" in summaries for s in seeds)}
        parts.append("\nminutes per run: " + ", ".join(f"{k} {v:.1f}" for k, v in mins.items()) + "\n")
    md = "\n".join(parts) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    C.write_json(os.path.join(out, "table.json"), summaries)
    plot_table(summaries, sets, seeds, os.path.join(out, "table.png"))
    return md


def plot_table(summaries: dict, sets: list[str], seeds: list[int], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ops, table_rows(summaries, ops, seeds)) for ops in sets]
    panels = [(o, r) for o, r in panels if r]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 7), squeeze=False)
    for ax, (ops, rows) in zip(axes[0], panels):
        ys = np.arange(len(rows))
        for j, k in enumerate(TEST_SETS):
            m = [np.mean(col[k]) for _, col in rows]
            sd = [np.std(col[k], ddof=1) if len(col[k]) > 1 else 0 for _, col in rows]
            ax.barh(ys + (j - (len(TEST_SETS) - 1) / 2) * 0.8 / len(TEST_SETS), m, 0.8 / len(TEST_SETS), xerr=sd, label=k)
        ax.set_yticks(ys, [lab for lab, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="final-answer accuracy, mean ± std over seeds", title=f"--toy_ops {ops}")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"fusionroute | toy | seeds {','.join(map(str, seeds))}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_args())
