"""Tests of sandmle.py: the rank rule, tiers, rewards, GRPO advantages / clipping on hand values; the sandbox
against adversarial scripts (real subprocesses, short limits); the generator, the gate and the description; the DSL;
the ReAct format through a stub endpoint; one trajectory-GRPO update against a plain loop reference; episode
bookkeeping by hand; arm-defining flags; bad input; slow: smoke subprocess, kill -9 + --resume, multi-seed table,
torchrun with 2 CPU processes, the fresh-interpreter sandbox, the real SmolLM2 checkpoint (ReAct).

One-line breaks of sandmle.py each of which was made and watched to fail (test that catches it):
- biased std in advantages: test_grpo_advantages_hand_values_and_masking
- masked episodes in group statistics: test_grpo_advantages_hand_values_and_masking
- token mean over the batch instead of per sequence: test_grpo_loss_is_a_mean_over_sequences_of_token_means,
  test_one_grpo_update_matches_a_plain_loop_reference
- clip_high replaced by clip_low: test_grpo_loss_clipping_hand_values
- first scored submission instead of the last: test_rewards_hand_values
- above-median not strict: test_thresholds_and_tiers_inclusive_medals_strict_median
- silver rank 0.25 N: test_medal_ranks_hand_values
- masked episodes trained on: test_one_grpo_update_matches_a_plain_loop_reference
- response mask one token too long: test_one_grpo_update_matches_a_plain_loop_reference
- answers in test.csv: test_public_files_hold_no_answers_and_description_no_rule
- no kill of leftover processes: test_fork_bomb_is_killed_with_every_child
- no RLIMIT_AS in the zygote: test_memory_bomb_and_huge_write_fail_within_limits
- no RLIMIT_FSIZE in the zygote: test_memory_bomb_and_huge_write_fail_within_limits
- timeouts not masked: test_timed_out_episode_is_masked_not_zero
- in-flight duplicates executed again: test_rollout_bookkeeping_by_hand
- submission written with 2 digits: test_sandboxed_program_scores_like_the_in_process_leaderboard
- NaN submission accepted: test_submission_checks_rows_ids_nan
- two tool calls accepted: test_react_turns_through_a_stub_endpoint
- gate not strict: test_gate_rejects_a_non_monotone_ladder_and_a_median_below_the_constant
- leaderboard keeps duplicate submissions: test_world_has_a_fixed_vs_oracle_gap_and_thresholds_use_distinct_submissions
- sparse arm with the dense reward: test_arm_defining_flags_change_the_result
- --reward ignored: test_arm_defining_flags_change_the_result
- seed SFT skipped: test_arm_defining_flags_change_the_result
- full_scale on micro tasks: test_arm_defining_flags_change_the_result
- --num_generations 1 accepted: test_validate_args_refuses_bad_flags
- truncation keeps error turns: test_react_prompt_truncation_drops_error_turns_first
- writer leak check off: test_strategist_and_writer_json_are_checked
- generator LLM failures not counted: test_llm_generator_checks_json_retries_and_counts_failures
- lin and poly buckets swapped: test_data_check_buckets_tell_linear_from_interaction
(each made with /tmp-copied sources and the test run with -x; all 29 failed as listed)
"""
import json
import math
import os
import random
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import sandmle as S  # noqa: E402

torch.set_num_threads(1)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ---- math: rank rule, tiers, rewards, advantages, clipping ----------------------------------------------------


@pytest.mark.parametrize("n,want", [(5, (1, 1, 2)), (50, (5, 10, 20)), (150, (10, 30, 60)), (500, (11, 50, 100)),
                                    (2000, (14, 100, 200))])
def test_medal_ranks_hand_values(n, want):
    assert S.medal_ranks(n) == want


def test_thresholds_and_tiers_inclusive_medals_strict_median():
    lb = [float(x) for x in range(1, 11)]  # N = 10: ranks (1, 2, 4)
    th = S.thresholds_from_leaderboard(lb, lower_is_better=True)
    assert th == {"gold": 1.0, "silver": 2.0, "bronze": 4.0, "median": 5.5}
    th_hi = S.thresholds_from_leaderboard(lb, lower_is_better=False)
    assert th_hi == {"gold": 10.0, "silver": 9.0, "bronze": 7.0, "median": 5.5}
    assert S.medal_tier(1.0, th, True) == "gold" and S.medal_tier(10.0, th_hi, False) == "gold"  # equal = gold
    assert S.medal_tier(1.5, th, True) == "silver" and S.medal_tier(4.0, th, True) == "bronze"
    assert S.medal_tier(5.5, th, True) == "valid" and S.medal_tier(5.5, th_hi, False) == "valid"  # = median: not above
    assert S.medal_tier(5.4, th, True) == "above_median" and S.medal_tier(5.6, th_hi, False) == "above_median"
    assert S.medal_tier(None, th, True) is None
    assert S.position_score(1.0, lb, True) == 1.0 and S.position_score(10.5, lb, True) == 0.0
    assert S.position_score(3.0, lb, True) == pytest.approx(0.8)  # 2 better -> pos 3 -> (10 - 3 + 1) / 10


def test_rewards_hand_values():
    R = S.trajectory_reward
    want = {"dense_code": [1.0, 0.9, 0.8, 0.4, 0.3, 0.1], "dense_paper": [1.0, 0.9, 0.7, 0.5, 0.4, 0.1]}
    tiers = [["gold"], ["silver"], ["bronze"], ["above_median"], ["valid"], []]
    for kind, vals in want.items():
        assert [R(kind, t, 1.0) for t in tiers] == pytest.approx(vals)
    assert R("sparse", ["gold"], 1.0) == pytest.approx(1.0) and R("sparse", ["silver"], 1.0) == pytest.approx(0.1)
    assert R("dense_code", ["gold"], 0.5) == pytest.approx(0.95)
    assert R("dense_code", ["gold", "valid"], 1.0) == pytest.approx(0.3)  # the LAST scored submission counts
    assert R("dense_code", ["gold", None], 1.0) == pytest.approx(1.0)  # an unscored later file changes nothing


