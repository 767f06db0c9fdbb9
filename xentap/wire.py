"""xentap mirror-stream wire protocol, declared once and shared by both ends.

Imported by the dom0 drainer (encoder, :class:`CreditWindow`) and by the
appliance receiver (decoder, :class:`StreamChecker`).  Every frame is one
ZeroMQ message (DEALER on dom0, ROUTER on the appliance, CurveZMQ on top).

Frame layout
============

All integers little-endian.  The ``construct`` declarations below
(:data:`Header`, :data:`BODIES`) are the specification; the hot-path codecs
for fixed-size parts use :class:`struct.Struct` objects *derived* from those
same declarations (:func:`xentap.structs.derive_struct`), so the layout is written once.

Common header, 32 bytes (:data:`Header`)::

    magic      4s   b"XTAP"
    version    u16  PROTOCOL_VERSION (a receiver accepts exactly its own)
    type       u8   MsgType
    flags      u8   reserved, must be 0
    stream_id  u64  the VBD's stream id (chosen by dom0, bound by HELLO)
    epoch      u32  the stream epoch (the HELLO's epoch; bumped by every restart)
    body_len   u32  bytes of body following the header
    checksum   u64  XXH3-64 (seed 0) over header bytes 0..23 followed by the body

The checksum covers every header field but itself, and for WRITES the
whole batch: record headers and data.  XXH3-64 was chosen over zlib.crc32
because it is ~14x faster on 1 MiB batches on this machine (numbers from
``python -m xentap.wire --bench``); the C shim can compute the same value with
``XXH3_64bits()`` if it ever needs to.

Messages (type id, body; "seq" = consumes sequence numbers)
-----------------------------------------------------------

==  ===========  ====  ==============================================================
id  name         seq   body
==  ===========  ====  ==============================================================
1   HELLO        no    host_id 16s, vbd_uuid 16s, domid u16, devid u32, size_bytes u64,
                       logical_sector_size u32, physical_sector_size u32,
                       next_seq u64, features u64, vdev u8-prefixed UTF-8
                       (protocol version and epoch are the header's)
2   WRITES       1/rec first_seq u64, count u32, then count records of
                       seq u64, timestamp_ns u64, sector u64 (512-byte units),
                       length u32 (bytes), flags u32, data (length bytes,
                       or 0 bytes if flags has DISCARD or ZEROES)
3   FLUSH        1     seq u64, timestamp_ns u64   (crash-consistent point)
4   GAP          1     seq u64, timestamp_ns u64, reason u32, dirty_regions u64
5   RESYNC       1     seq u64, sector u64, length u32, flags u32 (ZEROES only),
                       data (length bytes, or 0 if ZEROES)
6   RESYNC_END   1     seq u64, timestamp_ns u64, regions u64
7   CHECKPOINT   1     seq u64, timestamp_ns u64, kind u8, label u8-prefixed UTF-8
                       (at most MAX_LABEL_BYTES encoded bytes)
8   ACK          no    acked_seq u64, credit_bytes u64, credit_msgs u32  (appliance -> dom0)
9   HEARTBEAT    no    timestamp_ns u64, last_seq u64  (both ways)
==  ===========  ====  ==============================================================

Sequence numbers
================

Per VBD, 64-bit, start at 1 (0 means "none"), gap-free.  Every WRITES
*record* consumes one (records of a batch are ``first_seq .. first_seq+count-1``),
and so does every FLUSH, GAP, RESYNC, RESYNC_END and CHECKPOINT message.  HELLO,
ACK and HEARTBEAT consume none.  HEARTBEAT.last_seq is the last seq the sender
has *sent* (dom0) or *durably journaled* (appliance).

Sessions, epochs and re-sent data
=================================

A session starts with HELLO.  Every HELLO carries an epoch strictly greater
than any epoch the receiver has seen for this stream (dom0 bumps it on every
(re)start *and* every reconnect), and ``next_seq``: the seq of the first
seq-consuming message it will send.  ``next_seq`` may be at most
``high_water + 1`` (``high_water`` = the highest seq the receiver ever
accepted, restored from the journal after an appliance restart) and may be
lower: a dom0 that restarted from its spill log, or never saw an ACK, re-sends
data the appliance already holds.  The appliance answers every HELLO with an
ACK (its durable seq and a fresh credit) before dom0 sends anything else.

Within a session seqs must arrive exactly in order from ``next_seq``.  Those
``<= high_water`` are *re-sends*: explicable duplicates, checked for shape
and then dropped idempotently (:meth:`StreamChecker.check` returns ``None``, or
a WRITES batch trimmed to its fresh records).  A seq lower than the session's
cursor -- the same message twice, or an older message replayed inside a
session -- cannot be explained and is rejected (:class:`SequenceReplay`); so
is any frame whose header epoch is not the current session's (a stale or
replayed frame from an earlier session, :class:`EpochError`).  In short: a
duplicate is legitimate only as part of an in-order re-send that a new HELLO
announced.  Re-sent data is not compared with what was journaled.

Resuming from the appliance's high water (the appliance's checker,
``StreamChecker(resume=True)``): the HELLO's ``next_seq`` is just after what
dom0 saw acknowledged; the ACK answering it says what the appliance durably
holds (``high_water``), which may be more -- the appliance journaled writes
whose ACK never reached dom0 (it was destroyed, or the link dropped).  dom0
then goes on after the ACK's seq instead of sending again what the appliance
holds.  So, in a session:

- a seq-consuming frame that starts above the cursor but no further than
  ``high_water + 1`` skips only seqs the appliance holds: the cursor moves to
  it (a batch straddling the high water is trimmed as above);
- the session's first seq-consuming frame may also start below the cursor (a
  batch of dom0's spill log straddling the HELLO's ``next_seq``): the seqs
  below the cursor are at most ``high_water``, held, and dropped;
- a HEARTBEAT claiming a seq above the cursor but not above ``high_water``
  claims only seqs the appliance holds: answered, nothing moves;
- a frame of an earlier epoch (sent in an earlier session of the stream and
  still in flight when dom0 opened this one: a reconnect, a HELLO sent again
  while the appliance was slow to answer) is dropped unread and the session
  goes on (:meth:`StreamChecker.stale`): this session resumes from what the
  appliance holds.  Ending the session on it dropped the new session's frames
  in turn, and a slow appliance under emulation livelocked (55 sessions in
  6 min).

Everything else is checked as without ``resume``: a frame past
``high_water + 1`` is a real gap, a seq received twice in one session a
replay.  Nothing at or below ``high_water`` is ever applied again.

Flow control
============

ACK.acked_seq is cumulative and durable.  The credit is a window over what
dom0 has sent beyond ``acked_seq``: at most ``credit_msgs`` seq-consuming
messages and at most ``credit_bytes`` payload bytes (record and RESYNC data)
may be outstanding.  ``CREDIT_UNLIMITED_*`` lifts a dimension, 0 stops
sending.  Both ends do the same arithmetic with :class:`CreditWindow`.

Limits
======

:data:`MAX_BATCH_DATA_BYTES`, :data:`MAX_RECORDS_PER_BATCH`,
:data:`MAX_LABEL_BYTES`, :data:`MAX_VDEV_BYTES`, :data:`MAX_BODY_BYTES`,
:data:`MAX_FRAME_BYTES` (set ``zmq.MAXMSGSIZE`` to it on the receiving socket).

Zero copy
=========

:func:`encode` copies payload exactly once (into the contiguous frame).
:func:`decode` copies no payload: ``Record.data`` / ``Resync.data`` are
``memoryview`` slices of the received frame (which they keep alive); call
``bytes()`` on them if the frame buffer will be reused.
"""

