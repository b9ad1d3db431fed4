"""Tiny random models built in code, once per session (the mergekit habit). No downloads."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

FIXTURES = Path(__file__).parent / "fixtures"


def make_tokenizer():
    """A real fast tokenizer with no download: byte-level BPE over a tiny trained vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["<|user|>\n<|assistant|>\n<|system|>\n Question: Answer: the answer is 42. def f(x): return x + 1",
              "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] , . : ; \" ' # A B C D"] * 4
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def make_llama(hidden=64, ffn=160, layers=3, heads=4, kv_heads=None, vocab=300, seed=0, std=0.05):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                      max_position_embeddings=512, initializer_range=std, bos_token_id=0, eos_token_id=1,
                      pad_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def make_qwen2(hidden=64, ffn=160, layers=3, heads=4, kv_heads=2, vocab=300, seed=0, std=0.05):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=512, initializer_range=std, bos_token_id=0, eos_token_id=1,
                      pad_token_id=1, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def save_model(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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