def test_grpo_advantages_hand_values_and_masking():
    torch.testing.assert_close(S.grpo_advantages([1, 0, 0, 0], 4), torch.tensor([1.5, -0.5, -0.5, -0.5]),
                               atol=1e-5, rtol=0)
    assert S.grpo_advantages([0.3] * 4, 4).abs().max() < 1e-6
    # the masked 4th episode (reward 5) enters neither mean nor std and gets A = 0
    a = S.grpo_advantages([1, 0, 0, 5], 4, live=[1, 1, 1, 0])
    s = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    torch.testing.assert_close(a, torch.tensor([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0.0]), atol=1e-4, rtol=0)
    assert S.grpo_advantages([1, 0, 3, 4], 2, live=[1, 0, 1, 1])[:2].abs().max() == 0  # 1 live in the group -> 0


@pytest.mark.parametrize("adv,rho,want,grad_zero", [(1.0, 1.5, -1.28, True), (-1.0, 0.5, 0.8, True),
                                                    (-1.0, 1.5, 1.5, False)])
def test_grpo_loss_clipping_hand_values(adv, rho, want, grad_zero):
    logp = torch.tensor([[math.log(rho)]], requires_grad=True)
    loss, _ = S.grpo_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert (logp.grad.abs().item() == 0) == grad_zero


def test_grpo_loss_is_a_mean_over_sequences_of_token_means():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    loss, _ = S.grpo_loss(logp, logp, torch.tensor([2.0, 1.0]), mask)
    assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2)  # each sequence weighs the same, whatever its length


# ---- world: generator, gate, description, DSL ---------------------------------------------------------------


def _task(rule="linear", nuisance="none", n=60, d=6, metric="rmse", seed=3):
    tt = "reg" if metric in ("rmse", "mae") else "bin"
    task, stage, _ = S.build_task("t", S.DNA(tt, metric, n, d, rule, nuisance, "retail"), seed, 1000, check_gate=False)
    assert task is not None, stage
    return task


def test_generator_is_deterministic_and_counts_yield_per_stage():
    seeds = S.seed_dnas(2, 0, (60, 80))
    a = S.generate_tasks("train", 3, 0, (50, 60), S.SEED_DOMAINS, seeds)
    b = S.generate_tasks("train", 3, 0, (50, 60), S.SEED_DOMAINS, seeds)
    assert [t.public for t in a.tasks] == [t.public for t in b.tasks] and len(a.tasks) == 3
    c = a.yield_counts
    assert c["proposed"] >= c["strategist"] >= c["developer"] >= c["mlops"] >= c["gate"] == c["writer"] == 3
    assert [t.dna.task_type for t in a.tasks] == [seeds[k % 2].task_type for k in range(3)] or c["gate"] < c["mlops"]


def test_public_files_hold_no_answers_and_description_no_rule():
    seeds = S.seed_dnas(2, 0, (60, 80))
    ts = S.generate_tasks("train", 4, 1, (50, 60), S.SEED_DOMAINS, seeds)
    for t in ts.tasks:
        assert sorted(t.public) == ["description.md", "sample_submission.csv", "test.csv", "train.csv"]
        assert len({ln.split(b",")[1] for ln in t.public["sample_submission.csv"].splitlines()[1:]}) == 1  # constant
        desc = t.public["description.md"].decode().lower()
        assert not any(w in desc for w in S.LEAK_WORDS) and t.dna.metric in desc
        test_head = t.public["test.csv"].split(b"\n", 1)[0].decode()
        assert "target" not in test_head and t.public["train.csv"].split(b"\n", 1)[0].decode().endswith(",target")
        assert not any(w in (test_head + t.obs) for w in S.RULES)


def test_gate_rejects_a_non_monotone_ladder_and_a_median_below_the_constant():
    ok = {"gold": 1.0, "silver": 2.0, "bronze": 3.0, "median": 4.0}
    assert S.gate(ok, True, const_score=5.0) is None
    assert S.gate({**ok, "silver": 1.0}, True, 5.0) == "ladder not strictly monotone"  # gold == silver
    assert S.gate({**ok, "bronze": 4.5}, True, 5.0) == "ladder not strictly monotone"
    assert S.gate(ok, True, const_score=3.5) == "median does not beat the sample submission"
    assert S.gate({"gold": 4.0, "silver": 3.0, "bronze": 2.0, "median": 1.0}, False, 0.5) is None


def test_strategist_and_writer_json_are_checked():
    seed = S.DNA("reg", "rmse", 100, 8, "linear", "none", "retail")
    good = json.dumps({"task_type": "reg", "metric": "rmse", "n_train": 120, "n_features": 8, "rule_family": "sine",
                       "nuisance": "missing", "domain": "energy"})
    assert S.parse_strategist(f"Sure: {good} done", seed, (50, 200)).rule_family == "sine"
    for bad in ({"metric": "mae"}, {"n_train": 5000}, {"rule_family": "cubic"}, {"n_features": "x"}):
        with pytest.raises(ValueError):
            S.parse_strategist(json.dumps({**json.loads(good), **bad}), seed, (50, 200))
    with pytest.raises(ValueError, match="leaks"):
        S.parse_writer(json.dumps({"description": "Predict y (rmse). y = sin(2.5 * x) plus noise."}), seed)
    assert "rmse" in S.parse_writer(json.dumps({"description": "Predict the target; metric rmse, lower is better."}),
                                    seed)


