"""Record the ordered writes a real kernel makes to a disk image.

``Capture(image, trace)`` serves ``image`` through the small FUSE program
``fusetrace.c`` (built on first use with libfuse3) and puts a loop device on
it (direct I/O): whatever runs on that loop device (mkfs, a mounted
filesystem, cryptsetup) has its writes and flushes recorded in order in
``trace`` (see :mod:`analyzer.trace`).  Needs root, /dev/fuse, loop devices
and libfuse3-dev.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class CaptureUnavailable(RuntimeError):
    pass


def build(cache: str | os.PathLike | None = None) -> Path:
    """Compile fusetrace (once); returns the binary's path."""
    out = Path(cache or os.environ.get("XENTAP_CACHE", "/tmp/xentap-cache")) / "fusetrace"
    src = HERE / "fusetrace.c"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise CaptureUnavailable(f"libfuse3-dev is needed to build fusetrace: {e}") from None
    tmp = out.with_suffix(".tmp")
    subprocess.run(["cc", "-O2", "-o", str(tmp), str(src), *flags], check=True, capture_output=True)
    tmp.rename(out)
    return out


def available() -> str | None:
    """None when captures can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not shutil.which("losetup"):
        return "no losetup"
    try:
        build()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


class Capture:
    """Context manager: ``with Capture(img, trace) as dev: run tools on dev``."""

    def __init__(self, image: str | os.PathLike, trace: str | os.PathLike):
        self.image = Path(image)
        self.trace = Path(trace)
        self.mnt = Path(tempfile.mkdtemp(prefix="xt-fusetrace-"))
        self.proc = None
        self.dev = None

    def __enter__(self) -> str:
        exe = build()
        self.proc = subprocess.Popen([str(exe), str(self.image), str(self.trace), str(self.mnt), "-f", "-s"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        disk = self.mnt / "disk"
        for _ in range(100):
            if disk.exists():
                break
            if self.proc.poll() is not None:
                raise CaptureUnavailable(f"fusetrace: {self.proc.stderr.read().decode().strip()}")
            time.sleep(0.05)
        else:
            self._stop()
            raise CaptureUnavailable("fusetrace did not come up")
        self.dev = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", str(disk)], check=True,
                                  capture_output=True, text=True).stdout.strip()
        return self.dev

    def _stop(self) -> None:
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None
        if self.proc is not None:
            for _ in range(50):
                if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.mnt, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self._stop()


def rebuild(trace_path, base: bytes | None, size: int, upto_seq: int, out: str | os.PathLike) -> None:
    """Write the image as of ``upto_seq``: ``base`` (or zeros) plus every write with seq <= upto_seq."""
    from analyzer import trace as tr
    with open(out, "wb") as f:
        f.truncate(size)
        if base:
            f.write(base)
        for r in tr.read(trace_path):
            if r.seq > upto_seq:
                break
            if r.kind == tr.WRITE:
                f.seek(r.offset)
                f.write(r.data)
