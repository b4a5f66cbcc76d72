"""Tests of mofa.py: AUC / MI / mRMR / Lasso / quota on hand values; signals against a plain recomputation;
one mofa arm end to end against an independent plain reference (Python loops: greedy Eq. 3 per bucket,
phase 2, downstream GD, pairwise AUC); the bookkeeping (calls, retries, malformed, fallbacks) against hand
totals; the parser and validator (prose, unknown name, duplicate, two names, forbidden); no test-row
leakage; pair mode; every arm-defining flag changes the result; the LLM path through a local HF model, a
local OpenAI-compatible server (reference replies reproduce the ref run; a tiny random model's garbage is
counted) and, slow, SmolLM2-135M-Instruct; bad input -> one line, exit 2, nothing written; smoke run; slow:
kill -9 + --resume == uninterrupted, multi-seed.

Breakages these tests were seen to catch (each line broken by hand, then the test run):
  - auc without tie averaging (ranks by position) -> test_auc_hand_values_and_pairwise_definition
  - discretize always binning (no exact counts for discrete x) -> test_mutual_information_hand_values
  - mRMR without the redundancy term -> test_mrmr_prefers_the_independent_signal
  - soft_threshold without the max(., 0) / lasso bisection direction flipped -> test_lasso_*
  - bucket_quota with floor, or K/B without the factor -> test_bucket_quota_and_phase_sizes
  - forbidden features left in the pool / not re-rejected by the validator -> test_forbidden_never_selected_*
  - candidates no longer shuffled per call -> test_candidates_are_shuffled_per_call
  - phase 2 skipped or phase 2 quota != K -> test_mofa_arm_matches_plain_reference, test_bucket_quota_and_phase_sizes
  - redundancy read from a partner list in one direction only -> test_reference_score_hand_values_and_both_partner_directions
  - group term always on, sem weight ignored
    -> test_mofa_arm_matches_plain_reference, test_every_arm_flag_changes_the_result
  - downstream fit on the test rows, or standardised with test statistics -> test_mofa_arm_matches_plain_reference,
    test_selection_reads_no_test_rows
  - retries not appended / fallbacks not counted / retries counted on the first ask -> test_parser_*
  - signals computed on the labelled or test rows when --importance_source historic -> test_signals_match_plain_recomputation
  - an arm flag read nowhere (e.g. --bucketing, --per_call, --n_partners, --lambda_grp) -> test_every_arm_flag_changes_the_result
  - the endpoint path rendering a different prompt than the role input -> test_endpoint_with_reference_replies_reproduces_ref
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import mofa as M  # noqa: E402
from conftest import run_cli  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def args_of(*extra):
    a = M.parse_args(list(extra))
    M.validate_args(a)
    return a


@pytest.fixture(scope="module")
def toy150():
    a = args_of()
    w = M.toy_world(0).with_n_lab(150)
    return a, w, M.compute_signals(w, a)


# ---- pure math ----------------------------------------------------------------------------------


def test_auc_hand_values_and_pairwise_definition():
    assert M.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        s = rng.integers(0, 5, n).astype(float)  # many ties
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        num = sum((1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
                  for i in range(n) for j in range(n) if y[i] == 1 and y[j] == 0)
        assert M.auc(s, y) == pytest.approx(num / ((y == 1).sum() * (y == 0).sum()))


def test_mutual_information_hand_values():
    y = np.array([0, 1] * 500)
    assert M.mutual_information(y, y) == pytest.approx(np.log(2), abs=1e-6)
    assert round(M.mutual_information(y, y), 6) == 0.693147
    rng = np.random.default_rng(1)
    assert M.mutual_information(rng.standard_normal(20_000), rng.integers(0, 2, 20_000)) < 0.005
    x = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # discrete: exact counts
    yy = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    # p(x) = 1/4, 1/4, 1/2; p(y) = 1/2; joint: (0,0) 1/4, (1,1) 1/4, (2,0) 1/4, (2,1) 1/4
    want = 0.25 * np.log(0.25 / (0.25 * 0.5)) * 2 + 0.25 * np.log(0.25 / (0.5 * 0.5)) * 2
    assert M.mutual_information(x, yy) == pytest.approx(want)
    # a skewed discrete x: quantile bins would merge its rare values (MI 0); exact counts keep them
    x = np.array([0] * 90 + [1] * 5 + [2] * 5)
    yy = np.array([0] * 90 + [1] * 5 + [0] * 5)  # y determined by x -> I = H(y)
    assert M.mutual_information(x, yy) == pytest.approx(-0.05 * np.log(0.05) - 0.95 * np.log(0.95))


def test_mrmr_prefers_the_independent_signal():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 2, n)
    f1 = y + rng.normal(0, 0.5, n)
    f2 = f1 + rng.normal(0, 0.05, n)  # near-copy of f1
    f3 = y + rng.normal(0, 1.2, n)  # weaker, independent given y
    X = np.stack([f1, f2, f3], 1)
    assert M.mrmr_select(X, y, 2) == [0, 2] or M.mrmr_select(X, y, 2) == [1, 2]
    assert set(M.mi_select(X, y, 2)) == {0, 1}
    assert M.mrmr_select(X, y, 2)[0] == M.mi_select(X, y, 1)[0]


def test_lasso_proximal_step_and_recovery():
    np.testing.assert_allclose(M.soft_threshold([0.3, -0.05], 0.1), [0.2, 0.0])
    np.testing.assert_allclose(M.soft_threshold([-0.3, 0.1], 0.1), [-0.2, 0.0])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 12))
    logit = 1.5 * X[:, 2] - 1.2 * X[:, 7] + 1.0 * X[:, 9]
    y = (rng.random(2000) < M.sigmoid(logit)).astype(float)
    sel = M.lasso_select(X, y, 3)
    assert sorted(sel) == [2, 7, 9] and sel[0] == 2  # sorted by |w|
    for k in (1, 5, 8):
        s = M.lasso_select(X, y, k)
        assert len(s) <= k and len(set(s)) == len(s)


def test_logistic_fit_matches_loops_and_batched():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 3))
    y = (rng.random(40) < 0.5).astype(float)
    w, b = np.zeros(3), 0.0
    for _ in range(5):  # plain loops
        p = [1 / (1 + np.exp(-(sum(X[i, j] * w[j] for j in range(3)) + b))) for i in range(40)]
        gw = [sum((p[i] - y[i]) * X[i, j] for i in range(40)) / 40 + 1.0 * w[j] / 40 for j in range(3)]
        gb = sum(p[i] - y[i] for i in range(40)) / 40
        w = w - 0.5 * np.array(gw)
        b -= 0.5 * gb
    w2, b2 = M.logistic_fit(X, y, 1.0, 5, 0.5)
    np.testing.assert_allclose(w2, w, rtol=1e-10)
    assert b2 == pytest.approx(b)
    # Newton (pair importances) reaches the minimiser that long GD approaches, per design
    wb, bb = M.logistic_newton_batched(np.stack([X, X[:, ::-1]]), y, 1.0)
    w_gd, b_gd = M.logistic_fit(X, y, 1.0, 5000, 0.5)
    np.testing.assert_allclose(wb[0], w_gd, atol=1e-6)
    assert bb[0] == pytest.approx(b_gd, abs=1e-6)
    np.testing.assert_allclose(wb[1], w_gd[::-1], atol=1e-6)


def test_bucket_quota_and_phase_sizes(toy150):
    assert M.bucket_quota(20, 4, 1.5) == 8
    assert M.bucket_quota(10, 4, 1.5) == 4
    assert M.bucket_quota(20, 1, 1.5) == 30
    a, w, sig = toy150
    out = M.mofa_select(M.make_role(a, None), sig, w.task, M.SelectConfig(k=20), np.random.default_rng([0, 1]),
                        np.random.default_rng(5), M.new_stats())
    p1 = [r["feature"] for r in out["log"] if r["phase"] == "phase 1"]
    assert len(p1) == len(set(p1)) == 4 * 8 and len(out["merged"]) <= 4 * 8
    assert len(out["features"]) == len(set(out["features"])) == 20
    assert set(out["features"]) <= set(out["merged"])
    sizes = sorted(len(b) for b in M.make_buckets(sig.pool, 4, np.random.default_rng(0)))
    assert sizes == [23, 23, 23, 23] and sum(sizes) == len(sig.pool) == 92
    grp = {f: sig.row[f]["group"] for f in sig.pool}
    for b in M.make_buckets(sig.pool, 4, np.random.default_rng(0), "by_group", grp):  # whole groups per bucket
        others = [f for f in sig.pool if f not in b]
        assert not ({grp[f] for f in b} & {grp[f] for f in others})


# ---- signals --------------------------------------------------------------------------------------


def test_signals_match_plain_recomputation(toy150):
    a, w, sig = toy150
    idx = [i for i, m in enumerate(w.meta) if not m["forbidden"]]
    assert len(idx) == 92 and all(LEAK not in w.meta[i]["definition"] for i in idx)
    X = w.X_hist[:, idx]  # historic rows, old label only
    Xs = (X - X.mean(0)) / X.std(0)
    wt, b = np.zeros(len(idx)), 0.0
    for _ in range(a.fit_steps):
        r = 1 / (1 + np.exp(-(Xs @ wt + b))) - w.y_hist
        wt -= a.fit_lr * (Xs.T @ r / len(r) + a.l2 * wt / len(r))
        b -= a.fit_lr * r.mean()
    imp = np.abs(wt) / np.abs(wt).max()
    np.testing.assert_allclose([sig.imp[w.meta[i]["name"]] for i in idx], imp, rtol=1e-8)
    f0 = w.meta[idx[0]]["name"]
    R = np.corrcoef(X, rowvar=False)[0]
    top = sorted(range(1, len(idx)), key=lambda j: -abs(R[j]))[:3]
    assert [p for p, _ in sig.partners[f0]] == [w.meta[idx[j]]["name"] for j in top]
    assert sig.partners[f0][0][1] == pytest.approx(round(R[top[0]], 2))


LEAK = M.LEAKY_MARK


# ---- one mofa arm against a plain reference --------------------------------------------------------


def plain_mofa(sig, prior, buckets, k, kprime, lam=(1.0, 0.3, 0.2)):
    """Greedy Eq. (3) per bucket, then over the merged picks: Python loops only, no mofa helpers."""
    def corr_seen(f, s):
        vals = [abs(r) for p, r in sig.partners[f] if p == s] + [abs(r) for p, r in sig.partners[s] if p == f]
        return max(vals) if vals else 0.0

    def greedy(cands, n):
        chosen = []
        for _ in range(min(n, len(cands))):
            best, best_s = None, None
            for f in cands:
                if f in chosen:
                    continue
                imp = round(sig.imp[f], 3)
                red = max([corr_seen(f, s) for s in chosen] + [0.0])
                new = 1.0 if sig.row[f]["group"] not in {sig.row[s]["group"] for s in chosen} else 0.0
                sc = imp - lam[0] * imp * red - lam[1] * new + lam[2] * prior(f, sig.row[f]["definition"])
                if best_s is None or sc > best_s:
                    best, best_s = f, sc
            chosen.append(best)
        return chosen

    per = [greedy(b, kprime) for b in buckets]
    merged = []
    for t in range(max(len(p) for p in per)):
        for p in per:
            if t < len(p) and p[t] not in merged:
                merged.append(p[t])
    return greedy(merged, k), merged


def plain_downstream_auc(w, feats, l2=1.0, steps=300, lr=0.5):
    cols = [w.names.index(f) for f in feats]
    Xl, Xt = w.X_lab[:, cols], w.X_test[:, cols]
    mu, sd = Xl.mean(0), Xl.std(0)
    Xl, Xt = (Xl - mu) / sd, (Xt - mu) / sd
    wt, b = np.zeros(len(cols)), 0.0
    for _ in range(steps):
        r = 1 / (1 + np.exp(-(Xl @ wt + b))) - w.y_lab
        wt -= lr * (Xl.T @ r / len(r) + l2 * wt / len(r))
        b -= lr * r.mean()
    s = Xt @ wt + b
    pos, neg = s[w.y_test == 1], s[w.y_test == 0]
    wins = sum(float((p > neg).sum() + 0.5 * (p == neg).sum()) for p in pos)
    return wins / (len(pos) * len(neg))


def test_mofa_arm_matches_plain_reference(toy150):
    a, w, sig = toy150
    m, rows = M.run_cell(w, sig, "mofa", 6, a, M.make_role(a, None), 0)
    buckets = M.make_buckets(sig.pool, 4, np.random.default_rng([0, 1]))
    final, merged = plain_mofa(sig, M.text_prior(), buckets, 6, 3)
    assert [r["feature"] for r in rows] == final
    assert m["auc"] == pytest.approx(plain_downstream_auc(w, final), abs=1e-9)
    assert m["groups"] == len({sig.row[f]["group"] for f in final})
    assert m["calls"] == 4 * 3 + 6 and m["retries"] == m["malformed"] == m["fallbacks"] == 0  # B K' + K
    kinds = [w.kind[f] for f in final]
    assert m["informative"] == kinds.count("informative") and m["copy"] == kinds.count("copy")
    dups = sum(abs(sig.rho[(x, y)]) > 0.85 for i, x in enumerate(merged) for y in merged[i + 1:]
               if next(b for b, fs in enumerate(buckets) if x in fs) != next(b for b, fs in enumerate(buckets) if y in fs))
    assert m["xb_dups_phase1"] == dups


def test_reference_reasoner_reads_only_its_prompt(toy150):
    a, w, sig = toy150
    role = M.make_role(a, None)
    inp = M.role_input("t", 5, "x", 1, ["min_groups"], [], sig.pool[:10], sig, True)
    blind = M.role_input("t", 5, "x", 1, ["min_groups"], [], sig.pool[:10], sig, False)
    assert "importance" not in blind["candidates"][0] and "partners" not in blind["candidates"][0]
    # without signals the choice is sem alone (every candidate opens a new group at step 1)
    prior = M.text_prior()
    want = max(sig.pool[:10], key=lambda f: prior(f, sig.row[f]["definition"]))
    assert role.pick(blind)["feature"] == want
    assert role.pick(inp)["feature"] in sig.pool[:10]
    # a trap (informative-sounding noise) gets a high learned prior: the stand-in is fooled by design
    traps = [f for f in sig.pool if w.kind[f] == "trap"]
    noise = [f for f in sig.pool if w.kind[f] == "noise"]
    info = [f for f in sig.pool if w.kind[f] in ("informative", "interaction")]
    sem = lambda fs: np.mean([prior(f, sig.row[f]["definition"]) for f in fs])  # noqa: E731
    assert sem(traps) > 0.4 and abs(sem(traps) - sem(info)) < 0.15 and sem(noise) < 0.25


def test_candidates_are_shuffled_per_call(toy150):
    a, w, sig = toy150
    seen = []

    class Rec(M.RefRole):
        def batch(self, inps):
            seen.append([[c["name"] for c in x["candidates"]] for x in inps])
            return super().batch(inps)

    M.mofa_select(Rec(), sig, w.task, M.SelectConfig(k=4), np.random.default_rng([0, 1]), np.random.default_rng(1),
                  M.new_stats())
    step1, step2 = seen[0][0], seen[1][0]  # bucket 1 at its first and second pick
    common_ = [f for f in step1 if f in step2]
    assert len(common_) == len(step1) - 1 and common_ != [f for f in step2 if f in step1]


def test_reference_score_hand_values_and_both_partner_directions():
    assert M.ref_score(0.8, 0.5, True, 0.5) == pytest.approx(0.8 - 0.4 - 0.3 + 0.1)
    assert M.ref_score(0.8, 0.5, False, 0.5, lam_red=0.0, lam_sem=0.0) == pytest.approx(0.8)
    row = lambda n, imp, partners: {"name": n, "group": "g", "type": "float", "definition": "d", "importance": imp,  # noqa: E731
                                    "partners": partners}
    inp = {"want": 1, "constraints": {"hard": [], "soft": []}, "groups_used": ["g"],
           "selected": [{"name": "s", "group": "g", "partners": [["aa", 0.95]]}],
           "candidates": [row("aa", 1.0, []), row("bb", 0.6, [])]}  # rho(aa, s) shown only in s's row
    assert M.RefRole().pick(inp)["feature"] == "bb"  # aa: 1 - 0.95 = 0.05 < bb: 0.6 (same sem)
    inp["selected"][0]["partners"] = []
    assert M.RefRole().pick(inp)["feature"] == "aa"


# ---- validation, retries, fallbacks ---------------------------------------------------------------


class Script:
    """A role that answers from a script of replies (dicts or raw text), in call order."""

    def __init__(self, replies):
        self.replies, self.seen, self.stats, self.name = list(replies), [], {}, "script"

    def batch(self, inps):
        self.seen += inps
        out = []
        for _ in inps:
            r = self.replies.pop(0) if self.replies else "garbage"
            out.append(r if isinstance(r, dict) else _parse(r))
        return out


def _parse(text):
    try:
        return M.first_json_object(text)
    except ValueError as e:
        return {"_error": str(e), "_raw": text}


@pytest.mark.parametrize("bad", ["Selected Feature: {name}", '{{"feature": "no_such_feature", "reason": "x"}}',
                                 '{{"feature": "{sel}", "reason": "dup"}}', '{{"feature": "{name}, {other}"}}',
                                 '{{"feature": ["{name}", "{other}"]}}'])
def test_parser_rejects_and_retries_with_the_error(toy150, bad):
    a, w, sig = toy150
    cands, sel = sig.pool[1:6], [sig.pool[0]]
    inp = M.role_input("t", 3, "x", 1, [], sel, cands, sig, True)
    good = json.dumps({"feature": cands[2], "reason": "ok"})
    role = Script([bad.format(name=cands[0], other=cands[1], sel=sel[0]), good])
    st = M.new_stats()
    out = M.ask(role, [inp], sig, set(), 2, st)
    assert out == [[{"feature": cands[2], "reason": "ok"}]]
    assert (st["calls"], st["retries"], st["malformed"], st["fallbacks"]) == (2, 1, 1, 0)
    assert "error" in role.seen[1] and "previous_reply" in role.seen[1] and "error" not in role.seen[0]


def test_parser_garbage_gives_counted_fallbacks(toy150):
    a, w, sig = toy150
    inps = [M.role_input("t", 3, "x", 1, [], [], sig.pool[i:i + 5], sig, True) for i in (0, 10)]
    st = M.new_stats()
    out = M.ask(Script([]), inps, sig, set(), 2, st)
    assert (st["calls"], st["retries"], st["malformed"], st["fallbacks"]) == (6, 4, 6, 2)  # 2 x (1 + 2 retries)
    for o, inp in zip(out, inps):
        names = [c["name"] for c in inp["candidates"]]
        assert o[0]["feature"] == max(names, key=lambda f: sig.imp[f])
    # a whole mofa arm with a garbage selector: hand totals, exactly K distinct features, no crash
    s = M.mofa_select(Script([]), sig, w.task, M.SelectConfig(k=4, max_retries=1), np.random.default_rng([0, 1]),
                      np.random.default_rng(0), st2 := M.new_stats())
    kp = M.bucket_quota(4, 4, 1.5)  # 2 picks per bucket, then 4
    calls = 4 * kp + 4
    assert (st2["calls"], st2["retries"], st2["malformed"], st2["fallbacks"]) == (2 * calls, calls, 2 * calls, calls)
    assert len(set(s["features"])) == 4


def test_forbidden_never_selected_even_when_proposed(toy150):
    a, w, sig = toy150
    leaky = [f for f, m in sig.row.items() if m["forbidden"]]
    assert len(leaky) == 4 and not set(leaky) & set(sig.pool)  # out of the pool before any prompt

    class Leaker(Script):
        def batch(self, inps):
            self.seen += inps
            return [{"feature": leaky[0], "reason": "it predicts so well"} for _ in inps]

    r = Leaker([])
    out = M.mofa_select(r, sig, w.task, M.SelectConfig(k=5), np.random.default_rng([0, 1]), np.random.default_rng(0),
                        st := M.new_stats())
    assert not set(out["features"]) & set(leaky) and len(out["features"]) == 5
    assert st["fallbacks"] == st["calls"] // 3 and all(leaky[0] not in json.dumps(x["candidates"]) for x in r.seen)
    # the validator rejects a forbidden name even if it were somehow offered
    inp = M.role_input("t", 1, "x", 1, [], sig.pool[:3], sig.pool[3:6], sig, True)
    inp["candidates"].append({"name": leaky[0]})
    with pytest.raises(ValueError, match="hard constraint"):
        M.validate_reply(inp, {"feature": leaky[0]}, set(leaky))


def test_per_call_m_returns_m_distinct_picks(toy150):
    a, w, sig = toy150
    role = M.make_role(a, None)
    inp = M.role_input("t", 5, "x", 3, ["min_groups"], [], sig.pool[:10], sig, True)
    picks = M.validate_reply(inp, role.pick(inp), set())
    assert len(picks) == 3 and len({p["feature"] for p in picks}) == 3
    s = M.mofa_select(role, sig, w.task, M.SelectConfig(k=8, per_call=3), np.random.default_rng([0, 1]),
                      np.random.default_rng(0), st := M.new_stats())
    # K' = 3 per bucket -> 1 call each; phase 2: 8 picks -> 3 calls
    assert st["calls"] == 4 + 3 and len(s["features"]) == 8


# ---- no leakage, pair mode ----------------------------------------------------------------------


class Recorder:
    def __init__(self, w):
        object.__setattr__(self, "_w", w)
        object.__setattr__(self, "read", set())

    def __getattr__(self, k):
        self.read.add(k)
        return getattr(self._w, k)


@pytest.mark.parametrize("arm", ["mofa", "random", "mi", "mrmr", "lasso", "llm_seq", "pairs"])
def test_selection_reads_no_test_rows(toy150, arm):
    a, w, _ = toy150
    rec = Recorder(w)
    sig = M.compute_signals(rec, a)
    sel = M.select_arm(arm, rec, sig, 5, a, M.make_role(a, None), 0)
    if arm == "pairs":
        M.pair_importance(rec, M.pair_pool(rec, sig, a), a)
    assert not {"X_test", "y_test"} & rec.read, rec.read
    assert len(sel["features"]) == 5


def test_pair_mode_ranks_a_planted_pair_in_the_top3(toy150):
    a, w, sig = toy150
    assert len(w.X_hist) == 3000
    pr = M.run_pairs(w, sig, [], args_of("--num_pairs", "3"), M.make_role(a, None), 0, M.new_stats())
    planted = {frozenset(p) for p in w.planted_pairs}
    assert any(frozenset(p) in planted for p in pr["pairs"][:3])
    assert pr["aucs"][1] > pr["aucs"][0] + 0.01 or pr["aucs"][2] > pr["aucs"][0] + 0.01
    # the spec's literal pool (top 20 by importance) never offers the interaction-only pairs (DEVIATION 2)
    lit = M.pair_pool(w, sig, args_of("--pair_screen", "importance"))
    assert not any(a_ in lit and b_ in lit for a_, b_ in w.planted_pairs)


# ---- every arm-defining flag changes the result ---------------------------------------------------


@pytest.mark.parametrize("flag", [["--num_buckets", "2"], ["--bucket_factor", "3"], ["--bucketing", "by_group"],
                                  ["--constraints", "none"], ["--per_call", "4"], ["--n_partners", "0"],
                                  ["--importance_source", "train"], ["--lambda_red", "0"], ["--lambda_grp", "0"],
                                  ["--lambda_sem", "0"], ["--l2", "200"], ["--fit_steps", "5"]])
def test_every_arm_flag_changes_the_result(toy150, flag):
    a0, w, _ = toy150

    def run(*extra):
        a = args_of(*extra)
        sig = M.compute_signals(w, a)
        m, rows = M.run_cell(w, sig, "mofa", 10, a, M.make_role(a, None), 0)
        return [r["feature"] for r in rows], m["auc"], m["calls"]  # --per_call changes the calls only

    assert run(*flag) != run()


@pytest.mark.parametrize("arm", ["mofa_b1", "mofa_nophase2", "mofa_noconstraint", "mofa_nosignals", "llm_seq"])
def test_every_ablation_differs_from_mofa(toy150, arm):
    a, w, sig = toy150
    role = M.make_role(a, None)
    f0 = M.select_arm("mofa", w, sig, 10, a, role, 0)["features"]
    assert M.select_arm(arm, w, sig, 10, a, role, 0)["features"] != f0


def test_pair_flags_change_pair_mode(toy150):
    a, w, sig = toy150
    base = M.run_pairs(w, sig, [], args_of("--num_pairs", "3"), M.make_role(a, None), 0, M.new_stats())["pairs"]
    for flag in (["--pair_pool", "6"], ["--pair_screen", "importance"]):
        assert M.run_pairs(w, sig, [], args_of("--num_pairs", "3", *flag), M.make_role(a, None), 0,
                           M.new_stats())["pairs"] != base


# ---- LLM paths ----------------------------------------------------------------------------------


def tiny_table(tmp_path, n=240, p=6, bad=None):
    """A small real-format table: data.csv (split column) + features.json."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, p))
    y = (rng.random(n) < M.sigmoid(1.5 * X[:, 0] - X[:, 2])).astype(int)
    split = np.array(["historic"] * 80 + ["train"] * 80 + ["test"] * 80)
    names = [f"f{j}_signal" for j in range(p)]
    lines = [",".join(names + ["label", "split"])] + [",".join([f"{v:.4f}" for v in X[i]] + [str(y[i]), split[i]])
                                                     for i in range(n)]
    if bad == "csv":
        lines[5] = lines[5].replace(lines[5].split(",")[1], "oops", 1)
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    meta = [{"name": nm, "definition": f"user signal number {j}", "group": f"g{j // 2}", "type": "float"}
            for j, nm in enumerate(names)]
    meta[5]["forbidden"] = True
    text = "[\n" + ",\n".join(json.dumps(m) for m in meta) + "\n]\n"
    if bad == "meta":
        text = text.replace('"group": "g1", ', "", 1)
    (tmp_path / "features.json").write_text(text)
    return ["--data_csv", str(tmp_path / "data.csv"), "--meta_json", str(tmp_path / "features.json"), "--seeds", "0",
            "--n_labeled", "0", "--num_features", "2", "--num_buckets", "2", "--n_partners", "1"]


