"""Every LaTen / PostPKT / analysis entry point, tried as a hostile user would (issue 12): nothing a user has
is lost, no broken model is written, and a bad flag or a damaged input is a one-line error before any
model loads. docs/safety.md lists each case and the test that shows it."""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from knowledge_translator import KnowledgeTranslator
from pkt.io import PKTError, config_from_flags

KEEP = "a user's file"


@pytest.fixture(scope="module")
def env(tmp_path_factory, teacher_dir, student_dir, chat_jsonl):
    """Inputs every entry point can take: the conftest models, chat data, a LoRA adapter on the student,
    its delta, and a translator checkpoint (untrained)."""
    from peft import get_peft_model

    from pkt.io import load_model
    from pkt.lora import _lora_config, negate_lora_A

    root = tmp_path_factory.mktemp("safety")
    adapter = root / "adapter"
    peft_model = get_peft_model(load_model(student_dir, "fp32", "cpu"), _lora_config(["q_proj", "v_proj"], 2, 4, 0.0))
    peft_model.save_pretrained(str(adapter))
    negate_lora_A(adapter, root / "delta")
    torch.manual_seed(0)
    KnowledgeTranslator(96, 64).save(root / "translators" / "checkpoint_0")
    example = root / "example.json"
    example.write_text(json.dumps({"input_ids": [5, 6, 7, 8]}))
    log = root / "train_log.jsonl"
    log.write_text(json.dumps({"step": 0, "loss": 1.0, "teacher_ffn_layers": [0], "student_ffn_layers": [0]}) + "\n")
    transfer = root / "laten_transfer.json"
    transfer.write_text(json.dumps({"student_ffn_layers": [0], "student_ffn_neurons": [[1, 2]],
                                    "student_attn_layers": [1], "student_attn_neurons": [[3]],
                                    "intermediate_size": 160, "hidden_size": 64}))
    return {"root": root, "teacher": teacher_dir, "student": student_dir, "data": chat_jsonl("safety.jsonl", 8),
            "align": chat_jsonl("safety_align.jsonl", 4, seed=1), "adapter": str(adapter),
            "delta": str(root / "delta"), "translators": str(root / "translators"), "example": str(example),
            "log": str(log), "transfer": str(transfer)}


def _configs():
    """(entry point, config class, required flags given env) for every config-shaped entry point."""
    from analysis.plot_neurons import NeuronsFigure
    from analysis.plot_training import TrainingFigures
    from analysis.similarity import SimilarityConfig
    from pkt.attribution import LocateConfig
    from pkt.laten import TrainConfig, TransferConfig
    from pkt.lora import DeltaConfig, FinetuneConfig, MergeConfig
    from pkt.postpkt import ExtractConfig

    return {
        "train_LaTen.py": (TrainConfig, lambda e, out: dict(
            source_model=e["teacher"], target_model=e["student"], extract_data_path=e["data"],
            align_data_path=e["align"], output_dir=str(out), translator_save_name="run")),
        "inference_LaTen.py": (TransferConfig, lambda e, out: dict(
            source_model=e["teacher"], target_model=e["student"], data_path=e["data"],
            translator_checkpoints=e["translators"], transfer_rates="0.5", steps="0", output_dir=str(out))),
        "extract_lora_with_sensitivity.py": (ExtractConfig, lambda e, out: dict(
            source_model=e["teacher"], target_model=e["student"], data_path=e["data"], output_dir=str(out))),
        "get_delta.py": (DeltaConfig, lambda e, out: dict(lora_path=e["adapter"], output_path=str(out))),
        "finetune.py": (FinetuneConfig, lambda e, out: dict(
            base_model=e["student"], data_path=e["data"], output_dir=str(out), lora_target_modules="q_proj")),
        "merge_lora.py": (MergeConfig, lambda e, out: dict(
            base_model=e["student"], lora_path=e["adapter"], output_dir=str(out))),
        "pkt.locate": (LocateConfig, lambda e, out: dict(
            model_dir=e["student"], example_json=e["example"], ffn_k=2, attn_k=2, out=str(out))),
        "analysis/plot_training.py": (TrainingFigures, lambda e, out: dict(log=e["log"], out_dir=str(out))),
        "analysis/plot_neurons.py": (NeuronsFigure, lambda e, out: dict(transfer_json=e["transfer"], out=str(out))),
        "analysis/similarity.py": (SimilarityConfig, lambda e, out: dict(
            teacher=e["teacher"], student=e["student"], data=e["data"], out_dir=str(out))),
    }


