"""Tests of omniopd.py: chunk scheduler, similarities, posterior, losses against hand-computed and
independent values; teacher prefixes; entropy alignment; one full update of every method against a plain
reference written here (loops over rows and tokens: anchors, teacher prefixes, agreement, posterior, loss,
gradient, every logged metric, token counts); every arm-defining flag changes the update; the pi_ref forward
only where the loss needs it; the per-phase time split; bad input (one line, exit 2, nothing written); the
output-dir / resume policy; endpoint faults against tests/fault_server.py; chat-only teachers (every API
channel against tests/fault_server.py's simulated providers, echo cleaning, the start-up probe and its
refusals, prompt-token billing); the CLI (smoke run, a real local OpenAI-compatible teacher endpoint,
torchrun with 2 CPU processes, kill -9 + --resume, Ctrl-C, the real SmolLM2 checkpoint, SmolLM2 as a
chat-only instruction-following teacher).

Breakages these tests catch (each made by editing one line of omniopd.py and watching a test fail):
  entropy taken one position off in the training step; log-probs one position off; KL(pi_ref || pi) one
  position off; pbar taken as -mean log pi instead of exp(mean log pi); the entropy metric averaged over pads;
  sft training an EOS after a teacher reply cut at max_tokens; opd's teacher tokens not counted; opd's
  advantage sign flipped; grpo groups spanning the whole batch; --alpha, --similarity, --anchor random,
  --teacher_chunk_unit, --teacher_logit_noise or --teacher_token_budget read nowhere; pi_ref run on every step
  for opd / sft; the last step's diagnostic KL missing; --chunk_tokens > --max_new_tokens accepted; grpo with
  --group_size 1 accepted; a --beta change accepted on --resume; the optimizer phase not timed; the distinct
  diagnostic miscounted; phi = embed through the LM head; --request_timeout not passed as the endpoint's
  deadline; a killed table arm rerun without --overwrite; omniopd's or the student's token counters not
  counted; a data line without 'answer' accepted.
  Chat-only teachers (issue 10; each also made by editing one line and watching a test fail): the continue
  style sending the instruction instead of [user: x, assistant: y[:t0]]; the chat prefix losing y[:t0];
  clean_continuation's overlap threshold ignoring short partials, or accepting any 1-character overlap; quotes
  around a reply kept; instruction replies not cleaned; the restating provider's max_tokens allowance dropped;
  prompt tokens not counted; auto skipping the continuation probe; no retry without the vLLM fields after a
  strict server's 400; the probe reply's content not checked; sft running the continuation probe; a 401 read
  as a missing route; the table's prompt-token column reading teacher_tokens; summary.json without the mode;
  a killed endpoint arm of the api table resumed instead of started over.
"""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import common as C  # noqa: E402
import omniopd as O  # noqa: E402
from conftest import run_cli  # noqa: E402

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
    # a chat-only teacher gets the same text in two parts: the raw prompt x and the partial response y[:t0]
    rendered = [f"<u>{p}</u>" for p in prompts]
    pre, _ = O.verification_requests(rendered, ids, starts, 4, tok, raw_prompts=prompts)
    assert [(str(p), p.x, p.y) for p in pre] == [("<u>add 358=</u>033;", "add 358=", "033;"),
                                                 ("<u>add 358=</u>033;358;", "add 358=", "033;358;"),
                                                 ("<u>add 12=</u>", "add 12=", "")]
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


# slow: a whole run against a local server (~11 s); the endpoint paths also have fast fault-server tests
@pytest.mark.slow
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
                     "student_tokens": 50, **({"teacher_prompt_tokens": 70} if seed else {}), "wall_time_s": 60.0, "kl_ref_end": O.final_kl_ref(str(run)),
                     "after": {"acc_greedy": acc, "acc_sample": acc / 2, "acc_ood": None}})
    assert runs[0]["kl_ref_end"] == pytest.approx(0.1) and O.final_kl_ref(str(tmp_path)) is None
    md = O.write_table(runs, str(tmp_path / "table"))
    row = md.strip().splitlines()[-1]
    # acc 0.5, 0.7: mean 0.6, sample std 0.1414; teacher tokens (100 + 200) / 2 / 10 updates = 15; prompt tokens
    # 70 / 10 from the one run that logged them (a summary written before the count existed has none)
    assert row == "| same | arm | 0,1 | 0.600 ± 0.141 | 0.300 ± 0.071 | - | 15 | 7 | 5 | 0.200 ± 0.141 | 1.0 |"
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

    with pytest.raises(C.UserError, match=r"pass --teacher_api_mode chat"):
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


# ---- one full update against a plain reference (loops over rows and tokens) ---------------------


def _plain_row_logsoftmax(model, seq_row, mask_row):
    """One row, its padding stripped, positions 0.. : (real ids, (L, V) log-softmax) by a plain forward."""
    n_pad = 0
    while mask_row[n_pad] == 0:  # left padding only (a row that ended early has mask 0 after its EOS too)
        n_pad += 1
    ids = seq_row[n_pad:]
    with torch.enable_grad():
        logits = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).logits[0].float()
    return n_pad, ids, torch.log_softmax(logits, -1)


def _plain_ned(a, b):
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, cb in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
    return 1.0 - d[-1] / max(len(a), len(b))


class TableTeacher:
    """Text-only stub teacher: continuation i of prefix p is a fixed function of (len(p), i);
    1 character = 1 token of usage; records what it was asked."""
    is_local = False

    def __init__(self):
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.asked = []

    def complete(self, prompts, n=1, max_tokens=8, **kw):
        outs = [[("0123;456=789;" * 3)[(len(p) * 3 + 5 * i) % 11:][:max_tokens] for i in range(n)] for p in prompts]
        self.asked.append((list(prompts), n, max_tokens))
        self.usage["completion_tokens"] += sum(len(z) for o in outs for z in o)
        return outs


