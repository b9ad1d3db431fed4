"""Run untrusted, model-written Python programs: one isolated process each, with limits.

Layers of containment:
  * the boundary: when `bwrap` (bubblewrap) works here, each program runs in new user, pid, network,
    ipc, uts (and cgroup) namespaces as an unprivileged uid with no capabilities and an empty
    environment, seeing only the system directories and the interpreter (read-only), fresh /proc and
    /dev, and its own working directory (writable); it dies with its parent and has its own session
    (`_bwrap_argv`). `isolation="auto"` falls back to the layers below with a one-line warning per run
    when bwrap is missing or unusable; `"require"` refuses to run then; `"off"` never uses it;
  * a fresh interpreter (`sys.executable -I`: no user site directory, no PYTHON* env vars)
    in its own session / process group, killed as a whole on timeout and after it finishes;
  * a private temporary working directory, deleted afterwards;
  * rlimits set in the child before the program runs: address space, CPU seconds, file size,
    number of processes (relative to the processes the user already runs, so it works for any
    user; root ignores RLIMIT_NPROC, so there the guard and the group kill are what stop fork bombs);
  * a guard against accidents that disables process creation, killing, file deletion/renaming,
    `chdir`, `socket` and friends, and refuses `open()` for writing outside the working directory.
    It is the same with and without bwrap, so a program's outcome does not depend on the isolation;
    it is no boundary (`posix.*`, `object.__subclasses__()`, `_socket`, `io.FileIO` get past it).
A program passes only when it runs to its end and the runner prints a per-run secret token, so
`exit(0)`, `os._exit(0)` or a crash all count as failures.
"""
from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from pkt.io import fail

log = logging.getLogger(__name__)

ISOLATION_MODES = ("auto", "require", "off")
NAMESPACES = ("user", "pid", "net", "ipc", "uts")
# What the sandbox sees of the host, read-only: the system directories (symlinks such as /bin -> usr/bin
# are recreated as symlinks), a few non-secret /etc files, and the interpreter's prefixes (added in
# `_system_binds`). Nothing else: no home directories, no /work, no /tmp, no /run, no /sys.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group")
SANDBOX_UID = 65534  # "nobody" inside the user namespace; a non-zero uid makes bwrap drop all capabilities
FSIZE_MB, NPROC_EXTRA = 64, 16  # per-program defaults: largest file written, processes beyond the user's

# The child's entry point. argv: program file, memory MB, cpu seconds, file-size MB. The secret
# token arrives on stdin so the program cannot read it from argv.
RUNNER = r'''
import os, sys, resource
token = sys.stdin.readline().strip()
sys.stdin.close()
prog_path, mem_mb, cpu_s, fsize_mb, nproc_extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out = os.fdopen(os.dup(1), "w")

def user_processes(uid):
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat("/proc/" + pid).st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n

if mem_mb > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_mb << 20, fsize_mb << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    if os.getuid() != 0:
        n = user_processes(os.getuid()) + nproc_extra
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
except (OSError, ValueError):
    pass

source = open(prog_path).read()
home = os.path.realpath(os.getcwd())

def guard():
    import builtins, io, shutil, subprocess, socket
    def refuse(name):
        def blocked(*a, **k):
            raise PermissionError(name + " is disabled in the sandbox")
        return blocked
    for name in ("fork", "forkpty", "vfork", "system", "popen", "kill", "killpg", "setsid", "setpgid",
                 "setuid", "setgid", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
                 "replace", "truncate", "ftruncate", "chdir", "fchdir", "chroot", "chmod", "fchmod",
                 "chown", "fchown", "lchown", "link", "symlink", "putenv", "unsetenv", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                 "plock", "nice", "_exit", "abort"):
        if hasattr(os, name):
            setattr(os, name, refuse("os." + name))
    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, refuse("shutil." + name))
    subprocess.Popen = refuse("subprocess.Popen")
    for name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, refuse("subprocess." + name))
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse("socket." + name))
    for mod in ("multiprocessing", "ctypes", "_ctypes", "resource", "psutil", "pty", "signal"):
        sys.modules[mod] = None  # `import ctypes` now raises ImportError
    real_open = builtins.open
    def safe_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not isinstance(file, int):
            p = os.path.realpath(os.fspath(file))
            if not (p == home or p.startswith(home + os.sep)):
                raise PermissionError("writing outside the sandbox directory is disabled")
        return real_open(file, mode, *a, **k)
    builtins.open = io.open = safe_open
    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def safe_os_open(path, flags, *a, **k):
        if flags & write_flags:
            p = os.path.realpath(os.fspath(path))
            if not (p == home or p.startswith(home + os.sep)):
                raise PermissionError("writing outside the sandbox directory is disabled")
        return real_os_open(path, flags, *a, **k)
    os.open = safe_os_open
    builtins.exit = builtins.quit = refuse("exit")

devnull = open(os.devnull, "w")
sys.stdout = sys.stderr = devnull
guard()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException as e:
    out.write("failed: %s: %s\n" % (type(e).__name__, str(e)[:200]))
    out.flush()
else:
    out.write(token + "\n")
    out.flush()
'''