class RefOracle:
    """common.LLM-like: answers each user message with what the reference reasoner answered to the same
    rendered prompt (recorded from a ref run), garbage for anything else."""

    def __init__(self, table):
        self.table = table
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.last_finish_reasons = []

    def chat(self, convs, n=1, **kw):
        self.usage["calls"] += len(convs)
        self.last_finish_reasons = [["stop"] * n for _ in convs]
        return [[self.table.get(c[-1]["content"], "no idea")] * n for c in convs]


def test_endpoint_with_reference_replies_reproduces_ref(tmp_path):
    flags = tiny_table(tmp_path) + ["--method", "mofa,llm_seq,pairs", "--pair_pool", "4", "--num_pairs", "2"]
    table = {}

    class RecRef(M.RefRole):
        def batch(self, inps):
            outs = super().batch(inps)
            for x, o in zip(inps, outs):
                table[M.render_user(x)] = "Sure! " + json.dumps(o) + " done"
            return outs

    orig = M.make_role
    M.make_role = lambda a, llm: RecRef(a.lambda_red, a.lambda_grp, a.lambda_sem) if a.backend == "ref" else orig(a, llm)
    try:
        ref = M.main(M.parse_args(flags + ["--output_dir", str(tmp_path / "ref")]))
    finally:
        M.make_role = orig
    server = C.serve_openai(RefOracle(table), model_name="oracle")
    try:
        api = M.main(M.parse_args(flags + ["--backend", "api", "--api_base", server.url, "--api_model", "oracle",
                                           "--json_mode", "--output_dir", str(tmp_path / "api")]))
    finally:
        server.shutdown()
    sel = lambda d: [json.loads(x) for x in open(d / "selection.jsonl")]  # noqa: E731
    assert [(r["cell"], r.get("feature"), r.get("pair")) for r in sel(tmp_path / "api")] == \
        [(r["cell"], r.get("feature"), r.get("pair")) for r in sel(tmp_path / "ref")]
    for cell, m in ref["cells"].items():
        assert api["cells"][cell]["auc"] == m["auc"] and api["cells"][cell]["calls"] == m["calls"]
    assert api["usage"]["malformed"] == 0 and api["usage"]["calls"] == ref["usage"]["calls"] > 0


