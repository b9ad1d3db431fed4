"""Atomic saving, one-line user errors, model loading: the plumbing every entry script shares."""
from __future__ import annotations

import contextlib
import errno
import glob
import inspect
import json
import logging
import math
import os
import re
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
    options; nothing relays them parameter by parameter. Its return value is for library callers: fire does
    not print it (the stage prints what it reports)."""
    import fire

    try:
        if config is not None:
            component = config_entry(component, config)
        if inspect.isfunction(component):
            _check_flags(component, sys.argv[1:])
        fire.Fire(component, serialize=(lambda result: None) if config is not None else None)
    except PKTError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _close_progress_bars() -> None:
    """An error raised inside a tqdm loop: end the bar's line first, so the error is a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


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


def parse_list(value, flag: str, cast=str, choices=None, allow_empty: bool = False, unique: bool = True) -> list:
    """A list flag as fire hands it over (`a,b`, `[a, b]`, a tuple/list, or one scalar) -> a list of `cast`
    values, order kept, duplicates dropped (kept with `unique=False`); `choices` restricts the values.
    One-line errors name the flag."""
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
        if not unique or v not in out:
            out.append(v)
    if not out and not allow_empty:
        fail(f"{flag} is empty")
    return out


def parse_named(value, flag: str, default_name=lambda v: v) -> list[tuple[str, str]]:
    """A `name=value,name=value` flag (also a list of such items, or a dict) -> [(name, value)], order kept;
    an item without `name=` is named `default_name(value)`. A name given twice is a one-line error."""
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    out = []
    for item in parse_list(value, flag, str, unique=False, allow_empty=True):
        name, sep, v = item.partition("=")
        name, v = (name.strip(), v.strip()) if sep else (default_name(name.strip()), name.strip())
        if name in {n for n, _ in out}:
            fail(f"{flag}: name {name!r} given twice")
        out.append((name, v))
    return out


def int_flag(value, flag: str, low: int | None = None, allow_none: bool = False):
    """`value` as given on the command line, checked to be an integer (>= `low`), or a one-line error."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        fail(f"{flag} {value!r}: expected an integer" + (f" >= {low}" if low is not None else ""))
    return value


def number_flag(value, flag: str, low: float = 0.0, strict: bool = False, high: float | None = None,
                high_strict: bool = False) -> float:
    """`value` checked to be a finite real number >= `low` (> `low` when `strict`) and, with `high`, <= `high`
    (< when `high_strict`), or a one-line error naming the flag and the value."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
        or (value <= low if strict else value < low) \
        or (high is not None and (value >= high if high_strict else value > high))
    if bad:
        rng = f"{'>' if strict else '>='} {low:g}" + (f" and {'<' if high_strict else '<='} {high:g}"
                                                       if high is not None else "")
        fail(f"{flag} {value!r}: expected a number {rng}")
    return float(value)


# ------------------------------------------------------------------------------------------- outputs
# Nothing a user already has is replaced without --overwrite, nothing is replaced before the new output is
# complete, and no output is ever one of the inputs: `check_output` says so up front, before any model loads;
# `atomic_dir` / `atomic_path` write into a temporary sibling and rename it into place at the end.

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _resolved(p) -> Path:
    return Path(p).expanduser().resolve()


def check_output(path, flag: str, overwrite: bool = False, inputs: dict | None = None) -> Path:
    """Refuse an output path before anything runs: an existing file or non-empty directory unless `overwrite`,
    and always one that is, contains or lies inside an input (`inputs`: flag -> local path; hub ids and
    missing paths are skipped). Returns the path."""
    out = _resolved(path)
    for in_flag, given in (inputs or {}).items():
        if given is None or not Path(str(given)).expanduser().exists():
            continue
        src = _resolved(given)
        if out == src:
            fail(f"{flag} {path}: is the input {in_flag} itself")
        if src.is_relative_to(out):
            fail(f"{flag} {path}: contains the input {in_flag} {given}")
        if out.is_relative_to(src) and src.is_dir():
            fail(f"{flag} {path}: lies inside the input {in_flag} {given}")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        fail(f"{flag} {path}: already exists and is not empty (pass --overwrite True to replace it)")
    if out.exists() and not (out.is_dir() or out.is_file()):
        fail(f"{flag} {path}: exists and is neither a file nor a directory")
    return Path(path)


