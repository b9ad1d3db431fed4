"""GPU plans made on the CPU: `--teacher_device auto` placement (accelerate device maps; the hooks of trace,
extract and sensitivity on a dispatched teacher), the meta-device plans for Llama-2-70B -> 13B, and the
`bench/gpu_check.sh --dry_run` plan of every GPU measurement."""
from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest
import torch

from conftest import ROOT
from pkt import placement
from pkt.attribution import locate
from pkt.io import PKTError, load_model
from pkt.laten import extract, memory_plan
from pkt.model import TRANSFER_MODULES, model_shape
from pkt.placement import GPU_80GB, GiB, PlanConfig
from pkt.postpkt import layer_index, sensitivity


def _examples(vocab=300, n=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, T), generator=g)
    return [{"input_ids": r.tolist(), "labels": [-100] * (T // 2) + r[T // 2:].tolist()} for r in ids]


def _dispatched(model):
    """The model behind accelerate's hooks, one device-map entry per decoder layer (all on the CPU here; a
    GPU machine gets different devices): what `--teacher_device auto` hands to the pipelines."""
    from accelerate import dispatch_model

    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers)}}
    placed = dispatch_model(copy.deepcopy(model), dm, force_hooks=True)
    placed.hf_device_map = dm
    return placed


@pytest.fixture(scope="module")
def plain_and_placed(teacher_dir):
    # both copies in fresh memory: BLAS results can differ in the last bit between a 64-byte aligned weight
    # and one mmapped from the safetensors file, and the comparisons below are exact
    plain = copy.deepcopy(load_model(teacher_dir, "fp32", "cpu"))
    placed = _dispatched(plain)
    assert hasattr(placed.model.layers[0], "_hf_hook")          # accelerate's hooks are really in the way
    return plain, placed


def test_placed_teacher_locates_and_extracts_as_the_plain_one(plain_and_placed):
    plain, placed = plain_and_placed
    ids = [_examples(n=1)[0]["input_ids"]]
    a, b = (locate(m, ids, n_layers=3, ffn_k=20, attn_k=10) for m in (plain, placed))
    assert a.ffn_layers == b.ffn_layers and a.attn_layers == b.attn_layers
    assert torch.equal(a.ffn_neurons, b.ffn_neurons) and torch.equal(a.attn_neurons, b.attn_neurons)
    assert torch.equal(a.ffn_scores, b.ffn_scores) and torch.equal(a.attn_scores, b.attn_scores)
    ka, kb = extract(plain, a, TRANSFER_MODULES), extract(placed, b, TRANSFER_MODULES)
    assert all(torch.equal(ka[m], kb[m]) for m in TRANSFER_MODULES)


def test_placed_teacher_has_the_plain_sensitivity(plain_and_placed):
    plain, placed = plain_and_placed
    exs = _examples(n=2)
    sa, na = sensitivity(plain, exs, {n: p for n, p in plain.named_parameters() if layer_index(n) is not None},
                         progress=False)
    sb, nb = sensitivity(placed, exs, {n: p for n, p in placed.named_parameters() if layer_index(n) is not None},
                         progress=False)
    assert na == nb == 2 and sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(sb[k].device == p.device for k, p in placed.named_parameters() if k in sb)   # beside each weight


def test_load_model_auto_places_by_a_device_map_within_max_memory(teacher_dir):
    plain = load_model(teacher_dir, "fp32", "cpu")
    placed = load_model(teacher_dir, "fp32", device="auto", max_memory={"cpu": 10 * GiB})
    assert set(placed.hf_device_map.values()) == {"cpu"}
    assert placement.main_device(placed) == torch.device("cpu")
    sd = placed.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())


def test_a_teacher_that_needs_the_disk_is_refused(teacher_dir):
    with pytest.raises(PKTError, match="does not fit the GPUs and the CPU memory"):
        load_model(teacher_dir, "fp32", device="auto", max_memory={"cpu": 200_000})


def test_main_device_is_the_first_gpu_of_a_map_else_the_lm_head_device():
    class M(torch.nn.Module):
        def __init__(self, dm=None):
            super().__init__()
            self.head = torch.nn.Linear(2, 2)
            if dm:
                self.hf_device_map = dm

        def get_output_embeddings(self):
            return self.head

    assert placement.main_device(M()) == torch.device("cpu")
    assert placement.main_device(M({"model.embed_tokens": 1, "model.layers.0": 2, "lm_head": "cpu"})) == \
        torch.device("cuda:1")
    assert placement.main_device(M({"a": "cpu", "b": "disk"})) == torch.device("cpu")


def test_max_memory_leaves_headroom_the_student_and_the_accumulators_room():
    gpus = {0: 80 * GiB, 1: 80 * GiB}
    mm = placement.max_memory(gpus, 100 * GiB, reserve={0: 30 * GiB}, headroom=2 * GiB)
    assert mm == {0: 48 * GiB, 1: 78 * GiB, "cpu": 90 * GiB}
    assert placement.max_memory(gpus, 0, headroom=2 * GiB, weight_share=2 / 6)[1] == 26 * GiB


@pytest.fixture(scope="module")
def plans_70b():
    return {n: placement.plan(PlanConfig(source_model="llama-2-70b", target_model="llama-2-13b", gpus=n))
            for n in (2, 4)}


def test_70b_to_13b_plan_on_2x80gb_puts_layers_on_the_cpu_and_4x80gb_fits(plans_70b):
    two, four = plans_70b[2], plans_70b[4]
    assert two["teacher_params"] == 68_976_648_192 and two["student_params"] == 13_015_864_320
    for p in (two, four):
        assert sum(r["bytes"] for r in p["rows"]) == p["teacher_params"] * 2           # every weight placed once
        for r in p["rows"]:
            if r["device"] != "cpu":                                                   # within each card's budget
                assert r["bytes"] + r["also"] <= GPU_80GB - placement.HEADROOM
        assert p["device_map"]["model.embed_tokens"] == 0
    assert 10 <= two["cpu_layers"] <= 30 and "cpu" in two["device_map"].values()
    assert four["cpu_layers"] == 0 and "cpu" not in four["device_map"].values()


