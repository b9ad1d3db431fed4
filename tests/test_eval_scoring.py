"""Prompts are Open-Instruct's, byte for byte; scoring is right (gold answers / reference solutions score
100%, degenerate predictions do not); compare.py keeps protocols apart."""
import gzip
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pkt.eval import gsm, humaneval, mbpp, mmlu
from pkt.eval.common import select
from pkt.eval.generate import truncate_at_stop
from pkt.eval.harness import DEFAULT_DATA_DIR, ScoreConfig, score_predictions
from pkt.io import PKTError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "eval"

GSM_8_SHOTS = (
    "Answer the following questions.\n\n"
    "Question: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
    "done, there will be 21 trees. How many trees did the grove workers plant today?\n"
    "Answer: There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
    "have been 21 - 15 = 6. So the answer is 6.\n\n"
    "Question: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n"
    "Answer: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.\n\n"
    "Question: Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
    "total?\n"
    "Answer: Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating "
    "35, they had 74 - 35 = 39. So the answer is 39.\n\n"
    "Question: Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
    "did Jason give to Denny?\n"
    "Answer: Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = "
    "8. So the answer is 8.\n\n"
    "Question: Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
    "have now?\n"
    "Answer: Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 "
    "= 9. So the answer is 9.\n\n"
    "Question: There were nine computers in the server room. Five more computers were installed each day, from "
    "monday to thursday. How many computers are now in the server room?\n"
    "Answer: There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
    "computers were added. 9 + 20 is 29. So the answer is 29.\n\n"
    "Question: Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
    "golf balls did he have at the end of wednesday?\n"
    "Answer: Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
    "more, he had 35 - 2 = 33 golf balls. So the answer is 33.\n\n"
    "Question: Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\n"
    "Answer: Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
    "dollars left. 23 - 15 is 8. So the answer is 8.\n\n")
JANET = ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
         "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
         "egg. How much in dollars does she make every day at the farmers' market?")


def test_gsm_prompts_match_open_instruct():
    test, shots = gsm.load(DATA)
    q = test[0]["question"]
    assert gsm.build_prompt(q, shots) == GSM_8_SHOTS + "Question: " + JANET + "\nAnswer:"
    assert gsm.build_prompt(q, shots, True) == ("<|user|>\n" + GSM_8_SHOTS + "Question: " + JANET
                                                + "\n<|assistant|>\nAnswer:")
    assert gsm.build_prompt(q, []) == "Answer the following question.\n\nQuestion: " + JANET + "\nAnswer:"
    assert gsm.build_prompt("  What is 1+1? \n", [], True) == ("<|user|>\nAnswer the following question.\n\n"
                                                               "Question: What is 1+1?\n<|assistant|>\nAnswer:")


def test_gsm_extraction_keeps_the_sign():
    assert gsm.extract_answer("So 3 + 4 = 7. So the answer is 2,125.") == "2125"
    assert gsm.extract_answer("The answer is -3.5") == "-3.5"
    assert gsm.extract_answer("The temperature fell to -3") == "-3"      # open-instruct's regex reads "3"
    assert gsm.extract_answer("no number") == ""
    assert gsm.gold_answer("blah\n#### 1,000") == "1000"
    assert gsm.is_correct(gsm.extract_answer("it is 1,000 dollars"), "1000")
    assert not gsm.is_correct("3", "-3") and not gsm.is_correct("1.5", "15")


def test_gsm_gold_answers_score_100_and_empty_0():
    test, _ = gsm.load(DATA)
    items = [{"id": i, "gold": gsm.gold_answer(ex["answer"])} for i, ex in enumerate(test)]
    _, m = gsm.score(items, [ex["answer"] for ex in test])
    assert m["accuracy"] == 1.0 and m["n"] == 1319
    assert gsm.score(items[:50], [""] * 50)[1]["accuracy"] == 0.0


MMLU_HEADER = "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
MMLU_Q0 = ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
           "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
MMLU_DEV_AA = (
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
    "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric "
    "group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup of "
    "an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
    "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n")


def _dev():
    dev = {}
    for ex in mmlu.load(DATA, "dev"):
        dev.setdefault(ex["subject"], []).append(ex)
    return dev


