"""LaTen end to end on the tiny conftest models (CPU): training, resume, fusing, GQA, input errors."""
from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_llama, save_model
from knowledge_translator import KnowledgeTranslator
from modeling_llama_laten import inject
from pkt import laten
from pkt.budget import read_budget
from pkt.data import load_chat_jsonl, locate_ids, micro_batches, tokenize_example
from pkt.io import PKTError, load_model, load_tokenizer
from pkt.laten import ModelPair, TrainConfig, TransferConfig, deltas_for, extract, mse_penalty
from pkt.model import model_shape

STEPS = 5
TRAIN = dict(learning_rate=3e-2, transfer_rate=0.5, n_align=7, micro_batch_size=4, seed=0, dtype="fp32",
             teacher_device="cpu", student_device="cpu", save_trainer_state="all", save_every=1)


@pytest.fixture(scope="module")
def data(chat_jsonl):
    return {"extract": chat_jsonl("laten_extract.jsonl", n=STEPS, seed=0),
            "align": chat_jsonl("laten_align.jsonl", n=12, seed=1),
            "train": chat_jsonl("laten_train.jsonl", n=6, seed=2)}


def _train(teacher, student, data, out, **kw):
    args = dict(TRAIN, source_model=teacher, target_model=student, extract_data_path=data["extract"],
                align_data_path=data["align"], translator_save_name="toy", output_dir=str(out))
    args.update(kw)
    return Path(laten.train(TrainConfig(**args)))


@pytest.fixture(scope="module")
def trained(teacher_dir, student_dir, data, tmp_path_factory):
    """A 5-step run; also keeps the in-memory student the script trained against."""
    loaded = []

    def spy(*a, **kw):
        m = load_model(*a, **kw)
        loaded.append(m)
        return m

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(laten, "load_model", spy)
        save_dir = _train(teacher_dir, student_dir, data, tmp_path_factory.mktemp("laten_run"))
    return save_dir, loaded[1]


def _align_lm_loss(teacher_dir, student_dir, data, translator, rate=0.5):
    """Student LM loss on the align set + the extract examples, with the translator's deltas located
    on extract example 0 (the same deltas for both translators compared)."""
    teacher, student = load_model(teacher_dir, "fp32", "cpu"), load_model(student_dir, "fp32", "cpu")
    tok = load_tokenizer(student_dir)
    recs = load_chat_jsonl(data["extract"])
    t_sel, s_sel = laten.locate_pair(ModelPair(teacher, student, tok, tok), recs[0]["messages"], rate)
    records = load_chat_jsonl(data["align"]) + recs
    with torch.no_grad():
        translated = translator(extract(teacher, t_sel, translator.modules_))
        with inject(student, deltas_for(s_sel, translated, model_shape(student))):
            losses = [laten.lm_loss(student, b).item()
                      for b in micro_batches(tok, records, 4, 768, False)]
    return sum(losses) / len(losses)


