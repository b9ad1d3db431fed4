"""The sandbox contains hostile programs (each a failure) and the pass@k estimator is exact.

Each escape below is a one-liner that gets past the in-process guard; under bwrap it must be contained:
scored as a failure (every escape program asserts that its escape worked), host files untouched, the
scorer alive, no process left behind. Those tests need a working bwrap and skip without one, unless
PKT_REQUIRE_BWRAP=1 (CI) turns a missing bwrap into failures.
"""
import glob
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from math import comb
from pathlib import Path

import pytest

from pkt.eval.passk import pass_at_k
from pkt.eval.sandbox import resolve_isolation, run_program, run_programs
from pkt.io import PKTError

BWRAP = resolve_isolation("auto")
needs_bwrap = pytest.mark.skipif(not BWRAP.bwrap and not os.environ.get("PKT_REQUIRE_BWRAP"),
                                 reason=f"needs a working bwrap ({BWRAP.warning.split(';')[0]})")
MODES = ["off", pytest.param("require", marks=needs_bwrap)]


def test_pass_at_k_matches_combinatorics():
    for n in range(1, 21):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                direct = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12)
    assert pass_at_k(20, 5, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


@pytest.mark.parametrize("isolation", MODES)
def test_good_and_bad_programs(isolation):
    run = lambda prog: run_program(prog, isolation=isolation)["passed"]  # noqa: E731
    assert run("x = 1\nassert x == 1")
    assert run("import math, re, collections, heapq\nassert math.gcd(12, 18) == 6")
    assert not run("assert 1 == 2")
    assert not run("def f(:\n")  # syntax error
    # early exits never count as a pass
    for prog in ("exit(0)", "import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"):
        assert not run(prog), prog
    # the program may use its own working directory
    assert run("open('a.txt', 'w').write('hi')\nassert open('a.txt').read() == 'hi'")


@pytest.mark.parametrize("isolation", MODES)
def test_hostile_programs_are_contained(isolation):
    tmp_root = Path(tempfile.gettempdir())
    sentinel = tmp_root / f"pkt_sentinel_{os.getpid()}"
    sentinel.write_text("alive")
    try:
        hostile = {
            "loop": "while True:\n    pass",
            "sleep": "import time\ntime.sleep(100)",
            "memory": "x = bytearray(10 * 1024 ** 3)\nx[-1] = 1",
            "fork": "import os\nwhile True:\n    os.fork()",
            "mp": "import multiprocessing as mp\nps = [mp.Process(target=print) for _ in range(100)]\n[p.start() for p in ps]",
            "subprocess": "import subprocess\nsubprocess.Popen(['sleep', '100'])",
            "system": "import os\nos.system('sleep 100 &')",
            "rm_rel": f"import os\nos.remove('../{sentinel.name}')",
            "rm_abs": f"import pathlib\npathlib.Path({str(sentinel)!r}).unlink()",
            "rmtree": "import shutil\nshutil.rmtree('..')",
            "truncate": f"open({str(sentinel)!r}, 'w').write('dead')",
            "chdir": f"import os\nos.chdir('..')\nos.remove({sentinel.name!r})",
            "socket": "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))",
            "urllib": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=1)",
            "kill_parent": "import os\nos.kill(os.getppid(), 9)",
        }
        t0 = time.time()
        results = run_programs(list(hostile.values()), timeout=1.0, workers=4, isolation=isolation)
        assert time.time() - t0 < 30
        for name, r in zip(hostile, results):
            assert not r["passed"], (name, r)
        assert sentinel.read_text() == "alive"
        assert results[0]["result"] == "timed out"
        # the runner still works afterwards
        assert run_program("assert True", isolation=isolation)["passed"]
    finally:
        sentinel.unlink()


@pytest.mark.parametrize("isolation", MODES)
def test_timeout_kills_process_group(isolation):
    # a child that escaped the guard would keep running; the group kill reaps whatever is left
    t0 = time.time()
    r = run_program("import time\nwhile True: time.sleep(0.01)", timeout=0.5, isolation=isolation)
    assert r["result"] == "timed out" and time.time() - t0 < 5


# ---- isolation modes -------------------------------------------------------------------------------

