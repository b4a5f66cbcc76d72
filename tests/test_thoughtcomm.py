"""Tests of thoughtcomm.py: the math against hand values, one AE update against a plain reference, the wiring of
routing / prefix / structure, validation, smoke runs, and (slow) kill -9 + resume and several seeds.

Breakages these tests catch (each made on a scratch copy and seen to fail the named test):
  - agreement summing over latents instead of agents                         -> test_agreement_hand_value
  - route_latents ignoring the mask; indexing w by latent instead of alpha
    (tensor and dict forms)                                                    -> test_route_latents_hand_value
  - fd Jacobian without the n_z / cols scaling, or dividing by 2 eps         -> test_jacobian_linear
  - standardise() removed from AutoEncoder.encode (the l1 scale loophole)     -> test_scale_loophole_closed
  - structure() thresholding the absolute S instead of S / max_i S            -> test_structure_block_sparse
  - block R^2 scored on the rows it was fitted on; MCC without the matching   -> test_block_r2_and_mcc
  - the prefix placed after the prompt; positions counting the pads          -> test_prefix_equals_token
  - ties broken by the highest index; unparsable counted as an answer        -> test_consensus_and_vote
  - the Jacobian term on all rows instead of jac_samples, or not divided by
    n_h; gradient clipping or the optimizer step skipped                      -> test_one_ae_update_matches_reference
  - the lambda ramp over half instead of a third of training                 -> test_lambda_ramp
  - refit heads reading every latent instead of their agent's                -> test_refit_heads_read_only_their_latents
  - --lambda_jac, --refit, --method oracle_mask read nowhere                 -> test_flags_change_results
  - --agreement_weights fixed ignored, or w trainable outside `learn`        -> test_partb_arm_wiring
  - a flag range check removed (--tau)                                       -> test_validation_refuses
  - --table reusing a finished run whose flags differ                        -> test_table_refuses_stale_run
Not covered by a default test: that run_agents applies the broadcast / random_mask masks (only the mask
functions are tested), and the Part B adapter arms end to end (the toy agent fails the probe gate).
Slow: kill -9 in the AE stage and again in the refit stage + two --resume reach the uninterrupted summary.json
(a Stage.load that does not restore the sampling generator fails it: the summaries differ); two seeds of the
default AE each find >= 4 private latents.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

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
    acc, unp = T.facts_accuracy(probs, answers)
    assert (acc, unp) == (pytest.approx(11 / 12), 1)


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
    assert T.facts_answer(p, 0) == str((1 + 2 + 3 + 4 + 5 + 1) % 7)
    assert T.facts_answer(p, 2) == str((1 + 4 + 5 + 6 + 0 + 3) % 7)
    # the spec's counting bounds: single (0.6^6 + (1 - 0.6^6) / 7) ~ 0.18, shared facts ~ 0.38
    probs = T.facts_problems(4000, 1)
    erased = np.array([p["erased"] for p in probs])
    assert erased.mean() == pytest.approx(0.4, abs=0.01)
    single = np.mean([not any(p["erased"][i][f] for f in T.AGENT_FACTS[i]) for p in probs for i in range(3)])
    shared = np.mean([all(any(not p["erased"][j][f] for j in range(3) if f in T.AGENT_FACTS[j]) for f in T.AGENT_FACTS[i])
                      for p in probs for i in range(3)])
    assert single + (1 - single) / 7 == pytest.approx(0.18, abs=0.02)
    assert shared + (1 - shared) / 7 == pytest.approx(0.38, abs=0.02)


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
    pre = T.prefixes_for("oracle", None, None, None, None, probs, A)
    assert len(pre) == 3 and pre[0].shape == (3, 1, d)
    k = T.AGENT_FACTS[1][2]
    assert torch.allclose(pre[1][0, 0], A[[j * 7 + probs[0]["values"][f] for j, f in enumerate(T.AGENT_FACTS[1])]].sum(0))
    assert T.prefixes_for("debate", None, None, None, None, probs, A) is None and k == 2


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
    assert (out / "thoughtcomm.png").is_file() and sm["eval_size"] == 8 and 0 <= sm["unparsable"] <= 24
    assert sm["accuracy"] == sm["acc_round2"] and "acc_round1" in sm


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