def test_tiny_hf_model_and_local_server_count_garbage(tmp_path):
    model, tok = C.tiny_lm(n_layer=1, d_model=32, n_head=2, max_positions=4096, seed=0)
    path = str(tmp_path / "tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    flags = tiny_table(tmp_path) + ["--method", "mofa", "--max_new_tokens", "8", "--max_retries", "1", "--mode",
                                    "features", "--num_features", "1", "--num_buckets", "1"]
    s = M.main(M.parse_args(flags + ["--backend", "hf", "--model_name_or_path", path, "--output_dir",
                                     str(tmp_path / "hf")]))
    c = s["cells"]["0/0/1/mofa"]
    # K' = ceil(1.5) = 2 picks + 1 in phase 2 = 3 asks, each garbage twice (1 retry) -> fallbacks
    assert (c["calls"], c["retries"], c["malformed"], c["fallbacks"]) == (6, 3, 6, 3)
    assert c["completion_tokens"] > 0 and c["prompt_tokens"] > 0 and c["n_selected"] == 1
    server = C.serve_openai(C.LLM(model=model.eval(), tokenizer=tok), model_name="tiny")
    try:
        s2 = M.main(M.parse_args(flags + ["--backend", "api", "--api_base", server.url, "--api_model", "tiny",
                                          "--output_dir", str(tmp_path / "api")]))
    finally:
        server.shutdown()
    c2 = s2["cells"]["0/0/1/mofa"]
    assert (c2["calls"], c2["malformed"], c2["fallbacks"]) == (6, 6, 3) and c2["completion_tokens"] > 0


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize("flags,msg", [
    (["--num_buckets", "0"], "num_buckets"), (["--bucket_factor", "0.5"], "bucket_factor"),
    (["--num_features", "93"], "exceeds"), (["--method", "mofa,boosting"], "unknown --method"),
    (["--n_labeled", "5000"], "n_labeled"), (["--backend", "hf"], "model_name_or_path"),
    (["--num_pairs", "500"], "num_pairs"), (["--lambda_grp", "-1"], "lambda_grp"),
    (["--seeds", "0,0"], "repeats"), (["--data_csv", "x.csv"], "both"),
    (["--backend", "hf", "--model_name_or_path", "/no/such/model"], "does not exist"),
])
def test_bad_flags_exit_2_before_writing(tmp_path, flags, msg):
    out = tmp_path / "o"
    with pytest.raises(C.UserError, match=msg):
        M.main(M.parse_args(flags + ["--output_dir", str(out)]))
    assert not out.exists()


