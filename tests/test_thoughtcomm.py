"""Tests of thoughtcomm.py: the math against hand values, one AE update and one adapter update against plain
references, the wiring of routing / prefix / structure / arms, validation, smoke runs, and (slow) kill -9 + resume
(Part A and Part B), several seeds, torchrun with 2 CPU processes and the real SmolLM2-135M-Instruct checkpoint
(the thoughtcomm pipeline and maft).

Breakages these tests catch (each made on a scratch copy and seen to fail the named test):
  - agreement summing over latents instead of agents                         -> test_agreement_hand_value
  - route_latents ignoring the mask; indexing w by latent instead of alpha
    (tensor and dict forms)                                                    -> test_route_latents_hand_value
  - fd Jacobian without the n_z / cols scaling, or dividing by 2 eps         -> test_jacobian_linear
  - standardise() removed from AutoEncoder.encode (the l1 scale loophole)     -> test_scale_loophole_closed
  - structure() thresholding the absolute S instead of S / max_i S            -> test_structure_block_sparse
  - block R^2 scored on the rows it was fitted on; MCC without the matching   -> test_block_r2_and_mcc
  - the prefix placed after the prompt; positions counting the pads          -> test_prefix_equals_token
  - ties broken by the highest index; unparsable counted as an answer;
    the real world scoring the mean over agents instead of the majority vote  -> test_consensus_and_vote
  - the shared-facts bound counting a fact lost when any (not every) holder
    has it erased; the agent's partial pretraining code keeping the rows of
    facts every holder erased                                                 -> test_facts_world_counts
  - the Jacobian term on all rows instead of jac_samples, or not divided by
    n_h; gradient clipping or the optimizer step skipped                      -> test_one_ae_update_matches_reference
  - answer_nll as one token mean over the batch instead of a mean of per-row
    means; the adapter ignoring w; the adapter's gradient clipping removed;
    w frozen under --agreement_weights learn                                 -> test_one_adapter_update_matches_reference
  - the lambda ramp over half instead of a third of training                 -> test_lambda_ramp
  - refit heads reading every latent instead of their agent's                -> test_refit_heads_read_only_their_latents
  - --lambda_jac, --refit, --method oracle_mask read nowhere                 -> test_flags_change_results
  - --agreement_weights fixed ignored, or w trainable outside `learn`;
    oracle_partial sending the full code (rows of facts no holder saw)       -> test_partb_arm_wiring
  - broadcast routing with the estimated M instead of all ones; random_mask
    routing with M itself                                                     -> test_partb_state_arms_end_to_end
  - a flag range check removed (--tau)                                       -> test_validation_refuses
  - maft: EOS trained on responses cut at --max_new_tokens; every row decoding
    with agent 0's LoRA (no per-row selection); the alpha / r scale dropped;
    the LoRA gradient clip removed; the base model not restored after
    training (rows left selected)                                             -> test_one_maft_update_matches_reference
  - maft: responses that disagree with the majority vote kept                 -> test_majority_examples_hand_value
  - maft: run_round ignoring the LoRA (agents decode as the base); the
    evaluation round 1 not re-answered by the fine-tuned agents              -> test_maft_changes_the_debate
  - --table reusing a finished run whose flags differ                        -> test_table_refuses_stale_run
Slow:
  - kill -9 in the AE stage and again in the refit stage + two --resume reach the uninterrupted summary.json
    (a Stage.load that does not restore the sampling generator fails it)      -> test_kill9_resume_same_summary
  - Part B: kill -9 while the adapter trains + --resume (the batch generator
    not restored fails it)                                                    -> test_partb_kill9_resume_same_summary
  - two seeds of the default AE each find >= 4 private latents               -> test_seeds_differ_and_structure_found
  - torchrun, 2 CPU processes == 1 process (gradients not averaged over
    ranks; rank shards gathered in the wrong order)                          -> test_torchrun_two_processes_match_one_process
  - the real checkpoint: chat template applied twice (round-2 prompt built
    from a rendered round-1 prompt); LLM weights left trainable               -> test_real_smollm2_checkpoint
  - maft on the real checkpoint: a LoRA step reaching another agent's B or
    the frozen base; no majority-agreeing examples; debate not run after
    fine-tuning                                                               -> test_real_smollm2_maft
"""
from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import thoughtcomm as T  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "thoughtcomm.py"), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, **kw)


# ---- math: hand values ----


def test_agreement_hand_value():
    M = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 1, 1]])
    assert T.agreement(M).tolist() == [2, 1, 2, 3]


def test_route_latents_hand_value():
    M = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 1, 1]]).bool()
    z = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = T.route_latents(z, M, 0, {1: 0.5, 2: 1.0, 3: 2.0})
    assert out.tolist() == [1.0, 1.0, 0.0, 8.0]
    w = torch.tensor([0.0, 0.5, 1.0, 2.0])  # tensor form, indexed by agreement level
    assert T.route_latents(z, M, 1, w).tolist() == [1.0, 0.0, 3.0, 8.0]  # latent 0: w[alpha = 2], not w[0]


def test_lambda_ramp():
    assert T.lambda_at(0, 600, 0.5) == 0.0
    assert T.lambda_at(100, 600, 0.5) == pytest.approx(0.25)
    assert T.lambda_at(200, 600, 0.5) == pytest.approx(0.5)
    assert T.lambda_at(599, 600, 0.5) == pytest.approx(0.5)


def test_jacobian_linear():
    A = torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]])
    dec = lambda z: z @ A.T  # noqa: E731
    z = torch.randn(5, 2)
    for kind in ("fd", "exact"):
        assert float(T.jacobian_l1(dec, z, kind)) == pytest.approx(7.5, rel=1e-4)
    # one sampled column of two, scaled by n_z / cols: the mean over the draw is sum |A|
    vals = [float(T.jacobian_l1(dec, z, "fd", cols=1, generator=torch.Generator().manual_seed(s))) for s in range(40)]
    assert set(np.round(vals, 3)) == {9.0, 6.0}  # 2 * (1 + 0.5 + 3) and 2 * (2 + 0 + 1)
    assert T.jacobian_abs_mean(dec, z).numpy() == pytest.approx(A.abs().numpy(), rel=1e-4)


def test_fd_matches_jacrev():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    z = torch.randn(8, 4, dtype=torch.float64)
    exact = float(T.jacobian_l1(net, z, "exact"))
    fd = float(T.jacobian_l1(net, z, "fd", eps=1e-6))
    assert abs(fd - exact) / exact < 1e-3
    J = torch.func.vmap(torch.func.jacrev(net))(z).abs().mean(0)
    assert torch.allclose(T.jacobian_abs_mean(net, z, "fd", eps=1e-6), J, rtol=1e-3)
    assert torch.allclose(T.jacobian_abs_mean(net, z, "exact"), J, rtol=1e-9)