def _tmp_prefix(path: Path) -> str:
    # The writer's pid is in the name, so a later run can tell a dead writer's leftovers from a live one's.
    return f".{path.name}.pid{os.getpid()}."


def _remove_stale_siblings(path: Path) -> None:
    """Delete `.<name>.pid<N>.*.tmp` siblings left by writers that no longer run (a kill, a full disk)."""
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{glob.escape(path.name)}.pid*.tmp"):
        pid = p.name[len(path.name) + 5:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ordinary_permissions(root: Path) -> None:
    """Give what was written the user's umask (mkstemp/mkdtemp and some writers make 0600/0700)."""
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)


def _disk_error(e: BaseException) -> str | None:
    """The reason when `e` is a failed write to the disk (full, read-only, no permission, file too large),
    else None. safetensors reports the OS error in its message ("... (os error 28)") and torch.save's zip
    writer only as a failed position check, so both are read from the text."""
    if isinstance(e, OSError):
        return e.strerror if e.errno in DISK_ERRNOS else None
    text = str(e)
    m = re.search(r"\(os error (\d+)\)", text)
    if m and int(m.group(1)) in DISK_ERRNOS:
        return os.strerror(int(m.group(1)))
    if "PytorchStreamWriter failed" in text or ("inline_container" in text and "unexpected pos" in text):
        return "the write failed (disk full or file size limit)"
    return None


