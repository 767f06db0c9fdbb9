"""Tests for xentap.wire: codec round trips, frame validation, StreamChecker."""

import dataclasses
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xentap import wire as w

SET = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
uuids = st.uuids()
labels = st.text(max_size=40).filter(lambda s: len(s.encode()) <= w.MAX_LABEL_BYTES)
vdevs = st.text(max_size=12).filter(lambda s: len(s.encode()) <= w.MAX_VDEV_BYTES)
flag_sets = st.sampled_from([0, w.WriteFlags.FUA, w.WriteFlags.DISCARD, w.WriteFlags.ZEROES,
                             w.WriteFlags.FUA | w.WriteFlags.ZEROES])


@st.composite
def records(draw, seq):
    flags = int(draw(flag_sets))
    if flags & w.NO_DATA_FLAGS:
        length, data = draw(st.integers(1, 2**32 - 1)), b""
    else:
        data = draw(st.binary(max_size=600))
        length = len(data)
    return w.WriteRecord(seq, draw(u64), draw(u64), length, flags, data)


@st.composite
def writes(draw, stream_id=u64, epoch=u32):
    first = draw(st.integers(1, 2**63))
    n = draw(st.integers(1, 8))
    recs = [draw(records(first + i)) for i in range(n)]
    return w.Writes(stream_id=draw(stream_id), epoch=draw(epoch), first_seq=first, records=recs)


@st.composite
def resyncs(draw):
    zero = draw(st.booleans())
    data = b"" if zero else draw(st.binary(max_size=600))
    length = draw(u32) if zero else len(data)
    return w.Resync(stream_id=draw(u64), epoch=draw(u32), seq=draw(u64), sector=draw(u64),
                    length=length, flags=int(w.WriteFlags.ZEROES) if zero else 0, data=data)


def hdr(**kw):
    return dict(stream_id=kw.get("stream_id", u64), epoch=kw.get("epoch", u32))


messages = st.one_of(
    st.builds(w.Hello, **hdr(), host_id=uuids, vbd_uuid=uuids, domid=u16, devid=u32,
              vdev=vdevs, size_bytes=u64, logical_sector_size=u32,
              physical_sector_size=u32, next_seq=u64, features=u64),
    writes(),
    st.builds(w.Flush, **hdr(), seq=u64, timestamp_ns=u64),
    st.builds(w.Gap, **hdr(), seq=u64, timestamp_ns=u64,
              reason=st.sampled_from(list(w.GapReason)), dirty_regions=u64),
    resyncs(),
    st.builds(w.ResyncEnd, **hdr(), seq=u64, timestamp_ns=u64, regions=u64),
    st.builds(w.Checkpoint, **hdr(), seq=u64, timestamp_ns=u64,
              kind=st.sampled_from(list(w.CheckpointKind)), label=labels),
    st.builds(w.Ack, **hdr(), acked_seq=u64, credit_bytes=u64, credit_msgs=u32),
    st.builds(w.Heartbeat, **hdr(), timestamp_ns=u64, last_seq=u64),
)


# ---------------------------------------------------------------- codec


@SET
@given(messages)
def test_round_trip_every_message(msg):
    frame = w.encode(msg)
    assert isinstance(frame, bytes)
    out = w.decode(frame)
    assert type(out) is type(msg)
    assert out == msg
    assert w.encode(out) == frame


@SET
@given(messages)
def test_body_matches_construct_declaration(msg):
    """The fast codecs agree with the construct declarations in BODIES."""
    frame = w.encode(msg)
    h = w.Header.parse(frame[:w.HEADER_SIZE])
    assert (h.magic, h.version, h.type) == (w.MAGIC, w.PROTOCOL_VERSION, msg.TYPE)
    assert (h.stream_id, h.epoch, h.body_len) == (msg.stream_id, msg.epoch,
                                                  len(frame) - w.HEADER_SIZE)
    body = w.BODIES[msg.TYPE].parse(frame[w.HEADER_SIZE:])
    if isinstance(msg, w.Writes):
        assert (body.first_seq, body.count) == (msg.first_seq, msg.count)
        for c, r in zip(body.records, msg.records, strict=True):
            assert (c.seq, c.timestamp_ns, c.sector, c.length, c.flags, c.data) == (
                r.seq, r.timestamp_ns, r.sector, r.length, r.flags, bytes(r.data))
    elif isinstance(msg, w.Hello):
        assert uuid.UUID(bytes=body.vbd_uuid) == msg.vbd_uuid
        assert (body.next_seq, body.vdev, body.size_bytes) == (msg.next_seq, msg.vdev,
                                                               msg.size_bytes)
    else:
        for name in body:
            if not name.startswith("_"):
                assert body[name] == getattr(msg, name), name


