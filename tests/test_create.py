"""`xentap create CFG`: the xl config parser, the xentap disk spec, and the
whole create (xl create -p, attach, unpause; destroy on failure) against the
xenstore stand-in, the daemon on the sim transport, and a fake `xl` on PATH
that records its arguments and does in xenstore what xl would."""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from xentap import shim
from xentap import xs_keys as K
from xentap.cli import cli, main
from xentap.xl_config import ConfigError, parse, parse_disk_spec, without_keys, xentap_disks

REPO = Path(__file__).resolve().parent.parent

# --- the xl config language ---------------------------------------------------------


def test_parser_reads_strings_numbers_lists_comments_and_semicolons():
    cfg = parse(textwrap.dedent("""\
        # a guest
        name = "g1"   # trailing comment
        memory = 256; vcpus = 0x2
        extra = 'console=hvc0 a=\\'b\\' \\x41\\101\\n'
        disk = [ 'phy:/dev/vg/a,xvdb,w',
                 "format=raw, vdev=xvdc, target=/x",   # comma before ]
               ]
        empty = []
        vif = [ 'bridge=xenbr0' ]
        vif += [ 'bridge=xenbr1' ]
        """), "g.cfg")
    assert cfg.get("name") == "g1"
    assert cfg.get("memory") == 256 and cfg.get("vcpus") == 2
    assert cfg.get("extra") == "console=hvc0 a='b' AA\n"
    assert cfg.get("disk") == ["phy:/dev/vg/a,xvdb,w", "format=raw, vdev=xvdc, target=/x"]
    assert cfg.get("empty") == []
    assert cfg.get("vif") == ["bridge=xenbr0", "bridge=xenbr1"]
    assert cfg.line_of("disk") == 5
    assert cfg.get("absent") is None


@pytest.mark.parametrize("text,line,reason", [
    ("name = 'g\n", 1, "unterminated string"),
    ("name = g1\n", 1, "unquoted word 'g1'"),
    ("\n\nname 'g1'\n", 3, "expected '=' after 'name'"),
    ("disk = [ 'a' 'b' ]\n", 1, "expected ',' or ']'"),
    ("disk = [ 'a',\n", 2, "at the end of the file"),
    ("memory = 256 512\n", 1, "expected the end of the line"),
    ("= 3\n", 1, "expected a setting"),
    ("name = 'a' $\n", 1, "unexpected character '$'"),
    ("x = '\\q'\n", 1, "unknown escape"),
])
def test_parser_errors_name_the_line_and_the_reason(text, line, reason):
    with pytest.raises(ConfigError) as e:
        parse(text, "bad.cfg")
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(f"bad.cfg:{line}: ")
    assert reason in e.value.problems[0]


def test_without_keys_cuts_only_that_setting_and_keeps_line_numbers():
    text = ("name = 'g'\n"
            "xentap_disks = [ 'vdev=xvda, target=/a',\n"
            "               ]   # ours\n"
            "memory = 128; xentap_disks += [ 'vdev=xvdb, target=/b' ]; vcpus = 1\n"
            "disk = [ 'phy:/dev/x,xvdc,w' ]\n")
    out = without_keys(parse(text), {"xentap_disks"})
    assert "xentap" not in out
    assert out.count("\n") == text.count("\n")
    again = parse(out)
    assert [(s.key, s.value, s.line) for s in again.settings] == [
        ("name", "g", 1), ("memory", 128, 4), ("vcpus", 1, 4),
        ("disk", ["phy:/dev/x,xvdc,w"], 5)]


# --- the xentap disk spec -------------------------------------------------------------


def test_disk_spec_keys_in_any_order_and_target_last_may_hold_commas():
    d = parse_disk_spec("target=/srv/a.img, vdev=xvda, access=ro")
    assert (d.target, d.vdev, d.devid, d.mode) == ("/srv/a.img", "xvda", 51712, "r")
    d = parse_disk_spec("vdev=xvdb,mode=w,format=raw,devtype=disk,target=/srv/a,b.img")
    assert (d.target, d.devid, d.mode) == ("/srv/a,b.img", 51728, "w")
    assert parse_disk_spec("vdev=51712, target=/x").mode == "w"


