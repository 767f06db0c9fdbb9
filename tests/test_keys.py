"""xentap.keys: key files, loading errors, CURVE server/client sockets, `xentap keys`."""
from __future__ import annotations

import os
import stat

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner

from xentap import keys
from xentap.cli_appliance import appliance, keys_cmd


def test_create_files_modes_and_zmq_format(tmp_path):
    pub, sec = keys.create(tmp_path / "k", "appliance")
    assert pub == tmp_path / "k" / "appliance.key" and sec == tmp_path / "k" / "appliance.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["appliance.key",
                                                                   "appliance.key_secret"]
    zp, zs = zmq.auth.load_certificate(sec)
    assert zmq.auth.load_certificate(pub) == (zp, None)
    assert keys.load_public(pub) == zp
    assert keys.load_secret(sec) == (zp, zs)
    assert zmq.curve_public(zs) == zp


def test_create_refuses_overwrite_unless_force(tmp_path):
    _, sec = keys.create(tmp_path, "dom0")
    before = sec.read_bytes()
    with pytest.raises(FileExistsError, match="not overwriting"):
        keys.create(tmp_path, "dom0")
    assert sec.read_bytes() == before
    keys.create(tmp_path, "dom0", force=True)
    assert sec.read_bytes() != before
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    with pytest.raises(ValueError, match="bad key name"):
        keys.create(tmp_path, "../evil")
    # another host's public key of the same name (an "allowed" dir) is not clobbered either
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "dom0.key").write_bytes(b"theirs")
    with pytest.raises(FileExistsError, match="public key .* exists"):
        keys.create(tmp_path / "allowed", "dom0")
    assert (tmp_path / "allowed" / "dom0.key").read_bytes() == b"theirs"


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no public key file .*nope.key"):
        keys.load_public(tmp_path / "nope.key")
    with pytest.raises(FileNotFoundError, match="no secret key file"):
        keys.load_secret(tmp_path / "nope.key_secret")
    bad = tmp_path / "bad.key"
    bad.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(ValueError, match="40 Z85 characters"):
        keys.load_public(bad)
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="no public-key line"):
        keys.load_public(bad)
    bad.write_text('curve\n    public-key = "' + "~" * 40 + '"\n')
    with pytest.raises(ValueError, match="not valid Z85"):
        keys.load_public(bad)
    pub, sec = keys.create(tmp_path, "x")
    with pytest.raises(ValueError, match="no secret-key line"):
        os.chmod(pub, 0o600)
        keys.load_secret(pub)
    os.chmod(sec, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        keys.load_secret(sec)
    os.chmod(sec, 0o600)
    # a public key that does not match the secret one
    other, _ = keys.create(tmp_path, "y")
    text = sec.read_text().replace(keys.load_public(pub).decode(), keys.load_public(other).decode())
    sec.write_text(text)
    with pytest.raises(ValueError, match="does not belong"):
        keys.load_secret(sec)
    for exc in (FileNotFoundError, ValueError):
        try:
            keys.load_public(tmp_path / "nope.key") if exc is FileNotFoundError else keys.load_secret(sec)
        except exc as e:
            assert "\n" not in str(e)


def test_load_allowed(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory of allowed"):
        keys.load_allowed(tmp_path / "none")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no public keys"):
        keys.load_allowed(tmp_path / "a")
    p1, _ = keys.create(tmp_path / "a", "h1")
    p2, _ = keys.create(tmp_path / "a", "h2")
    got = keys.load_allowed(tmp_path / "a")
    assert set(got) == {keys.load_public(p1), keys.load_public(p2)}


def _roundtrip(server: keys.CurveServer, client: keys.CurveClient | None, plain=False,
               timeout=1500):
    ctx_s, ctx_c = zmq.Context(), zmq.Context()
    srv = ctx_s.socket(zmq.ROUTER)
    auth = keys.configure_server(srv, server)
    try:
        port = srv.bind_to_random_port("tcp://127.0.0.1")
        cli = ctx_c.socket(zmq.DEALER)
        cli.linger = 0
        if client is not None:
            keys.configure_client(cli, client)
        cli.connect(f"tcp://127.0.0.1:{port}")
        cli.send(b"ping")
        if not srv.poll(timeout):
            return None
        route, frame = srv.recv_multipart(copy=False)
        return frame.bytes, frame.get("User-Id")
    finally:
        cli.close(0)
        srv.close(0)
        auth.stop()
        ctx_s.term()
        ctx_c.term()


def test_curve_allows_only_allowed_keys(tmp_path):
    keys.create(tmp_path / "app", "appliance")
    good_pub, good_sec = keys.create(tmp_path / "allowed", "dom0")
    _, bad_sec = keys.create(tmp_path / "other", "dom0")
    server = keys.CurveServer.from_dir(tmp_path / "app", tmp_path / "allowed")
    app_pub = tmp_path / "app" / "appliance.key"
    ok = _roundtrip(server, keys.CurveClient.from_files(good_sec, app_pub))
    assert ok == (b"ping", keys.load_public(good_pub).decode())
    assert _roundtrip(server, keys.CurveClient.from_files(bad_sec, app_pub), timeout=500) is None
    assert _roundtrip(server, None, timeout=500) is None  # plain client, curve server
    # a client trusting the wrong server key never gets through either
    wrong_server, _ = keys.create(tmp_path / "other", "fake")
    assert _roundtrip(server, keys.CurveClient.from_files(good_sec, wrong_server),
                      timeout=500) is None


def test_cli_keys(tmp_path):
    r = CliRunner()
    res = r.invoke(keys_cmd, ["--dir", str(tmp_path), "--role", "appliance"])
    assert res.exit_code == 0, res.output
    assert "appliance.key_secret" in res.output and "appliance.key " in res.output
    assert (tmp_path / "appliance.key").exists()
    res = r.invoke(keys_cmd, ["--dir", str(tmp_path), "--role", "appliance"])
    assert res.exit_code == 1
    assert "not overwriting" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert r.invoke(keys_cmd, ["--dir", str(tmp_path), "--role", "appliance", "--force"]).exit_code == 0
    res = r.invoke(keys_cmd, ["--dir", str(tmp_path)])
    assert res.exit_code == 0 and (tmp_path / "dom0.key_secret").exists()
    res = r.invoke(keys_cmd, ["--dir", str(tmp_path), "--name", "dom0-hostA"])
    assert res.exit_code == 0 and (tmp_path / "dom0-hostA.key").exists()


def test_cli_serve_refuses_without_keys(tmp_path):
    r = CliRunner()
    res = r.invoke(appliance, ["serve", "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 1
    assert res.output.startswith("xentap: no keys: pass --keys DIR")
    assert len(res.output.strip().splitlines()) == 1
    res = r.invoke(appliance, ["serve", "--data-dir", str(tmp_path / "d"), "--keys",
                               str(tmp_path / "k")])
    assert res.exit_code == 1 and "no secret key file" in res.output
    keys.create(tmp_path / "k", "appliance")
    res = r.invoke(appliance, ["serve", "--data-dir", str(tmp_path / "d"), "--keys",
                               str(tmp_path / "k")])
    assert res.exit_code == 1 and "no directory of allowed public keys" in res.output
    (tmp_path / "k" / "allowed").mkdir()
    res = r.invoke(appliance, ["serve", "--data-dir", str(tmp_path / "d"), "--keys",
                               str(tmp_path / "k")])
    assert res.exit_code == 1 and "no public keys" in res.output
    res = r.invoke(appliance, ["serve", "--insecure", "--listen", "udp://x",
                               "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 1 and "tcp://HOST:PORT or ipc://PATH" in res.output
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())
