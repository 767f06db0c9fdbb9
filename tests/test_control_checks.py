"""Issue 6's checks that other suites left partly shown: a frontend's
garbage is one clear log line and disturbs nothing else (other VBDs'
I/O, counters and log, later handshakes); two VBDs of two domains do the
handshake at the same moment and one is detached while the other runs; a
protected guest dying mid-I/O leaves a mirror with every completed write."""
from __future__ import annotations

import hashlib
import logging
import threading
import uuid

import pytest

from tests.blkfront_test import release_domain
from tests.test_xenbus_garbage import _publish_garbage
from xentap import keys
from xentap import xs_keys as K
from xentap.xs_keys import XenbusState

BAD, GOOD = 5, 6

#: The garbage the issue names, and what the one log line must say.
NAMED_GARBAGE = {
    "bad ring-ref": ({K.FE_RING_REF: 30000}, "grant ref 30000"),
    "unknown protocol": ({K.FE_PROTOCOL: "arm-abi"}, "unknown frontend protocol 'arm-abi'"),
    "event channel that does not exist": ({K.FE_EVENT_CHANNEL: 3999}, "port 3999"),
    "ring page order over the maximum": ({"_order": 0, K.FE_RING_PAGE_ORDER: 5},
                                         "ring-page-order 5 out of range"),
}


@pytest.mark.parametrize("case", list(NAMED_GARBAGE))
def test_frontend_garbage_is_one_clear_log_line_and_disturbs_nothing(xentap_env, caplog, case):
    env = xentap_env
    tweak, reason = NAMED_GARBAGE[case]
    env.guest(BAD)
    env.guest(GOOD)
    env.attach(GOOD, env.image("good.img"), "xvda")
    good = env.front(GOOD, "xvda")
    io, out = good.run_in_thread(block_size=4096, queue_depth=8, read_pct=50, seconds=1.0,
                                 verify=True)
    env.attach(BAD, env.image("bad.img"), "xvda")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xentap"):
        f, error = _publish_garbage(env, tweak)
        assert f.backend_state() == XenbusState.CLOSED
        env.wait_for(lambda: any("Closed" in r.getMessage() for r in caplog.records),
                     what="the Closed log line")
        records = list(caplog.records)

    # One warning, naming the VBD and the reason as the error node does;
    # the other lines say what happened to that VBD only.
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"domain {BAD} xvda: ") and reason in warnings[0], warnings
    assert warnings[0].endswith(error.split(" ", 1)[1]), (warnings, error)
    assert all(r.getMessage().startswith(f"domain {BAD} xvda: ") for r in records
               if r.name.startswith("xentap.xenbus")), [r.getMessage() for r in records]
    assert "Traceback" not in caplog.text

    # Nothing else disturbed: the other guest's I/O and VBD, and the daemon
    # itself, which still does a new handshake.
    io.join(10)
    res = out.get_nowait()
    assert not isinstance(res, BaseException), res
    assert res["errors"] == 0 and res["verify_failures"] == 0 and res["ios"] > 0
    assert good.backend_state() == XenbusState.CONNECTED
    st = K.status_path(GOOD, 51712)
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_REQUESTS}") == str(res["ios"]),
                 what="GOOD's counters")
    assert env.xs.read(f"{st}/{K.ST_ERRORS}") == "0" and env.xs.read(f"{st}/{K.ST_ERROR}") is None
    assert env.xs.read(f"{K.status_path(BAD, 51712)}/{K.ST_ERROR}") == f.read(
        f"{f.be}/{K.BE_ERROR}").split(" ", 1)[1]
    env.attach(GOOD, env.image("more.img"), "xvdb")
    more = env.front(GOOD, "xvdb")
    assert more.run(block_size=4096, queue_depth=4, max_ios=100, verify=True)["errors"] == 0
    assert (BAD, 51712) in env.daemon.devices        # the bad VBD waits, Closed, for its guest


