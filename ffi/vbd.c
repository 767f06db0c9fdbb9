/*
 * vbd.c — a VBD's life: open the image, connect rings (one thread each),
 * disconnect, close, and its counters.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <stdio.h>
#include <linux/falloc.h>
#include <unistd.h>

#include "xt_internal.h"

/* Reads a number from sysfs; 0 when absent. */
static uint64_t sysfs_u64(const char *path)
{
    FILE *f = fopen(path, "r");
    unsigned long long v = 0;
    if (f) {
        if (fscanf(f, "%llu", &v) != 1)
            v = 0;
        fclose(f);
    }
    return v;
}

/* Discard where it really works: hole punching on the image's filesystem,
 * or a block device whose queue takes discards. */
static void probe_discard(xt_vbd *v, const struct stat *st)
{
    if (v->is_blockdev) {
        char path[128];
        snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/discard_granularity",
                 major(st->st_rdev), minor(st->st_rdev));
        uint64_t g = sysfs_u64(path);
        snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/discard_alignment",
                 major(st->st_rdev), minor(st->st_rdev));
        v->discard_alignment = (uint32_t)sysfs_u64(path);
        v->discard_granularity = g <= UINT32_MAX ? (uint32_t)g : 0;
        return;
    }
    /* Punching past the end is a no-op where hole punching is supported. */
    off_t end = (off_t)(v->sectors * XT_SECTOR_SIZE);
    if (fallocate(v->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, end, XT_PAGE_SIZE) == 0)
        v->discard_granularity = st->st_blksize >= v->sector_size ? (uint32_t)st->st_blksize
                                                                   : v->sector_size;
}

/* Does the image take direct I/O of one logical sector at any sector
 * boundary?  (Alignment is what O_DIRECT can refuse; a guest's requests are
 * aligned to sectors, not pages, and buffers here are page-aligned.)  The
 * kernel says so where it can; otherwise a direct read of one sector at a
 * boundary that is not a page boundary is tried (a read of a hole may pass
 * where a write would not: the kernel's answer is preferred). */
static bool direct_io_works(int fd, uint32_t lss, uint64_t bytes)
{
    long align = xt_dio_offset_align(fd);
    if (align >= 0)
        return align > 0 && lss % (uint64_t)align == 0;
    void *buf;
    if (posix_memalign(&buf, XT_PAGE_SIZE, lss) != 0)
        return false;
    off_t off = bytes >= 2ull * lss ? (off_t)lss : 0;
    ssize_t n = pread(fd, buf, lss, off);
    free(buf);
    return n == (ssize_t)lss;
}

