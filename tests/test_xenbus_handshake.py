"""The xenbus handshake between the xentap daemon and a blkfront that does
what Linux's xen-blkfront does, over the xenstore stand-in and sim rings."""
from __future__ import annotations

import json
import logging

import pytest

from xentap import shim
from xentap import xs_keys as K
from xentap.xenbus import ServeOptions
from xentap.xs_keys import XenbusState

GUEST = 5


def be_read(env, domid, devid, key):
    return env.xs.read(f"{K.backend_path(domid, devid)}/{key}")


def test_handshake_advertises_features_and_serves_verified_io(xentap_env, caplog):
    caplog.set_level(logging.INFO, logger="xentap")
    env = xentap_env
    env.guest(GUEST)
    img = env.image(size=16 << 20)
    devid = env.attach(GUEST, img, "xvda")
    f = env.front(GUEST, "xvda")
    assert f.sectors == (16 << 20) // 512
    with shim.Vbd(env.image("probe.img")) as probe:
        info = probe.info()
    assert f.features[K.BE_FEATURE_FLUSH_CACHE] == info["feature_flush"] == 1
    assert f.features[K.BE_FEATURE_MAX_INDIRECT_SEGMENTS] == shim.MAX_INDIRECT_SEGMENTS
    assert f.features[K.BE_MAX_RING_PAGE_ORDER] == shim.MAX_RING_ORDER
    assert f.features[K.BE_MULTI_QUEUE_MAX_QUEUES] == shim.MAX_QUEUES
    # Advertised exactly when the shim says the feature works.
    assert f.features[K.BE_FEATURE_BARRIER] == info["feature_barrier"]
    assert f.features[K.BE_FEATURE_DISCARD] == info["feature_discard"]
    if info["feature_discard"]:
        assert be_read(env, GUEST, devid, K.BE_DISCARD_GRANULARITY) == str(
            info["discard_granularity"])
    else:
        assert be_read(env, GUEST, devid, K.BE_FEATURE_DISCARD) is None
    assert be_read(env, GUEST, devid, K.BE_FEATURE_PERSISTENT) == "1" == str(info["feature_persistent"])
    assert be_read(env, GUEST, devid, K.BE_SECTOR_SIZE) == str(info["sector_size"])
    assert be_read(env, GUEST, devid, K.BE_PHYSICAL_SECTOR_SIZE) == str(
        info["physical_sector_size"])
    assert be_read(env, GUEST, devid, K.BE_INFO) == "0"
    assert f.backend_state() == XenbusState.CONNECTED
    res = f.run(block_size=4096, queue_depth=16, read_pct=50, max_ios=2000, verify=True)
    assert res["errors"] == 0 and res["verify_failures"] == 0
    assert res["ios"] == 2000
    assert "xvda: connected (1 queue x 1 ring page, persistent grants)" in caplog.text
    # `xentap status --json` shows the pages its reads went into, while connected
    env.wait_for(lambda: json.loads(env.cli("status", "--json").output)["vbds"][0]["grants_mapped"] > 0,
                 what="grants_mapped in the status")


def test_persistent_grants_are_offered_only_if_the_daemon_is_told_to(xentap_env, caplog):
    """`xentap daemon --no-persistent-grants`: not advertised, and a frontend
    that asks for them anyway is served by copy."""
    caplog.set_level(logging.INFO, logger="xentap")
    env = xentap_env
    env.stop_daemon()
    env.start_daemon(ServeOptions(persistent=False))
    env.guest(GUEST)
    devid = env.attach(GUEST, env.image(), "xvda")
    f = env.front(GUEST, "xvda")
    assert f.front.params.persistent     # the test blkfront writes feature-persistent=1
    assert be_read(env, GUEST, devid, K.BE_FEATURE_PERSISTENT) is None
    res = f.run(block_size=4096, queue_depth=16, read_pct=50, max_ios=2000, verify=True)
    assert res["errors"] == 0 and res["verify_failures"] == 0
    assert "xvda: connected (1 queue x 1 ring page)" in caplog.text


@pytest.mark.parametrize("queues,order", [(4, 2), (1, 4), (2, 0)])
def test_multi_queue_and_multi_page_rings(xentap_env, queues, order):
    env = xentap_env
    env.guest(GUEST)
    devid = env.attach(GUEST, env.image(), "xvdb")
    f = env.front(GUEST, "xvdb", max_queues=queues, max_ring_order=order)
    assert f.front.params.nr_queues == queues and f.front.params.ring_order == order
    fe = K.frontend_path(GUEST, devid)
    if queues > 1:
        assert env.xs.read(f"{fe}/queue-1/{K.FE_EVENT_CHANNEL}") is not None
    res = f.run(block_size=8192, queue_depth=8, read_pct=30, max_ios=1000, verify=True)
    assert res["errors"] == 0 and res["verify_failures"] == 0