@pytest.fixture
def no_bwrap(tmp_path, monkeypatch):
    """A PATH on which there is no bwrap."""
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_require_without_bwrap_is_a_one_line_error(no_bwrap):
    for call in (lambda: run_program("assert True", isolation="require"),
                 lambda: run_programs(["assert True"], isolation="require")):
        with pytest.raises(PKTError, match="bwrap not found on PATH.*require") as e:
            call()
        assert "\n" not in str(e.value)


def test_auto_without_bwrap_warns_once_per_run_and_still_scores(no_bwrap, caplog):
    with caplog.at_level("WARNING", logger="pkt.eval.sandbox"):
        results = run_programs(["assert True", "assert False", "assert 2 + 2 == 4"], isolation="auto")
    assert [r["passed"] for r in results] == [True, False, True]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "isolation is OFF" in warnings[0] and "\n" not in warnings[0]


def test_off_runs_without_bwrap_and_says_nothing(caplog):
    with caplog.at_level("WARNING", logger="pkt.eval.sandbox"):
        assert run_program("assert True", isolation="off")["passed"]
    assert not caplog.records


def test_unknown_isolation_mode_is_a_one_line_error():
    with pytest.raises(PKTError, match="--sandbox: expected one of auto, require, off, got 'maybe'"):
        run_program("assert True", isolation="maybe")


def _fake_bwrap(tmp_path, monkeypatch, script):
    d = tmp_path / "fake_bin"
    d.mkdir()
    (d / "bwrap").write_text("#!/bin/sh\n" + script)
    (d / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}:/usr/bin:/bin")


def test_bwrap_that_cannot_sandbox_here_is_detected(tmp_path, monkeypatch):
    _fake_bwrap(tmp_path, monkeypatch, 'echo "bwrap: No permissions to create new namespace" >&2\nexit 1\n')
    iso = resolve_isolation("auto")
    assert not iso.bwrap and "No permissions to create new namespace" in iso.warning
    assert "isolation is OFF" in iso.warning
    with pytest.raises(PKTError, match="No permissions to create new namespace.*require"):
        resolve_isolation("require")


@needs_bwrap
def test_a_namespace_that_cannot_be_created_is_dropped_and_named(tmp_path, monkeypatch):
    real = BWRAP.bwrap[0]
    _fake_bwrap(tmp_path, monkeypatch, 'case "$*" in *--unshare-net*) echo "bwrap: loopback: Failed" >&2; exit 1;; esac\n'
                                       f'exec {real} "$@"\n')
    iso = resolve_isolation("require")
    assert iso.bwrap and "--unshare-net" not in iso.bwrap and "--unshare-pid" in iso.bwrap
    assert "cannot create net namespaces" in iso.warning


# ---- escapes past the guard, contained by bwrap ------------------------------------------------------