@dataclass(frozen=True)
class Isolation:
    """How programs run. `bwrap`: the bwrap command line up to the program's own working directory
    (empty = no bwrap); `warning`: the one line a run prints ("" = nothing to say)."""
    bwrap: tuple[str, ...] = ()
    warning: str = ""


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _system_binds() -> list[str]:
    """bwrap arguments exposing the system and this interpreter read-only (nothing of the user's files)."""
    args, bound = [], []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
            bound.append(d)
    for f in ETC_FILES:
        args += ["--ro-bind-try", f, f]
    # a venv or a pyenv/conda install lives outside /usr: bind its prefixes (as named and resolved)
    exe_home = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, exe_home):
        for dest in dict.fromkeys((os.path.abspath(p), os.path.realpath(p))):
            if dest != "/" and os.path.isdir(dest) and not _under(dest, bound):
                args += ["--ro-bind", os.path.realpath(p), dest]
                bound.append(dest)
    return args


def _bwrap_argv(bwrap: str, namespaces=NAMESPACES, nested_userns: bool = False) -> list[str]:
    """The bwrap command line for one program, without its working directory and command."""
    args = [bwrap, "--die-with-parent", "--new-session", "--clearenv", "--unshare-cgroup-try"]
    args += [f"--unshare-{ns}" for ns in namespaces]
    if "user" in namespaces:
        args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        if not nested_userns:
            args.append("--disable-userns")  # no new namespaces (and capabilities in them) from inside
    return args + _system_binds() + ["--proc", "/proc", "--dev", "/dev"]


def _in_bwrap(argv, work: str, cmd: list[str]) -> list[str]:
    """cmd under bwrap argv with work as its writable working directory; the rest of the sandbox's root
    (a tmpfs holding the mount points) is made read-only last."""
    return [*argv, "--bind", work, work, "--remount-ro", "/", "--chdir", work, "--", *cmd]


def _works(argv: list[str]) -> tuple[bool, str]:
    """Run `python -I -c pass` under argv once -> (ok, why not)."""
    work = tempfile.mkdtemp(prefix="pkt_sandbox_probe_")
    try:
        r = subprocess.run(_in_bwrap(argv, work, [sys.executable, "-I", "-c", "pass"]),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, env={}, timeout=30)
        lines = r.stderr.strip().splitlines()
        return r.returncode == 0, (lines[-1] if lines else f"exit status {r.returncode}")
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _probe(bwrap: str) -> Isolation:
    """Find, once per bwrap binary, the strongest sandbox this machine allows: all namespaces (without
    nested user namespaces if the kernel supports forbidding them), else the namespaces that can be
    created here, named in the warning; else no bwrap, with bwrap's own error."""
    for nested in (False, True):
        argv = _bwrap_argv(bwrap, NAMESPACES, nested)
        ok, why = _works(argv)
        if ok:
            return Isolation(tuple(argv))
    usable = [ns for ns in NAMESPACES if _works(_bwrap_argv(bwrap, (ns,), True))[0]]
    argv = _bwrap_argv(bwrap, usable, True)
    if usable and _works(argv)[0]:
        missing = ", ".join(ns for ns in NAMESPACES if ns not in usable)
        return Isolation(tuple(argv), f"sandbox: bwrap cannot create {missing} namespaces on this machine; "
                                      f"programs run without them")
    return Isolation((), f"sandbox: {bwrap} does not work here ({why})")


