"""Knowledge distillation (distill.py over TRL's GKDTrainer) and the compute budget every method saves."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pkt.budget import BUDGET_FILE, COUNTS, budget_cells, format_count, read_budget, write_budget
from pkt.distill import DistillConfig, collate_gkd, distill, gkd_examples, memory_plan
from pkt.io import PKTError
from pkt.testing import LLAMA2_SHAPES, make_llama, make_tokenizer, save_model

from conftest import ROOT

# A few fast GKD steps on tiny models: a large constant learning rate, short completions, no checkpointing.
FAST = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2,
            warmup_steps=0, lr_scheduler_type="constant", max_new_tokens=8, gradient_checkpointing=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones (generation is many small ops)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(chat_jsonl):
    return chat_jsonl("distill.jsonl", 8)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher_dir, student_dir, data):
    """One short GKD run shared by the tests that read its outputs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("distill") / "out"
    try:
        distill(DistillConfig(teacher=teacher_dir, student=student_dir, output_dir=str(out), data_path=data, **FAST))
    finally:
        torch.set_num_threads(n)
    return out


def _completions(student_dir, tok, data, max_new_tokens=8):
    """Prompts of the training data with one sampled completion each from the untrained student."""
    from transformers import AutoModelForCausalLM

    from pkt.data import load_chat_jsonl

    batch = collate_gkd(gkd_examples(tok, load_chat_jsonl(data), 64), tok.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        ids = AutoModelForCausalLM.from_pretrained(student_dir).generate(
            input_ids=batch["prompts"], attention_mask=batch["prompt_attention_mask"], do_sample=True, top_k=0,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    P = batch["prompts"].shape[1]
    return ids, torch.cat([batch["prompt_attention_mask"], torch.ones_like(ids[:, P:])], 1), P


def _kl_to_teacher(teacher, model, ids, mask, P) -> float:
    """Mean over completion tokens of KL(teacher || model) of the next-token distributions."""
    with torch.no_grad():
        lt = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1], -1)
        ls = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1], -1)
    return F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1).mean().item()


def test_a_few_gkd_steps_lower_the_kl_to_the_teacher_on_the_training_prompts(distilled, teacher_dir,
                                                                            student_dir, tokenizer, data):
    from transformers import AutoModelForCausalLM

    ids, mask, P = _completions(student_dir, tokenizer, data)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    before = _kl_to_teacher(teacher, AutoModelForCausalLM.from_pretrained(student_dir), ids, mask, P)
    after = _kl_to_teacher(teacher, AutoModelForCausalLM.from_pretrained(distilled), ids, mask, P)
    assert after < 0.9 * before


