"""Tests of dreamgym.py: ShopLite transitions and rewards on scripted episodes, GRPO advantages and
clipping on hand values, the curriculum score, retrieval, eval isolation (real env only, eval tasks
never in the buffer), the experience model through local OpenAI-compatible servers, a smoke run."""
import http.server
import json
import os
import random
import subprocess
import sys
import threading

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import dreamgym as D  # noqa: E402

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
    rate, n = D.hallucination_rate(world.shop, trajs, 64)
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


def test_bad_method_exits_2_with_one_line():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dreamgym.py"), "--method", "ppo_magic"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown --method" in r.stderr


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
         "--bc_trajectories", "4", "--bc_epochs", "1", "--exp_epochs", "0.1", "--exp_max_new_tokens", "24",
         "--exp_layers", "1", "--exp_d_model", "32", "--eval_every", "1", "--n_heldout_eval", "4", "--horizon", "5"]


def test_smoke_s2r_writes_outputs(tmp_path):
    env = {**os.environ, "NANOPAPERS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dreamgym.py"), "--method", "s2r", *SMOKE,
                        "--real_budget", "400", "--output_dir", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("args.json", "metrics.jsonl", "summary.json", "dreamgym.png"):
        assert (out / f).is_file(), f
    summ = json.load(open(out / "summary.json"))
    res = summ["results"][0]
    assert res["arm"] == "s2r" and 0 < res["real_train_steps"] <= 40 and res["real_train_steps"] <= 0.1 * 400  # <= s2r_frac x N real steps
    assert res["offline_real_steps"] > 0 and "eps_R" in res
    # real_grpo did not run in this invocation: s2r's cap is s2r_frac x N, logged with N
    assert (res["real_step_cap"], res["real_cap_basis"], res["real_budget"]) == (40, "N", 400)
    assert summ["real_budget"] == 400 and summ["s2r_real_cap"] == {"0": 40} and "real_grpo budget N = 400" in summ["table"]
    rows = C.read_jsonl(out / "metrics.jsonl")
    assert {r["phase"] for r in rows} == {"synthetic", "real"}
    assert all(r["real_train_steps"] == 0 for r in rows if r["phase"] == "synthetic")


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


def test_grpo_update_is_invariant_to_micro_batching():
    """per_device_batch_size 2 (gradient accumulation) == one forward over the whole minibatch."""
    acts = D.admissible(D.SEARCH_STATE, "buy a red shirt, under $30")
    trajs = []
    for i, r in enumerate([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]):
        t = D.Trajectory("buy a red shirt, under $30", f"e{i}", True, reward=r)
        t.units = [D.Unit(D.policy_prompt(t.task, D.SEARCH_STATE), acts, i % len(acts), -1.5 - 0.1 * i)]
        trajs.append(t)
    params = []
    for pdbs in (256, 2):
        model, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        args = D.parse_args(["--ppo_epochs", "1", "--num_minibatches", "1", "--per_device_batch_size", str(pdbs)])
        D.grpo_update(model, tok, opt, trajs, 3, args, torch.device("cpu"), 1, random.Random(0))
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any((a != p).any() for a, p in zip(params[0], C.tiny_lm(n_layer=1, d_model=16, seed=0)[0].parameters()))


def test_grpo_loss_normaliser_splits_like_one_batch():
    """Two shards each normalised by the global unit count sum to the full-batch token mean (DDP scaling)."""
    logp = torch.randn(6, 3, requires_grad=True)
    old, adv, mask = torch.randn(6, 3) * 0.1, torch.randn(6), (torch.rand(6, 3) > 0.3).float()
    full, _ = D.grpo_loss(logp, old, adv, mask)
    n = float(mask.sum())
    parts = sum(D.grpo_loss(logp[s], old[s], adv[s], mask[s], normalizer=n)[0] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(full, parts)