@pytest.mark.parametrize("spec,reason", [
    ("vdev=xvda", "target= is missing"),
    ("target=/x", "vdev= is missing"),
    ("/x,raw,xvda,w", "positional disk specs are not supported"),
    ("vdev=xvda, access=rwx, target=/x", "access=rwx is not one of"),
    ("vdev=xvda, format=qcow2, target=/x", "raw images only"),
    ("vdev=xvda, devtype=cdrom, target=/x", "disks only"),
    ("vdev=hda, target=/x", "unknown virtual device 'hda'"),
    ("vdev=xvda, vdev=xvdb, target=/x", "vdev given twice"),
    ("vdev=xvda, colo=1, target=/x", "unknown key 'colo'"),
    ("vdev=, target=/x", "vdev= is empty"),
])
def test_disk_spec_errors(spec, reason):
    with pytest.raises(ValueError, match=reason):
        parse_disk_spec(spec)


def test_config_problems_are_all_reported_one_line_each():
    cfg = parse(textwrap.dedent("""\
        memory = 128
        disk = [ 'format=raw, vdev=xvdb, access=rw, target=/dev/vg/b' ]
        xentap_disks = [ 'vdev=xvda, target=/a', 'vdev=xvda, target=/b',
                         'vdev=xvdb, target=/c', 'target=/d', 42 ]
        """), "g.cfg")
    with pytest.raises(ConfigError) as e:
        xentap_disks(cfg)
    assert e.value.problems == [
        "g.cfg: no name = '...' (xl needs one, and xentap finds the domain by it)",
        "g.cfg:3: xentap_disks entry 2: vdev xvda is also entry 1",
        "g.cfg:3: xentap_disks entry 3: vdev xvdb is also in disk = [...]",
        "g.cfg:3: xentap_disks entry 4: vdev= is missing",
        "g.cfg:3: xentap_disks entry 5 is not a string",
    ]
    with pytest.raises(ConfigError, match="must be a list of strings"):
        xentap_disks(parse("name='g'\nxentap_disks = 'vdev=xvda, target=/a'\n"))
    with pytest.raises(ConfigError, match="no xentap_disks"):
        xentap_disks(parse("name='g'\n"))


def test_the_example_configs_parse():
    for cfg in sorted((REPO / "xl_scripts").glob("*.cfg")):
        disks = xentap_disks(parse(cfg.read_text(), cfg.name))
        assert disks, cfg


# --- xentap create, end to end on the stand-in ------------------------------------------

FAKE_XL = r'''#!{python}
"""A fake xl: records argv (and the config it was given) in $FAKE_XL_LOG, and
does in xenstore what xl does for create -p / domid / unpause / destroy."""
import json, os, re, sys
sys.path.insert(0, {repo!r})
import pyxs
from tests.blkfront_test import make_domain, release_domain

args = sys.argv[1:]
rec = {{"argv": args}}
if args[:2] == ["create", "-p"]:
    rec["config"] = open(args[2]).read()
with open(os.environ["FAKE_XL_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\n")
if os.environ.get("FAKE_XL_FAIL") == args[0]:
    print(f"libxl: error: fake failure of {{args[0]}}", file=sys.stderr)
    sys.exit(3)
domid = int(os.environ.get("FAKE_XL_DOMID", "9"))
with pyxs.Client(unix_socket_path=os.environ["XENSTORED_PATH"]) as c:
    if args[0] == "create":
        name = re.search(r"^name\s*=\s*['\"](.*)['\"]", rec["config"], re.M).group(1)
        make_domain(c, domid, name)
    elif args[0] == "domid":
        print(domid)
    elif args[0] == "destroy":
        release_domain(c, domid)
        c.delete(f"/local/domain/{{domid}}".encode())
'''


