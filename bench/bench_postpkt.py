"""PostPKT benchmarks: the max-sum submatrix scan, the sensitivity pass, and a memory plan.

    python bench/bench_postpkt.py                    # CPU: vectorized scan vs the reference's Python loop
    python bench/bench_postpkt.py --device cuda      # + sensitivity pass at Llama-2-13B shape (random bf16)
    python bench/bench_postpkt.py --dry_run          # memory plan at 13B/7B shapes (meta-device models)
    python bench/bench_postpkt.py --markdown         # print the CPU table as a RESULTS.md section

The baseline is the reference's scan: a summed-area table, then a Python double loop over every
position with four table look-ups each. It is timed on a smaller matrix and extrapolated linearly in
the number of positions (its cost per position does not depend on the matrix size).
"""
from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time

import fire
import torch

from pkt.postpkt import max_sum_submatrix, max_sum_submatrix_bruteforce, sensitivity
from pkt.testing import LLAMA2_SHAPES

SHAPES = LLAMA2_SHAPES
# (name, teacher shape, student block) for one 13B -> 7B layer, plus the embeddings.
SCANS = [("q/k/v/o_proj", (5120, 5120), (4096, 4096), 4),
         ("gate/up_proj", (13824, 5120), (11008, 4096), 2),
         ("down_proj", (5120, 13824), (4096, 11008), 1)]


