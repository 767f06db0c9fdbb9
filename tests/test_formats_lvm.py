"""analyzer.formats.lvm against PVs made by pvcreate/vgcreate on a loop device, checked with pvs.

pvcreate refuses plain files, so these tests need root and a free loop
device; they skip without.  LVM is pointed at that one device only.
"""

import contextlib
import json
import os
import random
import shutil
import subprocess

import pytest

from analyzer.formats import lvm

pytestmark = pytest.mark.skipif(shutil.which("pvcreate") is None, reason="needs lvm2")

ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def lvm_cmd(dev, *args):
    cfg = 'devices { filter=["a|^%s$|","r|.*|"] use_devicesfile=0 }' % dev
    return subprocess.run([args[0], "--config", cfg, *args[1:]], check=True,
                          capture_output=True, text=True, env=ENV).stdout


@contextlib.contextmanager
def loopdev(img):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and loop devices")
    p = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip("no free loop device")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def make_pv(tmp_path, vg, *pv_opts):
    img = tmp_path / f"{vg}.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    with loopdev(img) as dev:
        lvm_cmd(dev, "pvcreate", "-q", *pv_opts, dev)
        lvm_cmd(dev, "vgcreate", "-q", vg, dev)
        try:
            report = json.loads(lvm_cmd(dev, "pvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                                        "-o", "pv_uuid,dev_size,pe_start,pv_mda_size,vg_name,pv_mda_count", dev))
            with open(dev, "rb") as f:
                data = f.read(2 << 20)
        finally:
            lvm_cmd(dev, "vgremove", "-q", "-f", vg)
            lvm_cmd(dev, "pvremove", "-q", "-f", dev)
    return data, report["report"][0]["pv"][0]


def test_matches_pvs(tmp_path):
    data, pv = make_pv(tmp_path, "xtfmt_vg1")
    lab = lvm.detect(data)
    assert lab is not None and lab.crc_ok and lab.sector == 1 and lab.type == "LVM2 001"
    assert lab.pv_uuid_dashed == pv["pv_uuid"]
    assert lab.device_size == int(pv["dev_size"]) == 16 << 20
    assert lab.data_areas[0][0] == int(pv["pe_start"])
    assert len(lab.metadata_areas) == int(pv["pv_mda_count"]) == 1
    mda_off, mda_size = lab.metadata_areas[0]
    hdr = lvm.parse_mda_header(data, mda_off)
    assert hdr is not None and hdr.checksum_ok and hdr.version == 1
    assert hdr.start == mda_off and hdr.size == mda_size
    assert mda_size == int(pv["pv_mda_size"])
    text, ok = lvm.read_metadata_text(data[mda_off:mda_off + mda_size], hdr)
    assert ok and lvm.vg_name(text) == pv["vg_name"] == "xtfmt_vg1"
    assert pv["pv_uuid"] in text


def test_label_sector_and_corruption(tmp_path):
    data, pv = make_pv(tmp_path, "xtfmt_vg2", "--labelsector", "3")
    lab = lvm.detect(data)
    assert lab.sector == 3 and lab.pv_uuid_dashed == pv["pv_uuid"]
    raw = bytearray(data[:4096])
    raw[3 * 512 + 40] ^= 1  # in the PV uuid
    assert lvm.detect(bytes(raw)) is None
    assert lvm.parse_label_sector(bytes(raw[1536:2048]), 3).crc_ok is False
    assert lvm.parse_label_sector(bytes(data[1536:2048]), 2) is None  # sector number must match
    mda_off = lab.metadata_areas[0][0]
    raw = bytearray(data[mda_off:mda_off + 512])
    raw[40] ^= 1
    assert lvm.parse_mda_header(bytes(raw)).checksum_ok is False


def test_fuzz(tmp_path):
    data, _ = make_pv(tmp_path, "xtfmt_vg3")
    rng = random.Random(7)
    lab = lvm.detect(data)
    mda = data[lab.metadata_areas[0][0]:lab.metadata_areas[0][0] + lab.metadata_areas[0][1]]
    for _ in range(1500):
        a = bytearray(data[:2048])
        for _ in range(rng.randint(1, 6)):
            a[512 + rng.randrange(512)] = rng.randrange(256)
        r = lvm.parse_label_sector(bytes(a[512:1024]), 1)
        assert r is None or isinstance(r, lvm.PVLabel)
        assert lvm.detect(bytes(a)) is None or r is not None
        m = bytearray(mda[:4096])
        for _ in range(rng.randint(1, 6)):
            m[rng.randrange(512)] = rng.randrange(256)
        h = lvm.parse_mda_header(bytes(m))
        assert h is None or isinstance(h, lvm.MdaHeaderInfo)
        if h is not None:
            for loc in h.raw_locns:
                lvm.read_metadata_text(bytes(m), h, loc)
        g = rng.randbytes(rng.choice((0, 512, 2048)))
        assert lvm.detect(g) is None and lvm.parse_mda_header(g) is None
        lvm.parse_label_sector(b"LABELONE" + g, 0)
