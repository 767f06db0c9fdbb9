"""The demo and the datapath benchmark as a user runs them: the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xentap.bench_datapath import DiskMeter

XENTAP = [sys.executable, "-m", "xentap.cli"]


def run(*args, **kw):
    return subprocess.run([*XENTAP, *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_demo_verifies_every_sector_then_restores_a_clean_disk_after_ransomware(tmp_path):
    r = run("demo", "--dir", str(tmp_path), "--size", "32M", "--seconds", "1")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "demo: data path OK: every sector of the 32 MiB disk read back as written" in r.stdout
    assert "IOPS" in r.stderr           # the progress line
    out = r.stdout
    assert "demo: filesystem found: ext4 at byte 0" in out
    assert "filesystem-consistent" in out and "demo: ALARM: mass encryption suspected from write" in out
    assert "e2fsck -fn after journal replay: clean" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("demo: OK: the restored disk (seq "), last
    assert "is clean and free of the encrypted data" in last


@pytest.mark.slow
def test_bench_datapath_json_has_a_ratio_per_workload(tmp_path):
    r = run("bench", "datapath", "--dir", str(tmp_path), "--size", "64M", "--seconds", "0.5",
            "--repeat", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for name in ("randwrite_4k_qd32", "randread_4k_qd32", "seqwrite_1m_qd8"):
        assert out[name]["ratio"] > 0
        assert out[name]["fio_iops"] > 0 and out[name]["shim_iops"] > 0
        if DiskMeter(str(tmp_path)).stat:     # the image on a block device: its figures
            for side in ("fio", "shim"):
                assert out[name]["disk"][side]["ios_per_s"] > 0, out[name]["disk"]
        t = out[name]["time_us"]
        assert t["fio"]["round_trip"] > 0 and t["shim"]["at_engine"] > 0, t
        assert t["shim"]["round_trip"] == pytest.approx(
            sum(t["shim"][k] for k in ("to_engine", "at_engine", "to_answer", "guest")), abs=1), t
        assert 0 < t["shim"]["wake"] < t["shim"]["round_trip"] and t["shim"]["ios_per_wake"] >= 1, t
    assert 0 <= out["rss_mib_per_vbd"] < 32


@pytest.mark.parametrize("args,message", [
    (("demo", "--size", "lots"), "not a size"),
    (("demo", "--size", "1M"), "at least 16M"),
    (("bench", "datapath", "--size", "1M"), "at least 64M"),
    (("bench", "datapath", "--seconds", "0"), "--seconds must be > 0"),
    (("demo", "--seconds", "-1"), "--seconds must be > 0"),
    (("demo", "--seconds", "nan"), "--seconds must be > 0"),
    (("keys", "--dir", "/proc/no-such-dir", "--role", "dom0"), "No such file or directory: /proc/no-such-dir"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    r = run(*args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
