r"""mars.py: hierarchical belief-state memory for an agentic recommender (MARS).

Paper: "Agentic Recommender System with Hierarchical Belief-State Memory", Shen, Zhou, Wu et al.
(Meta), arXiv 2605.14401, https://arxiv.org/abs/2605.14401. No official code exists; the update rules
below are partly reconstructed (see "Reconstructed").

Idea. A user's preference is a hidden state; clicks and ratings are noisy observations of it. A
frozen LLM keeps a *belief state* in three tiers: an event tier (a bounded FIFO of raw signals plus
a pending list), a preference tier (mutable chunks "likes X (category)" with a polarity and a
bounded strength m in [0, 1] backed by evidence counts) and a profile tier (one narrative rebuilt
from the chunks). Six operations maintain it (extraction, reinforcement, weakening, consolidation,
forgetting, resynthesis), and an LLM *planner* decides which to run when, instead of running all of
them on a fixed interval. A ranker reads the profile and the recent events and ranks candidates.
Nothing is trained; only memory changes.

Equations (t counts a user's events; s = polarity * m in [-1, 1]):
  (1) polarity(e) = +1 if rating >= 4 or click, -1 if rating <= 2, none if rating == 3
  (2) extraction: a new chunk starts at m = s0, n_for = 1 (each extra linked event reinforces)
  (3) reinforcement, per supporting event:   m <- m + eta_up * (1 - m),  n_for += 1
  (4) weakening, per contradicting event:    m <- m * (1 - eta_down),    n_against += 1
  (5) consolidation of same-category, same-polarity duplicates:
        s = sum_i (n_for_i + n_against_i) s_i / sum_i (n_for_i + n_against_i), counts summed
  (6) forgetting: delete iff m < tau and (n_against > 0 or (n_for < n_min and t - updated_t >= stale))
        (optional decay m <- gamma^idle m; never forget on time alone)
  (7) resynthesis: profile <- synthesiser(chunks sorted by m)   (rebuilt from chunks, not from the
        old profile)
  (8) HR@k = mean_u [rank_u < k],  NDCG@k = mean_u [rank_u < k] / log2(rank_u + 2)   (rank 0-indexed;
        a miss has no rank and scores 0)

LLM roles. Planner, extractor (also the merge judge), synthesiser and ranker sit behind one
interface, `role(inp: dict) -> dict` (and `role.batch([dict]) -> [dict]`):
  * `LLMRole`: the real path, through `common.LLM` (a local HF model with its chat template, or any
    OpenAI-compatible endpoint): a system prompt (task, JSON schema, one example), the input as JSON,
    the first balanced {...} of the reply parsed and validated (types, known ids, ops in the action
    set, ranking = distinct candidate ids); on failure re-asked up to --max_retries times with the
    error appended; still invalid -> counted as malformed and a fallback (planner -> fixed schedule,
    extractor -> no change, synthesiser -> old profile, ranker -> miss). Calls, retries, malformed,
    tokens and seconds per role go to summary.json.
  * `RefRole`: RULE-BASED REFERENCES of the roles that a CPU-sized model cannot play in the toy
    (planner reference, tagger-based extractor reference, line-per-chunk synthesiser reference,
    weight-parsing ranker reference; section 3 of the spec). They are documented stand-ins, not the
    method's LLM, and the toy therefore shows memory mechanics and scheduling (evidence, drift,
    noise, calls), not LLM reasoning quality. The one learned part of the toy is the extractor's
    tagger: a bag-of-words softmax tagger (one head per attribute) trained on generator descriptions.
    Every reference reads only its input, the same dict an LLM role gets as JSON: the toy puts the
    tagger's tags of each item ("whodunit (genre)") into every role input that shows an item (events,
    recent events, candidates), and a reference built without the world gives the same outputs.

Baselines (same ranker, FIFO, candidates, instruction; --method): recency (no memory), flat (one
statement list rewritten after every event), mem0 (ADD/UPDATE/DELETE facts per tag; an identical
repeat UPDATEs, i.e. refreshes, the memory), memorybank (Ebbinghaus-style random forgetting with
strength levels), mars_fixed (all six operations every 3 events), mars_planner (the paper's method).
Their free constants (TUNE_GRID) are tuned by one procedure with one budget (--tune: 8
configurations per arm on validation seeds, HR@1 over all evaluations), so no arm's order rests on
a hand-set constant; the sensitivity table reports each arm's worst, default and best.

Deviations from the paper:
  1. The toy's roles are rule-based references (above), not an LLM; the LLM path exists and is
     tested with tiny local models, a local server and SmolLM2-135M-Instruct on CPU (every reply of
     that model was invalid here; no GPU or large model was available).
  2. The baselines' memory policies (flat, mem0, memorybank) are rules applied to the shared
     extractor role's statements; Mem0's LLM update-decision call and MemoryBank's summaries are
     not LLM calls here, so their call counts include extractor calls only.
  3. The toy world replaces Amazon Books / Movies&TV / Goodreads / Yelp (InstructRec); the real-data
     path reads InstructRec-style jsonl files but was not run on them here.
  4. Tables, summary.json and the plot report mean ± std (sample std, ddof 1) over seeds, the
     project's standard, instead of the spec's mean ± 95 % CI (with 3 seeds a t-based 95 % CI is
     about 2.5 x the std).

Reconstructed (not in the public abstract / summary; our choices, flags in brackets):
  chunk layout and the update constants [--s0 --eta_up --eta_down --forget_threshold --min_evidence
  --stale_events], the pending list forced through extraction [--max_pending], the planner cadence
  and the planner reference's rules [--plan_every], automatic resynthesis [--synth_every_changes],
  the ranker reference's score and the recent-event term [--recent_weight], the toy world, the
  recovery-time definition, extractor fallback clears the pending batch (bounded cost).
  * Planner reference, merge rule: the spec's "+ merge if >= 2 chunks created since the last merge"
    is read as created_since_merge + len(novel_tags) >= 2, i.e. chunks already created plus those
    this check's extraction is about to create (each novel tag becomes one chunk), so a check that
    creates the second chunk merges at once instead of one check later.
  * Planner reference, novelty [--planner_novelty]: the spec judges a pending tag novel by exact
    chunk text ('text', default). Items carry ~5 tags with two surface words per value, so nearly
    every check sees a novel tag and the reference almost never skips; 'key' judges novelty by the
    tagger key (category + canonical value, synonyms match) instead.
  * Recovery time: "the 5-point rolling mean" is read as the forward window d .. d+4 (a trailing
    window at d = 0 would average pre-drift points); the search ends at d_max = history_len - 30
    (latest drift point t* = 30, so every drifting user is evaluated up to d_max; 15 by default),
    censored -> d_max + 1; the "after drift" HR@1 averages d in [0, d_max].
  * Real data: item descriptions are cut to --max_desc_chars (300) characters in prompts.
  * A ranker miss (the target left out, or a malformed reply) has no rank (None), so it scores 0 in
    HR@k and NDCG@k at every k; the spec's rank = |C| would count as a hit for k > |C|.
  * The contradict world and its control [--p_contra_impression] (not in the spec): the default
    world's events are ~91 % positive, so weakening and forgetting are rarely exercised; here every
    user's likes and dislikes swap at three points and half the events are impressions of items
    carrying a value the user has an opinion on (now or before). The control has the same users,
    draws and event mix without the swaps.
  * --baseline_strength: the strength a baseline's profile line carries (the spec's plain lines
    weigh +/-1 in the ranker reference); tuned with the other constants.
  * Tuning [--tune --tune_seeds --tune_users]: TUNE_GRID, 8 configurations per arm (the ranker's
    recent_weight 0.5 / 2.0 x two constants of the arm's memory; recency 4 x 2 over the ranker's two),
    scored by HR@1 over all evaluations of the validation seeds' worlds (50 users each by default), the
    default configuration first and kept on ties.

Runs (the project's run contract). `validate_args` checks every flag's range and every combination
that cannot work; `preflight` then parses the data files (file:line on a bad row), loads the model's
config and sends the endpoint one 1-token chat request (not counted in usage); only then does
`common.start_run` write args.json. Any of these failing is one line and exit 2 with nothing written.
An --output_dir holding a run (args.json) is refused unless --resume (continue it) or --overwrite
(delete it, start fresh). A checkpoint is written after every (world, seed, arm) cell with the
finished cells (metrics, curves, role statistics, memories), tagger accuracies and LLM usage; worlds
are rebuilt from their seeds and every cell starts from fresh memory (a local LLM is reseeded per
cell), so kill -9 + --resume writes the summary.json of an uninterrupted run (bar the timings).
--resume refuses a directory without a checkpoint and any changed flag except RESUME_IGNORE's
(--concurrency, --request_timeout, --api_base, --api_key_env). Each endpoint request ends within
--request_timeout seconds, retries included; Ctrl-C stops with one line naming the last checkpoint.

Commands:
  toy CPU (drift + noise world, 6 arms, seeds 0,1,2; ~1 min):   python mars.py
  full table (6 worlds incl. the controls), tuned arms:        python mars.py --full_table --tune
  SmolLM2-135M-Instruct on a laptop CPU (every role, 1 user, ~1.5 CPU-minutes):
      python mars.py --backend hf --model_name_or_path <folder> --num_users 1 --seeds 0 --stream_len 8 \
          --history_len 6 --eval_points 6 --curve_start 6 --method mars_planner --num_candidates 4 \
          --event_fifo 3 --max_retries 1 --role_max_tokens planner=32,extractor=96,synthesiser=96,ranker=48
  one GPU, local HF model for all roles (toy world):
      python mars.py --backend hf --model_name_or_path Qwen/Qwen2.5-7B-Instruct --batch_size 64 \
          --num_users 20 --seeds 0 --curve_start 45
  endpoint (vLLM / SGLang / llama.cpp / Ollama), real InstructRec-style data:
      vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 &
      python mars.py --backend api --api_base http://localhost:8000/v1 --api_model Qwen/Qwen2.5-7B-Instruct \
          --items_file items.jsonl --users_file users.jsonl --num_users 100
  torchrun: not applicable (nothing is trained; users are independent and batched per role instead).
  Only tiny local models, a local server and SmolLM2-135M-Instruct were used to test the LLM path.

Logged metrics (metrics.jsonl, one row per (world, seed, arm) cell): hr1, hr3, ndcg10 (table eval
points), recovery (events after drift until HR@1 is back to 90 % of its pre-drift level),
pre/post_drift_hr1, mem_calls per user (planner + extractor + merge judge + synthesiser), calls per
role, ranker calls, malformed, tokens, n_chunks, tagger_acc, skip_rate, all_hr1 (every evaluation),
plan_<op> (how often the schedule asked for an operation), op_<op> (what ran: extractor calls, Eq. (3) /
(4) steps, forgetting passes, synthesiser calls incl. automatic ones), n_created / n_merged /
n_forgotten, and per LLM role llm_calls / llm_requests / llm_invalid / llm_fallbacks. summary.json: the
per-arm mean / std table, per-role LLM statistics and reply health, tuning, per-seed verdicts, wall
time. table.md and mars.png: the comparison, LLM fallback / invalid-reply rates per role (also the
final stdout line), and with --tune the chosen constants and the sensitivity table.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
from collections import deque

import numpy as np
import torch
from tqdm import tqdm

import common
from common import UserError, exit_on_user_error, first_json_object

ARMS = ("recency", "flat", "mem0", "memorybank", "mars_fixed", "mars_planner")
WORLDS = ("drift_noise", "drift_only", "noise_only", "clean", "contradict", "contradict_control")
OPS = ("extract", "reinforce", "weaken", "merge", "forget", "synthesize")
ROLES = ("planner", "extractor", "synthesiser", "ranker")


# ---------------------------------------------------------------------------------------------
# ---- arguments ----
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MARS: three-tier belief-state memory, six operations and a planner, "
                                "against memory baselines, on simulated users (or InstructRec-style data).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run
    p.add_argument("--method", default="all", help="'all' or comma-separated arms of " + ",".join(ARMS))
    p.add_argument("--world", default="drift_noise", choices=WORLDS, help="toy world (drift and/or ephemeral noise)")
    p.add_argument("--full_table", action="store_true", help="run every world of " + ",".join(WORLDS) + " (the table)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (world, tagger, candidates)")
    p.add_argument("--output_dir", default=None, help="default runs/mars/<world|full|real>")
    p.add_argument("--resume", action="store_true", help="continue the same run in --output_dir: (world, seed, arm) "
                   "cells in its checkpoint are not rerun; refused without a checkpoint or with other result flags")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="delete a previous run in --output_dir and start fresh (without it such a dir is refused)")
    # toy world
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=False,
                   help="tune every arm's free constants (TUNE_GRID: 8 configurations each, the same budget for every "
                        "arm) on --tune_seeds' worlds by HR@1 over all evaluations, then run --seeds with the best")
    p.add_argument("--tune_seeds", default="100", help="validation seeds for --tune (must differ from --seeds)")
    p.add_argument("--tune_users", type=int, default=50, help="users of each --tune validation world (the first "
                   "--tune_users of that seed's world)")
    p.add_argument("--num_items", type=int, default=400, help="items in the catalogue")
    p.add_argument("--num_users", type=int, default=100, help="users (toy) or users read from --users_file")
    p.add_argument("--drift_frac", type=float, default=0.5, help="share of users whose liked genre drifts at t*")
    p.add_argument("--p_ephemeral", type=float, default=0.25, help="probability of a one-off (gift) event rated 4-5")
    p.add_argument("--p_impression", type=float, default=0.2, help="probability of an impression event (rated, not chosen)")
    p.add_argument("--stream_len", type=int, default=55, help="events per user (history + future targets)")
    p.add_argument("--history_len", type=int, default=45, help="events that may enter memory")
    p.add_argument("--choice_pool", type=int, default=30, help="unseen items a user chooses from")
    p.add_argument("--choice_temp", type=float, default=0.3, help="softmax temperature of the user's choice")
    p.add_argument("--p_contra_impression", type=float, default=0.5, help="contradict worlds: probability an event is "
                   "an impression of an item with a value the user has an opinion on (rated by the current u)")
    p.add_argument("--instruction_noise", type=float, default=0.3, help="probability the instruction names a non-liked value")
    p.add_argument("--eval_points", default="25,35,45", help="t of the table's metrics (evaluated before ingesting event t)")
    p.add_argument("--curve_start", type=int, default=10, help="first t of the per-event HR@1 curve")
    p.add_argument("--num_candidates", type=int, default=10, help="|C|: one positive + |C|-1 negatives outside the stream")
    # tagger (the learned part of the toy extractor)
    p.add_argument("--tagger_train", type=int, default=3000, help="generator descriptions the tagger trains on")
    p.add_argument("--tagger_steps", type=int, default=150, help="full-batch Adam steps of the tagger")
    # memory (MARS)
    p.add_argument("--event_fifo", type=int, default=15, help="event tier: FIFO length (also the ranker's recent events)")
    p.add_argument("--max_pending", type=int, default=15, help="pending events forced through extraction")
    p.add_argument("--s0", type=float, default=0.3, help="s0 of Eq. (2): strength of a new chunk")
    p.add_argument("--eta_up", type=float, default=0.25, help="eta_up of Eq. (3): reinforcement rate")
    p.add_argument("--eta_down", type=float, default=0.35, help="eta_down of Eq. (4): weakening rate")
    p.add_argument("--forget_threshold", type=float, default=0.35, help="tau of Eq. (6)")
    p.add_argument("--min_evidence", type=int, default=2, help="n_min of Eq. (6)")
    p.add_argument("--stale_events", type=int, default=9, help="stale of Eq. (6): idle events before a weak chunk goes")
    p.add_argument("--decay_gamma", type=float, default=1.0, help="gamma of Eq. (6): decay per idle event (1 = off)")
    p.add_argument("--synth_every_changes", type=int, default=3, help="chunk changes that trigger resynthesis, Eq. (7)")
    p.add_argument("--plan_every", type=int, default=3, help="pending events between planner checks (and the fixed interval)")
    p.add_argument("--planner_novelty", default="text", choices=("text", "key"),
                   help="planner input: a pending tag is novel / matched by its exact chunk text (text, the spec's "
                        "literal rule; synonyms look novel) or by its tagger key, category + canonical value (key)")
    p.add_argument("--profile_max_chunks", type=int, default=12, help="chunks (lines) in the profile")
    p.add_argument("--recent_weight", type=float, default=0.5, help="ranker reference: weight of the recent-event term")
    p.add_argument("--instruction_bonus", type=float, default=0.5, help="ranker reference: bonus of instruction matches")
    p.add_argument("--mb_time_scale", type=float, default=5.0, help="memorybank: retention exp(-dt / (S * scale))")
    p.add_argument("--mem0_every", type=int, default=3, help="mem0: events per extraction/update batch")
    p.add_argument("--baseline_strength", type=float, default=1.0, help="flat / mem0 / memorybank: the strength their "
                   "profile lines carry (the ranker reference's weight per fact; 1 = the spec's plain lines)")
    # LLM roles
    p.add_argument("--backend", default="ref", choices=("ref", "hf", "api"), help="ref = rule-based references; hf = local "
                   "HF model (--model_name_or_path); api = OpenAI-compatible endpoint (--api_base)")
    p.add_argument("--llm_roles", default="all", help="roles played by the LLM when --backend is hf/api: 'all' or some of "
                   + ",".join(ROLES))
    p.add_argument("--model_name_or_path", default=None, help="local HF checkpoint or hub id for --backend hf")
    p.add_argument("--api_base", default="http://localhost:8000/v1", help="endpoint for --backend api")
    p.add_argument("--api_model", default=None, help="model name the endpoint serves")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the api key (optional)")
    p.add_argument("--temperature", type=float, default=0.0, help="LLM sampling temperature (0 = greedy)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="max tokens of one role reply")
    p.add_argument("--max_retries", type=int, default=2, help="re-asks of a role after an invalid reply")
    p.add_argument("--role_max_tokens", default="", help="per-role reply limits overriding --max_new_tokens, e.g. "
                   "planner=48,extractor=160,synthesiser=160,ranker=64 (a small local model runs in minutes with these)")
    p.add_argument("--json_mode", default="auto", choices=("auto", "on", "off"),
                   help="constrained JSON (response_format json_object) on an endpoint: auto = use it if the preflight "
                        "probe shows the endpoint accepts it, on = require it, off = never (a local model has none)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel endpoint requests")
    p.add_argument("--request_timeout", type=float, default=300.0, help="seconds one endpoint request may take in all "
                   "(retries included) before the run stops with one error line")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per local generate batch")
    p.add_argument("--reply_cache", default=None, help="jsonl file caching valid replies by hash(role, input)")
    # real data (InstructRec-style)
    p.add_argument("--items_file", default=None, help="items.jsonl {item_id, title, description}")
    p.add_argument("--users_file", default=None, help="users.jsonl {user_id, instruction, history:[{item_id, rating, timestamp}]}")
    p.add_argument("--max_desc_chars", type=int, default=300, help="real data: item descriptions in prompts are cut to "
                   "this many characters (0 = no cut)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} '{text}' must be comma-separated integers, e.g. {flag} 0,1,2") from None


# flags that do not change a run's results: --resume may differ in them (common.start_run)
# (seed_list, eval_list, arms, llm_role_set are derived from --seeds, --eval_points, --method, --llm_roles)
RESUME_IGNORE = ("argv", "concurrency", "request_timeout", "api_key_env", "api_base", "seed_list", "eval_list", "arms",
                 "llm_role_set", "role_tokens", "json_active", "tune_seed_list")


def validate_args(args) -> None:
    """Every flag's range and every combination that cannot work, before anything is loaded or
    written (a UserError -> one line + exit 2). Also derives seed_list, eval_list, arms,
    llm_role_set and the default output_dir."""
    req = common.require
    args.seed_list = _int_list(args.seeds, "--seeds")
    args.eval_list = _int_list(args.eval_points, "--eval_points")
    args.arms = list(ARMS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    for a in args.arms:
        req(a in ARMS, f"unknown --method '{a}'; use 'all' or some of {','.join(ARMS)}")
    req(args.arms, "--method is empty; use 'all' or some of " + ",".join(ARMS))
    req(len(set(args.arms)) == len(args.arms), f"--method '{args.method}' names an arm twice; name each once")
    req(args.seed_list, "--seeds is empty; pass e.g. --seeds 0,1,2")
    args.tune_seed_list = _int_list(args.tune_seeds, "--tune_seeds")
    if args.tune:
        req(args.tune_seed_list and all(s >= 0 for s in args.tune_seed_list), f"--tune_seeds '{args.tune_seeds}' must "
            f"be seeds >= 0, e.g. --tune_seeds 100")
        req(args.tune_users >= 1, f"--tune_users {args.tune_users} must be >= 1")
        req(not set(args.tune_seed_list) & set(args.seed_list), f"--tune_seeds {args.tune_seeds} overlap --seeds "
            f"{args.seeds}: tuning on the test worlds would select on the result; use other seeds")
    req(len(set(args.seed_list)) == len(args.seed_list), f"--seeds '{args.seeds}' repeats a seed; name each once")
    req(all(s >= 0 for s in args.seed_list), f"--seeds '{args.seeds}' has a negative seed; use seeds >= 0")
    roles = list(ROLES) if args.llm_roles == "all" else [r.strip() for r in args.llm_roles.split(",") if r.strip()]
    for r in roles:
        req(r in ROLES, f"unknown role '{r}' in --llm_roles; use 'all' or some of {','.join(ROLES)}")
    req(roles, "--llm_roles is empty; use 'all' or some of " + ",".join(ROLES))
    args.llm_role_set = sorted(set(roles)) if args.backend != "ref" else []
    # LLM backend
    req(args.backend != "hf" or args.model_name_or_path,
        "--backend hf needs --model_name_or_path (a local checkpoint or hub id)")
    req(args.backend != "api" or args.api_model, "--backend api needs --api_model (the model name the endpoint serves)")
    if args.backend == "ref":  # flags that would silently do nothing
        req(args.llm_roles == "all", "--llm_roles needs --backend hf or api (with --backend ref every role is a "
            "rule-based reference)")
        req(not args.reply_cache, "--reply_cache needs --backend hf or api (the references make no LLM calls)")
        req(args.model_name_or_path is None, "--model_name_or_path needs --backend hf")
        req(not args.role_max_tokens, "--role_max_tokens needs --backend hf or api (the references write no tokens)")
    req(args.json_mode != "on" or args.backend == "api", "--json_mode on needs --backend api (a local model has no JSON "
        "mode; use auto or off)")
    args.json_active = False  # set by preflight: the endpoint accepted response_format (--json_mode auto / on)
    args.role_tokens = {r: args.max_new_tokens for r in ROLES}
    for part in [x.strip() for x in str(args.role_max_tokens).split(",") if x.strip()]:
        name, _, val = part.partition("=")
        req(name.strip() in ROLES and val.strip().isdigit() and int(val) >= 1,
            f"--role_max_tokens '{part}' must be role=N with a role of {','.join(ROLES)} and N >= 1, e.g. ranker=64")
        args.role_tokens[name.strip()] = int(val)
    req(args.temperature >= 0 and math.isfinite(args.temperature), f"--temperature {args.temperature} must be >= 0")
    req(args.max_new_tokens >= 1, f"--max_new_tokens {args.max_new_tokens} must be >= 1")
    req(args.max_retries >= 0, f"--max_retries {args.max_retries} must be >= 0")
    req(args.concurrency >= 1, f"--concurrency {args.concurrency} must be >= 1")
    req(args.batch_size >= 1, f"--batch_size {args.batch_size} must be >= 1")
    req(args.request_timeout > 0, f"--request_timeout {args.request_timeout} must be > 0 seconds")
    # data
    real = args.items_file is not None or args.users_file is not None
    req((args.items_file is None) == (args.users_file is None), "real data needs both --items_file and --users_file")
    req(not args.tune or args.backend == "ref", "--tune runs 8 configurations per arm; it needs --backend ref (tune "
        "on the references, then pass the chosen flags to an LLM run)")
    if real:
        req(not args.tune, "--tune runs on the toy worlds; drop it with --items_file/--users_file")
        req(set(args.llm_role_set) == set(ROLES), "real data has no toy tagger, so every role must be an LLM: pass "
            "--backend hf|api and --llm_roles all")
        req(not args.full_table, "--full_table runs the toy worlds; drop it with --items_file/--users_file")
    req(args.max_desc_chars >= 0, f"--max_desc_chars {args.max_desc_chars} must be >= 0 (0 = no cut)")
    # toy world
    req(args.num_users >= 1, f"--num_users {args.num_users} must be >= 1")
    for flag in ("drift_frac", "p_ephemeral", "p_impression", "instruction_noise", "p_contra_impression"):
        v = getattr(args, flag)
        req(0.0 <= v <= 1.0, f"--{flag} {v} must be a probability in [0, 1]")
    req(args.p_contra_impression < 1, "--p_contra_impression 1 leaves no choice events in the contradict worlds; use < 1")
    req(args.p_ephemeral < 1 and args.p_impression < 1, "--p_ephemeral 1 or --p_impression 1 leaves no choice "
        "events, so there is no target to evaluate; use values < 1")
    req(args.stream_len >= 1, f"--stream_len {args.stream_len} must be >= 1")
    req(0 < args.history_len < args.stream_len or real, f"--history_len {args.history_len} must be in "
        f"(0, --stream_len {args.stream_len}): targets after the history need events after it")
    req(args.choice_pool >= 1, f"--choice_pool {args.choice_pool} must be >= 1")
    req(args.choice_temp > 0, f"--choice_temp {args.choice_temp} must be > 0 (softmax temperature)")
    req(args.num_candidates >= 2, f"--num_candidates {args.num_candidates} must be >= 2")
    req(real or args.num_items >= args.stream_len + args.num_candidates - 1,
        f"--num_items {args.num_items} is too few: each user sees --stream_len {args.stream_len} distinct items and "
        f"needs --num_candidates - 1 = {args.num_candidates - 1} negatives outside them")
    req(args.eval_list, "--eval_points is empty; pass e.g. --eval_points 25,35,45")
    req(real or (0 <= args.curve_start <= args.history_len and all(0 <= t <= args.history_len for t in args.eval_list)),
        f"--curve_start and --eval_points must lie in [0, --history_len {args.history_len}]")
    req(args.tagger_train >= 1 and args.tagger_steps >= 1, "--tagger_train and --tagger_steps must be >= 1 (the toy "
        "extractor needs a trained tagger)")
    # memory
    req(args.event_fifo >= 1, f"--event_fifo {args.event_fifo} must be >= 1")
    req(args.max_pending >= 1, f"--max_pending {args.max_pending} must be >= 1")
    req(args.plan_every >= 1, f"--plan_every {args.plan_every} must be >= 1")
    req(0 < args.s0 <= 1, f"--s0 {args.s0} must be in (0, 1] (strength of a new chunk, Eq. 2)")
    for flag in ("eta_up", "eta_down", "forget_threshold"):
        v = getattr(args, flag)
        req(0.0 <= v <= 1.0, f"--{flag} {v} must be in [0, 1]")
    req(0 < args.decay_gamma <= 1, f"--decay_gamma {args.decay_gamma} must be in (0, 1] (1 = no decay)")
    req(args.min_evidence >= 0 and args.stale_events >= 0, "--min_evidence and --stale_events must be >= 0")
    req(args.synth_every_changes >= 1, f"--synth_every_changes {args.synth_every_changes} must be >= 1")
    req(args.profile_max_chunks >= 1, f"--profile_max_chunks {args.profile_max_chunks} must be >= 1")
    req(math.isfinite(args.recent_weight) and math.isfinite(args.instruction_bonus),
        "--recent_weight and --instruction_bonus must be finite")
    req(args.mb_time_scale > 0, f"--mb_time_scale {args.mb_time_scale} must be > 0")
    req(args.mem0_every >= 1, f"--mem0_every {args.mem0_every} must be >= 1")
    req(0 < args.baseline_strength <= 1, f"--baseline_strength {args.baseline_strength} must be in (0, 1] (a profile "
        f"line's strength)")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", "mars", "real" if real else ("full" if args.full_table else args.world))


# ---------------------------------------------------------------------------------------------
# ---- pure functions: metrics and the six operations ----
# ---------------------------------------------------------------------------------------------


def _rank_array(ranks) -> np.ndarray:
    """(N,) float ranks; a miss (None: the ranker left the positive out or failed) is +inf, so it
    scores 0 at every k, whatever the number of candidates (a miss as rank |C| would count as a hit
    for k > |C|)."""
    return np.array([np.inf if x is None else x for x in ranks], dtype=float)


def hit_rate_at_k(ranks, k: int) -> float:
    """Eq. (8): mean [rank < k]; ranks (N,) 0-indexed positions of the positive (None = a miss)."""
    r = _rank_array(ranks)
    return float((r < k).mean()) if r.size else float("nan")  # Eq. (8)


def ndcg_at_k(ranks, k: int) -> float:
    """Eq. (8): one relevant item -> DCG = 1 / log2(rank + 2) if rank < k, IDCG = 1 (None = a miss)."""
    r = _rank_array(ranks)
    if not r.size:
        return float("nan")
    return float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).mean())  # Eq. (8)


def polarity_of(rating, action: str = "rate"):
    """Eq. (1): +1 for rating >= 4 or a click, -1 for rating <= 2, None for a neutral 3."""
    if action == "click" and rating is None:
        return 1
    if rating is None:
        return None
    return 1 if rating >= 4 else (-1 if rating <= 2 else None)  # Eq. (1)


@dataclasses.dataclass
class Chunk:
    """Preference tier entry; s = polarity * m in [-1, 1]."""
    id: str
    category: str
    text: str
    polarity: int
    m: float
    n_for: int = 1
    n_against: int = 0
    created_t: int = 0
    updated_t: int = 0
    source_event_ids: list = dataclasses.field(default_factory=list)
    decayed_t: int = 0

    @property
    def s(self) -> float:
        return self.polarity * self.m


def new_chunk(cid: str, category: str, text: str, polarity: int, event_ids, t: int, s0: float = 0.3,
              eta_up: float = 0.25) -> Chunk:
    """Eq. (2): m = s0, n_for = 1 from the first event; each extra linked event reinforces, Eq. (3)."""
    ev = list(event_ids)
    c = Chunk(cid, category, text, 1 if polarity > 0 else -1, s0, 1, 0, t, t, ev[:1], t)  # Eq. (2)
    for e in ev[1:]:
        reinforce(c, e, t, eta_up)
    return c


def reinforce(c: Chunk, event_id=None, t: int | None = None, eta_up: float = 0.25) -> Chunk:
    """Eq. (3): m <- m + eta_up (1 - m): bounded in [0, 1], diminishing (0.3 -> 0.475 -> 0.606)."""
    c.m = min(1.0, max(0.0, c.m + eta_up * (1.0 - c.m)))  # Eq. (3)
    c.n_for += 1
    if t is not None:
        c.updated_t = t
    if event_id is not None and event_id not in c.source_event_ids:
        c.source_event_ids.append(event_id)
    return c


def weaken(c: Chunk, event_id=None, t: int | None = None, eta_down: float = 0.35) -> Chunk:
    """Eq. (4): m <- m (1 - eta_down); faster than reinforcement; the polarity never flips in place
    (a refuted chunk is forgotten and later evidence creates the opposite chunk)."""
    c.m = min(1.0, max(0.0, c.m * (1.0 - eta_down)))  # Eq. (4)
    c.n_against += 1
    if t is not None:
        c.updated_t = t
    if event_id is not None and event_id not in c.source_event_ids:
        c.source_event_ids.append(event_id)
    return c


def merge_chunks(group: list[Chunk]) -> Chunk:
    """Eq. (5): merge same-category, same-polarity duplicates: evidence-weighted mean of s, counts
    summed, created = min, updated = max, sources united, text of the member with the most n_for.
    Opposite polarities are refused (averaging 'likes X' and 'dislikes X' gives ~0, pitfall 4)."""
    if len({(c.category, c.polarity) for c in group}) != 1:
        raise ValueError("merge_chunks: chunks of different category or polarity are never merged")
    w = [c.n_for + c.n_against for c in group]
    s = sum(wi * c.s for wi, c in zip(w, group)) / max(1, sum(w))  # Eq. (5)
    head = max(group, key=lambda c: (c.n_for, c.m))
    out = dataclasses.replace(head, m=min(1.0, abs(s)), n_for=sum(c.n_for for c in group),
                              n_against=sum(c.n_against for c in group), created_t=min(c.created_t for c in group),
                              updated_t=max(c.updated_t for c in group), decayed_t=max(c.decayed_t for c in group),
                              source_event_ids=sorted({e for c in group for e in c.source_event_ids}, key=str))
    return out


def consolidate(chunks: dict, groups, conflicts=(), t: int = 0, eta_down: float = 0.35) -> int:
    """Eq. (5) on a chunk dict in place: merge each judged group (only same category + polarity
    members; others in the group are left alone); for each opposite-polarity pair with the same key
    the weaker one gets one weakening step. A conflict may name a chunk that was just merged away
    (the judge sees the chunks before merging): its id resolves to the merged chunk, and each
    resolved pair is weakened once. Returns the number of chunks changed."""
    changed = 0
    alias = {}  # member id -> id of the chunk it was merged into
    for g in groups:
        members = [chunks[i] for i in dict.fromkeys(g) if i in chunks]
        by = {}
        for c in members:
            by.setdefault((c.category, c.polarity), []).append(c)
        for same in by.values():
            if len(same) < 2:
                continue
            merged = merge_chunks(same)
            for c in same:
                del chunks[c.id]
                alias[c.id] = merged.id
            chunks[merged.id] = merged
            changed += len(same)
    done = set()
    for a, b in conflicts:
        a, b = alias.get(a, a), alias.get(b, b)
        pair = frozenset((a, b))
        if pair in done:
            continue
        if a in chunks and b in chunks and chunks[a].polarity != chunks[b].polarity:
            done.add(pair)
            weak = min(chunks[a], chunks[b], key=lambda c: c.m)
            weaken(weak, None, t, eta_down)
            changed += 1
    return changed


def should_forget(c: Chunk, t: int, threshold: float = 0.35, min_evidence: int = 2, stale_events: int = 9) -> bool:
    """Eq. (6): weak AND (contradicted OR (thin evidence AND stale)); never on time alone (pitfall 6)."""
    return c.m < threshold and (c.n_against > 0 or (c.n_for < min_evidence and t - c.updated_t >= stale_events))  # Eq. (6)


def forget(chunks: dict, t: int, threshold: float = 0.35, min_evidence: int = 2, stale_events: int = 9,
           decay_gamma: float = 1.0) -> list:
    """Eq. (6) on a chunk dict in place (optional decay m <- gamma^idle m first); returns removed ids."""
    if decay_gamma < 1.0:
        for c in chunks.values():
            idle = t - max(c.updated_t, c.decayed_t)
            if idle > 0:
                c.m *= decay_gamma ** idle  # Eq. (6), optional decay
                c.decayed_t = t
    gone = [cid for cid, c in chunks.items() if should_forget(c, t, threshold, min_evidence, stale_events)]
    for cid in gone:
        del chunks[cid]
    return gone


def chunk_line(category: str, word: str, polarity: int, s: float | None = None, n_for: int | None = None,
               n_against: int | None = None) -> str:
    """One profile line; the synthesiser reference writes strength and evidence, baselines +/-1."""
    head = f"{'Likes' if polarity > 0 else 'Dislikes'} {word} ({category}"
    if s is None:
        return head + ")."
    return head + f"; strength {s:+.2f}; {n_for} for, {n_against} against)."


def chunk_word(text: str) -> str:
    """'likes whodunit (genre)' -> 'whodunit'."""
    t = re.sub(r"^\s*(likes|dislikes)\s+", "", text.strip(), flags=re.I)
    return re.sub(r"\s*\([^)]*\)\s*\.?$", "", t).strip()


def resynthesize(chunks: dict, max_chunks: int = 12) -> str:
    """Eq. (7), reference synthesiser: the top chunks by m, one line each, rebuilt from the chunks
    (never from the old profile: rewriting a rewrite compounds errors, pitfall 7)."""
    top = sorted(chunks.values(), key=lambda c: (-c.m, -c.updated_t, c.id))[:max_chunks]  # Eq. (7)
    return "\n".join(chunk_line(c.category, chunk_word(c.text), c.polarity, c.s, c.n_for, c.n_against) for c in top)


_LINE = re.compile(r"(Likes|Dislikes)\s+(\S+)\s+\(([A-Za-z_]+)(?:;\s*strength\s*([+-]?\d*\.?\d+))?")


def profile_weights(profile: str, lexicon: dict) -> dict:
    """Ranker reference: weight per tag key from profile lines (strength, or +/-1 without one)."""
    return _profile_weights_cached(profile, id(lexicon), lexicon)


_PW_CACHE: dict = {}


def _profile_weights_cached(profile, lex_id, lexicon):
    key = (profile, lex_id)
    if key in _PW_CACHE:
        return _PW_CACHE[key]
    w: dict = {}
    for m in _LINE.finditer(profile or ""):
        pol = 1.0 if m.group(1) == "Likes" else -1.0
        k = lexicon.get(m.group(2).lower().strip(".,;"))
        if k is None:
            continue
        # the polarity word sets the sign: "Dislikes X (...; strength 0.40 ...)" (an LLM synthesiser may drop
        # the minus) is -0.40, never +0.40
        val = pol * abs(float(m.group(4))) if m.group(4) is not None else pol
        w[k] = w.get(k, 0.0) + val  # duplicates (synonym chunks) add up: what consolidation fixes
    if len(_PW_CACHE) > 200_000:
        _PW_CACHE.clear()
    _PW_CACHE[key] = w
    return w


def recovery_time(d, hit, baseline_window=(-10, -1), window: int = 5, frac: float = 0.9, d_max: int = 15):
    """Events after drift until HR@1 recovers: baseline = mean HR@1 over d in baseline_window; the
    first d >= 0 whose forward `window`-point mean (d .. d+window-1) reaches frac * baseline.
    d, hit: (N,) per-evaluation drift offsets and hits; d_max: the last offset every drifting user
    reaches (history_len - latest drift point in the toy). Censored -> d_max + 1 (never recovered);
    NaN if the post-drift window is shorter than `window`."""
    if d_max < window - 1:
        return float("nan")
    d, hit = np.asarray(d), np.asarray(hit, dtype=float)
    curve = {x: hit[d == x].mean() for x in np.unique(d)}
    base = [curve[x] for x in range(baseline_window[0], baseline_window[1] + 1) if x in curve]
    if not base:
        return float("nan")
    target = frac * float(np.mean(base))
    for x in range(0, d_max - window + 2):
        pts = [curve.get(x + j) for j in range(window)]
        if any(p is None for p in pts):
            break
        if np.mean(pts) >= target:
            return float(x)
    return float(d_max + 1)


# ---------------------------------------------------------------------------------------------
# ---- LLM roles: one interface, an LLM path and rule-based references ----
# ---------------------------------------------------------------------------------------------


class Role:
    """`role(inp) -> out` and `role.batch([inp]) -> [out]`; per-role statistics in `stats`."""

    def __init__(self, name: str):
        self.name = name
        self.stats = {"calls": 0, "requests": 0, "retries": 0, "malformed": 0, "prompt_tokens": 0,
                      "completion_tokens": 0, "seconds": 0.0}

    def __call__(self, inp: dict) -> dict:
        return self.batch([inp])[0]

    def batch(self, inps: list) -> list:
        raise NotImplementedError


class RefRole(Role):
    """A rule-based reference of a role (toy only), same interface and statistics as LLMRole."""

    def __init__(self, name: str, fn):
        super().__init__(name)
        self.fn = fn

    def batch(self, inps):
        t0 = time.time()
        out = [self.fn(x) for x in inps]
        self.stats["calls"] += len(inps)
        self.stats["seconds"] += time.time() - t0
        return out


class LLMRole(Role):
    """A role played by an LLM (`common.LLM` or anything with .chat(convs, n, ...) and .usage).

    system prompt + input JSON -> reply -> first balanced {...} -> validate(inp, out); invalid
    replies are re-asked up to `max_retries` times with the error appended; then counted as
    malformed and replaced by `fallback(inp)`. Never raises on bad model output.
    """

    def __init__(self, name: str, llm, system: str, validate, fallback, max_retries: int = 2,
                 temperature: float = 0.0, max_tokens: int = 512, cache_path: str | None = None,
                 extra_body: dict | None = None):
        super().__init__(name)
        self.extra_body = extra_body  # e.g. JSON mode for endpoints; common.LLM ignores it locally
        self.llm, self.system, self.validate, self.fallback = llm, system, validate, fallback
        self.max_retries, self.temperature, self.max_tokens = max_retries, temperature, max_tokens
        self.cache_path, self.cache = cache_path, {}
        if cache_path and os.path.exists(cache_path):
            for row in common.read_jsonl(cache_path):
                if isinstance(row, dict) and "key" in row and "out" in row:
                    self.cache[row["key"]] = row["out"]

    def _key(self, inp) -> str:
        """hash(role, prompt, model, temperature, input): a reply of another model or temperature is no hit."""
        model = str(getattr(self.llm, "name", type(self.llm).__name__))
        head = "\n".join([self.name, self.system, model, repr(float(self.temperature))])
        return hashlib.sha1((head + "\n" + json.dumps(inp, sort_keys=True)).encode()).hexdigest()

    def batch(self, inps):
        t0 = time.time()
        n = len(inps)
        outs = [None] * n
        keys = [self._key(x) for x in inps] if self.cache_path else [None] * n
        convs = {}
        for i, x in enumerate(inps):
            if keys[i] is not None and keys[i] in self.cache:
                try:
                    outs[i] = self.validate(x, self.cache[keys[i]])
                    continue
                except (ValueError, TypeError, KeyError, AttributeError):
                    del self.cache[keys[i]]  # an invalid cached entry (edited file, older schema) is a miss
            convs[i] = [{"role": "system", "content": self.system},
                        {"role": "user", "content": json.dumps(x, ensure_ascii=False)}]
        for attempt in range(self.max_retries + 1):
            if not convs:
                break
            idx = list(convs)
            before = dict(getattr(self.llm, "usage", {}) or {})
            kw = {"extra_body": self.extra_body} if self.extra_body else {}
            replies = self.llm.chat([convs[i] for i in idx], n=1, temperature=self.temperature,
                                    max_tokens=self.max_tokens, **kw)
            after = getattr(self.llm, "usage", {}) or {}
            for k in ("prompt_tokens", "completion_tokens"):
                self.stats[k] += int(after.get(k, 0)) - int(before.get(k, 0))
            self.stats["requests"] += len(idx)
            self.stats["retries"] += len(idx) if attempt else 0
            for i, rep in zip(idx, replies):
                text = rep[0] if isinstance(rep, (list, tuple)) else rep
                try:
                    outs[i] = self.validate(inps[i], first_json_object(text or ""))
                    del convs[i]
                    if keys[i] is not None:
                        self.cache[keys[i]] = outs[i]
                        with open(self.cache_path, "a") as f:
                            f.write(json.dumps({"key": keys[i], "out": outs[i]}) + "\n")
                except (ValueError, TypeError, KeyError) as e:
                    convs[i] = convs[i][:2] + [{"role": "assistant", "content": (text or "")[:2000]},
                                               {"role": "user", "content": f"Invalid reply: {str(e)[:300]}. Answer with "
                                                f"one JSON object that follows the schema, nothing else."}]
        for i in convs:  # still invalid after the retries: counted, then the documented fallback
            self.stats["malformed"] += 1
            outs[i] = self.fallback(inps[i])
        self.stats["calls"] += n
        self.stats["seconds"] += time.time() - t0
        return outs


# -- prompts (task, schema, one example) and validators of the four roles --

PLANNER_PROMPT = """You are the memory planner of a recommender agent. Memory has three tiers: pending events,
preference chunks (strength s in [-1, 1], evidence counts) and a profile written from the chunks.
Given the pending events and the chunks, choose which memory operations to run now, in this order:
extract (turn pending events into chunk updates), reinforce (apply supporting evidence), weaken (apply
contradicting evidence), merge (deduplicate chunks), forget (drop weak refuted chunks), synthesize
(rewrite the profile). Choose none ("ops": []) when the pending events only confirm strong chunks: they
stay pending and cost nothing. Run operations when events are novel or contradict a chunk.
Reply with one JSON object: {"ops": [subset of ["extract","reinforce","weaken","merge","forget","synthesize"]], "reason": str}
Example reply: {"ops": ["extract", "reinforce", "weaken", "forget", "synthesize"], "reason": "event e7 contradicts c2"}"""

EXTRACTOR_PROMPT = """You maintain the preference memory of a recommender agent.
Mode "extract": given new events (item text, polarity +1 liked / -1 disliked) and existing chunks, list
preferences the events reveal. Link an event to an existing chunk with the same meaning and polarity
("support"), to a chunk it refutes ("contradict"), or create a new chunk ("new", text "likes <thing>" or
"dislikes <thing>", category = the attribute, e.g. genre, tone, length, era, price, author, cuisine).
Only use event ids and chunk ids from the input.
Reply: {"new": [{"category": str, "text": str, "polarity": 1 or -1, "event_ids": [str]}],
        "support": [{"chunk_id": str, "event_ids": [str]}], "contradict": [{"chunk_id": str, "event_ids": [str]}]}