def _sandbox_processes(root: Path) -> list[str]:
    """Processes whose command line or working directory lies under root (the sandboxes' parent dir)."""
    found = []
    for p in glob.glob("/proc/[0-9]*"):
        try:
            cmd = Path(p, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(p + "/cwd")
        except OSError:
            continue
        if str(root) in cmd or str(root) in cwd:
            found.append(f"{p}: {cmd}")
    return found


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Sandboxes made under tmp_path/work; a host file tmp_path/host.txt. Afterwards: the file is
    untouched and no process of any sandbox is left (given a moment to be reaped)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    monkeypatch.setenv("TMPDIR", str(work))  # for the scorers started as subprocesses
    f = tmp_path / "host.txt"
    f.write_text("untouched")
    yield f
    assert f.read_text() == "untouched"
    deadline = time.time() + 2
    while _sandbox_processes(work) and time.time() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes(work) == []


def _score_in_subprocess(programs: list[str], env: dict | None = None) -> list[dict]:
    """Score programs in a separate scorer process (so an escape that kills it cannot kill pytest)."""
    code = ("import json, sys\nfrom pkt.eval.sandbox import run_programs\n"
            "print(json.dumps(run_programs(json.loads(sys.argv[1]), isolation='require')))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(programs)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"the scorer died: exit status {r.returncode}\n{r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_bwrap
def test_kill_of_the_parent_leaves_the_scorer_alive(host):
    kill = ("import os, posix\np = os.getppid()\n"
            "posix.kill(os.getppid(), 9)\n"
            "import time\ntime.sleep(0.3)\nassert os.getppid() != p  # the parent died")
    results = _score_in_subprocess([kill, "assert True"])
    assert [r["passed"] for r in results] == [False, True]


@needs_bwrap
def test_posix_system_cannot_touch_host_files(host):
    prog = f"import posix\nassert posix.system('echo owned > {host}') == 0"
    assert not run_program(prog, isolation="require")["passed"]


@needs_bwrap
def test_original_popen_from_subclasses_cannot_touch_host_files(host):
    prog = ("P = [c for c in object.__subclasses__() if c.__name__ == 'Popen'][0]\n"
            f"assert P(['/bin/sh', '-c', 'echo owned > {host}']).wait() == 0")
    assert not run_program(prog, isolation="require")["passed"]


@needs_bwrap
def test_posix_open_and_fileio_cannot_write_host_or_system_files(host):
    system_file = Path(sys.prefix, f"pkt_sandbox_probe_{os.getpid()}")  # in a directory the sandbox sees
    programs = [f"import posix\nfd = posix.open({str(host)!r}, posix.O_WRONLY | posix.O_TRUNC)\nposix.write(fd, b'owned')",
                f"import io\nio.FileIO({str(host)!r}, 'w').write(b'owned')",
                f"import io\nio.FileIO({str(system_file)!r}, 'w').write(b'owned')"]
    try:
        results = run_programs(programs, isolation="require")
        assert not system_file.exists()
    finally:
        system_file.unlink(missing_ok=True)
    assert not any(r["passed"] for r in results), results
    assert "Read-only file system" in results[2]["result"]


@needs_bwrap
def test_posix_unlink_cannot_remove_host_files(host):
    assert not run_program(f"import posix\nposix.unlink({str(host)!r})", isolation="require")["passed"]


@needs_bwrap
def test_raw_socket_cannot_reach_a_local_listener(host):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        prog = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))"
        assert not run_program(prog, isolation="require")["passed"]
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()


@needs_bwrap
def test_evaluator_environment_is_invisible(host):
    secret = secrets.token_hex(16)
    parent = "import os\nassert b'PKT_SANDBOX_SECRET' in open('/proc/%d/environ' % os.getppid(), 'rb').read()"
    anyone = ("import os\nseen = b''\nfor p in os.listdir('/proc'):\n"
              "    try:\n        seen += open('/proc/%s/environ' % p, 'rb').read()\n"
              "    except OSError:\n        pass\nassert b'PKT_SANDBOX_SECRET' in seen")
    own = "import os\nassert 'PKT_SANDBOX_SECRET' in os.environ"
    results = _score_in_subprocess([parent, anyone, own], env={"PKT_SANDBOX_SECRET": secret})
    assert not any(r["passed"] for r in results), results
    assert secret not in json.dumps(results)


@needs_bwrap
def test_host_file_system_is_invisible(host):
    assert run_program(f"import os\nassert os.path.exists({str(host)!r})", isolation="off")["passed"]
    for path in (host, __file__, "/sys", "/run", "/var"):
        assert not run_program(f"import os\nassert os.path.exists({str(path)!r})", isolation="require")["passed"], path


@needs_bwrap
def test_setsid_child_dies_with_the_program(host):
    late = host.parent / "late.txt"
    prog = ("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(2)\n"
            f"    posix.write(posix.open({str(late)!r}, posix.O_WRONLY | posix.O_CREAT), b'late')\n"
            "    posix.write(posix.open('late.txt', posix.O_WRONLY | posix.O_CREAT), b'late')\n")
    run_program(prog, isolation="require")
    assert _sandbox_processes(host.parent / "work") == []
    time.sleep(2.5)  # past the moment the child would have written
    assert not late.exists()


@needs_bwrap
def test_sandbox_dies_with_the_scorer(host):
    code = ("from pkt.eval.sandbox import run_program\n"
            "run_program('import time\\ntime.sleep(60)', timeout=60, isolation='require')")
    scorer = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    try:
        deadline = time.time() + 20
        while not any(".runner.py" in p and "bwrap" not in p for p in _sandbox_processes(host.parent / "work")):
            assert time.time() < deadline and scorer.poll() is None, "the program never started"
            time.sleep(0.05)
    finally:
        scorer.kill()
        scorer.wait()
    # the fixture checks that nothing of the sandbox is left once the scorer is gone
