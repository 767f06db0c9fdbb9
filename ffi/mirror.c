/*
 * mirror.c — the tap: every completed write becomes a record in the VBD's
 * mirror ring; flushes and barriers become markers (crash-consistent points).
 *
 * The ring never makes the guest wait.  Producers are the VBD's queue
 * threads (serialized by a mutex held only for a memcpy); the consumer is
 * the drainer.  When a record does not fit, its range goes into a dirty
 * bitmap instead and an overflow is counted; the next record to fit is
 * preceded by a GAP marker, and the drainer asks for RESYNC markers (one per
 * dirty chunk, re-read from disk when the drainer reaches them) until the
 * bitmap is clean, then a RESYNC_END.  Every record and marker takes the next
 * sequence number, so the ring is the one sequencer of the VBD's stream.
 *
 * Records are laid out exactly as records of the wire protocol's WRITES
 * batch (xentap/wire.py; a test checks both agree): a 32-byte header, then
 * the data.  The data area is mapped twice back to back, so that every run
 * of records is contiguous in memory and can be sent as it lies.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "xt_internal.h"

#define REC_HDR sizeof(struct xt_mirror_rec)

struct xt_mirror {
    uint8_t *data;              /* ring_bytes, mapped twice */
    uint64_t size;
    uint32_t chunk_bytes;
    int fd;
    int wake_fd;                /* eventfd: the drainer has something to do */
    atomic_bool want_wake;      /* the drainer sent everything and sleeps (arm_wake) */
    pthread_mutex_t lock;       /* producers, and the consumer's marker requests */
    atomic_uint_fast64_t head;  /* bytes ever written (producer) */
    atomic_uint_fast64_t tail;  /* bytes ever released (consumer) */
    uint64_t next_seq;          /* under lock */
    bool gap_pending;           /* under lock: records were lost, GAP not yet in the ring */
    bool resyncing;             /* under lock: RESYNC markers being handed out */
    uint64_t resync_regions;
    uint64_t scan_chunk;        /* where the resync scan goes on */
    uint64_t *dirty;            /* bitmap of chunks, under lock */
    uint64_t nr_chunks;
    uint64_t disk_sectors;
    struct xt_mirror_stats st;  /* under lock */
};

static uint64_t now_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t round8(uint64_t n)
{
    return (n + 7) & ~7ull;
}

/* Bytes a record occupies in the ring. */
static uint64_t rec_size(const struct xt_mirror_rec *r)
{
    if (r->flags & XT_MREC_MARKER_MASK)
        return REC_HDR + round8(r->length);
    if (r->flags & (XT_MREC_DISCARD | XT_MREC_ZEROES))
        return REC_HDR;
    return REC_HDR + r->length;
}

int xt_mirror_create(struct xt_mirror **out, uint64_t ring_bytes, uint32_t chunk_bytes,
                     uint64_t disk_sectors, char *err)
{
    if (ring_bytes < (1u << 20) || (ring_bytes & (ring_bytes - 1)) || ring_bytes > (1ull << 34))
        return xt_fail(err, EINVAL, "mirror ring size must be a power of two from 1 MiB to 16 GiB");
    if (chunk_bytes < XT_PAGE_SIZE || (chunk_bytes & (chunk_bytes - 1)))
        return xt_fail(err, EINVAL, "dirty chunk size must be a power of two of at least 4 KiB");
    struct xt_mirror *m = calloc(1, sizeof(*m));
    if (!m)
        return xt_fail(err, ENOMEM, "out of memory");
    m->size = ring_bytes;
    m->chunk_bytes = chunk_bytes;
    m->disk_sectors = disk_sectors;
    m->next_seq = 1;
    m->fd = -1;
    m->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&m->lock, NULL);
    uint64_t disk_bytes = disk_sectors * XT_SECTOR_SIZE;
    m->nr_chunks = (disk_bytes + chunk_bytes - 1) / chunk_bytes;
    m->dirty = calloc((m->nr_chunks + 63) / 64, sizeof(uint64_t));
    int rc;
    if (!m->dirty) {
        rc = xt_fail(err, ENOMEM, "out of memory for the dirty bitmap");
        goto fail;
    }
    if (m->wake_fd < 0) {
        rc = xt_fail(err, errno, "mirror ring: eventfd: %s", strerror(errno));
        goto fail;
    }
    m->fd = memfd_create("xentap-mirror", MFD_CLOEXEC);
    if (m->fd < 0 || ftruncate(m->fd, (off_t)ring_bytes) < 0) {
        rc = xt_fail(err, errno, "mirror ring: memfd: %s", strerror(errno));
        goto fail;
    }
    uint8_t *base = mmap(NULL, 2 * ring_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        rc = xt_fail(err, errno, "mirror ring: mmap: %s", strerror(errno));
        goto fail;
    }
    if (mmap(base, ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, m->fd, 0) == MAP_FAILED ||
        mmap(base + ring_bytes, ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, m->fd, 0) == MAP_FAILED) {
        rc = xt_fail(err, errno, "mirror ring: mmap: %s", strerror(errno));
        munmap(base, 2 * ring_bytes);
        goto fail;
    }
    m->data = base;
    m->st.ring_bytes = ring_bytes;
    m->st.chunk_bytes = chunk_bytes;
    *out = m;
    return 0;
