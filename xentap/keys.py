"""CurveZMQ keys for the mirror stream: the one place that creates, loads and applies them.

Files (the formats of :func:`zmq.auth.create_certificates`, so that
:func:`zmq.auth.load_certificate` reads them too)::

    <dir>/<name>.key         public key   (mode 0644), copy it to the other end
    <dir>/<name>.key_secret  key pair     (mode 0600), never leaves its host

Roles and names: the appliance's pair is ``appliance.key{,_secret}``; a dom0's
pair is ``dom0.key{,_secret}`` (``xentap keys --role dom0|appliance``).  The
appliance accepts exactly the dom0 public keys (``*.key``) found in its
"allowed" directory; dom0 trusts exactly the one appliance public key it was
given.

Sockets: :func:`configure_server` makes a socket a CURVE server and starts a
:class:`zmq.auth.thread.ThreadAuthenticator` (ZAP) on its context that lets
in only the allowed keys (one authenticator per context: give each server its
own :class:`zmq.Context`); :func:`configure_client` makes a socket a CURVE
client of one server.  Plain TCP/IPC is what a caller gets only by not calling
these, which the receiver and drainer allow only with an explicit ``insecure``.

Errors are one line: :class:`OSError` (missing or unreadable file, or a secret
file readable by others) or :class:`ValueError` (malformed content), with the
path in the message.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth
from zmq.utils import z85

from xentap.durable import fsync_dir

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ROLES = ("dom0", "appliance")
APPLIANCE_NAME = "appliance"
DOM0_NAME = "dom0"
Z85_KEY_LEN = 40  #: a 32-byte Curve25519 key, Z85-encoded
_MAX_KEY_FILE = 64 * 1024
ZAP_DOMAIN = "xentap"


# --------------------------------------------------------------------------
# files


def paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(public, secret) file paths of key pair ``name`` in ``directory``."""
    d = Path(directory)
    return d / f"{name}{PUBLIC_SUFFIX}", d / f"{name}{SECRET_SUFFIX}"


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"bad key name {name!r}: a plain file name is needed")


