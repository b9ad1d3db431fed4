"""Per-example time and peak memory of `locate` (layers + FFN + attention neurons).

    python bench/bench_attribution.py                 # CPU: hidden 1024 / ffn 2752 / 16 layers / vocab 512
    python bench/bench_attribution.py --device cuda   # + Llama-2-7B and 13B shapes, random bf16 weights
    python bench/bench_attribution.py --dry_run       # memory / FLOP plan at Llama-2 shapes (meta device)

Two baselines: a lean per-neuron loop (one read-out per neuron after one shared forward pass),
timed on a sample of neurons and extrapolated; and, on the CPU shape, the original code's own
structure run in full (three forward passes turned into Python lists, one `.item()` per neuron,
its sorts). The floor is the one `[vocab, d] x [d, ffn + d]` product per layer that exact
per-neuron scores need.
"""
from __future__ import annotations

import platform
import time

import fire
import torch

from modeling_llama_laten import trace
from pkt.attribution import locate, make_readout, valid_topk_fraction
from pkt.model import residual_stream
from pkt.testing import LLAMA2_SHAPES

SHAPES = {
    "cpu-1024": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=512),
    **LLAMA2_SHAPES,
}
STUDENT = {"cpu-1024": SHAPES["cpu-1024"], "llama-2-7b": SHAPES["llama-2-7b"], "llama-2-13b": SHAPES["llama-2-7b"]}


def build(shape: str, device: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, initializer_range=0.02)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def slow_loop_seconds(model, ids, n_sample: int = 64) -> float:
    """The original's loop: one read-out (lm_head + softmax + log) per neuron; sampled, extrapolated."""
    tr = trace(model, ids[:, :-1])
    ro = make_readout(model, tr, ids[:, -1])
    L, ffn, d = tr.m.shape[0], tr.m.shape[-1], tr.x.shape[-1]
    W, g, s, t = model.lm_head.weight.float(), ro.g, ro.s[0], ids[0, -1]
    down = model.model.layers[0].mlp.down_proj.weight.float()
    r = tr.r[0, 0].float()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n_sample):
            v = r + tr.m[0, 0, i].float() * down[:, i]
            logits = W @ (v * s * g)
            _ = round((torch.log(torch.softmax(logits, -1)[t]) - 0.0).item(), 4)
    per_neuron = (time.perf_counter() - t0) / n_sample
    return per_neuron * L * (ffn + d)


def _all_positions(model, ids) -> dict:
    """Every position's activations, as the original's patched model returns them (eager attention)."""
    layers = model.model.layers
    H = model.config.num_attention_heads
    store = {k: [] for k in ("a", "m", "f", "v")}
    hooks = []
    for layer in layers:
        hooks += [layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: store["a"].append(o[0])),
                  layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: store["v"].append(o[0])),
                  layer.mlp.down_proj.register_forward_hook(lambda m, a, o: (store["m"].append(a[0][0]),
                                                                              store["f"].append(o[0])) and None)]
    try:
        with residual_stream(model, range(len(layers) + 1)) as hs:    # layer l reads depth l, writes depth l+1
            out = model.model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    store["x"] = [hs[d][0] for d in range(len(layers))]
    store["out"] = [hs[d + 1][0] for d in range(len(layers))]
    T = ids.shape[1]
    # the patched attention's sub-values: p[h, last, t] * v[h, t, j] for every position t -> [H, T, hd]
    store["sub"] = [p[0, :, -1, :, None] * v.view(T, H, -1).transpose(0, 1) for p, v in zip(out.attentions, store["v"])]
    store["r"] = [x + a for x, a in zip(store["x"], store["a"])]
    return store


