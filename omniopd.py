"""omniopd.py: logit-free on-policy distillation (OmniOPD) with its baselines, in one file.

Paper: "Logit-Free On-Policy Distillation via Speculative Verification" (OmniOPD), Zhou, Zhang, Wu,
Wang, Bo, Liu, Fan, Zhao (Meta AI), arXiv 2606.01476, https://arxiv.org/abs/2606.01476.
No official code; equations follow the spec's reading of the paper and of a third-party verl
re-implementation (benyucong/verl, verl/trainer/distillation/omniopd_*.py).

Idea. Token-level on-policy distillation (OPD) scores every token the student samples with the
teacher's log-prob, so it needs the teacher's logits and the same tokenizer. OmniOPD needs only the
teacher's *text*: at the student's peak-entropy positions the teacher continues the student's own
prefix N times; how similar the student's chunk is to those continuations, smoothed by a Dirichlet
prior centred on the student's own probability of the chunk, weights a log-likelihood update on that
chunk. A KL anchor to the initial student covers every other token. So API teachers and teachers with
another tokenizer work.

Equations (response y of length T, chunk length C, M chunks, N teacher samples, P prompt length):
  (1) rollout            y ~ pi(. | x) at temperature 1
  (2) entropy            H_t = -sum_v pi(v | x, y<t) log pi(v | x, y<t), exact, full vocab, fp32;
                         response token t uses logits index P + t - 1
  (3) anchors            starts t with t + C <= T sorted by (H_t, t) descending, accepted when
                         |t - u| >= C for every accepted u, at most M (fewer is fine, never padded)
  (4) verification       z_1..z_N ~ teacher(. | x + y[:t0]) as text, C tokens (chars mode: cut to |s_c| chars)
  (5) agreement          k_c = sum_n phi(s_c, z_n) in [0, N]; phi = ned | rouge1 | embed
  (6) Dirichlet prior    pbar_c = exp(mean_{t in c} log pi(y_t));  phat_c = (k_c + alpha pbar_c) / (N + alpha)
                         (no gradient through phat)
  (7) loss               L = (1/B) sum_b [ -sum_c phat_c sum_{t in c} log pi(y_t)
                                          + beta sum_{t unaudited} KL(pi_ref(.|s_t) || pi(.|s_t)) ]
  (8) OPD baseline       A_t = -(log pi(y_t) - log pi_T(y_t)) (detached); L = -(1/B) sum_b sum_t A_t log pi(y_t)
  (9) GRPO baseline      A = (r - mean_G r) / (std_G r + 1e-4); L = -(1/B) sum A sum_t log pi(y_t) + beta KL
  (10) SFT baseline      L = -(1/n) sum over n teacher responses of sum_t log pi(y^T_t)

Deviations from the paper:
  1. One AdamW step per rollout batch (no PPO epochs, no importance ratio); the paper's optimizer is
     not public. `# DEVIATION(1)`
  2. The toy uses tiny 2-layer Llama models on running-sum arithmetic (common's toy world, domain
     "add") instead of Qwen3 on math/code; chunk length C = 4 tokens (one step is 4 characters)
     instead of 50, M = 2, N = 8. `# DEVIATION(2)`
  3. `--teacher_chunk_unit chars` (default) cuts every teacher continuation to the character length of
     the student chunk it is compared with, so a teacher with another tokenizer is compared on as much
     text as the student wrote; the request asks for min(C, max |s_c|) teacher tokens (C tokens of a
     real model are ~4C characters: asking for |s_c| tokens would spend ~4x the budget; a teacher
     whose tokenizer is much finer than the student's may then write less than |s_c|). The paper
     budgets in teacher tokens (`--teacher_chunk_unit tokens`). `# DEVIATION(3)`
  4. `--teacher_token_budget match` gives SFT as many teacher tokens per update as OmniOPD spends (more
     teacher samples per prompt): by default OmniOPD's nominal B*M*N*C, an upper bound on what it
     spends (fewer chunks in short responses, continuations that end early); `--match_teacher_tokens`
     takes the measured number (or the OmniOPD run's dir). The paper matches training steps. `# DEVIATION(4)`

Reconstructed (the record is silent; our choice):
  phi: `ned` (1 - Levenshtein / max length), `rouge1` (unit-multiset F1; units = letter runs, single
  digits, single symbols), `embed` (max(0, cos) of mean-pooled last hidden states of --sim_model,
  default the frozen reference student); alpha = 1, beta = 0.1 (re-implementation defaults); random
  anchors = same number of non-overlapping starts drawn uniformly; chunks may contain the EOS token;
  a chunk that decodes to "" (special tokens only) is skipped (phi cannot score it) and stays in the
  KL term; learning rate, batch size, gradient clip 1.0; style teachers of the toy (recipes below).
  Teacher prompt: a local HF teacher with a chat template reads x in its own template, followed by the
  student's decoded y[:t0]; a /v1/completions endpoint reads x in the student's template (the toy has
  none), a chat endpoint gets the raw x as the user message (its server applies its own template).
  pi_ref is the initial student in the student's dtype under the same autocast (KL = 0 at step 0;
  `--ref_dtype bf16` halves its memory but starts the anchor at bf16 rounding noise).
  Chat-only endpoints (the paper's Claude / Gemini teachers; `--teacher_api_mode`): the teacher still sees
  exactly x + y[:t0] and returns only text. Continuation of a trailing assistant message: messages
  [user: x, assistant: y[:t0]] with vLLM's continue_final_message / add_generation_prompt false (dropped
  when the server answers 4xx to them: native prefills). Instruction fallback: one user message
  INSTRUCTION(x, y[:t0]); the reply loses a preamble line, wrapping quotes / fences and a restated
  beginning (clean_continuation: the longest start of the reply that y[:t0] ends with, >= min(8, |y[:t0]|)
  characters); a server seen restating at the probe gets max_tokens + |y[:t0]|. Which style a server
  supports is found at start by one request each: "A B C D E F G" must be continued with "H". sft needs
  whole replies only ([user: x]). No system message is sent.

Commands:
  toy, CPU (the README's main job, ~1.5 min):   python omniopd.py
  baselines / worlds:   python omniopd.py --method opd | sft | grpo | kl_only
                        python omniopd.py --toy_teacher other_style --similarity rouge1
                        python omniopd.py --toy_teacher other_tokenizer        (opd refuses: exit 2)
  full toy table:       python omniopd.py --table --table_grid all --table_seeds 0,1,2
  one GPU, real models: python omniopd.py --model_name_or_path Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B \
                          --train_file data/math_train.jsonl --eval_file data/math500.jsonl --similarity rouge1 \
                          --max_new_tokens 4096 --eval_max_new_tokens 4096 --chunk_tokens 50 --num_chunks 10 \
                          --teacher_samples 10 --learning_rate 1e-6 --per_device_batch_size 8 --micro_batch_size 2 \
                          --gradient_checkpointing --teacher_batch_size 32 --eval_batch_size 16
                        (--eval_max_new_tokens and --gradient_checkpointing are already the real-model defaults.
                        Memory: B*M*N = 800 teacher rows per update, each up to P + 4096 + C tokens; Qwen3-8B's bf16
                        KV cache is 144 KiB a token, ~19 GiB for 32 rows; the fp32 student's is 224 KiB a token,
                        ~15 GiB for 16 eval rows)
  sft at omniopd's measured teacher tokens: ... --method sft --match_teacher_tokens runs/omniopd/<omniopd run>
  black-box teacher:    ... --teacher_api_base http://localhost:8000/v1 --teacher_api_model Qwen/Qwen3-32B
                          [--teacher_api_key_env OPENAI_API_KEY] [--teacher_api_mode auto|completions|chat|...]
                        (auto: /v1/completions where served, else chat completions: continuing an assistant
                        message where the server does, else the instruction fallback; logged at start)
  the three API channels on the toy (tests/fault_server.py plays the providers):
                        python omniopd.py --table --table_grid api --table_seeds 0,1,2 --eval_size 300
  several GPUs:         torchrun --nproc_per_node 8 omniopd.py ... (per-rank prompt shards, exact global gradient,
                        evals sharded over ranks)
  speed of a step:      python omniopd.py --bench --method opd --model_name_or_path M --teacher T --max_steps 5 \
                          [--autocast bf16] [--no-gradient_checkpointing]   (seconds per step and its split; writes
                        nothing). Side by side with TRL's GKDTrainer: python tests/bench_opd_vs_trl.py (README)
  bf16 on a CPU:        --autocast bf16 (the forwards of the training step in bf16; faster on CPUs with AVX512-BF16)

Logged (metrics.jsonl): loss (of the global batch under torchrun, as are chunk_term and kl_term),
train_acc (rollout correctness), kl_ref (mean per response token of KL(pi_ref || pi); for opd, sft and
beta 0, whose loss does not use pi_ref, only every --ref_kl_every steps and at the last one), entropy,
resp_len, chunks (per response), k_mean, k_mid (share of k_c inside (0.05N, 0.95N): near 0 means the
teacher samples are identical or the prefix leaked; only meaningful where phi is near-binary, as on
the toy's digit chunks: unrelated real texts score ned ~0.35, rouge1 ~0.5, so it reads ~1.0 there),
phi_null (phi of a chunk against another chunk's continuation: the level of unrelated text, to read
k_mean / N against), distinct (share of distinct texts among a chunk's N continuations), copy (share
of continuations equal to the chunk: a leaked prefix), phat_mean, sft_cut (share of sft teacher
replies cut at max_tokens: they get no EOS), teacher_tokens / student_tokens (cumulative, all
ranks), teacher_prompt_tokens (cumulative tokens the teacher read, as an endpoint bills them; a local
teacher: every row's prompt), teacher_echo (instruction fallback: share of replies that restated
y[:t0] and were cleaned), acc_greedy / acc_sample / acc_ood at evals, and where each step's time
goes: time_generate (student rollouts), time_teacher (teacher calls and their scoring; opd's teacher
forward), time_forward (entropy pass and the loss's forward, pi_ref's included), time_backward,
time_optimizer (all-reduce, clip, AdamW), time_step (all of it). summary.json has their means
(time_per_step_s), the run's wall time over all its processes and the endpoint's resolved mode
(teacher_api).

Runs. Bad flags, a missing model, an unreachable endpoint (or one whose model, route or chat style does
not work) or a bad data line stop the run with one line (exit 2) before anything is loaded or written.
An --output_dir that holds a run is refused unless --resume (continues it: refused without a checkpoint
or when a result-changing flag differs; --max_steps may grow) or --overwrite (replaces it). kill -9 +
--resume gives the uninterrupted run's summary.json; Ctrl-C ends with one line naming the last
checkpoint. --request_timeout bounds each teacher request (retries included), so a hung or trickling
endpoint ends the run in that time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import common as C
from common import UserError, exit_on_user_error

# Style teachers of the toy world (add only), built and cached by common.toy_checkpoint.
TOY_STYLE_RECIPES = {
    # trained on steps written "s x r" or "x s r" at random, per trace
    "mixed_style": ("teacher_mixed_add", dict(domains={"add": (1.0, 0.0)}, style="mixed", tokenizer="byte", steps=1200)),
    # reads student-format ("sxr") prefixes, continues in its own format ("xsr"); loss on its own part only
    "other_style": ("teacher_switch_add", dict(domains={"add": (1.0, 0.0)}, style="switch", tokenizer="byte", steps=1200)),
}
TOY_TEACHERS = ("same", "mixed_style", "other_style", "other_tokenizer")
TEACHER_API_MODES = ("auto", "completions", "chat", "chat_continue", "chat_instruct")


# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="OmniOPD: logit-free on-policy distillation, with OPD / SFT / GRPO "
                                "baselines. Defaults = the toy CPU run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- models ----
    p.add_argument("--model_name_or_path", default="toy", help="student pi (and pi_ref): HF id / path, or 'toy' (carry-bug toy student)")
    p.add_argument("--teacher", default="toy", help="teacher: HF id / path, or 'toy' (chosen by --toy_teacher)")
    p.add_argument("--toy_teacher", default="same", choices=TOY_TEACHERS,
                   help="toy teacher: same tokenizer+format | mixed_style | other_style | other_tokenizer (BPE)")
    p.add_argument("--teacher_api_base", default=None, help="OpenAI-compatible endpoint of a black-box teacher (text only)")
    p.add_argument("--teacher_api_model", default=None, help="model name at --teacher_api_base")
    p.add_argument("--teacher_api_key_env", default=None, help="environment variable holding the endpoint's API key")
    p.add_argument("--teacher_api_mode", default="auto", choices=TEACHER_API_MODES,
                   help="how the endpoint teacher continues x + y[:t0]: completions (raw text, /v1/completions), chat "
                        "(/v1/chat/completions: continuing a trailing assistant message where the server does, else the "
                        "instruction fallback; probed at start), chat_continue / chat_instruct (that chat style, forced), "
                        "auto (probe at start: completions if served, else chat)")
    p.add_argument("--request_timeout", type=float, default=600.0,
                   help="seconds one teacher request may take at most, retries included (a hung or trickling "
                        "endpoint ends the run with one line after this)")
    p.add_argument("--teacher_access", default="logits", choices=("logits", "text"),
                   help="what the teacher exposes: logits (white-box, opd possible) or text (API-like: opd refuses). "
                        "Only opd reads it: omniopd and sft never read teacher logits, so text is refused for them")
    p.add_argument("--teacher_logit_noise", type=float, default=0.0, help="sigma: N(0, sigma^2) noise on the logits opd sees")
    p.add_argument("--teacher_batch_size", type=int, default=1024,
                   help="local text teacher: rows (prefix x N copies) per generate call; each row holds a KV cache of "
                        "up to P + T + C tokens, so use ~32 for real models")
    p.add_argument("--sim_model", default=None,
                   help="encoder for --similarity embed, loaded with AutoModel (e.g. sentence-transformers/all-MiniLM-L6-v2; "
                        "default: pi_ref)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="teacher and --sim_model dtype (auto: bf16 on CUDA)")
    p.add_argument("--ref_dtype", default="same", choices=("same", "bf16"),
                   help="pi_ref dtype: same as the student (fp32, run under the student's autocast, so KL(pi_ref || pi) "
                        "= 0 at step 0) or bf16 (half the memory; KL then starts at the bf16 rounding noise)")
    p.add_argument("--autocast", default="auto", choices=C.AUTOCAST_MODES,
                   help="compute dtype of the training step's forwards (rollouts, entropy pass, opd's teacher scoring, "
                        "the loss, pi_ref): auto = bf16 autocast on CUDA GPUs with bf16 in hardware, fp32 elsewhere; "
                        "bf16 = bf16 autocast on any device (faster on CPUs with AVX512-BF16 / AMX; weights, AdamW and "
                        "the LM head's log-softmax stay fp32); fp32 = none. Evals run without autocast")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    # ---- method ----
    p.add_argument("--method", default="omniopd", choices=("omniopd", "opd", "sft", "grpo", "kl_only"), help="objective")
    p.add_argument("--similarity", default="ned", choices=("ned", "rouge1", "embed"), help="phi of Eq. (5)")
    p.add_argument("--anchor", default="entropy", choices=("entropy", "random"), help="chunk starts of Eq. (3)")
    # DEVIATION(2): toy-sized C, M, N (the paper: 50, 10, 10); set them for real models
    p.add_argument("--chunk_tokens", type=int, default=4, help="C: chunk length in student tokens, Eq. (3)")
    p.add_argument("--num_chunks", type=int, default=2, help="M: most chunks per response, Eq. (3)")
    p.add_argument("--teacher_samples", type=int, default=8, help="N: teacher continuations per chunk, Eq. (4)")
    p.add_argument("--teacher_temperature", type=float, default=1.0, help="teacher sampling temperature, Eq. (4)")
    p.add_argument("--teacher_chunk_unit", default="chars", choices=("chars", "tokens"),
                   help="teacher continuation length: student chunk's characters or C teacher tokens")
    p.add_argument("--alpha", type=float, default=1.0, help="alpha: Dirichlet prior strength, Eq. (6)")
    p.add_argument("--beta", type=float, default=0.1, help="beta: weight of the KL anchor to pi_ref, Eq. (7)/(9)")
    p.add_argument("--group_size", type=int, default=8, help="G: samples per prompt for grpo, Eq. (9)")
    p.add_argument("--teacher_token_budget", default="match", choices=("match", "none"),
                   help="sft: match omniopd's teacher tokens per update (see --match_teacher_tokens), "
                        "or one response per prompt")
    p.add_argument("--match_teacher_tokens", default=None,
                   help="sft with --teacher_token_budget match: omniopd's *measured* teacher tokens per update (all ranks), "
                        "as a number or the omniopd run's output dir (reads teacher_tokens / steps from its summary.json); "
                        "default: omniopd's nominal B*M*N*C")
    p.add_argument("--temperature", type=float, default=1.0, help="student rollout temperature, Eq. (1)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="T max: response tokens per rollout")
    # ---- training ----
    p.add_argument("--learning_rate", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--per_device_batch_size", type=int, default=32, help="B per rank: rollouts per update")
    p.add_argument("--max_steps", type=int, default=80, help="optimizer updates")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clip")
    p.add_argument("--adamw_impl", default=None, choices=("fused", "foreach", "for_loop"),
                   help="AdamW kernel (default: fused for real models, foreach for the toy: bit-identical to for_loop, "
                        "so the toy's results stay what the README reports; fused differs by float rounding)")
    p.add_argument("--micro_batch_size", type=int, default=None,
                   help="rows per forward + backward of the loss (exact: every loss is a sum over rows / B); "
                        "default: all at once")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the student's training forward "
                        "(default: on for real models, off for the toy)")
    p.add_argument("--ref_kl_every", type=int, default=None,
                   help="diagnostic KL(pi_ref || pi) every n steps for objectives that do not use pi_ref (opd, sft, "
                        "beta 0): a pi_ref forward only then, and at the last step (0: never; default 1 for the toy, "
                        "10 for real models). Objectives with the KL anchor compute it every step")
    p.add_argument("--seed", type=int, default=0, help="seed of random, numpy, torch, samplers")
    # ---- data ----
    p.add_argument("--train_file", default=None, help="jsonl with 'prompt', 'answer' (default: toy add problems)")
    p.add_argument("--eval_file", default=None, help="jsonl with 'prompt', 'answer' (default: toy held-out problems)")
    p.add_argument("--chat_template", default="auto", choices=("auto", "none"), help="wrap prompts in the student's chat template")
    # ---- evaluation ----
    p.add_argument("--eval_size", type=int, default=500, help="held-out problems per eval split")
    p.add_argument("--eval_every", type=int, default=40, help="greedy held-out eval every n steps (0: start/end only)")
    p.add_argument("--eval_max_new_tokens", type=int, default=None,
                   help="response tokens at eval (default: 40 for the toy student on toy problems, else --max_new_tokens: "
                        "40 tokens would cut every real reasoning trace before its answer)")
    p.add_argument("--eval_batch_size", type=int, default=128,
                   help="prompts per eval generate call (each holds a KV cache of P + eval_max_new_tokens tokens; "
                        "~16 for real models)")
    # ---- output ----
    p.add_argument("--output_dir", default=None, help="run dir (default runs/omniopd/<method>-<toy_teacher>-s<seed>)")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every n steps (0: at the end only)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output_dir from its checkpoint (refused when a result-changing flag "
                        "differs; --max_steps may grow)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="delete the run already in --output_dir and start again (without it such a dir is refused)")
    # ---- benchmark ----
    p.add_argument("--bench", action="store_true",
                   help="time --max_steps training steps on the given models and print seconds per step and where it "
                        "goes (median over steps 2..n, so warm-up is left out); no evals, nothing written")
    # ---- table ----
    p.add_argument("--table", action="store_true", help="run the multi-seed toy table instead of one run")
    p.add_argument("--table_grid", default="main", help="comma list of: main, mechanism, other_tokenizer, ablations, noise, anchor_long, all")
    p.add_argument("--table_seeds", default="0,1,2", help="seeds of the table's main arms")
    p.add_argument("--table_ablation_seeds", default="0", help="seeds of the table's ablation / noise arms")
    args = p.parse_args(argv)
    if args.output_dir is None:
        tag = "table" if args.table else f"{args.method}-{args.toy_teacher}-s{args.seed}"
        args.output_dir = os.path.join("runs", "omniopd", tag)
    toy = args.model_name_or_path == "toy"
    if args.eval_max_new_tokens is None:
        args.eval_max_new_tokens = 40 if toy and args.eval_file is None else args.max_new_tokens
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = not toy
    if args.ref_kl_every is None:
        args.ref_kl_every = 1 if toy else 10
    if args.adamw_impl is None:
        args.adamw_impl = "foreach" if toy else "fused"
    return args


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work, before anything is loaded or
    written: one UserError (one line, exit 2) naming the flag and the fix."""
    req = C.require
    for k in ("chunk_tokens", "num_chunks", "teacher_samples", "per_device_batch_size", "max_new_tokens",
              "teacher_batch_size", "eval_max_new_tokens", "eval_batch_size", "eval_size", "group_size"):
        req(getattr(args, k) >= 1, f"--{k} {getattr(args, k)} must be >= 1")
    req(args.micro_batch_size is None or args.micro_batch_size >= 1, f"--micro_batch_size {args.micro_batch_size} must be >= 1")
    for k in ("max_steps", "eval_every", "save_every", "ref_kl_every"):
        req(getattr(args, k) >= 0, f"--{k} {getattr(args, k)} must be >= 0")
    for k, lo, strict in (("alpha", 0, False), ("beta", 0, False), ("learning_rate", 0, True), ("max_grad_norm", 0, True),
                          ("temperature", 0, True), ("teacher_temperature", 0, False), ("teacher_logit_noise", 0, False),
                          ("request_timeout", 0, True)):
        v = getattr(args, k)
        ok = math.isfinite(v) and (v > lo if strict else v >= lo)
        req(ok, f"--{k} {v} must be {'>' if strict else '>='} {lo} and finite"
                + (" (the rollouts are on-policy samples; use 1.0)" if k == "temperature" else ""))
    m = args.method
    if m == "grpo":
        req(args.group_size >= 2, f"--group_size {args.group_size}: grpo needs >= 2 samples per prompt (its advantage "
                                  f"divides by the group's std)")
        req(args.per_device_batch_size % args.group_size == 0,
            f"--per_device_batch_size {args.per_device_batch_size} must be a multiple of --group_size {args.group_size} for grpo")
    if m == "omniopd":  # a chunk needs t + C <= T: with C > T max no chunk is ever audited (it would run as kl_only)
        req(args.chunk_tokens <= args.max_new_tokens, f"--chunk_tokens {args.chunk_tokens} > --max_new_tokens "
                                                      f"{args.max_new_tokens}: no response could hold a chunk; lower it")
    if m == "kl_only":
        req(args.beta > 0, "--method kl_only with --beta 0 has no loss at all; pass --beta > 0")
    api = args.teacher_api_base is not None
    if m == "opd":
        req(not api and args.teacher_access == "logits",
            "--method opd needs the teacher's log-probs, but the teacher is text-only "
            f"({'--teacher_api_base' if api else '--teacher_access text'}); use --method omniopd or sft")
        req(not (args.teacher == "toy" and args.toy_teacher == "other_tokenizer"),
            "--method opd compares token log-probs, but --toy_teacher other_tokenizer has another tokenizer than the "
            "student; use --method omniopd or sft")
    else:
        req(args.teacher_access == "logits", f"--teacher_access text changes nothing for --method {m}: it never reads "
                                             "teacher logits (it only matters to opd, which then refuses); drop it")
        req(args.teacher_logit_noise == 0, f"--teacher_logit_noise applies to --method opd only, not {m}; drop it")
    if api:
        req(bool(args.teacher_api_model), "--teacher_api_base needs --teacher_api_model (the model name the endpoint serves)")
        req(m in ("omniopd", "sft"), f"--teacher_api_base: --method {m} uses no text teacher; drop it")
    req(api or args.teacher_api_mode == "auto", f"--teacher_api_mode {args.teacher_api_mode} applies to an endpoint "
                                                 "teacher; pass --teacher_api_base or drop it")
    if args.teacher_api_key_env:
        req(api, "--teacher_api_key_env needs --teacher_api_base")
        req(bool(os.environ.get(args.teacher_api_key_env)),
            f"environment variable {args.teacher_api_key_env} (from --teacher_api_key_env) is not set")
    req(args.sim_model is None or (m == "omniopd" and args.similarity == "embed"),
        "--sim_model is the encoder of --similarity embed (--method omniopd); drop it or pass --similarity embed")
    req(args.match_teacher_tokens is None or (m == "sft" and args.teacher_token_budget == "match"),
        "--match_teacher_tokens applies to --method sft with --teacher_token_budget match")
    req(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other; pass one")
    if args.bench:
        req(args.max_steps >= 2, f"--bench times steps 2..--max_steps (step 1 is warm-up): --max_steps {args.max_steps} "
                                 "must be >= 2")
        req(not (args.table or args.resume), "--bench writes nothing and runs one configuration: drop --table / --resume")
        req(int(os.environ.get("WORLD_SIZE", "1")) == 1, "--bench times one process: run it without torchrun")
    if args.table:
        grids = [g.strip() for g in args.table_grid.split(",") if g.strip()]
        bad = set(grids) - set(TABLE_GRIDS) - {"all"}
        req(grids and not bad, f"unknown --table_grid {sorted(bad)}; use {', '.join(TABLE_GRIDS)} or all")
        for k in ("table_seeds", "table_ablation_seeds"):
            req(bool(re.fullmatch(r"\d+(,\d+)*", getattr(args, k))), f"--{k} '{getattr(args, k)}' must be a comma list "
                                                                       f"of seeds, e.g. 0,1,2")


# ---------------------------------------------------------------------------------------------
# ---- method math (pure functions; the tests import these) ----
# ---------------------------------------------------------------------------------------------


def peak_entropy_chunks(entropy: torch.Tensor, response_mask: torch.Tensor, chunk_len: int,
                        num_chunks: int) -> list[list[int]]:
    """Eq. (3): non-overlapping chunk starts per row, highest entropy first (ties: later start).

    entropy (B, T): H_t of the distribution that produced response token t; response_mask (B, T).
    A start t needs t + C <= T_b (T_b = the row's response length); accepted when |t - u| >= C for
    every accepted u; at most M, fewer when they do not fit, never padded. Returns sorted starts."""
    out = []
    H = entropy.detach().float().cpu()
    lens = response_mask.long().sum(-1).tolist()
    for b, T in enumerate(lens):
        cands = sorted(range(0, T - chunk_len + 1), key=lambda t: (float(H[b, t]), t), reverse=True)
        acc: list[int] = []
        for t in cands:
            if len(acc) >= num_chunks:
                break
            if all(abs(t - u) >= chunk_len for u in acc):
                acc.append(t)
        out.append(sorted(acc))
    return out


def random_chunks(response_mask: torch.Tensor, chunk_len: int, counts: Sequence[int],
                  rng: random.Random) -> list[list[int]]:
    """Ablation of Eq. (3): `counts[b]` non-overlapping starts drawn uniformly (same count as the
    entropy scheduler picked, so only *where* the chunks are changes)."""
    out = []
    for b, T in enumerate(response_mask.long().sum(-1).tolist()):
        best: list[int] = []
        for _ in range(20):  # greedy packing of a random order; retry when it packs fewer
            cands = list(range(0, T - chunk_len + 1))
            rng.shuffle(cands)
            acc: list[int] = []
            for t in cands:
                if len(acc) >= counts[b]:
                    break
                if all(abs(t - u) >= chunk_len for u in acc):
                    acc.append(t)
            if len(acc) > len(best):
                best = acc
            if len(best) >= counts[b]:
                break
        out.append(sorted(best))
    return out


def levenshtein(a: str, b: str) -> int:
    """Edit distance with a numpy row DP: the insertion dependency within a row is a running min
    (cur[j] = min_k<=j (tmp[k] + j - k)), so each row is O(|b|) vectorised work."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    bv = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    idx = np.arange(len(b) + 1)
    prev = idx.copy()
    for i, ch in enumerate(a, 1):
        cost = (bv != ord(ch)).astype(np.int64)
        tmp = np.empty_like(prev)
        tmp[0] = i
        tmp[1:] = np.minimum(prev[1:] + 1, prev[:-1] + cost)
        prev = np.minimum.accumulate(tmp - idx) + idx
    return int(prev[-1])


_UNITS = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def similarity(a: str, b: str, kind: str = "ned", embedder: Callable | None = None) -> float:
    """phi(a, b) in [0, 1] of Eq. (5). ned: 1 - Levenshtein / max length (strings capped at 4000 chars);
    rouge1: F1 of unit multisets (letter runs, single digits, single symbols); embed: max(0, cos) of
    `embedder` vectors. phi("", "") = 1 and phi(a, "") = 0 for every kind."""
    a, b = a[:4000], b[:4000]
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    if kind == "ned":
        return 1.0 - levenshtein(a, b) / max(len(a), len(b))
    if kind == "rouge1":
        from collections import Counter

        ua, ub = Counter(_UNITS.findall(a)), Counter(_UNITS.findall(b))
        overlap = sum((ua & ub).values())
        if overlap == 0:
            return 0.0
        prec, rec = overlap / sum(ub.values()), overlap / sum(ua.values())
        return 2 * prec * rec / (prec + rec)
    if kind == "embed":
        if embedder is None:
            raise ValueError("similarity kind 'embed' needs an embedder (see make_embedder)")
        e = embedder([a, b])
        return max(0.0, float(torch.nn.functional.cosine_similarity(e[0:1], e[1:2]).item()))
    raise ValueError(f"unknown similarity {kind!r}; use ned, rouge1 or embed")


def make_embedder(model, tok, batch_size: int = 256) -> Callable[[list[str]], torch.Tensor]:
    """texts -> (n, d) mean-pooled last hidden states of a frozen LM (phi = embed). Only the backbone
    runs (`base_model`: a causal LM's LM head would add a (n, L, V) logits tensor, 1.5 GiB for 128
    short texts at V = 151,936, that the embedding never reads)."""
    device = next(model.parameters()).device
    backbone = getattr(model, "base_model", model)  # LlamaForCausalLM -> LlamaModel; an encoder -> itself

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        outs = []
        for i in range(0, len(texts), batch_size):
            ids, mask = C.encode_prompts(tok, texts[i:i + batch_size], device)
            h = backbone(input_ids=ids, attention_mask=mask,
                         position_ids=C.position_ids(mask)).last_hidden_state.float()  # (n, L, d)
            m = mask[..., None].float()
            outs.append((h * m).sum(1) / m.sum(1).clamp(min=1.0))
        return torch.cat(outs).cpu()

    return embed


def chunk_agreement(chunks: Sequence[str], continuations: Sequence[Sequence[str]], kind: str,
                    embedder: Callable | None = None) -> torch.Tensor:
    """Eq. (5): k_c = sum_n phi(s_c, z_n) for each chunk. chunks: M' strings; continuations: M' lists
    of N strings. Returns (M',) float."""
    if kind != "embed":
        return torch.tensor([sum(similarity(s, z, kind) for z in zs) for s, zs in zip(chunks, continuations)],
                            dtype=torch.float32)
    texts = sorted({t for s, zs in zip(chunks, continuations) for t in [s, *zs] if t})
    vec = dict(zip(texts, embedder(texts))) if texts else {}
    k = []
    for s, zs in zip(chunks, continuations):
        tot = 0.0
        for z in zs:
            if not s or not z:
                tot += float(not s and not z)
            else:
                tot += max(0.0, float(torch.nn.functional.cosine_similarity(vec[s][None], vec[z][None]).item()))
        k.append(tot)
    return torch.tensor(k, dtype=torch.float32)


def chunk_mean_logp(logp: torch.Tensor, starts: Sequence[Sequence[int]], chunk_len: int) -> torch.Tensor:
    """Eq. (6) helper: mean_{t in c} log pi(y_t) for every chunk, rows in order -> (sum_b M_b,)."""
    vals = [logp[b, t:t + chunk_len].mean() for b, ss in enumerate(starts) for t in ss]
    return torch.stack(vals) if vals else logp.new_zeros(0)


def dm_posterior(k_sem, pi_bar, num_samples: int, alpha: float) -> torch.Tensor:
    """Eq. (6): phat = (k + alpha * pbar) / (N + alpha), the Dirichlet-Multinomial smoothed score.
    Detached by construction (pitfall 1: a gradient through pbar adds an unintended term)."""
    with torch.no_grad():
        k = torch.as_tensor(k_sem, dtype=torch.float32).detach()
        pb = torch.as_tensor(pi_bar, dtype=torch.float32).detach()
        return ((k + alpha * pb) / (num_samples + alpha)).detach()


def chunk_weights(starts: Sequence[Sequence[int]], phat: torch.Tensor, shape: tuple[int, int],
                  chunk_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-chunk phat onto token positions: (weights (B, T), audited (B, T) bool)."""
    w = torch.zeros(shape, dtype=torch.float32)
    audited = torch.zeros(shape, dtype=torch.bool)
    i = 0
    for b, ss in enumerate(starts):
        for t in ss:
            w[b, t:t + chunk_len] = float(phat[i])
            audited[b, t:t + chunk_len] = True
            i += 1
    return w, audited


def omniopd_loss(logp: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                 starts: Sequence[Sequence[int]], phat: torch.Tensor, chunk_len: int, beta: float,
                 num_sequences: int | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. (7). logp (B, T) log pi(y_t) with grad; kl (B, T) exact KL(pi_ref || pi) per position;
    response_mask (B, T); starts per row; phat (sum_b M_b,) detached. Token *sum* / B (never a token
    mean: that would tie the step size to the share of audited tokens, pitfall 5). num_sequences =
    the global batch under DDP. Returns (loss, parts)."""
    B = num_sequences or logp.shape[0]
    w, audited = chunk_weights(starts, phat.detach().cpu(), tuple(logp.shape), chunk_len)
    w, audited = w.to(logp.device), audited.to(logp.device)
    mask = response_mask.to(logp.dtype)
    chunk_term = -(w * logp * mask).sum() / B  # Eq. (7) first term
    unaudited = mask * (~audited).to(logp.dtype)
    kl_term = beta * (kl * unaudited).sum() / B  # Eq. (7) KL anchor on unaudited tokens only
    return chunk_term + kl_term, {"chunk_term": chunk_term.detach(), "kl_term": kl_term.detach()}


def opd_loss(logp: torch.Tensor, teacher_logp: torch.Tensor, response_mask: torch.Tensor,
             num_sequences: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (8): A_t = -(log pi(y_t) - log pi_T(y_t)) detached; L = -(1/B) sum A_t log pi(y_t).
    Its gradient is that of the per-token reverse KL on the student's sampled tokens. -> (loss, A)."""
    B = num_sequences or logp.shape[0]
    mask = response_mask.to(logp.dtype)
    adv = (-(logp - teacher_logp)).detach() * mask  # (B, T)
    return -(adv * logp * mask).sum() / B, adv


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Eq. (9): (r - mean_G) / (std_G + 1e-4) within consecutive groups of G samples."""
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def grpo_loss(logp, kl, response_mask, adv, beta, num_sequences=None):
    """Eq. (9): -(1/B) sum_b A_b sum_t log pi(y_t) + beta (1/B) sum KL on all response tokens."""
    B = num_sequences or logp.shape[0]
    mask = response_mask.to(logp.dtype)
    return (-(adv[:, None].to(logp) * logp * mask).sum() + beta * (kl * mask).sum()) / B


def sft_loss(logp: torch.Tensor, response_mask: torch.Tensor, num_sequences: int | None = None) -> torch.Tensor:
    """Eq. (10): negative log-likelihood of teacher responses, token sum / number of responses."""
    n = num_sequences or logp.shape[0]
    return -(logp * response_mask.to(logp.dtype)).sum() / n


# ---------------------------------------------------------------------------------------------
# ---- world, data, teacher, rollouts, evaluation ----
# ---------------------------------------------------------------------------------------------


class Problem:
    def __init__(self, prompt: str, answer: str):
        self.prompt, self.answer = prompt, answer


def load_problems(path: str) -> list[Problem]:
    """jsonl with one {"prompt", "answer"} object per line; any bad line -> one UserError with file:line."""
    out = [Problem(str(r["prompt"]), str(r["answer"])) for r in C.read_jsonl(path, keys=("prompt", "answer"))]
    if not out:
        raise UserError(f"{path} is empty; it needs jsonl lines with 'prompt' and 'answer'")
    return out


def toy_teacher_path(which: str) -> str:
    if which == "same":
        return C.toy_checkpoint("teacher")
    if which == "other_tokenizer":
        return C.toy_checkpoint("teacher_bpe")
    name, recipe = TOY_STYLE_RECIPES[which]
    return C.toy_checkpoint(name, recipe=recipe)


def same_tokenizer(tok_a, tok_b) -> bool:
    """Token-level methods compare log-probs of the same ids: equal vocab and equal probe encodings."""
    probe = "add 3582=033;358;886;862;=2 The quick brown fox, 12+7=19.\n"
    try:
        return tok_a.get_vocab() == tok_b.get_vocab() and tok_a(probe)["input_ids"] == tok_b(probe)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer that cannot be compared is not the same one
        return False


def render_prompts(tok, prompts: Sequence[str], chat: bool) -> list[str]:
    if not chat:
        return list(prompts)
    return [C.render_chat(tok, [{"role": "user", "content": p}]) for p in prompts]


class Prefix(str):
    """A teacher prompt x + y[:t0] as one string (what /v1/completions and a local teacher read) that
    also keeps its two parts for a chat-only endpoint: `x`, the problem as the user wrote it (the server
    applies its own chat template), and `y`, the student's partial response y[:t0] ("" for a whole reply)."""

    def __new__(cls, text: str, x: str | None = None, y: str = ""):
        s = super().__new__(cls, text)
        s.x, s.y = (text if x is None else x), y
        return s


def verification_requests(prompt_texts: Sequence[str], response_ids: torch.Tensor, starts: Sequence[Sequence[int]],
                          chunk_len: int, tok, raw_prompts: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Eq. (4): for every chunk, the teacher's text prefix x + y[:t0] (never a token of the chunk,
    pitfall 3) and the decoded student chunk s_c = y[t0:t0+C]. Each prefix is a `Prefix` that also
    holds x (`raw_prompts[b]`, else the rendered prompt) and y[:t0] apart, for a chat-only teacher."""
    prefixes, chunks = [], []
    for b, ss in enumerate(starts):
        ids = response_ids[b].tolist()
        for t in ss:
            y = tok.decode(ids[:t], skip_special_tokens=True)
            prefixes.append(Prefix(prompt_texts[b] + y, raw_prompts[b] if raw_prompts is not None else prompt_texts[b], y))
            chunks.append(tok.decode(ids[t:t + chunk_len], skip_special_tokens=True))
    return prefixes, chunks


def drop_empty_chunks(starts: Sequence[Sequence[int]], prefixes: list[str], chunks: list[str]):
    """Skip chunks whose decoded text is empty (only special tokens, e.g. a lone EOS): phi("", z) cannot
    score them (phi("", "") = 1 after the teacher text is cut to 0 characters would give k = N). They
    get no chunk term and stay unaudited, i.e. in the KL anchor. -> (starts, prefixes, chunks)."""
    keep = [bool(c) for c in chunks]
    it = iter(keep)
    starts = [[t for t in ss if next(it)] for ss in starts]
    return starts, [p for p, k in zip(prefixes, keep) if k], [c for c, k in zip(chunks, keep) if k]


def teacher_complete(teacher, prompts: list[str], n: int, finish: bool = False, **kw):
    """teacher.complete(prompts, n, ...) with two real-model concerns. A local teacher that needs
    several generate calls (len(prompts) * n > its batch_size) gets the prompts sorted by length, so
    each call pads to similar lengths; the answers come back in the caller's order. (One call, as in
    the toy, is left as is: sorting inside one call saves nothing and would reorder the sampler's
    draws.) An endpoint that rejects /v1/completions raises one line naming --teacher_api_mode chat.
    finish=True also returns the finish reasons ("length": cut at max_tokens), same
    shape and order (None where the teacher reports none)."""
    bs = getattr(teacher, "batch_size", None)
    order = list(range(len(prompts)))
    if getattr(teacher, "is_local", False) and bs and len(prompts) * n > bs:
        order = sorted(order, key=lambda i: len(prompts[i]))
    try:
        outs = teacher.complete([prompts[i] for i in order], n=n, **kw)
    except C.EndpointError as e:  # a route that answered the preflight and now refuses (the server changed)
        msg = str(e)
        if ("rejected" in msg or "HTTP 4" in msg) and "/completions" in msg and "/chat/" not in msg:
            raise C.EndpointError(f"{msg}. If this endpoint serves chat completions only, pass --teacher_api_mode chat "
                                  f"(or auto, which probes it at start)") from None
        raise
    reasons = getattr(teacher, "last_finish_reasons", None) or [[None] * n for _ in order]
    res, why = [None] * len(prompts), [None] * len(prompts)
    for j, i in enumerate(order):
        res[i], why[i] = outs[j], reasons[j]
    return (res, why) if finish else res


def teacher_continuations(teacher: C.LLM, prefixes: list[str], chunks: list[str], n: int, temperature: float,
                          unit: str, chunk_len: int) -> list[list[str]]:
    """N text continuations per prefix from a text-only teacher (`common.LLM`: local HF model or an
    OpenAI-compatible endpoint; no logits anywhere). One batched call for the whole batch."""
    if not prefixes:
        return []
    if unit == "chars":  # DEVIATION(3): as much text as the student chunk, cut to its characters
        # at most C teacher tokens (about C student tokens of text; a real chunk of C tokens is ~4C
        # characters, and asking for that many tokens would spend ~4x the teacher budget); fewer when
        # every chunk is shorter in characters (the toy's byte tokens: 1 character = 1 token)
        max_tokens = max(1, min(chunk_len, max(len(s) for s in chunks)))
        outs = teacher_complete(teacher, prefixes, n, temperature=temperature, max_tokens=max_tokens)
        return [[z[:len(s)] for z in zs] for s, zs in zip(chunks, outs)]
    return teacher_complete(teacher, prefixes, n, temperature=temperature, max_tokens=chunk_len)


# ---- a black-box teacher behind a chat-only API (/v1/chat/completions) ----

# The start-up probe: a capable model continues "A B C D E F G" with "H"; a server that opens a new
# reply instead writes "A B C ..." (or "Sure, ...") first.
PROBE_TASK = "Write the capital letters A to Z in order, separated by spaces, and nothing else."
PROBE_PARTIAL, PROBE_NEXT = "A B C D E F G", "H"
# how vLLM / SGLang are told to continue the final assistant message instead of opening a new turn;
# providers that prefill natively (Anthropic) take the trailing assistant message without these fields
CONTINUE_FIELDS = {"continue_final_message": True, "add_generation_prompt": False}
# the instruction fallback: the problem, then the partial answer after a one-line instruction (the wording
# SmolLM2-135M-Instruct continued from; two other wordings made it restate the beginning and stop)
INSTRUCTION = "{x}\n\nContinue this answer from where it stops, without repeating it:\n{y}"
_PREAMBLE = re.compile(r"^\s*(?:sure|ok(?:ay)?|certainly|here(?:'s| is)|continuation|next)\b[^\n]{0,80}:[ \t]*\n+", re.I)
_FENCE = re.compile(r"^\s*```[\w-]*\n(.*?)\n?```\s*$", re.S)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u00ab": "\u00bb"}


def clean_continuation(reply: str, partial: str, min_overlap: int = 8) -> tuple[str, bool]:
    """The instruction fallback's reply read as a continuation of `partial` (the student's y[:t0]):
    drops a leading preamble line ("Sure, here is the continuation:"), a code fence or a pair of quotes
    around the whole reply, and a restated beginning: the longest start of the reply that `partial`
    (or `partial` without its trailing whitespace) ends with, when it is at least min(min_overlap,
    len(partial)) characters long (a shorter match is more likely the continuation itself).
    -> (continuation, whether a restated beginning was dropped)."""
    r = _PREAMBLE.sub("", reply, count=1)
    m = _FENCE.match(r)
    if m:
        r = m.group(1)
    s = r.strip()
    if len(s) >= 2 and _QUOTES.get(s[0]) == s[-1]:
        r = s[1:-1]
    if not partial:
        return r, False
    need = max(1, min(min_overlap, len(partial)))
    for p in (partial, partial.rstrip()):
        for k in range(min(len(r), len(p)), need - 1, -1):
            if p.endswith(r[:k]):
                return r[k:], True
    return r, False


class ChatTeacher:
    """The black-box teacher behind /v1/chat/completions only (most hosted APIs), with the text-in /
    text-out interface of `common.LLM` (complete, usage, client, last_finish_reasons). It still sees
    exactly x + y[:t0] and returns only text. Each prompt is a `Prefix` (x and y = y[:t0] apart):
      style "continue": messages [user: x, assistant: y] with `extra_body` (e.g. CONTINUE_FIELDS): the
                        server continues the final assistant message and the reply is the continuation;
      style "instruct": [user: INSTRUCTION(x, y)], the reply cleaned by `clean_continuation`; a server
                        that restates the beginning (`restates`, seen at the probe) spends tokens on it,
                        so max_tokens grows by len(y) (characters: >= tokens for any tokenizer);
      y == "" (sft's whole replies, a chunk at t0 = 0): [user: x] in either style.
    `echo` counts the instruction replies (to a non-empty y) and those whose restated beginning was dropped."""

    is_local = False

    def __init__(self, llm: C.LLM, style: str, extra_body: dict | None = None, restates: bool = False):
        if style not in ("continue", "instruct"):
            raise ValueError(f"ChatTeacher style must be continue or instruct, not {style}")
        self.llm, self.client, self.style, self.extra_body, self.restates = llm, llm.client, style, extra_body, restates
        self.usage = llm.usage  # the same dict: checkpoints save and restore it
        self.max_workers = llm.max_workers
        self.last_finish_reasons: list[list[str | None]] = []
        self.echo = {"replies": 0, "stripped": 0}

    def request(self, p: str, max_tokens: int) -> tuple[list[dict], int, dict | None]:
        """(messages, max_tokens, extra_body) of one prompt."""
        x, y = getattr(p, "x", p), getattr(p, "y", "")
        if not y:
            return [{"role": "user", "content": x}], max_tokens, None
        if self.style == "continue":
            return [{"role": "user", "content": x}, {"role": "assistant", "content": y}], max_tokens, self.extra_body
        return ([{"role": "user", "content": INSTRUCTION.format(x=x, y=y)}],
                max_tokens + (len(y) if self.restates else 0), None)

    def complete(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, max_tokens: int = 256,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, return_finish: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        reqs = [self.request(p, max_tokens) for p in prompts]
        before = dict(self.client.usage)

        def one(req):
            msgs, mt, eb = req
            return self.client.chat(msgs, n=n, temperature=temperature, max_tokens=mt, top_p=top_p, stop=stop,
                                    extra_body=eb, return_finish=True)

        ex = ThreadPoolExecutor(max_workers=self.max_workers)  # concurrent requests, order kept
        try:
            res = list(ex.map(one, reqs))
        except BaseException:  # Ctrl-C or a failed request: drop the queued ones
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
        for k in self.usage:  # this call's share (a resumed run restored the earlier counts)
            self.usage[k] += self.client.usage.get(k, 0) - before.get(k, 0)
        outs = []
        for p, (texts, _) in zip(prompts, res):
            if self.style == "instruct" and getattr(p, "y", ""):
                cleaned = [clean_continuation(t, p.y) for t in texts]
                self.echo["stripped"] += sum(d for _, d in cleaned)
                self.echo["replies"] += len(texts)
                texts = [t for t, _ in cleaned]
            outs.append(texts)
        self.last_finish_reasons = [r for _, r in res]
        return (outs, self.last_finish_reasons) if return_finish else outs


def _http_code(e: Exception) -> int | None:
    m = re.search(r"HTTP (\d{3})", str(e))
    return int(m.group(1)) if m else None


def probe_chat(client: C.ChatClient, want: str) -> dict:
    """One tiny request per chat style (the capability probe above): does the server continue a trailing
    assistant message (first with CONTINUE_FIELDS; a 4xx for those fields -> again without them), and
    does the instruction fallback's cleaned reply continue? want "chat" stops at the first style that
    works (so does "auto"); "chat_continue" / "chat_instruct" probe that style only. -> {"continue": bool, "extra_body",
    "instruct": bool | None, "restates": bool, "replies": the raw probe replies}"""
    out: dict = {"continue": False, "extra_body": None, "instruct": None, "restates": False, "replies": {}}
    if want in ("auto", "chat", "chat_continue"):
        msgs = [{"role": "user", "content": PROBE_TASK}, {"role": "assistant", "content": PROBE_PARTIAL}]
        for eb in (CONTINUE_FIELDS, None):
            try:
                r = client.chat(msgs, n=1, temperature=0.0, max_tokens=8, extra_body=eb)[0]
            except C.EndpointError as e:
                code = _http_code(e)
                if eb is not None and code is not None and 400 <= code < 500 and code not in (401, 403, 404, 429):
                    continue  # the server does not know the fields: a native prefill may still work
                raise
            out["extra_body"], out["continue"] = eb, r.lstrip().startswith(PROBE_NEXT)
            out["replies"]["continue"] = r
            break
        if out["continue"] or want == "chat_continue":
            return out
    msgs = [{"role": "user", "content": INSTRUCTION.format(x=PROBE_TASK, y=PROBE_PARTIAL)}]
    r = client.chat(msgs, n=1, temperature=0.0, max_tokens=len(PROBE_PARTIAL) + 16)[0]
    cleaned, restated = clean_continuation(r, PROBE_PARTIAL)
    out["replies"]["instruct"] = r
    out.update(instruct=cleaned.lstrip().startswith(PROBE_NEXT), restates=restated)
    return out


def resolve_teacher_api(args) -> dict | None:
    """--teacher_api_mode at start, before anything loads: the endpoint answers, the model exists, and
    the mode works (one tiny request each); one UserError line otherwise. auto tries /v1/completions
    first and takes chat when that route is missing (a 4xx). -> None (no endpoint) or {"mode":
    completions | chat_continue | chat_instruct | chat (sft: whole replies only), "extra_body",
    "restates", "note" (what was found, for the log)}."""
    if args.teacher_api_base is None:
        return None
    mode, deadline = args.teacher_api_mode, min(30.0, args.request_timeout)
    key = os.environ.get(args.teacher_api_key_env) if args.teacher_api_key_env else None
    probe = C.ChatClient(args.teacher_api_base, args.teacher_api_model, key, timeout=deadline, deadline=deadline,
                         max_retries=1, backoff=0.5)
    url, note = probe.base_url, ""
    if mode in ("auto", "completions"):
        try:
            C.preflight_endpoint(probe, route="completions", deadline=deadline)
            return {"mode": "completions", "extra_body": None, "restates": False, "note": "serves /v1/completions"}
        except C.EndpointError as e:
            code = _http_code(e)
            if mode == "completions" and code is not None and 400 <= code < 500:
                raise C.EndpointError(f"{e}; if it serves chat completions only, pass --teacher_api_mode chat") from None
            if mode == "completions" or code is None or not 400 <= code < 500 or code in (401, 403, 429):
                raise
            note = f"no /v1/completions (HTTP {code}); "
    if args.method == "sft":  # whole replies: any chat endpoint will do
        C.preflight_endpoint(probe, route="chat", deadline=deadline)
        return {"mode": "chat", "extra_body": None, "restates": False, "note": note + "chat: whole replies"}
    p = probe_chat(probe, mode)
    if p["continue"] or mode == "chat_continue":
        how = ("with " + ", ".join(f"{k}={str(v).lower()}" for k, v in p["extra_body"].items())
               if p["extra_body"] else "as a prefill (no extra fields)")
        seen = ("continues" if p["continue"]
                else f"did not continue the probe ({p['replies'].get('continue', '')[:40]!r}; forced) in")
        return {"mode": "chat_continue", "extra_body": p["extra_body"], "restates": False,
                "note": note + f"chat: {seen} a trailing assistant message {how}"}
    if p["instruct"] or mode == "chat_instruct":
        seen = ("the cleaned reply continues the probe" if p["instruct"]
                else f"the cleaned reply did not continue the probe ({p['replies']['instruct'][:40]!r}; forced)")
        return {"mode": "chat_instruct", "extra_body": None, "restates": p["restates"],
                "note": note + "chat: no assistant continuation; instruction fallback, " + seen
                + ("; the server restates the beginning (max_tokens + len(y[:t0]))" if p["restates"] else "")}
    raise UserError(f"{url}/chat/completions answers, but continues no partial answer at the start-up probe: a "
                    f"trailing assistant message gave {p['replies'].get('continue', '')[:40]!r}, the instruction "
                    f"fallback {p['replies'].get('instruct', '')[:40]!r} (expected '{PROBE_NEXT} ...' after "
                    f"'{PROBE_PARTIAL}'); a model too weak for the probe can be forced with --teacher_api_mode "
                    f"chat_continue or chat_instruct")


@torch.no_grad()
def teacher_token_logprobs(teacher, ids, mask, sigma: float = 0.0, generator: torch.Generator | None = None,
                           from_pos: int = 1):
    """(B, L) log pi_T of the ids (white-box teacher; columns before from_pos are 0 without noise).
    sigma > 0: fresh N(0, sigma^2) noise on the logits before the softmax (the toy's noisy-logit probe;
    holds (B, L, V): toy vocab only)."""
    if sigma <= 0:
        return C.token_logprobs(teacher, ids, mask, from_pos=from_pos)
    logits = teacher(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits.float()
    noise = torch.randn(logits.shape, generator=generator, device="cpu").to(logits.device)
    logp_all = torch.log_softmax(logits + sigma * noise, -1)[:, :-1]
    lp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([lp.new_zeros(ids.shape[0], 1), lp], 1)


@torch.no_grad()
def evaluate(model, tok, problems: Sequence[Problem], chat: bool, temperature: float = 0.0, max_new_tokens: int = 40,
             generator: torch.Generator | None = None, batch_size: int = 128, rank: int = 0, world: int = 1) -> float:
    """Share of held-out problems answered correctly (common.is_correct on the last '=' / \\boxed{}).
    Under torchrun every rank answers problems[rank::world] and the correct counts are summed."""
    shard = problems[rank::world] if world > 1 else problems
    correct = 0
    for i in range(0, len(shard), batch_size):
        batch = shard[i:i + batch_size]
        g = C.generate(model, tok, render_prompts(tok, [p.prompt for p in batch], chat), max_new_tokens=max_new_tokens,
                       temperature=temperature, generator=generator)
        correct += sum(C.is_correct(t, p.answer) for t, p in zip(g.texts, batch))
    if world > 1:
        import torch.distributed as dist

        n = torch.tensor([correct], dtype=torch.long)
        dist.all_reduce(n)
        correct = int(n)
    return correct / max(1, len(problems))


def run_evals(model, tok, evals: dict, chat: bool, args, seed: int, full: bool, rank: int = 0, world: int = 1) -> dict:
    kw = dict(max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size, rank=rank, world=world)
    out = {"acc_greedy": evaluate(model, tok, evals["id"], chat, 0.0, **kw)}
    if full:
        gen = torch.Generator(next(model.parameters()).device).manual_seed(seed + 7)
        out["acc_sample"] = evaluate(model, tok, evals["id"], chat, 1.0, generator=gen, **kw)
        if "ood" in evals:
            out["acc_ood"] = evaluate(model, tok, evals["ood"], chat, 0.0, **kw)
    return out


# ---------------------------------------------------------------------------------------------
# ---- setup: preflight, models, optimizer ----
# ---------------------------------------------------------------------------------------------

# flags that do not change a run's results: --resume may differ in these (--max_steps may grow: the
# learning rate is constant and every step's batch and samplers are a function of seed and step)
RESUME_IGNORES = ("save_every", "max_steps", "request_timeout", "teacher_api_key_env", "table", "table_grid",
                  "table_seeds", "table_ablation_seeds")


def model_paths(args) -> tuple[str, str | None]:
    """(student path, local teacher path or None for an endpoint). Toy roles are built on first use."""
    student = C.toy_checkpoint("student") if args.model_name_or_path == "toy" else args.model_name_or_path
    if args.teacher_api_base is not None or args.method in ("grpo", "kl_only"):
        return student, None
    return student, toy_teacher_path(args.toy_teacher) if args.teacher == "toy" else args.teacher


def endpoint_teacher(args, api: dict | None = None):
    """The black-box teacher: --request_timeout is each request's overall deadline (retries included).
    `api` (resolve_teacher_api) says how it continues text: completions -> common.LLM (/v1/completions),
    chat_continue / chat_instruct / chat -> ChatTeacher over /v1/chat/completions."""
    key = os.environ.get(args.teacher_api_key_env) if args.teacher_api_key_env else None
    llm = C.LLM.from_endpoint(args.teacher_api_base, args.teacher_api_model, key, max_workers=16,
                              timeout=min(300.0, args.request_timeout), deadline=args.request_timeout)
    if api is None or api["mode"] == "completions":
        return llm
    return ChatTeacher(llm, "instruct" if api["mode"] == "chat_instruct" else "continue", api.get("extra_body"),
                       api.get("restates", False))


def preflight(args, device) -> dict:
    """Everything the run will use, checked before anything is written: the device, each model path
    (config loads), the endpoint (resolve_teacher_api: the route and chat style it serves, one tiny
    request each), opd's shared tokenizer, the data files (file:line on a bad row), sft's token target.
    Returns the parsed data files and the endpoint's resolved mode ("teacher_api")."""
    if device.type == "cuda":
        C.require(torch.cuda.is_available(), "--device cuda, but no CUDA GPU is visible; pass --device cpu")
    for flag in ("model_name_or_path", "teacher", "sim_model"):
        v = getattr(args, flag)
        if v and v != "toy" and not (flag == "teacher" and (args.teacher_api_base or args.method in ("grpo", "kl_only"))):
            C.preflight_model(v)
    api = resolve_teacher_api(args)  # the endpoint, its model and the --teacher_api_mode that works
    if api is not None and C.is_main():
        print(f"teacher endpoint {args.teacher_api_base} ({args.teacher_api_model}): {api['mode']}: {api['note']}",
              flush=True)
    if args.method == "opd" and (args.model_name_or_path != "toy" or args.teacher != "toy"):
        from transformers import AutoTokenizer

        student_path, teacher_path = model_paths(args)
        s_tok, t_tok = AutoTokenizer.from_pretrained(student_path), AutoTokenizer.from_pretrained(teacher_path)
        if not same_tokenizer(s_tok, t_tok):
            what = (f"{len(t_tok)} vs {len(s_tok)} ids" if len(t_tok) != len(s_tok)
                    else f"{len(s_tok)} ids each, but other tokens or another segmentation")
            raise UserError(f"--method opd compares token log-probs, but teacher '{teacher_path}' has another tokenizer "
                            f"than the student ({what}); use --method omniopd or sft")
    if args.method == "sft":
        sft_token_target(args, 1)  # a bad --match_teacher_tokens fails here
    data = {k: load_problems(getattr(args, k)) for k in ("train_file", "eval_file") if getattr(args, k)}
    return {**data, "teacher_api": api}


def build(args, device, rank, data: dict | None = None):
    """Student, frozen reference, teacher (text LLM and/or white-box model), data."""
    frozen_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                    "fp32": torch.float32}[args.dtype]
    student_path, teacher_path = model_paths(args)
    model, tok = C.load_lm(student_path, device=device)  # trainable weights stay fp32 (autocast on CUDA)
    if args.gradient_checkpointing:  # the training forward of B x (P + T) tokens through every layer
        enable_activation_checkpointing(model)
    # pi_ref in the student's own dtype, run under the same autocast (token_logprobs): at step 0 its
    # logits equal the student's, so KL(pi_ref || pi) starts at 0, not at bf16 rounding noise that
    # the anchor would then pull the student towards
    ref, _ = C.load_lm(student_path, dtype=torch.float32 if args.ref_dtype == "same" else torch.bfloat16, device=device)
    for p_ in ref.parameters():
        p_.requires_grad_(False)
    chat = args.chat_template == "auto" and bool(getattr(tok, "chat_template", None))

    # teacher: text interface (omniopd, sft), white-box model (opd only)
    data = data if data is not None else preflight(args, device)
    llm = teacher_model = teacher_tok = None
    if args.method == "opd":
        teacher_model, _ = C.load_lm(teacher_path, dtype=frozen_dtype, device=device)
    elif args.method in ("omniopd", "sft"):
        if args.teacher_api_base is not None:
            llm = endpoint_teacher(args, data.get("teacher_api"))
        else:
            tmodel, teacher_tok = C.load_lm(teacher_path, dtype=frozen_dtype, device=device)
            llm = C.LLM(model=tmodel, tokenizer=teacher_tok, batch_size=args.teacher_batch_size,
                        seed=args.seed * 1000 + 17 + rank)
            # the method code below sees only `llm` (text in, text out): it cannot read teacher logits
    # a local teacher with a chat template reads the prompt in its own template (a teacher of another
    # family would find the student's markup foreign); a /v1/completions endpoint gets the student's
    # rendering, a chat endpoint the raw prompt as the user message (its server applies its template)
    teacher_chat = args.chat_template == "auto" and bool(getattr(teacher_tok, "chat_template", None))

    embedder = None
    if args.method == "omniopd" and args.similarity == "embed":
        emb_model, emb_tok = (ref, tok) if args.sim_model is None else load_encoder(args.sim_model, frozen_dtype, device)
        embedder = make_embedder(emb_model, emb_tok)

    train = data.get("train_file") or C.toy_dataset("train", 4096, seed=args.seed, domains=("add",))
    if "eval_file" in data:
        evals = {"id": data["eval_file"][:args.eval_size]}
    else:
        evals = {"id": C.toy_dataset("id", args.eval_size, seed=1, domains=("add",)),
                 "ood": C.toy_dataset("ood", args.eval_size, seed=1, domains=("add",))}
    return dict(model=model, tok=tok, ref=ref, chat=chat, llm=llm, teacher_model=teacher_model, embedder=embedder,
                teacher_tok=teacher_tok, teacher_chat=teacher_chat, train=train, evals=evals, student_path=student_path,
                teacher_path=teacher_path or args.teacher_api_model, device=device, teacher_tokens=0, student_tokens=0,
                teacher_prompt_tokens=0, teacher_api=data.get("teacher_api"),
                autocast=args.autocast, anchor_rng=random.Random(args.seed + 99), noise_gen=torch.Generator().manual_seed(args.seed + 5),
                timer=C.PhaseTimer(device, phases=PHASES))


def make_optimizer(model, args):
    """AdamW (DEVIATION(1): one step per rollout batch) with --adamw_impl's kernel; fused falls back
    to foreach where the device has no fused kernel."""
    kw = dict(lr=args.learning_rate, weight_decay=0.0)
    if args.adamw_impl == "fused":
        try:
            return torch.optim.AdamW(model.parameters(), fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(model.parameters(), foreach=args.adamw_impl != "for_loop", **kw)


def enable_activation_checkpointing(model) -> None:
    """HF activation checkpointing of every decoder layer, non-reentrant (active in train mode only, so
    generation keeps its KV cache). transformers >= 5.2x names it activation_checkpointing_enable and
    deprecates gradient_checkpointing_enable."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def load_encoder(name_or_path: str, dtype, device):
    """(model, tokenizer) of --sim_model through AutoModel: sentence encoders (BERT-like) have no
    causal-LM head; a causal LM loads as its backbone (the same last hidden states)."""
    from transformers import AutoModel

    model, tok = C.load_lm(name_or_path, dtype=dtype, device=device, auto_class=AutoModel)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model, tok


def teacher_prompts(w: dict, problems) -> list[str]:
    """The prompts as the teacher reads them: its own chat template when it is a local model with one,
    else the student's rendering (the toy: the raw prompt either way). Each is a `Prefix` that also
    keeps the raw prompt, which a chat-only endpoint gets as the user message."""
    if w.get("teacher_tok") is not None and w.get("teacher_chat"):
        texts = render_prompts(w["teacher_tok"], [p.prompt for p in problems], True)
    else:
        texts = render_prompts(w["tok"], [p.prompt for p in problems], w["chat"])
    return [Prefix(t, p.prompt) for t, p in zip(texts, problems)]


# ---------------------------------------------------------------------------------------------
# ---- one update: rollout, teacher, loss (one function per method) ----
# ---------------------------------------------------------------------------------------------

# where a training step's time goes (common.PhaseTimer): generate (student rollouts), teacher (teacher calls,
# their scoring and similarity; opd's teacher forward), forward (entropy pass and the loss's forward, pi_ref's
# included), backward, optimizer (gradient all-reduce, clip, AdamW)
PHASES = ("generate", "teacher", "forward", "backward", "optimizer")


def _timer(w: dict) -> C.PhaseTimer:
    if "timer" not in w:
        w["timer"] = C.PhaseTimer(w["device"], phases=PHASES)
    return w["timer"]


def batch_problems(train, step: int, n: int, seed: int, group: int = 1):
    """The global batch of step `step` (a pure function of seed and step: resume replays it)."""
    rng = random.Random(f"omniopd-{seed}-{step}")
    picks = [train[rng.randrange(len(train))] for _ in range(max(1, n // group))]
    return [p for p in picks for _ in range(group)]


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row slices of at most `size` rows (all n rows in one slice when size is None)."""
    size = size or max(1, n)
    return [slice(i, min(n, i + size)) for i in range(0, max(1, n), size)]


def backward_in_micro_batches(n: int, size: int | None, loss_fn: Callable,
                              timer: C.PhaseTimer | None = None) -> tuple[torch.Tensor, list[dict]]:
    """loss_fn(rows) -> (loss of those rows, already divided by the *global* batch, and its metrics),
    backpropagated at once for each micro-batch of `size` rows, so only their activations are held.
    Exact: every loss here is a sum over rows / B, so the parts add up to the full batch's loss and
    gradient. Returns (the total loss, detached; the metrics of every micro-batch)."""
    timer = timer or C.PhaseTimer()
    total, parts = None, []
    for rows in micro_batches(n, size):
        with timer("forward"):
            loss, aux = loss_fn(rows)
        if loss.requires_grad:  # kl_only at step 0 with no chunks still has a (zero) graph
            with timer("backward"):
                loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
        parts.append(aux)
    return total, parts


def _cat(parts: list[dict], key: str) -> torch.Tensor:
    xs = [p[key] for p in parts]
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def _sum(parts: list[dict], key: str) -> torch.Tensor:
    tot = parts[0][key]
    for p in parts[1:]:
        tot = tot + p[key]
    return tot


def reference_for(args, w: dict, step: int, in_loss: bool):
    """pi_ref when this step needs its forward: always when the objective has the KL anchor (beta > 0),
    else only as the diagnostic KL every --ref_kl_every steps and at the last step (issue 21: no
    forward that does not enter the loss on the hot path)."""
    if in_loss:
        return w["ref"]
    n = args.ref_kl_every
    return w["ref"] if n and (step % n == 0 or step == args.max_steps - 1) else None


def amp(w: dict):
    """The training step's autocast (--autocast)."""
    return C.autocast(w["device"], w["autocast"])


def policy_logprobs(model, ids, mask, ref, w, from_pos: int = 1):
    """(logp (B, L) with grad, KL(pi_ref || pi) (B, L) or None when ref is None), under --autocast;
    columns before from_pos (the prompt of a rollout, which no loss reads) are 0: the LM head skips them."""
    with amp(w):
        if ref is None:
            return C.token_logprobs(model, ids, mask, from_pos=from_pos), None
        logp, _, kl = C.token_logprobs(model, ids, mask, ref_model=ref, from_pos=from_pos)
    return logp, kl


def _kl_sum(kl, mask):
    return (kl.detach() * mask).sum() if kl is not None else None


def _log_kl(m: dict, parts: list[dict], mask) -> None:
    if parts[0]["kl"] is not None:
        m["kl_ref"] = _sum(parts, "kl") / mask.sum()


def rollout(args, w, probs, prompts, gen, m: dict):
    """Eq. (1): y ~ pi(. | x) at --temperature; rewards 1[correct] (GRPO's reward, train_acc for all)."""
    with _timer(w)("generate"), amp(w):
        g = C.generate(w["model"], w["tok"], prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       generator=gen)
    w["student_tokens"] += int(g.response_mask.sum())
    rewards = torch.tensor([float(C.is_correct(t, p.answer)) for t, p in zip(g.texts, probs)])
    m.update(train_acc=rewards.mean(), resp_len=g.response_mask.sum(1).float().mean())
    return g, rewards


def step_omniopd(args, w, step, world, gen, probs, prompts) -> tuple[torch.Tensor, dict]:
    """Eq. (1)-(7) (and kl_only: no chunks, the KL anchor alone)."""
    model, timer, Bg = w["model"], _timer(w), args.per_device_batch_size * world
    m: dict = {}
    g, _ = rollout(args, w, probs, prompts, gen, m)
    P, rmask = g.prompt_len, g.response_mask
    with timer("forward"), torch.no_grad(), amp(w):  # Eq. (2): exact full-vocabulary entropy on the finished (x, y), fp32
        _, ent, _ = C.token_logprobs(model, g.sequences, g.attention_mask, return_entropy=True, from_pos=P)
    entropy = ent[:, P:]  # (B, T): column t = entropy of logits index P + t - 1
    m["entropy"] = (entropy * rmask).sum() / rmask.sum()
    if args.method == "kl_only":
        starts = [[] for _ in probs]
    else:
        starts = peak_entropy_chunks(entropy, rmask, args.chunk_tokens, args.num_chunks)  # Eq. (3)
        if args.anchor == "random":
            starts = random_chunks(rmask, args.chunk_tokens, [len(s) for s in starts], w["anchor_rng"])
    with timer("teacher"):
        starts, chunks, conts = verify_chunks(args, w, probs, g.response_ids, starts)  # Eq. (4)
        k = chunk_agreement(chunks, conts, args.similarity, w["embedder"]) if chunks else torch.zeros(0)  # Eq. (5)
        if len(k):
            m.update(verification_diagnostics(chunks, conts, k, args.teacher_samples, args.similarity, w["embedder"]))
        echo = getattr(w["llm"], "echo", None) if getattr(w["llm"], "style", None) == "instruct" else None
        if echo is not None and echo["replies"]:  # instruction fallback: share of replies that restated y[:t0]
            m["teacher_echo"] = echo["stripped"] / echo["replies"]
            echo.update(replies=0, stripped=0)
    first = np.cumsum([0] + [len(s) for s in starts]).tolist()  # index of each row's first chunk in k
    ref = reference_for(args, w, step, in_loss=args.beta > 0)

    def loss_rows(rows):
        logp, kl = policy_logprobs(model, g.sequences[rows], g.attention_mask[rows], ref, w, P)
        logp = logp[:, P:]
        kl = kl[:, P:] if kl is not None else torch.zeros_like(logp)  # beta = 0: the anchor term is 0
        st = starts[rows]
        pbar = chunk_mean_logp(logp.detach(), st, args.chunk_tokens).exp()  # Eq. (6)
        phat = dm_posterior(k[first[rows.start]:first[rows.stop]], pbar.cpu(), args.teacher_samples, args.alpha)
        loss, parts = omniopd_loss(logp, kl, rmask[rows], st, phat, args.chunk_tokens, args.beta, Bg)  # Eq. (7)
        return loss * world, dict(kl=_kl_sum(kl, rmask[rows]) if ref is not None else None, pbar=pbar, phat=phat,
                                  **parts)

    loss, parts = backward_in_micro_batches(len(probs), args.micro_batch_size, loss_rows, timer)
    m.update(chunks=sum(len(s) for s in starts) / len(starts), chunk_term=_sum(parts, "chunk_term"),
             kl_term=_sum(parts, "kl_term"))
    _log_kl(m, parts, rmask)
    if len(k):
        m.update(phat_mean=_cat(parts, "phat").mean(), pbar_mean=_cat(parts, "pbar").mean())
    return loss, m


def verify_chunks(args, w, probs, response_ids, starts):
    """Eq. (4): the teacher continues x + y[:t0] N times for every chunk (empty decoded chunks are
    dropped first). Counts the teacher's tokens. -> (starts, chunk texts, continuations)."""
    prefixes, chunks = verification_requests(teacher_prompts(w, probs), response_ids, starts, args.chunk_tokens, w["tok"],
                                             raw_prompts=[p.prompt for p in probs])
    if not all(chunks):
        starts, prefixes, chunks = drop_empty_chunks(starts, prefixes, chunks)
    if not prefixes:
        return starts, chunks, []
    with count_teacher_tokens(w):
        conts = teacher_continuations(w["llm"], prefixes, chunks, args.teacher_samples, args.teacher_temperature,
                                      args.teacher_chunk_unit, args.chunk_tokens)
    return starts, chunks, conts


@contextlib.contextmanager
def count_teacher_tokens(w: dict):
    """Add the teacher's generated (completion) and read (prompt) tokens of the calls inside to the run's
    counters: an endpoint's as its server reports them (hosted APIs bill both), a local teacher's as it
    processes them (every row's prompt)."""
    u = w["llm"].usage
    before = (u.get("completion_tokens", 0), u.get("prompt_tokens", 0))
    try:
        yield
    finally:
        w["teacher_tokens"] += u.get("completion_tokens", 0) - before[0]
        w["teacher_prompt_tokens"] = w.get("teacher_prompt_tokens", 0) + u.get("prompt_tokens", 0) - before[1]


def verification_diagnostics(chunks, conts, k, N: int, kind: str, embedder=None) -> dict:
    """What the agreement k says (pitfalls 2, 3). k_mean; k_mid = share of k inside (0.05N, 0.95N)
    (meaningful where phi is near-binary, as on the toy's digit chunks; on real text phi of unrelated
    200-character texts is ~0.35 (ned) / ~0.5 (rouge1), so k_mid reads 1.0 there); phi_null = phi of
    each chunk against the first continuation of *another* chunk (the score of unrelated text: k / N
    near phi_null means the similarity does not tell the teacher's agreement apart); distinct = share
    of distinct texts among each chunk's N continuations (1/N: identical samples, a greedy teacher);
    copy = share of continuations equal to the chunk itself (near 1: the prefix leaked the chunk)."""
    out = dict(k_mean=k.mean(), k_mid=((k > 0.05 * N) & (k < 0.95 * N)).float().mean(),
               distinct=float(np.mean([len(set(zs)) / max(1, len(zs)) for zs in conts])),
               copy=float(np.mean([np.mean([z == s for z in zs]) if zs else 0.0 for s, zs in zip(chunks, conts)])))
    if len(chunks) > 1:
        others = [[conts[(i + 1) % len(chunks)][0]] if conts[(i + 1) % len(chunks)] else [""] for i in range(len(chunks))]
        out["phi_null"] = chunk_agreement(chunks, others, kind, embedder).mean()
    return out


def step_opd(args, w, step, world, gen, probs, prompts) -> tuple[torch.Tensor, dict]:
    """Eq. (8): the teacher scores the student's tokens (no grad, whole batch); per-token reverse KL."""
    model, timer, Bg = w["model"], _timer(w), args.per_device_batch_size * world
    m: dict = {}
    g, _ = rollout(args, w, probs, prompts, gen, m)
    P, rmask = g.prompt_len, g.response_mask
    with timer("teacher"), amp(w):
        tlp = teacher_token_logprobs(w["teacher_model"], g.sequences, g.attention_mask, args.teacher_logit_noise,
                                     w["noise_gen"], from_pos=P)[:, P:]
    w["teacher_tokens"] += int(rmask.sum())  # tokens the teacher scored (prefill), not generated
    ref = reference_for(args, w, step, in_loss=False)  # pi_ref never enters opd's loss: the diagnostic KL only

    def loss_rows(rows):
        logp, kl = policy_logprobs(model, g.sequences[rows], g.attention_mask[rows], ref, w, P)
        logp = logp[:, P:]
        loss, adv = opd_loss(logp, tlp[rows].to(logp), rmask[rows], Bg)
        return loss * world, dict(kl=_kl_sum(kl[:, P:], rmask[rows]) if kl is not None else None, adv=adv.sum())

    loss, parts = backward_in_micro_batches(len(probs), args.micro_batch_size, loss_rows, timer)
    _log_kl(m, parts, rmask)
    m["adv_mean"] = _sum(parts, "adv") / rmask.sum()
    return loss, m


def step_grpo(args, w, step, world, gen, probs, prompts) -> tuple[torch.Tensor, dict]:
    """Eq. (9): group-normalised correctness advantages plus the beta KL anchor on every response token."""
    model, device, timer, Bg = w["model"], w["device"], _timer(w), args.per_device_batch_size * world
    m: dict = {}
    g, rewards = rollout(args, w, probs, prompts, gen, m)
    P, rmask = g.prompt_len, g.response_mask
    adv = grpo_advantages(rewards, args.group_size).to(device)  # Eq. (9)
    ref = reference_for(args, w, step, in_loss=args.beta > 0)

    def loss_rows(rows):
        logp, kl = policy_logprobs(model, g.sequences[rows], g.attention_mask[rows], ref, w, P)
        logp = logp[:, P:]
        kl = kl[:, P:] if kl is not None else torch.zeros_like(logp)
        loss = grpo_loss(logp, kl, rmask[rows], adv[rows], args.beta, Bg)
        return loss * world, dict(kl=_kl_sum(kl, rmask[rows]) if ref is not None else None)

    loss, parts = backward_in_micro_batches(len(probs), args.micro_batch_size, loss_rows, timer)
    _log_kl(m, parts, rmask)
    return loss, m


def step_sft(args, w, step, world, gen, probs, prompts) -> tuple[torch.Tensor, dict]:
    """Eq. (10): teacher text, teacher-forced NLL. DEVIATION(4): n responses per prompt (one batched
    call each round) until the token budget is met. A response cut at max_tokens gets no EOS: the
    student must not learn to stop where the teacher was cut off."""
    model, device, timer, tok, llm = w["model"], w["device"], _timer(w), w["tok"], w["llm"]
    m: dict = {}
    target = sft_token_target(args, world)
    t_prompts = teacher_prompts(w, probs)  # the teacher reads its own template, the student trains on its own
    before = llm.usage["completion_tokens"]
    ps, rs, ends = [], [], []
    with timer("teacher"), count_teacher_tokens(w):
        while True:
            per_resp = w.get("sft_tokens_per_response", args.max_new_tokens / 2)
            n = max(1, math.ceil((target - (llm.usage["completion_tokens"] - before)) / (len(probs) * per_resp)))
            outs, why = teacher_complete(llm, t_prompts, n, finish=True, temperature=1.0, max_tokens=args.max_new_tokens)
            ps += [p for p in prompts for _ in range(n)]
            rs += [z for o in outs for z in o]
            ends += [r != "length" for rr in why for r in rr]
            used = llm.usage["completion_tokens"] - before
            w["sft_tokens_per_response"] = max(1.0, used / len(rs))
            if used >= target:
                break
    ids, mask, resp = C.encode_pairs(tok, ps, rs, add_eos=ends, device=device, max_response_tokens=args.max_new_tokens)
    n_global = len(rs) * world
    ref = reference_for(args, w, step, in_loss=False)

    first = int(resp.shape[1] - resp.sum(1).max())  # left-padded: responses fill the last columns

    def loss_rows(rows):
        logp, kl = policy_logprobs(model, ids[rows], mask[rows], ref, w, first)
        return sft_loss(logp, resp[rows], n_global) * world, dict(kl=_kl_sum(kl, resp[rows]))

    loss, parts = backward_in_micro_batches(len(rs), args.micro_batch_size, loss_rows, timer)
    _log_kl(m, parts, resp)
    m.update(sft_responses=len(rs), sft_cut=1.0 - float(np.mean(ends)))
    return loss, m


METHOD_STEPS = {"omniopd": step_omniopd, "kl_only": step_omniopd, "opd": step_opd, "grpo": step_grpo, "sft": step_sft}


def train_step(args, w, step, rank, world, gen) -> tuple[torch.Tensor, dict]:
    """One update's rollouts, teacher calls, and the loss's forward + backward (in --micro_batch_size
    rows at a time), by --method. Returns (this rank's loss x world, detached; metrics); the caller
    all-reduces the gradients and steps."""
    Bl, Bg = args.per_device_batch_size, args.per_device_batch_size * world
    group = args.group_size if args.method == "grpo" else 1
    probs = batch_problems(w["train"], step, Bg, args.seed, group)[rank * Bl:(rank + 1) * Bl]  # this rank's shard
    prompts = render_prompts(w["tok"], [p.prompt for p in probs], w["chat"])
    w["autocast"] = args.autocast  # the step's forwards (amp)
    return METHOD_STEPS[args.method](args, w, step, world, gen, probs, prompts)


def sft_token_target(args, world: int) -> float:
    """Teacher tokens per update and rank that sft buys under --teacher_token_budget match (DEVIATION(4)):
    --match_teacher_tokens (omniopd's measured tokens per update, all ranks, or its run dir), else
    omniopd's nominal B*M*N*C. 0 with --teacher_token_budget none (one response per prompt)."""
    if args.teacher_token_budget != "match":
        return 0
    if args.match_teacher_tokens is None:
        return args.per_device_batch_size * args.num_chunks * args.teacher_samples * args.chunk_tokens
    src = args.match_teacher_tokens
    if os.path.isdir(src) or src.endswith(".json"):
        path = os.path.join(src, "summary.json") if os.path.isdir(src) else src
        try:
            with open(path) as f:
                s = json.load(f)
            per_update = s["teacher_tokens"] / max(1, s["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--match_teacher_tokens: cannot read teacher_tokens and steps from '{path}'; pass an omniopd "
                            f"run dir with a summary.json, or a number of teacher tokens per update") from None
    else:
        try:
            per_update = float(src)
        except ValueError:
            raise UserError(f"--match_teacher_tokens '{src}' is neither a number nor an omniopd run dir") from None
        if not (per_update > 0 and math.isfinite(per_update)):
            raise UserError(f"--match_teacher_tokens {src} must be > 0")
    return per_update / world


# ---------------------------------------------------------------------------------------------
# ---- the run: setup, resume, update, checkpoint, finish ----
# ---------------------------------------------------------------------------------------------


def gather_rng_states(w: dict, world: int) -> list:
    """Every rank's state of the samplers that run across steps (random anchors, opd's logit noise),
    so --resume continues them instead of restarting them from the seed."""
    st = (w["anchor_rng"].getstate(), w["noise_gen"].get_state())
    if world == 1:
        return [st]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, st)
    return out


def save_run(ckpt_dir, w, opt, done: int, before: dict, world: int, elapsed: float) -> None:
    """Everything the next step depends on: weights, AdamW, the global RNGs (common), the samplers that
    live across steps, the token counters, the teacher's usage counters, sft's response-length
    estimate, the before-training eval, the wall time so far. Every rank calls it; rank 0 writes."""
    llm = w["llm"]
    C.save_checkpoint(ckpt_dir, w["model"], w["tok"], opt, done, extra=dict(
        teacher_tokens=w["teacher_tokens"], student_tokens=w["student_tokens"], before=before,
        teacher_prompt_tokens=w.get("teacher_prompt_tokens", 0), teacher_api=w.get("teacher_api"),
        rng=gather_rng_states(w, world), sft_tokens_per_response=w.get("sft_tokens_per_response"),
        teacher_usage=dict(llm.usage) if llm is not None else None,
        client_usage=dict(llm.client.usage) if llm is not None and llm.client is not None else None, wall_time_s=elapsed))


def restore_run(ckpt_dir, w, opt, args, world: int, rank: int) -> tuple[int, dict, float]:
    """Load the newest complete checkpoint into w / opt. -> (its step, the before-training eval, wall s so far)."""
    st = C.load_checkpoint(ckpt_dir, w["model"], opt)
    start, ex = st["step"], st["extra"]
    C.require(args.max_steps >= start, f"--resume: the checkpoint is at step {start}, past --max_steps {args.max_steps}; "
                                       f"pass --max_steps >= {start}")
    w["teacher_tokens"], w["student_tokens"] = ex["teacher_tokens"], ex["student_tokens"]
    w["teacher_prompt_tokens"] = ex.get("teacher_prompt_tokens", 0)
    was, now = (ex.get("teacher_api") or {}).get("mode"), (w.get("teacher_api") or {}).get("mode")
    C.require(was == now, f"--resume: the run's teacher endpoint was used as {was}, but now resolves to {now}; pass "
                          f"--teacher_api_mode {was} (or start a new run)")
    rng = ex.get("rng")
    if rng and len(rng) == world:  # the samplers that live across steps continue where they stopped
        w["anchor_rng"].setstate(rng[rank][0])
        w["noise_gen"].set_state(rng[rank][1])
    if ex.get("sft_tokens_per_response"):  # and so does sft's estimate of a response's length
        w["sft_tokens_per_response"] = ex["sft_tokens_per_response"]
    if w["llm"] is not None and ex.get("teacher_usage"):  # usage counts cover every process of the run
        w["llm"].usage.update(ex["teacher_usage"])
        if w["llm"].client is not None and ex.get("client_usage"):
            w["llm"].client.usage.update(ex["client_usage"])
    return start, ex["before"], float(ex.get("wall_time_s") or 0.0)


def update(args, w, opt, step: int, rank: int, world: int, gen, last_ckpt: int | None) -> dict:
    """One optimizer step: rollouts + teacher + loss (train_step), all-reduce, clip, AdamW. -> the row to log."""
    model, timer = w["model"], _timer(w)
    t0 = time.perf_counter()
    gen.manual_seed(args.seed * 100003 + step * 101 + rank)  # rollouts replay exactly on --resume
    if hasattr(w.get("llm"), "reseed") and w["llm"].is_local:  # and so do a local teacher's samples
        w["llm"].reseed(args.seed * 100003 + step * 101 + rank + 50021)
    opt.zero_grad(set_to_none=True)
    loss, m = train_step(args, w, step, rank, world, gen)  # forward + backward
    loss = loss / world  # this rank's share of the global batch's loss
    if world > 1:  # log the global loss (and its two terms); every rank then sees a NaN and stops
        import torch.distributed as dist

        keys = [k for k in ("chunk_term", "kl_term") if k in m]
        v = torch.stack([loss.float().cpu()] + [m[k].float().cpu() for k in keys])
        dist.all_reduce(v)
        loss = v[0]
        m.update(zip(keys, v[1:]))
    if not torch.isfinite(loss):
        kept = (f"the last good checkpoint (step {last_ckpt}) stays in {os.path.join(args.output_dir, 'checkpoint')}"
                if last_ckpt is not None else "no checkpoint was written (--save_every n keeps one)")
        raise UserError(f"loss is {loss.item()} at step {step}; {kept}; lower --learning_rate or raise --beta")
    with timer("optimizer"):
        C.all_reduce_grads(model, world)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()  # DEVIATION(1): one AdamW step per rollout batch
    tt = torch.tensor([w["teacher_tokens"], w["student_tokens"], w.get("teacher_prompt_tokens", 0)], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tt)
    split = {f"time_{k}": round(v, 4) for k, v in timer.take().items()}
    extra = {"teacher_prompt_tokens": int(tt[2])} if w.get("llm") is not None else {}
    return dict(loss=loss, grad_norm=gnorm, teacher_tokens=int(tt[0]), student_tokens=int(tt[1]), **extra, **m, **split,
                time_step=round(time.perf_counter() - t0, 4))


def time_split(rows: list[dict]) -> dict:
    """Mean seconds per training step of each phase over the logged steps, and the step total."""
    steps = [r for r in rows if "time_step" in r]
    if not steps:
        return {}
    out = {k: round(float(np.mean([r.get(f"time_{k}", 0.0) for r in steps])), 4) for k in (*PHASES, "step")}
    out["other"] = round(out["step"] - sum(out[k] for k in PHASES), 4)
    return out


def main(args):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-model "Loading weights" bars
    C.set_cpu_threads()
    validate_args(args)  # ranges and combinations: nothing loaded, nothing written
    if args.table:
        return run_table(args)
    if args.bench:
        return bench(args)
    rank, world, device = C.ddp_setup()
    if args.device:
        device = C.pick_device(args.device)
    main_rank = C.is_main()
    t0 = time.time()
    gen = C.seed_everything(args.seed)
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    data = preflight(args, device)  # models, endpoint, data files: still nothing written
    C.start_run(args, has_checkpoint=C.find_checkpoint(ckpt_dir) is not None, ignore=RESUME_IGNORES)  # args.json
    w = build(args, device, rank, data)
    model, tok = w["model"], w["tok"]
    opt = make_optimizer(model, args)
    start, before, elapsed0, last_ckpt = 0, None, 0.0, None
    if args.resume:
        start, before, elapsed0 = restore_run(ckpt_dir, w, opt, args, world, rank)
        last_ckpt = start
    log = C.MetricLogger(args.output_dir, resume_step=start if args.resume else None)
    if not args.resume:
        before = run_evals(model, tok, w["evals"], w["chat"], args, args.seed, True, rank, world)
        if main_rank:
            tqdm.write("before: " + "  ".join(f"{k} {v:.3f}" for k, v in before.items()))
        log.log(0, **before, teacher_tokens=0, student_tokens=0)
    elapsed = lambda: elapsed0 + time.time() - t0  # noqa: E731 - wall time of the run over all its processes

    bar = tqdm(range(start, args.max_steps), desc=f"omniopd[{args.method}]", disable=not main_rank, initial=start,
               total=args.max_steps)
    model.train()
    for step in bar:
        row = update(args, w, opt, step, rank, world, gen, last_ckpt)
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done < args.max_steps:
            row.update(run_evals(model, tok, w["evals"], w["chat"], args, args.seed, False, rank, world))
            if main_rank:
                tqdm.write(f"step {done}: acc_greedy {row['acc_greedy']:.3f}  kl_ref {float(row.get('kl_ref', 0)):.4f}")
        row = log.log(done, **row)
        if main_rank:
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "train_acc", "kl_ref", "k_mean", "teacher_tokens")
                             if k in row}, refresh=False)
        if args.save_every and done % args.save_every == 0 and done < args.max_steps:
            save_run(ckpt_dir, w, opt, done, before, world, elapsed())
            last_ckpt = done
    bar.close()
    model.eval()
    save_run(ckpt_dir, w, opt, args.max_steps, before, world, elapsed())  # before the final eval: a crash there keeps the weights
    after = run_evals(model, tok, w["evals"], w["chat"], args, args.seed, True, rank, world)
    if main_rank:
        finish(args, w, log, before, after, elapsed(), device, world)
    C.ddp_cleanup()