int xt_vbd_open(const struct xt_vbd_config *cfg, xt_vbd **out, char *err)
{
    if (!cfg->path || !cfg->path[0])
        return xt_fail(err, EINVAL, "no image path given");
    if (cfg->max_indirect_segments > XT_MAX_INDIRECT_SEGMENTS)
        return xt_fail(err, EINVAL, "max_indirect_segments %u is over the limit %d",
                       cfg->max_indirect_segments, XT_MAX_INDIRECT_SEGMENTS);
    const struct xt_engine_ops *engine;
    switch (cfg->engine) {
    case XT_ENGINE_AUTO:
        engine = xt_uring_available() ? &xt_engine_uring : &xt_engine_threads;
        break;
    case XT_ENGINE_URING:
        if (!xt_uring_available())
            return xt_fail(err, ENOSYS, "io_uring is not available on this kernel");
        engine = &xt_engine_uring;
        break;
    case XT_ENGINE_THREADS:
        engine = &xt_engine_threads;
        break;
    case XT_ENGINE_SYNC:
        engine = &xt_engine_sync;
        break;
    default:
        return xt_fail(err, EINVAL, "unknown I/O engine %d", cfg->engine);
    }

    if (cfg->direct != XT_DIRECT_OFF && cfg->direct != XT_DIRECT_ON && cfg->direct != XT_DIRECT_AUTO)
        return xt_fail(err, EINVAL, "unknown direct I/O mode %d", cfg->direct);
    int flags = (cfg->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    bool direct = cfg->direct != XT_DIRECT_OFF;
    int fd = open(cfg->path, flags | (direct ? O_DIRECT : 0));
    if (fd < 0 && errno == EINVAL && cfg->direct == XT_DIRECT_AUTO) {
        direct = false;     /* the filesystem has no O_DIRECT */
        fd = open(cfg->path, flags);
    }
    if (fd < 0)
        return xt_fail(err, errno, "cannot open image %s: %s", cfg->path, strerror(errno));
    int rc;
    struct stat st;
    uint64_t bytes = 0;
    if (fstat(fd, &st) < 0) {
        rc = xt_fail(err, errno, "cannot stat image %s: %s", cfg->path, strerror(errno));
        goto fail;
    }
    if (S_ISREG(st.st_mode)) {
        bytes = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &bytes) < 0) {
            rc = xt_fail(err, errno, "cannot size block device %s: %s", cfg->path, strerror(errno));
            goto fail;
        }
    } else {
        rc = xt_fail(err, EINVAL, "image %s is neither a file nor a block device", cfg->path);
        goto fail;
    }
    if (bytes == 0) {
        rc = xt_fail(err, EINVAL, "image %s is empty", cfg->path);
        goto fail;
    }
    /* One writer per image: a second VBD on it would corrupt the guest. */
    if (flock(fd, (cfg->readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0) {
        rc = errno == EWOULDBLOCK
                 ? xt_fail(err, EBUSY, "image %s is busy: another VBD has it open", cfg->path)
                 : xt_fail(err, errno, "cannot lock image %s: %s", cfg->path, strerror(errno));
        goto fail;
    }

    uint32_t lss = XT_SECTOR_SIZE, pss = 0;
    if (S_ISBLK(st.st_mode)) {
        int l = 0;
        unsigned int ph = 0;
        if (ioctl(fd, BLKSSZGET, &l) == 0 && l > 0)
            lss = (uint32_t)l;
        if (ioctl(fd, BLKPBSZGET, &ph) == 0)
            pss = ph;
    } else {
        pss = (uint32_t)st.st_blksize;
    }
    if (cfg->sector_size) {
        if (cfg->sector_size != 512 && cfg->sector_size != 4096) {
            rc = xt_fail(err, EINVAL, "sector size %u: must be 512 or 4096", cfg->sector_size);
            goto fail;
        }
        if (cfg->sector_size < lss) {
            rc = xt_fail(err, EINVAL, "sector size %u is below the device's %u", cfg->sector_size, lss);
            goto fail;
        }
        lss = cfg->sector_size;
    }
    if (cfg->physical_sector_size)
        pss = cfg->physical_sector_size;
    if (pss < lss || pss % lss || (pss & (pss - 1)) || pss > 1u << 20)
        pss = lss;
    if (bytes < lss) {
        rc = xt_fail(err, EINVAL, "image %s is smaller than one %u-byte sector", cfg->path, lss);
        goto fail;
    }
    if (direct && !direct_io_works(fd, lss, bytes)) {
        if (cfg->direct == XT_DIRECT_ON) {
            rc = xt_fail(err, EINVAL, "image %s does not take direct I/O of %u-byte sectors",
                         cfg->path, lss);
            goto fail;
        }
        direct = false;
        if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_DIRECT) < 0) {
            rc = xt_fail(err, errno, "cannot turn off O_DIRECT on %s: %s", cfg->path, strerror(errno));
            goto fail;
        }
    }

    xt_vbd *v = calloc(1, sizeof(*v));
    if (!v || !(v->path = strdup(cfg->path))) {
        free(v);
        rc = xt_fail(err, ENOMEM, "out of memory");
        goto fail;
    }
    v->fd = fd;
    v->sector_size = lss;
    v->physical_sector_size = pss;
    v->sectors = bytes / lss * (lss / XT_SECTOR_SIZE);     /* whole logical sectors */
    v->readonly = cfg->readonly != 0;
    v->direct = direct;
    v->is_blockdev = S_ISBLK(st.st_mode);
    v->max_indirect = cfg->max_indirect_segments;
    v->poll_max_ns = (uint64_t)cfg->poll_us * 1000;
    v->engine_ops = engine;
    if (!v->readonly)
        probe_discard(v, &st);
    atomic_store(&v->state, XT_STATE_OPEN);
    pthread_mutex_init(&v->lock, NULL);
    *out = v;
    return 0;