def original_structure_seconds(model, ids) -> float:
    """The original code's own structure at this shape, run in full (fp32 `lm_head` on the CPU where
    it casts to fp16 on its GPU): one forward pass for layer scores, one for FFN neurons and one for
    attention neurons, each turning every position's activations into Python lists; one `lm_head`
    call per layer over all its neurons; one `.item()` per neuron; its sorts of the growing
    (name, score) lists and score writes one by one."""
    backend = model.config._attn_implementation
    model.set_attn_implementation("eager")
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    hd = model.config.hidden_size // H
    t = int(ids[0, -1])
    g, W = model.model.norm.weight, model.lm_head.weight

    def logp(v, sigma):
        return torch.log(torch.softmax((v * torch.rsqrt(sigma + 1e-6) * g) @ W.T, -1)[..., t])

    t0 = time.perf_counter()
    with torch.no_grad():
        for part in ("layers", "ffn", "attn"):
            acts = {k: [a.tolist() for a in v] for k, v in _all_positions(model, ids[:, :-1]).items()}

            def last(name, l):                     # torch.tensor(all_pos_<name>[l][-1]), as the original
                return torch.tensor(acts[name][l][-1])
            sigma = (torch.var(last("out", L - 1), -1, unbiased=False) + 1e-5) ** 0.5
            if part == "layers":
                scores = [(logp(last("x", l) + last("a", l), sigma) - logp(last("x", l), sigma)).item()
                          + (logp(last("r", l) + last("f", l), sigma) - logp(last("r", l), sigma)).item()
                          for l in range(L)]
                sorted(enumerate(scores), key=lambda x: x[1])
            elif part == "ffn":
                rows, table = [], torch.zeros(L, model.config.intermediate_size)
                for l in range(L):
                    sub = (last("m", l) * model.model.layers[l].mlp.down_proj.weight).T
                    inc = logp(sub + last("r", l), sigma) - logp(last("r", l), sigma)
                    rows += [[f"{l}_{i}", x.item()] for i, x in enumerate(inc)]
                for name, score in sorted(rows, key=lambda x: x[1])[::-1]:
                    layer, neuron = map(int, name.split("_"))
                    table[layer, neuron] += round(score, 4)
                torch.argsort(table, descending=True)
            else:
                rows, table = [], torch.zeros(L, H * hd)
                for l in range(L):
                    o = model.model.layers[l].self_attn.o_proj.weight.T.view(H, hd, -1)
                    x = torch.tensor(acts["x"][l])[-1]
                    w = torch.tensor(acts["sub"][l]).permute(1, 0, 2)[-1]
                    inc = logp(o * w.unsqueeze(-1) + x, sigma) - logp(x, sigma)
                    rows += [(f"{l}_{h}_{j}", inc[h][j].item()) for h in range(H) for j in range(hd)]
                    for name, score in sorted(rows, key=lambda x: x[1])[::-1]:
                        layer, h, j = map(int, name.split("_"))
                        table[layer, h * hd + j] = round(score, 4)
                torch.argsort(table, descending=True)
    model.set_attn_implementation(backend)
    return time.perf_counter() - t0


def gemm_floor_seconds(model, device) -> float:
    """One `[V, d] x [d, ffn + d]` fp32 product per layer: what exact per-neuron scores cannot avoid."""
    V, d = model.lm_head.weight.shape
    ffn, L = model.config.intermediate_size, model.config.num_hidden_layers
    a = torch.randn(V, d, device=device)
    b = torch.randn(d, ffn + d, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(L):
        a @ b
    sync(device)
    return time.perf_counter() - t0


def run_shape(shape, device, dtype, seq_len, repeats=3, with_loop=True, precision="fp32"):
    model = build(shape, device, dtype)
    student = STUDENT[shape]
    n_layers = student["num_hidden_layers"]
    ffn_k, attn_k = int(student["intermediate_size"] * 0.1), int(student["hidden_size"] * 0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), generator=g)
    exact = locate(model, ids.tolist(), n_layers, ffn_k, attn_k)    # warm-up, and the fp32 selection
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        sel = locate(model, ids.tolist(), n_layers, ffn_k, attn_k, precision=precision)
    sync(device)
    sec = (time.perf_counter() - t0) / repeats
    valid = (valid_topk_fraction(sel.ffn_neurons, exact.ffn_scores, ffn_k),
             valid_topk_fraction(sel.attn_neurons, exact.attn_scores, attn_k))
    extra = (torch.cuda.max_memory_allocated() - base_mem) / 2**30 if device.startswith("cuda") else float("nan")
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    t0 = time.perf_counter()
    trace(model, ids[:, :-1].to(device))
    sync(device)
    fwd = time.perf_counter() - t0
    # the loop needs the same forward pass: count it on both sides
    loop = fwd + slow_loop_seconds(model, ids.to(device)) if with_loop else float("nan")
    # the original's full structure only on the CPU shape: at Llama-2 shapes it runs for hours
    orig = original_structure_seconds(model, ids) if device == "cpu" and with_loop else float("nan")
    floor = gemm_floor_seconds(model, device)
    return dict(shape=shape, device=device, dtype=str(dtype).replace("torch.", ""), seq_len=seq_len,
                precision=precision, valid=valid,
                locate_s=sec, forward_s=fwd, loop_s=loop, speedup=loop / sec, orig_s=orig, orig_speedup=orig / sec,
                gemm_floor_s=floor, model_gb=model_gb, extra_peak_gb=extra)


