"""Tests of fusionroute.py: the math against hand values (fusion, routing targets, routing loss, DPO, the vanishing
gradient of Eq. (10), merging), the wiring against plain references written here (one SFT update, one CDPO update,
the lock-step fused decoder with and without lazy experts, token_conf, the eval bookkeeping), every arm-defining
flag, validation / tokenizer refusals, and (slow) the CLI: smoke run, kill -9 + resume, multi-seed table, torchrun
with 2 CPU processes, the real SmolLM2-135M-Instruct checkpoint.

Breakages these tests were seen to catch (each line broken in a copy of fusionroute.py, the named tests run and
seen to fail, then restored):
- fuse_logprobs without its log_softmax: test_fuse_hand_values
- routing target argmin instead of argmax: test_routing_targets_hand_values
- informative = all argmaxes differ (instead of not all equal): test_routing_targets_hand_values
- marginal routing loss on raw scores (no log_softmax): test_route_loss_hand_values
- DPO margin sign flipped: test_dpo_hand_value
- fused log-probs always from expert 0 (choice ignored): test_chunked_fused_logp_equals_unchunked_and_a_loop
- SFT step: router hidden states one position off; L_route averaged over all tokens instead of informative ones;
  lambda ignored; EOS not scored; --informative all ignored; --sft_lm_target fused ignored:
  test_one_sft_update_matches_a_plain_reference
- CDPO: reference log-probs of chosen / rejected swapped: test_one_cdpo_update_matches_a_plain_reference
- stage 2: --sft_mix ignored (SFT batch at weight 1): test_cdpo_step_mixes_an_sft_batch_with_mu
- decoder: positions not advanced after a token; --lazy_experts without catching up the skipped tokens;
  token_conf picking the least confident expert; I* ignoring W (always expert 0):
  test_fused_decoder_matches_a_plain_reference
- eval bookkeeping: routed positions at 5j + 2 instead of 5j + 3: test_toy_problem_and_positions;
  switches counted over masked positions: test_switches_hand_values
- merge_ta without subtracting theta_0: test_merging_hand_values
- tokenizer probe not compared: test_tokenizer_mismatch_is_refused_naming_the_model
Not caught, and harmless: computing I*_t along y with grad enabled (argmax has no gradient, so W gets none
either way; test_no_gradient_path_from_the_argmax_to_W checks that property, not the no_grad block).
Written to catch but not broken-and-rerun (time): W left trainable in CDPO (test_real_checkpoint_smollm2, slow);
rows of a resumed run not cut / RNG or batches not restored (test_kill_9_and_resume_..., slow); DDP loss
normalisation (test_torchrun_two_processes_match_one, slow); table mean ± std (test_table_over_two_seeds, slow).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import fusionroute as FR  # noqa: E402

torch.set_num_threads(1)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NANOPAPERS_THREADS": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--toy_steps", "5,5", "--no-sanity_gates"]  # tiny toy models (built in seconds, cached)


# ---- fixtures: a tiny router LM and two tiny experts sharing the byte tokenizer ----


@pytest.fixture(scope="module")
def models():
    lm, tok = C.tiny_lm(n_layer=1, d_model=32, seed=0)
    experts = []
    for s in (1, 2):
        m, _ = C.tiny_lm(n_layer=1, d_model=32, seed=s)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        experts.append(m)
    return lm, experts, tok


def fresh_router(models, seed=0):
    lm, experts, tok = models
    lm2, _ = C.tiny_lm(n_layer=1, d_model=32, seed=0)
    lm2.load_state_dict(lm.state_dict())
    r = FR.Router(lm2, len(experts), seed=seed)
    with torch.no_grad():  # a W that really routes (the default init is near zero)
        r.W.weight.copy_(torch.randn(r.W.weight.shape, generator=torch.Generator().manual_seed(seed + 5)))
    return r


def args_for(**kw):
    a = FR.parse_args([])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


ROWS = [dict(prompt="3|a1b2=", response="3a15;5b27;=7", answer=7, problem=None),
        dict(prompt="0|c4c4c9=", response="0c41;1c42;2c93;=3", answer=3, problem=None),
        dict(prompt="7|d2=", response="7d22;=2", answer=2, problem=None)]


# ---- the math: hand values ----


def test_fuse_hand_values():
    r = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    e = torch.log(torch.tensor([0.2, 0.2, 0.6]))
    got = FR.fuse_logprobs(r, e).exp()
    assert torch.allclose(got, torch.tensor([0.357143, 0.214286, 0.428571]), atol=1e-6)
    # the ablations: the expert alone / the router alone, renormalised
    assert torch.allclose(FR.combine_logprobs(r, e, "expert_only").exp(), torch.tensor([0.2, 0.2, 0.6]), atol=1e-6)
    assert torch.allclose(FR.combine_logprobs(r, e, "router_only").exp(), torch.tensor([0.5, 0.3, 0.2]), atol=1e-6)


def test_routing_targets_hand_values():
    t, inf = FR.routing_targets(torch.tensor([[-2.0, -0.1, -1.0], [-0.5, -3.0, -0.2]]),
                                torch.tensor([[3, 3, 5], [3, 3, 3]]))
    assert t.tolist() == [1, 2]
    assert inf.tolist() == [True, False]


def test_route_loss_hand_values():
    w = torch.zeros(1, 3)
    assert FR.route_loss(w, torch.tensor([1]), "ce").item() == pytest.approx(math.log(3), abs=1e-6)  # 1.098612
    w2 = torch.tensor([[2.0, 0.0, 0.0]])
    ce = -(2.0 - math.log(math.exp(2) + 2))
    assert FR.route_loss(w2, torch.tensor([0]), "ce").item() == pytest.approx(ce, abs=1e-6)
    gold = torch.tensor([[-2.0, -0.1, -1.0]])
    want = -math.log(sum(math.exp(x) / 3 for x in (-2.0, -0.1, -1.0)))
    assert FR.route_loss(w, torch.tensor([1]), "marginal", gold).item() == pytest.approx(want, abs=1e-6)


def test_dpo_hand_value():
    # chosen log-ratio 2.0, rejected -1.0, beta 0.1 -> -log sigmoid(0.3)
    got = FR.dpo_loss(torch.tensor([-3.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.0]), 0.1)
    assert got.item() == pytest.approx(0.554355, abs=1e-6)


def test_vanishing_gradient_where_the_expert_is_confident_and_right():
    """Eq. (10): d log pi_final(y) / d l_theta = onehot(y) - pi_final; ~0 where the expert is sure and right."""
    l_theta = torch.log_softmax(torch.tensor([0.3, -0.2, 0.1]), -1).requires_grad_(True)
    FR.fuse_logprobs(l_theta, torch.tensor([0.0, -50.0, -50.0]))[0].backward()
    assert l_theta.grad.abs().max().item() < 1e-6
    l2 = torch.log_softmax(torch.tensor([0.3, -0.2, 0.1]), -1).requires_grad_(True)
    fused = FR.fuse_logprobs(l2, torch.log(torch.tensor([0.2, 0.2, 0.6])))
    fused[0].backward()
    want = torch.tensor([1.0, 0.0, 0.0]) - fused.detach().exp()
    assert torch.allclose(l2.grad, want, atol=1e-6)


def test_chunked_fused_logp_equals_unchunked_and_a_loop():
    g = torch.Generator().manual_seed(0)
    N, V, n = 7, 11, 3
    rl = torch.randn(N, V, generator=g)
    el = [torch.randn(N, V, generator=g) for _ in range(n)]
    choice = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    y = torch.randint(0, V, (N,), generator=g)
    fns = [lambda s, e, x=x: x[s:e] for x in el]
    for fusion in ("sum", "expert_only", "router_only"):
        a = FR.fused_gold_logp(lambda h: h, rl, fns, choice, y, chunk=3, fusion=fusion)
        b = FR.fused_gold_logp(lambda h: h, rl, fns, choice, y, chunk=1000, fusion=fusion)
        assert torch.allclose(a, b, atol=1e-5)
        for t in range(N):  # plain reference
            lr, le = torch.log_softmax(rl[t], -1), torch.log_softmax(el[int(choice[t])][t], -1)
            z = {"sum": lr + le, "expert_only": le, "router_only": lr}[fusion]
            assert a[t].item() == pytest.approx(torch.log_softmax(z, -1)[y[t]].item(), abs=1e-5)


def test_merging_hand_values():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([1])}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([2])}
    base = {"w": torch.tensor([0.0, 1.0]), "n": torch.tensor([0])}
    assert FR.merge_state_dicts([a, b])["w"].tolist() == [2.0, 4.0]
    assert FR.merge_state_dicts([a, b], base, 0.0)["w"].tolist() == [0.0, 1.0]
    # theta_0 + 0.5 ((a - base) + (b - base)) = [0, 1] + 0.5 ([1, 1] + [3, 5]) = [2, 4]; scale 1: [4, 7]
    assert FR.merge_state_dicts([a, b], base, 0.5)["w"].tolist() == [2.0, 4.0]
    assert FR.merge_state_dicts([a, b], base, 1.0)["w"].tolist() == [4.0, 7.0]


def test_switches_hand_values():
    choice = torch.tensor([[0, 0, 1, 1, 0], [2, 1, 1, -1, -1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert FR.switches(choice, mask).tolist() == [2, 1]


# ---- the toy world ----


def test_toy_problem_and_positions():
    p = FR.Problem("tables", 3, [("a", 1), ("d", 4), ("b", 0)])
    T = FR._TABLES
    r1 = T["a"][3][1]
    r3 = T["b"][4][0]
    assert p.prompt == "3|a1d4b0="
    assert p.trace == f"3a1{r1};{r1}d44;4b0{r3};={r3}"
    assert p.answer == r3
    assert FR.routed_positions(p) == [(3, 0), (13, 1)]  # d has no expert
    q = FR.Problem("arith", 7, [("a", 5), ("c", 9), ("b", 3), ("d", 4)])
    assert [s[3] for s in q.steps] == [2, 3, 3, 2]
    sets = {k: FR.toy_test_set("tables", k, 20) for k in FR.TEST_SETS}
    assert all(C.toy_split_of(x.prompt) == "heldout" for v in sets.values() for x in v)
    assert all(x.kind == "hyb" and {o for o, _ in x.pairs} <= {"a", "b", "c"} for x in sets["hyb3"])
    assert all(x.kind == "d" for x in sets["d"])
    sft = FR.toy_sft_set("tables", 0, 200)
    assert all(C.toy_split_of(x.prompt) == "train" for x in sft)
    assert 0.25 < sum(x.kind != "hyb" for x in sft) / 200 < 0.55  # 40 % single-operator


def test_score_batch_hand_totals():
    p = FR.Problem("tables", 3, [("a", 1), ("d", 4), ("b", 0)])
    rows = [dict(answer=p.answer, problem=p), dict(answer=p.answer, problem=p)]
    texts = [p.trace, "3a10;=0" if p.answer != 0 else "3a11;=1"]
    T = 20
    choice = torch.zeros(2, T, dtype=torch.long)
    choice[0, 13] = 1  # row 0 routes step 3's result digit to expert b: both routed positions right
    choice[1, 5:] = 1  # row 1: position 3 -> 0 (right), position 13 is past its mask
    mask = torch.zeros(2, T, dtype=torch.long)
    mask[0, :len(p.trace) + 1] = 1
    mask[1, :8] = 1
    tot = FR.score_batch(rows, texts, choice, mask)
    # correct 1 / 2; routed right 3 of 3 counted positions; switches: row 0 two (12->13, 13->14), row 1 one (4->5)
    assert tot.tolist() == [1, 2, 3, 3, 3, 2]
    res = FR.totals_to_result(tot, 0.0, 0)
    assert res["acc"] == 0.5 and res["route_acc"] == 1.0 and res["switches"] == 1.5


# ---- the wiring: one SFT update, one CDPO update, the decoder, against plain references ----


def near_copy_experts(models):
    """Two experts that agree at most positions and disagree at some (untrained random experts disagree
    everywhere, where --informative all and disagree would coincide)."""
    _, experts, tok = models
    e2, _ = C.tiny_lm(n_layer=1, d_model=32, seed=1)
    e2.load_state_dict(experts[0].state_dict())
    with torch.no_grad():
        e2.lm_head.weight.add_(0.5 * torch.randn(e2.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)))
    e2.eval()
    for p in e2.parameters():
        p.requires_grad_(False)
    return [experts[0], e2]


def plain_sft_reference(router, experts, tok, rows, args):
    """Eq. (6) with Python loops, one row at a time, no padding, nothing shared with sft_loss."""
    lm_terms, route_terms, n_inf = [], [], 0
    for r in rows:
        p_ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        y_ids = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p_ids + y_ids])
        h = router.lm.model(input_ids=ids).last_hidden_state[0]  # (L, d)
        logits_r = router.lm.lm_head(h)
        ex = [m(input_ids=ids).logits[0] for m in experts]
        for j, y in enumerate(y_ids):
            t = len(p_ids) + j - 1  # the position that predicts y
            lr = torch.log_softmax(logits_r[t], -1)
            les = [torch.log_softmax(e[t], -1) for e in ex]
            gold = [float(le[y]) for le in les]
            tgt = max(range(len(gold)), key=lambda i: gold[i])
            inf = args.informative == "all" or len({int(le.argmax()) for le in les}) > 1
            w = router.W(h[t])
            if args.sft_lm_target == "router":
                lm_terms.append(-lr[y])
            else:
                k = int(w.argmax())
                lm_terms.append(-torch.log_softmax(lr + les[k], -1)[y])
            if inf:
                n_inf += 1
                if args.route_loss == "ce":
                    route_terms.append(-torch.log_softmax(w, -1)[tgt])
                else:
                    route_terms.append(-torch.log(sum(torch.softmax(w, -1)[i] * math.exp(gold[i]) for i in range(len(gold)))))
    l_lm = sum(lm_terms) / len(lm_terms)
    l_route = sum(route_terms) / max(1, n_inf)
    return l_lm + args.route_weight * l_route


@pytest.mark.parametrize("target,kind,inf", [("router", "ce", "disagree"), ("fused", "marginal", "all")])
def test_one_sft_update_matches_a_plain_reference(models, target, kind, inf):
    _, _, tok = models
    experts = near_copy_experts(models)  # informative and non-informative positions both occur
    args = args_for(sft_lm_target=target, route_loss=kind, informative=inf, route_weight=0.7, logit_chunk=5)
    router = fresh_router(models)
    stats = FR.expert_token_stats(experts, tok, ROWS, 2, 4)
    n_tok, n_inf = FR.global_counts(args, stats)
    loss, m, _ = FR.sft_loss(args, router, experts, tok, ROWS, stats, n_tok, n_inf)
    loss.backward()
    g_w, g_emb = router.W.weight.grad.clone(), router.lm.model.embed_tokens.weight.grad.clone()
    router.zero_grad()
    ref = plain_sft_reference(router, experts, tok, ROWS, args)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(g_w, router.W.weight.grad, atol=1e-5)
    assert torch.allclose(g_emb, router.lm.model.embed_tokens.weight.grad, atol=1e-5)
    assert n_tok == sum(len(r["response"]) + 1 for r in ROWS)  # response tokens + EOS (byte tokenizer)


def test_sft_flags_change_the_loss(models):
    _, _, tok = models
    experts = near_copy_experts(models)
    stats = FR.expert_token_stats(experts, tok, ROWS, 3, 64)
    n_tok, n_inf = FR.global_counts(args_for(), stats)
    assert 0 < n_inf < n_tok  # some positions informative, some not
    vals = {}
    for name, kw in (("base", {}), ("fused", dict(sft_lm_target="fused")), ("marginal", dict(route_loss="marginal")),
                     ("all", dict(informative="all")), ("lambda", dict(route_weight=2.0))):
        args = args_for(**kw)
        router = fresh_router(models)
        n_tok, n_inf = FR.global_counts(args, stats)
        vals[name] = FR.sft_loss(args, router, experts, tok, ROWS, stats, n_tok, n_inf)[0].item()
    assert len({round(v, 6) for v in vals.values()}) == len(vals), vals


def test_no_gradient_path_from_the_argmax_to_W(models):
    """Pitfall 6: the fused loss reaches theta, never W (I* is an argmax under no_grad)."""
    _, experts, tok = models
    router = fresh_router(models)
    lp, _ = FR.sequence_fused_logp(router, experts, tok, [r["prompt"] for r in ROWS], [r["response"] for r in ROWS], 4)
    lp.sum().backward()
    assert router.W.weight.grad is None
    assert router.lm.model.embed_tokens.weight.grad.abs().sum() > 0


def plain_seq_fused(router, experts, tok, prompt, response, eos=True):
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    y_ids = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    ids = torch.tensor([p_ids + y_ids])
    h = router.lm.model(input_ids=ids).last_hidden_state[0]
    lr_all = torch.log_softmax(router.lm.lm_head(h), -1)
    ex = [torch.log_softmax(m(input_ids=ids).logits[0], -1) for m in experts]
    tot = 0.0
    for j, y in enumerate(y_ids):
        t = len(p_ids) + j - 1
        k = int(router.W(h[t]).argmax())
        tot = tot + torch.log_softmax(lr_all[t] + ex[k][t], -1)[y]
    return tot


def test_one_cdpo_update_matches_a_plain_reference(models):
    _, experts, tok = models
    router = fresh_router(models)
    router.W.weight.requires_grad_(False)
    pairs = [dict(prompt=r["prompt"], chosen=r["response"], rejected=r["response"][:-1] + "9", chosen_eos=True,
                  rejected_eos=e, ref_chosen=-30.0 - i, ref_rejected=-28.0 + i) for i, (r, e) in enumerate(zip(ROWS, (True, False, True)))]
    args = args_for(beta=0.3, logit_chunk=4)
    per, margin, _ = FR.cdpo_loss(args, router, experts, tok, pairs)
    per.mean().backward()
    g = router.lm.model.embed_tokens.weight.grad.clone()
    router.zero_grad()
    ref = 0.0
    for p in pairs:
        pw = plain_seq_fused(router, experts, tok, p["prompt"], p["chosen"], True)
        pl = plain_seq_fused(router, experts, tok, p["prompt"], p["rejected"], p["rejected_eos"])
        ref = ref - F.logsigmoid(0.3 * ((pw - p["ref_chosen"]) - (pl - p["ref_rejected"]))) / len(pairs)
    ref.backward()
    assert per.mean().item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(g, router.lm.model.embed_tokens.weight.grad, atol=1e-5)
    # CDPO gradients: W (frozen) and every expert parameter get none; the router LM does
    assert router.W.weight.grad is None
    assert all(p_.grad is None for m in experts for p_ in m.parameters())


def test_cdpo_step_mixes_an_sft_batch_with_mu(models):
    """Eq. (9): the stage-2 loss is L_CDPO + mu L_SFT; --sft_mix and --beta change the update."""
    _, experts, tok = models
    stats = FR.expert_token_stats(experts, tok, ROWS, 3, 64)
    pairs = [dict(prompt=r["prompt"], chosen=r["response"], rejected="1a11;=1", chosen_eos=True, rejected_eos=True,
                  ref_chosen=-40.0, ref_rejected=-10.0) for r in ROWS]
    out = {}
    for name, kw in (("base", {}), ("mu0", dict(sft_mix=0.0)), ("mu2", dict(sft_mix=2.0)), ("beta", dict(beta=0.5))):
        args = args_for(per_device_batch_size=2, pref_batch_size=2, **kw)
        router = fresh_router(models)
        router.W.weight.requires_grad_(False)
        w = dict(rank=0, world=1, experts=experts, tok=tok)
        loss, m, _ = FR.cdpo_step_fn(args, w, router, pairs, ROWS, stats)(0)
        out[name] = (loss.item(), m["cdpo_loss"].item(), router.lm.model.embed_tokens.weight.grad.norm().item())
    assert out["mu0"][0] == pytest.approx(out["mu0"][1], abs=1e-6)  # no SFT term
    sft = out["base"][0] - out["base"][1]
    assert sft > 0 and out["mu2"][0] == pytest.approx(out["mu2"][1] + 2 * sft, abs=1e-5)
    assert out["mu2"][2] != pytest.approx(out["base"][2]) and out["beta"][1] != pytest.approx(out["base"][1])


@torch.no_grad()
def plain_decode(router, experts, tok, prompt, steps, mode):
    """Greedy fused decoding of one prompt without a cache: every model re-reads the whole sequence each step."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out, choices, logps = [], [], []
    for _ in range(steps):
        x = torch.tensor([ids + out])
        les = [torch.log_softmax(m(input_ids=x).logits[0, -1], -1) for m in experts]
        if mode == "token_conf":
            k = max(range(len(les)), key=lambda i: float(les[i].max()))
            z = les[k]
        else:
            h = router.lm.model(input_ids=x).last_hidden_state[0, -1]
            k = int(router.W(h).argmax())
            lr = torch.log_softmax(router.lm.lm_head(h), -1)
            z = {"sum": lr + les[k], "expert_only": les[k], "router_only": lr}[mode]
        nxt = int(z.argmax())
        out.append(nxt)
        choices.append(k)
        logps.append(float(torch.log_softmax(z, -1)[nxt]))
        if nxt == tok.eos_token_id:
            break
    return out, choices, logps


