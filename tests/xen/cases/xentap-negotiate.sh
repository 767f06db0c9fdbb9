# xentap-negotiate: xentap-ext4 with blkfront asked for what the shim offers
# beyond its defaults: a 16-page ring, two queues, 256 indirect segments
# (guest kernel command line).  Checks in xenstore, while Connected, that the
# frontend really used them, and in the guest that indirect descriptors are
# on with 256 segments per request and two hardware queues; then the same
# data verification as xentap-ext4.  Without persistent grants: with them
# blkfront allocates a page for every grant of every ring slot up front
# (2 queues x 512 slots x 257 pages, about 1 GiB), more than the guest's
# 512 MiB (it died out of memory); xentap-ext4 runs with them.
# xt-timeout: 1800
# xt-lane: blkback
XT_XENTAP_GUEST_EXTRA="xen_blkfront.max_ring_page_order=4 xen_blkfront.max_queues=2 xen_blkfront.max_indirect_segments=256 xen_blkfront.feature_persistent=0"
XT_XENTAP_GUEST_VCPUS=2   # blkfront: queues = min(max_queues, cpus)
XT_XENTAP_EXPECT_FE="ring-page-order=4 multi-queue-num-queues=2 feature-persistent=0"
XT_XENTAP_EXPECT_GUEST="max_segments=256 max_hw_sectors_kb=1024 hw_queues=2"
. "$XT_REPO/tests/xen/cases/xentap-ext4.sh"