def resolve_isolation(isolation: str = "auto") -> Isolation:
    """`auto` | `require` | `off` -> how programs will run. `require` without a working bwrap is a
    one-line PKTError; `auto` without it runs the in-process guards only and says so in `warning`."""
    if isolation not in ISOLATION_MODES:
        fail(f"--sandbox: expected one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
    if isolation == "off":
        return Isolation()
    bwrap = shutil.which("bwrap")
    found = _probe(bwrap) if bwrap else Isolation((), "sandbox: bwrap not found on PATH")
    if found.bwrap:
        return found
    if isolation == "require":
        fail(f"{found.warning}; --sandbox require refuses to run model-written code without it "
             f"(install the bubblewrap package)")
    return Isolation((), f"{found.warning}; isolation is OFF: model-written code runs on this machine with "
                         f"only in-process guards (install bubblewrap, see docs/evaluation.md)")


def _announce(iso: Isolation) -> Isolation:
    if iso.warning:
        log.warning(iso.warning)
    return iso


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 2048, fsize_mb: int = FSIZE_MB,
                nproc_extra: int = NPROC_EXTRA, *, isolation: str = "auto") -> dict:
    """Run one program in a fresh sandboxed process -> {"passed": bool, "result": "passed" |
    "timed out" | "failed: <why>"}. Never raises for anything the program does; `isolation` as in
    `resolve_isolation` (its warning is logged)."""
    iso = _announce(resolve_isolation(isolation))
    return _run(program, iso, timeout, memory_mb, fsize_mb, nproc_extra)


def _run(program: str, iso: Isolation, timeout: float, memory_mb: int, fsize_mb: int, nproc_extra: int) -> dict:
    token = secrets.token_hex(16)
    work = tempfile.mkdtemp(prefix="pkt_sandbox_")
    proc = None
    try:
        prog_path = os.path.join(work, "program.py")
        runner_path = os.path.join(work, ".runner.py")
        out_path = os.path.join(work, ".out")
        with open(prog_path, "w") as f:
            f.write(program)
        with open(runner_path, "w") as f:
            f.write(RUNNER)
        cpu = max(1, int(timeout) + 1)
        cmd = [sys.executable, "-I", runner_path, prog_path, str(memory_mb), str(cpu), str(fsize_mb), str(nproc_extra)]
        if iso.bwrap:  # bwrap gets an empty environment too: its pid 1 inside would show it in /proc/1/environ
            cmd, env = _in_bwrap(iso.bwrap, work, cmd), {}
        else:
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        with open(out_path, "w") as out_f:
            proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.PIPE, stdout=out_f, stderr=subprocess.DEVNULL,
                                    start_new_session=True, env=env, close_fds=True)
            try:
                proc.stdin.write((token + "\n").encode())
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
        _kill_group(proc)
        if timed_out:
            return {"passed": False, "result": "timed out"}
        with open(out_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace").strip().splitlines()
        last = tail[-1] if tail else ""
        if proc.returncode == 0 and last == token:
            return {"passed": True, "result": "passed"}
        if last.startswith("failed:"):
            return {"passed": False, "result": last}
        return {"passed": False, "result": f"failed: exit status {proc.returncode}"}
    except Exception as e:  # anything odd on our side is the program's failure, not the run's
        if proc is not None:
            _kill_group(proc)
        return {"passed": False, "result": f"failed: sandbox error {type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc) -> None:
    """SIGKILL the program's whole process group (it may have left children behind) and reap it. Under
    bwrap the group holds bwrap and its pid 1 inside, whose death ends every process of the namespace,
    also those in sessions of their own."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=5)
    except Exception:
        pass


def run_programs(programs: list[str], timeout: float = 3.0, workers: int | None = None, memory_mb: int = 2048,
                 desc: str = "executing", *, isolation: str = "auto") -> list[dict]:
    """Run many programs in parallel (threads, each waiting on its own process); results in input order.
    The isolation is resolved (and its warning logged) once per call."""
    iso = _announce(resolve_isolation(isolation))
    workers = workers or max(2, (os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda p: _run(p, iso, timeout, memory_mb, FSIZE_MB, NPROC_EXTRA), programs)
        return list(tqdm(it, total=len(programs), desc=desc, disable=len(programs) < 50, leave=False))