fail:
    close(fd);
    return rc;
}

uint64_t xt_vbd_sectors(const xt_vbd *v)
{
    return v->sectors;
}

void xt_vbd_info(const xt_vbd *v, struct xt_vbd_info *out)
{
    memset(out, 0, sizeof(*out));
    out->sectors = v->sectors;
    out->sector_size = v->sector_size;
    out->physical_sector_size = v->physical_sector_size;
    out->readonly = v->readonly;
    out->is_blockdev = v->is_blockdev;
    out->feature_flush = 1;
    out->feature_barrier = 1;
    out->feature_discard = v->discard_granularity != 0;
    out->discard_granularity = v->discard_granularity;
    out->discard_alignment = v->discard_alignment;
    out->discard_secure = 0;    /* BLKSECDISCARD is not offered */
    out->max_indirect_segments = v->max_indirect;
    out->max_ring_order = XT_MAX_RING_ORDER;
    out->max_queues = XT_MAX_QUEUES;
    out->direct = v->direct;
    out->feature_persistent = 1;
}

const char *xt_vbd_engine_name(const xt_vbd *v)
{
    return v->engine_ops->name;
}

static void add_counters(struct xt_counters *to, struct xt_counters *from)
{
    atomic_uint_fast64_t *a = (atomic_uint_fast64_t *)to;
    atomic_uint_fast64_t *b = (atomic_uint_fast64_t *)from;
    size_t n = sizeof(*to) / sizeof(*a);
    for (size_t i = 0; i < n; i++)
        atomic_fetch_add_explicit(&a[i], atomic_load_explicit(&b[i], memory_order_relaxed),
                                  memory_order_relaxed);
}

static void queue_teardown(xt_vbd *v, struct xt_queue *q)
{
    if (q->thread_started) {
        uint64_t one = 1;
        ssize_t w = write(q->stop_fd, &one, sizeof(one));
        (void)w;
        pthread_join(q->thread, NULL);
        q->thread_started = false;
    }
    if (q->engine.ops)
        q->engine.ops->fini(&q->engine);
    if (q->ev_bound)
        v->t->ops->unbind(v->t, &q->ev);
    if (q->ring_addr)
        v->t->ops->unmap(v->t, q->ring_addr, q->nr_ring_pages);
    for (unsigned i = 0; q->pgrants && i < q->pgrant_slots; i++)
        if (q->pgrants[i].page)
            v->t->ops->unmap(v->t, q->pgrants[i].page, 1);
    xt_pgrant_give(atomic_load(&q->c.grants_mapped));
    free(q->pgrants);
    free(q->iov_store);
    if (q->stop_fd > 0)
        close(q->stop_fd);
    for (unsigned i = 0; q->reqs && i < q->nr_reqs; i++)
        free(q->reqs[i].buf);
    free(q->reqs);
    free(q->rsp);
    free(q->seg_store);
    atomic_store(&q->c.in_flight, 0);
    atomic_store(&q->c.buffer_bytes, 0);
    atomic_store(&q->c.grants_mapped, 0);
    add_counters(&v->closed, &q->c);
}

static atomic_uint_fast64_t pgrants_mapped, pgrants_limit;

static uint64_t default_pgrants_limit(void)
{
    uint64_t max_maps = sysfs_u64("/proc/sys/vm/max_map_count");
    return (max_maps ? max_maps : 65530) / 2;
}

uint64_t xt_set_persistent_grants_limit(uint64_t n)
{
    atomic_store(&pgrants_limit, n ? n : default_pgrants_limit());
    return atomic_load(&pgrants_limit);
}

