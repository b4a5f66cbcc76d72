"""Tests of common.py: math against naive / independent references, sampling reproducibility,
the toy world, the endpoint client against real local HTTP servers, logging and checkpoints."""
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

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    model, tok = C.tiny_lm(n_layer=2, d_model=32, seed=0)
    return model.eval(), tok


# ---- log-probs --------------------------------------------------------------------------------


def _naive(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1], -1)
    lp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all, lp, ent


def test_token_logprobs_match_naive_and_are_chunk_invariant(tiny):
    model, tok = tiny
    ids, mask, _ = C.encode_pairs(tok, ["add 12=", "sub 9876="], ["011;123;=3", "099;"])
    _, lp_ref, ent_ref = _naive(model, ids, mask)
    for chunk in (1, 3, 512):
        lp, ent, kl = C.token_logprobs(model, ids, mask, return_entropy=True, chunk_size=chunk)
        assert lp.shape == ids.shape and (lp[:, 0] == 0).all()
        torch.testing.assert_close(lp[:, 1:], lp_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[:, 1:], ent_ref, atol=1e-5, rtol=0)
        assert kl is None


def test_token_logprobs_gradient_matches_naive(tiny):
    model, tok = tiny
    ids, mask, resp = C.encode_pairs(tok, ["add 12="], ["011;123;=3"])
    model.zero_grad()
    (C.token_logprobs(model, ids, mask, chunk_size=4) * resp).sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, lp_ref, _ = _naive(model, ids, mask)
    (lp_ref * resp[:, 1:]).sum().backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_token_logprobs_from_pos_and_head_checkpoint_change_no_value_or_gradient(tiny):
    """from_pos = P: the head runs on the positions predicting tokens P.. only; those columns (log-prob, entropy,
    KL) equal the naive full computation, the columns before P are 0, and the gradient of a loss on the response
    tokens is the naive one. Recomputing the head in backward (checkpoint_head) changes neither."""
    model, tok = tiny
    ref = C.tiny_lm(n_layer=2, d_model=32, seed=1)[0].eval()
    ids, mask, resp = C.encode_pairs(tok, ["add 12=", "sub 9876="], ["011;123;=3", "099;"])
    P = int(ids.shape[1] - resp.sum(1).max())  # the first response column (left padding)
    assert 1 < P < ids.shape[1] - 1
    logp_all, lp_ref, ent_ref = _naive(model, ids, mask)
    kl_ref = (torch.log_softmax(ref(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits[:, :-1], -1)
              .exp() * (torch.log_softmax(ref(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask))
                                          .logits[:, :-1], -1) - logp_all)).sum(-1).detach()
    model.zero_grad()
    (lp_ref[:, P - 1:] * resp[:, P:]).sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    for kw in (dict(from_pos=P), dict(from_pos=P, checkpoint_head=True), dict(checkpoint_head=False),
               dict(checkpoint_head=True), dict(from_pos=P, chunk_size=3)):
        model.zero_grad()
        lp, ent, kl = C.token_logprobs(model, ids, mask, return_entropy=True, ref_model=ref, **kw)
        start = kw.get("from_pos", 1)
        assert lp.shape == ids.shape and (lp[:, :start] == 0).all() and (ent[:, :start] == 0).all()
        torch.testing.assert_close(lp[:, start:], lp_ref[:, start - 1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[:, start:], ent_ref[:, start - 1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(kl[:, start:], kl_ref[:, start - 1:], atol=1e-5, rtol=0)
        (lp * resp).sum().backward()
        for a, p_ in zip(g_ref, model.parameters()):
            torch.testing.assert_close(p_.grad, a, atol=1e-5, rtol=1e-4)
    model.zero_grad()
    assert torch.equal(C.token_logprobs(model, ids, mask, from_pos=ids.shape[1] + 5), torch.zeros(ids.shape))


def test_head_checkpoint_only_above_the_memory_threshold(tiny, monkeypatch):
    """The head slices are recomputed in backward only when their fp32 activations would exceed
    HEAD_CHECKPOINT_VALUES (or when asked): below it the recompute buys nothing."""
    model, tok = tiny
    ids, mask, resp = C.encode_pairs(tok, ["add 12="], ["011;123;=3"])
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    C.token_logprobs(model, ids, mask).sum().backward()
    assert not calls
    monkeypatch.setattr(C, "HEAD_CHECKPOINT_VALUES", 10)
    C.token_logprobs(model, ids, mask).sum().backward()
    assert calls
    calls.clear()
    C.token_logprobs(model, ids, mask, checkpoint_head=False).sum().backward()
    assert not calls
    model.zero_grad()


def test_autocast_modes(monkeypatch):
    """auto: bf16 only on a CUDA GPU with bf16 in hardware (fp32 on CPU); bf16: on any device; fp32: never."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with C.autocast("cpu"):
        assert (a @ b).dtype == torch.float32
    with C.autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with C.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        C.autocast("cpu", "fp16")


def test_mean_std_cells():
    """Hand values: sample std by default ([1, 2, 4]: mean 2.333, sample std 1.528, population std 1.247), the value
    alone for one run, '-' for none, None / NaN left out."""
    assert C.mean_std([1, 2, 4]) == "2.333 ± 1.528"
    assert C.mean_std([1, 2, 4], ddof=0) == "2.333 ± 1.247"
    assert C.mean_std([0.5, None, float("nan"), 0.7], "{:.2f}") == "0.60 ± 0.14"
    assert C.mean_std([3], "{:.1f}") == "3.0" and C.mean_std([None]) == "-" and C.mean_std([]) == "-"


def test_phase_timer_accumulates_per_phase_and_take_resets():
    import time as _time

    timer = C.PhaseTimer("cpu", phases=("forward", "backward"))
    assert timer.seconds == {"forward": 0.0, "backward": 0.0}
    with timer("forward"):
        _time.sleep(0.02)
    with timer("forward"):
        _time.sleep(0.02)
    with pytest.raises(KeyError):
        with timer("other"):
            raise KeyError("x")  # the phase is charged even when it raises
    got = timer.take()
    assert got["forward"] >= 0.04 and got["backward"] == 0.0 and "other" in got
    assert timer.seconds == {"forward": 0.0, "backward": 0.0}


def test_token_kl_equals_torch_distributions(tiny):
    model, tok = tiny
    ref, _ = C.tiny_lm(n_layer=2, d_model=32, seed=1)
    ids, mask, _ = C.encode_pairs(tok, ["mul 23=", "add 5="], ["022;236;=6", "055;=5"])
    kl = C.token_kl(model, ref.eval(), ids, mask, chunk_size=5)
    p_logits = model(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits[:, :-1].float()
    r_logits = ref(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits[:, :-1].float()
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=r_logits),
                                             torch.distributions.Categorical(logits=p_logits))
    torch.testing.assert_close(kl[:, 1:], want, atol=1e-5, rtol=1e-4)
    assert C.token_kl(model, model, ids, mask).abs().max() < 1e-5  # KL(pi || pi) = 0


# ---- sampling ---------------------------------------------------------------------------------


def test_generate_logprobs_entropy_consistent_with_teacher_forcing(tiny):
    model, tok = tiny
    g = C.generate(model, tok, ["add 12=", "sub 98765="], max_new_tokens=12, temperature=1.0,
                   generator=torch.Generator().manual_seed(0), return_entropy=True)
    assert g.response_ids.shape == g.response_mask.shape == g.logprobs.shape == g.entropy.shape
    lp, ent, _ = C.token_logprobs(model, g.sequences, g.attention_mask, return_entropy=True)
    P, m = g.prompt_len, g.response_mask.bool()
    torch.testing.assert_close(lp[:, P:][m], g.logprobs[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(ent[:, P:][m], g.entropy[m], atol=1e-4, rtol=0)
    assert (g.logprobs[~m] == 0).all()


def test_generate_prefix_embeds_equal_the_same_tokens_as_ids(tiny):
    """prefix_embeds = the embeddings of each prompt's first k tokens samples exactly what those tokens as ids
    sample (same seed) in the same layout [k tokens, padding, rest of the prompt], through a dynamic and a static
    cache; the returned sequences / mask / prompt_len hold the token ids only; a zero prefix changes the result."""
    model, tok = tiny
    k, pad = 3, tok.pad_token_id
    rows = [C.encode_prompts(tok, [p])[0][0].tolist() for p in ("add 12+7=", "sub 98765-4321=")]
    L = max(len(r) - k for r in rows)
    tail = torch.tensor([[pad] * (L - len(r) + k) + r[k:] for r in rows])
    tail_mask = torch.tensor([[0] * (L - len(r) + k) + [1] * (len(r) - k) for r in rows])
    head = torch.tensor([r[:k] for r in rows])
    ref_ids, ref_mask = torch.cat([head, tail], 1), torch.cat([torch.ones_like(head), tail_mask], 1)
    assert (tail_mask == 0).any()  # the batch is left-padded
    pre = model.get_input_embeddings()(head).detach()
    for static in (False, True):
        kw = dict(max_new_tokens=8, temperature=1.0, static_cache=static, compile=False)
        want = C.generate(model, tok, input_ids=ref_ids, attention_mask=ref_mask,
                          generator=torch.Generator().manual_seed(3), **kw)
        got = C.generate(model, tok, input_ids=tail, attention_mask=tail_mask, prefix_embeds=pre,
                         generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(got.response_ids, want.response_ids) and got.texts == want.texts
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
        assert got.prompt_len == L and got.sequences.shape[1] == L + got.response_ids.shape[1]
        assert torch.equal(got.sequences[:, :L], tail) and torch.equal(got.attention_mask[:, :L], tail_mask)
        off = C.generate(model, tok, input_ids=tail, attention_mask=tail_mask, prefix_embeds=0 * pre,
                         generator=torch.Generator().manual_seed(3), **kw)
        assert not torch.allclose(off.logprobs, got.logprobs)  # the prefix is read


def test_generate_same_seed_same_tokens_other_seed_differs(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = C.generate(model, tok, ["add 1234="] * 4, generator=torch.Generator().manual_seed(7), **kw)
    b = C.generate(model, tok, ["add 1234="] * 4, generator=torch.Generator().manual_seed(7), **kw)
    c = C.generate(model, tok, ["add 1234="] * 4, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_greedy_generate_matches_hf_generate_and_static_cache(tiny):
    model, tok = tiny
    prompts = ["add 12=", "mul 9876="]  # different lengths: exercises left padding
    ours = C.generate(model, tok, prompts, max_new_tokens=10, temperature=0.0)
    ids, mask = C.encode_prompts(tok, prompts)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for i in range(2):  # HF pads after EOS with pad; compare up to our mask
        n = int(ours.response_mask[i].sum())
        assert ours.response_ids[i, :n].tolist() == hf[i, ids.shape[1]:ids.shape[1] + n].tolist()
    static = C.generate(model, tok, prompts, max_new_tokens=10, temperature=0.0, static_cache=True, compile=False)
    assert torch.equal(static.response_ids, ours.response_ids)
    torch.testing.assert_close(static.logprobs, ours.logprobs, atol=1e-5, rtol=0)


def test_response_mask_stops_at_eos_and_prompts_carry_no_eos():
    model, tok = C.load_lm(C.toy_checkpoint("teacher"))
    ids, _ = C.encode_prompts(tok, ["add 1="])
    assert tok.eos_token_id not in ids[0].tolist()  # ByT5 appends </s> when asked naively
    probs = [C.toy_problem(random.Random(i), "add", n_operands=2 + i) for i in range(5)]
    g = C.generate(model, tok, [p.prompt for p in probs], max_new_tokens=40, temperature=0.0)
    lengths = g.response_mask.sum(1).tolist()
    assert len(set(lengths)) == 5  # rows stopped at different steps
    for row, m, p, text, n in zip(g.response_ids, g.response_mask, probs, g.texts, lengths):
        assert m[:n].all() and not m[n:].any()  # a prefix of ones ...
        assert row[n - 1] == tok.eos_token_id  # ... whose last scored token is the EOS
        assert (row[n:] == tok.pad_token_id).all()
        assert text == C.toy_trace(p)  # the teacher writes the exact trace


def test_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(C._sample(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2, 3 are cut
    assert int(C._sample(logits, 0.0, 1.0, None)) == 0


# ---- models -----------------------------------------------------------------------------------


def test_tiny_lm_roundtrip_through_load_lm(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = C.load_lm(str(tmp_path))
    assert t2.padding_side == "left" and t2.pad_token_id is not None
    ids, mask = C.encode_prompts(t2, ["add 345="])
    torch.testing.assert_close(model(input_ids=ids).logits, m2(input_ids=ids).logits)


def test_bpe_tokenizer_differs_from_byte():
    _, byte_tok = C.tiny_lm(tokenizer="byte")
    _, bpe_tok = C.tiny_lm(tokenizer="bpe")
    text = "add 3582=033;358;886;862;=2"
    assert bpe_tok.decode(bpe_tok(text, add_special_tokens=False)["input_ids"]) == text
    bpe_ids = bpe_tok(text, add_special_tokens=False)["input_ids"]
    byte_ids = byte_tok(text, add_special_tokens=False)["input_ids"]
    assert len(bpe_ids) < len(byte_ids) == len(text)  # real merges: another segmentation, not only other ids
    assert bpe_tok.get_vocab() != byte_tok.get_vocab()


def test_bpe_tokenizer_words_never_spans_two_words():
    corpus = ["buy a red cotton shirt, size M, under $30", "results p1: [1] red cotton shirt $25 [back]"] * 50
    words = C.bpe_tokenizer(corpus, vocab_size=400, words=True)
    merged = C.bpe_tokenizer(corpus, vocab_size=400)
    text = "buy a red cotton shirt, size M"
    toks = words.tokenize(text)
    assert toks == ["buy", "Ġa", "Ġred", "Ġcotton", "Ġshirt", ",", "Ġsize", "ĠM"]  # whole words, one token each
    assert words.decode(words(text, add_special_tokens=False)["input_ids"]) == text
    assert any("Ġ" in t.strip("Ġ") for t in merged.tokenize(text))  # without the pre-split, merges span words


def test_load_lm_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(C.UserError, match="does not exist"):
        C.load_lm(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(C.UserError, match="cannot load model"):
        C.load_lm("nobody-xyz/not-a-model-123")
    r = subprocess.run([sys.executable, "-c", "import common\nwith common.exit_on_user_error(): common.load_lm('./missing_dir')"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr


# ---- toy world --------------------------------------------------------------------------------


def test_toy_trace_hand_cases():
    p = C.toy_problem(random.Random(0), "add", operands=[3, 5, 8, 2])
    assert p.prompt == "add 3582=" and p.answer == 8
    assert C.toy_trace(p) == "033;358;886;628;=8"  # s x r per step: 0+3=3, 3+5=8, 8+8=16->6, 6+2=8
    assert C.toy_trace(p, "xsr") == "303;538;886;268;=8"
    q = C.toy_problem(random.Random(0), "sub", operands=[3, 5])
    assert C.toy_trace(q) == "037;752;=2" and q.answer == 2  # 0-3 = -3 -> 7; 7-5 = 2
    m = C.toy_problem(random.Random(0), "mul", operands=[3, 4, 9])
    assert C.toy_trace(m) == "133;342;298;=8" and m.answer == 8  # mul starts at 1: 3, 12->2, 18->8


def test_carry_bug_is_systematic():
    p = C.toy_problem(random.Random(0), "add", operands=[5, 7], bug_prob=1.0)
    assert C.toy_trace(p) == "055;573;=3" and p.answer == 2  # 5+7=12 -> written 3; the true answer stays 2
    q = C.toy_problem(random.Random(0), "sub", operands=[3], bug_prob=1.0)
    assert C.toy_trace(q) == "038;=8" and q.answer == 7  # the borrow bug
    clean = C.toy_problem(random.Random(0), "add", operands=[1, 2], bug_prob=1.0)
    assert C.toy_trace(clean) == "011;123;=3"  # no carry, no bug


def test_extract_answer_and_is_correct():
    assert C.extract_answer("033;358;=8") == "8"
    assert C.extract_answer("no answer here") is None
    assert C.extract_answer(r"so \boxed{\frac{1}{2}} and = 3") == r"\frac{1}{2}"
    assert C.is_correct("011;123;=3", 3) and not C.is_correct("011;123;=4", 3)
    assert C.is_correct(r"\boxed{12.0}", "12") and not C.is_correct("", 0)


def test_toy_splits_are_disjoint_and_seeded():
    train = {p.prompt for p in C.toy_dataset("train", 3000, seed=0, domains=tuple(C.TOY_DOMAINS))}
    held = C.toy_dataset("id", 300, seed=0, domains=tuple(C.TOY_DOMAINS))
    ood = C.toy_dataset("ood", 100, seed=0)
    assert not train & {p.prompt for p in held + ood}
    assert all(3 <= len(p.operands) <= 6 for p in held) and all(len(p.operands) >= 7 for p in ood)
    assert [p.prompt for p in C.toy_dataset("id", 50, seed=3)] == [p.prompt for p in C.toy_dataset("id", 50, seed=3)]
    sample = C.toy_sample_fn({**C.TOY_ROLES["teacher"]})
    rng = random.Random(0)
    assert all(C.toy_split_of(sample(rng)[0]) == "train" for _ in range(500))


def test_switch_style_scores_only_teacher_format():
    rng = random.Random(0)
    fn = C.toy_sample_fn({"domains": {"add": (1.0, 0.0)}, "style": "switch"})
    for _ in range(50):
        prompt, resp, ctx = fn(rng)
        p = C.toy_problem(random.Random(0), "add", operands=[int(c) for c in prompt[4:-1]])
        assert resp[:ctx] == C.toy_trace(p, "sxr")[:ctx] and resp[ctx:] == C.toy_trace(p, "xsr")[ctx:]


def test_toy_checkpoints_meet_accuracy_targets():
    """The cached toy teacher is strong and the carry-bug student weak (built on first use)."""
    teacher, ttok = C.load_lm(C.toy_checkpoint("teacher"))
    student, stok = C.load_lm(C.toy_checkpoint("student"))
    probs = C.toy_dataset("id", 150, seed=5, domains=tuple(C.TOY_DOMAINS))
    assert C.evaluate_accuracy(teacher, ttok, probs) >= 0.95
    assert C.evaluate_accuracy(student, stok, probs) <= 0.40


# ---- endpoint client and LLM interface ---------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny):
    model, tok = tiny
    llm = C.LLM(model=model, tokenizer=tok, seed=0)
    server = C.serve_openai(llm, model_name="tiny")
    yield server
    server.shutdown()


def test_chat_client_against_real_server(served):
    client = C.ChatClient(served.url, "tiny", timeout=30)
    outs = client.complete("add 12=", n=3, temperature=1.0, max_tokens=8)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    chats = client.chat([{"role": "user", "content": "add 12="}], n=2, temperature=0.0, max_tokens=8)
    assert len(chats) == 2 and chats[0] == chats[1]  # greedy: identical
    assert client.usage["calls"] == 2 and client.usage["completion_tokens"] > 0
    llm = C.LLM.from_endpoint(served.url, "tiny")
    res = llm.complete(["add 1=", "sub 2=", "mul 3="], n=2, temperature=0.0, max_tokens=6)
    assert [len(r) for r in res] == [2, 2, 2]


def test_llm_local_and_endpoint_agree_greedy(tiny, served):
    model, tok = tiny
    local = C.LLM(model=model, tokenizer=tok)
    remote = C.LLM.from_endpoint(served.url, "tiny")
    prompts = ["add 1234=", "sub 56="]
    assert local.complete(prompts, temperature=0.0, max_tokens=10) == remote.complete(prompts, temperature=0.0, max_tokens=10)
    assert local.render_chat([{"role": "user", "content": "hi"}]) == "user: hi\nassistant: "
    local.reseed(3)
    a = local.complete(prompts, n=2, temperature=1.0, max_tokens=10)
    local.reseed(3)
    assert local.complete(prompts, n=2, temperature=1.0, max_tokens=10) == a


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 429 (with Retry-After) to the first request, then a valid completion."""
    calls = 0
    last_body = None

    def log_message(self, *a):
        pass

    def do_POST(self):
        type(self).last_body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        type(self).calls += 1
        if type(self).calls == 1:
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"choices": [{"index": 0, "text": "ok"}], "usage": {"completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Garbage(_Flaky):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).calls += 1
        body = b"<html>not json</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(handler):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_chat_client_retries_429_then_succeeds():
    srv, url = _serve(_Flaky)
    try:
        client = C.ChatClient(url, "m", backoff=0.01)
        assert client.complete("x", extra_body={"response_format": {"type": "json_object"}}) == ["ok"]
        assert _Flaky.calls == 2 and client.usage["retries"] == 1
        assert _Flaky.last_body["response_format"] == {"type": "json_object"} and _Flaky.last_body["prompt"] == "x"
    finally:
        srv.shutdown()


def test_chat_client_garbage_and_unreachable_raise_one_clear_error():
    _Garbage.calls = 0
    srv, url = _serve(_Garbage)
    try:
        client = C.ChatClient(url, "m", backoff=0.01, max_retries=2)
        with pytest.raises(C.EndpointError, match="malformed response"):
            client.complete("x")
        assert _Garbage.calls == 3
    finally:
        srv.shutdown()
    with socket_free_port() as port:
        client = C.ChatClient(f"http://127.0.0.1:{port}", "m", backoff=0.01, max_retries=1, timeout=2)
        with pytest.raises(C.EndpointError, match="nothing answers at .*2 tries.*start the server"):
            client.chat([{"role": "user", "content": "x"}])


class socket_free_port:
    def __enter__(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *a):
        return False


# ---- logging and checkpoints ------------------------------------------------------------------


def test_metric_logger_plot_and_resume(tmp_path):
    log = C.MetricLogger(str(tmp_path))
    for s in range(5):
        log.log(s, loss=torch.tensor(1.0 / (s + 1)), acc=s / 10)
    png = C.plot_metrics(str(tmp_path / "metrics.jsonl"), str(tmp_path / "m.png"), title="t")
    assert os.path.getsize(png) > 1000
    C.MetricLogger(str(tmp_path), resume_step=2)
    assert [r["step"] for r in C.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(C.UserError, match="bad.jsonl:2"):
        C.read_jsonl(str(tmp_path / "bad.jsonl"))


def test_checkpoint_roundtrip_restores_weights_optimizer_and_rng(tmp_path, tiny):
    model, tok = tiny
    m = C.tiny_lm(n_layer=1, d_model=16, seed=3)[0]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    head = torch.nn.Linear(3, 2)
    C.save_checkpoint(str(tmp_path / "ck"), m, tok, opt, step=7, extra={"best": 0.5}, modules={"head": head})
    after_save = torch.rand(3)
    m2 = C.tiny_lm(n_layer=1, d_model=16, seed=4)[0]
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    head2 = torch.nn.Linear(3, 2)
    state = C.load_checkpoint(str(tmp_path / "ck"), m2, opt2, modules={"head": head2})
    assert state["step"] == 7 and state["extra"] == {"best": 0.5}
    assert torch.equal(torch.rand(3), after_save)  # RNG restored to the save point
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(head.weight, head2.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    with pytest.raises(C.UserError, match="no checkpoint"):
        C.load_checkpoint(str(tmp_path / "missing"))


def test_cli_bad_role_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "common.py", "--roles", "wizard"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown toy role" in r.stderr


# ---- audit fixes: n top-up, finish reasons, stop ids, BOS, answers, server errors, URLs ------------


class _IgnoresN(http.server.BaseHTTPRequestHandler):
    """An Ollama-like server: one choice per request whatever `n` asks; records each request."""
    bodies: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        type(self).bodies.append(body)
        k = len(type(self).bodies)
        choice = ({"index": 0, "message": {"role": "assistant", "content": f"c{k}"}, "finish_reason": "length"}
                  if self.path.endswith("/chat/completions") else {"index": 0, "text": f"t{k}", "finish_reason": "stop"})
        out = json.dumps({"choices": [choice], "usage": {"completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def test_chat_client_tops_up_a_server_that_ignores_n():
    _IgnoresN.bodies = []
    srv, url = _serve(_IgnoresN)
    try:
        client = C.ChatClient(url, "m", backoff=0.01)
        assert client.complete("x", n=3, seed=5) == ["t1", "t2", "t3"]
        assert [b["n"] for b in _IgnoresN.bodies] == [3, 2, 1]  # asks only for the missing ones
        assert [b["seed"] for b in _IgnoresN.bodies] == [5, 6, 7]  # a top-up is not a replay of one seed
        texts, reasons = client.chat([{"role": "user", "content": "x"}], n=2, return_finish=True)
        assert texts == ["c4", "c5"] and reasons == ["length", "length"]
        _IgnoresN.bodies = []
        llm = C.LLM.from_endpoint(url, "m", max_workers=1)
        res = llm.complete(["a", "b"], n=4)
        assert [len(r) for r in res] == [4, 4] and len(_IgnoresN.bodies) == 8  # prompts and samples stay paired
        assert [b["prompt"] for b in _IgnoresN.bodies] == ["a"] * 4 + ["b"] * 4
        assert llm.last_finish_reasons == [["stop"] * 4] * 2
    finally:
        srv.shutdown()


def test_encode_pairs_no_eos_on_truncated_or_unfinished_rows(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    ids, mask, resp = C.encode_pairs(tok, ["p=", "p=", "p="], ["abcdef", "ab", "abc"], max_response_tokens=4,
                                     add_eos=[True, True, False])
    n = resp.sum(1).tolist()
    assert n == [4, 3, 3]  # cut at 4 (no EOS); "ab" + EOS; "abc" whose endpoint said "length" (no EOS)
    assert ids[0, -4:].tolist() == tok("abcd", add_special_tokens=False)["input_ids"]
    assert ids[1, -1] == eos and ids[2, -1] != eos and ids[0, -1] != eos
    # defaults unchanged: one bool for all rows, EOS on every row that was not cut
    _, _, r_all = C.encode_pairs(tok, ["p=", "p="], ["ab", "abcd"], max_response_tokens=4)
    assert r_all.sum(1).tolist() == [3, 5]
    _, _, r_none = C.encode_pairs(tok, ["p="], ["ab"], add_eos=False)
    assert r_none.sum().item() == 2
    with pytest.raises(ValueError, match="add_eos"):
        C.encode_pairs(tok, ["p="], ["ab"], add_eos=[True, False])


def test_finish_reasons_local_generate_llm_and_server():
    model, tok = C.load_lm(C.toy_checkpoint("teacher"))
    n_tok = len("011;123;=3") + 1  # the teacher writes this trace + EOS for "add 12="
    g = C.generate(model, tok, ["add 12=", "add 12="], max_new_tokens=n_tok, temperature=0.0)
    assert g.finish_reasons == ["stop", "stop"]  # EOS on the very last allowed step is still "stop"
    g = C.generate(model, tok, ["add 12="], max_new_tokens=n_tok - 1, temperature=0.0)
    assert g.finish_reasons == ["length"] and g.response_mask.sum() == n_tok - 1
    llm = C.LLM(model=model, tokenizer=tok)
    out, reasons = llm.complete(["add 12=", "add 345="], n=2, temperature=0.0, max_tokens=6, return_finish=True)
    assert reasons == [["length"] * 2] * 2 and llm.last_finish_reasons == reasons
    assert llm.complete(["add 12="], temperature=0.0, max_tokens=40) == [["011;123;=3"]]
    assert llm.last_finish_reasons == [["stop"]]
    server = C.serve_openai(llm, model_name="teacher")
    try:
        client = C.ChatClient(server.url, "teacher")
        assert client.complete("add 12=", n=2, temperature=0.0, max_tokens=4, return_finish=True)[1] == ["length"] * 2
        assert client.complete("add 12=", temperature=0.0, max_tokens=40, return_finish=True) == (["011;123;=3"], ["stop"])
        remote = C.LLM.from_endpoint(server.url, "teacher")
        texts, reasons = remote.complete(["add 12=", "add 345="], temperature=0.0, max_tokens=40, return_finish=True)
        assert reasons == [["stop"], ["stop"]] and texts == llm.complete(["add 12=", "add 345="], temperature=0.0, max_tokens=40)
    finally:
        server.shutdown()


def test_generate_stops_at_any_generation_config_eos():
    model, tok = C.tiny_lm(n_layer=2, d_model=32, seed=0)  # own copy: its generation_config is changed below
    model.eval()
    free = C.generate(model, tok, ["add 12="], max_new_tokens=12, temperature=0.0)
    row = free.response_ids[0].tolist()
    assert int(free.response_mask.sum()) == 12 and tok.eos_token_id not in row  # random model: no EOS in 12 steps
    k = next(i for i in range(1, 12) if row[i] not in row[:i])  # a token that first appears at step k >= 1
    model.generation_config.eos_token_id = [tok.eos_token_id, row[k]]
    g = C.generate(model, tok, ["add 12="], max_new_tokens=12, temperature=0.0)
    assert int(g.response_mask.sum()) == k + 1 and g.response_ids[0, :k + 1].tolist() == row[:k + 1]
    assert g.finish_reasons == ["stop"] and (g.response_ids[0, k + 1:] == tok.pad_token_id).all()
    ids, mask = C.encode_prompts(tok, ["add 12="])  # HF generate stops at the same place
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    assert hf[0, ids.shape[1]:].tolist() == row[:k + 1]
    model.generation_config.eos_token_id = row[k]  # an int; the tokenizer's EOS still counts too
    assert int(C.generate(model, tok, ["add 12="], max_new_tokens=12, temperature=0.0).response_mask.sum()) == k + 1


def _bos_tokenizer(adds_bos: bool = True):
    """A word-level fast tokenizer built in memory whose post-processor adds a BOS (as Llama-3's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def test_no_double_bos_when_text_starts_with_bos():
    tok = _bos_tokenizer()
    assert tok("<s>hello world")["input_ids"] == [1, 1, 4, 5]  # the defect: the tokenizer adds a second BOS
    assert C._encode_texts(tok, ["<s>hello world", "hello world", "<s><s>hello"]) == [[1, 4, 5], [1, 4, 5], [1, 1, 4]]
    ids, mask = C.encode_prompts(tok, ["<s>hello world", "world"])
    assert ids.tolist() == [[1, 4, 5], [0, 1, 5]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    ids, _, resp = C.encode_pairs(tok, ["<s>hello"], ["world"])
    assert ids.tolist() == [[1, 4, 5, 2]] and resp.tolist() == [[0, 0, 1, 1]]
    plain = _bos_tokenizer(adds_bos=False)  # a tokenizer that adds none: the text's own BOS is kept
    assert C._encode_texts(plain, ["<s>hello", "hello"]) == [[1, 4], [4]]
    # LLM's chat path: a template that writes the BOS itself (Llama-3, Gemma) -> one BOS in the model input
    from transformers import LlamaConfig, LlamaForCausalLM

    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                         bos_token_id=1)).eval()
    llm = C.LLM(model=model, tokenizer=tok)
    text = llm.render_chat([{"role": "user", "content": "hello world"}])
    assert text.startswith("<s>")
    g = C.generate(model, tok, [text], max_new_tokens=1, temperature=0.0)
    assert g.sequences[0, :g.prompt_len].tolist() == [1, 4, 5]


def test_extract_answer_keeps_decimals_and_thousands():
    assert C.extract_answer("x = 3.5") == "3.5"
    assert C.extract_answer("total = 1,234,567 apples") == "1234567"
    assert C.extract_answer("a = 2, so b = -0.25.") == "-0.25"  # the last '=', no trailing '.'
    assert C.extract_answer("033;358;=8") == "8"
    assert C.is_correct("x = 3.50", 3.5) and C.is_correct("= 1,000", "1000") and C.is_correct("=7", "7.0")
    assert not C.is_correct("x = 3.5", 3) and not C.is_correct("=8", 3)
    assert C.is_correct(r"\boxed{x+1}", "x+1") and not C.is_correct(r"\boxed{x+1}", "x+2")  # non-numbers: as text
    # toy answers are unaffected: every written trace reads back its own last result
    for p in C.toy_dataset("id", 200, seed=0, domains=tuple(C.TOY_DOMAINS)):
        t = C.toy_trace(p)
        assert C.extract_answer(t) == str(p.steps[-1][2]) and C.is_correct(t, p.answer)


def test_serve_openai_answers_bad_requests_with_400_and_failures_with_500(served):
    import urllib.error
    import urllib.request

    def post(url, body: bytes):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    for route, body in [("completions", b"not json"), ("completions", b'{"prompt": "x", "n": "many"}'),
                        ("completions", b'{"prompt": 5}'), ("completions", b"[1, 2]"),
                        ("completions", b'{"prompt": "x", "max_tokens": 0}'), ("completions", b'{"prompt": "x", "stop": 3}'),
                        ("chat/completions", b'{"messages": "hi"}'), ("chat/completions", b'{"messages": [{"role": "user"}]}')]:
        code, out = post(f"{served.url}/{route}", body)
        assert code == 400 and out["error"]["message"], (route, body)
    code, out = post(f"{served.url}/completions", b'{"prompt": "add 1=", "max_tokens": 2, "n": null}')
    assert code == 200 and len(out["choices"]) == 1  # the server is still up, and null means "not given"
    with pytest.raises(C.EndpointError, match="rejected the request"):  # a 400 is not retried
        C.ChatClient(served.url, "tiny").chat([{"role": "user", "content": None}])

    class Broken:
        usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}

        def complete(self, *a, **k):
            raise RuntimeError("model exploded")

    srv = C.serve_openai(Broken())
    try:
        code, out = post(f"{srv.url}/completions", b'{"prompt": "x"}')
        assert code == 500 and "model exploded" in out["error"]["message"]
    finally:
        srv.shutdown()


def test_chat_client_base_url_gets_v1_only_without_a_path():
    url = lambda u: C.ChatClient(u, "m").base_url  # noqa: E731
    assert url("http://localhost:8000") == url("http://localhost:8000/") == "http://localhost:8000/v1"
    assert url("http://localhost:8000/v1/") == "http://localhost:8000/v1"
    assert url("https://generativelanguage.googleapis.com/v1beta/openai/") == \
        "https://generativelanguage.googleapis.com/v1beta/openai"
    assert url("http://host/api/v2") == "http://host/api/v2"


def test_local_rank_wraps_around_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert C._local_cuda_index() == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert C._local_cuda_index() == 0


def test_token_logprobs_granite_logits_scaling_matches_model_forward():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, logits_scaling=8.0)).eval()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    _, lp_ref, ent_ref = _naive(model, ids, mask)  # Granite's forward divides its logits by logits_scaling
    lp, ent, _ = C.token_logprobs(model, ids, mask, return_entropy=True, chunk_size=5)
    torch.testing.assert_close(lp[:, 1:], lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[:, 1:], ent_ref, atol=1e-5, rtol=0)


def test_lm_head_runs_in_fp32_under_autocast(tiny):
    model, tok = tiny
    backbone, head = C.backbone_and_head(model)
    h = torch.randn(7, model.config.hidden_size)
    want = C.head_logits(model, head, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = C.head_logits(model, head, h)
        assert head(h).dtype == torch.bfloat16  # what the head would give under autocast
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_device_generator_is_the_given_one_on_its_own_device():
    g = torch.Generator().manual_seed(3)
    assert C.device_generator(g, torch.device("cpu")) is g and C.device_generator(None, torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_on_cuda_is_deterministic_and_samples_on_device(tiny):
    model, tok = tiny
    model = C.tiny_lm(n_layer=2, d_model=32, seed=0)[0].cuda().eval()
    kw = dict(max_new_tokens=16, temperature=1.0, static_cache=False, compile=False)
    a = C.generate(model, tok, ["add 1234="] * 4, generator=torch.Generator().manual_seed(7), **kw)
    b = C.generate(model, tok, ["add 1234="] * 4, generator=torch.Generator().manual_seed(7), **kw)
    c = C.generate(model, tok, ["add 1234="] * 4, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    g = torch.Generator().manual_seed(7)
    C.generate(model, tok, ["add 1="], generator=g, **kw)
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())  # one draw advanced it


def test_bf16_autocast_needs_native_support(monkeypatch):
    calls = []

    def fake(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # an emulating GPU: bf16 only "supported" through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)
    assert C._bf16_native() is False and calls == [False]
    assert isinstance(C.autocast("cpu"), type(C.contextlib.nullcontext()))


def test_load_lm_expands_home_and_encode_prompts_accepts_no_prompts(tmp_path, monkeypatch, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    m2, _ = C.load_lm("~/m")
    assert torch.equal(m2.lm_head.weight, model.lm_head.weight)
    ids, mask = C.encode_prompts(tok, [])
    assert ids.shape == mask.shape == (0, 1)
    ids, mask, resp = C.encode_pairs(tok, [], [])
    assert ids.shape == mask.shape == resp.shape == (0, 1)


# ---- distributed (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_on_combined_batch(tmp_path):
    script = os.path.join(ROOT, "tests", "ddp_step.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                          script, str(tmp_path / "two.pt")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    start = torch.load(tmp_path / "one.pt.init")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the step changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


# ---- runs: output-dir policy, resume refusal, checkpoint fallback, faults -----------------------
# Breakages these catch (each checked by breaking the line): start_run not refusing a finished run's dir,
# --overwrite not clearing it, a changed flag accepted on --resume (or an ignored one refused), args.json
# written on resume; find_checkpoint taking an incomplete (marker-less) newer save or ignoring .old / temp
# siblings; stale temp dirs not cleaned; a truncated state.pt giving a traceback; read_text_lines accepting
# invalid UTF-8; Ctrl-C printing a traceback; the client's deadline, Retry-After cap, trickle limit,
# transport-error retries and per-status advice.


def _ns(**kw):
    import argparse

    base = dict(output_dir="", resume=False, overwrite=False, lr=0.1, seed=0, workers=1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_start_run_refuses_finished_dir_and_resumes_only_the_same_run(tmp_path):
    out = str(tmp_path / "run")
    C.start_run(_ns(output_dir=out), has_checkpoint=False)
    assert json.load(open(os.path.join(out, "args.json")))["lr"] == 0.1
    open(os.path.join(out, "summary.json"), "w").write("{}")
    with pytest.raises(C.UserError, match="already holds a run"):
        C.start_run(_ns(output_dir=out), has_checkpoint=False)
    with pytest.raises(C.UserError, match="no checkpoint"):
        C.start_run(_ns(output_dir=out, resume=True), has_checkpoint=False)
    with pytest.raises(C.UserError, match=r"--lr 0.1 -> 0.2"):
        C.start_run(_ns(output_dir=out, resume=True, lr=0.2), has_checkpoint=True)
    C.start_run(_ns(output_dir=out, resume=True, workers=4), has_checkpoint=True, ignore=("workers",))
    with pytest.raises(C.UserError, match="--workers 1 -> 4"):
        C.start_run(_ns(output_dir=out, resume=True, workers=4), has_checkpoint=True)
    assert json.load(open(os.path.join(out, "args.json")))["workers"] == 1  # resume keeps the original
    with pytest.raises(C.UserError, match="exclude each other"):
        C.start_run(_ns(output_dir=out, resume=True, overwrite=True), has_checkpoint=True)
    C.start_run(_ns(output_dir=out, overwrite=True, lr=0.3), has_checkpoint=False)
    assert sorted(os.listdir(out)) == ["args.json"] and json.load(open(os.path.join(out, "args.json")))["lr"] == 0.3
    with pytest.raises(C.UserError, match="holds no run"):
        C.start_run(_ns(output_dir=str(tmp_path / "empty"), resume=True), has_checkpoint=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(C.UserError, match="is a file"):
        C.start_run(_ns(output_dir=str(tmp_path / "afile")), has_checkpoint=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_start_run_refuses_unwritable_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(C.UserError, match="not writable"):
            C.start_run(_ns(output_dir=str(ro / "run")), has_checkpoint=False)
    finally:
        ro.chmod(0o700)


def test_checkpoint_falls_back_to_the_last_complete_save(tmp_path):
    ck = str(tmp_path / "checkpoint")
    C.save_checkpoint(ck, step=1, extra={"v": 1})
    C.save_checkpoint(ck, step=2, extra={"v": 2})
    assert C.load_checkpoint(ck)["extra"] == {"v": 2} and not os.path.exists(ck + ".old")
    # a kill mid-save: the newer temp dir has no marker, the old one was moved aside -> the old one is used
    os.replace(ck, ck + ".old")
    os.makedirs(ck + ".tmp999")
    torch.save({"step": 3}, os.path.join(ck + ".tmp999", "state.pt"))
    assert C.find_checkpoint(ck) == ck + ".old" and C.load_checkpoint(ck)["step"] == 2
    # a kill after the marker, before the rename: the complete temp dir is the newest
    C.save_checkpoint(str(tmp_path / "other"), step=5)
    os.replace(str(tmp_path / "other"), ck + ".tmp1000")
    assert C.find_checkpoint(ck) == ck + ".tmp1000" and C.load_checkpoint(ck)["step"] == 5
    C.save_checkpoint(ck, step=6)  # the next save cleans the debris and keeps one checkpoint
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and C.load_checkpoint(ck)["step"] == 6
    with open(os.path.join(ck, "state.pt"), "r+b") as f:
        f.truncate(50)
    with pytest.raises(C.UserError, match="state.pt' is corrupt"):
        C.load_checkpoint(ck)
    assert C.find_checkpoint(str(tmp_path / "none")) is None


def test_read_text_lines_names_the_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": "\xff"}\n')
    with pytest.raises(C.UserError, match=r"d.jsonl:3: not valid UTF-8"):
        C.read_text_lines(str(p))
    with pytest.raises(C.UserError, match="cannot read data file"):
        C.read_text_lines(str(tmp_path / "missing.jsonl"))
    p.write_text("x\ny\n")
    assert C.read_text_lines(str(p)) == ["x", "y"]


def test_ctrl_c_ends_with_one_line_naming_the_last_checkpoint(tmp_path):
    # the handler Python installs when SIGINT is not ignored (a job started with `&` by a non-interactive shell,
    # as CI may run us, inherits SIGINT ignored, and Python then keeps it ignored)
    code = ("import os, signal, sys; sys.path.insert(0, %r); import common as C\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "with C.exit_on_user_error():\n"
            "    C.save_checkpoint(%r, step=4)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    import time; time.sleep(5)\n") % (ROOT, str(tmp_path / "ck"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "step 4" in r.stderr and "--resume" in r.stderr


class _RawServer:
    """A socket server that answers each connection with `script(conn)`: for faults http.server
    cannot produce (a garbage status line, a body cut short, a trickle, a hang)."""

    def __init__(self, script):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.calls = 0
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.script = script
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.calls += 1
            threading.Thread(target=self._handle, args=(conn, self.calls), daemon=True).start()

    def _handle(self, conn, k):
        try:
            conn.recv(65536)
            self.script(conn, k)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


_OK = json.dumps({"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}).encode()


def _http(status: str, body: bytes, headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


@pytest.mark.parametrize("fault", ["garbage_status", "truncated_body"])
def test_chat_client_retries_transport_errors(fault):
    def script(conn, k):
        if k == 1:
            conn.sendall(b"HELLO THERE\r\n\r\n" if fault == "garbage_status"
                         else _http("200 OK", _OK)[:-10])
        else:
            conn.sendall(_http("200 OK", _OK))

    srv = _RawServer(script)
    try:
        client = C.ChatClient(srv.url, "m", backoff=0.01, timeout=5)
        assert client.complete("x") == ["ok"] and srv.calls == 2 and client.usage["retries"] == 1
    finally:
        srv.close()


def test_chat_client_deadline_ends_a_hung_or_trickling_server_in_seconds():
    import time

    def hang(conn, k):
        time.sleep(30)

    def trickle(conn, k):
        msg = _http("200 OK", _OK)
        for i in range(len(msg)):
            conn.sendall(msg[i:i + 1])
            time.sleep(0.3)

    for script, pattern in ((hang, "did not answer in time"), (trickle, "did not answer in time")):
        srv = _RawServer(script)
        try:
            client = C.ChatClient(srv.url, "m", backoff=0.01, timeout=0.5, deadline=1.2, max_retries=10)
            t0 = time.time()
            with pytest.raises(C.EndpointError, match=pattern):
                client.complete("x")
            assert time.time() - t0 < 4
        finally:
            srv.close()


def test_chat_client_caps_retry_after_and_names_each_status():
    import time

    def limited(conn, k):
        conn.sendall(_http("429 Too Many Requests", b"slow down", "Retry-After: 3600\r\n") if k == 1
                     else _http("200 OK", _OK))

    srv = _RawServer(limited)
    try:
        t0 = time.time()
        client = C.ChatClient(srv.url, "m", backoff=0.01, max_retry_after=0.5)
        assert client.complete("x") == ["ok"] and 0.4 < time.time() - t0 < 5
    finally:
        srv.close()
    for status, pattern in (("401 Unauthorized", "API key"), ("404 Not Found", "no such route or model"),
                            ("429 Too Many Requests", "kept rate-limiting"), ("503 Busy", "server error")):
        srv = _RawServer(lambda conn, k, s=status: conn.sendall(_http(s, b"{}")))
        try:
            client = C.ChatClient(srv.url, "m", backoff=0.01, max_retries=1)
            with pytest.raises(C.EndpointError, match=pattern):
                client.complete("x")
        finally:
            srv.close()


def test_preflight_model_refuses_missing_and_weightless_folders(tmp_path):
    with pytest.raises(C.UserError, match="does not exist"):
        C.preflight_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.UserError, match="not a loadable model"):
        C.preflight_model(str(tmp_path / "empty"))
