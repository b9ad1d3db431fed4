"""SemAlign as docs/semalign.md specifies it (v1 section numbers), on tiny random models (CPU)."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, make_llama, save_model

from pkt.data import collate_left, tokenize_example
from pkt.io import PKTError
from pkt.semalign import (
    SemAlignConfig,
    align,
    alignment_map,
    base_pairing,
    cached_bases,
    critical_layers,
    decompose,
    interpolation,
    layer_attribution,
    nearest_student,
    onehot_cosine,
    print_memory_plans,
    recompose,
    relation_loss,
    semantic_bases,
    shared_vocab,
    train,
    v1_loss,
    v1_pairs,
    v2_pairs,
)
from pkt.testing import make_tokenizer


# ------------------------------------------------------------------------- Sec. 3.1 semantic bases
def test_semantic_bases_are_unit_norm_columns_of_pinv_of_the_unembedding():
    torch.manual_seed(0)
    W = torch.randn(50, 8)                                          # W_U [V, d]
    S = semantic_bases(W)
    assert S.shape == (8, 50) and S.dtype == torch.float32
    torch.testing.assert_close(S.norm(dim=0), torch.ones(50))
    P = torch.linalg.pinv(W)                                        # column i: least squares of W x = e_i
    torch.testing.assert_close(S, P / P.norm(dim=0), atol=1e-6, rtol=1e-5)
    x = torch.linalg.lstsq(W, torch.eye(50)[:, 7:8]).solution.squeeze(1)
    torch.testing.assert_close(S[:, 7], x / x.norm(), atol=1e-5, rtol=1e-4)


def test_bases_are_cached_once_per_model_and_never_reused_by_another(tmp_path, monkeypatch):
    import pkt.semalign as sa

    a, b = make_llama(64, 160, 1, 4, seed=2), make_llama(64, 160, 1, 4, seed=3)
    S_a = cached_bases(a, tmp_path)
    assert len(list(tmp_path.glob("bases-*.safetensors"))) == 1
    monkeypatch.setattr(sa, "semantic_bases", lambda W: pytest.fail("recomputed despite the cache"))
    torch.testing.assert_close(cached_bases(a, tmp_path), S_a, atol=0, rtol=0)
    monkeypatch.undo()
    S_b = cached_bases(b, tmp_path)                                   # same shapes, other weights: own file
    assert len(list(tmp_path.glob("bases-*.safetensors"))) == 2
    torch.testing.assert_close(S_b, semantic_bases(b.lm_head.weight))


# --------------------------------------------------------------- Sec. 4.2 alignment map (eqs. 1-2)
@pytest.fixture(scope="module")
def bases():
    teacher, student = make_llama(96, 256, 2, 4, seed=1), make_llama(64, 160, 2, 4, seed=2)
    return semantic_bases(teacher.lm_head.weight), semantic_bases(student.lm_head.weight)


def test_alignment_map_is_S_S_S_T_transposed_and_equals_decompose_then_recompose(bases):
    S_T, S_S = bases
    M = alignment_map(S_T, S_S)
    assert M.shape == (64, 96) and M.dtype == torch.float32
    torch.testing.assert_close(M, S_S @ S_T.T)
    h = torch.randn(2, 5, 96) * 7
    a = decompose(h, S_T)                                             # eq. 1: cosines with the unit bases
    torch.testing.assert_close(a[0, 0], F.cosine_similarity(h[0, 0][:, None], S_T, dim=0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(align(h, M), recompose(a, S_S), atol=1e-5, rtol=1e-4)   # eq. 2


def test_decomposing_a_teacher_basis_vector_peaks_on_its_own_token(bases):
    S_T, _ = bases
    for i in (0, 17, 299):
        a = decompose(3.0 * S_T[:, i], S_T)
        assert int(a.argmax()) == i and math.isclose(float(a[i]), 1.0, rel_tol=1e-5)


def test_alignment_map_of_a_shared_lm_head_is_not_the_identity(bases):
    _, S = bases
    M = alignment_map(S, S)
    assert not torch.allclose(M / M.diagonal().mean(), torch.eye(64), atol=1e-2)


def test_extra_teacher_token_is_left_out_of_the_shared_vocabulary(tokenizer):
    wizard = make_tokenizer()
    wizard.add_tokens(["[PAD]"])                                      # WizardCoder: 32,001 vs 32,000
    v = shared_vocab(wizard, tokenizer, len(wizard), len(tokenizer))
    assert v.size == 300 and v.teacher_only == ["[PAD]"] and v.student_only == []
    assert v.input_map is None and torch.equal(v.teacher_ids, v.student_ids)
    S_T, S_S = torch.randn(96, 301), torch.randn(64, 300)
    torch.testing.assert_close(alignment_map(S_T, S_S, v), S_S @ S_T[:, :300].T)


# ------------------------------------------------------------------------- Sec. 4.1 attribution
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
    """One example and one layer at a time: retain_grad on that layer's output, HF's own LM loss
    -> {sign: [L]}."""
    L = len(model.model.layers)
    scores = {"abs": torch.zeros(L), "signed": torch.zeros(L)}
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
            e = kept["h"] * kept["h"].grad
            scores["abs"][layer] += e.abs().sum(-1).mean().item()
            scores["signed"][layer] += e.sum(-1).mean().item()
    model.requires_grad_(False)
    return {k: v / len(recs) for k, v in scores.items()}


def test_attribution_is_layer_gradient_x_activation(tokenizer, records):
    teacher = make_llama(96, 256, 3, 4, seed=1).requires_grad_(False)
    recs = records[:3]
    batches = [_batch(tokenizer, recs[:2]), _batch(tokenizer, recs[2:])]    # left padding, uneven lengths
    assert (batches[0]["attention_mask"] == 0).any()
    fast = {sign: layer_attribution(teacher, batches, sign=sign, progress=False) for sign in ("abs", "signed")}
    assert all(p.grad is None for p in teacher.parameters())
    slow = _slow_layer_scores(teacher, tokenizer, recs)
    for sign in ("abs", "signed"):
        torch.testing.assert_close(fast[sign], slow[sign], rtol=2e-4, atol=1e-7)


def test_signed_attribution_of_the_last_layer_vanishes(tokenizer, records):
    # the final RMSNorm is scale invariant, so h . dL/dh = 0 at the last layer: why "abs" is the default
    teacher = make_llama(96, 256, 4, 4, seed=1).requires_grad_(False)
    batch = [_batch(tokenizer, records[:4])]
    signed = layer_attribution(teacher, batch, sign="signed", progress=False)
    absolute = layer_attribution(teacher, batch, sign="abs", progress=False)
    assert abs(float(signed[-1])) < 1e-3 * float(absolute[-1])


def test_critical_layers_rank_by_score():
    assert critical_layers(torch.tensor([0.1, 0.5, 0.2, 0.5]), 3) == [2, 4, 3]


# ----------------------------------------------------------------------------- Sec. 4.1 pairing
def test_pairing_40_to_32_skips_teacher_layers_4_9_to_39():
    base = base_pairing(40, 32)
    assert base[:8] == [1, 2, 3, 5, 6, 7, 8, 10] and base[-1] == 40
    assert sorted(set(range(1, 41)) - set(base)) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert base_pairing(2, 4) == [1, 1, 1, 2]                         # max(1, .) for a shallower teacher


def test_pairing_20_to_10_is_the_papers_worked_example():
    assert base_pairing(20, 10) == list(range(2, 21, 2))
    [p] = v1_pairs(20, 10, [20])                                      # the critical 20th layer -> student 10
    assert (p.student, p.teacher, p.lam) == (10, 20, 0.0)
    [p] = v1_pairs(20, 10, [7])                                       # skipped layer 7: k† = 4
    assert (p.student, p.teacher, p.a, p.b, p.lam) == (4, 8, 8, 8, 0.0)  # literal (l_T(k†), k†); integer ratio
    [p] = v1_pairs(20, 10, [7], pairing="critical")
    assert (p.student, p.teacher) == (4, 7)


def test_pairing_40_to_32_k_dagger_and_interpolation():
    assert [nearest_student(c, base_pairing(40, 32)) for c in (1, 2, 4, 9, 39, 40)] == [1, 2, 4, 8, 32, 32]
    assert interpolation(1, 40, 32) == (1, 2, 0.25)                   # u = 1.25
    assert interpolation(3, 40, 32) == (3, 4, 0.75)                   # u = 3.75
    assert interpolation(4, 40, 32) == (5, 6, 0.0)                    # u = 5
    assert interpolation(32, 40, 32) == (39, 40, 1.0)                 # a clipped to L_T - 1
    [p] = v1_pairs(40, 32, [2])
    assert (p.student, p.teacher, p.a, p.b, p.lam) == (2, 2, 2, 3, 0.5)
    [p] = v1_pairs(40, 32, [39])
    assert (p.student, p.teacher, p.a, p.b, p.lam) == (32, 40, 39, 40, 1.0)
    [p] = v1_pairs(40, 32, [4])                                       # skipped: literal reads l_T(4) = 5
    assert (p.student, p.teacher, p.lam, p.critical) == (4, 5, 0.0, 4)
    [p] = v1_pairs(40, 32, [4], pairing="critical")
    assert (p.student, p.teacher, p.a, p.lam) == (4, 4, 4, 0.0)
    [p] = v1_pairs(40, 32, [2], interpolate=False)
    assert (p.a, p.b, p.lam) == (2, 2, 0.0)


def test_two_critical_layers_on_one_student_layer_train_it_once():
    pairs = v1_pairs(40, 32, [9, 10, 1])                              # 9 and 10 both land on k† = 8
    assert [(p.student, p.critical) for p in pairs] == [(1, 1), (8, 9)]


def test_v2_pairs_one_source_layer_per_target_layer():
    pairs = v2_pairs(40, 32, critical=[9, 4, 39])
    t = [p.teacher for p in pairs]
    assert len(t) == 32 and (t[3], t[7], t[31]) == (4, 9, 39) and all(p.a == p.b == p.teacher for p in pairs)
    assert all(a <= b for a, b in zip(t, t[1:]))
    assert [p.teacher for p in v2_pairs(10, 2, critical=[3, 2])] == [3, 10]   # the more important one wins


# ------------------------------------------------------------------------------- Sec. 4.3 the loss
def test_v1_loss_hand_computed():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])                       # student layer updates
    target = torch.tensor([[3.0, 0.0], [1.0, 1.0]])                  # cos 1 and 1/sqrt(2)
    z = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])             # cos with the one-hot: 4/5 and 1
    y = torch.tensor([1, 0])
    out = v1_loss([u], [target], z, y)
    layer = 1 - (1 + 1 / math.sqrt(2)) / 2
    assert math.isclose(float(out["layer_loss"]), layer, rel_tol=1e-6)
    assert math.isclose(float(out["out_loss"]), 1 - (0.8 + 1.0) / 2, rel_tol=1e-6)
    assert math.isclose(float(out["loss"]), layer + 0.1, rel_tol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cosine_with_the_one_hot_label_needs_no_one_hot(eps):
    torch.manual_seed(0)
    z, y = torch.randn(6, 50), torch.randint(0, 50, (6,))
    dense = (1 - eps) * F.one_hot(y, 50).float() + eps / 50
    torch.testing.assert_close(onehot_cosine(z, y, eps), F.cosine_similarity(z, dense, dim=-1))


def test_v2_relation_loss_is_geometry_only_and_ignores_padding():
    torch.manual_seed(0)
    r = torch.randn(2, 6, 8)
    Q, _ = torch.linalg.qr(torch.randn(8, 8))
    mask = torch.ones(2, 6, dtype=torch.bool)
    assert relation_loss(r, 3.0 * r @ Q + torch.randn(8), mask) < 1e-10   # rotate, scale, translate
    other = torch.randn(2, 6, 8)
    base = relation_loss(r, other, mask)
    pad = torch.randn(2, 3, 8) * 100
    pmask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask], 1)
    torch.testing.assert_close(relation_loss(torch.cat([pad, r], 1), torch.cat([-pad, other], 1), pmask), base)


# ---------------------------------------------------------------------------------- what trains
def _run(teacher_dir, student_dir, data, out, **kw):
    args = dict(source_model=str(teacher_dir), target_model=str(student_dir), data_path=data, output_dir=str(out),
                batch_size=4, micro_batch_size=2, max_steps=2, learning_rate=1e-3, warmup_ratio=0.0,
                attribution_examples=4, seed=0)
    train(SemAlignConfig(**{**args, **kw}))
    return json.loads((out / "semalign_config.json").read_text())


def _changed(before_dir, after_dir) -> set[str]:
    from safetensors.torch import load_file

    a, b = load_file(f"{before_dir}/model.safetensors"), load_file(f"{after_dir}/model.safetensors")
    return {k for k in a if not torch.equal(a[k].to(b[k].dtype), b[k])}   # a bf16 run saves bf16


def test_v1_changes_only_the_paired_layer(teacher_dir, student_dir, chat_jsonl, tmp_path):
    out = tmp_path / "v1"
    cfg = _run(teacher_dir, student_dir, chat_jsonl("v1.jsonl", n=6), out)
    [k] = cfg["trained_student_layers"]
    changed = _changed(student_dir, out)
    assert changed and all(n.startswith(f"model.layers.{k - 1}.") for n in changed), (k, changed)
    [pair] = cfg["pairing"]
    assert pair["critical"] == cfg["critical_teacher_layers"][0] and pair["student"] == k
    log = [json.loads(x) for x in (out / "semalign_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all({"layer_loss", "out_loss"} <= set(r) for r in log)
    budget = json.loads((out / "pkt_budget.json").read_text())
    assert budget["method"] == "semalign" and budget["optimizer_steps"] == 2 and budget["examples"] == 6
    assert budget["student_forward_tokens"] == budget["student_backward_tokens"] > 0
    assert budget["teacher_forward_tokens"] > budget["teacher_backward_tokens"] > 0   # attribution + targets


def test_v2_changes_every_layer(teacher_dir, student_dir, chat_jsonl, tmp_path):
    out = tmp_path / "v2"                                             # bf16: the trained layer's fp32 master copy
    cfg = _run(teacher_dir, student_dir, chat_jsonl("v2.jsonl", n=6), out, variant="v2", max_steps=1, dtype="bf16")
    assert cfg["trained_student_layers"] == [1, 2, 3]
    assert {n.split(".")[2] for n in _changed(student_dir, out)} == {"0", "1", "2"}
    log = [json.loads(x) for x in (out / "semalign_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1, 2, 3] and all({"relation_loss", "kl_loss"} <= set(r) for r in log)
    budget = json.loads((out / "pkt_budget.json").read_text())       # one step of 4 examples per stage
    assert (budget["optimizer_steps"], budget["examples"]) == (3, 3 * 4)


def test_a_teacher_placed_by_device_map_trains_the_student_as_the_plain_one(teacher_dir, student_dir, chat_jsonl,
                                                                              tmp_path):
    data = chat_jsonl("placed.jsonl", n=4)
    plain = _run(teacher_dir, student_dir, data, tmp_path / "plain", teacher_device="cpu", student_device="cpu")
    placed = _run(teacher_dir, student_dir, data, tmp_path / "placed", teacher_device="auto", student_device="cpu")
    assert placed["pairing"] == plain["pairing"] and not _changed(tmp_path / "plain", tmp_path / "placed")
    with pytest.raises(PKTError, match="--student_device"):
        SemAlignConfig(source_model="t", target_model="s", data_path="d", output_dir="o", student_device="auto")


def test_gradient_accumulation_does_not_depend_on_the_micro_batch_size(teacher_dir, student_dir, chat_jsonl,
                                                                        tmp_path):
    from safetensors.torch import load_file

    data = chat_jsonl("accum.jsonl", n=4, seed=5)
    _run(teacher_dir, student_dir, data, tmp_path / "a", micro_batch_size=1, max_steps=1)
    _run(teacher_dir, student_dir, data, tmp_path / "b", micro_batch_size=4, max_steps=1)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-4)


def test_a_teacher_with_an_extra_token_transfers_over_the_shared_tokens(student_dir, chat_jsonl, tmp_path):
    tok = make_tokenizer()
    tok.add_tokens(["[PAD]"])
    teacher = save_model(make_llama(96, 256, 4, 4, vocab=301, seed=1), tok, tmp_path / "wizard")
    cfg = _run(teacher, student_dir, chat_jsonl("wiz.jsonl", n=4), tmp_path / "out", max_steps=1)
    assert cfg["vocabulary"]["shared_tokens"] == 300 and cfg["vocabulary"]["teacher_only"] == ["[PAD]"]


def _optimizer(model):
    from pkt.semalign import LayerOptimizer, Schedule

    opt = LayerOptimizer(model, [1], Schedule(lr=1e-3, warmup_ratio=0.0), total_steps=5)
    for _, p in opt.named:
        p.grad = torch.zeros_like(p)
    return opt


def test_non_finite_gradient_stops_training_naming_step_and_tensor():
    opt = _optimizer(make_llama(64, 160, 3, 4, seed=2))
    opt.named[2][1].grad[0, 0] = float("inf")
    with pytest.raises(PKTError, match=rf"^step 3: non-finite gradient norm \(gradient of {opt.named[2][0]}\)"):
        opt.step(3)


def test_non_finite_weight_stops_training_naming_step_and_tensor(monkeypatch):
    opt = _optimizer(make_llama(64, 160, 3, 4, seed=2))
    name = opt.named[4][0]
    inner = opt.opt.step

    def poisoned():
        inner()
        with torch.no_grad():
            opt.master[4].view(-1)[0] = float("nan")

    monkeypatch.setattr(opt.opt, "step", poisoned)
    with pytest.raises(PKTError, match=rf"^step 7: weight {name} is non-finite after the optimizer step"):
        opt.step(7)


def test_non_finite_loss_stops_training_naming_step_and_tensor(teacher_dir, chat_jsonl, tmp_path, tokenizer):
    broken = make_llama(64, 160, 3, 4, seed=2)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    student = save_model(broken, tokenizer, tmp_path / "nan_student")
    with pytest.raises(PKTError, match=r"^step 1: non-finite loss"):
        _run(teacher_dir, student, chat_jsonl("nan.jsonl", n=4), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- CLI
def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "train_SemAlign.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_cli_default_is_v1_and_writes_a_loadable_student(teacher_dir, student_dir, chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "aligned"
    r = _cli("--source_model", teacher_dir, "--target_model", student_dir, "--data_path",
             chat_jsonl("cli.jsonl", n=6, seed=4), "--output_dir", out, "--batch_size", 3, "--micro_batch_size", 3,
             "--max_steps", 2, "--learning_rate", 1e-3)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "semalign_config.json").read_text())
    assert cfg["variant"] == "v1" and cfg["paper"].startswith("arXiv 2510.24208v1")
    assert cfg["steps_per_trained_layer"] == 2 and (out / "pkt_budget.json").exists()
    new = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert new.config.num_hidden_layers == 3 and (out / "tokenizer_config.json").exists()


def test_vocabularies_without_a_common_token_are_a_one_line_error(student_dir, chat_jsonl, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"@@{i}@@": i for i in range(40)} | {"[UNK]": 40, "[BOS]": 41, "[EOS]": 42}
    raw = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
                                    pad_token="[EOS]")
    teacher = save_model(make_llama(96, 256, 4, 4, vocab=43, seed=7), other, tmp_path / "teacher")
    out = tmp_path / "out"
    r = _cli("--source_model", teacher, "--target_model", student_dir, "--data_path", chat_jsonl("v.jsonl", n=2),
             "--output_dir", out)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: --source_model and --target_model share no token string: "
                                             "SemAlign aligns teacher and student over the tokens both "
                                             "vocabularies contain"]
    assert not out.exists()


def test_n_critical_0_or_above_the_teacher_depth_is_a_one_line_error(teacher_dir, student_dir, chat_jsonl, tmp_path):
    out = tmp_path / "out"
    r = _cli("--source_model", teacher_dir, "--target_model", student_dir, "--data_path", chat_jsonl("c.jsonl", n=2),
             "--output_dir", out, "--n_critical", 0)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --n_critical 0: expected an integer >= 1"]
    with pytest.raises(PKTError, match=r"^--n_critical 5: the teacher has only 4 layers$"):
        _run(teacher_dir, student_dir, chat_jsonl("c.jsonl", n=2), out, n_critical=5)
    assert not out.exists()


def test_bad_flag_values_are_one_line_errors_before_anything_loads(tmp_path):
    for kw, match in (({"learning_rate": -1.0}, "--learning_rate -1.0: expected a number > 0"),
                      ({"micro_batch_size": 0}, "--micro_batch_size"), ({"variant": "v3"}, "--variant 'v3'"),
                      ({"critical_pairing": "nearest"}, "--critical_pairing"), ({"warmup_ratio": 1.0}, "--warmup"),
                      ({"variant": "v2", "kl_weight": 0.0, "relation_weight": 0.0}, "nothing to train"),
                      ({"dtype": "fp8"}, "--dtype")):
        with pytest.raises(PKTError, match=match):
            SemAlignConfig(output_dir=str(tmp_path / "out"), **kw)
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_both_variants_at_13b_to_7b_without_loading(tmp_path, capsys):
    plans = print_memory_plans(SemAlignConfig(dry_run=True, output_dir=str(tmp_path / "never")))
    text = capsys.readouterr().out
    assert "SemAlign v1 (selected), the published method" in text and "a reading of the v2 abstract" in text
    for variant in ("v1", "v2"):
        rows = {item: b for _, item, b, _ in plans[variant]["rows"]}
        assert rows["semantic bases S_T, S_S (fp32)"] == 4 * 32000 * (5120 + 4096)
        assert rows["alignment map M = S_S S_Tᵀ (fp32)"] == 4 * 4096 * 5120
        assert 40 * 2**30 < plans[variant]["peak"] < 75 * 2**30
    assert plans["v1"]["phases"]["train"] < plans["v2"]["phases"]["train"]   # v1 frees the teacher
    from transformers import LlamaConfig

    from pkt.testing import LLAMA2_SHAPES

    dirs = {}
    for name in ("llama-2-13b", "llama-2-7b"):
        LlamaConfig(**LLAMA2_SHAPES[name]).save_pretrained(tmp_path / name)   # config.json only, no weights
        dirs[name] = str(tmp_path / name)
    again = print_memory_plans(SemAlignConfig(source_model=dirs["llama-2-13b"],
                                                             target_model=dirs["llama-2-7b"], dry_run=True))
    assert again["v1"]["peak"] == plans["v1"]["peak"]
    assert not (tmp_path / "never").exists()
