"""rrt.hostmem: the entry points' one re-exec under glibc's huge-page malloc tunable keeps argv and environment."""

import json
import os
import subprocess
import sys

import pytest

from rrt import hostmem

SCRIPT = """
import json, os, sys
from rrt import hostmem
with open(sys.argv[1], "a") as f:
    f.write("run\\n")
hostmem.reexec_with_hugepages()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:], "keep": os.environ.get("KEEP")}))
"""


def run(tmp_path, **env):
    script, runs = tmp_path / "s.py", tmp_path / "runs.txt"
    script.write_text(SCRIPT)
    full = {**os.environ, "KEEP": "me", **env}
    out = subprocess.run([sys.executable, str(script), str(runs), "--flag=x y"], env=full, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout), runs.read_text().count("run")


@pytest.mark.skipif(not hostmem.supported(), reason="huge-page malloc needs Linux, glibc and transparent huge pages")
def test_reexec_adds_the_tunable_once_and_keeps_argv_env_and_other_tunables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RRT_HUGEPAGES")}
    out, runs = run(tmp_path, **env, GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
    assert out["tunables"] == "glibc.malloc.tcache_count=7:" + hostmem.TUNABLE
    assert out["argv"] == [str(tmp_path / "runs.txt"), "--flag=x y"] and out["keep"] == "me"
    assert runs == 2  # the original process and its one replacement, no loop


def test_no_reexec_when_switched_off_or_already_set(tmp_path):
    out, runs = run(tmp_path, RRT_HUGEPAGES="0", GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
    assert (out["tunables"], runs) == ("glibc.malloc.tcache_count=7", 1)
    out, runs = run(tmp_path, RRT_HUGEPAGES="1", GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert out["tunables"] == "glibc.malloc.hugetlb=0"  # the user's own choice wins


def test_without_tunable_restores_the_environment_before():
    env = hostmem.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7", "A": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=7:" + hostmem.TUNABLE
    assert hostmem.without_tunable(env) == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7", "A": "1"}
    assert hostmem.without_tunable(hostmem.with_tunable({"A": "1"})) == {"A": "1"}