fail:
    xt_mirror_destroy(m);
    return rc;
}

void xt_mirror_destroy(struct xt_mirror *m)
{
    if (!m)
        return;
    if (m->data)
        munmap(m->data, 2 * m->size);
    if (m->fd >= 0)
        close(m->fd);
    if (m->wake_fd >= 0)
        close(m->wake_fd);
    free(m->dirty);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

/* ---- producing (under m->lock) ---- */

static uint64_t space(struct xt_mirror *m)
{
    uint64_t head = atomic_load_explicit(&m->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&m->tail, memory_order_acquire);
    return m->size - (head - tail);
}

/* Writes one record (header + payload) at the head and publishes it. */
static void put(struct xt_mirror *m, uint32_t flags, uint64_t sector, uint32_t length,
                const void *payload, uint64_t payload_len)
{
    uint64_t head = atomic_load_explicit(&m->head, memory_order_relaxed);
    uint8_t *p = m->data + (head & (m->size - 1));
    struct xt_mirror_rec r = {
        .seq = m->next_seq++,
        .timestamp_ns = now_realtime_ns(),
        .sector = sector,
        .length = length,
        .flags = flags,
    };
    memcpy(p, &r, REC_HDR);
    if (payload_len)
        memcpy(p + REC_HDR, payload, payload_len);
    uint64_t sz = rec_size(&r);
    if (sz > REC_HDR + payload_len)
        memset(p + REC_HDR + payload_len, 0, sz - REC_HDR - payload_len);
    atomic_store_explicit(&m->head, head + sz, memory_order_release);
    /* Wake the drainer when it asked to be (it sent everything it had, see
     * xt_mirror_arm_wake), when the ring stops being empty, and when it
     * passes a quarter full: one syscall per wakeup, not per record.  The
     * fence orders the head's store before want_wake's load, as the arming
     * side orders want_wake's store before the head's load: one of the two
     * sides always sees the other. */
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t used = head + sz - atomic_load_explicit(&m->tail, memory_order_acquire);
    bool wake = used == sz || (used >= m->size / 4 && used - sz < m->size / 4);
    if (atomic_load_explicit(&m->want_wake, memory_order_relaxed) &&
        atomic_exchange_explicit(&m->want_wake, false, memory_order_relaxed))
        wake = true;
    if (wake) {
        uint64_t one = 1;
        ssize_t w = write(m->wake_fd, &one, sizeof(one));
        (void)w;
    }
    if (flags & XT_MREC_MARKER_MASK)
        m->st.markers++;
    else
        m->st.records++;
}

static void mark_dirty(struct xt_mirror *m, uint64_t sector, uint64_t bytes)
{
    if (bytes == 0)
        return;
    uint64_t first = sector * XT_SECTOR_SIZE / m->chunk_bytes;
    uint64_t last = (sector * XT_SECTOR_SIZE + bytes - 1) / m->chunk_bytes;
    for (uint64_t c = first; c <= last && c < m->nr_chunks; c++) {
        uint64_t bit = 1ull << (c % 64);
        if (!(m->dirty[c / 64] & bit)) {
            m->dirty[c / 64] |= bit;
            m->st.dirty_chunks++;
        }
    }
}

/* Room for a record of `sz` bytes, after the GAP marker a loss still owes. */
static bool make_room(struct xt_mirror *m, uint64_t sz)
{
    uint64_t gap = REC_HDR + round8(2 * sizeof(uint64_t));
    if (m->gap_pending) {
        if (space(m) < gap + sz)
            return false;
        uint64_t payload[2] = { m->st.dirty_chunks, XT_GAP_RING_OVERFLOW };
        put(m, XT_MREC_GAP, 0, sizeof(payload), payload, sizeof(payload));
        m->gap_pending = false;
        m->st.gaps++;
        return true;
    }
    return space(m) >= sz;
}

void xt_mirror_write(struct xt_mirror *m, uint64_t sector, const void *data, uint32_t len,
                     uint32_t flags)
{
    bool nodata = flags & (XT_MREC_DISCARD | XT_MREC_ZEROES);
    uint64_t sz = REC_HDR + (nodata ? 0 : len);
    pthread_mutex_lock(&m->lock);
    if (sz <= m->size / 2 && make_room(m, sz)) {
        put(m, flags, sector, len, nodata ? NULL : data, nodata ? 0 : len);
        m->st.bytes += len;
    } else {
        /* Never wait: remember the range, resync it later. */
        mark_dirty(m, sector, len);
        m->gap_pending = true;
        m->st.overflows++;
        m->st.overflow_bytes += len;
    }
    pthread_mutex_unlock(&m->lock);
}

void xt_mirror_marker(struct xt_mirror *m, uint32_t kind, uint64_t sector, const void *payload,
                      uint32_t len)
{
    uint64_t sz = REC_HDR + round8(len);
    pthread_mutex_lock(&m->lock);
    if (make_room(m, sz))
        put(m, kind, sector, len, payload, len);
    else
        m->st.markers_dropped++;    /* a consistent point inside a gap means nothing */
    pthread_mutex_unlock(&m->lock);
}

/* ---- consuming ---- */

int xt_mirror_peek(struct xt_mirror *m, uint64_t skip, uint64_t max_bytes, uint32_t max_records,
                   struct xt_mirror_batch *out)
{
    memset(out, 0, sizeof(*out));
    uint64_t head = atomic_load_explicit(&m->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&m->tail, memory_order_relaxed);
    if (skip >= head - tail)
        return 0;
    tail += skip;   /* records start at every position the consumer was given */
    const uint8_t *start = m->data + (tail & (m->size - 1));
    struct xt_mirror_rec r;
    memcpy(&r, start, REC_HDR);
    out->data = start;
    out->first_seq = r.seq;
    if (r.flags & XT_MREC_MARKER_MASK) {
        out->kind = r.flags >> XT_MREC_KIND_SHIFT;
        out->count = 1;
        out->nbytes = rec_size(&r);
        out->sector = r.sector;
        out->timestamp_ns = r.timestamp_ns;
        out->length = r.length;
        return 1;
    }
    out->kind = XT_MK_WRITES;
    uint64_t pos = tail;
    while (pos != head && out->count < max_records) {
        memcpy(&r, m->data + (pos & (m->size - 1)), REC_HDR);
        if (r.flags & XT_MREC_MARKER_MASK)
            break;
        uint64_t sz = rec_size(&r);
        if (out->count && out->nbytes + sz > max_bytes)
            break;
        out->nbytes += sz;
        out->data_bytes += (r.flags & (XT_MREC_DISCARD | XT_MREC_ZEROES)) ? 0 : r.length;
        out->count++;
        pos += sz;
    }
    return 1;
}

void xt_mirror_release(struct xt_mirror *m, uint64_t nbytes)
{
    uint64_t tail = atomic_load_explicit(&m->tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&m->head, memory_order_acquire);
    if (nbytes > head - tail)
        nbytes = head - tail;
    atomic_store_explicit(&m->tail, tail + nbytes, memory_order_release);
}

int xt_mirror_resync_step(struct xt_mirror *m)
{
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    if (m->gap_pending && !make_room(m, 0)) {
        rc = -ENOSPC;
        goto out;
    }
    uint64_t marker = REC_HDR + round8(sizeof(uint64_t));
    for (uint64_t n = 0; n < m->nr_chunks; n++) {
        uint64_t c = (m->scan_chunk + n) % m->nr_chunks;
        uint64_t bit = 1ull << (c % 64);
        if (!(m->dirty[c / 64] & bit))
            continue;
        if (space(m) < marker) {
            rc = -ENOSPC;
            goto out;
        }
        /* Clear first: a write that overflows from now on dirties it again. */
        m->dirty[c / 64] &= ~bit;
        m->st.dirty_chunks--;
        uint64_t off = c * m->chunk_bytes;
        uint64_t disk = m->disk_sectors * XT_SECTOR_SIZE;
        uint64_t len = off + m->chunk_bytes > disk ? disk - off : m->chunk_bytes;
        put(m, XT_MREC_RESYNC, off / XT_SECTOR_SIZE, sizeof(len), &len, sizeof(len));
        m->resyncing = true;
        m->resync_regions++;
        m->scan_chunk = c + 1;
        rc = 1;
        goto out;
    }
    if (m->resyncing) {
        if (space(m) < marker) {
            rc = -ENOSPC;
            goto out;
        }
        uint64_t regions = m->resync_regions;
        put(m, XT_MREC_RESYNC_END, 0, sizeof(regions), &regions, sizeof(regions));
        m->resyncing = false;
        m->resync_regions = 0;
        m->st.resyncs++;
        rc = 1;
    }
out:
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int xt_mirror_wake_fd(struct xt_mirror *m)
{
    return m->wake_fd;
}

bool xt_mirror_arm_wake(struct xt_mirror *m, uint64_t sent)
{
    atomic_store_explicit(&m->want_wake, true, memory_order_seq_cst);
    uint64_t head = atomic_load_explicit(&m->head, memory_order_seq_cst);
    uint64_t tail = atomic_load_explicit(&m->tail, memory_order_acquire);
    if (head - tail <= sent)
        return false;
    /* Not armed: a consumer with records it cannot send yet (no credit)
     * would otherwise be woken by every new one. */
    atomic_store_explicit(&m->want_wake, false, memory_order_relaxed);
    return true;
}

void xt_mirror_get_stats(struct xt_mirror *m, struct xt_mirror_stats *out)
{
    pthread_mutex_lock(&m->lock);
    *out = m->st;
    out->next_seq = m->next_seq;
    out->gap_pending = m->gap_pending;
    out->resyncing = m->resyncing;
    pthread_mutex_unlock(&m->lock);
    uint64_t head = atomic_load_explicit(&m->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&m->tail, memory_order_acquire);
    out->used_bytes = head - tail;
}
