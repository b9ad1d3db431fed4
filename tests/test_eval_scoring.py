"""Scoring is right: gold answers / canonical solutions score 100%, degenerate predictions do not."""
import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pkt.eval import gsm, humaneval, mbpp, mmlu, score_file
from pkt.io import PKTError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "eval"


def test_gsm_extraction_and_gold():
    assert gsm.extract_answer("So 3 + 4 = 7. So the answer is 2,125.") == "2125"
    assert gsm.extract_answer("The answer is -3.5") == "-3.5"
    assert gsm.extract_answer("no number") == ""
    assert gsm.gold_answer("blah\n#### 1,000") == "1000"
    assert gsm.is_correct(gsm.extract_answer("it is 1,000 dollars"), "1000")
    test, shots = gsm.load(DATA)
    recs = [{"id": i, "output": ex["answer"]} for i, ex in enumerate(test)]
    m = gsm.score(recs, DATA)
    assert m["accuracy"] == 1.0 and m["n"] == 1319
    assert gsm.score([{"id": i, "output": ""} for i in range(50)], DATA)["accuracy"] == 0.0


def test_gsm_prompt_format():
    test, shots = gsm.load(DATA)
    p = gsm.build_prompt("What is 1+1?", shots)
    assert p.startswith("Answer the following questions.\n\nQuestion: There are 15 trees")
    assert p.endswith("\n\nQuestion: What is 1+1?\nAnswer:") and p.count("Question:") == 9
    c = gsm.build_prompt("What is 1+1?", shots, use_chat_format=True)
    assert c.startswith("<|user|>\nAnswer the following") and c.endswith("What is 1+1?\n\n<|assistant|>\nAnswer:")


def test_mmlu_oracle_and_constant():
    test = mmlu.load(DATA)
    oracle = mmlu.score([{"id": i, "output": "ABCD"[ex["answer"]]} for i, ex in enumerate(test)], DATA)
    assert oracle["accuracy"] == 1.0 and oracle["macro_accuracy"] == 1.0 and len(oracle["per_subject"]) == 57
    share = Counter(ex["answer"] for ex in test)[2] / len(test)
    const = mmlu.score([{"id": i, "output": "C"} for i in range(len(test))], DATA)
    assert const["accuracy"] == pytest.approx(share) and 0.2 < const["accuracy"] < 0.3


def test_mmlu_prompt_and_limit():
    test = mmlu.load(DATA)
    p = mmlu.build_prompt(test[0], [])
    assert p.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert p.endswith("\nD. 6\nAnswer:")
    assert mmlu.build_prompt(test[0], [], True).endswith("<|assistant|>\nThe answer is:")
    sel = mmlu.select(test, 57)
    assert len(sel) == 57 and len({ex["subject"] for ex in sel}) == 57


def test_humaneval_canonical_all_pass_and_empty_fail():
    probs = humaneval.load(DATA)
    m = humaneval.score([{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs], DATA)
    assert m["pass@1"] == 1.0 and m["n_tasks"] == 164
    empty = humaneval.score([{"task_id": p["task_id"], "completion": ""} for p in probs[:20]], DATA)
    assert empty["pass@1"] == 0.0


def test_humaneval_pass_at_1_over_samples():
    p = humaneval.load(DATA)[0]
    recs = [{"task_id": p["task_id"], "completion": p["canonical_solution"] if i < 5 else ""} for i in range(20)]
    assert humaneval.score(recs, DATA)["pass@1"] == pytest.approx(0.25)


def _mbpp_subset(probs):
    # a representative subset: the first 60 tasks and task 367 (setup code uses a class the solution defines)
    return [p for p in probs if p["task_id"] < 71 or p["task_id"] == 367]


def test_mbpp_canonical_subset_and_empty():
    probs = _mbpp_subset(mbpp.load(DATA))
    m = mbpp.score([{"task_id": p["task_id"], "completion": p["code"]} for p in probs], DATA)
    assert m["pass@1"] == 1.0 and m["n_tasks"] == 61
    assert mbpp.score([{"task_id": p["task_id"], "completion": ""} for p in probs[:20]], DATA)["pass@1"] == 0.0
    p367 = [p for p in probs if p["task_id"] == 367][0]
    assert p367["test_setup_code"].strip() and "class" in p367["code"]


@pytest.mark.slow
def test_mbpp_canonical_all_500():
    probs = mbpp.load(DATA)
    m = mbpp.score([{"task_id": p["task_id"], "completion": p["code"]} for p in probs], DATA)
    assert m["pass@1"] == 1.0 and m["n_tasks"] == 500


def test_mbpp_prompt():
    p = mbpp.load(DATA)[0]
    prompt = mbpp.build_prompt(p)
    assert prompt.startswith('"""\nWrite a python function') and p["test_list"][0] in prompt
    assert p["test_list"][1] not in prompt


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_score_cli_last_line(tmp_path):
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        probs = [json.loads(line) for line in f][:30]
    pred = _write(tmp_path / "he.jsonl", [{"task_id": p["task_id"], "completion": p["canonical_solution"]}
                                          for p in probs])
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "score", "--task", "humaneval",
                        "--predictions", pred], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "humaneval pass@1 = 1.0000"
    gsm_pred = _write(tmp_path / "gsm.jsonl", [{"id": 0, "output": "18"}, {"id": 1, "output": "2"}])
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "score", "--task", "gsm",
                        "--predictions", gsm_pred], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "gsm accuracy = 0.5000"


def test_score_cli_bad_input(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"task_id": "HumanEval/0", "completion": ""}, {"task_id": "nope"}])
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "score", "--task", "humaneval",
                        "--predictions", bad], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "task_id" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(PKTError, match="no such file"):
        score_file("gsm", str(tmp_path / "missing.jsonl"))
    with pytest.raises(PKTError, match="--task"):
        score_file("squad", bad)
    with pytest.raises(PKTError, match="field 'output'"):
        score_file("mmlu", _write(tmp_path / "m.jsonl", [{"id": 0, "output": "E"}]))