@pytest.mark.parametrize("bad,msg", [("csv", r"data.csv:6: column 'f1_signal' is not a number"),
                                     ("meta", r"features.json:4: 'group' must be a non-empty string")])
def test_bad_data_names_file_and_line(tmp_path, bad, msg):
    out = tmp_path / "o"
    with pytest.raises(C.UserError, match=msg):
        M.main(M.parse_args(tiny_table(tmp_path, bad=bad) + ["--output_dir", str(out)]))
    assert not out.exists()


def test_unreachable_endpoint_fails_before_anything_is_written(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out = tmp_path / "o"
    t0 = time.time()
    with pytest.raises(C.UserError):
        M.main(M.parse_args(["--backend", "api", "--api_base", f"http://127.0.0.1:{port}/v1", "--api_model", "m",
                             "--output_dir", str(out)]))
    assert not out.exists() and time.time() - t0 < 30


def test_cli_exit_2_one_line_and_resume_policy(tmp_path):
    out = tmp_path / "o"
    r = run_cli(M, ["--bucket_factor", "0.9", "--output_dir", str(out)])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --bucket_factor")
    assert not out.exists()
    with pytest.raises(C.UserError, match="no run"):
        M.main(M.parse_args(["--resume", "--output_dir", str(out)]))


# ---- smoke ---------------------------------------------------------------------------------------


def test_smoke_run_writes_outputs(tmp_path):
    out = tmp_path / "smoke"
    r = subprocess.run([sys.executable, "mofa.py", "--num_features", "6", "--n_labeled", "150", "--output_dir", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("args.json", "metrics.jsonl", "summary.json", "mofa.png", "table.md", "selection.jsonl"):
        assert (out / f).exists(), f
    s = json.loads((out / "summary.json").read_text())
    assert len(s["cells"]) == len(M.ARMS) and all(c["violations"] == 0 for c in s["cells"].values())
    assert s["usage"]["calls"] == sum(c["calls"] for c in s["cells"].values())
    rows = C.read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, len(M.ARMS) + 1))
    assert "done in" in r.stdout
    with pytest.raises(C.UserError, match="already holds a run"):  # a finished run is not overwritten silently
        M.main(M.parse_args(["--num_features", "6", "--n_labeled", "150", "--output_dir", str(out)]))


# ---- slow ----------------------------------------------------------------------------------------

STRIP = set(M.TIME_KEYS) | {"wall_time_s", "minutes", "command"}


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in STRIP}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    flags = ["mofa.py", "--seeds", "0,1", "--n_labeled", "150", "--num_features", "10", "--method",
             "mofa,lasso,llm_seq,pairs"]
    full = tmp_path / "full"
    subprocess.run([sys.executable] + flags + ["--output_dir", str(full)], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=600)
    cut = tmp_path / "cut"
    p = subprocess.Popen([sys.executable] + flags + ["--output_dir", str(cut)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300:  # kill after a few cells are checkpointed
        if (cut / "metrics.jsonl").exists() and len(C.read_jsonl(str(cut / "metrics.jsonl"))) >= 3:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (cut / "summary.json").exists()
    r = subprocess.run([sys.executable] + flags + ["--output_dir", str(cut), "--resume"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = json.loads((full / "summary.json").read_text()), json.loads((cut / "summary.json").read_text())
    assert _strip(a) == _strip(b)
    assert (full / "selection.jsonl").read_text() == (cut / "selection.jsonl").read_text()
    ma = [_strip(r) for r in C.read_jsonl(str(full / "metrics.jsonl"))]
    mb = [_strip(r) for r in C.read_jsonl(str(cut / "metrics.jsonl"))]
    assert ma == mb
    r = subprocess.run([sys.executable] + flags + ["--num_buckets", "3", "--output_dir", str(cut), "--resume"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--num_buckets 4 -> 3" in r.stderr


@pytest.mark.slow
def test_multi_seed_mofa_beats_lasso_with_few_labels(tmp_path):
    s = M.main(M.parse_args(["--seeds", "0,1,2", "--n_labeled", "150", "--num_features", "20", "--method",
                             "mofa,lasso,mofa_noconstraint", "--output_dir", str(tmp_path / "o")]))
    t = s["table"]
    assert t["150/20/mofa"]["auc"][0] > t["150/20/lasso"]["auc"][0]
    assert t["150/20/mofa"]["groups"][0] < t["150/20/mofa_noconstraint"]["groups"][0]
    assert all(c["violations"] == 0 for c in s["cells"].values())


@pytest.mark.slow
def test_real_smollm2_checkpoint_as_selector(tmp_path, smollm2):
    smollm2_path = smollm2
    flags = tiny_table(tmp_path) + ["--method", "mofa", "--mode", "features", "--num_features", "1", "--num_buckets",
                                    "1", "--max_new_tokens", "48", "--max_retries", "1", "--backend", "hf",
                                    "--model_name_or_path", smollm2_path, "--output_dir", str(tmp_path / "o")]
    llm = C.LLM.from_hf(smollm2_path)
    conv = M.LLMRole(llm).conversation(M.role_input("t", 1, "x", 1, [], [], ["a", "b"], _sig_ab(), True))
    text = llm.render_chat(conv)
    assert text.count("<|im_start|>system") == 1 and text.rstrip().endswith("<|im_start|>assistant")
    s = M.main(M.parse_args(flags))
    c = s["cells"]["0/0/1/mofa"]
    assert c["calls"] >= 3 and c["completion_tokens"] > 0 and c["n_selected"] == 1 and c["violations"] == 0
    assert c["calls"] == 3 + c["retries"] and c["fallbacks"] <= 3
    rows = [json.loads(x) for x in open(tmp_path / "o" / "selection.jsonl")]
    assert rows[0]["feature"] != "f5_signal"  # the forbidden column, whatever the model said


def _sig_ab():
    row = {n: {"name": n, "group": "g", "type": "float", "definition": "d", "forbidden": False} for n in ("a", "b")}
    return M.Signals(pool=["a", "b"], imp={"a": 1.0, "b": 0.5}, rho={}, partners={"a": [], "b": []}, row=row)