def test_message_table():
    assert [t.value for t in w.MsgType] == list(range(1, 10))
    consuming = {t for t, c in w.MESSAGE_CLASSES.items() if c.SEQ}
    assert consuming == {w.MsgType.WRITES, w.MsgType.FLUSH, w.MsgType.GAP, w.MsgType.RESYNC,
                         w.MsgType.RESYNC_END, w.MsgType.CHECKPOINT}
    assert w.HEADER_SIZE == 32 and w.RECORD_HEADER_SIZE == 32


def test_decode_is_zero_copy():
    data = bytes(range(256)) * 16
    msg = w.Writes(stream_id=1, epoch=1, first_seq=1,
                   records=[w.WriteRecord(1, 5, 8, len(data), 0, data)])
    frame = bytearray(w.encode(msg))
    out = w.decode(frame)
    assert isinstance(out.records[0].data, memoryview)
    assert out.records[0].data.obj is frame
    assert out.records[0].data == data


@SET
@given(messages, st.data())
def test_bit_flip_anywhere_detected(msg, data):
    frame = bytearray(w.encode(msg))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(w.FrameError):
        w.decode(bytes(frame))


@pytest.mark.parametrize("pos", [6, 7, 8, 19, 24, 31, 32, 40, 100, -1])
def test_bit_flip_in_covered_bytes_is_checksum_error(pos):
    msg = w.Writes(stream_id=3, epoch=2, first_seq=10,
                   records=[w.WriteRecord(10, 1, 0, 512, 0, b"\xaa" * 512)])
    frame = bytearray(w.encode(msg))
    frame[pos] ^= 0x10
    with pytest.raises(w.ChecksumMismatch):
        w.decode(bytes(frame))