def create(directory: str | os.PathLike, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Create key pair ``name`` in ``directory`` (made if missing, mode 0700).

    Returns (public path, secret path).  Refuses (FileExistsError) to replace
    an existing secret unless ``force``.  The secret file is 0600 from the
    moment it exists under its final name.
    """
    _check_name(name)
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    pub, sec = paths(d, name)
    if not force:
        for f, what in ((sec, "secret"), (pub, "public")):
            if f.exists() or f.is_symlink():
                raise FileExistsError(f"{what} key {f} exists; not overwriting it (use --force)")
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=d)  # mode 0700
    try:
        tpub, tsec = zmq.auth.create_certificates(tmp, name)
        os.chmod(tsec, 0o600)
        os.chmod(tpub, 0o644)
        for f in (tpub, tsec):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if force:
            os.replace(tsec, sec)
        else:
            try:
                os.link(tsec, sec)  # fails atomically if it appeared meanwhile
            except FileExistsError:
                raise FileExistsError(
                    f"secret key {sec} exists; not overwriting it (use --force)") from None
        os.replace(tpub, pub)
        fsync_dir(d)
    finally:
        for f in Path(tmp).iterdir():
            f.unlink()
        os.rmdir(tmp)
    return pub, sec


def _read(path: Path, what: str) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} key file {path}") from None
    except OSError as e:
        raise OSError(f"cannot read {what} key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} key file {path} is not a regular file")
    if st.st_size > _MAX_KEY_FILE:
        raise ValueError(f"{what} key file {path} is too large to be a key file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read {what} key file {path}: {e.strerror}") from None


def _parse(path: Path, data: bytes, what: str) -> tuple[bytes | None, bytes | None]:
    """The zmq certificate format: ``public-key = "..."`` / ``secret-key = "..."`` lines."""
    pub = sec = None
    for line in data.splitlines():
        line = line.strip()
        if line.startswith(b"#"):
            continue
        for tag in (b"public-key", b"secret-key"):
            if line.startswith(tag):
                rest = line[len(tag):].lstrip()
                if not rest.startswith(b"="):
                    raise ValueError(f"{what} key file {path}: malformed {tag.decode()} line")
                val = rest[1:].strip(b" \t'\"")
                if tag == b"public-key":
                    pub = _z85(path, val, what)
                else:
                    sec = _z85(path, val, what)
    return pub, sec


def _z85(path: Path, val: bytes, what: str) -> bytes:
    if len(val) != Z85_KEY_LEN:
        raise ValueError(f"{what} key file {path}: a key is {Z85_KEY_LEN} Z85 characters, "
                         f"found {len(val)}")
    try:
        raw = z85.decode(val)
    except Exception:
        raise ValueError(f"{what} key file {path}: key is not valid Z85") from None
    if len(raw) != 32:  # pragma: no cover - length checked above
        raise ValueError(f"{what} key file {path}: key is not 32 bytes")
    return val


def load_public(path: str | os.PathLike) -> bytes:
    """The Z85 public key (40 bytes) of a ``.key`` (or ``.key_secret``) file."""
    p = Path(path)
    pub, _ = _parse(p, _read(p, "public"), "public")
    if pub is None:
        raise ValueError(f"public key file {p}: no public-key line")
    return pub


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``.key_secret`` file.

    Refuses (PermissionError) a secret file that group or others may read or
    write, as ssh does, and checks that the public key matches the secret one.
    """
    p = Path(path)
    data = _read(p, "secret")
    mode = p.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"secret key file {p} is accessible by others "
                              f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    pub, sec = _parse(p, data, "secret")
    if sec is None:
        raise ValueError(f"secret key file {p}: no secret-key line (is it a public key?)")
    derived = zmq.curve_public(sec)
    if pub is None:
        pub = derived
    elif pub != derived:
        raise ValueError(f"secret key file {p}: public-key does not belong to secret-key")
    return pub, sec


def load_allowed(directory: str | os.PathLike) -> dict[bytes, Path]:
    """Z85 public key -> file, for every ``*.key`` file in ``directory``.

    Raises when the directory is missing or holds no public key (an appliance
    that accepts nobody is a configuration error, not a policy).
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no directory of allowed public keys {d}")
    keys: dict[bytes, Path] = {}
    for f in sorted(d.glob(f"*{PUBLIC_SUFFIX}")):
        keys[load_public(f)] = f
    if not keys:
        raise ValueError(f"no public keys (*{PUBLIC_SUFFIX}) in {d}")
    return keys


# --------------------------------------------------------------------------
# sockets


@dataclass(frozen=True)
class CurveServer:
    """A server's key pair and the client public keys it accepts (all Z85)."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]
    names: dict = field(default_factory=dict, compare=False, hash=False)  # key -> file name

    @classmethod
    def from_files(cls, secret_path: str | os.PathLike,
                   allowed_dir: str | os.PathLike) -> CurveServer:
        pub, sec = load_secret(secret_path)
        allowed = load_allowed(allowed_dir)
        return cls(pub, sec, frozenset(allowed),
                   {k: p.name.removesuffix(PUBLIC_SUFFIX) for k, p in allowed.items()})

    @classmethod
    def from_dir(cls, keys_dir: str | os.PathLike, allowed_dir: str | os.PathLike,
                 name: str = APPLIANCE_NAME) -> CurveServer:
        return cls.from_files(paths(keys_dir, name)[1], allowed_dir)


@dataclass(frozen=True)
class CurveClient:
    """A client's key pair and the one server public key it trusts (all Z85)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, secret_path: str | os.PathLike,
                   server_public_path: str | os.PathLike) -> CurveClient:
        pub, sec = load_secret(secret_path)
        return cls(pub, sec, load_public(server_public_path))


class _AllowList:
    """ZAP credentials provider: accept exactly the allowed Z85 public keys."""

    def __init__(self, server: CurveServer):
        self.server = server
        self.lock = threading.Lock()
        self.denied = 0
        self._logged: dict[bytes, float] = {}  # key -> last log time (clients retry often)

    def callback(self, domain, key: bytes) -> bool:
        ok = key in self.server.allowed
        if not ok:
            now = time.monotonic()
            with self.lock:
                self.denied += 1
                last = self._logged.get(key)
                if last is None or now - last > 60:
                    if len(self._logged) > 1024:
                        self._logged.clear()
                    self._logged[key] = now
                    log.warning("CURVE: refused a client with unknown public key %s",
                                key.decode("ascii", "replace"))
        return ok


def configure_server(sock: zmq.Socket, server: CurveServer) -> "ThreadAuthenticator":
    """Make ``sock`` a CURVE server accepting only ``server.allowed``; call before bind().

    Starts and returns the ZAP :class:`ThreadAuthenticator` on the socket's
    context (the caller stops it after closing the socket).  Without a ZAP
    handler libzmq would accept any client key, so this is the only way to
    set up a server.
    """
    # here, not at the top: it imports asyncio, a sixth of every dom0 command's
    # start-up (seconds under emulation), and only a server needs it
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(sock.context, log=logging.getLogger(__name__ + ".zap"))
    auth.start()
    try:
        provider = _AllowList(server)
        auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=provider)
        sock.curve_secretkey = server.secret
        sock.curve_publickey = server.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
    except BaseException:
        auth.stop()
        raise
    return auth


def configure_client(sock: zmq.Socket, client: CurveClient) -> None:
    """Make ``sock`` a CURVE client of ``client.server_public``; call before connect()."""
    sock.curve_secretkey = client.secret
    sock.curve_publickey = client.public
    sock.curve_serverkey = client.server_public