ENTRY_POINTS = list(_configs())


def _build(entry, env, output, **flags):
    config, required = _configs()[entry]
    return config(**{**required(env, output), **flags})


FILE_OUTPUTS = {"pkt.locate": "sel.json", "analysis/plot_training.py": "laten_layer_map.png",
                "analysis/plot_neurons.py": "n.png", "analysis/similarity.py": "parametric_similarity.json"}


def _user_output(entry, env, tmp_path) -> Path:
    """A user's file where the entry point would write inside `tmp_path / "out"`."""
    from pkt.laten import transfer_dir

    out = tmp_path / "out"
    out.mkdir()
    if entry in FILE_OUTPUTS:              # a file output: the user's file is that file
        taken = out / FILE_OUTPUTS[entry]
        taken.write_text(KEEP)
        return taken
    taken = {"train_LaTen.py": out / "run",
             "inference_LaTen.py": transfer_dir(out, env["student"], 0.5, 0)}.get(entry, out)
    taken.mkdir(exist_ok=True)
    (taken / "keep.txt").write_text(KEEP)
    return taken / "keep.txt"


OUTPUT_ARG = {"pkt.locate": "sel.json", "analysis/plot_neurons.py": "n.png"}


# ----------------------------------------------------------------------------------- 1. nothing lost
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_existing_output_is_refused_without_overwrite_and_kept(entry, env, tmp_path):
    keep = _user_output(entry, env, tmp_path)
    out = tmp_path / "out" / OUTPUT_ARG.get(entry, "")
    with pytest.raises(PKTError, match="already exists and is not empty.*--overwrite True"):
        _build(entry, env, out)
    assert keep.read_text() == KEEP
    _build(entry, env, out, overwrite=True)         # the user asked for it: accepted (replaced when complete)
    assert keep.read_text() == KEEP


def _inside(env, entry):
    """An output that is, contains or lies inside one of the entry point's inputs, and the words of the error."""
    root = env["root"]
    return {
        "train_LaTen.py": (dict(output_dir=env["student"], translator_save_name="run"), "lies inside the input"),
        "inference_LaTen.py": (dict(output_dir=env["teacher"]), "lies inside the input --source_model"),
        "extract_lora_with_sensitivity.py": (dict(output_dir=env["teacher"]), "is the input --source_model"),
        "get_delta.py": (dict(output_path=str(root)), "contains the input --lora_path"),
        "finetune.py": (dict(output_dir=env["delta"], delta_path=env["delta"]), "is the input --delta_path"),
        "merge_lora.py": (dict(output_dir=env["student"]), "is the input --base_model"),
        "pkt.locate": (dict(out=env["example"]), "is the input EXAMPLE_JSON"),
        "analysis/plot_neurons.py": (dict(out=env["transfer"]), "is the input --transfer_json"),
        "analysis/similarity.py": (dict(out_dir=env["student"]), "lies inside the input --student"),
    }[entry]


def _snapshot(env) -> dict:
    roots = (env["root"], Path(env["teacher"]), Path(env["student"]))
    return {p: p.read_bytes() for r in roots for p in r.rglob("*") if p.is_file()}


# plot_training's inputs are two files, which writing figures into a directory cannot overlap
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e != "analysis/plot_training.py"])
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_even_with_overwrite(entry, env, tmp_path):
    flags, match = _inside(env, entry)
    before = _snapshot(env)
    with pytest.raises(PKTError, match=match):
        _build(entry, env, tmp_path / "unused", overwrite=True, **flags)
    assert _snapshot(env) == before


