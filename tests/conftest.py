"""Tiny random models built in code, once per session (the mergekit habit). No downloads."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"

from pkt.testing import make_llama, make_qwen2, make_tokenizer, save_model  # noqa: F401


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    """A 4-layer, width-96 Llama saved as a HF directory (the 'larger' model)."""
    return save_model(make_llama(hidden=96, ffn=256, layers=4, heads=4, seed=1), tokenizer,
                      tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer):
    """A 3-layer, width-64 Llama saved as a HF directory (the 'smaller' model)."""
    return save_model(make_llama(hidden=64, ffn=160, layers=3, heads=4, seed=2), tokenizer,
                      tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="session")
def qwen_student_dir(tmp_path_factory, tokenizer):
    """A grouped-query Qwen2 student (4 query heads, 2 KV heads)."""
    return save_model(make_qwen2(hidden=64, ffn=160, layers=3, heads=4, kv_heads=2, seed=3), tokenizer,
                      tmp_path_factory.mktemp("qwen_student"))


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """Writer of small chat JSONL files: chat_jsonl(name, n) -> path."""
    import json

    root = tmp_path_factory.mktemp("data")

    def write(name="toy.jsonl", n=8, seed=0):
        import random

        rng = random.Random(seed)
        path = root / name
        with open(path, "w") as f:
            for i in range(n):
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                f.write(json.dumps({"id": f"toy_{i}", "messages": [
                    {"role": "user", "content": f"Question: {a} + {b} ="},
                    {"role": "assistant", "content": f"Answer: the answer is {a + b}."}]}) + "\n")
        return str(path)

    return write
