"""Every input the fuzzer has ever failed on (tests/fuzz/regressions/), and
its seed corpus, replayed through the fuzz harness (ffi/fuzz_ring.c) under
ASan+UBSan: each must run clean, forever after."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"


def inputs(folder: str) -> list[Path]:
    return sorted(p for p in (FUZZ / folder).iterdir() if p.is_file() and p.suffix != ".md")


def replay(files: list[Path]) -> subprocess.CompletedProcess:
    if not any(shutil.which(c) for c in ("clang", "clang-19", "clang-16", "clang-15", "clang-14")):
        pytest.skip("no clang for the libFuzzer harness (make setup installs clang-14)")
    return subprocess.run([str(ROOT / "tools" / "fuzz.sh"), "replay", *map(str, files)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_fuzz_regressions_replay_clean():
    files = inputs("regressions")
    assert files, "tests/fuzz/regressions/ holds every crash the fuzzer found"
    r = replay(files)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("Executed ") == len(files), r.stderr[-2000:]


def test_fuzz_seed_corpus_replays_clean():
    files = inputs("corpus")
    assert len(files) >= 20
    r = replay(files)
    assert r.returncode == 0, r.stderr[-4000:]
