"""SemAlign: cross-scale knowledge transfer through latent semantic alignment (Gu et al., arXiv 2510.24208).

--variant v1 (default), the method as the v1 paper publishes it (docs/semalign.md):
    semantic bases of both models (pinv of the unembedding, unit columns; cached)  -> M = S_S S_Tᵀ
    Layer Gradient x Activation on the teacher -> the --n_critical most important teacher layers
    -> the student layer(s) k† they pair with -> teacher targets M u_T/||u_T|| (u = the layer's update h_out - h_in)
    -> train only layer(s) k†: (1 - cos(u_S, target)) + (1 - cos(logits, one-hot label)), one phase
    -> a standard HF model + semalign_config.json + semalign_log.jsonl + pkt_budget.json
--variant v2: a reading of the v2 abstract (its formulas are not published), NOT the published method:
    shallow-to-deep frontier, one source layer per target layer, relation geometry + output KL.

    python train_SemAlign.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf --data_path data/gsm/gsm_train_split.jsonl \
        --output_dir outputs/semalign/gsm
    python train_SemAlign.py --dry_run True      # memory plans of both variants at 13B -> 7B, nothing loaded
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pkt.data import collate_left, load_chat_jsonl, tokenize_example
from pkt.io import (check_model_path, check_output, default_device, default_dtype, fail, int_flag, load_model,
                    load_tokenizer, number_flag, resolve_dtype, run_cli, save_model, write_jsonl)
from pkt.model import unembedding
from pkt.semalign import (ALIGN_POSITIONS, ATTRIBUTION_AT, ATTRIBUTION_REDUCES, ATTRIBUTION_SIGNS,
                          ATTRIBUTION_TOKENS, CRITICAL_PAIRINGS, LR_SCHEDULES, PAPER_V1, V2_READING, VARIANTS,
                          Budget, Schedule, alignment_map, bases_key, cached_bases, check_teacher_reads,
                          critical_layers, layer_attribution, memory_plan, n_supervised, pairing_record,
                          shared_vocab, teacher_batch, teacher_targets, train_layers, v1_micro_loss,
                          v1_pairs, v2_micro_loss, v2_pairs)

log = logging.getLogger("train_SemAlign")
CONFIG = "semalign_config.json"
LOG = "semalign_log.jsonl"
BUDGET = "pkt_budget.json"


def _choice(value, flag: str, choices) -> None:
    if value not in choices:
        fail(f"{flag} {value!r}: expected one of {', '.join(choices)}")


@dataclass
class SemAlignConfig:
    """Flags (defaults: the v1 paper's settings where it prints them, App. A; docs/semalign.md lists every
    choice the paper leaves open):

    --variant v1 | v2       v1: the published method. v2: a reading of the v2 ABSTRACT (formulas unpublished),
                            not the published method: frontier schedule, relation geometry + output KL.
    --source_model / --target_model   teacher / student (hub id or local directory).
    --data_path             chat JSONL (the *_train_split.jsonl of a task); --max_examples: the first N (all).
    --output_dir            the trained student (an existing non-empty one needs --overwrite True).
    --epochs 5, --batch_size 64 (gradient accumulation over --micro_batch_size), --learning_rate 3e-4
                            (the paper's HumanEval setting: 3 epochs, 3e-5), --max_steps N: at most N optimizer
                            steps per trained layer. AdamW, --lr_schedule linear with --warmup_ratio 0.03.
    --n_critical 1          teacher layers taken as critical (the paper's worked example has one).
    --critical_pairing      literal: the pair (l_T(k†), k†) as printed; critical: (l*, k†) (v2 always).
    --interpolate True      v1, literal pairs: blend adjacent teacher layers at k† when L_T/L_S is not an
                            integer (v2: never, one source layer per target layer).
    --attribution_*         examples (64), sign (abs | signed), reduce (mean | sum), tokens (all | supervised),
                            at (output: the layer's output h_l, as Captum on the decoder layer | update).
    --align_positions       supervised (default) | all: the positions the layer cosine averages over.
    --label_smoothing 0     of the one-hot target of the output cosine.
    --relation_weight / --kl_weight   v2 only.
    --bases_cache_dir       where the semantic bases are cached (default: <output_dir's parent>/semalign_bases).
    --dry_run True          print the memory plans (both variants) from meta-device models and exit.
    """
    variant: str = "v1"
    source_model: str = "meta-llama/Llama-2-13b-chat-hf"
    target_model: str = "meta-llama/Llama-2-7b-chat-hf"
    data_path: str = "data/gsm/gsm_train_split.jsonl"
    output_dir: str = "outputs/semalign/gsm"
    overwrite: bool = False
    max_examples: int | None = None
    cutoff_len: int = 768
    train_on_inputs: bool = False
    use_chat_template: bool = False
    epochs: int = 5
    batch_size: int = 64
    micro_batch_size: int = 4
    max_steps: int | None = None
    learning_rate: float = 3e-4
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    align_positions: str = "supervised"
    n_critical: int = 1
    critical_pairing: str = "literal"
    interpolate: bool = True
    attribution_examples: int = 64
    attribution_sign: str = "abs"
    attribution_reduce: str = "mean"
    attribution_tokens: str = "all"
    attribution_at: str = "output"
    relation_weight: float = 1.0
    kl_weight: float = 1.0
    bases_cache_dir: str | None = None
    dtype: str | None = None
    teacher_device: str | None = None
    student_device: str | None = None
    seed: int = 42
    dry_run: bool = False

    def __post_init__(self):
        _choice(self.variant, "--variant", VARIANTS)
        _choice(self.critical_pairing, "--critical_pairing", CRITICAL_PAIRINGS)
        _choice(self.attribution_sign, "--attribution_sign", ATTRIBUTION_SIGNS)
        _choice(self.attribution_reduce, "--attribution_reduce", ATTRIBUTION_REDUCES)
        _choice(self.attribution_tokens, "--attribution_tokens", ATTRIBUTION_TOKENS)
        _choice(self.attribution_at, "--attribution_at", ATTRIBUTION_AT)
        _choice(self.align_positions, "--align_positions", ALIGN_POSITIONS)
        _choice(self.lr_schedule, "--lr_schedule", LR_SCHEDULES)
        int_flag(self.max_examples, "--max_examples", 1, allow_none=True)
        int_flag(self.cutoff_len, "--cutoff_len", 2)
        int_flag(self.epochs, "--epochs", 1)
        int_flag(self.batch_size, "--batch_size", 1)
        int_flag(self.micro_batch_size, "--micro_batch_size", 1)
        int_flag(self.max_steps, "--max_steps", 1, allow_none=True)
        int_flag(self.n_critical, "--n_critical", 1)
        int_flag(self.attribution_examples, "--attribution_examples", 1)
        int_flag(self.seed, "--seed")
        number_flag(self.learning_rate, "--learning_rate", strict=True)
        number_flag(self.warmup_ratio, "--warmup_ratio", high=1, high_strict=True)
        number_flag(self.weight_decay, "--weight_decay")
        number_flag(self.max_grad_norm, "--max_grad_norm")
        number_flag(self.label_smoothing, "--label_smoothing", high=1, high_strict=True)
        number_flag(self.relation_weight, "--relation_weight")
        number_flag(self.kl_weight, "--kl_weight")
        if self.variant == "v2" and self.relation_weight == 0 and self.kl_weight == 0:
            fail("--relation_weight and --kl_weight are both 0: nothing to train")
        resolve_dtype(self.dtype)

    def schedule(self) -> Schedule:
        return Schedule(lr=self.learning_rate, epochs=self.epochs, batch_size=self.batch_size,
                        micro_batch_size=self.micro_batch_size, max_steps=self.max_steps,
                        lr_schedule=self.lr_schedule, warmup_ratio=self.warmup_ratio,
                        weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, seed=self.seed)


def _config(name: str, flag: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot read its config ({type(e).__name__}; offline without a cached copy?)")


# ------------------------------------------------------------------------------------- dry run
def plan_config(name: str, flag: str):
    """A model's config for a plan, without weights: a local model/config directory, else a Llama-2 shape
    named in the hub id (pkt.testing.LLAMA2_SHAPES: works offline), else the hub's config."""
    from transformers import LlamaConfig

    from pkt.testing import LLAMA2_SHAPES

    check_model_path(name, flag)
    if not Path(name).expanduser().is_dir():
        for key, shape in LLAMA2_SHAPES.items():
            if key in name.lower():
                return LlamaConfig(**shape)
    return _config(name, flag)


def print_memory_plans(cfg: SemAlignConfig, budget_gb: float = 75.0) -> dict:
    """The memory plan of both variants on one GPU from meta-device models (nothing loaded, nothing written)."""
    from transformers import AutoModelForCausalLM

    models = {}
    for flag, name in (("--source_model", cfg.source_model), ("--target_model", cfg.target_model)):
        with torch.device("meta"):
            models[flag] = AutoModelForCausalLM.from_config(plan_config(name, flag))
    teacher, student = models["--source_model"], models["--target_model"]
    n = lambda m: sum(p.numel() for p in m.parameters())
    n_layer = sum(p.numel() for p in student.model.layers[0].parameters())
    dtype = resolve_dtype(cfg.dtype or "bf16")
    param_bytes = 4 if dtype == torch.float32 else 2
    gib = 2 ** 30
    plans = {}
    for variant in VARIANTS:
        plan = memory_plan(variant, teacher.config, student.config, cfg.micro_batch_size, cfg.cutoff_len,
                           param_bytes, n(teacher), n(student), n_layer, cfg.n_critical if variant == "v1" else 1)
        plans[variant] = plan
        label = "the published method" if variant == "v1" else "a reading of the v2 abstract"
        mark = " (selected)" if variant == cfg.variant else ""
        print(f"\nSemAlign {variant}{mark}, {label}: {cfg.source_model} -> {cfg.target_model}, micro-batch "
              f"{cfg.micro_batch_size} x {cfg.cutoff_len} tokens, {'fp32' if param_bytes == 4 else 'bf16'} weights\n")
        print("| phase | item | GiB | note |\n|---|---|---:|---|")
        for phase, item, b, note in plan["rows"]:
            print(f"| {phase} | {item} | {b / gib:.2f} | {note} |")
        parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in plan["phases"].items())
        print(f"| | **peak (estimate)** | **{plan['peak'] / gib:.2f}** | {parts}; target <= {budget_gb:.0f} GiB "
              f"on one 80 GB GPU |")
    return plans


# -------------------------------------------------------------------------------------- training
def _summary(history: list[dict], keys) -> dict:
    return {k: {"first": history[0][k], "last": history[-1][k]} for k in keys if history and k in history[0]}


def train(cfg: SemAlignConfig):
    """Run SemAlign (see --help) and save the student to --output_dir; --dry_run prints the memory plans."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.dry_run:
        print_memory_plans(cfg)
        return
    # ---- everything checked before a model loads or a byte is written
    out = Path(check_output(cfg.output_dir, "--output_dir", cfg.overwrite,
                            inputs={"--source_model": cfg.source_model, "--target_model": cfg.target_model,
                                    "--data_path": cfg.data_path}))
    check_model_path(cfg.source_model, "--source_model")
    check_model_path(cfg.target_model, "--target_model")
    t_cfg, s_cfg = _config(cfg.source_model, "--source_model"), _config(cfg.target_model, "--target_model")
    L_T, L_S = t_cfg.num_hidden_layers, s_cfg.num_hidden_layers
    if cfg.n_critical > L_T:
        fail(f"--n_critical {cfg.n_critical}: the teacher has only {L_T} layers")
    records = load_chat_jsonl(cfg.data_path)[:cfg.max_examples]
    t_tok, s_tok = load_tokenizer(cfg.source_model), load_tokenizer(cfg.target_model)
    vocab = shared_vocab(t_tok, s_tok, t_cfg.vocab_size, s_cfg.vocab_size)
    log.info("shared vocabulary: %d tokens aligned; %d teacher-only token(s) dropped %s, %d student-only "
             "token(s) dropped %s", vocab.size, len(vocab.teacher_only), vocab.teacher_only[:5],
             len(vocab.student_only), vocab.student_only[:5])
    examples, ids = [], []
    for r in records:
        ex = tokenize_example(s_tok, r["messages"], cfg.cutoff_len, cfg.train_on_inputs,
                              use_chat_template=cfg.use_chat_template)
        if n_supervised(ex):
            examples.append(ex)
            ids.append(r.get("id"))
    if len(examples) < len(records):
        log.warning("%d example(s) have no supervised token within --cutoff_len %d: skipped",
                    len(records) - len(examples), cfg.cutoff_len)
    if not examples:
        fail(f"{cfg.data_path}: no example has a supervised token within --cutoff_len {cfg.cutoff_len}")
    check_teacher_reads(examples, vocab, s_tok, cfg.data_path)
    sched = cfg.schedule()
    per_epoch, steps = sched.steps(len(examples))

    # ---- models
    torch.manual_seed(cfg.seed)
    t_dev, s_dev = cfg.teacher_device or default_device(), cfg.student_device or default_device()
    dtype = cfg.dtype or default_dtype(s_dev)
    teacher = load_model(cfg.source_model, dtype, t_dev, "--source_model").requires_grad_(False)
    student = load_model(cfg.target_model, dtype, s_dev, "--target_model").requires_grad_(False)
    budget = Budget(examples=len(examples))
    pad = s_tok.pad_token_id
    t0 = time.time()

    # ---- 1-2. semantic bases (cached per model) and the fixed map M = S_S S_Tᵀ
    cache_dir = Path(cfg.bases_cache_dir) if cfg.bases_cache_dir else out.parent / "semalign_bases"
    keys = {"teacher": bases_key(unembedding(teacher)), "student": bases_key(unembedding(student))}
    S_T, S_S = cached_bases(teacher, cache_dir, keys["teacher"]), cached_bases(student, cache_dir, keys["student"])
    M = alignment_map(S_T, S_S, vocab)
    del S_T, S_S
    t_bases = time.time() - t0

    # ---- 3. attribution on the teacher, 4. pairing
    n_attr = min(cfg.attribution_examples, len(examples))
    attr_batches = [teacher_batch(collate_left(examples[i:i + cfg.micro_batch_size], pad), vocab)
                    for i in range(0, n_attr, cfg.micro_batch_size)]
    scores = layer_attribution(teacher, attr_batches, cfg.attribution_sign, cfg.attribution_reduce,
                               cfg.attribution_tokens, cfg.attribution_at, budget=budget)
    critical = critical_layers(scores, cfg.n_critical)
    if cfg.variant == "v1":
        pairs = v1_pairs(L_T, L_S, critical, cfg.critical_pairing, cfg.interpolate)
    else:
        pairs = v2_pairs(L_T, L_S, critical)
    log.info("attribution over %d examples: critical teacher layer(s) %s; pairs %s", n_attr, critical,
             [(p.student, p.teacher) if p.a == p.b else (p.student, p.teacher, p.a, p.b, round(p.lam, 4))
              for p in pairs])
    t_attr = time.time() - t0 - t_bases

    # ---- 5. training
    history: list[dict] = []
    if cfg.variant == "v1":
        targets = teacher_targets(teacher, examples, pairs, M, cfg.micro_batch_size, pad, cfg.align_positions,
                                  vocab, student.dtype, budget)
        del teacher, M                      # v1 needs nothing more from the teacher
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        layers = [p.student - 1 for p in pairs]
        log.info("v1: training student layer(s) %s (1-based) for %d steps of %d examples (%d per epoch)",
                 [p.student for p in pairs], steps, cfg.batch_size, per_epoch)
        history = train_layers(student, examples, layers,
                               v1_micro_loss(student, pairs, targets, cfg.align_positions, cfg.label_smoothing),
                               sched, pad, cfg.align_positions, budget, desc="SemAlign v1")
    else:
        log.info("v2 (%s): %d frontier stages x %d steps", V2_READING, len(pairs), steps)
        for p in pairs:
            loss_fn = v2_micro_loss(teacher, student, p, M, vocab, cfg.relation_weight, cfg.kl_weight, budget)
            for rec in train_layers(student, examples, [p.student - 1], loss_fn, sched, pad, "all", budget,
                                    desc=f"SemAlign v2 layer {p.student}", extra={"stage": p.student,
                                                                                  "teacher_layer": p.teacher}):
                rec["stage_step"], rec["step"] = rec["step"], len(history) + 1
                history.append(rec)
    t_train = time.time() - t0 - t_bases - t_attr

    # ---- save: a standard HF model directory (refused when a weight is non-finite)
    config = {
        "method": "SemAlign", "variant": cfg.variant, "paper": PAPER_V1 if cfg.variant == "v1" else V2_READING,
        "source_model": cfg.source_model, "target_model": cfg.target_model, "data_path": str(cfg.data_path),
        "examples": len(examples), "example_ids": ids, "attribution_examples": n_attr,
        "layers": "1-based as in the paper: layer d = model.layers[d-1], its output = depth d",
        "teacher_layers": L_T, "student_layers": L_S, "vocabulary": vocab.record(),
        "semantic_bases": {"cache_dir": str(cache_dir), "sha256": keys},
        "attribution_scores": [float(s) for s in scores], "critical_teacher_layers": critical,
        "pairing": pairing_record(pairs), "trained_student_layers": sorted({p.student for p in pairs}),
        "steps_per_trained_layer": steps, "losses": _summary(history, ("loss", "layer_loss", "out_loss",
                                                                        "relation_loss", "kl_loss")),
        "hyperparameters": {**asdict(cfg), "dtype": str(dtype), "optimizer": "AdamW (0.9, 0.999)"},
        "seconds": {"bases": round(t_bases, 2), "attribution": round(t_attr, 2), "training": round(t_train, 2)},
    }
    save_model(student, out, s_tok, files={CONFIG: config, BUDGET: budget.record()})
    write_jsonl(out / LOG, history)
    log.info("saved %s (%d optimizer steps, %.1fs)", out, budget.optimizer_steps, time.time() - t0)


if __name__ == "__main__":
    run_cli(train, SemAlignConfig)