def test_mmlu_prompts_match_open_instruct():
    test, dev = mmlu.load(DATA), _dev()
    assert mmlu.build_prompt(test[0], []) == MMLU_HEADER + MMLU_Q0
    assert mmlu.build_prompt(test[0], [], True) == "<|user|>\n" + MMLU_HEADER + MMLU_Q0 + "\n<|assistant|>\nThe answer is:"
    assert mmlu.build_prompt(test[0], dev["abstract_algebra"][:5]) == MMLU_HEADER + MMLU_DEV_AA + MMLU_Q0
    # questions are not stripped
    assert mmlu.build_prompt(test[13941], []) == (
        "The following are multiple choice questions (with answers) about  world religions.\n\n"
        " How many books are in the New Testament?\nA. 30\nB. 29\nC. 27\nD. 47\nAnswer:")


def test_mmlu_drops_exemplars_until_the_prompt_fits(tokenizer):
    test, dev = mmlu.load(DATA), _dev()
    ex = test[0]
    two_shot = mmlu.build_prompt(ex, dev["abstract_algebra"][:2])
    budget = len(tokenizer(two_shot, add_special_tokens=False)["input_ids"])
    [(prompt, k)] = mmlu.fitted_prompts([ex], dev, 5, False, tokenizer, max_tokens=budget)
    assert (prompt, k) == (two_shot, 2)
    [(prompt, k)] = mmlu.fitted_prompts([ex], dev, 5, False, tokenizer, max_tokens=1)
    assert (prompt, k) == (mmlu.build_prompt(ex, []), 0)     # never fewer than none (open-instruct loops)


@pytest.mark.parametrize("output, letter", [("C", "C"), (" C", "C"), ("C.", "C"), ("(C)", "C"), ("C) 12", "C"),
                                            ("Answer: C", "C"), ("The answer is: C", "C"),
                                            ("the answer is (B).", "B"), ("Cats", None), ("E", None),
                                            ("", None), ("c", None), ("Answer: E", None)])
def test_mmlu_prediction_must_name_one_letter(output, letter):
    assert mmlu.parse_choice(output) == letter


def test_mmlu_unparseable_predictions_are_wrong_and_counted():
    test = mmlu.load(DATA)
    items = [{"id": i, "subject": test[i]["subject"], "gold": "ABCD"[test[i]["answer"]]} for i in range(4)]
    outs = [{"output": f"Answer: {it['gold']}"} for it in items[:2]] + [{"output": "E"}, {"output": "Hmm"}]
    _, m = mmlu.score(items, outs)
    assert m["accuracy"] == 0.5 and m["n_unparseable"] == 2


def test_mmlu_oracle_and_constant():
    test = mmlu.load(DATA)
    items = [{"id": i, "subject": ex["subject"], "gold": "ABCD"[ex["answer"]]} for i, ex in enumerate(test)]
    _, oracle = mmlu.score(items, [{"output": it["gold"]} for it in items])
    assert oracle["accuracy"] == 1.0 and oracle["macro_accuracy"] == 1.0 and len(oracle["per_subject"]) == 57
    share = Counter(ex["answer"] for ex in test)[2] / len(test)
    _, const = mmlu.score(items, [{"output": "C"}] * len(items))
    assert const["accuracy"] == pytest.approx(share) and 0.2 < const["accuracy"] < 0.3


def test_limits_sample_as_open_instruct():
    items = list(range(1319))
    random.seed(42)
    assert select(items, 5, "sample", 42) == random.sample(items, 5)    # open-instruct's GSM8K/HumanEval draw
    assert select(items, 5, "first") == [0, 1, 2, 3, 4]
    test = mmlu.load(DATA)
    # open-instruct's --n_instances 2: per subject test_df.sample(2, random_state=42) (ids checked with pandas)
    assert mmlu.per_subject_sample(test, 2)[:6] == [83, 53, 198, 167, 303, 382]
    assert len({test[i]["subject"] for i in mmlu.round_robin(test, 57)}) == 57


HE_53 = ('\n\ndef add(x: int, y: int):\n    """Add two numbers x and y\n    >>> add(2, 3)\n    5\n'
         '    >>> add(5, 7)\n    12\n    """\n')