def test_training_lowers_loss_student_frozen(trained, teacher_dir, student_dir, data):
    save_dir, student = trained
    log = [json.loads(l) for l in (save_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(STEPS))
    keys = {"step", "loss", "lm_loss", "mse_loss", "lr", "seconds", "teacher_ffn_layers", "student_ffn_layers",
            "teacher_attn_layers", "student_attn_layers", "example_id"}
    assert keys <= set(log[0])
    assert all(r["grad_norm"] > 0 for r in log)                     # the translator gets gradients
    assert all(len(r["teacher_ffn_layers"]) == 3 == len(r["student_ffn_layers"]) for r in log)
    ckpt = save_dir / f"checkpoint_{STEPS - 1}"
    assert {"translator.safetensors", "translator_config.json", "trainer_state.pt"} <= {p.name for p in ckpt.iterdir()}
    cfg = json.loads((ckpt / "translator_config.json").read_text())
    assert (cfg["d_T"], cfg["d_S"], cfg["transfer_rate"]) == (96, 64, 0.5)

    # the student the script trained against is bit-identical to the one on disk, and never required grad
    fresh = load_model(student_dir, "fp32", "cpu").state_dict()
    for k, v in student.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    assert not any(p.requires_grad for p in student.parameters())

    torch.manual_seed(0)
    untrained = KnowledgeTranslator(96, 64)
    before = _align_lm_loss(teacher_dir, student_dir, data, untrained)
    after = _align_lm_loss(teacher_dir, student_dir, data, KnowledgeTranslator.load(ckpt))
    print("align loss before/after", before, after)
    assert after < before - 0.02, (before, after)


def test_checkpoints_carry_the_training_budget_so_far(trained, student_dir, data):
    """Per step: one locate forward of each model on the example, then the student's forward + backward on the
    n_align align examples + the example (the tiny pair shares one tokenizer, so both read the same ids)."""
    save_dir, _ = trained
    tok = load_tokenizer(student_dir)
    extract_recs = {r["id"]: r for r in load_chat_jsonl(data["extract"])}
    align_recs = {r["id"]: r for r in load_chat_jsonl(data["align"])}
    log = [json.loads(l) for l in (save_dir / "train_log.jsonl").read_text().splitlines()]
    located = trained_on = 0
    for r in log:
        rec = extract_recs[r["example_id"]]
        located += len(locate_ids(tok, rec["messages"])) - 1
        fed = [align_recs[i] for i in r["align_example_ids"]] + [rec]
        trained_on += sum(len(tokenize_example(tok, x["messages"], 768, False)["input_ids"]) for x in fed)
        steps = r["step"] + 1
        assert read_budget(save_dir / f"checkpoint_{r['step']}") == {
            "method": "LaTen-train", "teacher_forward_tokens": located, "teacher_backward_tokens": 0,
            "student_forward_tokens": located + trained_on, "student_backward_tokens": trained_on,
            "optimizer_steps": steps, "examples": steps * (TRAIN["n_align"] + 1)}


@pytest.mark.parametrize("log", ["whole", "torn"])
def test_resume_matches_uninterrupted(trained, teacher_dir, student_dir, data, tmp_path, log, caplog):
    save_dir, _ = trained
    k = 2
    part = tmp_path / "toy"
    part.mkdir()
    for s in range(k + 1):
        shutil.copytree(save_dir / f"checkpoint_{s}", part / f"checkpoint_{s}")
    if log == "whole":   # as if the run died after writing it: lines of steps > k are dropped on resume
        shutil.copy(save_dir / "train_log.jsonl", part / "train_log.jsonl")
    else:                # killed while writing step k+1's line (or the disk filled up): half a line is left
        lines = (save_dir / "train_log.jsonl").read_text().splitlines(keepends=True)
        (part / "train_log.jsonl").write_text("".join(lines[:k + 1]) + lines[k + 1][:len(lines[k + 1]) // 2])
    with pytest.raises(PKTError, match="already holds a run"):
        _train(teacher_dir, student_dir, data, tmp_path)
    random.seed(123)        # the draws are re-derived from --seed, whatever the global RNGs hold
    np.random.seed(123)
    with caplog.at_level(logging.WARNING):
        _train(teacher_dir, student_dir, data, tmp_path, resume=True)
    assert ("torn last line dropped" in caplog.text) == (log == "torn")
    a = KnowledgeTranslator.load(save_dir / f"checkpoint_{STEPS - 1}").state_dict()
    b = KnowledgeTranslator.load(part / f"checkpoint_{STEPS - 1}").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    full, resumed = ([json.loads(l) for l in (d / "train_log.jsonl").read_text().splitlines()] for d in (save_dir, part))
    assert [r["step"] for r in resumed] == list(range(STEPS))
    draws = lambda log: [(r["example_id"], r["align_example_ids"]) for r in log]
    assert draws(resumed) == draws(full)
    assert read_budget(part / f"checkpoint_{STEPS - 1}") == read_budget(save_dir / f"checkpoint_{STEPS - 1}")


def _changed_only_at(orig: dict, new: dict, info: dict, prefix="model.layers"):
    """Every edited weight differs exactly at the located rows/columns of the kept layers."""
    expect = {}  # (layer, module) -> (dim, set of indices)
    for j, l in enumerate(info["student_ffn_layers"]):
        expect[(l, "mlp.up_proj")] = (0, set(info["student_ffn_neurons"][j]))
        expect[(l, "mlp.down_proj")] = (1, set(info["student_ffn_neurons"][j]))
    for j, l in enumerate(info["student_attn_layers"]):
        expect[(l, "self_attn.v_proj")] = (0, set(info["student_v_rows"][j]))
        expect[(l, "self_attn.o_proj")] = (1, set(info["student_attn_neurons"][j]))
    seen = 0
    for name, w in orig.items():
        hit = [key for key in expect if name == f"{prefix}.{key[0]}.{key[1]}.weight"]
        if not hit:
            assert torch.equal(w, new[name]), f"{name} changed"
            continue
        seen += 1
        dim, idx = expect[hit[0]]
        diff = (w != new[name]).any(dim=1 - dim)
        changed = set(torch.nonzero(diff).flatten().tolist())
        assert changed == idx, f"{name}: changed {sorted(changed)[:8]}..., expected {sorted(idx)[:8]}..."
    assert seen == len(expect)


def test_inference_folds_deltas(trained, teacher_dir, student_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    save_dir, _ = trained
    out = laten.transfer(TransferConfig(source_model=teacher_dir, target_model=student_dir, data_path=data["train"],
                               translator_checkpoints=str(save_dir), transfer_rates=[0.1, 0.5],
                               steps=[STEPS - 1], seed=42, output_dir=str(tmp_path), dtype="fp32",
                               teacher_device="cpu", student_device="cpu"))
    name = Path(student_dir).name
    assert [Path(p).name for p in out] == [f"{name}-transfer_rate10.0%-step{STEPS - 1}",
                                           f"{name}-transfer_rate50.0%-step{STEPS - 1}"]
    orig = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).state_dict()
    for p, rate in zip(out, (0.1, 0.5)):
        info = json.loads((Path(p) / "laten_transfer.json").read_text())
        assert info["transfer_rate"] == rate and info["step"] == STEPS - 1
        assert len(info["student_ffn_neurons"][0]) == int(160 * rate)
        assert len(info["student_attn_neurons"][0]) == int(64 * rate)
        new = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict()
        _changed_only_at(orig, new, info)    # also: the 0.5 transfer did not compound on the 0.1 one
        assert (Path(p) / "tokenizer_config.json").exists()

    # the whole method's compute: the step's training + one locate forward of each model on the seed example
    seed = {r["id"]: r for r in load_chat_jsonl(data["train"])}[info["seed_example_id"]]
    n = len(locate_ids(load_tokenizer(student_dir), seed["messages"], add_bos=True)) - 1
    trained_budget = read_budget(save_dir / f"checkpoint_{STEPS - 1}")
    for p in out:
        assert read_budget(p) == {**trained_budget, "method": "LaTen", "examples": trained_budget["examples"] + 1,
                                  "teacher_forward_tokens": trained_budget["teacher_forward_tokens"] + n,
                                  "student_forward_tokens": trained_budget["student_forward_tokens"] + n}


def test_gqa_qwen2_student(teacher_dir, qwen_student_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    save_dir = _train(teacher_dir, qwen_student_dir, data, tmp_path / "tr", max_steps=2)
    out = laten.transfer(TransferConfig(source_model=teacher_dir, target_model=qwen_student_dir, data_path=data["train"],
                               translator_checkpoints=str(save_dir), transfer_rates=[0.5], steps=[1],
                               output_dir=str(tmp_path / "fused"), dtype="fp32", teacher_device="cpu",
                               student_device="cpu"))
    info = json.loads((Path(out[0]) / "laten_transfer.json").read_text())
    assert max(max(r) for r in info["student_v_rows"]) < 32        # 2 KV heads x head_dim 16
    orig = AutoModelForCausalLM.from_pretrained(qwen_student_dir, dtype=torch.float32).state_dict()
    new = AutoModelForCausalLM.from_pretrained(out[0], dtype=torch.float32).state_dict()
    _changed_only_at(orig, new, info)


def test_transfer_functions_shapes_and_gqa_duplicates():
    from pkt.attribution import Selection

    teacher, student = make_llama(hidden=96, ffn=256, layers=4, seed=1), make_llama(64, 160, 3, 4, kv_heads=2, seed=2)
    sel = lambda layers, f, a: Selection(attn_layers=layers, ffn_layers=layers, ffn_neurons=f, attn_neurons=a,
                                         attn_layers_ranked=[], ffn_layers_ranked=[], attn_layer_scores=None,
                                         ffn_layer_scores=None, ffn_scores=None, attn_scores=None)
    t_sel = sel([0, 2, 3], torch.arange(5).repeat(3, 1) * 7, torch.tensor([[1, 30, 70]] * 3))
    ext = extract(teacher, t_sel, ["up_proj", "down_proj", "v_proj", "o_proj"])
    assert ext["up_proj"].shape == (3, 5, 96) and ext["down_proj"].shape == (3, 96, 5)
    assert ext["v_proj"].shape == (3, 3, 96) and ext["o_proj"].shape == (3, 96, 3)
    assert torch.equal(ext["down_proj"][1, :, 2], teacher.model.layers[2].mlp.down_proj.weight[:, 14])
    assert torch.equal(ext["v_proj"][2, 1], teacher.model.layers[3].self_attn.v_proj.weight[30])
    tr = KnowledgeTranslator(96, 64, init_std=0.02)
    out = tr(ext)
    assert out["up_proj"].shape == (3, 5, 64) and out["o_proj"].shape == (3, 64, 3)
    assert torch.allclose(mse_penalty(out), 1000 * sum(v.pow(2).mean() for v in out.values()))
    # student neurons 1 and 17 (heads 0 and 1) share v row 1 under 2 KV heads: their deltas add
    s_sel = sel([0, 1, 2], torch.arange(5).repeat(3, 1), torch.tensor([[1, 17, 5]] * 3))
    deltas = deltas_for(s_sel, out, model_shape(student))
    v0 = [d for d in deltas if d.module == "v_proj" and d.layer == 0][0]
    assert v0.index.tolist() == [1, 1, 5]
    x = torch.randn(1, 4, 64)
    v = student.model.layers[0].self_attn.v_proj
    with torch.no_grad(), inject(student, [v0]):
        got = v(x)
    want = x @ v.weight.T + x @ torch.zeros(32, 64).index_add(0, v0.index, v0.value.detach()).T
    torch.testing.assert_close(got, want)


def test_align_step_gradients_match_reference_loop(teacher_dir, student_dir, data):
    """align_step (translate once, one translator backward; with and without gradient checkpointing) gives
    the reference's gradient: re-translate per micro-batch, backward each (LM + 1000 MSE), summed."""
    from pkt.data import load_chat_jsonl

    teacher, tok = load_model(teacher_dir, "fp32", "cpu"), load_tokenizer(student_dir)
    recs = load_chat_jsonl(data["align"])[:6]
    grads = []
    for mode in ("reference", "align_step", "checkpointed"):
        student = laten.freeze(load_model(student_dir, "fp32", "cpu"))
        if mode == "checkpointed":
            laten.enable_checkpointing(student)
        t_sel, s_sel = laten.locate_pair(ModelPair(teacher, student, tok, tok), recs[0]["messages"], 0.5)
        torch.manual_seed(0)
        tr = KnowledgeTranslator(96, 64, init_std=0.02)
        knowledge = extract(teacher, t_sel, tr.modules_)
        batches = micro_batches(tok, recs, 2, 768, False)
        if mode == "reference":
            for batch in batches:
                translated = tr(knowledge)
                with inject(student, deltas_for(s_sel, translated, model_shape(student))):
                    (laten.lm_loss(student, batch) + mse_penalty(translated)).backward()
        else:
            stats = laten.align_step(tr, knowledge, student, s_sel, batches)
            assert stats["micro_batches"] == 3 and stats["grad_norm"] > 0
        grads.append([p.grad.clone() for p in tr.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)
            assert a.abs().sum() > 0


def test_nan_loss_is_an_error_unless_skipped(teacher_dir, student_dir, data, monkeypatch):
    from pkt.data import load_chat_jsonl

    teacher, tok = load_model(teacher_dir, "fp32", "cpu"), load_tokenizer(student_dir)
    student = laten.freeze(load_model(student_dir, "fp32", "cpu"))
    recs = load_chat_jsonl(data["align"])[:4]
    t_sel, s_sel = laten.locate_pair(ModelPair(teacher, student, tok, tok), recs[0]["messages"], 0.5)
    tr = KnowledgeTranslator(96, 64)
    knowledge = extract(teacher, t_sel, tr.modules_)
    batches = micro_batches(tok, recs, 2, 768, False)
    real = laten.lm_loss
    calls = []

    def first_nan(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(laten, "lm_loss", first_nan)
    with pytest.raises(PKTError, match="non-finite loss"):
        laten.align_step(tr, knowledge, student, s_sel, batches)
    calls.clear()
    stats = laten.align_step(tr, knowledge, student, s_sel, batches, skip_nan=True)
    assert (stats["micro_batches"], stats["skipped_micro_batches"]) == (1, 1) and stats["grad_norm"] > 0


def _other_tokenizer():
    """A second byte-level BPE (smaller vocabulary, other merges): different ids for the same text."""
    from pkt.testing import make_tokenizer

    return make_tokenizer(270, ["Answer: Question: answer answer answer is is the the +"])


def test_each_model_reads_with_its_own_tokenizer(student_dir, data, tmp_path, monkeypatch):
    from pkt.data import load_chat_jsonl, locate_ids

    t_tok = _other_tokenizer()
    teacher = save_model(make_llama(hidden=96, ffn=256, layers=4, heads=4, seed=7), t_tok, tmp_path / "teacher")
    seen = []
    real = laten.locate

    def spy(model, examples, **kw):
        seen.append((model_shape(model).hidden, examples[0]))
        return real(model, examples, **kw)

    monkeypatch.setattr(laten, "locate", spy)
    save_dir = _train(teacher, student_dir, data, tmp_path / "run", max_steps=1)
    assert (save_dir / "checkpoint_0" / "translator.safetensors").exists()
    rec = load_chat_jsonl(data["extract"])
    (t_hidden, t_ids), (s_hidden, s_ids) = seen
    assert (t_hidden, s_hidden) == (96, 64) and t_ids != s_ids
    assert any(t_ids == locate_ids(t_tok, r["messages"]) for r in rec)
    assert any(s_ids == locate_ids(load_tokenizer(student_dir), r["messages"]) for r in rec)


def test_narrow_teacher_logged_and_shallow_teacher_rejected(student_dir, teacher_dir, data, tmp_path, tokenizer,
                                                            caplog):
    narrow = save_model(make_llama(hidden=48, ffn=128, layers=3, heads=4, seed=5), tokenizer, tmp_path / "narrow")
    with caplog.at_level(logging.WARNING):
        save_dir = _train(narrow, student_dir, data, tmp_path / "n", max_steps=1)
    assert "narrower than the student" in caplog.text
    assert json.loads((save_dir / "checkpoint_0" / "translator_config.json").read_text())["d_T"] == 48
    with pytest.raises(PKTError, match="fewer than the student's"):
        _train(student_dir, teacher_dir, data, tmp_path / "s", max_steps=1)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("case", ["no_messages", "empty", "rate0", "rate_big", "bad_module"])
def test_bad_inputs_write_nothing(case, teacher_dir, student_dir, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    kw = {}
    if case == "no_messages":
        bad.write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n")
        kw["extract_data_path"], match = str(bad), "missing field 'messages'"
    elif case == "empty":
        bad.write_text("")
        kw["extract_data_path"], match = str(bad), "no records"
    elif case == "bad_module":
        kw["lora_target_modules"], match = "up_proj,q_proj", "unknown module"
    else:
        kw["transfer_rate"], match = (0.0 if case == "rate0" else 1.5), r"\(0, 1\]"
    out = tmp_path / "out"
    with pytest.raises(PKTError, match=match):
        _train(teacher_dir, student_dir, data, out, **kw)
    assert not out.exists()
    with pytest.raises(PKTError, match=r"\(0, 1\]"):
        laten.transfer(TransferConfig(source_model=teacher_dir, target_model=student_dir, data_path=data["train"],
                             translator_checkpoints=str(tmp_path), transfer_rates=[2.0], steps=[0],
                             output_dir=str(out)))


def test_cli_missing_file_exit_2(teacher_dir, student_dir, data, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "train_LaTen.py"), "--source_model", teacher_dir,
                        "--target_model", student_dir, "--extract_data_path", str(tmp_path / "nope.jsonl"),
                        "--align_data_path", data["align"], "--output_dir", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: no such file"]
    assert not out.exists()


@pytest.mark.parametrize("script", ["train_LaTen.py", "inference_LaTen.py", "finetune.py", "train_SemAlign.py"])
def test_cli_mistyped_flag_exit_2_before_anything_runs(script, tmp_path):
    # fire alone would run with the default in place of the mistyped flag, then complain
    r = subprocess.run([sys.executable, str(ROOT / script), "--output_dir", str(tmp_path / "out"), "--learnig_rate", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: unknown flag --learnig_rate (see --help)"]
    assert not (tmp_path / "out").exists()


def test_transfer_refuses_an_existing_output_without_overwrite(trained, teacher_dir, student_dir, data, tmp_path):
    save_dir, _ = trained
    kw = dict(source_model=teacher_dir, target_model=student_dir, data_path=data["train"],
              translator_checkpoints=str(save_dir), transfer_rates=[0.5], steps=[0], output_dir=str(tmp_path))
    taken = laten.transfer_dir(tmp_path, student_dir, 0.5, 0)
    taken.mkdir()
    (taken / "model.safetensors").write_text("a user's file")
    with pytest.raises(PKTError, match="already exists and is not empty"):
        TransferConfig(**kw)
    assert TransferConfig(**kw, overwrite=True).rates == [0.5]
    with pytest.raises(PKTError, match="lies inside the input --translator_checkpoints"):
        TransferConfig(**{**kw, "output_dir": str(save_dir / "fused")})
