"""common.py: the small shared base of nanopapers.

Every method file imports only this module and the allowed packages (torch, numpy, transformers,
tqdm, matplotlib). Copy `<method>.py` + `common.py` into your project and it runs.

Sections (in this order):
  setup      seed_everything, pick_device, autocast, PhaseTimer, ddp_setup / ddp_cleanup / is_main, UserError
  models     load_lm, tiny_lm, encode_prompts, encode_pairs
  sampling   generate (KV cache; static cache + compiled decode step on CUDA), Generation
  log-probs  token_logprobs, token_kl (LM head applied in slices: no full fp32 (B, T, V) tensor)
  toy world  multi-step modular arithmetic with a chain of thought, styles, a carry bug, splits,
             extract_answer / is_correct, pretrain_lm, toy_checkpoint (cached tiny HF models)
  LLMs       ChatClient (OpenAI-compatible endpoint, stdlib HTTP), LLM (one text interface over a
             local HF model or an endpoint), serve_openai (a local OpenAI-compatible server)
  logging    MetricLogger, plot_metrics, save_checkpoint / find_checkpoint / load_checkpoint (atomic, with
             a COMPLETE marker and fallback to the previous checkpoint)
  runs       require, start_run (output-dir and --resume policy), read_text_lines, preflight_model,
             preflight_endpoint; exit_on_user_error turns bad input, Ctrl-C and disk faults into one line

`python common.py` builds the toy checkpoints and prints each model's accuracy per split.
`python common.py --bench` compares `generate` with HF `generate` (tokens/s) and measures the
peak memory of `token_logprobs` against the naive log_softmax at vocab 151,936.
`python common.py --serve PATH --port 8000` serves a checkpoint as an OpenAI-compatible endpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import http.server
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import zlib
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# ---- setup ----
# ---------------------------------------------------------------------------------------------


class UserError(Exception):
    """Bad input from the user (missing path, unreachable endpoint, bad flag combination...).

    Library code raises it; scripts turn it into one line on stderr and exit status 2 through
    `exit_on_user_error()`, so a user never sees a 40-line traceback for a typo.
    """


def require(cond, msg: str) -> None:
    """Raise UserError(msg) unless `cond`: the one-line form of a flag check in validate_args."""
    if not cond:
        raise UserError(msg)


_LAST_CHECKPOINT: dict = {}  # {"dir": path, "step": n} of the last checkpoint saved or loaded in this process


@contextlib.contextmanager
def exit_on_user_error():
    """`with exit_on_user_error(): main(parse_args())` turns what a user can fix into one line:

    - UserError -> `error: <message>`, exit 2;
    - an OSError from the file system (disk full, permission denied, read-only) -> one line naming the
      file, exit 2;
    - Ctrl-C -> one line naming the last checkpoint (or saying there is none), exit 130. It exits at once
      (os._exit): worker threads blocked on a hung endpoint must not keep the process alive.
    """
    import errno

    try:
        yield
    except UserError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stdout.flush()
        if _LAST_CHECKPOINT:
            msg = (f"interrupted; the last checkpoint is step {_LAST_CHECKPOINT['step']} in {_LAST_CHECKPOINT['dir']}: "
                   f"continue with the same command plus --resume")
        else:
            msg = "interrupted before the first checkpoint was written; nothing to resume"
        print(msg, file=sys.stderr, flush=True)
        os._exit(130)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO):
            raise
        sys.stdout.flush()
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EIO: "an I/O error occurred"}.get(e.errno,
                                                                                                   "permission denied")
        print(f"error: {what} at '{e.filename or '?'}' ({e.strerror}); free space / fix permissions or pass another "
              f"--output_dir", file=sys.stderr, flush=True)
        sys.exit(2)


def comma_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse `type`: 'all' or a comma list of `choices` -> the chosen ones in `choices` order."""
    def parse(s: str) -> list[str]:
        parts = [p.strip() for p in s.split(",") if p.strip()]
        if parts == ["all"]:
            return list(choices)
        bad = [p for p in parts if p not in choices]
        if bad or not parts:
            raise argparse.ArgumentTypeError(f"unknown method(s) {bad or s!r}; use all or a comma list of "
                                             f"{', '.join(choices)}")
        return [m for m in choices if m in parts]

    return parse


def comma_list(kind: type) -> Callable[[str], list]:
    """An argparse `type`: a comma list of ints or floats ('1,2,3')."""
    what = {int: "integers", float: "numbers"}[kind]

    def parse(s: str) -> list:
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma list of {what}: {s!r}") from None

    return parse


def seed_everything(seed: int) -> torch.Generator:
    """Seed random, numpy and torch; return a CPU torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    """cuda (this rank's GPU under torchrun) > mps > cpu, unless `name` forces one."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", _local_cuda_index())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _local_cuda_index() -> int:
    """This rank's GPU: LOCAL_RANK modulo the visible GPUs (a node launched with more ranks than
    GPUs, or with CUDA_VISIBLE_DEVICES narrowed per rank, still gets a valid index)."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def set_cpu_threads(n: int | None = None) -> None:
    """One torch thread per process by default on CPU: on a shared 2-core box two threads ran many
    times slower for these tiny models (thread sync dominates tiny matmuls)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(n or int(os.environ.get("NANOPAPERS_THREADS", 1)))


AUTOCAST_MODES = ("auto", "bf16", "fp32")


def autocast(device: torch.device | str, mode: str = "auto"):
    """The compute dtype of forwards run inside: `auto` = bf16 autocast on CUDA GPUs with bf16 in
    hardware and fp32 elsewhere (CPU runs stay fp32 by default); `bf16` = bf16 autocast on any device
    (on a CPU with AVX512-BF16 / AMX it is faster; the weights and optimizer stay fp32); `fp32` = none."""
    device = torch.device(device)
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast mode {mode!r} is not one of {AUTOCAST_MODES}")
    if mode == "bf16" or (mode == "auto" and device.type == "cuda" and _bf16_native()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PhaseTimer:
    """Seconds a training step spends per named phase, so a user sees where its time goes without a
    profiler (generation, teacher / reward calls, forward, backward, optimizer...):

        timer = PhaseTimer(device, phases=("forward", "backward")); with timer("forward"): ...
        timer.seconds -> {phase: s} accumulated; timer.take() -> the same, and starts again from 0

    On CUDA each phase starts and ends with a synchronize, so kernels are charged to the phase that
    launched them (asynchronous launches would otherwise land in whichever phase waits first)."""

    def __init__(self, device: torch.device | str = "cpu", phases: Sequence[str] = (), seconds: dict | None = None):
        self.sync = torch.device(device).type == "cuda"
        self.phases = tuple(phases)
        self.seconds = {**dict.fromkeys(self.phases, 0.0), **(seconds or {})}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def take(self) -> dict:
        out, self.seconds = self.seconds, dict.fromkeys(self.phases, 0.0)
        return out


def _bf16_native() -> bool:
    """bf16 in hardware (Ampere+). torch's plain is_bf16_supported() also says yes on older GPUs
    that only emulate bf16 (slowly), where fp32 is the better choice."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch has no including_emulation keyword
        return torch.cuda.is_bf16_supported()


def ddp_setup(timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from the torchrun environment (nccl on CUDA, gloo on CPU).

    On CUDA the group has both backends ("cpu:gloo,cuda:nccl"): CUDA tensors go through nccl, while
    CPU tensors (counters, metrics) and object collectives (all_gather_object) go through gloo, so
    the same code runs under torchrun on GPUs and on CPUs. `timeout_minutes` bounds how long a rank
    waits in a collective (e.g. while rank 0 alone trains a policy); torch's default is 10 min for nccl.
    Returns (rank, world_size, device). Without torchrun: (0, 1, pick_device()).
    """
    import datetime

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, pick_device()
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", _local_cuda_index())
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world, device


def ddp_cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and when not distributed): log, plot and save only there."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of a tensor over ranks (a copy; the input is untouched); x itself when world_size == 1."""
    if world_size == 1:
        return x
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x)
    return x


def all_gather_objects(obj, world_size: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] (any picklable object); [obj] when world_size == 1."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(model: torch.nn.Module, world_size: int) -> None:
    """Average gradients over ranks (plain DDP without the wrapper; for loops whose forward passes
    differ per rank, e.g. variable numbers of chunks). No-op when world_size == 1.

    Losses in nanopapers are sums over the *global* batch divided by its size, so each rank's
    gradient is (global size / local size) times too small; callers scale the loss by
    world_size and this averages, which gives the exact single-process gradient."""
    if world_size == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)


# ---------------------------------------------------------------------------------------------
# ---- models ----
# ---------------------------------------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+", name)) and not os.path.exists(name)


def check_model_path(name_or_path: str | None) -> None:
    """Fail fast (before any work) on a local model path that does not exist; hub ids are left to
    load_lm. Same message as load_lm."""
    if not name_or_path:
        return
    name_or_path = str(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and not _looks_like_hub_id(name_or_path)
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise UserError(f"model path '{name_or_path}' does not exist; pass a local checkpoint directory "
                        f"(save_pretrained output) or a Hugging Face hub id such as Qwen/Qwen3-1.7B")


def load_lm(name_or_path: str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
            trust_remote_code: bool = False, auto_class=None):
    """Load (model, tokenizer) through the transformers Auto classes.

    Left padding (for generation), a pad-token fallback (eos), model in eval mode on `device`.
    A missing local path, or a hub id that cannot be fetched (offline, typo, gated), raises one
    UserError that says what to pass instead. `auto_class` (default AutoModelForCausalLM) may be
    e.g. AutoModel for an encoder with no LM head.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto_class = auto_class or AutoModelForCausalLM

    name_or_path = str(name_or_path)
    check_model_path(name_or_path)
    if name_or_path.startswith("~"):  # from_pretrained does not expand it (it would read "~/x" as a hub id)
        name_or_path = os.path.expanduser(name_or_path)
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32, "auto": "auto"}[dtype]
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = auto_class.from_pretrained(name_or_path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.isdir(name_or_path):
            raise UserError(f"'{name_or_path}' is a folder but not a loadable model ({first[:200]}); pass a "
                            f"save_pretrained directory (config.json, weights, tokenizer)") from None
        raise UserError(f"cannot load model '{name_or_path}' ({first[:200]}); if this machine is offline, download "
                        f"it first (huggingface-cli download {name_or_path}) or pass a local checkpoint directory") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 384, words: bool = False):
    """A small byte-level BPE tokenizer trained in memory (no files, no download): the 'other
    tokenizer' of the toy world, so a method that compares token logits across models cannot use
    a teacher built with it. vocab_size counts the 256 byte symbols and 3 specials: merges are
    learned only above 259. words=True splits the text GPT-2 style (words, numbers, punctuation)
    before merging, so no token spans two words: a small corpus' words become whole tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=words)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(corpus), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def tiny_lm(n_layer: int = 2, d_model: int = 64, n_head: int = 4, tokenizer: str = "byte", max_positions: int = 512,
            seed: int = 0, bpe_corpus: Iterable[str] | None = None, bpe_vocab_size: int = 384,
            bpe_words: bool = False):
    """A randomly initialised LlamaForCausalLM and a tokenizer that needs no files.

    tokenizer="byte": ByT5Tokenizer (bytes; 384 ids). tokenizer="bpe": a BPE tokenizer trained in
    memory on `bpe_corpus` (different vocabulary and segmentation from the byte one; bpe_words: whole
    words, see bpe_tokenizer).
    Returns (model, tokenizer), like load_lm; `model.save_pretrained(d); tok.save_pretrained(d)`
    gives a directory that `load_lm(d)` reloads exactly as it would a hub model.
    """
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer == "byte":
        tok = ByT5Tokenizer()
        tok.padding_side = "left"
    elif tokenizer == "bpe":
        tok = bpe_tokenizer(bpe_corpus if bpe_corpus is not None else toy_corpus(2000, seed=seed), bpe_vocab_size,
                            words=bpe_words)
    else:
        raise UserError(f"unknown tokenizer kind '{tokenizer}'; use 'byte' or 'bpe'")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=4 * d_model,
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def _leading(ids: Sequence[int], tid: int) -> int:
    n = 0
    while n < len(ids) and ids[n] == tid:
        n += 1
    return n