def bench(args) -> dict:
    """--bench: --max_steps training steps of this configuration, nothing evaluated or written; prints
    each step's seconds and phases, then the median over steps 2..n (step 1 pays one-off costs:
    allocator growth, kernel selection, the first pi_ref diagnostic) and one JSON line for scripts."""
    device = C.pick_device(args.device)
    gen = C.seed_everything(args.seed)
    t0 = time.perf_counter()
    w = build(args, device, 0, preflight(args, device))
    load_s = time.perf_counter() - t0
    opt = make_optimizer(w["model"], args)
    w["model"].train()
    rows = []
    for step in tqdm(range(args.max_steps), desc=f"bench[{args.method}]"):
        rows.append(update(args, w, opt, step, 0, 1, gen, None))
        r = rows[-1]
        tqdm.write(f"step {step + 1}: {r['time_step']:.3f} s  " + "  ".join(f"{k} {r[f'time_{k}']:.3f}" for k in PHASES))
    med = {k: round(float(np.median([r[f"time_{k}"] for r in rows[1:]])), 4) for k in (*PHASES, "step")}
    rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux -> GiB
    out = dict(method=args.method, student=w["student_path"], teacher=w["teacher_path"], autocast=args.autocast,
               gradient_checkpointing=args.gradient_checkpointing, adamw_impl=args.adamw_impl,
               batch=args.per_device_batch_size, max_new_tokens=args.max_new_tokens, steps=args.max_steps,
               threads=torch.get_num_threads(), device=str(device), load_s=round(load_s, 2),
               resp_len=round(float(np.mean([float(r["resp_len"]) for r in rows])), 2),
               median_s=med, per_step_s=[r["time_step"] for r in rows], peak_rss_gib=rss)
    print(f"bench {args.method}: median over steps 2-{args.max_steps}: {med['step']:.3f} s/step  "
          + "  ".join(f"{k} {med[k]:.3f}" for k in PHASES), flush=True)
    print("BENCH " + json.dumps(out), flush=True)
    return out