bool xt_pgrant_take(void)
{
    uint64_t limit = atomic_load(&pgrants_limit);
    if (!limit) {
        uint64_t none = 0;
        limit = default_pgrants_limit();
        if (!atomic_compare_exchange_strong(&pgrants_limit, &none, limit))
            limit = none;
    }
    if (atomic_fetch_add(&pgrants_mapped, 1) < limit)
        return true;
    atomic_fetch_sub(&pgrants_mapped, 1);
    return false;
}

void xt_pgrant_give(uint64_t n)
{
    atomic_fetch_sub(&pgrants_mapped, n);
}

int xt_queue_persistent_init(struct xt_queue *q, unsigned max_segs, char *err)
{
    q->pgrant_slots = 1;
    while (q->pgrant_slots < 2 * XT_MAX_PERSISTENT_GRANTS)
        q->pgrant_slots *= 2;
    q->pgrants = calloc(q->pgrant_slots, sizeof(*q->pgrants));
    q->iov_store = calloc((size_t)q->nr_reqs * max_segs, sizeof(struct iovec));
    if (!q->pgrants || !q->iov_store)
        return xt_fail(err, ENOMEM, "out of memory for persistent grants");
    for (unsigned i = 0; i < q->nr_reqs; i++)
        q->reqs[i].iov = &q->iov_store[(size_t)i * max_segs];
    return 0;
}

static int queue_setup(xt_vbd *v, struct xt_queue *q, const struct xt_ring_params *p, char *err)
{
    q->stop_fd = -1;
    q->nr_ring_pages = 1u << p->ring_order;
    const uint32_t *refs = &p->ring_ref[q->idx * XT_MAX_RING_PAGES];
    q->ring_addr = v->t->ops->map(v->t, p->domid, refs, q->nr_ring_pages, err);
    if (!q->ring_addr)
        return -EPERM;
    blkif_sring_t *sring = q->ring_addr;
    /* Slot size by ABI; the ring holds a power of two of them after the header. */
    q->entry_size = xt_abi_entry_size(p->protocol);
    unsigned nr_ents = xt_abi_ring_slots(p->protocol, q->nr_ring_pages);
    /* Attach where the frontend's responses end (after finishing an answer
     * a killed daemon was publishing): requests it produced before we
     * (re)connected are served, none twice. */
    RING_IDX start = xt_publish_recover(sring, p->protocol, q->entry_size, nr_ents);
    BACK_RING_ATTACH(&q->ring, sring, start, XT_PAGE_SIZE * q->nr_ring_pages);
    q->ring.nr_ents = nr_ents;
    q->rsp_notified = start;
    q->nr_reqs = RING_SIZE(&q->ring);

    int rc = v->t->ops->bind(v->t, p->domid, p->evtchn[q->idx], &q->ev, err);
    if (rc < 0)
        return rc;
    q->ev_bound = true;
    q->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->stop_fd < 0)
        return xt_fail(err, errno, "eventfd: %s", strerror(errno));

    q->reqs = calloc(q->nr_reqs, sizeof(*q->reqs));
    q->rsp = calloc(q->nr_reqs, sizeof(*q->rsp));
    unsigned max_segs = v->max_indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST
                            ? v->max_indirect : BLKIF_MAX_SEGMENTS_PER_REQUEST;
    q->seg_store = calloc((size_t)q->nr_reqs * max_segs, sizeof(struct xt_seg));
    if (!q->reqs || !q->seg_store || !q->rsp)
        return xt_fail(err, ENOMEM, "out of memory for %u request slots", q->nr_reqs);
    for (unsigned i = q->nr_reqs; i-- > 0;) {
        struct xt_req *r = &q->reqs[i];
        r->q = q;
        r->segs = &q->seg_store[(size_t)i * max_segs];
        r->next_free = q->free_list;
        q->free_list = r;
    }

    if (v->persistent && (rc = xt_queue_persistent_init(q, max_segs, err)) < 0)
        return rc;

    int wake[2] = { q->ev.fd, q->stop_fd };
    q->engine.ops = v->engine_ops;
    rc = v->engine_ops->init(&q->engine, v->fd, q->nr_reqs, wake, 2, err);
    if (rc < 0) {
        q->engine.ops = NULL;
        return rc;
    }
    if (pthread_create(&q->thread, NULL, xt_queue_main, q) != 0)
        return xt_fail(err, EAGAIN, "cannot start the queue thread");
    q->thread_started = true;
    /* "xt-d5-q0": which guest a busy thread serves, in top -H and ps -L
     * (at most 15 characters; a longer name would only be cut) */
    char name[16];
    snprintf(name, sizeof(name), "xt-d%u-q%u", p->domid, q->idx);
    pthread_setname_np(q->thread, name);
    return 0;
}

