"""Whatever a guest writes in its frontend node is untrusted: a bad value
closes that VBD with an error node and leaves every other VBD alone."""
from __future__ import annotations

import pytest

from xentap import xs_keys as K
from xentap.xenbus import FrontendError, parse_ring_params
from xentap.xs_keys import XenbusState

from tests.blkfront_test import HandshakeError

BAD, GOOD = 5, 6


def _publish_garbage(env, tweak, vdev="xvda"):
    """Attaches a disk to BAD, publishes real rings with ``tweak`` applied,
    returns (front, backend error)."""
    f = env.front(BAD, vdev, connect=False)
    f.wait_backend(XenbusState.INIT_WAIT)
    from xentap import shim
    f.front = shim.SimFront(f.simdir, sectors=int(f.read(f"{f.be}/{K.BE_SECTORS}")),
                            nr_queues=tweak.get("_queues", 1), ring_order=tweak.get("_order", 0))
    extra = {k: v for k, v in tweak.items() if not k.startswith("_")}
    f.publish(f.front.params, extra)
    with pytest.raises(HandshakeError):
        f.wait_backend(XenbusState.CONNECTED, timeout=5)
    return f, f.read(f"{f.be}/{K.BE_ERROR}")


GARBAGE = {
    "ring-ref not granted": ({K.FE_RING_REF: 30000}, "grant ref 30000"),
    "ring-ref not a number": ({K.FE_RING_REF: "abc"}, "ring-ref 'abc' is not a number"),
    "ring-ref negative": ({K.FE_RING_REF: "-1"}, "is not a number"),
    "ring-ref over 32 bits": ({K.FE_RING_REF: "4294967296"}, "out of range"),
    "ring-ref missing": ({K.FE_RING_REF: None}, "missing ring-ref"),
    "unknown protocol": ({K.FE_PROTOCOL: "arm-abi"}, "unknown frontend protocol 'arm-abi'"),
    "garbage protocol": ({K.FE_PROTOCOL: "armv7-eabi"}, "unknown frontend protocol"),
    "event channel that does not exist": ({K.FE_EVENT_CHANNEL: 3999}, "port 3999"),
    "event channel zero": ({K.FE_EVENT_CHANNEL: 0}, "event-channel 0 out of range"),
    "event channel not a number": ({K.FE_EVENT_CHANNEL: "0x10"}, "is not a number"),
    "ring order over max": ({"_order": 0, K.FE_RING_PAGE_ORDER: 5}, "ring-page-order 5 out of range"),
    "ring order refs missing": ({"_order": 0, K.FE_RING_PAGE_ORDER: 1}, "missing ring-ref0"),
    "too many queues": ({K.FE_MULTI_QUEUE_NUM_QUEUES: 9}, "multi-queue-num-queues 9 out of range"),
    "zero queues": ({K.FE_MULTI_QUEUE_NUM_QUEUES: 0}, "out of range"),
    "queue keys missing": ({"_queues": 1, K.FE_MULTI_QUEUE_NUM_QUEUES: 2}, "missing queue-0/ring-ref"),
    "feature-persistent not 0 or 1": ({K.FE_FEATURE_PERSISTENT: 2}, "feature-persistent 2 out of range"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_frontend_garbage_closes_only_that_vbd(xentap_env, case):
    env = xentap_env
    tweak, expected = GARBAGE[case]
    env.guest(BAD)
    env.guest(GOOD)
    env.attach(GOOD, env.image("good.img"), "xvda")
    good = env.front(GOOD, "xvda")
    io, out = good.run_in_thread(block_size=4096, queue_depth=8, read_pct=50, seconds=0.3,
                                 verify=True)
    env.attach(BAD, env.image("bad.img"), "xvda")
    f, error = _publish_garbage(env, tweak)
    assert f.backend_state() == XenbusState.CLOSED
    assert error is not None and expected in error, error
    assert error.split(" ", 1)[0].isdigit()          # "<errno> <reason>", as xenbus_dev_fatal
    io.join(10)
    res = out.get_nowait()
    assert not isinstance(res, BaseException), res
    assert res["errors"] == 0 and res["verify_failures"] == 0 and res["ios"] > 0
    assert good.backend_state() == XenbusState.CONNECTED


def test_frontend_that_starts_over_after_an_error_connects(xentap_env):
    env = xentap_env
    env.guest(BAD)
    env.attach(BAD, env.image(), "xvda")
    f, error = _publish_garbage(env, {K.FE_PROTOCOL: "nonsense"})
    assert "nonsense" in error
    f.front.close()
    f.front = None
    f.set_state(XenbusState.CLOSED)                 # blkfront closes on a Closed backend
    f.write_keys({K.FE_PROTOCOL: None}, XenbusState.INITIALISING)   # ... and comes back
    env.wait_for(lambda: f.backend_state() == XenbusState.INIT_WAIT, what="InitWait again")
    f.connect()
    assert f.read(f"{f.be}/{K.BE_ERROR}") is None
    res = f.run(block_size=4096, queue_depth=4, max_ios=200, verify=True)
    assert res["errors"] == 0 and res["verify_failures"] == 0


def test_image_that_cannot_be_opened_closes_with_an_error(xentap_env):
    """The toolstack names an image that is not there (nodes written by
    hand: `xentap attach` refuses a missing target)."""
    env = xentap_env
    env.guest(BAD)
    devid = K.vdev_to_devid("xvdc")
    be, fe = K.backend_path(BAD, devid), K.frontend_path(BAD, devid)

    def tx(t):
        t.mkdir(be)
        t.set_perms(be, K.backend_perms(BAD))
        for k, v in ((K.BE_FRONTEND, fe), (K.BE_FRONTEND_ID, BAD), (K.BE_ONLINE, 1),
                     (K.STATE, 1), (K.BE_PARAMS, str(env.tmp / "gone.img")), (K.BE_MODE, "w")):
            t.write(f"{be}/{k}", v)
        t.mkdir(fe)
        t.set_perms(fe, K.frontend_perms(BAD))
        t.write(f"{fe}/{K.STATE}", 1)
        t.write(f"{fe}/{K.FE_BACKEND}", be)

    env.xs.transaction(tx)
    env.wait_for(lambda: env.xs.read(f"{be}/{K.STATE}") == "6", what="Closed")
    assert "cannot open image" in env.xs.read(f"{be}/{K.BE_ERROR}")


def _reader(values):
    return lambda key: values.get(key)


def test_parse_ring_params_native_single_page():
    p = parse_ring_params(_reader({"ring-ref": "8", "event-channel": "3"}), 7)
    assert (p.domid, p.nr_queues, p.ring_order, p.ring_refs, p.evtchns) == (7, 1, 0, [[8]], [3])
    assert p.persistent is False


@pytest.mark.parametrize("value,persistent", [("1", True), ("0", False)])
def test_parse_ring_params_feature_persistent(value, persistent):
    p = parse_ring_params(_reader({"ring-ref": "8", "event-channel": "3",
                                   "feature-persistent": value}), 7)
    assert p.persistent is persistent


def test_parse_ring_params_multi_queue_multi_page():
    v = {"multi-queue-num-queues": "2", "ring-page-order": "1", "protocol": "x86_64-abi"}
    for q in range(2):
        v[f"queue-{q}/ring-ref0"] = str(10 + 2 * q)
        v[f"queue-{q}/ring-ref1"] = str(11 + 2 * q)
        v[f"queue-{q}/event-channel"] = str(5 + q)
    p = parse_ring_params(_reader(v), 3)
    assert p.ring_refs == [[10, 11], [12, 13]] and p.evtchns == [5, 6] and p.ring_order == 1


@pytest.mark.parametrize("values,words", [
    ({"ring-ref": "1", "event-channel": "1", "ring-page-order": "1", "ring-ref0": "1",
      "ring-ref1": "1"}, "two ring pages"),
    ({"ring-ref": " 1", "event-channel": "1"}, "not a number"),
    ({"ring-ref": "\u00b2", "event-channel": "1"}, "not a number"),
    ({"ring-ref": "1"}, "missing event-channel"),
    ({"ring-ref": "1", "event-channel": "1", "feature-persistent": "yes"},
     "feature-persistent 'yes' is not a number"),
])
def test_parse_ring_params_refuses(values, words):
    with pytest.raises(FrontendError, match=words):
        parse_ring_params(_reader(values), 1)