def test_llm_generator_checks_json_retries_and_counts_failures():
    """--generator llm through a stub endpoint: the Strategist's first reply is not JSON (retried, counted), a
    Writer reply that names the rule is rejected (retried, counted); the tasks that pass carry the LLM's text."""
    from fault_server import FaultServer

    calls = {"s": 0, "w": 0}

    def reply(route, body):
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("You design"):
            calls["s"] += 1
            seed = json.loads(prompt.split("Seed task: ")[1].split(".\n")[0])
            if calls["s"] == 1:
                return ["I think a sine rule would be nice."]
            return [json.dumps({**seed, "n_train": 60, "n_features": 6, "rule_family": "interaction",
                                "nuisance": "none", "domain": "energy"})]
        calls["w"] += 1
        if calls["w"] == 1:
            return [json.dumps({"description": "The target is 2 * a * b (an interaction); metric rmse, auc."})]
        return [json.dumps({"description": "LLM-written: predict the target of each test row. Metric: rmse / mae / "
                                           "auc / accuracy as named. Submit id,target."})]

    with FaultServer([], then="ok", reply=reply) as srv:
        llm = C.LLM.from_endpoint(srv.url, "stub", deadline=10)
        ts = S.generate_tasks("train", 2, 0, (50, 80), S.SEED_DOMAINS, S.seed_dnas(2, 0, (60, 80)), llm=llm,
                              retries=2)
    assert len(ts.tasks) == 2 and all(t.dna.rule_family == "interaction" for t in ts.tasks)
    assert ts.llm_counts["strategist_bad"] == 1 and ts.llm_counts["writer_bad"] == 1
    assert all(t.public["description.md"].startswith(b"LLM-written") for t in ts.tasks)
    assert ts.yield_counts["writer"] == 2 and ts.yield_counts["strategist"] >= 2


def test_dsl_parse_render_round_trip_and_every_element_runs_on_10_rows():
    assert len(S.PROGRAMS) == 40 and S.parse_line("  mean std poly2 knn15 \n") == ("mean", "std", "poly2", "knn15")
    assert S.parse_line("submit") == ("submit",)
    for bad in ("mean std", "mean std poly3 knn5", "print(1)", ""):
        assert S.parse_line(bad) is None
    rng = np.random.default_rng(0)
    X, y, Xt = rng.standard_normal((10, 4)), rng.standard_normal(10), rng.standard_normal((5, 4))
    X[0, 1] = np.nan
    for line in S.PROGRAMS:
        prog = S.parse_line(line)
        assert "# main.py rendered from the DSL line: " + line in S.render_script(prog)
        pred = S.run_program(prog, X, y, Xt)
        assert pred.shape == (5,)
        if prog[0] == "mean":  # imputed: every pipeline gives finite predictions
            assert np.isfinite(pred).all(), line
        elif prog[3].startswith("ridge"):  # a NaN in the train table poisons the ridge solve
            assert not np.isfinite(pred).all(), line


def test_data_check_buckets_tell_linear_from_interaction():
    """The observation's lin / poly fields: hold-out R^2 buckets of a linear and of a poly2 ridge on the train rows."""
    lin = _task("linear", "none", n=200, d=6, seed=5)
    inter = _task("interaction", "none", n=200, d=6, seed=5)
    assert "lin=3" in lin.obs or "lin=2" in lin.obs
    assert "lin=0" in inter.obs and ("poly=2" in inter.obs or "poly=3" in inter.obs)
    assert S.r2_bucket(0.1) == 0 and S.r2_bucket(0.3) == 1 and S.r2_bucket(0.6) == 2 and S.r2_bucket(0.9) == 3


def test_world_has_a_fixed_vs_oracle_gap_and_thresholds_use_distinct_submissions():
    t = _task("interaction", "none", n=120, d=6)
    distinct = {round(v, 9) for v in t.program_scores.values() if v is not None}
    assert len(t.leaderboard) == len(distinct) < 40  # impute none == mean on a table without gaps
    for line in S.PROGRAMS:  # identical files score identically
        if line.startswith("none "):
            assert t.program_scores[line] == t.program_scores["mean" + line[4:]]
    lin, inter = _task("linear", n=150, d=6, seed=1), _task("interaction", n=150, d=6, seed=1)
    g = S.fixed_vs_oracle([lin, inter])
    assert g["oracle_medal"] == 1.0 and g["best_fixed_medal"] <= 1.0
    best = lambda t: min((v, k) for k, v in t.program_scores.items() if v is not None)[1]  # noqa: E731
    assert best(lin).split()[2:] == ["raw", "ridge1"] or best(lin).endswith("raw ridge10")
    assert best(inter).split()[2] == "poly2"


# ---- sandbox: real subprocesses, short limits --------------------------------------------------------------------


@pytest.fixture(scope="module")
def task():
    return _task("linear", "none", n=60, d=6)


@pytest.fixture(scope="module")
def sandbox():
    sb = S.Sandbox(timeout=1.0, mem_bytes=2 * 2**30, fsize_bytes=50 * 2**20, workers=2, mode="zygote")
    yield sb
    sb.close()


def _session_alive(pid: int) -> list:
    return S._session_pids(pid, "SANDMLE_RUN=never-set")


WALKER = r"""
import os, sys, tempfile
needles = [n[::-1] for n in [NEEDLES]]  # reversed in this file, so main.py itself does not hold them
roots = [os.getcwd(), tempfile.gettempdir(), ROOTDIR]
p = os.getcwd()
while p != os.path.dirname(p):
    p = os.path.dirname(p)
    roots.append(p)
seen, hits = 0, set()
blob = "\n".join(f"{k}={v}" for k, v in os.environ.items())
for n in needles:
    if n in blob:
        hits.add(n)
for r in roots:
    deep = r != os.path.dirname(r) and not r in ("/", "/usr", "/proc", "/sys")
    for dp, dn, fn in os.walk(r):
        if not deep or dp.count(os.sep) - r.count(os.sep) > 3 or "/.git" in dp or "/proc" in dp:
            dn[:] = []
        for f in fn:
            path = os.path.join(dp, f)
            try:
                if os.path.getsize(path) > 2_000_000:
                    continue
                with open(path, "rb") as fh:
                    data = fh.read().decode("latin-1")
            except OSError:
                continue
            seen += 1
            for n in needles:
                if n in data:
                    hits.add(n)
print("seen", seen, "hits", sorted(hits))
"""


