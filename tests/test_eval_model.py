"""The harness runs a tiny random model end to end; generation batching and stop strings are exact."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkt.eval import evaluate, mmlu
from pkt.eval.generate import (MIN_SHARED_PREFIX, generate_hf, next_token_logits, shared_prefix_len,
                                truncate_at_stop)
from pkt.eval.nll import response_nll
from pkt.io import PKTError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(student_dir, tokenizer):
    from pkt.io import load_model, load_tokenizer

    return load_model(student_dir, device="cpu"), load_tokenizer(student_dir)


def test_cli_every_task_end_to_end(student_dir, chat_jsonl, tmp_path):
    data = chat_jsonl("heldout.jsonl", n=4)
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model_path", student_dir,
                        "--tasks", "gsm,mmlu,humaneval,mbpp,nll", "--limit", "2", "--max_new_tokens", "8",
                        "--n", "2", "--batch_size", "4", "--nll_data", f"toy={data}", "--output_dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == ["gsm", "mmlu", "humaneval", "mbpp", "nll"]
    for task, key in [("gsm", "accuracy"), ("mmlu", "accuracy"), ("humaneval", "pass@1"), ("mbpp", "pass@1")]:
        assert 0.0 <= summary["tasks"][task][key] <= 1.0
        preds = [json.loads(line) for line in (out / task / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == (4 if task == "humaneval" else 2)  # n=2 samples per HumanEval problem
        assert {"prompt", "output", "correct"} <= set(preds[0])
        assert json.loads((out / task / "metrics.json").read_text())[key] == summary["tasks"][task][key]
    assert summary["tasks"]["nll"]["nll"] > 0 and "toy" in summary["tasks"]["nll"]["datasets"]
    assert "| humaneval | pass@1 |" in (out / "summary.md").read_text()


def test_cli_bad_flags(student_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model_path", student_dir, "--tasks",
                        "gsm,squad", "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--tasks" in r.stderr and "squad" in r.stderr
    with pytest.raises(PKTError, match="--nll_data"):
        evaluate(student_dir, "nll", str(tmp_path))
    with pytest.raises(PKTError, match="--model_path"):
        evaluate(str(tmp_path / "nope"), "gsm", str(tmp_path))


def test_batched_greedy_equals_unbatched(tiny):
    model, tok = tiny
    prompts = ["Question: 1 + 2 =", "def f(x): return x", "A", "Answer: the answer is 42. Question: 7 * 6 ="]
    one = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=1)
    many = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert one == many and all(len(o) == 1 for o in one)


def test_shared_prefix_is_prefilled_once_and_changes_nothing(tiny):
    model, tok = tiny
    shots = "Question: the cat sat on the mat. Answer: yes it did.\n\n" * 6     # few-shot exemplars
    prompts = [shots + f"Question: what {w} the dog? Answer:" for w in ("is", "was the big", "and", "has seen")]
    rows = tok(prompts)["input_ids"]
    assert shared_prefix_len(rows) >= MIN_SHARED_PREFIX
    plain = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=1, prefix_cache=False)
    cached = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=3, prefix_cache=True)
    assert cached == plain
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2      # each row keeps a token to feed
    assert shared_prefix_len([[1, 2, 3], [1, 5], [1, 2]]) == 1


def test_stop_strings_cut_generation(tiny):
    model, tok = tiny
    prompts = ["Question: 3 + 4 =", "def g(y):"]
    free = generate_hf(model, tok, prompts, max_new_tokens=24, batch_size=2)
    text = free[0][0]
    assert len(text) > 6
    stop = text[3:6]  # a string the model is known to produce
    cut = generate_hf(model, tok, prompts, max_new_tokens=24, batch_size=2, stop=[stop])
    assert cut[0][0] == text[:text.index(stop)]
    assert truncate_at_stop("abc\n\ndef", ["\n\n", "z"]) == "abc"


def test_sampling_n_and_seed(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    a = generate_hf(model, tok, ["Question:"], max_new_tokens=6, n=3, temperature=1.0, top_p=0.95)
    torch.manual_seed(0)
    b = generate_hf(model, tok, ["Question:"], max_new_tokens=6, n=3, temperature=1.0, top_p=0.95)
    assert len(a[0]) == 3 and a == b


def test_mmlu_choice_tokens_and_logits(tiny, tokenizer):
    model, tok = tiny
    ids = mmlu.choice_ids(tok)
    assert ids == [tok.encode(" " + l, add_special_tokens=False)[-1] for l in "ABCD"]
    prompts = ["Question: 1 + 1 =\nA. 1\nB. 2\nAnswer:", "Answer:"]
    batched = next_token_logits(model, tok, prompts, ids, batch_size=2)
    for i, p in enumerate(prompts):
        enc = tok(p, return_tensors="pt")
        ref = model(**enc).logits[0, -1, ids]
        assert torch.allclose(batched[i], ref, atol=1e-4)


def test_nll_matches_direct_computation(tiny, chat_jsonl):
    from pkt.data import load_chat_jsonl, tokenize_example

    model, tok = tiny
    recs = load_chat_jsonl(chat_jsonl("nll.jsonl", n=3))
    total, count = response_nll(model, tok, recs, batch_size=2)
    ref_total, ref_count = 0.0, 0
    for r in recs:
        f = tokenize_example(tok, r["messages"])
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        ref_total += torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], labels[0, 1:],
                                                       ignore_index=-100, reduction="sum").item()
        ref_count += int((labels[0, 1:] != -100).sum())
    assert count == ref_count and total == pytest.approx(ref_total, rel=1e-4)


def test_adapter_path(student_dir, chat_jsonl, tmp_path):
    from peft import LoraConfig, get_peft_model

    from pkt.io import load_model

    base = load_model(student_dir, device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    data = chat_jsonl("adapter.jsonl", n=2)
    plain = evaluate(student_dir, "nll", str(tmp_path / "a"), nll_data=data)
    adapted = evaluate(student_dir, "nll", str(tmp_path / "b"), nll_data=data, adapter_path=str(tmp_path / "adapter"))
    assert adapted["adapter_path"] and adapted["tasks"]["nll"]["nll"] != plain["tasks"]["nll"]["nll"]
