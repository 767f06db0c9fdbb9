"""Issue 8's first check as it is written: every point the analyzer in the
appliance tagged filesystem-consistent in the journal, restored from that
journal (``Journal.restore`` at the tag's seq, as ``xentap journal restore
--checkpoint`` does), passes the filesystem's own check (e2fsck -fn after
journal replay).  The stream is a real kernel's ext4 trace (tests/data)
sent through a real receiver; tests/test_analyzer_fs.py does the same on
images rebuilt from longer ext4 and XFS traces recorded on the spot."""
from __future__ import annotations

import shutil
import uuid

import pytest

from analyzer.checks import fsck_clean
from engines.journal import Journal
from tests.test_analysis_appliance import ext4_stream, offline, rx, send_all, wait_tags  # noqa: F401 (rx: fixture)


@pytest.mark.skipif(not shutil.which("e2fsck"), reason="no e2fsck")
def test_every_consistent_tag_restored_from_the_journal_passes_e2fsck(rx, tmp_path):  # noqa: F811
    vbd = uuid.uuid4()
    ops = ext4_stream()
    send_all(rx, ops, vbd)
    _, evs = offline(ops)
    vdir = tmp_path / "appliance" / str(vbd)
    tags = wait_tags(vdir, len(evs))
    points = [c for c in tags if c.consistent]
    assert len(points) >= 5 and len(points) == sum(e.consistent for e in evs)
    j = Journal.open(vdir / "journal")
    bad = []
    try:
        for c in points:
            img = tmp_path / "restored.img"
            j.restore(img, seq=c.seq)
            ok, out = fsck_clean("ext4", img, tmp_path)
            if not ok:
                bad.append((c.seq, c.label, out[-300:]))
    finally:
        j.close()
    assert not bad, f"{len(bad)} of {len(points)} consistent tags fail e2fsck: {bad[:2]}"