def test_merged_model_differs_from_the_student_only_where_lora_applied(distilled, student_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(distilled).state_dict()
    assert merged.keys() == student.keys()
    changed = {k for k in student if not torch.equal(student[k], merged[k])}
    # PEFT's default LoRA targets for Llama, as the rebuttal's get_peft_config: q_proj and v_proj of every layer
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(3) for m in ("q_proj", "v_proj")}
    # the adapter loads with PEFT and merges into the same weights
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), distilled / "adapter")
    remerged = adapter.merge_and_unload().state_dict()
    assert all(torch.allclose(remerged[k], merged[k], atol=1e-6) for k in merged)
    cfg = json.loads((distilled / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16


def test_budget_counts_the_tokens_each_model_read(distilled):
    budget = read_budget(distilled)
    record = json.loads((distilled / "distill_config.json").read_text())
    assert budget["method"] == "GKD" and record["optimizer_steps"] == 4
    assert budget["optimizer_steps"] == 4 and budget["examples"] == 4 * 4
    # the teacher only reads the on-policy sequences; the student reads them, back-propagates through them,
    # and decoded them first (prompt + all generated tokens but the last, 8 per sequence)
    assert budget["teacher_backward_tokens"] == 0
    trained = budget["teacher_forward_tokens"]
    assert budget["student_backward_tokens"] == trained
    assert budget["student_forward_tokens"] == 2 * trained - budget["examples"]
    assert len(record["log"]) == 4 and all(r["loss"] >= 0 for r in record["log"])


def test_prompts_are_cut_to_their_first_max_seq_length_tokens_as_the_rebuttals_trl(tokenizer):
    from pkt.data import chat_prompt_response, encode

    msgs = [{"role": "user", "content": "Question: 1 + 2 + 3 + 4 + 5 ="},
            {"role": "assistant", "content": "Answer: the answer is 15."}]
    prompt, response = chat_prompt_response(msgs, eos=tokenizer.eos_token)
    p, full = encode(tokenizer, prompt), encode(tokenizer, prompt + response)
    assert full[-1] == tokenizer.eos_token_id          # the reply ends with EOS
    [short] = gkd_examples(tokenizer, [{"messages": msgs}], max_seq_length=len(p) - 3)
    assert short["prompt_ids"] == p[:len(p) - 3] and short["prompt_cut"]
    assert short["input_ids"] == short["prompt_ids"] and set(short["labels"]) == {-100}
    [fits] = gkd_examples(tokenizer, [{"messages": msgs}], max_seq_length=len(p) + 2)
    assert fits["prompt_ids"] == p and fits["input_ids"] == full[:len(p) + 2] and not fits["prompt_cut"]
    assert fits["labels"] == [-100] * len(p) + full[len(p):len(p) + 2]
    [whole] = gkd_examples(tokenizer, [{"messages": msgs}], max_seq_length=2, truncate_prompt=False)
    assert whole["prompt_ids"] == p and whole["input_ids"] == full[:len(p) + 2]


def test_batches_are_left_padded():
    b = collate_gkd([{"prompt_ids": [5, 6], "input_ids": [5, 6, 7], "labels": [-100, -100, 7]},
                     {"prompt_ids": [8], "input_ids": [8, 9], "labels": [-100, 9]}], pad_id=1)
    assert b["prompts"].tolist() == [[5, 6], [1, 8]] and b["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert b["input_ids"].tolist() == [[5, 6, 7], [1, 8, 9]]
    assert b["labels"].tolist() == [[-100, -100, 7], [-100, -100, 9]]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "distill.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_different_vocabularies_are_a_one_line_error_naming_both_models(tmp_path, student_dir, data):
    other = save_model(make_llama(hidden=64, ffn=160, layers=2, heads=4, vocab=280, seed=4),
                       make_tokenizer(vocab_size=280), tmp_path / "other_teacher")
    out = tmp_path / "out"
    r = _cli("--teacher", other, "--student", student_dir, "--data_path", data, "--output_dir", out, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: --teacher") and other in line and student_dir in line and "vocabular" in line
    assert not out.exists()


@pytest.mark.parametrize("flags, match", [
    ({"lmbda": 1.5}, "--lmbda"), ({"beta": -0.1}, "--beta"), ({"max_steps": 0}, "--max_steps"),
    ({"lora_target_modules": "q_proj,bogus"}, "--lora_target_modules"), ({"dtype": "fp8"}, "--dtype"),
    ({"lr_scheduler_type": "warp"}, "--lr_scheduler_type"), ({"max_seq_length": 0}, "--max_seq_length"),
    ({"data_path": "missing.jsonl"}, "missing.jsonl: no such file"),
    pytest.param({"dtype": "fp16"}, "fp16 mixed precision needs CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only")),
    ({"temperature": 0}, "--temperature"), ({"learning_rate": 0}, "--learning_rate"),
])
def test_bad_flags_fail_before_any_model_loads(tmp_path, teacher_dir, student_dir, data, flags, match):
    out = tmp_path / "out"
    with pytest.raises(PKTError, match=match):
        distill(DistillConfig(**{"teacher": teacher_dir, "student": student_dir, "output_dir": str(out),
                                 "data_path": data, **flags}))
    assert not out.exists()


def test_outputs_are_never_replaced_without_overwrite_nor_an_input(tmp_path, teacher_dir, student_dir, data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PKTError, match="--overwrite"):
        distill(DistillConfig(teacher=teacher_dir, student=student_dir, output_dir=str(out), data_path=data))
    with pytest.raises(PKTError, match="is the input --student"):
        distill(DistillConfig(teacher=teacher_dir, student=student_dir, output_dir=student_dir, data_path=data,
                              overwrite=True))
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_flags_are_typed_and_errors_are_one_line(tmp_path, student_dir, data):
    r = _cli("--teacher", tmp_path / "nope", "--student", student_dir, "--data_path", data,
             "--output_dir", tmp_path / "out", "--max_steps", "2.5", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --max_steps 2.5: expected an integer"]
    with pytest.raises(PKTError, match="--teacher .*nope: no such directory"):
        distill(DistillConfig(teacher=str(tmp_path / "nope"), student=student_dir, output_dir=str(tmp_path / "out"),
                              data_path=data))
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_training_and_nothing_is_saved(tmp_path, tokenizer, student_dir, data):
    bad = make_llama(hidden=96, ffn=256, layers=2, heads=4, seed=5)
    with torch.no_grad():
        bad.lm_head.weight[3, 0] = float("nan")          # every teacher distribution becomes NaN
    teacher = save_model(bad, tokenizer, tmp_path / "nan_teacher")
    out = tmp_path / "out"
    with pytest.raises(PKTError, match="non-finite GKD loss .* optimizer step 1: training stopped, nothing"):
        distill(DistillConfig(teacher=teacher, student=student_dir, output_dir=str(out), data_path=data,
                              **{**FAST, "max_steps": 1}))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_dry_run_plans_13b_to_7b_memory_from_configs_alone(tmp_path, capsys):
    from transformers import LlamaConfig

    dirs = {}
    for name in ("llama-2-13b", "llama-2-7b"):
        dirs[name] = tmp_path / name
        LlamaConfig(**LLAMA2_SHAPES[name]).save_pretrained(dirs[name])      # config.json only, no weights
    cfg = DistillConfig(teacher=str(dirs["llama-2-13b"]), student=str(dirs["llama-2-7b"]),
                        output_dir=str(tmp_path / "never"), dry_run=True)
    assert distill(cfg) is None
    text = capsys.readouterr().out
    assert "| teacher weights | 24.24 |" in text and "| student weights | 12.55 |" in text and "peak" in text
    plan = memory_plan(cfg, "fp16")
    rows = {name: b for name, b, _ in plan["rows"]}
    # LoRA r 16 on q_proj and v_proj of 32 layers of width 4096: 32 * 2 * 16 * (4096 + 4096) parameters
    assert rows["LoRA + grads + AdamW (fp32)"] == 32 * 2 * 16 * 8192 * 16
    assert 35 * 2**30 < plan["peak_bytes"] < 40 * 2**30
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------- budget

def test_budget_file_round_trips_and_refuses_bad_counts(tmp_path):
    counts = dict(zip(COUNTS, range(1, len(COUNTS) + 1)))
    write_budget(tmp_path, "SemAlign", **counts)
    assert read_budget(tmp_path) == {"method": "SemAlign", **counts}
    assert read_budget(tmp_path / "elsewhere") is None and read_budget(None) is None
    assert read_budget("meta-llama/Llama-2-7b-hf") is None
    with pytest.raises(PKTError, match="examples"):
        write_budget(tmp_path, "x", **{**counts, "examples": -1})
    with pytest.raises(PKTError, match="unknown count"):
        write_budget(tmp_path, "x", **counts, flops=3)
    (tmp_path / BUDGET_FILE).write_text('{"method": "x"}')
    with pytest.raises(PKTError, match=f"{BUDGET_FILE}: field 'teacher_forward_tokens'"):
        read_budget(tmp_path)


def test_budget_cells_are_compact():
    assert [format_count(n) for n in (0, 999, 1234, 5_600_000, 7_000_000_000)] == ["0", "999", "1.2k", "5.6M",
                                                                                    "7.0G"]
    b = {"method": "GKD", "teacher_forward_tokens": 2500, "teacher_backward_tokens": 0,
         "student_forward_tokens": 4900, "student_backward_tokens": 2500, "optimizer_steps": 4, "examples": 64}
    assert budget_cells(b) == ["2.5k / 0", "4.9k / 2.5k", "4", "64"]
    assert budget_cells(None) == ["-", "-", "-", "-"]


def test_compare_shows_each_methods_budget_from_its_model_directory(tmp_path, capsys):
    from pkt.eval import compare

    model = tmp_path / "kd_model"
    write_budget(model, "GKD", **dict.fromkeys(COUNTS, 1000))
    runs = []
    for name, path in (("kd", str(model)), ("student", str(tmp_path / "student_model"))):
        d = tmp_path / "eval" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"model_path": path, "tasks": {"gsm": {"accuracy": 0.5}}}))
        runs.append(f"{name}={d}")
    lines = compare.compare(",".join(runs), out=None, png=None).splitlines()
    assert lines[0].endswith("| teacher tokens fwd / bwd | student tokens fwd / bwd | optimizer steps | examples |")
    assert lines[2].startswith("| kd |") and lines[2].endswith("| 1.0k / 1.0k | 1.0k / 1.0k | 1.0k | 1.0k |")
    assert lines[3].startswith("| student |") and lines[3].endswith("| - | - | - | - |")
