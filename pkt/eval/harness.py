"""The evaluation harness: a registry of tasks that all have one shape, the protocol presets, and the
two entry points `evaluate(EvalConfig)` and `score_predictions(ScoreConfig)`.

A task is a module with
    NAME, HEADLINE (the metric key of its headline number), NEEDS_HF (logits or likelihoods: the HF model
    even when vLLM generates), and
    settings(cfg) -> dict                         the knobs it runs with, resolved (recorded in metrics.json)
    build(cfg, tokenizer) -> items                the selected examples, each with its "prompt"
    generate(items, backend, cfg) -> outputs      one raw output per item (text, n texts, logits, ...)
    score(items, outputs, cfg) -> (records, metrics)
    read(path, cfg) -> (items, outputs)           score-only: a predictions JSONL (None: not offered)
`evaluate` runs build -> generate -> score for each task; `score_predictions` runs read -> score.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from pkt.eval import gsm, humaneval, kl, mbpp, mmlu, nll
from pkt.eval.sandbox import ISOLATION_MODES, resolve_isolation
from pkt.io import (atomic_dir, check_model_path, check_output, fail, int_flag, number_flag, parse_list,
                    resolve_dtype, write_json, write_jsonl, write_text)

REGISTRY = {m.NAME: m for m in (gsm, mmlu, humaneval, mbpp, nll, kl)}
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "eval"
# Presets: open-instruct = its run_eval.py defaults; paper = the LaTen/SemAlign tables (zero-shot MMLU and
# GSM8K; code as open-instruct: pass@1 from 20 samples at temperature 0.1).
PROTOCOLS = {"open-instruct": {"gsm_shots": 8, "mmlu_shots": 5},
             "paper": {"gsm_shots": 0, "mmlu_shots": 0}}
LIMIT_MODES = ("sample", "first")
BACKENDS = ("hf", "vllm")


def _choice(value, flag: str, choices) -> None:
    if value not in choices:
        fail(f"{flag} {value!r}: expected one of {', '.join(map(str, choices))}")


class _Shared:
    """What a run and a score-only pass share; each config declares the fields data_dir, timeout, sandbox."""

    def _check_shared(self) -> None:
        if self.timeout is not None:
            number_flag(self.timeout, "--timeout", low=0.0, strict=True)
        _choice(self.sandbox, "--sandbox", ISOLATION_MODES)

    @property
    def data_root(self) -> Path:
        return Path(self.data_dir) if self.data_dir else DEFAULT_DATA_DIR


@dataclass
class EvalConfig(_Shared):
    """--model_path DIR (hub id or local) [--adapter_path LORA] --tasks gsm,mmlu,humaneval,mbpp[,nll]
    --output_dir DIR [--overwrite True]. --protocol open-instruct (default: 8-shot GSM8K, 5-shot MMLU) or paper
    (0-shot GSM8K and MMLU); --gsm_shots 0|8 and --mmlu_shots 0|5 override the preset. --limit N caps every
    task, --<task>_limit one task; --limit_mode sample (seeded draw, as open-instruct) or first.
    --mmlu_per_subject K = open-instruct's --n_instances. Code tasks: --n samples at --temperature (0 =
    greedy), --top_p (default: HumanEval 0.95, MBPP 1), --timeout s per program (default: HumanEval 3, MBPP
    10), --sandbox auto|require|off. --nll_data name=path,...: the held-out chats of the nll task and of the kl
    task (mean KL(teacher || model) on their responses, from --teacher DIR; one vocabulary; --teacher_cache DIR
    keeps the teacher's log-probs for the next model evaluated against it)."""
    model_path: str | None = None
    adapter_path: str | None = None
    tasks: str = "gsm,mmlu,humaneval,mbpp"
    output_dir: str = "results"
    overwrite: bool = False
    data_dir: str | None = None
    protocol: str = "open-instruct"
    gsm_shots: int | None = None
    mmlu_shots: int | None = None
    mmlu_per_subject: int | None = None
    use_chat_format: bool = False
    limit: int | None = None
    gsm_limit: int | None = None
    mmlu_limit: int | None = None
    humaneval_limit: int | None = None
    mbpp_limit: int | None = None
    nll_limit: int | None = None
    kl_limit: int | None = None
    limit_mode: str = "sample"
    n: int = 20
    temperature: float = 0.1
    top_p: float | None = None
    max_new_tokens: int = 512
    timeout: float | None = None
    sandbox: str = "auto"
    nll_data: str | None = None
    teacher: str | None = None
    teacher_cache: str | None = None
    batch_size: int = 8
    backend: str = "hf"
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    device: str | None = None
    seed: int = 42

    def __post_init__(self):
        self._check_shared()
        if not self.model_path:
            fail("--model_path is required (or use `evaluate.py score --task T --predictions FILE`)")
        self.task_list = parse_list(self.tasks, "--tasks", cast=lambda s: str(s).lower(), choices=tuple(REGISTRY))
        _choice(self.protocol, "--protocol", tuple(PROTOCOLS))
        preset = PROTOCOLS[self.protocol]
        self.gsm_shots = preset["gsm_shots"] if self.gsm_shots is None else self.gsm_shots
        self.mmlu_shots = preset["mmlu_shots"] if self.mmlu_shots is None else self.mmlu_shots
        _choice(self.gsm_shots, "--gsm_shots", gsm.SHOTS)
        _choice(self.mmlu_shots, "--mmlu_shots", mmlu.SHOTS)
        for flag in ("limit", *(f"{t}_limit" for t in REGISTRY), "mmlu_per_subject"):
            int_flag(getattr(self, flag), f"--{flag}", low=1, allow_none=True)
        if self.mmlu_per_subject and self.mmlu_limit:
            fail("--mmlu_per_subject and --mmlu_limit: give one of them")
        _choice(self.limit_mode, "--limit_mode", LIMIT_MODES)
        int_flag(self.n, "--n", low=1)
        number_flag(self.temperature, "--temperature", low=0.0)
        if self.top_p is not None:
            number_flag(self.top_p, "--top_p", low=0.0, strict=True, high=1.0)
        int_flag(self.max_new_tokens, "--max_new_tokens", low=1)
        int_flag(self.batch_size, "--batch_size", low=1)
        int_flag(self.seed, "--seed")
        _choice(self.backend, "--backend", BACKENDS)
        int_flag(self.tensor_parallel_size, "--tensor_parallel_size", low=1)
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            fail(f"--tensor_parallel_size {self.tensor_parallel_size} shards vLLM's engine: it needs --backend vllm")
        resolve_dtype(self.dtype)
        if self.device is not None:
            _check_device(self.device)
        for task in ("nll", "kl"):
            if task in self.task_list:
                nll.parse_nll_data(self.nll_data, task)
        if "kl" in self.task_list:
            kl.require_teacher(self)

    def limit_for(self, task: str) -> int | None:
        return getattr(self, f"{task}_limit") or self.limit

    def knobs(self) -> dict:
        """Every flag, for summary.json."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class ScoreConfig(_Shared):
    """--task gsm|mmlu|humaneval|mbpp --predictions FILE: score a predictions JSONL alone; the last printed
    line is e.g. `humaneval pass@1 = 0.1463`."""
    task: str | None = None
    predictions: str | None = None
    data_dir: str | None = None
    timeout: float | None = None
    sandbox: str = "auto"

    def __post_init__(self):
        self._check_shared()
        names = [t for t, m in REGISTRY.items() if m.read is not None]
        if not self.task:
            fail(f"--task is required ({', '.join(names)})")
        self.task = str(self.task).lower()
        _choice(self.task, "--task", names)
        if not self.predictions:
            fail("--predictions FILE is required")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        fail(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device here")


def check_inputs(cfg: EvalConfig) -> None:
    """Before anything loads: the model, the adapter, the data, an output that replaces nothing, and the
    isolation `--sandbox require` asks for."""
    check_model_path(cfg.model_path, "--model_path")
    if cfg.adapter_path and not (Path(cfg.adapter_path) / "adapter_config.json").exists():
        fail(f"--adapter_path {cfg.adapter_path}: no adapter_config.json there")
    if not cfg.data_root.is_dir():
        fail(f"--data_dir {cfg.data_root}: no such directory")
    inputs = {"--model_path": cfg.model_path, "--adapter_path": cfg.adapter_path, "--data_dir": cfg.data_dir}
    if {"nll", "kl"} & set(cfg.task_list):
        inputs.update({f"--nll_data {name}": path for name, path in nll.parse_nll_data(cfg.nll_data)})
    if "kl" in cfg.task_list:
        check_model_path(cfg.teacher, "--teacher")
        inputs["--teacher"] = cfg.teacher
    check_output(cfg.output_dir, "--output_dir", cfg.overwrite, inputs)
    if cfg.sandbox == "require" and {"humaneval", "mbpp"} & set(cfg.task_list):
        resolve_isolation("require")          # no bwrap: refused now, not after generating


def headline(task: str, metrics: dict) -> str:
    key = REGISTRY[task].HEADLINE
    return f"{task} {key} = {metrics[key]:.4f}"


def summary_markdown(summary: dict) -> str:
    """One table: task, headline metric, value, number of items; the protocol under it."""
    title = f"# Evaluation: {summary['model_path']}" + (f" + {summary['adapter_path']}" if summary.get("adapter_path") else "")
    lines = [title, "", "| task | metric | value | n |", "|---|---|---:|---:|"]
    for task, m in summary["tasks"].items():
        key = REGISTRY[task].HEADLINE
        n = m.get("n", m.get("n_tasks", m.get("n_tokens", "")))
        val = f"{m[key]:.4f}" if key in ("nll", "kl") else f"{100 * m[key]:.2f}%"
        lines.append(f"| {task} | {key} | {val} | {n} |")
    lines += ["", f"Protocol: {summary['protocol']} (each task's settings: <task>/metrics.json)."]
    return "\n".join(lines) + "\n"


def evaluate(cfg: EvalConfig) -> dict:
    """Run `cfg.task_list` on one model; write `<output_dir>/<task>/{predictions.jsonl,metrics.json}` and
    `<output_dir>/summary.{json,md}` (the whole directory appears at the end, atomically). Every task's
    items are built before the model loads (data errors first). Returns the summary."""
    import torch

    from pkt.eval.generate import load_backend, load_eval_tokenizer

    check_inputs(cfg)
    tasks = [REGISTRY[t] for t in cfg.task_list]
    tokenizer = load_eval_tokenizer(cfg.model_path, cfg.adapter_path)
    built = {t.NAME: t.build(cfg, tokenizer) for t in tasks}
    torch.manual_seed(cfg.seed)
    backend = load_backend(tokenizer, cfg.model_path, cfg.adapter_path, cfg.backend,
                           needs_hf=any(t.NEEDS_HF for t in tasks), dtype=cfg.dtype, device=cfg.device,
                           batch_size=cfg.batch_size, seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size)
    summary = {"model_path": str(cfg.model_path), "adapter_path": cfg.adapter_path, "backend": backend.name,
               "protocol": cfg.protocol, "knobs": cfg.knobs(), "tasks": {}}
    with atomic_dir(cfg.output_dir) as out:
        for task in tasks:
            t0 = time.time()
            torch.manual_seed(cfg.seed)
            items = built[task.NAME]
            records, m = task.score(items, task.generate(items, backend, cfg), cfg)
            m.update(seconds=round(time.time() - t0, 2), protocol=cfg.protocol, settings=task.settings(cfg))
            write_jsonl(out / task.NAME / "predictions.jsonl", records)
            write_json(out / task.NAME / "metrics.json", m)
            # the summary keeps the headline numbers; per-subject details live in metrics.json
            summary["tasks"][task.NAME] = {k: v for k, v in m.items() if k != "per_subject"}
            print(headline(task.NAME, m), flush=True)
        write_json(out / "summary.json", summary)
        write_text(out / "summary.md", summary_markdown(summary))
    return summary


def score_predictions(cfg: ScoreConfig) -> dict:
    """Score a predictions JSONL alone -> metrics (timeouts and sandbox as in a run)."""
    task = REGISTRY[cfg.task]
    items, outputs = task.read(cfg.predictions, cfg)
    return task.score(items, outputs, cfg)[1]

