"""Fuse a trained LaTen translator into the student: one saved HF model per (transfer rate, step).

    seed example (random.seed(seed) over the train split) -> locate layers once (teacher and student)
    for each transfer rate: locate neurons at that rate in the fixed layers, extract the teacher's slices
        for each translator step: translate (no grad) -> fold the deltas into a fresh student -> save

Unlike the reference (which keeps the deltas as module attributes, so `save_pretrained` wrote the unchanged
student), the deltas are folded into the saved weights: the saved model is the transferred model.

    python inference_LaTen.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf --data_path data/gsm/gsm_train_split.jsonl \
        --translator_checkpoints knowledge_translator/gsm --transfer_rates '[0.1]' --steps '[19]'
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from knowledge_translator import KnowledgeTranslator
from modeling_llama_laten import fold
from pkt.model import attention_neuron_v_rows, linear, TRANSFER_MODULES
from pkt.data import load_chat_jsonl
from pkt.io import atomic_dir, check_model_path, fail, run_cli, write_json
from pkt.transfer import deltas_for, extract, neuron_counts, translate
from train_LaTen import load_models, locate_pair

log = logging.getLogger("inference_LaTen")


def _as_list(x, flag, cast):
    if isinstance(x, str):
        x = [s for s in x.strip("[]()").split(",") if s.strip()]
    elif not isinstance(x, (list, tuple)):
        x = [x]
    try:
        out = [cast(v) for v in x]
    except (TypeError, ValueError):
        fail(f"{flag} {x!r}: expected a list of numbers")
    if not out:
        fail(f"{flag} is empty")
    return out


@torch.no_grad()
def restore(student, pristine) -> None:
    for (layer, module), w in pristine.items():
        linear(student, layer, module).weight.copy_(w)


def rate_name(rate: float) -> str:
    """The reference's `rate * 100` naming (10.0%), rounded so 0.3 gives 30.0 and not 30.000000000000004."""
    return f"{round(rate * 100, 6)}"


def main(
    source_model: str = "meta-llama/Llama-2-13b-chat-hf",
    target_model: str = "meta-llama/Llama-2-7b-chat-hf",
    data_path: str = "data/gsm/gsm_train_split.jsonl",
    translator_checkpoints: str = "knowledge_translator/gsm",
    transfer_rates=(0.1,),
    steps=(19,),
    seed: int = 42,
    output_dir: str = "outputs/laten",
    dtype: str | None = None,
    precision: str = "fp32",
    teacher_device: str | None = None,
    student_device: str | None = None,
    use_chat_template: bool = False,
):
    """Writes <output_dir>/<target name>-transfer_rate<rate*100>%-step<step>/ (model, tokenizer,
    laten_transfer.json) for every rate and step; returns the list of written directories."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rates = _as_list(transfer_rates, "--transfer_rates", float)
    steps = _as_list(steps, "--steps", int)
    for r in rates:
        if not 0 < r <= 1:
            fail(f"--transfer_rates: {r} must be in (0, 1]")
    if precision not in ("fp32", "reference"):
        fail(f"--precision {precision}: expected fp32 or reference")
    data = load_chat_jsonl(data_path)
    ckpts = {s: Path(translator_checkpoints) / f"checkpoint_{s}" for s in steps}
    for s, p in ckpts.items():
        if not (p / "translator.safetensors").is_file():
            fail(f"--translator_checkpoints {translator_checkpoints}: no checkpoint_{s}/translator.safetensors")
    check_model_path(source_model, "--source_model")
    check_model_path(target_model, "--target_model")

    teacher, student, t_tok, s_tok, t_shape, s_shape, student_device = load_models(
        source_model, target_model, dtype, teacher_device, student_device)
    translators = {s: KnowledgeTranslator.load(p, device=student_device).eval() for s, p in ckpts.items()}
    for s, tr in translators.items():
        if (tr.d_T, tr.d_S) != (t_shape.hidden, s_shape.hidden):
            fail(f"checkpoint_{s}: translator maps {tr.d_T} -> {tr.d_S}, the models need "
                 f"{t_shape.hidden} -> {s_shape.hidden}")
    # The student's editable weights as loaded (a CPU copy): every (rate, step) starts from them, so
    # transfers never compound.
    pristine = {(l, m): linear(student, l, m).weight.detach().to("cpu", copy=True)
                for l in range(s_shape.layers) for m in TRANSFER_MODULES}

    random.seed(seed)
    idx = random.sample(range(len(data)), 1)[0]
    rec = data[idx]
    example_id = rec.get("id", f"train:{idx}")
    # layers once (at the first rate; layer scores do not depend on k), then neurons per rate in those layers
    layer_sel = locate_pair(teacher, t_tok, student, s_tok, rec["messages"], rates[0], precision, use_chat_template)
    written = []
    for rate in rates:
        neuron_counts(s_shape, rate)
        t_sel, s_sel = locate_pair(teacher, t_tok, student, s_tok, rec["messages"], rate, precision,
                                   use_chat_template, layers=layer_sel)
        for step, translator in translators.items():
            modules = translator.modules_
            with torch.no_grad():
                knowledge = {m: v.to(student_device) for m, v in extract(teacher, t_sel, modules).items()}
                deltas = deltas_for(s_sel, translate(translator, knowledge), s_shape)
            restore(student, pristine)
            fold(student, deltas)
            name = f"{Path(str(target_model).rstrip('/')).name}-transfer_rate{rate_name(rate)}%-step{step}"
            out = Path(output_dir) / name
            with atomic_dir(out) as tmp:
                student.save_pretrained(tmp)
                s_tok.save_pretrained(tmp)
                write_json(tmp / "laten_transfer.json", {
                    "source_model": source_model, "target_model": target_model, "step": step,
                    "transfer_rate": rate, "seed": seed, "seed_example_id": example_id,
                    "teacher_ffn_layers": list(t_sel.ffn_layers), "student_ffn_layers": list(s_sel.ffn_layers),
                    "teacher_attn_layers": list(t_sel.attn_layers), "student_attn_layers": list(s_sel.attn_layers),
                    "student_ffn_neurons": s_sel.ffn_neurons.tolist(),
                    "student_attn_neurons": s_sel.attn_neurons.tolist(),
                    "student_v_rows": attention_neuron_v_rows(s_shape, s_sel.attn_neurons.long()).tolist(),
                    "intermediate_size": s_shape.ffn, "hidden_size": s_shape.hidden, "modules": list(modules),
                    "translator_checkpoint": str(ckpts[step]), "precision": precision})
            log.info("saved %s", out)
            written.append(str(out))
    restore(student, pristine)
    return written


if __name__ == "__main__":
    run_cli(main)
