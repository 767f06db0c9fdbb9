"""analyzer.formats.swap against areas made by mkswap, checked with blkid."""

import random
import shutil
import subprocess

import pytest

from analyzer.formats import swap

pytestmark = pytest.mark.skipif(shutil.which("mkswap") is None, reason="needs mkswap (util-linux)")

UUID = "4f1c2e7a-8c44-4d0e-9d0b-1234567890ab"


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def mkswap(tmp_path, name, *opts, size=8 << 20):
    img = tmp_path / name
    with open(img, "wb") as f:
        f.write(b"\xEE" * 8192)  # old content: mkswap must not care
        f.truncate(size)
    run("mkswap", *opts, str(img))
    return img


def blkid(img, tag):
    return run("blkid", "-o", "value", "-s", tag, str(img)).strip()


def test_matches_blkid(tmp_path):
    img = mkswap(tmp_path, "s.img", "-L", "xtswap", "-U", UUID)
    h = swap.detect(img.read_bytes()[:65536])
    assert h is not None and h.version == 1 and h.page_size == 4096 and not h.big_endian
    assert h.uuid == blkid(img, "UUID") == UUID
    assert h.label == blkid(img, "LABEL") == "xtswap"
    assert h.last_page == (8 << 20) // 4096 - 1
    assert h.size_bytes == 8 << 20
    assert h.nr_badpages == 0


@pytest.mark.parametrize("page", [16384, 65536])
def test_other_page_sizes(tmp_path, page):
    img = mkswap(tmp_path, f"p{page}.img", "-p", str(page), "-U", UUID)
    data = img.read_bytes()[:65536]
    h = swap.detect(data)
    assert h.page_size == page and h.last_page == (8 << 20) // page - 1 and h.uuid == UUID
    assert swap.detect(data, page_size=4096) is None


def test_not_swap(tmp_path):
    assert swap.detect(b"") is None and swap.detect(bytes(65536)) is None
    img = mkswap(tmp_path, "c.img")
    raw = bytearray(img.read_bytes()[:4096])
    raw[1024] = 7  # version
    assert swap.detect(bytes(raw)) is None
    raw = bytearray(img.read_bytes()[:4096])
    raw[4090] ^= 1
    assert swap.detect(bytes(raw)) is None


def test_fuzz(tmp_path):
    seed = mkswap(tmp_path, "f.img").read_bytes()[:4096]
    rng = random.Random(9)
    for _ in range(2000):
        a = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            a[1024 + rng.randrange(48)] = rng.randrange(256)
        r = swap.detect(bytes(a)[: rng.choice((4096, 4096, 1030, 4095))])
        assert r is None or isinstance(r, swap.SwapHeader)
        assert swap.detect(rng.randbytes(rng.choice((0, 4096)))) is None
