"""The sandbox contains hostile programs (each a failure) and the pass@k estimator is exact."""
import os
import tempfile
import time
from math import comb
from pathlib import Path

import pytest

from pkt.eval.passk import pass_at_k
from pkt.eval.sandbox import run_program, run_programs


def test_pass_at_k_matches_combinatorics():
    for n in range(1, 21):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                direct = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12)
    assert pass_at_k(20, 5, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_good_and_bad_programs():
    assert run_program("x = 1\nassert x == 1")["passed"]
    assert not run_program("assert 1 == 2")["passed"]
    assert not run_program("def f(:\n")["passed"]  # syntax error
    # early exits never count as a pass
    for prog in ("exit(0)", "import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"):
        assert not run_program(prog)["passed"], prog
    # the program may use its own working directory
    assert run_program("open('a.txt', 'w').write('hi')\nassert open('a.txt').read() == 'hi'")["passed"]


def test_hostile_programs_are_contained():
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
        results = run_programs(list(hostile.values()), timeout=1.0, workers=4)
        assert time.time() - t0 < 30
        for name, r in zip(hostile, results):
            assert not r["passed"], (name, r)
        assert sentinel.read_text() == "alive"
        assert results[0]["result"] == "timed out"
        # the runner still works afterwards
        assert run_program("assert True")["passed"]
    finally:
        sentinel.unlink()


def test_timeout_kills_process_group():
    # a child that escaped the guard would keep running; the group kill reaps whatever is left
    t0 = time.time()
    r = run_program("import time\nwhile True: time.sleep(0.01)", timeout=0.5)
    assert r["result"] == "timed out" and time.time() - t0 < 5