Example: {"new": [{"category": "genre", "text": "likes whodunit (genre)", "polarity": 1, "event_ids": ["u3-e12"]}],
          "support": [{"chunk_id": "c4", "event_ids": ["u3-e12"]}], "contradict": []}
Mode "dedup": given chunks, group ids of chunks that state the same preference with the same polarity and
category, and list pairs that state opposite preferences about the same thing.
Reply: {"groups": [[chunk ids]], "conflicts": [[chunk_id, chunk_id]]}
Example: {"groups": [["c1", "c5"]], "conflicts": [["c2", "c7"]]}"""

SYNTHESISER_PROMPT = """You write the user profile of a recommender agent from its preference chunks (sorted by
strength). Rebuild the profile from the chunks; use the old profile only for style. 150-300 words; keep
strong preferences first; mention dislikes; keep one line per preference in the form
"Likes|Dislikes <thing> (<category>; strength +0.61; 4 for, 1 against)." where possible.
Reply: {"profile": str}
Example: {"profile": "Likes whodunit (genre; strength +0.81; 6 for, 0 against).\\nDislikes grim (tone; strength -0.45; 2 for, 0 against)."}"""

RANKER_PROMPT = """You are a recommender. Given the user's profile, their most recent events (polarity +1 liked,
-1 disliked), their instruction and candidate items, rank ALL candidates from most to least likely to
be chosen next. Use only candidate ids from the input, each once.
Reply: {"ranking": [candidate ids]}
Example: {"ranking": ["i17", "i3", "i250"]}"""


def _ids(x, known, what):
    if not isinstance(x, list) or not x:
        raise ValueError(f"{what} must be a non-empty list of ids")
    out = [str(i) for i in x]
    bad = [i for i in out if i not in known]
    if bad:
        raise ValueError(f"unknown {what} {bad[:3]}")
    return out


def validate_planner(inp, out):
    ops = out.get("ops")
    if not isinstance(ops, list) or any(not isinstance(o, str) for o in ops):
        raise ValueError('"ops" must be a list of strings')
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"unknown ops {bad}; allowed {list(OPS)}")
    return {"ops": [o for o in OPS if o in ops], "reason": str(out.get("reason", ""))}


def validate_extractor(inp, out):
    """The schema of the mode, keys required: `{}`, `{"reason": ...}` or an echoed event are not an
    empty extraction but an invalid reply (re-asked, then counted as malformed)."""
    chunk_ids = {c["id"] for c in inp.get("chunks", [])}
    if inp.get("mode") == "dedup":
        missing = [k for k in ("groups", "conflicts") if k not in out]
        if missing:
            raise ValueError(f"missing keys {missing}: reply {{\"groups\": [...], \"conflicts\": [...]}} (empty lists "
                             f"if there are none)")
        groups, conflicts = out["groups"], out["conflicts"]
        if not isinstance(groups, list) or not isinstance(conflicts, list):
            raise ValueError('"groups" and "conflicts" must be lists')
        g = [_ids(x, chunk_ids, "chunk ids") for x in groups]
        seen = [i for x in g for i in x]
        if len(seen) != len(set(seen)):
            raise ValueError("a chunk id appears in two groups")
        c = [_ids(x, chunk_ids, "chunk ids") for x in conflicts]
        if any(len(x) != 2 for x in c):
            raise ValueError("each conflict is a pair of chunk ids")
        return {"groups": [x for x in g if len(x) >= 2], "conflicts": c}
    ev_ids = {e["id"] for e in inp.get("events", [])}
    res = {"new": [], "support": [], "contradict": []}
    missing = [k for k in res if k not in out]
    if missing:
        raise ValueError(f"missing keys {missing}: reply {{\"new\": [...], \"support\": [...], \"contradict\": [...]}} "
                         f"(empty lists if there are none)")
    for k in res:
        v = out[k]
        if not isinstance(v, list):
            raise ValueError(f'"{k}" must be a list')
        for x in v:
            if not isinstance(x, dict):
                raise ValueError(f'items of "{k}" must be objects')
            evs = _ids(x.get("event_ids"), ev_ids, "event ids")
            if k == "new":
                cat, text, pol = x.get("category"), x.get("text"), x.get("polarity")
                if not isinstance(cat, str) or not cat.strip() or not isinstance(text, str) or not text.strip():
                    raise ValueError("a new chunk needs non-empty category and text")
                if isinstance(pol, bool) or pol not in (1, -1):
                    raise ValueError("polarity must be 1 or -1")
                res[k].append({"category": cat.strip().lower(), "text": text.strip(), "polarity": int(pol),
                               "event_ids": evs})
            else:
                cid = str(x.get("chunk_id"))
                if cid not in chunk_ids:
                    raise ValueError(f"unknown chunk_id {cid}")
                res[k].append({"chunk_id": cid, "event_ids": evs})
    return res


def validate_synthesiser(inp, out):
    prof = out.get("profile")
    if not isinstance(prof, str) or not prof.strip():
        raise ValueError('"profile" must be a non-empty string')
    return {"profile": prof.strip()}


def validate_ranker(inp, out):
    known = [c["id"] for c in inp["candidates"]]
    r = _ids(out.get("ranking"), set(known), "candidate ids")
    if len(r) != len(set(r)):
        raise ValueError("ranking repeats a candidate")
    return {"ranking": r}


FALLBACK = {
    "planner": lambda inp: {"ops": list(OPS), "reason": "fallback: fixed schedule"},
    "extractor": lambda inp: {"groups": [], "conflicts": []} if inp.get("mode") == "dedup"
    else {"new": [], "support": [], "contradict": []},
    "synthesiser": lambda inp: {"profile": inp.get("old_profile", "")},
    "ranker": lambda inp: {"ranking": []},  # the target is missing -> no rank (a miss)
}
PROMPTS = {"planner": PLANNER_PROMPT, "extractor": EXTRACTOR_PROMPT, "synthesiser": SYNTHESISER_PROMPT,
           "ranker": RANKER_PROMPT}
VALIDATORS = {"planner": validate_planner, "extractor": validate_extractor, "synthesiser": validate_synthesiser,
              "ranker": validate_ranker}


# -- rule-based references (toy) --


def ref_planner(inp: dict, args) -> dict:
    """PLANNER REFERENCE (rule-based): skip a consistent batch, run operations on novelty/conflict."""
    pending = inp["pending"]
    if not any(e.get("polarity") in (1, -1) for e in pending):
        return {"ops": [], "reason": "no pending signal"}
    strong = {c["id"]: abs(c["s"]) for c in inp["chunks"]}
    conflicts = [c for c in inp["conflicts"] if strong.get(c["chunk_id"], 0.0) >= 0.3]
    matched = inp.get("matched", [])
    consistent = all(strong.get(cid, 0.0) >= 0.8 for cid in matched)
    if len(pending) < args.max_pending and not inp["novel_tags"] and not conflicts and consistent:
        return {"ops": [], "reason": "consistent with strong chunks"}
    ops = ["extract", "reinforce", "weaken"]
    if inp.get("created_since_merge", 0) + len(inp["novel_tags"]) >= 2:
        ops.append("merge")
    if inp["conflicts"] or any(abs(c["s"]) < args.forget_threshold for c in inp["chunks"]):
        ops.append("forget")
    if inp["changes_since_synth"] >= args.synth_every_changes or inp["conflicts"]:
        ops.append("synthesize")
    return {"ops": ops, "reason": "novel tags or conflict"}


def ref_extractor(inp: dict) -> dict:
    """EXTRACTOR REFERENCE: the learned tagger's tags of each event's item, as the input lists them
    ("whodunit (genre)"), become 'likes|dislikes <surface word> (<category>)'; linking is by exact
    chunk text (synonyms create duplicates); a tag whose key has an opposite-polarity chunk
    contradicts it. Dedup mode: the judge is 'same key'. Reads nothing but `inp` (and the fixed
    synonym lexicon): an LLM extractor given the same input has the same information."""
    chunks = inp.get("chunks", [])
    if inp.get("mode") == "dedup":
        by = {}
        for c in chunks:
            by.setdefault((key_of(c["category"], c["text"]), c["polarity"]), []).append(c["id"])
        groups = [g for g in by.values() if len(g) >= 2]
        conflicts = [[a[0], b[0]] for (k, p), a in by.items() for (k2, p2), b in by.items() if k == k2 and p > p2]
        return {"groups": groups, "conflicts": conflicts}
    by_text = {c["text"]: c["id"] for c in chunks}
    by_key = {}
    for c in chunks:
        by_key.setdefault((key_of(c["category"], c["text"]), c["polarity"]), []).append(c["id"])
    new, support, contradict = {}, {}, {}
    for e in inp["events"]:
        p = e.get("polarity")
        if p not in (1, -1):
            continue
        for key, cat, word in parse_tags(e.get("tags", ())):
            text = f"{'likes' if p > 0 else 'dislikes'} {word} ({cat})"
            opp = by_key.get((key, -p), [])
            if opp:
                for cid in opp:
                    contradict.setdefault(cid, []).append(e["id"])
            elif text in by_text:
                support.setdefault(by_text[text], []).append(e["id"])
            elif text in new:
                new[text]["event_ids"].append(e["id"])
            else:
                new[text] = {"category": cat, "text": text, "polarity": p, "event_ids": [e["id"]]}
    return {"new": list(new.values()), "support": [{"chunk_id": k, "event_ids": v} for k, v in support.items()],
            "contradict": [{"chunk_id": k, "event_ids": v} for k, v in contradict.items()]}


def ref_synthesiser(inp: dict, args) -> dict:
    """SYNTHESISER REFERENCE: top --profile_max_chunks chunks by m, one line each (Eq. 7)."""
    lines = [chunk_line(c["category"], chunk_word(c["text"]), c["polarity"], c["s"], c["n_for"], c["n_against"])
             for c in inp["chunks"][:args.profile_max_chunks]]
    return {"profile": "\n".join(lines)}


def ref_ranker(inp: dict, args) -> dict:
    """RANKER REFERENCE: score(c) = sum of profile weights of c's tags + recent_weight * mean over
    recent events of polarity * |shared tags| + instruction bonus; ties keep the shuffled order.
    Reads nothing but `inp` (the tags of the recent events and candidates are in it, as an LLM
    ranker sees them) and the fixed synonym lexicon."""
    w = profile_weights(inp.get("profile", ""), LEXICON)
    recent = [(e.get("polarity") or 0, tag_keys(e.get("tags", ()))) for e in inp.get("recent", [])]
    want = LEXICON.get(instruction_word(inp.get("instruction", "")), None)
    scores = []
    for c in inp["candidates"]:
        keys = tag_keys(c.get("tags", ()))
        s = sum(w.get(k, 0.0) for k in sorted(keys))  # sorted: a set's order (string hashing) must not move floats
        if recent:
            s += args.recent_weight * sum(p * len(keys & ks) for p, ks in recent) / len(recent)
        if want is not None and want in keys:
            s += args.instruction_bonus
        scores.append(s)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep the shuffled order
    return {"ranking": [inp["candidates"][i]["id"] for i in order]}


def make_roles(args, world, llm=None) -> dict:
    """The four roles: LLMRole for those in --llm_roles (on the hf/api backend), RefRole otherwise."""
    # DEVIATION(1): with --backend ref (the toy default) every role is a rule-based reference.
    # every reference reads only its input (the same dict an LLM role gets as JSON), never the world
    refs = {"planner": lambda x: ref_planner(x, args), "extractor": ref_extractor,
            "synthesiser": lambda x: ref_synthesiser(x, args), "ranker": lambda x: ref_ranker(x, args)}
    roles = {}
    for r in ROLES:
        if r in args.llm_role_set:
            roles[r] = LLMRole(r, llm, PROMPTS[r], VALIDATORS[r], FALLBACK[r], args.max_retries, args.temperature,
                               args.role_tokens[r], args.reply_cache,
                               extra_body=JSON_BODY if getattr(args, "json_active", False) else None)
        else:
            roles[r] = RefRole(r, refs[r])
    return roles


def make_llm(args):
    """common.LLM over a local HF model (chat template) or an OpenAI-compatible endpoint (each request
    ends within --request_timeout seconds, retries included); None for --backend ref."""
    if args.backend == "hf":
        return common.LLM.from_hf(args.model_name_or_path, batch_size=args.batch_size, seed=args.seed_list[0])
    if args.backend == "api":
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        return common.LLM.from_endpoint(args.api_base, args.api_model, key, max_workers=args.concurrency,
                                        deadline=args.request_timeout)
    return None


JSON_BODY = {"response_format": {"type": "json_object"}}


def preflight(args) -> None:
    """Everything the run will use, checked before anything is written: the data files parse
    (file:line on a bad row), the model path loads its config, the endpoint answers one 1-token
    request on the chat route (common.preflight_endpoint). Then JSON mode: unless --json_mode off, a
    second 1-token request carries response_format json_object; accepted -> every role asks for
    constrained JSON (args.json_active); refused -> --json_mode on stops here with one line, auto
    goes on without it and says so."""
    if args.items_file:
        read_real_world(args, args.seed_list[0])
    if args.backend == "hf":
        common.preflight_model(args.model_name_or_path)
    args.json_active = False
    if args.backend == "api":
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        deadline = min(30.0, args.request_timeout)
        client = common.ChatClient(args.api_base, args.api_model, key, timeout=deadline, deadline=deadline)
        common.preflight_endpoint(client, route="chat", deadline=deadline)
        if args.json_mode != "off":
            try:
                common.preflight_endpoint(client, route="chat", deadline=deadline, extra_body=JSON_BODY)
                args.json_active = True
            except UserError as e:
                if args.json_mode == "on":
                    raise UserError(f"--json_mode on: the endpoint refused response_format json_object ({e}); use "
                                    f"--json_mode auto or off") from None
                print(f"note: the endpoint refused response_format json_object ({str(e)[:160]}); the roles ask for "
                      f"JSON in their prompts only (--json_mode off skips this probe)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# ---- toy world: items with attributes, users with stable / drifting / one-off preferences ----
# ---------------------------------------------------------------------------------------------

ATTRS = {  # attribute -> value -> two surface words (synonyms the extractor does not unify)
    "genre": {"mystery": ["mystery", "whodunit"], "romance": ["romance", "love-story"], "scifi": ["sci-fi", "space-opera"],
              "fantasy": ["fantasy", "sword-and-sorcery"], "horror": ["horror", "scary"], "comedy": ["comedy", "funny"],
              "thriller": ["thriller", "suspense"], "drama": ["drama", "tearjerker"],
              "history": ["historical", "period-piece"], "documentary": ["documentary", "nonfiction"]},
    "tone": {"dark": ["dark", "grim"], "light": ["lighthearted", "cheerful"], "epic": ["epic", "sweeping"],
             "quirky": ["quirky", "offbeat"]},
    "length": {"short": ["short", "brief"], "medium": ["mid-length", "standard-length"], "long": ["long", "lengthy"]},
    "era": {"classic": ["classic", "vintage"], "modern": ["modern", "contemporary"], "future": ["futuristic", "far-future"],
            "retro": ["retro", "eighties"]},
    "price": {"cheap": ["budget", "bargain"], "mid": ["mid-priced", "affordable"], "premium": ["premium", "deluxe"]},
}
ATTR_NAMES = list(ATTRS)
LEXICON = {w: f"{a}={v}" for a in ATTRS for v in ATTRS[a] for w in ATTRS[a][v]}  # surface word -> key
VALUES = [(a, v) for a in ATTRS for v in ATTRS[a]]  # 24 values; index = position in w
VALUE_INDEX = {f"{a}={v}": i for i, (a, v) in enumerate(VALUES)}
TEMPLATES = [
    "A {length} {tone} {genre} from the {era} shelf, {price} edition.",
    "{tone} and {length}: a {era} {genre} at a {price} price.",
    "Critics call this {genre} {tone}; {length}, {era}, {price}.",
    "Fans of {genre} will find this {era} title {tone} and {length} ({price}).",
    "{price} {era} {genre}, {length} and {tone}.",
    "This {length} {genre} has a {tone} feel, {era} style, {price} tag.",
]
FILLER = ["acclaimed", "paperback", "bestseller", "debut", "illustrated", "translated", "award-winning", "sequel",
          "anthology", "annotated", "reissue", "collector", "bundle", "signed", "hardcover", "audio"]
TITLE_A = ["Silent", "Crimson", "Hidden", "Last", "Broken", "Golden", "Distant", "Northern", "Lost", "Burning", "Quiet",
           "Paper", "Iron", "Glass", "Winter", "Summer"]
TITLE_B = ["Harbor", "Garden", "Signal", "Empire", "Letter", "Orchard", "Engine", "Island", "Mirror", "Station",
           "Frontier", "River", "Archive", "Lantern", "Compass", "Crown"]


def key_of(category: str, text: str) -> str:
    """The tag key of a chunk text or tag word: synonyms share one ('whodunit' -> 'genre=mystery');
    a word outside the toy lexicon (real data) is its own key."""
    word = chunk_word(text).lower()
    return LEXICON.get(word, f"{category}={word}")


_TAG = re.compile(r"^\s*(.+?)\s*\(([^()]*)\)\s*$")


def parse_tags(tags) -> list:
    """Role-input tags ["whodunit (genre)", ...] -> [(key, category, word)]."""
    out = []
    for t in tags or ():
        m = _TAG.match(str(t))
        if m:
            word, cat = m.group(1), m.group(2).strip()
            out.append((LEXICON.get(word.lower(), f"{cat}={word.lower()}"), cat, word))
    return out


@functools.lru_cache(maxsize=100_000)
def _tag_keys(tags: tuple) -> frozenset:
    return frozenset(k for k, _, _ in parse_tags(tags))


def tag_keys(tags) -> frozenset:
    return _tag_keys(tuple(tags))


def instruction_word(instruction: str):
    return next((w for w in re.findall(r"[a-z][a-z\-]*", instruction.lower()) if w in LEXICON), None)


def describe(rng: np.random.Generator, values: dict) -> tuple[str, dict]:
    """Description of an item with attribute values {attr: value}: a template, one of two surface
    words per value, 15 % omit one non-genre attribute, filler words, and with p 0.2 a contrast phrase
    naming another genre (what makes the bag-of-words tagger imperfect). Returns (text, label)."""
    label = dict(values)
    words = {a: ATTRS[a][v][rng.integers(2)] for a, v in values.items()}
    if rng.random() < 0.15:
        a = ATTR_NAMES[1 + rng.integers(len(ATTR_NAMES) - 1)]
        words[a] = FILLER[rng.integers(len(FILLER))]
        label[a] = None
    text = TEMPLATES[rng.integers(len(TEMPLATES))].format(**words)
    extra = [FILLER[i] for i in rng.choice(len(FILLER), size=rng.integers(1, 4), replace=False)]
    if rng.random() < 0.2:
        other = [g for g in ATTRS["genre"] if g != values["genre"]]
        extra.append("unlike the usual " + ATTRS["genre"][other[rng.integers(len(other))]][rng.integers(2)])
    return text + " " + ", ".join(extra) + ".", label


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z\-]*", text.lower())


class Tagger(torch.nn.Module):
    """Bag-of-words softmax tagger: one linear head per attribute (non-genre heads have a 'none'
    class for an omitted attribute). < 1M parameters; trains in seconds on CPU."""

    def __init__(self, vocab: list[str]):
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(len(vocab), len(ATTRS[a]) + (a != "genre"))
                                          for a in ATTR_NAMES})

    def featurize(self, texts) -> torch.Tensor:
        x = torch.zeros(len(texts), len(self.vocab))
        for i, t in enumerate(texts):
            for w in tokenize(t):
                j = self.vocab.get(w)
                if j is not None:
                    x[i, j] = 1.0
        return x

    def forward(self, x):  # (B, V) -> {attr: (B, n_values[+1])}
        return {a: h(x) for a, h in self.heads.items()}


def _label_ids(labels: list[dict]) -> dict:
    out = {}
    for a in ATTR_NAMES:
        vals = list(ATTRS[a])
        out[a] = torch.tensor([vals.index(l[a]) if l[a] is not None else len(vals) for l in labels])
    return out


@functools.lru_cache(maxsize=8)  # the same seed's tagger serves every world (items do not depend on the world)
def train_tagger(seed: int, n: int = 3000, steps: int = 150) -> Tagger:
    rng = np.random.default_rng(10_000 + seed)
    texts, labels = [], []
    for _ in range(n):
        vals = {a: list(ATTRS[a])[rng.integers(len(ATTRS[a]))] for a in ATTR_NAMES}
        t, l = describe(rng, vals)
        texts.append(t)
        labels.append(l)
    vocab = sorted({w for t in texts for w in tokenize(t)})
    torch.manual_seed(seed)
    tagger = Tagger(vocab)
    x, y = tagger.featurize(texts), _label_ids(labels)
    opt = torch.optim.Adam(tagger.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        logits = tagger(x)
        loss = sum(torch.nn.functional.cross_entropy(logits[a], y[a]) for a in ATTR_NAMES)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tagger.eval()


@torch.no_grad()
def tag_items(tagger: Tagger, texts: list[str], labels: list[dict] | None = None):
    """Predicted tags per text [(key 'attr=value', attr, surface word)] and held-out accuracy."""
    logits = tagger(tagger.featurize(texts))
    pred = {a: logits[a].argmax(-1).tolist() for a in ATTR_NAMES}
    tags = []
    for i, t in enumerate(texts):
        toks = set(tokenize(t))
        row = []
        for a in ATTR_NAMES:
            vals = list(ATTRS[a])
            j = pred[a][i]
            if j < len(vals):
                v = vals[j]
                word = next((w for w in ATTRS[a][v] if w in toks), ATTRS[a][v][0])
                row.append((f"{a}={v}", a, word))
        tags.append(row)
    acc = None
    if labels is not None:
        y = _label_ids(labels)
        acc = float(np.mean([(torch.tensor(pred[a]) == y[a]).float().mean().item() for a in ATTR_NAMES]))
    return tags, acc


@dataclasses.dataclass
class User:
    uid: str
    instruction: str
    events: list          # [{id, user, item_id, title, text, action, rating, polarity, t, kind}]
    n_ingest: int         # events[:n_ingest] may enter memory
    evals: list           # [(t, target item id, candidate ids shuffled, in_table)]
    drift_t: int | None = None


class World:
    """Items, users, and the toy tagger's item tags (empty on real data)."""

    def __init__(self, items: dict, users: list, item_tags: dict | None = None, tagger_acc: float | None = None):
        self.items, self.users = items, users
        self.item_tags = item_tags or {}
        self.tagger_acc = tagger_acc
        self.lexicon = LEXICON
        # what every role input shows of an item's tags: "whodunit (genre)" per predicted tag
        self.tag_strings = {i: [f"{word} ({cat})" for _, cat, word in t] for i, t in self.item_tags.items()}

    def key_of(self, category: str, text: str) -> str:
        return key_of(category, text)

    def tags(self, item_id: str) -> list:
        return list(self.tag_strings.get(item_id, ()))


