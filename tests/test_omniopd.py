"""Tests of omniopd.py: chunk scheduler, similarities, posterior, losses against hand-computed and
independent values; teacher prefixes; entropy alignment; the CLI (smoke run, errors, a real local
OpenAI-compatible teacher endpoint, torchrun with 2 CPU processes)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import omniopd as O  # noqa: E402

torch.set_num_threads(1)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NANOPAPERS_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny():
    model, tok = C.tiny_lm(n_layer=2, d_model=32, seed=0)
    return model.eval(), tok


# ---- Eq. (3): anchors -------------------------------------------------------------------------


def _anchors(H, C_, M):
    h = torch.tensor([H])
    return O.peak_entropy_chunks(h, torch.ones_like(h), C_, M)[0]


def test_peak_entropy_chunks_hand_cases():
    H = [0.1, 0.9, 0.2, 0.8, 0.3, 0.95, 0.1, 0.7]
    assert set(_anchors(H, 2, 3)) == {1, 3, 5}
    assert set(_anchors(H, 3, 3)) == {1, 5}  # fewer than M: no padding
    assert _anchors([0.5] * 4, 2, 1) == [2]  # ties: the later start wins
    assert _anchors([0.9, 0.1], 3, 2) == []  # T < C: no chunk


def test_peak_entropy_chunks_respect_row_length_and_never_overlap():
    g = torch.Generator().manual_seed(0)
    H = torch.rand(16, 30, generator=g)
    lens = torch.randint(0, 31, (16,), generator=g)
    mask = (torch.arange(30)[None] < lens[:, None]).long()
    for C_, M in [(1, 5), (4, 2), (5, 10)]:
        for b, ss in enumerate(O.peak_entropy_chunks(H, mask, C_, M)):
            assert len(ss) <= M and all(t + C_ <= lens[b] for t in ss)
            assert all(abs(a - c) >= C_ for i, a in enumerate(ss) for c in ss[i + 1:])
            if ss:  # the highest-entropy valid start is always taken
                assert int(H[b, :lens[b] - C_ + 1].argmax()) in ss
    rs = O.random_chunks(mask, 4, [2] * 16, random.Random(0))
    for b, ss in enumerate(rs):
        assert all(t + 4 <= lens[b] for t in ss) and all(abs(a - c) >= 4 for i, a in enumerate(ss) for c in ss[i + 1:])


def test_entropy_index_alignment(tiny):
    """Response token t uses the entropy of logits index P + t - 1 (pitfall 4)."""
    model, tok = tiny
    g = C.generate(model, tok, ["add 12=", "add 345="], max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    _, ent, _ = C.token_logprobs(model, g.sequences, g.attention_mask, return_entropy=True)
    resp_ent = ent[:, g.prompt_len:]
    logits = model(input_ids=g.sequences, attention_mask=g.attention_mask,
                   position_ids=C.position_ids(g.attention_mask)).logits.float()
    P = g.prompt_len
    for t in range(g.response_ids.shape[1]):
        lp = torch.log_softmax(logits[:, P + t - 1], -1)
        want = -(lp.exp() * lp).sum(-1)
        m = g.response_mask[:, t].bool()
        torch.testing.assert_close(resp_ent[m, t], want[m], atol=1e-5, rtol=0)
    # the sampler's entropy agrees (same distribution, temperature 1)
    g2 = C.generate(model, tok, ["add 12=", "add 345="], max_new_tokens=6, return_entropy=True,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(g2.entropy * g2.response_mask, resp_ent * g.response_mask, atol=1e-4, rtol=0)


def test_chunked_logprobs_and_entropy_equal_unchunked(tiny):
    model, tok = tiny
    ids, mask, _ = C.encode_pairs(tok, ["add 12=", "add 9876="], ["011;123;=3", "099;"])
    a = C.token_logprobs(model, ids, mask, return_entropy=True, chunk_size=3)
    b = C.token_logprobs(model, ids, mask, return_entropy=True, chunk_size=512)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


# ---- Eq. (5): similarity ----------------------------------------------------------------------


def test_similarity_hand_values(tiny):
    assert O.similarity("kitten", "sitting", "ned") == pytest.approx(0.5714286, abs=1e-6)
    assert O.similarity("347;752", "437;752", "ned") == pytest.approx(0.7142857, abs=1e-6)
    assert O.similarity("347;752", "437;752", "rouge1") == pytest.approx(1.0)
    assert O.similarity("347", "348", "rouge1") == pytest.approx(0.6666667, abs=1e-6)
    emb = O.make_embedder(*tiny)
    for kind in ("ned", "rouge1", "embed"):
        assert O.similarity("", "", kind, emb) == 1.0
        assert O.similarity("abc", "", kind, emb) == 0.0
    for a, b in [("033;358;", "303;538;"), ("hello", "world"), ("12", "12")]:
        v = O.similarity(a, b, "embed", emb)
        assert 0.0 <= v <= 1.0 + 1e-6
    assert O.similarity("033;", "033;", "embed", emb) == pytest.approx(1.0, abs=1e-5)


def test_levenshtein_matches_pure_python():
    def ref(a, b):
        d = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, d[0] = d[0], i
            for j, cb in enumerate(b, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
        return d[-1]

    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab;1") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab;1") for _ in range(rng.randint(0, 12)))
        assert O.levenshtein(a, b) == ref(a, b)


def test_chunk_agreement_sums_phi():
    k = O.chunk_agreement(["347;", "9"], [["347;", "437;", ""], ["9", "8", "9"]], "ned")
    torch.testing.assert_close(k, torch.tensor([1 + 0.5 + 0, 2.0]))


# ---- Eq. (6)-(7): posterior and loss ----------------------------------------------------------


def test_dm_posterior_hand_value_and_detached():
    lp = torch.tensor([-0.1, -0.3], requires_grad=True)
    pbar = lp.mean().exp()
    assert float(pbar.detach()) == pytest.approx(0.8187308, abs=1e-6)
    phat = O.dm_posterior(torch.tensor(6.0), pbar, 8, 1.0)
    assert float(phat) == pytest.approx(0.7576368, abs=1e-6)
    assert not phat.requires_grad
    assert float(O.dm_posterior(6.0, 0.3, 8, 0.0)) == pytest.approx(0.75)  # alpha = 0: k / N


def test_omniopd_loss_gradient_treats_phat_as_constant():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, generator=g)
    kl = torch.rand(2, 6, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    starts = [[0, 3], [1]]

    def grad(with_tensor_phat):
        lp = base.clone().requires_grad_(True)
        pbar = O.chunk_mean_logp(lp, starts, 2).exp()  # built from the grad-carrying log-probs
        phat = O.dm_posterior(torch.tensor([3.0, 5.0, 8.0]), pbar, 8, 1.0)
        if not with_tensor_phat:
            phat = [float(x) for x in phat]
        loss, _ = O.omniopd_loss(lp, kl, mask, starts, torch.tensor(phat) if not with_tensor_phat else phat, 2, 0.1)
        loss.backward()
        return lp.grad, phat

    g1, phat = grad(True)
    g2, _ = grad(False)
    torch.testing.assert_close(g1, g2)
    # closed form: d L / d logp_t = -phat_c / B on audited tokens, 0 elsewhere
    want = torch.zeros(2, 6)
    want[0, 0:2], want[0, 3:5], want[1, 1:3] = -phat[0] / 2, -phat[1] / 2, -phat[2] / 2
    torch.testing.assert_close(g1, want)


def test_kl_anchor_exact_on_unaudited_non_pad_only():
    g = torch.Generator().manual_seed(1)
    V = 7
    ref_logits, pi_logits = torch.randn(2, 5, V, generator=g), torch.randn(2, 5, V, generator=g)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=ref_logits),
                                           torch.distributions.Categorical(logits=pi_logits))  # (2, 5)
    # common.token_logprobs' KL equals torch.distributions on real models (tested in test_common);
    # here: the loss uses exactly the unaudited, non-pad positions
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    starts = [[1], []]
    lp = torch.zeros(2, 5)
    loss, parts = O.omniopd_loss(lp, kl, mask, starts, torch.tensor([0.5]), 2, beta=0.3)
    want = 0.3 * (kl[0, [0, 3, 4]].sum() + kl[1, :3].sum()) / 2
    torch.testing.assert_close(parts["kl_term"], want)
    same = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=ref_logits),
                                             torch.distributions.Categorical(logits=ref_logits))
    assert float(same.abs().max()) < 1e-6


def test_token_logprobs_ref_kl_matches_distributions(tiny):
    model, tok = tiny
    ref, _ = C.tiny_lm(n_layer=2, d_model=32, seed=1)
    ids, mask, _ = C.encode_pairs(tok, ["add 12="], ["011;123;=3"])
    _, _, kl = C.token_logprobs(model, ids, mask, ref_model=ref)
    lm = lambda m: m(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits.float()[:, :-1]
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=lm(ref)),
                                             torch.distributions.Categorical(logits=lm(model)))
    torch.testing.assert_close(kl[:, 1:], want, atol=1e-5, rtol=1e-4)


def test_losses_are_sum_over_batch_size():
    g = torch.Generator().manual_seed(2)
    lp, kl = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    starts, phat = [[0], [2], []], torch.tensor([0.4, 0.9])
    l1, _ = O.omniopd_loss(lp, kl, mask, starts, phat, 2, 0.1)
    l2, _ = O.omniopd_loss(torch.cat([lp, lp]), torch.cat([kl, kl]), torch.cat([mask, mask]), starts + starts,
                           torch.cat([phat, phat]), 2, 0.1)
    torch.testing.assert_close(l1, l2)
    tlp = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(O.opd_loss(lp, tlp, mask)[0], O.opd_loss(torch.cat([lp, lp]), torch.cat([tlp, tlp]),
                                                                       torch.cat([mask, mask]))[0])


# ---- Eq. (8)-(9): baselines -------------------------------------------------------------------


def test_opd_advantage_and_gradient_hand_values():
    lp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    tlp = torch.tensor([[-2.0, -1.0]])
    loss, adv = O.opd_loss(lp, tlp, torch.tensor([[1, 0]]))
    assert float(adv[0, 0]) == pytest.approx(-1.5) and float(adv[0, 1]) == 0.0
    assert float(loss.detach()) == pytest.approx(-(-1.5 * -0.5))
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[1.5, 0.0]]))  # -A on the scored token, none on the pad


def test_grpo_advantages():
    a = O.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4)
    # unbiased std of [1, 0, 0, 0] is 0.5
    torch.testing.assert_close(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), atol=1e-4, rtol=0)
    assert a[4:].abs().max() < 1e-6


# ---- teacher interface ------------------------------------------------------------------------


class RecordingTeacher:
    def __init__(self):
        self.prompts, self.kw = [], {}

    def complete(self, prompts, n=1, **kw):
        self.prompts += list(prompts)
        self.kw = kw
        return [["XXXXXXXXXX"[: 3 + i] for i in range(n)] for _ in prompts]


def test_teacher_gets_exactly_the_prefix_before_the_chunk(tiny):
    _, tok = tiny
    prompts = ["add 358=", "add 12="]
    resp = ["033;358;886;=6", "011;123;=3"]
    ids = torch.full((2, 16), tok.pad_token_id)
    for b, r in enumerate(resp):
        t = tok(r, add_special_tokens=False)["input_ids"]
        ids[b, :len(t)] = torch.tensor(t)
    starts = [[4, 8], [0]]
    prefixes, chunks = O.verification_requests(prompts, ids, starts, 4, tok)
    assert prefixes == ["add 358=033;", "add 358=033;358;", "add 12="]
    assert chunks == ["358;", "886;", "011;"]
    t = RecordingTeacher()
    outs = O.teacher_continuations(t, prefixes, chunks, 2, 1.0, "chars", 4)
    assert t.prompts == prefixes and t.kw["max_tokens"] == 4
    assert all(len(z) <= 4 for zs in outs for z in zs)  # capped at the chunk's characters


def test_same_tokenizer_check():
    a = C.tiny_lm(tokenizer="byte")[1]
    b = C.tiny_lm(tokenizer="byte")[1]
    c = C.tiny_lm(tokenizer="bpe")[1]
    assert O.same_tokenizer(a, b) and not O.same_tokenizer(a, c)


# ---- command line -----------------------------------------------------------------------------


def _run(args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "omniopd.py"), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def test_smoke_run_writes_outputs(tmp_path):
    r = _run(["--max_steps", "2", "--per_device_batch_size", "4", "--eval_size", "16", "--output_dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("args.json", "metrics.jsonl", "summary.json", "omniopd.png"):
        assert (tmp_path / f).is_file(), f
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["teacher_tokens"] > 0 and 0.0 <= s["after"]["acc_greedy"] <= 1.0
    rows = C.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert any("k_mean" in r and "kl_ref" in r for r in rows)


def test_opd_refuses_without_shared_logits(tmp_path):
    # in-process: a teacher with another tokenizer is refused before any model is loaded
    with pytest.raises(C.UserError, match="another tokenizer"):
        O.main(O.parse_args(["--method", "opd", "--toy_teacher", "other_tokenizer", "--output_dir", str(tmp_path / "a")]))
    # as a user sees it: one line on stderr, exit status 2, nothing written
    r = _run(["--method", "opd", "--teacher_access", "text", "--output_dir", str(tmp_path / "b")])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "text-only" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_black_box_teacher_over_http(tmp_path):
    """End to end against a real OpenAI-compatible server on 127.0.0.1 serving the toy teacher."""
    server = C.serve_openai(C.LLM.from_hf(C.toy_checkpoint("teacher")), model_name="toy-teacher")
    try:
        r = _run(["--teacher_api_base", server.url, "--teacher_api_model", "toy-teacher", "--max_steps", "2",
                  "--per_device_batch_size", "4", "--eval_size", "16", "--output_dir", str(tmp_path)])
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["teacher_usage"]["calls"] > 0 and s["teacher_tokens"] > 0


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        os.path.join(ROOT, "omniopd.py"), "--max_steps", "3", "--per_device_batch_size", "4",
                        "--eval_size", "16", "--output_dir", str(tmp_path)], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["student_tokens"] > 0


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tmp_path):
    r = _run(["--max_steps", "2", "--save_every", "1", "--per_device_batch_size", "4", "--eval_size", "8",
              "--output_dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(["--max_steps", "4", "--resume", "--per_device_batch_size", "4", "--eval_size", "8",
              "--output_dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [row["step"] for row in C.read_jsonl(str(tmp_path / "metrics.jsonl"))]
    assert steps[0] == 0 and max(steps) == 4 and 3 in steps


# ---- the toy table ---------------------------------------------------------------------------------


def test_table_aggregates_mean_std_and_final_kl(tmp_path):
    """write_table: mean ± sample std over seeds, per-update token counts, the last-10-updates KL."""
    runs = []
    for seed, (acc, kl) in enumerate([(0.5, 0.1), (0.7, 0.3)]):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        rows = [{"step": i, "kl_ref": 9.0} for i in range(5)] + [{"step": 5 + i, "kl_ref": kl} for i in range(10)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows + [{"step": 15, "acc_greedy": acc}]))
        runs.append({"group": "same", "label": "arm", "seed": seed, "steps": 10, "teacher_tokens": 100 * (seed + 1),
                     "student_tokens": 50, "wall_time_s": 60.0, "kl_ref_end": O.final_kl_ref(str(run)),
                     "after": {"acc_greedy": acc, "acc_sample": acc / 2, "acc_ood": None}})
    assert runs[0]["kl_ref_end"] == pytest.approx(0.1) and O.final_kl_ref(str(tmp_path)) is None
    md = O.write_table(runs, str(tmp_path / "table"))
    row = md.strip().splitlines()[-1]
    # acc 0.5, 0.7: mean 0.6, sample std 0.1414; teacher tokens (100 + 200) / 2 / 10 updates = 15
    assert row == "| same | arm | 0,1 | 0.600 ± 0.141 | 0.300 ± 0.071 | - | 15 | 5 | 0.200 ± 0.141 | 1.0 |"
    assert (tmp_path / "table" / "table.png").is_file()


# ---- real-model path: defaults, micro-batches, teacher requests, checkpoints ---------------------


def test_real_model_defaults_differ_from_the_toy():
    a = O.parse_args(["--output_dir", "x"])
    assert a.eval_max_new_tokens == 40 and a.gradient_checkpointing is False and a.micro_batch_size is None
    assert a.teacher_batch_size == 1024 and a.ref_dtype == "same"
    b = O.parse_args(["--model_name_or_path", "Qwen/Qwen3-1.7B", "--max_new_tokens", "4096", "--output_dir", "x"])
    assert b.eval_max_new_tokens == 4096 and b.gradient_checkpointing is True
    c = O.parse_args(["--eval_file", "e.jsonl", "--max_new_tokens", "64", "--no-gradient_checkpointing", "--output_dir", "x"])
    assert c.eval_max_new_tokens == 64 and c.gradient_checkpointing is False
    assert O.parse_args(["--eval_file", "e.jsonl", "--eval_max_new_tokens", "7", "--output_dir", "x"]).eval_max_new_tokens == 7


class StubTextTeacher:
    """A deterministic text-only teacher with token usage (1 character = 1 token)."""
    is_local = False

    def __init__(self):
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def complete(self, prompts, n=1, max_tokens=8, **kw):
        outs = [[("033;358;886;628;=8" * 4)[(i + len(p)) % 5:][:max_tokens] for i in range(n)] for p in prompts]
        self.usage["completion_tokens"] += sum(len(z) for o in outs for z in o)
        return outs


def _train_step_grads(method, micro, tiny_models):
    model, ref, teacher, tok = tiny_models
    args = O.parse_args(["--method", method, "--per_device_batch_size", "4", "--group_size", "2", "--chunk_tokens", "3",
                         "--num_chunks", "3", "--teacher_samples", "2", "--max_new_tokens", "16", "--output_dir", "x"]
                        + (["--micro_batch_size", str(micro)] if micro else []))
    w = dict(model=model, tok=tok, ref=ref, chat=False, llm=StubTextTeacher(), teacher_model=teacher, embedder=None,
             teacher_tok=None, teacher_chat=False, train=C.toy_dataset("train", 64, seed=0, domains=("add",)),
             device=torch.device("cpu"), teacher_tokens=0, student_tokens=0, anchor_rng=random.Random(0),
             noise_gen=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    model.train()
    loss, m = O.train_step(args, w, 3, 0, 1, torch.Generator().manual_seed(5))
    model.eval()
    return loss, m, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["omniopd", "sft", "grpo", "opd"])
def test_micro_batches_give_the_full_batch_loss_and_gradient(method):
    """--micro_batch_size 2 x 2 rows == 4 rows in one go (every loss is a sum over rows / B)."""
    model, tok = C.tiny_lm(n_layer=2, d_model=32, seed=0)
    ref = C.tiny_lm(n_layer=2, d_model=32, seed=0)[0].eval()
    teacher = C.tiny_lm(n_layer=2, d_model=32, seed=3)[0].eval()
    with torch.no_grad():  # the student moved away from pi_ref, so the KL anchor has a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    models = (model, ref, teacher, tok)
    l4, m4, g4 = _train_step_grads(method, None, models)
    l2, m2, g2 = _train_step_grads(method, 2, models)
    assert not l4.requires_grad and g4 and g4.keys() == g2.keys()
    torch.testing.assert_close(l2, l4, atol=1e-6, rtol=1e-5)
    for n in g4:
        torch.testing.assert_close(g2[n], g4[n], atol=1e-6, rtol=1e-4, msg=n)
    assert m4.keys() == m2.keys()
    for k in m4:
        torch.testing.assert_close(torch.as_tensor(m2[k]).float(), torch.as_tensor(m4[k]).float(), atol=1e-6, rtol=1e-5)
    if method == "omniopd":
        assert "k_mean" in m4 and float(m4["chunk_term"]) != 0.0


def test_gradient_checkpointing_keeps_the_gradient():
    """--gradient_checkpointing (HF, non-reentrant) recomputes activations; the gradient is unchanged."""
    grads = []
    for ckpt in (False, True):
        model, tok = C.tiny_lm(n_layer=2, d_model=32, seed=0)
        ref = C.tiny_lm(n_layer=2, d_model=32, seed=1)[0].eval()
        if ckpt:
            O.enable_activation_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        grads.append(_train_step_grads("omniopd", 2, (model, ref, ref, tok))[2])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_micro_batches_cover_every_row_once():
    assert O.micro_batches(5, None) == [slice(0, 5)]
    assert O.micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert O.micro_batches(4, 8) == [slice(0, 4)]


def test_empty_decoded_chunks_are_skipped_and_stay_in_the_kl_term(tiny):
    """A chunk of special tokens only decodes to "": cut to 0 characters every teacher text would
    match it (phi("", "") = 1, k = N). It is dropped: no chunk term, its tokens stay unaudited."""
    _, tok = tiny
    eos = tok.eos_token_id
    r = tok("011;123;=3", add_special_tokens=False)["input_ids"] + [eos]
    ids = torch.tensor([r])
    starts = [[2, 10]]  # C = 1: "1" and the lone EOS
    prefixes, chunks = O.verification_requests(["add 12="], ids, starts, 1, tok)
    assert chunks == ["1", ""]
    st, pre, ch = O.drop_empty_chunks(starts, prefixes, chunks)
    assert st == [[2]] and pre == ["add 12=01"] and ch == ["1"]
    _, audited = O.chunk_weights(st, torch.tensor([0.5]), (1, len(r)), 1)
    assert audited[0, 2] and not audited[0, 10]  # the EOS keeps its KL anchor
    # rows keep their order when a middle row loses its only chunk
    st, pre, ch = O.drop_empty_chunks([[0], [3], [1, 5]], ["a", "b", "c", "d"], ["x", "", "y", "z"])
    assert st == [[0], [], [1, 5]] and pre == ["a", "c", "d"] and ch == ["x", "y", "z"]


def test_chars_mode_asks_for_at_most_c_teacher_tokens():
    """A real chunk of C tokens is ~4C characters: ask for C teacher tokens, not |s_c| tokens, then cut to |s_c|."""
    t = RecordingTeacher()
    outs = O.teacher_continuations(t, ["p1", "p2"], ["abcdefghij", "ab"], 3, 1.0, "chars", 4)
    assert t.kw["max_tokens"] == 4
    assert [len(z) for z in outs[1]] == [2, 2, 2] and [len(z) for z in outs[0]] == [3, 4, 5]
    O.teacher_continuations(t, ["p"], ["ab"], 1, 1.0, "chars", 4)
    assert t.kw["max_tokens"] == 2  # the toy's byte tokens: never more than the chunk's characters


class LocalRecordingTeacher:
    is_local = True

    def __init__(self, batch_size):
        self.batch_size, self.calls = batch_size, []

    def complete(self, prompts, n=1, **kw):
        self.calls.append(list(prompts))
        return [[p.upper() + str(i) for i in range(n)] for p in prompts]


def test_local_teacher_requests_are_sorted_across_calls_and_returned_in_order():
    prompts = ["ccc", "a", "bbbbb", "dd"]
    t = LocalRecordingTeacher(batch_size=4)
    out = O.teacher_complete(t, prompts, 2, temperature=1.0, max_tokens=3)
    assert t.calls == [["a", "dd", "ccc", "bbbbb"]]  # 8 rows > 4: sorted by length
    assert out == [[p.upper() + "0", p.upper() + "1"] for p in prompts]
    t = LocalRecordingTeacher(batch_size=8)
    O.teacher_complete(t, prompts, 2)
    assert t.calls == [prompts]  # one generate call (the toy): the sampler's order is left alone


def test_endpoint_without_raw_completions_fails_with_the_fix():
    class ChatOnly:
        is_local = False

        def complete(self, prompts, n=1, **kw):
            raise C.EndpointError("http://h/v1/completions rejected the request (HTTP 404: b'not found')")

    with pytest.raises(C.UserError, match=r"must continue raw text through /v1/completions"):
        O.teacher_continuations(ChatOnly(), ["p"], ["s"], 2, 1.0, "tokens", 4)


def test_teacher_reads_the_prompt_in_its_own_chat_template(tiny):
    _, tok = tiny
    ttok = C.tiny_lm(tokenizer="byte")[1]
    ttok.chat_template = "{% for m in messages %}<T>{{ m['content'] }}</T>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    probs = [O.Problem("add 12=", "3")]
    w = dict(tok=tok, chat=False, teacher_tok=ttok, teacher_chat=True)
    assert O.teacher_prompts(w, probs) == ["<T>add 12=</T>A:"]
    ids = torch.tensor([tok("011;123;=3", add_special_tokens=False)["input_ids"]])
    prefixes, _ = O.verification_requests(O.teacher_prompts(w, probs), ids, [[4]], 4, tok)
    assert prefixes == ["<T>add 12=</T>A:011;"]  # the teacher's template, then the student's own text
    for w in (dict(w, teacher_chat=False), dict(w, teacher_tok=None)):  # no template / an endpoint: the student's
        assert O.teacher_prompts(w, probs) == ["add 12="]


def test_sft_token_target(tmp_path):
    a = O.parse_args(["--method", "sft", "--output_dir", "x"])
    assert O.sft_token_target(a, 1) == 32 * 2 * 8 * 4  # omniopd's nominal B*M*N*C
    a = O.parse_args(["--method", "sft", "--match_teacher_tokens", "1500", "--output_dir", "x"])
    assert O.sft_token_target(a, 2) == 750  # all ranks -> per rank
    (tmp_path / "summary.json").write_text(json.dumps({"teacher_tokens": 8000, "steps": 4}))
    a = O.parse_args(["--method", "sft", "--match_teacher_tokens", str(tmp_path), "--output_dir", "x"])
    assert O.sft_token_target(a, 1) == 2000
    a = O.parse_args(["--method", "sft", "--match_teacher_tokens", str(tmp_path / "nope"), "--output_dir", "x"])
    with pytest.raises(C.UserError, match="match_teacher_tokens"):
        O.sft_token_target(a, 1)
    assert O.sft_token_target(O.parse_args(["--teacher_token_budget", "none", "--output_dir", "x"]), 1) == 0


def test_reference_loads_in_the_students_dtype_unless_bf16_asked():
    for flag, want in [([], torch.float32), (["--ref_dtype", "bf16"], torch.bfloat16)]:
        args = O.parse_args(["--method", "kl_only", "--eval_size", "4", "--output_dir", "x", *flag])
        w = O.build(args, torch.device("cpu"), 0)
        assert next(w["ref"].parameters()).dtype == want and next(w["model"].parameters()).dtype == torch.float32


def test_final_checkpoint_is_written_before_the_final_eval(tmp_path, monkeypatch):
    calls = []

    def evals(*a, **kw):
        calls.append(a[6])
        if len(calls) > 1:
            raise RuntimeError("eval crashed")
        return {"acc_greedy": 0.0, "acc_sample": 0.0}

    monkeypatch.setattr(O, "run_evals", evals)
    args = ["--max_steps", "1", "--per_device_batch_size", "2", "--eval_size", "4", "--output_dir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="eval crashed"):
        O.main(O.parse_args(args))
    st = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert st["step"] == 1 and st["extra"]["teacher_tokens"] > 0 and len(st["extra"]["rng"]) == 1


def test_nan_loss_names_a_checkpoint_only_when_one_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(O, "run_evals", lambda *a, **kw: {"acc_greedy": 0.0, "acc_sample": 0.0})
    monkeypatch.setattr(O, "train_step", lambda *a, **kw: (torch.tensor(float("nan")), {}))
    args = ["--per_device_batch_size", "2", "--eval_size", "4", "--output_dir", str(tmp_path)]
    with pytest.raises(C.UserError, match="no checkpoint was written"):
        O.main(O.parse_args(["--max_steps", "2", *args]))
    C.save_checkpoint(str(tmp_path / "checkpoint"), step=1, extra={"teacher_tokens": 0, "student_tokens": 0, "before": {}})
    with pytest.raises(C.UserError, match=r"last good checkpoint \(step 1\) stays in"):
        O.main(O.parse_args(["--max_steps", "2", "--resume", *args]))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--anchor", "random"], ["--method", "sft"]])
def test_resume_replays_an_uninterrupted_run(tmp_path, flags):
    """2 updates + --resume for 2 more == 4 updates in one go (random anchors' sampler and sft's
    response-length estimate are restored from the checkpoint, not restarted)."""
    common = ["--per_device_batch_size", "4", "--eval_size", "4", "--eval_every", "0", *flags]
    r = _run(["--max_steps", "4", "--output_dir", str(tmp_path / "a"), *common])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(["--max_steps", "2", "--save_every", "1", "--output_dir", str(tmp_path / "b"), *common])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(["--max_steps", "4", "--resume", "--output_dir", str(tmp_path / "b"), *common])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (C.read_jsonl(str(tmp_path / d / "metrics.jsonl")) for d in ("a", "b"))
    pick = lambda rows: [(r["step"], r["loss"], r["teacher_tokens"]) for r in rows if "loss" in r]
    assert pick(a) == pick(b) and len(pick(a)) == 4
