"""PostPKT end to end on tiny random Llamas (CPU): max-sum submatrix, sensitivity, extraction into a
PEFT adapter, delta, fine-tuning (+ resume), merge, and one-line errors for bad inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_llama, save_model
from pkt.budget import read_budget
from pkt.data import encode_chat, encode_finetune, load_chat_jsonl
from pkt.io import PKTError
from pkt.lora import FinetuneConfig, MergeConfig, negate_lora_A
from pkt.postpkt import (ExtractConfig, extract, max_sum_submatrix, max_sum_submatrix_bruteforce, select_layers,
                         sensitivity)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread avoids OpenMP spin-waits on a shared 2-core box
    (10x slower SVDs/backwards under load). Restored for the other test modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------- max-sum submatrix

def _cases():
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        H, W = torch.randint(1, 13, (2,), generator=g).tolist()
        r = int(torch.randint(1, H + 1, (1,), generator=g))
        c = int(torch.randint(1, W + 1, (1,), generator=g))
        kind = trial % 4
        if kind == 0:    # integer values: many exact ties
            x = torch.randint(0, 3, (H, W), generator=g).float()
        elif kind == 1:  # all equal: every block ties, the first one must win
            x = torch.zeros(H, W)
        elif kind == 2:
            x = torch.rand(H, W, generator=g)
        else:            # full height / width
            x, r = torch.randint(-2, 3, (H, W), generator=g).float(), H
        yield x, r, c


def test_max_sum_submatrix_matches_bruteforce():
    for x, r, c in _cases():
        want = max_sum_submatrix_bruteforce(x, r, c)
        assert max_sum_submatrix(x, r, c) == want, (tuple(x.shape), r, c)
        # tiny row chunks exercise the carries between chunks
        assert max_sum_submatrix(x, r, c, chunk_elements=1) == want
        assert max_sum_submatrix(x, r, c, chunk_elements=2 * x.shape[1]) == want


def test_max_sum_submatrix_ties_and_edges():
    assert max_sum_submatrix(torch.zeros(5, 7), 2, 3) == (0, 0)
    x = torch.zeros(6, 6)
    x[4, 4] = x[1, 3] = 1.0            # two equal single peaks: the first in row-major order wins
    assert max_sum_submatrix(x, 1, 1) == (1, 3)
    x = torch.arange(12.).reshape(3, 4)
    assert max_sum_submatrix(x, 3, 4) == (0, 0)
    assert max_sum_submatrix(x, 3, 2) == (0, 2)
    with pytest.raises(PKTError):
        max_sum_submatrix(x, 4, 1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in ((0, 0), (3, 5), (5, 6)):
            y = torch.rand(6, 7)
            y[pos] = bad
            with pytest.raises(PKTError, match="NaN or infinite"):
                max_sum_submatrix(y, 2, 3, chunk_elements=7)
            with pytest.raises(PKTError, match="NaN or infinite"):
                max_sum_submatrix(y, 6, 7)


def test_select_layers_ties_keep_lower_index():
    assert select_layers([1.0, 3.0, 3.0, 2.0], 2) == [1, 2]
    assert select_layers([5.0, 1.0, 5.0, 5.0], 2) == [0, 2]
    assert select_layers([0.1, 0.4, 0.3, 0.2], 3) == [1, 2, 3]


# ---------------------------------------------------------------------------------- sensitivity

def test_sensitivity_hook_equals_plain_backward(tokenizer, chat_jsonl):
    from pkt.data import load_chat_jsonl

    model = make_llama(hidden=32, ffn=64, layers=2, seed=5)
    exs = [encode_chat(tokenizer, r["messages"], 64) for r in load_chat_jsonl(chat_jsonl("sens.jsonl", 3))]
    params = {n: p for n, p in model.named_parameters() if ".layers." in n}
    got, used = sensitivity(model, exs, params, progress=False)
    assert used == 3
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for ex in exs:
        model.zero_grad()
        model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.backward()
        for n, p in params.items():
            want[n] += (p * p.grad).abs()
    model.zero_grad()
    for n in params:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------- extraction

@pytest.fixture(scope="session")
def extracted(tmp_path_factory, teacher_dir, student_dir, chat_jsonl):
    """The default rank-16 adapter (with embeddings), its delta, and a full-rank (r=64) adapter."""
    root = tmp_path_factory.mktemp("postpkt")
    data = chat_jsonl("seed.jsonl", 6)
    lora, full = root / "lora", root / "lora_full"
    extract(ExtractConfig(teacher_dir, lora, target_model=student_dir, data_path=data, include_embeddings=True,
                          device="cpu"))
    extract(ExtractConfig(teacher_dir, full, target_model=student_dir, data_path=data, lora_r=64, lora_alpha=64,
                          include_embeddings=True, device="cpu"))
    negate_lora_A(lora, root / "delta")
    return {"root": root, "lora": lora, "full": full, "delta": root / "delta", "data": data}


def _teacher_blocks(teacher_dir, sel):
    from transformers import AutoModelForCausalLM

    t = dict(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).named_modules())
    out = {}
    for student_name, b in sel["blocks"].items():
        w = t[b["teacher"]].weight.detach()
        w = w.t() if b["transposed"] else w
        out[student_name] = w[b["top"]:b["top"] + b["rows"], b["left"]:b["left"] + b["cols"]]
    return out


def _lora_products(peft_model):
    """student module name -> B @ A * scaling as oriented in selection.json ([d, vocab] for the embedding)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer):
            key = name.removeprefix("base_model.model.")
            s = mod.scaling["default"]
            if "default" in mod.lora_embedding_A:
                out[key] = mod.lora_embedding_B["default"].float() @ mod.lora_embedding_A["default"].float() * s
            else:
                out[key] = mod.lora_B["default"].weight.float() @ mod.lora_A["default"].weight.float() * s
    return out


