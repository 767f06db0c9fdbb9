"""The appliance publishes, per VBD it serves, its journal window and the
analyzer's data state in xenstore (issues 8 and 9), and dom0 reads them
back validated.

A real receiver (ZeroMQ, replica, journal, analysis) is fed a real kernel's
ext4 trace and a ransomware-style stream; the image's announcer
(appliance_domu/image/announce.py) runs against the xenstore stand-in as the
appliance domain, on the receiver's data directory; the oracle for the window
is the journal itself (engines.journal.Journal.window()), for the data state
the analysis (analysis.json, appliance_domu/analysis.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from pyxs import Client

from appliance_domu import analysis as an
from appliance_domu.receiver import Receiver
from engines.journal import Journal
from tests.blkfront_test import make_domain
from tests.test_analysis_appliance import DISK, Sender, ext4_stream, ransom_stream
from xentap import wire
from xentap import xs_keys as K
from xentap.cli import cli
from xentap.appliance_node import grant_appliance, read_appliance_status
from xentap.xenbus import Xs

REPO = Path(__file__).resolve().parent.parent
ANNOUNCE = REPO / "appliance_domu" / "image" / "announce.py"
APP = 9
A = (3, 51712)   # the ext4 guest's xvda (Sender's HELLO)
B = (4, 51728)   # the ransomware victim's xvdb


def _announce_module():
    spec = importlib.util.spec_from_file_location("announce", ANNOUNCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class VbdSender(Sender):
    """Sender with the VBD's identity of choice in its HELLO."""

    def __init__(self, endpoint: str, vbd_uuid: uuid.UUID, domid: int, devid: int):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.vbd_uuid = vbd_uuid
        self.seq, self.acked, self.sent_bytes_since_ack = 1, 0, 0
        self.sock.send(wire.encode(wire.Hello(
            stream_id=1, epoch=1, host_id=uuid.UUID(int=1), vbd_uuid=vbd_uuid,
            domid=domid, devid=devid, vdev="xvdb", size_bytes=DISK, logical_sector_size=512,
            physical_sector_size=4096, next_seq=1, features=7)))
        assert isinstance(self._recv(), wire.Ack)


def send(rx, ops, vbd, ident, sender: VbdSender | None = None):
    """Sends ops as a new stream (or on ``sender``'s, left open)."""
    s = sender or VbdSender(rx.endpoint, vbd, *ident)
    try:
        for kind, off, data in ops:
            s.write(off, data) if kind == "write" else s.flush()
        s.wait_ack(s.seq - 1)
    finally:
        if sender is None:
            s.close()


