"""Tests of spd.py: the projector (Eq. 12) against hand values and the SVD route, folding (Eq. 13) against
hooks, gradient capture and the calibration grams against a plain per-example reference, the span and
Eq. (14) masks, LoRA, one full SFT update against an independent reference, the SSD filter, sampling
settings, every arm-defining flag, validation / resume refusals, the table's aggregation, a smoke run;
slow: kill -9 + resume, multi-seed table, torchrun with 2 CPU processes, the real SmolLM2 checkpoint.

Breakages these tests catch (each made in a copy of spd.py, one at a time, and watched failing: 33 of 33):
  - gradient_projector: top and bottom swapped -> test_projector_hand_values, test_svd_route_equals_eigen_route
  - block_projector: per-head rank not divided by the heads -> test_block_projector_per_head
  - fold_projection: the bias left unprojected; projected_kv: original weights not restored on exit
    -> test_fold_matches_hook_and_restores
  - kv_gradient_rows: padded positions kept, only span rows kept -> test_gradient_capture_rows_and_causality
  - encode_calibration: span shifted one token (loss on the wrong positions) -> test_span_mask_hand_example,
    test_calibration_grams_match_plain_reference
  - calibration_grams: a batch skipped, G G^T instead of G^T G -> test_calibration_grams_match_plain_reference
  - toy_span_chars: the step's s instead of r, the final answer left out -> test_span_mask_hand_example
  - sft_loss_mask: the row's first token scored, prompt tokens kept with --loss_on completion
    -> test_eq14_mask_hand_values, test_sft_step_matches_plain_reference
  - sft_step: a per-row instead of per-token mean, the lr schedule ignored, clipping dropped
    -> test_sft_step_matches_plain_reference
  - LoRALinear: B initialised non-zero, scale r / alpha -> test_lora_zero_init_and_merge
  - ssd_keep: empty outputs kept, the longest dropped -> test_ssd_keep_hand_values
  - sampling_of: self_train sampled with ssd's settings (pitfall 8) -> test_sampling_settings_and_top_k
  - flags read nowhere: the projection not used in sampling, --subspace, --per_head, --proj_layers, --rank,
    --ssd_drop_shortest ignored; run_evals ignoring its projectors -> test_every_arm_flag_changes_the_result;
    main evaluating --decode_only unprojected -> test_smoke_run_and_resume_refusals
  - validation / preflight checks removed (--subspace with another method; rank above d_kv)
    -> test_validation_refuses_bad_input, test_preflight_refuses_bad_data_and_dims
  - table std with ddof 0 -> test_table_aggregation_hand_values; math checker reading the first number
    -> test_answer_checkers
(Replacing G^T G by (G^T G)^2 passes: it has the same eigenvectors, an equivalent change.)
"""
import copy
import json
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
import spd as S  # noqa: E402
from conftest import run_cli  # noqa: E402

