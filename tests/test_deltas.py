"""Differentiable sparse deltas on up/v rows and down/o columns: inject, gradients, fold, save."""
import pytest
import torch
from conftest import make_llama, make_qwen2

from modeling_llama_laten import Delta, fold, inject

from pkt.model import attention_neuron_v_rows, model_shape
from pkt.io import PKTError


def _deltas(model, requires_grad=False):
    torch.manual_seed(0)
    s = model_shape(model)
    d = lambda *shape: (torch.randn(*shape) * 0.05).requires_grad_(requires_grad)
    attn_idx = torch.tensor([1, 5, 17, 30])
    return [Delta(0, "up_proj", torch.tensor([3, 9, 40]), d(3, s.hidden)),
            Delta(1, "down_proj", torch.tensor([0, 7]), d(s.hidden, 2)),
            Delta(1, "v_proj", attention_neuron_v_rows(s, attn_idx), d(4, s.hidden)),
            Delta(2, "o_proj", attn_idx, d(s.hidden, 4))]


def _hand_edited(model, deltas):
    edited = type(model)(model.config).eval()
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        for dl in deltas:
            lin = getattr(edited.model.layers[dl.layer].mlp if "up" in dl.module or "down" in dl.module
                          else edited.model.layers[dl.layer].self_attn, dl.module)
            for n, i in enumerate(dl.index.tolist()):
                if dl.rows:
                    lin.weight[i] += dl.value[n]
                else:
                    lin.weight[:, i] += dl.value[:, n]
    return edited


@pytest.mark.parametrize("build", [make_llama, make_qwen2])
def test_injected_output_equals_hand_edited_weights(build):
    model = build(hidden=64, ffn=128, layers=3, heads=4)
    deltas = _deltas(model)
    ids = torch.randint(0, 300, (2, 9))
    with inject(model, deltas):
        got = model(ids).logits
    want = _hand_edited(model, deltas)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(ids).logits, build(hidden=64, ffn=128, layers=3, heads=4)(ids).logits)


def test_gradients_reach_the_delta_source_not_the_frozen_weights():
    model = make_llama(hidden=64, ffn=128, layers=3, heads=4)
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = torch.nn.Parameter(torch.ones(()))
    deltas = [Delta(dl.layer, dl.module, dl.index, dl.value * source) for dl in _deltas(model)]
    with inject(model, deltas):
        model(torch.randint(0, 300, (1, 8))).logits.sum().backward()
    assert source.grad is not None and source.grad.abs() > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_folded_deltas_save_and_reload_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_qwen2(hidden=64, ffn=128, layers=3, heads=4, kv_heads=2)
    deltas = _deltas(model)
    ids = torch.randint(0, 300, (1, 10))
    with inject(model, deltas):
        want = model(ids).logits
    fold(model, deltas)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-4)


def test_bad_deltas_are_one_line_errors():
    model = make_llama(hidden=32, ffn=64, layers=2, heads=2)
    with pytest.raises(PKTError, match="out of range"):
        fold(model, [Delta(7, "up_proj", torch.tensor([0]), torch.zeros(1, 32))])
    with pytest.raises(PKTError, match="expected"):
        fold(model, [Delta(0, "down_proj", torch.tensor([0]), torch.zeros(1, 32))])
    with pytest.raises(PKTError, match="unknown module"):
        fold(model, [Delta(0, "gate", torch.tensor([0]), torch.zeros(1, 32))])