def test_scale_loophole_closed():
    torch.manual_seed(0)
    ae = T.AutoEncoder(6, 3, 8)
    h = torch.randn(32, 6)

    def loss():
        z, h_hat = ae(h)
        return float(T.ae_loss(h, h_hat, T.jacobian_l1(ae.dec, z, "exact"), 0.7)[0])

    before = loss()
    with torch.no_grad():
        ae.enc[-1].weight.mul_(10), ae.enc[-1].bias.mul_(10)
    assert loss() == pytest.approx(before, rel=1e-4)
    z = ae.encode(h)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-5) and torch.allclose(z.std(0), torch.ones(3), atol=1e-4)


def test_structure_block_sparse():
    M_true = T.sharing_pattern(3, 4)  # (3, 14)
    torch.manual_seed(0)
    slices, rows = [], []
    at = 0
    for i in range(3):
        W = torch.randn(5, 14) * M_true[i].float()  # agent i's rows read only its latents
        rows.append(W)
        slices.append((at, at + 5))
        at += 5
    A = torch.cat(rows)
    jabs = T.jacobian_abs_mean(lambda z: z @ A.T, torch.randn(50, 14))
    S, M, alpha = T.structure(jabs, slices, 0.1)
    assert torch.equal(M, M_true)
    assert alpha.tolist() == [3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert T.alpha_histogram(alpha) == {3: 2, 2: 6, 1: 6}
    # relative, not absolute: scaling one latent's columns by 1e-3 keeps its structure
    A2 = A.clone()
    A2[:, 0] *= 1e-3
    M2 = T.structure(T.jacobian_abs_mean(lambda z: z @ A2.T, torch.randn(50, 14)), slices, 0.1)[1]
    assert torch.equal(M2, M_true)


def test_block_r2_and_mcc():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 6, generator=g)
    r2 = T.block_r2(z, z, [[0, 1, 2], [3, 4, 5]], n_train=2000, n_test=1000)
    assert r2[0, 0] > 0.99 and r2[1, 1] > 0.99
    # independent blocks predict nothing of each other (<= 0; negative: the ridge-1e-3 fit overfits noise)
    assert r2[0, 1] < 0.05 and r2[1, 0] < 0.05
    perm = z[:, [3, 0, 5, 1, 4, 2]] * torch.tensor([1.0, -1, 1, -1, -1, 1])
    assert T.mcc(perm, z) == pytest.approx(1.0, abs=1e-6)
    assert T.mcc(torch.randn(3000, 6, generator=g), z) < 0.1
    cost = np.random.default_rng(0).random((6, 6))
    best = min(itertools.permutations(range(6)), key=lambda p: sum(cost[i, p[i]] for i in range(6)))
    col = T.hungarian(cost)
    assert sum(cost[i, col[i]] for i in range(6)) == pytest.approx(sum(cost[i, best[i]] for i in range(6)))


def test_consensus_and_vote():
    assert T.consensus_and_vote(["3", "3", "3"]) == (1, "3")
    assert T.consensus_and_vote(["3", "3", "4"]) == (0, "3")
    assert T.consensus_and_vote(["4", "3", "3"]) == (0, "3")
    assert T.consensus_and_vote(["4", "3", None]) == (0, "4")  # tie: lowest agent index; None is no answer
    assert T.consensus_and_vote(["3", "3", None]) == (0, "3")  # unparsable = disagree
    assert T.consensus_and_vote([None, None, None]) == (0, None)
    probs = T.facts_problems(4, 0)
    answers = [[T.facts_answer(p, i) for p in probs] for i in range(3)]
    answers[1][2] = None
    sc = T.score_round(T.FactsWorld(), probs, answers)
    assert (sc["accuracy"], sc["unparsable"], sc["consensus"]) == (pytest.approx(11 / 12), 1, None)
    # real world: the majority vote is scored, consensus = all agents agree
    qa = T.QAWorld(None, 3)
    probs = [dict(question="q", answer="5"), dict(question="q", answer="7"), dict(question="q", answer="3")]
    answers = [["5", "7", "3"], ["5.0", "6", None], ["4", "6", "3"]]  # votes: 5 (tie -> agent 0), 6, 3
    sc = T.score_round(qa, probs, answers)
    assert sc["accuracy"] == pytest.approx(2 / 3) and sc["consensus"] == 0 and sc["unparsable"] == 1
    assert sc["agent_accuracy"] == pytest.approx(5 / 9)  # "5", "7", "3", "5.0" (== 5 as numbers), "3"
    assert T.score_round(qa, probs[:1], [["5"], ["5"], ["5"]])["consensus"] == 1


def test_prefix_equals_token():
    import common as C

    model, tok = C.tiny_lm(n_layer=2, d_model=32, n_head=4, seed=0)
    model.eval()
    prompts = ["0=3 1=?>", "0=3 1=2 4=5 7=1>"]
    tid = tok("7", add_special_tokens=False)["input_ids"][0]
    ids, mask = C.encode_prompts(tok, prompts)
    prefix = model.get_input_embeddings().weight[tid].expand(2, 1, -1)
    emb, m2, pos = T.embed_with_prefix(model, ids, mask, prefix)
    with torch.no_grad():
        a = model(inputs_embeds=emb, attention_mask=m2, position_ids=pos).logits[:, -1]
        ids2, mask2 = C.encode_prompts(tok, ["7" + p for p in prompts])
        b = model(input_ids=ids2, attention_mask=mask2, position_ids=C.position_ids(mask2)).logits[:, -1]
    assert torch.allclose(a, b, atol=1e-5)


def test_facts_world_counts():
    p = dict(values=[1, 2, 3, 4, 5, 6, 0, 1, 2, 3], erased=[[False] * 10, [True] + [False] * 9, [False] * 10])
    assert T.facts_prompt(p, 0) == "0=1 1=2 2=3 3=4 4=5 7=1>"
    assert T.facts_prompt(p, 1, ["4", None]) == "0=? 1=2 2=3 5=6 6=0 8=2|4 ?>"
    assert T.FactsWorld().prompt(p, 1, ["14 ", "x"]) == "0=? 1=2 2=3 5=6 6=0 8=2|14 ?>"  # others' texts parsed
    assert T.facts_answer(p, 0) == str(1 + 2 + 3 + 4 + 5 + 1)
    assert T.facts_answer(p, 2) == str(1 + 4 + 5 + 6 + 0 + 3)
    assert T.lone_answer(p, 1) == str(3 + 2 + 3 + 6 + 0 + 2)  # the erased fact 0 guessed by its mode, 3
    assert [T.parse_number(t) for t in ("17", " 5</s>", "07x", "x5", "")] == ["17", "5", "7", None, None]
    # hand values of the best-guess probability of the sum of k unknown values in {0..6}
    assert [T.mode_prob(k) for k in (0, 1, 2)] == pytest.approx([1.0, 1 / 7, 7 / 49])
    assert T.mode_prob(3) == pytest.approx(37 / 343)  # sum 9 (or 10): 37 of the 7^3 triples
    # the bounds on one hand problem: agent 1 has fact 0 erased, agents 0 and 2 see it
    b = T.facts_bounds([p])
    assert b["single"] == pytest.approx((1 + 1 / 7 + 1) / 3) and b["shared"] == 1.0
    # and on many problems, against a plain count (sums of k unknowns by enumeration)
    probs = T.facts_problems(600, 1)
    erased = np.array([q["erased"] for q in probs])
    assert erased.mean() == pytest.approx(0.4, abs=0.02)
    best = {k: max(Counter(sum(c) for c in itertools.product(range(7), repeat=k)).values()) / 7 ** k for k in range(7)}
    single = np.mean([best[sum(q["erased"][i][f] for f in T.AGENT_FACTS[i])] for q in probs for i in range(3)])
    shared = np.mean([best[sum(all(q["erased"][j][f] for j in range(3) if f in T.AGENT_FACTS[j]) for f in T.AGENT_FACTS[i])]
                      for q in probs for i in range(3)])
    b = T.facts_bounds(probs)
    assert b["single"] == pytest.approx(single) and b["shared"] == pytest.approx(shared)
    assert 0.15 < single < 0.25 and 0.3 < shared < 0.45
    # oracle_latent's thoughts: a fact's value one-hot when some holder saw it; fact 0 erased for all -> zeros
    q = dict(values=[1, 2, 3, 4, 5, 6, 0, 1, 2, 3], erased=[[True] * 10, [True] * 10, [True] * 9 + [False]])
    r = T.recoverable_facts([q])[0].view(10, 7)
    assert r.sum(1).tolist() == [0] * 9 + [1] and r[9, 3] == 1  # only fact 9 (agent 2's, seen) survives
    A = T.prefix_code(16)  # the agent's partial code of q: only fact 9's row (agent 2's 6th fact, value 3)
    assert torch.allclose(T.oracle_prefix([q], 2, A, recoverable_only=True)[0, 0], A[5 * 7 + 3])
    full = sum(A[k * 7 + q["values"][f]] for k, f in enumerate(T.AGENT_FACTS[2]))
    assert torch.allclose(T.oracle_prefix([q], 2, A)[0, 0], full)
    Mf = T.fact_mask()
    assert Mf.sum(1).tolist() == [42, 42, 42] and T.agreement(Mf)[::7].tolist() == [3, 2, 2, 2, 2, 2, 2, 1, 1, 1]
    assert Mf[0, 7 * 7:8 * 7].all() and not Mf[0, 8 * 7:].any()  # agent 0: its private fact 7, not 8 or 9


# ---- wiring: one AE update against a plain reference ----


def test_one_ae_update_matches_reference():
    torch.manual_seed(0)
    ae = T.AutoEncoder(4, 3, 5)
    ref = T.AutoEncoder(4, 3, 5)
    ref.load_state_dict(ae.state_dict())
    h = 10 * torch.randn(6, 4)  # large enough that the gradient norm exceeds the clip (1.0)
    args = T.parse_args(["--jac_samples", "2", "--ae_batch_size", "6"])
    lam = T.lambda_at(50, 300, 0.8)  # 0.4
    opt = torch.optim.SGD(ae.parameters(), lr=0.1)  # SGD: the update is the (clipped) gradient itself
    m = T.ae_step(ae, opt, h, lam, args, torch.Generator().manual_seed(0))
    # plain reference: loops over samples and latent columns, one decoder call each
    z = ref.enc(h)
    z = (z - z.mean(0)) / (z.std(0) + 1e-6)
    rec = sum(((h[b] - ref.dec(z[b:b + 1])[0]) ** 2).sum() for b in range(6)) / 6 / 4
    jl1 = 0.0
    for s in range(2):
        for j in range(3):
            e = torch.zeros(3)
            e[j] = 1e-2
            jl1 = jl1 + ((ref.dec((z[s] + e)[None]) - ref.dec(z[s][None])) / 1e-2).abs().sum()
    jl1 = jl1 / 2
    loss = rec + 0.4 * jl1 / 4
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(m["jac_l1"]) == pytest.approx(float(jl1), rel=1e-5)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss.backward()
    assert float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)) > 1.0
    ropt.step()
    for (k, a), b in zip(ae.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_refit_heads_read_only_their_latents():
    M = torch.tensor([[1, 1, 0], [0, 1, 1]]).bool()
    ae = T.AutoEncoder(4, 3, 8, slices=[(0, 2), (2, 4)], masks=M)
    J = T.jacobian_abs_mean(ae.dec, torch.randn(20, 3), "exact")  # (4, 3)
    assert J[:2, 2].abs().max() == 0 and J[2:, 0].abs().max() == 0
    assert J[:2, :2].min() > 0 and J[2:, 1:].min() > 0


# ---- wiring: arm-defining flags change results ----


def _part_a(tmp_path, *flags):
    args = T.parse_args(["--ae_steps", "60", "--refit_steps", "30", "--n_samples", "600", "--r2_train", "300", "--r2_test",
                         "200", "--log_every", "30", "--output_dir", str(tmp_path / "_".join(flags or ("base",))), *flags])
    T.C.set_cpu_threads()
    T.validate_args(args)
    T.C.start_run(args, has_checkpoint=False)
    res = T.run_part_a(args, os.path.join(args.output_dir, "checkpoint"), time.time())
    res.pop("log")
    return res


def test_flags_change_results(tmp_path):
    base = _part_a(tmp_path)
    lam0 = _part_a(tmp_path, "--lambda_jac", "0")
    norefit = _part_a(tmp_path, "--no-refit")
    oracle = _part_a(tmp_path, "--method", "oracle_mask")
    assert base["sparse"]["mcc"] != lam0["sparse"]["mcc"]
    assert "refit" in base and "refit" not in norefit
    assert oracle["M_est"] == oracle["M_true"] and "sparse" not in oracle
    assert base["refit"]["r2_diag"] != oracle["refit"]["r2_diag"]


def test_partb_arm_wiring():
    n_a, d = 3, 8
    torch.manual_seed(0)
    M = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 0], [0, 0, 1, 1, 1]]).bool()
    z = torch.randn(4, 5)
    outs = {}
    for w in ("learn", "fixed", "none"):
        torch.manual_seed(1)
        ad = T.PrefixAdapter(5, 16, 2, d, n_a, emb_norm=1.0, weights=w)
        outs[w] = ad(z, M, 0)
        assert outs[w].shape == (4, 2, d)
        assert ad.w.requires_grad == (w == "learn")
    assert not torch.allclose(outs["fixed"], outs["none"])  # fixed w = a / n_a, none = 1
    torch.manual_seed(1)
    ad = T.PrefixAdapter(5, 16, 2, d, n_a, emb_norm=1.0, weights="learn")
    assert torch.allclose(ad(z, M, 0), ad.g(z * M[0].float()).view(4, 2, d))  # w = 1 at init: mask only
    assert not torch.allclose(ad(z, M, 0), ad(z, torch.ones_like(M), 0))  # broadcast differs
    R = T.random_mask_like(M, torch.Generator().manual_seed(0))
    assert T.agreement(R).tolist() == T.agreement(M).tolist() and not torch.equal(R, M)
    A = T.prefix_code(d)
    probs = T.facts_problems(3, 0)
    pre = T.prefixes_for("oracle", None, None, None, probs, A, 3)
    assert pre.shape == (9, 1, d)  # agent-major: row 3 * i + b
    assert torch.allclose(pre[3 + 0, 0], A[[j * 7 + probs[0]["values"][f] for j, f in enumerate(T.AGENT_FACTS[1])]].sum(0))
    assert T.prefixes_for("debate", None, None, None, probs, A, 3) is None
    q = dict(values=[1, 2, 3, 4, 5, 6, 0, 1, 2, 3], erased=[[True] * 10, [True] * 10, [True] * 9 + [False]])
    q["erased"][0][3] = False  # fact 3 (agents 0 and 2) seen by agent 0 only
    part = T.prefixes_for("oracle_partial", None, None, None, [q], A, 3)  # (3, 1, d): one problem, agent-major
    assert torch.allclose(part[2, 0], A[1 * 7 + 4] + A[5 * 7 + 3])  # agent 2: fact 3 (its 2nd, value 4) and fact 9
    assert torch.allclose(part[1, 0], torch.zeros(d)) and torch.allclose(part[0, 0], A[3 * 7 + 4])  # 0: 4th
    torch.manual_seed(1)
    ad = T.PrefixAdapter(5, 16, 2, d, n_a, emb_norm=1.0, weights="learn")
    tc = T.prefixes_for("thoughtcomm", ad, z[:3], M, probs, A, 3)
    assert tc.shape == (9, 2, d) and torch.allclose(tc[3:6], ad(z[:3], M, 1))
    raw = T.prefixes_for("raw_state", T.PrefixAdapter(5, 16, 2, d, n_a, 1.0, "learn"), z[:3], M, probs, A, 3)
    assert raw.shape == (9, 2, d) and torch.allclose(raw[:3], raw[3:6])  # raw_state: no routing, same for all agents


# ---- validation and smoke ----


BAD_FLAGS = [["--tau", "2"], ["--num_agents", "4"], ["--jac_samples", "0"], ["--lambda_jac", "-1"],
             ["--part", "B", "--num_agents", "2"], ["--method", "debate"], ["--rounds", "1"], ["--n_samples", "100"],
             ["--table", "--table_seeds", "x"], ["--ae_batch_size", "1"], ["--agent_steps", "0"],
             ["--model_name_or_path", "x/y"], ["--method", "oracle_mask", "--no-refit"]]


@pytest.mark.parametrize("flags", BAD_FLAGS)
def test_validation_refuses(flags):
    with pytest.raises(T.C.UserError):
        T.validate_args(T.parse_args(flags))


def test_validation_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        with T.C.exit_on_user_error():
            T.main(T.parse_args(["--tau", "2", "--output_dir", str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_smoke_part_a_and_run_policy(tmp_path):
    """The one subprocess: `python thoughtcomm.py` (tiny steps) exits 0 with summary, PNG, metrics and the final
    line; then, in-process, the output-dir policy: a finished run is not overwritten, --resume with a changed flag
    is refused naming it."""
    out = tmp_path / "a"
    flags = ["--ae_steps", "20", "--refit_steps", "10", "--n_samples", "400", "--r2_train", "100", "--r2_test", "100",
             "--output_dir", str(out)]
    r = run(flags)
    assert r.returncode == 0, r.stderr[-2000:]
    sm = json.loads((out / "summary.json").read_text())
    assert (out / "thoughtcomm.png").is_file() and sm["refit"]["alpha_hist_true"] == {"2": 4, "1": 8}
    assert sm["steps"] == 30 and sm["refit_on"] and "done in" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows] == [20, 30] and "ae_rec" in rows[0] and "refit_rec" in rows[1]
    with pytest.raises(T.C.UserError, match="already holds a run"):
        T.main(T.parse_args(flags))
    with pytest.raises(T.C.UserError, match="--ae_steps 20 -> 21"):
        T.main(T.parse_args([*flags[:1], "21", *flags[2:], "--resume"]))


def test_table_refuses_stale_run(tmp_path):
    """--table reuses a finished arm x seed run only when its stored flags match (a stale run is refused)."""
    args = T.parse_args(["--table", "--table_seeds", "0", "--ae_steps", "20", "--output_dir", str(tmp_path)])
    n_a, label, seed, flags, d = T.table_runs(args)[0]
    os.makedirs(d)
    old = {**vars(T.parse_args(flags)), "ae_steps": 10}
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump(old, f)
    with open(os.path.join(d, "summary.json"), "w") as f:
        f.write("{}")
    with pytest.raises(T.C.UserError, match="--ae_steps 10 -> 20"):
        T.run_table(args)


def test_smoke_part_b(tmp_path):
    out = tmp_path / "b"
    sm = T.main(T.parse_args(["--part", "B", "--num_agents", "3", "--method", "debate", "--agent_steps", "20",
                              "--max_steps", "2", "--eval_size", "8", "--train_size", "8", "--output_dir", str(out)]))
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(sm))
    assert (out / "thoughtcomm.png").is_file() and sm["n_eval"] == 8 and 0 <= sm["unparsable"] <= 24
    assert sm["accuracy"] == sm["round2"]["accuracy"] and "round1" in sm and sm["bounds"]["oracle"] == 1.0


# ---- slow ----


def _ckpt_step(ckpt) -> int:
    """Step of the checkpoint in place (0 if none yet or mid-rename)."""
    try:
        return json.loads((ckpt / "COMPLETE").read_text())["step"]
    except (OSError, ValueError):
        return 0


def _kill_at(p, ckpt, min_step: int) -> int:
    """kill -9 the run p once a checkpoint at step >= min_step is in place; the run must still be going."""
    deadline = time.time() + 600
    while time.time() < deadline and _ckpt_step(ckpt) < min_step and p.poll() is None:
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    return _ckpt_step(ckpt)


@pytest.mark.slow
def test_kill9_resume_same_summary(tmp_path):
    """kill -9 once in the sparse-AE stage and once in the refit stage; two --resume runs reach the summary of an
    uninterrupted run (weights, optimizers, best states, sampling generators and M all restored)."""
    flags = ["--ae_steps", "600", "--refit_steps", "400", "--save_every", "50", "--n_samples", "1500", "--r2_train",
             "500", "--r2_test", "300"]
    full = tmp_path / "full"
    assert run([*flags, "--output_dir", str(full)]).returncode == 0
    part = tmp_path / "part"
    cmd = [sys.executable, os.path.join(ROOT, "thoughtcomm.py"), *flags, "--output_dir", str(part)]
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s1 = _kill_at(p, part / "checkpoint", 50)
    assert 50 <= s1 < 600  # killed in the sparse-AE stage
    p = subprocess.Popen([*cmd, "--resume"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s2 = _kill_at(p, part / "checkpoint", 650)
    assert 650 <= s2 < 1000  # killed in the refit stage
    r = run([*flags, "--output_dir", str(part), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    for k in ("wall_time_s", "time_per_step_s", "elapsed_before"):
        a.pop(k, None), b.pop(k, None)
    assert a == b


@pytest.mark.slow
def test_seeds_differ_and_structure_found(tmp_path):
    """Two seeds of the default sparse AE (6000 steps, no refit): the seeds give different results and each finds
    private latents (lambda = 0 finds none: every latent alpha = 2). At 1500 or 3000 steps the structure was not
    found reliably (0-3 private latents), so this test keeps the default step count."""
    res = []
    for s in (0, 1):
        out = tmp_path / f"s{s}"
        r = run(["--seed", str(s), "--no-refit", "--output_dir", str(out)])
        assert r.returncode == 0, r.stderr[-2000:]
        res.append(json.loads((out / "summary.json").read_text()))
    assert res[0]["sparse"]["r2_diag"] != res[1]["sparse"]["r2_diag"]
    for sm in res:
        assert "refit" not in sm and sm["steps"] == 6000
        assert sm["sparse"]["alpha_hist"].get("1", 0) >= 4, sm["sparse"]["alpha_hist"]


# ---- Part B / real pipeline: one adapter update against a plain reference; arms end to end ----


def test_shard_unshard():
    xs = list(range(11))
    parts = [T.shard(xs, r, 3) for r in range(3)]
    assert parts[1] == [1, 4, 7, 10] and T.unshard(parts) == xs
    texts = [[f"a{b}" for b in range(5)], [f"b{b}" for b in range(5)]]
    H = [torch.arange(10.0).view(5, 2), -torch.arange(10.0).view(5, 2)]
    assert T.gather_round(texts, texts, H, 1)[0] is texts  # one process: unchanged


class _Save:  # what train_adapter reads of the run's Saver
    def __init__(self, opt):
        self.adapter_opt, self.gen, self.sgen = opt, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)


def test_one_adapter_update_matches_reference(tmp_path):
    """train_adapter, one step of --adapter_loss task, against a plain reference: route by hand (z * M_i * w[alpha]),
    g, then one unpadded forward per problem with the prefix vector before the prompt's embeddings; NLL of the
    answer tokens and EOS, mean per row, mean over rows; SGD step after clipping to norm 1."""
    import common as C

    model, tok = C.tiny_lm(n_layer=2, d_model=32, n_head=4, seed=0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    world = T.FactsWorld()
    probs = T.facts_problems(6, 5)
    texts1 = [[str(10 + i + b) for b in range(6)] for i in range(3)]
    M = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 0], [0, 0, 1, 1, 1]]).bool()
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    # a tiny prefix (norm 1e-3): the first RMSNorm scales its gradient up, past the clip at 1
    ad = T.PrefixAdapter(5, 16, 1, 32, 3, emb_norm=1e-3, weights="learn")
    with torch.no_grad():
        ad.w.copy_(torch.tensor([0.0, 0.5, 1.5, 2.0]))
    ref = T.PrefixAdapter(5, 16, 1, 32, 3, emb_norm=1e-3, weights="learn")
    ref.load_state_dict(ad.state_dict())
    args = T.parse_args(["--part", "B", "--num_agents", "3", "--max_steps", "1", "--per_device_batch_size", "4",
                         "--adapter_loss", "task", "--log_every", "4"])
    save = _Save(torch.optim.SGD(ad.parameters(), lr=0.5))
    g = torch.Generator().manual_seed(3)  # the batch the step draws: the same calls on a copy of its generator
    idx = torch.randint(0, 6, (4,), generator=g).tolist()
    agent = int(torch.randint(0, 3, (1,), generator=g))
    T.train_adapter(model, tok, world, ad, probs, texts1, z, M, args, C.MetricLogger(str(tmp_path)), 0, save, 0, 1)
    # plain reference
    alpha = M.long().sum(0)
    total = 0.0
    for b in idx:
        zt = torch.stack([z[b, j] * float(M[agent, j]) * ref.w[alpha[j]] for j in range(5)])
        pre = ref.g(zt[None])[0]  # (d,)
        prompt = T.facts_prompt(probs[b], agent, [texts1[j][b] for j in range(3) if j != agent])
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]  # the byte tokenizer adds no BOS; no EOS after a prompt
        a_ids = tok(T.facts_answer(probs[b], agent), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p_ids + a_ids])
        emb = torch.cat([pre[None, None], model.get_input_embeddings()(ids)], 1)
        logits = model(inputs_embeds=emb).logits[0]
        nll = 0.0
        for k in range(len(a_ids)):
            pos = 1 + len(p_ids) + k  # position of answer token k in the prefixed sequence
            nll = nll - torch.log_softmax(logits[pos - 1].float(), -1)[a_ids[k]]
        total = total + nll / len(a_ids)
    loss = total / len(idx)
    rows = C.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows[-1]["adapter_loss"] == pytest.approx(loss.item(), rel=1e-4)
    loss.backward()
    assert float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)) > 1.0  # the clip is active
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    for (k, a), b_ in zip(ad.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b_, atol=1e-5), k
    assert not torch.equal(ad.w.detach(), torch.tensor([0.0, 0.5, 1.5, 2.0]))  # w learns (--agreement_weights learn)
    assert all(p.grad is None for p in model.parameters())  # the LLM stays frozen


