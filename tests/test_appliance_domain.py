"""`xentap appliance create|destroy|status` without Xen: the options become
a valid xl config (xl_scripts/appliance.cfg with overrides), every bad input
is one line, status reads (validated) what the appliance domain announced,
and the image's announcer writes exactly its own status directory."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pyxs import Client
from pyxs.exceptions import PyXSError

from xentap import appliance_domain as ad
from xentap import keys
from xentap import xs_keys as K
from xentap.cli import cli
from xentap.appliance_node import grant_appliance
from xentap.xenbus import Xs
from xentap.xl_config import parse_with_overrides, xentap_disks

from tests.blkfront_test import make_domain

REPO = Path(__file__).resolve().parent.parent
CFG = REPO / "xl_scripts" / "appliance.cfg"
ANNOUNCE = REPO / "appliance_domu" / "image" / "announce.py"
APP = 9


def _run(*args: str):
    r = CliRunner().invoke(cli, ["appliance", *args])
    return r


def _one_line_error(r, exit_code: int = 1) -> str:
    assert r.exit_code == exit_code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert "Traceback" not in r.output
    assert lines[0].startswith("xentap: ")
    return lines[0]


@pytest.fixture
def image(tmp_path) -> str:
    d = tmp_path / "img"
    d.mkdir()
    (d / "vmlinuz").write_bytes(b"k")
    (d / "appliance.cpio.gz").write_bytes(b"r")
    return str(d)


@pytest.fixture
def dom0_keys(tmp_path) -> str:
    d = tmp_path / "keys"
    keys.create(d, "dom0")
    return str(d)


@pytest.fixture
def sysfs(tmp_path) -> str:
    """A /sys/class/net with bridge xenbr0 and a plain eth0."""
    net = tmp_path / "net"
    (net / "xenbr0" / "bridge").mkdir(parents=True)
    (net / "eth0").mkdir()
    return str(net)


# --- options -> config ------------------------------------------------------------

def test_the_shipped_config_is_a_valid_xl_config_with_a_journal_disk_and_a_vif():
    text = CFG.read_text()
    cfg = parse_with_overrides(text, (), "appliance.cfg")
    disks = xentap_disks(cfg)
    assert [(d.vdev, d.mode) for d in disks] == [("xvda", "w")]
    assert cfg.get("type") == "pv" and cfg.get("memory") >= 192
    assert "bridge=xenbr0" in cfg.get("vif")[0]
    assert "xentap.ip=" in cfg.get("extra")


def test_options_become_overrides_that_replace_only_what_they_set(image, dom0_keys, tmp_path):
    s = ad.settings(ip="10.1.0.5/24", gateway="10.1.0.1", port=7799, keys_dir=dom0_keys,
                    bridge="br-app", journal=str(tmp_path / "j.img"), image=image)
    ovr = ad.overrides(CFG.read_text(), s)
    view = ad.cfg_view(CFG.read_text(), ovr, "appliance.cfg")
    pub = keys.load_public(keys.paths(dom0_keys, "dom0")[0]).decode()
    assert view["words"] == {"xentap.ip": "10.1.0.5/24", "xentap.gw": "10.1.0.1",
                             "xentap.port": "7799", "xentap.allow": pub}
    assert view["bridges"] == ["br-app"]
    assert view["journal"] == str(tmp_path / "j.img")
    assert view["kernel"] == os.path.join(image, "vmlinuz")
    assert view["ramdisk"] == os.path.join(image, "appliance.cpio.gz")
    cfg = parse_with_overrides(CFG.read_text(), ovr, "appliance.cfg")
    extra = cfg.get("extra").split()
    assert extra[:2] == ["console=hvc0", "quiet"]           # the config's own words stay
    assert extra.count("xentap.ip=10.1.0.5/24") == 1 and "xentap.ip=10.0.0.2/24" not in extra
    assert "mac=00:16:3e:78:74:02" in cfg.get("vif")[0]      # the MAC stays
    assert s.endpoint == "tcp://10.1.0.5:7799"


def test_insecure_replaces_a_key_in_the_config_and_vice_versa(dom0_keys):
    text = 'name = "a"\nextra = "console=hvc0 xentap.allow=OLD xentap.ip=10.0.0.2/24"\n'
    s = ad.settings(insecure=True)
    assert ad.merge_extra("console=hvc0 xentap.allow=OLD", s) == "console=hvc0 xentap.insecure=1"
    s = ad.settings(keys_dir=dom0_keys)
    out = ad.merge_extra("xentap.insecure=1 xentap.ip=10.0.0.2/24", s)
    assert "xentap.insecure" not in out and "xentap.ip=10.0.0.2/24" in out
    assert ad.overrides(text, ad.settings()) == ()


@pytest.mark.parametrize("kw,msg", [
    (dict(ip="10.0.0.2"), "give ADDR/PREFIX"),
    (dict(ip="10.0.0.300/24"), "not an IPv4 ADDR/PREFIX"),
    (dict(ip="10.0.0.0/24"), "not a host address"),
    (dict(ip="10.0.0.2/31"), "not a host address"),
    (dict(gateway="gw"), "--gateway 'gw' is not an IPv4 address"),
    (dict(port=0), "not a TCP port"),
    (dict(port=70000), "not a TCP port"),
    (dict(bridge="br0; rm -rf /"), "is not an interface name"),
    (dict(bridge="a-very-long-bridge-name"), "is not an interface name"),
])
def test_bad_options_are_refused_by_name(kw, msg):
    with pytest.raises(ad.ApplianceDomainError) as e:
        ad.settings(**kw)
    assert msg in e.value.format_message()


def test_keys_and_images_are_checked(tmp_path, dom0_keys):
    with pytest.raises(ad.ApplianceDomainError, match="exclude each other"):
        ad.settings(insecure=True, keys_dir=dom0_keys)
    with pytest.raises(ad.ApplianceDomainError, match="no public key file"):
        ad.settings(keys_dir=str(tmp_path / "nokeys"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dom0.key").write_text('public-key = "short"\n')
    with pytest.raises(ad.ApplianceDomainError, match="40 Z85 characters"):
        ad.settings(keys_dir=str(tmp_path / "bad"))
    with pytest.raises(ad.ApplianceDomainError, match="no vmlinuz .*make appliance-image"):
        ad.settings(image=str(tmp_path))


def test_a_journal_path_with_a_comma_cannot_become_a_disk_spec(tmp_path):
    with pytest.raises(ad.ApplianceDomainError, match="comma"):
        ad.overrides(CFG.read_text(), ad.settings(journal=str(tmp_path / "a,b.img")))


def test_check_view_says_what_is_missing(image, dom0_keys, sysfs, tmp_path):
    text = CFG.read_text()

    def view(**kw):
        return ad.cfg_view(text, ad.overrides(text, ad.settings(**kw)), "appliance.cfg")

    base = dict(image=image, journal=str(tmp_path / "j.img"))
    ad.check_view(view(keys_dir=dom0_keys, **base), sysfs)                 # all there
    with pytest.raises(ad.ApplianceDomainError, match="pass --keys DIR .* or --insecure"):
        ad.check_view(view(**base), sysfs)
    with pytest.raises(ad.ApplianceDomainError, match="bridge eth0 does not exist"):
        ad.check_view(view(keys_dir=dom0_keys, bridge="eth0", **base), sysfs)
    with pytest.raises(ad.ApplianceDomainError, match="kernel .* does not exist"):
        ad.check_view(view(keys_dir=dom0_keys, journal=str(tmp_path / "j.img")), sysfs)
    no_ip = text.replace(" xentap.ip=10.0.0.2/24", "")
    with pytest.raises(ad.ApplianceDomainError, match="pass --ip"):
        ad.check_view(ad.cfg_view(no_ip, ad.overrides(no_ip, ad.settings(insecure=True, **base)),
                                  "a.cfg"), sysfs)


def test_the_journal_image_is_made_sparse_once_and_checked_after(tmp_path):
    j = str(tmp_path / "journal.img")
    assert ad.ensure_journal(j, 256 << 20) is True
    assert os.path.getsize(j) == 256 << 20 and os.stat(j).st_blocks == 0
    assert ad.ensure_journal(j, 1 << 30) is False          # kept as it is
    assert os.path.getsize(j) == 256 << 20
    with pytest.raises(ad.ApplianceDomainError, match="at least 64 MiB"):
        ad.ensure_journal(str(tmp_path / "small.img"), 1 << 20)
    small = tmp_path / "old.img"
    small.write_bytes(b"x" * 4096)
    with pytest.raises(ad.ApplianceDomainError, match="is 0 MiB; at least 64 MiB"):
        ad.ensure_journal(str(small), 256 << 20)
    with pytest.raises(ad.ApplianceDomainError, match="neither a file nor a block device"):
        ad.ensure_journal(str(tmp_path), 256 << 20)
    with pytest.raises(ad.ApplianceDomainError, match="directory .* does not exist"):
        ad.ensure_journal(str(tmp_path / "no" / "j.img"), 256 << 20)


@pytest.mark.parametrize("text,n", [("4G", 4 << 30), ("256M", 256 << 20), ("512MiB", 512 << 20),
                                    ("4096", 4096)])
def test_sizes(text, n):
    assert ad.parse_size(text) == n


# --- the command line: one line per error ---------------------------------------------

def test_cli_errors_are_one_line(tmp_path, image):
    assert "not a size" in _one_line_error(_run("create", "--ip", "10.0.0.2/24", "--insecure",
                                                 "--journal-size", "lots", "-n"))
    assert "give ADDR/PREFIX" in _one_line_error(_run("create", "--ip", "10.0.0.2", "-n"))
    assert "config /nonexistent.cfg does not exist" in _one_line_error(
        _run("create", "--config", "/nonexistent.cfg", "--image", image, "--ip", "10.0.0.2/24",
             "--insecure", "-n"))
    assert "bridge nosuchbr0 does not exist" in _one_line_error(
        _run("create", "--image", image, "--ip", "10.0.0.2/24", "--insecure", "--bridge",
             "nosuchbr0", "-n"))
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nextra = [ 1 ]\n')
    assert "extra must be a string" in _one_line_error(
        _run("create", "--config", str(bad), "--ip", "10.0.0.2/24", "--insecure", "-n"))
    r = _run("create", "--no-such-option")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_cli_dry_run_shows_the_overrides(image, sysfs, monkeypatch, tmp_path):
    monkeypatch.setattr(ad, "check_view", lambda view, sysfs_net="": None)
    r = _run("create", "--image", image, "--ip", "10.0.0.7/24", "--insecure",
             "--journal", str(tmp_path / "j.img"), "-n")
    assert r.exit_code == 0, r.output
    assert "appliance 'xentap-appliance' at 10.0.0.7/24" in r.output
    assert "xentap.insecure=1" in r.output and str(tmp_path / "j.img") in r.output
    assert not (tmp_path / "j.img").exists()                # a dry run makes nothing


# --- xenstore: status, destroy, the announcer -----------------------------------------

def _socket_args(xenstore) -> list[str]:
    return ["--xenstore-socket", xenstore.socket_path]


def test_status_of_an_absent_appliance_exits_1(xenstore):
    r = _run("status", *_socket_args(xenstore))
    assert r.exit_code == 1 and r.output.strip() == "appliance xentap-appliance: not running"
    r = _run("status", "--json", *_socket_args(xenstore))
    assert json.loads(r.output) == {"name": "xentap-appliance", "domain": None, "running": False}
    assert "no running domain xentap-appliance" in _one_line_error(
        _run("destroy", *_socket_args(xenstore)))


def test_no_xenstored_is_one_line(tmp_path):
    r = _run("status", "--xenstore-socket", str(tmp_path / "nosock"))
    assert "cannot reach xenstored" in _one_line_error(r)


def test_the_announcer_writes_its_own_status_and_status_reads_it(xenstore, tmp_path):
    with Client(unix_socket_path=xenstore.socket_path) as dom0:
        make_domain(dom0, APP, "xentap-appliance")
    keys.create(tmp_path / "k", "appliance")
    pub = keys.load_public(keys.paths(tmp_path / "k", "appliance")[0]).decode()
    sock = xenstore.domain_socket(APP)
    cmd = [sys.executable, str(ANNOUNCE), "--endpoint", "tcp://10.0.0.2:7788",
           "--public-key-file", str(keys.paths(tmp_path / "k", "appliance")[0]),
           "--xenstore-socket", sock, "--once"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Not granted yet: every write is refused; it says nothing and fails.
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    with Xs.open(xenstore.socket_path) as xs:
        assert xs.read(f"{K.appliance_status_path(APP)}/state") is None
        grant_appliance(xs, APP, "xentap-appliance")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"announced in {K.appliance_status_path(APP)} (domain {APP})" in r.stdout
    st = ad.status("xentap-appliance", xenstore_socket=xenstore.socket_path)
    assert (st["domain"], st["state"], st["endpoint"], st["public_key"]) == \
        (APP, "starting", "tcp://10.0.0.2:7788", pub)
    assert st["running"] is True and not st["problems"]
    r = _run("status", *_socket_args(xenstore))
    assert r.exit_code == 0
    assert f"domain {APP}, state starting, endpoint tcp://10.0.0.2:7788, key {pub}" in r.output
    # The appliance can write nowhere else.
    with Client(unix_socket_path=sock) as app:
        for path in (f"{K.appliance_path(APP)}/{K.AP_NAME}", f"{K.DAEMON_PATH}/state",
                     f"{K.appliance_status_path(APP + 1)}/state"):
            with pytest.raises(PyXSError) as e:
                app.write(path.encode(), b"x")
            assert e.value.args[0] == errno.EACCES, path


def test_status_shows_hostile_values_refused(xenstore):
    with Client(unix_socket_path=xenstore.socket_path) as dom0:
        make_domain(dom0, APP, "xentap-appliance")
    with Xs.open(xenstore.socket_path) as xs:
        grant_appliance(xs, APP, "xentap-appliance")
    with Client(unix_socket_path=xenstore.domain_socket(APP)) as app:
        st = K.appliance_status_path(APP)
        app.write(f"{st}/endpoint".encode(), b"tcp://10.0.0.2:7788; rm -rf /")
        app.write(f"{st}/state".encode(), b"ready")
        app.write(f"{st}/public-key".encode(), b"A" * 300)
    r = _run("status", *_socket_args(xenstore))
    assert r.exit_code == 0, r.output
    assert "state ready, endpoint -, key -" in r.output
    assert "untrusted value refused: bad endpoint" in r.output
    assert "untrusted value refused: bad public-key" in r.output


def test_destroy_runs_xl_then_detaches_and_revokes(xenstore, tmp_path):
    """With a stand-in xl that removes the domain from xenstore."""
    with Client(unix_socket_path=xenstore.socket_path) as dom0:
        make_domain(dom0, APP, "xentap-appliance")
    with Xs.open(xenstore.socket_path) as xs:
        grant_appliance(xs, APP, "xentap-appliance")
    log = tmp_path / "xl.log"
    xl = tmp_path / "xl"
    xl.write_text(f"""#!{sys.executable}
