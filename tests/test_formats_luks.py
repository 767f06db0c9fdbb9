"""analyzer.formats.luks against headers made by cryptsetup luksFormat, checked with luksDump."""

import hashlib
import random
import re
import shutil
import struct
import subprocess

import pytest

from analyzer.formats import luks

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup-bin")

FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def fmt(tmp_path, name, *opts):
    img = tmp_path / name
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    run("cryptsetup", "luksFormat", "-q", "--key-file", "-", *opts, str(img), input="pw")
    return img


@pytest.fixture(scope="module")
def luks1(tmp_path_factory):
    return fmt(tmp_path_factory.mktemp("l1"), "l1.img", "--type", "luks1", "--hash", "sha256",
               "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--pbkdf-force-iterations", "1000")


@pytest.fixture(scope="module")
def luks2(tmp_path_factory):
    return fmt(tmp_path_factory.mktemp("l2"), "l2.img", "--type", "luks2", "--label", "xtlabel",
               "--subsystem", "xtsub", *FAST)


def dump(img):
    return run("cryptsetup", "luksDump", str(img))


def test_luks1_matches_luksdump(luks1):
    h = luks.detect(luks1.read_bytes()[:4096])
    d = dump(luks1)
    field = lambda k: re.search(r"^" + k + r":\s*(.*)$", d, re.M).group(1).strip()  # noqa: E731
    assert isinstance(h, luks.LUKS1Header) and h.version == 1
    assert h.cipher_name == field("Cipher name") == "aes"
    assert h.cipher_mode == field("Cipher mode") == "cbc-essiv:sha256"
    assert h.hash_spec == field("Hash spec") == "sha256"
    assert h.payload_offset == int(field("Payload offset"))
    assert h.key_bytes * 8 == int(field("MK bits"))
    assert h.mk_digest_iter == int(field("MK iterations"))
    assert h.uuid == field("UUID")
    enabled = [int(n) for n, s in re.findall(r"^Key Slot (\d): (\w+)", d, re.M) if s == "ENABLED"]
    assert list(h.active_key_slots) == enabled == [0]


def test_luks2_matches_luksdump(luks2):
    data = luks2.read_bytes()[:1 << 20]
    h = luks.detect(data)
    d = dump(luks2)
    assert isinstance(h, luks.LUKS2Header) and h.version == 2 and not h.secondary
    assert h.checksum_ok is True and h.checksum_alg == "sha256"
    assert h.uuid == re.search(r"^UUID:\s*(\S+)", d, re.M).group(1)
    assert h.label == re.search(r"^Label:\s*(\S+)", d, re.M).group(1) == "xtlabel"
    assert h.subsystem == "xtsub"
    assert h.json_size == int(re.search(r"^Metadata area:\s*(\d+)", d, re.M).group(1)) - 4096
    assert h.seqid == int(re.search(r"^Epoch:\s*(\d+)", d, re.M).group(1))
    assert h.cipher == re.search(r"^\s*cipher:\s*(\S+)", d, re.M).group(1) == "aes-xts-plain64"
    assert h.active_key_slots == (0,)
    s = luks.detect(data, h.hdr_size)  # secondary header
    assert s.secondary and s.checksum_ok and s.uuid == h.uuid and s.hdr_offset == h.hdr_size
    # binary header alone: parsed, checksum unknown
    assert luks.detect(data[:4096]).checksum_ok is None


def test_luks2_tampering(luks2):
    data = bytearray(luks2.read_bytes()[:1 << 20])
    h = luks.detect(bytes(data))
    i = data.index(b'"keyslots"', 4096)
    data[i + 1] ^= 0x20  # "Keyslots": JSON changed, checksum stale
    assert luks.detect(bytes(data)).checksum_ok is False
    # a forged header with a correct checksum but hostile, deeply nested JSON
    area = bytearray(h.hdr_size)
    area[:4096] = luks2.read_bytes()[:4096]
    js = b"[" * 5000 + b"]" * 5000
    area[4096:4096 + len(js)] = js
    area[448:512] = bytes(64)
    area[448:480] = hashlib.sha256(bytes(area)).digest()
    f = luks.detect(bytes(area))
    assert f.checksum_ok is True and f.metadata is None and f.cipher is None


def test_fuzz(luks1, luks2):
    rng = random.Random(8)
    seeds = [luks1.read_bytes()[:4096], luks2.read_bytes()[:16384]]
    for _ in range(700):
        for seed in seeds:
            a = bytearray(seed)
            for _ in range(rng.randint(1, 6)):
                a[rng.randrange(6, 600)] = rng.randrange(256)
            r = luks.detect(bytes(a)[: rng.choice((len(a), 600, 100))])
            assert r is None or isinstance(r, (luks.LUKS1Header, luks.LUKS2Header))
            if r is not None:
                r.cipher, r.active_key_slots
        g = rng.randbytes(rng.choice((0, 600, 4096)))
        assert luks.detect(g) is None
        for v in (1, 2):
            luks.detect(luks.MAGIC1 + struct.pack(">H", v) + g)