PARTB = ["--part", "B", "--num_agents", "3", "--agent_steps", "20", "--ae_steps", "30", "--max_steps", "2",
         "--train_size", "12", "--eval_size", "6", "--per_device_batch_size", "4", "--gate_min", "0", "--n_latent", "6",
         "--ae_width", "16", "--adapter_width", "16", "--log_every", "4", "--temperature", "0"]


def test_partb_state_arms_end_to_end(tmp_path, monkeypatch):
    """The ablation arms run end to end on the tiny agent (probe gate off) and route with the mask that defines
    them: all ones (broadcast), the same alpha per latent on other agents (random_mask), while the estimated M is
    reported; their prefixes differ; both share round 1. (thoughtcomm itself runs end to end in the slow torchrun
    and kill -9 tests.)"""
    # the structure a 30-step AE of a 20-step agent finds is all-shared; a fixed sparse one makes the arms differ
    M_fixed = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 0]]).bool()
    monkeypatch.setattr(T, "structure", lambda jabs, slices, tau: (None, M_fixed.clone(), T.agreement(M_fixed)))
    small = [*PARTB, "--train_size", "8", "--eval_size", "4", "--ae_steps", "10", "--no-plot"]
    bc, rm = (T.main(T.parse_args([*small, "--method", arm, "--output_dir", str(tmp_path / arm)]))
              for arm in ("broadcast", "random_mask"))
    assert bc["M"] == rm["M"] == M_fixed.long().tolist() and bc["alpha_hist"] == {3: 1, 2: 3, 1: 2}
    assert all(all(r) for r in bc["M_routed"])
    assert np.array(rm["M_routed"]).sum(0).tolist() == [3, 2, 2, 2, 1, 1] and rm["M_routed"] != rm["M"]
    assert bc["round1"] == rm["round1"] and bc["prefix_norm_round2"] != rm["prefix_norm_round2"]
    # the objective check: the same no-prefix NLL for both arms (same round 1), a different one with their prefixes
    nb, nr = bc["answer_nll_train"], rm["answer_nll_train"]
    assert nb["without"] == nr["without"] and nb["with_prefix"] != nr["with_prefix"] != nr["without"]


