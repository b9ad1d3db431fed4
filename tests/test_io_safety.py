"""Outputs: nothing a user has is lost, no broken model is saved, logs survive a torn last line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pkt.data import load_chat_jsonl, load_jsonl
from pkt.io import PKTError, atomic_dir, check_finite, check_output, read_log, save_tensors, truncate_log


def test_an_existing_non_empty_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output(out, "--output_dir")                       # empty: fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PKTError, match="--output_dir .*already exists and is not empty.*--overwrite True"):
        check_output(out, "--output_dir")
    check_output(out, "--output_dir", overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("relation, output", [("is", "base"), ("contains", "."), ("lies inside", "base/sub")])
def test_an_output_that_is_contains_or_lies_inside_an_input_is_always_refused(tmp_path, relation, output):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with pytest.raises(PKTError, match=f"{relation}.*--base_model"):
        check_output(tmp_path / output, "--output_dir", overwrite=True, inputs={"--base_model": str(base)})


def test_hub_ids_and_missing_inputs_are_not_paths_to_protect(tmp_path):
    check_output(tmp_path / "out", "--output_dir", inputs={"--base_model": "meta-llama/Llama-2-7b-hf"})


def test_replacement_happens_only_when_the_new_output_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no temporary sibling left behind


def test_stale_temporary_siblings_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.pid{dead.stdout.strip()}.abc.tmp"
    stale.mkdir()
    live = tmp_path / f".out.pid{os.getppid()}.abc.tmp"               # a writer that still runs
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not stale.exists() and live.exists()


def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "t.safetensors").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "d" / "f").stat().st_mode & 0o777) == "0o644"


def test_non_finite_tensors_are_never_saved(tmp_path):
    with pytest.raises(PKTError, match="w has 1 non-finite value"):
        save_tensors(tmp_path / "t.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    assert not (tmp_path / "t.safetensors").exists()
    with pytest.raises(PKTError, match="weight has 4 non-finite"):
        lin = torch.nn.Linear(2, 2)
        lin.weight.data.fill_(float("inf"))
        check_finite(lin, "model")


def test_a_full_or_read_only_disk_is_a_one_line_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(PKTError, match="cannot write"):
        save_tensors(ro / "t.safetensors", {"w": torch.ones(1)})


def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    assert [r["step"] for r in read_log(log)] == [0, 1]
    assert "torn last line" in caplog.text
    truncate_log(log, 1)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0]


def test_a_damaged_line_before_the_end_names_file_and_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(PKTError, match="train_log.jsonl:2:"):
        read_log(log)


def test_jsonl_errors_name_the_file_line_not_the_record_index(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    bad = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    p.write_text(good + "\n\n\n" + bad + "\n")
    with pytest.raises(PKTError, match=r"d.jsonl:4: field 'messages' needs"):
        load_chat_jsonl(p)


def test_non_utf8_jsonl_is_a_one_line_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xff\xfe"}\n')
    with pytest.raises(PKTError, match="d.jsonl:2: not UTF-8"):
        load_jsonl(p)


def test_a_disk_that_fills_up_while_writing_is_a_one_line_error(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(PKTError, match="cannot write .*t.safetensors: No space left on device"):
        save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []
