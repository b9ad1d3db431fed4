"""The examples, labels, text, step counts and numerics of the original LaTen and PostPKT code.

Expected ids were computed once by running the original's draw logic in a scratch script (its seeding,
`datasets` shuffles and `random.seed(i)` / `random.sample` calls, in its order, on the released GSM splits);
they are written here literally.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_llama, make_tokenizer, save_model
from knowledge_translator import KnowledgeTranslator
from pkt import laten
from pkt.data import encode_finetune, load_chat_jsonl, locate_ids, tokenize_example
from pkt.io import load_tokenizer
from pkt.laten import TrainConfig, TransferConfig

GSM = ROOT / "data" / "gsm"
RECORD = [{"role": "user", "content": "Question: 7 * 6 ="}, {"role": "assistant", "content": "Answer: the answer is 42."}]

# The original's draws with seed 42 on the GSM splits.
EXTRACT_ORDER = ["gsm_4837", "gsm_839", "gsm_712", "gsm_1143", "gsm_7308", "gsm_5543", "gsm_1828", "gsm_767",
                 "gsm_6074", "gsm_5238", "gsm_3456", "gsm_2006", "gsm_6067", "gsm_244", "gsm_204", "gsm_2253",
                 "gsm_260", "gsm_912", "gsm_4467", "gsm_6033"]
ALIGN_IDS = [
    ["gsm_7272", "gsm_3111", "gsm_6813", "gsm_656", "gsm_378", "gsm_5993", "gsm_5432", "gsm_1875", "gsm_5338",
     "gsm_2412", "gsm_7025", "gsm_1281", "gsm_2381", "gsm_6961", "gsm_6630"],
    ["gsm_2381", "gsm_763", "gsm_3124", "gsm_1771", "gsm_5761", "gsm_2921", "gsm_572", "gsm_1916", "gsm_7078",
     "gsm_648", "gsm_218", "gsm_5993", "gsm_1583", "gsm_7272", "gsm_4610"],
]
INFERENCE_SEED_EXAMPLE = "gsm_5651"


def _ids(path):
    return [r["id"] for r in load_chat_jsonl(path)]


# ------------------------------------------------------------------------------------------- LaTen
def test_laten_labels_mask_the_first_response_token_as_the_original():
    """The original measures the prompt tokenised with its EOS appended: one more -100, over 'A' of 'Answer'."""
    tok = make_tokenizer()
    original = tokenize_example(tok, RECORD, 768, mask_first_response_token=True)
    fixed = tokenize_example(tok, RECORD, 768, mask_first_response_token=False)
    assert original["input_ids"] == fixed["input_ids"]
    assert tok.decode(original["input_ids"]) == \
        "<|user|>\nQuestion: 7 * 6 =\n\n<|assistant|>\nAnswer: the answer is 42.\n\n</s>"
    assert original["labels"].count(-100) == 26 and fixed["labels"].count(-100) == 25
    assert tok.decode([t for t in original["labels"] if t != -100]) == "nswer: the answer is 42.\n\n</s>"
    assert tok.decode([t for t in fixed["labels"] if t != -100]) == "Answer: the answer is 42.\n\n</s>"
    assert TrainConfig.__dataclass_fields__["mask_first_response_token"].default is True


def test_laten_draws_seed_42_on_gsm_splits_are_the_originals():
    extract_ids, align_ids = _ids(GSM / "gsm_extract_split.jsonl"), _ids(GSM / "gsm_align_split.jsonl")
    order, align_order = laten.training_orders(42, len(extract_ids), len(align_ids))
    assert [extract_ids[i] for i in order] == EXTRACT_ORDER
    for step, want in enumerate(ALIGN_IDS):
        assert [align_ids[align_order[j]] for j in laten.align_positions(step, len(align_ids), 15)] == want
    train_ids = _ids(GSM / "gsm_train_split.jsonl")
    assert train_ids[laten.inference_row(42, len(train_ids))] == INFERENCE_SEED_EXAMPLE


@pytest.fixture
def located(monkeypatch):
    """The token ids every `locate` call of pkt.laten reads (first example of each call), in call order."""
    seen = []
    real = laten.locate
    monkeypatch.setattr(laten, "locate", lambda model, examples, **kw: seen.append(examples[0]) or
                        real(model, examples, **kw))
    return seen


def test_gsm_training_locates_on_the_original_examples_without_bos(teacher_dir, student_dir, tokenizer, tmp_path,
                                                                    located):
    save_dir = laten.train(TrainConfig(
        source_model=teacher_dir, target_model=student_dir, extract_data_path=str(GSM / "gsm_extract_split.jsonl"),
        align_data_path=str(GSM / "gsm_align_split.jsonl"), translator_save_name="gsm", output_dir=str(tmp_path),
        seed=42, max_steps=2, cutoff_len=64, micro_batch_size=16, dtype="fp32", teacher_device="cpu",
        student_device="cpu"))
    log = [json.loads(x) for x in (Path(save_dir) / "train_log.jsonl").read_text().splitlines()]
    assert [r["example_id"] for r in log] == EXTRACT_ORDER[:2]
    assert [r["align_example_ids"] for r in log] == ALIGN_IDS
    extract = {r["id"]: r for r in load_chat_jsonl(GSM / "gsm_extract_split.jsonl")}
    assert located[0] == locate_ids(tokenizer, extract[EXTRACT_ORDER[0]]["messages"])   # training: no BOS
    assert located[0][0] != tokenizer.bos_token_id


def test_inference_locates_on_bos_plus_text_of_the_original_seed_example(teacher_dir, student_dir, tokenizer,
                                                                         tmp_path, located):
    KnowledgeTranslator(96, 64).save(tmp_path / "tr" / "checkpoint_0")
    out = laten.transfer(TransferConfig(
        source_model=teacher_dir, target_model=student_dir, data_path=str(GSM / "gsm_train_split.jsonl"),
        translator_checkpoints=str(tmp_path / "tr"), output_dir=str(tmp_path / "out"), dtype="fp32",
        teacher_device="cpu", student_device="cpu"))                      # default steps [0], rates [0.1]
    info = json.loads((Path(out[0]) / "laten_transfer.json").read_text())
    assert Path(out[0]).name.endswith("-transfer_rate10.0%-step0")
    assert info["seed_example_id"] == INFERENCE_SEED_EXAMPLE and info["locate_with_bos"] is True
    train = {r["id"]: r for r in load_chat_jsonl(GSM / "gsm_train_split.jsonl")}
    text = locate_ids(tokenizer, train[INFERENCE_SEED_EXAMPLE]["messages"])
    assert located[0] == [tokenizer.bos_token_id] + text


def test_translator_init_draws_as_the_original():
    """The original builds one Linear-ReLU-Linear per module in the order down, up, o, v, then re-initialises
    every Linear N(0, 1e-5) (`apply`); under the same torch seed the default translator is bit-identical."""
    from torch import nn

    torch.manual_seed(42)
    ref = nn.ModuleDict({m: nn.Sequential(nn.Linear(96, 96, bias=False), nn.ReLU(), nn.Linear(96, 64, bias=False))
                         for m in ("down_proj", "up_proj", "o_proj", "v_proj")})
    ref.apply(lambda mod: nn.init.normal_(mod.weight, mean=0, std=1e-5) if isinstance(mod, nn.Linear) else None)
    modules = TrainConfig.__dataclass_fields__["lora_target_modules"].default.split(",")
    torch.manual_seed(42)
    ours = KnowledgeTranslator(96, 64, modules)
    for name, w in ref.state_dict().items():
        assert torch.equal(ours.network.state_dict()[name], w), name


def test_fp16_mode_casts_translations_like_the_original():
    """--dtype fp16: at init the translations cast to fp16 are exactly 0, and so are the fp16 MSE and its
    gradient (the original's numerics); the fp32 default keeps both non-zero."""
    student = make_llama(hidden=64, ffn=160, layers=3, heads=4, seed=2).half()
    dtype = laten.reference_dtype(student)
    assert dtype == torch.float16 and laten.reference_dtype(student.float()) is None
    torch.manual_seed(0)
    tr = KnowledgeTranslator(96, 64)
    knowledge = {m: 0.05 * torch.randn(3, 16, 96) if m in ("up_proj", "v_proj") else 0.05 * torch.randn(3, 96, 16)
                 for m in tr.modules_}
    half = laten.cast_translated(tr(knowledge), dtype)
    assert all(t.dtype == torch.float16 and not t.any() for t in half.values())
    mse = laten.mse_penalty(half, in_dtype=True)
    mse.backward()
    assert mse.dtype == torch.float16 and mse.item() == 0.0
    assert all(not p.grad.any() for p in tr.parameters())
    tr.zero_grad()
    mse32 = laten.mse_penalty(tr(knowledge))
    mse32.backward()
    assert mse32.item() > 0 and any(p.grad.any() for p in tr.parameters())


# ------------------------------------------------------------------------------------------ PostPKT
def test_finetune_text_ends_like_the_original_prompter():
    """The Prompter closes the assistant turn with "\\n\\n", the tokenizer adds BOS, tokenize() appends EOS."""
    tok = make_tokenizer()
    ex = encode_finetune(tok, RECORD, 2048)
    assert tok.decode(ex["input_ids"]) == \
        "<s><|user|>\nQuestion: 7 * 6 =\n\n<|assistant|>\nAnswer: the answer is 42.\n\n</s>"
    assert tok.decode([t for t in ex["labels"] if t != -100]) == "Answer: the answer is 42.\n\n</s>"
    assert encode_finetune(tok, RECORD, 2048, train_on_inputs=True)["labels"] == ex["input_ids"]
    assert encode_finetune(tok, RECORD, 2048, add_eos_token=True) == ex
    # add_eos_token only matters when the prompt reaches cutoff_len: no EOS to append, yet one is subtracted
    cut = encode_finetune(tok, RECORD, 10, add_eos_token=True)
    assert len(cut["input_ids"]) == 10 and cut["labels"].count(-100) == 9


def test_trainer_step_count_1000_examples_batch_64_micro_8_3_epochs_is_45():
    from pkt.lora import epoch_end_steps, trainer_steps

    steps = trainer_steps(1000, 8, 8, 3, seed=1)
    assert len(steps) == 45 and all(len(s) == 8 for s in steps)
    # 125 micro-batches per epoch: 15 steps, then the 5 leftovers open step 16 with 3 of epoch 2
    assert [epoch for epoch, _ in steps[15]] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert sorted(epoch_end_steps(steps)) == [15, 31]
    first_epoch = [i for s in steps[:15] for _, mb in s for i in mb] + [i for _, mb in steps[15][:5] for i in mb]
    assert sorted(first_epoch) == list(range(1000))
    # the reference's train.sh: 2 GPUs, accumulation 4; each process 63 micro-batches an epoch -> also 45
    for rank in (0, 1):
        shard = trainer_steps(1000, 8, 4, 3, seed=1, world=2, rank=rank)
        assert len(shard) == 45 and [epoch for epoch, _ in shard[15]] == [0, 0, 0, 1]


def test_finetune_trains_on_the_original_text_in_trainer_steps(student_dir, chat_jsonl, tmp_path, monkeypatch):
    from pkt import lora
    from pkt.lora import FinetuneConfig, trainer_steps

    seen = []
    real = lora.collate_left
    monkeypatch.setattr(lora, "collate_left", lambda batch, pad: seen.append(batch) or real(batch, pad))
    data = chat_jsonl("ft_parity.jsonl", 10, seed=4)
    logs = lora.finetune(FinetuneConfig(student_dir, str(tmp_path / "ft"), data_path=data, lora_init="random",
                                        lora_target_modules="q_proj,v_proj", num_epochs=2, batch_size=4,
                                        micro_batch_size=2, cutoff_len=64, seed=3, dtype="fp32"), progress=False)
    plan = trainer_steps(10, 2, 2, 2, seed=3)          # 5 micro-batches an epoch: 2 steps, the 5th carried over
    assert [r["step"] for r in logs] == [1, 2, 3, 4] == list(range(1, len(plan) + 1))
    assert [e for e, _ in plan[2]] == [0, 1]
    tok = load_tokenizer(student_dir)
    records = load_chat_jsonl(data)
    want = [[encode_finetune(tok, records[i]["messages"], 64) for i in mb] for step in plan for _, mb in step]
    assert seen == want
    assert all(tok.decode(ex["input_ids"]).endswith(".\n\n</s>") for batch in seen for ex in batch)


def test_merge_defaults_to_fp32_as_the_original(student_dir, tmp_path):
    """The original loads the base model without a dtype (fp32), merges and saves in fp32."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pkt.lora import MergeConfig, merge, merge_adapter, random_init, save_adapter

    base = save_model(make_llama(hidden=64, ffn=160, layers=3, heads=4, seed=2).half(), make_tokenizer(),
                      tmp_path / "fp16_student")
    peft_model = random_init(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ["up_proj", "o_proj"],
                             4, 8)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    save_adapter(peft_model, tmp_path / "lora")
    merge(MergeConfig(base, str(tmp_path / "lora"), str(tmp_path / "merged")))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = merge_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "lora")
    for name, w in want.state_dict().items():
        if name in merged:
            assert merged[name].dtype == torch.float32 and torch.equal(merged[name], w), name
    merge(MergeConfig(base, str(tmp_path / "lora"), str(tmp_path / "merged16"), save_dtype="fp16"))
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "merged16" / "model.safetensors")).values())