torch.set_num_threads(1)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NANOPAPERS_THREADS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny():
    model, tok = C.tiny_lm(n_layer=4, d_model=16, n_head=4, seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A tiny 4-layer HF checkpoint on disk (the real-model path of spd.py, in seconds)."""
    d = str(tmp_path_factory.mktemp("tiny"))
    model, tok = C.tiny_lm(n_layer=4, d_model=16, n_head=4, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _args(path, *extra):
    return S.parse_args(["--model_name_or_path", path, "--n_calib", "6", "--n_train_prompts", "12", "--eval_size", "8",
                         "--max_new_tokens", "10", "--num_train_epochs", "1", "--per_device_batch_size", "4", *extra])


# ---- Eq. (12): the projector ---------------------------------------------------------------------


def test_projector_hand_values():
    G = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64))  # rows along e1..e4
    gram = G.T @ G
    P = S.gradient_projector(gram, 2, "top")
    torch.testing.assert_close(P, torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)), atol=1e-12, rtol=0)
    Pb = S.gradient_projector(gram, 2, "bottom")
    torch.testing.assert_close(Pb, torch.diag(torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)), atol=1e-12, rtol=0)
    for kind in ("top", "bottom", "random"):
        for r in (1, 3):
            Q = S.gradient_projector(gram, r, kind, torch.Generator().manual_seed(1))
            torch.testing.assert_close(Q, Q.T, atol=1e-12, rtol=0)  # symmetric
            torch.testing.assert_close(Q @ Q, Q, atol=1e-10, rtol=0)  # idempotent
            assert abs(float(torch.trace(Q)) - r) < 1e-10 and int(torch.linalg.matrix_rank(Q)) == r
    assert S.captured_energy(gram, P) == pytest.approx((25 + 9) / (25 + 9 + 1 + 0.25))


def test_svd_route_equals_eigen_route():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(40, 8, generator=g, dtype=torch.float64) * torch.linspace(3, 0.2, 8, dtype=torch.float64)
    _, _, Vh = torch.linalg.svd(G, full_matrices=False)  # rows of Vh: right singular vectors, descending
    for r in (1, 3, 5):
        want = Vh[:r].T @ Vh[:r]
        assert (S.gradient_projector(G.T @ G, r, "top") - want).abs().max() < 1e-6
        wantb = Vh[-r:].T @ Vh[-r:]
        assert (S.gradient_projector(G.T @ G, r, "bottom") - wantb).abs().max() < 1e-6


def test_block_projector_per_head():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(30, 8, generator=g, dtype=torch.float64)
    P = S.block_projector(G.T @ G, 4, n_heads=2)
    assert P[:4, 4:].abs().max() == 0 and P[4:, :4].abs().max() == 0
    for s in (slice(0, 4), slice(4, 8)):
        blk = G[:, s]
        _, _, Vh = torch.linalg.svd(blk, full_matrices=False)
        assert (P[s, s] - Vh[:2].T @ Vh[:2]).abs().max() < 1e-8  # rank 4 / 2 heads = 2 per head
    assert abs(float(torch.trace(P)) - 4) < 1e-10


# ---- Eq. (13): folding -----------------------------------------------------------------------------


def _biased_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, max_position_embeddings=64)  # GQA, biased k/v
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for l in m.model.layers:
            l.self_attn.k_proj.bias.normal_()
            l.self_attn.v_proj.bias.normal_()
    return m


def test_fold_matches_hook_and_restores():
    m = _biased_llama()
    d_kv = m.model.layers[0].self_attn.k_proj.out_features
    assert d_kv == 2 * 4  # kv heads x head_dim, not hidden_size (pitfall 7)
    g = torch.Generator().manual_seed(0)
    Ps = {n: S.gradient_projector(torch.eye(d_kv, dtype=torch.float64), 4, "random", g) for n in ("1.k", "1.v", "2.k", "2.v")}
    ids = torch.randint(0, 50, (2, 7), generator=g)
    orig = m(input_ids=ids).logits.detach().clone()
    mods = S.kv_modules(m, [1, 2])
    handles = [mods[n].register_forward_hook(lambda mod, i, o, P=P: o @ P.to(o.dtype)) for n, P in Ps.items()]
    hooked = m(input_ids=ids).logits.detach()
    for h in handles:
        h.remove()
    with S.projected_kv(m, Ps):
        folded = m(input_ids=ids).logits.detach()
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=0)
    assert (folded - orig).abs().max() > 1e-3  # the projection does something
    assert torch.equal(m(input_ids=ids).logits.detach(), orig)  # exact restore
    lin = mods["1.k"]
    x = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(S.fold_projection(lin, Ps["1.k"])(x), lin(x) @ Ps["1.k"].float(), atol=1e-6, rtol=0)


# ---- Eq. (11) and gradient capture ----------------------------------------------------------------


def test_span_mask_hand_example(tiny):
    _, tok = tiny
    trace = "011;123;=3"
    assert S.toy_span_chars(trace) == [c in (2, 6, 9) for c in range(len(trace))]
    assert S.span_mask([(0, 1), (1, 3), (3, 4)], [False, False, True, False]).tolist() == [False, True, False]
    ex = S.Example("add 12=", trace, S.toy_span_chars(trace))
    ex2 = S.Example("add 5=", "055;=5", S.toy_span_chars("055;=5"))
    ids, attn, span = S.encode_calibration(tok, [ex, ex2], chat=False)
    L = ids.shape[1]
    assert L == len("add 12=") + len(trace)
    row0 = "add 12=" + trace
    assert [row0[j] for j in range(L) if span[0, j]] == ["1", "3", "3"]  # result digits + the answer only
    assert span[0].nonzero().flatten().tolist() == [7 + 2, 7 + 6, 7 + 9]
    pad = L - len("add 5=055;=5")
    assert span[1].nonzero().flatten().tolist() == [pad + 6 + 2, pad + 6 + 5]
    assert not span[1, :pad].any() and attn[1, :pad].sum() == 0


def test_gradient_capture_rows_and_causality(tiny):
    model, tok = tiny
    exs = [S.Example("add 12=", "011;123;=3", S.toy_span_chars("011;123;=3")),
           S.Example("add 5=", "055;=5", S.toy_span_chars("055;=5"))]
    ids, attn, span = S.encode_calibration(tok, exs, chat=False)
    mods = S.kv_modules(model, [1, 3])
    rows, loss = S.kv_gradient_rows(model, mods, ids, attn, span)
    assert all(r.shape == (int(attn.sum()), 16) for r in rows.values())  # sum of sequence lengths
    L = ids.shape[1]
    for n, r in rows.items():
        # row 0 has no padding: its rows are rows[:L]; the last span token is the last position
        last = int(span[0].nonzero().max())
        assert r[last:L].abs().max() == 0  # from the last span token's position on: exactly zero (causality)
        assert r[:7].abs().sum(-1).min() > 0  # every prompt position of row 0 carries gradient
    assert float(loss) > 0
    assert all(p.grad is None for p in model.parameters())  # weights untouched


def _plain_grams(model, tok, exs, layers):
    """Reference: one unpadded example at a time; a zero per-position parameter added to each k/v output."""
    m = copy.deepcopy(model)
    grams = {}

    class Delta(torch.nn.Module):
        def __init__(self, lin, T):
            super().__init__()
            self.lin, self.delta = lin, torch.nn.Parameter(torch.zeros(T, lin.out_features))

        def forward(self, x):
            return self.lin(x) + self.delta

    for ex in exs:
        p_ids = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        T = ids.shape[1]
        deltas = {}
        for l in layers:
            att = m.model.layers[l].self_attn
            for kind in ("k", "v"):
                base = getattr(att, f"{kind}_proj")
                base = base.lin if isinstance(base, Delta) else base
                d = Delta(base, T)
                setattr(att, f"{kind}_proj", d)
                deltas[f"{l}.{kind}"] = d.delta
        logits = m(input_ids=ids).logits[0]
        loss = 0.0
        for j, ch in enumerate(ex.answer):  # byte tokenizer: answer char j is token len(p_ids) + j
            is_result = (j < len(ex.answer) - 2 and j % 4 == 2) or j == len(ex.answer) - 1
            if is_result:
                t = len(p_ids) + j
                loss = loss - torch.log_softmax(logits[t - 1], -1)[ids[0, t]]
        loss.backward()
        for n, d in deltas.items():
            g = d.grad.double()
            grams[n] = grams.get(n, 0) + g.T @ g
    return grams


def test_calibration_grams_match_plain_reference(tiny):
    model, tok = tiny
    exs = S.toy_examples("train", 5, 4, "t", with_span=True) + S.toy_examples("train", 2, 2, "u", with_span=True)
    grams, stats = S.calibration_grams(model, tok, exs, [1, 3], chat=False, batch_size=3)
    want = _plain_grams(model, tok, exs, [1, 3])
    for n in want:
        torch.testing.assert_close(grams[n], want[n], rtol=1e-5, atol=1e-9)
    lens = [len(e.prompt) + len(e.answer) for e in exs]
    assert stats["calib_rows"] == sum(lens)
    assert stats["calib_span_tokens"] == 5 * (4 + 1) + 2 * (2 + 1)  # K result digits + the answer per example


# ---- Eq. (14), LoRA, one SFT update -----------------------------------------------------------------


def test_eq14_mask_hand_values():
    m_all = S.sft_loss_mask([2, 3], [2, 1], 5, "all")
    assert m_all.long().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]  # prompt + completion, minus the first token
    m_c = S.sft_loss_mask([2, 3], [2, 1], 5, "completion")
    assert m_c.long().tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    m_pad = S.sft_loss_mask([1, 2], [1, 1], 4, "all")
    assert m_pad.long().tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -4.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert float(S.sft_loss(logp, mask)) == pytest.approx(7 / 3)
    assert float(S.sft_loss(logp, mask, 10.0)) == pytest.approx(0.7)


def test_lora_zero_init_and_merge():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    lora = S.LoRALinear(lin, r=2, alpha=8.0, dropout=0.0, generator=g).eval()
    x = torch.randn(3, 6, generator=g)
    assert torch.equal(lora(x), lin(x))  # B = 0: nothing changes
    with torch.no_grad():
        lora.lora_B.normal_(generator=g)
    merged = lora.merged()
    torch.testing.assert_close(merged.weight, lin.weight + 4.0 * lora.lora_B @ lora.lora_A)  # alpha / r = 4
    torch.testing.assert_close(merged(x), lora(x), atol=1e-6, rtol=0)
    assert not lin.weight.requires_grad and lora.lora_A.requires_grad


def test_sft_step_matches_plain_reference(tiny):
    """One full update of the file (left-padded batch, token_logprobs, Eq. 14, clip, AdamW at the cosine lr)
    against a reference: each row alone, W + s B A written out, loops over tokens."""
    model0, tok = tiny
    rows = [dict(prompt_ids=[10, 11, 12], response_ids=[13, 14]), dict(prompt_ids=[20, 21], response_ids=[22, 23, 24, 25]),
            dict(prompt_ids=[30, 31, 32, 33], response_ids=[34])]
    for loss_on in ("all", "completion"):
        args = S.parse_args(["--lora_r", "2", "--lora_alpha", "4", "--lora_dropout", "0", "--learning_rate", "0.05",
                             "--max_grad_norm", "0.05", "--loss_on", loss_on])
        model = copy.deepcopy(model0)
        params = S.add_lora(model, ["q_proj", "v_proj"], 2, 4.0, 0.0, seed=0)
        with torch.no_grad():
            for k, p in params.items():
                if k.endswith("__B"):
                    p.normal_(generator=torch.Generator().manual_seed(len(k)))
        start = {k: p.detach().clone() for k, p in params.items()}
        opt = torch.optim.AdamW(list(params.values()), lr=args.learning_rate, weight_decay=args.weight_decay)
        m = S.sft_step(model.train(), params, opt, rows, args, step=1, total=4, pad_id=tok.pad_token_id)

        # reference
        ref = copy.deepcopy(model0)
        leaves = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        names = sorted({k.rsplit("__", 1)[0] for k in leaves})
        tot, n_tok = 0.0, 0
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            over = {}
            for n in names:
                W = ref.get_submodule(n.replace("__", ".")).weight
                over[n.replace("__", ".") + ".weight"] = W + 2.0 * leaves[n + "__B"] @ leaves[n + "__A"]
            logits = torch.func.functional_call(ref, over, (ids,)).logits[0]
            first = 1 if loss_on == "all" else len(r["prompt_ids"])
            for t in range(first, ids.shape[1]):
                tot = tot - torch.log_softmax(logits[t - 1], -1)[ids[0, t]]
                n_tok += 1
        loss = tot / n_tok
        assert m["loss"] == pytest.approx(float(loss.detach()), rel=1e-5) and m["tokens"] == n_tok
        loss.backward()
        ps = [leaves[k] for k in params.keys()]
        gn = torch.nn.utils.clip_grad_norm_(ps, args.max_grad_norm)
        assert m["grad_norm"] == pytest.approx(float(gn), rel=1e-4)
        lr = args.learning_rate * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item())  # cosine at step 1 of 4
        assert m["lr"] == pytest.approx(lr)
        for k, p in params.items():  # the clipped gradients the file stepped with
            torch.testing.assert_close(p.grad, leaves[k].grad, atol=1e-7, rtol=1e-4)
        ropt = torch.optim.AdamW(ps, lr=lr, weight_decay=args.weight_decay)
        ropt.step()
        for k, p in params.items():  # (Adam's first step is ~lr * sign(g): entries with |g| ~ eps may differ a little)
            torch.testing.assert_close(p.detach(), leaves[k].detach(), atol=lr * 0.01, rtol=0)
        assert any((params[k] - start[k]).abs().max() > 1e-4 for k in params)


def test_ssd_keep_hand_values():
    texts = ["a", "", "bbb", "cc", "  ", "dddd", "e", "ff", "ggg", "hh", "i", "jjjj"]
    lens = [len(t) for t in texts]
    # 10 non-empty, floor(0.1 * 10) = 1 dropped: the shortest, earliest first -> index 0 ("a")
    assert S.ssd_keep(texts, lens, 0.1) == [2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert S.ssd_keep(texts, lens, 0.3) == [2, 3, 5, 7, 8, 9, 11]  # 3 dropped: "a", "e", "i"
    assert S.ssd_keep(texts, lens, 0.0) == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11]


def test_cosine_lr():
    assert S.cosine_lr(0, 10, 1.0) == 1.0 and S.cosine_lr(5, 10, 1.0) == pytest.approx(0.5)
    assert S.cosine_lr(10, 10, 2.0) == pytest.approx(0.0, abs=1e-12)


def test_sampling_settings_and_top_k(tiny):
    model, tok = tiny
    a = S.parse_args([])
    assert S.sampling_of(a, "spd") == S.sampling_of(a, "self_train") == dict(temperature=1.0, top_p=1.0, top_k=0)
    assert S.sampling_of(a, "ssd") == dict(temperature=1.6, top_p=0.8, top_k=20)
    prompts = ["add 12=", "add 345="]
    greedy = C.generate(model, tok, prompts, max_new_tokens=6, temperature=0.0).texts
    with S.top_k_head(model, 1):  # top-1 sampling at any temperature is greedy
        top1 = C.generate(model, tok, prompts, max_new_tokens=6, temperature=1.5,
                          generator=torch.Generator().manual_seed(0)).texts
    assert top1 == greedy
    assert not isinstance(model.get_output_embeddings(), S.TopKHead)  # restored


# ---- every arm flag changes the result --------------------------------------------------------------


def test_every_arm_flag_changes_the_result(tiny_path):
    """Each arm-defining flag, through the file's own phases (calibration -> projectors -> sampling -> SFT
    batch / evaluation), on the tiny model: a flag read nowhere leaves the result unchanged and fails."""
    def prep(*extra):
        args = _args(tiny_path, *extra)
        S.validate_args(args)
        pre = S.preflight(args)
        model, tok = C.load_lm(tiny_path)
        w = dict(S.build_world(args, pre), chat=False, layers=pre["layers"], dims=pre["dims"])
        return S.prepare_corpus(model, tok, w, args, 0, 1), (model, tok, w, args)

    base, _ = prep()
    digest = lambda p: S.corpus_digest(p["rows"])  # noqa: E731
    assert base["projectors"] is not None and len(base["rows"]) == 12
    assert prep("--method", "self_train")[0]["projectors"] is None
    assert digest(prep("--method", "self_train")[0]) != digest(base)  # the projection changes the samples
    ssd = prep("--method", "ssd")[0]
    assert digest(ssd) != digest(base) and ssd["metrics"]["corpus_kept"] == 12 - 1  # floor(0.1 * 12) dropped
    assert prep("--method", "ssd", "--ssd_drop_shortest", "0.3")[0]["metrics"]["corpus_kept"] == 12 - 3
    for fl in (["--subspace", "random"], ["--subspace", "bottom"], ["--proj_layers", "last"], ["--rank_frac", "0.25"],
               ["--rank", "4"]):
        other = prep(*fl)[0]
        assert digest(other) != digest(base), fl
    ph = prep("--per_head")[0]  # on this untrained model its samples may coincide: compare the projector itself
    assert (ph["projectors"]["2.k"] - base["projectors"]["2.k"]).abs().max() > 1e-2
    assert ph["projectors"]["2.k"][:4, 4:].abs().max() == 0 and ph["metrics"]["energy_2.k"] != base["metrics"]["energy_2.k"]
    assert set(prep("--proj_layers", "last")[0]["projectors"]) == {"3.k", "3.v"}
    assert prep("--rank", "4")[0]["metrics"]["rank_2.k"] == 4 and base["metrics"]["rank_2.k"] == 8
    # --decode_only: main evaluates with the projectors, and run_evals generates with P folded into k_proj / v_proj
    _, (model, tok, w, args) = prep()
    k_proj = model.model.layers[2].self_attn.k_proj
    W0, seen, orig = k_proj.weight.detach().clone(), [], C.generate

    def spy(*a, **k):
        seen.append(k_proj.weight.detach().clone())
        return orig(*a, **k)

    C.generate = spy
    try:
        S.run_evals(model, tok, w, args)
        n_plain = len(seen)
        S.run_evals(model, tok, w, args, projectors=base["projectors"])
    finally:
        C.generate = orig
    assert n_plain == 3 and all(torch.equal(x, W0) for x in seen[:n_plain])
    want = S.fold_projection(k_proj, base["projectors"]["2.k"]).weight
    assert len(seen) == 6 and all(torch.allclose(x, want, atol=1e-6) for x in seen[n_plain:])
    assert torch.equal(k_proj.weight, W0)
    # --loss_on changes Eq. (14)'s tokens
    rows = base["rows"][:3]
    a = S.sft_batch(rows, "all", tok.pad_token_id, None)[2]
    b = S.sft_batch(rows, "completion", tok.pad_token_id, None)[2]
    assert int(a.sum()) == sum(len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in rows)
    assert int(b.sum()) == sum(len(r["response_ids"]) for r in rows)


# ---- bad input, resume, smoke ------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [
    ["--rank_frac", "0"], ["--rank_frac", "1.5"], ["--rank", "0"], ["--n_calib", "0"], ["--eval_size", "0"],
    ["--top_p", "0"], ["--top_k", "-1"], ["--temperature", "-1"], ["--lora_r", "0"], ["--lora_dropout", "1"],
    ["--learning_rate", "0"], ["--ssd_drop_shortest", "1"], ["--num_train_epochs", "0"],
    ["--method", "self_train", "--subspace", "random"], ["--method", "ssd", "--decode_only"],
    ["--method", "base", "--per_head"], ["--task", "math"], ["--calib_file", "x.jsonl"],
    ["--resume", "--overwrite"], ["--table", "--table_grid", "nope"],
])
def test_validation_refuses_bad_input(flags):
    with pytest.raises(C.UserError):
        S.validate_args(S.parse_args(flags))


def test_preflight_refuses_bad_data_and_dims(tiny_path, tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"prompt": "2+2?", "answer": "It is 4", "span": "4"}\n{"prompt": "x", "answer": "no number"}\n')
    good = tmp_path / "e.jsonl"
    good.write_text('{"prompt": "1+1?", "answer": "#### 2"}\n')
    args = _args(tiny_path, "--task", "math", "--calib_file", str(calib), "--train_prompts_file", str(good),
                 "--eval_file", str(good))
    with pytest.raises(C.UserError, match=r"c.jsonl:2"):
        S.preflight(args)
    calib.write_text('{"prompt": "2+2?", "answer": "It is 4", "span": "5"}\n')
    with pytest.raises(C.UserError, match=r"c.jsonl:1: 'span'"):
        S.preflight(args)
    calib.write_text('{"prompt": "2+2?", "answer": "It is 4"}\n')
    exs = S.preflight(args)["data"]["calib"]
    assert [c for c, m in zip("It is 4", exs[0].span_chars) if m] == ["4"]  # fallback span: the final number
    for fl in (["--proj_layers", "7"], ["--rank", "17"], ["--per_head", "--rank", "6"]):
        with pytest.raises(C.UserError):
            S.preflight(_args(tiny_path, *fl))


def test_answer_checkers():
    ex = S.Example("q", final="72")
    assert S.is_right("math", "so 70 + 2 = 72 apples.", ex) and S.is_right("math", "\\boxed{72}", ex)
    assert not S.is_right("math", "72 then 73", ex)
    assert S.final_of("math", "steps... #### 1,234") == "1234" and S.final_of("mcq", "The answer is (C)") == "C"
    assert S.is_right("mcq", "I pick B.", S.Example("q", final="B")) and not S.is_right("mcq", "A", S.Example("q", final="B"))
    code = S.Example("q", tests=["assert f(2) == 4"])
    assert S.run_code_tests(S.extract_code("Here:\n```python\ndef f(x):\n    return 2 * x\n```"), code, 10)
    assert not S.run_code_tests("def f(x):\n    return x", code, 10)
    assert not S.run_code_tests("def f(x):\n    while True: pass", code, 0.5)  # timeout = fail


def _run(args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "spd.py"), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def test_bad_input_exits_2_writes_nothing(tiny_path, tmp_path):
    out = tmp_path / "run"
    r = run_cli(S, ["--model_name_or_path", tiny_path, "--proj_layers", "9", "--output_dir", str(out)])
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --proj_layers") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_smoke_run_and_resume_refusals(tiny_path, tmp_path):
    out = str(tmp_path / "run")
    flags = ["--model_name_or_path", tiny_path, "--n_calib", "8", "--n_train_prompts", "16", "--num_train_epochs", "1",
             "--eval_size", "16", "--max_new_tokens", "8", "--output_dir", out]
    r = _run(flags)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(open(os.path.join(out, "summary.json")).read())
    assert os.path.isfile(os.path.join(out, "spd.png")) and s["sft_steps"] == 1 and s["corpus"]["corpus_kept"] == 16
    assert s["corpus"]["rank_2.k"] == 8 and s["corpus"]["calib_span_tokens"] == 8 * 7
    assert {"t_calib", "t_generate", "t_forward", "t_backward", "t_optimizer", "t_eval"} <= set(s["time_split_s"])
    assert "done in" in r.stdout.strip().splitlines()[-1]
    reloaded, _ = C.load_lm(os.path.join(out, "final_model"))  # the merged model is an ordinary checkpoint
    assert S.state_digest(reloaded) == s["weights_digest"]
    calls = []
    real_evals = S.run_evals
    S.run_evals = lambda *a, **k: (calls.append(k.get("projectors")), real_evals(*a, **k))[1]
    try:
        S.main(S.parse_args(flags[:-1] + [str(tmp_path / "dec"), "--decode_only"]))
    finally:
        S.run_evals = real_evals
    assert calls[0] is None and calls[1] is not None and set(calls[1]) == {"2.k", "2.v", "3.k", "3.v"}
    sd = json.loads(open(tmp_path / "dec" / "summary.json").read())
    assert sd["sft_steps"] == 0 and sd["corpus"]["corpus_kept"] == 16
    # a finished run is not overwritten; --resume with a changed result flag is refused (in-process: no model load)
    for extra, msg in ([[], "already holds a run"], [["--resume", "--rank_frac", "0.25"], "--rank_frac 0.5 -> 0.25"]):
        with pytest.raises(C.UserError, match=msg):
            S.main(S.parse_args(flags + extra))
    with pytest.raises(C.UserError, match="no run"):
        S.main(S.parse_args(flags[:-1] + [str(tmp_path / "empty"), "--resume"]))


# ---- the table --------------------------------------------------------------------------------------


def test_table_aggregation_hand_values(tmp_path):
    def res(label, seed, g, t, kept, wall):
        return dict(student="noisy", label=label, seed=seed, after=dict(acc_greedy=g, acc_sample=t, acc_ood=0.1,
                    filler_sample=1.0), corpus=dict(corpus_acc=0.5, corpus_filler=2.0, corpus_kept=kept), wall_time_s=wall)

    md = S.write_table([res("ssd", 0, 0.4, 0.2, 450, 60), res("ssd", 1, 0.6, 0.4, 449, 120), res("base", 0, 0.5, 0.3, 0, 30)],
                       str(tmp_path))
    lines = md.strip().splitlines()
    assert lines[2].startswith("| noisy | ssd | 0,1 | 0.500 ± 0.141 | 0.300 ± 0.141 | 0.100 ± 0.000 |")
    assert "| 449.5 ± 0.7 | 1.5 |" in lines[2]  # kept rows mean ± std (ddof 1), minutes = mean 90 s
    assert lines[3].startswith("| noisy | base | 0 | 0.500 | 0.300 |")
    assert os.path.isfile(tmp_path / "table.png") and len(json.loads((tmp_path / "table.json").read_text())) == 3


# ---- slow -------------------------------------------------------------------------------------------


def _strip(s):
    return {k: v for k, v in s.items() if k not in ("wall_time_s", "time_split_s")}


@pytest.mark.slow
def test_kill9_resume_reaches_uninterrupted_summary(tiny_path, tmp_path):
    flags = ["--model_name_or_path", tiny_path, "--n_calib", "8", "--n_train_prompts", "64", "--num_train_epochs", "3",
             "--per_device_batch_size", "2", "--eval_size", "16", "--max_new_tokens", "8", "--save_every", "1"]
    a = str(tmp_path / "a")
    assert _run(flags + ["--output_dir", a]).returncode == 0
    b = str(tmp_path / "b")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "spd.py"), *flags, "--output_dir", b], env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300:
        ck = C.checkpoint_step(os.path.join(b, "checkpoint"))
        if ck is not None and ck >= 5:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.isfile(os.path.join(b, "summary.json"))  # killed mid-SFT
    r = _run(flags + ["--output_dir", b, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    sa, sb = (json.loads(open(os.path.join(d, "summary.json")).read()) for d in (a, b))
    assert _strip(sa) == _strip(sb)
    ra = [{k: v for k, v in row.items() if not k.startswith("t_")} for row in C.read_jsonl(os.path.join(a, "metrics.jsonl"))]
    rb = [{k: v for k, v in row.items() if not k.startswith("t_")} for row in C.read_jsonl(os.path.join(b, "metrics.jsonl"))]
    assert ra == rb  # one clean run's rows, no duplicates


@pytest.mark.slow
def test_multi_seed_table_on_tiny_model(tiny_path, tmp_path, monkeypatch):
    """The table path end to end (subprocesses per arm x seed), seeds give different corpora."""
    monkeypatch.setattr(S, "table_arms", lambda grids: [("noisy", "spd (top)", ["--model_name_or_path", tiny_path,
                                                                                "--max_new_tokens", "8"]),
                                                        ("noisy", "self_train", ["--model_name_or_path", tiny_path,
                                                                                 "--method", "self_train",
                                                                                 "--max_new_tokens", "8"])])
    args = S.parse_args(["--table", "--table_seeds", "0,1", "--n_calib", "4", "--n_train_prompts", "8", "--eval_size", "8",
                         "--num_train_epochs", "1", "--output_dir", str(tmp_path)])
    S.run_table(args)
    res = json.loads((tmp_path / "table.json").read_text())
    assert len(res) == 4 and sorted((r["label"], r["seed"]) for r in res) == [("self_train", 0), ("self_train", 1),
                                                                              ("spd (top)", 0), ("spd (top)", 1)]
    for lab in ("spd (top)", "self_train"):  # the seed reaches each run: other prompts and samples
        assert len({r["corpus_digest"] for r in res if r["label"] == lab}) == 2
    assert "| noisy | spd (top) | 0,1 |" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one(tiny_path, tmp_path):
    """Greedy sampling and no dropout: 2 ranks (calibration shards summed, sampling and SFT sharded) end with the
    same weights as 1 process."""
    flags = ["--model_name_or_path", tiny_path, "--n_calib", "6", "--n_train_prompts", "8", "--num_train_epochs", "2",
             "--per_device_batch_size", "2", "--eval_size", "8", "--max_new_tokens", "8", "--temperature", "0",
             "--lora_dropout", "0"]
    one = str(tmp_path / "one")
    assert _run(flags + ["--per_device_batch_size", "4", "--output_dir", one]).returncode == 0
    two = str(tmp_path / "two")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                        os.path.join(ROOT, "spd.py"), *flags, "--output_dir", two], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s1, s2 = (json.loads(open(os.path.join(d, "summary.json")).read()) for d in (one, two))
    assert s2["world_size"] == 2 and s1["corpus_digest"] == s2["corpus_digest"]
    assert s1["corpus"]["energy_2.k"] == pytest.approx(s2["corpus"]["energy_2.k"], abs=1e-4)
    m1, _ = C.load_lm(os.path.join(one, "final_model"))
    m2, _ = C.load_lm(os.path.join(two, "final_model"))
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_real_smollm2_checkpoint(smollm2, tmp_path):
    """SmolLM2-135M-Instruct (GQA: 3 KV heads x 64 = 192 != hidden 576, chat template, BPE): calibration, projected
    sampling, 2 LoRA updates, evaluation; the merged model reloads with the LoRA model's logits."""
    path = smollm2
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}? End with the number.", "answer": f"{a} + {b} = {a + b}"})
                            + "\n" for a, b in [(2, 3), (4, 4), (7, 1), (5, 6)]))
    args = S.parse_args(["--model_name_or_path", path, "--task", "math", "--calib_file", str(data), "--train_prompts_file",
                         str(data), "--eval_file", str(data), "--n_calib", "2", "--max_new_tokens", "12",
                         "--per_device_batch_size", "2", "--num_train_epochs", "1", "--learning_rate", "1e-3",
                         "--calib_batch_size", "2", "--output_dir", str(tmp_path / "run"), "--no-eval_before"])
    S.main(args)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["corpus"]["rank_15.k"] == 96 and s["corpus"]["rank_29.v"] == 96  # half of d_kv = 3 x 64
    assert s["sft_steps"] == 2 and s["corpus"]["calib_span_tokens"] >= 2
    rows = C.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    model, tok = C.load_lm(path)
    rendered = S.render(tok, ["hi"], True)[0]
    assert rendered.count("<|im_start|>user") == 1
    ids = C.encode_prompts(tok, [rendered])[0]
    n_turns = rendered.count("<|im_start|>")
    assert n_turns >= 2 and ids[0].tolist().count(tok.convert_tokens_to_ids("<|im_start|>")) == n_turns  # no doubling
    merged, _ = C.load_lm(str(tmp_path / "run" / "final_model"))
    assert S.state_digest(merged) == s["weights_digest"] != S.state_digest(model)  # the weights moved