def test_adversarial_script_walking_disk_and_env_never_finds_the_answers(task, sandbox):
    """The answers (a distinctive value only the harness holds) are not in cwd, its parents, the temp dir, the
    project dir or the environment; the positive control (a value of the public train.csv) IS found."""
    secret = f"{task.answers[0]:.10f}"  # as precise as any file could hold it
    public_value = task.public["train.csv"].split(b"\n")[1].decode().split(",")[1]
    code = WALKER.replace("NEEDLES", f"{secret[::-1]!r}, {public_value[::-1]!r}").replace("ROOTDIR", repr(ROOT))
    res = S.Sandbox(timeout=20.0, mem_bytes=2 * 2**30, fsize_bytes=50 * 2**20, workers=1, mode="zygote")
    try:
        r = res.collect(res.submit(task, code))
    finally:
        res.close()
    assert r.status in ("error", "invalid"), r.tail  # it writes no submission
    line = [ln for ln in r.tail.splitlines() if ln.startswith("seen")][-1]
    assert int(line.split()[1]) > 3 and public_value in line and secret not in line


def test_infinite_loop_is_stopped_within_timeout_and_its_group_is_gone(task, sandbox):
    t0 = time.time()
    res, _ = S.run_sandboxed(task.public, "import os\nprint(os.getpid(), flush=True)\nwhile True: pass\n", 1.0,
                             2**31, 2**20, zygote=sandbox._zygote())
    assert res.status == "timeout" and time.time() - t0 < 1.0 + 2.0
    pid = int(res.tail.split()[0])
    assert res.escaped == 0 and not _session_alive(pid)


def test_memory_bomb_and_huge_write_fail_within_limits(task):
    sandbox = S.Sandbox(timeout=20.0, mem_bytes=2 * 2**30, fsize_bytes=50 * 2**20, workers=1, mode="zygote")
    mem = sandbox.collect(sandbox.submit(task, "import numpy as np\na = np.ones(2**29)\nprint(a.sum())\n"))
    assert mem.status == "error" and mem.oom  # 4 GiB > RLIMIT_AS 2 GiB
    big = sandbox.collect(sandbox.submit(task, "open('big', 'wb').write(b'x' * 100_000_000)\n"))
    assert big.status == "error" and big.fsize  # 100 MB > RLIMIT_FSIZE 50 MB
    sandbox.close()
    assert sandbox.counts["oom"] == 1 and sandbox.counts["fsize"] == 1 and sandbox.counts["errors"] == 2


def test_fork_bomb_is_killed_with_every_child(task, sandbox):
    code = ("import os, time\nprint(os.getpid(), flush=True)\nfor _ in range(5):\n    os.fork()\n"
            "time.sleep(100)\n")
    res, _ = S.run_sandboxed(task.public, code, 1.0, 2**31, 2**20, zygote=sandbox._zygote())
    pid = int(res.tail.split()[0])
    assert res.status == "timeout" and res.escaped == 0 and not _session_alive(pid)


def test_children_that_outlive_the_script_are_killed_and_counted(task, sandbox):
    code = ("import os, time\nprint(os.getpid(), flush=True)\nif os.fork() == 0:\n    time.sleep(100)\n"
            "os._exit(0)\n")
    res, _ = S.run_sandboxed(task.public, code, 5.0, 2**31, 2**20, zygote=sandbox._zygote())
    pid = int(res.tail.split()[0])
    assert res.status == "ok" and res.survivors == 1 and res.escaped == 0 and not _session_alive(pid)


def test_submission_checks_rows_ids_nan():
    ids = np.array([10, 11, 12])
    ok = b"id,target\n12,3\n10,1\n11,2\n"
    pred, why = S.check_submission(ok, ids)
    assert why == "ok" and pred.tolist() == [1.0, 2.0, 3.0]
    for bad in (None, b"id,target\n10,1\n11,2\n", b"id,target\n10,1\n11,nan\n12,3\n", b"id,y\n10,1\n11,2\n12,3\n",
                b"id,target\n10,1\n10,2\n12,3\n", b"id,target\n10,1\n11,2\n13,3\n", b"id,target\n10,1\n11,x\n12,3\n"):
        assert S.check_submission(bad, ids)[0] is None


def test_sandboxed_program_scores_like_the_in_process_leaderboard(task, sandbox):
    """Four pipelines run in the sandbox (numpy main.py from the template) and graded by the harness score as the
    harness's own in-process run of the same source (up to the CSV's 6 significant digits)."""
    for line in ("mean std raw ridge1", "none none poly2 ridge10", "mean std raw knn5", "mean none raw const"):
        r = sandbox.collect(sandbox.submit(task, S.render_script(S.parse_line(line))))
        assert r.status == "ok", r.tail
        assert r.score == pytest.approx(task.program_scores[line], rel=1e-4)
        assert r.tier == S.medal_tier(r.score, task.thresholds, True) and r.fit_s is not None


# ---- episodes: stub policies, bookkeeping by hand ----------------------------------------------------------------


class ScriptedPolicy:
    """Replies with given texts, turn by turn (one list per turn, in episode order)."""

    def __init__(self, per_turn):
        self.per_turn, self.calls = per_turn, 0

    def act(self, prompts, temperature):
        out = self.per_turn[self.calls][:len(prompts)]
        self.per_turn[self.calls] = self.per_turn[self.calls][len(prompts):]
        if not self.per_turn[self.calls]:
            self.calls += 1
        return [(t, None, None) for t in out]