@pytest.mark.parametrize("mode", ["sum", "expert_only", "token_conf"])
def test_fused_decoder_matches_a_plain_reference(models, mode):
    _, experts, tok = models
    router = fresh_router(models)
    prompts = ["3|a1b2=", "0|c4c4c9=", "7|d2="]  # different lengths: left padding and positions matter
    got = FR.fused_generate(router, experts, tok, prompts, 6, mode)
    lazy = FR.fused_generate(router, experts, tok, prompts, 6, mode, lazy=True)
    for b, p in enumerate(prompts):
        ids, ch, lp = plain_decode(router, experts, tok, p, 6, mode)
        n = int(got["response_mask"][b].sum())
        assert got["response_ids"][b, :n].tolist() == ids
        assert got["choice"][b, :n].tolist() == ch
        assert torch.allclose(got["logprobs"][b, :n], torch.tensor(lp), atol=1e-4)  # positions, masks, caches
        assert lazy["response_ids"][b, :n].tolist() == ids  # --lazy_experts: same tokens, same distributions
        assert torch.allclose(lazy["logprobs"][b, :n], torch.tensor(lp), atol=1e-4)
    assert lazy["expert_forwards"] <= got["expert_forwards"]


def test_lazy_experts_skip_unselected_experts(models):
    _, experts, tok = models
    router = fresh_router(models)
    with torch.no_grad():
        router.W.weight.zero_()
        router.W.weight[0, 0] = 0.0  # every score 0: argmax picks expert 0 everywhere
    eager = FR.fused_generate(router, experts, tok, ["3|a1b2="], 5, "sum")
    lazy = FR.fused_generate(router, experts, tok, ["3|a1b2="], 5, "sum", lazy=True)
    assert eager["texts"] == lazy["texts"]
    T = eager["response_ids"].shape[1]
    P = len("3|a1b2=")
    assert eager["expert_forwards"] == 2 * (P + T - 1)  # both experts read every position
    assert lazy["expert_forwards"] == P + T - 1  # expert 1 never runs