DRIFT_T = (20, 30)  # t* ~ U{20..30}: the drift point of a drifting user
# world -> (drift, ephemeral noise, repeated preference flips, opinion impressions)
WORLD_SETTINGS = {"drift_noise": (True, True, False, False), "drift_only": (True, False, False, False),
                  "noise_only": (False, True, False, False), "clean": (False, False, False, False),
                  "contradict": (False, False, True, True), "contradict_control": (False, False, False, True)}
FLIP_T = (12, 24, 36)  # contradict: flip points (each +/- 2 events per user)


def toy_world(args, world_name: str, seed: int) -> World:
    """Simulated users (section 5 of the spec). Utility u = w . a + N(0, 0.1); drift moves the liked
    genre to -0.5 and an unused genre to +1 at t* ~ U{20..30}; events are one-off gifts (rated 4-5),
    impressions (rated by u) or choices (softmax(u / 0.3) over unseen items).
    contradict: every user's preferences flip at FLIP_T (each +/- 2): one held like becomes a dislike
    and one dislike a like, and with --p_contra_impression an event is an impression of an item that
    carries a value the user has an opinion on (liked or disliked, now or before), rated by the current
    u, so chunks meet contradicting evidence often. contradict_control: the same users, event mix and
    draws, no flips (contradictions only from items mixing liked and disliked values)."""
    # DEVIATION(3): a simulated world instead of the four InstructRec domains (read_real_world reads those).
    drift_on, noise_on, flips_on, opinion_on = WORLD_SETTINGS[world_name]
    p_eph = args.p_ephemeral if noise_on else 0.0
    drift_frac = args.drift_frac if drift_on else 0.0
    rng = np.random.default_rng(seed)
    n_items, n_vals = args.num_items, len(VALUES)
    item_vals = [{a: list(ATTRS[a])[rng.integers(len(ATTRS[a]))] for a in ATTR_NAMES} for _ in range(n_items)]
    A = np.zeros((n_items, n_vals))
    items, texts, labels = {}, [], []
    for i, vals in enumerate(item_vals):
        for a, v in vals.items():
            A[i, VALUE_INDEX[f"{a}={v}"]] = 1.0
        text, label = describe(rng, vals)
        iid = f"i{i}"
        items[iid] = {"id": iid, "title": f"{TITLE_A[rng.integers(16)]} {TITLE_B[rng.integers(16)]} #{i}", "text": text}
        texts.append(text)
        labels.append(label)
    # the tagger trains on other generator descriptions (its seed differs); tag each item once per seed
    tagger = train_tagger(seed, args.tagger_train, args.tagger_steps)
    tags, acc = tag_items(tagger, texts, labels)
    item_tags = {f"i{i}": t for i, t in enumerate(tags)}
    genre_idx = [VALUE_INDEX[f"genre={g}"] for g in ATTRS["genre"]]
    other_idx = [j for j in range(n_vals) if j not in genre_idx]
    users = []
    for u in range(args.num_users):
        w = np.zeros(n_vals)
        g = int(rng.choice(genre_idx))
        w[g] = 1.0
        liked = list(rng.choice(other_idx, size=rng.integers(1, 3), replace=False))
        w[liked] = 1.0
        free = [j for j in range(n_vals) if w[j] == 0]
        w[list(rng.choice(free, size=rng.integers(1, 3), replace=False))] = -1.0
        noise = rng.normal(0, 0.1, n_items)
        drift_t = int(rng.integers(DRIFT_T[0], DRIFT_T[1] + 1)) if rng.random() < drift_frac else None
        w2 = w.copy()
        if drift_t is not None:
            w2[g] = -0.5
            w2[int(rng.choice([j for j in genre_idx if w[j] == 0]))] = 1.0
        old_genre_items = np.flatnonzero(A[:, g] > 0)
        ws = [(0, w)]  # (from t, preference vector)
        if opinion_on:  # drawn in both contradict worlds (same users and streams); applied only with flips
            cur = w.copy()
            for ft in FLIP_T:
                ft += int(rng.integers(-2, 3))
                a_ = int(rng.choice(np.flatnonzero(cur > 0)))
                b_ = int(rng.choice(np.flatnonzero(cur < 0)))
                cur = cur.copy()
                cur[a_], cur[b_] = -1.0, 1.0
                if flips_on:
                    ws.append((ft, cur))
            opinion = np.flatnonzero(np.any([wv != 0 for _, wv in ws], axis=0) | (w != 0))
            opinion_items = np.flatnonzero(A[:, opinion].sum(1) > 0)
        seen, events = set(), []
        for t in range(args.stream_len):
            wt = w2 if drift_t is not None and t >= drift_t else w
            if opinion_on:
                wt = next(wv for ft, wv in reversed(ws) if t >= ft)
            util = A @ wt + noise
            unseen = np.array([i for i in range(n_items) if i not in seen])
            r = rng.random()
            if opinion_on and r < args.p_contra_impression:
                pool = np.array([i for i in opinion_items if i not in seen])
                it = int(rng.choice(pool)) if len(pool) else int(rng.choice(unseen))
                kind = "impression"
                rating = int(np.clip(np.round(3 + 1.5 * util[it] + rng.normal(0, 0.5)), 1, 5))
            elif opinion_on:
                pool = rng.choice(unseen, size=min(args.choice_pool, len(unseen)), replace=False)
                z = util[pool] / args.choice_temp
                p = np.exp(z - z.max())
                it, kind = int(rng.choice(pool, p=p / p.sum())), "choice"
                rating = int(np.clip(np.round(3 + 1.5 * util[it] + rng.normal(0, 0.5)), 1, 5))
            elif r < p_eph:
                it, kind, rating = int(rng.choice(unseen)), "ephemeral", int(rng.integers(4, 6))
            elif r < p_eph + (1 - p_eph) * args.p_impression:
                pool = np.array([i for i in old_genre_items if i not in seen])
                it = int(rng.choice(pool)) if rng.random() < 0.5 and len(pool) else int(rng.choice(unseen))
                kind = "impression"
                rating = int(np.clip(np.round(3 + 1.5 * util[it] + rng.normal(0, 0.5)), 1, 5))
            else:
                pool = rng.choice(unseen, size=min(args.choice_pool, len(unseen)), replace=False)
                z = util[pool] / args.choice_temp
                p = np.exp(z - z.max())
                it, kind = int(rng.choice(pool, p=p / p.sum())), "choice"
                rating = int(np.clip(np.round(3 + 1.5 * util[it] + rng.normal(0, 0.5)), 1, 5))
            seen.add(it)
            iid = f"i{it}"
            events.append({"id": f"u{u}-e{t}", "user": f"u{u}", "item_id": iid, "title": items[iid]["title"],
                           "text": items[iid]["text"], "action": "rate", "rating": rating,
                           "polarity": polarity_of(rating), "t": t, "kind": kind})
        # instruction: a liked non-genre value, wrong with p instruction_noise
        if rng.random() < args.instruction_noise:
            pick = int(rng.choice([j for j in other_idx if w[j] <= 0]))
        else:
            pick = int(rng.choice(liked))
        a, v = VALUES[pick]
        instruction = f"Looking for something {ATTRS[a][v][rng.integers(2)]}."
        stream_items = {e["item_id"] for e in events}
        outside = [f"i{i}" for i in range(n_items) if f"i{i}" not in stream_items]
        evals, table = [], set(args.eval_list)
        for t in sorted(set(range(args.curve_start, args.history_len + 1)) | table):
            pos = next((e["item_id"] for e in events[t:] if e["kind"] == "choice"), None)
            if pos is None:
                continue
            negs = list(rng.choice(outside, size=args.num_candidates - 1, replace=False))
            cands = [pos] + negs
            rng.shuffle(cands)  # position bias: shuffle (pitfall 2)
            evals.append((t, pos, [str(c) for c in cands], t in table))
        users.append(User(f"u{u}", instruction, events, args.history_len, evals, drift_t))
    return World(items, users, item_tags, acc)


def clip_text(text: str, n: int) -> str:
    """`text` cut to at most n characters at a word boundary, with '...' (n <= 0: unchanged)."""
    if n <= 0 or len(text) <= n:
        return text
    text = " ".join(text.split())
    if len(text) <= n:
        return text
    cut = text[:max(1, n - 3)]
    if " " in cut:
        cut = cut[:cut.rfind(" ")]
    return cut.rstrip(" ,;:.") + "..."


RATING_MIN, RATING_MAX = 1, 5  # the InstructRec rating scale; polarity of Eq. (1) assumes it


def _timestamp_key(x, where: str, k: int) -> tuple:
    """(kind, sort key) of one history timestamp: a finite number, an ISO-8601 string (parsed: text order
    is not time order for '2024-1-5' vs '2024-01-05', and a non-ISO string is refused), or missing;
    UserError naming file:line and the entry otherwise."""
    import datetime

    if x is None:
        return "missing", 0
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if not math.isfinite(x):
            raise UserError(f"{where}: history entry {k} has timestamp {x!r}; use a finite number (e.g. unix seconds)")
        return "numbers", float(x)
    if isinstance(x, str):
        try:
            d = datetime.datetime.fromisoformat(x.strip())
        except ValueError:
            raise UserError(f"{where}: history entry {k} has timestamp {x!r}, not ISO-8601; use e.g. "
                            f"'2024-01-05T12:00:00' or a number (unix seconds)") from None
        if d.tzinfo is None:
            return "ISO strings without a UTC offset", (d - datetime.datetime(1970, 1, 1)).total_seconds()
        return "ISO strings with a UTC offset", d.timestamp()
    raise UserError(f"{where}: history entry {k} has a timestamp of type {type(x).__name__}; use a number or an "
                    f"ISO-8601 string")