# ---- maft: one LoRA update against a plain reference; the flag changes the debate ----


def test_one_maft_update_matches_reference(tmp_path):
    """train_maft, one step, against a plain reference: for each drawn example, agent a's weights merged by hand
    (W + alpha / r B_a A_a on q, k, v, o) into an independent copy of the base, one unpadded forward, the mean NLL
    of the response tokens (and EOS only where the response ended), mean over the batch; SGD after clipping to 1."""
    import common as C

    model, tok = C.tiny_lm(n_layer=2, d_model=32, n_head=4, seed=0)
    ref_model, _ = C.tiny_lm(n_layer=2, d_model=32, n_head=4, seed=0)  # the same weights, never wrapped
    model.eval(), ref_model.eval()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = T.AgentLoRA(model, 2, 2, 4.0, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
    assert len(lora.layers) == 8 and not any(p.requires_grad for n, p in model.named_parameters() if "base" in n)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0 so that A gets a gradient too (B starts at 0)
        for lay in lora.layers:
            lay.B.copy_(0.3 * torch.randn(lay.B.shape, generator=g))
    A0 = {k: v.detach().clone() for k, v in lora.params.items()}
    data = [dict(agent=0, prompt="user: 1+2\nassistant: ", response="3", eos=True),
            dict(agent=1, prompt="user: 2+2\nassistant: ", response="4 ok", eos=False),
            dict(agent=1, prompt="user: 9\nassistant: ", response="9", eos=True)]
    args = T.parse_args(["--max_steps", "1", "--per_device_batch_size", "3", "--log_every", "4",
                         "--no-gradient_checkpointing"])
    save = _Save(torch.optim.SGD(lora.params.parameters(), lr=0.5))
    idx = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(3)).tolist()  # the draw of the step
    T.train_maft(model, tok, lora, data, args, C.MetricLogger(str(tmp_path)), 0, save, 0, 1)
    # plain reference
    scale = 4.0 / 2
    total = 0.0
    for k in idx:
        e = data[k]
        weights = {}
        for name, p in ref_model.named_parameters():
            key = name.rsplit(".", 1)[0].replace(".", "__")
            if key + "__A" in A0:
                a_, b_ = A0[key + "__A"].requires_grad_(), A0[key + "__B"].requires_grad_()
                weights[name] = p + scale * b_[e["agent"]] @ a_[e["agent"]]
        p_ids = tok(e["prompt"], add_special_tokens=False)["input_ids"]
        r_ids = tok(e["response"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if e["eos"] else [])
        logits = torch.func.functional_call(ref_model, weights, (torch.tensor([p_ids + r_ids]),)).logits[0]
        nll = sum(-torch.log_softmax(logits[len(p_ids) + j - 1], -1)[r_ids[j]] for j in range(len(r_ids)))
        total = total + nll / len(r_ids)
    loss = total / len(idx)
    assert C.read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]["maft_loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    leaves = list(A0.values())
    gn = float(torch.nn.utils.clip_grad_norm_(leaves, 1.0))
    assert gn > 1.0  # the clip is active
    for k, v in A0.items():
        assert torch.allclose(lora.params[k].detach(), v.detach() - 0.5 * v.grad, atol=1e-6), k
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items() if k in after)  # embeddings, norms, head
    for n, m in model.named_modules():  # every wrapped Linear kept its frozen base weights
        if isinstance(m, T.AgentLoRALinear):
            assert torch.equal(m.base.weight, base_before[n + ".weight"]) and m.base.weight.grad is None
    assert all(lay.rows is None for lay in lora.layers)  # the base model is back after training


def test_majority_examples_hand_value():
    """maft's training set: only responses equal to their problem's majority vote (ties: agent 0's answer; no
    parsable vote: none), agent-major prompts, EOS only where the response ended."""
    world = T.QAWorld(None, 3)
    probs = [dict(question="a", answer="1"), dict(question="b", answer="2"), dict(question="c", answer="3")]
    answers = [["5", "7", None], ["5", "6", None], ["4", "8", None]]  # votes: 5, 7 (tie -> agent 0), none
    texts = [[f"t{i}{b}" for b in range(3)] for i in range(3)]
    prompts = [f"p{i}{b}" for i in range(3) for b in range(3)]
    finished = [[True, False, True], [False, True, True], [True, True, True]]
    ex = T.majority_examples(world, probs, prompts, texts, answers, finished)
    assert [(e["agent"], e["prompt"], e["response"], e["eos"]) for e in ex] == [
        (0, "p00", "t00", True), (1, "p10", "t10", False), (0, "p01", "t01", False)]