def test_fusion_modes_decode_differently(models):
    _, experts, tok = models
    router = fresh_router(models)
    prompts = ["3|a1b2=", "0|c4c4c9=", "7|d2=", "5|b5b5="]
    outs = {m: FR.fused_generate(router, experts, tok, prompts, 8, m)["texts"] for m in
            ("sum", "expert_only", "router_only", "token_conf")}
    assert len({tuple(v) for v in outs.values()}) == 4, outs


# ---- validation and refusals ----


@pytest.mark.parametrize("flags,msg", [
    (["--beta", "0"], "--beta"), (["--learning_rate", "-1"], "--learning_rate"), (["--eval_size", "0"], "--eval_size"),
    (["--route_weight", "0"], "route_weight"), (["--experts", "x"], "--router_init toy"),
    (["--stage", "cdpo"], "--router_path"), (["--router_path", "r.pt"], "--router_path"),
    (["--temperature", "-1"], "--temperature"), (["--toy_steps", "5"], "--toy_steps"),
    (["--router_init", "a", "--experts", "b,b"], "twice"), (["--router_init", "a", "--experts", "b,c"], "--train_file"),
    (["--train_file", "x.jsonl"], "real models"), (["--resume", "--overwrite"], "exclude"),
    (["--lora_r", "-1"], "--lora_r"), (["--table", "--table_sets", "nope"], "table"),
])
def test_validation_refuses(flags, msg):
    with pytest.raises(C.UserError, match=msg):
        FR.validate_args(FR.parse_args(flags))


def test_tokenizer_mismatch_is_refused_naming_the_model():
    from transformers import ByT5Tokenizer

    byte = ByT5Tokenizer()
    bpe = C.bpe_tokenizer(C.toy_corpus(200), 300)
    FR.check_tokenizers({"r": byte, "e1": ByT5Tokenizer()})  # identical: accepted
    with pytest.raises(C.UserError, match="'e2' encodes a probe"):
        FR.check_tokenizers({"r": byte, "e1": ByT5Tokenizer(), "e2": bpe})


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    """main() under exit_on_user_error (what `python fusionroute.py` runs), in-process: exit 2, one line naming the
    mismatched expert, nothing written."""
    a, b = tmp_path / "a", tmp_path / "b"
    for path, kind in ((a, "byte"), (b, "bpe")):
        m, t = C.tiny_lm(n_layer=1, d_model=16, tokenizer=kind)
        m.save_pretrained(path)
        t.save_pretrained(path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "response": "r", "answer": "1"}\n')
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, C.exit_on_user_error():
        FR.main(FR.parse_args(["--router_init", str(a), "--experts", f"{a},{b}", "--train_file", str(data),
                               "--eval_file", str(data), "--output_dir", str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert str(b) in err and "probe" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": 1\n')
    with pytest.raises(SystemExit) as e, C.exit_on_user_error():
        FR.main(FR.parse_args(["--router_init", str(a), "--experts", f"{a},{a}/", "--train_file", str(bad),
                               "--eval_file", str(data), "--output_dir", str(out)]))
    assert e.value.code == 2 and f"{bad}:2" in capsys.readouterr().err and not out.exists()


# ---- slow: the CLI end to end ----


def run_cli(args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "fusionroute.py"), *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_smoke_run_writes_summary_and_png(tmp_path):
    out = tmp_path / "run"
    r = run_cli([*TINY, "--max_steps", "2", "--eval_size", "16", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert (out / "fusionroute.png").is_file() and "done in" in r.stdout.strip().splitlines()[-1]
    assert set(s["results"]) >= {"expert:a", "fusionroute", "route_only", "direct_ft", "merge_ta", "token_conf",
                                  "seq_select (oracle)"}
    assert all(v["n"] == 16 for a in s["results"].values() for v in a.values())
    rows = C.read_jsonl(str(out / "metrics.jsonl"))
    assert [r_["stage"] for r_ in rows] == ["sft", "sft", "direct_ft", "direct_ft"]
    assert all(k in rows[0] for k in ("t_forward", "t_backward", "t_optimizer", "t_expert_forward", "route_acc"))
    # a fresh run into a finished run's directory is refused; --resume with a changed flag too
    r2 = run_cli([*TINY, "--max_steps", "2", "--eval_size", "16", "--output_dir", str(out)])
    assert r2.returncode == 2 and "already holds a run" in r2.stderr
    r3 = run_cli([*TINY, "--max_steps", "2", "--eval_size", "16", "--output_dir", str(out), "--resume", "--beta", "0.2"])
    assert r3.returncode == 2 and "--beta 0.1 -> 0.2" in r3.stderr


def _strip_times(x):
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if k not in ("wall_time_s", "time") and not k.startswith("t_")}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


@pytest.mark.slow
def test_kill_9_and_resume_reach_the_uninterrupted_summary(tmp_path):
    flags = [*TINY, "--stage", "both", "--max_steps", "4", "--save_every", "2", "--eval_size", "8", "--num_pairs", "24",
             "--method", "fusionroute,direct_ft"]
    full = tmp_path / "full"
    assert run_cli([*flags, "--output_dir", str(full)]).returncode == 0
    cut = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "fusionroute.py"), *flags, "--output_dir", str(cut)],
                         env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and C.checkpoint_step(str(cut / "cdpo_checkpoint")) is None:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert C.checkpoint_step(str(cut / "cdpo_checkpoint")) is not None and not (cut / "summary.json").exists()
    r = run_cli([*flags, "--output_dir", str(cut), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    a = _strip_times(json.loads((full / "summary.json").read_text()))
    b = _strip_times(json.loads((cut / "summary.json").read_text()))
    assert a["results"] == b["results"] and a["last_train"] == b["last_train"]
    strip = lambda rows: [{k: v for k, v in r_.items() if not k.startswith("t_")} for r_ in rows]  # noqa: E731
    assert strip(C.read_jsonl(str(full / "metrics.jsonl"))) == strip(C.read_jsonl(str(cut / "metrics.jsonl")))


@pytest.mark.slow
def test_table_over_two_seeds(tmp_path):
    out = tmp_path / "table"
    r = run_cli(["--table", "--table_seeds", "0,1", "--table_sets", "tables", *TINY, "--max_steps", "1", "--eval_size", "8",
                 "--num_pairs", "16", "--method", "route_only,fusionroute", "--output_dir", str(out)], timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = (out / "table.md").read_text()
    summ = json.loads((out / "table.json").read_text())
    acc = [summ[f"tables-main-s{s}"]["results"]["fusionroute"]["hyb3"]["acc"] for s in (0, 1)]
    mean, sd = sum(acc) / 2, abs(acc[0] - acc[1]) / math.sqrt(2)  # sample std of two values
    row = next(l for l in md.splitlines() if l.startswith("| fusionroute |"))
    assert f"{mean:.3f} ± {sd:.3f}" in row
    assert "| fusionroute, informative all |" in md and "| route_only, route marginal |" in md


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    flags = [*TINY, "--max_steps", "2", "--eval_size", "8", "--method", "fusionroute", "--save_every", "0"]
    one = tmp_path / "one"
    r1 = run_cli([*flags, "--per_device_batch_size", "8", "--output_dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-2000:]
    two = tmp_path / "two"
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                         os.path.join(ROOT, "fusionroute.py"), *flags, "--per_device_batch_size", "4", "--output_dir",
                         str(two)], capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = C.read_jsonl(str(one / "metrics.jsonl"))
    b = C.read_jsonl(str(two / "metrics.jsonl"))
    for x, y in zip(a, b):
        for k in ("loss", "lm_loss", "route_loss", "route_acc", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    sa = json.loads((one / "summary.json").read_text())["results"]
    sb = json.loads((two / "summary.json").read_text())["results"]
    assert {k: v["correct"] for k, v in sa["fusionroute"].items()} == {k: v["correct"] for k, v in sb["fusionroute"].items()}


@pytest.mark.slow
def test_real_checkpoint_smollm2(smollm2, tmp_path):
    """SmolLM2-135M-Instruct as router and (two paths to it) experts: chat template applied once, finite losses,
    the router's weights change, CDPO runs with W frozen, every tokenizer check passes."""
    e2 = tmp_path / "smol_copy"
    os.symlink(smollm2, e2)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(dict(prompt=f"What is {i} + {i}?", response=f"{i} + {i} = {2 * i}", answer=str(2 * i)))
                             + "\n" for i in range(4)))
    pref = tmp_path / "pref.jsonl"
    pref.write_text("".join(json.dumps(dict(prompt=f"What is {i} + 1?", chosen=f"{i + 1}", rejected=f"{i + 2}")) + "\n"
                            for i in range(4)))
    out = tmp_path / "run"
    r = run_cli(["--router_init", smollm2, "--experts", f"{smollm2},{e2}", "--train_file", str(train), "--pref_file",
                 str(pref), "--eval_file", str(train), "--stage", "both", "--max_steps", "1", "--per_device_batch_size",
                 "2", "--pref_batch_size", "2", "--eval_size", "2", "--max_new_tokens", "6", "--learning_rate", "1e-4",
                 "--method", "fusionroute,route_only", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = C.read_jsonl(str(out / "metrics.jsonl"))
    assert [x["stage"] for x in rows] == ["sft", "cdpo"] and all(math.isfinite(x["loss"]) for x in rows)
    sft = torch.load(out / "router_sft.pt", map_location="cpu")
    cdpo = torch.load(out / "router_cdpo.pt", map_location="cpu")
    base, tok = C.load_lm(smollm2, dtype=torch.float32, device="cpu")
    k = "lm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sft[k], base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(cdpo[k], sft[k]) and torch.equal(cdpo["W.weight"], sft["W.weight"])  # W frozen in CDPO
    rendered = FR.render(tok, "What is 1 + 1?", True)
    assert rendered.count("<|im_start|>user") == 1
