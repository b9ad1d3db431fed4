"""The kl task (mean KL(teacher || model) on held-out responses) and the per-example NLL records, on tiny
models that share one tokenizer."""
import json

import pytest
import torch
import torch.nn.functional as F

from pkt.data import load_chat_jsonl, tokenize_example
from pkt.eval import kl, nll
from pkt.eval.harness import EvalConfig, evaluate
from pkt.io import PKTError, load_model, load_tokenizer
from pkt.testing import make_llama, make_tokenizer, save_model


@pytest.fixture(scope="module")
def models(teacher_dir, student_dir):
    return load_model(teacher_dir, device="cpu"), load_model(student_dir, device="cpu"), load_tokenizer(student_dir)


def _direct_kl(teacher, student, tok, records):
    """Per record, without batching or logits_to_keep: sum over response tokens of KL(p_T || p_S), count."""
    out = []
    for r in records:
        f = tokenize_example(tok, r["messages"])
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
        sel = labels[1:] != -100
        log_p = F.log_softmax(teacher(ids).logits[0, :-1][sel], -1)
        log_q = F.log_softmax(student(ids).logits[0, :-1][sel], -1)
        out.append(((log_p.exp() * (log_p - log_q)).sum().item(), int(sel.sum())))
    return out


def test_kl_matches_a_direct_computation_per_example(models, chat_jsonl):
    teacher, student, tok = models
    records = load_chat_jsonl(chat_jsonl("kl.jsonl", n=5))
    sums, counts, _ = kl.example_kl(teacher, student, tok, records, batch_size=2)
    ref = _direct_kl(teacher, student, tok, records)
    assert counts == [c for _, c in ref]
    assert sums == pytest.approx([s for s, _ in ref], rel=1e-4)
    assert all(s > 0 for s in sums)


def test_kl_task_end_to_end_writes_per_example_values_and_an_interval(teacher_dir, student_dir, chat_jsonl, tmp_path):
    data = chat_jsonl("kl_e2e.jsonl", n=6)
    summary = evaluate(EvalConfig(model_path=student_dir, tasks="nll,kl", teacher=teacher_dir, nll_data=f"toy={data}",
                                  output_dir=str(tmp_path / "o"), batch_size=4))
    m = summary["tasks"]["kl"]
    recs = [json.loads(line) for line in open(tmp_path / "o" / "kl" / "predictions.jsonl")]
    assert len(recs) == 6 and {r["dataset"] for r in recs} == {"toy"}
    assert sum(r["kl_sum"] for r in recs) / sum(r["n_tokens"] for r in recs) == pytest.approx(m["kl"])
    assert m["kl_ci"][0] <= m["kl"] <= m["kl_ci"][1] and m["settings"]["teacher"] == str(teacher_dir)
    assert m["n_tokens"] == summary["tasks"]["nll"]["n_tokens"]       # the same response tokens as the NLL


def test_the_teacher_has_kl_zero_without_a_second_forward(teacher_dir, chat_jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr(kl, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded twice"))
    summary = evaluate(EvalConfig(model_path=teacher_dir, tasks="kl", teacher=teacher_dir,
                                  nll_data=chat_jsonl("kl_self.jsonl", n=3), output_dir=str(tmp_path / "o")))
    assert summary["tasks"]["kl"]["kl"] == 0.0 and summary["tasks"]["kl"]["n_tokens"] > 0


def test_teacher_cache_gives_the_same_kl_and_is_keyed_by_the_data(models, teacher_dir, chat_jsonl, tmp_path,
                                                                   monkeypatch):
    teacher, student, tok = models
    records = load_chat_jsonl(chat_jsonl("kl_cache.jsonl", n=4))
    fresh, _, per_example = kl.example_kl(teacher, student, tok, records, batch_size=3)
    path = kl.cache_path(tmp_path, teacher_dir, "auto", tok, records)
    kl.write_cache(path, per_example)
    cached, _, _ = kl.example_kl(None, student, tok, records, batch_size=3, cached=kl.read_cache(path, len(records)))
    assert cached == fresh
    assert kl.cache_path(tmp_path, teacher_dir, "auto", tok, records[:3]) != path
    assert kl.cache_path(tmp_path, teacher_dir, "bf16", tok, records) != path
    # through the task: the second model evaluated against the teacher does not load it
    cfg = dict(model_path=str(tmp_path / "s"), tasks="kl", teacher=teacher_dir, teacher_cache=str(tmp_path / "c"),
               nll_data=chat_jsonl("kl_cache2.jsonl", n=3))
    save_model(student, tok, tmp_path / "s")
    first = evaluate(EvalConfig(**cfg, output_dir=str(tmp_path / "a")))
    monkeypatch.setattr(kl, "load_model", lambda *a, **k: pytest.fail("the cached teacher was loaded"))
    second = evaluate(EvalConfig(**cfg, output_dir=str(tmp_path / "b")))
    assert second["tasks"]["kl"]["kl"] == first["tasks"]["kl"]["kl"]


def test_kl_needs_a_teacher(chat_jsonl):
    with pytest.raises(PKTError, match="--tasks kl needs --teacher"):
        EvalConfig(model_path="m", tasks="kl", nll_data=chat_jsonl("kl_t.jsonl", n=1))
    with pytest.raises(PKTError, match="--tasks kl needs --nll_data"):
        EvalConfig(model_path="m", tasks="kl", teacher="t")


def test_kl_refuses_a_teacher_with_another_vocabulary_before_loading(student_dir, chat_jsonl, tmp_path):
    other = save_model(make_llama(hidden=64, ffn=160, layers=2, heads=4, vocab=200, seed=5),
                       make_tokenizer(vocab_size=200), tmp_path / "other")
    with pytest.raises(PKTError, match=r"--teacher .* and --model_path .* have different vocabularies"):
        evaluate(EvalConfig(model_path=student_dir, tasks="kl", teacher=str(other),
                            nll_data=chat_jsonl("kl_v.jsonl", n=1), output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_nll_predictions_are_per_example_and_add_up_to_the_pooled_nll(student_dir, chat_jsonl, tmp_path):
    a, b = chat_jsonl("nll_a.jsonl", n=3, seed=1), chat_jsonl("nll_b.jsonl", n=2, seed=2)
    m = evaluate(EvalConfig(model_path=student_dir, tasks="nll", nll_data=f"a={a},b={b}",
                            output_dir=str(tmp_path / "o")))["tasks"]["nll"]
    recs = [json.loads(line) for line in open(tmp_path / "o" / "nll" / "predictions.jsonl")]
    assert [(r["dataset"], r["index"]) for r in recs] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert all(r["nll"] == pytest.approx(r["nll_sum"] / r["n_tokens"]) for r in recs)
    assert sum(r["nll_sum"] for r in recs) / sum(r["n_tokens"] for r in recs) == pytest.approx(m["nll"])
    assert m["nll_ci"][0] <= m["nll"] <= m["nll_ci"][1]
    assert m["datasets"]["b"]["n"] == 2 and len(m["datasets"]["b"]["nll_ci"]) == 2


def test_response_logits_keep_only_the_response_positions(models, chat_jsonl):
    _, student, tok = models
    records = load_chat_jsonl(chat_jsonl("nll_keep.jsonl", n=3))
    for idx, batch in nll.response_batches(tok, records, batch_size=3):
        logits, targets, rows = nll.response_logits(student, batch)
        full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        sel = batch["labels"][:, 1:] != -100
        assert torch.allclose(logits, full[sel], atol=1e-5)
        assert torch.equal(targets, batch["labels"][:, 1:][sel]) and torch.equal(rows, sel.nonzero()[:, 0])
