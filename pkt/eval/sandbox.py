"""Run untrusted, model-written Python programs: one isolated process each, with limits.

Layers of containment (each one is best effort on its own; together they keep a benchmark run alive):
  * a fresh interpreter (`sys.executable -I`: no site-packages, no PYTHON* env vars, no user dir)
    in its own session / process group, killed as a whole on timeout and after it finishes;
  * a private temporary working directory, deleted afterwards;
  * rlimits set in the child before the program runs: address space, CPU seconds, file size,
    number of processes (relative to the processes the user already runs, so it works for any
    user; root ignores RLIMIT_NPROC, so there the guard and the group kill are what stop fork bombs);
  * a guard that disables process creation, killing, file deletion/renaming, `chdir`, `socket`
    and friends, and refuses `open()` for writing outside the working directory.
A program passes only when it runs to its end and the runner prints a per-run secret token, so
`exit(0)`, `os._exit(0)` or a crash all count as failures.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

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


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 2048, fsize_mb: int = 64,
                nproc_extra: int = 16) -> dict:
    """Run one program in a fresh sandboxed process -> {"passed": bool, "result": "passed" |
    "timed out" | "failed: <why>"}. Never raises for anything the program does."""
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
        with open(out_path, "w") as out_f:
            proc = subprocess.Popen(
                [sys.executable, "-I", runner_path, prog_path, str(memory_mb), str(cpu), str(fsize_mb),
                 str(nproc_extra)],
                cwd=work, stdin=subprocess.PIPE, stdout=out_f, stderr=subprocess.DEVNULL,
                start_new_session=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, close_fds=True)
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
    """SIGKILL the program's whole process group (it may have left children behind) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=5)
    except Exception:
        pass


def run_programs(programs: list[str], timeout: float = 3.0, workers: int | None = None, memory_mb: int = 2048,
                 desc: str = "executing") -> list[dict]:
    """Run many programs in parallel (threads, each waiting on its own process); results in input order."""
    workers = workers or max(2, (os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb), programs)
        return list(tqdm(it, total=len(programs), desc=desc, disable=len(programs) < 50, leave=False))