def test_rollout_bookkeeping_by_hand(task):
    sb = S.Sandbox(timeout=5.0, mem_bytes=2 * 2**30, fsize_bytes=50 * 2**20, workers=2, mode="zygote")
    try:
        pol = ScriptedPolicy([["mean std raw ridge1", "mean std raw ridge1", "what?", "submit"],
                              ["submit", "mean std raw knn5", "mean std raw ridge1", "none none raw knn5"]])
        eps = S.rollout(pol, S.DSLAgent("A"), sb, [task], 4, 2, 1.0, gen_chunks=2)
    finally:
        sb.close()
    # turn 1: two identical scripts (1 execution, 1 in-flight hit), one malformed, one submit at turn 1 (malformed);
    # turn 2: episode 0 submits; episode 1 runs knn5; 2 runs ridge1 (cache hit); 3 runs none-none knn5
    assert sb.counts["executions"] == 3 and sb.counts["cache_hits"] == 2
    assert [len(e.turns) for e in eps] == [2, 2, 2, 2] and eps[0].done
    assert [e.format_rate for e in eps] == [1.0, 1.0, 0.5, 0.5]
    sc = task.program_scores
    assert eps[0].final()[0] == pytest.approx(sc["mean std raw ridge1"], rel=1e-4)
    assert eps[1].final()[0] == pytest.approx(sc["mean std raw knn5"], rel=1e-4)  # the last scored run counts
    assert eps[1].scores[0] == pytest.approx(sc["mean std raw ridge1"], rel=1e-4)
    tier = lambda line: S.medal_tier(sc[line], task.thresholds, True)  # noqa: E731
    want = [S.trajectory_reward("dense_code", [tier("mean std raw ridge1")], 1.0),
            S.trajectory_reward("dense_code", [tier("mean std raw knn5")], 1.0),
            S.trajectory_reward("dense_code", [tier("mean std raw ridge1")], 0.5),
            S.trajectory_reward("dense_code", [tier("none none raw knn5")], 0.5)]
    assert [e.reward("dense_code") for e in eps] == pytest.approx(want, abs=1e-6)
    st = S.episode_stats(eps, "dense_code")
    assert st["malformed"] == 2 and st["n"] == 4 and st["masked"] == 0
    assert "last: mean std raw ridge1 -> " in S.DSLAgent("A").prompt(eps[0], 1) or eps[0].feedback.startswith("mean")


def test_timed_out_episode_is_masked_not_zero(task):
    sb = S.Sandbox(timeout=0.5, mem_bytes=2 * 2**30, fsize_bytes=50 * 2**20, workers=1, mode="zygote")
    try:
        ep = S.Episode(task=task, group=0)
        agent = S.DSLAgent("A")
        t = S.Turn("p", "x", None, None, True, "run")
        ep.turns.append(t)
        ep.calls += 1
        res = sb.collect(sb.submit(task, "while True: pass\n"))
        ep.timeouts += res.status == "timeout"
        agent.observe(ep, t, res)
    finally:
        sb.close()
    assert res.status == "timeout" and ep.masked and sb.counts["timeouts"] == 1
    assert "timeout" not in [json.dumps(v) for v in sb.cache.values()]  # never cached
    assert S.episode_stats([ep], "dense_code")["masked"] == 1


def test_react_turns_through_a_stub_endpoint(task):
    """A stub OpenAI-compatible server plays the policy: a well-formed <code> turn runs in the sandbox, a turn with
    two tool calls is malformed (error message back, counted), Score grades the last file, <answer> ends."""
    from fault_server import FaultServer

    code = S.render_script(S.parse_line("mean std raw ridge1")).replace("```", "")
    replies = iter([f"<think>fit ridge</think><code>{code}</code>",
                    "<think>x</think><code>print(1)</code>{\"name\": \"Score\"}",
                    "<think>check</think>{\"name\": \"Score\"}",
                    "<think>done</think><answer>submission</answer>"])
    with FaultServer([], then="ok", reply=lambda route, body: [next(replies)]) as srv:
        llm = C.LLM.from_endpoint(srv.url, "stub", deadline=10)
        sb = S.Sandbox(timeout=10.0, mem_bytes=2 * 2**30, fsize_bytes=50 * 2**20, workers=1, mode="zygote")
        try:
            eps = S.rollout(S.EndpointPolicy(llm, 256), S.ReActAgent("A"), sb, [task], 1, 6, 0.0)
        finally:
            sb.close()
        sent = srv.requests
    e = eps[0]
    assert [t.action for t in e.turns] == ["run", "malformed", "score", "answer"] and e.done
    assert e.format_rate == 0.75 and e.score_calls == 1
    assert e.final()[0] == pytest.approx(task.program_scores["mean std raw ridge1"], rel=1e-4)
    assert sent[0]["route"] == "chat/completions" and sent[0]["body"]["messages"][0]["role"] == "system"
    assert "Error: malformed" in sent[2]["body"]["messages"][-1]["content"]
    assert "Score: " in sent[3]["body"]["messages"][-1]["content"]


