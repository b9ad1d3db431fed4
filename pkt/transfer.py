"""LaTen's extract -> translate -> inject plumbing, as plain functions over tensors.

The teacher's located neurons are cut out of its weights (`extract`), mapped to the student's width by
the knowledge translator (`translate`), and turned into sparse deltas on the student's located neurons
(`deltas_for`): the i-th kept teacher layer feeds the i-th kept student layer and, within a layer, the
i-th teacher neuron by rank lands on the i-th student neuron by rank.
"""
from __future__ import annotations

import logging

import torch

from modeling_llama_laten import Delta

from pkt.model import attention_neuron_v_rows, linear, model_shape, Shape
from pkt.io import fail

log = logging.getLogger("pkt.transfer")

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
FFN_MODULES = ("up_proj", "down_proj")
ATTN_MODULES = ("v_proj", "o_proj")
MSE_WEIGHT = 1000.0


def parse_modules(modules) -> list[str]:
    """`--lora_target_modules` as a list or a comma string -> validated module list (order kept)."""
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.strip("[]()").split(",")]
    modules = [str(m).strip().strip("'\"") for m in modules if str(m).strip()]
    if not modules:
        fail("--lora_target_modules is empty: expected some of " + ", ".join(MODULES))
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        fail(f"unknown module(s) {', '.join(unknown)} in --lora_target_modules: expected some of {', '.join(MODULES)}")
    return list(dict.fromkeys(modules))


def neuron_counts(student_shape: Shape, transfer_rate: float) -> tuple[int, int]:
    """(ffn_k, attn_k) = int(student ffn * rate), int(student hidden * rate), as the reference."""
    if not 0 < float(transfer_rate) <= 1:
        fail(f"--transfer_rate {transfer_rate}: must be in (0, 1]")
    ffn_k, attn_k = int(student_shape.ffn * transfer_rate), int(student_shape.hidden * transfer_rate)
    if ffn_k < 1 or attn_k < 1:
        fail(f"--transfer_rate {transfer_rate} selects no neurons (ffn_k={ffn_k}, attn_k={attn_k})")
    return ffn_k, attn_k


def check_pair(teacher_shape: Shape, student_shape: Shape, ffn_k: int, attn_k: int) -> None:
    """The teacher must have as many layers as the student (all student layers are used) and enough
    neurons for k; a teacher narrower than the student works (the translator maps d_T -> d_S) but is
    unusual, so it is logged."""
    if teacher_shape.layers < student_shape.layers:
        fail(f"the teacher has {teacher_shape.layers} layers, fewer than the student's {student_shape.layers}: "
             "LaTen maps one kept teacher layer to every student layer")
    if teacher_shape.ffn < ffn_k or teacher_shape.attn_neurons < attn_k:
        fail(f"the teacher has {teacher_shape.ffn} FFN / {teacher_shape.attn_neurons} attention neurons per layer, "
             f"fewer than the {ffn_k} / {attn_k} to transfer: lower --transfer_rate")
    if student_shape.attn_neurons < attn_k:
        fail(f"the student has {student_shape.attn_neurons} attention neurons per layer, fewer than {attn_k}")
    if teacher_shape.hidden < student_shape.hidden or teacher_shape.ffn < student_shape.ffn:
        log.warning("teacher (hidden %d, ffn %d) is narrower than the student (hidden %d, ffn %d): allowed, "
                    "the translator maps %d -> %d", teacher_shape.hidden, teacher_shape.ffn, student_shape.hidden,
                    student_shape.ffn, teacher_shape.hidden, student_shape.hidden)


def _layers_neurons(selection, module: str) -> tuple[list[int], torch.Tensor]:
    if module in FFN_MODULES:
        return list(selection.ffn_layers), selection.ffn_neurons
    return list(selection.attn_layers), selection.attn_neurons


def _index(shape: Shape, module: str, neurons: torch.Tensor) -> torch.Tensor:
    """Weight rows/columns of ranked neurons: v_proj rows are GQA-mapped, everything else is identity."""
    neurons = neurons.long()
    return attention_neuron_v_rows(shape, neurons) if module == "v_proj" else neurons


@torch.no_grad()
def extract(model, selection, modules) -> dict[str, torch.Tensor]:
    """Weight slices of the selected neurons, per kept layer in selection order, neurons in rank order.

    up_proj / v_proj rows -> `[n_layers, k, d]`; down_proj / o_proj columns -> `[n_layers, d, k]`
    (d = the model's hidden size), in the model's dtype and on its device. Detached copies.
    """
    shape = model_shape(model)
    out = {}
    for m in modules:
        layers, neurons = _layers_neurons(selection, m)
        slices = []
        for i, layer in enumerate(layers):
            w = linear(model, layer, m).weight
            index = _index(shape, m, neurons[i]).to(w.device)
            slices.append(w.index_select(0 if m in ("up_proj", "v_proj") else 1, index))
        out[m] = torch.stack(slices).clone()
    return out


def translate(translator, extracted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Teacher slices (`[n, k, d_T]` / `[n, d_T, k]`) -> student slices (`[n, k, d_S]` / `[n, d_S, k]`), fp32.
    Differentiable in the translator's parameters (wrap in `torch.no_grad()` for inference)."""
    return translator(extracted)


def deltas_for(student_selection, translated: dict[str, torch.Tensor], student_shape: Shape) -> list[Delta]:
    """Sparse deltas placing translated slice i of kept layer j on the student's i-th ranked neuron of its
    j-th kept layer (FFN modules: ffn_layers/ffn_neurons; attention: attn_layers/attn_neurons; v rows via the
    GQA map, where shared rows add up). Values keep their graph to the translator."""
    deltas = []
    for m, value in translated.items():
        layers, neurons = _layers_neurons(student_selection, m)
        if value.shape[0] != len(layers):
            fail(f"{m}: {value.shape[0]} translated layers for {len(layers)} kept student layers")
        for j, layer in enumerate(layers):
            deltas.append(Delta(layer=layer, module=m, index=_index(student_shape, m, neurons[j]).cpu(),
                                value=value[j]))
    return deltas


def mse_penalty(translated: dict[str, torch.Tensor], weight: float = MSE_WEIGHT) -> torch.Tensor:
    """The reference's regulariser `1000 * sum over modules of mean(translated ** 2)` (MSE against 0)."""
    return weight * sum(t.float().pow(2).mean() for t in translated.values())
