/*
 * blkback.c — the dataplane: one thread per ring serves blkif requests.
 *
 * A request's life, one function each, top to bottom:
 *   take (a preallocated slot) → fetch (copy it out of the shared ring once)
 *   → parse (every check on what the guest wrote, in one place)
 *   → copy in (grant copy, writes) → submit (I/O engine)
 *   → complete → copy out (grant copy, reads) → respond → back to the free list.
 * The dataplane knows nothing of xenstore or of which transport it runs on.
 */
#include <errno.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "xt_internal.h"

#define WAKE_EVTCHN 0x1u
#define WAKE_STOP 0x2u
#define MAX_LOGGED_ERRORS 20
#define REAP_BATCH 64

static inline void count(atomic_uint_fast64_t *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

/* A guest's mistake: logged (up to a limit per ring) and counted. */
static int16_t reject(struct xt_queue *q, int16_t status, const char *why,
                      uint64_t id)
{
    if (status == BLKIF_RSP_EOPNOTSUPP)
        count(&q->c.err_unsupported, 1);
    else
        count(&q->c.err_bad_request, 1);
    if (q->errors_logged < MAX_LOGGED_ERRORS) {
        q->errors_logged++;
        xt_log("domain %u queue %u: request id %llu refused: %s%s", q->vbd->domid,
               q->idx, (unsigned long long)id, why,
               q->errors_logged == MAX_LOGGED_ERRORS ? " (further errors on this ring not logged)" : "");
    }
    return status;
}

/* ---- take / respond ---- */

static struct xt_req *take(struct xt_queue *q)
{
    struct xt_req *req = q->free_list;
    if (req) {
        q->free_list = req->next_free;
        count(&q->c.in_flight, 1);
    }
    return req;
}

/*
 * Answers are published in the order requests were taken, so that the
 * response producer index always marks where the unanswered requests
 * begin: a restarted daemon attaches there and serves exactly those again.
 * Each answer is published as soon as it is written into its slot (over its
 * request), with the publish log in the ring page's padding naming it first,
 * so a daemon killed at any instant leaves a ring the next one can finish
 * (see struct xt_publish_log).  The guest is kicked once per step
 * (push_responses).
 *
 * The response carries the effective operation: for an indirect request
 * whose indirect_op was accepted, that is the indirect_op (READ/WRITE), as
 * Linux blkback answers; Linux blkfront disables the disk on any other
 * ("response has wrong operation (6 instead of 0)", seen on real Xen).
 */
static struct xt_publish_log *publish_log(blkif_sring_t *sring)
{
    return (struct xt_publish_log *)(void *)sring->__pad;
}

static void publish(blkif_sring_t *sring, uint32_t protocol, unsigned entry_size,
                    unsigned nr_ents, RING_IDX idx, uint64_t id, uint8_t op, int16_t status)
{
    volatile struct xt_publish_log *log = publish_log(sring);
    log->id_lo = (uint32_t)id;
    log->id_hi = (uint32_t)(id >> 32);
    log->operation = op;
    log->status = status;
    log->idx = idx;
    atomic_signal_fence(memory_order_seq_cst);
    log->check = XT_PUBLISH_MAGIC ^ idx;
    atomic_signal_fence(memory_order_seq_cst);
    uint8_t *slot = (uint8_t *)sring->ring + (size_t)(idx & (nr_ents - 1)) * entry_size;
    xt_abi_put_response(protocol, slot, id, op, status);
    xen_wmb();      /* the guest sees the answer before the index covering it */
    sring->rsp_prod = idx + 1;
}

RING_IDX xt_publish_recover(blkif_sring_t *sring, uint32_t protocol, unsigned entry_size,
                            unsigned nr_ents)
{
    RING_IDX start = sring->rsp_prod;
    struct xt_publish_log log;
    memcpy(&log, (const void *)publish_log(sring), sizeof(log));
    /* Only the slot right at rsp_prod, and only one the guest had produced:
     * anything else in the padding (a guest may scribble there) is ignored. */
    if (log.idx != start || log.check != (XT_PUBLISH_MAGIC ^ log.idx) ||
        (RING_IDX)(sring->req_prod - start) == 0 || (RING_IDX)(sring->req_prod - start) > nr_ents)
        return start;
    uint64_t id = (uint64_t)log.id_hi << 32 | log.id_lo;
    publish(sring, protocol, entry_size, nr_ents, start, id, log.operation, log.status);
    xt_log("finished publishing the answer to request id %llu that a previous daemon had written",
           (unsigned long long)id);
    return start + 1;
}

static void respond(struct xt_queue *q, struct xt_req *req, int16_t status)
{
    RING_IDX mask = RING_SIZE(&q->ring) - 1;
    bool timed = req->t_engine && status == BLKIF_RSP_OKAY;
    q->rsp[req->ring_idx & mask] = (struct xt_rsp){
        .id = req->id, .status = status, .operation = req->io_op, .ready = true,
        .t_taken = req->t_taken, .t_engine = req->t_engine, .t_done = timed ? q->t_seen : 0,
    };
    req->next_free = q->free_list;
    q->free_list = req;
    atomic_fetch_sub_explicit(&q->c.in_flight, 1, memory_order_relaxed);
    uint64_t now = 0;
    while (q->ring.rsp_prod_pvt != q->ring.req_cons && q->rsp[q->ring.rsp_prod_pvt & mask].ready) {
        struct xt_rsp *r = &q->rsp[q->ring.rsp_prod_pvt & mask];
        publish(q->ring.sring, q->vbd->protocol, q->entry_size, RING_SIZE(&q->ring),
                q->ring.rsp_prod_pvt, r->id, r->operation, r->status);
        r->ready = false;
        q->ring.rsp_prod_pvt++;
        if (r->t_done) {
            if (!now)
                now = xt_now_ns();
            count(&q->c.timed, 1);
            count(&q->c.ns_to_engine, r->t_engine - r->t_taken);
            count(&q->c.ns_at_engine, r->t_done - r->t_engine);
            count(&q->c.ns_to_answer, now - r->t_done);
        }
    }
}

/* Kicks the guest if it asked to hear about the answers published since
 * the last call (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY's test; rsp_prod
 * itself has already moved, answer by answer). */
static void push_responses(struct xt_queue *q)
{
    RING_IDX old = q->rsp_notified, new = q->ring.rsp_prod_pvt;
    if (old == new)
        return;
    q->rsp_notified = new;
    xen_mb();       /* rsp_prod is visible before we look at rsp_event */
    if ((RING_IDX)(new - q->ring.sring->rsp_event) < (RING_IDX)(new - old))
        q->vbd->t->ops->notify(q->vbd->t, &q->ev);
}

/* ---- parse ---- */

/* A range of 512-byte sectors must lie on the disk and, with 4 KiB logical
 * sectors, on whole logical sectors. */
static int16_t check_range(struct xt_queue *q, struct xt_req *req, uint64_t sector, uint64_t nsect)
{
    const xt_vbd *v = q->vbd;
    if (sector > v->sectors || nsect > v->sectors - sector)
        return reject(q, BLKIF_RSP_ERROR, "access beyond the end of the disk", req->id);
    uint32_t per = v->sector_size / XT_SECTOR_SIZE;
    if (sector % per || nsect % per)
        return reject(q, BLKIF_RSP_ERROR, "not aligned to the logical sector size", req->id);
    return BLKIF_RSP_OKAY;
}

static int16_t parse_segments(struct xt_queue *q, struct xt_req *req,
                              const struct blkif_request_segment *segs, unsigned n)
{
    uint64_t nsect = 0;
    for (unsigned i = 0; i < n; i++) {
        struct blkif_request_segment s = segs[i];
        if (s.first_sect > s.last_sect)
            return reject(q, BLKIF_RSP_ERROR, "first_sect > last_sect", req->id);
        if (s.last_sect >= XT_SECTORS_PER_PAGE)
            return reject(q, BLKIF_RSP_ERROR, "last_sect past the end of the page", req->id);
        req->segs[i].gref = s.gref;
        req->segs[i].first_sect = s.first_sect;
        req->segs[i].last_sect = s.last_sect;
        nsect += (uint64_t)(s.last_sect - s.first_sect + 1);
    }
    int16_t st = check_range(q, req, req->sector, nsect);
    if (st != BLKIF_RSP_OKAY)
        return st;
    req->nr_segs = (uint16_t)n;
    req->len = nsect * XT_SECTOR_SIZE;
    return BLKIF_RSP_OKAY;
}

/* Fetches the segment list of an indirect request from its indirect pages. */
static int16_t fetch_indirect(struct xt_queue *q, struct xt_req *req, const struct xt_ring_req *r)
{
    unsigned n = r->nr_segments;
    if (n == 0 || n > q->vbd->max_indirect)
        return reject(q, BLKIF_RSP_ERROR, "indirect segment count out of range", req->id);
    unsigned pages = (unsigned)((n + XT_SEGS_PER_INDIRECT_PAGE - 1) / XT_SEGS_PER_INDIRECT_PAGE);
    for (unsigned p = 0; p < pages; p++) {
        unsigned first = p * (unsigned)XT_SEGS_PER_INDIRECT_PAGE;
        unsigned cnt = n - first < XT_SEGS_PER_INDIRECT_PAGE ? n - first
                                                             : (unsigned)XT_SEGS_PER_INDIRECT_PAGE;
        q->copies[p] = (struct xt_copy){
            .gref = r->indirect_grefs[p],
            .offset = 0,
            .len = (uint16_t)(cnt * sizeof(struct blkif_request_segment)),
            .local = &q->ind_segs[first],
        };
    }
    if (q->vbd->t->ops->copy(q->vbd->t, q->vbd->domid, XT_COPY_FROM_GUEST, q->copies, pages) < 0) {
        count(&q->c.err_grant, 1);
        return reject(q, BLKIF_RSP_ERROR, "indirect page grant copy failed", req->id);
    }
    count(&q->c.reqs_indirect, 1);
    return parse_segments(q, req, q->ind_segs, n);
}

static int16_t parse(struct xt_queue *q, struct xt_req *req, const struct xt_ring_req *r)
{
    const xt_vbd *v = q->vbd;
    req->id = r->id;
    req->operation = r->operation;
    req->io_op = r->operation;
    req->sector = r->sector;
    req->nr_segs = 0;
    req->len = 0;
    req->stage = 0;
    switch (r->operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_FLUSH_DISKCACHE:
    case BLKIF_OP_WRITE_BARRIER:
        if (r->nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST)
            return reject(q, BLKIF_RSP_ERROR, "too many segments", req->id);
        if (r->nr_segments == 0 && (r->operation == BLKIF_OP_READ || r->operation == BLKIF_OP_WRITE))
            return reject(q, BLKIF_RSP_ERROR, "no segments", req->id);
        if (r->operation != BLKIF_OP_READ && v->readonly && r->nr_segments)
            return reject(q, BLKIF_RSP_ERROR, "write to a read-only disk", req->id);
        if (r->nr_segments == 0)
            return BLKIF_RSP_OKAY;      /* a flush or barrier alone: its sector is unused */
        return parse_segments(q, req, r->seg, r->nr_segments);
    case BLKIF_OP_INDIRECT:
        if (v->max_indirect == 0)
            return reject(q, BLKIF_RSP_EOPNOTSUPP, "indirect requests not negotiated", req->id);
        if (r->indirect_op != BLKIF_OP_READ && r->indirect_op != BLKIF_OP_WRITE)
            return reject(q, BLKIF_RSP_ERROR, "indirect operation not read or write", req->id);
        req->io_op = r->indirect_op;
        if (req->io_op == BLKIF_OP_WRITE && v->readonly)
            return reject(q, BLKIF_RSP_ERROR, "write to a read-only disk", req->id);
        return fetch_indirect(q, req, r);
    case BLKIF_OP_DISCARD:
        if (v->discard_granularity == 0)
            return reject(q, BLKIF_RSP_EOPNOTSUPP, "discard not supported on this disk", req->id);
        if (v->readonly)
            return reject(q, BLKIF_RSP_ERROR, "discard on a read-only disk", req->id);
        req->len = 0;
        {
            int16_t st = check_range(q, req, r->sector, r->nr_sectors);
            if (st != BLKIF_RSP_OKAY)
                return st;
        }
        req->discard_sectors = r->nr_sectors;
        return BLKIF_RSP_OKAY;
    default:
        return reject(q, BLKIF_RSP_EOPNOTSUPP, "unknown operation", req->id);
    }
}

/* ---- data movement ---- */

static int ensure_buffer(struct xt_queue *q, struct xt_req *req)
{
    if (req->buf_cap >= req->len)
        return 0;
    size_t cap = XT_PAGE_SIZE;
    while (cap < req->len)
        cap *= 2;
    void *buf;
    if (posix_memalign(&buf, XT_PAGE_SIZE, cap) != 0)
        return -ENOMEM;
    free(req->buf);
    count(&q->c.buffer_bytes, cap - req->buf_cap);
    req->buf = buf;
    req->buf_cap = cap;
    return 0;
}

/* Grant copy between the request's guest pages and its bounce buffer. */
static int copy_data(struct xt_queue *q, struct xt_req *req, enum xt_copy_dir dir)
{
    size_t pos = 0;
    for (unsigned i = 0; i < req->nr_segs; i++) {
        struct xt_seg *s = &req->segs[i];
        uint16_t len = (uint16_t)((s->last_sect - s->first_sect + 1) * XT_SECTOR_SIZE);
        q->copies[i] = (struct xt_copy){
            .gref = s->gref,
            .offset = (uint16_t)(s->first_sect * XT_SECTOR_SIZE),
            .len = len,
            .local = req->buf + pos,
        };
        pos += len;
    }
    if (q->vbd->t->ops->copy(q->vbd->t, q->vbd->domid, dir, q->copies, req->nr_segs) < 0) {
        count(&q->c.err_grant, 1);
        reject(q, BLKIF_RSP_ERROR, "grant copy failed (bad or foreign grant ref)", req->id);
        return -1;
    }
    return 0;
}

/*
 * Persistent grants.  A frontend with feature-persistent grants its data
 * pages once and keeps them granted until it disconnects, so a page mapped
 * once serves every later request that names its grant ref.  Reads then go
 * from the disk straight into the guest's pages, with no bounce buffer and
 * no copy (measured, 4 KiB random read QD32, one VBD reconnected with and
 * without them between runs: +10 % shim/fio, 8 rounds of 1.05-1.19; the
 * copy out of a bounce buffer the disk had just filled was 12 µs of every
 * 32 reads' round).  Writes still go through the bounce buffer: the
 * bytes written and the bytes mirrored must be the same bytes, whatever the
 * guest does to its pages meanwhile, and copying them in cost nothing
 * measurable.  At most XT_MAX_PERSISTENT_GRANTS pages per queue are kept,
 * and xt_set_persistent_grants_limit's in the whole process; a read naming
 * others is served by copy.
 */
static uint8_t *persistent_page(struct xt_queue *q, uint32_t gref)
{
    unsigned mask = q->pgrant_slots - 1;
    for (unsigned i = (gref * 2654435761u) & mask;; i = (i + 1) & mask) {
        struct xt_pgrant *g = &q->pgrants[i];
        if (g->page && g->gref == gref)
            return g->page;
        if (g->page)
            continue;
        if (atomic_load_explicit(&q->c.grants_mapped, memory_order_relaxed) ==
                XT_MAX_PERSISTENT_GRANTS || !xt_pgrant_take())
            return NULL;
        char err[XT_ERRLEN];
        uint8_t *page = q->vbd->t->ops->map(q->vbd->t, q->vbd->domid, &gref, 1, err);
        if (!page) {
            xt_pgrant_give(1);
            return NULL;    /* a bad grant: the copy path answers with the error */
        }
        *g = (struct xt_pgrant){ .gref = gref, .page = page };
        count(&q->c.grants_mapped, 1);
        return page;
    }
}

/* Points a read at the guest's own pages; false: it needs the bounce buffer. */
static bool read_direct(struct xt_queue *q, struct xt_req *req)
{
    if (!q->pgrants)
        return false;
    /* O_DIRECT wants whole logical blocks, in memory as on disk */
    uint32_t align = q->vbd->direct ? q->vbd->sector_size : XT_SECTOR_SIZE;
    for (unsigned i = 0; i < req->nr_segs; i++) {
        const struct xt_seg *s = &req->segs[i];
        size_t off = (size_t)s->first_sect * XT_SECTOR_SIZE;
        size_t len = (size_t)(s->last_sect - s->first_sect + 1) * XT_SECTOR_SIZE;
        if (off % align || len % align)
            return false;
        uint8_t *page = persistent_page(q, s->gref);
        if (!page)
            return false;
        req->iov[i] = (struct iovec){ .iov_base = page + off, .iov_len = len };
    }
    return true;
}

/* The kernel refused I/O on mapped grant pages (EFAULT): no more direct
 * reads on this queue.  The pages stay mapped until the guest disconnects. */
static void stop_direct_reads(struct xt_queue *q)
{
    if (q->direct_reads_failed)
        return;     /* said once */
    xt_log("domain %u queue %u: the kernel cannot read into mapped grant pages here; "
           "reads are copied from now on", q->vbd->domid, q->idx);
    q->direct_reads_failed = true;
}

static void submit(struct xt_queue *q, struct xt_req *req, enum xt_io_op op)
{
    req->io.op = op;
    req->io.offset = req->sector * XT_SECTOR_SIZE;
    req->io.buf = req->buf;
    req->io.iov = NULL;
    req->io.iovcnt = 0;
    req->io.len = op == XT_IO_FSYNC ? 0 : op == XT_IO_PUNCH ? req->discard_sectors * XT_SECTOR_SIZE
                                                             : req->len;
    q->engine.ops->submit(&q->engine, &req->io);
    if (req->io_op == BLKIF_OP_READ || req->io_op == BLKIF_OP_WRITE)
        req->t_engine = xt_now_ns();
}

/* A read into the guest's pages: submit()'s, with the segments as the buffer. */
static void submit_direct_read(struct xt_queue *q, struct xt_req *req)
{
    req->io.op = XT_IO_READ;
    req->io.offset = req->sector * XT_SECTOR_SIZE;
    req->io.buf = NULL;
    req->io.iov = req->iov;
    req->io.iovcnt = req->nr_segs;
    req->io.len = req->len;
    q->engine.ops->submit(&q->engine, &req->io);
    req->t_engine = xt_now_ns();
}

/* Writes (and the data of a flush or barrier) are copied in and submitted. */
static void start_write(struct xt_queue *q, struct xt_req *req)
{
    if (copy_data(q, req, XT_COPY_FROM_GUEST) < 0) {
        respond(q, req, BLKIF_RSP_ERROR);
        if (req->io_op == BLKIF_OP_WRITE_BARRIER)
            q->barrier_running = false;
        return;
    }
    q->writes_in_flight++;
    submit(q, req, XT_IO_WRITE);
}

/* A flush or barrier runs once every write taken before it has completed:
 * its data first (stage 0), then fdatasync (stage 1).  A barrier also holds
 * back every later request until it completes. */
static void start_ordered(struct xt_queue *q, struct xt_req *req)
{
    if (req->io_op == BLKIF_OP_WRITE_BARRIER)
        q->barrier_running = true;
    if (req->nr_segs) {
        start_write(q, req);
        return;
    }
    req->stage = 1;
    submit(q, req, XT_IO_FSYNC);
}

static void count_done(struct xt_queue *q, struct xt_req *req)
{
    switch (req->io_op) {
    case BLKIF_OP_READ:
        count(&q->c.reqs_read, 1);
        count(&q->c.bytes_read, req->len);
        break;
    case BLKIF_OP_WRITE:
        count(&q->c.reqs_write, 1);
        count(&q->c.bytes_written, req->len);
        break;
    case BLKIF_OP_FLUSH_DISKCACHE:
        count(&q->c.reqs_flush, 1);
        break;
    case BLKIF_OP_WRITE_BARRIER:
        count(&q->c.reqs_barrier, 1);
        break;
    case BLKIF_OP_DISCARD:
        count(&q->c.reqs_discard, 1);
        break;
    }
}

static void tap(struct xt_queue *q, struct xt_req *req, uint32_t flags);

/* Discard: a hole punched in a file, BLKDISCARD on a block device. */
static void start_discard(struct xt_queue *q, struct xt_req *req)
{
    if (req->discard_sectors == 0) {
        count_done(q, req);
        respond(q, req, BLKIF_RSP_OKAY);
        return;
    }
    if (!q->vbd->is_blockdev) {
        submit(q, req, XT_IO_PUNCH);
        return;
    }
    /* No io_uring opcode for a block discard on the kernels we target. */
    uint64_t range[2] = { req->sector * XT_SECTOR_SIZE, req->discard_sectors * XT_SECTOR_SIZE };
    if (ioctl(q->vbd->fd, BLKDISCARD, range) < 0) {
        count(&q->c.err_io, 1);
        xt_log("domain %u queue %u: discard at sector %llu: %s", q->vbd->domid, q->idx,
               (unsigned long long)req->sector, strerror(errno));
        respond(q, req, BLKIF_RSP_ERROR);
        return;
    }
    tap(q, req, 0);
    count_done(q, req);
    respond(q, req, BLKIF_RSP_OKAY);
}

static void start(struct xt_queue *q, struct xt_req *req, const struct xt_ring_req *r)
{
    int16_t st = parse(q, req, r);
    if (st != BLKIF_RSP_OKAY) {
        respond(q, req, st);
        return;
    }
    if (req->io_op == BLKIF_OP_READ && !q->direct_reads_failed && read_direct(q, req)) {
        submit_direct_read(q, req);
        return;
    }
    if (req->len && ensure_buffer(q, req) < 0) {
        xt_log("domain %u queue %u: out of memory for a %zu-byte request",
               q->vbd->domid, q->idx, req->len);
        respond(q, req, BLKIF_RSP_ERROR);
        return;
    }
    switch (req->io_op) {
    case BLKIF_OP_READ:
        submit(q, req, XT_IO_READ);
        break;
    case BLKIF_OP_WRITE:
        start_write(q, req);
        break;
    case BLKIF_OP_FLUSH_DISKCACHE:
    case BLKIF_OP_WRITE_BARRIER:
        if (q->writes_in_flight)
            q->blocker = req;       /* consumption pauses until writes drain */
        else
            start_ordered(q, req);
        break;
    case BLKIF_OP_DISCARD:
        start_discard(q, req);
        break;
    }
}


static bool all_zero(const uint8_t *p, size_t len)
{
    return len > 0 && p[0] == 0 && memcmp(p, p + 1, len - 1) == 0;
}

/* A write of data: an all-zero one goes as a ZEROES record without its data
 * (mkfs.xfs writes its 64 MiB log as zeroes; a guest zeroing a disk writes
 * nothing else).  The scan stops at the first non-zero byte. */
static void tap_data(struct xt_mirror *m, struct xt_req *req, uint32_t flags)
{
    if (all_zero(req->buf, req->len))
        xt_mirror_write(m, req->sector, NULL, (uint32_t)req->len, flags | XT_MREC_ZEROES);
    else
        xt_mirror_write(m, req->sector, req->buf, (uint32_t)req->len, flags);
}

/* The tap: what the guest just wrote, or a crash-consistent point, goes to
 * the mirror ring.  Called once the image has it, before the guest hears. */
static void tap(struct xt_queue *q, struct xt_req *req, uint32_t flags)
{
    struct xt_mirror *m = q->vbd->mirror;
    if (!m)
        return;
    switch (req->io_op) {
    case BLKIF_OP_WRITE:
        tap_data(m, req, flags);
        break;
    case BLKIF_OP_DISCARD:
        for (uint64_t done = 0; done < req->discard_sectors;) {
            uint64_t n = req->discard_sectors - done;
            if (n > (1u << 21))     /* 1 GiB a record: lengths are 32-bit */
                n = 1u << 21;
            xt_mirror_write(m, req->sector + done, NULL, (uint32_t)(n * XT_SECTOR_SIZE),
                            XT_MREC_DISCARD);
            done += n;
        }
        break;
    case BLKIF_OP_FLUSH_DISKCACHE:
    case BLKIF_OP_WRITE_BARRIER:
        if (req->stage == 0)    /* the data of a flush or barrier: a forced-unit-access write */
            tap_data(m, req, XT_MREC_FUA);
        else
            xt_mirror_marker(m, XT_MREC_FLUSH, 0, NULL, 0);
        break;
    }
}

static void complete(struct xt_queue *q, struct xt_req *req)
{
    int res = req->io.res;
    if (res == -EFAULT && req->io.iov) {
        stop_direct_reads(q);
        if (ensure_buffer(q, req) < 0)
            respond(q, req, BLKIF_RSP_ERROR);
        else
            submit(q, req, XT_IO_READ);     /* again, through the bounce buffer */
        return;
    }
    bool was_write = req->io.op == XT_IO_WRITE;
    bool ordered = req->io_op == BLKIF_OP_FLUSH_DISKCACHE || req->io_op == BLKIF_OP_WRITE_BARRIER;
    if (was_write)
        q->writes_in_flight--;
    if (res < 0) {
        count(&q->c.err_io, 1);
        xt_log("domain %u queue %u: I/O error at sector %llu: %s", q->vbd->domid, q->idx,
               (unsigned long long)req->sector, strerror(-res));
        respond(q, req, BLKIF_RSP_ERROR);
        if (req->io_op == BLKIF_OP_WRITE_BARRIER)
            q->barrier_running = false;
    } else if (ordered && req->stage == 0) {
        count(&q->c.bytes_written, req->len);
        tap(q, req, 0);
        req->stage = 1;
        submit(q, req, XT_IO_FSYNC);
    } else if (req->io_op == BLKIF_OP_READ && !req->io.iov && copy_data(q, req, XT_COPY_TO_GUEST) < 0) {
        respond(q, req, BLKIF_RSP_ERROR);
    } else {
        tap(q, req, 0);
        count_done(q, req);
        respond(q, req, BLKIF_RSP_OKAY);
        if (req->io_op == BLKIF_OP_WRITE_BARRIER)
            q->barrier_running = false;
    }
    if (q->writes_in_flight == 0 && q->blocker) {
        struct xt_req *b = q->blocker;
        q->blocker = NULL;
        start_ordered(q, b);
    }
}

/* ---- the ring ---- */

static void stop_ring(struct xt_queue *q, const char *why)
{
    q->ring_dead = true;
    count(&q->c.ring_stopped, 1);
    xt_log("domain %u queue %u: %s; this ring is no longer served", q->vbd->domid, q->idx, why);
}

static bool paused(const struct xt_queue *q)
{
    return q->ring_dead || q->stopping || q->blocker || q->barrier_running;
}

/* Takes every request the guest has produced, while there are slots. */
static void consume(struct xt_queue *q)
{
    RING_IDX rc = q->ring.req_cons;
    RING_IDX rp = q->ring.sring->req_prod;
    xen_rmb();  /* see the requests the producer index covers */
    if (RING_REQUEST_PROD_OVERFLOW(&q->ring, rp)) {
        stop_ring(q, "the guest's request producer index runs past the ring");
        return;
    }
    uint64_t now = rc != rp ? xt_now_ns() : 0;
    while (rc != rp && !paused(q)) {
        if (RING_REQUEST_CONS_OVERFLOW(&q->ring, rc))
            break;
        struct xt_req *req = take(q);
        if (!req)
            break;
        req->t_taken = now;
        req->t_engine = 0;
        struct xt_ring_req r;
        RING_IDX i = rc & (RING_SIZE(&q->ring) - 1);
        req->ring_idx = rc;
        xt_abi_get_request(q->vbd->protocol,
                           (uint8_t *)q->ring.sring->ring + (size_t)i * q->entry_size, &r);
        q->ring.req_cons = ++rc;
        start(q, req, &r);
    }
}

/* ---- polling ---- */

/*
 * Adaptive polling, as KVM's halt polling: before sleeping, a queue thread
 * watches its ring and its completions for up to q->poll_ns.  On a virtual
 * machine, a thread that sleeps pays for its CPU's halt and wake-up, tens of
 * microseconds each, and a guest's round trip has two such sleeps besides the
 * disk's (measured, 4 KiB random write QD32, shim/fio: 0.70 sleeping, 0.9-1.0
 * polling up to 100-300 us).  The window grows while the sleeps it did not
 * avoid were short (polling a little longer would have caught the event) and
 * shrinks while they are long, so an idle ring costs no CPU.
 */
#define POLL_START_NS 10000u

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static bool has_requests(const struct xt_queue *q)
{
    const volatile RING_IDX *prod = &q->ring.sring->req_prod;
    return !paused(q) && *prod != q->ring.req_cons;
}

/* True as soon as there is something to do; false after q->poll_ns. */
static bool poll_for_work(struct xt_queue *q)
{
    uint64_t end = xt_now_ns() + q->poll_ns;
    for (unsigned i = 1;; i++) {
        if (q->engine.ops->ready(&q->engine) || has_requests(q))
            return true;
        cpu_relax();
        if (i % 32 == 0 && xt_now_ns() > end)
            return false;
    }
}

/* After a sleep of slept_ns that polling did not avoid. */
static void poll_adjust(struct xt_queue *q, uint64_t slept_ns)
{
    uint64_t max = q->vbd->poll_max_ns;
    if (slept_ns > max) {
        q->poll_ns /= 2;
        if (q->poll_ns < POLL_START_NS)
            q->poll_ns = 0;
    } else if (q->poll_ns < max) {
        q->poll_ns = q->poll_ns ? q->poll_ns * 2 : POLL_START_NS;
        if (q->poll_ns > max)
            q->poll_ns = max;
    }
}

bool xt_queue_step(struct xt_queue *q, bool may_block)
{
    struct xt_io *done[REAP_BATCH];
    xt_transport *t = q->vbd->t;

    if (!paused(q))
        consume(q);
    push_responses(q);

    uint64_t in_flight = atomic_load_explicit(&q->c.in_flight, memory_order_relaxed);
    if (q->stopping && in_flight == 0)
        return false;
    int more = 0;
    if (!paused(q))
        RING_FINAL_CHECK_FOR_REQUESTS(&q->ring, more);

    bool block = may_block && !more;
    bool polling = block && q->vbd->poll_max_ns && q->engine.ops->ready;
    if (polling && q->poll_ns && poll_for_work(q)) {
        block = false;
        polling = false;
    }
    uint64_t t0 = polling ? xt_now_ns() : 0;
    unsigned woken = 0;
    int n = q->engine.ops->wait(&q->engine, done, REAP_BATCH, &woken, block);
    uint64_t t1 = n > 0 || polling ? xt_now_ns() : 0;
    if (n > 0)
        q->t_seen = t1;
    if (polling)
        poll_adjust(q, t1 - t0);
    for (int i = 0; i < n; i++) {
        struct xt_req *req = (struct xt_req *)((uint8_t *)done[i] - offsetof(struct xt_req, io));
        complete(q, req);
    }
    if (woken & WAKE_EVTCHN)
        t->ops->ack(t, &q->ev);
    if (woken & WAKE_STOP) {
        uint64_t v;
        ssize_t r = read(q->stop_fd, &v, sizeof(v));
        (void)r;
        q->stopping = true;
    }
    return true;
}

void *xt_queue_main(void *arg)
{
    struct xt_queue *q = arg;
    while (xt_queue_step(q, true))
        ;
    return NULL;
}