@contextlib.contextmanager
def _writing(path: Path):
    """Disk errors while writing `path` (full, read-only, no permission) become one-line errors."""
    try:
        yield
    except PKTError:
        raise
    except Exception as e:
        reason = _disk_error(e)
        if reason is None:
            raise
        fail(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling file path; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(path)
        fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _ordinary_permissions(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` (old contents dropped: callers
    refuse existing outputs first with `check_output`)."""
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(path)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            _ordinary_permissions(tmp)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
                os.replace(path, old / "old")
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
    """Append one line (logs grow line by line; a crash loses at most the line being written). A failed
    write (disk full) is a one-line error and leaves the file as it was: no torn line, and no empty log
    that would make the next run think a run is there."""
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        size = path.stat().st_size if existed else 0
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except BaseException:
            with contextlib.suppress(OSError):
                if existed:
                    os.truncate(path, size)
                else:
                    path.unlink()
            raise


def read_log(path) -> list[dict]:
    """The records of a JSONL train log. A torn last line (what a kill or a full disk leaves) is dropped with a
    warning; a bad line before the last is a one-line error naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if any(ln.strip() for ln in lines[n:]):
                fail(f"{path}:{n}: not valid JSON (a damaged train log)")
            logging.getLogger("pkt.io").warning("%s:%d: torn last line dropped (an interrupted write)", path, n)
    return out


def truncate_log(path, first_step: int) -> None:
    """Keep only the records of a JSONL train log whose "step" is < `first_step` (a resumed run redoes the
    rest); a torn last line is dropped (`read_log`)."""
    path = Path(path)
    if path.exists():
        write_jsonl(path, [r for r in read_log(path) if r.get("step", first_step) < first_step])


def non_finite(tensors) -> tuple[str, int] | None:
    """(name, count) of the first tensor of `tensors` (name -> tensor, or a module's parameters) holding
    NaN/inf, else None."""
    import torch

    items = tensors.named_parameters() if isinstance(tensors, torch.nn.Module) else tensors.items()
    for name, t in items:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum())
    return None


def check_finite(tensors, what: str) -> None:
    """A one-line error when any tensor of `tensors` (name -> tensor, or a module) holds NaN/inf: nothing with
    non-finite values is ever saved."""
    bad = non_finite(tensors)
    if bad:
        fail(f"{what}: {bad[0]} has {bad[1]} non-finite value(s); nothing was saved")


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors file, written atomically; refuses non-finite tensors."""
    from safetensors.torch import save_file

    check_finite(tensors, str(path))
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_model(model, path, tokenizer=None, files: dict | None = None) -> None:
    """A Hugging Face model directory (safetensors, config, tokenizer, and `files`: name -> JSON-able object)
    written atomically; refuses a model with non-finite weights, so no broken model is ever saved."""
    check_finite(model, f"model for {path}")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (files or {}).items():
            write_json(Path(tmp) / name, obj)


class BackgroundWriter:
    """Runs write jobs one at a time in one background thread, so a training loop does not wait on the disk.

    `submit(fn, *args)` first waits for the previous job (at most one write in flight; its error, if any, is
    raised here), then starts `fn(*args)`; `wait()` joins the job in flight. As a context manager it joins at
    exit, also when the loop raised: a write that started completes (its `atomic_dir` renames a whole
    checkpoint into place), and a crash leaves at most a temporary sibling that the next run removes.
    `background=False` runs every job inline (same files, same order). The job must own its inputs (CPU
    copies): the caller keeps changing its live tensors."""

    def __init__(self, background: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkt-writer") if background else None
        self._pending = None

    def submit(self, fn, *args) -> None:
        self.wait()
        if self._pool is None:
            fn(*args)
        else:
            self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        try:              # the loop failed: still finish the write in flight, but report the loop's error
            self.close()
        except Exception as e:  # noqa: BLE001
            logging.getLogger("pkt.io").error("background write failed too: %s", e)


def scan_checkpoints(root, sep: str, marker: str | None = None) -> list[tuple[int, Path]]:
    """`(step, path)` of the checkpoint directories `checkpoint<sep><step>` under `root`, oldest first; with
    `marker`, only those holding that file (a complete checkpoint). LaTen names them `checkpoint_<step>`,
    the LoRA fine-tuning `checkpoint-<step>` (each as its reference code does)."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    prefix = f"checkpoint{sep}"
    for p in root.glob(glob.escape(prefix) + "*"):
        step = p.name[len(prefix):]
        if step.isdigit() and p.is_dir() and (marker is None or (p / marker).is_file()):
            out.append((int(step), p))
    return sorted(out)


def last_good_checkpoint(found: list[tuple[int, Path]]) -> str:
    """What a training run that stopped on a non-finite step leaves (`found`: `scan_checkpoints`), for its error."""
    return f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was written"


def holds_run(run_dir, sep: str, marker: str | None = None, log: str = "train_log.jsonl") -> bool:
    """A training run is in `run_dir` when it has a checkpoint (`scan_checkpoints`) or a non-empty train log
    (an empty one is what a failed first write used to leave: not a run)."""
    log_file = Path(run_dir) / log
    return bool(scan_checkpoints(run_dir, sep, marker)) or (log_file.is_file() and log_file.stat().st_size > 0)


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


def is_local_path(name_or_path) -> bool:
    """The rule for a model argument: a local path when it exists, when the user wrote it as one (`/`, `./`,
    `../`, `~`), when its first component exists here (`models/student` next to an existing `models/`), or
    when it has more slashes than a hub id (`owner/name`). Anything else (`gpt2`, `meta-llama/Llama-2-7b-hf`)
    is a Hugging Face hub id."""
    s = str(name_or_path)
    if s.startswith(("/", "./", "../", "~")) or s in (".", "..") or os.sep != "/" and os.sep in s:
        return True
    return Path(s).exists() or Path(s.split("/", 1)[0]).exists() or s.strip("/").count("/") > 1


def check_safetensors(path, flag: str) -> None:
    """A one-line error naming the file when `path` is not a readable safetensors file (truncated, not
    safetensors at all); reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # SafetensorError, OSError
        fail(f"{flag}: {path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})")


def read_json(path, what: str):
    """A JSON file, or a one-line error naming `what` and the file (missing, not UTF-8, not JSON)."""
    p = Path(path)
    if not p.is_file():
        fail(f"{what} {p}: no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        fail(f"{what} {p}: not UTF-8 text")
    except ValueError as e:
        fail(f"{what} {p}: not valid JSON ({e})")


def check_model_path(name_or_path: str, flag: str) -> None:
    """A local path (`is_local_path`) must be a readable Hugging Face model directory: config.json valid
    JSON and every safetensors file intact, so a broken model is a one-line error before anything loads.
    A hub id is left to the loader."""
    s = str(name_or_path)
    if not is_local_path(s):
        return
    p = Path(s).expanduser()
    if not p.exists():
        fail(f"{flag} {s}: no such directory")
    if not (p / "config.json").is_file():
        fail(f"{flag} {s}: no config.json there (not a Hugging Face model directory)")
    read_json(p / "config.json", flag)
    for f in sorted(p.glob("*.safetensors")):
        check_safetensors(f, flag)


DEVICE_RE = re.compile(r"(cpu|cuda(:\d+)?|mps|auto)")


def check_device(device, flag: str, allow_auto: bool = False) -> None:
    """`--device` values: cpu, cuda, cuda:N, mps (and auto where the stage places the model itself); None is
    the default. An unknown name or an absent accelerator is a one-line error before anything loads."""
    if device is None:
        return
    d = str(device)
    if not DEVICE_RE.fullmatch(d) or d == "auto" and not allow_auto:
        fail(f"{flag} {d!r}: expected cpu, cuda, cuda:N or mps" + (" or auto" if allow_auto else ""))
    import torch

    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            fail(f"{flag} {d}: CUDA is not available on this machine")
        if ":" in d and int(d.split(":")[1]) >= torch.cuda.device_count():
            fail(f"{flag} {d}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d == "mps" and not torch.backends.mps.is_available():
        fail(f"{flag} mps: MPS is not available on this machine")


@contextlib.contextmanager
def _loading(name_or_path, flag: str, what: str = "a model"):
    """Loader failures that are the input's fault (a hub id not found or not cached offline, a broken file)
    become one-line errors naming the flag."""
    try:
        yield
    except (OSError, ValueError) as e:
        if isinstance(e, PKTError):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        where = "" if is_local_path(name_or_path) else " (a Hugging Face hub id: not found, or not cached offline)"
        fail(f"{flag} {name_or_path}: cannot load {what}{where}: {first}")


def default_device() -> str:
    """CUDA when present, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path, dtype="auto", device=None, flag="--model", attn_implementation=None, max_memory=None):
    """AutoModelForCausalLM in `dtype` ('auto' = as saved; None = `default_dtype(device)`) on `device`
    (default: CUDA when present). `device="auto"`: placed across the visible GPUs (the CPU as a last resort)
    by `pkt.placement.load_auto`, within `max_memory` (accelerate's per-device budget) when given."""
    from transformers import AutoModelForCausalLM

    check_model_path(name_or_path, flag)
    if device == "auto":
        from pkt.placement import load_auto

        return load_auto(name_or_path, dtype, max_memory, attn_implementation)
    device = device or default_device()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _loading(name_or_path, flag):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype, device), **extra)
    return model.to(device).eval()


def load_config(name_or_path, flag="--model"):
    """The model's transformers config (config.json only: no weights are read)."""
    from transformers import AutoConfig

    check_model_path(name_or_path, flag)
    with _loading(name_or_path, flag, "a model config"):
        return AutoConfig.from_pretrained(name_or_path)


def meta_model(name_or_path, flag="--model"):
    """A model on the meta device (shapes only, no memory): for plans and dry runs at full scale,
    from a model directory, a hub name or a config directory."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = load_config(name_or_path, flag)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def load_tokenizer(name_or_path, flag: str = "--model"):
    from transformers import AutoTokenizer

    with _loading(name_or_path, flag, "a tokenizer"):
        tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
