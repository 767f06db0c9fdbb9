"""A daemon killed at any instant leaves a ring the next one can serve.

An answer is written into its ring slot (over its request) before rsp_prod
moves past it.  A daemon killed between the two used to leave a slot that
the next one read back as a request (garbage: "unknown operation", "no
segments") while the guest never heard the answer.  The publish log in the
ring page's padding (struct xt_publish_log) lets the next daemon finish
that publication.  Here the killed daemon's leftovers are laid out by hand,
byte for byte as blkback.c's publish() leaves them.
"""
from __future__ import annotations

import struct

import pytest

from tests.fuzz import blkif as B
from tests.test_hostile import HostileGuest, image, log_lines  # noqa: F401 (fixtures)

PUBLISH_MAGIC = 0x78747062
LOG_OFF = 20        # blkif_sring_t.__pad


def leave_half_published(g: HostileGuest, wid: int) -> None:
    """Two writes produced; the first answered into its slot and logged, rsp_prod not moved."""
    g.vbd.disconnect()
    r = g.ring
    g.raw.write(g.data, 0, b"A" * 4096)
    g.raw.write(g.data + 1, 0, b"B" * 4096)
    r.slot_write(0, B.rw(g.protocol, B.OP_WRITE, wid, 8, [B.segment(g.gref(0))]))
    r.slot_write(1, B.rw(g.protocol, B.OP_WRITE, wid + 1, 16, [B.segment(g.gref(1))]))
    r.req_prod = 2
    r._set(0, 2)
    log = struct.pack("<IIIIBBh", PUBLISH_MAGIC ^ 0, 0, wid & 0xFFFFFFFF, wid >> 32,
                      B.OP_WRITE, 0, B.RSP_OKAY)
    g.raw.write(r.frame, LOG_OFF, log)
    # The answer over request 0's slot, as the ABI lays it out.
    rsp = struct.pack("<QBxh", wid, B.OP_WRITE, B.RSP_OKAY)
    r.slot_write(0, rsp + r.slot_read(0, r.layout.entry)[len(rsp):])


def test_an_answer_written_but_not_published_is_published_by_the_next_daemon(
        tmp_path, image, log_lines):  # noqa: F811
    g = HostileGuest(tmp_path, image)
    try:
        wid = g.next_id()
        leave_half_published(g, wid)
        g.vbd.connect(g.transport, g.ring.params(5))
        g.ring.kick()
        answers = g.ring.responses(2)
        assert [a[:3] for a in answers] == [(wid, B.OP_WRITE, B.RSP_OKAY),
                                            (wid + 1, B.OP_WRITE, B.RSP_OKAY)]
        assert not [line for line in log_lines() if "refused" in line]
        assert any("finished publishing" in line for line in log_lines())
        with open(image, "rb") as f:
            f.seek(16 * 512)
            assert f.read(4096) == b"B" * 4096    # request 1 was served
        g.write_read_back()
    finally:
        g.close()


@pytest.mark.parametrize("idx,check", [(7, PUBLISH_MAGIC ^ 7), (0, 12345)],
                         ids=["another-slot", "bad-check"])
def test_a_publish_log_the_guest_forged_is_ignored(tmp_path, image, log_lines, idx, check):  # noqa: F811
    g = HostileGuest(tmp_path, image)
    try:
        wid = g.next_id()
        r = g.ring
        g.vbd.disconnect()
        g.raw.write(g.data, 0, b"C" * 4096)
        r.slot_write(0, B.rw(g.protocol, B.OP_WRITE, wid, 8, [B.segment(g.gref(0))]))
        r.req_prod = 1
        r._set(0, 1)
        g.raw.write(r.frame, LOG_OFF, struct.pack("<IIIIBBh", check, idx, 1, 0, 0, 0, 0))
        g.vbd.connect(g.transport, g.ring.params(5))
        g.ring.kick()
        assert [a[:3] for a in r.responses(1)] == [(wid, B.OP_WRITE, B.RSP_OKAY)]
        assert not any("finished publishing" in line for line in log_lines())
    finally:
        g.close()