@pytest.mark.parametrize("relation", ["contains", "lies inside"])
def test_train_laten_run_directory_never_overlaps_the_models_or_data(relation, env, tmp_path):
    from pkt.laten import TrainConfig

    data = tmp_path / "models" / "extract.jsonl"
    data.parent.mkdir()
    data.write_text(Path(env["data"]).read_text())
    kw = dict(source_model=env["teacher"], target_model=env["student"], extract_data_path=str(data),
              align_data_path=env["align"], overwrite=True)
    if relation == "contains":       # --output_dir tmp --translator_save_name models: the run dir holds the data
        kw.update(output_dir=str(tmp_path), translator_save_name="models")
    else:                            # the run dir inside the student model
        kw.update(output_dir=env["student"], translator_save_name="run")
    with pytest.raises(PKTError, match=f"{relation} the input --(extract_data_path|target_model)"):
        TrainConfig(**kw)


@pytest.mark.parametrize("which", ["lora_init_path", "base_model"])
def test_finetune_output_never_overlaps_its_adapters_or_model(which, env):
    from pkt.lora import FinetuneConfig

    if which == "lora_init_path":    # the output inside the extracted adapter it starts from
        kw = dict(lora_init_path=env["adapter"], output_dir=env["adapter"] + "/trained")
    else:                            # the output a parent of the base model
        kw = dict(lora_target_modules="q_proj", output_dir=str(Path(env["student"]).parent))
    with pytest.raises(PKTError, match="lies inside the input --lora_init_path|contains the input --base_model"):
        FinetuneConfig(env["student"], data_path=env["data"], overwrite=True, **kw)


def test_prepare_demo_models_refuses_a_directory_it_did_not_write(tmp_path):
    from scripts.prepare_demo_models import main

    mine = tmp_path / "teacher" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text(KEEP)
    with pytest.raises(PKTError, match="--cache_dir .*teacher: already exists and is not empty"):
        main(cache_dir=str(tmp_path), quick=True)
    assert mine.read_text() == KEEP
    assert not (tmp_path / "student").exists()


# ------------------------------------------------------------------------- 2. no broken model written
def test_finetune_stops_on_a_non_finite_step_and_keeps_the_good_checkpoints(env, tmp_path):
    """lr 1e30 (the issue's case): the loss or gradient turns non-finite; fine-tuning stops naming the step,
    writes no adapter, and every checkpoint it kept is finite."""
    from safetensors.torch import load_file

    from pkt.lora import FinetuneConfig, checkpoints, finetune

    out = tmp_path / "ft"
    with pytest.raises(PKTError, match=r"step \d+: non-finite .*stopped, nothing of this step saved"):
        finetune(FinetuneConfig(env["student"], str(out), data_path=env["data"], learning_rate=1e30, batch_size=2,
                                micro_batch_size=2, num_epochs=2, save_steps=1, cutoff_len=64), progress=False)
    assert not (out / "adapter_model.safetensors").exists()
    kept = checkpoints(out)
    for _, ck in kept:
        assert all(torch.isfinite(t).all() for t in load_file(str(ck / "trainable.safetensors")).values())
    logged = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged)


def test_laten_stops_on_a_non_finite_loss_and_inference_refuses_its_huge_weights(env, tmp_path):
    """lr 1e30 (the issue's case): step 0 leaves weights of ~1e30 (finite: kept as checkpoint_0), step 1's
    loss is non-finite -> one-line error; fusing checkpoint_0 overflows -> refused, nothing written."""
    from pkt.laten import TrainConfig, TransferConfig, train, transfer

    cfg = dict(source_model=env["teacher"], target_model=env["student"], dtype="fp32", teacher_device="cpu",
               student_device="cpu")
    with pytest.raises(PKTError, match="step 1: non-finite loss"):
        train(TrainConfig(**cfg, extract_data_path=env["data"], align_data_path=env["align"], n_align=1,
                          micro_batch_size=2, transfer_rate=0.5, learning_rate=1e30, max_steps=3,
                          output_dir=str(tmp_path), translator_save_name="run"))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint_*")) == ["checkpoint_0"]
    out = tmp_path / "fused"
    with pytest.raises(PKTError, match="non-finite value.*nothing was saved"):
        transfer(TransferConfig(**cfg, data_path=env["data"], translator_checkpoints=str(tmp_path / "run"),
                                transfer_rates="0.5", steps="0", output_dir=str(out)))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("what", ["gradient", "weight"])
def test_a_non_finite_translator_gradient_or_weight_stops_training_naming_step_and_tensor(what, tmp_path):
    from pkt.laten import check_translator_finite

    tr = KnowledgeTranslator(8, 4, ["up_proj"])
    p = tr.network["up_proj"][0].weight
    if what == "gradient":
        p.grad = torch.full_like(p, float("inf"))
    else:
        p.data[0, 0] = float("nan")
    with pytest.raises(PKTError, match=f"step 7: translator {what} network.up_proj.0.weight has .* non-finite.*"
                                       "no checkpoint was written"):
        check_translator_finite(tr, 7, tmp_path, what)


def test_inference_refuses_a_diverged_translator_checkpoint(env, tmp_path):
    from pkt.laten import TransferConfig, transfer

    tr = KnowledgeTranslator(96, 64)
    with torch.no_grad():
        tr.network["up_proj"][0].weight[0, 0] = float("nan")
    ckpt = tmp_path / "translators" / "checkpoint_0"
    ckpt.mkdir(parents=True)
    # written around save_tensors' guard, as an older version or another tool might have
    from safetensors.torch import save_file
    save_file(tr.state_dict(), str(ckpt / "translator.safetensors"))
    (ckpt / "translator_config.json").write_text(json.dumps(tr.config()))
    with pytest.raises(PKTError, match="checkpoint_0: network.up_proj.0.weight has 1 non-finite.*nothing was saved"):
        transfer(TransferConfig(source_model=env["teacher"], target_model=env["student"], data_path=env["data"],
                                translator_checkpoints=str(tmp_path / "translators"), transfer_rates="0.5",
                                steps="0", output_dir=str(tmp_path / "fused"), teacher_device="cpu",
                                student_device="cpu", dtype="fp32"))
    assert not (tmp_path / "fused").exists()