def test_the_student_gpu_keeps_room_for_the_student_and_the_translator(plans_70b):
    from pkt.placement import _config_model

    t, s = _config_model("llama-2-70b"), _config_model("llama-2-13b")
    items = memory_plan(model_shape(t), model_shape(s), plans_70b[2]["teacher_params"],
                        plans_70b[2]["student_params"])
    reserve = plans_70b[2]["rows"][0]["also"]
    assert reserve == sum(b for name, b, _ in items if not name.startswith("teacher params"))
    assert 45 * GiB < reserve < 65 * GiB                 # 24 GiB of student weights + translator training


def test_postpkt_plan_counts_the_fp32_accumulators_and_activations_beside_the_weights():
    gpu = dict(source_model="llama-2-70b", target_model="llama-2-13b", gpus=4, pipeline="postpkt", cutoff_len=2048)
    on_gpu, on_cpu = placement.plan(PlanConfig(**gpu)), placement.plan(PlanConfig(**gpu, accum_device="cpu"))
    for p in (on_gpu, on_cpu):
        for r in p["rows"]:
            if r["device"] != "cpu":
                assert r["bytes"] + r["also"] <= GPU_80GB - placement.HEADROOM
    r0 = on_gpu["rows"][0]
    assert r0["also"] > 2 * r0["bytes"]                  # fp32 accumulators (2x bf16 weights) + activations
    # the 70B's 128 GiB of weights + 257 GiB of accumulators overflow 4 x 80 GB; weights + activations fit
    assert on_gpu["cpu_layers"] > 0 and on_cpu["cpu_layers"] == 0


def test_gpu_check_dry_run_prints_every_part_with_memory_and_time_caps():
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry_run"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for part in ("attribution", "laten_step", "postpkt_sensitivity", "semalign", "generation", "pipelines",
                 "placement"):
        assert f"[{part}]" in out, part
    assert "total time cap" in out and "GiB" in out
    cap = int(out.split("total time cap")[1].split("s")[0].strip(" :="))
    assert cap <= 8 * 60
    assert "llama-2-70b" in out and "2 x" in out and "4 x" in out       # the placement plans
    assert (ROOT / "bench" / "RESULTS.md").read_text() == results            # a dry run writes nothing


# ------------------------------------------------------------------------------ multi-process fine-tuning
def test_processes_share_out_the_one_process_steps_micro_batch_for_micro_batch():
    """N processes at the same global batch run, per optimizer step, exactly the one-process step's
    micro-batches between them (accelerate's BatchSamplerShard deals the epoch's micro-batches round-robin):
    with each micro-batch's mean loss / accumulation steps and DDP's average, the same objective."""
    from pkt.lora import trainer_steps

    one = trainer_steps(64, 2, 8, 2, seed=1)                    # global batch 16 = 2 x 8 micro-batches
    for world in (2, 4):
        shards = [trainer_steps(64, 2, 8 // world, 2, seed=1, world=world, rank=r) for r in range(world)]
        assert all(len(s) == len(one) for s in shards)
        for k, step in enumerate(one):
            assert sorted(tuple(mb) for s in shards for _, mb in s[k]) == sorted(tuple(mb) for _, mb in step)


@pytest.mark.slow   # two torchrun processes + one plain run: ~45 s on 2 shared cores
def test_two_process_finetune_gives_the_one_process_adapter(student_dir, chat_jsonl, tmp_path):
    import sys

    from safetensors.torch import load_file

    from pkt.budget import read_budget

    data = chat_jsonl("ft_ddp.jsonl", n=8, seed=5)
    flags = ["--base_model", student_dir, "--data_path", data, "--batch_size", "4", "--micro_batch_size", "2",
             "--max_steps", "2", "--lora_dropout", "0", "--cutoff_len", "64", "--lora_target_modules",
             "q_proj,v_proj"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "finetune.py", *flags, "--output_dir", str(tmp_path / "one")], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "finetune.py", *flags, "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert "2 process(es) x 2 x 1" in two.stdout + two.stderr                   # really two gloo processes
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    log = lambda d: [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log(tmp_path / "one")] == pytest.approx([r["loss"] for r in log(tmp_path / "two")],
                                                                       abs=1e-6)
    # the budget counts both processes' passes and each optimizer step once
    assert read_budget(tmp_path / "two") == read_budget(tmp_path / "one")
    assert read_budget(tmp_path / "one")["examples"] == 2 * 4


def test_sensitivity_with_gradient_checkpointing_recomputes_layers_and_gives_the_same_values(teacher_dir):
    """--gradient_checkpointing used to be a no-op: HF checkpoints only layers in training mode, and the
    sensitivity pass runs the model in eval mode."""
    model = copy.deepcopy(load_model(teacher_dir, "fp32", "cpu"))
    params = lambda m: {n: p for n, p in m.named_parameters() if layer_index(n) is not None}
    plain, _ = sensitivity(model, _examples(n=1), params(model), progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    h = model.model.layers[0].input_layernorm.register_forward_hook(lambda *a: calls.append(1))
    ckpt, _ = sensitivity(model, _examples(n=1), params(model), progress=False)
    h.remove()
    assert len(calls) == 2                                # forward + recomputation in the backward
    assert all(torch.allclose(plain[k], ckpt[k], rtol=1e-5, atol=1e-10) for k in plain)
    assert not model.model.layers[0].training            # eval mode restored
