"""TRL's GKDTrainer as purely on-policy reverse-KL distillation, timed the way `omniopd.py --bench` times
its opd step: the same model pair, prompts (omniopd's batch of each step, in its chat template), batch
and new tokens; prints each step's seconds and phases and the median over steps 2..n.

Not a test and not a dependency of the project: run it in a separate environment that has TRL, e.g.

    python -m venv --system-site-packages ~/trl-venv && ~/trl-venv/bin/pip install trl   # TRL 1.16 here
    ~/trl-venv/bin/python tests/trl_gkd_bench.py --model $SM --steps 5 [--no-gradient_checkpointing] [--bf16]

GKD with lmbda 1 (every batch is the student's own samples) and beta 1 (the generalized JSD at beta 1
is the reverse KL) is the on-policy distillation objective omniopd's `--method opd` optimises: TRL
computes the full-vocabulary reverse KL per token, omniopd its sampled-token estimate (the same
gradient in expectation; see the README's performance section).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import omniopd as O  # noqa: E402

PHASES = ("generate", "teacher", "forward_backward", "optimizer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="student and teacher (HF folder or id), as omniopd's --model_name_or_path")
    p.add_argument("--teacher", default=None, help="teacher (default: --model)")
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (omniopd's --per_device_batch_size)")
    p.add_argument("--max_new_tokens", type=int, default=48, help="response tokens per rollout")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps; the median is over steps 2..n")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="TRL's default is on (its generation then runs without a KV cache)")
    p.add_argument("--bf16", action="store_true", help="TrainingArguments bf16 (autocast) on CPU")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    C.set_cpu_threads()
    model, tok = C.load_lm(args.model)
    teacher, _ = C.load_lm(args.teacher or args.model)
    train = C.toy_dataset("train", 4096, seed=args.seed, domains=("add",))  # omniopd's default training set
    probs = [p for step in range(args.steps) for p in O.batch_problems(train, step, args.batch, args.seed)]
    data = Dataset.from_list([{"messages": [{"role": "user", "content": p.prompt},
                                            {"role": "assistant", "content": str(p.answer)}]} for p in probs])
    cfg = GKDConfig(output_dir=os.path.join("/tmp", f"trl_gkd_bench_{os.getpid()}"), per_device_train_batch_size=args.batch,
                    max_steps=args.steps, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens,
                    learning_rate=3e-4, gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
                    use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6, seed=args.seed,
                    dataloader_num_workers=0)
    times: list[dict] = []
    clock = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[name] = clock.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            clock.clear()
            clock["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, *a, **kw):
            clock["t_opt"] = time.perf_counter()

        def on_optimizer_step(self, *a, **kw):
            clock["optimizer"] = time.perf_counter() - clock["t_opt"]

        def on_step_end(self, *a, **kw):
            total = time.perf_counter() - clock["t0"]
            row = {k: clock.get(k, 0.0) for k in ("generate", "teacher", "optimizer")}
            row["forward_backward"] = total - sum(row.values())
            row["step"] = total
            times.append(row)
            print(f"step {len(times)}: {total:.3f} s  " + "  ".join(f"{k} {row[k]:.3f}" for k in PHASES), flush=True)

    class Trainer(GKDTrainer):
        def _get_train_sampler(self, *a, **kw):  # omniopd's batches, in order
            return SequentialSampler(self.train_dataset)

    trainer = Trainer(model=model, teacher_model=teacher, args=cfg, train_dataset=data, processing_class=tok,
                      callbacks=[Steps()])
    trainer.generate_on_policy_outputs = timed("generate", trainer.generate_on_policy_outputs)
    trainer.teacher_model.forward = timed("teacher", trainer.teacher_model.forward)
    trainer.train()
    med = {k: round(statistics.median(r[k] for r in times[1:]), 4) for k in (*PHASES, "step")}
    label = (f"trl gkd ({'checkpointing on' if args.gradient_checkpointing else 'checkpointing off'}, "
             f"{'bf16' if args.bf16 else 'fp32'})")
    print(f"bench {label}: median over steps 2-{args.steps}: {med['step']:.3f} s/step  "
          + "  ".join(f"{k} {med[k]:.3f}" for k in PHASES), flush=True)
    import trl
    print("BENCH " + json.dumps(dict(trainer="trl-gkd", trl=trl.__version__, gradient_checkpointing=args.gradient_checkpointing,
                                     bf16=args.bf16, batch=args.batch, max_new_tokens=args.max_new_tokens,
                                     steps=args.steps, threads=torch.get_num_threads(), median_s=med,
                                     per_step_s=[round(r["step"], 4) for r in times],
                                     peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))),
          flush=True)


if __name__ == "__main__":
    main(parse_args())
