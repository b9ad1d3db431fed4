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


def run_cli(component, config=None) -> None:
    """`fire.Fire(component)` with PKTError -> `error: <msg>` on stderr and exit 2 (also for errors raised by
    fire-called functions), and unknown flags of a function entry point refused up front.

    With `config` (a dataclass), the command line fills the dataclass instead: its fields are the flags
    (`--help` lists them), each value is checked against the field's type (`config_from_flags`), the
    dataclass validates itself in `__post_init__`, and `component(cfg)` runs. One place lists a stage's
    options; nothing relays them parameter by parameter."""
    import fire

    try:
        if config is not None:
            component = config_entry(component, config)
        if inspect.isfunction(component):
            _check_flags(component, sys.argv[1:])
        fire.Fire(component)
    except PKTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def config_entry(fn, config):
    """A fire-callable whose signature is the dataclass `config`'s: flags -> `config_from_flags` -> `fn(cfg)`."""

    import typing

    hints = typing.get_type_hints(config)
    sig = inspect.signature(config)
    sig = sig.replace(parameters=[p.replace(annotation=hints.get(p.name, p.annotation))
                                  for p in sig.parameters.values()])

    def entry(*args, **flags):
        try:
            bound = sig.bind(*args, **flags)
        except TypeError as e:
            fail(f"{e} (see --help)")
        return fn(config_from_flags(config, bound.arguments))

    entry.__signature__ = sig
    entry.__doc__ = "\n\n".join(d for d in (inspect.getdoc(fn), inspect.getdoc(config)) if d)
    entry.__name__ = entry.__qualname__ = fn.__name__
    return entry


def config_from_flags(config, flags: dict):
    """Build the dataclass `config` from command-line values, checking each against its field's annotation:
    `int` (not bool), `float` (any real number), `bool`, `str` (fire's numbers and comma tuples become text,
    so `--output_dir 123` is a path), `X | None`; other annotations pass through. A wrong type is a one-line
    error naming the flag and the value; range checks are the dataclass's own `__post_init__`."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config)
    names = {f.name for f in dataclasses.fields(config)}
    kwargs = {}
    for name, value in flags.items():
        if name not in names:
            fail(f"unknown flag --{name} (see --help)")
        kwargs[name] = _typed_flag(f"--{name}", value, hints.get(name))
    return config(**kwargs)


def _typed_flag(flag: str, value, hint):
    import types
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return value
        hint = inner[0]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            fail(f"{flag} {value!r}: expected True or False")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"{flag} {value!r}: expected an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{flag} {value!r}: expected a number")
        return float(value)
    elif hint is str:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            fail(f"{flag} {value!r}: expected text")
    return value


def parse_list(value, flag: str, cast=str, choices=None, allow_empty: bool = False) -> list:
    """A list flag as fire hands it over (`a,b`, `[a, b]`, a tuple/list, or one scalar) -> a list of `cast`
    values, order kept, duplicates dropped; `choices` restricts the values. One-line errors name the flag."""
    if value is None:
        items = []
    elif isinstance(value, str):
        items = [s.strip().strip("'\"") for s in value.strip().strip("[]()").split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out = []
    for v in items:
        if isinstance(v, str) and not v.strip():
            continue
        try:
            v = cast(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            fail(f"{flag} {value!r}: {v!r} is not {getattr(cast, '__name__', 'valid')}")
        if choices is not None and v not in choices:
            fail(f"{flag}: unknown value {v!r} (choose from {', '.join(map(str, choices))})")
        if v not in out:
            out.append(v)
    if not out and not allow_empty:
        fail(f"{flag} is empty")
    return out


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


def default_dtype(device) -> str:
    """The compute dtype a stage uses when none is given: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def resolve_dtype(dtype, device=None):
    """`--dtype` (fp32/fp16/bf16/auto, their long names or a torch.dtype) -> torch.dtype or "auto";
    None -> `default_dtype(device)` when a device is given, else None."""
    import torch

    if dtype is None and device is not None:
        dtype = default_dtype(device)
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