def read_real_world(args, seed: int) -> World:
    """InstructRec-style jsonl: memory from history[:T-2], T-1 a warm-up target, T the test target."""
    def rows(path):  # missing / unreadable / non-UTF-8 file or a bad JSON line -> UserError naming file:line
        out = []
        for i, line in enumerate(common.read_text_lines(path), 1):
            if line.strip():
                try:
                    out.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not valid JSON ({e.msg}); fix or remove that line") from None
        return out

    items = {}
    for i, r in rows(args.items_file):
        if not isinstance(r, dict) or "item_id" not in r or not isinstance(r.get("title"), str):
            raise UserError(f"{args.items_file}:{i}: needs item_id and title (and description)")
        iid = str(r["item_id"])
        if iid in items:
            raise UserError(f"{args.items_file}:{i}: item_id {iid!r} appeared on an earlier line; give each item once")
        # descriptions only go into prompts (events, candidates): long ones are cut at --max_desc_chars
        items[iid] = {"id": iid, "title": r["title"], "text": clip_text(str(r.get("description", "")), args.max_desc_chars)}
    rng = np.random.default_rng(seed)
    users, seen_users = [], {}
    for i, r in rows(args.users_file)[:args.num_users]:
        where = f"{args.users_file}:{i}"
        hist = r.get("history") if isinstance(r, dict) else None
        if not isinstance(hist, list) or len(hist) < 3 or "user_id" not in r:
            raise UserError(f"{where}: needs user_id and a history of >= 3 {{item_id, rating, timestamp}}")
        if str(r["user_id"]) in seen_users:
            raise UserError(f"{where}: user_id {str(r['user_id'])!r} is also on line {seen_users[str(r['user_id'])]}; "
                            f"give each user once (one line with the whole history)")
        seen_users[str(r["user_id"])] = i
        hist_ids = {}
        for k, h in enumerate(hist):
            if not isinstance(h, dict) or "item_id" not in h:
                raise UserError(f"{where}: history entry {k} needs item_id (rating, timestamp)")
            rt = h.get("rating")
            if rt is not None and (isinstance(rt, bool) or not isinstance(rt, (int, float)) or not math.isfinite(rt)
                                   or not RATING_MIN <= rt <= RATING_MAX):
                raise UserError(f"{where}: history entry {k} has rating {rt!r}; use a number in [{RATING_MIN}, "
                                f"{RATING_MAX}] or null for a click")
            if str(h["item_id"]) in hist_ids:
                raise UserError(f"{where}: history entries {hist_ids[str(h['item_id'])]} and {k} are both item "
                                f"{h['item_id']!r}; keep one event per item (its target would otherwise be in memory)")
            hist_ids[str(h["item_id"])] = k
        keys = [_timestamp_key(h.get("timestamp"), where, k) for k, h in enumerate(hist)]
        kinds = {kd for kd, _ in keys}
        if len(kinds) > 1:
            raise UserError(f"{where}: history timestamps mix {' and '.join(sorted(kinds))}; give every entry a number, "
                            f"or every entry an ISO-8601 string with (or every one without) a UTC offset, or none "
                            f"(file order)")
        order = sorted(range(len(hist)), key=lambda k: keys[k][1]) if kinds != {"missing"} else range(len(hist))
        hist = [hist[k] for k in order]  # stable: equal timestamps keep file order
        bad = [h["item_id"] for h in hist if str(h["item_id"]) not in items]
        if bad:
            raise UserError(f"{where}: item {bad[0]} is not in {args.items_file}")
        uid = str(r["user_id"])
        events = []
        for t, h in enumerate(hist):
            iid, rating = str(h["item_id"]), h.get("rating")
            action = "rate" if rating is not None else "click"
            events.append({"id": f"{uid}-e{t}", "user": uid, "item_id": iid, "title": items[iid]["title"],
                           "text": items[iid]["text"], "action": action, "rating": rating,
                           "polarity": polarity_of(rating, action), "t": t, "kind": "choice"})
        n = len(events)
        hist_items = {e["item_id"] for e in events}
        outside = [k for k in items if k not in hist_items]
        evals = []
        for t in (n - 2, n - 1):
            pos = events[t]["item_id"]
            given = r.get("candidates") if t == n - 1 else None
            if given is not None and not (isinstance(given, list) and all(isinstance(c, (str, int)) and
                                                                          not isinstance(c, bool) for c in given)):
                raise UserError(f"{where}: candidates must be a list of item ids, got {type(given).__name__}")
            if given:
                cands = [str(c) for c in given]
                if pos not in cands or any(c not in items for c in cands):
                    raise UserError(f"{where}: candidates must be known items and contain the target")
                if len(set(cands)) != len(cands):
                    raise UserError(f"{where}: candidates repeat an item id")
            else:
                if len(outside) < args.num_candidates - 1:
                    raise UserError(f"{args.items_file}: too few items for {args.num_candidates} candidates")
                cands = [pos] + [str(c) for c in rng.choice(outside, size=args.num_candidates - 1, replace=False)]
            rng.shuffle(cands)
            evals.append((t, pos, cands, t == n - 1))
        users.append(User(uid, str(r.get("instruction", "")), events, n - 1, evals, None))
    if not users:
        raise UserError(f"{args.users_file} has no users")
    return World(items, users)