def test_adapter_loads_and_matches_svd(extracted, teacher_dir, student_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sel = json.loads((extracted["lora"] / "selection.json").read_text())
    assert len(sel["selected_layers"]) == 3 and sel["selected_layers"] == sorted(sel["selected_layers"])
    assert sel["layer_map"] == {str(i): j for j, i in enumerate(sel["selected_layers"])}
    assert len(sel["layer_sensitivity"]) == 4
    # the kept layers are the 3 most sensitive
    ranked = sorted(range(4), key=lambda i: -sel["layer_sensitivity"][i])
    assert sorted(ranked[:3]) == sel["selected_layers"]
    assert len(sel["blocks"]) == 3 * 7 + 2

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(student, str(extracted["lora"]))
    prods = _lora_products(peft_model)
    blocks = _teacher_blocks(teacher_dir, sel)
    assert set(prods) == set(blocks)
    for name, block in blocks.items():
        U, S, Vh = torch.linalg.svd(block.float(), full_matrices=False)
        trunc = U[:, :16] * S[:16] @ Vh[:16]
        torch.testing.assert_close(prods[name], trunc, atol=2e-3, rtol=0)

    # full rank: B @ A is the teacher block itself (up to fp16 storage)
    sel_full = json.loads((extracted["full"] / "selection.json").read_text())
    full = _lora_products(PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32), str(extracted["full"])))
    for name, block in _teacher_blocks(teacher_dir, sel_full).items():
        torch.testing.assert_close(full[name], block.float(), atol=2e-3, rtol=0)


def test_student_plus_delta_plus_adapter_is_student(extracted, student_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pkt.lora import merge_adapter

    ids = torch.tensor([tokenizer("<|user|>\nQuestion: 3 + 4 =\n\n<|assistant|>\nAnswer: 7")["input_ids"]])
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = student(ids).logits
    base = merge_adapter(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32), extracted["delta"])
    model = PeftModel.from_pretrained(base, str(extracted["lora"])).eval()
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the delta alone does change the student (the adapter is not a no-op)
    base2 = merge_adapter(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32), extracted["delta"])
    with torch.no_grad():
        assert (base2(ids).logits - want).abs().max() > 1e-3