def test_humaneval_prompts_match_open_instruct():
    problems = {p["task_id"]: p for p in humaneval.load(DATA)}
    assert humaneval.build_prompt(problems["HumanEval/53"]) == HE_53
    assert humaneval.build_prompt(problems["HumanEval/53"], True) == (
        "<|user|>\nComplete the following python function.\n\n\n" + HE_53
        + "\n<|assistant|>\nHere is the completed function:\n\n\n```python\n")


def test_mbpp_prompts_match_open_instruct():
    p = mbpp.load(DATA)[0]
    text = ("Write a python function to remove first and last occurrence of a given character from the string."
            "def remove_Occ(s,ch)")
    assert mbpp.build_prompt(p) == text
    assert mbpp.build_prompt(p, True) == ("<|user|>\nComplete the following python function.\n\n\n" + text
                                          + "\n<|assistant|>\nHere is the completed function:\n\n\n```python\n")


def test_stop_strings_never_cut_a_reference_solution():
    for p in humaneval.load(DATA):
        for stop in (humaneval.STOP, humaneval.CHAT_STOP):
            assert truncate_at_stop(p["canonical_solution"], stop) == p["canonical_solution"], p["task_id"]
    for p in mbpp.load(DATA):
        plain = p["code"][len(mbpp.signature(p)):]                    # what follows the prompt's signature
        assert truncate_at_stop(plain, mbpp.STOP) == plain and truncate_at_stop(p["code"], mbpp.STOP) == p["code"]


def test_humaneval_canonical_all_pass_and_empty_fail():
    probs = humaneval.load(DATA)
    cfg = ScoreConfig(task="humaneval", predictions="-")
    items = [humaneval.item(p) for p in probs]
    _, m = humaneval.score(items, [[p["canonical_solution"]] for p in probs], cfg)
    assert m["pass@1"] == 1.0 and m["n_tasks"] == 164
    assert humaneval.score(items[:20], [[""]] * 20, cfg)[1]["pass@1"] == 0.0


def test_humaneval_pass_at_1_over_samples():
    p = humaneval.load(DATA)[0]
    outs = [[p["canonical_solution"] if i < 5 else "" for i in range(20)]]
    _, m = humaneval.score([humaneval.item(p)], outs, ScoreConfig(task="humaneval", predictions="-"))
    assert m["pass@1"] == pytest.approx(0.25) and m["pass@10"] > 0.9


def _mbpp_subset():
    # a representative subset: the first 40 tasks and task 367 (setup code uses a class the solution defines)
    return [p for p in mbpp.load(DATA) if p["task_id"] < 51 or p["task_id"] == 367]


def test_mbpp_plain_program_continues_the_signature():
    probs = _mbpp_subset()
    cfg = ScoreConfig(task="mbpp", predictions="-")
    items = [mbpp.item(p, head=mbpp.signature(p)) for p in probs]
    _, m = mbpp.score(items, [[p["code"][len(mbpp.signature(p)):]] for p in probs], cfg)
    assert m["pass@1"] == 1.0 and m["n_tasks"] == 41
    assert mbpp.score(items[:10], [[""]] * 10, cfg)[1]["pass@1"] == 0.0


def test_mbpp_programs_get_10_s():
    p = mbpp.load(DATA)[0]
    slow = "import time\ntime.sleep(4)\n" + p["code"]       # past HumanEval's 3 s, within MBPP's 10 s
    cfg = ScoreConfig(task="mbpp", predictions="-")
    assert mbpp.score([mbpp.item(p)], [[slow]], cfg)[1]["pass@1"] == 1.0
    assert humaneval.TIMEOUT == 3.0 and mbpp.TIMEOUT == 10.0


@pytest.mark.slow
def test_mbpp_slowest_reference_passes_within_its_10_s():
    p = [p for p in mbpp.load(DATA) if p["task_id"] == 123][0]     # ~3 s alone: timed out at the old 3 s
    _, m = mbpp.score([mbpp.item(p)], [[p["code"]]], ScoreConfig(task="mbpp", predictions="-"))
    assert m["pass@1"] == 1.0