# ---------------------------------------------------------------------------------------------
# ---- memory arms: MARS belief state and the baselines ----
# ---------------------------------------------------------------------------------------------


class BeliefState:
    """MARS memory of one user: event tier (FIFO + pending), preference tier (chunks), profile tier."""

    def __init__(self, fifo: int = 15):
        self.fifo = deque(maxlen=fifo)
        self.pending: list = []
        self.chunks: dict = {}
        self.profile = ""
        self.t = 0
        self.next_id = 0
        self.changes_since_synth = 0
        self.created_since_merge = 0
        self.since_check = 0

    def to_json(self) -> dict:
        return {"fifo": list(self.fifo), "fifo_len": self.fifo.maxlen, "pending": self.pending,
                "chunks": [dataclasses.asdict(c) for c in self.chunks.values()], "profile": self.profile, "t": self.t,
                "next_id": self.next_id, "changes_since_synth": self.changes_since_synth,
                "created_since_merge": self.created_since_merge, "since_check": self.since_check}

    @classmethod
    def from_json(cls, d: dict) -> "BeliefState":
        st = cls(d["fifo_len"])
        st.fifo.extend(d["fifo"])
        st.pending = list(d["pending"])
        st.chunks = {c["id"]: Chunk(**c) for c in d["chunks"]}
        for k in ("profile", "t", "next_id", "changes_since_synth", "created_since_merge", "since_check"):
            setattr(st, k, d[k])
        return st


def event_view(e: dict, world: World | None = None) -> dict:
    """What a role sees of an event (no 'kind': the simulator's ground truth stays hidden): the item's
    text and, in the toy, the tagger's tags of it ("whodunit (genre)"), which the references read."""
    v = {"id": e["id"], "item_id": e["item_id"], "title": e["title"], "text": e["text"], "polarity": e["polarity"]}
    if world is not None and world.tag_strings:
        v["tags"] = world.tags(e["item_id"])
    return v


def chunk_view(c: Chunk) -> dict:
    return {"id": c.id, "category": c.category, "text": c.text, "polarity": c.polarity, "s": round(c.s, 4),
            "n_for": c.n_for, "n_against": c.n_against}


def planner_input(st: BeliefState, world: World, novelty: str = "text") -> dict:
    """Planner input: pending events, chunks, changes since synthesis, novel tags and conflicts (the
    latter two from the item tags where the toy has them; empty on real data). novelty 'text': a tag
    is matched by a chunk with its exact text, else novel (the spec's rule; with ~5 tags per event
    and two surface words per value nearly every check sees a novel tag); 'key': matched by any
    chunk with the same tagger key and polarity (synonyms match), novel only if no such chunk."""
    texts = {c.text: c.id for c in st.chunks.values()}
    keys = {}
    for c in st.chunks.values():
        keys.setdefault((world.key_of(c.category, c.text), c.polarity), []).append(c.id)
    novel, conflicts, matched = [], [], []
    for e in st.pending:
        p = e["polarity"]
        if p not in (1, -1):
            continue
        for key, cat, word in world.item_tags.get(e["item_id"], ()):
            text = f"{'likes' if p > 0 else 'dislikes'} {word} ({cat})"
            opp = keys.get((key, -p), [])
            conflicts += [{"chunk_id": cid, "event_id": e["id"]} for cid in opp]
            if novelty == "key":
                same = keys.get((key, p), [])
                if same:
                    matched += same
                elif not opp and text not in novel:
                    novel.append(text)
            elif text in texts:
                matched.append(texts[text])
            elif not opp and text not in novel:
                novel.append(text)
    return {"pending": [{"id": e["id"], "title": e["title"], "tags": world.tags(e["item_id"]),
                         "polarity": e["polarity"]} for e in st.pending],
            "chunks": [chunk_view(c) for c in st.chunks.values()], "changes_since_synth": st.changes_since_synth,
            "created_since_merge": st.created_since_merge, "novel_tags": novel, "conflicts": conflicts,
            "matched": sorted(set(matched))}


def apply_extraction(st: BeliefState, out: dict, ops, args, counts: dict | None = None) -> int:
    """Eqs. (2)-(4): create new chunks; reinforce / weaken linked chunks if those ops are scheduled.
    Returns the chunks changed; `counts` (if given) adds the update steps executed: op_reinforce per
    Eq. (3) step (incl. a new chunk's extra events), op_weaken per Eq. (4) step, n_created."""
    counts = counts if counts is not None else {}
    changed = 0
    for x in out["new"]:
        cid = f"c{st.next_id}"
        st.next_id += 1
        st.chunks[cid] = new_chunk(cid, x["category"], x["text"], x["polarity"], x["event_ids"], st.t, args.s0, args.eta_up)
        st.created_since_merge += 1
        changed += 1
        counts["n_created"] = counts.get("n_created", 0) + 1
        counts["op_reinforce"] = counts.get("op_reinforce", 0) + len(x["event_ids"]) - 1
    if "reinforce" in ops:
        for x in out["support"]:
            if x["chunk_id"] in st.chunks:
                for e in x["event_ids"]:
                    reinforce(st.chunks[x["chunk_id"]], e, st.t, args.eta_up)
                counts["op_reinforce"] = counts.get("op_reinforce", 0) + len(x["event_ids"])
                changed += 1
    if "weaken" in ops:
        for x in out["contradict"]:
            if x["chunk_id"] in st.chunks:
                for e in x["event_ids"]:
                    weaken(st.chunks[x["chunk_id"]], e, st.t, args.eta_down)
                counts["op_weaken"] = counts.get("op_weaken", 0) + len(x["event_ids"])
                changed += 1
    return changed


def synth_input(st: BeliefState) -> dict:
    ch = sorted(st.chunks.values(), key=lambda c: (-c.m, -c.updated_t, c.id))
    return {"chunks": [chunk_view(c) for c in ch], "old_profile": st.profile}


class MarsArm:
    """MARS: six operations, scheduled by the planner (mars_planner) or every --plan_every events (mars_fixed)."""

    def __init__(self, name, args, world, roles):
        self.name, self.args, self.world, self.roles = name, args, world, roles
        self.planned = name == "mars_planner"
        # plan_<op>: how often the schedule (planner or fixed) asked for an operation; op_<op>: what ran:
        # extractor calls (extract, merge judge), Eq. (3) / (4) steps (reinforce, weaken), forgetting passes,
        # synthesiser calls (incl. the automatic ones); n_created / n_merged / n_forgotten: chunks
        self.counts = {"checks": 0, "skips": 0, **{f"plan_{o}": 0 for o in OPS}, **{f"op_{o}": 0 for o in OPS},
                       "n_created": 0, "n_merged": 0, "n_forgotten": 0}

    def new_state(self):
        return BeliefState(self.args.event_fifo)

    def profile(self, st):
        return st.profile

    def ingest(self, batch):
        """batch: [(state, event)] for the users that have an event at this step (lockstep). Users
        due for a check get a schedule (planner or fixed), then the six operations in order, each
        batched across users."""
        due = self._add_events(batch)
        if not due:
            return
        ops = self._schedule(due)
        self._extract(due, ops)        # 1-3. extraction + this check's links: reinforce, weaken (Eqs. 2-4)
        self._consolidate(due, ops)    # 4. merge duplicates, weaken the weaker of a conflict (Eq. 5)
        self._forget(due, ops)         # 5. forgetting (Eq. 6)
        self._resynthesize(due, ops)   # 6. profile rebuilt from the chunks (Eq. 7)

    def _add_events(self, batch) -> list:
        """Event tier: FIFO + pending; returns the states due for a check (every --plan_every events,
        or at once when --max_pending events are pending)."""
        a = self.args
        for st, e in batch:
            st.fifo.append(e)
            st.pending.append(e)
            st.t = e["t"] + 1  # memory now covers events < t
            st.since_check += 1
        return [st for st, _ in batch if st.since_check >= a.plan_every or len(st.pending) >= a.max_pending]

    def _schedule(self, due) -> list:
        """One set of operations per due state: the planner's (mars_planner) or all six (mars_fixed);
        a full pending list is forced through extraction."""
        a = self.args
        if self.planned:
            plans = self.roles["planner"].batch([planner_input(st, self.world, a.planner_novelty) for st in due])
            ops = [set(p["ops"]) for p in plans]
        else:
            ops = [set(OPS) for _ in due]
        for st, o in zip(due, ops):
            st.since_check = 0
            if len(st.pending) >= a.max_pending:  # forced through extraction
                o |= {"extract", "reinforce", "weaken"}
            self.counts["checks"] += 1
            self.counts["skips"] += not o
            for op in o:
                self.counts[f"plan_{op}"] += 1
        return ops

    def _extract(self, due, ops) -> None:
        ext = [(st, o) for st, o in zip(due, ops) if "extract" in o]
        sig = [(st, o) for st, o in ext if any(e["polarity"] in (1, -1) for e in st.pending)]
        outs = self.roles["extractor"].batch([{"mode": "extract", "events": [event_view(e, self.world) for e in st.pending
                                                                             if e["polarity"] in (1, -1)],
                                               "chunks": [chunk_view(c) for c in st.chunks.values()]} for st, _ in sig])
        self.counts["op_extract"] += len(sig)
        for (st, o), out in zip(sig, outs):
            st.changes_since_synth += apply_extraction(st, out, o, self.args, self.counts)
        for st, _ in ext:
            st.pending = []

    def _consolidate(self, due, ops) -> None:
        """The extractor in dedup mode judges duplicates and conflicts (Eq. 5)."""
        mrg = [st for st, o in zip(due, ops) if "merge" in o and len(st.chunks) >= 2]
        outs = self.roles["extractor"].batch([{"mode": "dedup", "chunks": [chunk_view(c) for c in st.chunks.values()]}
                                              for st in mrg])
        self.counts["op_merge"] += len(mrg)
        for st, out in zip(mrg, outs):
            before = {cid: c.n_against for cid, c in st.chunks.items()}
            n = len(st.chunks)
            st.changes_since_synth += consolidate(st.chunks, out["groups"], out["conflicts"], st.t, self.args.eta_down)
            self.counts["n_merged"] += n - len(st.chunks)
            # a conflict's weakening step: a surviving chunk with one more n_against than its members had
            self.counts["op_weaken"] += sum(c.n_against for c in st.chunks.values()) - sum(before.values())
            st.created_since_merge = 0

    def _forget(self, due, ops) -> None:
        a = self.args
        for st, o in zip(due, ops):
            if "forget" in o:
                gone = len(forget(st.chunks, st.t, a.forget_threshold, a.min_evidence, a.stale_events, a.decay_gamma))
                st.changes_since_synth += gone
                self.counts["op_forget"] += 1
                self.counts["n_forgotten"] += gone

    def _resynthesize(self, due, ops) -> None:
        """When scheduled or after --synth_every_changes chunk changes; an empty memory has an empty profile."""
        a = self.args
        syn = [st for st, o in zip(due, ops) if ("synthesize" in o or st.changes_since_synth >= a.synth_every_changes)]
        nonempty = [st for st in syn if st.chunks]
        outs = self.roles["synthesiser"].batch([synth_input(st) for st in nonempty])
        self.counts["op_synthesize"] += len(nonempty)
        for st, out in zip(nonempty, outs):
            st.profile = out["profile"]
        for st in syn:
            if not st.chunks:
                st.profile = ""
            st.changes_since_synth = 0


class BaselineState:
    def __init__(self, fifo):
        self.fifo = deque(maxlen=fifo)
        self.facts: dict = {}  # key -> {text, category, polarity, order, S, last_t}
        self.buffer: list = []
        self.order = 0
        self.t = 0

    def to_json(self):
        return {"fifo": list(self.fifo), "facts": {str(k): v for k, v in self.facts.items()}, "t": self.t}


