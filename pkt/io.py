"""Atomic saving, one-line user errors, model loading: the plumbing every entry script shares."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


class PKTError(ValueError):
    """A problem with the user's input. Entry scripts print it as one line and exit 2."""


def fail(msg: str) -> None:
    raise PKTError(msg)


def cli(fn):
    """Wrap a fire entry point: a PKTError becomes `error: <msg>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def main(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PKTError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return main


def _check_flags(fn, argv: list[str]) -> None:
    """Fire binds what it can and only complains about a mistyped flag after the run (having run with
    the default instead): refuse flags the entry point does not take before anything starts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for arg in argv:
        if arg == "--":                          # fire's own flags follow (--help, --trace, ...)
            return
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            bare = name[2:] if name.startswith("no") else name      # fire's --noflag for False
            if name not in params and bare not in params and name not in ("help", "h"):
                fail(f"unknown flag --{name} (see --help)")


def run_cli(component) -> None:
    """`fire.Fire(component)` with PKTError -> exit 2 (also for errors raised by fire-called functions),
    and unknown flags of a function entry point refused up front."""
    import fire

    try:
        if inspect.isfunction(component):
            _check_flags(component, sys.argv[1:])
        fire.Fire(component)
    except PKTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def int_flag(value, flag: str, low: int | None = None, allow_none: bool = False):
    """`value` as given on the command line, checked to be an integer (>= `low`), or a one-line error."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        fail(f"{flag} {value!r}: expected an integer" + (f" >= {low}" if low is not None else ""))
    return value


def number_flag(value, flag: str, low: float = 0.0, strict: bool = False) -> float:
    """`value` checked to be a real number >= `low` (> `low` when `strict`; NaN refused), or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or (value <= low if strict else value < low):
        fail(f"{flag} {value!r}: expected a number {'>' if strict else '>='} {low:g}")
    return float(value)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; outputs get ordinary permissions
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling file path; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` (old contents dropped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path, record: dict) -> None:
    """Append one line (logs grow line by line; a crash loses at most the line being written)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, first_step: int) -> None:
    """Drop the lines of a JSONL train log whose "step" is >= `first_step` (a resumed run redoes them)."""
    path = Path(path)
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < first_step]
        write_text(path, "".join(ln + "\n" for ln in lines))


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16", "auto": "auto"}


def resolve_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        fail(f"--dtype {dtype!r}: expected one of fp32, fp16, bf16, auto")
    name = DTYPES[str(dtype)]
    return name if name == "auto" else getattr(torch, name)


def check_model_path(name_or_path: str, flag: str) -> None:
    """A local-looking path that does not exist is an input error, not a hub lookup."""
    s = str(name_or_path)
    looks_local = s.startswith((".", "/", "~")) or os.sep in s and s.count("/") != 1 or Path(s).exists()
    if looks_local and not (Path(s).expanduser() / "config.json").exists():
        fail(f"{flag} {s}: no config.json there (not a Hugging Face model directory)")


def default_device() -> str:
    """CUDA when present, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path, dtype="auto", device=None, flag="--model", attn_implementation=None):
    """AutoModelForCausalLM in `dtype` ('auto' = as saved) on `device` (default: CUDA when present)."""
    from transformers import AutoModelForCausalLM

    check_model_path(name_or_path, flag)
    device = device or default_device()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), **extra)
    return model.to(device).eval()


def meta_model(name_or_path, flag="--model"):
    """A model on the meta device (shapes only, no memory): for plans and dry runs at full scale,
    from a model directory, a hub name or a config directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_path(name_or_path, flag)
    cfg = AutoConfig.from_pretrained(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
