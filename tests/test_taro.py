"""Tests of taro.py: the math against hand values (fusion, ARM loss, features, router range, ARGS), the
wiring against plain references written here (one ARM update, one router update, the lock-step fused
decoder, the eval bookkeeping), every arm-defining flag, validation / preflight refusals, the CLI.

Breakages these tests were seen to catch (each line broken in a copy of taro.py, the named tests run and seen
to fail, then restored):
- fuse_logprobs without the final log_softmax: test_fuse_hand_values
- arm_loss with the margin's sign flipped, or beta_r ignored: test_arm_loss_hand_value, test_arm_beta_changes_the_loss
- ARM step log-probs summed over every token (step mask ignored), chosen / rejected swapped:
  test_one_arm_update_matches_a_plain_reference
- router_features with KL(rm || base) instead of KL(base || rm), or agreement inverted: test_router_features_hand_values
- router without its sigmoid bound: test_router_range_and_zero_weights
- router_step: hidden states one position off, EOS not scored, the l1 term dropped, the loss averaged per chunk
  instead of over the global token count, --alpha_l1 or --router_loss ignored:
  test_one_router_update_matches_a_plain_reference, test_router_flags_change_the_update
- fused decoder: positions not advanced after the prefill: test_fused_decoder_matches_a_plain_reference; the
  ARM's logits not sliced to len(tok): test_fused_decoder_slices_padded_vocab
- ARGS taking its top-k from the ARM instead of the base: test_args_top_k_v_equals_genarm
- eval bookkeeping: carry digits at the wrong offset, alpha_other counting the carry digits:
  test_carry_positions_hand_values, test_evaluate_arm_hand_totals
Written to catch but not yet broken-and-rerun (the run ran out of time): validation ties going to the larger
alpha (test_choices_validation_and_oracle), population instead of sample std (test_table_aggregates_mean_and_std),
the rm arm decoding with the base (test_every_arm_decodes_differently), the attention mask not grown during
decoding and TARo fused at its mean alpha (test_fused_decoder_matches_a_plain_reference,
test_constant_router_decodes_as_genarm), the frozen cache gathered in the wrong order
(test_router_step_from_the_frozen_cache_equals_the_direct_step).
Not caught, and harmless: dropping router_step's no_grad around the frozen forwards (the loss is built from
no-grad heads, so no gradient reaches base or ARM either way; only memory grows).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import taro as T  # noqa: E402
from conftest import run_cli  # noqa: E402

torch.set_num_threads(1)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NANOPAPERS_THREADS": "1", "OMP_NUM_THREADS": "1"}
TIME_KEYS = ("wall_time_s", "time", "t_generate")


@pytest.fixture(scope="module")
def pair():
    """A tiny base and a tiny ARM (different weights, the same byte tokenizer)."""
    base, tok = C.tiny_lm(n_layer=1, d_model=32, seed=0)
    rm, _ = C.tiny_lm(n_layer=1, d_model=32, seed=1)
    for m in (base, rm):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return base, rm, tok


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, kw in (("a", dict(n_layer=1, d_model=32, seed=0)), ("b48", dict(n_layer=1, d_model=48, seed=1))):
        m, t = C.tiny_lm(**kw)
        m.save_pretrained(d / name)
        t.save_pretrained(d / name)
        out[name] = str(d / name)
    return out


def _args(*extra):
    return T.parse_args(["--output_dir", "x", *extra])


def _world(base, rm, tok, router=None, features="stats", **kw):
    return dict(base=base, rm=rm, tok=tok, router=router, device=torch.device("cpu"), temperature=0.0, top_k=40,
                beta_r=1.0, router_features=features, eval_batch_size=64, max_new_tokens=None, chat=False,
                byte_level=True, **kw)


def _byte_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- Eqs. (1)-(8): hand values ------------------------------------------------------------------------


def test_fuse_hand_values():
    lb, lr = torch.tensor([[0.6, 0.4]]).log(), torch.tensor([[0.2, 0.8]]).log()
    torch.testing.assert_close(T.fuse_logprobs(lb, lr, 1.0).exp(), torch.tensor([[0.272727, 0.727273]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(T.fuse_logprobs(lb, lr, 0.0), lb, atol=1e-6, rtol=0)
    # per-row alpha: row 0 alpha 0 (the base), row 1 alpha 2: 0.6*0.04 : 0.4*0.64 = 0.024 : 0.256
    two = T.fuse_logprobs(lb.repeat(2, 1), lr.repeat(2, 1), torch.tensor([0.0, 2.0])).exp()
    torch.testing.assert_close(two, torch.tensor([[0.6, 0.4], [0.024 / 0.28, 0.256 / 0.28]]), atol=1e-6, rtol=0)


def test_arm_loss_hand_value():
    loss = T.arm_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), 1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6) and float(loss) == pytest.approx(0.126928, abs=1e-6)
    assert float(T.arm_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), 0.5)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    logp = torch.tensor([[-9.0, -1.0, -2.0, -4.0]])
    assert float(T.step_logp(logp, torch.tensor([[0, 0, 1, 1]]))) == -6.0  # the step's tokens only


def test_arm_beta_changes_the_loss():
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert float(T.arm_loss(c, r, 1.0)) != pytest.approx(float(T.arm_loss(c, r, 2.0)))


def test_router_features_hand_values():
    V = 7
    u = torch.full((1, V), -math.log(V))
    f = T.router_features(u, u)[0]
    torch.testing.assert_close(f, torch.tensor([math.log(V), math.log(V), 1 / V, 1 / V, 0.0, 1.0]), atol=1e-6, rtol=0)
    pb, pr = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    f = T.router_features(torch.tensor([pb]).log(), torch.tensor([pr]).log())[0]
    h_b = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))  # 0.8018
    h_r = -(0.2 * math.log(0.2) + 0.5 * math.log(0.5) + 0.3 * math.log(0.3))  # 1.0297
    kl = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3)  # KL(base || rm) = 0.5837
    torch.testing.assert_close(f, torch.tensor([h_b, h_r, 0.7, 0.5, kl, 0.0]), atol=1e-6, rtol=0)
    assert abs(kl - (0.2 * math.log(0.2 / 0.7) + 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.1))) > 0.04  # asymmetric


def test_router_range_and_zero_weights():
    r = T.Router(6, 32, alpha_max=4.0)
    with torch.no_grad():
        r.net[2].weight.mul_(100.0)  # saturate g either way
        a = r(torch.randn(1000, 6) * 50)
    assert float(a.min()) >= 0 and float(a.max()) <= 4.0 and float(a.max()) > 3.9 and float(a.min()) < 0.1
    for p in r.parameters():
        torch.nn.init.zeros_(p)
    torch.testing.assert_close(r(torch.randn(5, 6)), torch.full((5,), 2.0))


def test_args_top_k_v_equals_genarm():
    g = torch.Generator().manual_seed(0)
    lb, lr = torch.log_softmax(torch.randn(4, 50, generator=g), -1), torch.log_softmax(torch.randn(4, 50, generator=g), -1)
    torch.testing.assert_close(T.args_logprobs(lb, lr, 0.7, 50), T.fuse_logprobs(lb, lr, 0.7), atol=1e-6, rtol=0)
    a3 = T.args_logprobs(lb, lr, 0.7, 3)
    assert (a3.isfinite().sum(-1) == 3).all()
    assert torch.equal(a3.isfinite(), torch.zeros_like(lb, dtype=torch.bool).scatter_(-1, lb.topk(3, -1).indices, True))
    # w and beta_r enter as their product
    torch.testing.assert_close(T.args_logprobs(lb, lr, 0.5, 50, beta_r=2.0), T.fuse_logprobs(lb, lr, 1.0), atol=1e-6, rtol=0)


# ---- the toy world -----------------------------------------------------------------------------------


def test_toy_domains_and_registration_is_temporary():
    import random

    p = T.toy_problem(random.Random(0), "carry_in", 6)
    with T.toy_domains():
        q = C.toy_problem(random.Random(0), "carry_in", 2, operands=[9, 5])
        m = C.toy_problem(random.Random(0), "max", 3, operands=[3, 1, 7])
    assert [s[2] for s in q.steps] == [9, 5] and q.answer == 5  # 0+9 = 9; 9+5 = 14 -> +1 carry -> 15 -> 5
    assert [s[2] for s in m.steps] == [3, 3, 7]
    assert p.domain == "carry_in" and len(p.steps) == 6
    assert "max" not in C.TOY_DOMAINS and "carry_in" not in C.TOY_DOMAINS


def test_toy_arm_pairs():
    pairs = T.toy_arm_pairs(0, 3, 200, 0.3)
    assert len(pairs) == 200 and pairs == T.toy_arm_pairs(0, 3, 200, 0.3) and pairs != T.toy_arm_pairs(0, 4, 200, 0.3)
    n_carry = 0
    for ctx, ch, rj in pairs:
        s, x, r = map(int, ch[:3])
        assert ch[3] == rj[3] == ";" and ch[:2] == rj[:2] and r == (s + x) % 10 and rj[2] != ch[2]
        if s + x >= 10:
            n_carry += 1
            assert int(rj[2]) == (r + 1) % 10  # the carry-bug step
        body = ctx.split("=", 1)[1]  # the correct steps before
        assert all((int(body[i]) + int(body[i + 1])) % 10 == int(body[i + 2]) for i in range(0, len(body), 4))
    only = T.toy_arm_pairs(0, 3, 100, 0.0)
    assert all(int(c[0]) + int(c[1]) >= 10 for _, c, _ in only) and 0 < n_carry < 200


def test_carry_positions_hand_values():
    # add 958: 099; 958(14->4); 486(12->2) -> carries at steps 1 and 2: positions 6 and 10
    assert T.carry_positions("099;954;482;=2", "add") == [6, 10]
    assert T.carry_positions("099;954;482;=2", "max") == []
    assert T.carry_positions("09", "add") == []


# ---- one ARM update against a plain reference ---------------------------------------------------------


def test_one_arm_update_matches_a_plain_reference():
    rm, tok = C.tiny_lm(n_layer=1, d_model=32, seed=2)
    rm.train()
    pairs = [("add 95=099;", "954;", "955;"), ("add 3=", "033;", "037;"), ("add 77=077;", "774;", "775;")]
    loss, m, _ = T.arm_step(rm, tok, pairs, 0.7, 3, 1)
    got = {n: p.grad.clone() for n, p in rm.named_parameters()}
    rm.zero_grad(set_to_none=True)
    # reference: each text alone (no padding), full forward, log-softmax, sum over the step's characters
    total = 0.0
    scores = []
    for ctx, ch, rj in pairs:
        s = []
        for step in (ch, rj):
            ids = _byte_ids(tok, ctx) + _byte_ids(tok, step)
            logits = rm(input_ids=torch.tensor([ids])).logits[0].float()
            lp = 0.0
            for i in range(len(_byte_ids(tok, ctx)), len(ids)):
                lp = lp + torch.log_softmax(logits[i - 1], -1)[ids[i]]
            s.append(lp)
        scores.append(s)
        total = total - torch.nn.functional.logsigmoid(0.7 * (s[0] - s[1]))
    ref = total / 3
    ref.backward()
    assert float(loss) == pytest.approx(ref.item(), abs=1e-5)
    assert float(m["chosen_logp"]) == pytest.approx(sum(float(s[0].detach()) for s in scores) / 3, abs=1e-4)
    for n, p in rm.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


# ---- one router update against a plain reference ------------------------------------------------------


def _plain_router_loss(base, rm, tok, router, sols, kind, l1, hidden):
    """Loops over solutions and response tokens (EOS included); full forwards, no padding."""
    terms, n = [], 0
    for prompt, resp in sols:
        p_ids = _byte_ids(tok, prompt)
        ids = p_ids + _byte_ids(tok, resp) + [tok.eos_token_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            lb_all = torch.log_softmax(base(input_ids=x).logits[0].float(), -1)
            out = rm(input_ids=x, output_hidden_states=True)
            lr_all = torch.log_softmax(out.logits[0].float(), -1)
            h_all = out.hidden_states[-1][0]
        for i in range(len(p_ids), len(ids)):
            lb, lr, y = lb_all[i - 1], lr_all[i - 1], ids[i]
            pb, pr = lb.exp(), lr.exp()
            f = [-(pb * lb).sum(), -(pr * lr).sum(), pb.max(), pr.max(), (pb * (lb - lr)).sum(),
                 torch.tensor(float(int(lb.argmax()) == int(lr.argmax())))]
            f = torch.stack(f)
            if hidden:
                f = torch.cat([f, h_all[i - 1]])
            W1, b1 = router.net[0].weight, router.net[0].bias
            W2, b2 = router.net[2].weight, router.net[2].bias
            g = (W2 @ torch.tanh(W1 @ f + b1) + b2)[0]
            a = router.alpha_max * torch.sigmoid(g)
            fused = lb + a * lr
            fused = fused - torch.logsumexp(fused, 0)
            if kind == "nll":
                terms.append(-fused[y] + l1 * a)
            else:
                t = 1.0 if lr[y] > lb[y] else 0.0
                terms.append(-(t * torch.log(torch.sigmoid(g)) + (1 - t) * torch.log(1 - torch.sigmoid(g))))
            n += 1
    return torch.stack(terms).sum() / n


SOLS = [("add 95=", "099;954;=4"), ("add 3=", "033;=3"), ("max 71=", "077;771;=7")]


@pytest.mark.parametrize("kind,l1,feats", [("nll", 0.3, "stats"), ("bce", 0.0, "stats"), ("nll", 0.01, "stats+rm_hidden")])
def test_one_router_update_matches_a_plain_reference(pair, kind, l1, feats):
    base, rm, tok = pair
    args = _args("--router_loss", kind, "--alpha_l1", str(l1), "--router_features", feats, "--logit_chunk", "5")
    router = T.build_router(args, rm.config.hidden_size)
    tot, _ = T.router_step(_world(base, rm, tok, features=feats), router, SOLS, args, 1)
    got = {n: p.grad.clone() for n, p in router.named_parameters()}
    router.zero_grad(set_to_none=True)
    ref = _plain_router_loss(base, rm, tok, router, SOLS, kind, l1, feats != "stats")
    ref.backward()
    assert tot["loss"] == pytest.approx(ref.item(), abs=1e-5)
    for n, p in router.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_router_step_from_the_frozen_cache_equals_the_direct_step(pair):
    base, rm, tok = pair
    args = _args("--router_batch_size", "2")
    w = _world(base, rm, tok, time=dict(router={}))
    cache = T.frozen_cache(args, w, SOLS)
    assert [len(y) for y in cache["y"]] == [len(r) + 1 for _, r in SOLS]  # response characters + EOS
    grads = []
    for kw in (dict(), dict(cache=cache, idx=[2, 0])):
        router = T.build_router(args, 32)
        sols = [SOLS[2], SOLS[0]]
        tot, _ = T.router_step(w, router, sols, args, 1, **kw)
        grads.append((tot["loss"], router.net[0].weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)
    assert T.frozen_cache(_args("--no-cache_frozen"), w, SOLS) is None


def test_router_update_touches_only_phi():
    base, tok = C.tiny_lm(n_layer=1, d_model=32, seed=0)
    rm, _ = C.tiny_lm(n_layer=1, d_model=32, seed=1)
    for m in (base, rm):  # trainable on purpose: the router step itself must keep them out of the graph
        m.train()
    args = _args()
    router = T.build_router(args, 32)
    T.router_step(_world(base, rm, tok), router, SOLS, args, 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
    assert all(p.grad is None for p in list(base.parameters()) + list(rm.parameters()))


def test_router_flags_change_the_update(pair):
    base, rm, tok = pair

    def run(*flags):
        args = _args(*flags)
        router = T.build_router(args, 32)
        tot, _ = T.router_step(_world(base, rm, tok, features=args.router_features), router, SOLS, args, 1)
        return tot["loss"], router.net[0].weight.grad.clone()

    ref = run()
    for flags in (["--alpha_l1", "0.5"], ["--router_loss", "bce"], ["--alpha_max", "2"], ["--router_hidden", "8"],
                  ["--router_features", "stats+rm_hidden"], ["--seed", "1"]):
        loss, grad = run(*flags)
        assert loss != pytest.approx(ref[0], abs=1e-7) or grad.shape != ref[1].shape, flags
    assert run("--logit_chunk", "3")[0] == pytest.approx(ref[0], abs=1e-6)  # chunking changes nothing


# ---- fused decoding -------------------------------------------------------------------------------


def _plain_fused_decode(base, rm, tok, prompt, n, alpha_fn):
    """One prompt, no padding, no KV cache: full forwards each step."""
    ids, out, alphas = _byte_ids(tok, prompt), [], []
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            lb = torch.log_softmax(base(input_ids=x).logits[0, -1, :len(tok)].float(), -1)
            o = rm(input_ids=x, output_hidden_states=True)
            lr = torch.log_softmax(o.logits[0, -1, :len(tok)].float(), -1)
            a = alpha_fn(lb, lr, o.hidden_states[-1][0, -1])
            nxt = int((lb + a * lr).argmax())
        out.append(nxt)
        alphas.append(float(a))
        ids.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return out, alphas


def test_fused_decoder_matches_a_plain_reference(pair):
    base, rm, tok = pair
    prompts = ["add 95=", "max 7140=", "carry_in 3="]  # different lengths: left padding is exercised
    router = T.Router(6, 8, 4.0)
    torch.manual_seed(3)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=2.0)

    def plain_alpha(lb, lr, h):
        pb, pr = lb.exp(), lr.exp()
        f = torch.stack([-(pb * lb).sum(), -(pr * lr).sum(), pb.max(), pr.max(), (pb * (lb - lr)).sum(),
                         torch.tensor(float(int(lb.argmax()) == int(lr.argmax())))])
        return 4.0 * torch.sigmoid(router.net[2](torch.tanh(router.net[0](f))))[0]

    for comb, afn in ((T.make_combiner("genarm", 0.7), lambda lb, lr, h: torch.tensor(0.7)),
                      (T.make_combiner("taro", router=router), plain_alpha)):
        g = T.fused_generate(base, rm, tok, prompts, 12, comb)
        alphas_seen = set()
        for b, p in enumerate(prompts):
            want, a_want = _plain_fused_decode(base, rm, tok, p, 12, afn)
            got = g["response_ids"][b][g["response_mask"][b].bool()].tolist()
            assert got == want, p
            torch.testing.assert_close(g["alpha"][b, :len(want)], torch.tensor(a_want), atol=1e-5, rtol=1e-5)
            alphas_seen |= {round(a, 3) for a in a_want}
        assert len(alphas_seen) > 1 or comb.__name__ != "taro"  # the router gives per-token weights


def test_fused_decoder_slices_padded_vocab(pair):
    """An ARM whose embedding matrix is padded beyond len(tok) fuses on the shared vocabulary only."""
    base, rm, tok = pair
    padded, _ = C.tiny_lm(n_layer=1, d_model=32, seed=1)
    padded.resize_token_embeddings(len(tok) + 16)
    with torch.no_grad():
        padded.lm_head.weight[len(tok):] = 50.0  # huge logits on ids no tokenizer can decode
    padded.eval()
    g = T.fused_generate(base, padded, tok, ["add 95="], 10, T.make_combiner("genarm", 1.0))
    assert int(g["response_ids"].max()) < len(tok)


def test_constant_router_decodes_as_genarm(pair):
    base, rm, tok = pair
    c, amax = 1.5, 4.0
    router = T.Router(6, 8, amax)
    for p in router.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        router.net[2].bias.fill_(math.log(c / (amax - c)))  # alpha_max sigmoid(b) = c
    prompts = ["add 95=", "max 71=", "carry_in 3582="]
    a = T.fused_generate(base, rm, tok, prompts, 16, T.make_combiner("taro", router=router))
    b = T.fused_generate(base, rm, tok, prompts, 16, T.make_combiner("genarm", c))
    assert torch.equal(a["response_ids"], b["response_ids"]) and a["texts"] == b["texts"]
    torch.testing.assert_close(a["alpha"][a["response_mask"].bool()], torch.full((int(a["response_mask"].sum()),), c))
    # and ARGS with k = V and w = c decodes the same tokens as GenARM at c
    s = T.fused_generate(base, rm, tok, prompts, 16, T.make_combiner("args", c, top_k=len(tok)))
    assert torch.equal(s["response_ids"], b["response_ids"])


def test_every_arm_decodes_differently(pair):
    base, rm, tok = pair
    router = T.Router(6, 8, 4.0)
    w = _world(base, rm, tok, router=router)
    w["top_k"] = 2
    prompts = ["add 95=", "max 71=", "carry_in 3582=", "add 123456="]
    outs = {}
    for arm in (dict(kind="base"), dict(kind="rm"), dict(kind="genarm", alpha=3.0), dict(kind="args", alpha=3.0),
                dict(kind="taro")):
        outs[arm["kind"]] = T.decode_arm(w, arm, prompts, 12, None)["texts"]
    kinds = list(outs)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert outs[a] != outs[b], (a, b)


def test_transfer_router_runs_on_bases_of_other_sizes(pair, tiny_dirs):
    """One router (stats features) drives bases of hidden size 32 and 48 with the same ARM."""
    _, rm, tok = pair
    router = T.Router(6, 8, 4.0)
    for path in (tiny_dirs["a"], tiny_dirs["b48"]):
        base, _ = C.load_lm(path)
        g = T.fused_generate(base, rm, tok, ["add 95=", "max 7="], 8, T.make_combiner("taro", router=router))
        assert g["alpha"].shape[0] == 2 and float(g["alpha"].max()) > 0
    # and stats+rm_hidden depends on the ARM's size only
    router_h = T.Router(6 + rm.config.hidden_size, 8, 4.0, "stats+rm_hidden")
    base, _ = C.load_lm(tiny_dirs["b48"])
    g = T.fused_generate(base, rm, tok, ["add 95="], 8, T.make_combiner("taro", router=router_h), want_hidden=True)
    assert g["response_mask"].sum() > 0


# ---- eval bookkeeping -------------------------------------------------------------------------------


def test_evaluate_arm_hand_totals(monkeypatch):
    texts = ["099;954;482;=2", "099;954;481;=1", "022;=2"]  # add: right, wrong, right
    T_ = 16
    alpha = torch.zeros(3, T_)
    mask = torch.zeros(3, T_)
    for b, t in enumerate(texts):
        mask[b, :len(t) + 1] = 1  # + EOS
        alpha[b, :len(t) + 1] = 1.0
    alpha[0, 6], alpha[0, 10], alpha[1, 6] = 3.0, 5.0, 4.0  # carry digits (row 1's step 3 "481" is not a carry? 4+8 >= 10: it is)
    alpha[1, 10] = 2.0
    monkeypatch.setattr(T, "decode_arm", lambda w, arm, prompts, mnt, gen: dict(texts=texts, response_mask=mask, alpha=alpha))
    probs = [dict(prompt="add 958=", answer="2", domain="add", k=3), dict(prompt="add 958=", answer="2", domain="add", k=3),
             dict(prompt="add 2=", answer="2", domain="add", k=1)]
    w = dict(eval_batch_size=2, max_new_tokens=None, tok=None, chat=False, byte_level=True)
    monkeypatch.setattr(T, "render", lambda tok, p, chat: p)
    r = T.evaluate_arm(w, dict(kind="taro"), probs, 0)
    # decode_arm is called per batch of 2 with the same fixed outputs: rows used are [0, 1] then [0]
    # batch 1: texts[0] vs answer 2 (right), texts[1] vs 2 (wrong); batch 2: texts[0] vs 2 (right) -> 2/3
    assert (r["correct"], r["n"]) == (2, 3)
    # alpha sums per batch over the (fixed) 3-row mask: rows 0,1,2 each batch
    tok_per_batch = float(mask.sum())
    a_per_batch = float((alpha * mask).sum())
    assert r["tokens"] == int(2 * tok_per_batch) and r["mean_alpha"] == pytest.approx(a_per_batch / tok_per_batch)
    # carry digits: batch 1 rows 0, 1 -> (3 + 5) + (4 + 2); batch 2 row 0 -> 3 + 5; 6 digits
    assert r["carry_tokens"] == 6 and r["alpha_carry"] == pytest.approx((8 + 6 + 8) / 6)
    assert r["alpha_other"] == pytest.approx((2 * a_per_batch - 22) / (2 * tok_per_batch - 6))


def test_choices_validation_and_oracle():
    args = _args("--alpha_grid", "0.5,1,2")
    res = {}
    for a, val, add, mx in ((0.5, 0.8, 0.6, 0.9), (1.0, 0.8, 0.9, 0.5), (2.0, 0.7, 0.95, 0.5)):
        res[f"val: genarm a={a:g}"] = {"val": {"acc": val}}
        res[f"genarm a={a:g}"] = {"add": {"acc": add}, "max": {"acc": mx}}
    ch = T.choices(args, res, ["add", "max"])["genarm"]
    assert ch["chosen"] == 0.5 and ch["chosen_label"] == "genarm a=0.5"  # tie on validation: the smaller alpha
    assert ch["oracle"] == {"add": {"alpha": 2.0, "acc": 0.95}, "max": {"alpha": 0.5, "acc": 0.9}}


def test_table_aggregates_mean_and_std(tmp_path):
    def summ(acc, alpha):
        r = {"add": dict(acc=acc, mean_alpha=alpha, alpha_carry=2 * alpha, alpha_other=alpha / 2), "max": dict(acc=1.0, mean_alpha=alpha)}
        return dict(results={"taro": r}, choices={}, wall_time_s=120.0)

    md = T.write_table({"A-s0": summ(0.5, 1.0), "A-s1": summ(0.7, 3.0)}, [0, 1], str(tmp_path))
    row = [l for l in md.splitlines() if l.startswith("| taro")][0]
    # add 0.5, 0.7 -> 0.600 ± 0.141; mean alpha over domains (1, 3) -> 2.000 ± 1.414; carry (2, 6) -> 4 ± 2.828
    assert row == "| taro | 0.600 ± 0.141 | 1.000 ± 0.000 | 2.000 ± 1.414 | 4.000 ± 2.828 | 1.000 ± 0.707 |  |"
    assert (tmp_path / "table.png").is_file() and "minutes per run: 2.0" in md


# ---- validation, preflight, run policy ----------------------------------------------------------------


@pytest.mark.parametrize("flags,msg", [
    (["--alpha_max", "0"], "--alpha_max"), (["--alpha_l1", "-1"], "--alpha_l1"), (["--arm_beta", "0"], "--arm_beta"),
    (["--arm_steps", "0"], "--arm_steps"), (["--router_batch_size", "0"], "--router_batch_size"),
    (["--alpha_grid=-1,2"], "--alpha_grid"), (["--temperature", "-1"], "--temperature"),
    (["--arm_wrong_rate", "2"], "--arm_wrong_rate"), (["--n_operands", "9"], "--n_operands"),
    (["--stage", "eval", "--rm_model_name_or_path", "r"], "--router_path"),
    (["--stage", "router"], "--rm_model_name_or_path"), (["--router_path", "r.pt"], "--stage eval"),
    (["--rm_model_name_or_path", "r"], "drop"), (["--stage", "arm", "--method", "taro"], "--method"),
    (["--resume", "--overwrite"], "exclude"), (["--table", "--table_seeds", "a"], "--table_seeds"),
    (["--eval_size", "0"], "--eval_size"), (["--logit_chunk", "0"], "--logit_chunk"),
])
def test_validate_args_refuses(flags, msg):
    with pytest.raises(C.UserError, match=msg.replace("-", r"\-")):
        T.validate_args(_args(*flags))


def test_preflight_refuses_tokenizer_mismatch_and_bad_files(tmp_path, tiny_dirs):
    m, t = C.tiny_lm(n_layer=1, d_model=16, tokenizer="bpe", seed=0)
    m.save_pretrained(tmp_path / "bpe")
    t.save_pretrained(tmp_path / "bpe")
    args = _args("--model_name_or_path", tiny_dirs["a"], "--stage", "router", "--rm_model_name_or_path", str(tmp_path / "bpe"))
    with pytest.raises(C.UserError, match="tokenize differently"):
        T.preflight(args)
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "prefix": "", "chosen": "x", "rejected": "y"}\n{"prompt": "b", "prefix": ""}\n')
    with pytest.raises(C.UserError, match="pairs.jsonl:2: missing 'chosen', 'rejected'"):
        T.preflight(_args("--model_name_or_path", tiny_dirs["a"], "--arm_train_file", str(bad)))
    with pytest.raises(C.UserError, match="router.pt"):
        T.preflight(_args("--model_name_or_path", tiny_dirs["a"], "--stage", "eval", "--rm_model_name_or_path",
                          tiny_dirs["a"], "--router_path", str(tmp_path / "none.pt")))


def _run(flags, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "taro.py"), *flags], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def test_tokenizer_mismatch_exits_2_and_writes_nothing(tmp_path, tiny_dirs):
    m, t = C.tiny_lm(n_layer=1, d_model=16, tokenizer="bpe", seed=0)
    m.save_pretrained(tmp_path / "bpe")
    t.save_pretrained(tmp_path / "bpe")
    out = tmp_path / "out"
    r = run_cli(T, ["--model_name_or_path", tiny_dirs["a"], "--stage", "router", "--rm_model_name_or_path", str(tmp_path / "bpe"),
                    "--output_dir", str(out)])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "tokenize" in r.stderr
    assert not out.exists()


def test_smoke_run_and_resume_policy(tmp_path, tiny_dirs):
    out = tmp_path / "run"
    flags = ["--model_name_or_path", tiny_dirs["a"], "--max_steps", "2", "--eval_size", "16", "--val_size", "8",
             "--alpha_grid", "0.5,2", "--output_dir", str(out)]
    r = _run(flags)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert (out / "taro.png").is_file() and (out / "rm" / "config.json").is_file() and (out / "router.pt").is_file()
    assert set(s["results"]) == {"base", "rm", "genarm a=0.5", "genarm a=2", "args w=0.5", "args w=2", "taro", T.SAME_STRENGTH}
    assert all(s["results"]["base"][d]["n"] == 16 for d in T.TOY_EVAL_DOMAINS) and r.stdout.strip().splitlines()[-1].startswith("done")
    rows = C.read_jsonl(str(out / "metrics.jsonl"))
    assert [r_["step"] for r_ in rows] == [1, 2, 3, 4] and all("t_backward" in r_ for r_ in rows)
    # a finished run is not overwritten; a changed flag is refused on --resume; --resume needs a run
    with pytest.raises(C.UserError, match="already holds a run"):
        T.main(T.parse_args(flags))
    with pytest.raises(C.UserError, match="--alpha_l1 0.01 -> 0.5"):
        T.main(T.parse_args(flags + ["--resume", "--alpha_l1", "0.5"]))
    with pytest.raises(C.UserError, match="no run"):
        T.main(T.parse_args(flags[:-1] + [str(tmp_path / "empty"), "--resume"]))
    assert json.loads((out / "summary.json").read_text()) == s and not (tmp_path / "empty").exists()


# ---- slow: kill -9 + resume, seeds, torchrun, the real checkpoint -------------------------------------


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIME_KEYS and not k.startswith("t_")}
    return obj


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_summary(tmp_path, tiny_dirs):
    flags = ["--model_name_or_path", tiny_dirs["a"], "--arm_steps", "30", "--router_steps", "40", "--save_every", "5",
             "--eval_size", "24", "--val_size", "8", "--alpha_grid", "0.5,2", "--method", "genarm,taro"]
    r = _run(flags + ["--output_dir", str(tmp_path / "full")])
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "taro.py"), *flags, "--output_dir", str(out)], env=ENV,
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while C.find_checkpoint(str(out / "router_checkpoint")) is None and time.time() - t0 < 240 and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert C.find_checkpoint(str(out / "router_checkpoint")) is not None and not (out / "summary.json").exists()
    r = _run(flags + ["--output_dir", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    a.pop("rm"), b.pop("rm"), a.pop("router"), b.pop("router")
    assert _strip(a) == _strip(b)
    ma, mb = (C.read_jsonl(str(d / "metrics.jsonl")) for d in (tmp_path / "full", out))
    assert [_strip(x) for x in ma] == [_strip(x) for x in mb]


@pytest.mark.slow
def test_seeds_differ_and_each_repeats(tmp_path, tiny_dirs):
    flags = ["--model_name_or_path", tiny_dirs["a"], "--max_steps", "5", "--eval_size", "16", "--val_size", "8",
             "--alpha_grid", "1", "--method", "taro"]
    sums = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = _run(flags + ["--seed", str(seed), "--output_dir", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-2000:]
        sums.append(_strip(json.loads((tmp_path / name / "summary.json").read_text())))
    for s in sums:
        s.pop("rm"), s.pop("router"), s.pop("seed")
    assert sums[0] == sums[1] and sums[0]["last_train"] != sums[2]["last_train"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one(tmp_path, tiny_dirs):
    flags = ["--model_name_or_path", tiny_dirs["a"], "--arm_steps", "3", "--router_steps", "3", "--arm_batch_size", "8",
             "--router_batch_size", "8", "--eval_size", "10", "--val_size", "4", "--alpha_grid", "1", "--method", "genarm,taro"]
    r = _run(flags + ["--output_dir", str(tmp_path / "one")])
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                        os.path.join(ROOT, "taro.py"), *flags, "--output_dir", str(tmp_path / "two")],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    for k in ("arm_loss", "router_loss", "alpha_mean"):
        assert a["last_train"][k] == pytest.approx(b["last_train"][k], rel=1e-4, abs=1e-5), k
    assert {k: {d: v[d]["n"] for d in v} for k, v in a["results"].items()} == \
           {k: {d: v[d]["n"] for d in v} for k, v in b["results"].items()}
    ra, rb = (torch.load(tmp_path / d / "router.pt", weights_only=False)["state_dict"] for d in ("one", "two"))
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_real_checkpoint_smollm2(tmp_path, smollm2):
    """SmolLM2-135M-Instruct (BPE, chat template, GQA): one ARM and one router update, then taro's decode."""
    path = smollm2
    out = tmp_path / "run"
    r = _run(["--model_name_or_path", path, "--max_steps", "1", "--arm_batch_size", "2", "--router_batch_size", "2",
              "--router_train_size", "2", "--eval_size", "2", "--val_size", "2", "--alpha_grid", "1", "--method", "taro",
              "--max_new_tokens", "8", "--eval_batch_size", "4", "--output_dir", str(out)], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert math.isfinite(s["last_train"]["arm_loss"]) and math.isfinite(s["last_train"]["router_loss"])
    base, tok = C.load_lm(path)
    rm, _ = C.load_lm(str(out / "rm"))
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), rm.state_dict().values()))
    text = T.render(tok, "add 358=", True)
    assert text.count("<|im_start|>user") == 1 and text != "add 358="
    ids = C.encode_prompts(tok, [text])[0][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == text.count("<|im_start|>")
    router = T.router_from(torch.load(out / "router.pt", weights_only=False))
    g = T.fused_generate(base, rm, tok, [text], 4, T.make_combiner("taro", router=router))
    assert g["alpha"].shape[1] >= 1 and float(g["alpha"][0, 0]) > 0