class BaselineArm:
    """recency / flat / mem0 / memorybank: rule-based memory policies on the shared extractor's
    statements (DEVIATION 2); the same ranker, FIFO, candidates and instruction as MARS."""

    def __init__(self, name, args, world, roles, seed: int = 0):
        self.name, self.args, self.world, self.roles = name, args, world, roles
        self.rng = np.random.default_rng(1_000_003 * (seed + 1))  # memorybank's forgetting draws
        # DEVIATION(2): rule-based memory policies on the extractor's statements; only extractor calls are counted.
        self.every = {"recency": 0, "flat": 1, "mem0": args.mem0_every, "memorybank": 1}[name]

    def new_state(self):
        return BaselineState(self.args.event_fifo)

    def profile(self, st):
        if self.name == "recency":
            return ""
        facts = list(st.facts.values())
        if self.name == "memorybank":
            facts.sort(key=lambda f: (-f["S"], -f["order"]))
        else:
            facts.sort(key=lambda f: -f["order"])
        b = self.args.baseline_strength  # 1: the spec's plain "Likes X (genre)." lines (weight +/-1)
        return "\n".join(chunk_line(f["category"], chunk_word(f["text"]), f["polarity"]) if b == 1.0 else
                         f"{'Likes' if f['polarity'] > 0 else 'Dislikes'} {chunk_word(f['text'])} ({f['category']}; "
                         f"strength {f['polarity'] * b:+.2f})." for f in facts[:self.args.profile_max_chunks])

    def ingest(self, batch):
        for st, e in batch:
            st.fifo.append(e)
            st.t = e["t"] + 1
            if e["polarity"] in (1, -1):
                st.buffer.append(e)
        if self.name == "recency":
            return
        due = [st for st, e in batch if st.buffer and (e["t"] + 1) % self.every == 0]
        if self.name == "memorybank":  # forgetting happens at every update, even without new signal
            for st, _ in batch:
                self._mb_forget(st)
        if not due:
            return
        outs = self.roles["extractor"].batch([{"mode": "extract", "events": [event_view(e, self.world) for e in st.buffer],
                                               "chunks": []} for st in due])
        for st, out in zip(due, outs):
            # apply statements in the order of each one's latest event, so "latest polarity wins" holds
            # inside a batch too: the extractor groups events by statement in first-seen order, so
            # likes X (e1, e3), dislikes X (e2) must end as "likes X" (stable: ties keep the extractor's order)
            pos = {e["id"]: j for j, e in enumerate(st.buffer)}
            for x in sorted(out["new"], key=lambda x: max((pos.get(e, -1) for e in x["event_ids"]), default=-1)):
                self._update(st, x)
            st.buffer = []

    def _update(self, st, x):
        key = self.world.key_of(x["category"], x["text"])
        pol = x["polarity"]
        st.order += 1
        if self.name == "flat":  # one statement per tag, latest polarity wins, capped, oldest dropped
            st.facts[key] = {"text": x["text"], "category": x["category"], "polarity": pol, "order": st.order}
            if len(st.facts) > self.args.profile_max_chunks:
                oldest = min(st.facts, key=lambda k: st.facts[k]["order"])
                del st.facts[oldest]
        elif self.name == "mem0":  # ADD (new key) / UPDATE (same key and polarity: text and recency refreshed,
            # as Mem0 updates an existing memory, also for an identical repeat) / DELETE (opposite polarity: the
            # old fact goes, the new one is added)
            st.facts[key] = {"text": x["text"], "category": x["category"], "polarity": pol, "order": st.order}
        elif self.name == "memorybank":  # likes and dislikes coexist; a re-mention raises S and resets dt
            k = (key, pol)
            old = st.facts.get(k)
            if old is None:
                st.facts[k] = {"text": x["text"], "category": x["category"], "polarity": pol, "order": st.order,
                               "S": 1, "last_t": st.t}
            else:
                old.update(S=min(3, old["S"] + 1), last_t=st.t, order=st.order)

    def _mb_forget(self, st):
        for k in list(st.facts):
            f = st.facts[k]
            dt = st.t - f["last_t"]
            if dt > 0 and self.rng.random() > math.exp(-dt / (f["S"] * self.args.mb_time_scale)):
                del st.facts[k]


def make_arm(name, args, world, roles, seed=0):
    return MarsArm(name, args, world, roles) if name.startswith("mars") else BaselineArm(name, args, world, roles, seed)


# ---------------------------------------------------------------------------------------------
# ---- rollout and evaluation ----
# ---------------------------------------------------------------------------------------------


def ranker_input(arm, st, user: User, t: int, cands: list, world: World) -> dict:
    """Profile + the FIFO's recent events (all < t) + instruction + shuffled candidates; the chunks
    stay out of the prompt (pitfall 8); nothing about the target or the future is included."""
    return {"user": user.uid, "now": t, "profile": arm.profile(st),
            "recent": [recent_view(e, world) for e in st.fifo],
            "instruction": user.instruction,
            "candidates": [{"id": c, "title": world.items[c]["title"], "description": world.items[c]["text"],
                            **({"tags": world.tags(c)} if world.tag_strings else {})} for c in cands]}


def recent_view(e: dict, world: World) -> dict:
    """A recent event in the ranker's prompt: id, title, polarity and what the item is about: the
    tagger's tags in the toy (what the ranker reference reads: the same information), the (cut)
    description on real data (no tags)."""
    v = {"id": e["id"], "item_id": e["item_id"], "title": e["title"], "polarity": e["polarity"]}
    if world.tag_strings:
        v["tags"] = world.tags(e["item_id"])
    else:
        v["description"] = e["text"]
    return v


def run_arm(arm, world: World, roles: dict) -> dict:
    """Step all users in lockstep over event indices: evaluate every user with an eval at t (memory
    holds events < t only), then ingest event t. Returns per-eval records and the final states."""
    users = world.users
    states = [arm.new_state() for _ in users]
    t_end = max(max((ev[0] for ev in u.evals), default=0) for u in users) + 1
    evals_at = {}
    for ui, u in enumerate(users):
        for ev in u.evals:
            evals_at.setdefault(ev[0], []).append((ui, ev))
    records = []
    for t in range(t_end):
        todo = evals_at.get(t, [])
        if todo:
            inps = [ranker_input(arm, states[ui], users[ui], t, ev[2], world) for ui, ev in todo]
            outs = roles["ranker"].batch(inps)
            for (ui, (tt, pos, cands, in_table)), out in zip(todo, outs):
                r = out["ranking"]
                rank = r.index(pos) if pos in r else None  # missing target = a miss at every k (pitfall 3)
                u = users[ui]
                records.append({"user": ui, "t": t, "rank": rank, "in_table": in_table,
                                "d": None if u.drift_t is None else t - u.drift_t})
        batch = [(states[ui], u.events[t]) for ui, u in enumerate(users) if t < u.n_ingest]
        if batch:
            arm.ingest(batch)
    return {"records": records, "states": states}


def drift_window(args) -> int:
    """d_max: the last drift offset d = t - t* that every drifting user is evaluated at (the latest
    t* is DRIFT_T[1]; evaluations run to t = history_len). 15 for the default toy."""
    return args.history_len - DRIFT_T[1]


def cell_metrics(records: list, n_users: int, roles: dict, states: list, arm=None, d_max: int = 15) -> dict:
    tab = [r["rank"] for r in records if r["in_table"]]
    drift = [(r["d"], 1.0 if r["rank"] == 0 else 0.0) for r in records if r["d"] is not None]
    rec = recovery_time([d for d, _ in drift], [h for _, h in drift], d_max=d_max) if drift else float("nan")
    mem_calls = sum(roles[r].stats["calls"] for r in ("planner", "extractor", "synthesiser"))
    pre = [h for d, h in drift if -10 <= d <= -1]
    post = [h for d, h in drift if 0 <= d <= d_max]
    out = {"hr1": hit_rate_at_k(tab, 1), "hr3": hit_rate_at_k(tab, 3), "ndcg10": ndcg_at_k(tab, 10),
           "all_hr1": hit_rate_at_k([r["rank"] for r in records], 1),  # every evaluation: --tune's objective
           "recovery": rec, "pre_drift_hr1": float(np.mean(pre)) if pre else float("nan"),
           "post_drift_hr1": float(np.mean(post)) if post else float("nan"), "mem_calls": mem_calls / n_users, "ranker_calls": roles["ranker"].stats["calls"] / n_users,
           "malformed": sum(r.stats["malformed"] for r in roles.values()),
           "tokens": sum(r.stats["prompt_tokens"] + r.stats["completion_tokens"] for r in roles.values()),
           "n_chunks": float(np.mean([len(getattr(s, "chunks", None) or getattr(s, "facts", {})) for s in states]))}
    for r in ROLES:
        out[f"calls_{r}"] = roles[r].stats["calls"] / n_users
        if isinstance(roles[r], LLMRole):  # raw counts (summed over cells in the table): every reply judged
            st = roles[r].stats
            out[f"llm_calls_{r}"] = st["calls"]          # role calls (each ends valid or in the fallback)
            out[f"llm_requests_{r}"] = st["requests"]    # model replies, re-asks included
            out[f"llm_invalid_{r}"] = st["retries"] + st["malformed"]  # invalid replies: re-asked, or the last
            out[f"llm_fallbacks_{r}"] = st["malformed"]  # calls that ended in the documented fallback
    counts = getattr(arm, "counts", None)
    if counts:  # how often the schedule ran each operation (per user), and the planner's skip rate
        out["skip_rate"] = counts["skips"] / max(1, counts["checks"])
        out.update({k: v / n_users for k, v in counts.items() if k.startswith(("op_", "plan_", "n_"))})
    return out


def curve(records: list, key: str = "t") -> dict:
    by = {}
    for r in records:
        if r[key] is not None:
            by.setdefault(r[key], []).append(1.0 if r["rank"] == 0 else 0.0)
    return {int(k): float(np.mean(v)) for k, v in sorted(by.items())}


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample std (ddof 1) over seeds, NaN-free; DEVIATION(4): std, not a 95 % CI."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def fmt(ms, digits=3):
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _finite(x):
    """NaN -> None so summary.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def reply_health(cells: dict, keys=None) -> dict:
    """Per LLM role, summed over the given cells: calls, requests, invalid replies, fallbacks and the
    rates invalid / requests and fallbacks / calls (a fallback = still invalid after the re-asks:
    planner -> fixed schedule, extractor -> no change, synthesiser -> old profile, ranker -> a miss).
    Empty when every role was a rule-based reference."""
    out = {}
    for r in ROLES:
        tot = {k: sum(cells[c].get(f"llm_{k}_{r}", 0) for c in (keys or cells)) for k in ("calls", "requests", "invalid",
                                                                                      "fallbacks")}
        if any(f"llm_calls_{r}" in cells[c] for c in (keys or cells)):
            tot["invalid_rate"] = tot["invalid"] / tot["requests"] if tot["requests"] else float("nan")
            tot["fallback_rate"] = tot["fallbacks"] / tot["calls"] if tot["calls"] else float("nan")
            out[r] = tot
    return out


def health_line(health: dict) -> str:
    """'planner fallbacks 3/12 (25 %), invalid replies 5/14; ...' or a note that no LLM replied."""
    if not health:
        return "LLM replies: none (every role is a rule-based reference; 0 malformed, 0 fallbacks)"
    return "LLM replies: " + "; ".join(
        f"{r} fallbacks {h['fallbacks']}/{h['calls']} ({100 * h['fallback_rate']:.0f} %), invalid replies "
        f"{h['invalid']}/{h['requests']} ({100 * h['invalid_rate']:.0f} %)" if h["calls"] else f"{r} not called"
        for r, h in health.items())


def per_seed_verdict(cells: dict, w: str, arms: list, seeds: list) -> str:
    """One line: mars_planner (else mars_fixed) minus the strongest baseline (highest mean HR@1 in this
    world) and minus recency, HR@1 per seed."""
    mars = next((a for a in ("mars_planner", "mars_fixed") if a in arms), None)
    base = [a for a in arms if not a.startswith("mars")]
    if mars is None or not base:
        return ""
    hr = lambda a, s: cells.get((w, s, a), {}).get("hr1", float("nan"))  # noqa: E731
    best = max(base, key=lambda a: mean_std([hr(a, s) for s in seeds])[0])
    parts = []
    for b in dict.fromkeys([best, "recency"] if "recency" in base else [best]):
        d = [hr(mars, s) - hr(b, s) for s in seeds]
        wins = sum(x > 0 for x in d)
        parts.append(f"{mars} − {b}{' (strongest baseline)' if b == best else ''}: "
                     + " / ".join(f"{x:+.3f}" for x in d) + f" (seeds {','.join(map(str, seeds))}; {wins} of "
                     f"{len(d)} > 0)")
    return "HR@1 per seed: " + "; ".join(parts)


def write_table(path: str, cells: dict, worlds: list, arms: list, seeds: list, minutes: float, command: str,
                d_max: int = 15, tuning: dict | None = None) -> str:
    # DEVIATION(4): mean ± std over seeds (the project's standard), not the spec's 95 % CI.
    rec = (f"recovery = events after drift until HR@1 is back to 90 % of its pre-drift level ({d_max + 1} = not "
           f"within {d_max} events); drifters' HR@1 before / after = mean HR@1 of drifting users at d = t - t* in "
           f"[-10, -1] / [0, {d_max}]" if d_max >= 4 else "recovery: n/a (history too short after the drift)")
    lines = ["# MARS toy comparison\n", f"`{command}` — seeds {','.join(map(str, seeds))}, {minutes:.1f} min, "
             f"mean ± std over seeds; HR/NDCG at t in the table eval points; {rec}; memory calls per user = "
             f"planner + extractor (incl. merge judge) + synthesiser; checks skipped = share of planner checks with no "
             f"operation; reinforce / weaken / forgotten = Eq. (3) steps, Eq. (4) steps and chunks forgotten per user "
             f"(executed, not planned); LLM fallbacks = role calls that ended in the fallback / all LLM role calls "
             f"(refs = rule-based references, no LLM).\n"]
    if tuning:
        lines.append("Constants: every arm tuned with --tune (8 configurations each on the validation seeds; the "
                     "chosen ones are in the column 'tuned').\n")
    for w in worlds:
        tuned_col = " tuned |" if tuning else ""
        lines += [f"\n## world: {w}\n", "| arm | HR@1 | HR@3 | NDCG@10 | recovery (events) | "
                  "drifters' HR@1 before / after drift | memory calls / user | checks skipped | "
                  "reinforce / weaken / forgotten per user | LLM fallbacks |" + tuned_col,
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if tuning else "")]
        for a in arms:
            keys = [k for k in cells if k[0] == w and k[2] == a]
            if not keys:
                continue
            rows = [cells[k] for k in keys]
            g = lambda key: mean_std([r.get(key, float("nan")) for r in rows])  # noqa: E731
            ops = "" if not a.startswith("mars") else " / ".join(f"{g(k)[0]:.1f}" for k in ("op_reinforce", "op_weaken",
                                                                                            "n_forgotten"))
            h = reply_health(cells, keys)
            fb = "refs" if not h else (f"{sum(x['fallbacks'] for x in h.values())}/{sum(x['calls'] for x in h.values())}")
            tcol = ""
            if tuning:
                t = tuning.get(json.dumps([w, a]))
                tcol = " " + (", ".join(f"{k} {v}" for k, v in t["configs"][t["best"]].items()) if t else "") + " |"
            lines.append(f"| {a} | {fmt(g('hr1'))} | {fmt(g('hr3'))} | {fmt(g('ndcg10'))} | {fmt(g('recovery'), 1)} | "
                         f"{fmt(g('pre_drift_hr1'))} / {fmt(g('post_drift_hr1'))} | {fmt(g('mem_calls'), 1)} | "
                         f"{fmt(g('skip_rate'), 2)} | {ops} | {fb} |{tcol}")
        verdict = per_seed_verdict(cells, w, arms, seeds)
        if verdict:
            lines.append(f"\n{verdict}")
        wk = [k for k in cells if k[0] == w]
        lines.append(f"\n{health_line(reply_health(cells, wk))}")
    if tuning:
        lines += ["\n## sensitivity (validation seeds: HR@1 over all evaluations, one value per configuration)\n",
                  "| world | arm | default constants | worst | best | chosen configuration |", "|---|---|---|---|---|---|"]
        for key, t in tuning.items():
            w, a = json.loads(key)
            sc = t["scores"]
            lines.append(f"| {w} | {a} | {sc[0]:.3f} | {min(sc):.3f} | {max(sc):.3f} | "
                         f"{', '.join(f'{k} {v}' for k, v in t['configs'][t['best']].items())} |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def smoothed_recovery(curves: dict, dw: str, seeds: list, arm: str, window: int = 5, lo: int = -10, hi: int = 15):
    """The recovery panel's points: per seed, HR@1 of drifting users at d, averaged over a centred
    `window` of d values (each raw point has ~50 users, noise about +/-0.07); then mean and std over
    seeds. Returns (d list, means, stds)."""
    per_seed = []
    for s in seeds:
        c = {int(k): v for k, v in curves.get((dw, s, arm), {}).items()}
        if c:
            per_seed.append({d: np.mean([c[x] for x in range(d - window // 2, d + window // 2 + 1) if x in c])
                             for d in range(lo, hi + 1) if any(x in c for x in range(d - window // 2, d + window // 2 + 1))})
    if not per_seed:
        return [], [], []
    ds = sorted(set.intersection(*[set(p) for p in per_seed]))
    ms = [float(np.mean([p[d] for p in per_seed])) for d in ds]
    sd = [float(np.std([p[d] for p in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0 for d in ds]
    return ds, ms, sd


def plot(path: str, cells: dict, curves: dict, worlds: list, arms: list, seeds: list, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(21, 5.2), gridspec_kw={"width_ratios": [1.6, 1.2, 1, 1]})
    width = 0.8 / max(1, len(arms))
    for j, a in enumerate(arms):
        ms = [mean_std([cells[k]["hr1"] for k in cells if k[0] == w and k[2] == a]) for w in worlds]
        ax[0].bar(np.arange(len(worlds)) + j * width, [m for m, _ in ms], width, yerr=[s for _, s in ms], label=a,
                  capsize=2)
    ax[0].set_xticks(np.arange(len(worlds)) + 0.4 - width / 2)
    ax[0].set_xticklabels([w.replace("_", "\n") for w in worlds], fontsize=8)
    ax[0].set_ylabel("HR@1 (mean ± std over seeds)")
    ax[0].set_title("HR@1 by world")
    # the legend below the axes: inside, it covered the bars
    ax[0].legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    dw = next((w for w in worlds if w.startswith("drift")), None)
    for a in arms:
        ds, ms, sd = smoothed_recovery(curves, dw, seeds, a) if dw else ([], [], [])
        if ds:
            line, = ax[1].plot(ds, ms, label=a)
            ax[1].fill_between(ds, np.array(ms) - np.array(sd), np.array(ms) + np.array(sd), color=line.get_color(),
                               alpha=0.12)
    ax[1].axvline(0, color="k", lw=0.8, ls="--")
    ax[1].set_xlabel("events since drift d = t - t* (5-point centred mean)")
    ax[1].set_ylabel("HR@1 of drifting users (mean ± std over seeds)")
    ax[1].set_title(f"recovery after drift ({dw})" if dw else "no drift world in this run")
    if ax[1].get_legend_handles_labels()[0]:
        ax[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    w0 = worlds[0]
    calls = [mean_std([cells[k]["mem_calls"] for k in cells if k[0] == w0 and k[2] == a]) for a in arms]
    ax[2].bar(range(len(arms)), [m for m, _ in calls], yerr=[s for _, s in calls], capsize=2)
    ax[2].set_xticks(range(len(arms)))
    ax[2].set_xticklabels(arms, rotation=30, fontsize=8)
    ax[2].set_ylabel("memory role calls per user")
    ax[2].set_title(f"cost ({w0})")
    health = reply_health(cells)
    if health:
        rs = list(health)
        x = np.arange(len(rs))
        ax[3].bar(x - 0.2, [health[r]["invalid_rate"] for r in rs], 0.4, label="invalid replies / requests")
        ax[3].bar(x + 0.2, [health[r]["fallback_rate"] for r in rs], 0.4, label="fallbacks / calls")
        for i, r in enumerate(rs):
            ax[3].text(i + 0.2, health[r]["fallback_rate"] + 0.02, f"{health[r]['fallbacks']}/{health[r]['calls']}",
                       ha="center", fontsize=7)
        ax[3].set_xticks(x)
        ax[3].set_xticklabels(rs, fontsize=8)
        ax[3].set_ylim(0, 1.1)
        ax[3].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax[3].text(0.5, 0.5, "every role is a rule-based reference:\nno LLM replies, 0 malformed, 0 fallbacks",
                   ha="center", va="center", fontsize=9, transform=ax[3].transAxes)
        ax[3].set_xticks([])
    ax[3].set_title("LLM replies per role (all cells)")
    for x_ in ax[:3]:
        x_.grid(alpha=0.3)
    fig.suptitle(f"mars | {model} | seed {','.join(map(str, seeds))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ---- tuning: every arm's free constants, the same procedure and budget ----
# ---------------------------------------------------------------------------------------------

_MARS_GRID = {"recent_weight": (0.5, 2.0), "s0": (0.3, 0.5), "eta_down": (0.35, 0.6)}
# arm -> constant -> values; the first value of each is the default, so configuration 0 is the default run.
# Every arm gets 8 configurations: the memory arms the ranker's recent_weight (0.5, 2.0) x two constants of
# their memory; recency, which has no memory, its two ranker constants (4 x 2). The ranker's instruction bonus
# relative to the recent term (bonus / recent_weight 1 or 0.25) is reachable by every arm.
TUNE_GRID = {
    "recency": {"recent_weight": (0.5, 0.25, 1.0, 2.0), "instruction_bonus": (0.5, 1.0)},
    "flat": {"recent_weight": (0.5, 2.0), "baseline_strength": (1.0, 0.3), "profile_max_chunks": (12, 6)},
    "mem0": {"recent_weight": (0.5, 2.0), "baseline_strength": (1.0, 0.3), "mem0_every": (3, 1)},
    "memorybank": {"recent_weight": (0.5, 2.0), "baseline_strength": (1.0, 0.3), "mb_time_scale": (5.0, 20.0)},
    "mars_fixed": _MARS_GRID,
    "mars_planner": _MARS_GRID,
}


def tune_configs(arm: str) -> list:
    """TUNE_GRID[arm] as a list of {flag: value}; the default configuration first."""
    g = TUNE_GRID[arm]
    return [dict(zip(g, vals)) for vals in itertools.product(*g.values())]


def with_constants(args, cfg: dict):
    """A copy of args with an arm's constants replaced (memory and ranker flags only: the world and
    its candidates do not change)."""
    out = argparse.Namespace(**vars(args))
    for k, v in cfg.items():
        setattr(out, k, type(getattr(args, k))(v))
    return out


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------


def run_cell(args, world: World, llm, w: str, s: int, a: str, keep_memories: bool) -> dict:
    """One (world, seed, arm) cell: fresh roles and memory, the lockstep rollout, its metrics, the
    HR@1 curve, per-role statistics and (optionally) the first users' final memories. A local LLM is
    reseeded per cell, so a cell's result does not depend on the cells run before it (resume)."""
    if hasattr(llm, "reseed"):  # common.LLM (a stub with .chat and .usage needs none)
        llm.reseed(1_000 * s + 10 * (WORLDS + ("real",)).index(w) + ARMS.index(a))
    roles = make_roles(args, world, llm)
    arm = make_arm(a, args, world, roles, s)
    res = run_arm(arm, world, roles)
    m = cell_metrics(res["records"], len(world.users), roles, res["states"], arm, drift_window(args))
    m["tagger_acc"] = world.tagger_acc
    m["warmup_hr1"] = hit_rate_at_k([r["rank"] for r in res["records"] if not r["in_table"]], 1)
    cell = {"metrics": m, "curve": curve(res["records"], "d" if w.startswith("drift") else "t"),
            "roles": {r: dict(roles[r].stats) for r in ROLES}}
    if keep_memories:
        cell["memories"] = {world.users[i].uid: res["states"][i].to_json() for i in range(min(3, len(world.users)))}
    return cell