def dry_run(seq_len: int = 512):
    """Memory and FLOPs of locate at Llama-2 shapes, from meta-device models (nothing allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    for shape in ("llama-2-7b", "llama-2-13b"):
        cfg = LlamaConfig(**SHAPES[shape])
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        P = sum(p.numel() for p in model.parameters())
        V, d, ffn = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
        n_keep = STUDENT[shape]["num_hidden_layers"]
        fwd = 2 * P * seq_len
        readout = 2 * V * d * (ffn + d) * n_keep
        chunk_gb = (1 << 26) * 4 * 2 / 2**30                      # [k, V] product + logsumexp temp
        wu32 = V * d * 4 / 2**30
        rows.append(dict(shape=shape, params_b=P / 1e9, bf16_model_gb=P * 2 / 2**30, forward_tflop=fwd / 1e12,
                         readout_tflop=readout / 1e12, extra_gb=wu32 + chunk_gb))
    print("| shape | params (B) | bf16 model GB | forward TFLOP | read-out TFLOP | extra GB (W_U fp32 + chunk) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params_b']:.2f} | {r['bf16_model_gb']:.1f} | {r['forward_tflop']:.1f} | "
              f"{r['readout_tflop']:.0f} | {r['extra_gb']:.2f} |")
    return rows


def main(device: str = "cpu", seq_len: int = 128, gpu_seq_len: int = 512, dry_run_only: bool = False,
         dry_run: bool = False, threads: int | None = None, precision: str = "fp32", with_loop: bool = True):
    """--precision bf16: the read-out product in bf16 (the speed of that; 'valid top-k' compares its
    selections with the fp32 ones)."""
    if threads:
        torch.set_num_threads(threads)
    if dry_run or dry_run_only:
        globals()["dry_run"](gpu_seq_len)
        if dry_run_only:
            return
    rows = [run_shape("cpu-1024", "cpu", torch.float32, seq_len, with_loop=with_loop, precision=precision)]
    if device.startswith("cuda"):
        for shape in ("llama-2-7b", "llama-2-13b"):
            rows.append(run_shape(shape, device, torch.bfloat16, gpu_seq_len, with_loop=with_loop,
                                  precision=precision))
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"\nlocate, one example; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {name}")
    print("| shape | device | dtype | precision | tokens | locate s | of which forward s | per-neuron loop s "
          "(extrapolated) | speed-up | original's structure s | speed-up | read-out GEMM floor s | model GB | "
          "extra peak GB | valid top-k vs fp32 (FFN, attn) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['device']} | {r['dtype']} | {r['precision']} | {r['seq_len']} | "
              f"{r['locate_s']:.3f} | {r['forward_s']:.3f} | {r['loop_s']:.1f} | {r['speedup']:.1f}x | "
              f"{r['orig_s']:.1f} | {r['orig_speedup']:.1f}x | {r['gemm_floor_s']:.3f} | {r['model_gb']:.1f} | "
              f"{r['extra_peak_gb']:.2f} | {r['valid'][0]:.1%}, {r['valid'][1]:.1%} |")


if __name__ == "__main__":
    fire.Fire(main)