def wait_for(pred, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def data_state(vdir: Path) -> str | None:
    try:
        st = an.read_state(vdir)
    except ValueError:  # (never half-written: atomic)
        return None
    return st["status"]["data_state"] if st else None


def journal_window(vdir: Path) -> tuple[str, str]:
    j = Journal.open(vdir / "journal")
    try:
        w = j.window()
    finally:
        j.close()
    return str(w["first_ts_ns"] // 10**9), str(w["last_ts_ns"] // 10**9)


def window_current(vdir: Path) -> bool:
    """analysis.json has caught up with the journal's window (the last group
    commit may come after the analysis's last publication: it follows within
    its publish_interval)."""
    w = an.read_state(vdir)["window"]
    return (str(w["first_ts_ns"] // 10**9), str(w["last_ts_ns"] // 10**9)) == \
        journal_window(vdir)


def vbd_keys(xs: Xs, ident) -> dict[str, str | None]:
    base = K.appliance_vbd_path(APP, *ident)
    return {k: xs.read(f"{base}/{k}") for k in K.APS_VBD_KEYS}


@pytest.fixture
def appliance(xenstore):
    """Appliance domain APP, granted its status directory by dom0."""
    with Client(unix_socket_path=xenstore.socket_path) as dom0:
        make_domain(dom0, APP, "xentap-appliance")
    with Xs.open(xenstore.socket_path) as xs:
        grant_appliance(xs, APP, "xentap-appliance")
    return xenstore


@pytest.fixture
def rx(tmp_path):
    r = Receiver("tcp://127.0.0.1:0", tmp_path / "appliance", insecure=True).start()
    yield r
    r.stop()


def announce_cmd(xenstore, data_dir, *more):
    return [sys.executable, str(ANNOUNCE), "--endpoint", "tcp://10.0.0.2:7788",
            "--xenstore-socket", xenstore.domain_socket(APP), "--data-dir", str(data_dir), *more]


ENV = dict(os.environ, PYTHONPATH=str(REPO))


def test_the_announcer_publishes_each_vbds_journal_window_and_data_state(appliance, rx, tmp_path):
    data = tmp_path / "appliance"
    va, vb = uuid.uuid4(), uuid.uuid4()
    t0 = int(time.time())
    send(rx, ext4_stream(), va, A)
    send(rx, ext4_stream() + ransom_stream(), vb, B)
    assert rx.analysis.wait_idle(60)
    wait_for(lambda: data_state(data / str(va)) == "consistent", what="A consistent")
    wait_for(lambda: data_state(data / str(vb)) == "encryption_suspected", what="B's alarm")
    for v in (va, vb):
        wait_for(lambda: window_current(data / str(v)), timeout=3, what="the window published")
    t1 = int(time.time())
    # what a previous announcer left (a VBD whose journal went since) goes
    with Client(unix_socket_path=appliance.domain_socket(APP)) as app:
        stale = K.appliance_vbd_path(APP, 77, 51712)
        app.write(f"{stale}/{K.APS_DATA_STATE}".encode(), b"consistent")
        app.write(f"{K.appliance_vbd_path(APP, *A)}/{K.APS_DATA_STATE}".encode(), b"unknown")
        app.write(f"{K.appliance_status_path(APP)}/{K.APS_VBD}/077/1".encode(), b"x")
    r = subprocess.run(announce_cmd(appliance, data, "--once"), capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    with Xs.open(appliance.socket_path) as xs:
        got = {ident: vbd_keys(xs, ident) for ident in (A, B)}
        # only these two, and only below the appliance's own status directory
        vdir = f"{K.appliance_status_path(APP)}/{K.APS_VBD}"
        assert sorted(xs.ls(vdir)) == ["3", "4"]
        assert xs.ls(f"{vdir}/3") == ["51712"] and xs.ls(f"{vdir}/4") == ["51728"]
        st = read_appliance_status(xs, APP)
    for ident, vbd, state in ((A, va, "consistent"), (B, vb, "encryption-suspected")):
        start, end = journal_window(data / str(vbd))
        assert got[ident] == {K.APS_WINDOW_START: start, K.APS_WINDOW_END: end,
                              K.APS_DATA_STATE: state}
        assert t0 <= int(start) <= int(end) <= t1
    # dom0's reader takes every value, and `xentap status --json` shows them
    assert st["problems"] == []
    rows = sorted((e["domain"], e["devid"], e["data_state"], e["window_start"], e["window_end"])
                  for e in st["vbds"])
    assert rows == [(*A, "consistent", *map(int, journal_window(data / str(va)))),
                    (*B, "encryption-suspected", *map(int, journal_window(data / str(vb))))]
    res = CliRunner().invoke(cli, ["status", "--json", "--xenstore-socket", appliance.socket_path])
    assert res.exit_code == 0, res.output
    [app] = json.loads(res.output)["appliances"]
    assert sorted(e["data_state"] for e in app["vbds"]) == ["consistent", "encryption-suspected"]


def test_an_alarm_reaches_xenstore_within_a_second_and_a_gone_vbd_is_removed(
        appliance, rx, tmp_path):
    data = tmp_path / "appliance"
    va, vb = uuid.uuid4(), uuid.uuid4()
    send(rx, ext4_stream(), va, A)
    sb = VbdSender(rx.endpoint, vb, *B)
    send(rx, ext4_stream(), vb, B, sb)
    assert rx.analysis.wait_idle(60)
    p = subprocess.Popen(announce_cmd(appliance, data, "--serve-pid", str(os.getpid())),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        with Xs.open(appliance.socket_path) as xs:
            # (the analysis may run ahead of the journal's first group commit: the
            # window comes with the next publication)
            wait_for(lambda: vbd_keys(xs, B)[K.APS_DATA_STATE] == "consistent"
                     and vbd_keys(xs, B)[K.APS_WINDOW_END], what="B published")
            w0 = vbd_keys(xs, B)[K.APS_WINDOW_END]
            # B is attacked: the analysis publishes the alarm at once, the announcer
            # sees the file change within POLL_EVERY and writes it
            send(rx, ransom_stream(), vb, B, sb)
            sb.close()
            t_file = wait_for(lambda: data_state(data / str(vb)) == "encryption_suspected"
                              and time.monotonic(), timeout=60, what="the alarm in analysis.json")
            t_xs = wait_for(lambda: vbd_keys(xs, B)[K.APS_DATA_STATE] == "encryption-suspected"
                            and time.monotonic(), timeout=5, what="the alarm in xenstore")
            assert t_xs - t_file < 1.0
            # the window follows the journal (its end moved with the new writes)
            assert rx.analysis.wait_idle(60)
            wait_for(lambda: vbd_keys(xs, B)[K.APS_WINDOW_END]
                     == journal_window(data / str(vb))[1], timeout=5, what="B's window")
            assert int(vbd_keys(xs, B)[K.APS_WINDOW_END]) >= int(w0)
            assert vbd_keys(xs, A)[K.APS_DATA_STATE] == "consistent"
            # dom0 re-grants the directory (made anew, empty): everything is redone
            grant_appliance(xs, APP, "xentap-appliance")
            wait_for(lambda: vbd_keys(xs, A)[K.APS_DATA_STATE] == "consistent"
                     and vbd_keys(xs, B)[K.APS_DATA_STATE] == "encryption-suspected",
                     timeout=5, what="the VBDs published again after a re-grant")
            # B's journal goes: its keys go, and its domain's directory with them
            rx.stop()
            shutil.rmtree(data / str(vb))
            vdir = f"{K.appliance_status_path(APP)}/{K.APS_VBD}"
            wait_for(lambda: xs.ls(vdir) == ["3"], timeout=5, what="B's keys removed")
            assert vbd_keys(xs, A)[K.APS_DATA_STATE] == "consistent"
    finally:
        p.terminate()
        out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out
    assert f"announced in {K.appliance_status_path(APP)} (domain {APP})" in out


def test_publication_is_bounded_and_the_newest_vbd_of_a_devid_wins(appliance, rx, tmp_path):
    """Files derived from a real analysis.json: only their identity and time differ."""
    ann = _announce_module()
    src = tmp_path / "appliance"
    vbd = uuid.uuid4()
    send(rx, ext4_stream(), vbd, A)
    assert rx.analysis.wait_idle(60)
    wait_for(lambda: data_state(src / str(vbd)) == "consistent", what="analysis.json")
    doc = an.read_state(src / str(vbd))
    data = tmp_path / "copies"
    n = K.APS_MAX_VBDS + 5
    for i in range(n):
        d = data / str(uuid.uuid4())
        d.mkdir(parents=True)
        (d / an.STATE_NAME).write_text(json.dumps(
            dict(doc, domid=100 + i, devid=51712, updated_ns=doc["updated_ns"] + i)))
    # a detached disk and its successor on the same devid: the newer one is published
    for i, ds in ((0, "unknown"), (1, "encryption_suspected")):
        d = data / str(uuid.uuid4())
        d.mkdir()
        (d / an.STATE_NAME).write_text(json.dumps(dict(
            doc, domid=7, devid=51712, updated_ns=doc["updated_ns"] + 10**12 + i,
            status=dict(doc["status"], data_state=ds))))
    (data / "not-a-uuid").mkdir()
    (data / str(uuid.uuid4())).mkdir()  # no analysis yet
    (data / str(uuid.uuid4()) / "x").mkdir(parents=True)
    bad = data / str(uuid.uuid4())
    bad.mkdir()
    (bad / an.STATE_NAME).write_text("{not json")
    pub = ann.VbdPublisher(str(data))
    want = pub.scan()
    assert len(want) == K.APS_MAX_VBDS
    assert want[(7, 51712)][K.APS_DATA_STATE] == "encryption-suspected"
    assert (100, 51712) not in want and (100 + n - 1, 51712) in want  # the oldest left out
    with Client(unix_socket_path=appliance.domain_socket(APP)) as client:
        writes = pub.sync(client, K.appliance_status_path(APP))
        assert writes == 3 * K.APS_MAX_VBDS
        assert pub.sync(client, K.appliance_status_path(APP)) == 0  # nothing changed
    with Xs.open(appliance.socket_path) as xs:
        st = read_appliance_status(xs, APP)
    assert len(st["vbds"]) == K.APS_MAX_VBDS and st["problems"] == []


def test_the_announcer_spells_the_analysis_files_and_states_as_their_writers_do():
    ann = _announce_module()
    assert (ann.STATE_NAME, ann.STATE_FORMAT) == (an.STATE_NAME, an.STATE_FORMAT)
    for s in ("unknown", "identified", "consistent", "encryption_suspected"):
        assert ann._DATA_STATE_RE.fullmatch(K.aps_data_state(s))
    assert K.aps_data_state("encryption_suspected") == "encryption-suspected"


def test_hostile_vbd_values_are_refused_by_dom0_and_named(appliance):
    """What an appliance domain writes under status/vbd: each bad value is
    None in what dom0 reads, named in ``problems`` and on `xentap status`'s line."""
    st = K.appliance_status_path(APP)
    with Client(unix_socket_path=appliance.domain_socket(APP)) as app:
        app.write(f"{st}/{K.APS_STATE}".encode(), b"ready")
        good = K.appliance_vbd_path(APP, *A)
        app.write(f"{good}/{K.APS_WINDOW_START}".encode(), b"1790000000")
        app.write(f"{good}/{K.APS_WINDOW_END}".encode(), b"1790000100")
        app.write(f"{good}/{K.APS_DATA_STATE}".encode(), b"consistent")
        bad = K.appliance_vbd_path(APP, *B)
        app.write(f"{bad}/{K.APS_WINDOW_START}".encode(), b"12abc")
        # as large as xenstored lets a domain write (quota-max-entry-size)
        app.write(f"{bad}/{K.APS_WINDOW_END}".encode(), b"9" * 1900)
        app.write(f"{bad}/{K.APS_DATA_STATE}".encode(), b"a" * 1900)
        app.write(f"{st}/{K.APS_VBD}/5/xvda/{K.APS_DATA_STATE}".encode(), b"consistent")
        app.write(f"{st}/{K.APS_VBD}/6/51712/{K.APS_DATA_STATE}".encode(),
                  b"Encryption_Suspected!\n")
    with Xs.open(appliance.socket_path) as xs:
        a = read_appliance_status(xs, APP)
    ents = {(e["domain"], e["devid"]): e for e in a["vbds"]}
    assert ents[A] == {"domain": 3, "devid": 51712, "window_start": 1790000000,
                       "window_end": 1790000100, "data_state": "consistent"}
    assert ents[B] == {"domain": 4, "devid": 51728, "window_start": None, "window_end": None,
                       "data_state": None}
    assert ents[(6, 51712)]["data_state"] is None and (5, 51712) not in ents
    assert sorted(a["problems"]) == sorted([
        "bad window-start of 4/51728", "bad window-end of 4/51728", "bad data-state of 4/51728",
        "bad vbd entry", "bad data-state of 6/51712"])
    res = CliRunner().invoke(cli, ["status", "--xenstore-socket", appliance.socket_path])
    assert res.exit_code == 0, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("appliance ")]
    assert len(line) == 1 and "ignored: " in line[0] and "bad data-state of 4/51728" in line[0]


# --- what dom0 makes of it: hostile bytes, and `xentap status`'s text


@pytest.fixture
def raw_app(appliance, monkeypatch):
    """The appliance domain's connection, writing any byte (as a hostile kernel
    may: pyxs itself only sends 7-bit ASCII)."""
    import re

    import pyxs.client
    monkeypatch.setattr(pyxs.client, "_re_7bit_ascii", re.compile(rb"^[\x00-\xff]*$", re.S))
    with Client(unix_socket_path=appliance.domain_socket(APP)) as app:
        yield app


def test_digits_that_are_not_ascii_are_refused_not_a_crash(appliance, raw_app):
    """Latin-1 "\xb9" is str.isdigit(), and int() refuses it."""
    st = K.appliance_status_path(APP)
    raw_app.write(f"{st}/{K.APS_STATE}".encode(), b"ready")
    raw_app.write(f"{st}/{K.APS_HEARTBEAT}".encode(), b"\xb9")
    raw_app.write(f"{K.appliance_vbd_path(APP, *A)}/{K.APS_WINDOW_START}".encode(), b"1\xb2")
    with Xs.open(appliance.socket_path) as xs:
        a = read_appliance_status(xs, APP)
    assert a["heartbeat"] is None and a["vbds"][0]["window_start"] is None
    assert sorted(a["problems"]) == ["bad heartbeat", "bad window-start of 3/51712"]
    res = CliRunner().invoke(cli, ["status", "--xenstore-socket", appliance.socket_path])
    assert res.exit_code == 0 and "ignored: " in res.output, res.output


def test_status_shows_each_vbds_window_and_data_state(appliance):
    st = K.appliance_status_path(APP)
    with Client(unix_socket_path=appliance.domain_socket(APP)) as app:
        app.write(f"{st}/{K.APS_STATE}".encode(), b"ready")
        base = K.appliance_vbd_path(APP, *A)
        app.write(f"{base}/{K.APS_WINDOW_START}".encode(), b"1790000000")
        app.write(f"{base}/{K.APS_WINDOW_END}".encode(), b"1790000100")
        app.write(f"{base}/{K.APS_DATA_STATE}".encode(), b"encryption-suspected")
        app.write(f"{K.appliance_vbd_path(APP, *B)}/{K.APS_DATA_STATE}".encode(), b"unknown")
    res = CliRunner().invoke(cli, ["status", "--xenstore-socket", appliance.socket_path])
    assert res.exit_code == 0, res.output
    assert ("  domain 3 xvda: window 2026-09-21 14:13:20 .. 2026-09-21 14:15:00 (100s), "
            "data state encryption-suspected") in res.output.splitlines()
    assert "  domain 4 xvdb: window -, data state unknown" in res.output.splitlines()