from __future__ import annotations

import enum
import logging
import struct
import uuid
from collections import deque
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, ClassVar, Union

import xxhash
from construct import (
    Array,
    Bytes,
    ConstructError,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    Struct,
    Terminated,
    this,
)

from xentap.structs import derive_struct

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# constants and limits

MAGIC = b"XTAP"
PROTOCOL_VERSION = 1
SECTOR_SIZE = 512  #: unit of every ``sector`` field

MAX_RECORDS_PER_BATCH = 4096  #: records in one WRITES batch
MAX_BATCH_DATA_BYTES = 4 * 1024 * 1024  #: data bytes in one WRITES batch or one RESYNC
MAX_LABEL_BYTES = 128  #: CHECKPOINT label, UTF-8 encoded bytes
MAX_VDEV_BYTES = 32  #: HELLO vdev name, UTF-8 encoded bytes

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
CREDIT_UNLIMITED_BYTES = U64_MAX
CREDIT_UNLIMITED_MSGS = U32_MAX

ChecksumFn = xxhash.xxh3_64  #: XXH3-64, seed 0


class MsgType(enum.IntEnum):
    HELLO = 1
    WRITES = 2
    FLUSH = 3
    GAP = 4
    RESYNC = 5
    RESYNC_END = 6
    CHECKPOINT = 7
    ACK = 8
    HEARTBEAT = 9


class WriteFlags(enum.IntFlag):
    FUA = 1  #: the guest asked for force-unit-access
    DISCARD = 2  #: range discarded; no data on the wire
    ZEROES = 4  #: range reads as zeroes; no data on the wire


NO_DATA_FLAGS = WriteFlags.DISCARD | WriteFlags.ZEROES
_NO_DATA = int(NO_DATA_FLAGS)
RESYNC_FLAGS = WriteFlags.ZEROES  #: the only flag a RESYNC may carry


class Features(enum.IntFlag):
    DISCARD = 1  #: records may carry WriteFlags.DISCARD
    ZEROES = 2  #: records / RESYNC may carry WriteFlags.ZEROES
    FUA = 4  #: records may carry WriteFlags.FUA


_WRITE_ALLOWED = int(WriteFlags.FUA | NO_DATA_FLAGS)
_FLAG_FEATURES = ((int(WriteFlags.DISCARD), int(Features.DISCARD), "DISCARD"),
                  (int(WriteFlags.ZEROES), int(Features.ZEROES), "ZEROES"),
                  (int(WriteFlags.FUA), int(Features.FUA), "FUA"))


class GapReason(enum.IntEnum):
    RING_OVERFLOW = 1  #: mirror ring full, writes went to the dirty bitmap
    SPILL_OVERFLOW = 2  #: spill log full as well
    RESTART = 3  #: dom0 restarted and lost writes it had not sent
    OPERATOR = 4  #: a full resync was requested
    INITIAL = 5  #: a new stream: the disk's data is the appliance's starting point


class CheckpointKind(enum.IntEnum):
    FLUSH = 1
    USER = 2
    ANALYZER = 3


# --------------------------------------------------------------------------
# the declaration (construct)

Header = Struct(
    "magic" / Bytes(4),
    "version" / Int16ul,
    "type" / Int8ul,
    "flags" / Int8ul,
    "stream_id" / Int64ul,
    "epoch" / Int32ul,
    "body_len" / Int32ul,
    "checksum" / Int64ul,
)

HelloBody = Struct(
    "host_id" / Bytes(16),
    "vbd_uuid" / Bytes(16),
    "domid" / Int16ul,
    "devid" / Int32ul,
    "size_bytes" / Int64ul,
    "logical_sector_size" / Int32ul,
    "physical_sector_size" / Int32ul,
    "next_seq" / Int64ul,
    "features" / Int64ul,
    "vdev" / PascalString(Int8ul, "utf8"),
    Terminated,
)

RecordHeader = Struct(
    "seq" / Int64ul,
    "timestamp_ns" / Int64ul,
    "sector" / Int64ul,
    "length" / Int32ul,
    "flags" / Int32ul,
)


def _wire_data_len(ctx) -> int:
    """Bytes of data that follow a record / RESYNC header on the wire."""
    return 0 if ctx.flags & NO_DATA_FLAGS else ctx.length


Record = Struct(*RecordHeader.subcons, "data" / Bytes(_wire_data_len))

WritesHead = Struct("first_seq" / Int64ul, "count" / Int32ul)
WritesBody = Struct(*WritesHead.subcons, "records" / Array(this.count, Record), Terminated)

FlushBody = Struct("seq" / Int64ul, "timestamp_ns" / Int64ul)
GapBody = Struct("seq" / Int64ul, "timestamp_ns" / Int64ul, "reason" / Int32ul, "dirty_regions" / Int64ul)
ResyncHead = Struct("seq" / Int64ul, "sector" / Int64ul, "length" / Int32ul, "flags" / Int32ul)
ResyncBody = Struct(*ResyncHead.subcons, "data" / Bytes(_wire_data_len), Terminated)
ResyncEndBody = Struct("seq" / Int64ul, "timestamp_ns" / Int64ul, "regions" / Int64ul)
CheckpointBody = Struct(
    "seq" / Int64ul,
    "timestamp_ns" / Int64ul,
    "kind" / Int8ul,
    "label" / PascalString(Int8ul, "utf8"),
    Terminated,
)
AckBody = Struct("acked_seq" / Int64ul, "credit_bytes" / Int64ul, "credit_msgs" / Int32ul)
HeartbeatBody = Struct("timestamp_ns" / Int64ul, "last_seq" / Int64ul)

#: message type -> construct declaration of its body
BODIES = {
    MsgType.HELLO: HelloBody,
    MsgType.WRITES: WritesBody,
    MsgType.FLUSH: FlushBody,
    MsgType.GAP: GapBody,
    MsgType.RESYNC: ResyncBody,
    MsgType.RESYNC_END: ResyncEndBody,
    MsgType.CHECKPOINT: CheckpointBody,
    MsgType.ACK: AckBody,
    MsgType.HEARTBEAT: HeartbeatBody,
}


_HDR, _ = derive_struct(Header)
HEADER_SIZE = _HDR.size  # 32
_HDR_PREFIX = struct.Struct(_HDR.format[:-1])  # everything but the checksum
_CKSUM_OFF = _HDR_PREFIX.size  # 24
_U64 = struct.Struct("<Q")
_REC, _REC_FIELDS = derive_struct(RecordHeader)
RECORD_HEADER_SIZE = _REC.size  # 32
_WHEAD, _ = derive_struct(WritesHead)
_RHEAD, _ = derive_struct(ResyncHead)

MAX_BODY_BYTES = _WHEAD.size + MAX_RECORDS_PER_BATCH * RECORD_HEADER_SIZE + MAX_BATCH_DATA_BYTES
MAX_FRAME_BYTES = HEADER_SIZE + MAX_BODY_BYTES

# --------------------------------------------------------------------------
# errors


