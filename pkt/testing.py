"""Tiny random models and a trained-in-code tokenizer: no downloads. Used by the tests and by
`demo.sh --quick`, which checks the whole pipeline's wiring in seconds."""
from __future__ import annotations

import torch


# Llama-2 shapes for benchmarks and memory plans (random or meta-device weights, never downloaded).
LLAMA2_SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}

CORPUS = ["<|user|>\n<|assistant|>\n<|system|>\n Question: Answer: the answer is 42. def f(x): return x + 1",
          "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] , . : ; \" ' # A B C D"]


def make_tokenizer(vocab_size: int = 300, corpus: list[str] = CORPUS):
    """A real fast tokenizer with no download: byte-level BPE trained on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def make_llama_tokenizer(vocab_size: int = 400, corpus: list[str] = CORPUS):
    """A Llama-2-style tokenizer with no download: transformers' `LlamaTokenizer` (Metaspace pre-tokenizer,
    BPE with byte fallback, a decoder that strips one leading space) over merges trained on `corpus`.
    As in Llama-2's vocabulary, `<unk> <s> </s>` are ids 0-2, the 256 byte tokens `<0x00>..<0xFF>` follow,
    and characters outside the trained pieces (the newline always) are spelled as bytes: `\n` -> `<0x0A>`.
    No pad token (Llama-2 has none; `pkt.io.load_tokenizer` pads with EOS). `vocab_size` counts everything; the
    vocabulary is smaller when the corpus has fewer merges to learn, larger when its alphabet needs more."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    n_fixed = len(specials) + 256
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - n_fixed, 1), show_progress=False)
    lines = [line for text in corpus for line in text.split("\n") if line]   # no newline piece is learnt
    bpe.train_from_iterator(lines * 4, trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges)


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


def save_tiny_pair(out_dir) -> tuple[str, str]:
    """A tiny teacher (4 layers, width 96) and student (3 layers, width 64) with one tokenizer."""
    from pathlib import Path

    out = Path(out_dir)
    tok = make_tokenizer()
    teacher = save_model(make_llama(hidden=96, ffn=256, layers=4, heads=4, seed=1), tok, out / "teacher")
    student = save_model(make_llama(hidden=64, ffn=160, layers=3, heads=4, seed=2), tok, out / "student")
    return teacher, student