class EchoTeacher(TableTeacher):
    """Text-only stub whose continuations are variants of the student's *own* next text after the
    prefix (read from the recorded rollout: a test stub may look behind the prompt), so the agreement
    k falls inside (0, N) instead of being 0 for a random student."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.seen, self.returned = tok, None, []

    def complete(self, prompts, n=1, max_tokens=8, **kw):
        g = self.seen[-1]
        nxt = {}
        for b in range(g.response_ids.shape[0]):
            ids = g.response_ids[b].tolist()
            for t in range(len(ids)):
                for p in self.prompts_seen:
                    nxt.setdefault(p + self.tok.decode(ids[:t], skip_special_tokens=True),
                                   self.tok.decode(ids[t:t + max_tokens], skip_special_tokens=True))
        outs = []
        for p in prompts:
            s = nxt.get(p, "")
            outs.append([[s + "1;", s[::-1], "9" + s[1:], "", s[:1]][i % 5] for i in range(n)])  # may run past s
        self.asked.append((list(prompts), n, max_tokens))
        self.returned += outs
        self.usage["completion_tokens"] += sum(len(z) for o in outs for z in o)
        return outs


def _world(model, ref, tok, llm=None, teacher=None, n_train=16):
    return dict(model=model, tok=tok, ref=ref, chat=False, llm=llm, teacher_model=teacher, embedder=None, teacher_tok=None,
                teacher_chat=False, train=C.toy_dataset("train", n_train, seed=0, domains=("add",)),
                device=torch.device("cpu"), teacher_tokens=0, student_tokens=0, anchor_rng=random.Random(0),
                noise_gen=torch.Generator().manual_seed(0))


def _tiny_pair(shift=0.05):
    model, tok = C.tiny_lm(n_layer=2, d_model=32, seed=0)
    ref = C.tiny_lm(n_layer=2, d_model=32, seed=0)[0].eval()
    with torch.no_grad():  # the student moved away from pi_ref: the KL anchor is not 0
        for p in model.parameters():
            p.add_(shift * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, ref, tok


def _one_update(monkeypatch, method, flags, llm=None, teacher=None, step=3, models=None):
    """Run O.train_step once; return (loss, metrics, grads, the recorded Generation, w, args, models)."""
    model, ref, tok = models or _tiny_pair()
    args = O.parse_args(["--method", method, "--output_dir", "x", *flags])
    w = _world(model, ref, tok, llm, teacher)
    seen = []
    real_generate = C.generate

    def recording_generate(*a, **kw):
        g = real_generate(*a, **kw)
        seen.append(g)
        return g

    monkeypatch.setattr(C, "generate", recording_generate)
    if isinstance(llm, EchoTeacher):
        llm.seen = seen
        llm.prompts_seen = [p.prompt for p in w["train"]]
    model.zero_grad(set_to_none=True)
    model.train()
    loss, m = O.train_step(args, w, step, 0, 1, torch.Generator().manual_seed(11))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, m, grads, (seen[0] if seen else None), w, args, (model, ref, tok)


def _assert_grads(model, ref_loss, grads):
    model.zero_grad(set_to_none=True)
    ref_loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=2e-6, rtol=2e-4, msg=n)
    model.zero_grad(set_to_none=True)


def _rows(g, model, ref=None):
    """Per row: (response ids list, log pi(y_t) list of tensors, entropy list, KL(ref||pi) list)."""
    out = []
    P = g.prompt_len
    for b in range(g.sequences.shape[0]):
        T = int(g.response_mask[b].sum())
        n_pad, ids, lsm = _plain_row_logsoftmax(model, g.sequences[b], g.attention_mask[b])
        rlsm = _plain_row_logsoftmax(ref, g.sequences[b], g.attention_mask[b])[2].detach() if ref is not None else None
        lp, ent, kl = [], [], []
        for t in range(T):
            pos = P - n_pad + t  # the response token's position in the unpadded row
            dist = lsm[pos - 1]  # the distribution that produced it
            lp.append(dist[int(ids[pos])])
            ent.append(float(-(dist.exp() * dist).sum().detach()))
            if rlsm is not None:
                kl.append((rlsm[pos - 1].exp() * (rlsm[pos - 1] - dist)).sum())
        out.append((g.response_ids[b, :T].tolist(), lp, ent, kl))
    return out


def test_omniopd_update_matches_a_plain_reference(monkeypatch):
    """Eq. (1)-(7) end to end on a fixed batch: anchors, teacher prefixes, ned agreement, posterior,
    loss, gradient and every logged metric, recomputed with loops."""
    C_, M, N, alpha, beta = 2, 2, 5, 0.7, 0.3
    model, ref, tok = _tiny_pair()
    teacher = EchoTeacher(tok)
    loss, m, grads, g, w, args, _ = _one_update(
        monkeypatch, "omniopd", ["--per_device_batch_size", "3", "--chunk_tokens", str(C_), "--num_chunks", str(M),
                                 "--teacher_samples", str(N), "--max_new_tokens", "8", "--alpha", str(alpha),
                                 "--beta", str(beta)], llm=teacher, models=(model, ref, tok))
    B = 3
    probs = O.batch_problems(w["train"], 3, B, 0)
    rows = _rows(g, model, ref)
    # anchors (Eq. 3) by a plain loop, then the teacher's requests (Eq. 4)
    total = chunk_term = kl_term = 0.0
    ks, phats, pbars, n_chunks, prefixes, texts = [], [], [], 0, [], []
    starts_all = []
    for b, (ids, lp, ent, kl) in enumerate(rows):
        T, acc = len(ids), []
        for t in sorted(range(T - C_ + 1), key=lambda t: (ent[t], t), reverse=True):
            if len(acc) < M and all(abs(t - u) >= C_ for u in acc):
                acc.append(t)
        acc = [t for t in sorted(acc) if tok.decode(ids[t:t + C_], skip_special_tokens=True)]
        starts_all.append(acc)
        for t in acc:
            prefixes.append(probs[b].prompt + tok.decode(ids[:t], skip_special_tokens=True))
            texts.append(tok.decode(ids[t:t + C_], skip_special_tokens=True))
    assert teacher.asked[0][0] == prefixes and teacher.asked[0][1] == N
    max_tokens = max(1, min(C_, max(len(s) for s in texts)))
    assert teacher.asked[0][2] == max_tokens
    conts = teacher.returned  # what the teacher said (its prefixes were checked above)
    assert len(conts) == len(prefixes)
    i = 0
    for b, (ids, lp, ent, kl) in enumerate(rows):
        audited = set()
        row_chunk = 0.0
        for t in starts_all[b]:
            k = sum(_plain_ned(texts[i], z[:len(texts[i])]) for z in conts[i])  # Eq. (5), chars mode
            pbar = math.exp(sum(float(lp[u].detach()) for u in range(t, t + C_)) / C_)  # Eq. (6)
            phat = (k + alpha * pbar) / (N + alpha)
            ks.append(k), pbars.append(pbar), phats.append(phat)
            row_chunk = row_chunk - phat * sum(lp[u] for u in range(t, t + C_))
            audited |= set(range(t, t + C_))
            i += 1
        n_chunks += len(starts_all[b])
        row_kl = sum((kl[t] for t in range(len(ids)) if t not in audited), torch.tensor(0.0))
        chunk_term = chunk_term + row_chunk / B
        kl_term = kl_term + beta * row_kl / B
    total = chunk_term + kl_term
    assert len(ks) >= 3, "the fixed batch should audit several chunks"
    assert any(0 < k < N for k in ks), "the agreement should be informative"
    torch.testing.assert_close(loss, total.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["chunk_term"], chunk_term.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["kl_term"], kl_term.detach(), atol=1e-6, rtol=1e-5)
    n_tok = sum(len(r[0]) for r in rows)
    assert m["kl_ref"] == pytest.approx(float(sum(float(x.detach()) for r in rows for x in r[3])) / n_tok, rel=1e-4, abs=1e-7)
    assert float(m["kl_ref"]) > 1e-4
    assert float(m["entropy"]) == pytest.approx(sum(x for r in rows for x in r[2]) / n_tok, rel=1e-5)
    assert float(m["k_mean"]) == pytest.approx(np.mean(ks), abs=1e-5)
    assert float(m["k_mid"]) == pytest.approx(np.mean([0.05 * N < k < 0.95 * N for k in ks]))
    assert float(m["phat_mean"]) == pytest.approx(np.mean(phats), abs=1e-5)
    assert float(m["pbar_mean"]) == pytest.approx(np.mean(pbars), abs=1e-5)
    assert float(m["chunks"]) == pytest.approx(n_chunks / B)
    assert float(m["resp_len"]) == pytest.approx(n_tok / B)
    assert w["student_tokens"] == n_tok
    assert w["teacher_tokens"] == sum(len(z) for zs in conts for z in zs)  # what the teacher generated, uncut
    _assert_grads(model, total, grads)


def test_opd_update_matches_a_plain_reference(monkeypatch):
    teacher = C.tiny_lm(n_layer=2, d_model=32, seed=3)[0].eval()
    loss, m, grads, g, w, args, (model, ref, tok) = _one_update(
        monkeypatch, "opd", ["--per_device_batch_size", "3", "--max_new_tokens", "6"], teacher=teacher)
    B, tot, adv_sum = 3, 0.0, 0.0
    rows, trows = _rows(g, model, ref), _rows(g, teacher)
    for (ids, lp, _, _), (_, tlp, _, _) in zip(rows, trows):
        for t in range(len(ids)):
            a = -(float(lp[t].detach()) - float(tlp[t].detach()))  # Eq. (8), detached
            adv_sum += a
            tot = tot - a * lp[t] / B
    n_tok = sum(len(r[0]) for r in rows)
    torch.testing.assert_close(loss, tot.detach(), atol=1e-5, rtol=1e-5)
    assert float(m["adv_mean"]) == pytest.approx(adv_sum / n_tok, rel=1e-4)
    assert float(m["kl_ref"]) == pytest.approx(sum(float(x.detach()) for r in rows for x in r[3]) / n_tok, rel=1e-4)
    assert w["teacher_tokens"] == n_tok  # opd's teacher scores (prefills) the student's tokens
    _assert_grads(model, tot, grads)


def test_grpo_update_matches_a_plain_reference(monkeypatch):
    reward = lambda text, answer: len(text) % 3 == 0  # noqa: E731 - a reward that varies within groups
    monkeypatch.setattr(C, "is_correct", reward)
    beta = 0.2
    loss, m, grads, g, w, args, (model, ref, tok) = _one_update(
        monkeypatch, "grpo", ["--per_device_batch_size", "4", "--group_size", "2", "--max_new_tokens", "6",
                              "--beta", str(beta)])
    B, G = 4, 2
    r = [float(reward(t, None)) for t in g.texts]
    assert len(set(r)) > 1
    rows = _rows(g, model, ref)
    tot = 0.0
    for b, (ids, lp, _, kl) in enumerate(rows):
        grp = r[b // G * G:b // G * G + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        a = (r[b] - mean) / (std + 1e-4)  # Eq. (9)
        tot = tot + (-a * sum(lp, torch.tensor(0.0)) + beta * sum(kl, torch.tensor(0.0))) / B
    torch.testing.assert_close(loss, tot.detach(), atol=1e-5, rtol=1e-5)
    assert float(m["train_acc"]) == pytest.approx(sum(r) / B)
    _assert_grads(model, tot, grads)


class CutTeacher:
    """Text-only stub with finish reasons: the second prompt's reply is cut at max_tokens."""
    is_local = False

    def __init__(self):
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.last_finish_reasons = []

    def complete(self, prompts, n=1, max_tokens=8, **kw):
        outs, why = [], []
        for j, p in enumerate(prompts):
            full = "011;123;=3" if j % 2 == 0 else "033;358;886;628;=8"
            outs.append([full[:max_tokens]] * n)
            why.append(["stop" if len(full) <= max_tokens else "length"] * n)
        self.usage["completion_tokens"] += sum(len(z) for o in outs for z in o)
        self.last_finish_reasons = why
        return outs