def finish(args, w, log, before: dict, after: dict, wall: float, device, world: int) -> dict:
    """The final row, summary.json (with the per-phase time split), omniopd.png and the last line."""
    log.log(args.max_steps, **after)
    rows = C.read_jsonl(log.path)
    last = {k: v for r in rows for k, v in r.items()}  # latest value of every metric
    summary = dict(method=args.method, toy_teacher=args.toy_teacher, similarity=args.similarity, anchor=args.anchor,
                   alpha=args.alpha, beta=args.beta, seed=args.seed, student=w["student_path"], teacher=w["teacher_path"],
                   before=before, after=after, teacher_tokens=last.get("teacher_tokens", 0),
                   student_tokens=last.get("student_tokens", 0), steps=args.max_steps,
                   teacher_prompt_tokens=last.get("teacher_prompt_tokens", 0), teacher_api=w.get("teacher_api"),
                   wall_time_s=round(wall, 1), time_per_step_s=time_split(rows), device=str(device), world_size=world,
                   teacher_usage=dict(w["llm"].usage) if w["llm"] is not None else None)
    C.write_json(os.path.join(args.output_dir, "summary.json"), summary)
    name = os.path.basename(w["student_path"].rstrip("/"))
    C.plot_metrics(log.path, os.path.join(args.output_dir, "omniopd.png"),
                   keys=[k for k in ("loss", "train_acc", "acc_greedy", "kl_ref", "k_mean", "k_mid", "entropy",
                                     "teacher_tokens", "resp_len", "time_step") if any(k in r for r in rows)],
                   title=f"omniopd | {name} | seed {args.seed}")
    ts = summary["time_per_step_s"]
    if ts:  # where a step's time goes (issue 21), before the last line (the table reads that one)
        print(f"s/step {ts['step']:.3f}: " + "  ".join(f"{k} {ts[k]:.3f}" for k in (*PHASES, "other")), flush=True)
    print(f"done in {wall / 60:.1f} min: acc_greedy {before['acc_greedy']:.3f} -> {after['acc_greedy']:.3f}"
          f"  acc_sample {before['acc_sample']:.3f} -> {after['acc_sample']:.3f}"
          + (f"  acc_ood {before['acc_ood']:.3f} -> {after['acc_ood']:.3f}" if "acc_ood" in after else "")
          + f"  teacher_tokens {summary['teacher_tokens']}"
          + (f"  teacher_prompt_tokens {summary['teacher_prompt_tokens']}" if w.get("teacher_api") else "")
          + f"  ({args.output_dir})", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# ---- the toy table ----
# ---------------------------------------------------------------------------------------------

TABLE_GRIDS = ("main", "mechanism", "other_tokenizer", "ablations", "noise", "anchor_long", "api")
# the api grid's simulated hosted teachers (tests/fault_server.py --toy_provider: the toy teacher behind HTTP)
API_PROVIDERS = {"completions": ["completions"], "continue": ["continue"], "instruct": ["instruct", "--restate"]}


def table_arms(grids: Sequence[str], seeds: list[int], abl_seeds: list[int]) -> list[tuple[str, str, list[str], list[int]]]:
    """(group, label, flags, seeds) of the toy table."""
    arms = []
    if "main" in grids:
        for lab, fl in [("base (untrained student)", ["--max_steps", "0"]), ("omniopd ned", []),
                        ("opd", ["--method", "opd"]), ("sft", ["--method", "sft"])]:
            arms.append(("same", lab, ["--toy_teacher", "same"] + fl, seeds))
    if "mechanism" in grids:
        for lab, fl in [("omniopd ned", []), ("omniopd rouge1", ["--similarity", "rouge1"]), ("opd", ["--method", "opd"]),
                        ("sft", ["--method", "sft"])]:
            arms.append(("other_style", lab, ["--toy_teacher", "other_style"] + fl, seeds))
    if "other_tokenizer" in grids:
        for lab, fl in [("omniopd ned", []), ("omniopd rouge1", ["--similarity", "rouge1"]), ("sft", ["--method", "sft"])]:
            arms.append(("other_tokenizer", lab, ["--toy_teacher", "other_tokenizer"] + fl, seeds))
    if "ablations" in grids:
        for lab, fl in [("omniopd rouge1", ["--similarity", "rouge1"]), ("omniopd random anchors", ["--anchor", "random"]),
                        ("omniopd alpha=0", ["--alpha", "0"]),
                        ("omniopd beta=0", ["--beta", "0"]), ("omniopd embed", ["--similarity", "embed"]),
                        ("kl_only", ["--method", "kl_only"]), ("grpo (no teacher)", ["--method", "grpo"]),
                        ("sft 1 response/prompt", ["--method", "sft", "--teacher_token_budget", "none"])]:
            arms.append(("same", lab, ["--toy_teacher", "same"] + fl, abl_seeds))
        for lab, fl in [("opd", ["--method", "opd"]), ("omniopd rouge1", ["--similarity", "rouge1"]),
                        ("omniopd ned", [])]:
            arms.append(("mixed_style", lab, ["--toy_teacher", "mixed_style"] + fl, abl_seeds))
    if "anchor_long" in grids:  # pitfall 7 / the paper's collapse without the KL anchor: 4x the updates
        for lab, fl in [("omniopd ned, 320 updates", ["--max_steps", "320"]),
                        ("omniopd beta=0, 320 updates", ["--max_steps", "320", "--beta", "0"])]:
            arms.append(("same", lab, ["--toy_teacher", "same"] + fl, abl_seeds))
    if "api" in grids:  # the same toy teacher behind three API channels ("@name": that provider's URL)
        api = ["--toy_teacher", "same", "--teacher_api_model", "toy-teacher", "--teacher_api_base"]
        for lab, prov in [("omniopd ned, /v1/completions", "completions"),
                          ("omniopd ned, chat: assistant continuation", "continue"),
                          ("omniopd ned, chat: instruction fallback, restating provider", "instruct"),
                          ("sft, chat: whole replies", "instruct")]:
            sft = lab.startswith("sft")  # the reference row (as the main table's sft), on the ablation seeds
            arms.append(("same, API", lab, api + [f"@{prov}"] + (["--method", "sft"] if sft else []),
                         abl_seeds if sft else seeds))
    if "noise" in grids:
        for s in (2, 4, 8):
            arms.append(("same", f"opd logit noise sigma={s}", ["--toy_teacher", "same", "--method", "opd",
                                                                "--teacher_logit_noise", str(s)], abl_seeds))
    return arms


def run_table(args):
    """Run every arm x seed as its own subprocess (skipping finished ones, so it resumes), then
    write table.md, table.json and table.png under --output_dir."""
    grids = [g.strip() for g in args.table_grid.split(",") if g.strip()]
    if "all" in grids:
        grids = list(TABLE_GRIDS)
    seeds = [int(s) for s in args.table_seeds.split(",")]
    abl = [int(s) for s in args.table_ablation_seeds.split(",")]
    common_flags = ["--max_steps", str(args.max_steps), "--per_device_batch_size", str(args.per_device_batch_size),
                    "--eval_size", str(args.eval_size), "--eval_every", "0"]
    results = []
    arms = table_arms(grids, seeds, abl)
    todo = [(g, lab, fl, s) for g, lab, fl, ss in arms for s in ss]
    servers: dict = {}
    try:
        for i, (g, lab, fl, s) in enumerate(todo):
            run_table_arm(args, common_flags, results, servers, i, len(todo), g, lab, fl, s)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait()
    write_table(results, args.output_dir)
    if "anchor_long" in grids:
        plot_drift([r for r in results if r["label"].endswith("320 updates")], os.path.join(args.output_dir, "anchor_long.png"))


def provider_url(servers: dict, name: str) -> str:
    """The URL of the api grid's simulated provider `name`, started on first use (tests/fault_server.py
    --toy_provider, the toy teacher behind HTTP; it prints its URL when it serves)."""
    if name not in servers:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fault_server.py")
        C.require(os.path.isfile(script), f"--table_grid api needs {script} (the simulated API providers)")
        proc = subprocess.Popen([sys.executable, script, "--toy_provider", *API_PROVIDERS[name]], stdout=subprocess.PIPE,
                                text=True)
        servers[name] = proc
        line = proc.stdout.readline().strip()
        C.require(line.startswith("http"), f"the toy provider '{name}' did not start (it printed {line!r})")
        servers[name].url = line
    return servers[name].url


def run_table_arm(args, common_flags, results, servers, i, total, g, lab, fl, s) -> None:
    """Run one arm x seed of the table (unless finished) and add its summary to `results`."""
    slug = re.sub(r"[^A-Za-z0-9=.]+", "_", f"{g}-{lab}").strip("_")
    out = os.path.join(args.output_dir, "runs", f"{slug}-s{s}")
    summ = os.path.join(out, "summary.json")
    if not os.path.isfile(summ):
        again = []  # an arm killed earlier: continue it from its checkpoint, or start it over
        if os.path.isfile(os.path.join(out, "args.json")):
            again = ["--resume"] if C.find_checkpoint(os.path.join(out, "checkpoint")) else ["--overwrite"]
        if any(f.startswith("@") for f in fl):  # an endpoint arm: a fresh server URL, and server-side sampling
            fl = [provider_url(servers, f[1:]) if f.startswith("@") else f for f in fl]  # cannot be replayed
            again = ["--overwrite"] if again else []
        cmd = [sys.executable, os.path.abspath(__file__), *common_flags, *fl, "--seed", str(s), "--output_dir", out,
               *again]
        print(f"[table {i + 1}/{total}] {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            print(f"  failed (exit {r.returncode}): {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}", flush=True)
            return
        print("  " + r.stdout.strip().splitlines()[-1], flush=True)
    if not os.path.isfile(summ):
        return
    with open(summ) as f:
        results.append({**json.load(f), "group": g, "label": lab, "seed": s, "kl_ref_end": final_kl_ref(out),
                        "run_dir": out})


def plot_drift(results: list[dict], png: str) -> None:
    """Pitfall 7: KL(pi_ref || pi) and rollout accuracy per update, one line per run (arm colour, seed style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = list(dict.fromkeys(r["label"] for r in results))
    for r in results:
        rows = [row for row in C.read_jsonl(os.path.join(r["run_dir"], "metrics.jsonl")) if "kl_ref" in row]
        steps = [row["step"] for row in rows]
        style = dict(color=f"C{labels.index(r['label'])}", ls=("-", "--", ":")[r["seed"] % 3], lw=1,
                     label=f"{r['label']} (seed {r['seed']})")
        axes[0].plot(steps, [row["kl_ref"] for row in rows], **style)
        acc = np.convolve([row["train_acc"] for row in rows], np.ones(10) / 10, mode="valid")  # 10-update mean
        axes[1].plot(steps[9:], acc, **style)
    axes[0].set(yscale="log", xlabel="update", ylabel="KL(π_ref‖π) per response token", title="drift from the initial student")
    axes[1].set(xlabel="update", ylabel="rollout accuracy (10-update mean)", ylim=(0, 1), title="on-policy accuracy")
    axes[1].legend(fontsize=7)
    fig.suptitle("omniopd | toy add world, same teacher | KL anchor β = 0.1 vs β = 0")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def final_kl_ref(run_dir: str, last: int = 10) -> float | None:
    """Mean per-token KL(pi_ref || pi) over a run's last `last` logged updates (pitfall 7: drift from pi_ref)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        kls = [row["kl_ref"] for row in map(json.loads, f) if "kl_ref" in row]
    return float(np.mean(kls[-last:])) if kls else None




def _per_update(xs, steps: int) -> str:
    """Mean of the runs' counts per update ("-" where no run logged it: summaries before the count existed)."""
    xs = [x for x in xs if x is not None]
    return f"{np.mean(xs) / steps:.0f}" if xs else "-"


def write_table(results: list[dict], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, rows = [], {}
    for r in results:
        key = (r["group"], r["label"])
        if key not in rows:
            keys.append(key)
            rows[key] = []
        rows[key].append(r)
    lines = ["| teacher world | arm | seeds | greedy acc (id) | T=1 acc (id) | greedy acc (OOD) | teacher tokens / update "
             "| teacher prompt tokens / update | student rollout tokens / update | KL(π_ref‖π) / token, last 10 updates "
             "| minutes / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        rs = rows[key]
        res = [r["after"] for r in rs]
        steps = max(1, rs[0]["steps"])
        lines.append(f"| {key[0]} | {key[1]} | {','.join(str(r['seed']) for r in rs)} | {C.mean_std([x['acc_greedy'] for x in res])} | "
                     f"{C.mean_std([x['acc_sample'] for x in res])} | {C.mean_std([x.get('acc_ood') for x in res])} | "
                     f"{np.mean([r['teacher_tokens'] for r in rs]) / steps:.0f} | "
                     f"{_per_update([r.get('teacher_prompt_tokens') for r in rs], steps)} | "
                     f"{np.mean([r['student_tokens'] for r in rs]) / steps:.0f} | "
                     f"{C.mean_std([r.get('kl_ref_end') for r in rs])} | "
                     f"{np.mean([r['wall_time_s'] for r in rs]) / 60:.1f} |")
    md = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md)
    C.write_json(os.path.join(out_dir, "table.json"), results)
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(keys) + 1.2))
    ys = np.arange(len(keys))
    for j, (metric, col) in enumerate([("acc_greedy", "C0"), ("acc_sample", "C1")]):
        mean = [np.mean([r["after"][metric] for r in rows[k]]) for k in keys]
        std = [np.std([r["after"][metric] for r in rows[k]], ddof=1) if len(rows[k]) > 1 else 0 for k in keys]
        ax.barh(ys + 0.2 * (1 - 2 * j), mean, 0.4, xerr=std, color=col, label={"acc_greedy": "greedy", "acc_sample": "T=1"}[metric])
    ax.set_yticks(ys, [f"{g}: {l}" for g, l in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out accuracy (id), mean ± std over seeds")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title("omniopd | toy add world | table")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "table.png"), dpi=110)
    plt.close(fig)
    print(md, flush=True)
    return md


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_args())
