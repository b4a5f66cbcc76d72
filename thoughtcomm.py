"""thoughtcomm.py: thought communication between agents (latent thoughts, not only text), in one file.

Paper: "Thought Communication in Multiagent Collaboration", Zheng, Zhao, Li, Xie, Gao, Zhang, Zhang (CMU, Meta AI,
MBZUAI), NeurIPS 2025, arXiv 2510.20733, https://arxiv.org/abs/2510.20733. No code was released; Eqs. 6-12 follow
two public third-party reproductions (AUMEZAK/thoughtcomm, Weber-LiWb/EXPERIMENT.2026.ThoughtComm), which agree.

Idea. The agents' model states are generated from latent "thoughts" by an unknown invertible map, H = f(Z); the
support of f's Jacobian says which thoughts each agent's state depends on. The paper proves that the thoughts
shared by any two agents, their private thoughts and the sharing structure are identifiable (no auxiliary
information). In practice an autoencoder over all agents' states, whose decoder Jacobian is l1-sparse, recovers
Z and the structure; each agent then receives, as a prefix in the next debate round, the latents relevant to it,
weighted by how many agents share them. The LLM stays frozen; only the prefix adapter (and the weights) train.

Equations (n_a agents, state dim d, n_h = n_a d, n_z latents; rows r of agent i: r in R_i):
  (1) debate             round 1: each agent answers; round r > 1: question + the others' round r-1 answers;
                         final answer = majority vote (ties: lowest agent index)
  (2) states             H_r^(i) = last-layer hidden state of the last token of agent i's round-r response,
                         from one extra forward over the finished sequences; H_r = concat_i H_r^(i)   (B, n_h)
  (6) autoencoder        Zhat = std(enc(H)), Hhat = dec(Zhat); std = per-batch standardisation, no affine
  (7) AE loss            L_AE = ||H - Hhat||^2 / n_h + lambda_t ||J_dec(Zhat)||_1 / n_h,
                         lambda_t = lambda min(1, 3 t / T)   (linear ramp over the first third)
  (8) structure          S[i, j] = mean_{samples, r in R_i} |J_rj|; rel = S / max_i S; M = rel > tau;
                         alpha_j = sum_i M_ij (agreement); latents with alpha_j = 0 are dropped
  (9-10) routing         Ztil^(i) = M_i * w[alpha] * Zhat   (fixed length n_z; one scalar w per agreement level)
  (11) prefix            P^(i) = g(Ztil^(i)) in R^{m x d}, g = MLP with GELU; prepended to agent i's input
                         embeddings in round r + 1 (inputs_embeds + a matching attention mask)
  (12) adapter loss      L = sum_i [1 - cos(e(y_gen), e(y_ref))] - log p(y_gen | context, P^(i)); e = mean of the
                         teacher-forced last-layer states; `--adapter_loss task`: NLL of the reference answer
  metrics                block R^2 (RBF kernel ridge) of each estimated latent block against each true block;
                         MCC (mean |corr| after Hungarian matching); accuracy and consensus per debate round

Parts:
  A (default): synthetic identifiability. Z ~ Laplace(0, 1) i.i.d. in groups; X_i = f_i(Z of agent i) with f_i
    a square invertible 3-layer LeakyReLU(0.2) MLP with orthogonal weights; standardised; N = 10,000.
    2 agents: [A-private | shared | B-private], k = 4 each. 3 agents (`--num_agents 3`): all-shared 2,
    pairwise 3 x 2, private 3 x 2 (true alpha histogram {3: 2, 2: 6, 1: 6}).
  B (`--part B`): tiny HF agents on an erased-facts task (`FactsWorld`): 10 facts with the 3-agent sharing
    pattern, each value erased with p = 0.4 per agent; agent i answers the sum of its 6 true values; debate,
    states, AE, routing, prefix adapter, every arm; counting bounds per run (`facts_bounds`).
  real (`--model_name_or_path ... --train_file ... --eval_file ...`): the same pipeline (`QAWorld`) on any HF
    causal LM: the tokenizer's chat template applied once per prompt (Qwen3 thinking off), all agents and
    problems of a round in one batched generate (chunks of --gen_batch_size rows), states from one extra
    forward, prefixes through inputs_embeds, bf16 autocast on GPUs, gradient checkpointing while the adapter
    trains, the answer parsed from the last \\boxed{}, majority vote. torchrun shards the problems: states are
    gathered, rank 0 trains the AE and broadcasts it, the adapter trains data-parallel (gradients averaged).

Deviations from the paper:
  1. Part A and Part B are toys of our own (the spec's); the paper's synthetic setup is not public.
     `# DEVIATION(1)`
  2. `--state mean` (mean of the last-layer states over the prompt tokens) is offered beside the paper's
     last-token state: a 64-dim last-token state of a tiny model may hold little besides its answer.
     `# DEVIATION(2)`
  3. Part B's agent was pretrained with a fixed random prefix code A * onehot(true values) on half of its
     examples, so that a frozen tiny agent can read a prefix at all (a real LLM reads soft prompts without it);
     half of those carry only the rows of the values some holder saw (the code perfectly shared thoughts give).
     Measured reason for the partial codes: an agent pretrained on complete codes only read the partial code at
     0.36 accuracy (no prefix 0.11), yet its answer NLL was higher with it (2.3-2.7) than without (0.85-0.89): it
     is confidently wrong when a row is missing, so the `task` objective pushed the adapter away from the code.
     `# DEVIATION(3)`
  4. Part B's agent answers the integer sum of its 6 true values (0..36), not the spec's sum mod 7: a sum mod 7
     of 6 values is independent of any 5 of them (parity-like), so SGD gets no signal; measured: the spec's
     agent (2000 steps) scored 0.13 / 0.13 / 0.14 per agent with every value visible, with or without the oracle
     prefix (chance 1/7), while the integer-sum agent read the oracle prefix at 0.99 after 2000 steps.
     The counting bounds barely move (`facts_bounds` on the 500 evaluation problems of seeds 0-2: single
     0.16-0.17, perfect use of shared facts 0.37-0.38; the spec had 0.18 and 0.38).
     `# DEVIATION(4)`

Reconstructed (the record is silent; our choice):
  per-batch standardisation of Zhat (closes the l1 scale loophole: shrink the decoder, inflate Z); the lambda
  ramp; relative thresholding (per latent, over agents) with tau = 0.1; the finite-difference Jacobian
  estimator (eps 1e-2, `--jac_cols` sampled columns scaled by n_z / cols; exact = torch.func.jacrev);
  `--refit` (an AE whose per-agent decoder heads read only that agent's latents); one AE per round; gradient
  clipping 1.0 and best-checkpoint selection (by held-out reconstruction + penalty after the ramp); RBF kernel
  ridge for block R^2 (median-distance bandwidth, ridge 1e-3, 2000 train / 1000 test); n_latent for the toys
  (12 and 14 = the true count); Part B's task, prompts and `--adapter_loss task`; the AE reads states
  standardised per dimension with the training problems' statistics (Part B / real); the real debate prompt
  (question + instruction, round r > 1 adds the other agents' full responses, Du et al.) and the `task`
  target "The answer is \\boxed{a}."; raw_state sends every agent the same prefix (no routing).
  maft (Multiagent Finetuning, arXiv 2501.05707, simplified to one iteration and generation agents only, as the spec
  says): text debate on the training problems, agent i's final-round responses whose answer equals the majority
  vote train agent i's own LoRA (r 8, alpha 16 on q/k/v/o, Adam 1e-4, --max_steps steps, per-response mean token
  NLL, clip 1.0; one frozen base with a LoRA per agent selected per batch row, so a round stays one batched
  generate); the fine-tuned agents then debate the evaluation problems from round 1 (round1_base = the base's).

Commands:
  toy A, CPU (~4-6 min under this machine's load, ~30 s unloaded):  python thoughtcomm.py
  toy A, 3 agents:                                                 python thoughtcomm.py --num_agents 3
  lambda = 0 control:                                              python thoughtcomm.py --lambda_jac 0
  toy A table (arms x seeds):                python thoughtcomm.py --table --table_seeds 0,1,2
  toy B:                                     python thoughtcomm.py --part B --num_agents 3 --method thoughtcomm
  several GPUs (problems sharded):           torchrun --nproc_per_node 8 thoughtcomm.py --model_name_or_path ... (as below)
  one GPU, real model:  python thoughtcomm.py --model_name_or_path Qwen/Qwen3-0.6B --train_file data/math_l3_train500.jsonl \
                          --eval_file data/math_l3_eval500.jsonl --num_agents 3 --rounds 2 --n_latent 1024 \
                          --ae_width 2048 --prefix_len 1 --max_new_tokens 512 --jac_cols 64 --ae_steps 3000 \
                          --gen_batch_size 512
  real-model baselines:  the same command with --method debate | single | maft (a LoRA per agent, one iteration)

Outputs: args.json, metrics.jsonl (AE / refit / adapter / maft losses, lambda_t, time per phase), summary.json,
thoughtcomm.png, responses.jsonl (Part B / real: every evaluation round's response and answer per problem and agent),
checkpoint/ (resume with the same command plus --resume; kill -9 + --resume reaches the same summary.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C

# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------

METHODS_A = ("thoughtcomm", "oracle_mask")
METHODS_B = ("single", "debate", "thoughtcomm", "broadcast", "random_mask", "raw_state", "oracle_latent", "oracle",
             "oracle_partial")
METHODS_REAL = METHODS_B[:-3] + ("maft",)  # maft (Multiagent Finetuning) fine-tunes real models only (spec 3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run
    p.add_argument("--part", default="A", choices=["A", "B"], help="toy world: A = synthetic identifiability, "
                   "B = tiny HF agents on the erased-facts task (ignored with --model_name_or_path)")
    p.add_argument("--method", default="thoughtcomm", help="A: thoughtcomm | oracle_mask (refit with the true M); "
                   "B: single | debate | thoughtcomm | broadcast | random_mask | raw_state | oracle_latent (the adapter "
                   "fed perfectly recovered thoughts) | oracle (the true prefix code) | oracle_partial (the true code of the "
                   "values some holder saw: what perfectly used shared thoughts give); real: B's minus the oracles, "
                   "plus maft (Multiagent Finetuning: a LoRA per agent on its majority-agreeing responses, then debate)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling")
    p.add_argument("--output_dir", default=None, help="default runs/thoughtcomm/<part>-<method>-seed<seed>")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False, help="continue the same run")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a finished run in --output_dir")
    p.add_argument("--save_every", type=int, default=1000, help="checkpoint every this many optimizer steps")
    p.add_argument("--log_every", type=int, default=200, help="metrics.jsonl row every this many steps")
    p.add_argument("--table", action=argparse.BooleanOptionalAction, default=False,
                   help="run the toy table (arms x --table_seeds) into --output_dir and write table.md")
    p.add_argument("--table_seeds", default="0,1,2", help="seeds of --table")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write thoughtcomm.png")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: best available)")
    # debate (Eq. 1)
    p.add_argument("--num_agents", type=int, default=2, help="n_a: agents (Part A: 2 or 3; Part B: 3)")
    p.add_argument("--rounds", type=int, default=2, help="debate rounds R")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the agents")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus p of the agents")
    p.add_argument("--max_new_tokens", type=int, default=512, help="response token limit (every arm the same)")
    p.add_argument("--state", default="last", choices=["last", "mean"],
                   help="H^(i): last-token last-layer state (paper) or mean over prompt tokens (DEVIATION 2)")
    # autoencoder (Eqs. 6-8)
    p.add_argument("--n_latent", type=int, default=0, help="n_z, latents of the AE (0 = the toy's true count; 1024 real)")
    p.add_argument("--ae_width", type=int, default=64, help="hidden width of the 3-layer AE MLPs")
    p.add_argument("--ae_steps", type=int, default=6000, help="AE Adam steps (T of the lambda ramp)")
    p.add_argument("--ae_lr", type=float, default=1e-3, help="AE learning rate")
    p.add_argument("--ae_batch_size", type=int, default=256, help="AE batch size")
    p.add_argument("--lambda_jac", type=float, default=0.5, help="lambda of Eq. (7), weight of the Jacobian l1 term")
    p.add_argument("--jac", default="fd", choices=["fd", "exact"], help="Jacobian l1 estimator: finite differences or jacrev")
    p.add_argument("--jac_cols", type=int, default=0, help="latent columns sampled per step for fd (0 = all n_z)")
    p.add_argument("--jac_samples", type=int, default=128, help="samples of each batch that enter the Jacobian term")
    p.add_argument("--tau", type=float, default=0.1, help="tau of Eq. (8): relative threshold of the structure")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain an AE whose per-agent decoder heads read only M_i's latents (reconstruction only)")
    p.add_argument("--refit_steps", type=int, default=3000, help="Adam steps of the refit AE")
    # Part A world
    p.add_argument("--group_size", type=int, default=4, help="k: latents per group (2 agents; 3 agents use k/2)")
    p.add_argument("--n_samples", type=int, default=10000, help="N synthetic samples")
    p.add_argument("--r2_train", type=int, default=2000, help="kernel-ridge train samples of block R^2")
    p.add_argument("--r2_test", type=int, default=1000, help="kernel-ridge test samples of block R^2")
    # routing and prefix (Eqs. 9-12)
    p.add_argument("--agreement_weights", default="learn", choices=["learn", "fixed", "none"],
                   help="w of Eq. (10): one learnable scalar per agreement level (init 1), fixed at 1, or no routing "
                        "weights and no mask weighting by agreement")
    p.add_argument("--prefix_len", type=int, default=1, help="m: prefix vectors per agent (Eq. 11)")
    p.add_argument("--adapter_width", type=int, default=512, help="hidden width of the prefix adapter g")
    p.add_argument("--adapter_loss", default="task", choices=["eq12", "task"], help="Eq. (12) or the NLL of the answer")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="adapter (g and w) learning rate")
    p.add_argument("--max_steps", type=int, default=600, help="adapter steps (Part B / real)")
    p.add_argument("--per_device_batch_size", type=int, default=32, help="adapter batch (problems)")
    p.add_argument("--train_size", type=int, default=500, help="training problems (AE and adapter)")
    p.add_argument("--eval_size", type=int, default=500, help="evaluation problems (never encoded in training)")
    # maft (real models): one LoRA per agent, --max_steps steps of --per_device_batch_size responses
    p.add_argument("--lora_r", type=int, default=8, help="maft: LoRA rank r")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="maft: LoRA scale numerator (scale = alpha / r)")
    p.add_argument("--lora_lr", type=float, default=1e-4, help="maft: LoRA learning rate (Adam)")
    p.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj", help="maft: Linear names wrapped with LoRA")
    p.add_argument("--gate_min", type=float, default=0.9, help="Part B probe gate: stop unless a linear probe decodes "
                   "every observed fact from the states with at least this accuracy (0 = no gate)")
    p.add_argument("--agent_steps", type=int, default=3000, help="pretraining steps of Part B's toy agent (cached per value)")
    # real models
    p.add_argument("--model_name_or_path", default=None, help="HF causal LM (path or hub id); none = toy")
    p.add_argument("--train_file", default=None, help="jsonl with question / answer per line (real models)")
    p.add_argument("--eval_file", default=None, help="jsonl with question / answer per line (real models)")
    p.add_argument("--gen_batch_size", type=int, default=0,
                   help="rows per generate call (0 = all agents x problems of a round in one call)")
    p.add_argument("--ref_tokens", type=int, default=32, help="length of y_ref / y_gen of Eq. (12) (the toy caps at 3)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the frozen LLM while the adapter trains (default: on for real "
                        "models, off for the toy)")
    args = p.parse_args(argv)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.model_name_or_path is not None
    if args.output_dir is None:
        part = "real" if args.model_name_or_path else args.part
        args.output_dir = os.path.join("runs", "thoughtcomm", f"{part}-{args.method}-n{args.num_agents}-seed{args.seed}")
    return args


# Flags that do not change results (everything else must match on --resume).
RESUME_IGNORES = ("save_every", "device", "table_seeds", "plot", "gen_batch_size", "gradient_checkpointing", "log_every")


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work; nothing loaded or written."""
    req = C.require
    real = args.model_name_or_path is not None
    if real:
        req(args.method in METHODS_REAL, f"--method {args.method}: real models run one of {', '.join(METHODS_REAL)}")
        req(args.train_file and args.eval_file, "real models need --train_file and --eval_file (jsonl, one "
                                                "{\"question\": ..., \"answer\": ...} per line)")
        req(args.num_agents >= 2 or args.method == "single", f"--num_agents {args.num_agents}: debate needs >= 2")
    elif args.part == "A":
        req(args.method in METHODS_A, f"--method {args.method}: Part A runs one of {', '.join(METHODS_A)}")
        req(args.num_agents in (2, 3), f"--num_agents {args.num_agents}: Part A has sharing patterns for 2 or 3 agents")
        req(args.group_size >= 1 and (args.num_agents == 2 or args.group_size % 2 == 0),
            f"--group_size {args.group_size}: must be >= 1 (even for 3 agents: each group has k/2 latents)")
        req(args.n_samples >= args.r2_train + args.r2_test,
            f"--n_samples {args.n_samples} < --r2_train + --r2_test ({args.r2_train + args.r2_test}); raise it")
        req(args.r2_train >= 10 and args.r2_test >= 10, "--r2_train and --r2_test must be >= 10")
        req(args.method != "oracle_mask" or args.refit, "--method oracle_mask is a refit with the true mask: keep --refit")
    else:
        req(args.method != "maft", "--method maft fine-tunes real models only (spec 3): give --model_name_or_path, "
                                   "--train_file and --eval_file")
        req(args.method in METHODS_B, f"--method {args.method}: Part B runs one of {', '.join(METHODS_B)}")
        req(args.num_agents == 3, "Part B's facts world has the 3-agent sharing pattern: --num_agents 3")
    req(args.rounds >= 1 and (args.rounds >= 2 or args.method == "single"),
        f"--rounds {args.rounds}: debate needs >= 2 rounds (prefixes enter round 2)")
    req(args.num_agents >= 2 or args.method == "single", "--num_agents must be >= 2")
    req(args.ae_steps >= 1, f"--ae_steps {args.ae_steps}: must be >= 1")
    req(not args.refit or args.refit_steps >= 1, f"--refit_steps {args.refit_steps}: must be >= 1 with --refit")
    req(args.n_latent >= 0, f"--n_latent {args.n_latent}: must be >= 0 (0 = automatic)")
    req(args.ae_width >= 1 and args.adapter_width >= 1, "--ae_width and --adapter_width must be >= 1")
    req(args.ae_lr > 0 and args.learning_rate > 0, "--ae_lr and --learning_rate must be > 0")
    req(args.ae_batch_size >= 2, f"--ae_batch_size {args.ae_batch_size}: batch standardisation needs >= 2")
    req(1 <= args.jac_samples <= args.ae_batch_size, f"--jac_samples {args.jac_samples}: must be in [1, --ae_batch_size]")
    req(args.jac_cols >= 0, f"--jac_cols {args.jac_cols}: must be >= 0 (0 = all latents)")
    req(args.lambda_jac >= 0 and math.isfinite(args.lambda_jac), f"--lambda_jac {args.lambda_jac}: must be finite and >= 0")
    req(0 < args.tau < 1, f"--tau {args.tau}: must be in (0, 1) (a fraction of each latent's largest agent score)")
    req(args.n_samples >= args.ae_batch_size, f"--n_samples {args.n_samples} < --ae_batch_size {args.ae_batch_size}")
    req(args.prefix_len >= 1, f"--prefix_len {args.prefix_len}: must be >= 1")
    req(args.max_steps >= 0 and args.per_device_batch_size >= 1, "--max_steps must be >= 0, --per_device_batch_size >= 1")
    req(args.train_size >= 2 and args.eval_size >= 1, "--train_size must be >= 2 and --eval_size >= 1")
    req(args.temperature >= 0 and 0 < args.top_p <= 1, "--temperature must be >= 0 and --top_p in (0, 1]")
    req(args.max_new_tokens >= 1, f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    req(args.agent_steps >= 1, f"--agent_steps {args.agent_steps}: must be >= 1")
    req(0 <= args.gate_min <= 1, f"--gate_min {args.gate_min}: must be in [0, 1]")
    req(args.lora_r >= 1 and args.lora_alpha > 0 and args.lora_lr > 0,
        f"--lora_r {args.lora_r} must be >= 1, --lora_alpha {args.lora_alpha} and --lora_lr {args.lora_lr} > 0")
    req(any(t.strip() for t in args.lora_targets.split(",")), "--lora_targets is empty; pass e.g. q_proj,v_proj")
    req(args.gen_batch_size >= 0 and args.ref_tokens >= 1, "--gen_batch_size must be >= 0 and --ref_tokens >= 1")
    req(not (args.part == "A" and not real and int(os.environ.get("WORLD_SIZE", 1)) > 1),
        "Part A is a one-process CPU toy; run it without torchrun (torchrun shards Part B / real problems)")
    req(args.save_every >= 1 and args.log_every >= 1, "--save_every and --log_every must be >= 1")
    if args.table:
        try:
            seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        req(seeds, f"--table_seeds '{args.table_seeds}': a comma-separated list of integers, e.g. 0,1,2")
        req(not real and args.part == "A", "--table runs the Part A toy table; Part B arms run one by one (--method)")


# ---------------------------------------------------------------------------------------------
# ---- math: autoencoder, Jacobian, structure, routing (Eqs. 6-10) ----
# ---------------------------------------------------------------------------------------------


def mlp(n_in: int, width: int, n_out: int, act=None) -> nn.Sequential:
    """3-layer MLP (LeakyReLU 0.2 by default), as the reproductions' AE."""
    act = act or (lambda: nn.LeakyReLU(0.2))
    return nn.Sequential(nn.Linear(n_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, n_out))


def standardise(z: torch.Tensor) -> torch.Tensor:
    """(B, n_z) -> per-batch zero mean, unit variance per latent, no affine (reconstructed: with it the l1 term of
    Eq. 7 cannot be lowered by shrinking the decoder and inflating Z, pitfall 1)."""
    return (z - z.mean(0, keepdim=True)) / (z.std(0, keepdim=True) + 1e-6)


class AutoEncoder(nn.Module):
    """Eq. (6): Zhat = std(enc(H)), Hhat = dec(Zhat). With `masks` (n_a, n_z) the decoder is one head per agent
    that reads only that agent's latents (--refit); `slices` are the agents' rows of H."""

    def __init__(self, n_h: int, n_z: int, width: int, slices: Sequence[tuple[int, int]] | None = None,
                 masks: torch.Tensor | None = None):
        super().__init__()
        self.enc = mlp(n_h, width, n_z)
        self.slices = list(slices) if slices is not None else None
        if masks is None:
            self.dec = mlp(n_z, width, n_h)
            self.register_buffer("masks", torch.zeros(0))
        else:
            self.heads = nn.ModuleList(mlp(n_z, width, b - a) for a, b in self.slices)
            self.register_buffer("masks", masks.float())
            self.dec = self._masked_decode
        self.register_buffer("z_mean", torch.zeros(0))
        self.register_buffer("z_std", torch.zeros(0))

    @torch.no_grad()
    def freeze_stats(self, h: torch.Tensor) -> None:
        """Fix the standardisation to the training set's statistics, so that training and evaluation
        latents are normalised the same way (pitfall 5); call after training."""
        z = self.enc(h)
        self.z_mean, self.z_std = z.mean(0), z.std(0) + 1e-6

    def _masked_decode(self, z: torch.Tensor) -> torch.Tensor:  # (B, n_z) -> (B, n_h)
        return torch.cat([head(z * m) for head, m in zip(self.heads, self.masks)], -1)

    def encode(self, h: torch.Tensor) -> torch.Tensor:  # (B, n_h) -> (B, n_z)
        if self.z_mean.numel() and not self.training:
            return (self.enc(h) - self.z_mean) / self.z_std
        return standardise(self.enc(h))

    def forward(self, h: torch.Tensor):
        z = self.encode(h)
        return z, self.dec(z)


def jacobian_l1(decoder, z: torch.Tensor, kind: str = "fd", cols: int = 0, eps: float = 1e-2,
                generator: torch.Generator | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """||J_dec(z)||_1 averaged over the S rows of z (S, n_z): sum over all (n_h, n_z) entries of |d dec / d z|.

    fd: (dec(z + eps e_j) - dec(z)) / eps for `cols` latent columns j drawn without replacement (all if 0),
    in one batched decoder forward, scaled by n_z / cols; differentiable. exact: torch.func.jacrev (small n only:
    double backprop through vmap(jacrev) was ~30x slower on the toy, pitfall 6). `base` = dec(z) if at hand."""
    S, n_z = z.shape
    if kind == "exact":
        J = torch.func.vmap(torch.func.jacrev(decoder))(z)  # (S, n_h, n_z)
        return J.abs().sum((1, 2)).mean()
    c = n_z if cols <= 0 or cols >= n_z else cols
    idx = torch.arange(n_z) if c == n_z else torch.randperm(n_z, generator=generator)[:c]
    eye = torch.zeros(c, n_z, dtype=z.dtype, device=z.device)
    eye[torch.arange(c), idx.to(z.device)] = eps
    zp = (z[:, None, :] + eye[None]).reshape(S * c, n_z)  # (S*c, n_z)
    base = decoder(z) if base is None else base  # (S, n_h)
    J = (decoder(zp).view(S, c, -1) - base[:, None, :]) / eps  # (S, c, n_h)
    return J.abs().sum((1, 2)).mean() * (n_z / c)


@torch.no_grad()
def jacobian_abs_mean(decoder, z: torch.Tensor, kind: str = "fd", eps: float = 1e-2, chunk: int = 256) -> torch.Tensor:
    """(n_h, n_z) mean over the rows of z of |J_dec(z)|, the input of Eq. (8)."""
    out = 0.0
    for s in range(0, z.shape[0], chunk):
        zc = z[s:s + chunk]
        if kind == "exact":
            with torch.enable_grad():
                J = torch.func.vmap(torch.func.jacrev(decoder))(zc)  # (S, n_h, n_z)
        else:
            S, n_z = zc.shape
            zp = (zc[:, None, :] + eps * torch.eye(n_z, dtype=zc.dtype, device=zc.device)[None]).reshape(S * n_z, n_z)
            J = ((decoder(zp).view(S, n_z, -1) - decoder(zc)[:, None, :]) / eps).transpose(1, 2)  # (S, n_h, n_z)
        out = out + J.abs().sum(0)
    return out / z.shape[0]


def lambda_at(step: int, total: int, lam: float) -> float:
    """lambda_t: linear ramp from 0 over the first third of training (reconstructed)."""
    return lam * min(1.0, step / max(1.0, total / 3))


def ae_loss(h: torch.Tensor, h_hat: torch.Tensor, jac_l1: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (7): (L_AE, reconstruction term) with L_AE = ||H - Hhat||^2 / n_h + lam ||J||_1 / n_h, both
    averaged over samples. h, h_hat: (B, n_h)."""
    n_h = h.shape[1]
    rec = ((h - h_hat) ** 2).sum(1).mean() / n_h
    return rec + lam * jac_l1 / n_h, rec


def structure(jabs: torch.Tensor, slices: Sequence[tuple[int, int]], tau: float):
    """Eq. (8): jabs (n_h, n_z) mean |J| -> S (n_a, n_z), M (n_a, n_z) bool, alpha (n_z,).
    S[i, j] = mean over agent i's rows; rel = S / max_i S (per latent); M = rel > tau."""
    S = torch.stack([jabs[a:b].mean(0) for a, b in slices])  # (n_a, n_z)
    top = S.max(0, keepdim=True).values
    rel = torch.where(top > 0, S / top.clamp_min(1e-30), torch.zeros_like(S))
    M = rel > tau
    return S, M, agreement(M)


def agreement(M: torch.Tensor) -> torch.Tensor:
    """alpha_j = sum_i M_ij: how many agents depend on latent j. (n_a, n_z) -> (n_z,) long."""
    return torch.as_tensor(M).long().sum(0)


def route_latents(z_hat: torch.Tensor, M: torch.Tensor, agent: int, weights) -> torch.Tensor:
    """Eqs. (9-10): Ztil^(i) = M_i * w[alpha] * Zhat. z_hat (..., n_z); M (n_a, n_z); weights: a tensor indexed by
    agreement level (index 0 unused), a dict {level: w}, or None (all 1)."""
    M = torch.as_tensor(M)
    alpha = agreement(M)
    if weights is None:
        w = torch.ones(alpha.shape, dtype=z_hat.dtype, device=z_hat.device)
    elif isinstance(weights, dict):
        w = torch.tensor([float(weights.get(int(a), 0.0)) for a in alpha], dtype=z_hat.dtype, device=z_hat.device)
    else:
        w = weights[alpha.to(weights.device)]
    return z_hat * M[agent].to(z_hat.dtype).to(z_hat.device) * w


# ---------------------------------------------------------------------------------------------
# ---- math: identifiability metrics ----
# ---------------------------------------------------------------------------------------------


def kernel_ridge_r2(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
                    ridge: float = 1e-3) -> float:
    """R^2 (mean over y's dims) of RBF kernel ridge regression from x to y; bandwidth = median train distance,
    inputs and targets standardised with the train statistics."""
    x_tr, x_te, y_tr, y_te = (t.double() for t in (x_tr, x_te, y_tr, y_te))
    mx, sx = x_tr.mean(0), x_tr.std(0) + 1e-12
    my, sy = y_tr.mean(0), y_tr.std(0) + 1e-12
    xa, xb, ya, yb = (x_tr - mx) / sx, (x_te - mx) / sx, (y_tr - my) / sy, (y_te - my) / sy
    d2 = torch.cdist(xa, xa) ** 2
    bw2 = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=torch.float64)
    K = torch.exp(-d2 / bw2)
    coef = torch.linalg.solve(K + ridge * torch.eye(len(xa), dtype=K.dtype), ya)
    pred = torch.exp(-torch.cdist(xb, xa) ** 2 / bw2) @ coef
    sse = ((yb - pred) ** 2).sum(0)
    sst = ((yb - yb.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return float((1 - sse / sst).mean())


def block_r2(z_hat: torch.Tensor, z_true: torch.Tensor, blocks: Sequence[Sequence[int]],
             true_blocks: Sequence[Sequence[int]] | None = None, n_train: int = 2000, n_test: int = 1000) -> np.ndarray:
    """(n_est, n_true) matrix: R^2 of predicting true block q (columns of z_true) from estimated block p (columns
    of z_hat) by kernel ridge, first n_train rows to fit, next n_test to score. An empty block scores 0."""
    true_blocks = blocks if true_blocks is None else true_blocks
    out = np.zeros((len(blocks), len(true_blocks)))
    tr, te = slice(0, n_train), slice(n_train, n_train + n_test)
    for p, eb in enumerate(blocks):
        for q, tb in enumerate(true_blocks):
            if len(eb) and len(tb):
                x, y = z_hat[:, list(eb)], z_true[:, list(tb)]
                out[p, q] = kernel_ridge_r2(x[tr], y[tr], x[te], y[te])
    return out


def hungarian(cost: np.ndarray) -> list[int]:
    """Minimum-cost assignment of a square cost matrix: col[row] (O(n^3), potentials method)."""
    n = cost.shape[0]
    INF = float("inf")
    u, v, p, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [INF] * (n + 1), [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        if p[j]:
            col[p[j] - 1] = j - 1
    return col


def mcc(z_hat: torch.Tensor, z_true: torch.Tensor) -> float:
    """Mean |Pearson correlation| of true latents with estimated ones after Hungarian matching (each true latent
    matched to one estimated latent; the smaller set is padded with zero-correlation rows). (N, a), (N, b)."""
    a = (z_hat - z_hat.mean(0)) / (z_hat.std(0) + 1e-12)
    b = (z_true - z_true.mean(0)) / (z_true.std(0) + 1e-12)
    corr = (b.double().T @ a.double() / (len(a) - 1)).abs().numpy()  # (n_true, n_est)
    n = max(corr.shape)
    pad = np.zeros((n, n))
    pad[:corr.shape[0], :corr.shape[1]] = corr
    col = hungarian(-pad)
    return float(np.mean([pad[i, col[i]] for i in range(corr.shape[0])]))


def consensus_and_vote(answers: Sequence[str | None]) -> tuple[int, str | None]:
    """(consensus, vote) of one problem's agents: consensus 1 iff every agent gave the same parsable answer;
    vote = the most frequent parsable answer, ties to the lowest agent index (None if none parsed)."""
    parsed = [a for a in answers if a is not None]
    cons = int(len(parsed) == len(answers) and len(set(parsed)) == 1)
    if not parsed:
        return cons, None
    counts = Counter(parsed)
    top = max(counts.values())
    return cons, next(a for a in answers if a is not None and counts[a] == top)


# ---------------------------------------------------------------------------------------------
# ---- Part A: synthetic identifiability world ----
# ---------------------------------------------------------------------------------------------


def sharing_pattern(n_agents: int, k: int) -> torch.Tensor:
    """True M (n_a, n_z_true). 2 agents: [A-private k | shared k | B-private k]. 3 agents, k/2 latents per group:
    all-shared, pairs (0,1), (0,2), (1,2), privates 0, 1, 2."""
    if n_agents == 2:
        groups = [(0,), (0, 1), (1,)]
        size = k
    else:
        groups = [(0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)]
        size = k // 2
    M = torch.zeros(n_agents, size * len(groups), dtype=torch.bool)
    for g, members in enumerate(groups):
        for i in members:
            M[i, g * size:(g + 1) * size] = True
    return M


def invertible_mlp(x: torch.Tensor, gen: torch.Generator, layers: int = 3) -> torch.Tensor:
    """f(x): `layers` square layers with orthogonal weights and LeakyReLU(0.2) between them (invertible)."""
    d = x.shape[1]
    for l in range(layers):
        W, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        b = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
        x = x @ W.T + b
        if l < layers - 1:
            x = F.leaky_relu(x, 0.2)
    return x


def make_synthetic(n_agents: int, k: int, n: int, seed: int):  # DEVIATION(1): our own toy (the spec's Part A)
    """(Z (N, n_z_true), H (N, n_h) standardised, agent row slices, true M). Each agent observes as many dims as
    it has latents (square, invertible; pitfall 3)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    M = sharing_pattern(n_agents, k)
    lap = torch.distributions.Laplace(0.0, 1.0)
    u = torch.rand(n, M.shape[1], generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    Z = -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())  # Laplace(0, 1) by inverse CDF (seeded)
    del lap
    parts, slices, at = [], [], 0
    for i in range(n_agents):
        xi = invertible_mlp(Z[:, M[i]], gen)
        parts.append(xi)
        slices.append((at, at + xi.shape[1]))
        at += xi.shape[1]
    H = torch.cat(parts, 1)
    H = (H - H.mean(0)) / H.std(0)
    return Z.float(), H.float(), slices, M


def blocks_of(M: torch.Tensor, keep: torch.Tensor | None = None) -> dict[tuple, list[int]]:
    """{agents sharing the latent: [latent indices]} of a mask (n_a, n_z); latents outside `keep` are left out."""
    out: dict[tuple, list[int]] = {}
    for j in range(M.shape[1]):
        if keep is not None and not bool(keep[j]):
            continue
        key = tuple(int(i) for i in torch.nonzero(M[:, j]).flatten())
        if key:
            out.setdefault(key, []).append(j)
    return out


def alpha_histogram(alpha: torch.Tensor) -> dict[int, int]:
    """{agreement level: latents}, levels >= 1 (dropped latents are not counted)."""
    c = Counter(int(a) for a in alpha if int(a) > 0)
    return {k: c[k] for k in sorted(c, reverse=True)}


# ---------------------------------------------------------------------------------------------
# ---- Part A: training phases ----
# ---------------------------------------------------------------------------------------------

PHASES_A = ("forward", "jacobian", "backward", "optimizer")


def ae_step(ae: AutoEncoder, opt, h: torch.Tensor, lam: float, args, gen: torch.Generator) -> dict:
    """One AE update on a batch h (B, n_h): Eq. (7) with the Jacobian term on the first jac_samples rows."""
    t0 = time.perf_counter()
    z, h_hat = ae(h)
    t1 = time.perf_counter()
    if lam > 0:
        S = args.jac_samples
        jl1 = jacobian_l1(ae.dec, z[:S], args.jac, args.jac_cols, generator=gen, base=h_hat[:S])
    else:
        jl1 = torch.zeros(())
    t2 = time.perf_counter()
    loss, rec = ae_loss(h, h_hat, jl1, lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)  # pitfall 7
    opt.step()
    t4 = time.perf_counter()
    return dict(loss=loss.detach(), rec=rec.detach(), jac_l1=jl1.detach(), time_forward=t1 - t0, time_jacobian=t2 - t1,
                time_backward=t3 - t2, time_optimizer=t4 - t3, time_step=t4 - t0)


@torch.no_grad()
def heldout_loss(ae: AutoEncoder, h: torch.Tensor, lam: float, args) -> float:
    """Eq. (7) on a fixed held-out batch (all Jacobian columns): the best-checkpoint criterion."""
    z, h_hat = ae(h)
    jl1 = jacobian_l1(ae.dec, z[:args.jac_samples], "fd", 0) if lam > 0 else torch.zeros(())
    return float(ae_loss(h, h_hat, jl1, lam)[0])


class Stage:
    """One AE training stage (the sparse AE, or the refit): model, optimizer, best state, sampling generator."""

    def __init__(self, name: str, ae: AutoEncoder, steps: int, lam: float, args, seed: int):
        self.name, self.ae, self.steps, self.lam = name, ae, steps, lam
        self.opt = torch.optim.Adam(ae.parameters(), lr=args.ae_lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.best, self.best_loss = None, float("inf")

    def state(self) -> dict:
        return dict(ae=self.ae.state_dict(), opt=self.opt.state_dict(), gen=self.gen.get_state(), best=self.best,
                    best_loss=self.best_loss)

    def load(self, st: dict) -> None:
        for k in ("z_mean", "z_std"):  # frozen statistics (sized once frozen)
            setattr(self.ae, k, torch.zeros_like(st["ae"][k]))
        self.ae.load_state_dict(st["ae"])
        self.opt.load_state_dict(st["opt"])
        self.gen.set_state(st["gen"])
        self.best, self.best_loss = st["best"], st["best_loss"]


def train_stage(stage: Stage, H: torch.Tensor, h_val: torch.Tensor, args, log, step0: int, start: int, save) -> None:
    """Adam steps start..stage.steps of one stage; keeps the best state after the lambda ramp (pitfall 7)."""
    bar = tqdm(range(start, stage.steps), desc=f"thoughtcomm[{stage.name}]", initial=start, total=stage.steps,
               disable=not C.is_main(), leave=False)
    stage.ae.train()
    for t in bar:
        idx = torch.randint(0, len(H), (args.ae_batch_size,), generator=stage.gen)
        lam = lambda_at(t, stage.steps, stage.lam)
        m = ae_step(stage.ae, stage.opt, H[idx], lam, args, stage.gen)
        if not math.isfinite(float(m["loss"])):
            raise C.UserError(f"{stage.name}: the AE loss is {float(m['loss'])} at step {t}; lower --ae_lr or "
                              f"--lambda_jac (the last good checkpoint is kept)")
        done = t + 1
        if done % 100 == 0 and done >= stage.steps / 3:  # best checkpoint once lambda has reached its value
            val = heldout_loss(stage.ae, h_val, stage.lam, args)
            if val < stage.best_loss:
                stage.best_loss = val
                stage.best = {k: v.clone() for k, v in stage.ae.state_dict().items() if not k.startswith("z_")}
        if done % args.log_every == 0 or done == stage.steps:
            row = log.log(step0 + done, **{f"{stage.name}_{k}": v for k, v in m.items() if not k.startswith("time")},
                          lambda_t=lam, **{k: v for k, v in m.items() if k.startswith("time")})
            bar.set_postfix(rec=f"{row[stage.name + '_rec']:.4f}", jac=f"{row[stage.name + '_jac_l1']:.1f}", refresh=False)
        if done % args.save_every == 0 and done < stage.steps:
            save(stage.name, done)
    bar.close()
    if stage.best is not None:
        stage.ae.load_state_dict(stage.best, strict=False)
    stage.ae.freeze_stats(H)
    stage.ae.eval()


def n_latent_a(args, M_true: torch.Tensor) -> int:
    return args.n_latent or M_true.shape[1]


def evaluate_latents(ae: AutoEncoder, H: torch.Tensor, Z: torch.Tensor, M_est: torch.Tensor, alpha: torch.Tensor,
                     M_true: torch.Tensor, args) -> dict:
    """Block R^2 of every estimated block (latents grouped by their sharing pattern) against every true block,
    group sizes, alpha histogram, MCC."""
    with torch.no_grad():
        z = ae.encode(H)  # frozen training-set statistics
    est, true = blocks_of(M_est, keep=alpha > 0), blocks_of(M_true)
    keys = list(true)
    n = args.r2_train + args.r2_test
    r2 = block_r2(z[:n], Z[:n], [est.get(k, []) for k in keys], [true[k] for k in keys], args.r2_train, args.r2_test)
    name = lambda k: "+".join(map(str, k))  # noqa: E731
    off = r2[~np.eye(len(keys), dtype=bool)]
    return dict(block_r2={name(a): {name(b): round(float(r2[i, j]), 4) for j, b in enumerate(keys)}
                          for i, a in enumerate(keys)},
                r2_diag=[round(float(r2[i, i]), 4) for i in range(len(keys))], r2_diag_mean=float(np.diag(r2).mean()),
                r2_offdiag_max=float(off.max()) if off.size else 0.0,
                group_sizes={name(k): len(est.get(k, [])) for k in keys},
                other_groups={name(k): len(v) for k, v in est.items() if k not in true},
                true_sizes={name(k): len(v) for k, v in true.items()},
                alpha_hist=alpha_histogram(alpha), alpha_hist_true=alpha_histogram(agreement(M_true)),
                structure_exact=bool(torch.equal(M_est[:, alpha > 0].long().sum(1), M_true.long().sum(1))
                                     and sorted(map(tuple, M_est[:, alpha > 0].T.long().tolist()))
                                     == sorted(map(tuple, M_true.T.long().tolist()))),
                mcc=mcc(z[:n], Z[:n]))


def run_part_a(args, ckpt_dir: str, t_start: float) -> dict:
    """Sparse AE (Eqs. 6-7) -> structure (Eq. 8) -> optional refit -> identifiability metrics."""
    Z, H, slices, M_true = make_synthetic(args.num_agents, args.group_size, args.n_samples, args.seed)
    n_h, n_z = H.shape[1], n_latent_a(args, M_true)
    h_val = H[torch.randperm(len(H), generator=torch.Generator().manual_seed(args.seed + 7))[:512]]
    torch.manual_seed(args.seed)
    sparse = Stage("ae", AutoEncoder(n_h, n_z, args.ae_width), args.ae_steps, args.lambda_jac, args, args.seed + 1)
    st = C.load_checkpoint(ckpt_dir) if args.resume else None
    extra = st["extra"] if st else {}
    if st:
        sparse.load(extra["ae"])
    log = C.MetricLogger(args.output_dir, resume_step=st["step"] if st else None)
    refit: Stage | None = None
    M_est = alpha = None

    def save(name: str, done: int) -> None:
        step = done if name == "ae" else args.ae_steps + done
        C.save_checkpoint(ckpt_dir, step=step, extra=dict(
            ae=sparse.state(), refit=refit.state() if refit is not None and name == "refit" else None,
            M_est=M_est, elapsed=extra.get("elapsed", 0.0) + time.time() - t_start))

    ae_start = min(st["step"], args.ae_steps) if st else 0
    if args.method == "thoughtcomm":
        train_stage(sparse, H, h_val, args, log, 0, ae_start, save)
        jabs = jacobian_abs_mean(sparse.ae.dec, sparse.ae.encode(H[:1000]).detach(), args.jac)
        S, M_est, alpha = structure(jabs, slices, args.tau)  # Eq. (8)
    else:  # oracle_mask: refit with the true structure (the control the refit is judged against)
        M_est, alpha = M_true.clone(), agreement(M_true)
        if n_z != M_true.shape[1]:
            raise C.UserError(f"--method oracle_mask needs --n_latent {M_true.shape[1]} (the true count) or 0")
    result = {"sparse": evaluate_latents(sparse.ae, H, Z, M_est, alpha, M_true, args)} if args.method == "thoughtcomm" else {}
    final = sparse.ae
    if args.refit:
        keep = alpha > 0
        torch.manual_seed(args.seed + 3)
        refit = Stage("refit", AutoEncoder(n_h, n_z, args.ae_width, slices, masks=M_est & keep), args.refit_steps, 0.0,
                      args, args.seed + 2)
        if st and extra.get("refit") is not None:
            refit.load(extra["refit"])
        start = max(0, st["step"] - args.ae_steps) if st else 0
        train_stage(refit, H, h_val, args, log, args.ae_steps, start, save)
        result["refit"] = evaluate_latents(refit.ae, H, Z, M_est, alpha, M_true, args)
        final = refit.ae
    total = args.ae_steps + (args.refit_steps if args.refit else 0)
    extra_elapsed = extra.get("elapsed", 0.0)
    save("refit" if args.refit else "ae", args.refit_steps if args.refit else args.ae_steps)
    del final
    return dict(result, M_est=M_est.long().tolist(), M_true=M_true.long().tolist(), steps=total,
                elapsed_before=extra_elapsed, log=log)


def finish_part_a(args, res: dict, wall: float) -> dict:
    log = res.pop("log")
    head = res.get("refit") or res["sparse"]
    summary = dict(part="A", method=args.method, num_agents=args.num_agents, lambda_jac=args.lambda_jac, tau=args.tau,
                   seed=args.seed, refit_on=args.refit, wall_time_s=round(wall, 1),
                   time_per_step_s=time_split(C.read_jsonl(log.path)), **{k: v for k, v in res.items() if k != "elapsed_before"})
    C.write_json(os.path.join(args.output_dir, "summary.json"), summary)
    if args.plot:
        plot_part_a(args, summary, os.path.join(args.output_dir, "thoughtcomm.png"), log.path)
    sizes = " / ".join(f"{k}:{v}" for k, v in head["group_sizes"].items())
    print(f"done in {wall / 60:.1f} min: {'refit' if args.refit else 'sparse AE'} block R^2 diag "
          f"{' / '.join(f'{x:.2f}' for x in head['r2_diag'])}  offdiag max {head['r2_offdiag_max']:.2f}  "
          f"groups {sizes}  alpha {head['alpha_hist']} (true {head['alpha_hist_true']})  MCC {head['mcc']:.2f}  "
          f"({args.output_dir})", flush=True)
    return summary


def time_split(rows: list[dict]) -> dict:
    """Mean seconds per optimizer step of each phase over the logged rows."""
    steps = [r for r in rows if "time_step" in r]
    if not steps:
        return {}
    keys = sorted({k[5:] for r in steps for k in r if k.startswith("time_")})
    return {k: round(float(np.mean([r.get(f"time_{k}", 0.0) for r in steps])), 5) for k in keys}


def plot_part_a(args, summary: dict, png: str, jsonl: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = C.read_jsonl(jsonl)
    stages = [s for s in ("sparse", "refit") if s in summary]
    fig, axes = plt.subplots(1, 1 + len(stages), figsize=(4.6 * (1 + len(stages)), 3.8), squeeze=False)
    ax = axes[0, 0]
    for key, lab in (("ae_rec", "AE reconstruction"), ("refit_rec", "refit reconstruction")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=lab)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("||H - Hhat||^2 / n_h"), ax.legend(fontsize=8)
    for ax, s in zip(axes[0, 1:], stages):
        br = summary[s]["block_r2"]
        keys = list(br)
        mat = np.array([[br[a][b] for b in keys] for a in keys])
        ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(keys)):
            for j in range(len(keys)):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if mat[i, j] < 0.5 else "k")
        ax.set_xticks(range(len(keys)), keys, rotation=45, fontsize=7), ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.set_xlabel("true block (agents)"), ax.set_ylabel("estimated block")
        ax.set_title(f"{s}: alpha {summary[s]['alpha_hist']}", fontsize=8)
    fig.suptitle(f"thoughtcomm | part A, {args.num_agents} agents, lambda {args.lambda_jac} | seed {args.seed}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ---- Part B: the erased-facts world and its tiny HF agent ----
# ---------------------------------------------------------------------------------------------

N_FACTS, MOD, ERASE_P = 10, 7, 0.4
# fact 0: all agents; facts 1-2: agents 0+1; 3-4: 0+2; 5-6: 1+2; 7, 8, 9: private to agent 0, 1, 2
AGENT_FACTS = ((0, 1, 2, 3, 4, 7), (0, 1, 2, 5, 6, 8), (0, 3, 4, 5, 6, 9))
AGENT_RECIPE = dict(n_layer=2, d_model=64, n_head=4, steps=3000, batch_size=64, lr=3e-3, prefix_share=0.5, seed=0,
                    task="sum", partial_share=0.5, version=3)


def facts_problems(n: int, seed: int) -> list[dict]:
    """n problems: true values (10,) in {0..6} and erasures (3, 10) with probability 0.4 per agent and fact."""
    g = np.random.default_rng(seed)
    return [dict(values=g.integers(0, MOD, N_FACTS).tolist(), erased=(g.random((3, N_FACTS)) < ERASE_P).tolist())
            for _ in range(n)]


def facts_prompt(prob: dict, agent: int, others: Sequence[str | None] | None = None) -> str:
    """Round 1: '0=3 1=? 2=5 3=1 4=? 7=2>'; round r > 1 appends the other agents' previous answers: '|14 ?>'."""
    body = " ".join(f"{f}={'?' if prob['erased'][agent][f] else prob['values'][f]}" for f in AGENT_FACTS[agent])
    if others is not None:
        body += "|" + " ".join(a if a is not None else "?" for a in others)
    return body + ">"


def facts_answer(prob: dict, agent: int) -> str:
    """Agent i's target: the sum of the true values of its 6 facts (0..36). DEVIATION(4): the spec's sum mod 7
    was not learnable by the toy agent (see the docstring)."""
    return str(sum(prob["values"][f] for f in AGENT_FACTS[agent]))  # DEVIATION(4)


def parse_number(text: str) -> str | None:
    """The toy agent's answer: the integer its response starts with (leading digits), else None (unparsable)."""
    t = text.strip()
    n = len(t) - len(t.lstrip("0123456789"))
    return str(int(t[:n])) if n else None


def mode_prob(k: int) -> float:
    """max_s P(sum of k i.i.d. uniform{0..6} = s): the chance that the best guess of k unknown values' sum is right."""
    dist = np.array([1.0])
    for _ in range(k):
        dist = np.convolve(dist, np.full(MOD, 1.0 / MOD))
    return float(dist.max())


def facts_bounds(probs: Sequence[dict]) -> dict:
    """Counting bounds of Part B on these problems: `single` = an agent that knows its visible values and guesses
    the sum of its erased ones; `shared` = an agent that also recovers every erased fact some other agent sees
    (private erasures stay lost); oracle = 1."""
    single, shared = [], []
    for p in probs:
        for i, facts in enumerate(AGENT_FACTS):
            single.append(mode_prob(sum(p["erased"][i][f] for f in facts)))
            holders = [[j for j in range(3) if f in AGENT_FACTS[j]] for f in facts]
            shared.append(mode_prob(sum(all(p["erased"][j][f] for j in h) for f, h in zip(facts, holders))))
    return dict(single=float(np.mean(single)), shared=float(np.mean(shared)), oracle=1.0)


def recoverable_facts(probs: Sequence[dict]) -> torch.Tensor:
    """(B, 10 * 7) one-hot value of each fact that at least one of its holders saw (zeros where every holder has
    it erased): the latent thoughts a perfect AE could recover from all agents' states (`oracle_latent`)."""
    out = torch.zeros(len(probs), N_FACTS * MOD)
    for b, p in enumerate(probs):
        for f in range(N_FACTS):
            if any(not p["erased"][i][f] for i, facts in enumerate(AGENT_FACTS) if f in facts):
                out[b, f * MOD + p["values"][f]] = 1.0
    return out


def fact_mask() -> torch.Tensor:
    """True M (3, 10 * 7) of recoverable_facts: agent i depends on the 7 latents of each of its facts."""
    M = torch.zeros(len(AGENT_FACTS), N_FACTS * MOD, dtype=torch.bool)
    for i, facts in enumerate(AGENT_FACTS):
        for f in facts:
            M[i, f * MOD:(f + 1) * MOD] = True
    return M


def prefix_code(d: int, seed: int = 0) -> torch.Tensor:
    """A (6 * 7, d): the fixed random code the agent was pretrained to read (DEVIATION 3); row norm ~ 4."""
    g = torch.Generator().manual_seed(1234 + seed)
    return torch.randn(len(AGENT_FACTS[0]) * MOD, d, generator=g) / math.sqrt(d) * 4.0


def oracle_prefix(probs: Sequence[dict], agent: int, A: torch.Tensor, recoverable_only: bool = False) -> torch.Tensor:
    """(B, 1, d) = A^T onehot(true values of the agent's facts): the prefix an agent reads perfectly. With
    recoverable_only, a fact every holder has erased contributes no row (the code of perfectly shared thoughts)."""
    oh = torch.zeros(len(probs), len(AGENT_FACTS[agent]) * MOD)
    for b, p in enumerate(probs):
        for k, f in enumerate(AGENT_FACTS[agent]):
            seen = any(not p["erased"][j][f] for j, facts in enumerate(AGENT_FACTS) if f in facts)
            if seen or not recoverable_only:
                oh[b, k * MOD + p["values"][f]] = 1.0
    return (oh @ A)[:, None, :]


def lone_answer(prob: dict, agent: int) -> str:
    """The answer of a lone agent that guesses its erased values' sum by its mode (3 per value): the stand-in for
    the other agents' answers in round-2 pretraining prompts."""
    return str(sum(3 if prob["erased"][agent][f] else prob["values"][f] for f in AGENT_FACTS[agent]))


class FactsWorld:  # DEVIATION(1): our own toy (the spec's Part B)
    """Part B as a world of the debate pipeline: 3 agents, each with its own question (its own 6 facts)."""

    vote = False  # agents answer different questions: accuracy = mean over agents, no majority vote

    def __init__(self):
        self.n_agents = len(AGENT_FACTS)

    def prompt(self, prob: dict, agent: int, others: Sequence[str] | None = None) -> str:
        return facts_prompt(prob, agent, None if others is None else [parse_number(t) for t in others])

    def target(self, prob: dict, agent: int) -> str:
        return facts_answer(prob, agent)

    parse = staticmethod(parse_number)

    def correct(self, prob: dict, agent: int, ans: str | None) -> bool:
        return ans is not None and ans == facts_answer(prob, agent)


INSTRUCTION = "Solve the problem. Put your final answer in \\boxed{}."


def chat_prompt(tok, content: str) -> str:
    """One user turn through the tokenizer's own chat template (assistant turn opened, Qwen3 thinking off), applied
    once here and nowhere else; a plain 'user: ...' rendering for a tokenizer without a template."""
    msgs = [{"role": "user", "content": content}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return C.render_chat(tok, msgs)


class QAWorld:
    """Real models: question / answer rows (jsonl); final answer = last \\boxed{}; debate prompt = the question plus
    the other agents' previous responses (Du et al.); final answer of a problem = majority vote (Eq. 1)."""

    vote = True

    def __init__(self, tok, n_agents: int):
        self.tok, self.n_agents = tok, n_agents

    def prompt(self, prob: dict, agent: int, others: Sequence[str] | None = None) -> str:
        text = f"{prob['question']}\n\n{INSTRUCTION}"
        if others is not None:
            text += "\n\nThese are the solutions of the other agents:\n" + "\n".join(
                f"\nAgent {k + 1}: {o.strip()}" for k, o in enumerate(others)) + (
                "\n\nUsing their solutions as additional advice, give your updated answer. " + INSTRUCTION)
        return chat_prompt(self.tok, text)

    def target(self, prob: dict, agent: int) -> str:
        return f"The answer is \\boxed{{{prob['answer']}}}."

    parse = staticmethod(C.extract_answer)

    def correct(self, prob: dict, agent: int, ans: str | None) -> bool:
        return ans is not None and C.is_correct(f"\\boxed{{{ans}}}", prob["answer"])


def score_round(world, probs: Sequence[dict], answers: list[list[str | None]]) -> dict:
    """accuracy (majority vote where world.vote, else the mean over agents), agent_accuracy (mean over agents and
    problems), consensus (all agents agree; unparsable = disagree; None where agents answer different questions)
    and the unparsable count."""
    n_a = len(answers)
    ok = [[world.correct(p, i, answers[i][b]) for b, p in enumerate(probs)] for i in range(n_a)]
    agent_acc = float(np.mean(ok))
    out = dict(agent_accuracy=agent_acc, unparsable=sum(a is None for row in answers for a in row))
    if world.vote:
        cv = [consensus_and_vote([answers[i][b] for i in range(n_a)]) for b in range(len(probs))]
        out.update(accuracy=float(np.mean([world.correct(p, 0, v) for p, (_, v) in zip(probs, cv)])),
                   consensus=float(np.mean([c for c, _ in cv])))
    else:
        out.update(accuracy=agent_acc, consensus=None)
    return out


def embed_with_prefix(model, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None):
    """Eq. (11) injection: (inputs_embeds (B, m + L, d), attention_mask, position_ids) with the prefix (B, m, d)
    before the (left-padded) prompt; positions count only attended tokens, so the prompt follows the prefix."""
    emb = model.get_input_embeddings()(ids)
    if prefix is not None:
        emb = torch.cat([prefix.to(emb.dtype), emb], 1)
        mask = torch.cat([torch.ones(ids.shape[0], prefix.shape[1], dtype=mask.dtype, device=mask.device), mask], 1)
    return emb, mask, C.position_ids(mask)


def answer_nll(model, tok, prompts: list[str], answers: list[str], prefix: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of each row's mean NLL of its answer tokens (and EOS) given prompt and prefix (--adapter_loss
    task and the toy agent's pretraining). Per-row means, so equal shards over ranks average to the global value."""
    device = next(model.parameters()).device
    ids, mask, resp = C.encode_pairs(tok, prompts, answers, device=device)
    emb, m2, pos = embed_with_prefix(model, ids, mask, prefix)
    with C.autocast(device):
        logits = model(inputs_embeds=emb, attention_mask=m2, position_ids=pos).logits[:, -ids.shape[1]:-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1), fp32
    w = resp[:, 1:].float()
    return ((nll * w).sum(1) / w.sum(1).clamp_min(1)).mean()


def pretrain_agent(recipe: dict, path: str) -> None:
    """The toy agent: a tiny Llama trained to answer its true sum from round-1 and round-2 prompts; a share of the
    batches carry the oracle prefix A^T onehot(true values) (DEVIATION 3), of these a share only the rows of the
    values some holder saw (so a missing row means "unknown", not a confident guess), the others no prefix slot at
    all (as the text-only arms see it)."""
    model, tok = C.tiny_lm(n_layer=recipe["n_layer"], d_model=recipe["d_model"], n_head=recipe["n_head"], seed=recipe["seed"])
    A = prefix_code(recipe["d_model"], recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    steps, warm = recipe["steps"], max(1, recipe["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    bar = tqdm(range(steps), desc="toy agent", leave=False, disable=not sys.stderr.isatty())
    for step in bar:
        probs = facts_problems(recipe["batch_size"], int(rng.integers(2**31)))
        agent = int(rng.integers(3))
        prompts = []
        for p in probs:
            others = [lone_answer(p, j) for j in range(3) if j != agent] if rng.random() < 0.5 else None
            prompts.append(facts_prompt(p, agent, others))
        pre = None
        if rng.random() < recipe["prefix_share"]:  # DEVIATION(3)
            pre = oracle_prefix(probs, agent, A, recoverable_only=rng.random() < recipe["partial_share"])
        loss = answer_nll(model, tok, prompts, [facts_answer(p, agent) for p in probs], pre)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    torch.save(A, os.path.join(path, "prefix_code.pt"))


def agent_checkpoint(recipe: dict = AGENT_RECIPE) -> str:
    """Cached toy agent under common.toy_cache_dir() (rebuilt when the recipe changes). common.toy_checkpoint's
    builder trains on common's arithmetic world only, so this file builds its own agent."""
    import fcntl
    import hashlib
    import shutil

    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    root = C.toy_cache_dir()
    path = os.path.join(root, f"thoughtcomm_agent-{key}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".thoughtcomm_agent-{key}.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(path, "prefix_code.pt")):
            t0 = time.time()
            print(f"[toy] building the thoughtcomm agent ({recipe['steps']} steps) -> {path}", file=sys.stderr, flush=True)
            tmp = path + f".tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            C.set_cpu_threads()
            pretrain_agent(recipe, tmp)
            os.replace(tmp, path)
            print(f"[toy] built the thoughtcomm agent in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return path


# ---------------------------------------------------------------------------------------------
# ---- agents: decoding with a prefix, states, debate rounds (Part B and real models) ----
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_with_prefix(model, tok, prompts: list[str], prefix: torch.Tensor | None, max_new_tokens: int,
                         temperature: float, top_p: float, gen: torch.Generator | None, compile_ok: bool = True,
                         finished_out: list | None = None):
    """Sampling with a KV cache whose first forward reads inputs_embeds (prefix + prompt): common.generate with
    prefix_embeds. Returns (texts, sequences (B, L) ids without the prefix, attention_mask (B, L), prompt_len);
    finished_out, if given, is extended with one bool per row (ended at EOS, not cut at max_new_tokens).
    compile_ok False: no compiled CUDA decode step (maft's per-row LoRA selection is a plain attribute)."""
    device = next(model.parameters()).device
    with C.autocast(device):
        g = C.generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       generator=gen, prefix_embeds=prefix, compile=None if compile_ok else False)
    if finished_out is not None:
        finished_out += [r == "stop" for r in g.finish_reasons]
    return g.texts, g.sequences, g.attention_mask, g.prompt_len


def backbone(model):
    """The decoder stack of a HF causal LM (returns last_hidden_state, after the final norm)."""
    return model.get_decoder() if hasattr(model, "get_decoder") and model.get_decoder() is not None else model.base_model


@torch.no_grad()
def agent_states(model, seqs: torch.Tensor, mask: torch.Tensor, prompt_len: int, kind: str,
                 prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (2): one extra forward over the finished sequences (B, L) -> (B, d) fp32 last-layer states: of the last
    attended token (`last`), or the mean over the prompt tokens (`mean`, DEVIATION 2)."""
    emb, m2, pos = embed_with_prefix(model, seqs, mask, prefix)
    with C.autocast(seqs.device):
        h = backbone(model)(inputs_embeds=emb, attention_mask=m2, position_ids=pos).last_hidden_state
    h = h[:, -seqs.shape[1]:].float()  # (B, L, d)
    if kind == "last":
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # last attended position
        return h[torch.arange(len(h)), last]
    pm = mask[:, :prompt_len].float()[..., None]  # DEVIATION(2)
    return (h[:, :prompt_len] * pm).sum(1) / pm.sum(1)


def round_prompts(world, probs: Sequence[dict], prev: list[list[str]] | None) -> list[str]:
    """Agent-major prompts of one round: row i * B + b = agent i on problem b (round 1: prev None; later rounds:
    the other agents' previous responses)."""
    n_a = world.n_agents
    return [world.prompt(p, i, None if prev is None else [prev[j][b] for j in range(n_a) if j != i])
            for i in range(n_a) for b, p in enumerate(probs)]


def run_round(model, tok, world, probs: list[dict], prev: list[list[str]] | None, prefix: torch.Tensor | None, args,
              gen: torch.Generator, max_new_tokens: int, lora: AgentLoRA | None = None,
              finished_out: list | None = None):
    """One debate round of all agents on all problems: one batched generate (chunks of --gen_batch_size rows) and
    one extra forward for the states. prefix: (n_a * B, m, d) agent-major or None; lora: each row decodes with its
    agent's LoRA (maft). Returns texts[i][b], answers[i][b] (parsed, None = unparsable) and states [n_a] x (B, d)
    on the CPU; finished_out, if given, receives finished[i][b] (ended at EOS)."""
    n_a, B = world.n_agents, len(probs)
    prompts = round_prompts(world, probs, prev)
    chunk = args.gen_batch_size or len(prompts)
    texts, states, fin = [], [], []
    for s in range(0, len(prompts), chunk):
        pre = prefix[s:s + chunk] if prefix is not None else None
        if lora is not None:  # row k of the round is agent k // B
            lora.use(torch.arange(s, min(s + chunk, len(prompts)), device=next(model.parameters()).device) // B)
        t, seqs, mask, P = generate_with_prefix(model, tok, prompts[s:s + chunk], pre, max_new_tokens, args.temperature,
                                                args.top_p, gen, compile_ok=lora is None, finished_out=fin)
        texts += t
        states.append(agent_states(model, seqs, mask, P, args.state, pre).cpu())
    if lora is not None:
        lora.use(None)
    H = torch.cat(states)
    rows = [texts[i * B:(i + 1) * B] for i in range(n_a)]
    if finished_out is not None:
        finished_out += [fin[i * B:(i + 1) * B] for i in range(n_a)]
    return rows, [[world.parse(x) for x in r] for r in rows], [H[i * B:(i + 1) * B] for i in range(n_a)]


def probe_gate(states: list[torch.Tensor], probs: list[dict], steps: int = 300) -> tuple[float, float]:
    """Linear probe (softmax regression, fit on half, scored on the other half) that decodes each observed visible
    value of agent i from H^(i); returns (worst, mean) accuracy over the (agent, fact) slots."""
    accs = []
    n = len(probs)
    half = n // 2
    for i, H in enumerate(states):
        Hs = (H - H[:half].mean(0)) / (H[:half].std(0) + 1e-6)
        for f in AGENT_FACTS[i]:
            seen = torch.tensor([not p["erased"][i][f] for p in probs])
            y = torch.tensor([p["values"][f] for p in probs])
            tr, te = seen.clone(), seen.clone()
            tr[half:], te[:half] = False, False
            if tr.sum() < 5 or te.sum() < 5:
                continue
            lin = nn.Linear(H.shape[1], MOD)
            opt = torch.optim.Adam(lin.parameters(), lr=0.05)
            for _ in range(steps):
                loss = F.cross_entropy(lin(Hs[tr]), y[tr]) + 1e-3 * lin.weight.pow(2).sum()
                opt.zero_grad(), loss.backward(), opt.step()
            with torch.no_grad():
                accs.append(float((lin(Hs[te]).argmax(-1) == y[te]).float().mean()))
    return (min(accs), float(np.mean(accs))) if accs else (1.0, 1.0)


class PrefixAdapter(nn.Module):
    """Eq. (11): g(Ztil) -> (B, m, d), an MLP with GELU, plus w (one scalar per agreement level, Eq. 10)."""

    def __init__(self, n_in: int, width: int, m: int, d: int, n_agents: int, emb_norm: float, weights: str):
        super().__init__()
        self.m, self.d = m, d
        self.g = mlp(n_in, width, m * d, act=nn.GELU)
        self.w = nn.Parameter(torch.ones(n_agents + 1), requires_grad=weights == "learn")
        if weights == "fixed":  # reconstructed: fixed weights grow with agreement, w[a] = a / n_a
            self.w.data = torch.arange(n_agents + 1).float() / n_agents
        self.use_w = weights != "none"
        with torch.no_grad():  # start with ||P|| near the mean embedding norm (pitfall 8)
            probe = self.g(torch.randn(256, n_in)).norm(dim=-1).mean() / math.sqrt(m)
            self.g[-1].weight.mul_(emb_norm / probe.clamp_min(1e-6))
            self.g[-1].bias.zero_()

    def forward(self, z: torch.Tensor, M: torch.Tensor | None, agent: int) -> torch.Tensor:
        zt = z if M is None else route_latents(z, M, agent, self.w if self.use_w else None)  # Eqs. (9-10)
        return self.g(zt).view(len(z), self.m, self.d)


def random_mask_like(M: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A mask with the same alpha per latent (so the same histogram) on random agents (ablation)."""
    R = torch.zeros_like(M)
    for j, a in enumerate(agreement(M).tolist()):
        R[torch.randperm(M.shape[0], generator=gen)[:a], j] = True
    return R


# ---- maft (Multiagent Finetuning, simplified, one iteration): one in-file LoRA per agent ----


class AgentLoRALinear(nn.Module):
    """y = W x + b + (alpha / r) B_a A_a x, with a = the agent of x's batch row (`rows`, (B,) long; None = the base
    model). One LoRA per agent on one frozen base, so all agents of a round still share one batched generate.
    W, b frozen; A_a (r, in) kaiming-uniform as nn.Linear / peft, B_a (out, r) = 0 (the agents start as the base)."""

    def __init__(self, base: nn.Linear, n_agents: int, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / r
        for p_ in base.parameters():
            p_.requires_grad_(False)
        bound = 1.0 / math.sqrt(base.in_features)
        A = (torch.rand(n_agents, r, base.in_features, generator=generator) * 2 - 1) * bound
        self.A = nn.Parameter(A.to(base.weight.device))  # (n_a, r, in) fp32
        self.B = nn.Parameter(torch.zeros(n_agents, base.out_features, r, device=base.weight.device))  # (n_a, out, r)
        self.rows: torch.Tensor | None = None

    def forward(self, x):  # x (B, T, in)
        y = self.base(x)
        if self.rows is None:
            return y
        z = torch.einsum("bti,bri->btr", x.to(self.A.dtype), self.A[self.rows])  # (B, T, r)
        return y + (self.scale * torch.einsum("btr,bor->bto", z, self.B[self.rows])).to(y.dtype)


class AgentLoRA(nn.Module):
    """Every `targets` Linear of the model wrapped in AgentLoRALinear; `params` (A and B of each) is what the
    optimizer, the checkpoint and the gradient all-reduce see. `use(rows)` selects each batch row's agent."""

    def __init__(self, model, n_agents: int, r: int, alpha: float, targets: Sequence[str], seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed * 7 + 3)
        names = [n for n, m in model.named_modules() if n.split(".")[-1] in targets and isinstance(m, nn.Linear)]
        if not names:
            raise C.UserError(f"--lora_targets {','.join(targets)} match no Linear layer of this model; name its "
                              "projections (e.g. q_proj,v_proj)")
        self.layers: list[AgentLoRALinear] = []
        self.params = nn.ParameterDict()
        for n in names:
            parent, child = model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]
            lay = AgentLoRALinear(getattr(parent, child), n_agents, r, alpha, g)
            setattr(parent, child, lay)
            self.layers.append(lay)
            self.params[n.replace(".", "__") + "__A"], self.params[n.replace(".", "__") + "__B"] = lay.A, lay.B

    def use(self, rows: torch.Tensor | None) -> None:
        for lay in self.layers:
            lay.rows = rows


def majority_examples(world, probs: Sequence[dict], prompts: list[str], texts: list[list[str]],
                      answers: list[list[str | None]], finished: list[list[bool]] | None = None) -> list[dict]:
    """maft's training set: agent i's final-round responses whose answer equals the problem's majority vote (Eq. 1;
    problems without a parsable vote give none). prompts: agent-major (row i * B + b). Each example: agent, prompt,
    response, eos (False where the response was cut at --max_new_tokens: no EOS is trained there)."""
    n_a, B = len(texts), len(probs)
    out = []
    for b in range(B):
        _, vote = consensus_and_vote([answers[i][b] for i in range(n_a)])
        for i in range(n_a):
            if vote is not None and answers[i][b] == vote:
                out.append(dict(agent=i, prompt=prompts[i * B + b], response=texts[i][b],
                                eos=True if finished is None else bool(finished[i][b])))
    return out


def maft_loss(model, tok, lora: AgentLoRA, batch: Sequence[dict]) -> torch.Tensor:
    """Mean over the batch of each response's mean token NLL (and EOS where it ended) under its own agent's LoRA."""
    device = next(model.parameters()).device
    lora.use(torch.tensor([e["agent"] for e in batch], device=device))
    ids, mask, resp = C.encode_pairs(tok, [e["prompt"] for e in batch], [e["response"] for e in batch],
                                     add_eos=[e["eos"] for e in batch], device=device)
    with C.autocast(device):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits[:, :-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1), fp32
    w = resp[:, 1:].float()
    return ((nll * w).sum(1) / w.sum(1).clamp_min(1)).mean()


def train_maft(model, tok, lora: AgentLoRA, data: list[dict], args, log, start: int, save, rank: int,
               world_size: int) -> None:
    """LoRA steps on the majority-agreeing responses (the base stays frozen). Every rank draws the same global batch
    (per_device_batch_size x world_size examples, any agents) and scores its slice; gradients averaged over ranks.
    The rows of a batch keep their agent's LoRA selected through backward (gradient checkpointing recomputes)."""
    opt, gen = save.adapter_opt, save.gen
    bs = args.per_device_batch_size
    bar = tqdm(range(start, args.max_steps), desc="thoughtcomm[maft]", initial=start, total=args.max_steps, leave=False,
               disable=not C.is_main())
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    for step in bar:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(data), (bs * world_size,), generator=gen).tolist()[rank * bs:(rank + 1) * bs]
        loss = maft_loss(model, tok, lora, [data[k] for k in idx])
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        C.all_reduce_grads(lora.params, world_size)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(lora.params.parameters(), 1.0)
        opt.step()
        t3 = time.perf_counter()
        done = step + 1
        if done % max(1, args.log_every // 4) == 0 or done == args.max_steps:
            log.log(done, maft_loss=loss.detach(), time_forward=t1 - t0, time_backward=t2 - t1, time_optimizer=t3 - t2,
                    time_step=t3 - t0)
        if done % args.save_every == 0 and done < args.max_steps:
            save(done)
    lora.use(None)
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()


# ---------------------------------------------------------------------------------------------
# ---- Part B / real: phases ----
# ---------------------------------------------------------------------------------------------

STATE_ARMS = ("thoughtcomm", "broadcast", "random_mask", "raw_state", "oracle_latent")
AE_ARMS = ("thoughtcomm", "broadcast", "random_mask")


def fit_ae(H: torch.Tensor, slices, args, ckpt_state, save, device) -> tuple[Stage, torch.Tensor]:
    """Sparse AE on the training problems' round-1 states (Eqs. 6-8) -> (stage, M). H: (N, n_h) standardised."""
    torch.manual_seed(args.seed)
    n_z = args.n_latent or (30 if args.model_name_or_path is None else 1024)
    stage = Stage("ae", AutoEncoder(H.shape[1], n_z, args.ae_width).to(device), args.ae_steps, args.lambda_jac, args,
                  args.seed + 1)
    if ckpt_state is not None:
        stage.load(ckpt_state)
    save.stage = stage  # the AE stage's checkpoints carry it
    H = H.to(device)
    h_val = H[: min(len(H), 512)]
    train_stage(stage, H, h_val, args, save.log, 0, min(save.step, args.ae_steps), lambda name, done: save(done))
    jabs = jacobian_abs_mean(stage.ae.dec, stage.ae.encode(H).detach(), args.jac)
    _, M, alpha = structure(jabs.cpu(), slices, args.tau)  # Eq. (8)
    return stage, M


def prefixes_for(arm: str, adapter: PrefixAdapter | None, src: torch.Tensor | None, M, probs, A, n_a: int) -> torch.Tensor | None:
    """Round r+1 prefixes of all agents, agent-major (n_a * B, m, d), for an arm (None = text only). src: the
    round-r latents Zhat (B, n_z) or, for raw_state, the standardised raw states (B, n_h)."""
    if arm in ("single", "debate", "maft"):
        return None
    if arm in ("oracle", "oracle_partial"):
        return torch.cat([oracle_prefix(probs, i, A, recoverable_only=arm == "oracle_partial") for i in range(n_a)])
    return torch.cat([adapter(src, None if arm == "raw_state" else M, i) for i in range(n_a)])


@torch.no_grad()
def prefix_nll_check(model, tok, world, probs, texts1, arm, adapter, src, M, A, n: int = 96) -> dict:
    """The `task` objective on the first n training problems, every agent, with this arm's round-2 prefix and with
    none: whether the objective the adapter follows rewards the prefix at all (Part B diagnostic)."""
    idx = list(range(min(n, len(probs))))
    out = {"with_prefix": 0.0, "without": 0.0}
    for i in range(world.n_agents):
        prompts = [world.prompt(probs[b], i, [texts1[j][b] for j in range(world.n_agents) if j != i]) for b in idx]
        targets = [world.target(probs[b], i) for b in idx]
        pre = prefixes_for(arm, adapter, None if src is None else src[idx], M, [probs[b] for b in idx], A,
                           world.n_agents)[i * len(idx):(i + 1) * len(idx)]
        out["with_prefix"] += float(answer_nll(model, tok, prompts, targets, pre)) / world.n_agents
        out["without"] += float(answer_nll(model, tok, prompts, targets, None)) / world.n_agents
    return {k: round(v, 4) for k, v in out.items()}


def adapter_loss(model, tok, world, adapter, probs, texts1, src, M, idx, agent, args, sgen) -> tuple[torch.Tensor, float]:
    """The adapter objective on problems idx for one agent: `task` (NLL of the reference answer given the round-2
    prompt and the prefix) or Eq. (12). Returns (loss, seconds spent generating)."""
    n_a = world.n_agents
    prompts = [world.prompt(probs[b], agent, [texts1[j][b] for j in range(n_a) if j != agent]) for b in idx]
    pre = adapter(src[idx], None if args.method == "raw_state" else M, agent)
    if args.adapter_loss == "task":
        return answer_nll(model, tok, prompts, [world.target(probs[b], agent) for b in idx], pre), 0.0
    return eq12_loss(model, tok, prompts, pre, args, sgen)


def eq12_loss(model, tok, prompts, pre, args, gen):
    """Eq. (12): [1 - cos(e(y_gen), e(y_ref))] - log p(y_gen | context, P), e = mean teacher-forced last-layer
    state of the response; y_ref without prefix, y_gen with it (both sampled, --ref_tokens long; no gradient
    through sampling). Returns (loss, seconds spent generating)."""
    t0 = time.perf_counter()
    ref, _, _, _ = generate_with_prefix(model, tok, prompts, None, args.ref_tokens, args.temperature, args.top_p, gen)
    y, _, _, _ = generate_with_prefix(model, tok, prompts, pre.detach(), args.ref_tokens, args.temperature, args.top_p, gen)
    t_gen = time.perf_counter() - t0
    device = next(model.parameters()).device

    def emb_and_logp(resps, prefix):
        ids, mask, resp = C.encode_pairs(tok, prompts, resps, device=device)
        emb, m2, pos = embed_with_prefix(model, ids, mask, prefix)
        with C.autocast(device):
            out = model(inputs_embeds=emb, attention_mask=m2, position_ids=pos, output_hidden_states=True)
        h = out.hidden_states[-1][:, -ids.shape[1]:].float()
        r = resp.float()[..., None]
        e = (h * r).sum(1) / r.sum(1).clamp_min(1)
        lp = torch.log_softmax(out.logits[:, -ids.shape[1]:-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return e, (lp * resp[:, 1:]).sum(1)

    with torch.no_grad():
        e_ref, _ = emb_and_logp(ref, None)
    e_gen, logp = emb_and_logp(y, pre)
    return (1 - F.cosine_similarity(e_gen, e_ref, dim=-1) - logp).mean(), t_gen


def train_adapter(model, tok, world, adapter, probs, texts1, src, M, args, log, start: int, save, rank: int,
                  world_size: int) -> None:
    """Adapter steps on the training problems (only g and w train; the LLM is frozen). Every rank draws the same
    global batch (per_device_batch_size x world_size problems, one agent) from the shared generator and scores its
    own slice; gradients are averaged over ranks (== one process on the whole batch)."""
    opt, gen, sgen = save.adapter_opt, save.gen, save.sgen
    bs = args.per_device_batch_size
    bar = tqdm(range(start, args.max_steps), desc=f"thoughtcomm[adapter {args.method}]", initial=start,
               total=args.max_steps, leave=False, disable=not C.is_main())
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF checkpoints only in train mode; the frozen LLM has no dropout in use (p = 0 or eval-free)
    for step in bar:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(probs), (bs * world_size,), generator=gen).tolist()[rank * bs:(rank + 1) * bs]
        agent = int(torch.randint(0, world.n_agents, (1,), generator=gen))
        loss, t_gen = adapter_loss(model, tok, world, adapter, probs, texts1, src, M, idx, agent, args, sgen)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        C.all_reduce_grads(adapter, world_size)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        t4 = time.perf_counter()
        done = step + 1
        if done % max(1, args.log_every // 4) == 0 or done == args.max_steps:
            log.log(args.ae_steps + done, adapter_loss=loss.detach(),
                    **{f"w{a}": float(adapter.w[a].detach()) for a in range(1, world.n_agents + 1)},
                    time_generation=t_gen, time_forward=t2 - t0 - t_gen, time_backward=t3 - t2,
                    time_optimizer=t4 - t3, time_step=t4 - t0)
        if done % args.save_every == 0 and done < args.max_steps:
            save(args.ae_steps + done)
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()


# ---- distributed helpers (torchrun shards problems; no-ops in one process) ----


def shard(xs: Sequence, rank: int, world_size: int) -> list:
    """Problems of this rank: every world_size-th from rank (interleaved, so unshard restores the order)."""
    return list(xs[rank::world_size])


def gather(obj, world_size: int) -> list:
    """all_gather_object: [obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def unshard(parts: list[list]) -> list:
    """Inverse of shard: parts[r] = xs[r::W] -> xs."""
    n = sum(len(p) for p in parts)
    out = [None] * n
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out


def gather_round(texts, answers, states, world_size: int):
    """A round run on this rank's shard -> the whole round on every rank (problem order restored)."""
    if world_size == 1:
        return texts, answers, states
    parts = gather((texts, answers, [s.cpu() for s in states]), world_size)
    n_a = len(texts)
    return ([unshard([p[0][i] for p in parts]) for i in range(n_a)], [unshard([p[1][i] for p in parts]) for i in range(n_a)],
            [torch.stack(unshard([list(p[2][i]) for p in parts])) for i in range(n_a)])


def broadcast(obj, world_size: int):
    """Rank 0's obj on every rank."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- Part B / real: the run ----


def load_agents(args, device):
    """(model, tokenizer, world, prefix code A or None, problems train / eval) of Part B or the real path; the LLM
    is frozen."""
    if args.model_name_or_path is None:
        path = agent_checkpoint({**AGENT_RECIPE, "steps": args.agent_steps})
        model, tok = C.load_lm(path, device=device)
        A = torch.load(os.path.join(path, "prefix_code.pt"))
        world = FactsWorld()
        train = facts_problems(args.train_size, 1000 + args.seed)
        evals = facts_problems(args.eval_size, 2000 + args.seed)  # never encoded during training (pitfall 10)
    else:
        model, tok = C.load_lm(args.model_name_or_path, device=device)
        A, world = None, QAWorld(tok, args.num_agents)
        train = read_problems(args.train_file)[:args.train_size]
        evals = read_problems(args.eval_file)[:args.eval_size]
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, world, A, train, evals


def read_problems(path: str) -> list[dict]:
    """question / answer rows of a jsonl file (UserError naming file:line on a bad row)."""
    rows = C.read_jsonl(path, keys=("question", "answer"))
    C.require(rows, f"{path} holds no problems; each line needs a JSON object with question and answer")
    return [dict(question=str(r["question"]), answer=str(r["answer"])) for r in rows]


def run_agents(args, ckpt_dir: str, t0: float, rank: int = 0, world_size: int = 1, device=None):
    """Part B and the real path: round 1 on both splits (sharded over ranks) -> AE on the training states (rank 0,
    broadcast) -> structure -> adapter (data-parallel) -> rounds 2.. on the evaluation problems with prefixes."""
    device = device or torch.device("cpu")
    model, tok, world, A, train, evals = load_agents(args, device)
    n_a = world.n_agents
    st = C.load_checkpoint(ckpt_dir) if args.resume else None
    step = st["step"] if st else 0
    log = C.MetricLogger(args.output_dir, resume_step=step if st else None)
    mnt = 3 if args.model_name_or_path is None else args.max_new_tokens
    summary = dict(part="real" if args.model_name_or_path else "B", method=args.method, seed=args.seed, state=args.state,
                   lambda_jac=args.lambda_jac, agreement_weights=args.agreement_weights, adapter_loss=args.adapter_loss,
                   model=args.model_name_or_path or "toy agent", world_size=world_size, n_train=len(train),
                   n_eval=len(evals))
    if A is not None:
        summary["bounds"] = facts_bounds(evals)
    summary["emb_norm"] = round(float(model.get_input_embeddings().weight.norm(dim=-1).mean()), 4)
    t_r1 = time.time()
    # round 1 on both splits (the same for every arm: same seed); each rank its shard, then gathered
    r1 = [run_round(model, tok, world, shard(ps, rank, world_size), None, None, args,
                    torch.Generator().manual_seed(args.seed * 1000 + s * 100 + rank), mnt) for s, ps in ((1, train), (2, evals))]
    (txt_tr, ans_tr, H_tr), (txt_ev, ans_ev, H_ev) = (gather_round(*r, world_size) for r in r1)
    summary["time_round1_s"] = round(time.time() - t_r1, 1)
    summary["round1"] = score_round(world, evals, ans_ev)
    if args.method in STATE_ARMS and args.method != "oracle_latent" and A is not None and args.gate_min > 0:
        gate, gate_mean = probe_gate(H_tr, train)
        summary["probe_min_acc"], summary["probe_mean_acc"] = gate, gate_mean
        if gate < args.gate_min:
            summary["gate"] = "failed"
            if C.is_main():
                C.write_json(os.path.join(args.output_dir, "summary.json"), summary)
            print(f"gate failed: a linear probe decodes the observed facts from the --state {args.state} states with "
                  f"accuracy {gate:.2f} < --gate_min {args.gate_min} in the worst (agent, fact) slot (mean {gate_mean:.2f}); the states do not hold the facts, so "
                  f"thought communication cannot be tested here" + (" (try --state mean)" if args.state == "last" else ""),
                  flush=True)
            C.ddp_cleanup()
            sys.exit(3)
    # standardised states (training statistics for both splits): the AE's and raw_state's input
    Hcat_tr, Hcat_ev = torch.cat(H_tr, 1), torch.cat(H_ev, 1)
    mu, sd = Hcat_tr.mean(0), Hcat_tr.std(0) + 1e-6
    Hn_tr, Hn_ev = (Hcat_tr - mu) / sd, (Hcat_ev - mu) / sd
    d = H_tr[0].shape[1]
    slices = [(i * d, (i + 1) * d) for i in range(n_a)]
    save = Saver(ckpt_dir, log, step, rank, world_size, args)
    if st:
        save.gen.set_state(st["extra"]["gen"])
        if rank < len(st["extra"]["sgens"]):  # saved once the adapter trains (its only user)
            save.sgen.set_state(st["extra"]["sgens"][rank])
    stage = M = adapter = src_tr = src_ev = lora = None
    if args.method == "maft":  # fine-tune each agent on its majority-agreeing responses, then debate from round 1
        lora, txt_ev, ans_ev = run_maft(model, tok, world, train, evals, txt_tr, ans_tr, args, summary, save, st, mnt,
                                        device)
    if args.method in AE_ARMS:
        if rank == 0:  # the AE is small: rank 0 trains it on the gathered states, then broadcasts it
            stage, M = fit_ae(Hn_tr, slices, args, st["extra"]["ae"] if st else None, save, device)
            box = (stage.ae.cpu().state_dict(), M)
        else:
            box = None
        ae_state, M = broadcast(box, world_size)
        ae = AutoEncoder(Hn_tr.shape[1], ae_state["enc.4.weight"].shape[0], args.ae_width)
        ae.z_mean, ae.z_std = torch.zeros_like(ae_state["z_mean"]), torch.zeros_like(ae_state["z_std"])
        ae.load_state_dict(ae_state)
        ae.eval()
        save.stage = stage
        summary.update(alpha_hist=alpha_histogram(agreement(M)), M=M.long().tolist())
        if args.method == "broadcast":
            M = torch.ones_like(M)
        elif args.method == "random_mask":
            M = random_mask_like(M, torch.Generator().manual_seed(args.seed + 9))
        summary["M_routed"] = M.long().tolist()  # the mask the prefixes are routed with
        with torch.no_grad():
            src_tr, src_ev = ae.encode(Hn_tr), ae.encode(Hn_ev)
    if args.method == "raw_state":
        src_tr, src_ev = Hn_tr, Hn_ev
    if args.method == "oracle_latent":  # the thoughts an ideal AE could recover, routed with the true structure
        src_tr, src_ev, M = recoverable_facts(train), recoverable_facts(evals), fact_mask()
        summary["M_routed"] = M.long().tolist()
    if args.method in STATE_ARMS:
        emb_norm = float(model.get_input_embeddings().weight.norm(dim=-1).mean())
        torch.manual_seed(args.seed + 11)
        adapter = PrefixAdapter(src_tr.shape[1], args.adapter_width, args.prefix_len, d, n_a, emb_norm,
                                args.agreement_weights).to(device)
        save.adapter, save.adapter_opt = adapter, torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad],
                                                                   lr=args.learning_rate)
        if st and st["extra"].get("adapter") is not None:
            adapter.load_state_dict(st["extra"]["adapter"])
            save.adapter_opt.load_state_dict(st["extra"]["adapter_opt"])
        src_tr, src_ev = src_tr.to(device), src_ev.to(device)
        t_ad = time.time()
        train_adapter(model, tok, world, adapter, train, txt_tr, src_tr, M, args, log, max(0, step - args.ae_steps), save,
                      rank, world_size)
        summary["time_adapter_s"] = round(time.time() - t_ad, 1)
        save(args.ae_steps + args.max_steps)
    if A is not None and (adapter is not None or args.method in ("oracle", "oracle_partial")):
        summary["answer_nll_train"] = prefix_nll_check(model, tok, world, train, txt_tr, args.method, adapter, src_tr,
                                                       M, A)
    final, record = summary["round1"], [(1, txt_ev, ans_ev)]
    if args.method != "single":  # rounds 2.. on this rank's evaluation shard, with prefixes from the round before
        final = evaluate_rounds(model, tok, world, evals, txt_ev, src_ev, adapter, M, A, args, summary, rank, world_size,
                                ae if args.method in AE_ARMS else None, (mu, sd), mnt, device, lora, record)
    wall = time.time() - t0
    summary.update(accuracy=final["accuracy"], consensus=final["consensus"], unparsable=final["unparsable"],
                   wall_time_s=round(wall, 1), time_per_step_s=time_split(C.read_jsonl(log.path)) if C.is_main() else {})
    if adapter is not None:
        summary["weights"] = [round(float(x), 4) for x in adapter.w.detach()[1:]]
        summary["adapter_norm"] = float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in adapter.parameters())))
    if C.is_main():
        write_responses(os.path.join(args.output_dir, "responses.jsonl"), evals, record)
        finish_agents(args, summary, log, wall)
    return summary


def write_responses(path: str, evals: Sequence[dict], record: list) -> None:
    """responses.jsonl: every evaluation round's response and parsed answer per (problem, agent), to read debates."""
    with open(path + ".tmp", "w") as f:
        for r, texts, answers in record:
            for b in range(len(evals)):
                for i in range(len(texts)):
                    f.write(json.dumps(dict(round=r, problem=b, agent=i, text=texts[i][b], answer=answers[i][b])) + "\n")
    os.replace(path + ".tmp", path)


def run_maft(model, tok, world, train, evals, txt_tr, ans_tr, args, summary, save, st, mnt, device):
    """maft (Multiagent Finetuning, simplified, one iteration): text debate rounds 2..R on the training problems
    (each rank its shard, gathered), agent i's final-round responses that agree with the majority vote ->
    agent i's LoRA (train_maft), then the fine-tuned agents answer round 1 of the evaluation problems again (same
    sampling seed as the base round 1, kept as round1_base). Returns (lora, round-1 texts, round-1 answers)."""
    rank, world_size, n_a = save.rank, save.world_size, world.n_agents
    mine = shard(range(len(train)), rank, world_size)
    probs = [train[b] for b in mine]
    prev, ans = [[txt_tr[i][b] for b in mine] for i in range(n_a)], None
    t_deb = time.time()
    for r in range(2, args.rounds + 1):
        prompts = round_prompts(world, probs, prev)  # of the round run now; the last one's are the training prompts
        fin: list = []
        prev, ans, _ = run_round(model, tok, world, probs, prev, None, args,
                                 torch.Generator().manual_seed(args.seed * 1000 + 50 + 100 * r + rank), mnt,
                                 finished_out=fin)
    parts = gather((prompts, prev, ans, fin), world_size)
    B = len(train)
    per_agent = lambda k: [unshard([p[k][i] for p in parts]) for i in range(n_a)]  # noqa: E731
    texts, answers, finished = per_agent(1), per_agent(2), per_agent(3)
    prompts = sum((unshard([p[0][i * len(p[1][0]):(i + 1) * len(p[1][0])] for p in parts]) for i in range(n_a)), [])
    summary["time_maft_debate_s"] = round(time.time() - t_deb, 1)  # generation of the training set
    data = majority_examples(world, train, prompts, texts, answers, finished)
    summary["maft_train_round"] = score_round(world, train, answers)
    summary["maft_examples"] = [sum(e["agent"] == i for e in data) for i in range(n_a)]
    C.require(data, f"maft: no final-round response on the {B} training problems agrees with a parsable majority vote, "
                    "so there is nothing to fine-tune on; raise --max_new_tokens or use more / easier training problems")
    lora = AgentLoRA(model, n_a, args.lora_r, args.lora_alpha, [t.strip() for t in args.lora_targets.split(",")],
                     args.seed)  # B = 0: every agent starts as the base model
    save.adapter = lora.params
    save.adapter_opt = torch.optim.Adam(list(lora.params.parameters()), lr=args.lora_lr)
    if st and st["extra"].get("adapter") is not None:
        lora.params.load_state_dict(st["extra"]["adapter"])
        save.adapter_opt.load_state_dict(st["extra"]["adapter_opt"])
    t_ft = time.time()
    train_maft(model, tok, lora, data, args, save.log, save.step if st else 0, save, rank, world_size)
    summary["time_maft_s"] = round(time.time() - t_ft, 1)
    save(args.max_steps)
    summary["lora_B_norm"] = float(torch.sqrt(sum((lay.B.detach().double() ** 2).sum() for lay in lora.layers)))
    evm = shard(evals, rank, world_size)
    with torch.no_grad():
        t, a, H = run_round(model, tok, world, evm, None, None, args,
                            torch.Generator().manual_seed(args.seed * 1000 + 200 + rank), mnt, lora)
    txt_ev, ans_ev, _ = gather_round(t, a, H, world_size)
    summary["round1_base"], summary["round1"] = summary["round1"], score_round(world, evals, ans_ev)
    return lora, txt_ev, ans_ev


def evaluate_rounds(model, tok, world, evals, txt_ev, src_ev, adapter, M, A, args, summary, rank, world_size, ae,
                    norm, mnt, device, lora: AgentLoRA | None = None, record: list | None = None) -> dict:
    """Rounds 2..R on the evaluation problems (each rank its shard); the prefix of round r + 1 comes from the
    round-r states (re-encoded by the AE after every round); with `lora` (maft) each agent decodes with its own."""
    n_a = world.n_agents
    mine = shard(range(len(evals)), rank, world_size)
    probs = [evals[b] for b in mine]
    prev = [[txt_ev[i][b] for b in mine] for i in range(n_a)]
    src = src_ev[mine] if src_ev is not None else None
    final = summary["round1"]
    with torch.no_grad():
        for r in range(2, args.rounds + 1):
            pre = prefixes_for(args.method, adapter, src, M, probs, A, n_a)
            if pre is not None:  # ||P|| against the mean embedding norm (pitfall 8), over all ranks' rows
                norms = sum(gather(pre.norm(dim=-1).flatten().tolist(), world_size), [])
                summary[f"prefix_norm_round{r}"] = round(float(np.mean(norms)), 4)
            gen = torch.Generator().manual_seed(args.seed * 1000 + 100 * r + rank)
            prev, ans, H = run_round(model, tok, world, probs, prev, pre, args, gen, mnt, lora)
            txt_all, ans_all, H_all = gather_round(prev, ans, H, world_size)
            final = summary[f"round{r}"] = score_round(world, evals, ans_all)
            if record is not None:
                record.append((r, txt_all, ans_all))
            if src is not None and r < args.rounds:
                Hn = (torch.cat(H, 1) - norm[0]) / norm[1]  # CPU, as the AE
                src = (ae.encode(Hn) if ae is not None else Hn).to(device)
    return final


class Saver:
    """Checkpoint of Part B / real runs: the AE stage, the adapter and its optimizer, the shared batch generator and
    every rank's sampling generator (rank 0 writes)."""

    def __init__(self, ckpt_dir, log, step, rank, world_size, args):
        self.ckpt_dir, self.log, self.step, self.rank, self.world_size = ckpt_dir, log, step, rank, world_size
        self.stage = self.adapter = self.adapter_opt = None
        self.gen = torch.Generator().manual_seed(args.seed + 5)  # batches: the same on every rank
        self.sgen = torch.Generator().manual_seed(args.seed * 1000 + 7 + rank)  # Eq. 12 sampling: per rank

    def __call__(self, done: int) -> None:
        sgens = gather(self.sgen.get_state(), self.world_size) if self.adapter is not None else [self.sgen.get_state()]
        if self.rank == 0:
            C.save_checkpoint(self.ckpt_dir, step=done, extra=dict(
                ae=self.stage.state() if self.stage is not None else None,
                adapter=self.adapter.state_dict() if self.adapter is not None else None,
                adapter_opt=self.adapter_opt.state_dict() if self.adapter_opt is not None else None,
                gen=self.gen.get_state(), sgens=sgens))


def finish_agents(args, summary: dict, log, wall: float) -> None:
    """summary.json, the PNG and the final line (rank 0)."""
    C.write_json(os.path.join(args.output_dir, "summary.json"), summary)
    if not any(True for _ in open(log.path)):
        log.log(0, accuracy=summary["accuracy"])
    if args.plot:
        C.plot_metrics(log.path, os.path.join(args.output_dir, "thoughtcomm.png"),
                       title=f"thoughtcomm | {summary['part']} {args.method} | seed {args.seed}")
    b = summary.get("bounds")
    bounds = f"; counting bounds: single {b['single']:.2f}, shared facts {b['shared']:.2f}, oracle 1.0" if b else ""
    r1 = summary["round1"]["accuracy"]
    print(f"done in {wall / 60:.1f} min: {summary['part']} {args.method} accuracy {summary['accuracy']:.3f} (round 1 "
          f"{r1:.3f}{bounds})  unparsable {summary['unparsable']}"
          + (f"  consensus {summary['consensus']:.3f}" if summary.get("consensus") is not None else "")
          + (f"  alpha {summary['alpha_hist']}" if "alpha_hist" in summary else "") + f"  ({args.output_dir})", flush=True)


# ---------------------------------------------------------------------------------------------
# ---- the Part A table ----
# ---------------------------------------------------------------------------------------------

TABLE_ARMS = (("thoughtcomm", []), ("lambda=0 (control)", ["--lambda_jac", "0"]), ("oracle mask", ["--method", "oracle_mask"]))


def table_runs(args) -> list[tuple[int, str, int, list[str], str]]:
    """(agents, arm label, seed, flags, run dir) of the Part A table; each run is an ordinary run of this file."""
    seeds = [int(s) for s in args.table_seeds.split(",") if s.strip()]
    base = ["--ae_steps", str(args.ae_steps), "--refit_steps", str(args.refit_steps), "--lambda_jac", str(args.lambda_jac)]
    out = []
    for n_a in (2, 3):
        for label, flags in TABLE_ARMS:
            for s in seeds:
                d = os.path.join(args.output_dir, f"n{n_a}-{label.split()[0].replace('=', '')}-seed{s}")
                out.append((n_a, label, s, base + ["--num_agents", str(n_a), "--seed", str(s)] + flags + ["--output_dir", d], d))
    return out


def run_table(args) -> list[dict]:
    """Runs every missing arm x seed (a run dir with summary.json is reused), then writes table.md / table.json."""
    rows = []
    for n_a, label, seed, flags, d in table_runs(args):
        if os.path.isfile(os.path.join(d, "summary.json")):  # reuse a finished run only if its flags match
            with open(os.path.join(d, "args.json")) as f:
                old = json.load(f)
            skip = RESUME_IGNORES + ("resume", "overwrite", "output_dir")
            defaults = vars(parse_args([]))  # a flag newer than the stored run counts as its default
            diff = [f"--{k} {old.get(k, defaults[k])} -> {v}" for k, v in vars(parse_args(flags)).items()
                    if k not in skip and old.get(k, defaults[k]) != v]
            C.require(not diff, f"{d} holds a finished run with other flags ({', '.join(diff)}); give the table "
                                f"another --output_dir or remove that run")
        else:
            a = parse_args(flags + (["--overwrite"] if os.path.isdir(d) else []))
            validate_args(a)
            main(a)
        with open(os.path.join(d, "summary.json")) as f:
            sm = json.load(f)
        head = sm.get("refit") or sm["sparse"]
        rows.append(dict(agents=n_a, arm=label, seed=seed, r2_diag=head["r2_diag"], r2_offdiag_max=head["r2_offdiag_max"],
                         group_sizes=head["group_sizes"], alpha_hist=head["alpha_hist"], mcc=head["mcc"],
                         sparse_alpha_hist=sm.get("sparse", {}).get("alpha_hist"), minutes=sm["wall_time_s"] / 60))
    C.write_json(os.path.join(args.output_dir, "table.json"), rows)
    md = format_table(rows)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return rows


def _ms(xs) -> str:
    xs = np.asarray(xs, dtype=float)
    return f"{xs.mean():.2f} ± {xs.std():.2f}"


def format_table(rows: list[dict]) -> str:
    """Markdown: per (agents, arm), mean ± std over seeds of each diagonal block R^2, max off-diagonal, MCC, the
    recovered group sizes and alpha histograms per seed."""
    lines = ["| agents | arm | seeds | block R^2 diagonal (per true block) | max off-diagonal | MCC | group sizes per seed | "
             "alpha histogram per seed | min/run |", "|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["agents"], r["arm"]) for r in rows):
        rs = [r for r in rows if (r["agents"], r["arm"]) == key]
        diag = np.array([r["r2_diag"] for r in rs])
        names = list(rs[0]["group_sizes"])
        lines.append(f"| {key[0]} | {key[1]} | {len(rs)} | "
                     + ", ".join(f"{n}: {_ms(diag[:, j])}" for j, n in enumerate(names))
                     + f" | {_ms([r['r2_offdiag_max'] for r in rs])} | {_ms([r['mcc'] for r in rs])} | "
                     + "; ".join("/".join(str(v) for v in r["group_sizes"].values()) for r in rs) + " | "
                     + "; ".join(str(r["alpha_hist"]) for r in rs) + f" | {np.mean([r['minutes'] for r in rs]):.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------


def main(args):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    C.set_cpu_threads()
    validate_args(args)  # ranges and combinations: nothing loaded, nothing written
    if args.table:
        return run_table(args)
    t0 = time.time()
    C.seed_everything(args.seed)
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    if args.model_name_or_path is None and args.part == "A":
        C.start_run(args, has_checkpoint=C.find_checkpoint(ckpt_dir) is not None, ignore=RESUME_IGNORES)
        res = run_part_a(args, ckpt_dir, t0)
        return finish_part_a(args, res, res["elapsed_before"] + time.time() - t0)
    preflight_agents(args)  # model path and data files, still writing nothing
    rank, world_size, device = C.ddp_setup()
    if args.device:
        device = C.pick_device(args.device)
    # every rank calls it: rank 0 decides, the others stop on its refusal
    C.start_run(args, has_checkpoint=C.find_checkpoint(ckpt_dir) is not None, ignore=RESUME_IGNORES)
    summary = run_agents(args, ckpt_dir, t0, rank, world_size, device)
    C.ddp_cleanup()
    return summary


def preflight_agents(args) -> None:
    """Before any write: the real model's path / hub id and config, and both data files parse (file:line)."""
    if args.model_name_or_path is not None:
        C.preflight_model(args.model_name_or_path)
        for f in (args.train_file, args.eval_file):
            read_problems(f)


if __name__ == "__main__":
    with C.exit_on_user_error():
        main(parse_args())