@pytest.fixture
def fake_xl(tmp_path, monkeypatch):
    """A fake `xl` first on PATH; returns a function reading its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    xl = bindir / "xl"
    xl.write_text(FAKE_XL.format(python=sys.executable, repo=str(REPO)))
    xl.chmod(0o755)
    log = tmp_path / "xl.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_XL_LOG", str(log))
    monkeypatch.setenv("FAKE_XL_DOMID", "9")

    def calls() -> list[dict]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]
    return calls


def _cfg(tmp_path, disks: str, name: str = "g9") -> str:
    p = tmp_path / "guest.cfg"
    p.write_text(textwrap.dedent(f"""\
        name = "{name}"
        type = 'pv'
        kernel = '/boot/vmlinuz'
        memory = 128
        xentap_disks = [ {disks} ]
        on_poweroff = 'destroy'
        """))
    return str(p)


def _run(env, *args):
    r = CliRunner().invoke(cli, ["create", *args, "--xenstore-socket", env.socket])
    return r


def test_create_boots_a_guest_on_its_xentap_disks(xentap_env, fake_xl, tmp_path):
    env = xentap_env
    a, b = env.image("a.img"), env.image("b.img")
    cfg = _cfg(tmp_path, f"'vdev=xvda, access=rw, target={a}', 'target={b}, vdev=xvdb, mode=r'")
    r = _run(env, cfg)
    assert r.exit_code == 0, r.output
    assert "created domain g9 (id 9) with xentap disks xvda, xvdb" in r.output

    calls = fake_xl()
    assert [c["argv"][:2] for c in calls] == [["create", "-p"], ["domid", "g9"],
                                              ["unpause", "9"]]
    xl_cfg = calls[0]["config"]
    assert "xentap" not in xl_cfg and "name = \"g9\"" in xl_cfg and "memory = 128" in xl_cfg
    assert not os.path.exists(calls[0]["argv"][2])          # the temp config is gone
    # Both disks were attached before the unpause, and advertised by the daemon.
    for vdev, img, mode in (("xvda", a, "w"), ("xvdb", b, "r")):
        be = K.backend_path(9, K.vdev_to_devid(vdev))
        assert env.xs.read(f"{be}/{K.BE_PARAMS}") == img
        assert env.xs.read(f"{be}/{K.BE_MODE}") == mode
        assert env.xs.read(f"{be}/{K.STATE}") == "2"
        assert env.xs.get_perms(be) == ["n0", "r9"]
    # The guest's blkfront connects and does verified I/O on xvda.
    env.domains[9] = shim.SimDomain(env.sim_dir / "9", domid=9, nr_pages=1 << 15)
    f = env.front(9, "xvda")
    res = f.run(block_size=4096, queue_depth=8, read_pct=50, max_ios=300, verify=True)
    assert res["errors"] == 0 and res["verify_failures"] == 0
    ro = env.front(9, "xvdb")
    assert ro.read(f"{ro.be}/{K.BE_INFO}") == str(K.VDISK_READONLY)


def test_create_dry_run_checks_without_touching_xl(xentap_env, fake_xl, tmp_path):
    env = xentap_env
    a = env.image("a.img")
    r = _run(env, "-n", _cfg(tmp_path, f"'vdev=xvda, target={a}'"))
    assert r.exit_code == 0, r.output
    assert f"ok: domain 'g9', xentap disks xvda={a} (rw)" in r.output
    assert fake_xl() == []


def test_create_config_errors_are_one_line_each_and_nothing_runs(xentap_env, fake_xl,
                                                                tmp_path, capfd):
    env = xentap_env
    cfg = _cfg(tmp_path, f"'vdev=xvda, target={tmp_path}/missing.img', "
                         f"'vdev=xvdz9, target=/x', 'vdev=xvdb, target={tmp_path}'")
    with pytest.raises(SystemExit) as e:
        main(["create", cfg, "--xenstore-socket", env.socket])
    assert e.value.code == 1
    err = capfd.readouterr().err.splitlines()
    # The spec problems are found before any file is looked at.
    assert err == ["xentap: guest.cfg:5: xentap_disks entry 2: unknown virtual device "
                   "'xvdz9' (want xvdX or a number)"]
    assert fake_xl() == []

    ok = env.image("ok.img")
    cfg = _cfg(tmp_path, f"'vdev=xvda, target={tmp_path}/missing.img', "
                         f"'vdev=xvdb, target={ok}', 'vdev=xvdc, target={tmp_path}'")
    with pytest.raises(SystemExit):
        main(["create", cfg, "--xenstore-socket", env.socket])
    assert capfd.readouterr().err.splitlines() == [
        f"xentap: guest.cfg:5: xentap_disks entry 1: target {tmp_path}/missing.img does not exist",
        f"xentap: guest.cfg:5: xentap_disks entry 3: target {tmp_path} is neither a file "
        f"nor a block device",
    ]
    (tmp_path / "syntax.cfg").write_text("name = 'g'\nmemory = \n")
    with pytest.raises(SystemExit):
        main(["create", str(tmp_path / "syntax.cfg"), "--xenstore-socket", env.socket])
    assert capfd.readouterr().err.splitlines() == [
        "xentap: syntax.cfg:2: expected a value, found the end of the line"]
    assert fake_xl() == []


@pytest.mark.parametrize("fail", ["unpause", "domid"])
def test_create_destroys_the_paused_domain_when_a_later_step_fails(xentap_env, fake_xl,
                                                                  tmp_path, monkeypatch, fail):
    env = xentap_env
    a = env.image("a.img")
    monkeypatch.setenv("FAKE_XL_FAIL", fail)
    r = _run(env, _cfg(tmp_path, f"'vdev=xvda, target={a}'"))
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"xentap: xl {fail} failed: libxl: error: fake failure of {fail}; domain g9 destroyed"]
    argv = [c["argv"] for c in fake_xl()]
    assert argv[0][:2] == ["create", "-p"]
    assert argv[-1] == ["destroy", "9" if fail == "unpause" else "g9"]
    be = K.backend_path(9, K.vdev_to_devid("xvda"))
    assert not env.xs.exists(be) and not env.xs.exists(K.frontend_path(9, 51712))
    env.wait_for(lambda: (9, 51712) not in env.daemon.devices, what="device dropped")
    with shim.Vbd(a):                        # nobody holds the image
        pass


def test_create_when_xl_create_fails_runs_nothing_else(xentap_env, fake_xl, tmp_path,
                                                       monkeypatch):
    env = xentap_env
    monkeypatch.setenv("FAKE_XL_FAIL", "create")
    r = _run(env, _cfg(tmp_path, f"'vdev=xvda, target={env.image()}'"))
    assert r.exit_code == 1
    assert r.output.strip() == "xentap: xl create failed: libxl: error: fake failure of create"
    assert [c["argv"][0] for c in fake_xl()] == ["create"]


def test_create_refuses_a_target_in_use_and_destroys_the_domain(xentap_env, fake_xl,
                                                                tmp_path):
    env = xentap_env
    env.guest(5)
    a = env.image("a.img")
    env.attach(5, a, "xvdb")
    r = _run(env, _cfg(tmp_path, f"'vdev=xvda, target={a}'"))
    assert r.exit_code == 1
    assert r.output.strip() == (f"xentap: target {a} is already attached to domain 5 as xvdb; "
                                f"domain g9 destroyed")
    assert fake_xl()[-1]["argv"] == ["destroy", "9"]
    assert env.xs.read(f"{K.backend_path(5, 51728)}/{K.BE_PARAMS}") == a   # untouched


def test_create_without_a_daemon_says_so(xenstore, fake_xl, tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 4096)
    p = _cfg(tmp_path, f"'vdev=xvda, target={img}'")
    r = CliRunner().invoke(cli, ["create", p, "--xenstore-socket", xenstore.socket_path])
    assert r.exit_code == 1
    assert r.output.strip() == "xentap: the xentap daemon is not running (start `xentap daemon`)"
    assert fake_xl() == []


def test_command_line_overrides_win_as_with_xl(xentap_env, fake_xl, tmp_path):
    env = xentap_env
    a, b = env.image("a.img"), env.image("b.img")
    cfg = _cfg(tmp_path, f"'vdev=xvda, target={a}'")
    r = _run(env, cfg, "name='other'", "memory=512", f"xentap_disks=['vdev=xvdb, target={b}']")
    assert r.exit_code == 0, r.output
    assert "created domain other (id 9) with xentap disks xvdb" in r.output
    calls = fake_xl()
    assert calls[1]["argv"] == ["domid", "other"]
    xl_cfg = parse(calls[0]["config"])
    assert xl_cfg.get("name") == "other" and xl_cfg.get("memory") == 512
    assert xl_cfg.get("xentap_disks") is None
    assert env.xs.read(f"{K.backend_path(9, 51728)}/{K.BE_PARAMS}") == b
    assert not env.xs.exists(K.backend_path(9, 51712))


def test_bad_overrides_are_named_in_the_error(xentap_env, fake_xl, tmp_path):
    env = xentap_env
    cfg = _cfg(tmp_path, f"'vdev=xvda, target={env.image()}'")
    r = _run(env, cfg, "memory=")
    assert r.exit_code == 1
    assert r.output.strip() == ("xentap: 'memory=' (command line):1: a value is missing at "
                                "the end of the file")
    r = _run(env, cfg, "xentap_disks=['vdev=xvda']")
    assert r.output.strip() == ("xentap: \"xentap_disks=['vdev=xvda']\" (command line): "
                                "xentap_disks entry 1: target= is missing")
    r = _run(env, cfg, "a=1; b=2")
    assert r.output.strip() == "xentap: 'a=1; b=2' (command line): give one KEY=VALUE per argument"
    assert fake_xl() == []


def test_create_destroys_the_domain_when_the_daemon_cannot_open_an_image(xentap_env, fake_xl,
                                                                       tmp_path):
    env = xentap_env
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    r = _run(env, _cfg(tmp_path, f"'vdev=xvda, target={empty}'"))
    assert r.exit_code == 1
    assert r.output.strip() == (f"xentap: the daemon refused xvda ({empty}): 22 image {empty} "
                                f"is empty; domain g9 destroyed")
    assert [c["argv"][0] for c in fake_xl()] == ["create", "domid", "destroy"]
    assert not env.xs.exists(K.backend_path(9, 51712))
