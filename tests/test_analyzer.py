"""The streaming analyzer on recorded real-kernel traces (tests/data) and on
synthetic block streams: layout learning, the jbd2/XFS consistent-point
rules, and the encryption detector's decisions."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analyzer import trace as tr
from analyzer import workloads as wl
from analyzer.detector import DetectorConfig, EncryptionDetector
from analyzer.entropy import BlockStats
from analyzer.events import Event
from analyzer.stream import VbdAnalyzer

DATA = Path(__file__).parent / "data"
EXT4 = DATA / "ext4-small.trace.gz"  # mkfs.ext4, mount, files, fsync'd log, rename, umount
XFS = DATA / "xfs-small.trace.gz"  # the same on mkfs.xfs
MB = 1 << 20


def feed_all(records, **kw):
    a = VbdAnalyzer(**kw)
    evs = []
    for r in records:
        evs += a.feed(r.seq, r.time_ns, r.sector, r.data) if r.kind == tr.WRITE else a.flush(r.seq, r.time_ns)
    evs += a.finish()
    return a, evs


def renumber(records):
    return [tr.Record(r.kind, i, r.time_ns, r.offset, r.data) for i, r in enumerate(records)]


def tids(evs):
    return {t for e in evs if e.consistent for t in e.detail.get("tids", ())}


# ------------------------------------------------------------ real traces
def test_ext4_trace_gives_filesystem_mount_consistent_points_and_clean_unmount():
    a, evs = feed_all(tr.read(EXT4))
    kinds = [e.kind for e in evs]
    assert kinds[:2] == ["fs_identified", "mount"]
    assert evs[0].fstype == "ext4" and evs[0].offset == 0 and evs[0].detail["journal"]
    cons = [e for e in evs if e.consistent]
    assert len(cons) >= 8
    assert all(e.detail["reason"] == "jbd2_commit" for e in cons[:-1])
    assert kinds[-2:] == ["unmount", "fs_consistent"] and cons[-1].detail["reason"] == "clean_unmount"
    flushes = {r.seq for r in tr.read(EXT4) if r.kind == tr.FLUSH}
    assert all(e.seq in flushes for e in cons)  # a consistent point is always a flush
    assert a.alarm is None and a.state()["data_state"] == "consistent"


def test_xfs_trace_gives_log_commit_points_and_unmount_record():
    a, evs = feed_all(tr.read(XFS))
    assert evs[0].kind == "fs_identified" and evs[0].fstype == "xfs"
    cons = [e for e in evs if e.consistent]
    assert len(cons) >= 8
    assert cons[-1].detail["reason"] == "clean_unmount"
    assert {e.kind for e in evs} >= {"mount", "unmount"}
    assert a.alarm is None


def _jbd2_writes(records):
    """{(tid, blocktype): index in records} of the writes starting with a jbd2 block."""
    out = {}
    for i, r in enumerate(records):
        if r.kind == tr.WRITE and r.data[:4] == b"\xc0\x3b\x39\x98":
            btype, tid = int.from_bytes(r.data[4:8], "big"), int.from_bytes(r.data[8:12], "big")
            out.setdefault((tid, btype), i)
    return out


def test_a_commit_with_a_bad_checksum_is_not_a_consistent_point():
    recs = list(tr.read(EXT4))
    i = _jbd2_writes(recs)[(3, 2)]
    d = bytearray(recs[i].data)
    d[0x30] ^= 0xFF  # h_commit_sec, covered by the commit block checksum
    recs[i] = tr.Record(tr.WRITE, recs[i].seq, recs[i].time_ns, recs[i].offset, bytes(d))
    _, evs = feed_all(recs)
    # recovery would stop at tid 3, so tid 4 (chained after it) is not tagged either
    assert 3 not in tids(evs) and 4 not in tids(evs) and 2 in tids(evs)


def test_a_transaction_whose_descriptor_never_arrived_is_not_a_consistent_point():
    recs = list(tr.read(EXT4))
    del recs[_jbd2_writes(recs)[(3, 1)]]
    _, evs = feed_all(recs)
    assert 3 not in tids(evs) and 2 in tids(evs)


def test_a_logged_block_that_does_not_match_its_tag_checksum_is_not_a_consistent_point():
    recs = list(tr.read(EXT4))
    i = _jbd2_writes(recs)[(3, 1)]
    d = bytearray(recs[i].data)
    assert len(d) > 4096  # descriptor and its logged blocks in one write
    d[4096 + 100] ^= 0x01
    recs[i] = tr.Record(tr.WRITE, recs[i].seq, recs[i].time_ns, recs[i].offset, bytes(d))
    _, evs = feed_all(recs)
    assert 3 not in tids(evs)


def test_async_commit_before_its_descriptor_is_tagged_only_after_the_flush_following_both():
    recs = list(tr.read(EXT4))
    w = _jbd2_writes(recs)
    di, ci = w[(3, 1)], w[(3, 2)]
    commit = recs.pop(ci)
    # commit block first, then a flush, then the descriptor and its blocks, then a flush
    recs[di:di] = [commit, tr.Record(tr.FLUSH, 0, 0, 0, b"")]
    recs = renumber(recs)
    a, evs = feed_all(recs)
    desc_seq = next(r.seq for r in recs if r.kind == tr.WRITE and r.data[:12] ==
                    b"\xc0\x3b\x39\x98" + (1).to_bytes(4, "big") + (3).to_bytes(4, "big"))
    tagged = [e for e in evs if e.consistent and 3 in e.detail.get("tids", ())]
    assert len(tagged) == 1 and tagged[0].seq > desc_seq


def test_learning_from_the_image_finds_the_filesystem_without_seeing_mkfs(tmp_path):
    recs = list(tr.read(EXT4))
    _, evs = feed_all(recs)
    mount_at = next(e.seq for e in evs if e.kind == "mount")  # seq == index in this trace
    img = bytearray(64 * MB)
    for r in recs[:mount_at]:
        if r.kind == tr.WRITE:
            img[r.offset:r.offset + len(r.data)] = r.data
    a = VbdAnalyzer()
    evs = a.learn(lambda off, n: bytes(img[off:off + n]))
    assert evs and evs[0].kind == "fs_identified" and evs[0].fstype == "ext4"
    for r in recs[mount_at:]:
        evs += a.feed(r.seq, r.time_ns, r.sector, r.data) if r.kind == tr.WRITE else a.flush(r.seq, r.time_ns)
    assert sum(e.consistent for e in evs) >= 3


# ------------------------------------------------------------ block statistics
def blocks(data: bytes) -> np.ndarray:
    return np.frombuffer(data[:len(data) // 4096 * 4096], np.uint8).reshape(-1, 4096)


def test_block_statistics_tell_random_structured_and_intermittent_apart():
    text = wl.text(2 * MB)
    s = BlockStats(blocks(text))
    assert s.structured.all() and not s.random.any() and not s.intermittent.any()
    s = BlockStats(blocks(os.urandom(2 * MB)))
    assert s.random.all() and not s.intermittent.any() and not s.partial.any()
    s = BlockStats(blocks(wl.encrypt(text, "intermittent")))
    assert s.intermittent.all() and not s.random.any()
    half = b"".join(os.urandom(2048) + text[i:i + 2048] for i in range(0, 1 * MB, 4096))
    assert BlockStats(blocks(half)).partial.all()
    e = BlockStats(blocks(os.urandom(64 * 4096))).entropy()
    assert (e > 7.3).all()


def test_signatures_of_compressed_and_media_files_are_recognised():
    for data in (wl.zip_file(MB), wl.xz_file(MB), wl.zstd_file(MB), wl.gzip_log(MB), wl.jpeg_file(MB),
                 wl.mp4_file(MB)):
        assert BlockStats(blocks(data[:8192])).signature[0], data[:8]
    assert not BlockStats(blocks(os.urandom(8192))).signature.any()


# ------------------------------------------------------------ detector decisions
def _files(a, nfiles=64, size=MB, base=64 * MB, seq=0):
    files = []
    for i in range(nfiles):
        off = base + i * (size + 65536)
        data = wl.text(size, i)
        a.feed(seq, seq, off // 512, data)
        a.flush(seq + 1, seq + 1)
        seq += 2
        files.append((off, data))
    return files, seq


@pytest.mark.parametrize("mode", wl.MODES)
def test_in_place_encryption_alarms_naming_the_first_write_and_a_recovery_point(mode):
    a = VbdAnalyzer()
    files, seq = _files(a, 128)
    a.consistent.append((seq - 1, 0, "a consistent point"))  # as a tracker would have tagged
    a._cseqs.append(seq - 1)
    first = seq
    written = 0
    for off, data in files:
        enc = wl.encrypt(data, mode)[:wl.encrypted_extent(data, mode)]
        a.feed(seq, seq * 10, off // 512, enc)
        written += len(enc)
        seq += 1
        if a.alarm:
            break
    a.finish()
    assert a.alarm is not None
    d = a.alarm.detail
    assert d["first_seq"] == first and d["first_time_ns"] == first * 10
    assert d["recommended_seq"] == first - 1
    assert written <= 8 * MB


def test_new_random_files_archives_and_package_upgrades_raise_nothing():
    a = VbdAnalyzer()
    files, seq = _files(a, 32)
    new = 1024 * MB
    for data in (os.urandom(16 * MB), wl.encrypted_video(8 * MB), wl.zip_file(2 * MB), wl.xz_file(2 * MB)):
        a.feed(seq, seq, new // 512, data)
        new += len(data) + MB
        seq += 1
    # archives written over structured blocks, but behind their signature
    z = wl.zstd_file(MB)
    for (off, _), data in zip(files, [z] * 16):
        a.feed(seq, seq, off // 512, data[:MB // 4096 * 4096])
        seq += 1
    for off, _ in files[16:]:  # upgrade: new structured versions in place
        a.feed(seq, seq, off // 512, wl.text(MB, 1000 + seq))
        seq += 1
    a.finish()
    t = a.detector.totals
    assert a.alarm is None, t
    assert t["random_new"] >= 24 * MB and t["signature"] >= 12 * MB


@pytest.mark.parametrize("name", ["zip", "xz", "zstd", "gzip_logs", "jpeg", "mp4", "encrypted_video",
                                  "package_upgrade", "compile"])
def test_each_benign_workload_of_the_issue_raises_nothing(name):
    """Issue 8's benign list, one stream each after a structured baseline, as
    `xentap bench analyzer` counts its false alarms (LUKS: the next tests)."""
    from xentap import bench_analyzer
    assert name in bench_analyzer.BENIGN
    assert bench_analyzer.benign_alarm(name) is False


def test_compiled_code_is_structured_not_random():
    s = BlockStats(blocks(wl.compile_output(2 * MB, 1)))
    assert not s.random.any() and not s.intermittent.any()


def test_a_sequentially_written_archive_stays_covered_by_its_signature_across_writes():
    a = VbdAnalyzer()
    files, seq = _files(a, 32)
    z = wl.zip_file(8 * MB)
    off = files[0][0]
    for j in range(0, 8 * MB, 128 << 10):  # over the old files, in 128 KiB writes
        a.feed(seq, seq, (off + j) // 512, z[j:j + (128 << 10)])
        seq += 1
    a.finish()
    assert a.alarm is None and a.detector.totals["overwrite"] == 0


def test_the_baseline_is_relative_to_the_vbd():
    """A VBD that always rewrites some structured blocks with random data (its
    normal) does not alarm on it; encrypting everything still does."""
    cfg = DetectorConfig(window_bytes=4 * MB)
    a = VbdAnalyzer(detector=cfg)
    files, seq = _files(a, 96, 256 << 10)
    for rnd in range(6):
        for k, (off, data) in enumerate(files):
            chunk = os.urandom(256 << 10) if k % 10 == 0 else wl.text(256 << 10, rnd * 1000 + k)
            a.feed(seq, seq, off // 512, chunk)
            seq += 1
            if k % 10 == 0:  # the random block goes back to structured for the next round
                a.feed(seq, seq, off // 512, wl.text(256 << 10, k))
                seq += 1
    a.finish()
    assert a.alarm is None and a.detector.baseline > 0.02
    for off, data in files:
        a.feed(seq, seq, off // 512, wl.encrypt(data, "whole"))
        seq += 1
    a.finish()
    assert a.alarm is not None


def test_sensitivity_changes_how_much_encryption_it_takes():
    def amount(sens):
        a = VbdAnalyzer(detector=DetectorConfig(sensitivity=sens, batch_blocks=64))
        files, seq = _files(a, 64)
        n = 0
        for off, data in files:
            a.feed(seq, seq, off // 512, wl.encrypt(data))
            seq += 1
            n += len(data)
            if a.alarm:
                return n
    assert amount(4.0) < amount(1.0) < amount(0.5)


@pytest.mark.parametrize("kw", [{"sensitivity": 0}, {"window_bytes": 1000}, {"batch_blocks": 0}])
def test_bad_detector_settings_are_refused(kw):
    with pytest.raises(ValueError):
        EncryptionDetector(DetectorConfig(**kw))


@pytest.mark.skipif(not shutil.which("cryptsetup"), reason="no cryptsetup")
def test_a_luks_volume_is_recognised_and_its_ciphertext_not_alarmed_on(tmp_path):
    img = tmp_path / "luks.img"
    with open(img, "wb") as f:
        f.truncate(32 * MB)
    p = subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", str(img), "-"], input=b"pw", capture_output=True)
    if p.returncode:
        pytest.skip(p.stderr.decode().strip())
    a = VbdAnalyzer()
    files, seq = _files(a, 32, MB, base=16 * MB)  # structured data was there before
    evs = a.feed(seq, seq, 0, img.read_bytes()[:16 * MB])
    assert any(e.kind == "volume_encrypted" for e in evs)
    for off, data in files:
        a.feed(seq, seq, off // 512, wl.luks_sector_data(data, sector=off // 512))
        seq += 1
    a.finish()
    assert a.alarm is None


def test_events_become_journal_tag_arguments():
    e = Event("fs_consistent", 42, 7, 0, "ext4", "ext4 jbd2 commit tid 9" + "x" * 200)
    kw = e.tag_kwargs()
    assert kw["seq"] == 42 and kw["consistent"] is True and kw["timestamp_ns"] == 7
    assert kw["label"].startswith("fs_consistent: ext4") and len(kw["label"].encode()) <= 128
    assert Event("mount", 1, 0).tag_kwargs()["consistent"] is False
    json.dumps(e.as_dict())


def test_trace_files_round_trip_and_garbage_is_refused(tmp_path):
    p = tmp_path / "t.trace.gz"
    with tr.Writer(p) as w:
        w.write(4096, b"a" * 512, 5)
        w.flush(6)
    got = list(tr.read(p))
    assert [(r.kind, r.seq, r.offset, r.sector) for r in got] == [(1, 0, 4096, 8), (2, 1, 0, 0)]
    bad = tmp_path / "bad"
    bad.write_bytes(b"nope")
    with pytest.raises(tr.TraceError):
        list(tr.read(bad))


# ------------------------------------------------------------ CLI
XENTAP = [sys.executable, "-m", "xentap.cli"]


def cli(*args):
    return subprocess.run([*XENTAP, *args], capture_output=True, text=True, timeout=120)


def test_cli_analyze_prints_events_and_json_state():
    r = cli("analyze", str(EXT4))
    assert r.returncode == 0, r.stderr
    assert "fs_consistent" in r.stdout and "data state: consistent" in r.stdout
    r = cli("analyze", str(EXT4), "--json")
    out = json.loads(r.stdout)
    assert out["state"]["filesystems"][0]["type"] == "ext4"
    assert sum(e["consistent"] for e in out["events"]) == out["state"]["consistent_points"]


@pytest.mark.parametrize("args,message", [
    (("analyze", "/nonexistent/trace"), "no such trace"),
    (("analyze", __file__), "not a write trace"),
    (("analyze", str(EXT4), "--sensitivity", "0"), "sensitivity must be"),
    (("analyze", str(EXT4), "--window", "lots"), "not a size"),
    (("bench", "analyzer", "--size", "1M"), "at least 16M"),
])
def test_cli_bad_input_is_one_line(args, message):
    r = cli(*args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_bench_analyzer_json_has_the_issue_keys():
    r = cli("bench", "analyzer", "--synthetic-only", "--size", "32M", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in ("throughput_mb_s", "detection_mb", "intermittent_detection_mb", "false_alarms",
              "consistent_fsck_clean"):
        assert k in out
    assert out["throughput_mb_s"] > 0 and out["false_alarms"] == 0
    assert out["detection_mb"] <= 64 and out["intermittent_detection_mb"] <= 64


@pytest.mark.skipif(not shutil.which("mkntfs"), reason="no mkntfs")
def test_ntfs_restart_area_updates_followed_by_a_flush_are_consistent_points(tmp_path):
    """A real mkntfs volume; the $LogFile restart pages are built by the documented
    layout (no Linux tool writes them, see tests/test_formats_ntfs.py)."""
    from tests.test_formats_ntfs import restart_page
    img = tmp_path / "ntfs.img"
    with open(img, "wb") as f:
        f.truncate(32 * MB)
    subprocess.run(["mkntfs", "-Q", "-F", str(img)], check=True, capture_output=True)
    a = VbdAnalyzer()
    evs = a.feed(0, 0, 0, img.read_bytes()[:1 * MB])
    assert evs[0].kind == "fs_identified" and evs[0].fstype == "ntfs"
    log = 4 * MB  # where the restart pages go (the tracker reads them anywhere in the volume)
    evs = a.feed(1, 1, log // 512, restart_page(clean=False)[1])
    assert [e.kind for e in evs] == ["mount"]
    evs = a.flush(2, 2)
    assert [e.kind for e in evs] == ["fs_consistent"] and evs[0].detail["reason"] == "ntfs_restart"
    torn = bytearray(restart_page(clean=False)[1])
    torn[4094] ^= 0xFF
    a.feed(3, 3, log // 512, bytes(torn))
    assert a.flush(4, 4) == []
    evs = a.feed(5, 5, (log + 4096) // 512, restart_page(clean=True)[1]) + a.flush(6, 6)
    assert [e.kind for e in evs] == ["unmount", "fs_consistent"]


# ------------------------------------------------------------ hostile input
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_RECS = None


def _ext4_records():
    global _RECS
    if _RECS is None:
        _RECS = list(tr.read(EXT4))
    return _RECS


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 4095), st.integers(0, 255)), max_size=40),
       st.lists(st.tuples(st.integers(0, 1 << 17), st.binary(min_size=512, max_size=8192)), max_size=8))
def test_mutated_and_garbage_writes_never_crash_the_analyzer_nor_tag_a_mutated_transaction(flips, extra):
    """Guest data is hostile: bytes flipped anywhere in a real trace, and
    garbage writes (over the partition table and superblocks too), never
    raise; a transaction one of whose journal blocks was mutated is never
    tagged consistent."""
    recs = _ext4_records()
    out = [[r.kind, r.seq, r.time_ns, r.offset, r.data] for r in recs]
    mutated_tids = set()
    for i, pos, val in flips:
        r = out[i % len(out)]
        if r[0] != tr.WRITE:
            continue
        d = bytearray(r[4])
        p = pos % len(d)
        if d[p] == val:
            continue
        block = d[p - p % 4096:p - p % 4096 + 12]
        if block[:4] == b"\xc0\x3b\x39\x98":
            mutated_tids.add(int.from_bytes(block[8:12], "big"))
        d[p] = val
        r[4] = bytes(d)
    a = VbdAnalyzer()
    evs = []
    for k, (kind, seq, t, off, data) in enumerate(out):
        if kind == tr.WRITE:
            evs += a.feed(seq, t, off // 512, data)
        else:
            evs += a.flush(seq, t)
        if k < len(extra):
            sector, junk = extra[k]
            evs += a.feed(seq, t, (sector * 8) if k % 2 else k, junk)
    evs += a.finish()
    a.state()
    # a mutated descriptor/commit/revoke block's own transaction is never tagged,
    # unless the mutation left a block the checksums still accept (then it is the same block)
    tagged = tids(evs)
    for tid in mutated_tids:
        if tid in tagged:
            pytest.fail(f"transaction {tid} tagged although one of its journal blocks was mutated")


def test_block_state_memory_is_bounded_and_evicted_blocks_fall_back_to_the_replica():
    old = {}
    cfg = DetectorConfig(state_chunks=2)
    a = VbdAnalyzer(detector=cfg, read_old=lambda off, n: old.get(off, bytes(n)))
    region = 4 << 30  # one state chunk covers 4 GiB of disk
    seq = 0
    files = []
    for k in range(4):  # structured files in 4 regions: only 2 regions' states are kept
        off = k * region + 64 * MB
        data = wl.text(8 * MB, k)
        a.feed(seq, seq, off // 512, data)
        seq += 1
        files.append((off, data))
        for j in range(0, len(data), 4096):
            old[off + j] = data[j:j + 4096]  # the replica has what was written
    a.finish()
    assert len(a.detector._state) == 2
    off, data = files[0]  # its state was evicted: the replica tells it was structured
    a.feed(seq, seq, off // 512, wl.encrypt(data))
    a.finish()
    assert a.detector.totals["overwrite"] >= 4 * MB


def test_an_xfs_log_record_with_a_bad_crc_ends_the_consistent_points_until_unmount():
    recs = list(tr.read(XFS))
    _, evs = feed_all(recs)
    tagged = {e.seq for e in evs if e.consistent and e.detail["reason"] == "xfs_log_commit"}
    # the log record write just before a tagged flush
    flush_seq = sorted(tagged)[len(tagged) // 2]
    i = max(k for k, r in enumerate(recs) if r.seq < flush_seq and r.kind == tr.WRITE
            and r.data[:4] == b"\xfe\xed\xba\xbe")
    assert all(r.kind == tr.FLUSH or r.data[:4] != b"\xfe\xed\xba\xbe" for r in recs[i + 1:]
               if r.seq < flush_seq)
    d = bytearray(recs[i].data)
    d[512 + 40] ^= 0x5A  # in the record's data, covered by h_crc
    recs[i] = tr.Record(tr.WRITE, recs[i].seq, recs[i].time_ns, recs[i].offset, bytes(d))
    _, evs2 = feed_all(recs)
    tagged2 = {e.seq for e in evs2 if e.consistent and e.detail["reason"] == "xfs_log_commit"}
    # log recovery would fail at that record: no commit after it is consistent,
    # those before it still are, and so is the clean unmount at the end
    assert tagged2 == {q for q in tagged if q < flush_seq}
    assert [e for e in evs2 if e.consistent][-1].detail["reason"] == "clean_unmount"
