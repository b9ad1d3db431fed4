"""SemAlign on tiny random models (CPU): pairing, recomposition, attribution, frontier stages, CLI."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

import train_SemAlign
from conftest import ROOT, make_llama, save_model
from pkt.data import collate_left, tokenize_example
from pkt.io import PKTError
from pkt.semalign import (Frontier, Weights, align, alignment_map, base_pairing, critical_layers, decompose,
                          final_norm, layer_attribution, pair_layers, recompose, recomposer, relation_loss,
                          stage_loss, train_stage)


# ------------------------------------------------------------------------------------------ pairing
def test_base_pairing_hand_computed():
    # L_T = 40, L_S = 32: floor(1.25 k) skips the teacher depths 4, 9, 14, ..., 39
    expect = [1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 20,
              21, 22, 23, 25, 26, 27, 28, 30, 31, 32, 33, 35, 36, 37, 38, 40]
    assert base_pairing(40, 32) == expect
    assert sorted(set(range(1, 41)) - set(expect)) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert base_pairing(4, 2) == [2, 4]
    assert base_pairing(30, 15) == list(range(2, 31, 2))
    assert base_pairing(5, 5) == [1, 2, 3, 4, 5]
    assert base_pairing(2, 4) == [1, 1, 1, 2]          # max(1, .) when the teacher is shallower


def _teachers(pairs):
    return [p.teacher for p in pairs]


def test_critical_layers_move_to_the_nearest_deeper_or_equal_student_depth():
    # 4 -> 2: depth 1 is skipped; critical 1 takes student depth 1 (base 2), critical 3 student depth 2 (base 4)
    assert _teachers(pair_layers(4, 2, critical=[1])) == [1, 4]
    assert _teachers(pair_layers(4, 2, critical=[3])) == [2, 3]
    assert _teachers(pair_layers(4, 2, critical=[3, 1])) == [1, 3]
    assert _teachers(pair_layers(4, 2, critical=[2, 4])) == [2, 4]         # already hit: nothing moves
    pairs = pair_layers(40, 32, critical=[9, 4, 39])
    t = _teachers(pairs)
    assert (t[3], t[6], t[7], t[31]) == (4, 8, 9, 39)                     # k = 4, 8, 32 (1-based) take 4, 9, 39
    assert [p.student for p in pairs if p.critical] == [4, 8, 32]
    t = _teachers(pair_layers(40, 32, critical=[9, 10]))                    # 10 is k = 8's own base layer:
    assert t[7] == 10 and 9 not in t                                        # it keeps k = 8, 9 is dropped
    # two critical layers for one student depth: the more important (earlier) one wins
    assert _teachers(pair_layers(10, 2, critical=[3, 2])) == [3, 10]
    assert _teachers(pair_layers(10, 2, critical=[5, 3])) == [5, 10]       # 5 already holds k = 1


def test_pairing_is_monotone_and_honours_critical_layers():
    rng = random.Random(0)
    for _ in range(200):
        LS = rng.randint(1, 12)
        LT = rng.randint(LS, 40)
        crit = rng.sample(range(1, LT + 1), rng.randint(0, min(6, LT)))
        pairs = pair_layers(LT, LS, crit)
        t = _teachers(pairs)
        assert len(t) == LS and all(a <= b for a, b in zip(t, t[1:])) and t[-1] >= t[0] >= 1
        for c in crit:
            k = next(i for i, b in enumerate(base_pairing(LT, LS), 1) if b >= c)
            assert c in t or pairs[k - 1].critical, (LT, LS, crit, c)


def test_interpolation_between_adjacent_teacher_layers():
    pairs = pair_layers(40, 32, interpolate=True)
    got = [(p.teacher, p.teacher_next, p.lam) for p in pairs[:4]]
    assert got == [(1, 2, 0.25), (2, 3, 0.5), (3, 4, 0.75), (5, 5, 0.0)]
    assert pairs[-1].lam == 0 and pairs[-1].teacher == 40
    assert all(p.lam == 0 for p in pair_layers(4, 2, interpolate=True))
    moved = pair_layers(40, 32, critical=[4], interpolate=True)[3]
    assert (moved.teacher, moved.lam, moved.critical) == (4, 0.0, True)


def test_critical_layers_rank_by_score():
    assert critical_layers(torch.tensor([0.1, 0.5, 0.2, 0.5]), 3) == [2, 4, 3]
    assert critical_layers(torch.tensor([1.0, 2.0]), 0) == []


# ---------------------------------------------------------------------------- recomposition
def test_recompose_is_the_least_squares_solution():
    torch.manual_seed(0)
    W = torch.randn(50, 8)                                   # student unembedding [V, d_S], full column rank
    pinv = recomposer(W)
    s = torch.randn(5, 50)                                   # arbitrary vocabulary semantics
    z = recompose(s, pinv)
    torch.testing.assert_close((z @ W.T - s) @ W, torch.zeros(5, 8), atol=1e-4, rtol=0)   # normal equations
    torch.testing.assert_close(z, torch.linalg.lstsq(W, s.T).solution.T, atol=1e-5, rtol=1e-4)
    z0 = torch.randn(5, 8)                                   # a target in the range of W: exact
    torch.testing.assert_close(recompose(z0 @ W.T, pinv), z0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recompose(z0 @ W.T, pinv) @ W.T, z0 @ W.T, atol=1e-4, rtol=1e-4)
    low = torch.randn(50, 4) @ torch.randn(4, 8)             # rank deficient: still least squares (min norm)
    z = recompose(s, recomposer(low))
    torch.testing.assert_close((z @ low.T - s) @ low, torch.zeros(5, 8), atol=1e-3, rtol=0)


def test_alignment_map_is_decompose_then_recompose():
    torch.manual_seed(0)
    teacher, student = make_llama(96, 256, 4, 4, seed=1), make_llama(64, 160, 3, 4, seed=2)
    W_T, W_S = teacher.lm_head.weight, student.lm_head.weight
    P = alignment_map(W_T, W_S)
    assert P.shape == (64, 96) and P.dtype == torch.float32
    h = torch.randn(2, 5, 96)
    s_T = decompose(h, final_norm(teacher), W_T)                                 # teacher logits [2, 5, 300]
    a = align(h, final_norm(teacher), P)
    torch.testing.assert_close(a, recompose(s_T, recomposer(W_S)), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(s_T, teacher.lm_head(teacher.model.norm(h)), atol=1e-5, rtol=1e-5)
        # the student's unembedding of the recomposed state is the least-squares fit of the teacher's logits
        resid = a @ W_S.T - s_T
        torch.testing.assert_close(resid @ W_S, torch.zeros(2, 5, 64), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ attribution
@pytest.fixture(scope="module")
def records():
    """Chats of different lengths (so batches are left-padded)."""
    rng = random.Random(3)
    out = []
    for i in range(8):
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        out.append({"id": f"s{i}", "messages": [
            {"role": "user", "content": "Question: " + " + ".join([str(a)] * (1 + i % 3)) + " ="},
            {"role": "assistant", "content": f"Answer: the answer is {a + b}." + " 42" * (i % 4)}]})
    return out


def _batch(tokenizer, recs):
    return collate_left([tokenize_example(tokenizer, r["messages"], cutoff_len=64) for r in recs],
                        tokenizer.pad_token_id)


def _slow_layer_scores(model, tokenizer, recs):
    """One example and one layer at a time: retain_grad on that layer's output, HF's own LM loss."""
    L = len(model.model.layers)
    scores = torch.zeros(L)
    model.requires_grad_(True)
    for r in recs:
        ex = tokenize_example(tokenizer, r["messages"], cutoff_len=64)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        for layer in range(L):
            kept = {}

            def hook(mod, args, out):
                out.retain_grad()
                kept["h"] = out

            handle = model.model.layers[layer].register_forward_hook(hook)
            model.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            handle.remove()
            h, g = kept["h"], kept["h"].grad
            scores[layer] += (h * g).abs().sum(-1).mean().item()
    model.requires_grad_(False)
    return scores / len(recs)


def test_attribution_equals_slow_per_layer_reference(tokenizer, records):
    teacher = make_llama(96, 256, 4, 4, seed=1)
    teacher.requires_grad_(False)
    recs = records[:5]
    batches = [_batch(tokenizer, recs[:3]), _batch(tokenizer, recs[3:])]    # left padding, uneven lengths
    assert (batches[0]["attention_mask"] == 0).any()
    fast = layer_attribution(teacher, batches, progress=False)
    assert all(p.grad is None for p in teacher.parameters())
    slow = _slow_layer_scores(teacher, tokenizer, recs)
    torch.testing.assert_close(fast, slow, rtol=2e-4, atol=1e-9)


# --------------------------------------------------------------------------------- losses
def test_relation_loss_is_geometry_only_and_ignores_padding():
    torch.manual_seed(0)
    r = torch.randn(2, 6, 8)
    Q, _ = torch.linalg.qr(torch.randn(8, 8))
    mask = torch.ones(2, 6, dtype=torch.bool)
    moved = 3.0 * r @ Q + torch.randn(8)                     # rotate, scale, translate: same geometry
    assert relation_loss(r, moved, mask) < 1e-10
    wide = torch.cat([r @ Q, torch.zeros(2, 6, 4)], -1)      # any width
    assert relation_loss(r, wide, mask) < 1e-10
    other = torch.randn(2, 6, 8)
    base = relation_loss(r, other, mask)
    assert 0 < base <= 4
    pad = torch.randn(2, 3, 8) * 100                         # left padding with garbage changes nothing
    pmask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask], 1)
    torch.testing.assert_close(relation_loss(torch.cat([pad, r], 1), torch.cat([-pad, other], 1), pmask), base)


# --------------------------------------------------------------------------- frontier stages
@pytest.fixture(scope="module")
def pair_models():
    teacher, student = make_llama(96, 256, 4, 4, seed=1), make_llama(64, 160, 3, 4, seed=2)
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    return teacher, student, alignment_map(teacher.lm_head.weight, student.lm_head.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frontier_stage_trains_only_its_layer(pair_models, tokenizer, records, dtype):
    teacher, student, P = pair_models
    student = make_llama(64, 160, 3, 4, seed=2).to(dtype)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    pairs = pair_layers(4, 3)
    batches = [_batch(tokenizer, records[:4]), _batch(tokenizer, records[4:])]
    frontier = Frontier(student, 1, lr=1e-3)                                  # student depth 2 = layers[1]
    stage_loss(teacher, student, batches[0], pairs[1], pairs[0], P)["loss"].backward()
    for name, p in student.named_parameters():
        if name.startswith("model.layers.1."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    frontier.close()
    recs = train_stage(teacher, student, batches, pairs[1], pairs[0], P, steps=3, lr=1e-3, seed=0)
    assert [r["stage_step"] for r in recs] == [0, 1, 2] and all(r["stage"] == 2 for r in recs)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
    assert not any(p.requires_grad for p in student.parameters())


def test_stage_loss_decreases(pair_models, tokenizer, records):
    teacher, _, P = pair_models
    student = make_llama(64, 160, 3, 4, seed=2)
    pairs = pair_layers(4, 3)
    batch = [_batch(tokenizer, records[:4])]
    recs = train_stage(teacher, student, batch, pairs[2], pairs[1], P, steps=12, lr=3e-3, seed=0)
    first, last = recs[0], recs[-1]
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert last["relation_loss"] < first["relation_loss"] and last["kl_loss"] < first["kl_loss"]


def test_cached_teacher_logits_give_the_same_loss(pair_models, tokenizer, records):
    from pkt.semalign import teacher_logits

    teacher, student, P = pair_models
    pairs = pair_layers(4, 3, interpolate=True)
    batch = _batch(tokenizer, records[:4])
    cached = teacher_logits(teacher, [batch], progress=False)[0]
    for k in range(3):
        prev = pairs[k - 1] if k else None
        a = stage_loss(teacher, student, batch, pairs[k], prev, P)
        b = stage_loss(teacher, student, batch, pairs[k], prev, P, t_logits=cached)
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    rel = stage_loss(teacher, student, batch, pairs[1], pairs[0], P, Weights(relation=1.0, kl=0.0))
    assert float(rel["kl_loss"]) == 0 and torch.isclose(rel["loss"], rel["relation_loss"])


# ------------------------------------------------------------------------------------------- CLI
def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "train_SemAlign.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_cli_end_to_end_writes_a_loadable_changed_student(teacher_dir, student_dir, chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    data = chat_jsonl("semalign_cli.jsonl", n=6, seed=4)
    out = tmp_path / "aligned"
    r = _cli("--source_model", teacher_dir, "--target_model", student_dir, "--data_path", data, "--output_dir", out,
             "--max_examples", 6, "--attribution_examples", 4, "--micro_batch_size", 3, "--steps_per_layer", 2,
             "--learning_rate", 1e-3, "--n_critical", 1, "--seed", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "semalign_config.json").read_text())
    assert [p["student"] for p in cfg["pairing"]] == [1, 2, 3] and len(cfg["attribution_scores"]) == 4
    assert cfg["critical_teacher_depths"] == [max(range(1, 5), key=lambda d: cfg["attribution_scores"][d - 1])]
    lines = [json.loads(x) for x in (out / "semalign_log.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == [1, 1, 2, 2, 3, 3] and [x["step"] for x in lines] == list(range(6))
    assert all(set(x) >= {"loss", "relation_loss", "kl_loss", "teacher_depth"} for x in lines)
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    new = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    old = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert not torch.allclose(new(ids).logits, old(ids).logits)
    sd_new, sd_old = new.state_dict(), old.state_dict()
    assert {k for k in sd_old if not torch.equal(sd_old[k], sd_new[k])} <= {k for k in sd_old if ".layers." in k}


def test_cli_vocabulary_mismatch_exit_2(student_dir, chat_jsonl, tmp_path):
    from pkt.testing import make_tokenizer

    other = make_tokenizer(270, ["Answer: Question: answer answer answer is is the the +"])
    teacher = save_model(make_llama(96, 256, 4, 4, vocab=270, seed=7), other, tmp_path / "teacher")
    out = tmp_path / "out"
    r = _cli("--source_model", teacher, "--target_model", student_dir, "--data_path",
             chat_jsonl("semalign_v.jsonl", n=2), "--output_dir", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --target_model") and "vocabulary" in lines[0]
    assert not out.exists()


def test_bad_flag_values_are_one_line_errors(teacher_dir, student_dir, chat_jsonl, tmp_path):
    out = tmp_path / "out"
    r = _cli("--source_model", teacher_dir, "--target_model", student_dir, "--data_path",
             chat_jsonl("semalign_f.jsonl", n=2), "--output_dir", out, "--learning_rate", -1)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --learning_rate -1: expected a number > 0"]
    for kw, match in (({"micro_batch_size": 0}, "--micro_batch_size"), ({"steps_per_layer": 1.5}, "--steps_per_layer"),
                      ({"kl_weight": 0, "relation_weight": 0}, "nothing to train"), ({"dtype": "fp8"}, "--dtype")):
        with pytest.raises(PKTError, match=match):
            train_SemAlign.main(source_model=teacher_dir, target_model=student_dir, output_dir=str(out), **kw)
    assert not out.exists()


def test_dry_run_plans_memory_without_loading(tmp_path, capsys):
    from transformers import LlamaConfig

    from pkt.testing import LLAMA2_SHAPES

    dirs = {}
    for name in ("llama-2-13b", "llama-2-7b"):
        dirs[name] = tmp_path / name
        LlamaConfig(**LLAMA2_SHAPES[name]).save_pretrained(dirs[name])    # config.json only, no weights
    plan = train_SemAlign.main(source_model=str(dirs["llama-2-13b"]), target_model=str(dirs["llama-2-7b"]),
                               dry_run=True, output_dir=str(tmp_path / "never"))
    text = capsys.readouterr().out
    assert "teacher params" in text and "peak (estimate)" in text
    assert 40 * 2**30 < plan["peak_bytes"] < 75 * 2**30
    assert not (tmp_path / "never").exists()