def test_two_domains_handshake_at_the_same_moment_and_one_detaches_while_the_other_runs(
        xentap_env):
    env = xentap_env
    A, B = 5, 7
    env.guest(A)
    env.guest(B)
    env.attach(A, env.image("a.img"), "xvda")
    env.attach(B, env.image("b.img"), "xvda")
    fa = env.front(A, "xvda", connect=False, max_queues=2)
    fb = env.front(B, "xvda", connect=False, max_ring_order=2)
    go = threading.Barrier(2)
    errors: list[BaseException] = []

    def connect(f):
        try:
            go.wait(5)
            f.connect()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=connect, args=(f,)) for f in (fa, fb)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert fa.front.params.nr_queues == 2 and fb.front.params.ring_order == 2
    ta, out_a = fa.run_in_thread(block_size=4096, queue_depth=16, read_pct=50, seconds=1.5,
                                 verify=True)
    tb, out_b = fb.run_in_thread(block_size=65536, queue_depth=8, read_pct=50, max_ios=200,
                                 verify=True)
    tb.join(20)
    res_b = out_b.get_nowait()
    assert not isinstance(res_b, BaseException), res_b
    assert res_b["errors"] == 0 and res_b["verify_failures"] == 0
    r = env.cli("detach", str(B), "xvda")             # while A's I/O runs
    assert r.exit_code == 0, r.output
    ta.join(20)
    res_a = out_a.get_nowait()
    assert not isinstance(res_a, BaseException), res_a
    assert res_a["errors"] == 0 and res_a["verify_failures"] == 0 and res_a["ios"] > 100
    assert fa.backend_state() == XenbusState.CONNECTED


@pytest.mark.slow
def test_a_protected_guest_dying_mid_io_leaves_a_mirror_of_every_completed_write(
        xenstore, tmp_path):
    """The guest's domain dies with requests in flight: its VBD closes, the
    shim answers what it took, the mirror drains every completed write to
    the appliance (replica equal to the disk) and stops; another domain's
    VBD goes on."""
    from tests.test_mirror_e2e import Appliance
    from tests.test_protect import ProtectEnv

    appliance = Appliance(tmp_path).start()
    env = ProtectEnv(xenstore, tmp_path, appliance)
    try:
        env.start_daemon()
        env.guest(BAD)
        env.guest(GOOD)
        img = env.image("dying.img")
        key = str(keys.paths(appliance.keys, keys.APPLIANCE_NAME)[0])
        r = env.cli("attach", str(BAD), img, "xvda", "--protect", appliance.endpoint,
                    "--protect-key", key)
        assert r.exit_code == 0, r.output
        vbd_uuid = uuid.UUID(env.xs.read(f"{K.backend_path(BAD, 51712)}/{K.BE_VBD_UUID}"))
        env.attach(GOOD, env.image("good.img"), "xvda")
        fd = env.front(BAD, "xvda", follow_backend=False)
        fg = env.front(GOOD, "xvda")
        td, _ = fd.run_in_thread(block_size=4096, queue_depth=16, read_pct=30, seconds=30)
        tg, out_g = fg.run_in_thread(block_size=4096, queue_depth=8, read_pct=50, seconds=3.0,
                                     verify=True)
        st = K.status_path(BAD, 51712)
        env.wait_for(lambda: int(env.xs.read(f"{st}/{K.ST_WRITES}") or 0) > 500, 20,
                     "the guest's writes")
        release_domain(env.dom0, BAD)                  # mid-I/O
        env.wait_for(lambda: env.xs.read(f"{K.backend_path(BAD, 51712)}/{K.STATE}") == "6",
                     10, "Closed")
        m = env.wait_for(lambda: (m := env.mirror()) and m["state"] == "stopped" and m, 30,
                         "the mirror to stop")
        assert m["pending"] == 0 and m["error"] == "" and m["acked_seq"] == m["next_seq"] - 1
        replica = appliance.replica(vbd_uuid)
        assert hashlib.sha256(replica).digest() == hashlib.sha256(open(img, "rb").read()).digest()
        tg.join(20)
        res = out_g.get_nowait()
        assert not isinstance(res, BaseException), res
        assert res["errors"] == 0 and res["verify_failures"] == 0
        assert fg.backend_state() == XenbusState.CONNECTED
        fd.stop_io()
        td.join(30)
    finally:
        env.close()
        appliance.stop()
