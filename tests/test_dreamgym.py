"""Tests of dreamgym.py: ShopLite transitions and rewards on scripted episodes, GRPO advantages and
clipping on hand values, the curriculum score, retrieval, eval isolation (real env only, eval tasks
never in the buffer), the experience model through local OpenAI-compatible servers, one GRPO update
and whole arms against plain references, bookkeeping by hand, the task variants, M_exp's metrics on
fresh transitions, its cache key and early stopping, the hallucination split and one step of each
diagnostic world, bad input, the output-dir / resume policy; slow: a smoke run, the diagnostic arms
against dreamgym, kill -9 + --resume, torchrun, the real SmolLM2 checkpoint.

One-line breaks of dreamgym.py each of which was made and watched to fail (test that catches it):
- hallucination rate always 0 (`fails += 0`): test_hallucination_rate_hand_count, the dreamgym arm test
- curriculum seeded by the lowest-variance tasks (`reverse=False`): test_curriculum_seeds_..., arm test
- --lambda_syn ignored (0.3 hard-coded in task_batch): test_task_batch_..., arm test (lambda 0.5 of 2 tasks)
- false successes counted among successful purchases: test_exp_model_error_hand_totals
- failed purchases no longer oversampled (`* 0`): test_sft_examples_oversample_...
- loss normalised per micro-batch instead of per minibatch: test_grpo_update_matches_plain_reference[2-1-0.0]
- raw rewards used as advantages: test_grpo_update_matches_plain_reference
- the beta KL term dropped from the update: test_grpo_update_matches_plain_reference[2-1-0.3]
- real budget unit G instead of G x H: test_real_grpo_arm_counts_real_steps_and_stops_at_the_budget
- real training steps reported from the diagnostic counter: the real_grpo arm test
- evaluation counted as real training steps (diag=False): the dreamgym arm test
- zero-variance share inverted; synthetic success of the last 1 iteration instead of 3; --top_k ignored
  (3 hard-coded); the final evaluation not sampled; M_exp calls counting memo hits: the dreamgym arm test
- --buffer_add ignored; no_curriculum running the curriculum: test_arm_defining_flags_change_the_result
- --s2r_frac ignored (0.1 hard-coded); the checkpoint not restoring the task RNG, the sampling generator,
  the curriculum pool, M_exp's counters or the buffer's additions: test_s2r_takes_over_dreamgym_exactly
- --group_size 0 accepted: test_validate_args_refuses_bad_flags
- the endpoint preflight removed (args.json written before the failure): test_bad_input_exits_2_...
- --resume accepting changed flags: test_output_dir_policy_resume_and_overwrite
- make_tasks without its bound (an endless loop on a small catalogue): test_too_many_tasks_...
- metrics rows after the checkpoint not cut; the curriculum pool, the buffer's additions or M_exp's memo
  left out of the checkpoint: test_kill9_and_resume_reach_the_uninterrupted_summary (slow)
- M_task's SFT pairs back to "a random training task of the same category": test_sft_examples_oversample_...
- the curriculum's variant check dropped (any feasible task kept): test_curriculum_keeps_only_variants_of_their_seed
- task_variants adding a third attribute: test_task_variants_are_one_edit_feasible_variants_of_the_seed
- exp_metrics counting false successes among successful purchases, or comparing the predicted state with the
  source state: test_exp_metrics_per_action_and_balanced_purchases_hand_totals
- the measurement purchases not balanced, or copies of SFT transitions kept: test_metric_transitions_...
- offline data collected at --horizon, or --n_eval_tasks in the cache key: test_exp_cache_key_holds_only_...
- early stopping not restoring the best weights, or ignoring --exp_patience: test_exp_early_stopping_...
- the hallucination split calling every failure reward-caused, or naming the action after the first wrong state:
  test_hallucination_rate_hand_count
- exp_states paying M_exp's reward, exp_reward paying 0, true_success ignoring the selected size:
  test_diagnostic_worlds_one_step_against_plain_rules (and the slow test_diagnostic_arms_differ_where_they_must)
The old micro-batching test compared a mostly clipped update with itself; the update tests now check
against the loop reference that the weights move and that some, not all, units are clipped.
"""
import http.server
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import dreamgym as D  # noqa: E402
from conftest import run_cli  # noqa: E402

torch.set_num_threads(1)


def _shop():
    cat = [D.Product(0, "shirt", "red", "cotton", ("S", "M"), 25),
           D.Product(1, "shirt", "blue", "cotton", ("M",), 20),
           D.Product(2, "hat", "red", "wool", ("M",), 10),
           D.Product(3, "shirt", "red", "wool", ("L",), 45)]
    return D.ShopLite(cat, page_size=3, horizon=10)


def _run(shop, task, actions):
    ep = shop.reset(task, "t")
    out = []
    for a in actions:
        out.append(shop.step(ep, a))
    return ep, out


# ---- ShopLite ------------------------------------------------------------------------------------


def test_expert_episode_buys_with_reward_one():
    shop = _shop()
    task = "buy a red shirt, size M, under $30"
    assert "search[red shirt]" in D.admissible(D.SEARCH_STATE, task)
    ep, out = _run(shop, task, ["search[red shirt]"])
    # keyword overlap ranking: 2 words match products 0 and 3, then 1 word
    assert out[0][0].startswith("results p1: [1] red cotton shirt $25 | [2] red wool shirt $45")
    assert "[next]" in out[0][0] and D.admissible(out[0][0], task)[:2] == ["click[1]", "click[2]"]
    s, r, d, info = shop.step(ep, "click[1]")
    assert s == "item: red cotton shirt $25 sizes{S,M} [buy] [back]" and not d
    assert D.admissible(s, task) == ["select[S]", "select[M]", "buy", "back"]
    s, r, d, info = shop.step(ep, "select[M]")
    assert "sel{M}" in s
    s, r, d, info = shop.step(ep, "buy")
    assert (s, r, d, info["success"]) == (D.DONE_STATE, 1.0, True, 1.0)
    assert shop.real_steps == 4 and shop.diag_steps == 0


def test_wrong_colour_with_three_goal_terms_gives_two_thirds():
    shop = _shop()
    # goal terms: colour (blue), size (M), price (<= 30); product 0 is red -> 2/3, not a success
    ep, out = _run(shop, "buy a blue shirt, size M, under $30",
                   ["search[shirt]", "click[1]", "select[M]", "buy"])
    assert shop.catalogue[ep.item].colour == "red"
    s, r, d, info = out[-1]
    assert r == pytest.approx(2 / 3) and d and info["success"] == 0.0
    # an asked size never selected counts as unmatched: colour ok, size missing, price ok -> 2/3
    ep, out = _run(shop, "buy a red shirt, size M, under $30", ["search[red shirt]", "click[1]", "buy"])
    assert out[-1][1] == pytest.approx(2 / 3)


def test_wrong_category_gives_zero():
    shop = _shop()
    ep, out = _run(shop, "buy a red shirt, under $30", ["search[red shirt]", "next"])
    assert out[-1][0].startswith("results p2: [1] red wool hat $10")
    s, r, d, info = shop.step(ep, "click[1]")
    s, r, d, info = shop.step(ep, "buy")
    assert r == 0.0 and d and info["success"] == 0.0


def test_inadmissible_action_fails_and_horizon_ends_episode():
    shop = _shop()
    ep, out = _run(shop, "buy a red shirt, under $30", ["buy"])  # nothing to buy on the search page
    assert out[0][:3] == (D.FAILURE_STATE, 0.0, True) and not out[0][3]["valid"]
    with pytest.raises(ValueError):
        shop.step(ep, "back")
    shop = _shop()
    shop.horizon = 3
    ep, out = _run(shop, "buy a red shirt, under $30", ["search[red shirt]", "back", "search[red shirt]"])
    assert [o[2] for o in out] == [False, False, True] and out[-1][3]["timeout"] and out[-1][1] == 0.0
    assert shop.real_steps == 3
    ep = shop.reset("buy a red shirt, under $30")
    shop.step(ep, "search[red shirt]", diag=True)
    assert shop.real_steps == 3 and shop.diag_steps == 1  # diagnostics counted apart


def test_tasks_are_disjoint_feasible_and_the_expert_solves_them():
    shop = D.ShopLite(D.make_catalogue(120, 0), 3, 10)
    train, ev = D.make_tasks(shop, 60, 20, 0)
    assert not set(train) & set(ev) and len(set(train)) == 60
    for t in train + ev:
        task = D.parse_task(t)
        assert task is not None and task.text == t and 2 <= task.n_constraints <= 4
        assert len(D.task_queries(t)) == 6
    trajs = D.collect_trajectories(shop, train[:20], 20, [0.0], random.Random(0), "e")
    assert all(tr[-1]["r"] == 1.0 for tr in trajs)


# ---- GRPO, curriculum ------------------------------------------------------------------------------


def test_grpo_advantages_hand_values():
    a = D.grpo_advantages(torch.tensor([1.0, 0, 0, 0]), 4)
    torch.testing.assert_close(a, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-4, rtol=0)
    assert D.grpo_advantages(torch.ones(4), 4).abs().max() == 0
    assert D.grpo_advantages(torch.zeros(4), 4).abs().max() == 0
    assert D.grpo_advantages(torch.tensor([1.0, 0.0]), 1).abs().max() == 0
    two = D.grpo_advantages(torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 1]), 4)  # groups are independent
    torch.testing.assert_close(two[4:], torch.tensor([-1.5, 0.5, 0.5, 0.5]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("adv,rho,want,grad_zero", [(1.0, 1.5, -1.28, True), (-1.0, 0.5, 0.8, True),
                                                     (-1.0, 1.5, 1.5, False), (1.0, 1.1, -1.1, False)])
def test_grpo_loss_clipping_hand_values(adv, rho, want, grad_zero):
    logp = torch.tensor([[float(torch.log(torch.tensor(rho)))]], requires_grad=True)
    loss, st = D.grpo_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), 0.2, 0.28)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    loss.backward()
    assert (logp.grad.abs().item() == 0) == grad_zero
    assert st["clip_frac"].item() == float(grad_zero)


