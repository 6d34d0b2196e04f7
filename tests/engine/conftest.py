"""Shared fixtures: tiny random checkpoints saved to disk, loaded through from_pretrained."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM

from dynabatch.wire import models

# Without CUDA, Triton kernels run only in its interpreter, which triton.jit picks when a kernel
# is defined, triton.language's own helpers included: so set it before triton is first imported
# (test_triton_decode.py checks it took effect).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def save_tiny(name: str, path: Path) -> Path:
    torch.manual_seed(1234)
    net = AutoModelForCausalLM.from_config(models.load_config(name))
    net.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("tiny-random-llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("tiny-random-qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Tiny models: OpenMP threads only contend (ms per op on a busy 2-core CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def needs_cuda(fn):
    """A CUDA-only test: marked gpu, skipped without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return pytest.mark.gpu(skip(fn))


def interpreted_module(name: str) -> ModuleType:
    """dynabatch.worker_svc.engine.<name> with its Triton kernels in the interpreter (CPU
    tensors); skips the test when triton was imported without TRITON_INTERPRET=1."""
    import triton.language.standard as std

    if type(std.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (CUDA present, or imported "
                    "before tests/engine/conftest.py set it)")
    return importlib.import_module(f"dynabatch.worker_svc.engine.{name}")
