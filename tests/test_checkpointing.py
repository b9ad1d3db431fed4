"""LaTen checkpoints off the critical path: the translator every step, the trainer state every --save_every
steps and at the end, written by a background thread from CPU copies; resume stays bitwise exact."""
from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from knowledge_translator import KnowledgeTranslator
from pkt import laten
from pkt.io import BackgroundWriter, PKTError
from pkt.laten import TRAINER_STATE, TrainConfig
from test_laten import _train as laten_run

STEPS = 5
RUN = dict(learning_rate=3e-2, transfer_rate=0.5, n_align=3, micro_batch_size=4, seed=0, dtype="fp32",
           teacher_device="cpu", student_device="cpu", save_every=2, save_trainer_state="last")


@pytest.fixture(scope="module")
def data(chat_jsonl):
    return {"extract": chat_jsonl("ckpt_extract.jsonl", n=STEPS, seed=3),
            "align": chat_jsonl("ckpt_align.jsonl", n=6, seed=4)}


def _train(teacher, student, data, out, **kw):
    return laten_run(teacher, student, data, out, **{**RUN, "translator_save_name": "run", **kw})


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir, student_dir, data, tmp_path_factory):
    return _train(teacher_dir, student_dir, data, tmp_path_factory.mktemp("full"), save_trainer_state="all")


def _states(run: Path) -> list[int]:
    return sorted(s for s, _ in laten.checkpoints(run, complete=True))


def _log(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_translator_every_step_trainer_state_every_n_steps_and_last(uninterrupted):
    assert [s for s, _ in laten.checkpoints(uninterrupted)] == list(range(STEPS))
    for s in range(STEPS):
        assert (uninterrupted / f"checkpoint_{s}" / "translator.safetensors").is_file()
    assert _states(uninterrupted) == [1, 3, 4]          # save_every 2: steps 1, 3 and the last one
    assert [s for s in range(STEPS) if laten.has_state(s, STEPS, 2)] == [1, 3, 4]
    assert not list(uninterrupted.glob(".*.tmp"))        # no temporary sibling left behind


def test_interrupted_then_resumed_is_bitwise_the_uninterrupted_run(uninterrupted, teacher_dir, student_dir, data,
                                                                    tmp_path, monkeypatch):
    real = laten.align_step

    def dies_at_step_3(*a, **kw):
        if kw.get("step", a[6] if len(a) > 6 else None) == 3:
            raise KeyboardInterrupt("killed at step 3")
        return real(*a, **kw)

    monkeypatch.setattr(laten, "align_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train(teacher_dir, student_dir, data, tmp_path)
    run = tmp_path / "run"
    # steps 0-2 were written completely (the write in flight was joined); the state is that of step 1
    assert [s for s, _ in laten.checkpoints(run)] == [0, 1, 2]
    assert _states(run) == [1]
    monkeypatch.setattr(laten, "align_step", real)
    _train(teacher_dir, student_dir, data, tmp_path, resume=True)

    for s in range(STEPS):
        a = load_file(str(uninterrupted / f"checkpoint_{s}" / "translator.safetensors"))
        b = load_file(str(run / f"checkpoint_{s}" / "translator.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"step {s} differs"
    sa = torch.load(uninterrupted / "checkpoint_4" / TRAINER_STATE, weights_only=False)
    sb = torch.load(run / "checkpoint_4" / TRAINER_STATE, weights_only=False)
    for k, v in sa["optimizer"]["state"].items():
        assert all(torch.equal(v[n], sb["optimizer"]["state"][k][n]) for n in v)
    assert sa["scheduler"] == sb["scheduler"] and sa["torch_rng"].equal(sb["torch_rng"])
    assert _log(run) == _log(uninterrupted)
    assert _states(run) == [4]                           # --save_trainer_state last: only the newest keeps one


def _tiny_training_state(seed=0):
    torch.manual_seed(seed)
    tr = KnowledgeTranslator(8, 4)
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    for _ in range(2):
        sum(v.sum() for v in tr({m: torch.randn(2, 3, 8) if m in ("up_proj", "v_proj") else torch.randn(2, 8, 3)
                                 for m in tr.modules_}).values()).backward()
        opt.step()
        sched.step()
    return tr, opt, sched


def test_snapshot_is_a_copy_the_next_step_does_not_change():
    tr, opt, sched = _tiny_training_state()
    snap = laten.snapshot(1, tr, opt, sched, [0, 1])
    kept = {k: v.clone() for k, v in snap["translator"].items()}
    exp_avg = {k: s["exp_avg"].clone() for k, s in snap["trainer_state"]["optimizer"]["state"].items()}
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(1.0)
    opt.step()
    assert all(torch.equal(kept[k], snap["translator"][k]) for k in kept)
    assert all(torch.equal(exp_avg[k], s["exp_avg"]) for k, s in snap["trainer_state"]["optimizer"]["state"].items())


def test_background_write_gives_the_files_of_an_inline_write(tmp_path):
    tr, opt, sched = _tiny_training_state()
    laten.save_checkpoint(tmp_path / "inline", 3, tr, opt, sched, [2, 0, 1])
    with BackgroundWriter(True) as w:
        w.submit(laten.write_checkpoint, tmp_path / "bg", laten.snapshot(3, tr, opt, sched, [2, 0, 1]))
    a, b = tmp_path / "inline" / "checkpoint_3", tmp_path / "bg" / "checkpoint_3"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in ("translator.safetensors", "translator_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    sa, sb = torch.load(a / TRAINER_STATE, weights_only=False), torch.load(b / TRAINER_STATE, weights_only=False)
    assert sa["order"] == sb["order"] == [2, 0, 1] and sa["scheduler"] == sb["scheduler"]


def test_a_failed_background_write_is_an_error_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    tr, opt, sched = _tiny_training_state()

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(laten.torch, "save", full_disk)
    w = BackgroundWriter(True)
    w.submit(laten.write_checkpoint, tmp_path, laten.snapshot(0, tr, opt, sched, [0]))
    with pytest.raises(PKTError, match="cannot write .*checkpoint_0.*No space left"):
        w.submit(laten.write_checkpoint, tmp_path, laten.snapshot(1, tr, opt, sched, [0]))   # reported here
    w.close()
    assert list(tmp_path.iterdir()) == []                # no half checkpoint, no temporary sibling


def test_the_writer_finishes_the_write_in_flight_when_the_loop_raises():
    done = threading.Event()

    def slow_write():
        time.sleep(0.3)
        done.set()

    with pytest.raises(RuntimeError, match="loop failed"):
        with BackgroundWriter(True) as w:
            w.submit(slow_write)
            raise RuntimeError("loop failed")
    assert done.is_set()


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_save_every_must_be_a_positive_integer(value, teacher_dir, student_dir, data, tmp_path):
    with pytest.raises(PKTError, match="--save_every"):
        TrainConfig(**dict(RUN, save_every=value, source_model=teacher_dir, target_model=student_dir,
                           extract_data_path=data["extract"], align_data_path=data["align"],
                           output_dir=str(tmp_path)))