def test_sft_update_matches_a_plain_reference_and_trains_no_eos_after_a_cut_reply(monkeypatch):
    teacher = CutTeacher()
    loss, m, grads, g, w, args, (model, ref, tok) = _one_update(
        monkeypatch, "sft", ["--per_device_batch_size", "2", "--max_new_tokens", "12", "--teacher_token_budget", "none"],
        llm=teacher)
    assert g is None  # sft makes no student rollout
    probs = O.batch_problems(w["train"], 3, 2, 0)
    tot, n_tok, eos_rows = 0.0, 0, []
    for j, p in enumerate(probs):
        full = "011;123;=3" if j % 2 == 0 else "033;358;886;628;=8"
        p_ids = tok(p.prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(full[:12], add_special_tokens=False)["input_ids"][:12]
        ended = len(full) <= 12
        if ended:
            r_ids = r_ids + [tok.eos_token_id]
        eos_rows.append(ended)
        ids = torch.tensor(p_ids + r_ids)
        lsm = torch.log_softmax(model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).logits[0].float(), -1)
        for pos in range(len(p_ids), len(ids)):
            tot = tot - lsm[pos - 1][int(ids[pos])] / 2  # Eq. (10)
            n_tok += 1
    assert eos_rows == [True, False]
    torch.testing.assert_close(loss, tot.detach(), atol=1e-5, rtol=1e-5)
    assert float(m["sft_cut"]) == 0.5 and m["sft_responses"] == 2
    assert w["teacher_tokens"] == 10 + 12
    _assert_grads(model, tot, grads)


# ---- every arm-defining flag changes the update ---------------------------------------------------

_BASE = ["--per_device_batch_size", "4", "--group_size", "2", "--chunk_tokens", "2", "--num_chunks", "2",
         "--teacher_samples", "3", "--max_new_tokens", "10"]


@pytest.mark.parametrize("method,flags", [
    ("omniopd", ["--similarity", "rouge1"]), ("omniopd", ["--similarity", "embed"]), ("omniopd", ["--anchor", "random"]),
    ("omniopd", ["--alpha", "3"]), ("omniopd", ["--beta", "0.9"]), ("omniopd", ["--chunk_tokens", "3"]),
    ("omniopd", ["--num_chunks", "1"]), ("omniopd", ["--teacher_samples", "2"]),
    ("omniopd", ["--teacher_chunk_unit", "tokens"]), ("omniopd", ["--temperature", "0.5"]),
    ("omniopd", ["--method", "kl_only"]), ("opd", ["--teacher_logit_noise", "4"]), ("grpo", ["--group_size", "4"]),
    ("grpo", ["--beta", "0.9"]), ("sft", ["--teacher_token_budget", "none"]), ("sft", ["--match_teacher_tokens", "40"]),
    ("omniopd", ["--autocast", "bf16"]), ("opd", ["--autocast", "bf16"]),
])
def test_every_arm_flag_changes_the_update(monkeypatch, method, flags):
    """The update's gradient with the flag differs from the default arm's (a flag read nowhere fails)."""
    models = _tiny_pair()
    teacher = C.tiny_lm(n_layer=2, d_model=32, seed=3)[0].eval()
    monkeypatch.setattr(C, "is_correct", lambda text, answer: len(text) % 3 == 0)  # rewards vary within groups
    if "embed" in flags:  # phi = embed reads w["embedder"]: pi_ref's backbone, as O.build makes it
        plain_world = _world
        monkeypatch.setattr(sys.modules[__name__], "_world", lambda *a, **kw: dict(
            plain_world(*a, **kw), embedder=O.make_embedder(models[1], models[2])))

    def grads(extra):
        m_ = method
        if "--method" in extra:
            m_, extra = extra[1], extra[2:]
        llm = CutTeacher() if m_ == "sft" else EchoTeacher(models[2])
        return _one_update(monkeypatch, m_, _BASE + extra, llm=llm, teacher=teacher, models=models)[2]

    a, b = grads([]), grads(flags)
    assert a and b
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert diff > 1e-7, f"{flags} did not change the update"


# ---- the pi_ref forward only where the loss uses it; the per-phase time split ----------------------


def _count_ref_forwards(ref):
    calls = []
    getattr(ref, "base_model", ref).register_forward_hook(lambda *a: calls.append(1))  # token_logprobs runs the backbone
    return calls


