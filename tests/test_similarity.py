"""Similarity analyses: linear CKA, hidden states, weights in vocabulary space, the figure CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkt.similarity import (cka_matrix, gram_signature, hidden_states, layer_cka, linear_cka, parametric_similarity,
                            select_positions, vocab_sample, weight_in_vocab_space)
from pkt.testing import make_llama

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"

# (n samples, d_x, d_y): more samples than features (feature form) and fewer (Gram form)
SHAPES = [(64, 6, 9), (12, 40, 30)]


def hsic_cka(X, Y) -> float:
    """The textbook definition, in float64: HSIC(K, L) = tr(K H L H) / (n-1)^2, H = I - 11^T / n."""
    X, Y = X.double(), Y.double()
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A, B):
        return torch.trace(A @ H @ B @ H) / (n - 1) ** 2

    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def _correlated(n, dx, dy, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dx, generator=g)
    Y = torch.randn(n, dy, generator=g) + X[:, :1] * 2.0    # share one direction
    return X, Y


@pytest.mark.parametrize("n,dx,dy", SHAPES)
def test_cka_of_a_representation_with_itself_is_one(n, dx, dy):
    X, _ = _correlated(n, dx, dy)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("n,dx,dy", SHAPES)
def test_cka_is_invariant_to_rotation_isotropic_scaling_and_translation(n, dx, dy):
    X, Y = _correlated(n, dx, dy)
    Q, _ = torch.linalg.qr(torch.randn(dx, dx, generator=torch.Generator().manual_seed(1)))
    ref = linear_cka(X, Y)
    assert linear_cka(X @ Q, Y) == pytest.approx(ref, abs=1e-5)
    assert linear_cka(X * 37.5, Y / 1e3) == pytest.approx(ref, abs=1e-5)
    assert linear_cka(X + 5.0, Y) == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("n,dx,dy", SHAPES)
def test_cka_equals_hsic_with_centering_matrices(n, dx, dy):
    X, Y = _correlated(n, dx, dy)
    assert linear_cka(X, Y) == pytest.approx(hsic_cka(X, Y), abs=1e-5)
    assert linear_cka(Y, X) == pytest.approx(linear_cka(X, Y), abs=1e-6)   # symmetric


def test_cka_of_a_big_representation_with_itself_is_one_to_fp32_precision():
    X = torch.randn(1500, 48, generator=torch.Generator().manual_seed(0)) ** 3     # heavy-tailed, 2.25M Gram entries
    sig = gram_signature(X)[None]
    assert abs(float(cka_matrix(sig, sig)) - 1.0) < 1e-6


def test_cka_of_unrelated_features_is_small_and_of_a_constant_is_zero():
    g = torch.Generator().manual_seed(0)
    assert linear_cka(torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)) < 0.02
    assert linear_cka(torch.ones(10, 3), torch.randn(10, 3)) == 0.0


@pytest.mark.parametrize("n,dx,dy", SHAPES)
def test_layer_cka_is_every_pairwise_cka_in_either_form_and_any_chunking(n, dx, dy):
    g = torch.Generator().manual_seed(2)
    A = [torch.randn(n, dx, generator=g) for _ in range(3)]
    B = [torch.randn(n, dy, generator=g) + A[j % 3][:, :1] for j in range(4)]
    want = torch.tensor([[hsic_cka(a, b) for b in B] for a in A], dtype=torch.float32)
    assert torch.allclose(layer_cka(A, B), want, atol=1e-5)
    assert torch.allclose(layer_cka(A, B, chunk_bytes=1), want, atol=1e-5)  # one B layer at a time
    sig = lambda reps: torch.stack([gram_signature(r) for r in reps])       # noqa: E731
    assert torch.allclose(cka_matrix(sig(A), sig(B)), want, atol=1e-5)


def _batches(tokenizer, chat_jsonl, n=5):
    from pkt.data import load_chat_jsonl
    from pkt.similarity import chat_batches

    return chat_batches(tokenizer, load_chat_jsonl(chat_jsonl("sim.jsonl", n)), max_len=64, batch_size=2)


def test_hidden_states_are_the_residual_stream_after_each_layer_at_kept_tokens(tokenizer, chat_jsonl):
    model = make_llama(layers=3)
    batches = select_positions(_batches(tokenizer, chat_jsonl), "all", skip_first=0)
    reps = hidden_states(model, batches)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert len(reps) == 3 and all(r.shape == (n_tokens, 64) and r.dtype == torch.float32 for r in reps)
    b = batches[0]
    with torch.no_grad():
        ref = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          output_hidden_states=True).hidden_states          # [emb, layer 0, ..., normed last]
    k = int(b["attention_mask"].sum())
    for i in range(2):
        assert torch.allclose(reps[i][:k], ref[i + 1][b["attention_mask"].bool()], atol=1e-5)


def test_select_positions_skips_first_tokens_subsamples_and_takes_last(tokenizer, chat_jsonl):
    batches = _batches(tokenizer, chat_jsonl)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    n_examples = sum(b["input_ids"].shape[0] for b in batches)
    count = lambda bs: sum(int(b["keep"].sum()) for b in bs)                  # noqa: E731
    assert count(select_positions(batches, "all", skip_first=0)) == n_tokens
    assert count(select_positions(batches, "all", skip_first=1)) == n_tokens - n_examples
    sub = select_positions(batches, "all", max_tokens=20, seed=3)
    assert count(sub) == 20
    assert all((s["keep"] <= b["attention_mask"].bool()).all() for s, b in zip(sub, batches))
    assert all(torch.equal(s["keep"], t["keep"]) for s, t in zip(sub, select_positions(batches, "all", 20, seed=3)))
    last = select_positions(batches, "last")
    assert count(last) == n_examples and all(b["keep"][:, -1].all() for b in last)


def test_weights_in_vocab_space_have_one_row_per_token_and_one_column_per_neuron():
    model = make_llama(hidden=64, ffn=160, layers=2)
    ids = vocab_sample(300, 50)
    assert ids.unique().numel() == 50
    for module, width in [("up_proj", 160), ("down_proj", 160), ("v_proj", 64), ("o_proj", 64), ("gate_proj", 160)]:
        assert weight_in_vocab_space(model, 1, module, ids).shape == (50, width)


def test_parametric_similarity_spans_widths_and_finds_copied_layers():
    """A student built from teacher layers 0 and 2 (same embeddings) matches exactly those layers."""
    teacher = make_llama(hidden=64, ffn=160, layers=3, seed=1)
    student = make_llama(hidden=64, ffn=160, layers=2, seed=2)
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for j, i in enumerate((0, 2)):
        student.model.layers[j].load_state_dict(teacher.model.layers[i].state_dict())
    ids = vocab_sample(300, 120)
    sims = parametric_similarity(teacher, student, ids)
    for module, m in sims.items():
        assert m.shape == (3, 2), module
        assert m[0, 0] == pytest.approx(1.0, abs=1e-5) and m[2, 1] == pytest.approx(1.0, abs=1e-5), module
        assert m[1, 0] < 0.999 and m[1, 1] < 0.999, module
    wide = make_llama(hidden=96, ffn=256, layers=4, seed=3)                   # another width and depth
    m = parametric_similarity(wide, student, ids, modules=("up_proj",))["up_proj"]
    assert m.shape == (4, 2) and ((m >= 0) & (m <= 1 + 1e-5)).all()


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "analysis" / "similarity.py"), *args],
                          capture_output=True, text=True, cwd=cwd)


def test_cli_writes_both_jsons_and_pngs_teacher_layers_by_student_layers(teacher_dir, student_dir, chat_jsonl,
                                                                         tmp_path):
    from analysis.similarity import SimilarityConfig, main

    out = tmp_path / "sim"
    main(SimilarityConfig(teacher=teacher_dir, student=student_dir, data=chat_jsonl("cli.jsonl", 6), out_dir=str(out),
                          n_examples=4, max_len=48, vocab_rows=100, modules="up_proj,o_proj", device="cpu"))
    rep = json.loads((out / "representation_similarity.json").read_text())
    par = json.loads((out / "parametric_similarity.json").read_text())
    assert (rep["teacher_layers"], rep["student_layers"], rep["n_examples"]) == (4, 3, 4)
    assert len(rep["cka"]) == 4 and all(len(row) == 3 for row in rep["cka"])
    assert all(0.0 <= v <= 1.0 + 1e-5 for row in rep["cka"] for v in row)
    assert list(par["cka"]) == ["up_proj", "o_proj"] and par["n_rows"] == 100
    assert all(len(m) == 4 and all(len(row) == 3 for row in m) for m in par["cka"].values())
    assert set(par["reference_cka"]) == {"input_embeddings", "unembeddings"}
    for name in ("representation_similarity.png", "parametric_similarity.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.iterdir()) == ["parametric_similarity.json", "parametric_similarity.png",
                                                     "representation_similarity.json", "representation_similarity.png"]


def test_cli_bad_flag_is_one_line_exit_2_and_writes_nothing(teacher_dir, student_dir, chat_jsonl, tmp_path):
    r = _run_cli("--teacher", teacher_dir, "--student", student_dir, "--data", chat_jsonl("bad.jsonl", 3),
                 "--out_dir", str(tmp_path / "o"), "--positions", "middle", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --positions 'middle'"), r.stderr
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_input_errors_name_the_file_or_flag(teacher_dir, student_dir, chat_jsonl, tmp_path):
    from analysis.similarity import SimilarityConfig, main
    from pkt.io import PKTError

    data = chat_jsonl("ok.jsonl", 3)
    cases = [(dict(data=str(tmp_path / "missing.jsonl")), "missing.jsonl: no such file"),
             (dict(data=data, student=str(tmp_path / "nope")), "--student"),
             (dict(data=data, n_examples=1), "--n_examples 1"),
             (dict(data=data, modules="up_proj,mlp"), "--modules"),
             (dict(data=data, analyses="both"), "--analyses")]
    for kwargs, msg in cases:
        kwargs = {"teacher": teacher_dir, "student": student_dir, "out_dir": str(tmp_path / "o"), **kwargs}
        with pytest.raises(PKTError, match=msg):
            main(SimilarityConfig(**kwargs))
    assert not (tmp_path / "o").exists()