def test_get_delta_negates_only_A(extracted):
    from safetensors.torch import load_file

    a = load_file(str(extracted["lora"] / "adapter_model.safetensors"))
    d = load_file(str(extracted["delta"] / "adapter_model.safetensors"))
    assert set(a) == set(d) and any("lora_embedding_A" in k for k in a)
    for k in a:
        neg = "lora_A" in k or "lora_embedding_A" in k
        assert torch.equal(d[k], -a[k] if neg else a[k]), k
    assert (extracted["delta"] / "adapter_config.json").read_text() == \
        (extracted["lora"] / "adapter_config.json").read_text()


def test_extraction_budget_counts_the_teachers_sensitivity_passes(extracted, tokenizer):
    """One forward + backward of the teacher per seed example over its whole sequence; the delta (a file
    transform) carries the same count."""
    n = sum(len(encode_chat(tokenizer, r["messages"], 2048)["input_ids"]) for r in load_chat_jsonl(extracted["data"]))
    assert read_budget(extracted["lora"]) == {
        "method": "PostPKT-extract", "teacher_forward_tokens": n, "teacher_backward_tokens": n,
        "student_forward_tokens": 0, "student_backward_tokens": 0, "optimizer_steps": 0, "examples": 6}
    assert read_budget(extracted["delta"]) == read_budget(extracted["lora"])


def _finetune_tokens(tokenizer, data, cutoff_len) -> int:
    return sum(len(encode_finetune(tokenizer, r["messages"], cutoff_len)["input_ids"]) for r in load_chat_jsonl(data))


# ---------------------------------------------------------------------------------- fine-tune and merge

def _response_loss(model, tokenizer, data) -> float:
    from pkt.data import collate_left, load_chat_jsonl

    exs = [encode_chat(tokenizer, r["messages"], 128) for r in load_chat_jsonl(data)]
    batch = collate_left(exs, tokenizer.pad_token_id)
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


@pytest.fixture(scope="session")
def trained(extracted, student_dir, chat_jsonl):
    from pkt.lora import finetune

    data = chat_jsonl("train.jsonl", 16, seed=1)
    out = extracted["root"] / "ft"
    logs = finetune(FinetuneConfig(student_dir, out, data_path=data, delta_path=extracted["delta"],
                                   lora_init_path=extracted["lora"], num_epochs=1, learning_rate=2e-3, batch_size=4,
                                   micro_batch_size=2, cutoff_len=128, save_steps=2, seed=3), progress=False)
    return {"out": out, "logs": logs, "data": data}


def test_finetune_lowers_loss_and_logs(trained, extracted, student_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pkt.lora import merge_adapter

    out, logs = trained["out"], trained["logs"]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all({"loss", "lr"} <= set(r) for r in lines)
    assert lines[0]["lr"] > lines[-1]["lr"] == 0.0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "state.json").is_file()

    before = _response_loss(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32), tokenizer,
                            trained["data"])
    base = merge_adapter(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32), extracted["delta"])
    after = _response_loss(PeftModel.from_pretrained(base, str(out)), tokenizer, trained["data"])
    assert after < before - 0.05, (before, after)


def test_finetune_budget_is_the_extraction_plus_the_fine_tune(trained, extracted, tokenizer):
    """One epoch over 16 examples: each read once by a forward + backward of the student, in 4 steps; the
    checkpoint holds the count up to its step."""
    ex, n = read_budget(extracted["lora"]), _finetune_tokens(tokenizer, trained["data"], 128)
    assert read_budget(trained["out"]) == {**ex, "method": "PostPKT", "student_forward_tokens": n,
                                           "student_backward_tokens": n, "optimizer_steps": 4, "examples": 6 + 16}
    half = read_budget(trained["out"] / "checkpoint-2")
    assert (half["optimizer_steps"], half["examples"]) == (2, 6 + 8)
    assert 0 < half["student_backward_tokens"] < n


