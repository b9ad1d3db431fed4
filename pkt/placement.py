"""Where a model's parts live: `--teacher_device auto` places a teacher larger than one GPU across the visible
GPUs with accelerate's device map (the CPU as a last resort), and `python -m pkt.placement` prints such a
plan from meta-device models (nothing loaded, no GPU needed).

    python -m pkt.placement --source_model llama-2-70b --target_model llama-2-13b --gpus 2 --gpu_memory 80GB

How a placed model runs: accelerate's hooks move each decoder layer's inputs to the device its weights are
on. Modules that do not fit on the GPUs stay on the CPU *and compute there* (not accelerate's default
"offload", which keeps their weights on the meta device and streams them to a GPU per forward): the
sensitivity pass needs real parameters to collect gradients into, and extraction and attribution read the
weights directly. CPU layers are slow (a 70B layer is ~1.8 GFLOP per token), so the plan says how many land
there. Disk offload is refused.

`main_device(model)` is where a placed model's inputs go and where read-outs over its hidden states run (the
first GPU of the map); the hooks in `modeling_llama_laten.trace`, `pkt.attribution` and
`pkt.postpkt.sensitivity` move what they collect there.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from pkt.io import fail, run_cli

GiB = 1 << 30
# What a card sold as "80 GB" reports (H100/A100 80GB: torch.cuda.get_device_properties().total_memory).
GPU_80GB = 85_520_809_984
# Kept free on every GPU for the CUDA context, allocator fragmentation and small transients.
HEADROOM = 3 * GiB


def element_size(dtype) -> int:
    """Bytes per weight of a `--dtype` value ('auto': 2, what released checkpoints are saved in)."""
    from pkt.io import resolve_dtype

    dt = resolve_dtype(dtype, "cuda")
    return 2 if dt == "auto" else torch.empty(0, dtype=dt).element_size()


@contextlib.contextmanager
def _quiet(name: str):
    """accelerate warns about GPUs a plan names that this machine lacks (plans for another machine), and about
    'offloaded' weights after `compute_where_placed` (they are not: they compute on the CPU)."""
    lg = logging.getLogger(name)
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def visible_gpus() -> dict[int, int]:
    """{cuda index: total bytes} of the visible GPUs ({} without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {i: torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())}


def free_cpu_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def device_index(device) -> int | None:
    """The cuda index of `device` ('cuda' = 0), None for the CPU."""
    d = torch.device(device)
    return (d.index or 0) if d.type == "cuda" else None


def max_memory(gpus: dict[int, int], cpu: int, reserve: dict[int, int] | None = None, headroom: int = HEADROOM,
               weight_share: float = 1.0) -> dict:
    """accelerate's `max_memory` for a teacher: per GPU `(total - headroom - reserve[gpu]) * weight_share`
    bytes, the CPU 90 % of `cpu`. `reserve`: bytes other things need on a GPU (the student, LaTen's
    translator...); `weight_share`: the part of the rest the weights may take when per-parameter state lives
    next to them (PostPKT's fp32 sensitivity accumulators: bf16 weights get 2 / (2 + 4) of it)."""
    reserve = reserve or {}
    out = {i: max(0, int((total - headroom - reserve.get(i, 0)) * weight_share)) for i, total in gpus.items()}
    out["cpu"] = int(cpu * 0.9)
    return out


def beside_student(student_device, student_bytes) -> dict:
    """`max_memory` for a teacher placed with `--teacher_device auto` next to a student: every visible GPU and
    the CPU, the student's GPU (when it is one of them) keeping `student_bytes()` (called only then: it builds
    meta models) for the student's own work."""
    gpus, idx = visible_gpus(), device_index(student_device)
    reserve = {idx: student_bytes()} if idx in gpus else {}
    return max_memory(gpus, free_cpu_memory(), reserve=reserve)


def plan_device_map(model, budget: dict, dtype) -> dict:
    """accelerate's `infer_auto_device_map` of `model` (a meta-device model is enough) in `dtype` under
    `budget`, decoder layers never split. Disk offload is refused with a one-line error."""
    from accelerate import infer_auto_device_map

    no_split = list(model._no_split_modules or [])
    with _quiet("accelerate.utils.modeling"):
        dm = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in dm.values():
        need = sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()
        have = sum(budget.values())
        fail(f"the teacher ({need / GiB:.1f} GiB in {str(dtype).replace('torch.', '')}) does not fit the GPUs and "
             f"the CPU memory available ({have / GiB:.1f} GiB): more GPUs or memory needed (disk offload is refused)")
    return dm