def test_merge_refuses_an_adapter_with_non_finite_weights(env, tmp_path):
    from safetensors.torch import load_file, save_file

    from pkt.lora import MergeConfig, merge

    bad = tmp_path / "nan_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(Path(env["adapter"], "adapter_config.json").read_text())
    tensors = load_file(str(Path(env["adapter"]) / "adapter_model.safetensors"))
    tensors = {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(PKTError, match="non-finite value.*nothing was saved"):
        merge(MergeConfig(env["student"], str(bad), str(tmp_path / "merged")))
    assert not (tmp_path / "merged").exists()


def test_an_extracted_adapter_with_non_finite_factors_is_never_saved(teacher_dir, tmp_path):
    from pkt.io import meta_model
    from pkt.lora import extracted_adapter, save_adapter

    student = meta_model(teacher_dir)
    factors = {f"model.layers.{i}.self_attn.q_proj": (torch.full((96, 2), float("nan")), torch.zeros(2, 96))
               for i in range(4)}
    with pytest.raises(PKTError, match="q_proj.lora_B.*non-finite.*nothing was saved"):
        save_adapter(extracted_adapter(student, factors, ["q_proj"], 2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------- 3. logs and disks
@pytest.fixture
def file_size_limit():
    """Run a block with writes beyond `n` bytes failing with EFBIG, as on a full disk (Python ignores
    SIGXFSZ); works for root, where read-only directories do not."""
    import contextlib

    @contextlib.contextmanager
    def limit(n: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return limit


def test_a_log_line_that_cannot_be_written_leaves_no_empty_log(tmp_path, file_size_limit):
    from pkt.io import append_jsonl

    log = tmp_path / "train_log.jsonl"
    with pytest.raises(PKTError, match="cannot write .*train_log.jsonl: File too large"), file_size_limit(0):
        append_jsonl(log, {"step": 1, "loss": 1.0})
    assert not log.exists()
    append_jsonl(log, {"step": 1, "loss": 1.0})
    with pytest.raises(PKTError, match="cannot write"), file_size_limit(log.stat().st_size + 5):
        append_jsonl(log, {"step": 2, "loss": 0.5})
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1]     # no torn line


def _limited(n: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec


@pytest.mark.parametrize("entry", ["train_LaTen.py", "finetune.py", "merge_lora.py", "get_delta.py"])
def test_a_full_disk_is_a_one_line_error_and_leaves_nothing_behind(entry, env, tmp_path):
    """Each writer kind: torch.save (LaTen checkpoint), the train log (fine-tuning), save_pretrained
    (merge), save_tensors (delta), with writes failing past a few KB as on a full disk."""
    out = tmp_path / "out"
    args = {"train_LaTen.py": ["--source_model", env["teacher"], "--target_model", env["student"],
                               "--extract_data_path", env["data"], "--align_data_path", env["align"], "--n_align", "1",
                               "--transfer_rate", "0.5", "--max_steps", "1", "--student_device", "cpu",
                               "--teacher_device", "cpu", "--output_dir", str(out)],
            "finetune.py": ["--base_model", env["student"], "--data_path", env["data"], "--output_dir", str(out),
                            "--lora_target_modules", "q_proj", "--batch_size", "8", "--micro_batch_size", "8",
                            "--max_steps", "1", "--cutoff_len", "64"],
            "merge_lora.py": ["--base_model", env["student"], "--lora_path", env["adapter"], "--output_dir", str(out)],
            "get_delta.py": ["--lora_path", env["adapter"], "--output_path", str(out)]}[entry]
    limit = 32 if entry == "finetune.py" else 4096    # finetune: even its first log line fails
    r = subprocess.run([sys.executable, str(ROOT / entry), *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, preexec_fn=_limited(limit))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and "File too large" in last, r.stderr[-2000:]
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [], left         # no partial output, no temporary sibling, no empty log
    if entry == "finetune.py":      # so the same command runs again once there is room
        from pkt.lora import FinetuneConfig

        FinetuneConfig(env["student"], str(out), data_path=env["data"], lora_target_modules="q_proj")


# ------------------------------------------------------------------------- 4. flags checked up front
SUPPORTED = (int, float, bool, str, int | None, float | None, str | None, bool | None, bool | str | None)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_flag_has_a_type_the_command_line_checks(entry):
    config, _ = _configs()[entry]
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.init:
            assert hints[f.name] in SUPPORTED, f"{entry} --{f.name}: {hints[f.name]}"


def _first_int_flag(entry):
    config, _ = _configs()[entry]
    hints = typing.get_type_hints(config)
    return next((f.name for f in dataclasses.fields(config) if f.init and hints[f.name] in (int, int | None)), None)


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if _first_int_flag(e)])
def test_text_for_an_integer_flag_is_a_one_line_error(entry, env, tmp_path):
    config, required = _configs()[entry]
    name = _first_int_flag(entry)
    with pytest.raises(PKTError, match=f"--{name} 'abc': expected an integer"):
        config_from_flags(config, {**required(env, tmp_path / "o"), name: "abc"})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_number_given_as_the_output_path_is_a_path(entry, env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, required = _configs()[entry]
    flags = required(env, "x")
    key = next(k for k in ("output_dir", "output_path", "out_dir", "out") if k in flags)
    cfg = config_from_flags(config, {**flags, key: 123})
    assert getattr(cfg, key) == "123"
    assert list(tmp_path.iterdir()) == []


BAD_FLAGS = [
    ("train_LaTen.py", dict(learning_rate=0.0), "--learning_rate 0.0: expected a number > 0"),
    ("train_LaTen.py", dict(learning_rate=float("nan")), "--learning_rate nan"),
    ("train_LaTen.py", dict(learning_rate=-1.0), "--learning_rate -1.0"),
    ("train_LaTen.py", dict(student_device="gpu0"), "--student_device 'gpu0': expected cpu, cuda, cuda:N or mps"),
    ("train_LaTen.py", dict(dtype="fp8"), "--dtype 'fp8'"),
    ("inference_LaTen.py", dict(teacher_device="gpu0"), "--teacher_device 'gpu0'"),
    ("extract_lora_with_sensitivity.py", dict(device="gpu0"), "--device 'gpu0'"),
    ("extract_lora_with_sensitivity.py", dict(accum_device="cuda:x"), "--accum_device 'cuda:x'"),
    ("extract_lora_with_sensitivity.py", dict(lora_dropout=1.0), "--lora_dropout 1.0"),
    ("finetune.py", dict(learning_rate=-1.0), "--learning_rate -1.0: expected a number > 0"),
    ("finetune.py", dict(learning_rate=float("nan")), "--learning_rate nan"),
    ("finetune.py", dict(warmup_ratio=-1.0), r"--warmup_ratio -1.0: expected a number >= 0 and <= 1"),
    ("finetune.py", dict(warmup_ratio=1.5), "--warmup_ratio 1.5"),
    ("finetune.py", dict(num_epochs=0), "--num_epochs 0: expected an integer >= 1"),
    ("finetune.py", dict(max_steps=0), "--max_steps 0"),
    ("finetune.py", dict(lora_dropout=-0.1), "--lora_dropout -0.1"),
    ("merge_lora.py", dict(device="gpu0"), "--device 'gpu0'"),
    ("pkt.locate", dict(n_layers=0), "--n_layers 0: expected an integer >= 1"),
    ("pkt.locate", dict(device="gpu0"), "--device 'gpu0'"),
    ("pkt.locate", dict(ffn_k=-1), "--ffn_k -1"),
    ("analysis/plot_training.py", dict(teacher_layers=0), "--teacher_layers 0"),
    ("analysis/similarity.py", dict(device="gpu0"), "--device 'gpu0'"),
]


@pytest.mark.parametrize("entry, flags, message", BAD_FLAGS, ids=[f"{e}-{next(iter(f))}={next(iter(f.values()))}"
                                                                  for e, f, _ in BAD_FLAGS])
def test_bad_values_are_one_line_errors_naming_flag_and_value(entry, flags, message, env, tmp_path):
    with pytest.raises(PKTError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _build(entry, env, tmp_path / "o", **flags)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_refused_up_front():
    from pkt.io import check_device

    with pytest.raises(PKTError, match="--device cuda:1: CUDA is not available"):
        check_device("cuda:1", "--device")
    check_device("cpu", "--device")


def test_a_missing_local_path_is_no_such_directory_not_a_hub_lookup(env, tmp_path, monkeypatch):
    """The rule (pkt.io.is_local_path): a path is local when it exists, starts with / ./ ../ ~, has more than
    one slash, or its first component exists here; otherwise it is a hub id."""
    from pkt.io import is_local_path, load_model
    from pkt.lora import MergeConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(PKTError, match="--base_model models/student: no such directory"):
        MergeConfig("models/student", env["adapter"], "merged")
    assert is_local_path("./student") and is_local_path("a/b/c") and not is_local_path("meta-llama/Llama-2-7b-hf")
    # a hub id that cannot be fetched (offline here) is a one-line error too
    with pytest.raises(PKTError, match="--base_model nobody/nothing: cannot load a model .*hub id"):
        load_model("nobody/nothing", device="cpu", flag="--base_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def _corrupt_copy(src, dst, name):
    import shutil

    shutil.copytree(src, dst)
    blob = (Path(dst) / name).read_bytes()
    (Path(dst) / name).write_bytes(blob[:len(blob) // 2])        # a truncated download / copy
    return str(dst)


@pytest.mark.parametrize("what", ["model", "adapter", "translator"])
def test_a_corrupt_safetensors_file_is_a_one_line_error_naming_it(what, env, tmp_path):
    from pkt.laten import TransferConfig
    from pkt.lora import MergeConfig

    if what == "model":
        bad = _corrupt_copy(env["student"], tmp_path / "student", "model.safetensors")
        make = lambda: MergeConfig(bad, env["adapter"], str(tmp_path / "out"))      # noqa: E731
        name = "student/model.safetensors"
    elif what == "adapter":
        bad = _corrupt_copy(env["adapter"], tmp_path / "adapter", "adapter_model.safetensors")
        make = lambda: MergeConfig(env["student"], bad, str(tmp_path / "out"))      # noqa: E731
        name = "adapter/adapter_model.safetensors"
    else:
        bad = _corrupt_copy(env["translators"], tmp_path / "tr", "checkpoint_0/translator.safetensors")
        make = lambda: TransferConfig(source_model=env["teacher"], target_model=env["student"],  # noqa: E731
                                      data_path=env["data"], translator_checkpoints=bad, steps="0",
                                      output_dir=str(tmp_path / "out"))
        name = "checkpoint_0/translator.safetensors"
    with pytest.raises(PKTError, match=f"{name} is not a readable safetensors file"):
        make()
    assert not (tmp_path / "out").exists()


def test_locate_refuses_out_of_vocabulary_ids_before_loading(env, tmp_path, monkeypatch):
    from pkt.attribution import LocateConfig, locate_example

    monkeypatch.setattr("pkt.io.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    example = tmp_path / "oov.json"
    example.write_text(json.dumps({"input_ids": [5, 6, 99999]}))
    with pytest.raises(PKTError, match=r"oov.json: token id\(s\) \[99999\] outside the model's vocabulary \[0, 300\)"):
        locate_example(LocateConfig(env["student"], str(example), ffn_k=2, attn_k=2, out=str(tmp_path / "s.json")))
    with pytest.raises(PKTError, match="--n_layers 9: the model has 3 layers"):
        locate_example(LocateConfig(env["student"], env["example"], n_layers=9, out=str(tmp_path / "s.json")))
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("what", ["example", "adapter_config"])
def test_non_utf8_json_inputs_are_one_line_errors(what, env, tmp_path):
    import shutil

    from pkt.attribution import LocateConfig, locate_example
    from pkt.lora import MergeConfig

    if what == "example":
        bad = tmp_path / "ex.json"
        bad.write_bytes(b'{"input_ids": [1, 2], "note": "\xff"}')
        with pytest.raises(PKTError, match="EXAMPLE_JSON .*ex.json: not UTF-8"):
            locate_example(LocateConfig(env["student"], str(bad), out=str(tmp_path / "s.json")))
    else:
        bad = tmp_path / "adapter"
        shutil.copytree(env["adapter"], bad)
        (bad / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}')
        with pytest.raises(PKTError, match="--lora_path .*adapter_config.json: not UTF-8"):
            MergeConfig(env["student"], str(bad), str(tmp_path / "out"))


@pytest.mark.parametrize("cmd, message", [
    (["train_LaTen.py", "--learning_rate", "0"], "error: --learning_rate 0.0: expected a number > 0"),
    (["-m", "pkt.locate", "{student}", "{example}", "--n_layers", "0"],
     "error: --n_layers 0: expected an integer >= 1"),
    (["analysis/plot_training.py", "--log", "{log}", "--step", "abc"], "error: --step 'abc': expected an integer"),
    (["scripts/prepare_demo_models.py", "--quick", "--num_layers", "abc"],
     "error: --num_layers 'abc': expected an integer >= 1"),
])
def test_the_command_line_prints_one_line_exits_2_and_writes_nothing(cmd, message, env, tmp_path):
    cmd = [c.format(**env) for c in cmd]
    script = cmd if cmd[0] == "-m" else [str(ROOT / cmd[0]), *cmd[1:]]
    r = subprocess.run([sys.executable, *script, *(["--output_dir", str(tmp_path / "o")] if "LaTen" in cmd[0] else []),
                        *(["--cache_dir", str(tmp_path / "c")] if "prepare" in cmd[0] else [])],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert (r.returncode, r.stderr.strip().splitlines()) == (2, [message]), r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