@SET
@given(messages, st.data())
def test_truncated_frames_rejected(msg, data):
    frame = w.encode(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(w.TruncatedFrame):
        w.decode(frame[:cut])


def test_oversized_frames_rejected():
    frame = w.encode(w.Flush(stream_id=1, epoch=1, seq=1, timestamp_ns=2))
    with pytest.raises(w.OversizedFrame):
        w.decode(frame + b"\0")
    with pytest.raises(w.OversizedFrame):
        w.decode(bytes(w.MAX_FRAME_BYTES + 1))
    # header claiming a body larger than any legal body
    big = bytearray(frame)
    w._HDR.pack_into(big, 0, w.MAGIC, w.PROTOCOL_VERSION, w.MsgType.FLUSH, 0, 1, 1,
                     w.MAX_BODY_BYTES + 1, 0)
    with pytest.raises(w.OversizedFrame):
        w.decode(bytes(big))


def test_encode_limits():
    rec = w.WriteRecord(1, 0, 0, 512, 0, bytes(512))
    too_many = [w.WriteRecord(1 + i, 0, 0, 512, 0, rec.data)
                for i in range(w.MAX_RECORDS_PER_BATCH + 1)]
    with pytest.raises(w.OversizedFrame):
        w.encode(w.Writes(stream_id=1, epoch=1, first_seq=1, records=too_many))
    big = bytes(w.MAX_BATCH_DATA_BYTES // 2 + 512)
    with pytest.raises(w.OversizedFrame):
        w.encode(w.Writes(stream_id=1, epoch=1, first_seq=1, records=[
            w.WriteRecord(1, 0, 0, len(big), 0, big), w.WriteRecord(2, 0, 0, len(big), 0, big)]))
    with pytest.raises(w.MalformedFrame):
        w.encode(w.Writes(stream_id=1, epoch=1, first_seq=1, records=[]))
    with pytest.raises(w.LengthMismatch):
        w.encode(w.Writes(stream_id=1, epoch=1, first_seq=1,
                          records=[w.WriteRecord(1, 0, 0, 1024, 0, bytes(512))]))
    with pytest.raises(w.LengthMismatch):
        w.encode(w.Resync(stream_id=1, epoch=1, seq=1, sector=0, length=512,
                          flags=int(w.WriteFlags.ZEROES), data=b"x"))
    with pytest.raises(w.MalformedFrame):
        w.encode(w.Flush(stream_id=1, epoch=1, seq=2**64, timestamp_ns=0))
    w.encode(w.Writes(stream_id=1, epoch=1, first_seq=1, records=too_many[:-1]))


def test_max_batch_exactly_fits():
    data = bytes(w.MAX_BATCH_DATA_BYTES)
    frame = w.encode(w.Writes(stream_id=1, epoch=1, first_seq=1,
                              records=[w.WriteRecord(1, 0, 0, len(data), 0, data)]))
    assert w.decode(frame).records[0].length == w.MAX_BATCH_DATA_BYTES


def test_label_too_long_rejected():
    ok = "é" * (w.MAX_LABEL_BYTES // 2)
    w.encode(w.Checkpoint(stream_id=1, epoch=1, seq=1, timestamp_ns=0,
                          kind=w.CheckpointKind.USER, label=ok))
    with pytest.raises(w.LabelTooLong):
        w.encode(w.Checkpoint(stream_id=1, epoch=1, seq=1, timestamp_ns=0,
                              kind=w.CheckpointKind.USER, label=ok + "a"))
    # a peer that ignores the limit: hand-built frame, valid checksum
    long_label = "x" * (w.MAX_LABEL_BYTES + 1)
    body = w.CheckpointBody.build(dict(seq=1, timestamp_ns=0, kind=2, label=long_label))
    with pytest.raises(w.LabelTooLong):
        w.decode(_frame(w.MsgType.CHECKPOINT, body))


def _frame(mtype, body, *, stream_id=1, epoch=1, version=w.PROTOCOL_VERSION, magic=w.MAGIC,
           flags=0):
    prefix = w._HDR_PREFIX.pack(magic, version, mtype, flags, stream_id, epoch, len(body))
    h = w.ChecksumFn(prefix)
    h.update(body)
    return prefix + w._U64.pack(h.intdigest()) + body


def test_wrong_magic_and_version_rejected():
    body = w.FlushBody.build(dict(seq=1, timestamp_ns=2))
    assert isinstance(w.decode(_frame(w.MsgType.FLUSH, body)), w.Flush)
    with pytest.raises(w.BadMagic):
        w.decode(_frame(w.MsgType.FLUSH, body, magic=b"XTAQ"))
    for v in (0, w.PROTOCOL_VERSION + 1, 0xFFFF):
        with pytest.raises(w.UnsupportedVersion):
            w.decode(_frame(w.MsgType.FLUSH, body, version=v))
    with pytest.raises(w.UnknownMessageType):
        w.decode(_frame(200, body))
    with pytest.raises(w.MalformedFrame):
        w.decode(_frame(w.MsgType.FLUSH, body, flags=1))


def test_malformed_bodies_rejected():
    with pytest.raises(w.MalformedFrame):  # fixed body with trailing byte
        w.decode(_frame(w.MsgType.FLUSH, w.FlushBody.build(dict(seq=1, timestamp_ns=2)) + b"\0"))
    rec = w.RecordHeader.build(dict(seq=1, timestamp_ns=0, sector=0, length=512, flags=0))
    head = w.WritesHead.build(dict(first_seq=1, count=1))
    with pytest.raises(w.MalformedFrame):  # record length says more than the body has
        w.decode(_frame(w.MsgType.WRITES, head + rec + bytes(100)))
    with pytest.raises(w.MalformedFrame):  # data longer than length
        w.decode(_frame(w.MsgType.WRITES, head + rec + bytes(600)))
    with pytest.raises(w.MalformedFrame):  # count says 2, one record present
        w.decode(_frame(w.MsgType.WRITES, w.WritesHead.build(dict(first_seq=1, count=2))
                        + rec + bytes(512)))
    with pytest.raises(w.OversizedFrame):
        w.decode(_frame(w.MsgType.WRITES, w.WritesHead.build(
            dict(first_seq=1, count=w.MAX_RECORDS_PER_BATCH + 1))))
    with pytest.raises(w.MalformedFrame):  # invalid UTF-8 label
        w.decode(_frame(w.MsgType.CHECKPOINT, w.FlushBody.build(dict(seq=1, timestamp_ns=0))
                        + b"\x02\x02\xff\xfe"))
    with pytest.raises(w.MalformedFrame):
        w.decode(_frame(w.MsgType.GAP, w.GapBody.build(
            dict(seq=1, timestamp_ns=0, reason=99, dirty_regions=0))))
    rs = w.ResyncHead.build(dict(seq=1, sector=0, length=512, flags=0))
    with pytest.raises(w.MalformedFrame):
        w.decode(_frame(w.MsgType.RESYNC, rs + bytes(511)))


# ---------------------------------------------------------------- StreamChecker

SID = 0x7
VBD = uuid.UUID(int=42)
HOST = uuid.UUID(int=1)
DISK = 1 << 20  # 1 MiB disk = 2048 sectors


def hello(epoch=1, next_seq=1, **kw):
    d = dict(stream_id=SID, epoch=epoch, host_id=HOST, vbd_uuid=VBD, domid=3, devid=51712,
             vdev="xvda", size_bytes=DISK, logical_sector_size=512, physical_sector_size=4096,
             next_seq=next_seq, features=int(w.Features.DISCARD | w.Features.ZEROES))
    d.update(kw)
    return w.Hello(**d)


def rec(seq, sector=0, n=512, flags=0, data=None):
    if data is None:
        data = b"" if flags & w.NO_DATA_FLAGS else bytes([seq % 256]) * n
    return w.WriteRecord(seq, 1000 + seq, sector, n, flags, data)


def wr(first, n=1, epoch=1, **kw):
    return w.Writes(stream_id=SID, epoch=epoch, first_seq=first,
                    records=[rec(first + i, sector=i, **kw) for i in range(n)])


def flush(seq, epoch=1):
    return w.Flush(stream_id=SID, epoch=epoch, seq=seq, timestamp_ns=seq)


def gap(seq, epoch=1):
    return w.Gap(stream_id=SID, epoch=epoch, seq=seq, timestamp_ns=seq,
                 reason=w.GapReason.RING_OVERFLOW, dirty_regions=1)


def resync(seq, sector=0, n=4096, epoch=1):
    return w.Resync(stream_id=SID, epoch=epoch, seq=seq, sector=sector, length=n, flags=0,
                    data=bytes(n))


def rend(seq, epoch=1):
    return w.ResyncEnd(stream_id=SID, epoch=epoch, seq=seq, timestamp_ns=seq, regions=1)


def cp(seq, label="snap", epoch=1):
    return w.Checkpoint(stream_id=SID, epoch=epoch, seq=seq, timestamp_ns=seq,
                        kind=w.CheckpointKind.USER, label=label)


def hb(last, epoch=1):
    return w.Heartbeat(stream_id=SID, epoch=epoch, timestamp_ns=0, last_seq=last)


def in_order_stream(epoch=1):
    return [hello(epoch), wr(1, 3), flush(4), hb(4), gap(5), wr(6, 2), resync(8), resync(9, 8),
            rend(10), cp(11), wr(12, 1)]


def test_checker_accepts_in_order_stream_via_frames():
    c = w.StreamChecker(SID)
    for m in in_order_stream():
        out = c.feed(w.encode(m))
        assert out == m
    assert (c.high_water, c.cursor, c.in_resync) == (12, 13, False)


@SET
@given(st.lists(st.sampled_from(["w", "f", "c", "g", "h"]), max_size=30),
       st.integers(1, 5))
def test_checker_accepts_generated_streams(kinds, batch):
    c = w.StreamChecker(SID)
    c.check(hello())
    seq = 1
    for k in kinds:
        m = {"w": lambda: wr(seq, batch), "f": lambda: flush(seq), "c": lambda: cp(seq),
             "g": lambda: gap(seq), "h": lambda: hb(seq - 1)}[k]()
        assert c.check(m) is m
        r = w.seq_range(m)
        seq = r[1] + 1 if r else seq
    assert c.cursor == seq


def checker_at(seq_after=4):
    c = w.StreamChecker(SID)
    c.check(hello())
    c.check(wr(1, 3))
    c.check(flush(4))
    return c


def test_gap_rejected_with_clear_message():
    c = checker_at()
    with pytest.raises(w.SequenceGap) as e:
        c.check(flush(7))
    msg = str(e.value)
    assert "\n" not in msg
    assert "vbd 0x7" in msg and "dom3/xvda" in msg and "expected seq 5" in msg
    assert "received seq 7" in msg
    assert (e.value.expected, e.value.received) == (5, 7)
    assert c.check(flush(5))  # state unchanged by the rejection


def test_duplicate_and_replay_rejected_within_session():
    c = checker_at()
    with pytest.raises(w.SequenceReplay, match="duplicate"):
        c.check(flush(4))
    with pytest.raises(w.SequenceReplay, match="replay"):
        c.check(wr(1, 3))
    with pytest.raises(w.SequenceReplay):
        c.check(wr(3, 2))  # overlaps the tail


def test_out_of_order_rejected():
    c = checker_at()
    with pytest.raises(w.SequenceGap):
        c.check(flush(6))  # 6 arrives before 5
    c.check(flush(5))
    c.check(flush(6))
    with pytest.raises(w.SequenceReplay):
        c.check(flush(5))  # late 5
    bad = wr(7, 3)
    bad.records[1], bad.records[2] = bad.records[2], bad.records[1]
    with pytest.raises(w.SequenceDisorder) as e:
        c.check(bad)
    assert (e.value.expected, e.value.received) == (8, 9)


def test_heartbeat_view_checked():
    c = checker_at()
    c.check(hb(4))
    with pytest.raises(w.SequenceGap):
        c.check(hb(6))
    with pytest.raises(w.SequenceReplay):
        c.check(hb(3))


def test_epoch_misuse_rejected():
    c = checker_at()
    with pytest.raises(w.EpochError):
        c.check(flush(5, epoch=2))  # no HELLO for epoch 2
    with pytest.raises(w.EpochError):
        c.check(hello(epoch=1, next_seq=5))  # HELLO must raise the epoch
    c.check(hello(epoch=3, next_seq=5))
    with pytest.raises(w.EpochError):
        c.check(flush(5, epoch=1))  # stale frame of an old session
    with pytest.raises(w.EpochError):
        c.check(hello(epoch=2, next_seq=5))
    c.check(flush(5, epoch=3))


def test_messages_before_hello_and_wrong_direction_rejected():
    c = w.StreamChecker(SID)
    with pytest.raises(w.ProtocolStateError, match="before HELLO"):
        c.check(flush(1))
    c.check(hello())
    with pytest.raises(w.ProtocolStateError):
        c.check(w.Ack(stream_id=SID, epoch=1, acked_seq=0, credit_bytes=0, credit_msgs=0))
    with pytest.raises(w.IdentityError):
        c.check(w.Flush(stream_id=SID + 1, epoch=1, seq=1, timestamp_ns=0))
    with pytest.raises(w.IdentityError):
        c.check(hello(epoch=2, vbd_uuid=uuid.UUID(int=43)))


def test_hello_validation():
    c = w.StreamChecker(SID, high_water=10, epoch=4)
    with pytest.raises(w.SequenceGap):
        c.check(hello(epoch=5, next_seq=12))  # would skip seq 11
    with pytest.raises(w.ProtocolStateError):
        c.check(hello(epoch=5, next_seq=0))
    with pytest.raises(w.ProtocolStateError):
        c.check(hello(epoch=5, logical_sector_size=1000))
    with pytest.raises(w.ProtocolStateError):
        c.check(hello(epoch=5, logical_sector_size=4096, physical_sector_size=512))
    c.check(hello(epoch=5, next_seq=11))


def test_restart_resends_are_dropped_idempotently():
    c = checker_at()  # high water 4
    c.check(wr(5, 2))  # 5, 6
    assert c.high_water == 6
    # dom0 restarts, re-sends from its last known ack (3)
    c.check(hello(epoch=2, next_seq=3))
    assert c.check(wr(3, 2, epoch=2)) is None  # 3, 4: all duplicates
    trimmed = c.check(wr(5, 4, epoch=2))  # 5, 6 duplicates; 7, 8 fresh
    assert trimmed.first_seq == 7 and [r.seq for r in trimmed.records] == [7, 8]
    assert c.high_water == 8
    assert c.check(flush(9, epoch=2)) is not None
    # a duplicate inside the new session is not explicable
    with pytest.raises(w.SequenceReplay):
        c.check(flush(9, epoch=2))
    # re-sends must themselves be in order
    c.check(hello(epoch=3, next_seq=2))
    with pytest.raises(w.SequenceGap):
        c.check(flush(4, epoch=3))


@SET
@given(st.lists(st.sampled_from(["w", "f", "g", "r", "e", "c"]), min_size=1, max_size=20),
       st.data())
def test_restart_at_any_point_resends_cleanly(kinds, data):
    """Any in-order stream, then a restart re-sending from any seq <= high water + 1."""
    stream, seq, open_gap = [], 1, False
    for k in kinds:
        if k in "re" and not open_gap:
            k = "g"
        m = {"w": lambda: wr(seq, 3), "f": lambda: flush(seq), "g": lambda: gap(seq),
             "r": lambda: resync(seq), "e": lambda: rend(seq), "c": lambda: cp(seq)}[k]()
        open_gap = (open_gap or k == "g") and k != "e"
        stream.append(m)
        seq = w.seq_range(m)[1] + 1
    cut = data.draw(st.integers(0, len(stream)))
    c = w.StreamChecker(SID)
    c.check(hello())
    for m in stream[:cut]:
        assert c.check(m) is m
    hw = c.high_water
    starts = [w.seq_range(m)[0] for m in stream]
    i = data.draw(st.integers(0, cut))
    c.check(hello(epoch=2, next_seq=starts[i] if i < len(stream) else seq))
    for m in stream[i:]:
        m2 = w.decode(w.encode(dataclasses.replace(m, epoch=2)))
        out = c.check(m2)
        first, last = w.seq_range(m2)
        if last <= hw:
            assert out is None
        else:
            assert out is not None and w.seq_range(out) == (max(first, hw + 1), last)
    assert c.high_water == seq - 1 and c.cursor == seq and c.in_resync == open_gap


def test_resends_do_not_replay_state_machine():
    c = w.StreamChecker(SID)
    c.check(hello())
    for m in (gap(1), resync(2), rend(3)):
        c.check(m)
    c.check(hello(epoch=2, next_seq=2))  # resume mid-resync: duplicate RESYNC, RESYNC_END
    assert c.check(resync(2, epoch=2)) is None
    assert c.check(rend(3, epoch=2)) is None
    assert not c.in_resync


def test_resync_requires_open_gap():
    c = checker_at()
    with pytest.raises(w.ProtocolStateError, match="RESYNC without"):
        c.check(resync(5))
    with pytest.raises(w.ProtocolStateError, match="RESYNC_END without"):
        c.check(rend(5))
    c.check(gap(5))
    c.check(wr(6))  # writes go on during a resync
    c.check(resync(7))
    c.check(rend(8))
    assert not c.in_resync


def test_record_checks():
    c = checker_at()
    with pytest.raises(w.OutOfRange):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5,
                         records=[rec(5, sector=DISK // 512 - 1, n=1024)]))
    with pytest.raises(w.OutOfRange):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5,
                         records=[rec(5, sector=2**60)]))
    with pytest.raises(w.LengthMismatch):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5,
                         records=[rec(5, n=1024, data=bytes(512))]))
    with pytest.raises(w.LengthMismatch):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5,
                         records=[rec(5, flags=int(w.WriteFlags.DISCARD), data=b"x")]))
    with pytest.raises(w.Misaligned):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5, records=[rec(5, n=100)]))
    with pytest.raises(w.Misaligned):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5, records=[rec(5, n=0)]))
    with pytest.raises(w.RecordError, match="FUA"):  # feature not announced
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5,
                         records=[rec(5, flags=int(w.WriteFlags.FUA))]))
    with pytest.raises(w.RecordError):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=5, records=[rec(5, flags=0x80)]))
    c.check(gap(5))
    with pytest.raises(w.OutOfRange):
        c.check(resync(6, sector=DISK // 512 - 4))
    # last sector of the disk is fine; DISCARD needs no data
    c.check(w.Writes(stream_id=SID, epoch=1, first_seq=6, records=[
        rec(6, sector=DISK // 512 - 1), rec(7, sector=0, n=DISK, flags=int(w.WriteFlags.DISCARD))]))


def test_record_checks_4k_logical():
    c = w.StreamChecker(SID)
    c.check(hello(logical_sector_size=4096))
    with pytest.raises(w.Misaligned):
        c.check(w.Writes(stream_id=SID, epoch=1, first_seq=1, records=[rec(1, sector=1, n=4096)]))
    c.check(w.Writes(stream_id=SID, epoch=1, first_seq=1, records=[rec(1, sector=8, n=4096)]))


def test_checker_label_and_frame_errors_name_the_vbd():
    c = checker_at()
    with pytest.raises(w.LabelTooLong):
        c.check(cp(5, label="y" * (w.MAX_LABEL_BYTES + 1)))
    frame = bytearray(w.encode(flush(5)))
    frame[-1] ^= 1
    with pytest.raises(w.ChecksumMismatch) as e:
        c.feed(bytes(frame))
    assert "vbd 0x7" in str(e.value) and "expected seq 5" in str(e.value)
    with pytest.raises(w.TruncatedFrame, match="expected seq 5"):
        c.feed(w.encode(flush(5))[:-3])
    with pytest.raises(w.OversizedFrame, match="expected seq 5"):
        c.feed(w.encode(flush(5)) + b"\0")
    assert c.feed(w.encode(flush(5))) is not None


def test_credit_enforced():
    c = w.StreamChecker(SID, enforce_credit=True)
    c.check(hello())
    with pytest.raises(w.CreditExceeded, match="no ACK yet"):
        c.check(wr(1))
    c.granted(w.Ack(stream_id=SID, epoch=1, acked_seq=0, credit_bytes=2048, credit_msgs=3))
    c.check(wr(1, 2))  # 1024 bytes, 1 msg
    c.check(flush(3))  # 2 msgs
    with pytest.raises(w.CreditExceeded):
        c.check(wr(4, 3))  # 1536 more bytes: over 2048
    c.check(wr(4, 2))  # exactly 2048 bytes, 3 msgs
    with pytest.raises(w.CreditExceeded):
        c.check(flush(6))  # 4th message
    c.granted(w.Ack(stream_id=SID, epoch=1, acked_seq=3, credit_bytes=2048, credit_msgs=3))
    c.check(flush(6))
    # restart: the new session waits for the ACK answering its HELLO ...
    c.check(hello(epoch=2, next_seq=1))
    with pytest.raises(w.CreditExceeded, match="no ACK yet"):
        c.check(wr(1, 2, epoch=2))
    # ... and re-sends of acknowledged data cost no credit
    c.granted(w.Ack(stream_id=SID, epoch=2, acked_seq=6, credit_bytes=0, credit_msgs=0))
    assert c.check(wr(1, 5, epoch=2)) is None
    assert c.check(flush(6, epoch=2)) is None
    with pytest.raises(w.CreditExceeded):
        c.check(flush(7, epoch=2))


# ------------------------------------------- resume=True: the appliance's checker

def resumed_checker(high_water=9, next_seq=4, **kw):
    """A resume=True checker for a stream the appliance holds up to `high_water`,
    in a new session whose HELLO (epoch 2) says `next_seq`."""
    c = w.StreamChecker(SID, high_water=high_water, epoch=1, vbd_uuid=VBD, resume=True, **kw)
    c.check(hello(epoch=2, next_seq=next_seq))
    return c


def test_resume_frames_may_skip_seqs_the_appliance_holds():
    c = resumed_checker()  # dom0 saw ACKs up to 3, the appliance holds up to 9
    out = c.check(wr(10, 2, epoch=2))  # goes on after the ACK's seq: 4..9 skipped
    assert out is not None and w.seq_range(out) == (10, 11)
    assert (c.cursor, c.high_water, c.skipped, c.received) == (12, 11, 6, True)
    # seqs after the skip must be in order again
    with pytest.raises(w.SequenceReplay):
        c.check(flush(10, epoch=2))


def test_resume_skip_may_end_inside_what_is_held():
    c = resumed_checker()
    assert c.check(flush(7, epoch=2)) is None  # 4..6 skipped, 7 held: dropped
    assert (c.cursor, c.high_water, c.skipped) == (8, 9, 3)
    trimmed = c.check(wr(8, 4, epoch=2))  # 8, 9 held; 10, 11 fresh
    assert trimmed.first_seq == 10 and [r.seq for r in trimmed.records] == [10, 11]
    assert c.check(flush(12, epoch=2)) is not None


def test_resume_skip_past_the_high_water_is_a_gap():
    c = resumed_checker()
    with pytest.raises(w.SequenceGap) as e:
        c.check(flush(11, epoch=2))  # seq 10 was never received
    assert (e.value.expected, e.value.received) == (4, 11)
    assert (c.cursor, c.skipped, c.received) == (4, 0, False)
    assert c.check(flush(10, epoch=2)) is not None


def test_resume_first_frame_may_start_below_the_hello_seq():
    c = resumed_checker(next_seq=6)
    # a spilled batch straddling next_seq: 4, 5 below it, all held up to 9
    trimmed = c.check(wr(4, 8, epoch=2))
    assert trimmed.first_seq == 10 and [r.seq for r in trimmed.records] == [10, 11]
    assert (c.cursor, c.high_water, c.skipped) == (12, 11, 0)


def test_resume_only_the_first_frame_may_start_below_the_cursor():
    c = resumed_checker(next_seq=6)
    assert c.check(flush(6, epoch=2)) is None
    with pytest.raises(w.SequenceReplay):
        c.check(flush(5, epoch=2))
    # a first frame entirely below the cursor is a held duplicate; then no more
    c = resumed_checker(next_seq=6)
    assert c.check(wr(2, 3, epoch=2)) is None
    assert c.cursor == 5
    with pytest.raises(w.SequenceReplay):
        c.check(flush(3, epoch=2))
    assert c.check(flush(5, epoch=2)) is None  # in order from there


def test_resume_rules_start_again_with_each_hello():
    c = resumed_checker(next_seq=6)
    c.check(flush(6, epoch=2))
    c.check(flush(9, epoch=2))  # 7, 8 skipped
    assert (c.skipped, c.received) == (2, True)
    c.check(hello(epoch=3, next_seq=8))
    assert (c.skipped, c.received) == (0, False)
    assert c.check(flush(7, epoch=3)) is None  # first frame of the new session: below is held


def test_resume_heartbeat_may_claim_what_the_appliance_holds():
    c = resumed_checker()
    assert c.check(hb(3, epoch=2)) is not None  # what the session saw
    assert c.check(hb(9, epoch=2)) is not None  # only seqs the appliance holds
    assert (c.cursor, c.skipped, c.received) == (4, 0, False)  # nothing moves
    with pytest.raises(w.SequenceGap):
        c.check(hb(10, epoch=2))
    with pytest.raises(w.SequenceReplay):
        c.check(hb(2, epoch=2))


def test_resume_rejected_frame_leaves_the_state_unchanged():
    c = resumed_checker()
    bad = w.Writes(stream_id=SID, epoch=2, first_seq=10, records=[rec(10, n=100)])  # misaligned
    with pytest.raises(w.Misaligned) as e:
        c.check(bad)
    assert "expected seq 10" in str(e.value)  # the skip is explained; the record is not
    assert (c.cursor, c.high_water, c.skipped, c.received) == (4, 9, 0, False)
    c2 = resumed_checker(enforce_credit=True)
    with pytest.raises(w.CreditExceeded):
        c2.check(wr(10, 1, epoch=2))  # no ACK answered the HELLO yet
    assert (c2.cursor, c2.skipped) == (4, 0)
    c2.granted(w.Ack(stream_id=SID, epoch=2, acked_seq=9, credit_bytes=512, credit_msgs=1))
    assert c2.check(wr(10, 1, epoch=2)) is not None


def test_resume_frames_of_an_earlier_session_are_stale():
    c = resumed_checker()
    assert c.stale(1) and not c.stale(2) and not c.stale(3)
    with pytest.raises(w.EpochError):
        c.check(flush(4, epoch=1))  # fed anyway: rejected, as without resume
    plain = w.StreamChecker(SID, high_water=9, epoch=1, vbd_uuid=VBD)
    plain.check(hello(epoch=2, next_seq=4))
    assert not plain.stale(1)


def test_without_resume_the_same_frames_are_rejected():
    c = w.StreamChecker(SID, high_water=9, epoch=1, vbd_uuid=VBD)
    c.check(hello(epoch=2, next_seq=6))
    with pytest.raises(w.SequenceGap):
        c.check(flush(7, epoch=2))
    with pytest.raises(w.SequenceReplay):
        c.check(flush(5, epoch=2))
    with pytest.raises(w.SequenceGap):
        c.check(hb(8, epoch=2))


@SET
@given(st.integers(0, 12), st.data())
def test_resume_from_any_point_applies_only_fresh_seqs(hw, data):
    """A session whose HELLO says any next_seq <= high water + 1 and whose frames go
    on from any seq in next_seq..high water + 1 (one flush a seq, then a batch):
    nothing held is returned, everything fresh is, and the seqs skipped are counted."""
    nxt = data.draw(st.integers(1, hw + 1))
    start = data.draw(st.integers(nxt, hw + 1))
    c = resumed_checker(high_water=hw, next_seq=nxt)
    out = [c.check(flush(s, epoch=2)) for s in range(start, hw + 3)]
    assert [m.seq for m in out if m is not None] == [hw + 1, hw + 2]
    batch = c.check(wr(hw + 3, 2, epoch=2))
    assert w.seq_range(batch) == (hw + 3, hw + 4)
    assert (c.cursor, c.high_water, c.skipped) == (hw + 5, hw + 4, start - nxt)


def test_credit_window_dom0_side():
    cw = w.CreditWindow()
    assert not cw.allows(1, 0)
    cw.on_ack(w.Ack(stream_id=1, epoch=1, acked_seq=0, credit_bytes=w.CREDIT_UNLIMITED_BYTES,
                    credit_msgs=2))
    assert cw.allows(1, 10**9)
    cw.sent(1, 10)
    cw.sent(2, 10)
    assert not cw.allows(3, 0) and cw.outstanding == (2, 20)
    cw.on_ack(w.Ack(stream_id=1, epoch=1, acked_seq=1, credit_bytes=15, credit_msgs=2))
    assert cw.outstanding == (1, 10)
    assert cw.allows(3, 5) and not cw.allows(3, 6)


@SET
@given(messages)
def test_frame_time_ns_reads_what_decode_does(msg):
    """The spill log's and the drainer's lag dates come from this header peek:
    it must agree with a full decode for every kind of frame."""
    frame = w.encode(msg)
    if isinstance(msg, w.Writes):
        want = msg.records[0].timestamp_ns if msg.records else None
    elif msg.TYPE in (w.MsgType.FLUSH, w.MsgType.GAP, w.MsgType.RESYNC_END,
                      w.MsgType.CHECKPOINT):
        want = msg.timestamp_ns
    else:
        want = None
    assert w.frame_time_ns(frame) == want
    assert w.frame_time_ns(frame[:w.HEADER_SIZE]) is None      # torn: no date, no error
    assert w.frame_time_ns(b"") is None