def main_device(model) -> torch.device:
    """Where a model's inputs go and read-outs over its hidden states run: the first GPU of a placed model's
    device map (the CPU when all of it is there), else the device of its LM head."""
    dm = getattr(model, "hf_device_map", None)
    if dm and len(set(dm.values())) > 1:
        gpus = [d for d in dm.values() if d not in ("cpu", "disk")]
        return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0]) if gpus else torch.device("cpu")
    return model.get_output_embeddings().weight.device


def compute_where_placed(model, device_map: dict) -> None:
    """Make the CPU entries of a dispatched model compute on the CPU with real weights (see the module
    docstring). transformers dispatches with the first GPU as the execution device of CPU modules, which
    moves their weights to the meta device; remove those hooks (they put the weights back) and dispatch
    again with the CPU as the main device, which accelerate then treats as a placement, not an offload."""
    values = set(device_map.values())
    if "cpu" not in values or values == {"cpu"}:
        return
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    with _quiet("accelerate.big_modeling"):
        dispatch_model(model, device_map, main_device="cpu",
                       skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.hf_device_map = dict(device_map)


def load_auto(name_or_path, dtype, budget: dict | None = None, attn_implementation=None):
    """`AutoModelForCausalLM` placed by `plan_device_map` over the visible GPUs and the CPU (`budget`:
    accelerate's max_memory; default `max_memory(visible_gpus(), free_cpu_memory())`)."""
    from transformers import AutoModelForCausalLM

    from pkt.io import meta_model, resolve_dtype

    dtype = resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = getattr(meta_model(name_or_path).config, "dtype", None) or torch.float32
    budget = budget if budget is not None else max_memory(visible_gpus(), free_cpu_memory())
    dm = plan_device_map(meta_model(name_or_path), budget, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, device_map=dm, **extra)
    compute_where_placed(model, dm)
    model.hf_device_map = dict(dm)
    return model.eval()


# ---------------------------------------------------------------------------------------------- plans
def placement_rows(model, device_map: dict, dtype) -> list[dict]:
    """Per device of the map: its decoder layers (first-last), other modules, and the bytes of its weights."""
    import re

    size = torch.empty(0, dtype=dtype).element_size()
    rows: dict = {}
    for name, p in model.named_parameters():
        key = max((k for k in device_map if name == k or name.startswith(k + ".") or k == ""), key=len)
        dev = device_map[key]
        r = rows.setdefault(dev, {"device": dev, "bytes": 0, "layers": set(), "modules": set()})
        r["bytes"] += p.numel() * size
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m:
            r["layers"].add(int(m.group(1)))
        else:
            r["modules"].add(name.rsplit(".", 1)[0])
    order = sorted(rows, key=lambda d: (d == "cpu", str(d)))
    return [rows[d] for d in order]


def _layers(r) -> str:
    if not r["layers"]:
        return "-"
    lo, hi = min(r["layers"]), max(r["layers"])
    return f"{lo}-{hi} ({len(r['layers'])})"


def _config_model(name: str):
    """A meta-device model from a Llama-2 shape name (`llama-2-70b`...) or a model/config directory."""
    from pkt.testing import LLAMA2_SHAPES

    if name in LLAMA2_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**LLAMA2_SHAPES[name], tie_word_embeddings=False))
    from pkt.io import meta_model

    return meta_model(name, "--model")


@dataclass
class PlanConfig:
    """Print where `--teacher_device auto` would put --source_model, from meta-device models: --gpus GPUs of
    --gpu_memory each (default: the visible ones) and --cpu_memory of RAM. --pipeline laten: the student and its
    translator training on GPU 0 (`pkt.laten.student_reserve`); postpkt: the sensitivity pass of
    extract_lora_with_sensitivity.py --device auto at --cutoff_len (--accum_device gpu|cpu). Models: a Llama-2
    shape name (llama-2-7b, llama-2-13b, llama-2-70b) or a model/config directory."""
    source_model: str = "llama-2-70b"
    target_model: str = "llama-2-13b"
    pipeline: str = "laten"
    gpus: int | None = None
    gpu_memory: str = "80GB"
    cpu_memory: str = "1000GiB"
    cutoff_len: int = 768
    dtype: str = "bf16"
    accum_device: str = "gpu"

    def __post_init__(self):
        if self.pipeline not in ("laten", "postpkt"):
            fail(f"--pipeline {self.pipeline!r}: expected laten or postpkt")
        if self.accum_device not in ("gpu", "cpu"):
            fail(f"--accum_device {self.accum_device!r}: expected gpu or cpu")
        if self.gpus is not None and self.gpus < 1:
            fail(f"--gpus {self.gpus}: expected an integer >= 1")


