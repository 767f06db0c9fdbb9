"""The drainer's HELLO to an appliance that does not answer (yet)."""
from __future__ import annotations

import time
import uuid

import pytest
import zmq

from tests.test_mirror_ring import image, mirrored  # noqa: F401 - fixture
from xentap import drainer as dr
from xentap import wire


@pytest.mark.slow
def test_an_unanswered_hello_is_repeated_less_and_less_often(tmp_path, image):  # noqa: F811
    """An appliance slow to answer (emulated, loaded) got a new HELLO, a new
    epoch, every second, and each one a session the older frames then hit:
    the interval doubles up to HELLO_EVERY_MAX, and a new connection starts
    over at once."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    g = mirrored(tmp_path, image)
    ident = dr.VbdIdentity(vbd_uuid=uuid.uuid4(), domid=3, devid=51712, vdev="xvda",
                           size_bytes=32 << 20)
    d = dr.Drainer(g.vbd, ident, f"tcp://127.0.0.1:{port}", image_path=str(image),
                   spill_dir=str(tmp_path / "spill"), spill_limit=1 << 20, context=ctx).start()
    try:
        hellos = []
        end = time.monotonic() + 8.5
        while time.monotonic() < end:
            if router.poll(100):
                _, frame = router.recv_multipart()
                msg = wire.decode(frame)
                assert isinstance(msg, wire.Hello)
                hellos.append((time.monotonic(), msg.epoch))
        gaps = [b[0] - a[0] for a, b in zip(hellos, hellos[1:])]
        # 0, 1, 3, 7 s: four HELLOs in 8 s, not nine; each a new epoch
        assert 3 <= len(hellos) <= 5, gaps
        assert all(b[1] > a[1] for a, b in zip(hellos, hellos[1:]))
        assert gaps[0] < 1.6 and max(gaps) <= dr.HELLO_EVERY_MAX + 0.6, gaps
        assert gaps[-1] > 1.8 * gaps[0], gaps
    finally:
        d.stop()
        g.close()
        router.close()
        ctx.term()
