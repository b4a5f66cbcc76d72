"""omniopd's on-policy distillation step against TRL's GKDTrainer, side by side, in one alternating run.

Runs each configuration as its own process (one torch thread: OMP_NUM_THREADS=1), alternating omniopd and
TRL so that a change in the machine's load hits both, for --rounds rounds; prints a markdown table of the
median seconds per step (over steps 2..n of each run; the spread over rounds in brackets) and where it
goes, and writes every run's BENCH line to --out. Not a test: TRL lives in another environment
(tests/trl_gkd_bench.py says how to make one), passed as --trl_python.

    python tests/bench_opd_vs_trl.py --model $SM --trl_python ~/trl-venv/bin/python --rounds 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (label, which, flags): omniopd.py --bench or tests/trl_gkd_bench.py
CONFIGS = [
    ("omniopd opd, defaults (activation checkpointing on, fp32)", "omniopd", ["--method", "opd"]),
    ("TRL GKD, defaults (checkpointing on: generation without KV cache, fp32)", "trl", []),
    ("omniopd opd, --no-gradient_checkpointing, fp32", "omniopd", ["--method", "opd", "--no-gradient_checkpointing"]),
    ("TRL GKD, checkpointing off, fp32", "trl", ["--no-gradient_checkpointing"]),
    ("omniopd opd, --no-gradient_checkpointing --autocast bf16", "omniopd",
     ["--method", "opd", "--no-gradient_checkpointing", "--autocast", "bf16"]),
    ("TRL GKD, checkpointing off, bf16", "trl", ["--no-gradient_checkpointing", "--bf16"]),
    ("omniopd omniopd (C 8, M 2, N 4), --no-gradient_checkpointing, fp32", "omniopd",
     ["--method", "omniopd", "--no-gradient_checkpointing", "--chunk_tokens", "8", "--num_chunks", "2",
      "--teacher_samples", "4", "--teacher_batch_size", "32"]),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="student and teacher (HF folder), e.g. $(python tests/conftest.py)")
    p.add_argument("--trl_python", required=True, help="python of an environment with TRL installed")
    p.add_argument("--batch", type=int, default=4, help="rollouts per step")
    p.add_argument("--max_new_tokens", type=int, default=48, help="response tokens per rollout")
    p.add_argument("--steps", type=int, default=5, help="steps per run (median over steps 2..n)")
    p.add_argument("--slow_steps", type=int, default=3, help="steps of TRL at its defaults (about 4x slower)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (the fast configurations; TRL defaults once)")
    p.add_argument("--out", default="runs/bench_opd_vs_trl.jsonl", help="every run's BENCH line")
    return p.parse_args(argv)


def command(args, which: str, flags: list, steps: int) -> list:
    if which == "omniopd":
        return [sys.executable, os.path.join(ROOT, "omniopd.py"), "--bench", "--model_name_or_path", args.model, "--teacher",
                args.model, "--per_device_batch_size", str(args.batch), "--max_new_tokens", str(args.max_new_tokens),
                "--max_steps", str(steps), *flags]
    return [args.trl_python, os.path.join(HERE, "trl_gkd_bench.py"), "--model", args.model, "--batch", str(args.batch),
            "--max_new_tokens", str(args.max_new_tokens), "--steps", str(steps), *flags]


def run_one(args, label: str, which: str, flags: list, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    t = time.time()
    p = subprocess.run(command(args, which, flags, steps), env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH ")]
    if p.returncode != 0 or not lines:
        print(f"error: '{label}' failed (exit {p.returncode}):\n{p.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    row = dict(json.loads(lines[-1][6:]), label=label, wall_s=round(time.time() - t, 1))
    print(f"{label}: {row['median_s']['step']:.2f} s/step ({row['wall_s']:.0f} s)", flush=True)
    return row


def table(rows: list) -> str:
    out = ["| configuration | s / step | generate | teacher | forward + backward | optimizer | runs |",
           "|---|---|---|---|---|---|---|"]
    for label, _, _ in CONFIGS:
        rs = [r for r in rows if r["label"] == label]
        if not rs:
            continue
        med = lambda k: statistics.median(r["median_s"][k] for r in rs)  # noqa: E731
        steps = [r["median_s"]["step"] for r in rs]
        fb = statistics.median(r["median_s"].get("forward_backward", r["median_s"].get("forward", 0)
                                                 + r["median_s"].get("backward", 0)) for r in rs)
        spread = f" [{min(steps):.2f}-{max(steps):.2f}]" if len(rs) > 1 else ""
        out.append(f"| {label} | {med('step'):.2f}{spread} | {med('generate'):.2f} | {med('teacher'):.2f} | {fb:.2f} | "
                   f"{med('optimizer'):.2f} | {len(rs)} |")
    return "\n".join(out)


def main(args):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = []
    for rnd in range(args.rounds):
        order = CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]
        for label, which, flags in order:
            slow = which == "trl" and "--no-gradient_checkpointing" not in flags
            if slow and rnd > 0:
                continue
            row = run_one(args, label, which, flags, args.slow_steps if slow else args.steps)
            if row is None:
                continue
            rows.append(dict(row, round=rnd))
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main(parse_args())