def reference_loop(sens: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """The reference algorithm, written plainly: fp32 summed-area table, every bottom-right position
    in a Python loop, strict `>` (first max in row-major order wins)."""
    sat = sens.cumsum(0).cumsum(1)
    H, W = sens.shape
    best, best_val = (0, 0), -float("inf")
    for i in range(rows - 1, H):
        for j in range(cols - 1, W):
            t, l = i - rows + 1, j - cols + 1
            v = sat[i, j]
            if t > 0:
                v = v - sat[t - 1, j]
            if l > 0:
                v = v - sat[i, l - 1]
            if t > 0 and l > 0:
                v = v + sat[t - 1, l - 1]
            if v > best_val:
                best, best_val = (t, l), v
    return best


def _time(fn, repeat=3):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def _load() -> str:
    try:
        import os

        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def bench_scan(small=(400, 300), small_block=(300, 200), repeat=3) -> dict:
    """Scan timings: full-size matrices (vectorized) and the reference loop on `small`, extrapolated."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, shape, block, per_layer in SCANS:
        x = torch.rand(shape, generator=g)
        med, best = _time(lambda: max_sum_submatrix(x, *block), repeat)
        positions = (shape[0] - block[0] + 1) * (shape[1] - block[1] + 1)
        rows.append(dict(name=name, shape=shape, block=block, per_layer=per_layer, median_s=med, min_s=best,
                         positions=positions))
    # The reference loop on a small case; the same corner as the vectorized scan and the brute force.
    xs = torch.rand(small, generator=g)
    xi = torch.randint(0, 3, small, generator=g).float()         # integer values: exact ties
    t = time.perf_counter()
    ref_corner = reference_loop(xs, *small_block)
    loop_s = time.perf_counter() - t
    small_positions = (small[0] - small_block[0] + 1) * (small[1] - small_block[1] + 1)
    checks = {
        "random fp32": (max_sum_submatrix(xs, *small_block), ref_corner),
        "integer (ties)": (max_sum_submatrix(xi, *small_block), reference_loop(xi, *small_block)),
        "integer vs direct sums": (max_sum_submatrix(xi[:60, :50], 40, 30),
                                   max_sum_submatrix_bruteforce(xi[:60, :50], 40, 30)),
    }
    per_pos = loop_s / small_positions
    for r in rows:
        r["loop_extrapolated_s"] = per_pos * r["positions"]
    return dict(rows=rows, small=small, small_block=small_block, loop_s=loop_s, per_position_s=per_pos,
                checks=checks)


def scan_table(res: dict) -> str:
    lines = ["| weight (13B -> 7B) | teacher | block | positions | vectorized median (min) | reference loop, "
             "extrapolated | speed-up |",
             "|---|---|---|---:|---:|---:|---:|"]
    tot_v = tot_l = 0.0
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['block'][0]}x{r['block'][1]} | "
                     f"{r['positions']:,} | {r['median_s']:.2f} s ({r['min_s']:.2f}) | "
                     f"{r['loop_extrapolated_s']:.0f} s | {r['loop_extrapolated_s'] / r['median_s']:,.0f}x |")
        tot_v += r["median_s"] * r["per_layer"] * 32
        tot_l += r["loop_extrapolated_s"] * r["per_layer"] * 32
    lines.append(f"| all 32 x 7 weights of a 13B -> 7B extraction | | | | {tot_v / 60:.1f} min | "
                 f"{tot_l / 3600:.1f} h | {tot_l / tot_v:,.0f}x |")
    s, b = res["small"], res["small_block"]
    lines.append("")
    lines.append(f"Reference loop measured on {s[0]}x{s[1]} -> {b[0]}x{b[1]}: {res['loop_s']:.2f} s "
                 f"({res['per_position_s'] * 1e6:.1f} us per position), extrapolated linearly in positions.")
    lines.append("Same corner as the loop / brute force: " + ", ".join(
        f"{k}: {'yes' if a == c else 'NO'} {a}" for k, (a, c) in res["checks"].items()) + ".")
    return "\n".join(lines)


def bench_sensitivity(device="cuda", layers=8, seq_len=1024, examples=3, accum_device=None, shape="llama-2-13b"):
    """Seconds per example and peak GPU memory of the sensitivity pass with random bf16 weights at the
    given shape (first `layers` layers; per-layer costs extrapolate linearly to the full depth)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers}, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    params = {n: p for n, p in model.named_parameters() if ".layers." in n}
    ids = torch.randint(0, cfg.vocab_size, (examples, seq_len))
    exs = [{"input_ids": ids[i].tolist(), "labels": [-100] * (seq_len // 2) + ids[i, seq_len // 2:].tolist()}
           for i in range(examples)]
    sensitivity(model, exs[:1], params, accum_device=accum_device, progress=False)   # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _, used = sensitivity(model, exs, params, accum_device=accum_device, progress=False)
    torch.cuda.synchronize()
    per_ex = (time.perf_counter() - t) / used
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    full = SHAPES[shape]["num_hidden_layers"]
    return dict(shape=shape, layers=layers, seq_len=seq_len, accum=str(accum_device or device), s_per_example=per_ex,
                s_per_example_full=per_ex * full / layers, peak_gib=peak, device=torch.cuda.get_device_name())


def memory_plan_table(seq_len=2048) -> str:
    """Memory plan of the sensitivity pass at 13B / 7B shapes from meta-device models."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    gib = 2 ** 30
    lines = [f"| model | params | weights fp32 / bf16 | fp32 accumulators (layers) | largest grad (fp32) | "
             f"activations, 1 example x {seq_len} tok (rough) |", "|---|---:|---:|---:|---:|---:|"]
    for name, shp in SHAPES.items():
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(LlamaConfig(**shp, tie_word_embeddings=False))
        n = sum(p.numel() for p in m.parameters())
        n_layers = sum(p.numel() for k, p in m.named_parameters() if ".layers." in k)
        largest = max(p.numel() for p in m.parameters())
        d, f, L, V = shp["hidden_size"], shp["intermediate_size"], shp["num_hidden_layers"], shp["vocab_size"]
        # Saved for backward per layer (bf16 weights, sdpa attention): ~ seq * (10 d + 4 f) values,
        # plus fp32 logits / log-softmax: ~ 3 * seq * vocab * 4 bytes.
        act = L * seq_len * (10 * d + 4 * f) * 2 + 3 * seq_len * V * 4
        lines.append(f"| {name} | {n / 1e9:.2f}B | {n * 4 / gib:.1f} / {n * 2 / gib:.1f} GiB | "
                     f"{n_layers * 4 / gib:.1f} GiB | {largest * 4 / gib:.2f} GiB | {act / gib:.1f} GiB |")
    lines.append("")
    lines.append("Peak = weights + accumulators (unless --accum_device cpu) + one gradient + activations: "
                 "13B in bf16 with accumulators on the GPU fits an 80 GB card only for short sequences; "
                 "fp32 weights or long sequences need --accum_device cpu (or --gradient_checkpointing).")
    return "\n".join(lines)


def main(device: str = "cpu", dry_run: bool = False, markdown: bool = False, layers: int = 8, seq_len: int = 1024,
         examples: int = 3, repeat: int = 3):
    """--dry_run prints only the memory plan; --device cuda adds the sensitivity pass (first --layers layers
    of Llama-2-13B, --seq_len tokens, accumulators on the GPU and then on the CPU)."""
    if dry_run:
        print(memory_plan_table())
        return
    res = bench_scan(repeat=repeat)
    table = scan_table(res)
    if markdown:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        print(f"\n## PostPKT (bench/bench_postpkt.py)\n\nMachine: {cpu_model()}, {torch.get_num_threads()} "
              f"threads (2 cores), torch {torch.__version__}; {date}; load average {_load()}. "
              f"`max_sum_submatrix` on random fp32 sensitivities, Llama-2 13B -> 7B block shapes.\n\n{table}\n")
    else:
        print(table)
    if device.startswith("cuda"):
        for acc in (None, "cpu"):
            r = bench_sensitivity(device, layers=layers, seq_len=seq_len, examples=examples, accum_device=acc)
            print(f"sensitivity {r['shape']} ({r['layers']} layers, bf16, seq {r['seq_len']}, accumulators on "
                  f"{r['accum']}) on {r['device']}: {r['s_per_example']:.2f} s/example "
                  f"(~{r['s_per_example_full']:.2f} s at full depth), peak {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    fire.Fire(main)