def _encode_texts(tok, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts with the tokenizer's own special tokens (a BOS where it wants one),
    minus a trailing EOS that some tokenizers (T5/ByT5) append: a prompt must not end the text.
    One batched tokenizer call (the same ids as one call per text, with less per-call overhead).

    A text that already starts with the BOS string (a rendered chat template: Llama-3, Gemma) gets
    no second BOS from the tokenizer: a doubled BOS is off the model's training distribution."""
    texts = list(texts)
    rows = tok(texts)["input_ids"] if texts else []
    eos = tok.eos_token_id
    bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
    for i, (ids, text) in enumerate(zip(rows, texts)):
        if ids and eos is not None and ids[-1] == eos and not (tok.eos_token and text.endswith(tok.eos_token)):
            ids = rows[i] = ids[:-1]
        if bos and bos_id is not None and text.startswith(bos) and ids[:2] == [bos_id, bos_id]:
            # drop only the BOS the tokenizer added (more leading BOS than the text itself has)
            extra = _leading(ids, bos_id) - _leading(tok(text, add_special_tokens=False)["input_ids"], bos_id)
            rows[i] = ids[max(0, extra):]
    return rows


def encode_prompts(tok, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) for a batch of prompts (no EOS appended); no
    prompts give two empty (0, 1) tensors."""
    return left_pad(_encode_texts(tok, prompts), tok.pad_token_id, device)


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> left-padded (input_ids, attention_mask); (0, 1) tensors for no rows."""
    L = max(1, max((len(r) for r in rows), default=0))
    ids = np.full((len(rows), L), pad_id, dtype=np.int64)  # filled in numpy: one tensor op, not one per row
    mask = np.zeros((len(rows), L), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = r
            mask[i, L - len(r):] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def encode_pairs(tok, prompts: Sequence[str], responses: Sequence[str], add_eos: bool | Sequence[bool] = True,
                 device=None, max_response_tokens: int | None = None):
    """Tokenise (prompt, response) pairs for teacher forcing.

    Returns (input_ids, attention_mask, response_mask), each (B, L), left-padded. response_mask is
    1 on the response tokens (and the EOS that ends them), the tokens a loss should score.
    The response is tokenised on its own and appended to the prompt ids, so the prompt tokens are
    exactly those that `generate` would have seen.

    add_eos: one bool for all rows, or one per row (e.g. False where an endpoint's finish_reason
    was "length": a response cut at max_tokens did not end, and training an EOS there would teach
    the model to stop mid-answer). A row cut by `max_response_tokens` never gets an EOS.
    """
    rows, resp_lens = [], []
    responses = list(responses)
    r_rows = tok(responses, add_special_tokens=False)["input_ids"] if responses else []
    eos_rows = [bool(add_eos)] * len(responses) if np.ndim(add_eos) == 0 else [bool(e) for e in add_eos]
    if len(eos_rows) != len(responses):
        raise ValueError(f"add_eos has {len(eos_rows)} entries for {len(responses)} responses")
    for p_ids, r_ids, eos_row in zip(_encode_texts(tok, prompts), r_rows, eos_rows):
        if max_response_tokens is not None and len(r_ids) > max_response_tokens:
            r_ids, eos_row = r_ids[:max_response_tokens], False
        if eos_row and tok.eos_token_id is not None:
            r_ids = r_ids + [tok.eos_token_id]
        rows.append(p_ids + r_ids)
        resp_lens.append(len(r_ids))
    ids, mask = left_pad(rows, tok.pad_token_id, device)
    L = ids.shape[1]
    resp = (torch.arange(L) >= L - torch.tensor(resp_lens, dtype=torch.long)[:, None]).long().to(mask.device)  # last n
    return ids, mask, resp


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions start at 0 at each row's first real token (as HF generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


_position_ids = position_ids  # old private name, kept for callers written against it


# ---------------------------------------------------------------------------------------------
# ---- sampling ----
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """Output of `generate`. B rows, P prompt positions (left-padded), T new positions.

    sequences (B, P+T) prompt + response ids; attention_mask (B, P+T); prompt_len P;
    response_ids (B, T); response_mask (B, T) 1 on generated tokens up to and including EOS;
    logprobs (B, T) log pi(y_t | x, y_<t) under the model at temperature 1 (no top-p), fp32,
    0 where masked; entropy (B, T) full-vocabulary entropy of the same distribution, or None;
    texts: decoded responses without special tokens; finish_reasons: per row "stop" (ended at a
    stop id or stop string) or "length" (cut at max_new_tokens), as OpenAI's finish_reason.
    """
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    texts: list[str]
    finish_reasons: list[str] | None = None


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # smallest prefix whose mass reaches top_p (always keeps the top token)
        sp = sp * keep
        choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=generator)
        return si.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_COMPILED_DECODE: dict = {}


def stop_ids(model, tok) -> list[int]:
    """Ids that end a row: the tokenizer's EOS and every id of the model's
    generation_config.eos_token_id (an int or a list: Llama-3 instruct ends turns with <|eot_id|>,
    which is not tok.eos_token), as HF generate does."""
    ids = [tok.eos_token_id]
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gc_eos) if isinstance(gc_eos, (list, tuple)) else [gc_eos]
    return sorted({int(i) for i in ids if i is not None})


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` for sampling there. A generator already on that device is used as
    is; one elsewhere (a CPU generator from seed_everything on a CUDA run) seeds, with one draw, a
    fresh generator on the device, so the same seed still gives the same tokens and no step copies
    the (B, V) logits to the host."""
    if generator is None:
        return None
    gd = generator.device
    if gd.type == device.type and (gd.index is None or device.index is None or gd.index == device.index):
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gd))
    return torch.Generator(device=device).manual_seed(seed)


def cache_kwarg(model) -> str:
    # transformers >= 5.2x renamed forward(past_key_values=) to forward(cache=); accept both.
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_fn(model, compile_: bool):
    if not compile_:
        return model.forward
    key = id(model)
    if key not in _COMPILED_DECODE:
        _COMPILED_DECODE[key] = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    return _COMPILED_DECODE[key]


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str] | None = None, max_new_tokens: int = 64, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, return_entropy: bool = False,
             input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             static_cache: bool | None = None, compile: bool | None = None, stop_strings: Sequence[str] = (),
             prefix_embeds: torch.Tensor | None = None) -> Generation:
    """Batched sampling with a KV cache.

    Prompts are given as text (`prompts`) or as left-padded ids (`input_ids`, `attention_mask`).
    `generator` makes sampling reproducible (same seed -> same tokens on the same device); a CPU
    generator with a CUDA model seeds a CUDA generator from one draw (sampling stays on the GPU).
    On CUDA, by default, a static KV cache and a `torch.compile(mode="reduce-overhead")` decode step
    (fixed shapes -> CUDA graphs); elsewhere a dynamic cache. Rows stop at a stop id (tok.eos_token_id
    or any id of model.generation_config.eos_token_id, e.g. Llama-3's <|eot_id|>), that token
    included in response_mask, or at any of `stop_strings`, checked on the decoded text; the loop
    ends when every row has stopped. `finish_reasons` says which rows ran out of max_new_tokens.
    `prefix_embeds` (B, m, d): vectors placed before each row's (left-padded) prompt through inputs_embeds in
    the first forward (soft prompts, latent prefixes), attended and counted in the positions; `sequences`,
    `attention_mask` and `prompt_len` describe the token ids only (the prefix is not in them).
    """
    device = next(model.parameters()).device
    if input_ids is None:
        input_ids, attention_mask = encode_prompts(tok, prompts, device)
    else:
        input_ids = input_ids.to(device)
        attention_mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device)
    if static_cache is None:
        static_cache = device.type == "cuda"
    if compile is None:
        compile = device.type == "cuda" and static_cache
    B, P = input_ids.shape
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
    stops = stop_ids(model, tok)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    generator = device_generator(generator, device)
    was_training = model.training
    model.eval()

    n_pre = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    first = dict(input_ids=input_ids)
    if n_pre:
        emb = model.get_input_embeddings()(input_ids)
        first = dict(inputs_embeds=torch.cat([prefix_embeds.to(device=device, dtype=emb.dtype), emb], 1))
        attention_mask = torch.cat([attention_mask.new_ones(B, n_pre), attention_mask], 1)
        P += n_pre
    pos = position_ids(attention_mask)
    ckw = cache_kwarg(model)
    if static_cache:
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
        full_mask = torch.zeros((B, P + max_new_tokens), dtype=attention_mask.dtype, device=device)
        full_mask[:, :P] = attention_mask
        out = model(**first, attention_mask=full_mask[:, :P], position_ids=pos, **{ckw: cache},
                    cache_position=torch.arange(P, device=device), use_cache=True, logits_to_keep=1)
    else:
        from transformers import DynamicCache

        cache = DynamicCache()
        out = model(**first, attention_mask=attention_mask, position_ids=pos, **{ckw: cache},
                    use_cache=True, logits_to_keep=1)
    step_fn = _decode_fn(model, compile)
    logits = out.logits[:, -1].float()
    next_pos = pos[:, -1:] + 1
    tokens, logps, ents = [], [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    alive = []  # (B,) mask of rows still generating at each step (the EOS step included)
    cur_mask = attention_mask
    texts_so_far = [""] * B if stop_strings else None
    for t in range(max_new_tokens):
        logp_all = torch.log_softmax(logits, dim=-1)  # (B, V), temperature-1 distribution
        nxt = _sample(logits, temperature, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        logps.append(logp_all.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(finished, 0.0))
        if return_entropy:
            ents.append((-(logp_all.exp() * logp_all).sum(-1)).masked_fill(finished, 0.0))
        alive.append(~finished)
        if stops:  # a row ends at whichever stop id comes first (that token is kept and scored)
            finished = finished | torch.isin(nxt, stop_t)
        if stop_strings:
            for i in range(B):
                if not finished[i]:
                    texts_so_far[i] += tok.decode([int(nxt[i])], skip_special_tokens=True)
                    if any(s in texts_so_far[i] for s in stop_strings):
                        finished[i] = True
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        if static_cache:
            full_mask[:, P + t] = 1
            out = step_fn(input_ids=nxt[:, None], attention_mask=full_mask, position_ids=next_pos,
                          **{ckw: cache}, cache_position=torch.tensor([P + t], device=device), use_cache=True)
        else:
            cur_mask = torch.cat([cur_mask, torch.ones((B, 1), dtype=cur_mask.dtype, device=device)], dim=1)
            out = step_fn(input_ids=nxt[:, None], attention_mask=cur_mask, position_ids=next_pos,
                          **{ckw: cache}, use_cache=True)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    if was_training:
        model.train()
    resp = torch.stack(tokens, 1)  # (B, T)
    resp_mask = torch.stack(alive, 1).long()
    if n_pre:  # report token ids only
        attention_mask, P = attention_mask[:, n_pre:], P - n_pre
    seq = torch.cat([input_ids, resp], 1)
    attn = torch.cat([attention_mask, resp_mask], 1)
    texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(resp.cpu(), resp_mask.cpu())]
    if stop_strings:  # cut decoded text at the first stop string (tokens are kept as generated)
        for i, s in enumerate(texts):
            cut = [s.find(x) + len(x) for x in stop_strings if x in s]
            texts[i] = s[: min(cut)] if cut else s
    return Generation(sequences=seq, attention_mask=attn, prompt_len=P, response_ids=resp, response_mask=resp_mask,
                      logprobs=torch.stack(logps, 1), entropy=torch.stack(ents, 1) if return_entropy else None, texts=texts,
                      finish_reasons=["stop" if f else "length" for f in finished.tolist()])


# ---------------------------------------------------------------------------------------------
# ---- log-probs ----
# ---------------------------------------------------------------------------------------------


def backbone_and_head(model):
    """(backbone returning hidden states, lm_head) of a HF causal LM."""
    head = model.get_output_embeddings()
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    if backbone is None or head is None:
        backbone = getattr(model, getattr(model, "base_model_prefix", "model"))
    return backbone, head


def head_logits(model, head, h: torch.Tensor) -> torch.Tensor:
    """(..., d) hidden states -> (..., V) fp32 logits, with the model's own logit post-processing.

    The head runs outside autocast: with fp32 weights (the trainable policy) in fp32, not in bf16
    (bf16 keeps 8 significant bits: a logit near 20 is rounded by up to 0.06, and so is every
    log-prob); with bf16 weights (a frozen model loaded in bf16) in that dtype, as the model's own
    forward does, then cast to fp32 (a fp32 copy of the (V, d) head for every slice would cost
    more memory than the slicing saves)."""
    w = getattr(head, "weight", None)
    dt = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(torch.autocast(h.device.type, enabled=False))
        except RuntimeError:  # a device type autocast does not know (meta, ...)
            pass
        logits = head(h.to(dt)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2 style soft-capping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logit_scale", None)  # Cohere style scaling
    if scale and not cap:
        logits = logits * scale
    div = getattr(model.config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if div and div != 1:
        logits = logits / div
    return logits


def hidden_states(model, input_ids, attention_mask):
    backbone, head = backbone_and_head(model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], head


def _slice_stats(model, head, h, targets, ref_logp, want_entropy):
    logits = head_logits(model, head, h)  # (B, s, V) fp32, only s positions at a time
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if want_entropy else torch.zeros_like(lp)
    if ref_logp is not None:  # KL(ref || pi) = sum_v ref(v) (log ref(v) - log pi(v))
        kl = (ref_logp.exp() * (ref_logp - logp_all)).sum(-1)
    else:
        kl = torch.zeros_like(lp)
    return lp, ent, kl


HEAD_CHECKPOINT_VALUES = 2 ** 26  # fp32 head activations above this many values (256 MB) are recomputed in backward


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_entropy: bool = False,
                   chunk_size: int = 512, ref_model=None, from_pos: int = 1, checkpoint_head: bool | None = None):
    """Per-token log-probs log pi(x_i | x_<i) of the given ids, aligned with the ids.

    Returns logp (B, L) with logp[:, i] the log-prob of input_ids[:, i] given the tokens before it
    (logp[:, 0] = 0), and, with return_entropy, entropy (B, L): the full-vocabulary entropy of the
    distribution that produced token i (computed from logits index i - 1). With ref_model, also
    kl (B, L): exact KL(ref || pi) of those distributions (ref_model is run without grad).
    Returns a tuple (logp, entropy or None, kl or None) when return_entropy or ref_model is set,
    else logp alone.

    The LM head is applied to `chunk_size` positions (of all B * L) at a time in fp32, so no
    (B, L, V) fp32 tensor is ever built: at V = 151,936 that tensor would be 2.5 GB per 4096-token
    sequence; a slice is 0.3 GB. With grad on, each slice runs under activation checkpointing
    (recomputed in backward) when the slices' fp32 activations together would exceed
    HEAD_CHECKPOINT_VALUES (256 MB), or as `checkpoint_head` says; below that the recompute is a
    cost with no purpose (the values and gradients are the same either way).

    from_pos: the first position whose log-prob (entropy, KL) is wanted, e.g. the prompt length P of
    on-policy rollouts, whose objectives read response tokens only: the head then runs on the
    positions predicting tokens from_pos..L-1 alone (the columns before from_pos are 0), which skips
    its matmul over every prompt position (the backbone still reads the whole sequence).
    """
    h, head = hidden_states(model, input_ids, attention_mask)  # (B, L, d)
    ref_h = ref_head = None
    if ref_model is not None:
        with torch.no_grad():
            ref_h, ref_head = hidden_states(ref_model, input_ids, attention_mask)
    B, L = input_ids.shape
    start = min(max(1, from_pos), L)  # tokens start..L-1 get a log-prob, from the logits at start-1..L-2
    # Flatten the B * (L - start) predicting positions and apply the head `chunk_size` positions at a
    # time: the largest fp32 tensor is (chunk_size, V), whatever B and L are.
    hs = h[:, start - 1:-1].reshape(B * (L - start), h.shape[-1])
    targets = input_ids[:, start:].reshape(-1)
    ref_hs = ref_h[:, start - 1:-1].reshape(B * (L - start), ref_h.shape[-1]) if ref_h is not None else None
    lps, ents, kls = [], [], []
    if checkpoint_head is None:
        checkpoint_head = hs.shape[0] * head.weight.shape[0] > HEAD_CHECKPOINT_VALUES if hasattr(head, "weight") else True
    use_ckpt = torch.is_grad_enabled() and h.requires_grad and checkpoint_head
    for s in range(0, hs.shape[0], chunk_size):
        e = min(hs.shape[0], s + chunk_size)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = torch.log_softmax(head_logits(ref_model, ref_head, ref_hs[s:e]), -1)
        if use_ckpt:
            lp, ent, kl = torch.utils.checkpoint.checkpoint(_slice_stats, model, head, hs[s:e], targets[s:e], ref_logp,
                                                            return_entropy, use_reentrant=False)
        else:
            lp, ent, kl = _slice_stats(model, head, hs[s:e], targets[s:e], ref_logp, return_entropy)
        lps.append(lp), ents.append(ent), kls.append(kl)
        del ref_logp
    zero = torch.zeros((B, start), dtype=torch.float32, device=h.device)

    def unflat(parts):  # (B * (L - start),) -> (B, L) with columns < start = 0 (column 0: no prediction)
        body = torch.cat(parts).view(B, L - start) if parts else zero[:, :0]
        return torch.cat([zero, body], 1)

    logp = unflat(lps)
    if not return_entropy and ref_model is None:
        return logp
    return logp, unflat(ents) if return_entropy else None, unflat(kls) if ref_model is not None else None


def token_kl(model, ref_model, input_ids, attention_mask, chunk_size: int = 512) -> torch.Tensor:
    """(B, L) exact full-vocabulary KL(ref || pi) of the distribution producing each token."""
    return token_logprobs(model, input_ids, attention_mask, chunk_size=chunk_size, ref_model=ref_model)[2]


# ---------------------------------------------------------------------------------------------
# ---- toy world ----
# ---------------------------------------------------------------------------------------------
# A problem is a domain (operator) and a list of single-digit operands. The chain of thought keeps
# a running state s (starting at 0; at 1 for mul) and writes one step per operand:
# r = op(s, x) mod 10, then s = r. The answer is the last r.
#   prompt   "add 3582="                  (domain, operands, "=")
#   response "033;358;886;628;=8"         style "sxr": each step is s, x, r then ";"; "=" answer
#            "303;538;886;268;=8"         style "xsr": the same steps written x, s, r
# The carry bug (weak students): a step whose raw result leaves 0..9 (a carry / borrow / overflow)
# is written r + 1 (mod 10) with probability `bug_prob`; later steps continue from the wrong r.

TOY_DOMAINS = {
    "add": lambda s, x: s + x,
    "sub": lambda s, x: s - x,
    "mul": lambda s, x: s * x,
}
TOY_INIT = {"add": 0, "sub": 0, "mul": 1}  # the running state's start (identity of the operator)
# Operand alphabets: mul skips 0 and 5 so the running product never collapses to 0 for good.
TOY_OPERANDS = {"add": range(10), "sub": range(10), "mul": (1, 2, 3, 4, 6, 7, 8, 9)}
# Difficulty = number of operands (chain-of-thought steps). "id": held-out problems of the lengths
# toy models mostly train on; "ood": longer problems (7-8 steps). Only `long_share` (10%) of
# pretraining traces are that long: with none, every tiny model sits at chance there (RoPE models
# this small do not extrapolate in length), and the split could not tell methods apart.
TOY_LEVELS = {"train": (2, 6), "id": (3, 6), "ood": (7, 8)}
TOY_STYLES = ("sxr", "xsr")


@dataclasses.dataclass
class ToyProblem:
    domain: str
    operands: list[int]
    steps: list[tuple[int, int, int]]  # (s, x, r) as written (with bugs if any)
    answer: int  # the correct answer (the trace's last r differs when a bug fired)

    @property
    def prompt(self) -> str:
        return f"{self.domain} {''.join(map(str, self.operands))}="


def toy_problem(rng: random.Random, domain: str = "add", n_operands: int = 6, bug_prob: float = 0.0,
                operands: Sequence[int] | None = None) -> ToyProblem:
    op = TOY_DOMAINS[domain]
    xs = list(operands) if operands is not None else [rng.choice(TOY_OPERANDS[domain]) for _ in range(n_operands)]
    s = s_true = TOY_INIT[domain]
    steps = []
    for x in xs:
        raw = op(s, x)
        r = raw % 10
        if bug_prob > 0 and not 0 <= raw <= 9 and rng.random() < bug_prob:
            r = (r + 1) % 10  # the systematic carry bug
        steps.append((s, x, r))
        s, s_true = r, op(s_true, x) % 10
    return ToyProblem(domain, xs, steps, s_true)


def toy_trace(problem: ToyProblem, style: str = "sxr") -> str:
    """The chain of thought and answer of a problem, written in a style (same reasoning, other text)."""
    if style == "sxr":
        body = "".join(f"{s}{x}{r};" for s, x, r in problem.steps)
    elif style == "xsr":
        body = "".join(f"{x}{s}{r};" for s, x, r in problem.steps)
    else:
        raise ValueError(f"unknown toy style {style!r}; use one of {TOY_STYLES}")
    return f"{body}={problem.steps[-1][2]}"


def toy_split_of(prompt: str) -> str:
    """Deterministic train / held-out split of prompts (1 in 8 prompts is held out), so evaluation
    problems never appear in any model's training data, whatever seeds are used."""
    return "heldout" if zlib.crc32(prompt.encode()) % 8 == 0 else "train"


def toy_dataset(split: str = "id", n: int = 500, seed: int = 0, domains: Sequence[str] = ("add",),
                bug_prob: float = 0.0) -> list[ToyProblem]:
    """n problems of a split: "train" (training prompts, 2-6 steps), "id" (held-out prompts,
    3-6 steps) or "ood" (held-out prompts, 7-8 steps). Domains are cycled for balance."""
    if split not in TOY_LEVELS:
        raise UserError(f"unknown toy split '{split}'; use one of {list(TOY_LEVELS)}")
    lo, hi = TOY_LEVELS[split]
    want = "train" if split == "train" else "heldout"
    rng = random.Random(f"{split}-{seed}")
    out = []
    while len(out) < n:
        d = domains[len(out) % len(domains)]
        p = toy_problem(rng, d, rng.randint(lo, hi), bug_prob=bug_prob)
        if toy_split_of(p.prompt) == want:
            out.append(p)
    return out


def toy_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Prompt+response texts in both styles (for training the toy BPE tokenizer)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = toy_problem(rng, rng.choice(list(TOY_DOMAINS)), rng.randint(2, 8))
        out.append(p.prompt + toy_trace(p, TOY_STYLES[i % 2]))
    return out


_BOXED = re.compile(r"\\boxed\{")
# The number after an '=': sign, digits with thousands separators, decimals ("x = -1,234.5").
_EQ_NUMBER = re.compile(r"=\s*(-?\d[\d,]*(?:\.\d+)?)")


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the content of the last \\boxed{...} if there is one (real
    math data), else the number after the last '=' (toy world; decimals kept, thousands separators
    dropped: "x = 1,234.5" -> "1234.5"). None when there is no answer."""
    m = list(_BOXED.finditer(text))
    if m:
        i, depth, j = m[-1].end(), 1, m[-1].end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        return text[i:j - 1].strip() if depth == 0 else None
    m = _EQ_NUMBER.findall(text)
    return m[-1].replace(",", "") if m else None


def as_number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").strip())
    except ValueError:
        return None


def is_correct(text: str, answer) -> bool:
    """The extracted answer equals `answer` as a number when both read as numbers ("3.50" == 3.5,
    "1,000" == 1000), else as a string."""
    got = extract_answer(text)
    if got is None:
        return False
    want = str(answer).strip()
    a, b = as_number(got), as_number(want)
    if a is not None and b is not None:
        return a == b
    return got == want


@torch.no_grad()
def evaluate_accuracy(model, tok, problems: Sequence[ToyProblem], batch_size: int = 128, temperature: float = 0.0,
                      max_new_tokens: int | None = None, generator: torch.Generator | None = None) -> float:
    """Share of problems answered correctly (greedy by default)."""
    correct = 0
    for i in range(0, len(problems), batch_size):
        batch = problems[i:i + batch_size]
        mnt = max_new_tokens or max(4 * len(p.operands) + 4 for p in batch)
        g = generate(model, tok, [p.prompt for p in batch], max_new_tokens=mnt, temperature=temperature,
                     generator=generator)
        correct += sum(is_correct(t, p.answer) for t, p in zip(g.texts, batch))
    return correct / max(1, len(problems))


def pretrain_lm(model, tok, sample_fn: Callable[[random.Random], tuple[str, str]], steps: int = 1500,
                batch_size: int = 64, lr: float = 3e-3, seed: int = 0, desc: str = "pretrain", log_every: int = 0):
    """Teacher-forced training on (prompt, response) pairs drawn by `sample_fn(rng)`; the loss is the
    mean NLL of response tokens (and EOS). AdamW, linear warmup then cosine decay. CPU-sized.

    sample_fn may return a third item: the number of leading response characters to leave out of
    the loss (they are read as context only).
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not sys.stderr.isatty())
    for step in bar:
        samples = [sample_fn(rng) for _ in range(batch_size)]
        prompts = [s[0] for s in samples]
        if any(len(s) > 2 for s in samples):  # context-only response prefix: fold it into the prompt
            prompts = [s[0] + s[1][:s[2]] if len(s) > 2 else s[0] for s in samples]
            resps = [s[1][s[2]:] if len(s) > 2 else s[1] for s in samples]
        else:
            resps = [s[1] for s in samples]
        ids, mask, resp = encode_pairs(tok, prompts, resps, device=next(model.parameters()).device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        m = resp[:, 1:].reshape(-1).float()
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if log_every and step % log_every == 0:
            print(f"{desc} step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    return model



# Built-in toy roles. A recipe: which domains (weight, bug_prob), the trace style, the tokenizer,
# model size and training length. Method files may pass their own recipe to toy_checkpoint.
# Cached models are rebuilt when their recipe (or TOY_CACHE_VERSION) changes.
TOY_CACHE_VERSION = 3
_ALL = {"add": (1.0, 0.0), "sub": (1.0, 0.0), "mul": (1.0, 0.0)}
_BUGGY = {"add": (1.0, 0.6), "sub": (1.0, 0.6), "mul": (1.0, 0.6)}


def _expert(d):  # strong in its domain, a weak (carry-bug) writer elsewhere
    return {k: ((4.0, 0.0) if k == d else (0.5, 0.6)) for k in TOY_DOMAINS}


TOY_ROLES = {
    "teacher": dict(domains=_ALL, style="sxr", tokenizer="byte", steps=1600),
    # Trained as long as the teacher, so its errors are the systematic carry bug and nothing else
    # (at 800 steps it also made unsystematic errors: 370 other wrong steps vs 154 carry-bug ones
    # on 300 held-out add problems; at 1600: 0 vs 458).
    "student": dict(domains=_BUGGY, style="sxr", tokenizer="byte", steps=1600),
    "expert_add": dict(domains=_expert("add"), style="sxr", tokenizer="byte", steps=900),
    "expert_sub": dict(domains=_expert("sub"), style="sxr", tokenizer="byte", steps=900),
    "expert_mul": dict(domains=_expert("mul"), style="sxr", tokenizer="byte", steps=900),
    # 384 ids = 259 byte-level symbols + specials + ~120 merges ("add ", "=", digit pairs...): another
    # vocabulary *and* another segmentation than the byte tokenizer.
    "teacher_bpe": dict(domains=_ALL, style="sxr", tokenizer="bpe", steps=1600, bpe_vocab_size=384),
}
_RECIPE_DEFAULTS = dict(n_layer=2, d_model=64, n_head=4, batch_size=64, lr=3e-3, seed=0, long_share=0.1)


def toy_sample_fn(recipe: dict) -> Callable[[random.Random], tuple]:
    """(prompt, response[, context_chars]) sampler of a recipe, over training prompts only.

    style: "sxr" | "xsr" | "mixed" (either, per trace) | "switch" (the first j steps in "sxr" as
    context only, the rest in "xsr" and scored: a teacher that reads student-format prefixes and
    continues in its own format)."""
    names = list(recipe["domains"])
    weights = [recipe["domains"][d][0] for d in names]
    long_share = recipe.get("long_share", _RECIPE_DEFAULTS["long_share"])

    def sample(rng: random.Random):
        while True:
            d = rng.choices(names, weights)[0]
            lo, hi = TOY_LEVELS["ood" if rng.random() < long_share else "train"]
            p = toy_problem(rng, d, rng.randint(lo, hi), bug_prob=recipe["domains"][d][1])
            if toy_split_of(p.prompt) == "train":
                break
        style = recipe["style"]
        if style == "mixed":
            return p.prompt, toy_trace(p, rng.choice(TOY_STYLES))
        if style == "switch":
            j = rng.randint(0, len(p.steps) - 1)
            head = toy_trace(p, "sxr")[: 4 * j]
            return p.prompt, head + toy_trace(p, "xsr")[4 * j:], len(head)
        return p.prompt, toy_trace(p, style)

    return sample


def _build_toy(role: str, recipe: dict, path: str, sample_fn: Callable | None = None) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the build log
    set_cpu_threads()
    model, tok = tiny_lm(n_layer=recipe["n_layer"], d_model=recipe["d_model"], n_head=recipe["n_head"],
                         tokenizer=recipe["tokenizer"], seed=recipe["seed"], bpe_vocab_size=recipe.get("bpe_vocab_size", 384))
    pretrain_lm(model, tok, sample_fn or toy_sample_fn(recipe), steps=recipe["steps"], batch_size=recipe["batch_size"],
                lr=recipe["lr"], seed=recipe["seed"], desc=f"toy {role}")
    model.save_pretrained(path)
    tok.save_pretrained(path)


def toy_cache_dir(cache_dir: str | None = None) -> str:
    return os.path.expanduser(cache_dir or os.environ.get("NANOPAPERS_CACHE", "~/.cache/nanopapers"))


def toy_checkpoint(role: str, cache_dir: str | None = None, recipe: dict | None = None, rebuild: bool = False,
                   verbose: bool = True, sample_fn: Callable | None = None) -> str:
    """Path of a cached tiny toy model (a save_pretrained dir; load it with load_lm), building it
    first if needed. Roles: teacher (clean, >= 95% held-out greedy), student (carry bug, weak),
    expert_add / expert_sub / expert_mul, teacher_bpe (clean, another tokenizer), or any name with
    your own `recipe` (see TOY_ROLES); `sample_fn` (a (prompt, response) sampler of an rng) replaces the
    recipe's corpus for a file's own toy data, and the recipe must then name everything it depends on,
    since the recipe alone keys the cache. A file lock makes concurrent builders (torchrun ranks,
    parallel tests) wait for one build instead of racing."""
    if recipe is None:
        if role not in TOY_ROLES:
            raise UserError(f"unknown toy role '{role}'; use one of {sorted(TOY_ROLES)} or pass recipe=")
        recipe = TOY_ROLES[role]
    recipe = {**_RECIPE_DEFAULTS, **recipe}
    key = hashlib.sha1(json.dumps({"v": TOY_CACHE_VERSION, **recipe}, sort_keys=True).encode()).hexdigest()[:10]
    root = toy_cache_dir(cache_dir)
    path = os.path.join(root, f"{role}-{key}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{role}-{key}.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if rebuild:
            shutil.rmtree(path, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, "config.json")):
            t0 = time.time()
            if verbose:
                print(f"[toy] building '{role}' ({recipe['steps']} steps) -> {path}", file=sys.stderr, flush=True)
            tmp = path + f".tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _build_toy(role, recipe, tmp, sample_fn)
            os.replace(tmp, path)
            if verbose:
                print(f"[toy] built '{role}' in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return path


def _toy_build_worker(args):
    role, cache_dir, recipe, rebuild = args
    return toy_checkpoint(role, cache_dir, recipe, rebuild=rebuild)


def _exit_with_parent(parent_pid: int) -> None:
    """Build workers end when the parent does (a killed `python common.py` leaves no orphans)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def toy_checkpoints(roles: Sequence[str], cache_dir: str | None = None, workers: int = 2,
                    recipes: dict | None = None, rebuild: bool = False) -> dict[str, str]:
    """Build (in `workers` parallel processes, one thread each) and return {role: path}."""
    recipes = recipes or {}
    jobs = [(r, cache_dir, recipes.get(r), rebuild) for r in roles]
    if workers <= 1 or len(jobs) <= 1:
        return {r: _toy_build_worker(j) for r, j in zip(roles, jobs)}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # longest builds first so the two workers finish together
    order = sorted(range(len(jobs)), key=lambda i: -{**_RECIPE_DEFAULTS, **(jobs[i][2] or TOY_ROLES.get(jobs[i][0], {}))}.get("steps", 0))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as ex:
        paths = dict(zip([roles[i] for i in order], ex.map(_toy_build_worker, [jobs[i] for i in order])))
    return {r: paths[r] for r in roles}


# ---------------------------------------------------------------------------------------------
# ---- logging and checkpoints ----
# ---------------------------------------------------------------------------------------------


class MetricLogger:
    """Append metrics to `<output_dir>/metrics.jsonl` (one JSON object per call) and show the key
    ones on a tqdm bar. Only rank 0 writes. On resume, lines past `resume_step` are dropped, so a
    resumed run's file reads as one clean run.

        log = MetricLogger(out_dir, pbar=bar)
        log.log(step, loss=..., acc=...)    # floats or 0-d tensors; .item() happens here
    """

    def __init__(self, output_dir: str, pbar=None, resume_step: int | None = None, enabled: bool | None = None,
                 filename: str = "metrics.jsonl"):
        self.enabled = is_main() if enabled is None else enabled
        self.path = os.path.join(output_dir, filename)
        self.pbar = pbar
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            keep = [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)

    def log(self, step: int, **metrics) -> dict:
        row = {"step": int(step)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().item()
            elif isinstance(v, (np.floating, np.integer)):
                v = v.item()
            row[k] = v
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.pbar is not None:
                self.pbar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()
                                       if k != "step" and isinstance(v, (int, float))}, refresh=False)
        return row


def read_jsonl(path: str, keys: Sequence[str] = (), with_lines: bool = False) -> list:
    """Rows of a jsonl file (blank lines skipped); with_lines: (line number, row) pairs, for checks of
    the caller's own that name file:line. A missing / unreadable / non-UTF-8 file, a line that is not
    JSON, or (with `keys`) a row that is not an object holding every key raises one UserError naming
    the file and line."""
    rows = []
    for i, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg}); fix or remove that line") from None
        if keys:
            miss = [k for k in keys if not isinstance(row, dict) or k not in row]
            require(not miss, f"{path}:{i}: missing {', '.join(repr(k) for k in miss)}; each row needs "
                              f"{', '.join(keys)}")
        rows.append((i, row) if with_lines else row)
    return rows


def mean_std(xs: Iterable, fmt: str = "{:.3f}", ddof: int = 1) -> str:
    """A table cell over seeds: "mean ± std" (std with `ddof`: 1 = sample std), the value alone for one
    value, "-" for none; None and NaN entries (a metric a run did not log) are left out."""
    v = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "-"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(float(np.mean(v)))} ± {fmt.format(float(np.std(v, ddof=ddof)))}"


def plot_metrics(jsonl_path: str, png_path: str, keys: Sequence[str] | None = None, title: str = "",
                 x: str = "step") -> str:
    """One subplot per metric (all numeric keys by default) against `x`; Agg backend; returns png_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    if keys is None:
        keys = sorted({k for r in rows for k, v in r.items() if k != x and isinstance(v, (int, float))
                       and not isinstance(v, bool)})
    keys = list(keys) or ["(none)"]
    n = len(keys)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r[x], r[k]) for r in rows if k in r and x in r and isinstance(r[k], (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 30 else None)
        ax.set_xlabel(x)
        ax.set_ylabel(k)
        ax.set_title(k, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def write_json(path: str, obj) -> None:
    """Write JSON atomically (tmp file + rename): a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


_COMPLETE = "COMPLETE"  # written last into a checkpoint: a directory without it is an interrupted save


def save_checkpoint(ckpt_dir: str, model=None, tok=None, optimizer=None, step: int = 0, extra: dict | None = None,
                    modules: dict | None = None) -> str:
    """Save a resumable training state atomically to `ckpt_dir`:
    model/ (save_pretrained, loadable with load_lm), optimizer.pt, state.pt (step, RNG states,
    `extra`, and the state_dicts of any other `modules` such as a router or value head), and last a
    COMPLETE marker. Written to a temporary sibling directory and renamed; the previous checkpoint is
    kept as `<ckpt_dir>.old` until the new one is in place, so a kill at any moment leaves at least one
    complete checkpoint that `find_checkpoint` finds. Temp dirs of earlier, killed saves are removed.
    Put everything the next step depends on into `extra` (generator states, buffers, counters).
    """
    if not is_main():
        return ckpt_dir
    base = ckpt_dir.rstrip("/")
    parent = os.path.dirname(os.path.abspath(base))
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        if name.startswith(os.path.basename(base) + ".tmp"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = base + f".tmp{os.getpid()}"
    os.makedirs(tmp)
    if model is not None:
        m = model.module if hasattr(model, "module") else model
        m.save_pretrained(os.path.join(tmp, "model"))
        if tok is not None:
            tok.save_pretrained(os.path.join(tmp, "model"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    state = {"step": step, "extra": extra or {}, "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
             "torch_rng": torch.get_rng_state(),
             "modules": {k: v.state_dict() for k, v in (modules or {}).items()}}
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, _COMPLETE), "w") as f:
        f.write(json.dumps({"step": step}))
    old = base + ".old"
    if os.path.isfile(os.path.join(base, _COMPLETE)):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(base, old)
    else:  # an incomplete dir under the final name (a legacy or damaged save): never the fallback
        shutil.rmtree(base, ignore_errors=True)
    os.replace(tmp, base)
    shutil.rmtree(old, ignore_errors=True)
    _LAST_CHECKPOINT.update(dir=base, step=step)
    return base


def _checkpoint_step(path: str) -> int | None:
    try:
        with open(os.path.join(path, _COMPLETE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_step(ckpt_dir: str) -> int | None:
    """The step of the checkpoint `load_checkpoint(ckpt_dir)` would restore, or None; reads only its marker."""
    path = find_checkpoint(ckpt_dir)
    return None if path is None else _checkpoint_step(path)


def find_checkpoint(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint among `ckpt_dir`, `<ckpt_dir>.old` and temp dirs of a save
    killed after its marker, or None. A save killed half-way leaves no marker and is skipped: resume
    falls back to the previous checkpoint."""
    base = ckpt_dir.rstrip("/")
    parent = os.path.dirname(os.path.abspath(base))
    if not os.path.isdir(parent):
        return None
    stem = os.path.basename(base)
    cands = [os.path.join(parent, n) for n in os.listdir(parent)
             if n == stem or n == stem + ".old" or n.startswith(stem + ".tmp")]
    steps = [(s, p) for p in cands if (s := _checkpoint_step(p)) is not None]
    if not steps:
        return None
    return max(steps, key=lambda sp: (sp[0], sp[1] == base))[1]


def load_file(path: str, load: Callable = lambda p: torch.load(p, weights_only=False, map_location="cpu")):
    """`load(path)`, with a file that is truncated, garbage or unreadable turned into one UserError naming it."""
    try:
        return load(path)
    except Exception as e:  # truncated zip, unpickling garbage, permission denied...
        raise UserError(f"checkpoint file '{path}' is corrupt or unreadable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}); delete that checkpoint directory to fall "
                        f"back to the previous one, or start again with --overwrite") from None


def load_checkpoint(ckpt_dir: str, model=None, optimizer=None, modules: dict | None = None) -> dict:
    """Restore the newest complete checkpoint at `ckpt_dir` (see find_checkpoint): weights into `model`
    in place, optimizer, python / numpy / torch RNG states, other modules; returns the state dict with
    "step" and "extra" (and "path", the directory it came from). No complete checkpoint, or a
    corrupt file -> one UserError naming it."""
    path = find_checkpoint(ckpt_dir)
    if path is None:
        raise UserError(f"no checkpoint at '{ckpt_dir}' (none complete) to resume from; run without --resume to start fresh")
    state = load_file(os.path.join(path, "state.pt"))
    if model is not None and os.path.isdir(os.path.join(path, "model")):
        from transformers import AutoModelForCausalLM

        m = model.module if hasattr(model, "module") else model
        saved = load_file(os.path.join(path, "model"),
                           lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
        m.load_state_dict(saved.state_dict())
    if optimizer is not None and os.path.isfile(os.path.join(path, "optimizer.pt")):
        optimizer.load_state_dict(load_file(os.path.join(path, "optimizer.pt")))
    for k, v in (modules or {}).items():
        if k in state["modules"]:
            v.load_state_dict(state["modules"][k])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    state["path"] = path
    _LAST_CHECKPOINT.update(dir=path, step=state["step"])
    return state


# ---------------------------------------------------------------------------------------------
# ---- runs: output directory, resume policy, data files ----
# ---------------------------------------------------------------------------------------------

ALWAYS_IGNORED = ("resume", "overwrite", "output_dir")


def _writable_dir(path: str) -> None:
    """UserError unless `path` exists as a writable directory or can be created (nothing is created)."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise UserError(f"--output_dir '{path}' is a file; pass a directory")
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p) or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir '{path}' is not writable ('{p}' refuses writes); pass a directory you can write")


def _differences(old: dict, new: dict, ignore: Sequence[str]) -> list[str]:
    skip = set(ALWAYS_IGNORED) | set(ignore)
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k in skip:
            continue
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if json.loads(json.dumps(a, default=str)) != json.loads(json.dumps(b, default=str)):
            diffs.append(f"--{k} {a} -> {b}")
    return diffs


def start_run(args, has_checkpoint: bool, ignore: Sequence[str] = ()) -> None:
    """The output-directory policy; call after validate_args and the preflight, before any write.

    - `--resume` with `--overwrite`: refused.
    - An unwritable `--output_dir` (or a file of that name): refused.
    - A fresh run into a directory that holds a run (args.json): refused, unless `--overwrite`, which
      deletes that previous run directory first. A directory without args.json is used as is.
    - `--resume`: refused without a previous run (args.json) or without `has_checkpoint` (the caller's
      word: its checkpoint or finished parts exist), and refused when a flag that changes results
      differs from the stored args.json (every flag except ALWAYS_IGNORED and `ignore`), naming each.
    Then writes args.json (rank 0, fresh runs; a resumed run keeps the original). Under torchrun every
    rank calls it: rank 0 decides, and the other ranks raise its refusal too.
    """
    err = None
    if is_main():
        try:
            _start_run_main(args, has_checkpoint, ignore)
        except UserError as e:
            err = e
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # rank 0 decides; under torchrun the other ranks stop with its refusal instead of waiting for it
        # at the first collective until the timeout
        flag = torch.tensor([float(err is not None)])
        torch.distributed.all_reduce(flag)
        if err is None and flag.item() > 0:
            raise UserError(f"rank 0 refused --output_dir '{args.output_dir}' (its message is above)")
    if err is not None:
        raise err


def _start_run_main(args, has_checkpoint: bool, ignore: Sequence[str]) -> None:
    out = args.output_dir
    resume, overwrite = bool(getattr(args, "resume", False)), bool(getattr(args, "overwrite", False))
    require(not (resume and overwrite), "--resume and --overwrite exclude each other; pass one")
    _writable_dir(out)
    args_path = os.path.join(out, "args.json")
    now = json.loads(json.dumps(vars(args), default=str))
    if resume:
        require(os.path.isfile(args_path), f"--resume: '{out}' holds no run (no args.json); run without --resume")
        try:
            with open(args_path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--resume: '{args_path}' is unreadable ({e}); start again with --overwrite") from None
        require(has_checkpoint, f"--resume: '{out}' has no checkpoint yet; start again with --overwrite")
        diffs = _differences(old, now, ignore)
        require(not diffs, f"--resume: flags differ from the run in '{out}': {'; '.join(diffs)}; pass the same flags, "
                           f"or --overwrite / another --output_dir for a new run")
        return
    if os.path.isfile(args_path):
        require(overwrite, f"'{out}' already holds a run (args.json); pass --resume to continue it, --overwrite to "
                           f"replace it, or another --output_dir")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    write_json(args_path, now)


def read_text_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file (newlines stripped); a missing, unreadable or non-UTF-8 file raises
    one UserError naming it (and the line of the first bad byte)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read data file '{path}' ({e.strerror}); check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#x}); re-encode the file as UTF-8") from None
    return text.splitlines()


def preflight_model(name_or_path: str | None) -> None:
    """Before any work: the model path exists (or the hub id resolves) and its config loads."""
    if not name_or_path:
        return
    check_model_path(name_or_path)
    from transformers import AutoConfig

    p = os.path.expanduser(str(name_or_path))
    try:
        AutoConfig.from_pretrained(p)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if os.path.isdir(p):
            raise UserError(f"'{name_or_path}' is a folder but not a loadable model ({first}); pass a save_pretrained "
                            f"directory (config.json + weights)") from None
        raise UserError(f"cannot load model '{name_or_path}' ({first}); if this machine is offline, download it first "
                        f"(huggingface-cli download {name_or_path}) or pass a local checkpoint directory") from None


def preflight_endpoint(llm, route: str = "chat", deadline: float = 30.0, extra_body: dict | None = None) -> None:
    """Before any work: one tiny request (1 token) on the route the run will use ("chat" or
    "completions"), with the run's `extra_body` (e.g. a JSON-mode response_format), so an unreachable
    or misconfigured endpoint fails in seconds, not after minutes of other work. A local LLM passes."""
    client = llm.client if isinstance(llm, LLM) else llm
    if client is None:
        return
    require(route in ("chat", "completions"), f"preflight_endpoint: route must be chat or completions, not {route}")
    probe = ChatClient(client.base_url, client.model, client.api_key, timeout=min(client.timeout, deadline),
                       deadline=deadline, max_retries=1, backoff=0.5)
    kw = {"extra_body": extra_body} if extra_body else {}
    if route == "chat":
        probe.chat([{"role": "user", "content": "Say OK."}], n=1, temperature=0.0, max_tokens=1, **kw)
    else:
        probe.complete("Say OK.", n=1, temperature=0.0, max_tokens=1, **kw)


# ---------------------------------------------------------------------------------------------
# ---- LLMs: endpoint client, one text interface, a local server ----
# ---------------------------------------------------------------------------------------------


class EndpointError(UserError):
    """An OpenAI-compatible endpoint was unreachable, or kept failing / answering garbage."""


class ChatClient:
    """Client for any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, hosted APIs).

    Stdlib HTTP only. Each attempt has a wall-clock limit (`timeout`, body included: a server that
    trickles bytes does not keep it alive) and each request an overall `deadline` over all its
    attempts. Retries with exponential backoff on 429, 5xx, connection and transport errors (a
    truncated body, a garbage status line) and on a 200 answer that is not the expected JSON;
    Retry-After is honoured up to `max_retry_after` seconds. When it gives up: one EndpointError
    that names the URL, what went wrong and the fix (401/403 key, 404 route or model, 429 rate, 5xx
    server, refused connection, timeout). A server that answers fewer than `n` choices (Ollama
    ignores `n`) is asked again for the missing ones, so `chat` / `complete` return exactly n texts.
    `usage` counts calls, retries and tokens (as the server reports them).

    base_url: "http://host:8000" gets "/v1" appended; a URL with a path is used as given
    ("http://host:8000/v1", "https://generativelanguage.googleapis.com/v1beta/openai").
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 4, backoff: float = 1.0, deadline: float | None = 600.0,
                 max_retry_after: float = 60.0):
        import urllib.parse

        self.base_url = base_url.rstrip("/")
        if urllib.parse.urlsplit(self.base_url).path in ("", "/"):
            self.base_url += "/v1"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff = max_retries, backoff
        self.deadline, self.max_retry_after = deadline, max_retry_after
        self.usage = {"calls": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    @staticmethod
    def _attempt(url: str, data: bytes, headers: dict, limit: float) -> tuple[int, dict, bytes]:
        """One POST with a wall-clock limit on the whole exchange: a timer shuts the socket at `limit`
        seconds, so a server that trickles its status line, headers or body cannot hold us (a socket
        timeout alone restarts with every byte). Returns (status, headers, body)."""
        import http.client
        import urllib.parse

        u = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = cls(u.hostname, u.port, timeout=limit)
        fired = threading.Event()

        def cut():
            fired.set()
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(limit, cut)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), body=data, headers=headers)
            r = conn.getresponse()
            return r.status, dict(r.headers), r.read()
        except (OSError, http.client.HTTPException):
            if fired.is_set():
                raise TimeoutError(f"no complete answer within {limit:g}s (timed out)") from None
            raise
        finally:
            timer.cancel()
            conn.close()

    def _advice(self, url: str, code: int | None, last: str) -> str:
        if code in (401, 403):
            return f"{url} refused the API key ({last}); set the right key in the --*_api_key_env variable"
        if code == 404:
            return (f"{url} has no such route or model ({last}); check the base URL (does the server serve this "
                    f"route?) and the model name '{self.model}'")
        if code is not None and 400 <= code < 500 and code != 429:
            return f"{url} rejected the request ({last}); check the model name '{self.model}' and the request parameters"
        if code == 429:
            return f"{url} kept rate-limiting ({last}); lower the request concurrency or wait and --resume"
        if code is not None and code >= 500:
            return f"{url} kept failing with a server error ({last}); check the server's log"
        if "refused" in last.lower() or "name or service" in last.lower() or "nodename" in last.lower():
            return (f"nothing answers at {url} ({last}); start the server (e.g. vllm serve {self.model}) or pass the "
                    f"right --*_api_base")
        if "timed out" in last.lower() or "timeout" in last.lower() or "slowly" in last.lower():
            return (f"{url} did not answer in time ({last}); the server is hung or overloaded: check it, or raise "
                    f"--request_timeout")
        return f"{url} failed ({last}); check the server and the --*_api_base / model flags"

    def _post(self, route: str, payload: dict) -> dict:
        import http.client

        url = f"{self.base_url}/{route}"
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        t_end = time.monotonic() + (self.deadline if self.deadline else float("inf"))
        last, code, tries = "", None, 0
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt
            left = t_end - time.monotonic()
            if left <= 0:
                last = f"deadline of {self.deadline:g}s passed; {last}" if last else f"deadline of {self.deadline:g}s passed"
                break
            tries += 1
            limit = min(self.timeout, left)
            code = None
            try:
                status, rh, body = self._attempt(url, data, headers, limit)
            except (ConnectionError, socket.timeout, TimeoutError, OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if status == 200:
                    try:
                        out = json.loads(body)
                        if not isinstance(out, dict) or not isinstance(out.get("choices"), list) or not out["choices"]:
                            raise ValueError("no 'choices' list")
                    except ValueError as e:
                        last = f"malformed response ({e}): {body[:120]!r}"
                    else:
                        with self._lock:
                            self.usage["calls"] += 1
                            for k in ("prompt_tokens", "completion_tokens"):
                                self.usage[k] += int((out.get("usage") or {}).get(k, 0) or 0)
                        return out
                else:
                    code = status
                    last = f"HTTP {status}: {body[:200]!r}"
                    if status != 429 and status < 500:  # 4xx other than 429: our request is wrong, retrying won't help
                        raise EndpointError(self._advice(url, status, last))
                    ra = {k.lower(): v for k, v in rh.items()}.get("retry-after")
                    if ra:
                        try:
                            wait = max(wait, min(float(ra), self.max_retry_after))
                        except ValueError:
                            pass
            if attempt < self.max_retries:
                wait = min(wait, max(0.0, t_end - time.monotonic()))
                with self._lock:
                    self.usage["retries"] += 1
                time.sleep(wait)
        raise EndpointError(self._advice(url, code, f"{last}; {tries} tries"))

    def _n_choices(self, route: str, payload: dict, n: int, read: Callable[[dict], str], what: str):
        """Exactly n (text, finish_reason) pairs: the missing ones are asked for again with
        n = missing (with seed + k when a seed is set, so a top-up is not a replay of the same
        samples). Each answer has >= 1 choice (_post checks), so n requests always suffice; a server
        still short after them raises one EndpointError."""
        texts, reasons = [], []
        for _ in range(max(1, n)):
            if len(texts) >= n:
                break
            p = dict(payload, n=n - len(texts))
            if texts and payload.get("seed") is not None:
                p["seed"] = payload["seed"] + len(texts)
            out = self._post(route, p)
            try:
                for c in sorted(out["choices"], key=lambda c: c.get("index", 0)):
                    texts.append(read(c) or "")
                    reasons.append(c.get("finish_reason"))
            except (KeyError, TypeError, AttributeError):
                raise EndpointError(f"{self.base_url}/{route} answered without {what}") from None
        if len(texts) < n:
            raise EndpointError(f"{self.base_url}/{route} returned {len(texts)} of n={n} choices after {n} requests")
        return texts[:n], reasons[:n]

    def chat(self, messages: list[dict], n: int = 1, temperature: float = 1.0, max_tokens: int = 256,
             top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
             extra_body: dict | None = None, return_finish: bool = False):
        """n sampled assistant replies to one conversation (/v1/chat/completions). `extra_body` is
        merged into the request (e.g. {"response_format": {"type": "json_object"}}).
        Returns [str] * n; with return_finish, ([str] * n, [finish_reason] * n) ("stop", "length"
        where max_tokens cut the reply, or None where the server gives none)."""
        payload = {"model": self.model, "messages": messages, "n": n, "temperature": temperature,
                   "max_tokens": max_tokens, "top_p": top_p, **(extra_body or {})}
        if stop:
            payload["stop"] = list(stop)
        if seed is not None:
            payload["seed"] = seed
        texts, reasons = self._n_choices("chat/completions", payload, n, lambda c: c["message"]["content"],
                                         "choices[].message.content")
        return (texts, reasons) if return_finish else texts

    def complete(self, prompt: str, n: int = 1, temperature: float = 1.0, max_tokens: int = 256, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None, extra_body: dict | None = None,
                 return_finish: bool = False):
        """n sampled raw continuations of a text prompt (/v1/completions; no chat template).
        Returns [str] * n; with return_finish, also the n finish reasons (as `chat`)."""
        payload = {"model": self.model, "prompt": prompt, "n": n, "temperature": temperature,
                   "max_tokens": max_tokens, "top_p": top_p, **(extra_body or {})}
        if stop:
            payload["stop"] = list(stop)
        if seed is not None:
            payload["seed"] = seed
        texts, reasons = self._n_choices("completions", payload, n, lambda c: c["text"], "choices[].text")
        return (texts, reasons) if return_finish else texts


def first_json_object(text: str):
    """The first balanced {...} in `text` that parses as a JSON object (strings and escapes respected), so an
    LLM reply with prose around its JSON still parses; ValueError if there is none."""
    start = text.find("{")
    while start != -1:
        depth, in_str, esc = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start:i + 1])
                    except json.JSONDecodeError:
                        break
                    if isinstance(obj, dict):
                        return obj
                    break
        start = text.find("{", start + 1)
    raise ValueError("no JSON object found in the reply")


def render_chat(tok, messages: list[dict]) -> str:
    """A conversation as the text a local model continues: the tokenizer's chat template with the
    assistant turn opened, or a plain "role: content" rendering when it has none."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class LLM:
    """One text-in / text-out interface over a local HF model or an OpenAI-compatible endpoint.

        llm = LLM.from_hf("path/or/hub-id")            or  LLM(model=m, tokenizer=tok)
        llm = LLM.from_endpoint("http://localhost:8000/v1", "Qwen/Qwen3-8B")
        llm.complete(["prefix text", ...], n=4, temperature=1.0, max_tokens=32) -> [[str] * 4, ...]
        llm.chat([[{"role": "user", "content": "..."}], ...], n=1) -> [[str], ...]

    A caller gets text only: nothing here exposes logits, which is what "black-box" means for the
    methods that use it. Local chat uses the tokenizer's chat template when it has one, else a plain
    "role: content" rendering. `usage` counts calls and tokens for summary.json.

    Finish reasons: after each call `last_finish_reasons` holds, shaped like its result, "stop" or
    "length" per text ("length": cut at max_tokens, not an ended reply: pass
    add_eos=[r != "length" ...] to encode_pairs); `return_finish=True` returns (texts, reasons).
    """

    def __init__(self, model=None, tokenizer=None, client: ChatClient | None = None, batch_size: int = 64,
                 max_workers: int = 8, seed: int = 0):
        if (model is None) == (client is None):
            raise ValueError("LLM needs exactly one of model (+ tokenizer) or client")
        self._model, self._tok, self.client = model, tokenizer, client
        self.batch_size, self.max_workers = batch_size, max_workers
        self._gen = torch.Generator(device=next(model.parameters()).device if model is not None else "cpu").manual_seed(seed)
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.last_finish_reasons: list[list[str | None]] = []

    @classmethod
    def from_hf(cls, name_or_path: str, dtype=None, device=None, **kw) -> "LLM":
        model, tok = load_lm(name_or_path, dtype=dtype, device=device or pick_device())
        return cls(model=model, tokenizer=tok, **kw)

    @classmethod
    def from_endpoint(cls, base_url: str, model: str, api_key: str | None = None, **kw) -> "LLM":
        client_kw = {k: kw.pop(k) for k in ("timeout", "max_retries", "backoff", "deadline", "max_retry_after")
                     if k in kw}
        return cls(client=ChatClient(base_url, model, api_key, **client_kw), **kw)

    def rng_state(self) -> torch.Tensor:
        """The local sampler's generator state (for a checkpoint); endpoints sample on the server."""
        return self._gen.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._gen.set_state(state)

    def reseed(self, seed: int) -> None:
        """Restart local sampling from `seed` (a resumed run replays the same samples). Endpoints
        sample on the server; their seeding is the server's."""
        self._gen.manual_seed(seed)

    @property
    def is_local(self) -> bool:
        return self._model is not None

    @property
    def name(self) -> str:
        return self.client.model if self.client else getattr(self._model.config, "_name_or_path", "local")

    def render_chat(self, messages: list[dict]) -> str:
        return render_chat(self._tok, messages)

    def _local(self, texts: list[str], n: int, temperature: float, max_tokens: int, top_p: float,
               stop: Sequence[str] | None) -> list[list[str]]:
        flat = [t for t in texts for _ in range(n)]
        outs, reasons = [], []
        for i in range(0, len(flat), self.batch_size):
            g = generate(self._model, self._tok, flat[i:i + self.batch_size], max_new_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, generator=self._gen, stop_strings=tuple(stop or ()))
            outs += g.texts
            reasons += g.finish_reasons
            self.usage["completion_tokens"] += int(g.response_mask.sum())
            self.usage["prompt_tokens"] += int(g.attention_mask[:, :g.prompt_len].sum())
        self.usage["calls"] += len(texts)
        self.last_finish_reasons = [reasons[j * n:(j + 1) * n] for j in range(len(texts))]
        return [outs[j * n:(j + 1) * n] for j in range(len(texts))]

    def _remote(self, fn, items, **kw) -> list[list[str]]:
        from concurrent.futures import ThreadPoolExecutor

        before = dict(self.client.usage)
        ex = ThreadPoolExecutor(max_workers=self.max_workers)  # concurrent requests, order kept
        try:
            res = list(ex.map(lambda x: fn(x, return_finish=True, **kw), items))
        except BaseException:  # Ctrl-C or a failed request: drop queued requests, don't wait for running ones
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
        for k in self.usage:  # add this call's share (a resumed run may have restored earlier counts)
            self.usage[k] += self.client.usage.get(k, 0) - before.get(k, 0)
        self.last_finish_reasons = [r for _, r in res]
        return [t for t, _ in res]

    def complete(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, max_tokens: int = 256,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, extra_body: dict | None = None,
                 return_finish: bool = False):
        """n raw continuations for each prompt (no chat template). `extra_body` goes to endpoints only.
        Returns [[str] * n per prompt]; with return_finish, (that, the same-shaped finish reasons)."""
        prompts = list(prompts)
        if self.client is not None:
            out = self._remote(self.client.complete, prompts, n=n, temperature=temperature, max_tokens=max_tokens,
                               top_p=top_p, stop=stop, extra_body=extra_body)
        else:
            out = self._local(prompts, n, temperature, max_tokens, top_p, stop)
        return (out, self.last_finish_reasons) if return_finish else out

    def chat(self, conversations: Sequence[list[dict] | str], n: int = 1, temperature: float = 1.0,
             max_tokens: int = 256, top_p: float = 1.0, stop: Sequence[str] | None = None,
             extra_body: dict | None = None, return_finish: bool = False):
        """n replies for each conversation (a list of {"role", "content"} dicts, or a user string).
        `extra_body` (e.g. JSON mode) goes to endpoints only; a local model ignores it.
        Returns [[str] * n per conversation]; with return_finish, also the finish reasons."""
        convs = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in conversations]
        if self.client is not None:
            out = self._remote(self.client.chat, convs, n=n, temperature=temperature, max_tokens=max_tokens,
                               top_p=top_p, stop=stop, extra_body=extra_body)
        else:
            out = self._local([self.render_chat(c) for c in convs], n, temperature, max_tokens, top_p, stop)
        return (out, self.last_finish_reasons) if return_finish else out


def serve_openai(llm: LLM, host: str = "127.0.0.1", port: int = 0, model_name: str = "local"):
    """Serve a local `LLM` as an OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions,
    /v1/models) in a background thread. Returns the server; `server.url` is its base URL
    ("http://127.0.0.1:PORT/v1"); `server.shutdown()` stops it. Requests are served one at a time
    (the model is not thread-safe). Used by tests and `python common.py --serve`.
    """
    lock = threading.Lock()

    def _with_reasons(outs: list[list[str]]) -> list[tuple[str, str]]:
        """Flat (text, finish_reason) pairs of one LLM call ("stop" where the LLM gives none)."""
        reasons = getattr(llm, "last_finish_reasons", None) or []
        return [(t, (reasons[j][i] if j < len(reasons) and i < len(reasons[j]) else None) or "stop")
                for j, o in enumerate(outs) for i, t in enumerate(o)]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, obj: dict):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                return self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            # A bad request gets a 400 with a JSON error (as OpenAI servers answer), a failure
            # inside the model a 500: never a dropped connection, which clients read as "server down".
            try:
                n_bytes = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(n_bytes) if n_bytes > 0 else b""
            except (ValueError, OSError):
                return self._send(400, {"error": {"message": "bad Content-Length", "type": "invalid_request_error"}})
            try:
                kw, route, items = self._parse(raw)
            except ValueError as e:
                return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            if route is None:
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                with lock:
                    before = dict(llm.usage)
                    if route == "chat":
                        outs = llm.chat([items], **kw)
                        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                                   for i, (t, r) in enumerate(_with_reasons(outs))]
                    else:
                        outs = llm.complete(items, **kw)
                        choices = [{"index": i, "text": t, "finish_reason": r}
                                   for i, (t, r) in enumerate(_with_reasons(outs))]
                    usage = {k: llm.usage[k] - before.get(k, 0) for k in ("prompt_tokens", "completion_tokens")}
            except Exception as e:  # noqa: BLE001 (the server thread must answer whatever went wrong)
                return self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"[:500], "type": "server_error"}})
            self._send(200, {"id": "cmpl-local", "object": "completion", "model": model_name, "choices": choices,
                             "usage": usage})

        def _parse(self, raw: bytes):
            """-> (sampling kwargs, "chat" | "completions" | None, messages or prompts);
            ValueError with a message for the client on anything malformed."""
            path = self.path.split("?")[0].rstrip("/")
            route = "chat" if path.endswith("/chat/completions") else "completions" if path.endswith("/completions") else None
            if route is None:
                return None, None, None
            try:
                req = json.loads(raw or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError("body is not JSON") from None
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")

            def get(k, default):  # JSON null = not given
                return default if req.get(k) is None else req[k]

            try:
                kw = dict(n=int(get("n", 1)), temperature=float(get("temperature", 1.0)),
                          max_tokens=int(get("max_tokens", get("max_completion_tokens", 256))),
                          top_p=float(get("top_p", 1.0)), stop=req.get("stop"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"bad sampling parameter ({e})") from None
            if kw["n"] < 1 or kw["max_tokens"] < 1:
                raise ValueError("n and max_tokens must be >= 1")
            if isinstance(kw["stop"], str):
                kw["stop"] = [kw["stop"]]
            if kw["stop"] is not None and not (isinstance(kw["stop"], list) and all(isinstance(x, str) for x in kw["stop"])):
                raise ValueError("stop must be a string or a list of strings")
            if route == "chat":
                msgs = req.get("messages")
                if not (isinstance(msgs, list) and msgs and all(
                        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in msgs)):
                    raise ValueError("messages must be a non-empty list of {role, content} objects with string content")
                return kw, "chat", msgs
            prompt = req.get("prompt", "")
            prompts = prompt if isinstance(prompt, list) else [prompt]
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
            return kw, "completions", prompts

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.url = f"http://{host}:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------------------------------------
# ---- command line: toy table, benchmark, server ----
# ---------------------------------------------------------------------------------------------


def toy_table(paths: dict[str, str], n: int = 300) -> list[dict]:
    """Greedy held-out accuracy of each toy model per domain (in-distribution) and out of distribution."""
    rows = []
    for role, path in paths.items():
        model, tok = load_lm(path)
        row = {"role": role}
        for d in TOY_DOMAINS:
            row[f"{d}/id"] = evaluate_accuracy(model, tok, toy_dataset("id", n, seed=1, domains=(d,)))
        row["all/id"] = sum(row[f"{d}/id"] for d in TOY_DOMAINS) / len(TOY_DOMAINS)
        row["all/ood"] = evaluate_accuracy(model, tok, toy_dataset("ood", n, seed=1, domains=tuple(TOY_DOMAINS)))
        rows.append(row)
    return rows


BENCH_SHAPES = {  # random-weight models of real shapes, built from a config (no download)
    "tiny": None,
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def _bench(args) -> None:
    """tokens/s of `generate` vs HF `generate`, and peak memory of token_logprobs vs the naive way."""
    import subprocess
    import types

    from transformers import AutoConfig, AutoModelForCausalLM

    device = pick_device()
    set_cpu_threads(args.threads)
    byte_tok = tiny_lm()[1]
    if args.bench_model == "tiny":
        model = tiny_lm()[0]
    elif args.bench_model in BENCH_SHAPES:
        cfg = dict(BENCH_SHAPES[args.bench_model])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.bench_model))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(device=device, dtype=dtype).eval()
    ids, mask = encode_prompts(byte_tok, ["add 31415926="] * args.batch, device)
    T = args.new_tokens
    # No EOS for either path: every row produces exactly T tokens, so tokens/s compare like for like.
    no_eos = types.SimpleNamespace(eos_token_id=None, pad_token_id=0, decode=lambda ids, **kw: "")
    model.generation_config.eos_token_id = None

    def timed(fn):
        fn()  # warm-up (compilation, CUDA graphs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        n = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.time() - t0)

    hf = timed(lambda: (model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=True,
                                       pad_token_id=0).shape[1] - ids.shape[1]) * args.batch)
    ours = timed(lambda: int(generate(model, no_eos, input_ids=ids, attention_mask=mask, max_new_tokens=T,
                                      generator=torch.Generator(device).manual_seed(0)).response_mask.sum()))
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu, '}"
          f"{'' if device.type == 'cuda' else f'{torch.get_num_threads()} thread(s)'}) model={args.bench_model} "
          f"dtype={dtype} batch={args.batch} new_tokens={T}")
    print(f"  HF generate (sampling)      {hf:10.0f} tok/s")
    print(f"  common.generate             {ours:10.0f} tok/s   ({ours / hf:.2f}x)"
          f"{'  static cache + torch.compile decode' if device.type == 'cuda' else '  dynamic cache'}")

    # token_logprobs memory at vocab 151,936: run each way in a fresh subprocess, read its peak RSS
    # (CPU) or torch.cuda.max_memory_allocated (GPU).
    code = (
        "import sys,torch,resource,common;from transformers import LlamaConfig,LlamaForCausalLM;"
        "torch.set_num_threads(1);B,T,mode=int(sys.argv[1]),int(sys.argv[2]),sys.argv[3];"
        "dev=common.pick_device();"
        "m=LlamaForCausalLM(LlamaConfig(vocab_size=151936,hidden_size=64,intermediate_size=128,num_hidden_layers=1,"
        "num_attention_heads=2,num_key_value_heads=2,tie_word_embeddings=True)).to(dev).eval();"
        "ids=torch.randint(0,151936,(B,T),device=dev);am=torch.ones_like(ids);"
        "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "torch.cuda.reset_peak_memory_stats() if dev.type=='cuda' else None;\n"
        "with torch.no_grad():\n"
        " if mode=='naive':\n"
        "  lp=torch.log_softmax(m(input_ids=ids,attention_mask=am).logits.float(),-1)[:,:-1].gather(-1,ids[:,1:,None])\n"
        " else:\n"
        "  lp=common.token_logprobs(m,ids,am,chunk_size=512)\n"
        "peak=(torch.cuda.max_memory_allocated()/2**30) if dev.type=='cuda' else "
        "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)/2**20;print(f'{peak:.2f}')")
    here = os.path.dirname(os.path.abspath(__file__))
    Tl = args.mem_len
    print(f"peak extra memory (GiB) of per-token log-probs at V=151,936, T={Tl} (1-layer d=64 model: the LM head "
          f"and the softmax dominate):")
    for mode, B in (("chunked", args.mem_batch), ("naive", args.mem_naive_batch), ("naive", args.mem_batch)):
        if mode == "naive" and B * Tl * 151936 * 8 > 0.6 * _total_memory():
            print(f"  {mode:8s} B={B:3d}: not run (needs ~{B * Tl * 151936 * 8 / 2**30:.0f} GiB: logits + log_softmax "
                  f"in fp32; this machine has {_total_memory() / 2**30:.0f} GiB)")
            continue
        r = subprocess.run([sys.executable, "-c", code, str(B), str(Tl), mode], capture_output=True, text=True, cwd=here)
        res = r.stdout.strip() or f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
        print(f"  {'common.token_logprobs' if mode == 'chunked' else 'naive log_softmax+gather':26s} B={B:3d}: {res}")


def _total_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cli(argv=None):
    ap = argparse.ArgumentParser(description="Build the toy checkpoints and print their accuracy; or benchmark "
                                 "sampling / log-probs; or serve a checkpoint as an OpenAI-compatible endpoint.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cache_dir", default=None, help="toy checkpoint cache (default $NANOPAPERS_CACHE or ~/.cache/nanopapers)")
    ap.add_argument("--roles", default=",".join(TOY_ROLES), help="comma-separated toy roles to build")
    ap.add_argument("--workers", type=int, default=2, help="parallel build processes (one torch thread each)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    ap.add_argument("--eval_size", type=int, default=300, help="held-out problems per domain / split")
    # benchmark
    ap.add_argument("--bench", action="store_true", help="benchmark generate vs HF generate, and log-prob memory")
    ap.add_argument("--bench_model", default="tiny", help=f"random-weight model: one of {list(BENCH_SHAPES)} or a "
                    "local config dir")
    ap.add_argument("--batch", type=int, default=64, help="benchmark batch size")
    ap.add_argument("--new_tokens", type=int, default=64, help="benchmark new tokens per row")
    ap.add_argument("--mem_batch", type=int, default=16, help="B for the log-prob memory check")
    ap.add_argument("--mem_len", type=int, default=1024, help="T for the log-prob memory check")
    ap.add_argument("--mem_naive_batch", type=int, default=2, help="B at which the naive way is also measured")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    # serve
    ap.add_argument("--serve", default=None, metavar="PATH", help="serve this checkpoint (or toy role name) over HTTP")
    ap.add_argument("--port", type=int, default=8000, help="port for --serve")
    args = ap.parse_args(argv)
    if args.bench:
        return _bench(args)
    if args.serve:
        set_cpu_threads(args.threads)
        path = toy_checkpoint(args.serve, args.cache_dir) if args.serve in TOY_ROLES else args.serve
        server = serve_openai(LLM.from_hf(path), port=args.port, model_name=args.serve)
        print(f"serving {path} at {server.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()
        return
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    for r in roles:
        if r not in TOY_ROLES:
            raise UserError(f"unknown toy role '{r}'; use some of {','.join(TOY_ROLES)}")
    t0 = time.time()
    paths = toy_checkpoints(roles, args.cache_dir, workers=args.workers, rebuild=args.rebuild)
    t1 = time.time()
    set_cpu_threads(args.threads)
    rows = toy_table(paths, args.eval_size)
    cols = [f"{d}/id" for d in TOY_DOMAINS] + ["all/id", "all/ood"]
    print(f"\ngreedy held-out accuracy ({args.eval_size} problems per cell; id = 3-6 steps, ood = 7-8 steps)")
    print(f"{'role':<12}" + "".join(f"{c:>9}" for c in cols))
    for row in rows:
        print(f"{row['role']:<12}" + "".join(f"{row[c]:9.3f}" for c in cols))
    print(f"\nbuild {t1 - t0:.0f}s, eval {time.time() - t1:.0f}s; cache {toy_cache_dir(args.cache_dir)}")


if __name__ == "__main__":
    with exit_on_user_error():
        _cli()