def test_grpo_loss_token_mean_ignores_masked_units():
    logp = torch.tensor([[0.0, 5.0], [0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss, _ = D.grpo_loss(logp, torch.zeros(2, 2), adv, mask)
    assert loss.item() == pytest.approx((-1 + 1 + 1) / 3)  # the masked unit (rho = e^5) plays no part


def test_reward_variance_score():
    assert D.reward_variance_score([1, 0, 1, 0]) == pytest.approx(0.25)
    assert D.reward_variance_score([1, 1, 1, 1]) == 0
    for r in ([1, 0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1, 1, 1]):
        p = sum(r) / len(r)
        assert D.reward_variance_score(r) == pytest.approx(p * (1 - p))


def test_score_mode_renormalises_over_admissible_actions():
    out = D.score_mode_logp(torch.tensor([-1.0, -2.0, -3.0, -0.5]), [3, 1])
    assert torch.allclose(out[0].exp().sum(), torch.tensor(1.0)) and out[1].item() == pytest.approx(0.0)
    torch.testing.assert_close(out[0], torch.log_softmax(torch.tensor([-1.0, -2.0, -3.0]), 0))


def test_curriculum_rejects_eval_infeasible_and_unparsable_variants():
    cat = _shop().catalogue
    ev = {"buy a red shirt, under $30"}
    cands = ["buy a red shirt, under $30", "buy a green shirt, under $30", "buy a red shirt, size M, under $30",
             "buy a shirt, under $90", "buy a red potato, under $5", "buy a blue shirt, under $30"]
    keep = D.curriculum_variants(cands, cat, ev, known={"buy a blue shirt, under $30"})
    assert keep == ["buy a red shirt, size M, under $30", "buy a shirt, under $90"]  # most constraints first


def test_task_variants_are_one_edit_feasible_variants_of_the_seed():
    """task_variants on the 4-product catalogue, by hand: one field changed, added or dropped (never the category,
    at most 2 attributes), or the cap moved by 10; only variants some product satisfies."""
    cat = _shop().catalogue  # 0 red cotton shirt S,M $25; 1 blue cotton shirt M $20; 2 red wool hat M $10; 3 red wool shirt L $45
    got = D.task_variants("buy a red shirt, under $30", cat)
    want = ["buy a shirt, under $30",  # colour dropped
            "buy a blue shirt, under $30",  # colour changed (green, black, ... : no such shirt)
            "buy a red cotton shirt, under $30",  # material added (wool shirt costs $45: infeasible)
            "buy a red shirt, size S, under $30", "buy a red shirt, size M, under $30",  # size added (L: $45)
            "buy a red shirt, under $40"]  # cap +10 (cap $20: no red shirt that cheap)
    assert sorted(got) == sorted(want)
    assert all(D.task_edits("buy a red shirt, under $30", v) == 1 for v in got)
    # two attributes already: changes and drops, no third attribute; the forbidden (eval) task is left out
    got = D.task_variants("buy a red cotton shirt, under $30", cat, forbidden={"buy a red shirt, under $30"})
    assert sorted(got) == sorted(["buy a cotton shirt, under $30", "buy a blue cotton shirt, under $30",
                                  "buy a red cotton shirt, under $40"])  # no size M added: it would be a third
    assert D.task_variants("buy a red potato, under $5", cat) == []
    assert D.task_edits("buy a red shirt, under $30", "buy a blue wool shirt, size L, under $50") == 4


def test_curriculum_keeps_only_variants_of_their_seed():
    """With the seed of each candidate: a task of the same category that changes 3 fields (what a 'random task
    of the same category' is) or a different category is not a variant; 1-2 changed fields are."""
    cat = _shop().catalogue
    seed = "buy a red shirt, under $30"
    cands = ["buy a red shirt, size M, under $30", "buy a blue cotton shirt, size M, under $20",
             "buy a red hat, under $30", "buy a red cotton shirt, under $40"]
    keep = D.curriculum_variants(cands, cat, set(), set(), seeds=[seed] * 4)
    assert keep == ["buy a red shirt, size M, under $30", "buy a red cotton shirt, under $40"]
    assert len(D.curriculum_variants(cands, cat, set(), set())) == 4  # without seeds: feasibility only


# ---- retrieval, buffer and eval isolation ------------------------------------------------------------


def _tr(ep, s, a, s2, task="buy a shirt, under $30", real=True):
    return dict(task=task, ep=ep, hist=[], s=s, a=a, s2=s2, r=0.0, d=0.0, R="", real=real)


def test_retrieval_ranks_nearest_first_and_skips_own_episode():
    buf = D.ReplayBuffer()
    buf.add([_tr("e1", "search: [search box]", "search[red shirt]", "results A"),
             _tr("e2", "item: blue wool hat $5", "buy", "done"),
             _tr("e3", "search: [search box]", "search[red wool shirt]", "results B"),
             _tr("e4", "search: [search box]", "search[green hat]", "results C")])
    got = buf.retrieve([("search: [search box]", "search[red shirt]", "q")], 3)[0]
    assert [g["ep"] for g in got][:2] == ["e1", "e3"]
    got = buf.retrieve([("search: [search box]", "search[red shirt]", "e1")], 1)[0]
    assert got[0]["ep"] == "e3"  # the query's own episode is excluded
    assert buf.retrieve([("x", "y", "q")], 0) == [[]]


def test_buy_demos_and_keys_carry_the_task():
    """A buy's reward holds for its task only: the demo names the task, and the retrieval key of a
    buy includes it, so the same item bought for the same task ranks first."""
    item = "item: red cotton shirt $25 sizes{S,M} sel{M} [buy] [back]"
    ok = {**_tr("e1", item, "buy", "done", task="buy a red shirt, size M, under $30"), "r": 1.0}
    other = {**_tr("e2", item, "buy", "done", task="buy a blue shirt, size M, under $30"), "r": 0.0}
    assert D.demo_text(ok, 130).startswith("for red shirt, size M, under $30: item: red cotton shirt $25")
    assert D.demo_text(ok, 130).endswith("buy => done r1")
    assert "blue" not in D.demo_text(_tr("e3", item, "back", D.SEARCH_STATE), 130)  # non-buy demos unchanged
    buf = D.ReplayBuffer()
    buf.add([ok, other])
    for task, first in (("buy a blue shirt, size M, under $30", "e2"), ("buy a red shirt, size M, under $30", "e1")):
        got = buf.retrieve([(item, "buy", "q", task)], 2)[0]
        assert [g["ep"] for g in got] == [first, {"e1": "e2", "e2": "e1"}[first]]  # both kept: different tasks


class RewardButNotDoneExp:
    """Stub M_exp: every answer claims reward 1 but does not end the episode."""

    def __init__(self):
        self.calls = 0

    def step(self, prompts):
        self.calls += len(prompts)
        return [("r", "results p1: [1] red cotton shirt $25 [back]", 1.0, 0.0) for _ in prompts]


def test_synthetic_timeout_and_not_done_steps_give_zero_reward():
    """Spec: horizon = timeout = failure (ShopLite gives r = 0); an outcome reward is only paid when the
    episode ends, so r = 0 while M_exp says done = 0 and at the horizon."""
    dream = D.DreamWorld(RewardButNotDoneExp(), D.ReplayBuffer(), 0, 100, horizon=2)
    task = "buy a red shirt, under $30"
    ep = dream.reset(task, "e")
    (s2, r, d, info), = dream.step_batch([ep], ["search[red shirt]"])
    assert (r, d) == (0.0, False)
    (s2, r, d, info), = dream.step_batch([ep], ["click[1]"])
    assert (r, d) == (0.0, True) and info["timeout"] and ep.done
    policy, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    trajs = D.rollout(policy, tok, D.DreamWorld(RewardButNotDoneExp(), D.ReplayBuffer(), 0, 100, horizon=2), [task],
                      2, 1.0, torch.Generator().manual_seed(0), "score", torch.device("cpu"), "t")
    assert all(len(t.transitions) <= 2 and t.reward == 0.0 for t in trajs)


def test_real_world_counts_invalid_actions():
    world = D.RealWorld(_shop())
    eps = [world.reset("buy a red shirt, under $30", f"e{i}") for i in range(3)]
    out = world.step_batch(eps, ["search[red shirt]", "<action>checkout", ""])
    assert world.stats == {"invalid": 2, "steps": 3} and [o[0] for o in out[1:]] == [D.FAILURE_STATE] * 2


class RecordingExp:
    """Stub M_exp: records calls; answers every step with a purchase that 'succeeds'."""

    def __init__(self):
        self.calls = 0
        self.malformed = 0

    def step(self, prompts):
        self.calls += len(prompts)
        return [("ok", "item: red cotton shirt $25 sizes{M} [buy] [back]", 0.0, 0.0) if "act: buy" not in p
                else ("ok", D.DONE_STATE, 1.0, 1.0) for p in prompts]

    def gen_tasks(self, seeds, n):
        self.calls += len(seeds) * n
        return [["buy a red shirt, under $30"] * n for _ in seeds]


def test_eval_uses_only_real_env_and_eval_tasks_never_enter_buffer():
    args = D.parse_args(["--n_products", "30", "--n_train_tasks", "12", "--n_eval_tasks", "6", "--n_expert", "12",
                         "--n_random", "6", "--bc_trajectories", "2", "--horizon", "6"])
    world = D.build_world(args)
    policy, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    stub = RecordingExp()
    buf = D.make_buffer(world, args, set(world.eval_tasks))
    dream = D.DreamWorld(stub, buf, 3, 100, args.horizon)
    ctx = D.Ctx(args, world.shop, policy, tok, torch.device("cpu"))
    before = (world.shop.real_steps, world.shop.diag_steps)
    acc = D.evaluate(ctx, world.eval_tasks, greedy=True)
    assert stub.calls == 0 and 0.0 <= acc <= 1.0
    assert world.shop.diag_steps > before[1] and world.shop.real_steps == before[0]  # eval = diagnostic real steps
    # a synthetic iteration: M_exp called, no real step; its transitions may enter the buffer, eval tasks not
    trajs = D.rollout(policy, tok, dream, world.train_tasks[:2], 2, 1.0, torch.Generator().manual_seed(0), "score",
                      torch.device("cpu"), "syn")
    assert stub.calls > 0 and world.shop.real_steps == before[0]
    buf.add([{**t, "real": False} for tr in trajs for t in tr.transitions])
    assert not {e["task"] for e in buf.entries()} & set(world.eval_tasks)
    evil = D.rollout(policy, tok, dream, world.eval_tasks[:1], 1, 1.0, torch.Generator().manual_seed(0), "score",
                     torch.device("cpu"), "x")
    with pytest.raises(ValueError):
        buf.add([t for tr in evil for t in tr.transitions])
    # the stub's "successes" are hallucinations when replayed in the real env (it claims every buy succeeds)
    h = D.hallucination_split(world.shop, trajs, 64)
    rate, n = h["rate"], h["n"]
    assert n == sum(t.reward >= 1 for t in trajs) and 0.0 <= rate <= 1.0


# ---- experience model through OpenAI-compatible servers ------------------------------------------


class _Fixed(http.server.BaseHTTPRequestHandler):
    replies: list = []
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(req)
        content = type(self).replies[min(len(type(self).seen), len(type(self).replies)) - 1]
        body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def fixed_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fixed)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def _endpoint_args(url):
    return D.parse_args(["--exp_api_base", url, "--exp_api_model", "m", "--exp_temperature", "0.7"])


def test_endpoint_experience_model_drives_a_synthetic_step(fixed_server):
    good = json.dumps({"reasoning": "shirt/shirt ok", "next_state": "done", "reward": 1, "done": 1})
    _Fixed.replies, _Fixed.seen = ["not json", good], []
    url = f"http://127.0.0.1:{fixed_server.server_address[1]}/v1"
    expm, name = D.load_or_train_exp(None, _endpoint_args(url), {"top_k": 3, "reasoning": True}, "cpu")
    dream = D.DreamWorld(expm, D.ReplayBuffer(), 3, 100, 10)
    ep = dream.reset("buy a red shirt, under $30", "e")
    ep.state = "item: red cotton shirt $25 sizes{M} [buy] [back]"
    (s2, r, d, info), = dream.step_batch([ep], ["buy"])
    assert (s2, r, d) == ("done", 1.0, True) and name == "endpoint"
    assert expm.retried == 1 and expm.malformed == 0 and len(_Fixed.seen) == 2  # malformed reply retried once
    assert _Fixed.seen[0]["messages"][0]["role"] == "system" and "act: buy" in _Fixed.seen[0]["messages"][1]["content"]


def test_endpoint_malformed_replies_are_retried_then_counted(fixed_server):
    _Fixed.replies, _Fixed.seen = ["garbage"], []
    url = f"http://127.0.0.1:{fixed_server.server_address[1]}/v1"
    expm, _ = D.load_or_train_exp(None, _endpoint_args(url), {"top_k": 3, "reasoning": True}, "cpu")
    dream = D.DreamWorld(expm, D.ReplayBuffer(), 3, 100, 10)
    ep = dream.reset("buy a red shirt, under $30", "e")
    (s2, r, d, info), = dream.step_batch([ep], ["search[red shirt]"])
    assert (s2, r, d) == (D.FAILURE_STATE, 0.0, True) and info["malformed"]
    assert len(_Fixed.seen) == 3 and expm.malformed == 1 and dream.stats["malformed"] == 1  # 1 + 2 retries


def test_endpoint_task_generator_gets_grammar_and_task_temperature(fixed_server):
    _Fixed.replies, _Fixed.seen = ["'buy a red wool shirt, under $40'."], []
    url = f"http://127.0.0.1:{fixed_server.server_address[1]}/v1"
    args = _endpoint_args(url)
    args.task_temperature = 0.9
    expm, _ = D.load_or_train_exp(None, args, {"top_k": 3, "reasoning": True}, "cpu")
    out = expm.gen_tasks(["buy a red shirt, under $40"], 2)
    assert out == [["buy a red wool shirt, under $40"] * 2]  # quotes and the full stop stripped
    assert len(_Fixed.seen) == 2 and all(r["temperature"] == 0.9 for r in _Fixed.seen)
    sys_msg = _Fixed.seen[0]["messages"][0]
    assert sys_msg["role"] == "system" and "under $CAP" in sys_msg["content"] and "cotton" in sys_msg["content"]
    assert "buy a red shirt, under $40" in _Fixed.seen[0]["messages"][1]["content"]


def test_experience_model_through_common_serve_openai():
    """A local HF model served by common.serve_openai plays M_exp over HTTP: an untrained model's
    replies are malformed, so they are retried and counted, and the step is the failure transition."""
    model, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    server = C.serve_openai(C.LLM(model=model, tokenizer=tok), model_name="toy")
    try:
        llm = C.LLM.from_endpoint(server.url, "toy")
        expm = D.ExperienceModel(llm, temperature=0.0, max_new_tokens=8, retries=1)
        out = expm.step(["task: buy a hat, under $10\nhist: \nstate: search: [search box]\nact: search[hat]\n>"])
        assert out == [None] and expm.malformed == 1 and expm.retried == 1 and llm.usage["calls"] >= 2
        assert all(isinstance(v, list) for v in expm.gen_tasks(["buy a hat, under $10"], 2))
    finally:
        server.shutdown()


def test_exp_output_parsing():
    assert D.parse_exp_output("<think>x</think><state>done</state><reward>1</reward><done>1</done>") == \
        ("x", "done", 1.0, 1.0)
    assert D.parse_exp_output(D.exp_target("", "results p1: a", 0, 0, reasoning=False)) == ("", "results p1: a", 0.0, 0.0)
    assert D.parse_exp_output('```json\n{"reasoning": "r", "next_state": "s", "reward": 0, "done": 0}\n```') == \
        ("r", "s", 0.0, 0.0)
    assert D.parse_exp_output("<state>done</state>") is None and D.parse_exp_output("{}") is None


def _offline_row(**kw):
    row = dict(task="buy a red shirt, under $30", state="item: red cotton shirt $25 sizes{M} [buy] [back]",
               action="buy", next_state="done", reward=1.0, done=1, episode="a")
    row.update(kw)
    return json.dumps(row)


def test_offline_file_binary_reward_pair_history_and_bad_line(tmp_path):
    path = tmp_path / "off.jsonl"
    path.write_text("\n".join([
        _offline_row(history=[["search: [search box]", "search[red shirt]"], {"action": "click[1]"}]),
        _offline_row(episode="b", reward=0.67, history=["search[red shirt]"]),
        _offline_row(episode="c", reward=0.5, success=True)]) + "\n")
    trajs = {tr[0]["ep"]: tr[0] for tr in D.load_offline_file(str(path))}
    assert trajs["a"]["hist"] == ["search[red shirt]", "click[1]"] and trajs["a"]["r"] == 1.0
    assert trajs["b"]["r"] == 0.0 and trajs["b"]["r_raw"] == pytest.approx(0.67)  # r = 1 iff success; raw kept
    assert trajs["c"]["r"] == 1.0 and trajs["c"]["r_raw"] == 0.5
    assert D.exp_prompt(trajs["a"]["task"], trajs["a"]["hist"], [], "s", "a").count("search[red shirt];click[1]") == 1
    path.write_text(_offline_row() + "\n" + _offline_row(reward="lots") + "\n")
    with pytest.raises(C.UserError, match=r"off\.jsonl:2: bad offline transition"):
        D.load_offline_file(str(path))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dreamgym.py"), "--offline_file", str(path),
                        "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "off.jsonl:2:" in r.stderr


def test_flag_defaults_follow_the_model_kind():
    toy = D.parse_args([])
    assert (toy.exp_max_new_tokens, toy.max_action_tokens) == (64, 32)
    real = D.parse_args(["--exp_api_base", "http://x/v1", "--model_name_or_path", "some/model"])
    assert (real.exp_max_new_tokens, real.max_action_tokens) == (512, 256)
    assert D.parse_args(["--exp_model_name_or_path", "m", "--exp_max_new_tokens", "99"]).exp_max_new_tokens == 99
    with pytest.raises(SystemExit):  # --retriever embed was accepted and ignored; the flag is gone
        D.parse_args(["--retriever", "embed"])


def test_s2r_real_cap_follows_real_grpo_steps():
    args = D.parse_args(["--real_budget", "5000", "--s2r_frac", "0.1"])
    assert D.real_step_cap("real_grpo", args, None) == (5000, "N")
    assert D.real_step_cap("s2r", args, 1675) == (167, "real_grpo")  # 10% of what real_grpo used
    assert D.real_step_cap("s2r", args, None) == (500, "N")  # real_grpo did not run: 10% of N
    assert D.real_step_cap("dreamgym", args, 1675) == (0, None)


def test_generate_mode_logp_old_matches_update_logp():
    """Generate mode: logp_old is recomputed with the update's function, so rho = 1 before any update
    (C.generate's cached fp32 log-probs differ from token_logprobs under bf16 autocast)."""
    policy, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    trajs = D.rollout(policy, tok, D.RealWorld(_shop()), ["buy a red shirt, under $30"], 3, 1.0,
                      torch.Generator().manual_seed(0), "generate", torch.device("cpu"), "g", max_action_tokens=12)
    units = [u for t in trajs for u in t.units]
    assert units and all(len(u.logp_old) == len(u.ids) for u in units)  # whole prompt + response, recomputed
    assert all(int(u.resp_mask.sum()) <= 12 for u in units)  # --max_action_tokens
    logp, old, mask = D.policy_logp_units(policy, tok, units, torch.device("cpu"), "generate")
    assert mask.sum() > 0
    torch.testing.assert_close(logp * mask, old * mask, atol=1e-6, rtol=0)


def test_generate_mode_prompt_uses_instruction_and_chat_template():
    policy, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    acts = D.admissible(D.SEARCH_STATE, "buy a red shirt, under $30")
    text = D.policy_prompt("buy a red shirt, under $30", D.SEARCH_STATE, acts, instruct=True)
    assert "<think>" in text and "<action>" in text and acts[0] in text
    assert D.chat_prompts(tok, [text]) == [text]  # the byte tokenizer has no template
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    assert D.chat_prompts(tok, [text]) == [f"<|user|>{text}<|assistant|>"]
    args = D.parse_args(["--action_mode", "generate", "--model_name_or_path", "x"])
    assert D.is_instruct(args) and not D.is_instruct(D.parse_args(["--action_mode", "generate"]))


# ---- smoke run ---------------------------------------------------------------------------------------


SMOKE = ["--iterations", "2", "--tasks_per_iter", "2", "--group_size", "2", "--n_products", "30",
         "--n_train_tasks", "20", "--n_eval_tasks", "6", "--n_expert", "10", "--n_random", "10",
         "--bc_trajectories", "20", "--bc_epochs", "4", "--exp_epochs", "0.1", "--exp_max_new_tokens", "24",
         "--exp_layers", "1", "--exp_d_model", "32", "--eval_every", "1", "--n_heldout_eval", "4", "--horizon", "5",
         "--n_metric_buys", "6", "--n_metric_per_action", "2"]


# slow: a whole s2r subprocess run (~14 s); the arms run in-process against plain references in the default suite
@pytest.mark.slow
def test_smoke_s2r_writes_outputs(tmp_path):
    env = {**os.environ, "NANOPAPERS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dreamgym.py"), "--method", "s2r", *SMOKE,
                        "--real_budget", "400", "--output_dir", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("args.json", "metrics.jsonl", "summary.json", "dreamgym.png"):
        assert (out / f).is_file(), f
    summ = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    res = summ["results"][0]
    assert res["halluc_success"] is None or 0 <= res["halluc_success"] <= 1  # null, never NaN
    assert {"rollout_policy", "world", "forward", "backward", "optimizer", "eval"} <= set(res["time_split"])
    assert res["arm"] == "s2r" and 0 < res["real_train_steps"] <= 40 and res["real_train_steps"] <= 0.1 * 400  # <= s2r_frac x N real steps
    assert res["offline_real_steps"] > 0 and "eps_R" in res
    assert res["m_train"]["n_buys"] == res["m_new"]["n_buys"] == 6 and "M_exp on fresh real transitions" in summ["table"]
    assert res["m_new"]["failed_buys"] == 3 and res["halluc_state"] is not None
    # real_grpo did not run in this invocation: s2r's cap is s2r_frac x N, logged with N
    assert (res["real_step_cap"], res["real_cap_basis"], res["real_budget"]) == (40, "N", 400)
    assert summ["real_budget"] == 400 and summ["s2r_real_cap"] == {"0": 40} and "real_grpo budget N = 400" in summ["table"]
    rows = C.read_jsonl(out / "metrics.jsonl")
    assert {r["phase"] for r in rows} == {"synthetic", "real"} and all("forward" in r["time_s"] for r in rows)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["real_train_steps"] == 0 for r in rows if r["phase"] == "synthetic")
    last = r.stdout.strip().splitlines()[-1]  # the failure rates reach stdout (issue 9)
    assert last.startswith("done in") and f"M_exp malformed {res['malformed']}/{res['exp_calls']}" in last, last


def test_malformed_and_invalid_counts_reach_table_and_final_line():
    """Hand totals: M_exp malformed replies / calls summed over seeds per arm, '-' for an arm without M_exp;
    inadmissible eval answers summed over all runs."""
    base = dict(real_success=0.5, real_success_sampled=0.5, real_train_steps=0, real_step_cap=None, minutes=0.1,
                offline_real_steps=7)
    results = [dict(base, arm="bc", seed=0, eval_invalid=1), dict(base, arm="bc", seed=1, eval_invalid=0),
               dict(base, arm="dreamgym", seed=0, malformed=3, exp_calls=40, eval_invalid=2),
               dict(base, arm="dreamgym", seed=1, malformed=1, exp_calls=60, eval_invalid=0, real_success=0.25)]
    table = D.results_table(results)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert "M_exp malformed" in rows["arm"] and "| 4/100 (4.0%) | 2 |" in rows["dreamgym"]
    assert "| - | 1 |" in rows["bc"]
    # mean ± sample std over seeds (ddof 1, as the other files' tables): 0.5, 0.25 -> 0.375 ± 0.177
    assert rows["dreamgym"].split("|")[2].strip() == "0.375 ± 0.177"
    line = D.final_line(results, 90.0, "out")
    assert line == ("done in 1.5 min: real success bc 0.500, dreamgym 0.375 (M_exp malformed 4/100 (4.0%)); "
                    "inadmissible eval answers 3  (out)")


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, "NANOPAPERS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                        os.path.join(ROOT, "dreamgym.py"), "--method", "dreamgym,real_grpo", *SMOKE,
                        "--output_dir", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summ = json.load(open(out / "summary.json"))
    res = {x["arm"]: x for x in summ["results"]}
    assert set(res) == {"dreamgym", "real_grpo"}
    assert res["dreamgym"]["real_train_steps"] == 0  # dreamgym: no new real steps on any rank
    assert 0 < res["real_grpo"]["real_train_steps"] <= 2 * 2 * 5 * 2  # summed over ranks: iters x groups x G x H


def test_prefix_shared_scoring_equals_pair_scoring_with_grad():
    model, tok = C.tiny_lm(n_layer=2, d_model=32, seed=1)
    prompts = ["buy a red shirt, under $30\nsearch: [search box]\n>", "buy a hat, under $9\nresults p1: [1] red hat $5 [back]\n>"]
    acts = [D.admissible(D.SEARCH_STATE, "buy a red shirt, under $30"), ["click[1]", "back"]]
    a = D.score_actions(model, tok, prompts, acts, torch.device("cpu"))
    b = D.score_actions_pairs(model, tok, prompts, acts, torch.device("cpu"))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    a[0][1].backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    D.score_actions_pairs(model, tok, prompts, acts, torch.device("cpu"))[0][1].backward()
    for x, p in zip(g1, model.parameters()):
        torch.testing.assert_close(x, p.grad, atol=1e-4, rtol=1e-3)


def test_grpo_loss_normaliser_splits_like_one_batch():
    """Two shards each normalised by the global unit count sum to the full-batch token mean (DDP scaling)."""
    logp = torch.randn(6, 3, requires_grad=True)
    old, adv, mask = torch.randn(6, 3) * 0.1, torch.randn(6), (torch.rand(6, 3) > 0.3).float()
    full, _ = D.grpo_loss(logp, old, adv, mask)
    n = float(mask.sum())
    parts = sum(D.grpo_loss(logp[s], old[s], adv[s], mask[s], normalizer=n)[0] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(full, parts)


# ---- one GRPO update against a plain reference (loops over units and tokens) ---------------------------


def _byte_ids(text):
    """ByT5 ids, by hand: byte value + 3 (0 pad, 1 eos, 2 unk)."""
    return [b + 3 for b in text.encode()]


def _ref_action_logp(model, prompt, actions, k):
    """log pi(actions[k] | prompt), Eq. (7), the plain way: one full forward per (prompt + action), the
    action's token log-probs (EOS included) summed, then a log-softmax over the admissible actions."""
    seq = []
    for a in actions:
        p, r = _byte_ids(prompt), _byte_ids(a) + [1]
        logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        total = 0.0
        for j in range(len(p), len(p) + len(r)):
            total = total + torch.log_softmax(logits[j - 1], -1)[(p + r)[j]]
        seq.append(total)
    seq = torch.stack(seq)
    return seq[k] - torch.logsumexp(seq, 0)


def _ref_advantages(rewards, G):
    out = []
    for g in range(0, len(rewards), G):
        grp = rewards[g:g + G]
        mean = sum(grp) / G
        std = (sum((x - mean) ** 2 for x in grp) / (G - 1)) ** 0.5 if G > 1 else 0.0
        out += [0.0 if G == 1 else (x - mean) / (std + 1e-6) for x in grp]
    return out


def _fixed_trajectories(model):
    """6 one-step trajectories (2 groups of 3) on two states; logp_old = the current log-prob shifted so
    that the ratios rho are 0.6, 1.0, 1.4, 1.1, 0.9, 1.5: with these advantages some units are clipped
    (zero gradient) and the others are not."""
    task = "buy a red shirt, under $30"
    states = [D.SEARCH_STATE, "results p1: [1] red cotton shirt $25 | [2] blue wool hat $10 [back]"]
    rhos = [0.6, 1.0, 1.4, 1.1, 0.9, 1.5]
    trajs = []
    for i, (r, rho) in enumerate(zip([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], rhos)):
        st = states[i // 3]
        acts = D.admissible(st, task)
        k = i % len(acts)
        prompt = D.policy_prompt(task, st)
        with torch.no_grad():
            lp = float(_ref_action_logp(model, prompt, acts, k))
        t = D.Trajectory(task, f"e{i}", True, reward=r)
        t.units = [D.Unit(prompt, acts, k, lp - math.log(rho))]
        trajs.append(t)
    return trajs


def _ref_update(model, trajs, G, lr, minibatches, clip_low=0.2, clip_high=0.28, beta=0.0, ref_model=None):
    """Plain GRPO update with SGD: per minibatch, loss = sum over its units of -min(rho A, clip(rho) A)
    (+ beta k3 KL) divided by the minibatch's unit count; returns (losses, clipped count)."""
    adv = _ref_advantages([t.reward for t in trajs], G)
    losses, clipped = [], 0
    for mb in minibatches:
        model.zero_grad()
        loss = 0.0
        for i in mb:
            u = trajs[i].units[0]
            logp = _ref_action_logp(model, u.prompt, u.actions, u.idx)
            rho = torch.exp(logp - u.logp_old)
            a = adv[i]
            r_ = float(rho.detach())
            clipped_rho = torch.clamp(rho, 1 - clip_low, 1 + clip_high)
            term = -torch.minimum(rho * a, clipped_rho * a)
            clipped += int(r_ * a > min(max(r_, 1 - clip_low), 1 + clip_high) * a)  # the clipped branch is the min
            if beta > 0:
                with torch.no_grad():
                    ref = _ref_action_logp(ref_model, u.prompt, u.actions, u.idx)
                term = term + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
            loss = loss + term
        loss = loss / len(mb)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        losses.append(float(loss.detach()))
    return losses, clipped


@pytest.mark.parametrize("pdbs,minibatches,beta", [(256, 1, 0.0), (2, 1, 0.0), (256, 2, 0.0), (2, 1, 0.3)])
def test_grpo_update_matches_plain_reference(pdbs, minibatches, beta):
    """grpo_update (prefix-shared scoring, micro-batches of --per_device_batch_size, minibatch
    normalisation, the beta k3 term) == a loop reference; the gradient is far from zero and some units
    are clipped, so the comparison is not zero against zero."""
    model, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    ref_model = None
    if beta > 0:  # a reference policy that differs from the policy
        ref_model, _ = C.tiny_lm(n_layer=1, d_model=16, seed=1)
    trajs = _fixed_trajectories(model)
    start = [p.detach().clone() for p in model.parameters()]
    args = D.parse_args(["--ppo_epochs", "1", "--num_minibatches", str(minibatches), "--per_device_batch_size",
                         str(pdbs), "--max_grad_norm", "1e9", "--beta", str(beta)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = D.grpo_update(model, tok, opt, trajs, 3, args, torch.device("cpu"), 1, random.Random(7), ref_model)
    got = [p.detach().clone() for p in model.parameters()]
    # the reference follows the same minibatch order: random.Random(7) shuffles range(6) once
    order = list(range(6))
    random.Random(7).shuffle(order)
    mbs = [order[i::minibatches] for i in range(minibatches)]
    ref, _ = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    losses, clipped = _ref_update(ref, trajs, 3, 0.1, mbs, beta=beta, ref_model=ref_model)
    assert stats["loss"] == pytest.approx(sum(losses) / minibatches, rel=1e-4, abs=1e-5)
    if minibatches == 1:
        assert 1 <= clipped < 6 and stats["clip_frac"] == pytest.approx(clipped / 6)
    moved = sum(float((g - s).abs().sum()) for g, s in zip(got, start))
    assert moved > 1e-2  # a real update, not zero against zero
    for g, r in zip(got, ref.parameters()):
        torch.testing.assert_close(g, r.detach(), atol=2e-5, rtol=1e-4)


# ---- bookkeeping the table reports: hand totals -------------------------------------------------------


# the real states of _shop() (written out by hand): "red shirt" finds products 0, 3 (2 words), 1, 2 (1 word)
RESULTS = "results p1: [1] red cotton shirt $25 | [2] red wool shirt $45 | [3] blue cotton shirt $20 [next] [back]"
ITEM0 = "item: red cotton shirt $25 sizes{S,M} [buy] [back]"
ITEM3 = "item: red wool shirt $45 sizes{L} [buy] [back]"


def _traj(task, actions, reward, synthetic=True, states=None):
    """A recorded rollout; `states` = the state before each action (default: the real ones of _shop())."""
    t = D.Trajectory(task, "x", synthetic, reward=reward)
    if states is None:
        shop, ep, states = _shop(), None, []
        ep = shop.reset(task, "s")
        for a in actions:
            states.append(ep.state)
            if not ep.done:
                shop.step(ep, a)
    t.transitions = [dict(a=a, s=s) for a, s in zip(actions, states)]
    return t


def test_hallucination_rate_hand_count():
    """The last n synthetic successes are replayed in the real env: 2 of 3 fail (wrong colour bought;
    an action inadmissible in the real env); real rollouts and synthetic failures are not counted.
    Split: the wrong-item buy saw only real states (reward-caused); the XL select came from a hallucinated
    item page after click (state-caused, first wrong state made by `click`)."""
    shop = _shop()
    task = "buy a red shirt, size M, under $30"
    ok = ["search[red shirt]", "click[1]", "select[M]", "buy"]  # product 0: red cotton shirt, sizes S, M, $25
    xl = ["search[red shirt]", "click[1]", "select[XL]", "buy"]
    xl_states = [D.SEARCH_STATE, RESULTS, "item: red cotton shirt $25 sizes{S,M,XL} [buy] [back]",
                 "item: red cotton shirt $25 sizes{S,M,XL} sel{XL} [buy] [back]"]  # M_exp invented size XL
    trajs = [_traj(task, ok, 1.0), _traj(task, ["search[red shirt]", "click[2]", "buy"], 1.0),  # red wool $45: fails
             _traj(task, ok, 1.0, synthetic=False), _traj(task, ok, 0.0),
             _traj(task, xl, 1.0, states=xl_states)]  # XL not offered: inadmissible, fails there
    assert [t.transitions[1]["s"] for t in trajs[:2]] == [RESULTS, RESULTS] and trajs[1].transitions[2]["s"] == ITEM3
    def rate(ts, n):
        h = D.hallucination_split(shop, ts, n)
        return h["rate"], h["n"]

    assert rate(trajs, 64) == (pytest.approx(2 / 3), 3)
    assert rate(trajs, 2) == (pytest.approx(1.0), 2)  # the last 2 successes both fail
    assert rate(trajs[:1], 64) == (0.0, 1)
    assert rate([], 64) == (None, 0)
    assert shop.real_steps == 0 and shop.diag_steps == (4 + 3 + 3) + (3 + 3) + 4  # replays: diagnostic steps
    h = D.hallucination_split(shop, trajs, 64)
    assert (h["n"], h["state"], h["reward"], h["first_wrong"]) == (3, 1, 1, {"click": 1})
    wrong_results = _traj(task, ["search[red shirt]", "click[1]", "buy"], 1.0,  # M_exp's page lists a $25 wool shirt
                          states=[D.SEARCH_STATE, "results p1: [1] red wool shirt $25 [back]", ITEM0])
    h = D.hallucination_split(shop, [wrong_results, trajs[1]], 64)
    assert (h["rate"], h["state"], h["reward"], h["first_wrong"]) == (1.0, 1, 1, {"search": 1})


def test_diagnostic_worlds_one_step_against_plain_rules():
    """exp_states (DreamWorld reward="true"): M_exp's next state and done, the real rule's reward on M_exp's item
    state; exp_reward (ExpRewardWorld): ShopLite's state (a real step), M_exp's reward on the purchase."""
    task = "buy a red shirt, size M, under $30"
    sel_state = "item: red wool shirt $25 sizes{M} sel{M} [buy] [back]"  # M_exp's (hallucinated) item page

    def plain_true(task_words, state):  # the reward rule written out for this task: red, shirt, size M, <= $30
        m = re.match(r"item: (\w+) (\w+) (\w+) \$(\d+) sizes\{([A-Z,]*)\}(?: sel\{(\w+)\})?", state)
        if not m:
            return 0.0
        c, _, cat, price, sizes, sel = m.groups()
        return float(c == "red" and cat == "shirt" and int(price) <= 30 and sel == "M" and "M" in sizes.split(","))

    for state, want in ((sel_state, 1.0), (sel_state.replace("red", "blue"), 0.0),
                        (sel_state.replace(" sel{M}", ""), 0.0), (sel_state.replace("$25", "$35"), 0.0)):
        exp = RecordingExp()  # answers every buy with done, reward 1
        dream = D.DreamWorld(exp, D.ReplayBuffer(), 0, 100, 10, reward="true")
        ep = dream.reset(task, "e")
        ep.state = state
        (s2, r, d, _), = dream.step_batch([ep], ["buy"])
        assert (s2, d, r) == (D.DONE_STATE, True, want) == (D.DONE_STATE, True, plain_true(task, state))
        assert D.true_success(task, state) == want
        plain = D.DreamWorld(RecordingExp(), D.ReplayBuffer(), 0, 100, 10)  # dreamgym: M_exp's reward
        ep = plain.reset(task, "e")
        ep.state = state
        assert plain.step_batch([ep], ["buy"])[0][1] == 1.0
    # a non-purchase step: M_exp's state, reward 0
    dream = D.DreamWorld(RecordingExp(), D.ReplayBuffer(), 0, 100, 10, reward="true")
    ep = dream.reset(task, "e")
    assert dream.step_batch([ep], ["search[red shirt]"])[0][:3] == ("item: red cotton shirt $25 sizes{M} [buy] [back]",
                                                                    0.0, False)
    # exp_reward: real states, M_exp's reward (RecordingExp says every buy succeeds; the real buy of the $45 red
    # wool shirt fails)
    shop, exp = _shop(), RecordingExp()
    world = D.ExpRewardWorld(shop, exp, D.ReplayBuffer(), 0, 100)
    ep = world.reset(task, "e")
    outs = [world.step_batch([ep], [a])[0] for a in ("search[red shirt]", "click[2]", "buy")]
    assert [o[0] for o in outs] == [RESULTS, ITEM3, D.DONE_STATE] and [o[1] for o in outs] == [0.0, 0.0, 1.0]
    assert exp.calls == 1 and shop.real_steps == 3 and world.synthetic  # only the purchase asks M_exp
    real = _shop()
    _, steps = _run(real, task, ["search[red shirt]", "click[2]", "buy"])
    assert [o[0] for o in steps] == [o[0] for o in outs] and steps[-1][3]["success"] == 0.0


class _TableExp(D.ExperienceModel):
    """An M_exp whose answers come from a table {action: (next_state, reward)} (no model)."""

    def __init__(self, table):
        super().__init__(_NoLLM(), reasoning=True)
        self.table = table

    def _ask(self, prompts, temperature, max_tokens, json_mode):
        out = []
        for p in prompts:
            act = [ln[5:] for ln in p.splitlines() if ln.startswith("act: ")][0]
            task = [ln[6:] for ln in p.splitlines() if ln.startswith("task: ")][0]
            s2, r = self.table[(task, act)]
            out.append(D.exp_target("x", s2, r, float(s2 == D.DONE_STATE)))
        return out


class _NoLLM:
    client = None
    is_local = False


def test_exp_model_error_hand_totals():
    """eps_R, false success (among held-out FAILED purchases), buy accuracy and eps_P on a hand-made set."""
    item = "item: red cotton shirt $25 sizes{S,M} [buy] [back]"
    tasks = [f"buy a red shirt, under ${c}" for c in (30, 31, 32, 33, 34)]

    def buy(task, r):
        return dict(task=task, ep=task, hist=[], s=item, a="buy", s2=D.DONE_STATE, r=r, d=1.0, R="", real=True)

    held = [[buy(tasks[0], 0.0)], [buy(tasks[1], 0.0)], [buy(tasks[2], 0.0)], [buy(tasks[3], 1.0)],
            [buy(tasks[4], 1.0)],
            [dict(task=tasks[0], ep="s", hist=[], s=D.SEARCH_STATE, a="search[red shirt]", s2="results p1: a [back]",
                  r=0.0, d=0.0, R="", real=True),
             dict(task=tasks[0], ep="s", hist=[], s=D.SEARCH_STATE, a="checkout", s2=D.FAILURE_STATE, r=0.0, d=1.0,
                  R="", real=True)]]  # inadmissible: the rule's job, not M_exp's: skipped
    table = {(tasks[0], "buy"): (D.DONE_STATE, 1), (tasks[1], "buy"): (D.DONE_STATE, 0),
             (tasks[2], "buy"): (D.DONE_STATE, 0), (tasks[3], "buy"): (D.DONE_STATE, 0),
             (tasks[4], "buy"): (D.DONE_STATE, 1), (tasks[0], "search[red shirt]"): ("results p1: b [back]", 0)}
    err = D.exp_model_error(_TableExp(table), D.ReplayBuffer(), held, 0, 100, 150)
    # predictions on 6 transitions: wrong rewards on tasks[0] (false success) and tasks[3] (missed success)
    assert err["n_heldout"] == 6 and err["eps_R"] == pytest.approx(2 / 6)
    assert (err["false_success_n"], err["failed_buys"]) == (1, 3) and err["false_success"] == pytest.approx(1 / 3)
    assert err["n_buys"] == 5 and err["buy_acc"] == pytest.approx(3 / 5)
    assert err["eps_P_exact"] == pytest.approx(5 / 6)  # the search result differs
    assert err["buy_success_base"] == pytest.approx(2 / 5)


def test_exp_metrics_per_action_and_balanced_purchases_hand_totals():
    """exp_metrics: exact next state per action type, purchase accuracy, false successes among failed purchases
    and missed successes among successful ones, on a hand-made set with a table M_exp."""
    tasks = [f"buy a red shirt, under ${c}" for c in (30, 31, 32, 33, 34)]

    def tr(task, a, s, s2, r):
        return dict(task=task, ep=task + a, hist=[], s=s, a=a, s2=s2, r=r, d=float(s2 == D.DONE_STATE), R="",
                    real=True)

    sets = {"buy": [tr(tasks[0], "buy", ITEM0, D.DONE_STATE, 0.0), tr(tasks[1], "buy", ITEM0, D.DONE_STATE, 0.0),
                    tr(tasks[4], "buy", ITEM0, D.DONE_STATE, 0.0),
                    tr(tasks[2], "buy", ITEM0, D.DONE_STATE, 1.0), tr(tasks[3], "buy", ITEM0, D.DONE_STATE, 1.0)],
            "search": [tr(tasks[0], "search[red shirt]", D.SEARCH_STATE, RESULTS, 0.0),
                       tr(tasks[1], "search[red shirt]", D.SEARCH_STATE, RESULTS, 0.0)],
            "click": [tr(tasks[0], "click[1]", RESULTS, ITEM0, 0.0)]}
    table = {(tasks[0], "buy"): (D.DONE_STATE, 1), (tasks[1], "buy"): (D.DONE_STATE, 0),  # 1 false success of 3
             (tasks[4], "buy"): (D.DONE_STATE, 0),
             (tasks[2], "buy"): (D.FAILURE_STATE, 0), (tasks[3], "buy"): (D.DONE_STATE, 1),  # 1 missed, 1 wrong state
             (tasks[0], "search[red shirt]"): (RESULTS, 0), (tasks[1], "search[red shirt]"): ("results p1: x", 0),
             (tasks[0], "click[1]"): (ITEM3, 0)}
    m = D.exp_metrics(_TableExp(table), D.ReplayBuffer(), sets, 0, 100)
    assert (m["n_buys"], m["failed_buys"], m["ok_buys"]) == (5, 3, 2)
    assert m["buy_acc"] == pytest.approx(3 / 5) and (m["false_success"], m["false_success_n"]) == (pytest.approx(1 / 3), 1)
    assert (m["missed"], m["missed_n"]) == (0.5, 1)
    assert m["state_acc"] == {"buy": 0.8, "search": 0.5, "click": 0.0} and m["n"] == {"buy": 5, "search": 2, "click": 1}


def test_metric_transitions_are_balanced_fresh_and_diagnostic(tiny_world):
    """The measurement set: n_buys purchases, exactly half failed; per-type quotas; copies of SFT transitions
    left out; its real steps are diagnostic (training counter untouched)."""
    w = tiny_world
    seen = {D.sft_key(t) for tr in w.offline for t in tr}
    real0, diag0 = w.shop.real_steps, w.shop.diag_steps
    sets = D.metric_transitions(w.shop, w.train_tasks, 20, 5, random.Random(0), "m", exclude=seen)
    assert [t["r"] for t in sets["buy"]] == [1.0] * 10 + [0.0] * 10
    assert all(len(sets[k]) == 5 for k in ("search", "click", "back"))
    assert all(D.action_type(t["a"]) == k for k, v in sets.items() for t in v)
    assert not any(D.sft_key(t) in seen for v in sets.values() for t in v)
    assert w.shop.real_steps == real0 and w.shop.diag_steps > diag0
    w.shop.diag_steps = diag0


def test_exp_cache_key_holds_only_what_changes_m_exp():
    """--n_eval_tasks, --horizon and policy flags leave M_exp's data and recipe (the cache key) unchanged; its data,
    architecture and recipe change it."""
    base = TINY + ["--n_random", "4"]
    key = lambda extra: D.exp_cache_key(D.build_world(D.parse_args(base + extra)), D.parse_args(base + extra),
                                        {"top_k": 2, "reasoning": True})[0]
    k0 = key([])
    assert key(["--n_eval_tasks", "9"]) == k0 and key(["--horizon", "3"]) == k0  # 3 < the expert's 4 steps
    assert key(["--iterations", "5", "--learning_rate", "1e-3", "--n_metric_buys", "10"]) == k0
    assert key(["--n_expert", "11"]) != k0 and key(["--exp_layers", "1"]) != k0 and key(["--exp_patience", "3"]) != k0
    assert key(["--n_train_tasks", "21"]) != k0


def test_exp_early_stopping_keeps_the_best_weights(monkeypatch):
    """Held-out loss every eval_every epochs; stop after `patience` evaluations without improvement; the weights
    of the best evaluation are restored."""
    model, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
    ex = [(f"p{i}", f"t{i}") for i in range(8)]  # 8 examples, batch 4: eval every 2 steps at eval_every 1 epoch
    script, snaps = iter([3.0, 2.0, 2.5, 2.1, 1.0]), []

    def fake_val(m, *a, **k):
        snaps.append({n: t.detach().clone() for n, t in m.state_dict().items()})
        return next(script)

    monkeypatch.setattr(D, "exp_val_loss", fake_val)
    info = {}
    losses = D.train_exp_model(model, tok, ex, 10, 1e-2, 4, 0, "cpu", val=[("a", "b")], eval_every=1.0, patience=2,
                               info=info)
    assert len(losses) == info["steps"] == 8 and info["max_steps"] == 20 and info["stopped_early"]
    assert info["val_curve"] == [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.1)] and info["best_step"] == 4
    assert all(torch.equal(model.state_dict()[n], t) for n, t in snaps[1].items())
    assert not all(torch.equal(model.state_dict()[n], t) for n, t in snaps[3].items())


def test_sft_examples_oversample_failed_purchases_and_add_task_pairs():
    """--fail_oversample 3: each failed purchase appears 3 times, successful ones once; plus
    len(transitions) // 6 M_task pairs (a train task -> another train task of its category)."""
    item = "item: red cotton shirt $25 sizes{S,M} [buy] [back]"
    tr = lambda ep, a, s2, r: dict(task="buy a red shirt, under $30", ep=ep, hist=[], s=item if a == "buy" else
                                   D.SEARCH_STATE, a=a, s2=s2, r=r, d=float(a == "buy"), R="why", real=True)
    trajs = [[tr("a", "search[red shirt]", "results p1: x [back]", 0.0), tr("a", "buy", D.DONE_STATE, 1.0)],
             [tr("b", "buy", D.DONE_STATE, 0.0)], [tr("c", "buy", D.DONE_STATE, 0.0)],
             [tr("d", "search[red shirt]", "results p1: y [back]", 0.0)] * 4]
    train = ["buy a red shirt, under $30", "buy a blue shirt, under $40", "buy a red hat, under $20"]
    cat = _shop().catalogue
    for over, n_fail in ((3, 6), (1, 2)):
        ex = D.exp_sft_examples(trajs, D.ReplayBuffer(), 0, 100, True, train, random.Random(0), over, catalogue=cat)
        flat = 8 + 2 * (over - 1)
        assert len(ex) == flat + flat // 6
        assert sum(p.endswith("act: buy\n>") and "<reward>0</reward>" in t for p, t in ex) == n_fail
        assert sum(p.endswith("act: buy\n>") and "<reward>1</reward>" in t for p, t in ex) == 1
        pairs = [(p[11:-2], t) for p, t in ex if p.startswith("<gen_task>")]
        assert len(pairs) == flat // 6
        # M_task's targets are feasible one-edit variants of their seed (not another task of the category)
        assert all(t in D.task_variants(p, cat) and D.task_edits(p, t) == 1 for p, t in pairs)
    assert not any(p.startswith("<gen_task>") for p, _ in  # no catalogue (an --offline_file run): no M_task pairs
                   D.exp_sft_examples(trajs, D.ReplayBuffer(), 0, 100, True, train, random.Random(0), 1))
    no_r = D.exp_sft_examples(trajs, D.ReplayBuffer(), 0, 100, False, train, random.Random(0), 1)
    assert not any("<think>" in t for _, t in no_r) and any("<think>" in t for _, t in ex)  # no_reasoning target


def test_curriculum_seeds_are_the_highest_variance_tasks():
    groups = [("t0", [1, 1, 1, 1]), ("t1", [1, 0, 0, 0]), ("t2", [1, 1, 0, 0]), ("t3", [0, 0, 0, 0]),
              ("t4", [1, 1, 1, 0]), ("t5", [0, 1, 0, 1])]
    # V = p(1-p): t2, t5 0.25; t1, t4 0.1875; t0, t3 0 (never seeds)
    assert D.curriculum_seeds(groups, 3) == ["t5", "t2", "t4"]
    assert D.curriculum_seeds(groups, 10) == ["t5", "t2", "t4", "t1"]
    assert D.curriculum_seeds(groups, 0) == []


def test_task_batch_takes_lambda_syn_share_from_the_pool():
    world = SimpleNamespace(train_tasks=[f"t{i}" for i in range(10)])
    pool = ["v0", "v1", "v2", "v3", "v4"]
    for lam, n, want in ((0.5, 4, 2), (0.3, 4, 1), (0.3, 3, 0), (1.0, 4, 4), (0.0, 4, 0), (1.0, 8, 5)):
        args = SimpleNamespace(lambda_syn=lam)
        b = D.task_batch(args, world, pool, random.Random(0), True, n)
        assert len(b) == n and b[:want] == pool[len(pool) - want:] and not set(b[want:]) & set(pool)
    assert not set(D.task_batch(SimpleNamespace(lambda_syn=1.0), world, pool, random.Random(0), False, 4)) & set(pool)


def test_ablation_variants():
    args = D.parse_args([])
    assert D.exp_variant("dreamgym", args) == {"top_k": 3, "reasoning": True}
    assert D.exp_variant("no_retrieval", args) == {"top_k": 0, "reasoning": True}
    assert D.exp_variant("no_reasoning", args) == {"top_k": 3, "reasoning": False}
    assert D.exp_variant("dreamgym", D.parse_args(["--top_k", "5", "--no_reasoning"])) == {"top_k": 5, "reasoning": False}


# ---- one arm against a plain reference (rule M_exp, recorded rollouts) ---------------------------------


def rule_answer(prompt: str) -> tuple[str, float, float]:
    """A rule experience model: a fixed result page and item; a purchase 'succeeds' iff a size was
    selected or the last 3 actions clicked item 2 (it hallucinates: the real env decides). Reads only its prompt."""
    act = [ln[5:] for ln in prompt.splitlines() if ln.startswith("act: ")][0]
    item = "item: red cotton shirt $25 sizes{S,M}"
    if act.startswith("search[") or act == "next":
        return "results p1: [1] red cotton shirt $25 | [2] blue wool hat $10 [back]", 0.0, 0.0
    if act.startswith("click["):
        return f"{item} [buy] [back]", 0.0, 0.0
    if act.startswith("select["):
        return f"{item} sel{{{act[7:-1]}}} [buy] [back]", 0.0, 0.0
    if act == "back":
        return D.SEARCH_STATE, 0.0, 0.0
    hist = [ln[6:] for ln in prompt.splitlines() if ln.startswith("hist: ")][0].split(";")
    success = "sel{" in [ln[7:] for ln in prompt.splitlines() if ln.startswith("state: ")][0] or "click[2]" in hist
    return D.DONE_STATE, float(success), 1.0  # a purchase 'succeeds' iff a size was selected or item 2 clicked


def rule_variant(seed_task: str) -> str:
    """A rule M_task: the seed task with its price cap raised by 1."""
    t = D.parse_task(seed_task)
    return D.Task(t.category, min(100, t.cap + 1), t.colour, t.material, t.size).text


class RuleExp(D.ExperienceModel):
    """rule_answer / rule_variant behind ExperienceModel (memo, counters, retries are the real ones);
    records every prompt it is asked."""

    def __init__(self):
        super().__init__(_NoLLM(), reasoning=True)
        self.asked = []

    def _ask(self, prompts, temperature, max_tokens, json_mode):
        self.asked += prompts
        return [rule_variant(p[11:].split("\n")[0]) if p.startswith("<gen_task>") else
                D.exp_target("r", *rule_answer(p)) for p in prompts]


TINY = ["--n_products", "30", "--n_train_tasks", "20", "--n_eval_tasks", "6", "--n_expert", "10", "--n_random", "10",
        "--bc_trajectories", "20", "--bc_epochs", "4", "--horizon", "5", "--tasks_per_iter", "2", "--group_size", "4",
        "--iterations", "3", "--eval_every", "2", "--ppo_epochs", "1", "--num_minibatches", "1",
        "--lambda_syn", "0.5", "--top_k", "2", "--curr_seeds", "2", "--curr_candidates", "1", "--n_halluc", "64"]


def _run_arm(arm, extra=(), world=None, exp=None, out_dir=None, **kw):
    """One arm on the tiny world with RuleExp; returns (result, rows, recorded rollouts, rule M_exp)."""
    args = D.parse_args(TINY + list(extra))
    world = world or D.build_world(args)
    exp = exp or RuleExp()
    cache = {json.dumps(D.exp_variant(a, args), sort_keys=True): (exp, "rule", {"eps_R": 0.5}, {})
             for a in ("dreamgym", "no_retrieval", "no_reasoning")}
    rows = []
    logger = SimpleNamespace(log=lambda step, **row: rows.append(dict(step=step, **row)))
    res = D.run_arm(arm, 0, args, world, cache, logger, None, torch.device("cpu"), out_dir=out_dir, **kw)
    return res, rows, world, exp


@pytest.fixture(scope="module")
def tiny_world():
    """One tiny world for the arm tests (its BC warm start is computed once and cached on it)."""
    return D.build_world(D.parse_args(TINY))


@pytest.fixture()
def recorded(monkeypatch):
    """Every rollout (training, evaluation) as (world, tasks, trajectories)."""
    calls = []
    real_rollout = D.rollout

    def rec(policy, tok, world, tasks, *a, **kw):
        trajs = real_rollout(policy, tok, world, tasks, *a, **kw)
        calls.append((world, list(tasks), trajs))
        return trajs

    monkeypatch.setattr(D, "rollout", rec)
    return calls


def _replay_fails(catalogue, task, actions):
    shop = D.ShopLite(catalogue, 3, 5)
    ep = shop.reset(task)
    success = 0.0
    for a in actions:
        if ep.done:
            break
        _, _, _, info = shop.step(ep, a)
        success = info["success"]
    return success < 1, shop.real_steps


def test_dreamgym_arm_matches_plain_reference(recorded, tiny_world):
    """One dreamgym arm (3 iterations x 2 tasks x G 4, rule M_exp): every number of its result row and its
    metrics rows recomputed from the recorded rollouts with loops."""
    res, rows, world, exp = _run_arm("dreamgym", world=tiny_world)
    G = 4
    train = [(w, t, tr) for w, t, tr in recorded if getattr(w, "synthetic", False)]
    evals = [(w, t, tr) for w, t, tr in recorded if not getattr(w, "synthetic", False)]
    assert len(train) == 3 and len(rows) == 3 and all(isinstance(w, D.DreamWorld) for w, _, _ in train)
    assert all(w.diag for w, _, _ in evals) and len(evals) == 1 + 1 + 2  # iter 0, iter 2, final greedy + sampled
    pool, zv_all, succ_all = [], [], []
    for k, ((_, tasks, trajs), row) in enumerate(zip(train, rows)):
        rewards = [t.reward for t in trajs]
        groups = [(tasks[g], rewards[g * G:(g + 1) * G]) for g in range(len(tasks))]
        zv = sum(len(set(r)) == 1 for _, r in groups) / len(groups)
        succ = sum(rewards) / len(rewards)
        adv = _ref_advantages(rewards, G)
        n_units = sum(len(t.units) for t in trajs)
        loss = -sum(a * len(t.units) for a, t in zip(adv, trajs)) / n_units  # rho = 1 in the only minibatch
        assert (row["iteration"], row["phase"], row["real_train_steps"]) == (k + 1, "synthetic", 0)
        assert row["zero_var_share"] == pytest.approx(zv) and row["rollout_success"] == pytest.approx(succ)
        assert row["loss"] == pytest.approx(loss, abs=1e-4)
        # lambda_syn 0.5 of 2 tasks: one curriculum task as soon as the pool holds one
        assert tasks[:1] == (pool[-1:] if pool else tasks[:1]) and (not pool or tasks[0] not in world.train_tasks)
        # curriculum: the highest-variance tasks (V > 0) seed M_task; its feasible new variants join the pool
        var = sorted(((sum((x - sum(r) / G) ** 2 for x in r) / G, t) for t, r in groups), reverse=True)
        seeds = [t for v, t in var if v > 0][:2]
        asked = [p[11:].split("\n")[0] for p in exp.asked if p.startswith("<gen_task>")]
        new = [rule_variant(s) for s in seeds]
        new = [v for v in new if v not in world.eval_tasks and v not in world.train_tasks and v not in pool
               and any(D.satisfies(D.parse_task(v), p) for p in world.shop.catalogue)]
        pool = (pool + sorted(dict.fromkeys(new), key=lambda c: -D.parse_task(c).n_constraints)[:2])[-32:]
        assert row.get("curr_kept", 0) <= len(seeds)
        zv_all.append(zv)
        succ_all.append(succ)
        assert "time_s" in row and {"rollout_policy", "world", "forward", "backward", "optimizer"} <= set(row["time_s"])
    assert asked == [s for _, t, tr in train for s in _seeds_of(t, tr, G)]
    assert pool, "the curriculum never produced a variant: the lambda_syn check above saw no pool task"
    # the top_k 2 demos: no M_exp prompt holds more than 2 retrieved transitions
    assert max(p.count("\nex: ") + p.startswith("ex: ") for p in exp.asked if not p.startswith("<gen")) == 2
    # the result row
    syn = [t for _, _, tr in train for t in tr]
    succ_syn = [t for t in syn if t.reward >= 1][-64:]
    replays = [_replay_fails(world.shop.catalogue, t.task, [x["a"] for x in t.transitions]) for t in succ_syn]
    assert res["halluc_n"] == len(succ_syn) > 0
    assert res["halluc_success"] == pytest.approx(sum(f for f, _ in replays) / len(replays))
    eval_steps = sum(len(t.transitions) for _, _, tr in evals for t in tr)
    assert res["diag_real_steps"] == eval_steps + sum(n for _, n in replays)
    assert res["real_train_steps"] == 0 and res["iterations"] == 3
    assert res["zero_var_share"] == pytest.approx(sum(zv_all) / 3)
    assert res["syn_success_last"] == pytest.approx(sum(succ_all) / 3)
    final_g, final_s = evals[-2][2], evals[-1][2]
    assert res["real_success"] == pytest.approx(sum(t.reward for t in final_g) / 6)
    assert res["real_success_sampled"] == pytest.approx(sum(t.reward for t in final_s) / 6)
    assert res["syn_real_gap"] == pytest.approx(res["syn_success_last"] - res["real_success_sampled"])
    assert res["exp_calls"] == len(exp.asked)  # every prompt the model answered, memo hits excluded
    assert [c[0] for c in res["curve"]] == [0, 2, 3]
    assert res["offline_real_steps"] == sum(len(t) for t in world.offline + world.heldout + world.bc)


def _seeds_of(tasks, trajs, G):
    rewards = [t.reward for t in trajs]
    groups = [(tasks[g], rewards[g * G:(g + 1) * G]) for g in range(len(tasks))]
    var = sorted(((sum((x - sum(r) / G) ** 2 for x in r) / G, t) for t, r in groups), reverse=True)
    return [t for v, t in var if v > 0][:2]


def test_real_grpo_arm_counts_real_steps_and_stops_at_the_budget(recorded, tiny_world):
    """real_grpo with N = 55: each iteration takes min(2, (N - used) // (G x H)) tasks; it stops when not
    one task fits; new real steps = the recorded real transitions; evaluation steps are diagnostic."""
    res, rows, world, _ = _run_arm("real_grpo", ["--real_budget", "55", "--iterations", "9"], world=tiny_world)
    train = [(w, t, tr) for w, t, tr in recorded if isinstance(w, D.RealWorld) and not w.diag]
    used, n_tasks = 0, []
    for _, tasks, trajs in train:
        n_tasks.append(len(tasks))
        assert len(tasks) == min(2, (55 - used) // (4 * 5))
        used += sum(len(t.transitions) for t in trajs)
    assert 55 - used < 20 or len(train) == 9  # the next batch would not fit
    assert res["real_train_steps"] == used and [r["real_train_steps"] for r in rows][-1] == used
    assert res["iterations"] == len(train) == len(rows) and res["real_step_cap"] == 55 and used <= 55
    evals = [tr for w, _, tr in recorded if isinstance(w, D.RealWorld) and w.diag]
    assert res["diag_real_steps"] == sum(len(t.transitions) for tr in evals for t in tr)
    assert res["halluc_success"] is None and "exp_calls" not in res


def _strip(res):
    return {k: v for k, v in res.items() if k not in ("minutes", "time_split", "log_step_end")}


def test_s2r_takes_over_dreamgym_exactly(tmp_path, tiny_world):
    """s2r after dreamgym (its synthetic phase loaded from dreamgym's end-of-loop checkpoint) == s2r run
    alone: the checkpoint holds every RNG, counter, buffer and pool; --s2r_frac sets the real cap."""
    flags = ["--real_budget", "400", "--s2r_frac", "0.2"]
    dream, _, world, exp = _run_arm("dreamgym", flags, world=tiny_world, out_dir=str(tmp_path))
    taken, rows, _, _ = _run_arm("s2r", flags, world=world, exp=exp, out_dir=str(tmp_path), log_step=3,
                                 dream_ckpt=str(tmp_path / "ckpt-dreamgym-s0"))
    alone, rows_alone, _, _ = _run_arm("s2r", flags, world=world, exp=RuleExp())
    assert _strip(taken) == _strip(alone)
    assert taken["real_step_cap"] == 80 and 0 < taken["real_train_steps"] <= 80  # --s2r_frac 0.2 x N
    assert taken["halluc_success"] == dream["halluc_success"] and taken["exp_calls"] == dream["exp_calls"]
    assert [r["step"] for r in rows] == [3 + 3 + i for i in range(1, len(rows) + 1)]  # its own steps after dreamgym's
    assert [r["phase"] for r in rows] == ["real"] * len(rows) == [r["phase"] for r in rows_alone[3:]]


def test_arm_defining_flags_change_the_result(recorded, tiny_world):
    """--method no_curriculum: no M_task call, no variant in any batch; --buffer_add none: no synthetic
    demo is ever retrieved (the real share stays 1). (--lambda_syn, --top_k: the arm reference test.)"""
    base, base_rows, world, _ = _run_arm("dreamgym", world=tiny_world)
    assert base_rows[-1]["real_demo_share"] < 1  # synthetic transitions were retrieved
    recorded.clear()
    res, rows, _, exp = _run_arm("no_curriculum", world=world)
    assert not any(p.startswith("<gen_task>") for p in exp.asked)
    assert all(t in world.train_tasks for w, tasks, _ in recorded if getattr(w, "synthetic", False) for t in tasks)
    assert _strip(res) != _strip(base)
    res, rows, _, _ = _run_arm("dreamgym", ["--buffer_add", "none"], world=world)
    assert rows[-1]["real_demo_share"] == 1.0 and _strip(res) != _strip(base)


def test_policy_tokenizer_words_and_flag_changes_the_result(tiny_world):
    """The toy policy's word tokenizer: every prompt and admissible action of the tiny world round-trips exactly
    (score mode sums the log-probs of exactly these ids), the prompts are >= 2x shorter than bytes, the
    tokenizer is the same for every policy seed, and --policy_tokenizer byte gives another warm start."""
    args = D.parse_args(TINY)
    p0, tok = D.make_policy(args, torch.device("cpu"), 0, tiny_world)
    _, tok1 = D.make_policy(args, torch.device("cpu"), 1, tiny_world)
    assert tok.get_vocab() == tok1.get_vocab() and len(tok) < 600
    texts = [(D.policy_prompt(t["task"], t["s"]), D.admissible(t["s"], t["task"]))
             for tr in tiny_world.offline + tiny_world.heldout for t in tr]
    n_word = n_byte = 0
    for prompt, acts in texts:
        for x in [prompt] + acts:
            ids = tok(x, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == x and tok.unk_token_id not in ids
        assert not any("Ġ" in t.lstrip("Ġ") for t in tok.tokenize(prompt))  # no token spans two words
        n_word += len(tok(prompt, add_special_tokens=False)["input_ids"])
        n_byte += len(prompt.encode())
    assert n_word * 2 < n_byte
    ctx_w = D.Ctx(args, tiny_world.shop, *D.warm_start_policy(args, tiny_world, torch.device("cpu"), 0),
                  torch.device("cpu"))
    bargs = D.parse_args(TINY + ["--policy_tokenizer", "byte"])
    pb, tb = D.warm_start_policy(bargs, tiny_world, torch.device("cpu"), 0)
    assert len(tb) == 384 and len(ctx_w.tok) == len(tok)
    acts = D.admissible(D.SEARCH_STATE, tiny_world.eval_tasks[0])
    prompt = D.policy_prompt(tiny_world.eval_tasks[0], D.SEARCH_STATE)
    lw = D.score_actions(ctx_w.policy, ctx_w.tok, [prompt], [acts], torch.device("cpu"))[0]
    lb = D.score_actions(pb, tb, [prompt], [acts], torch.device("cpu"))[0]
    assert not torch.allclose(lw, lb, atol=1e-3)


@pytest.mark.slow
def test_diagnostic_arms_differ_where_they_must(recorded, tiny_world):
    """exp_states (M_exp's states, true reward) and exp_reward (true states, M_exp's reward) against dreamgym on the
    same rule M_exp (it invents the result page and item, and pays any purchase after a size select or a click on
    item 2): every exp_states success replayed in the real env fails only through a wrong state; every
    exp_reward success only through a wrong reward; exp_reward takes real steps (the real env gives its states),
    exp_states none; each arm's rewards equal the plain rule on its own recorded transitions."""
    base, _, world, _ = _run_arm("dreamgym", world=tiny_world)
    recorded.clear()
    st, _, _, _ = _run_arm("exp_states", world=world)
    syn = [tr for w, _, trs in recorded if getattr(w, "synthetic", False) for tr in trs]
    for t in syn:  # the true reward of M_exp's states, recomputed: the last state before `buy` must satisfy the task
        last = t.transitions[-1]
        want = float(last["a"] == "buy" and last["d"] == 1.0 and D.satisfies(
            D.parse_task(t.task), _product_of(last["s"])) and _size_ok(t.task, last["s"]))
        assert t.reward == want
    assert st["real_train_steps"] == 0 and st["halluc_reward"] == 0 and st["halluc_state"] >= 0
    recorded.clear()
    rw, _, _, _ = _run_arm("exp_reward", world=world)
    syn = [tr for w, _, trs in recorded if isinstance(w, D.ExpRewardWorld) for tr in trs]
    assert syn and rw["real_train_steps"] == sum(len(t.transitions) for t in syn)  # every step was real
    for t in syn:  # states are ShopLite's: replaying the actions gives the same states
        shop = D.ShopLite(world.shop.catalogue, 3, 5)
        ep = shop.reset(t.task)
        for x in t.transitions:
            assert ep.state == x["s"]
            shop.step(ep, x["a"])
        hist = [x["a"] for x in t.transitions][-4:-1]
        want = float(t.transitions[-1]["a"] == "buy" and ("sel{" in t.transitions[-1]["s"] or "click[2]" in hist))
        assert t.reward == want  # the rule M_exp's reward on the real state
    assert rw["halluc_state"] == 0 and rw["halluc_n"] > 0 and rw["halluc_reward"] == round(rw["halluc_success"] * rw["halluc_n"])
    assert base["halluc_state"] > 0  # dreamgym: the rule's invented pages do cause wrong states
    assert len({json.dumps(_strip(x), sort_keys=True) for x in (base, st, rw)}) == 3


def _product_of(state):
    m = re.match(r"item: (\w+) (\w+) (\w+) \$(\d+) sizes\{([A-Z,]*)\}", state)
    if not m:
        return D.Product(-1, "", "", "", (), 10 ** 6)
    c, mat, cat, price, sizes = m.groups()
    return D.Product(-1, cat, c, mat, tuple(sizes.split(",")), int(price))


def _size_ok(task, state):
    t = D.parse_task(task)
    return t.size is None or f"sel{{{t.size}}}" in state


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------------


@pytest.mark.parametrize("flags,names", [
    (["--horizon", "0"], "--horizon 0"), (["--horizon", "-3"], "--horizon -3"), (["--top_k", "-1"], "--top_k -1"),
    (["--real_budget", "-5"], "--real_budget -5"), (["--s2r_frac", "1.5"], "--s2r_frac 1.5"),
    (["--s2r_frac", "0"], "--s2r_frac 0"), (["--lambda_syn", "-0.1"], "--lambda_syn -0.1"),
    (["--lambda_syn", "1.2"], "--lambda_syn 1.2"), (["--group_size", "0"], "--group_size 0"),
    (["--eval_every", "0"], "--eval_every 0"), (["--page_size", "0"], "--page_size 0"),
    (["--iterations", "0"], "--iterations 0"), (["--learning_rate", "nan"], "--learning_rate nan"),
    (["--clip_low", "1"], "--clip_low 1"), (["--heldout_frac", "1"], "--heldout_frac 1"),
    (["--exp_d_model", "30"], "--exp_d_model 30"), (["--exp_vocab_size", "100"], "--exp_vocab_size 100"),
    (["--request_timeout", "0"], "--request_timeout 0"), (["--seeds", "0,x"], "--seeds '0,x'"),
    (["--seeds", "-1"], "--seeds '-1'"), (["--method", "ppo_magic"], "unknown --method 'ppo_magic'"),
    (["--method", "train_exp,dreamgym"], "train_exp"), (["--exp_api_base", "http://x"], "--exp_api_model"),
    (["--exp_api_base", "http://x", "--exp_api_model", "m", "--exp_model_name_or_path", "p"], "not both"),
    (["--n_expert", "0", "--n_random", "0"], "--n_expert + --n_random"),
    (["--method", "real_grpo", "--real_budget", "50"], "--real_budget 50"),
    (["--method", "s2r", "--real_budget", "500"], "real cap"),
    (["--model_name_or_path", "p", "--policy_tokenizer", "byte"], "--policy_tokenizer"),
])
def test_validate_args_refuses_bad_flags(flags, names):
    with pytest.raises(C.UserError) as e:
        D.validate_args(D.parse_args(flags))
    assert names in str(e.value) and "\n" not in str(e.value)


def test_validate_args_accepts_the_defaults_and_the_table():
    for flags in ([], ["--table"], ["--method", "real_grpo,s2r"], ["--method", "train_exp"], SMOKE):
        D.validate_args(D.parse_args(flags))
    a = D.parse_args(["--table"])  # --table: every arm x 3 seeds at the README table's scale
    assert (a.method.split(","), a.seeds, a.iterations, a.tasks_per_iter, a.real_budget, a.eval_every) == (
        list(D.ARMS), "0,1,2", 40, 8, 20000, 10)
    a = D.parse_args(["--table", "--iterations", "5"])  # a flag given explicitly wins
    assert (a.iterations, a.tasks_per_iter) == (5, 8)
    a = D.parse_args([])
    assert (a.iterations, a.tasks_per_iter, a.real_budget, a.eval_every) == (12, 4, 5000, 4)


def test_bad_input_exits_2_in_seconds_with_nothing_written(tmp_path):
    """The issue's examples through the script: one line on stderr, exit 2, no output directory; an
    unreachable M_exp endpoint is found by the preflight (before BC, M_exp or any eval)."""
    for flags in (["--horizon", "0"], ["--exp_api_base", "http://127.0.0.1:9/v1", "--exp_api_model", "m",
                                       "--request_timeout", "3"]):
        out = tmp_path / "run"
        r = run_cli(D, [*flags, "--output_dir", str(out)])
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr
        assert not out.exists()


def _main_refuses(flags, match):
    with pytest.raises(C.UserError, match=match):
        D.main(D.parse_args(flags))


def test_output_dir_policy_resume_and_overwrite(tmp_path, monkeypatch):
    """A finished run is not overwritten; --resume continues only the same run and refuses a directory
    without a checkpoint; a missing model path or an unwritable --output_dir is refused; all before
    anything is written."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    base = ["--method", "bc", *TINY, "--bc_epochs", "0", "--output_dir", str(out)]
    D.main(D.parse_args(base))
    res = json.load(open(out / "summary.json"))["results"][0]
    before = sorted(os.listdir(out))
    _main_refuses(base, "already holds a run")
    _main_refuses(base + ["--resume", "--lambda_syn", "0.4"], r"--lambda_syn 0.5 -> 0.4")
    _main_refuses(base + ["--resume", "--overwrite"], "exclude each other")
    _main_refuses(base + ["--model_name_or_path", str(tmp_path / "nope")], "does not exist")
    assert sorted(os.listdir(out)) == before
    D.main(D.parse_args(base + ["--resume", "--request_timeout", "5"]))  # a result-neutral flag may change
    assert json.load(open(out / "summary.json"))["results"][0] == res  # read back, not rerun
    fresh = tmp_path / "killed"  # a run killed before its first checkpoint: args.json only
    fresh.mkdir()
    (fresh / "args.json").write_text((out / "args.json").read_text())
    _main_refuses(base[:-1] + [str(fresh), "--resume"], "no checkpoint")
    _main_refuses(base[:-1] + [str(tmp_path / "empty"), "--resume"], "no args.json")
    assert not (tmp_path / "empty").exists() and sorted(os.listdir(fresh)) == ["args.json"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root ignores permissions
        _main_refuses(base[:-1] + [str(ro / "run")], "not writable")
    D.main(D.parse_args(base + ["--overwrite", "--seed", "1"]))
    assert json.load(open(out / "summary.json"))["seeds"] == [1] and not (out / "result-bc-s0.json").exists()


def test_offline_file_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "off.jsonl"
    path.write_bytes((_offline_row() + "\n").encode() + b'{"task": "\xff"}\n')
    with pytest.raises(C.UserError, match=r"off\.jsonl:2: not valid UTF-8"):
        D.load_offline_file(str(path))
    path.write_text("\n")
    with pytest.raises(C.UserError, match="holds no transitions"):
        D.load_offline_file(str(path))


def test_too_many_tasks_for_the_catalogue_is_one_error():
    args = D.parse_args(["--n_products", "3", "--n_train_tasks", "300"])
    with pytest.raises(C.UserError, match="distinct feasible tasks"):
        D.build_world(args)


# ---- kill -9 and --resume --------------------------------------------------------------------------------


class _RuleServer(http.server.BaseHTTPRequestHandler):
    """M_exp and M_task behind an OpenAI-compatible route, answering by rule_answer / rule_variant (the
    same answers in every process, so runs in different processes can be compared number by number)."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        msgs = req["messages"]
        user = msgs[-1]["content"]
        if msgs[0]["content"].startswith("You write shopping tasks"):
            content = rule_variant(user.split("Seed task: ", 1)[1])
        elif "\nact: " in user:
            s2, r, d = rule_answer(user)
            content = json.dumps({"reasoning": "rule", "next_state": s2, "reward": r, "done": d})
        else:  # the preflight's probe
            content = "OK"
        choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                   for i in range(req.get("n", 1))]
        body = json.dumps({"choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _numbers(out):
    """summary.json and metrics.jsonl without what a clock decides."""
    summ = json.loads((out / "summary.json").read_text())
    for r in summ["results"]:
        for k in ("minutes", "time_split"):
            r.pop(k)
    table = [ln.rsplit("|", 2)[0] for ln in summ.pop("table").splitlines()]  # minus the minutes column
    summ.pop("wall_s")
    rows = [{k: v for k, v in r.items() if k != "time_s"} for r in C.read_jsonl(out / "metrics.jsonl")]
    return summ, table, rows


def _rows_of(path, arm):
    """metrics.jsonl rows of one arm so far (a line being written is skipped)."""
    out = []
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        out += [row] if row.get("arm") == arm else []
    return out


def _run_until(cmd, env, done, timeout=240):
    """Start cmd, kill -9 it as soon as done() holds; returns the exit code (-9 when killed)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if done():
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    return p.wait()


@pytest.mark.slow
def test_kill9_and_resume_reach_the_uninterrupted_summary(tmp_path):
    """real_grpo, dreamgym, s2r with an endpoint M_exp, a checkpoint every 2 iterations: killed (kill -9)
    as soon as dreamgym logged its 3rd row (its checkpoint holds 2: row 3 must be cut and redone), resumed,
    killed again right after dreamgym's result (s2r then starts from dreamgym's saved synthetic phase),
    resumed to the end: summary.json and metrics.jsonl equal the uninterrupted run's."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RuleServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, os.path.join(ROOT, "dreamgym.py"), "--method", "real_grpo,dreamgym,s2r", *TINY,
               "--iterations", "4", "--eval_every", "2", "--exp_api_base", url, "--exp_api_model", "rule",
               "--real_budget", "2000", "--n_metric_buys", "6", "--n_metric_per_action", "2"]
        full, cut = tmp_path / "full", tmp_path / "cut"
        r = subprocess.run(cmd + ["--output_dir", str(full)], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        metrics = str(cut / "metrics.jsonl")
        assert _run_until(cmd + ["--output_dir", str(cut)], env, lambda: len(_rows_of(metrics, "dreamgym")) >= 3) == -9
        assert len(_rows_of(metrics, "dreamgym")) == 3 and C.find_checkpoint(str(cut / "ckpt-dreamgym-s0"))
        assert _run_until(cmd + ["--output_dir", str(cut), "--resume"], env,
                          lambda: (cut / "result-dreamgym-s0.json").exists()) == -9
        assert not (cut / "summary.json").exists()
        r = subprocess.run(cmd + ["--output_dir", str(cut), "--resume"], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        a, b = _numbers(full), _numbers(cut)
        assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
        assert {x["arm"] for x in a[0]["results"]} == {"real_grpo", "dreamgym", "s2r"}
        assert any(x["loss"] != 0 for x in a[2] if x["arm"] == "dreamgym")  # the policy did learn in M_exp
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_real_checkpoint_policy_generate_mode_update(smollm2, tmp_path):
    """SmolLM2-135M-Instruct as the policy in generate mode: its chat template is applied once around the
    instruction, logp_old equals the update's log-probs (rho = 1), one GRPO update is finite and moves the
    weights, and the checkpoint reloads with the same logits."""
    cpu = torch.device("cpu")
    policy, tok = C.load_lm(smollm2)
    args = D.parse_args(["--model_name_or_path", smollm2, "--action_mode", "generate", "--max_action_tokens", "24",
                         "--ppo_epochs", "1", "--num_minibatches", "1", "--learning_rate", "1e-5"])
    shop = D.ShopLite(_shop().catalogue, 3, horizon=1)  # one step per episode
    trajs = D.rollout(policy, tok, D.RealWorld(shop), ["buy a red shirt, under $30"], 2, 1.0,
                      torch.Generator().manual_seed(0), "generate", cpu, "r", max_action_tokens=24, instruct=True)
    units = [t.units[0] for t in trajs]
    text = tok.decode(units[0].ids)
    assert text.count("<|im_start|>user") == 1 and text.count("Admissible actions") == 1
    assert units[0].ids[:2].tolist() != [tok.bos_token_id] * 2  # no doubled BOS
    assert all(0 < int(u.resp_mask.sum()) <= 24 for u in units)
    logp, old, mask = D.policy_logp_units(policy, tok, units, cpu, "generate")
    torch.testing.assert_close(logp * mask, old * mask, atol=1e-4, rtol=0)
    trajs[0].reward, trajs[1].reward = 1.0, 0.0
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    stats = D.grpo_update(policy, tok, opt, trajs, 2, args, cpu, 1, random.Random(0))
    assert math.isfinite(stats["loss"]) and any((a != b).any() for a, b in zip(before, policy.parameters()))
    C.save_checkpoint(str(tmp_path / "ck"), policy, tok, opt, step=1)
    fresh, _ = C.load_lm(smollm2)
    C.load_checkpoint(str(tmp_path / "ck"), model=fresh)
    ids = units[0].ids[None]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=0)