class WireError(ValueError):
    """Base of every error this module raises.

    ``vbd``, ``expected`` and ``received`` are set when the error is raised
    (or re-raised) by a :class:`StreamChecker`.
    """

    def __init__(self, msg: str, *, vbd: str | None = None, expected=None, received=None):
        super().__init__(msg)
        self.vbd, self.expected, self.received = vbd, expected, received


class FrameError(WireError):
    """A single frame is unusable (decode, or encode of an unrepresentable message)."""


class TruncatedFrame(FrameError):
    pass


class OversizedFrame(FrameError):
    pass


class BadMagic(FrameError):
    pass


class UnsupportedVersion(FrameError):
    pass


class ChecksumMismatch(FrameError):
    pass


class MalformedFrame(FrameError):
    pass


class UnknownMessageType(MalformedFrame):
    pass


class LabelTooLong(MalformedFrame):
    pass


class StreamError(WireError):
    """A well-formed message that does not fit the stream (StreamChecker)."""


class SequenceError(StreamError):
    pass


class SequenceGap(SequenceError):
    """Received seq is above the expected one: something was lost."""


class SequenceReplay(SequenceError):
    """Received seq is below the session's cursor: a duplicate or replay."""


class SequenceDisorder(SequenceError):
    """Records inside one batch are not first_seq, first_seq+1, ..."""


class EpochError(StreamError):
    pass


class IdentityError(StreamError):
    pass


class ProtocolStateError(StreamError):
    """Message not allowed now (before HELLO, RESYNC without GAP, bad HELLO, ...)."""


class CreditExceeded(StreamError):
    pass


class RecordError(StreamError):
    pass


class LengthMismatch(RecordError):
    """A record's / RESYNC's length field disagrees with its data."""


class OutOfRange(RecordError):
    """A write or resync region extends past the disk size announced in HELLO."""


class Misaligned(RecordError):
    pass


# --------------------------------------------------------------------------
# messages

Buffer = Union[bytes, bytearray, memoryview]


def _nbytes(b: Buffer) -> int:
    return b.nbytes if isinstance(b, memoryview) else len(b)


@dataclass(slots=True)
class WriteRecord:
    """One completed guest write.  ``data`` is empty for DISCARD/ZEROES."""

    seq: int
    timestamp_ns: int
    sector: int
    length: int
    flags: int
    data: Buffer


if TYPE_CHECKING:
    import numpy as np


def numpy_dtype(con: Struct) -> np.dtype:
    """The numpy structured dtype of a fixed-size, little-endian construct Struct
    of plain integer fields (the same layout, derived, never written twice)."""
    import numpy as np

    st, names = derive_struct(con)
    sizes = {"B": "u1", "H": "u2", "I": "u4", "L": "u4", "Q": "u8"}
    codes = [c for c in st.format[1:] if not c.isdigit()]
    if len(codes) != len(names) or any(c not in sizes for c in codes):  # pragma: no cover
        raise TypeError(f"{con!r}: only unsigned integer fields map to numpy here")
    d = np.dtype([(n, "<" + sizes[c]) for n, c in zip(names, codes)])
    assert d.itemsize == st.size
    return d


@cache
def _rec_dtype() -> np.dtype:
    """RecordHeader as a numpy dtype; made on first use, so that dom0, which
    never decodes a WRITES batch, does not pay for importing numpy (seconds,
    under an emulated CPU)."""
    d = numpy_dtype(RecordHeader)
    assert d.fields["length"][1] == _LEN_OFF and d.fields["flags"][1] == _LEN_OFF + 4
    return d


_LEN_OFF = RecordHeader.sizeof() - 8  # length u32, then flags u32, last in the header
_LEN_FLAGS = struct.Struct("<II")