def run_command(args) -> str:
    """The command line of this run as a user reruns it (without --resume / --overwrite)."""
    argv = [x for x in args.argv if x not in ("--resume", "--overwrite", "--no-overwrite")]
    return " ".join(["python mars.py"] + [shlex.quote(x) for x in argv])


def write_outputs(args, worlds, state: dict, llm, minutes: float) -> dict:
    """table.md, mars.png, memories.json and summary.json from the finished cells."""
    out_dir, cells = args.output_dir, {k: c["metrics"] for k, c in state["cells"].items()}
    curves = {k: c["curve"] for k, c in state["cells"].items()}
    model_name = "rule-based references" if llm is None else \
        f"{getattr(llm, 'name', type(llm).__name__)} ({','.join(args.llm_role_set)})"
    command = run_command(args)
    tuning = state.get("tune") or None
    table = write_table(os.path.join(out_dir, "table.md"), cells, worlds, args.arms, args.seed_list, minutes, command,
                        drift_window(args), tuning)
    print(table)
    plot(os.path.join(out_dir, "mars.png"), cells, curves, worlds, args.arms, args.seed_list, model_name)
    memories = {k[2]: c["memories"] for k, c in state["cells"].items() if "memories" in c}
    common.write_json(os.path.join(out_dir, "memories.json"), memories)
    role_stats = {f"{w}/{s}/{a}": c["roles"] for (w, s, a), c in state["cells"].items()}
    summary = {"table": {w: {a: {k: mean_std([cells[(w, s, a)].get(k, float("nan")) for s in args.seed_list if (w, s, a) in cells])
                                 for k in ("hr1", "hr3", "ndcg10", "recovery", "mem_calls", "ranker_calls", "malformed",
                                           "tokens", "n_chunks", "warmup_hr1", "skip_rate", "all_hr1",
                                           "pre_drift_hr1", "post_drift_hr1", "op_reinforce", "op_weaken",
                                           "n_forgotten", "op_synthesize", "op_extract", "op_merge", "op_forget")}
                             for a in args.arms} for w in worlds},
               "cells": {f"{w}/{s}/{a}": m for (w, s, a), m in cells.items()},
               "llm": {"backend": args.backend, "model": model_name, "roles_on_llm": list(args.llm_role_set),
                       "usage": dict(llm.usage) if llm is not None else None, "per_cell_roles": role_stats},
               "tagger_acc": {f"{w}/{s}": v for (w, s), v in state["tagger_acc"].items()},
               "reply_health": reply_health(cells), "tuning": tuning,
               "per_seed_verdict": {w: per_seed_verdict(cells, w, args.arms, args.seed_list) for w in worlds},
               "wall_time_s": minutes * 60, "minutes": minutes, "device": str(next(llm._model.parameters()).device)
               if getattr(llm, "is_local", False) else "cpu", "seed": args.seed_list, "command": command}
    totals = {r: {} for r in ROLES}
    for st in role_stats.values():
        for r in ROLES:
            for k, v in st[r].items():
                totals[r][k] = totals[r].get(k, 0) + v
    summary["llm"]["roles_total"] = totals
    common.write_json(os.path.join(out_dir, "summary.json"), _finite(summary))
    return summary


def _usage_counters(llm) -> dict:
    """The LLM's usage counters as they persist: an endpoint LLM copies its ChatClient's after each call."""
    return llm.client.usage if getattr(llm, "client", None) is not None else llm.usage


def _checkpoint(ckpt: str, state: dict, llm) -> None:
    """Everything the remaining cells and the outputs depend on: the finished cells (metrics, curve,
    role statistics, memories), the tagger accuracies, the LLM usage counters and the elapsed time.
    The worlds are rebuilt from their seeds, and each cell starts from fresh memory and roles."""
    extra = {"cells": {json.dumps(list(k)): v for k, v in state["cells"].items()}, "tune": state["tune"],
             "tagger_acc": {json.dumps(list(k)): v for k, v in state["tagger_acc"].items()},
             "usage": dict(_usage_counters(llm)) if llm is not None else None, "seconds": state["seconds"]}
    common.save_checkpoint(ckpt, step=len(state["cells"]), extra=extra)


def _restore(ckpt: str, llm) -> dict:
    st = common.load_checkpoint(ckpt)
    extra = st["extra"]
    state = {"cells": {tuple(json.loads(k)): v for k, v in extra["cells"].items()},
             "tagger_acc": {tuple(json.loads(k)): v for k, v in extra["tagger_acc"].items()},
             "seconds": extra["seconds"], "tune": extra.get("tune", {})}
    if llm is not None and extra.get("usage"):  # usage counts every process of the run
        _usage_counters(llm).update(extra["usage"])
        llm.usage.update({k: v for k, v in extra["usage"].items() if k in llm.usage})
    return state


def tune_world(args, w: str, state: dict, ckpt: str, llm) -> None:
    """--tune: for every arm of this world not yet tuned, its 8 configurations (TUNE_GRID) on the
    --tune_seeds worlds (fresh memory per cell, like the test cells), scored by HR@1 over all
    evaluations; the best (first on ties, so the default wins a tie) is kept in state["tune"] and
    checkpointed per arm."""
    todo = [a for a in args.arms if json.dumps([w, a]) not in state["tune"]]
    if not todo:
        return
    worlds = {vs: toy_world(with_constants(args, {"num_users": args.tune_users}), w, vs) for vs in args.tune_seed_list}
    for a in todo:
        cfgs, scores = tune_configs(a), []
        for cfg in cfgs:
            vals = [run_cell(with_constants(args, cfg), worlds[vs], llm, w, vs, a, False)["metrics"]["all_hr1"]
                    for vs in args.tune_seed_list]
            scores.append(float(np.mean(vals)))
        best = int(np.argmax(scores))
        state["tune"][json.dumps([w, a])] = {"configs": cfgs, "scores": scores, "best": best}
        _checkpoint(ckpt, state, llm)
        tqdm.write(f"[tune {w}] {a}: validation HR@1 {min(scores):.3f}-{max(scores):.3f}, default {scores[0]:.3f}, "
                   f"chosen " + ", ".join(f"{k} {v}" for k, v in cfgs[best].items()))


def main(args):
    validate_args(args)  # 1. every flag, nothing loaded or written
    common.set_cpu_threads()
    preflight(args)  # 2. data files, model config, endpoint: still nothing written
    ckpt = os.path.join(args.output_dir, "checkpoint")
    common.start_run(args, has_checkpoint=common.find_checkpoint(ckpt) is not None, ignore=RESUME_IGNORE)  # 3. args.json
    real = args.items_file is not None
    worlds = ["real"] if real else (list(WORLDS) if args.full_table else [args.world])
    llm = make_llm(args)
    state = _restore(ckpt, llm) if args.resume else {"cells": {}, "tagger_acc": {}, "seconds": 0.0, "tune": {}}
    t0 = time.time() - state["seconds"]
    grid = [(w, s, a) for w in worlds for s in args.seed_list for a in args.arms]
    bar = tqdm(total=len(grid), initial=len(state["cells"]), desc="mars cells", dynamic_ncols=True)
    # rows logged after the checkpoint (a killed run's last cell) are cut
    log = common.MetricLogger(args.output_dir, pbar=None, resume_step=len(state["cells"]) - 1 if args.resume else None)
    for w in worlds:
        if args.tune:
            tune_world(args, w, state, ckpt, llm)
        for s in args.seed_list:
            todo = [a for a in args.arms if (w, s, a) not in state["cells"]]
            if not todo:
                continue
            common.seed_everything(s)
            world = read_real_world(args, s) if real else toy_world(args, w, s)
            state["tagger_acc"][(w, s)] = world.tagger_acc
            for a in todo:
                t = state["tune"].get(json.dumps([w, a]))
                cell_args = with_constants(args, t["configs"][t["best"]]) if t else args
                cell = run_cell(cell_args, world, llm, w, s, a,
                                s == args.seed_list[0] and w == worlds[0] and a.startswith("mars"))
                m = cell["metrics"]
                log.log(grid.index((w, s, a)), world=w, seed=s, arm=a,
                        **{k: v for k, v in m.items() if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))})
                state["cells"][(w, s, a)] = cell
                state["seconds"] = time.time() - t0
                _checkpoint(ckpt, state, llm)
                bar.update(1)
                bar.set_postfix(world=w, seed=s, arm=a, hr1=f"{m['hr1']:.3f}")
        tqdm.write(f"[{w}] " + "  ".join(f"{a}: HR@1 {fmt(mean_std([state['cells'][(w, s, a)]['metrics']['hr1'] for s in args.seed_list]))}"
                                         for a in args.arms))
    bar.close()
    minutes = (time.time() - t0) / 60
    summary = write_outputs(args, worlds, state, llm, minutes)
    tqdm.write(health_line(summary["reply_health"]))
    tqdm.write(f"wrote {args.output_dir}/summary.json, table.md, mars.png ({minutes:.1f} min)")
    return summary


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_args())