import sys
from pyxs import Client
open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "destroy":
    with Client(unix_socket_path={xenstore.socket_path!r}) as c:
        c.delete(b"/local/domain/" + sys.argv[2].encode())
""")
    xl.chmod(0o755)
    r = _run("destroy", "--force", "--xl", str(xl), *_socket_args(xenstore))
    assert r.exit_code == 0, r.output
    assert f"appliance xentap-appliance (domain {APP}) destroyed" in r.output
    assert log.read_text() == f"destroy {APP}\n"
    with Xs.open(xenstore.socket_path) as xs:
        assert not xs.exists(K.appliance_path(APP))
    # A clean shutdown that does not end in time is followed by xl destroy.
    with Client(unix_socket_path=xenstore.socket_path) as dom0:
        make_domain(dom0, APP, "xentap-appliance")
    log.unlink()
    r = _run("destroy", "--timeout", "0.5", "--xl", str(xl), *_socket_args(xenstore))
    assert r.exit_code == 0, r.output
    assert "did not shut down in time" in r.output
    assert log.read_text() == f"shutdown {APP}\ndestroy {APP}\n"


def test_create_clears_the_journal_vbd_of_a_destroyed_appliance(xenstore, tmp_path):
    """`xl destroy` leaves the dead appliance's journal VBD (Closed) and its
    node behind: the next create removes them, and nothing else."""
    journal = str(tmp_path / "journal.img")
    other = str(tmp_path / "other.img")
    with Client(unix_socket_path=xenstore.socket_path) as dom0:
        make_domain(dom0, 12, "guest12")            # running: its VBD stays
    with Xs.open(xenstore.socket_path) as xs:
        grant_appliance(xs, APP, "xentap-appliance")
        for domid, target in ((APP, journal), (APP, None), (12, journal), (13, other)):
            devid = 51712 if target is not None else 51728
            be = K.backend_path(domid, devid)
            xs.write(f"{be}/{K.STATE}", "6")
            if target is not None:
                xs.write(f"{be}/{K.BE_PARAMS}", target)
        removed = ad.clear_stale_vbds(xs, [journal])
        assert removed == [(APP, 51712)]
        assert not xs.exists(K.backend_path(APP, 51712))
        assert xs.exists(K.backend_path(APP, 51728))      # not the journal: left alone
        assert xs.exists(K.backend_path(12, 51712))        # its domain runs
        assert xs.exists(K.backend_path(13, 51712))        # another image
        assert not xs.exists(K.appliance_path(APP))
        assert ad.clear_stale_vbds(xs, [journal]) == []


def test_an_image_with_a_root_disk_adds_it_read_only_beside_the_journal(image, dom0_keys,
                                                                      tmp_path):
    (Path(image) / "root.img").write_bytes(b"\0" * 4096)
    root = os.path.join(image, "root.img")
    for journal in (str(tmp_path / "j.img"), None):      # given, or the config's own
        s = ad.settings(ip="10.1.0.5/24", keys_dir=dom0_keys, journal=journal, image=image)
        ovr = ad.overrides(CFG.read_text(), s)
        view = ad.cfg_view(CFG.read_text(), ovr, "appliance.cfg")
        assert view["root"] == root
        assert view["journal"] == (journal or "/var/lib/xentap/appliance-journal.img")
        disks = xentap_disks(parse_with_overrides(CFG.read_text(), ovr, "appliance.cfg"))
        assert [(d.vdev, d.target) for d in disks] == [("xvda", view["journal"]), ("xvdb", root)]
        assert [d.mode for d in disks] == ["w", "r"]
    # without root.img (an initramfs-only image) the config is as before
    os.unlink(root)
    s = ad.settings(ip="10.1.0.5/24", keys_dir=dom0_keys, image=image)
    view = ad.cfg_view(CFG.read_text(), ad.overrides(CFG.read_text(), s), "appliance.cfg")
    assert view["root"] is None


def test_create_json_ends_with_what_status_json_prints(xenstore, image, dom0_keys, tmp_path,
                                                       monkeypatch):
    """`create --wait --json`: once the appliance says ready, the line `status
    --json` would print (the case reads it instead of starting a second
    process); without --wait, --json is refused."""
    from xentap import create as create_mod
    pub = keys.load_public(keys.paths(dom0_keys, "dom0")[0]).decode()

    def fake_create(cfg_path, ovr, **kw):          # xl create -p, disks, unpause
        with Client(unix_socket_path=xenstore.socket_path) as dom0:
            make_domain(dom0, APP, "xentap-appliance")
        return APP

    real_wait = ad.wait_for_ready

    def announced_wait(xs, domid, timeout, poll=0.5):   # what the announcer writes
        with Client(unix_socket_path=xenstore.domain_socket(APP)) as app:
            st = K.appliance_status_path(APP)
            for k, v in (("endpoint", "tcp://10.1.0.5:7788"), ("public-key", pub),
                         ("heartbeat", "1795665988"), ("state", "ready")):
                app.write(f"{st}/{k}".encode(), v.encode())
        return real_wait(xs, domid, timeout, poll)

    monkeypatch.setattr(create_mod, "create", fake_create)
    monkeypatch.setattr(ad, "wait_for_ready", announced_wait)
    monkeypatch.setattr(ad, "check_view", lambda view, sysfs_net="": None)
    args = ["create", "--image", image, "--ip", "10.1.0.5/24", "--keys", dom0_keys,
            "--journal", str(tmp_path / "j.img"), "--journal-size", "64M",
            *_socket_args(xenstore)]
    assert "--json needs --wait" in _one_line_error(_run(*args, "--json"))
    r = _run(*args, "--wait", "5", "--json")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert "appliance ready: tcp://10.1.0.5:7788" in r.output
    assert lines[-2].startswith("timing (s): start-up ")
    st = json.loads(lines[-1])
    assert st == json.loads(_run("status", "--json", *_socket_args(xenstore)).output)
    assert (st["domain"], st["state"], st["public_key"], st["running"]) == (APP, "ready", pub, True)