def test_react_prompt_truncation_drops_error_turns_first():
    msgs = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "t" * 40}]
    for k in range(4):
        msgs += [{"role": "assistant", "content": f"a{k}" * 20}, {"role": "user",
                                                                 "content": ("Error: bad" if k < 2 else "[ok]") * 10}]
    out = S.truncate_messages(msgs, None, max_len=(80 + 2 * (40 + 40)) // 4)  # fits once the 2 error pairs are gone
    assert out[:2] == msgs[:2] and len(out) == 6 and not any(m["content"].startswith("Error") for m in out)
    short = S.truncate_messages(msgs, None, max_len=30)
    assert short == msgs[:2] + msgs[-2:]


# ---- one trajectory-GRPO update against a plain loop reference ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy():
    model, tok = C.tiny_lm(n_layer=1, d_model=32, n_head=2, seed=0)
    model.eval()
    return model, tok


def _fixed_episodes(tok, task):
    eps = []
    texts = [["mean std raw ridge1", "submit"], ["none std raw knn5", "mean std raw knn5"], ["bad line"],
             ["mean none poly2 ridge10", "submit"], ["mean std raw ridge1"]]
    for k, turns in enumerate(texts):
        e = S.Episode(task=task, group=0)
        for j, t in enumerate(turns):
            p = f"obs {k} turn {j} | last: -\n> "
            e.turns.append(S.Turn(p, t, tok(p)["input_ids"][:-1], tok(t)["input_ids"], True, "run"))
        eps.append(e)
    eps[4].timeouts, eps[4].calls = 1, 1  # masked
    return eps


def _reference_grads(model, eps, adv):
    """Plain loops: per episode, the mean over its generated tokens (all turns) of -A * logp (rho = 1 at the first
    step: the clip is inactive), averaged over the live episodes."""
    live = [(e, a) for e, a in zip(eps, adv) if not e.masked]
    model.zero_grad()
    total = 0.0
    for e, a in live:
        terms = []
        for t in e.turns:
            ids = torch.tensor([t.prompt_ids + t.resp_ids])
            logits = model(input_ids=ids).logits[0].float()
            for i in range(len(t.prompt_ids), ids.shape[1]):
                terms.append(torch.log_softmax(logits[i - 1], -1)[ids[0, i]])
        ratio = [torch.exp(x - x.detach()) for x in terms]
        total = total + (-sum(r * a for r in ratio) / len(terms)) / len(live)
    total.backward()
    return [p.grad.clone() for p in model.parameters()], float(total.detach())


def test_one_grpo_update_matches_a_plain_loop_reference(tiny_policy, task):
    import copy

    model, tok = tiny_policy
    eps = _fixed_episodes(tok, task)
    rewards = [0.9, 0.3, 0.1, 0.8, 5.0]
    adv = S.grpo_advantages(rewards + [0.0, 0.0, 0.0], 4, live=[1, 1, 1, 1, 0, 0, 0, 0])[:5]
    ref_model = copy.deepcopy(model)
    grads, ref_loss = _reference_grads(ref_model, eps, adv.tolist())
    args = SimpleNamespace(per_device_batch_size=2, ppo_epochs=1, num_minibatches=1, clip_low=0.2, clip_high=0.28,
                           max_grad_norm=1e9)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before = [p.detach().clone() for p in m.parameters()]
    st = S.grpo_update(m, tok, opt, eps, adv, args, torch.device("cpu"))
    assert st["loss"] == pytest.approx(ref_loss, abs=1e-6) and st["updates"] == 1
    for b, p, g in zip(before, m.parameters(), grads):
        torch.testing.assert_close(b - p.detach(), g, atol=2e-6, rtol=1e-4)
    assert any(g.abs().max() > 0 for g in grads)


# ---- flags, arms, bad input --------------------------------------------------------------------------------------

TINY = ["--num_train_tasks", "4", "--num_eval_tasks", "2", "--num_seed_tasks", "2", "--tasks_per_step", "2",
        "--eval_rows", "1000,1000", "--min_gap", "0", "--max_steps", "1", "--sft_steps", "2", "--save_every", "1"]


@pytest.fixture(scope="module")
def tiny_world():
    args = S.parse_args(TINY)
    S.validate_args(args)
    return S.build_world(args)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_policy"))
    model, tok = C.tiny_lm(n_layer=1, d_model=32, n_head=2, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


class LinePolicy(S.LocalPolicy):
    """The local policy's interface with lines drawn from the DSL by its generator (a random tiny model writes no
    valid line, so every group would be dead); the ids are the tokenizer's, so the update has gradients."""

    def act(self, prompts, temperature):
        out = []
        for p in prompts:
            k = int(torch.randint(0, len(S.PROGRAMS) + 2, (1,), generator=self.gen))
            line = (list(S.PROGRAMS) + ["submit", "??"])[k]
            out.append((line, self.tok(p)["input_ids"][:-1], self.tok(line)["input_ids"]))
        return out


def _arm_weights(arm, flags, world, path, tmp):
    args = S.parse_args(TINY + ["--model_name_or_path", path, "--method", arm, "--output_dir", str(tmp)] + flags)
    S.validate_args(args)
    run = S.ArmRun(arm, 0, args, world, C.MetricLogger(str(tmp), enabled=False), torch.device("cpu"), str(tmp), 0,
                   budget_s=1e9)
    run.setup()
    row = run.train_step(None) if arm in S.TRAINED else {}
    run.sandbox.close()
    return torch.cat([p.detach().flatten() for p in run.model.parameters()]), row


def test_arm_defining_flags_change_the_result(tiny_world, tiny_path, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "LocalPolicy", LinePolicy)
    base, _ = _arm_weights("base", [], tiny_world, tiny_path, tmp_path / "a")
    sand, row = _arm_weights("sandmle", [], tiny_world, tiny_path, tmp_path / "b")
    sparse, row_s = _arm_weights("sparse", [], tiny_world, tiny_path, tmp_path / "c")
    paper, row_p = _arm_weights("sandmle", ["--reward", "dense_paper"], tiny_world, tiny_path, tmp_path / "d")
    sft, _ = _arm_weights("seed_sft", [], tiny_world, tiny_path, tmp_path / "e")
    assert not torch.equal(base, sand) and not torch.equal(base, sft)
    assert row["reward"] != row_s["reward"] and row["reward"] != row_p["reward"]  # the same rollouts, other rewards
    assert not torch.equal(sand, sparse) or row_s["dead_groups"] == 1.0
    run = S.ArmRun("full_scale", 0, S.parse_args(TINY + ["--full_rows", "300"]), tiny_world, None, None, "", 0)
    run.task_rng = random.Random(0)
    assert all(t.task_id.endswith("-full300") and t.dna.n_train == 300 for t in run.step_tasks())


@pytest.mark.parametrize("flags,name", [(["--num_generations", "1", "--method", "sandmle"], "num_generations"),
                                        (["--beta", "0.1"], "beta"), (["--micro_rows", "200,50"], "micro_rows"),
                                        (["--n_test", "100"], "n_test"), (["--clip_low", "1"], "clip_low"),
                                        (["--method", "full_scale"], "full_scale"), (["--method", "ppo"], "method"),
                                        (["--backend", "api", "--api_base", "x", "--api_model", "m"], "backend"),
                                        (["--agent", "react"], "react"), (["--exec_timeout", "0"], "exec_timeout"),
                                        (["--generator", "llm"], "generator"), (["--tasks_per_step", "200"],
                                                                                 "tasks_per_step")])
def test_validate_args_refuses_bad_flags(flags, name):
    with pytest.raises(C.UserError, match=name):
        S.validate_args(S.parse_args(flags))


def test_validate_args_accepts_the_defaults_and_the_table():
    S.validate_args(S.parse_args([]))
    S.validate_args(S.parse_args(["--table"]))


@pytest.mark.slow  # a subprocess (torch import): ~10 s on the shared machine
def test_bad_input_exits_2_with_nothing_written(tmp_path):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sandmle.py"), "--num_generations", "0", "--output_dir",
                        str(out)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --num_generations 0")
    assert not out.exists()


# ---- slow ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_writes_outputs(tmp_path, tiny_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sandmle.py"), "--max_steps", "2", "--num_train_tasks", "4",
                        "--num_eval_tasks", "2", "--tasks_per_step", "2", "--num_seed_tasks", "2", "--eval_rows",
                        "1000,1000", "--min_gap", "0", "--model_name_or_path", tiny_path, "--output_dir", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("args.json", "metrics.jsonl", "summary.json", "sandmle.png", "table.md"):
        assert (out / f).exists(), f
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("result: held-out any-medal")
    res = json.loads((out / "summary.json").read_text())["results"]  # malformed eval turns reach stdout (issue 9)
    for arm in ("base", "sandmle"):
        assert f"{arm} {sum(x['eval_A']['malformed'] for x in res if x['arm'] == arm)}" in last.split("malformed")[1], last
    rows = C.read_jsonl(str(out / "metrics.jsonl"))
    assert len(rows) == 2 and all(set(r["time_s"]) >= {"generation", "sandbox", "forward", "backward", "optimizer"}
                                  for r in rows)


@pytest.fixture(scope="session")
def quick_policy(tmp_path_factory):
    """A 1-layer policy format-pretrained for 120 steps (~30 s): most of its sampled lines are valid DSL."""
    d = str(tmp_path_factory.mktemp("quick_policy"))
    model, tok = C.tiny_lm(n_layer=1, d_model=64, n_head=2, seed=0)
    C.pretrain_lm(model, tok, S.format_sample, steps=120, batch_size=32, lr=5e-3, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _numbers(out):
    summ = json.load(open(out / "summary.json"))
    for r in summ["results"]:
        for k in ("minutes", "time_split", "train_s", "steps_per_min", "budget_s"):
            r.pop(k)
    summ.pop("wall_s"), summ.pop("world_build_s"), summ.pop("table")
    rows = [{k: v for k, v in r.items() if k not in ("time_s", "train_s")} for r in C.read_jsonl(str(out /
                                                                                                  "metrics.jsonl"))]
    return summ, rows


def _run_until(cmd, done, timeout=400):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if done():
            p.kill()
            break
        time.sleep(0.05)
    return p.wait()


SLOW = ["--num_train_tasks", "6", "--num_eval_tasks", "3", "--num_seed_tasks", "2", "--tasks_per_step", "2",
        "--eval_rows", "1000,1000", "--min_gap", "0", "--sft_steps", "3"]


@pytest.mark.slow
def test_kill9_and_resume_reach_the_uninterrupted_summary(tmp_path, quick_policy):
    """sandmle for 4 steps with a checkpoint every 2: killed (kill -9) once its 3rd row is logged (the checkpoint
    holds 2: row 3 is cut and redone), resumed to the end: summary.json and metrics.jsonl equal the uninterrupted
    run's; --resume with a changed flag and --resume without a checkpoint are refused."""
    cmd = [sys.executable, os.path.join(ROOT, "sandmle.py"), "--method", "sandmle", *SLOW, "--max_steps", "4",
           "--save_every", "2", "--model_name_or_path", quick_policy]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = subprocess.run(cmd + ["--output_dir", str(full)], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = cut / "metrics.jsonl"
    n_rows = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    assert _run_until(cmd + ["--output_dir", str(cut)], lambda: n_rows() >= 3) == -9
    assert n_rows() == 3 and C.checkpoint_step(str(cut / "ckpt-sandmle-s0")) == 2
    bad = subprocess.run(cmd + ["--output_dir", str(cut), "--resume", "--learning_rate", "1e-3"], capture_output=True,
                         text=True, cwd=ROOT, env=ENV, timeout=400)
    assert bad.returncode == 2 and "--learning_rate" in bad.stderr
    r = subprocess.run(cmd + ["--output_dir", str(cut), "--resume"], capture_output=True, text=True, cwd=ROOT,
                       env=ENV, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _numbers(full), _numbers(cut)
    assert a == b
    assert any(row["loss"] != 0 for row in a[1])  # the policy did update
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(cmd + ["--output_dir", str(empty), "--resume"], capture_output=True, text=True, cwd=ROOT,
                       env=ENV, timeout=400)
    assert r.returncode == 2 and "no run" in r.stderr


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, quick_policy):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(ROOT,
                        "sandmle.py"), "--method", "sandmle", *SLOW, "--max_steps", "2", "--model_name_or_path",
                        quick_policy, "--output_dir", str(out)], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = C.read_jsonl(str(out / "metrics.jsonl"))
    assert len(rows) == 2 and all(row["executions"] + row["cache_hits"] > 0 for row in rows)
    assert json.load(open(out / "summary.json"))["results"][0]["steps"] == 2


@pytest.mark.slow
def test_fresh_interpreter_sandbox_stops_loop_bomb_and_escapee(task):
    """--sandbox fresh (a new `python -I` per run): the same limits; a child that leaves the session (setsid) is
    found by the run's environment marker and killed."""
    t0 = time.time()
    res, _ = S.run_sandboxed(task.public, "while True: pass\n", 1.0, 2**31, 2**20)
    assert res.status == "timeout" and time.time() - t0 < 3.0
    mem, _ = S.run_sandboxed(task.public, "import numpy as np\na = np.ones(2**29)\n", 10.0, 2 * 2**30, 2**20)
    assert mem.status == "error" and mem.oom
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    print(os.getpid(), flush=True)\n"
            "    time.sleep(100)\ntime.sleep(0.5)\n")
    esc, _ = S.run_sandboxed(task.public, code, 10.0, 2**31, 2**20)
    pid = int(esc.tail.split()[0])
    time.sleep(0.2)
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    assert esc.survivors >= 1 and esc.escaped == 0 and state in ("gone", "Z")


@pytest.mark.slow
def test_speed_benchmark_reports_medians_with_and_without_startup(tiny_world):
    args = S.parse_args(TINY + ["--full_rows", "3000"])
    sp = S.speed_benchmark(tiny_world, args, n_tasks=1)
    assert sp["n_runs"] == {"micro": 4, "full": 4}
    assert sp["micro_wall_median_s"] > sp["micro_fit_median_s"] > 0 and sp["full_fit_median_s"] > 0


@pytest.mark.slow
def test_real_checkpoint_react_episode_and_update(smollm2, tmp_path, task):
    """SmolLM2-135M-Instruct as a ReAct policy: its chat template is applied once around the system prompt, the
    episode runs in the sandbox, logp_old equals the update's log-probs (rho = 1 at the first step), one GRPO update
    is finite and moves the weights, and the checkpoint reloads with the same logits."""
    model, tok = C.load_lm(smollm2)
    gen = torch.Generator().manual_seed(0)
    sb = S.Sandbox(timeout=10.0, mem_bytes=2 * 2**30, fsize_bytes=50 * 2**20, workers=1, mode="zygote")
    try:
        eps = S.rollout(S.LocalPolicy(model, tok, 24, gen), S.ReActAgent("A", tok, 2048), sb, [task], 2, 1, 1.0)
    finally:
        sb.close()
    text = C.render_chat(tok, eps[0].turns[0].prompt)
    assert text.count(S.REACT_SYSTEM[:40]) == 1 and text.count("<|im_start|>system") == 1
    assert tok.decode(eps[0].turns[0].prompt_ids).count("<|im_start|>assistant") == 1
    assert all(0 < len(t.resp_ids) <= 24 for e in eps for t in e.turns) and all(len(e.turns) == 1 for e in eps)
    ids, attn, resp, owner = S.pack_trajectories(eps, tok, torch.device("cpu"))
    with torch.no_grad():
        lp, mk = S.seq_logp(model, ids, attn, resp, owner, len(eps))
    assert torch.isfinite(lp).all() and mk.sum() == sum(len(t.resp_ids) for e in eps for t in e.turns)
    args = SimpleNamespace(per_device_batch_size=2, ppo_epochs=1, num_minibatches=1, clip_low=0.2, clip_high=0.28,
                           max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    st = S.grpo_update(model, tok, opt, eps, torch.tensor([1.0, -1.0]), args, torch.device("cpu"))
    assert math.isfinite(st["loss"]) and st["clip_frac"] == 0.0 and st["updates"] == 1
    assert any((a != b).any() for a, b in zip(before, model.parameters()))
    C.save_checkpoint(str(tmp_path / "ck"), model, tok, opt, step=1)
    fresh, _ = C.load_lm(smollm2)
    C.load_checkpoint(str(tmp_path / "ck"), model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids[:1]).logits, model(input_ids=ids[:1]).logits, atol=1e-5,
                                   rtol=0)


@pytest.mark.slow
def test_eval_mode_with_an_endpoint_policy(tmp_path):
    """--mode eval --backend api: a stub endpoint answers DSL lines on /v1/completions (the preflight uses the same
    route); the summary holds both scaffolds' numbers and the malformed count (the stub's 'oops' turns)."""
    from fault_server import FaultServer

    def reply(route, body):  # turn 1 of every episode is malformed, later turns a valid line
        return ["oops" if body["prompt"].endswith("last: -\n> ") else "mean std raw ridge1"] * body.get("n", 1)

    with FaultServer([], then="ok", reply=reply) as srv:
        args = S.parse_args(TINY + ["--mode", "eval", "--backend", "api", "--api_base", srv.url, "--api_model", "stub",
                                    "--output_dir", str(tmp_path / "ev")])
        S.main(args)
        routes = {r["route"] for r in srv.requests}
    summ = json.load(open(tmp_path / "ev" / "summary.json"))
    assert routes == {"completions"} and summ["eval_A"]["n"] == 2 and summ["eval_A"]["valid"] == 1.0
    assert summ["eval_A"]["malformed"] == 2 and summ["eval_B"]["malformed"] == 2  # one per task and scaffold
    assert (tmp_path / "ev" / "sandmle.png").exists()