@pytest.mark.slow
def test_mbpp_canonical_all_500():
    probs = mbpp.load(DATA)
    _, m = mbpp.score([mbpp.item(p) for p in probs], [[p["code"]] for p in probs],
                      ScoreConfig(task="mbpp", predictions="-"))
    assert m["pass@1"] == 1.0 and m["n_tasks"] == 500


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
    mmlu_pred = _write(tmp_path / "mmlu.jsonl", [{"id": 0, "output": "Answer: B"}, {"id": 1, "output": "E"}])
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "score", "--task", "mmlu",
                        "--predictions", mmlu_pred], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "mmlu accuracy = 0.5000" and "n_unparseable=1" in r.stdout


def test_score_only_reads_records_by_line(tmp_path):
    pred = _write(tmp_path / "gsm.jsonl", [{"id": 0, "output": "18"}, {"id": 1, "output": "2"}])
    m = score_predictions(ScoreConfig(task="gsm", predictions=pred))
    assert m["accuracy"] == 0.5 and m["n"] == 2
    mb = _write(tmp_path / "mbpp.jsonl", [{"task_id": "Mbpp/11", "completion": mbpp.load(DATA)[0]["code"]}])
    assert score_predictions(ScoreConfig(task="mbpp", predictions=mb))["pass@1"] == 1.0


def test_score_cli_bad_input(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"task_id": "HumanEval/0", "completion": ""}, {"task_id": "nope"}])
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "score", "--task", "humaneval",
                        "--predictions", bad], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "task_id" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(PKTError, match="no such file"):
        score_predictions(ScoreConfig(task="gsm", predictions=str(tmp_path / "missing.jsonl")))
    with pytest.raises(PKTError, match="--task"):
        ScoreConfig(task="nll", predictions=bad)
    with pytest.raises(PKTError, match=r"m.jsonl:1: field 'id'"):
        score_predictions(ScoreConfig(task="mmlu", predictions=_write(tmp_path / "m.jsonl", [{"id": -1, "output": "A"}])))
    with pytest.raises(PKTError, match="--timeout"):
        ScoreConfig(task="mbpp", predictions=bad, timeout=0.0)
    assert ScoreConfig(task="gsm", predictions=bad).data_root == DEFAULT_DATA_DIR


def _summary(d, protocol="open-instruct", shots=8):
    d.mkdir(parents=True)
    gsm_m = {"accuracy": 0.25, "n": 4, "protocol": protocol, "settings": {"shots": shots, "limit": 4}}
    (d / "summary.json").write_text(json.dumps({"model_path": "m", "protocol": protocol, "tasks": {"gsm": gsm_m}}))
    return str(d)


def test_compare_refuses_mixed_protocols_unless_told(tmp_path):
    from pkt.eval import compare

    a = _summary(tmp_path / "a")
    b = _summary(tmp_path / "b", "paper", 0)
    with pytest.raises(PKTError, match=r"gsm: x and y differ in protocol \(open-instruct vs paper\).*--mixed_protocols"):
        compare.compare(f"x={a},y={b}", out=None, png=None)
    table = compare.compare(f"x={a},y={b}", out=None, png=None, mixed_protocols=True)
    assert "| x | 25.00 [4.6, 69.9] |" in table and "- y: gsm: protocol=paper, shots=0, limit=4" in table
    assert "Protocols differ" not in compare.compare(f"x={a},z={_summary(tmp_path / 'c')}", out=None, png=None)


def test_compare_outputs_replace_nothing_without_overwrite(tmp_path):
    from pkt.eval import compare

    a = _summary(tmp_path / "a")
    md = tmp_path / "t.md"
    md.write_text("mine")
    with pytest.raises(PKTError, match="--out .*--overwrite True"):
        compare.compare(f"x={a}", out=str(md), png=None)
    assert md.read_text() == "mine"
    compare.compare(f"x={a}", out=str(md), png=None, overwrite=True)
    assert md.read_text().startswith("| model |")
    with pytest.raises(PKTError, match="--png .*inside the input"):
        compare.compare(f"x={a}", out=None, png=str(Path(a) / "bars.png"))