def _bytes(text: str, flag: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    if str(text).upper() == "80GB":
        return GPU_80GB
    try:
        return convert_file_size_to_int(str(text))
    except ValueError:
        fail(f"{flag} {text!r}: expected a size such as 80GB or 79GiB")


def plan(cfg: PlanConfig) -> dict:
    """The plan as a dict (printed as a table by `print_plan`)."""
    from pkt.io import resolve_dtype
    from pkt.model import model_shape

    dtype = resolve_dtype(cfg.dtype)
    teacher, student = _config_model(cfg.source_model), _config_model(cfg.target_model)
    size = torch.empty(0, dtype=dtype).element_size()
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    gpus = ({i: _bytes(cfg.gpu_memory, "--gpu_memory") for i in range(cfg.gpus)} if cfg.gpus is not None
            else visible_gpus())
    if not gpus:
        fail("no GPU visible: give --gpus N (and --gpu_memory) to plan for a machine")
    cpu = _bytes(cfg.cpu_memory, "--cpu_memory")
    reserve = {}
    if cfg.pipeline == "laten":
        from pkt.laten import student_reserve

        reserve = {0: student_reserve(teacher, student, size)}
        budget = max_memory(gpus, cpu, reserve)
        what = "student + translator training (pkt.laten.memory_plan)"
    else:   # PostPKT: only the teacher is loaded; fp32 accumulators sit next to every weight
        from pkt.postpkt import sensitivity_budget

        budget = sensitivity_budget(model_shape(teacher), size, cfg.cutoff_len, False, cfg.accum_device != "cpu",
                                    gpus, cpu)
        what = "one example's activations" + (" + fp32 accumulators" if cfg.accum_device != "cpu" else "")
    dm = plan_device_map(teacher, budget, dtype)
    rows = placement_rows(teacher, dm, dtype)
    for r in rows:             # what else each GPU holds
        if r["device"] == "cpu":
            r["also"] = 0
        elif cfg.pipeline == "laten":
            r["also"] = reserve.get(r["device"], 0)
        else:
            from pkt.postpkt import activation_bytes

            acc = r["bytes"] // size * 4 if cfg.accum_device != "cpu" else 0
            r["also"] = acc + activation_bytes(model_shape(teacher), size, cfg.cutoff_len) // len(gpus)
    cpu_layers = next((len(r["layers"]) for r in rows if r["device"] == "cpu"), 0)
    per_layer_flop = 2 * sum(p.numel() for p in teacher.model.layers[0].parameters())
    return {"cfg": cfg, "teacher_params": n_t, "student_params": n_s, "gpus": gpus, "reserve_what": what,
            "rows": rows, "device_map": dm, "cpu_layers": cpu_layers, "cpu_flop_per_token": cpu_layers * per_layer_flop,
            "dtype": dtype}


def print_plan(p: dict) -> None:
    cfg = p["cfg"]
    n = len(p["gpus"])
    print(f"placement plan ({cfg.pipeline}): {cfg.source_model} ({p['teacher_params'] / 1e9:.2f} B params) -> "
          f"{cfg.target_model} ({p['student_params'] / 1e9:.2f} B) on {n} x "
          f"{next(iter(p['gpus'].values())) / GiB:.1f} GiB, {str(p['dtype']).replace('torch.', '')}")
    print("| device | teacher layers | other teacher modules | teacher GiB | also on it | total GiB | capacity GiB |")
    print("|---|---|---|---:|---|---:|---:|")
    for r in p["rows"]:
        dev = r["device"]
        cap = p["gpus"].get(dev) if dev != "cpu" else None
        other = r["also"]
        also = [f"{other / GiB:.1f} GiB {p['reserve_what']}"] if other else []
        mods = ", ".join(sorted(m.replace("model.", "") for m in r["modules"])) or "-"
        name = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        print(f"| {name} | {_layers(r)} | {mods} | {r['bytes'] / GiB:.1f} | {'; '.join(also) or '-'} | "
              f"{(r['bytes'] + other) / GiB:.1f} | {cap / GiB:.1f} |" if cap else
              f"| {name} | {_layers(r)} | {mods} | {r['bytes'] / GiB:.1f} | computes there (slow) | "
              f"{r['bytes'] / GiB:.1f} | - |")
    if p["cpu_layers"]:
        print(f"{p['cpu_layers']} teacher layers compute on the CPU: {p['cpu_flop_per_token'] / 1e9:.0f} GFLOP per "
              f"token of every teacher forward (~{p['cpu_flop_per_token'] * 512 / 1e12:.1f} TFLOP per 512 tokens, "
              "e.g. one LaTen locate): more GPUs remove it.")
    else:
        print("the teacher fits the GPUs: nothing on the CPU.")


def main(cfg: PlanConfig) -> dict:
    p = plan(cfg)
    print_plan(p)
    return p


if __name__ == "__main__":
    run_cli(main, PlanConfig)