@pytest.mark.parametrize("method,beta,every,step,want", [
    ("opd", 0.1, 0, 3, False), ("opd", 0.1, 3, 3, True), ("opd", 0.1, 3, 4, False), ("opd", 0.1, 5, 79, True),
    ("sft", 0.1, 0, 3, False), ("omniopd", 0.1, 0, 3, True), ("omniopd", 0.0, 0, 3, False), ("grpo", 0.0, 0, 3, False),
    ("grpo", 0.1, 0, 4, True),
])
def test_reference_forward_only_where_the_loss_or_the_diagnostic_needs_it(monkeypatch, method, beta, every, step, want):
    """opd / sft (and beta 0) never use pi_ref in the loss: its forward runs only every --ref_kl_every
    steps (and at the last step), and the gradient is the same with or without it."""
    teacher = C.tiny_lm(n_layer=2, d_model=32, seed=3)[0].eval()
    models = _tiny_pair()
    calls = _count_ref_forwards(models[1])
    flags = _BASE + ["--beta", str(beta), "--ref_kl_every", str(every), "--max_steps", "80"]
    llm = CutTeacher() if method == "sft" else TableTeacher()
    loss, m, grads, *_ = _one_update(monkeypatch, method, flags, llm=llm, teacher=teacher, step=step, models=models)
    assert bool(calls) == want and ("kl_ref" in m) == want
    if not want and method in ("opd", "sft"):  # the same update as with the diagnostic on
        calls.clear()
        loss2, _, grads2, *_ = _one_update(monkeypatch, method, _BASE + ["--ref_kl_every", "1"], llm=type(llm)(),
                                           teacher=teacher, step=step, models=models)
        assert calls and torch.equal(loss, loss2)
        for n in grads:
            assert torch.equal(grads[n], grads2[n]), n


def test_time_split_is_logged_per_phase(monkeypatch):
    teacher = C.tiny_lm(n_layer=2, d_model=32, seed=3)[0].eval()
    model, ref, tok = _tiny_pair()
    args = O.parse_args(["--method", "omniopd", "--output_dir", "x", *_BASE])
    w = _world(model, ref, tok, TableTeacher(), teacher)
    opt = O.make_optimizer(model, args)
    row = O.update(args, w, opt, 0, 0, 1, torch.Generator(), None)
    for k in O.PHASES:
        assert row[f"time_{k}"] > 0, k
    assert sum(row[f"time_{k}"] for k in O.PHASES) <= row["time_step"] + 1e-3
    rows = [{"step": 1, "time_generate": 1.0, "time_teacher": 0.5, "time_forward": 0.25, "time_backward": 0.5,
             "time_optimizer": 0.25, "time_step": 3.0},
            {"step": 2, "time_generate": 3.0, "time_teacher": 0.5, "time_forward": 0.25, "time_backward": 0.5,
             "time_optimizer": 0.25, "time_step": 5.0}, {"step": 2, "acc_greedy": 0.5}]
    assert O.time_split(rows) == {"generate": 2.0, "teacher": 0.5, "forward": 0.25, "backward": 0.5, "optimizer": 0.25,
                                  "step": 4.0, "other": 0.5}


def test_bench_prints_the_split_and_writes_nothing(tmp_path):
    """--bench: --max_steps training steps, each step's seconds and phases, the median over steps 2..n and one
    JSON line; no output dir, no evals."""
    out = tmp_path / "out"
    r = run_cli(O, ["--bench", "--method", "opd", "--max_steps", "3", "--per_device_batch_size", "4", "--max_new_tokens",
                    "8", "--output_dir", out])
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")]
    assert len(lines) == 1 and not out.exists()
    b = json.loads(lines[0][6:])
    assert len(b["per_step_s"]) == 3 and b["batch"] == 4 and b["max_new_tokens"] == 8 and b["autocast"] == "auto"
    assert set(b["median_s"]) == {*O.PHASES, "step"} and all(v > 0 for v in b["median_s"].values())
    assert b["median_s"]["step"] == pytest.approx(float(np.median(b["per_step_s"][1:])), abs=1e-3)
    assert sum(1 for ln in r.stderr.splitlines() + r.stdout.splitlines() if ln.startswith("step ")) == 3