class Records:
    """The records of a decoded WRITES batch whose records all carry the same
    number of data bytes (the common case: a run of 4 KiB or 1 MiB writes),
    kept as numpy views of the received frame instead of one Python object
    per record.

    It is a read-only sequence of :class:`WriteRecord` (made on demand, data
    a memoryview of the frame), so code that iterates works unchanged; the
    hot paths (:class:`StreamChecker`, the journal, the replica) use the
    arrays: ``seq``, ``timestamp_ns``, ``sector``, ``length``, ``flags``
    (numpy arrays, one entry per record) and :meth:`data2d` (an ``(n,
    wire_len)`` uint8 view of the data, no copy).
    """

    __slots__ = ("_hdr", "_body", "_base", "wire_len", "stride")

    def __init__(self, hdr: np.ndarray, body: memoryview, base: int, wire_len: int):
        self._hdr = hdr  # structured (n,) view, strided over the body
        self._body = body  # the WRITES body (keeps the frame alive)
        self._base = base  # offset in body of record 0's header
        self.wire_len = wire_len  # data bytes that follow each header
        self.stride = RECORD_HEADER_SIZE + wire_len

    @classmethod
    def parse(cls, body: memoryview, count: int) -> Records | None:
        """The records of a WRITES body if they all carry as many data bytes as
        the first; None otherwise (or if the body is not exactly that long)."""
        base = _WHEAD.size
        end = body.nbytes
        if end < base + RECORD_HEADER_SIZE:
            return None
        length, flags = _LEN_FLAGS.unpack_from(body, base + _LEN_OFF)
        w = 0 if flags & _NO_DATA else length
        if base + count * (RECORD_HEADER_SIZE + w) != end:
            return None
        import numpy as np

        hdr = np.ndarray((count,), dtype=_rec_dtype(), buffer=body, offset=base,
                         strides=(RECORD_HEADER_SIZE + w,))
        fl = hdr["flags"]
        wl = np.where(fl & _NO_DATA, 0, hdr["length"])
        if not (wl == w).all():
            return None
        return cls(hdr, body, base, w)

    # -- the arrays
    @property
    def seq(self) -> np.ndarray:
        return self._hdr["seq"]

    @property
    def timestamp_ns(self) -> np.ndarray:
        return self._hdr["timestamp_ns"]

    @property
    def sector(self) -> np.ndarray:
        return self._hdr["sector"]

    @property
    def length(self) -> np.ndarray:
        return self._hdr["length"]

    @property
    def flags(self) -> np.ndarray:
        return self._hdr["flags"]

    def data2d(self) -> np.ndarray:
        """(n, wire_len) uint8 view of the records' data (strided, no copy)."""
        import numpy as np

        n = len(self._hdr)
        return np.ndarray((n, self.wire_len), dtype=np.uint8, buffer=self._body,
                          offset=self._base + RECORD_HEADER_SIZE, strides=(self.stride, 1))

    @property
    def data_bytes(self) -> int:
        return len(self._hdr) * self.wire_len

    def data_views(self) -> list[memoryview]:
        """Each record's data, a memoryview of the frame (no copy)."""
        body, w, st = self._body, self.wire_len, self.stride
        p = self._base + RECORD_HEADER_SIZE
        return [body[o:o + w] for o in range(p, p + len(self._hdr) * st, st)]

    # -- the sequence
    def __len__(self) -> int:
        return len(self._hdr)

    def _record(self, i: int) -> WriteRecord:
        seq, ts, sector, length, flags = self._hdr[i].tolist()
        off = self._base + i * self.stride + RECORD_HEADER_SIZE
        return WriteRecord(seq, ts, sector, length, flags, self._body[off:off + self.wire_len])

    def __getitem__(self, i):
        n = len(self._hdr)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                return [self._record(k) for k in range(start, stop, step)]
            stop = max(start, stop)
            off = self._base + start * self.stride
            return Records(self._hdr[start:stop], self._body, off, self.wire_len)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("record index out of range")
        return self._record(i)

    def __iter__(self):
        for i in range(len(self._hdr)):
            yield self._record(i)

    def __eq__(self, other) -> bool:
        if isinstance(other, (Records, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"<Records {len(self)} x {self.wire_len} data bytes>"


@dataclass(kw_only=True, slots=True)
class Message:
    stream_id: int
    epoch: int
    TYPE: ClassVar[MsgType | None] = None  # set by each message class
    SEQ: ClassVar[bool] = False  # consumes sequence numbers


@dataclass(kw_only=True, slots=True)
class Hello(Message):
    host_id: uuid.UUID
    vbd_uuid: uuid.UUID
    domid: int
    devid: int
    vdev: str
    size_bytes: int
    logical_sector_size: int
    physical_sector_size: int
    next_seq: int
    features: int = 0
    TYPE = MsgType.HELLO

    @property
    def version(self) -> int:  # the header's; a decoded frame always has ours
        return PROTOCOL_VERSION


@dataclass(kw_only=True, slots=True)
class Writes(Message):
    first_seq: int
    records: list[WriteRecord]
    TYPE = MsgType.WRITES
    SEQ = True

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1


@dataclass(kw_only=True, slots=True)
class Flush(Message):
    seq: int
    timestamp_ns: int
    TYPE = MsgType.FLUSH
    SEQ = True


@dataclass(kw_only=True, slots=True)
class Gap(Message):
    seq: int
    timestamp_ns: int
    reason: int
    dirty_regions: int
    TYPE = MsgType.GAP
    SEQ = True


@dataclass(kw_only=True, slots=True)
class Resync(Message):
    seq: int
    sector: int
    length: int
    flags: int
    data: Buffer
    TYPE = MsgType.RESYNC
    SEQ = True


@dataclass(kw_only=True, slots=True)
class ResyncEnd(Message):
    seq: int
    timestamp_ns: int
    regions: int
    TYPE = MsgType.RESYNC_END
    SEQ = True


@dataclass(kw_only=True, slots=True)
class Checkpoint(Message):
    seq: int
    timestamp_ns: int
    kind: int
    label: str
    TYPE = MsgType.CHECKPOINT
    SEQ = True


@dataclass(kw_only=True, slots=True)
class Ack(Message):
    acked_seq: int
    credit_bytes: int
    credit_msgs: int
    TYPE = MsgType.ACK


@dataclass(kw_only=True, slots=True)
class Heartbeat(Message):
    timestamp_ns: int
    last_seq: int
    TYPE = MsgType.HEARTBEAT


def seq_range(msg: Message) -> tuple[int, int] | None:
    """(first, last) seq a message consumes, or None."""
    if isinstance(msg, Writes):
        return msg.first_seq, msg.last_seq
    if msg.SEQ:
        return msg.seq, msg.seq
    return None


def payload_bytes(msg: Message) -> int:
    """Data bytes a message carries (what credit_bytes counts)."""
    if isinstance(msg, Writes):
        recs = msg.records
        if type(recs) is Records:
            return recs.data_bytes
        return sum(_nbytes(r.data) for r in recs)
    if isinstance(msg, Resync):
        return _nbytes(msg.data)
    return 0


# --------------------------------------------------------------------------
# codecs


def _check_data_len(what: str, length: int, flags: int, data: Buffer) -> int:
    n = _nbytes(data)
    want = 0 if flags & NO_DATA_FLAGS else length
    if n != want:
        raise LengthMismatch(f"{what}: length field {length} (flags {flags:#x}) but {n} data bytes")
    return n


class _FixedCodec:
    def __init__(self, cls, con):
        self.cls = cls
        self.st, self.names = derive_struct(con)

    def encode(self, msg) -> list:
        try:
            return [self.st.pack(*[getattr(msg, n) for n in self.names])]
        except struct.error as e:
            raise MalformedFrame(f"{msg.TYPE.name}: field out of range: {e}") from None

    def decode(self, body: memoryview, stream_id: int, epoch: int):
        if body.nbytes != self.st.size:
            raise MalformedFrame(
                f"{self.cls.TYPE.name} body is {body.nbytes} bytes, expected {self.st.size}"
            )
        vals = self.st.unpack_from(body)
        return self.cls(stream_id=stream_id, epoch=epoch, **dict(zip(self.names, vals)))


class _GapCodec(_FixedCodec):
    def decode(self, body, stream_id, epoch):
        msg = _FixedCodec.decode(self, body, stream_id, epoch)
        try:
            msg.reason = GapReason(msg.reason)
        except ValueError:
            raise MalformedFrame(f"GAP: unknown reason {msg.reason}") from None
        return msg


def _utf8(what: str, s: str, limit: int, exc=MalformedFrame) -> bytes:
    b = s.encode("utf-8")
    if len(b) > limit:
        raise exc(f"{what} is {len(b)} UTF-8 bytes, at most {limit} allowed")
    return b


def _construct_build(con, values: dict, what: str) -> bytes:
    try:
        return con.build(values)
    except (ConstructError, struct.error, ValueError, TypeError) as e:
        raise MalformedFrame(f"{what}: cannot encode: {e}") from None


def _construct_parse(con, body: memoryview, what: str):
    try:
        return con.parse(body.tobytes())
    except (ConstructError, UnicodeDecodeError) as e:
        raise MalformedFrame(f"{what}: cannot decode body: {type(e).__name__}: {e}") from None


class _HelloCodec:
    cls = Hello

    def encode(self, m: Hello) -> list:
        _utf8("HELLO vdev", m.vdev, MAX_VDEV_BYTES)
        d = {n: getattr(m, n) for n in (
            "domid", "devid", "size_bytes", "logical_sector_size",
            "physical_sector_size", "next_seq", "features", "vdev")}
        d["host_id"] = uuid.UUID(str(m.host_id)).bytes
        d["vbd_uuid"] = uuid.UUID(str(m.vbd_uuid)).bytes
        return [_construct_build(HelloBody, d, "HELLO")]

    def decode(self, body, stream_id, epoch) -> Hello:
        c = _construct_parse(HelloBody, body, "HELLO")
        _utf8("HELLO vdev", c.vdev, MAX_VDEV_BYTES)
        return Hello(
            stream_id=stream_id, epoch=epoch,
            host_id=uuid.UUID(bytes=c.host_id), vbd_uuid=uuid.UUID(bytes=c.vbd_uuid),
            domid=c.domid, devid=c.devid, vdev=c.vdev, size_bytes=c.size_bytes,
            logical_sector_size=c.logical_sector_size,
            physical_sector_size=c.physical_sector_size,
            next_seq=c.next_seq, features=c.features,
        )


class _CheckpointCodec:
    cls = Checkpoint

    def encode(self, m: Checkpoint) -> list:
        _utf8("CHECKPOINT label", m.label, MAX_LABEL_BYTES, LabelTooLong)
        if m.kind not in CheckpointKind._value2member_map_:
            raise MalformedFrame(f"CHECKPOINT: unknown kind {m.kind}")
        d = dict(seq=m.seq, timestamp_ns=m.timestamp_ns, kind=int(m.kind), label=m.label)
        return [_construct_build(CheckpointBody, d, "CHECKPOINT")]

    def decode(self, body, stream_id, epoch) -> Checkpoint:
        c = _construct_parse(CheckpointBody, body, "CHECKPOINT")
        _utf8("CHECKPOINT label", c.label, MAX_LABEL_BYTES, LabelTooLong)
        try:
            kind = CheckpointKind(c.kind)
        except ValueError:
            raise MalformedFrame(f"CHECKPOINT: unknown kind {c.kind}") from None
        return Checkpoint(stream_id=stream_id, epoch=epoch, seq=c.seq,
                          timestamp_ns=c.timestamp_ns, kind=kind, label=c.label)


class _WritesCodec:
    cls = Writes

    def encode(self, m: Writes) -> list:
        recs = m.records
        if not recs:
            raise MalformedFrame("WRITES: empty batch")
        if len(recs) > MAX_RECORDS_PER_BATCH:
            raise OversizedFrame(f"WRITES: {len(recs)} records, at most {MAX_RECORDS_PER_BATCH}")
        parts = [_WHEAD.pack(m.first_seq, len(recs))]
        append, pack, total, nodata = parts.append, _REC.pack, 0, int(NO_DATA_FLAGS)
        try:
            for r in recs:
                d, length, flags = r.data, r.length, r.flags
                n = d.nbytes if type(d) is memoryview else len(d)
                if n != (0 if flags & nodata else length):
                    _check_data_len(f"WRITES record seq {r.seq}", length, flags, d)  # raises
                total += n
                append(pack(r.seq, r.timestamp_ns, r.sector, length, flags))
                if n:
                    append(d)
        except struct.error as e:
            raise MalformedFrame(f"WRITES: field out of range: {e}") from None
        if total > MAX_BATCH_DATA_BYTES:
            raise OversizedFrame(f"WRITES: {total} data bytes, at most {MAX_BATCH_DATA_BYTES}")
        return parts, _WHEAD.size + len(recs) * _REC.size + total

    def decode(self, body, stream_id, epoch) -> Writes:
        end = body.nbytes
        if end < _WHEAD.size:
            raise MalformedFrame(f"WRITES body is {end} bytes, shorter than its head")
        first_seq, count = _WHEAD.unpack_from(body)
        if count == 0:
            raise MalformedFrame("WRITES: empty batch")
        if count > MAX_RECORDS_PER_BATCH:
            raise OversizedFrame(f"WRITES: {count} records, at most {MAX_RECORDS_PER_BATCH}")
        fast = Records.parse(body, count)
        if fast is not None:
            if fast.data_bytes > MAX_BATCH_DATA_BYTES:
                raise OversizedFrame(f"WRITES: {fast.data_bytes} data bytes, "
                                     f"at most {MAX_BATCH_DATA_BYTES}")
            return Writes(stream_id=stream_id, epoch=epoch, first_seq=first_seq, records=fast)
        off, rsize, unpack, nodata = _WHEAD.size, _REC.size, _REC.unpack_from, int(NO_DATA_FLAGS)
        records = []
        append, total = records.append, 0
        for _ in range(count):
            if off + rsize > end:
                raise MalformedFrame(f"WRITES: body ends inside record {len(records)} of {count}")
            seq, ts, sector, length, flags = unpack(body, off)
            off += rsize
            n = 0 if flags & nodata else length
            if off + n > end:
                raise MalformedFrame(
                    f"WRITES: record seq {seq} declares {length} bytes, "
                    f"only {end - off} left in the body")
            append(WriteRecord(seq, ts, sector, length, flags, body[off:off + n]))
            off += n
            total += n
        if total > MAX_BATCH_DATA_BYTES:
            raise OversizedFrame(f"WRITES: {total} data bytes, at most {MAX_BATCH_DATA_BYTES}")
        if off != end:
            raise MalformedFrame(f"WRITES: {end - off} trailing bytes after {count} records")
        return Writes(stream_id=stream_id, epoch=epoch, first_seq=first_seq, records=records)


class _ResyncCodec:
    cls = Resync

    def encode(self, m: Resync) -> list:
        n = _check_data_len(f"RESYNC seq {m.seq}", m.length, m.flags, m.data)
        if n > MAX_BATCH_DATA_BYTES:
            raise OversizedFrame(f"RESYNC: {n} data bytes, at most {MAX_BATCH_DATA_BYTES}")
        try:
            head = _RHEAD.pack(m.seq, m.sector, m.length, m.flags)
        except struct.error as e:
            raise MalformedFrame(f"RESYNC: field out of range: {e}") from None
        return [head, m.data] if n else [head]

    def decode(self, body, stream_id, epoch) -> Resync:
        if body.nbytes < _RHEAD.size:
            raise MalformedFrame(f"RESYNC body is {body.nbytes} bytes, shorter than its head")
        seq, sector, length, flags = _RHEAD.unpack_from(body)
        n = 0 if flags & NO_DATA_FLAGS else length
        if n > MAX_BATCH_DATA_BYTES:
            raise OversizedFrame(f"RESYNC: {n} data bytes, at most {MAX_BATCH_DATA_BYTES}")
        have = body.nbytes - _RHEAD.size
        if have != n:
            raise MalformedFrame(f"RESYNC seq {seq}: declares {n} data bytes, body has {have}")
        return Resync(stream_id=stream_id, epoch=epoch, seq=seq, sector=sector,
                      length=length, flags=flags, data=body[_RHEAD.size:])


_CODECS = {
    MsgType.HELLO: _HelloCodec(),
    MsgType.WRITES: _WritesCodec(),
    MsgType.FLUSH: _FixedCodec(Flush, FlushBody),
    MsgType.GAP: _GapCodec(Gap, GapBody),
    MsgType.RESYNC: _ResyncCodec(),
    MsgType.RESYNC_END: _FixedCodec(ResyncEnd, ResyncEndBody),
    MsgType.CHECKPOINT: _CheckpointCodec(),
    MsgType.ACK: _FixedCodec(Ack, AckBody),
    MsgType.HEARTBEAT: _FixedCodec(Heartbeat, HeartbeatBody),
}

MESSAGE_CLASSES = {t: c.cls for t, c in _CODECS.items()}


def encode(msg: Message) -> bytes:
    """Serialize one message into one frame (payload copied exactly once)."""
    codec = _CODECS.get(getattr(msg, "TYPE", None))
    if codec is None or not isinstance(msg, codec.cls):
        raise UnknownMessageType(f"cannot encode {type(msg).__name__}")
    parts = codec.encode(msg)
    if type(parts) is tuple:  # (parts, body_len) from codecs that know it
        parts, body_len = parts
    else:
        body_len = sum(map(_nbytes, parts))
    if body_len > MAX_BODY_BYTES:
        raise OversizedFrame(f"{msg.TYPE.name}: body of {body_len} bytes, at most {MAX_BODY_BYTES}")
    try:
        prefix = _HDR_PREFIX.pack(MAGIC, PROTOCOL_VERSION, msg.TYPE, 0,
                                  msg.stream_id, msg.epoch, body_len)
    except struct.error as e:
        raise MalformedFrame(f"{msg.TYPE.name}: header field out of range: {e}") from None
    h = ChecksumFn(prefix)
    for p in parts:
        h.update(p)
    return b"".join([prefix, _U64.pack(h.intdigest()), *parts])


def encode_writes_raw(stream_id: int, epoch: int, first_seq: int, count: int,
                      records: Buffer) -> bytes:
    """A WRITES frame from records already laid out as on the wire.

    The shim's mirror ring stores records in exactly this layout (a test
    checks it), so the drainer sends a run of them without looking at each:
    the payload is copied once, into the frame.  The receiver checks every
    record as it checks any WRITES frame.
    """
    return b"".join(writes_raw_parts(stream_id, epoch, first_seq, count, records))


def writes_raw_parts(stream_id: int, epoch: int, first_seq: int, count: int,
                     records: Buffer) -> list:
    """The same frame as `encode_writes_raw`, as a list of buffers whose
    concatenation is the frame (for writev: no copy of the records here)."""
    if count == 0 or count > MAX_RECORDS_PER_BATCH:
        raise MalformedFrame(f"WRITES: {count} records, 1 to {MAX_RECORDS_PER_BATCH} allowed")
    head = _WHEAD.pack(first_seq, count)
    body_len = len(head) + _nbytes(records)
    if body_len > MAX_BODY_BYTES:
        raise OversizedFrame(f"WRITES: body of {body_len} bytes, at most {MAX_BODY_BYTES}")
    prefix = _HDR_PREFIX.pack(MAGIC, PROTOCOL_VERSION, MsgType.WRITES, 0, stream_id, epoch,
                              body_len)
    h = ChecksumFn(prefix)
    h.update(head)
    h.update(records)
    return [prefix + _U64.pack(h.intdigest()) + head, records]


# A stream frame's time, read at fixed offsets without decoding the frame:
# WRITES carry it in their first record (after the record's seq), FLUSH, GAP,
# RESYNC_END and CHECKPOINT right after their seq; RESYNC has none.
_TIME_OFF = {MsgType.WRITES: HEADER_SIZE + WritesHead.sizeof() + 8,
             MsgType.FLUSH: HEADER_SIZE + 8, MsgType.GAP: HEADER_SIZE + 8,
             MsgType.RESYNC_END: HEADER_SIZE + 8, MsgType.CHECKPOINT: HEADER_SIZE + 8}


FRAME_TIME_BYTES = max(_TIME_OFF.values()) + 8      # what frame_time_ns reads of a frame


def frame_time_ns(frame: Buffer) -> int | None:
    """The completion time of a stream frame's first write (of its event for
    FLUSH, GAP, RESYNC_END, CHECKPOINT), or None (RESYNC, anything else, a
    frame too short).  Unchecked: for frames this side made (the spill log's,
    those in flight), where decoding a whole frame for one field costs its
    checksum and records."""
    mv = memoryview(frame).cast("B")
    off = _TIME_OFF.get(mv[6]) if len(mv) > 6 else None
    if off is None or len(mv) < off + 8:
        return None
    return int.from_bytes(mv[off:off + 8], "little")


def restamp(frame: Buffer, epoch: int) -> bytes:
    """The same frame for another session: its epoch replaced, its checksum redone
    (a spilled frame sent after a reconnect)."""
    mv = memoryview(frame).cast("B")
    fields = list(_HDR_PREFIX.unpack_from(mv))
    fields[5] = epoch
    prefix = _HDR_PREFIX.pack(*fields)
    h = ChecksumFn(prefix)
    h.update(mv[HEADER_SIZE:])
    return b"".join([prefix, _U64.pack(h.intdigest()), mv[HEADER_SIZE:]])


def decode(buf: Buffer) -> Message:
    """Parse and verify one frame.  Payload fields are memoryviews into ``buf``."""
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = mv.nbytes
    if n > MAX_FRAME_BYTES:
        raise OversizedFrame(f"frame of {n} bytes, at most {MAX_FRAME_BYTES}")
    if n < HEADER_SIZE:
        raise TruncatedFrame(f"frame of {n} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, mtype, flags, stream_id, epoch, body_len, cksum = _HDR.unpack_from(mv)
    if magic != MAGIC:
        raise BadMagic(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version}, this end speaks {PROTOCOL_VERSION}")
    if body_len > MAX_BODY_BYTES:
        raise OversizedFrame(f"header declares a {body_len}-byte body, at most {MAX_BODY_BYTES}")
    if n < HEADER_SIZE + body_len:
        raise TruncatedFrame(f"frame of {n} bytes, header declares {HEADER_SIZE + body_len}")
    if n > HEADER_SIZE + body_len:
        raise OversizedFrame(f"frame of {n} bytes, header declares {HEADER_SIZE + body_len}")
    h = ChecksumFn(mv[:_CKSUM_OFF])
    h.update(mv[HEADER_SIZE:])
    got = h.intdigest()
    if got != cksum:
        raise ChecksumMismatch(f"checksum {got:#018x} does not match header {cksum:#018x}")
    if flags:
        raise MalformedFrame(f"reserved header flags {flags:#x} set")
    codec = _CODECS.get(mtype)
    if codec is None:
        raise UnknownMessageType(f"unknown message type {mtype}")
    return codec.decode(mv[HEADER_SIZE:], stream_id, epoch)


# --------------------------------------------------------------------------
# flow control


class CreditWindow:
    """Credit arithmetic shared by dom0 (may I send?) and the appliance (was it allowed?).

    Outstanding = seq-consuming messages whose last seq is above the latest
    ACK's acked_seq.  Before the first ACK of a session there is no credit.
    """

    def __init__(self):
        self.acked_seq = 0
        self.credit_bytes = 0
        self.credit_msgs = 0
        self.granted = False
        self._out: deque[tuple[int, int]] = deque()  # (last_seq, payload bytes)
        self._out_bytes = 0

    def on_ack(self, ack: Ack) -> None:
        self.granted = True
        self.acked_seq = max(self.acked_seq, ack.acked_seq)
        self.credit_bytes, self.credit_msgs = ack.credit_bytes, ack.credit_msgs
        out = self._out
        while out and out[0][0] <= self.acked_seq:
            self._out_bytes -= out.popleft()[1]

    @property
    def outstanding(self) -> tuple[int, int]:
        """(messages, payload bytes) sent beyond acked_seq."""
        return len(self._out), self._out_bytes

    def allows(self, last_seq: int, nbytes: int) -> bool:
        if last_seq <= self.acked_seq:
            return True  # a re-send of acknowledged data costs no credit
        if not self.granted:
            return False
        return (len(self._out) + 1 <= self.credit_msgs
                and self._out_bytes + nbytes <= self.credit_bytes)

    def sent(self, last_seq: int, nbytes: int) -> None:
        if last_seq > self.acked_seq:
            self._out.append((last_seq, nbytes))
            self._out_bytes += nbytes


# --------------------------------------------------------------------------
# receiver-side stream checker


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


class StreamChecker:
    """Validates one VBD's decoded messages, in arrival order (appliance side).

    ``high_water`` is the highest seq ever accepted for this stream, ``epoch``
    the highest epoch seen, ``in_resync`` whether a GAP is still open (all
    three restored from the journal when the appliance restarts; 0/0/False
    for a new stream).  :meth:`check` returns the message to apply -- a WRITES
    batch trimmed to its fresh records -- or ``None`` for an explicable
    duplicate to drop; it raises a :class:`StreamError` subclass otherwise and
    then leaves its state unchanged (the receiver should end the session; a
    HELLO with a higher epoch starts a new one).  With ``enforce_credit`` it
    also rejects data sent beyond the credit granted through :meth:`granted`.
    With ``resume`` it also accepts what a session resuming from the
    appliance's high water explains (module docstring, "Resuming from the
    appliance's high water"): the appliance receiver's setting.
    """

    def __init__(self, stream_id: int, *, high_water: int = 0, epoch: int = 0,
                 vbd_uuid: uuid.UUID | None = None, in_resync: bool = False,
                 enforce_credit: bool = False, resume: bool = False):
        self.stream_id = stream_id
        self.high_water = high_water
        self.epoch = epoch
        self.vbd_uuid = vbd_uuid
        self.in_resync = in_resync
        self.enforce_credit = enforce_credit
        self.resume = resume
        self.hello: Hello | None = None
        self.cursor: int | None = None  # next seq expected in this session
        self.received = False  #: a seq-consuming frame was accepted in this session
        self.skipped = 0  #: seqs this session skipped because the appliance held them
        self.credit = CreditWindow()

    # -- naming and errors
    @property
    def vbd(self) -> str:
        s = f"vbd {self.stream_id:#x}"
        if self.hello is not None:
            h = self.hello
            s += f" (dom{h.domid}/{h.vdev or h.devid} {h.vbd_uuid} epoch {self.epoch})"
        return s

    def _fail(self, exc, what: str, received=None, expected=None):
        exp = self.cursor if expected is None else expected
        exp_s = "-" if exp is None else exp
        rec_s = "-" if received is None else received
        raise exc(f"{self.vbd}: expected seq {exp_s}, received seq {rec_s}: {what}",
                  vbd=self.vbd, expected=exp, received=received)

    # -- entry points
    def stale(self, epoch: int) -> bool:
        """Whether a frame (not a HELLO) whose header says ``epoch`` is, with
        ``resume``, one of an earlier session to drop unread, the session going
        on (see the module docstring); :meth:`check` would reject it."""
        return self.resume and epoch < self.epoch

    def feed(self, frame: Buffer) -> Message | None:
        """decode() + check(); frame errors re-raised with this VBD's context."""
        try:
            msg = decode(frame)
        except FrameError as e:
            self._fail(type(e), str(e))
        return self.check(msg)

    def granted(self, ack: Ack) -> None:
        """Record an ACK the appliance sent on this stream (for credit checks)."""
        self.credit.on_ack(ack)

    def check(self, msg: Message) -> Message | None:
        rng = seq_range(msg) if isinstance(msg, Message) else None
        received = rng[0] if rng else None
        if not isinstance(msg, Message) or msg.TYPE not in _CODECS:
            self._fail(ProtocolStateError, f"not a message: {type(msg).__name__}")
        if msg.stream_id != self.stream_id:
            self._fail(IdentityError, f"{msg.TYPE.name} for stream {msg.stream_id:#x}", received)
        if isinstance(msg, Hello):
            return self._hello(msg)
        if self.hello is None:
            self._fail(ProtocolStateError, f"{msg.TYPE.name} before HELLO", received)
        if msg.epoch != self.epoch:
            self._fail(EpochError, f"{msg.TYPE.name} of epoch {msg.epoch}, "
                       f"session is epoch {self.epoch}", received)
        if isinstance(msg, Ack):
            self._fail(ProtocolStateError, "ACK travels appliance -> dom0 only", received)
        if isinstance(msg, Heartbeat):
            last = self.cursor - 1
            if msg.last_seq > last and not (self.resume and msg.last_seq <= self.high_water):
                self._fail(SequenceGap, f"HEARTBEAT says seq {msg.last_seq} was sent; "
                           f"{msg.last_seq - last} seq(s) missing", msg.last_seq)
            if msg.last_seq < last:
                self._fail(SequenceReplay, f"stale HEARTBEAT (last sent {msg.last_seq}, "
                           f"received up to {last})", msg.last_seq)
            return msg
        return self._seq_msg(msg, *rng)

    # -- HELLO
    def _hello(self, h: Hello) -> Hello:
        nxt = h.next_seq
        if h.epoch <= self.epoch:
            self._fail(EpochError, f"HELLO epoch {h.epoch} is not above epoch {self.epoch}",
                       nxt, self.high_water + 1)
        if self.vbd_uuid is not None and h.vbd_uuid != self.vbd_uuid:
            self._fail(IdentityError, f"HELLO for VBD {h.vbd_uuid}, stream belongs to "
                       f"{self.vbd_uuid}", nxt, self.high_water + 1)
        ls, ps = h.logical_sector_size, h.physical_sector_size
        bad = None
        if not (_pow2(ls) and SECTOR_SIZE <= ls <= 65536):
            bad = f"logical sector size {ls}"
        elif not (_pow2(ps) and ps >= ls):
            bad = f"physical sector size {ps} (logical {ls})"
        elif h.size_bytes % ls:
            bad = f"size {h.size_bytes} not a multiple of {ls}"
        elif nxt == 0:
            bad = "next_seq 0 (seqs start at 1)"
        if bad:
            self._fail(ProtocolStateError, f"bad HELLO: {bad}", nxt, self.high_water + 1)
        if nxt > self.high_water + 1:
            self._fail(SequenceGap, f"HELLO resumes at {nxt}, highest seq received is "
                       f"{self.high_water}", nxt, self.high_water + 1)
        self.epoch, self.hello, self.cursor = h.epoch, h, nxt
        self.vbd_uuid = h.vbd_uuid
        self.received, self.skipped = False, 0
        self.credit = CreditWindow()
        return h

    # -- seq-consuming messages
    def _check_region(self, what: str, seq: int, sector: int, length: int) -> None:
        h = self.hello
        ls = h.logical_sector_size
        if length == 0:
            self._fail(Misaligned, f"{what}: zero length", seq)
        if (sector * SECTOR_SIZE) % ls or length % ls:
            self._fail(Misaligned, f"{what}: sector {sector} length {length} not aligned "
                       f"to the {ls}-byte logical sector", seq)
        if sector * SECTOR_SIZE + length > h.size_bytes:
            self._fail(OutOfRange, f"{what}: sector {sector} + {length} bytes ends past "
                       f"the disk end ({h.size_bytes} bytes)", seq)

    def _check_data(self, what: str, seq: int, length: int, flags: int, data) -> None:
        n = _nbytes(data)
        want = 0 if flags & _NO_DATA else length
        if n != want:
            self._fail(LengthMismatch, f"{what}: length {length} (flags {flags:#x}) "
                       f"but {n} data bytes", seq)

    def _check_flags(self, what: str, seq: int, flags: int, allowed: int) -> None:
        if not flags:
            return      # the common case; plain ints below: IntFlag arithmetic is slow
        feats = int(self.hello.features)
        if flags & ~allowed:
            self._fail(RecordError, f"{what}: flags {flags:#x} not allowed here", seq)
        if (flags & _NO_DATA) == _NO_DATA:
            self._fail(RecordError, f"{what}: DISCARD and ZEROES together", seq)
        for flag, feat, name in _FLAG_FEATURES:
            if flags & flag and not feats & feat:
                self._fail(RecordError, f"{what}: {name} without the HELLO feature", seq)

    def _check_records(self, records, first: int, last: int) -> None:
        """Every record of a WRITES batch, one by one (raises at the first bad one)."""
        for i, r in enumerate(records):
            if r.seq != first + i:
                self._fail(SequenceDisorder, f"WRITES record {i} of batch "
                           f"{first}..{last} has seq {r.seq}", r.seq, first + i)
            what = f"WRITES record seq {r.seq}"
            self._check_flags(what, r.seq, r.flags, _WRITE_ALLOWED)
            self._check_data(what, r.seq, r.length, r.flags, r.data)
            self._check_region(what, r.seq, r.sector, r.length)

    def _records_ok(self, recs: Records, first: int) -> bool:
        """The checks of :meth:`_check_records` on the whole batch at once (numpy);
        False if any record fails (then the one-by-one pass names it).  The data
        lengths need no check: :meth:`Records.parse` found every record carrying
        exactly its wire length."""
        import numpy as np

        n = len(recs)
        h = self.hello
        ls = h.logical_sector_size
        seq = recs.seq
        if int(seq[0]) != first or (n > 1 and not (np.diff(seq) == 1).all()):
            return False
        fl = recs.flags
        if fl.any():
            feats = int(h.features)
            bad = ~np.uint32(_WRITE_ALLOWED)
            for flag, feat, _name in _FLAG_FEATURES:
                if not feats & feat:
                    bad |= np.uint32(flag)
            if (fl & bad).any() or ((fl & _NO_DATA) == _NO_DATA).any():
                return False
        length = recs.length.astype(np.uint64)
        sector = recs.sector
        size = h.size_bytes
        if not length.all() or (length % ls).any():
            return False
        if ls > SECTOR_SIZE and (sector % (ls // SECTOR_SIZE)).any():
            return False
        # sector * 512 may wrap in uint64 only where sector is already past the end
        return bool(((sector <= size // SECTOR_SIZE)
                     & (sector * SECTOR_SIZE + length <= size)).all())

    def _seq_msg(self, msg: Message, first: int, last: int) -> Message | None:
        """A seq-consuming message: checked from where it starts where a resuming
        session explains that (``resume``), else from the cursor."""
        cursor = self.cursor
        if not self.resume or first == cursor:
            return self._in_order(msg, first, last)
        if cursor < first <= self.high_water + 1:
            why = (f"resumes at seq {first} after the appliance's high water "
                   f"{self.high_water} (seqs {cursor}..{first - 1} already held, "
                   f"not received again)")
        elif first < cursor and not self.received:
            why = (f"first frame {first}..{last} of the session starts below its "
                   f"HELLO's seq {cursor}: seqs up to {self.high_water} already held, dropped")
        else:
            return self._in_order(msg, first, last)
        self.cursor = first  # what _in_order checks against, and its errors name
        try:
            out = self._in_order(msg, first, last)
        except WireError:
            self.cursor = cursor  # rejected: state unchanged
            raise
        log.info("%s: %s", self.vbd, why)
        self.skipped += max(0, first - cursor)
        return out

    def _in_order(self, msg: Message, first: int, last: int) -> Message | None:
        """A seq-consuming message that must start at the cursor."""
        name = msg.TYPE.name
        if first > self.cursor:
            self._fail(SequenceGap, f"{name}: {first - self.cursor} seq(s) missing", first)
        if first < self.cursor:
            kind = "duplicate" if last == self.cursor - 1 else "replay"
            self._fail(SequenceReplay, f"{name}: {kind} of an already received seq "
                       f"within this session", first)
        if isinstance(msg, Writes):
            if not msg.records:
                self._fail(ProtocolStateError, "empty WRITES batch", first)
            if len(msg.records) > MAX_RECORDS_PER_BATCH:
                self._fail(RecordError, f"{len(msg.records)} records in one batch", first)
            if type(msg.records) is not Records or not self._records_ok(msg.records, first):
                self._check_records(msg.records, first, last)
        elif isinstance(msg, Resync):
            self._check_flags(f"RESYNC seq {first}", first, msg.flags, int(RESYNC_FLAGS))
            self._check_data(f"RESYNC seq {first}", first, msg.length, msg.flags, msg.data)
            self._check_region(f"RESYNC seq {first}", first, msg.sector, msg.length)
        elif isinstance(msg, Checkpoint):
            if len(msg.label.encode("utf-8")) > MAX_LABEL_BYTES:
                self._fail(LabelTooLong, f"CHECKPOINT label over {MAX_LABEL_BYTES} bytes", first)

        nbytes = payload_bytes(msg)
        if self.enforce_credit and not self.credit.allows(last, nbytes):
            m, b = self.credit.outstanding
            self._fail(CreditExceeded, f"{name} of {nbytes} bytes beyond credit "
                       f"(acked {self.credit.acked_seq}, outstanding {m} msgs/{b} bytes, "
                       f"granted {self.credit.credit_msgs} msgs/{self.credit.credit_bytes} "
                       f"bytes{'' if self.credit.granted else ', no ACK yet'})", first)

        fresh_from = max(first, self.high_water + 1)
        in_resync = self.in_resync
        if fresh_from <= last:  # state machine applies to fresh data only
            if isinstance(msg, Gap):
                in_resync = True
            elif isinstance(msg, Resync) and not in_resync:
                self._fail(ProtocolStateError, "RESYNC without an open GAP", first)
            elif isinstance(msg, ResyncEnd):
                if not in_resync:
                    self._fail(ProtocolStateError, "RESYNC_END without an open GAP", first)
                in_resync = False

        # commit
        self.credit.sent(last, nbytes)
        self.cursor = last + 1
        self.received = True
        if fresh_from > last:
            return None
        self.high_water = last
        self.in_resync = in_resync
        if fresh_from > first:  # only a WRITES batch can straddle high_water
            return replace(msg, first_seq=fresh_from, records=msg.records[fresh_from - first:])
        return msg


# --------------------------------------------------------------------------
# benchmark:  python -m xentap.wire --bench


def _bench(seconds: float = 1.0) -> None:  # pragma: no cover - manual
    import os
    import time
    import zlib

    blob = os.urandom(1 << 20)
    for name, fn in (("xxh3_64", xxhash.xxh3_64_intdigest), ("zlib.crc32", zlib.crc32)):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(blob)
            n += 1
        print(f"checksum {name:11s} 1 MiB buffer: {n * len(blob) / (time.perf_counter() - t0) / 1e6:8.0f} MB/s")

    def batch(rec_size: int, nrec: int) -> Writes:
        mv = memoryview(blob)
        return Writes(stream_id=1, epoch=1, first_seq=1, records=[
            WriteRecord(1 + i, 0, (i * rec_size) // SECTOR_SIZE, rec_size, 0,
                        mv[(i * rec_size) % len(blob):][:rec_size]) for i in range(nrec)])

    for label, rec_size, nrec in (("4 KiB records x256 (1 MiB batch)", 4096, 256),
                                  ("1 MiB record  x1", 1 << 20, 1),
                                  ("1 MiB records x4 (4 MiB batch)", 1 << 20, 4)):
        msg = batch(rec_size, nrec)
        payload = rec_size * nrec
        te = td = 0.0
        n = 0
        while te + td < seconds:
            t0 = time.perf_counter()
            frame = encode(msg)
            t1 = time.perf_counter()
            decode(frame)
            t2 = time.perf_counter()
            te += t1 - t0
            td += t2 - t1
            n += 1
        tot = n * payload / 1e6
        print(f"{label:34s} encode {tot / te:7.0f} MB/s  decode {tot / td:7.0f} MB/s  "
              f"encode+decode {tot / (te + td):7.0f} MB/s")


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--bench" in sys.argv:
        _bench()
    else:
        print(__doc__)