int xt_vbd_connect(xt_vbd *v, xt_transport *t, const struct xt_ring_params *p, char *err)
{
    if (p->nr_queues < 1 || p->nr_queues > XT_MAX_QUEUES)
        return xt_fail(err, EINVAL, "number of queues %u out of range 1..%d", p->nr_queues, XT_MAX_QUEUES);
    if (p->ring_order > XT_MAX_RING_ORDER)
        return xt_fail(err, EINVAL, "ring page order %u over the maximum %d", p->ring_order, XT_MAX_RING_ORDER);
    if (p->protocol != XT_PROTO_NATIVE && p->protocol != XT_PROTO_X86_32)
        return xt_fail(err, EPROTONOSUPPORT, "ring protocol %u not supported", p->protocol);

    pthread_mutex_lock(&v->lock);
    if (atomic_load(&v->state) == XT_STATE_CONNECTED) {
        pthread_mutex_unlock(&v->lock);
        return xt_fail(err, EBUSY, "VBD on %s is already connected", v->path);
    }
    v->t = t;
    v->domid = p->domid;
    v->protocol = p->protocol;
    v->persistent = p->persistent != 0;
    v->queues = calloc(p->nr_queues, sizeof(*v->queues));
    if (!v->queues) {
        pthread_mutex_unlock(&v->lock);
        return xt_fail(err, ENOMEM, "out of memory");
    }
    v->nr_queues = p->nr_queues;
    int rc = 0;
    for (unsigned i = 0; i < v->nr_queues && rc == 0; i++) {
        v->queues[i].vbd = v;
        v->queues[i].idx = i;
        rc = queue_setup(v, &v->queues[i], p, err);
    }
    if (rc < 0) {
        for (unsigned i = 0; i < v->nr_queues; i++)
            queue_teardown(v, &v->queues[i]);
        free(v->queues);
        v->queues = NULL;
        v->nr_queues = 0;
        pthread_mutex_unlock(&v->lock);
        return rc;
    }
    atomic_store(&v->state, XT_STATE_CONNECTED);
    pthread_mutex_unlock(&v->lock);
    return 0;
}

void xt_vbd_disconnect(xt_vbd *v)
{
    pthread_mutex_lock(&v->lock);
    if (v->queues) {
        for (unsigned i = 0; i < v->nr_queues; i++)
            queue_teardown(v, &v->queues[i]);
        free(v->queues);
        v->queues = NULL;
        v->nr_queues = 0;
        /* Written data is durable when the guest is told it is gone. */
        if (!v->readonly)
            fdatasync(v->fd);
    }
    atomic_store(&v->state, XT_STATE_OPEN);
    pthread_mutex_unlock(&v->lock);
}

void xt_vbd_close(xt_vbd *v)
{
    if (!v)
        return;
    xt_vbd_disconnect(v);
    close(v->fd);
    xt_mirror_destroy(v->mirror);
    pthread_mutex_destroy(&v->lock);
    free(v->path);
    free(v);
}