@pytest.mark.parametrize("log", ["whole", "torn"])
def test_finetune_resume_reproduces_run(trained, extracted, student_dir, tmp_path, log, caplog):
    from safetensors.torch import load_file

    from pkt.lora import finetune

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(trained["out"] / "checkpoint-2", out / "checkpoint-2")
    if log == "whole":
        shutil.copy(trained["out"] / "train_log.jsonl", out / "train_log.jsonl")
    else:                # killed while writing step 3's line: half a line is left
        lines = (trained["out"] / "train_log.jsonl").read_text().splitlines(keepends=True)
        (out / "train_log.jsonl").write_text("".join(lines[:2]) + lines[2][:len(lines[2]) // 2])
    with pytest.raises(PKTError, match="--resume"):
        finetune(FinetuneConfig(student_dir, out, data_path=trained["data"], delta_path=extracted["delta"],
                                lora_init_path=extracted["lora"]))
    with caplog.at_level("WARNING"):
        logs = finetune(FinetuneConfig(student_dir, out, data_path=trained["data"], delta_path=extracted["delta"],
                                       lora_init_path=extracted["lora"], num_epochs=1, learning_rate=2e-3,
                                       batch_size=4, micro_batch_size=2, cutoff_len=128, save_steps=2, seed=3,
                                       resume=True), progress=False)
    assert ("torn last line dropped" in caplog.text) == (log == "torn")
    assert [r["step"] for r in logs] == [3, 4]
    lines = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4]
    a = load_file(str(trained["out"] / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert read_budget(out) == read_budget(trained["out"])          # steps 1-2 from the checkpoint, not twice


def test_merge_equals_base_delta_adapter(trained, extracted, student_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pkt.lora import merge, merge_adapter

    out = tmp_path / "merged"
    merge(MergeConfig(student_dir, trained["out"], out, delta_path=extracted["delta"]))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert any(p.name.endswith(".safetensors") for p in out.iterdir()) and (out / "tokenizer.json").is_file()
    base = merge_adapter(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32), extracted["delta"])
    ref = PeftModel.from_pretrained(base, str(trained["out"])).eval()
    ids = torch.tensor([tokenizer("<|user|>\nQuestion: 2 + 5 =\n\n<|assistant|>\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert read_budget(out) == read_budget(trained["out"])          # the chain: extraction + fine-tune


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_random_and_pissa_baselines(student_dir, chat_jsonl, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pkt.lora import finetune, merge

    data = chat_jsonl("base.jsonl", 4, seed=2)
    ids = torch.tensor([tokenizer("<|user|>\nQuestion: 1 + 1 =")["input_ids"]])
    for init in ("random", "pissa"):
        out = tmp_path / init
        finetune(FinetuneConfig(student_dir, out, data_path=data, lora_init=init,
                                lora_target_modules="q_proj,v_proj,down_proj", lora_r=4, lora_alpha=8, num_epochs=1,
                                batch_size=2, micro_batch_size=2, cutoff_len=64), progress=False)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
        assert cfg["r"] == (8 if init == "pissa" else 4)   # PiSSA -> plain LoRA of rank 2r
        # the saved adapter applies to the *unmodified* student (PiSSA converted by peft)
        merge(MergeConfig(student_dir, out, tmp_path / f"{init}_merged"))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"{init}_merged", dtype=torch.float32).eval()
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
                                        str(out)).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        n = _finetune_tokens(tokenizer, data, 64)                     # the fine-tune alone: no teacher pass
        budget = {"method": "PiSSA" if init == "pissa" else "LoRA", "teacher_forward_tokens": 0,
                  "teacher_backward_tokens": 0, "student_forward_tokens": n, "student_backward_tokens": n,
                  "optimizer_steps": 2, "examples": 4}
        assert read_budget(out) == budget == read_budget(tmp_path / f"{init}_merged")


# ---------------------------------------------------------------------------------- bad inputs

def test_student_wider_than_teacher_fails(student_dir, tokenizer, tmp_path, chat_jsonl):
    wide = save_model(make_llama(hidden=96, ffn=160, layers=3, seed=4), tokenizer, tmp_path / "wide")
    with pytest.raises(PKTError, match="wider than the teacher"):
        extract(ExtractConfig(student_dir, tmp_path / "out", target_model=wide, data_path=chat_jsonl("w.jsonl", 2),
                              device="cpu"))
    deep = save_model(make_llama(hidden=64, ffn=160, layers=5, seed=4), tokenizer, tmp_path / "deep")
    with pytest.raises(PKTError, match="more than the teacher"):
        extract(ExtractConfig(student_dir, tmp_path / "out", target_model=deep, data_path=chat_jsonl("w.jsonl", 2),
                              device="cpu"))
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_with_embeddings_fails(teacher_dir, tokenizer, tmp_path, chat_jsonl):
    other = save_model(make_llama(hidden=64, ffn=160, layers=3, vocab=320, seed=4), tokenizer, tmp_path / "v320")
    with pytest.raises(PKTError, match="equal vocabularies"):
        extract(ExtractConfig(teacher_dir, tmp_path / "out", target_model=other, data_path=chat_jsonl("v.jsonl", 2),
                              include_embeddings=True, device="cpu"))
    assert not (tmp_path / "out").exists()


def test_unknown_module_fails(teacher_dir, student_dir, chat_jsonl, tmp_path):
    from pkt.lora import finetune

    with pytest.raises(PKTError, match="unknown module"):
        extract(ExtractConfig(teacher_dir, tmp_path / "out", target_model=student_dir,
                              data_path=chat_jsonl("u.jsonl", 2), target_modules="q_proj,foo"))
    with pytest.raises(PKTError, match="unknown module"):
        finetune(FinetuneConfig(student_dir, tmp_path / "ft", data_path=chat_jsonl("u.jsonl", 2),
                                lora_target_modules="[q_proj,mlp]"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()


def test_cli_missing_data_file_exits_2(teacher_dir, student_dir, tmp_path):
    out = tmp_path / "out"
    for cmd in (["extract_lora_with_sensitivity.py", "--source_model", teacher_dir, "--target_model", student_dir,
                 "--data_path", str(tmp_path / "nope.jsonl"), "--output_dir", str(out)],
                ["finetune.py", "--base_model", student_dir, "--data_path", str(tmp_path / "nope.jsonl"),
                 "--output_dir", str(out)],
                ["get_delta.py", "--lora_path", str(tmp_path / "nolora"), "--output_path", str(out)]):
        p = subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert p.returncode == 2, p.stderr
        err = p.stderr.strip().splitlines()
        assert err[-1].startswith("error: ") and ("nope.jsonl" in err[-1] or "nolora" in err[-1]), p.stderr
        assert not out.exists()


def test_outputs_are_checked_against_inputs_before_anything_loads(extracted, student_dir, tmp_path):
    from pkt.lora import DeltaConfig

    with pytest.raises(PKTError, match="is the input --base_model itself"):
        MergeConfig(student_dir, extracted["lora"], student_dir)
    with pytest.raises(PKTError, match="contains the input --lora_path"):
        DeltaConfig(str(extracted["lora"]), str(extracted["root"]))
    with pytest.raises(PKTError, match="already exists and is not empty"):
        DeltaConfig(str(extracted["lora"]), str(extracted["delta"]))
    assert DeltaConfig(str(extracted["lora"]), str(extracted["delta"]), overwrite=True).output_path
