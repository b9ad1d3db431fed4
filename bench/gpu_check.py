"""Every GPU measurement of the project in one prepared run: `bash bench/gpu_check.sh` (this file does the work).

On a machine with one CUDA GPU and only this repository (no network, no downloads, random weights at the real
Llama-2 shapes, materialised on the GPU in seconds), it runs the parts below in order, each in its own process
under its own time cap (all caps together <= 8 minutes), prints each result line as it is measured and appends
one dated block to bench/RESULTS.md part by part, so a run cut short still records what it did.

    bash bench/gpu_check.sh                       # everything, appended to bench/RESULTS.md
    bash bench/gpu_check.sh --dry_run             # the plan only: shapes, memory (meta-device arithmetic), caps
    bash bench/gpu_check.sh --only attribution,laten_step [--results FILE]
    bash bench/gpu_check.sh --smoke --results /tmp/smoke.md   # CPU, tiny shapes: this script's code paths only

Parts: placement (70B plans + a real cuda:0 + CPU placed teacher against the plain one), attribution (7B/13B
locate, TF32 vs bf16 read-out, where the time goes), laten_step (13B -> 7B), postpkt_sensitivity (full-depth
13B), pipelines (every CLI on tiny models, on CUDA), generation (HF bf16 batch 1 vs 16 at 7B shape, 8-shot
GSM8K-length prompts), semalign (one v1 step and one v2 stage at 13B -> 7B, through pkt.semalign).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
BUDGET_S = 8 * 60          # every cap together, and the whole run
SEQ_LOCATE = 512
# --smoke (CPU, tiny shapes; set through the environment so the child processes see it): exercises every
# code path of the parts on a machine without a GPU. Its numbers measure nothing.
SMOKE = os.environ.get("PKT_GPU_CHECK_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
TINY = {"llama-2-7b": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512),
        "llama-2-13b": dict(hidden_size=160, intermediate_size=432, num_hidden_layers=5, num_attention_heads=5,
                            num_key_value_heads=5, vocab_size=512)}


def shape(name: str):
    """A Llama-2 shape name, or its tiny stand-in under --smoke."""
    return TINY[name] if SMOKE else name


def sizes(name: str) -> dict:
    from pkt.testing import LLAMA2_SHAPES

    return TINY[name] if SMOKE else LLAMA2_SHAPES[name]


def _gib(b) -> str:
    return f"{b / GiB:.1f} GiB"


# ----------------------------------------------------------------------------------------- the parts
@dataclass
class Part:
    name: str
    cap_s: int
    what: str


PARTS = [
    Part("placement", 40, "Llama-2-70B -> 13B device maps on 2/4 x 80 GB (meta); tiny teacher placed over cuda:0 + "
                          "CPU vs the plain one (locate, extract, sensitivity)"),
    Part("attribution", 75, f"locate, 1 example x {SEQ_LOCATE} tokens, at llama-2-7b and llama-2-13b (bf16 weights): "
                            "TF32 and bf16 read-out, valid top-k of bf16 vs fp32, the read-out's parts"),
    Part("laten_step", 95, "one LaTen step 13B -> 7B (16 examples x 768 tokens, gradient checkpointing), "
                           "background checkpoint writes, the step's parts"),
    Part("postpkt_sensitivity", 70, "sensitivity pass of a full-depth llama-2-13b (bf16, 1024 tokens): "
                                    "s/example, peak memory"),
    Part("pipelines", 85, "every CLI on tiny models on CUDA: LaTen train/transfer, PostPKT extract/delta/"
                          "finetune/merge, SemAlign v1/v2, evaluate"),
    Part("generation", 55, "HF generate, bf16 llama-2-7b shape: batch 1 vs 16 (+ shared-prefix cache), 8-shot "
                           "GSM8K-length prompts; vLLM when installed"),
    Part("semalign", 55, "SemAlign at 13B -> 7B (bf16): semantic bases + map, one v1 step on student layer 1 "
                         "(backward through the whole student), one 4-step v2 stage"),
]
BY_NAME = {p.name: p for p in PARTS}


# ------------------------------------------------------------------------------------------- plans
def plan_lines(name: str) -> list[str]:
    """What a part will run and its expected GPU memory, from meta-device models (nothing allocated)."""
    from random_models import meta_llama

    n = lambda m: sum(p.numel() for p in m.parameters())
    if name == "placement":
        return ["placement plans: see the tables below; the cuda:0 + CPU check uses a 4-layer width-96 model "
                "(< 0.1 GiB)"]
    if name == "attribution":
        out = []
        for shape in ("llama-2-7b", "llama-2-13b"):
            m = meta_llama(shape)
            V, d = m.config.vocab_size, m.config.hidden_size
            extra = V * d * 4 + 2 * (1 << 26) * 4 + V * d * 2
            out.append(f"{shape}: weights {_gib(n(m) * 2)} + read-out (fp32 W_U, bf16 W_U, one logit chunk) "
                       f"{_gib(extra)} = {_gib(n(m) * 2 + extra)}")
        return out
    if name == "laten_step":
        from pkt.laten import memory_plan
        from pkt.model import model_shape

        t, s = meta_llama("llama-2-13b"), meta_llama("llama-2-7b")
        items = memory_plan(model_shape(t), model_shape(s), n(t), n(s), seq=768)
        big = sorted(items, key=lambda r: -r[1])[:4]
        return [f"13B -> 7B: {_gib(sum(b for _, b, _ in items))} (pkt.laten.memory_plan; largest: "
                + ", ".join(f"{k} {_gib(b)}" for k, b, _ in big) + ")"]
    if name == "postpkt_sensitivity":
        m = meta_llama("llama-2-13b")
        modes = sensitivity_modes(m, 1024)
        return [f"llama-2-13b, 1024 tokens: {mode}: {_gib(b)}" for mode, b in modes] + \
            ["the first mode that fits the GPU (less 3 GiB) is run"]
    if name == "generation":
        m = meta_llama("llama-2-7b")
        c = m.config
        kv = 16 * (812 + 64) * c.num_hidden_layers * 2 * c.hidden_size * 2
        return [f"llama-2-7b: weights {_gib(n(m) * 2)} + KV cache of 16 x 876 tokens {_gib(kv)} + logits "
                f"{_gib(16 * 876 * c.vocab_size * 4)}"]
    if name == "semalign":
        try:
            from pkt.semalign import memory_plan

            t, s = meta_llama("llama-2-13b"), meta_llama("llama-2-7b")
            plans = {v: memory_plan(v, t.config, s.config, 1, 512, 2, n(t), n(s), n(s.model.layers[0]))
                     for v in ("v1", "v2")}
            return [f"13B -> 7B, micro-batch 1 x 512 tokens: v1 {_gib(plans['v1']['peak'])}, v2 "
                    f"{_gib(plans['v2']['peak'])} (pkt.semalign.memory_plan; this part keeps both models loaded: "
                    f"{_gib((n(t) + n(s)) * 2)} of weights)"]
        except Exception as e:  # noqa: BLE001 - the plan says what is missing instead of failing the dry run
            return [f"no plan: pkt.semalign.memory_plan unavailable ({type(e).__name__}: {e})"]
    if name == "pipelines":
        return ["tiny models (pkt.testing.save_tiny_pair): < 1 GiB"]
    raise KeyError(name)


def sensitivity_modes(model, seq: int) -> list[tuple[str, int]]:
    """(mode, bytes) of the sensitivity pass, best first: fp32 accumulators on the GPU with full activations,
    the same with gradient checkpointing, accumulators on the CPU (bench_postpkt's activation formula)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    n_layers = sum(p.numel() for k, p in model.named_parameters() if ".layers." in k)
    largest = max(p.numel() for p in model.parameters())
    d, f, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    logits = 3 * seq * V * 4
    full = L * seq * (10 * d + 4 * f) * 2 + logits
    ckpt = L * seq * d * 2 + seq * (10 * d + 4 * f) * 2 + logits
    return [("accumulators on the GPU", n * 2 + n_layers * 4 + largest * 4 + full),
            ("accumulators on the GPU, gradient checkpointing", n * 2 + n_layers * 4 + largest * 4 + ckpt),
            ("accumulators on the CPU", n * 2 + largest * 4 + full)]


def print_plan(parts: list[Part]) -> None:
    from pkt import placement

    print(f"gpu_check plan (dry run: nothing runs on a GPU, nothing is written); parts run in this order, each "
          f"in its own process under its cap; a run stops at {BUDGET_S} s\n")
    for p in parts:
        print(f"[{p.name}] cap {p.cap_s} s: {p.what}")
        for line in plan_lines(p.name):
            print(f"    expected GPU memory: {line}" if "GiB" in line else f"    {line}")
    total = sum(p.cap_s for p in parts)
    print(f"\ntotal time cap: {total} s (budget {BUDGET_S} s)\n")
    for n in (2, 4):
        placement.print_plan(placement.plan(placement.PlanConfig(source_model="llama-2-70b",
                                                                 target_model="llama-2-13b", gpus=n)))
        print()
    if total > BUDGET_S:
        raise SystemExit(f"error: the caps add up to {total} s, over the {BUDGET_S} s budget")


# ----------------------------------------------------------------------------------------- helpers
def emit(lines_file: Path, text: str) -> None:
    """Print one result line and append it to the part's line file at once (a part killed later keeps it)."""
    print(text, flush=True)
    with open(lines_file, "a") as f:
        f.write(text + "\n")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats=1):
    """(mean seconds over `repeats` after the call already made by the caller's warm-up, last result)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        r = fn()
    sync()
    return (time.perf_counter() - t0) / repeats, r


def peak_reset():
    if DEVICE != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(base=0) -> float:
    return (torch.cuda.max_memory_allocated() - base) / GiB if DEVICE == "cuda" else float("nan")


def gpu_bytes() -> int:
    return torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else 64 * GiB


def machine_block() -> list[str]:
    import accelerate
    import peft
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    mem = f", {torch.cuda.get_device_properties(0).total_memory / GiB:.1f} GiB" if torch.cuda.is_available() else ""
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        drv = "n/a"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except Exception:  # noqa: BLE001
        cpu = platform.processor() or platform.machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"## GPU check (`bash bench/gpu_check.sh`), {date}", "",
            f"Machine: {gpu}{mem}, driver {drv}, CUDA {torch.version.cuda}; host {cpu}, {os.cpu_count()} CPU "
            f"threads; torch {torch.__version__}, transformers {transformers.__version__}, accelerate "
            f"{accelerate.__version__}, peft {peft.__version__}. Random weights at Llama-2 shapes, bf16 unless said. "
            "Each part ran in its own process under its time cap.", ""]


# ------------------------------------------------------------------------------------------- parts
def part_placement(out: Path) -> None:
    from pkt import placement
    from pkt.attribution import locate
    from pkt.io import load_model
    from pkt.laten import extract
    from pkt.model import TRANSFER_MODULES
    from pkt.postpkt import layer_index, sensitivity
    from pkt.testing import make_llama, make_tokenizer, save_model

    for n in (2, 4):
        p = placement.plan(placement.PlanConfig(source_model="llama-2-70b", target_model="llama-2-13b", gpus=n))
        where = "; ".join(f"{'cuda:%s' % r['device'] if r['device'] != 'cpu' else 'cpu'} layers "
                          f"{placement._layers(r)} {_gib(r['bytes'])}" for r in p["rows"])
        emit(out, f"- plan, Llama-2-70B -> 13B (LaTen) on {n} x 80 GB: {where}; student + translator training "
                  f"reserve {_gib(p['rows'][0]['also'])} on cuda:0; {p['cpu_layers']} teacher layers on the CPU")
    tmp = Path(tempfile.mkdtemp())
    path = save_model(make_llama(hidden=96, ffn=256, layers=4, heads=4, seed=1), make_tokenizer(), tmp / "teacher")
    plain = load_model(path, "fp32", DEVICE)
    size = sum(p.numel() * 4 for p in plain.parameters())
    budget = {0: size // 2, "cpu": 4 * GiB} if DEVICE == "cuda" else {"cpu": 4 * GiB}
    placed = load_model(path, "fp32", device="auto", max_memory=budget)
    dm = placed.hf_device_map
    devs = sorted({str(v) for v in dm.values()})
    ids = [torch.randint(3, 300, (65,), generator=torch.Generator().manual_seed(0)).tolist()]
    a, b = (locate(m, ids, n_layers=3, ffn_k=25, attn_k=10) for m in (plain, placed))
    same_layers = a.ffn_layers == b.ffn_layers and a.attn_layers == b.attn_layers
    overlap = sum(len(set(x) & set(y)) for x, y in zip(a.ffn_neurons.tolist(), b.ffn_neurons.tolist())) / \
        a.ffn_neurons.numel()
    diff = max((a.ffn_scores - b.ffn_scores).abs().max().item(), (a.attn_scores - b.attn_scores).abs().max().item())
    ka, kb = extract(plain, a, TRANSFER_MODULES, device=DEVICE), extract(placed, a, TRANSFER_MODULES, device=DEVICE)
    ext = all(torch.equal(ka[m], kb[m]) for m in TRANSFER_MODULES)
    exs = [{"input_ids": ids[0], "labels": [-100] * 32 + ids[0][32:]}]
    sa, _ = sensitivity(plain, exs, {k: v for k, v in plain.named_parameters() if layer_index(k) is not None},
                        progress=False)
    sb, _ = sensitivity(placed, exs, {k: v for k, v in placed.named_parameters() if layer_index(k) is not None},
                        progress=False)
    rel = max(((sa[k] - sb[k].to(sa[k].device)).abs().max() / sa[k].abs().max().clamp_min(1e-30)).item()
              for k in sa)
    on_cpu = sorted({int(k.split(".")[2]) for k, v in dm.items() if v == "cpu" and k.startswith("model.layers.")})
    emit(out, f"- tiny teacher placed over {' + '.join(devs)} by `load_model(device='auto')` (CPU layers "
              f"{on_cpu}, computing there) vs the plain {DEVICE} model: locate same layers {'yes' if same_layers else 'NO'}, "
              f"FFN neurons {overlap:.1%} equal, max score diff {diff:.1e}; extract equal {'yes' if ext else 'NO'}; "
              f"sensitivity max relative diff {rel:.1e}")


def part_attribution(out: Path) -> None:
    from pkt import attribution
    from pkt.attribution import locate, valid_topk_fraction
    from pkt.model import model_shape
    from random_models import random_llama

    for name, student in (("llama-2-7b", "llama-2-7b"), ("llama-2-13b", "llama-2-7b")):
        t0 = time.time()
        model = random_llama(shape(name), DEVICE, torch.bfloat16)
        build = time.time() - t0
        st = sizes(student)
        n_layers, ffn_k, attn_k = st["num_hidden_layers"], int(st["intermediate_size"] * 0.1), \
            int(st["hidden_size"] * 0.1)
        V = model.config.vocab_size
        ids = [torch.randint(3, V, (SEQ_LOCATE + 1,), generator=torch.Generator().manual_seed(0)).tolist()]
        base = peak_reset()
        res = {}
        for prec in ("fp32", "bf16"):
            run = lambda: locate(model, ids, n_layers, ffn_k, attn_k, precision=prec)
            run()
            res[prec] = timed(run, 2)
        extra = peak_gib(base)
        a, b = res["fp32"][1], res["bf16"][1]
        vf = valid_topk_fraction(b.ffn_neurons, a.ffn_scores, ffn_k)
        va = valid_topk_fraction(b.attn_neurons, a.attn_scores, attn_k)
        from modeling_llama_laten import trace

        fwd, _ = timed(lambda: trace(model, torch.tensor(ids)[:, :-1].to(DEVICE)), 1)
        emit(out, f"- {name}: locate {res['fp32'][0]:.3f} s (TF32 read-out), {res['bf16'][0]:.3f} s (--precision "
                  f"bf16); forward {fwd:.3f} s; valid top-k of bf16 vs fp32 selections FFN {vf:.1%}, attention "
                  f"{va:.1%}; extra peak {extra:.2f} GiB over the {sum(p.numel() for p in model.parameters()) * 2 / GiB:.1f} "
                  f"GiB model; built in {build:.1f} s")
        if name == "llama-2-13b":
            readout_parts(out, model, model_shape(model), n_layers, ffn_k, attn_k, ids, attribution)
        del model
        peak_reset()


def readout_parts(out, model, shape, n_layers, ffn_k, attn_k, ids, attribution) -> None:
    """Where the 13B read-out's time goes: the products alone (TF32 / bf16) at the exact chunk shapes, the
    log-softmax passes alone, and the top CUDA kernels of one locate (torch.profiler)."""
    from pkt.attribution import locate

    V, d, ffn = shape.vocab, shape.hidden, shape.ffn
    step = min(attribution.CHUNK_ELEMENTS // V, ffn)
    chunks = n_layers * (-(-ffn // step) + -(-shape.attn_neurons // step))
    W = model.lm_head.weight.float()
    w = torch.randn(step, d, device=DEVICE)
    torch.backends.cuda.matmul.allow_tf32 = True
    (w @ W.T)
    t_tf32, _ = timed(lambda: w @ W.T, 5)
    torch.backends.cuda.matmul.allow_tf32 = False
    wb, Wb = w.bfloat16(), W.bfloat16()
    (wb @ Wb.T)
    t_bf16, _ = timed(lambda: wb @ Wb.T, 5)
    P = w @ W.T
    z0 = torch.randn(1, V, device=DEVICE)
    cs = torch.randn(1, step, device=DEVICE)
    tg = torch.zeros(1, dtype=torch.long, device=DEVICE)
    attribution._shifted_logp(z0, cs, P, tg, step)
    t_lse, _ = timed(lambda: attribution._shifted_logp(z0, cs, P, tg, step), 5)
    flop = 2 * step * d * V
    emit(out, f"- llama-2-13b read-out, {chunks} chunks of [{step} x {d}] @ [{d} x {V}]: product {t_tf32 * 1e3:.2f} ms "
              f"TF32 ({flop / t_tf32 / 1e12:.0f} TFLOP/s), {t_bf16 * 1e3:.2f} ms bf16 ({flop / t_bf16 / 1e12:.0f} "
              f"TFLOP/s); log-softmax passes {t_lse * 1e3:.2f} ms per chunk -> per locate: products "
              f"{chunks * t_tf32:.2f} s TF32 / {chunks * t_bf16:.2f} s bf16, log-softmax {chunks * t_lse:.2f} s")
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=acts) as prof:
        locate(model, ids, n_layers, ffn_k, attn_k)
        sync()
    own = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))   # microseconds
    events = sorted(prof.key_averages(), key=lambda e: -own(e))
    tot = sum(own(e) for e in events)
    top = [f"{e.key[:70]} x{e.count} {own(e) / 1e6:.3f} s" for e in events[:6] if own(e) > 0.02 * tot]
    emit(out, f"- llama-2-13b locate under torch.profiler: GPU busy {tot / 1e6:.2f} s; top kernels by own time: "
              + "; ".join(top))


def part_laten_step(out: Path) -> None:
    import bench_laten_step

    r = bench_laten_step.bench(DEVICE, steps=2, profile=True, **({"n_align": 1, "seq": 32} if SMOKE else {}))
    m = r["mean"]
    emit(out, f"- 13B -> 7B, {r['examples_per_step']} x {r['tokens']} tokens, micro-batch 1, gradient checkpointing: "
              f"**{m['total']:.2f} s/step** = "
              f"locate {m['locate']:.2f} + extract {m['extract']:.2f} + align {m['align']:.2f} + AdamW "
              f"{m['optim']:.3f} + wait for the previous write {m['wait']:.2f} + snapshot to pinned CPU memory "
              f"{m['snapshot']:.2f}; the checkpoint write itself (translator + trainer state, every step) "
              f"{r['write_s']:.2f} s in the background; peak {r['peak_gb']:.1f} GiB (reserved "
              f"{r['reserved_gb'] or float('nan'):.1f}); models built in {r['build_s']:.1f} s")
    prof = r["profile"]
    tot = sum(prof.values())
    emit(out, "- the step's parts, profiled apart: " + ", ".join(f"{k} {v:.2f} s ({v / tot:.0%})"
                                                              for k, v in prof.items()))


def part_postpkt_sensitivity(out: Path) -> None:
    from pkt.postpkt import sensitivity
    from random_models import meta_llama, random_llama

    seq = 64 if SMOKE else 1024
    cap = gpu_bytes() - 3 * GiB
    modes = sensitivity_modes(meta_llama(shape("llama-2-13b")), seq)
    mode = next((i for i, (_, b) in enumerate(modes) if b <= cap), 2)
    t0 = time.time()
    model = random_llama(shape("llama-2-13b"), DEVICE, torch.bfloat16)
    build = time.time() - t0
    if mode == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = {n: p for n, p in model.named_parameters() if ".layers." in n}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, seq), generator=g)
    exs = [{"input_ids": r.tolist(), "labels": [-100] * (seq // 2) + r[seq // 2:].tolist()} for r in ids]
    accum = "cpu" if mode == 2 else None
    sensitivity(model, exs[:1], params, accum_device=accum, progress=False)          # warm-up
    base = peak_reset()
    sec, (acc, used) = timed(lambda: sensitivity(model, exs[1:], params, accum_device=accum, progress=False))
    emit(out, f"- llama-2-13b, all {model.config.num_hidden_layers} layers, {seq} tokens, {modes[mode][0]}: "
              f"**{sec / used:.2f} s/example**, peak {peak_gib():.1f} GiB (planned {modes[mode][1] / GiB:.1f}); "
              f"built in {build:.1f} s")
    del acc


def part_pipelines(out: Path) -> None:
    from pkt.testing import save_tiny_pair

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_pipelines."))
    teacher, student = save_tiny_pair(tmp / "models")
    o = tmp / "out"
    gsm = "data/gsm"
    steps = [
        ("LaTen train", ["train_LaTen.py", "--source_model", teacher, "--target_model", student,
                         "--extract_data_path", f"{gsm}/gsm_extract_split.jsonl", "--align_data_path",
                         f"{gsm}/gsm_align_split.jsonl", "--translator_save_name", "t", "--output_dir", f"{o}/kt",
                         "--cutoff_len", "256", "--n_align", "1", "--max_steps", "2", "--save_every", "1"]),
        ("LaTen transfer", ["inference_LaTen.py", "--source_model", teacher, "--target_model", student,
                            "--data_path", f"{gsm}/gsm_train_split.jsonl", "--translator_checkpoints", f"{o}/kt/t",
                            "--transfer_rates", "[0.1]", "--steps", "[1]", "--output_dir", f"{o}/laten"]),
        ("PostPKT extract", ["extract_lora_with_sensitivity.py", "--source_model", teacher, "--target_model",
                             student, "--data_path", f"{gsm}/gsm_extract_split.jsonl", "--num_examples", "2",
                             "--cutoff_len", "256", "--output_dir", f"{o}/extracted"]),
        ("PostPKT delta", ["get_delta.py", "--lora_path", f"{o}/extracted", "--output_path", f"{o}/delta"]),
        ("PostPKT finetune", ["finetune.py", "--base_model", student, "--delta_path", f"{o}/delta",
                              "--lora_init_path", f"{o}/extracted", "--data_path", f"{gsm}/gsm_train_split.jsonl",
                              "--num_epochs", "1", "--max_steps", "2", "--batch_size", "2", "--micro_batch_size", "2",
                              "--cutoff_len", "256", "--output_dir", f"{o}/lora"]),
        ("PostPKT merge", ["merge_lora.py", "--base_model", student, "--delta_path", f"{o}/delta", "--lora_path",
                           f"{o}/lora", "--output_dir", f"{o}/merged", "--device", DEVICE]),
        ("SemAlign v1", ["train_SemAlign.py", "--variant", "v1", "--source_model", teacher, "--target_model",
                         student, "--data_path", f"{gsm}/gsm_train_split.jsonl", "--output_dir", f"{o}/semalign_v1",
                         "--max_examples", "2", "--attribution_examples", "2", "--batch_size", "2",
                         "--micro_batch_size", "2", "--epochs", "1", "--max_steps", "1", "--cutoff_len", "256"]),
        ("SemAlign v2", ["train_SemAlign.py", "--variant", "v2", "--source_model", teacher, "--target_model",
                         student, "--data_path", f"{gsm}/gsm_train_split.jsonl", "--output_dir", f"{o}/semalign_v2",
                         "--max_examples", "2", "--attribution_examples", "2", "--batch_size", "2",
                         "--micro_batch_size", "2", "--epochs", "1", "--max_steps", "1", "--cutoff_len", "256"]),
        ("evaluate (HF)", ["evaluate.py", "--model_path", f"{o}/merged", "--tasks", "gsm,mmlu", "--limit", "2",
                           "--max_new_tokens", "8", "--batch_size", "2", "--output_dir", f"{o}/eval"]),
        ("LaTen train, --teacher_device auto", ["train_LaTen.py", "--source_model", teacher, "--target_model",
                         student, "--extract_data_path", f"{gsm}/gsm_extract_split.jsonl", "--align_data_path",
                         f"{gsm}/gsm_align_split.jsonl", "--translator_save_name", "t", "--output_dir", f"{o}/kt_auto",
                         "--cutoff_len", "256", "--n_align", "1", "--max_steps", "2", "--teacher_device", "auto"]),
    ]
    for name, argv in steps:
        t0 = time.time()
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
        sec = time.time() - t0
        err = (r.stderr.strip().splitlines() or [""])[-1][:200]
        if r.returncode == 0:
            emit(out, f"- {name}: ok on {DEVICE} ({sec:.1f} s)")
        elif r.returncode == 2 and "unknown flag" in err:
            emit(out, f"- {name}: skipped, the CLI has changed ({err})")
        else:
            emit(out, f"- {name}: FAILED rc={r.returncode} ({sec:.1f} s): {err}")


def gsm_length_prompts(tok, n: int, prompt_tokens: int = 812, shared_tokens: int = 745) -> list[str]:
    """`n` 8-shot GSM8K prompts cut to Llama-2 lengths in `tok`'s tokens (the real prompts measure 812 tokens
    with Llama-2's tokenizer, 745 of them the shared exemplars): the exemplar text is cut to `shared_tokens`
    tokens and each question is cut to the rest, so lengths and the shared prefix match the real workload."""
    from pkt.eval import gsm

    test, exemplars = gsm.load(ROOT / "data" / "eval")
    full = gsm.build_prompt("", exemplars[:8])
    ids = tok(full)["input_ids"]
    prefix = tok.decode(ids[:shared_tokens])
    out = []
    for ex in test[:n]:
        q = tok(gsm.build_prompt(ex["question"], []))["input_ids"]
        out.append(prefix + tok.decode(q[-(prompt_tokens - shared_tokens):]))
    return out


def part_generation(out: Path) -> None:
    from pkt.eval.generate import MIN_SHARED_PREFIX, generate_hf, shared_prefix_len, vllm_available
    from pkt.testing import make_tokenizer
    from random_models import random_llama

    tok = make_tokenizer()
    model = random_llama(shape("llama-2-7b"), DEVICE, torch.bfloat16)
    new = 4 if SMOKE else 64
    prompts = gsm_length_prompts(tok, 16, *((96, 64) if SMOKE else ()))
    plen = sum(len(tok(p)["input_ids"]) for p in prompts) / len(prompts)

    def run(ps, bs, prefix=False):
        generate_hf(model, tok, ps[:1], max_new_tokens=2, batch_size=1)
        stats = {}
        sec, _ = timed(lambda: generate_hf(model, tok, ps, max_new_tokens=new, batch_size=bs, stats=stats,
                                           prefix_cache=prefix))
        return stats["new_tokens"] / sec, sec

    one, s1 = run(prompts[:4], 1)
    many, s16 = run(prompts, 16)
    line = (f"- llama-2-7b shape, bf16, HF generate, greedy, {new} new tokens, prompts {plen:.0f} tokens: batch 1 "
            f"{one:.1f} tokens/s ({s1:.1f} s for 4 prompts), batch 16 {many:.1f} tokens/s ({s16:.1f} s) = "
            f"{many / one:.1f}x")
    shared = shared_prefix_len(tok(prompts)["input_ids"])
    if shared >= MIN_SHARED_PREFIX:
        cached, sc = run(prompts, 16, prefix=True)
        line += f"; batch 16 + shared-prefix cache ({shared} tokens) {cached:.1f} tokens/s = {cached / one:.1f}x"
    emit(out, line)
    emit(out, "- vLLM: " + ("installed, but this part runs no model directory through it (see docs/gpu.md)"
                            if vllm_available() else "not installed (optional; docs/gpu.md)"))


def part_semalign(out: Path) -> None:
    """SemAlign at 13B -> 7B through pkt.semalign's own functions (random weights, one shared vocabulary):
    the semantic bases and map once, then one v1 optimizer step on student layer 1 (the worst case: the
    backward runs through every student layer) and one v2 frontier stage (4 steps on stage 1)."""
    try:
        from pkt.model import unembedding
        from pkt.semalign import (Schedule, alignment_map, semantic_bases, teacher_targets, train_layers,
                                  v1_micro_loss, v1_pairs, v2_micro_loss, v2_pairs)
    except ImportError as e:
        emit(out, f"- skipped: pkt.semalign lacks {getattr(e, 'name', None) or e} (its API changed)")
        return
    from random_models import random_llama

    teacher = random_llama(shape("llama-2-13b"), DEVICE, torch.bfloat16, seed=1).requires_grad_(False)
    student = random_llama(shape("llama-2-7b"), DEVICE, torch.bfloat16, seed=2).requires_grad_(False)
    L_T, L_S = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    T, n, pad = (32 if SMOKE else 512), 4, 2
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(n):
        ids = torch.randint(3, student.config.vocab_size, (T,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (T // 2) + ids[T // 2:]})
    one_step = Schedule(lr=1e-5, epochs=1, batch_size=n, micro_batch_size=1, max_steps=1)
    try:
        t0 = time.time()
        M = alignment_map(semantic_bases(unembedding(teacher)), semantic_bases(unembedding(student)))
        sync()
        t_map = time.time() - t0
        pairs = v1_pairs(L_T, L_S, [1])                                   # k† = 1: the deepest backward
        t_tg, targets = timed(lambda: teacher_targets(teacher, examples, pairs, M, 1, pad, dtype=student.dtype,
                                                      progress=False))
        base = peak_reset()
        loss = v1_micro_loss(student, pairs, targets)
        t_v1, _ = timed(lambda: train_layers(student, examples, [p.student - 1 for p in pairs], loss, one_step, pad,
                                             progress=False))
        peak_v1 = peak_gib(base)
        stage = v2_pairs(L_T, L_S)[0]
        four = Schedule(lr=1e-5, epochs=4, batch_size=n, micro_batch_size=1, max_steps=4)
        base = peak_reset()
        t_v2, _ = timed(lambda: train_layers(student, examples, [stage.student - 1],
                                             v2_micro_loss(teacher, student, stage, M, None), four, pad, "all",
                                             progress=False))
        peak_v2 = peak_gib(base)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        emit(out, f"- skipped: pkt.semalign's API changed ({type(e).__name__}: {e}); adjust part_semalign")
        return
    emit(out, f"- 13B -> 7B, bf16, {n} examples x {T} tokens per step, micro-batch 1: semantic bases + map "
              f"{t_map:.2f} s (once per model pair, cached on disk by the CLI); v1: teacher targets {t_tg:.2f} s, "
              f"**one step on student layer {pairs[0].student} {t_v1:.2f} s** (backward through all {L_S} layers), "
              f"peak {peak_v1:.1f} GiB over the loaded models; v2: **stage {stage.student} of 4 steps {t_v2:.2f} s** "
              f"({t_v2 / 4:.2f} s/step), peak {peak_v2:.1f} GiB over the loaded models")


RUNNERS = {"placement": part_placement, "attribution": part_attribution, "laten_step": part_laten_step,
           "postpkt_sensitivity": part_postpkt_sensitivity, "pipelines": part_pipelines,
           "generation": part_generation, "semalign": part_semalign}


# ------------------------------------------------------------------------------------ orchestration
def run_all(parts: list[Part], results: Path) -> int:
    """Each part in a child process under min(its cap, what is left of the budget); its lines are appended to
    `results` under its heading as soon as it ends (or is stopped)."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry_run for the plan, --smoke for a CPU run of the code paths)",
              file=sys.stderr)
        return 2
    start = time.time()
    head = machine_block()
    with open(results, "a") as f:
        f.write("\n" + "\n".join(head) + "\n")
    print("\n".join(head), flush=True)
    failed = 0
    for p in parts:
        left = BUDGET_S - (time.time() - start)
        cap = int(min(p.cap_s, left))
        lines_file = Path(tempfile.mkstemp(prefix=f"gpu_check.{p.name}.", suffix=".md")[1])
        print(f"[{p.name}] cap {cap} s: {p.what}", flush=True)
        t0 = time.time()
        if cap < 10:
            status = "not run: the 8-minute budget was spent"
        else:
            child = subprocess.Popen([sys.executable, __file__, "--part", p.name, "--lines", str(lines_file)],
                                     cwd=ROOT, start_new_session=True, env={**os.environ, "TQDM_DISABLE": "1"})
            try:
                rc = child.wait(timeout=cap)
                status = "done" if rc == 0 else f"FAILED (exit {rc}; its last lines are above in the log)"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, 9)
                child.wait()
                rc, status = -9, f"stopped at its {cap} s cap"
            failed += rc != 0
        lines = lines_file.read_text().splitlines() if lines_file.exists() else []
        lines_file.unlink(missing_ok=True)
        with open(results, "a") as f:
            f.write(f"\n### {p.name} ({status}, {time.time() - t0:.0f} s)\n\n" + "".join(l + "\n" for l in lines))
        print(f"[{p.name}] {status} in {time.time() - t0:.0f} s", flush=True)
    print(f"gpu_check: {time.time() - start:.0f} s; appended to {results}", flush=True)
    return 1 if failed else 0


def main(dry_run: bool = False, only: str | None = None, results: str = str(ROOT / "bench" / "RESULTS.md"),
         part: str | None = None, lines: str | None = None, smoke: bool = False):
    if smoke and not SMOKE:        # re-run with the switch in the environment (the parts' processes inherit it)
        os.environ["PKT_GPU_CHECK_SMOKE"] = "1"
        if Path(results).resolve() == (ROOT / "bench" / "RESULTS.md").resolve():
            print("error: --smoke measures nothing: give --results elsewhere", file=sys.stderr)
            sys.exit(2)
        sys.exit(subprocess.call([sys.executable, __file__, *sys.argv[1:]]))
    if part:                       # child process: one part
        RUNNERS[part](Path(lines))
        return
    from pkt.io import parse_list

    names = parse_list(only, "--only", choices=list(BY_NAME)) if only else [p.name for p in PARTS]
    parts = [BY_NAME[n] for n in names]
    if dry_run:
        print_plan(parts)
        return
    sys.exit(run_all(parts, Path(results)))


if __name__ == "__main__":
    from pkt.io import run_cli

    run_cli(main)