void xt_vbd_stats(const xt_vbd *cv, struct xt_stats *out)
{
    xt_vbd *v = (xt_vbd *)cv;
    struct xt_counters sum;
    memset(&sum, 0, sizeof(sum));
    pthread_mutex_lock(&v->lock);
    add_counters(&sum, &v->closed);
    for (unsigned i = 0; i < v->nr_queues; i++)
        add_counters(&sum, &v->queues[i].c);
    memset(out, 0, sizeof(*out));
    out->state = atomic_load(&v->state);
    out->nr_queues = v->nr_queues;
    pthread_mutex_unlock(&v->lock);
    out->sectors = v->sectors;
    out->reqs_read = sum.reqs_read;
    out->reqs_write = sum.reqs_write;
    out->reqs_flush = sum.reqs_flush;
    out->reqs_barrier = sum.reqs_barrier;
    out->reqs_discard = sum.reqs_discard;
    out->reqs_indirect = sum.reqs_indirect;
    out->bytes_read = sum.bytes_read;
    out->bytes_written = sum.bytes_written;
    out->err_bad_request = sum.err_bad_request;
    out->err_unsupported = sum.err_unsupported;
    out->err_grant = sum.err_grant;
    out->err_io = sum.err_io;
    out->in_flight = sum.in_flight;
    out->buffer_bytes = sum.buffer_bytes;
    out->ring_stopped = sum.ring_stopped;
    out->timed = sum.timed;
    out->ns_to_engine = sum.ns_to_engine;
    out->ns_at_engine = sum.ns_at_engine;
    out->ns_to_answer = sum.ns_to_answer;
    out->grants_mapped = sum.grants_mapped;
}

/* ---- the tap ---- */

int xt_vbd_mirror_enable(xt_vbd *v, uint64_t ring_bytes, uint32_t chunk_bytes, char *err)
{
    pthread_mutex_lock(&v->lock);
    int rc = 0;
    if (atomic_load(&v->state) == XT_STATE_CONNECTED)
        rc = xt_fail(err, EBUSY, "mirroring can only be turned on while the VBD is not connected");
    else if (v->mirror)
        rc = xt_fail(err, EEXIST, "mirroring is already on");
    else if (v->readonly)
        rc = xt_fail(err, EINVAL, "a read-only VBD has no writes to mirror");
    else
        rc = xt_mirror_create(&v->mirror, ring_bytes, chunk_bytes, v->sectors, err);
    pthread_mutex_unlock(&v->lock);
    return rc;
}

int xt_vbd_mirror_peek(xt_vbd *v, uint64_t skip, uint64_t max_bytes, uint32_t max_records,
                       struct xt_mirror_batch *out)
{
    if (!v->mirror)
        return -ENODEV;
    return xt_mirror_peek(v->mirror, skip, max_bytes, max_records, out);
}

void xt_vbd_mirror_release(xt_vbd *v, uint64_t nbytes)
{
    if (v->mirror)
        xt_mirror_release(v->mirror, nbytes);
}

int xt_vbd_mirror_resync_step(xt_vbd *v)
{
    if (!v->mirror)
        return -ENODEV;
    return xt_mirror_resync_step(v->mirror);
}

int xt_vbd_mirror_checkpoint(xt_vbd *v, const char *label, char *err)
{
    if (!v->mirror)
        return xt_fail(err, ENODEV, "mirroring is off");
    size_t len = strlen(label);
    if (len > 255)
        return xt_fail(err, EINVAL, "checkpoint label longer than 255 bytes");
    xt_mirror_marker(v->mirror, XT_MREC_CHECKPOINT, 0, label, (uint32_t)len);
    return 0;
}

int xt_vbd_mirror_stats(xt_vbd *v, struct xt_mirror_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (!v->mirror)
        return -ENODEV;
    xt_mirror_get_stats(v->mirror, out);
    return 0;
}

int xt_vbd_mirror_wake_fd(xt_vbd *v)
{
    return v->mirror ? xt_mirror_wake_fd(v->mirror) : -ENODEV;
}

int xt_vbd_mirror_arm_wake(xt_vbd *v, uint64_t sent)
{
    return v->mirror ? (int)xt_mirror_arm_wake(v->mirror, sent) : -ENODEV;
}