def _tiny_real(tmp_path):
    """A tiny HF checkpoint (byte tokenizer, no chat template) and 4 / 2 question-answer rows: the real path."""
    import common as C

    model, tok = C.tiny_lm(n_layer=2, d_model=32, n_head=4, seed=0)
    model.save_pretrained(tmp_path / "m"), tok.save_pretrained(tmp_path / "m")
    for name, n in (("train", 4), ("eval", 2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(dict(question=f"{k} + 1?", answer="1")) + "\n"
                                                        for k in range(n)))
    return ["--model_name_or_path", str(tmp_path / "m"), "--train_file", str(tmp_path / "train.jsonl"), "--eval_file",
            str(tmp_path / "eval.jsonl"), "--num_agents", "2", "--max_new_tokens", "4", "--max_steps", "2",
            "--per_device_batch_size", "4", "--log_every", "4", "--temperature", "0", "--lora_lr", "0.1", "--no-plot"]


def test_maft_changes_the_debate(tmp_path, monkeypatch):
    """--method maft vs debate on a tiny real-path model (every response parses as the answer, so every response
    agrees with the majority and trains its agent): same base round 1, then the fine-tuned agents answer
    differently; the LoRA moved; the training set holds every agent's final-round responses."""
    monkeypatch.setattr(T.QAWorld, "parse", staticmethod(lambda text: "1"))
    flags = _tiny_real(tmp_path)
    deb = T.main(T.parse_args([*flags, "--method", "debate", "--output_dir", str(tmp_path / "debate")]))
    mft = T.main(T.parse_args([*flags, "--method", "maft", "--output_dir", str(tmp_path / "maft")]))
    assert mft["round1_base"] == deb["round1"] and mft["maft_examples"] == [4, 4] and mft["lora_B_norm"] > 0
    texts = {arm: [(r["round"], r["agent"], r["text"]) for r in map(json.loads, (tmp_path / arm / "responses.jsonl")
                                                                         .read_text().splitlines())]
             for arm in ("debate", "maft")}
    assert len(texts["maft"]) == 2 * 2 * 2 and {t[0] for t in texts["maft"]} == {1, 2}
    assert [t[2] for t in texts["maft"] if t[0] == 1] != [t[2] for t in texts["debate"] if t[0] == 1]
    with pytest.raises(T.C.UserError, match="real models only"):
        T.validate_args(T.parse_args(["--part", "B", "--num_agents", "3", "--method", "maft"]))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (problems sharded, states gathered, rank 0 trains the AE and broadcasts it,
    data-parallel adapter on half the batch each) reaches the one-process run on the whole batch: same round 1,
    same structure, same round 2, the same learned weights (greedy decoding, so sampling cannot differ)."""
    one = tmp_path / "one"
    r = run([*PARTB, "--method", "thoughtcomm", "--per_device_batch_size", "4", "--output_dir", str(one)])
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        os.path.join(ROOT, "thoughtcomm.py"), *PARTB, "--method", "thoughtcomm", "--per_device_batch_size",
                        "2", "--output_dir", str(two)], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for k in ("round1", "M", "M_routed", "round2", "accuracy"):
        assert a[k] == b[k], k
    assert b["weights"] == pytest.approx(a["weights"], abs=1e-3) and a["weights"] != [1.0, 1.0, 1.0]
    assert b["adapter_norm"] == pytest.approx(a["adapter_norm"], rel=1e-7)  # one Adam step off moves it by ~1e-5
    assert b["prefix_norm_round2"] == pytest.approx(a["prefix_norm_round2"], rel=1e-3)
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "adapter_loss" in x] == [31, 32]  # logged once (rank 0), after the AE's 30


@pytest.mark.slow
def test_real_smollm2_checkpoint(smollm2, tmp_path):
    """The real path on SmolLM2-135M-Instruct: the chat template applied once per prompt, round-2 prompts carry
    the other agents' responses, a prefix through inputs_embeds equals prepending that token on the real model
    (GQA, RoPE, left padding), one adapter step of Eq. (12) is finite and reaches only the adapter (the LLM stays
    frozen), and a whole run (2 agents, AE, adapter with gradient checkpointing, round 2 with prefixes) writes a
    summary whose checkpointed adapter moved away from its initialisation."""
    import common as C

    data = tmp_path / "data"
    data.mkdir()
    for name, rows_ in (("train", [("What is 2 + 3?", "5"), ("What is 7 times 6?", "42"), ("What is 4 * 4?", "16")]),
                        ("eval", [("What is 3 * 3?", "9"), ("What is 10 - 4?", "6")])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(dict(question=q, answer=a_)) + "\n" for q, a_ in rows_))
    out = tmp_path / "run"
    flags = ["--model_name_or_path", smollm2, "--train_file", str(data / "train.jsonl"), "--eval_file",
             str(data / "eval.jsonl"), "--num_agents", "2", "--max_new_tokens", "12", "--ae_steps", "10", "--max_steps",
             "2", "--per_device_batch_size", "2", "--n_latent", "8", "--ae_width", "16", "--adapter_width", "16",
             "--adapter_loss", "eq12", "--ref_tokens", "4", "--jac_samples", "2", "--ae_batch_size", "3",
             "--log_every", "4", "--output_dir", str(out)]
    args = T.parse_args(flags)
    model, tok, world, A, train, evals = T.load_agents(args, torch.device("cpu"))
    assert A is None and len(train) == 3 and len(evals) == 2 and args.gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())  # the LLM is frozen
    probs = train[:2]
    r1 = T.round_prompts(world, probs, None)
    assert len(r1) == 4 and r1[0] == r1[2]  # agent-major; round 1 is the same prompt for every agent
    ids, mask = C.encode_prompts(tok, r1)
    for row, m in zip(ids, mask):
        text = tok.decode(row[m.bool()])
        assert text.count("<|im_start|>user") == 1 and text.rstrip().endswith("<|im_start|>assistant")
    r2 = T.round_prompts(world, probs, [["first: \\boxed{5}", "x"], ["second: \\boxed{4}", "y"]])
    assert "second: \\boxed{4}" in r2[0] and "first" not in r2[0] and "first: \\boxed{5}" in r2[2]
    assert all(x.count("<|im_start|>user") == 1 for x in r2)
    # prefix == prepended token on the real model
    tid = tok(" answer", add_special_tokens=False)["input_ids"][0]
    prefix = model.get_input_embeddings().weight[tid].expand(4, 1, -1)
    emb, m2, pos = T.embed_with_prefix(model, ids, mask, prefix)
    with torch.no_grad():
        a = model(inputs_embeds=emb, attention_mask=m2, position_ids=pos).logits[:, -1]
        rows = [[tid] + row[m.bool()].tolist() for row, m in zip(ids, mask)]
        ids2, mask2 = C.left_pad(rows, tok.pad_token_id)
        b = model(input_ids=ids2, attention_mask=mask2, position_ids=C.position_ids(mask2)).logits[:, -1]
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    # one Eq. (12) step: finite, gradient only in the adapter
    d = model.config.hidden_size
    ad = T.PrefixAdapter(6, 16, 1, d, 2, emb_norm=float(model.get_input_embeddings().weight.norm(dim=-1).mean()),
                         weights="learn")
    M = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1]]).bool()
    loss, t_gen = T.adapter_loss(model, tok, world, ad, probs, [["\\boxed{5}", "\\boxed{41}"], ["\\boxed{6}", "\\boxed{42}"]],
                                 torch.randn(2, 6), M, [0, 1], 1, args, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and t_gen > 0
    assert all(p.grad is None for p in model.parameters())
    assert ad.g[0].weight.grad.abs().sum() > 0 and ad.w.grad is not None  # the adapter and w learn
    # a whole run
    del model
    sm = T.main(T.parse_args(flags))
    assert sm["part"] == "real" and sm["n_train"] == 3 and sm["n_eval"] == 2 and 0 <= sm["accuracy"] <= 1
    assert sm["round1"]["unparsable"] <= 4 and "round2" in sm and len(sm["M"]) == 2
    assert {"generation", "forward", "backward", "optimizer"} <= set(sm["time_per_step_s"])
    rows = C.read_jsonl(str(out / "metrics.jsonl"))
    assert all(math.isfinite(r_["adapter_loss"]) for r_ in rows if "adapter_loss" in r_)
    st = C.load_checkpoint(str(out / "checkpoint"))
    assert st["step"] == 12
    torch.manual_seed(args.seed + 11)
    init = T.PrefixAdapter(8, 16, 1, d, 2, sm["emb_norm"], "learn")
    assert not torch.allclose(init.g[0].weight, st["extra"]["adapter"]["g.0.weight"])
    assert (out / "thoughtcomm.png").is_file()


@pytest.mark.slow
def test_real_smollm2_maft(smollm2, tmp_path):
    """maft on SmolLM2-135M-Instruct: one LoRA step (gradient checkpointing on) reaches only the selected agents'
    LoRA B (A gets no gradient while B = 0; the base stays frozen and unchanged); then a whole run: text debate on
    the training problems, majority-agreeing responses train each agent's LoRA, the fine-tuned agents debate two
    rounds on the evaluation problems (greedy decoding, so the examples are reproducible)."""
    import common as C

    data = tmp_path / "data"
    data.mkdir()
    for name, rows_ in (("train", [("What is 2 + 3?", "5"), ("What is 7 times 6?", "42"), ("What is 4 * 4?", "16")]),
                        ("eval", [("What is 3 * 3?", "9"), ("What is 10 - 4?", "6")])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(dict(question=q, answer=a_)) + "\n" for q, a_ in rows_))
    flags = ["--model_name_or_path", smollm2, "--train_file", str(data / "train.jsonl"), "--eval_file",
             str(data / "eval.jsonl"), "--num_agents", "2", "--max_new_tokens", "24", "--max_steps", "2",
             "--per_device_batch_size", "2", "--temperature", "0", "--log_every", "4", "--method", "maft"]
    args = T.parse_args([*flags, "--output_dir", str(tmp_path / "unused")])
    model, tok, world, _, train, _ = T.load_agents(args, torch.device("cpu"))
    q0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    lora = T.AgentLoRA(model, 2, 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
    assert len(lora.layers) == 4 * model.config.num_hidden_layers
    A0 = {k: v.detach().clone() for k, v in lora.params.items()}
    ex = [dict(agent=1, prompt=world.prompt(train[0], 1), response="2 + 3 = 5. \\boxed{5}", eos=True)]
    save = _Save(torch.optim.Adam(lora.params.parameters(), lr=1e-3))
    T.train_maft(model, tok, lora, ex, T.parse_args([*flags, "--max_steps", "1"]), C.MetricLogger(str(tmp_path)), 0,
                 save, 0, 1)
    assert math.isfinite(C.read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]["maft_loss"])
    for k, v in lora.params.items():
        moved = not torch.equal(v.detach(), A0[k])
        assert moved == k.endswith("__B"), k  # B moves (for agent 1 only), A waits for B
        if k.endswith("__B"):
            assert v[0].abs().max() == 0 and v[1].abs().max() > 0, k
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, q0)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n and not n.endswith((".A", ".B")))
    del model, lora
    out = tmp_path / "run"
    sm = T.main(T.parse_args([*flags, "--output_dir", str(out)]))
    assert sum(sm["maft_examples"]) > 0 and sm["lora_B_norm"] > 0 and "round1_base" in sm and "round2" in sm
    st = C.load_checkpoint(str(out / "checkpoint"))
    assert st["step"] == 2 and all(k.endswith(("__A", "__B")) for k in st["extra"]["adapter"])
    rows = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {r_["round"] for r_ in rows} == {1, 2}
    assert [r_["step"] for r_ in C.read_jsonl(str(out / "metrics.jsonl")) if "maft_loss" in r_] == [1, 2]


@pytest.mark.slow
def test_partb_kill9_resume_same_summary(tmp_path):
    """Part B: kill -9 while the adapter trains; --resume (AE stage, adapter, its optimizer, the batch and sampling
    generators restored; round 1 recomputed from its seed) reaches the uninterrupted summary.json."""
    flags = [*PARTB, "--method", "thoughtcomm", "--temperature", "0.7", "--ae_steps", "100", "--max_steps", "60",
             "--save_every", "5"]
    full = tmp_path / "full"
    r = run([*flags, "--output_dir", str(full)])
    assert r.returncode == 0, r.stderr[-2000:]
    part = tmp_path / "part"
    cmd = [sys.executable, os.path.join(ROOT, "thoughtcomm.py"), *flags, "--output_dir", str(part)]
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s1 = _kill_at(p, part / "checkpoint", 105)
    assert 105 <= s1 < 160  # killed while the adapter trains
    r = run([*flags, "--output_dir", str(part), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    for k in ("wall_time_s", "time_per_step_s", "time_round1_s", "time_adapter_s"):
        a.pop(k, None), b.pop(k, None)
    assert a == b