def test_adamw_kernels():
    """foreach (the toy's default) is bit-identical to the for-loop AdamW; fused is a different kernel."""
    outs = {}
    for impl in ("for_loop", "foreach", "fused"):
        model, _ = C.tiny_lm(n_layer=1, d_model=32, seed=0)
        opt = O.make_optimizer(model, O.parse_args(["--adamw_impl", impl, "--output_dir", "x"]))
        assert opt.defaults.get("fused") == (impl == "fused") or impl != "fused"
        assert bool(opt.defaults.get("foreach")) == (impl == "foreach")
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        outs[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(outs["foreach"], outs["for_loop"])
    torch.testing.assert_close(outs["fused"], outs["for_loop"], atol=1e-5, rtol=0)
    assert O.parse_args(["--output_dir", "x"]).adamw_impl == "foreach"
    assert O.parse_args(["--model_name_or_path", "m", "--output_dir", "x"]).adamw_impl == "fused"


# ---- diagnostics, embed backbone ---------------------------------------------------------------------


def test_verification_diagnostics_hand_values():
    chunks = ["347;", "12"]
    conts = [["347;", "347;", "999;"], ["12", "13", "14"]]
    k = O.chunk_agreement(chunks, conts, "ned")
    d = O.verification_diagnostics(chunks, conts, k, 3, "ned")
    assert float(d["k_mean"]) == pytest.approx((2 + 0.25 + 1 + 0.5 + 0.5) / 2)
    assert float(d["k_mid"]) == 1.0
    assert d["distinct"] == pytest.approx((2 / 3 + 1) / 2)
    assert d["copy"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # phi_null: chunk 0 vs chunk 1's first continuation "12"; chunk 1 vs chunk 0's "347;"
    assert float(d["phi_null"]) == pytest.approx((_plain_ned("347;", "12") + _plain_ned("12", "347;")) / 2)


def test_embed_runs_the_backbone_only(tiny):
    model, tok = tiny

    def boom(*a, **kw):
        raise AssertionError("the LM head ran")

    texts = ["033;358;", "hello", "1"]
    want = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"][:-1]])  # ByT5 appends EOS; a prompt has none
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float()
            want.append(h.mean(0))
    handle = model.lm_head.register_forward_pre_hook(boom)
    try:
        got = O.make_embedder(model, tok)(texts)
    finally:
        handle.remove()
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-4)


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------------

BAD_FLAGS = [
    (["--method", "grpo", "--group_size", "0"], "--group_size"), (["--method", "grpo", "--group_size", "1"], "group_size"),
    (["--method", "grpo", "--per_device_batch_size", "6"], "multiple of --group_size"),
    (["--alpha", "-8"], "--alpha"), (["--beta", "-0.1"], "--beta"), (["--beta", "nan"], "--beta"),
    (["--chunk_tokens", "40"], "--chunk_tokens 40 > --max_new_tokens"), (["--eval_size", "0"], "--eval_size"),
    (["--learning_rate", "0"], "--learning_rate"), (["--temperature", "0"], "--temperature"),
    (["--max_grad_norm", "0"], "--max_grad_norm"), (["--micro_batch_size", "0"], "--micro_batch_size"),
    (["--max_steps", "-1"], "--max_steps"), (["--save_every", "-2"], "--save_every"),
    (["--ref_kl_every", "-1"], "--ref_kl_every"), (["--request_timeout", "0"], "--request_timeout"),
    (["--teacher_samples", "0"], "--teacher_samples"), (["--num_chunks", "0"], "--num_chunks"),
    (["--method", "kl_only", "--beta", "0"], "kl_only"), (["--teacher_access", "text"], "changes nothing"),
    (["--method", "opd", "--teacher_access", "text"], "text-only"),
    (["--method", "opd", "--toy_teacher", "other_tokenizer"], "another tokenizer"),
    (["--teacher_logit_noise", "2"], "opd only"), (["--teacher_api_base", "http://127.0.0.1:9"], "--teacher_api_model"),
    (["--method", "grpo", "--teacher_api_base", "http://h", "--teacher_api_model", "m"], "no text teacher"),
    (["--teacher_api_mode", "chat"], "--teacher_api_mode chat applies to an endpoint"),
    (["--teacher_api_base", "http://h", "--teacher_api_model", "m", "--teacher_api_key_env", "NO_SUCH_VAR_XYZ"],
     "NO_SUCH_VAR_XYZ"), (["--sim_model", "m"], "--sim_model"), (["--match_teacher_tokens", "5"], "match_teacher_tokens"),
    (["--resume", "--overwrite"], "exclude each other"), (["--table", "--table_grid", "main,nope"], "nope"),
    (["--table", "--table_seeds", "0,a"], "--table_seeds"),
    (["--bench", "--max_steps", "1"], "--max_steps 1 must be >= 2"), (["--bench", "--table"], "drop --table"),
    (["--bench", "--resume"], "drop --table / --resume"),
]


@pytest.mark.parametrize("flags,msg", BAD_FLAGS)
def test_validate_args_refuses(tmp_path, flags, msg):
    with pytest.raises(C.UserError, match=re.escape(msg)):
        O.validate_args(O.parse_args(["--output_dir", "x", *flags]))
    out = tmp_path / "out"
    with pytest.raises(C.UserError, match=re.escape(msg)):  # main checks first: nothing loaded, nothing written
        O.main(O.parse_args(["--output_dir", str(out), *flags]))
    assert not out.exists()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    """As a user sees it (the CLI in-process, conftest.run_cli; every other bad input goes through the same main
    in test_validate_args_refuses): a bad flag, a missing teacher, a bad data file, a hung endpoint (refused
    at the preflight within --request_timeout): exit 2, one line, no output dir."""
    from fault_server import FaultServer

    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "2"}\n')
    with FaultServer([], then="hang") as srv:
        cases = [(["--alpha", "-8"], "--alpha"), (["--teacher", str(tmp_path / "no_such_teacher")], "no_such_teacher"),
                 (["--train_file", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not valid UTF-8"),
                 (["--teacher_api_base", srv.url, "--teacher_api_model", "m", "--request_timeout", "2"],
                  "did not answer in time")]
        t = time.time()
        for i, (f, words) in enumerate(cases):
            r = run_cli(O, [*f, "--output_dir", str(tmp_path / f"out{i}")])
            assert r.returncode == 2, (f, r.stderr[-1500:])
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and words in r.stderr, (f, r.stderr)
            assert not (tmp_path / f"out{i}").exists(), f
        assert time.time() - t < 60  # seconds, not the minutes of loading and evaluating before


def test_preflight_names_bad_data_lines_and_missing_models(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for content, want in [(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff"}\n', "bad.jsonl:2: not valid UTF-8"),
                          (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n', "bad.jsonl:2: missing 'answer'"),
                          (b'{"prompt": "a", "answer": "1"}\nnot json\n', "bad.jsonl:2: not valid JSON"), (b"", "is empty")]:
        bad.write_bytes(content)
        with pytest.raises(C.UserError, match=re.escape(want)):
            O.preflight(O.parse_args(["--train_file", str(bad), "--output_dir", "x"]), torch.device("cpu"))
    with pytest.raises(C.UserError, match="no_such"):
        O.preflight(O.parse_args(["--teacher", str(tmp_path / "no_such"), "--output_dir", "x"]), torch.device("cpu"))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(C.UserError):
        O.main(O.parse_args(["--model_name_or_path", str(empty), "--output_dir", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()


# ---- output dir policy and resume refusals -------------------------------------------------------------


def test_output_dir_policy_and_resume_refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(O, "run_evals", lambda *a, **kw: {"acc_greedy": 0.25, "acc_sample": 0.5})
    out = str(tmp_path / "run")
    base = ["--per_device_batch_size", "2", "--eval_size", "2", "--max_new_tokens", "8", "--output_dir", out]
    O.main(O.parse_args(["--max_steps", "1", *base]))
    first = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(C.UserError, match="already holds a run"):
        O.main(O.parse_args(["--max_steps", "1", *base]))
    with pytest.raises(C.UserError, match=re.escape("--beta 0.1 -> 0.2")):
        O.main(O.parse_args(["--max_steps", "1", "--resume", "--beta", "0.2", *base]))
    with pytest.raises(C.UserError, match=re.escape("--learning_rate 0.0003 -> 0.001")):
        O.main(O.parse_args(["--max_steps", "1", "--resume", "--learning_rate", "1e-3", *base]))
    with pytest.raises(C.UserError, match=re.escape("--similarity ned -> rouge1")):
        O.main(O.parse_args(["--max_steps", "1", "--resume", "--similarity", "rouge1", *base]))
    assert (tmp_path / "run" / "summary.json").read_text() == first  # refusals touched nothing
    O.main(O.parse_args(["--max_steps", "1", "--overwrite", "--seed", "1", *base]))  # replaces the run
    assert json.loads((tmp_path / "run" / "args.json").read_text())["seed"] == 1
    # --resume where no checkpoint is: refused
    C.write_json(str(tmp_path / "nock" / "args.json"), vars(O.parse_args(base)))
    with pytest.raises(C.UserError, match="no checkpoint"):
        O.main(O.parse_args(["--resume", *base[:-1], str(tmp_path / "nock")]))
    with pytest.raises(C.UserError, match="holds no run"):
        O.main(O.parse_args(["--resume", *base[:-1], str(tmp_path / "empty")]))


def test_table_reruns_a_killed_arm_with_overwrite_or_resume(tmp_path, monkeypatch):
    cmds = []

    class Done:
        returncode, stdout = 1, "x"

    monkeypatch.setattr(O.subprocess, "run", lambda cmd, **kw: cmds.append(cmd) or Done())
    monkeypatch.setattr(O, "write_table", lambda *a, **kw: "")
    args = O.parse_args(["--table", "--table_grid", "main", "--table_seeds", "0", "--output_dir", str(tmp_path)])
    runs = tmp_path / "runs"
    (runs / "same_omniopd_ned-s0").mkdir(parents=True)
    (runs / "same_omniopd_ned-s0" / "args.json").write_text("{}")  # killed before its checkpoint
    C.save_checkpoint(str(runs / "same_opd-s0" / "checkpoint"), step=80)  # killed in its final eval
    (runs / "same_opd-s0" / "args.json").write_text("{}")
    O.run_table(args)
    by_dir = {c[c.index("--output_dir") + 1]: c for c in cmds}
    assert "--overwrite" in by_dir[str(runs / "same_omniopd_ned-s0")]
    assert "--resume" in by_dir[str(runs / "same_opd-s0")]
    fresh = by_dir[str(runs / "same_sft-s0")]
    assert "--resume" not in fresh and "--overwrite" not in fresh


def test_table_api_arms_get_their_provider_and_restart_instead_of_resuming(tmp_path, monkeypatch):
    """--table_grid api: each arm gets its simulated provider's URL (started once per provider), and a killed
    endpoint arm starts over (server-side sampling cannot be replayed, and the URL changed) even with a checkpoint."""
    cmds, started = [], []

    class Done:
        returncode, stdout = 1, "x"

    monkeypatch.setattr(O.subprocess, "run", lambda cmd, **kw: cmds.append(cmd) or Done())
    monkeypatch.setattr(O, "write_table", lambda *a, **kw: "")
    monkeypatch.setattr(O, "provider_url", lambda servers, name: started.append(name) or f"http://fake/{name}/v1")
    args = O.parse_args(["--table", "--table_grid", "api", "--table_seeds", "0", "--output_dir", str(tmp_path)])
    killed = tmp_path / "runs" / "same_API_omniopd_ned_chat_assistant_continuation-s0"
    C.save_checkpoint(str(killed / "checkpoint"), step=40)
    (killed / "args.json").write_text("{}")
    O.run_table(args)
    base = {c[c.index("--output_dir") + 1]: c[c.index("--teacher_api_base") + 1] for c in cmds}
    assert sorted(base.values()) == ["http://fake/completions/v1", "http://fake/continue/v1", "http://fake/instruct/v1",
                                     "http://fake/instruct/v1"]
    again = [c for c in cmds if c[c.index("--output_dir") + 1] == str(killed)][0]
    assert "--overwrite" in again and "--resume" not in again
    assert sum("--method" in c for c in cmds) == 1  # the sft reference row

# ---- endpoint faults, as omniopd's teacher sees them (tests/fault_server.py) ------------------------


def _endpoint_args(url, timeout):
    return O.parse_args(["--teacher_api_base", url, "--teacher_api_model", "m", "--request_timeout", str(timeout),
                         "--output_dir", "x"])


def test_endpoint_survives_short_faults():
    from fault_server import FaultServer

    faults = ["429", "500", "bad_json", "fewer_choices", "truncated", "garbage_status", "close", "503"]
    with FaultServer(faults, retry_after=3600) as srv:  # Retry-After 3600 is capped, not obeyed
        llm = O.endpoint_teacher(_endpoint_args(srv.url, 20))
        llm.client.backoff = 0.05
        llm.client.max_retry_after = 0.1
        t = time.time()
        outs = O.teacher_continuations(llm, ["add 1=", "add 2="], ["01", "02"], 3, 1.0, "chars", 4)
        assert time.time() - t < 15
    assert [len(o) for o in outs] == [3, 3] and all(z == "03" for o in outs for z in o)  # cut to the chunk's 2 chars
    assert not srv.faults  # every fault was served


@pytest.mark.parametrize("fault,words", [("hang", "did not answer in time"), ("trickle", "did not answer in time"),
                                         ("404", "/v1/completions"), ("401", "API key"), ("500", "server error")])
def test_endpoint_faults_end_in_seconds_with_one_line(fault, words):
    from fault_server import FaultServer

    with FaultServer([], then=fault, trickle_bps=5) as srv:
        llm = O.endpoint_teacher(_endpoint_args(srv.url, 2.5))
        llm.client.backoff = 0.2
        t = time.time()
        with pytest.raises(C.EndpointError) as e:
            O.teacher_continuations(llm, ["add 1="], ["01"], 2, 1.0, "chars", 4)
        assert time.time() - t < 8, fault
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


# ---- chat-only teachers (issue 10): channels, echo cleaning, the start-up probe, cost accounting ------------


def _stub_cont(text: str, i: int) -> str:
    h = sum(ord(c) * (k + 1) for k, c in enumerate(text)) + 7 * i
    return "".join(str((h // 10 ** j) % 10) for j in range(6)) + ";"


class StubLM:
    """A deterministic text model for fault_server.ToyProvider: continuation i of text t is _stub_cont(t, i);
    1 character = 1 token; records every text it continued."""

    def __init__(self):
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.seen = []

    def complete(self, prompts, n=1, temperature=1.0, max_tokens=8, return_finish=False, **kw):
        self.seen += list(prompts)
        outs = [[_stub_cont(t, i)[:max_tokens] for i in range(n)] for t in prompts]
        self.usage["completion_tokens"] += sum(len(z) for o in outs for z in o)
        why = [["length" if len(_stub_cont(t, 0)) > max_tokens else "stop"] * n for t in prompts]
        return (outs, why) if return_finish else outs


def _provider(style, restate=False, strict=False, knows_probe=True):
    from fault_server import FaultServer, ToyProvider

    lm = StubLM()
    prov = ToyProvider(lm, style, restate=restate, strict=strict, knows_probe=knows_probe)  # no tokenizer: 1 char = 1 token
    return FaultServer(reply=prov, routes=prov.routes), lm


def _run_requests(srv):
    """The server's answered requests that were not the start-up probes."""
    def text(b):
        return b.get("prompt") or "".join(m["content"] for m in b.get("messages", []))
    return [q for q in srv.requests if q["fault"] == "ok" and "Say OK." not in text(q["body"])
            and O.PROBE_TASK not in text(q["body"])]


def test_clean_continuation_hand_cases():
    y = "033;358;"
    assert O.clean_continuation("033;358;886;", y) == ("886;", True)  # the whole partial restated
    assert O.clean_continuation("886;", y) == ("886;", False)  # a plain continuation is left alone
    assert O.clean_continuation("358;886;", y) == ("358;886;", False)  # 4 < 8 characters of overlap: kept
    assert O.clean_continuation("33;358;886;", "33;358;") == ("886;", True)  # 7 of 7 (< 8): the whole partial
    assert O.clean_continuation("3;358;886;", "33;358;") == ("3;358;886;", False)  # 6 of 7: not a restatement
    assert O.clean_continuation("8;1", "03;358") == ("8;1", False)  # "8" ends the partial, but 1 < 6 characters
    assert O.clean_continuation('"A B C D E F G H I"', "A B C D E F G") == (" H I", True)  # quoted
    assert O.clean_continuation("```\nA B C D E F G H\n```", "A B C D E F G") == (" H", True)  # fenced
    assert O.clean_continuation("Sure! Here is the continuation:\n H I J", "A B C D E F G") == (" H I J", False)
    assert O.clean_continuation("step 1: x = 2\nstep 2", "step 1: x = 2\n") == ("step 2", True)  # with its newline
    assert O.clean_continuation("Line one.Line two", "Line one.\n") == ("Line two", True)  # restated without the newline
    assert O.clean_continuation("anything", "") == ("anything", False)


def test_every_api_channel_sends_x_plus_prefix_and_returns_the_same_continuations():
    """The same deterministic model behind /v1/completions, chat continuing an assistant message (vLLM's
    fields; a strict native-prefill provider, so the fields are dropped after its 400), and the instruction
    fallback (restating or not): auto-detection picks each channel, the model continues exactly x + y[:t0],
    the continuations (cleaned) are identical, and the token counts equal hand totals."""
    prefixes = [O.Prefix("add 358=033;", "add 358=", "033;"), O.Prefix("add 358=033;358;", "add 358=", "033;358;"),
                O.Prefix("add 12=", "add 12=", "")]
    want = [[_stub_cont(str(p), i)[:4] for i in range(3)] for p in prefixes]
    line = "Continue this answer from where it stops, without repeating it:"
    # prompt tokens: the text of each request (hand counts); completion: 3 samples x 4 characters per prefix,
    # plus the restated partial (3 x (4 + 8 + 0) characters)
    prompt_hand = {"completions": 12 + 16 + 7, "continue": 12 + 16 + 7,
                   "instruct": (8 + 2 + len(line) + 1 + 4) + (8 + 2 + len(line) + 1 + 8) + 7}
    for style, restate, strict, mode in [("completions", False, False, "completions"),
                                         ("continue", False, False, "chat_continue"),
                                         ("prefill", False, True, "chat_continue"),
                                         ("instruct", True, False, "chat_instruct"),
                                         ("instruct", False, False, "chat_instruct")]:
        srv, lm = _provider(style, restate, strict)
        with srv:
            args = _endpoint_args(srv.url, 10)  # --teacher_api_mode auto
            api = O.resolve_teacher_api(args)
            assert api["mode"] == mode, (style, api)
            assert api["restates"] == restate and (api["extra_body"] is not None) == (style == "continue"), (style, api)
            llm = O.endpoint_teacher(args, api)
            w = {"llm": llm, "teacher_tokens": 0, "teacher_prompt_tokens": 0}
            with O.count_teacher_tokens(w):
                outs = O.teacher_continuations(llm, prefixes, ["358;", "886;", "011;"], 3, 1.0, "tokens", 4)
        assert outs == want, style
        seen = [t for t in lm.seen if t != "Say OK."]  # the route check of /v1/completions reaches the model
        assert sorted(seen) == sorted(str(p) for p in prefixes), style  # exactly x + y[:t0], nothing else
        reqs = sorted(_run_requests(srv), key=lambda q: len(json.dumps(q["body"])))
        assert len(reqs) == 3
        kind = "completions" if style == "completions" else "instruct" if style == "instruct" else "continue"
        assert w["teacher_prompt_tokens"] == prompt_hand[kind], style
        assert w["teacher_tokens"] == 36 + (36 if restate else 0), style
        bodies = {json.dumps(q["body"].get("messages", q["body"].get("prompt"))): q["body"] for q in reqs}
        if kind == "continue":
            b = bodies[json.dumps([{"role": "user", "content": "add 358="}, {"role": "assistant", "content": "033;358;"}])]
            assert b.get("continue_final_message") is (True if style == "continue" else None)
            assert b["max_tokens"] == 4
        if kind == "instruct":
            b = bodies[json.dumps([{"role": "user", "content": f"add 358=\n\n{line}\n033;358;"}])]
            assert b["max_tokens"] == 4 + (8 if restate else 0)  # a restating provider's tokens for the partial
            assert llm.echo == {"replies": 6, "stripped": 6 if restate else 0}
        if kind != "completions":  # a chunk at t0 = 0 (no partial): the plain question
            assert json.dumps([{"role": "user", "content": "add 12="}]) in bodies


def test_teacher_api_preflight_refuses_before_anything_loads(tmp_path, monkeypatch):
    """One line (UserError), nothing loaded, nothing written: a chat-only API with --teacher_api_mode
    completions, a model that continues nothing at the probe, an unknown model, a bad key; a forced
    chat style is taken as given."""
    from fault_server import FaultServer

    monkeypatch.setattr(C, "load_lm", lambda *a, **kw: pytest.fail("a model was loaded before the preflight passed"))

    def refused(url, flags, words):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        with pytest.raises(C.UserError) as e:
            O.main(O.parse_args(["--teacher_api_base", url, "--teacher_api_model", "m", "--request_timeout", "5",
                                 "--output_dir", str(out), *flags]))
        assert "\n" not in str(e.value) and all(w_ in str(e.value) for w_ in words), str(e.value)
        assert not out.exists()

    srv, _ = _provider("continue")
    with srv:
        refused(srv.url, ["--teacher_api_mode", "completions"], ["/v1/completions", "--teacher_api_mode chat"])
    srv, _ = _provider("instruct", knows_probe=False)  # the model writes digits whatever it is asked
    with srv:
        refused(srv.url, [], ["continues no partial answer", "chat_continue or chat_instruct"])
        api = O.resolve_teacher_api(_endpoint_args(srv.url, 5).__class__(**{**vars(_endpoint_args(srv.url, 5)),
                                                                          "teacher_api_mode": "chat_instruct"}))
        assert api["mode"] == "chat_instruct" and "forced" in api["note"]
        sft = O.resolve_teacher_api(O.parse_args(["--method", "sft", "--teacher_api_base", srv.url, "--teacher_api_model",
                                                  "m", "--output_dir", "x"]))
        assert sft["mode"] == "chat"  # sft needs whole replies only: no continuation probe
    with FaultServer([], then="404") as srv:  # neither route knows the model
        refused(srv.url, [], ["chat/completions", "no such route or model", "'m'"])
    with FaultServer([], then="401") as srv:
        refused(srv.url, [], ["API key"])
        assert len(srv.requests) == 1  # a bad key is not a missing route: chat is not tried


def test_chat_only_run_logs_its_mode_and_bills_prompt_and_completion_tokens(tmp_path, monkeypatch):
    """omniopd end to end (1 update) through a restating chat-only provider: summary.json names the
    resolved mode; teacher_tokens / teacher_prompt_tokens in metrics.jsonl and summary.json equal the sums
    the server billed; every restated reply was cleaned (teacher_echo 1)."""
    monkeypatch.setattr(O, "run_evals", lambda *a, **kw: {"acc_greedy": 0.25, "acc_sample": 0.5})
    monkeypatch.setattr(C, "plot_metrics", lambda *a, **kw: None)  # not under test here (~2 s)
    srv, lm = _provider("instruct", restate=True)
    out = tmp_path / "run"
    with srv:
        O.main(O.parse_args(["--teacher_api_base", srv.url, "--teacher_api_model", "m", "--max_steps", "1",
                             "--per_device_batch_size", "2", "--eval_size", "2", "--max_new_tokens", "8",
                             "--output_dir", str(out)]))
    s = json.loads((out / "summary.json").read_text())
    reqs = _run_requests(srv)
    assert s["teacher_api"]["mode"] == "chat_instruct" and s["teacher_api"]["restates"] is True
    assert s["teacher_prompt_tokens"] == sum(q["usage"]["prompt_tokens"] for q in reqs) > 0
    assert s["teacher_tokens"] == sum(q["usage"]["completion_tokens"] for q in reqs) > 0
    row = [r for r in C.read_jsonl(str(out / "metrics.jsonl")) if "loss" in r][0]
    assert row["teacher_prompt_tokens"] == s["teacher_prompt_tokens"] and row["teacher_tokens"] == s["teacher_tokens"]
    with_partial = [q for q in reqs if "\n\n" in q["body"]["messages"][-1]["content"]]
    assert with_partial  # T = 8, C = 4: every rollout has a chunk after its first token
    assert row["teacher_echo"] == 1.0
    assert all(t.startswith(q["body"]["messages"][-1]["content"].split(":\n", 1)[1]) for q in with_partial
               for t in q["texts"])  # the provider did restate: the client cleaned it


# slow: four whole runs (in one process) with the toy teacher behind the chat-only providers
@pytest.mark.slow
def test_chat_only_toy_teacher_end_to_end(tmp_path, capsys):
    """omniopd and sft, 2 updates each, through a chat-only API that continues a trailing assistant message
    and through one that does not (a restating instruction follower): the mode is found and logged, no
    /v1/completions request is answered, tokens are billed, and omniopd's cleaned continuations agree with
    the student's chunks (k > 0)."""
    from fault_server import FaultServer, ToyProvider

    teacher = C.LLM.from_hf(C.toy_checkpoint("teacher"), device="cpu")
    for style, method in [("continue", "omniopd"), ("instruct", "omniopd"), ("continue", "sft"), ("instruct", "sft")]:
        prov = ToyProvider(teacher, style, restate=style == "instruct")
        out = tmp_path / f"{style}-{method}"
        with FaultServer(reply=prov, routes=prov.routes) as srv:
            O.main(O.parse_args(["--teacher_api_base", srv.url, "--teacher_api_model", "toy-teacher", "--method", method,
                                 "--max_steps", "2", "--per_device_batch_size", "4", "--eval_size", "16",
                                 "--output_dir", str(out)]))
        printed = capsys.readouterr().out
        s = json.loads((out / "summary.json").read_text())
        want = "chat" if method == "sft" else {"continue": "chat_continue", "instruct": "chat_instruct"}[style]
        assert s["teacher_api"]["mode"] == want and f": {want}:" in printed, (style, method)
        assert s["teacher_tokens"] > 0 and s["teacher_prompt_tokens"] > 0 and "done in" in printed
        assert not any(q["route"] == "completions" and q["fault"] == "ok" for q in srv.requests)  # chat only
        if method == "omniopd":
            rows = [x for x in C.read_jsonl(str(out / "metrics.jsonl")) if "k_mean" in x]
            assert rows and all(x["k_mean"] > 0 for x in rows)  # cleaned continuations agree with the student's chunks


@pytest.mark.slow
def test_instruction_fallback_with_a_real_instruction_model(smollm2):
    """SmolLM2-135M-Instruct behind a chat server that opens a new turn after a trailing assistant message
    (common.serve_openai renders the real chat template): the probe finds no continuation, takes the
    instruction fallback, sees the model restate the beginning, and the cleaned reply continues the prefix."""
    server = C.serve_openai(C.LLM.from_hf(smollm2, device="cpu"), model_name="smollm2")
    try:
        args = O.parse_args(["--teacher_api_base", server.url, "--teacher_api_model", "smollm2", "--teacher_api_mode",
                             "chat", "--output_dir", "x"])
        api = O.resolve_teacher_api(args)
        assert api["mode"] == "chat_instruct" and api["restates"] is True, api
        llm = O.endpoint_teacher(args, api)
        p = O.Prefix(O.PROBE_TASK + O.PROBE_PARTIAL, O.PROBE_TASK, O.PROBE_PARTIAL)
        (reply,), = llm.complete([p], n=1, temperature=0.0, max_tokens=6)
    finally:
        server.shutdown()
    assert llm.echo == {"replies": 1, "stripped": 1}
    assert reply.lstrip().startswith("H I"), reply  # the alphabet goes on after G


# ---- slow: kill -9 + --resume, Ctrl-C on a hung endpoint, the real checkpoint ---------------------


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "time_per_step_s")}


def _untimed_rows(path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in C.read_jsonl(str(path))]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--anchor", "random"], ["--method", "sft"]])
def test_kill9_then_resume_reproduces_the_uninterrupted_run(tmp_path, flags):
    """kill -9 right after the first checkpoint, then --resume: the same summary.json (timings aside)
    and the same metrics.jsonl rows as one uninterrupted run (the rows the killed process wrote after its
    checkpoint are cut; usage counters cover both processes)."""
    common = ["--max_steps", "8", "--save_every", "2", "--per_device_batch_size", "4", "--eval_size", "8",
              "--eval_every", "4", *flags]
    r = _run([*common, "--output_dir", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "omniopd.py"), *common, "--output_dir", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    t = time.time()
    while C.find_checkpoint(str(out / "checkpoint")) is None and p.poll() is None and time.time() - t < 300:
        time.sleep(0.02)
    p.kill()
    p.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    steps = [row["step"] for row in C.read_jsonl(str(out / "metrics.jsonl"))]
    r = _run([*common, "--resume", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b"))
    assert _without_timing(a) == _without_timing(b)
    assert _untimed_rows(tmp_path / "a" / "metrics.jsonl") == _untimed_rows(out / "metrics.jsonl")
    assert max(steps) >= 2


@pytest.mark.slow
def test_ctrl_c_on_a_hung_endpoint_ends_with_one_line(tmp_path):
    from fault_server import FaultServer

    with FaultServer(["ok"], then="hang") as srv:  # the preflight passes, then the teacher hangs
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "omniopd.py"), "--teacher_api_base", srv.url,
                              "--teacher_api_model", "m", "--per_device_batch_size", "2", "--eval_size", "2",
                              "--output_dir", str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV, cwd=ROOT,
                             # a user's Ctrl-C even where this test runs as a background job (SIGINT inherited ignored)
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        t = time.time()
        while len(srv.requests) < 2 and p.poll() is None and time.time() - t < 300:
            time.sleep(0.05)
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        t = time.time()
        out, err = p.communicate(timeout=30)
    assert time.time() - t < 10 and p.returncode == 130, err[-1500:]
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("omniopd[")]
    assert len(lines) == 1 and "interrupted" in lines[0], err[-1500:]


@pytest.mark.slow
def test_real_checkpoint_two_updates(tmp_path, smollm2):
    """SmolLM2-135M-Instruct as student and teacher (opd and omniopd), 2 updates: the chat template is
    applied once, the loss is finite, the weights move, the checkpoint reloads with the same logits, and
    the per-phase time split is logged."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}? Answer with the number.", "answer": str(a + b)})
                            + "\n" for a, b in [(2, 3), (10, 7), (4, 4), (6, 1)]))
    for method, steps in (("opd", 3), ("omniopd", 2)):
        out = tmp_path / method
        r = _run(["--model_name_or_path", smollm2, "--teacher", smollm2, "--method", method, "--train_file", str(data),
                  "--eval_file", str(data), "--max_steps", str(steps), "--per_device_batch_size", "2",
                  "--max_new_tokens", "12", "--chunk_tokens", "4", "--num_chunks", "1", "--teacher_samples", "2",
                  "--eval_size", "2", "--eval_max_new_tokens", "8", "--learning_rate", "1e-5", "--output_dir", str(out)],
                 timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = C.read_jsonl(str(out / "metrics.jsonl"))
        train = [x for x in rows if "loss" in x]
        assert len(train) == steps and all(math.isfinite(x["loss"]) for x in train)
        assert all(x["time_generate"] > 0 and x["time_backward"] > 0 and x["time_optimizer"] > 0 for x in train)
        s = json.loads((out / "summary.json").read_text())
        assert set(O.PHASES) <= set(s["time_per_step_s"])
        if method == "opd":  # no pi_ref forward on the hot path: the diagnostic KL at step 0 and the last step only
            assert [("kl_ref" in x) for x in train] == [True, False, True]
        else:
            assert all("kl_ref" in x and "k_mean" in x for x in train)  # omniopd's loss uses the anchor every step
    model, tok = C.load_lm(str(tmp_path / "omniopd" / "checkpoint" / "model"))
    base, _ = C.load_lm(smollm2)
    text = O.render_prompts(tok, ["What is 2 + 3?"], True)[0]
    assert text.count("<|im_start|>user") == 1 and text.count("<|im_start|>assistant") == 1
    ids, mask = C.encode_prompts(tok, [text])
    with torch.no_grad():
        moved = (model(input_ids=ids, attention_mask=mask).logits - base(input_ids=ids, attention_mask=mask).logits)
    assert float(moved.abs().max()) > 0  # two updates at lr 1e-5 moved the weights
