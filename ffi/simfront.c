/*
 * simfront.c — the sim blkfront: the frontend side of blkif as Linux's
 * xen-blkfront drives it (shared ring, grant refs, event channel kicks with
 * notification suppression, indirect segments, several queues), over the
 * sim transport, with fio-like workloads and data verification.
 *
 * One thread per queue.  For verification every sector carries a pattern
 * derived from (sector, version); an oracle holds the last version written
 * to each sector, and queues work on disjoint blocks so that no two
 * requests in flight overlap.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "xt_internal.h"
#include "xt_sim.h"

#define LAT_BUCKETS 65536   /* 1 us each; the last one holds everything slower */
#define WAKE_BUCKETS 1024   /* 1 us each, likewise */
#define DRAIN_TIMEOUT_NS (15ull * 1000000000ull)
#define MAX_VERIFY_SECTORS (1ull << 27)     /* 64 GiB of oracle */

struct front_slot {
    bool in_use;
    bool granted;
    uint8_t op;
    uint32_t nr_frames;
    uint32_t data_frame;        /* first of nr_frames consecutive frames */
    uint32_t ind_frame;         /* first of the indirect frames */
    uint64_t sector;
    uint64_t block;
    uint32_t nsect;
    uint64_t t0;
    uint64_t issue_no;          /* order in which requests were issued */
    struct front_slot *next_free;
};

struct front_queue {
    struct xt_front *f;
    unsigned idx;
    blkif_front_ring_t ring;
    uint32_t ring_frame;
    unsigned entry_size;
    uint32_t port;
    int rx_fd, tx_fd;
    unsigned nr_slots;
    struct front_slot *slots;
    struct front_slot *free_list;
    uint8_t *busy;              /* per block of the current run: in flight */
    pthread_t thread;
    /* per run */
    const struct xt_workload *w;
    uint64_t rng;
    uint64_t next_seq_block;
    uint64_t writes_since_flush;
    uint64_t writes_since_barrier;
    uint64_t issued_no;
    unsigned in_flight;
    unsigned barriers_in_flight;
    uint64_t *lat;
    uint64_t lat_max;
    uint64_t lat_sum;           /* ns, over every answered request */
    uint64_t wake[WAKE_BUCKETS]; /* notified while asleep -> running again */
    struct xt_front_result res;
    int rc;
    char err[XT_ERRLEN];
};

struct xt_front {
    xt_simdom *dom;
    struct xt_front_config cfg;
    unsigned max_segs;          /* per request: 11, or max_indirect_segments */
    struct front_queue *queues;
    uint32_t *oracle;           /* version last written to each sector of the disk */
    uint64_t oracle_sectors;
    atomic_uint_fast32_t version;
    atomic_bool stop;
    /* per run */
    uint64_t region_sector, region_blocks;
    uint32_t block_sectors;
    uint64_t deadline_ns;
};

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The content of `sector` at `version`: its numbers first, then a cheap fill. */
static void fill_sector(uint64_t *w, uint64_t sector, uint32_t version)
{
    uint64_t x = sector * 0x9e3779b97f4a7c15ull ^ ((uint64_t)version << 32);
    w[0] = sector;
    w[1] = version;
    for (unsigned i = 2; i < XT_SECTOR_SIZE / 8; i++)
        w[i] = x + i;
}

static bool check_sector(const uint64_t *w, uint64_t sector, uint32_t version)
{
    uint64_t x = sector * 0x9e3779b97f4a7c15ull ^ ((uint64_t)version << 32);
    if (w[0] != sector || w[1] != version)
        return false;
    for (unsigned i = 2; i < XT_SECTOR_SIZE / 8; i++)
        if (w[i] != x + i)
            return false;
    return true;
}

/* ---- the ring, by ABI ---- */

static volatile void *req_slot(struct front_queue *q, RING_IDX i)
{
    return (uint8_t *)q->ring.sring->ring + (size_t)(i & (RING_SIZE(&q->ring) - 1)) * q->entry_size;
}

#define ZEROED UINT32_MAX   /* oracle: the sector was discarded, reads as zeroes */

/* ---- setup ---- */

static int queue_open(struct xt_front *f, struct front_queue *q, struct xt_ring_params *p, char *err)
{
    unsigned pages = 1u << f->cfg.ring_order;
    if (xt_simdom_alloc_frames(f->dom, pages, &q->ring_frame) < 0)
        return xt_fail(err, ENOSPC, "sim domain has no room for ring pages");
    for (unsigned i = 0; i < pages; i++) {
        memset(xt_simdom_frame(f->dom, q->ring_frame + i), 0, XT_PAGE_SIZE);
        p->ring_ref[q->idx * XT_MAX_RING_PAGES + i] = xt_simdom_grant(f->dom, q->ring_frame + i, false);
    }
    /* The frames are consecutive in the memfd, so the ring is contiguous here. */
    blkif_sring_t *sring = xt_simdom_frame(f->dom, q->ring_frame);
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&q->ring, sring, XT_PAGE_SIZE * pages);
    q->ring.nr_ents = xt_abi_ring_slots(f->cfg.protocol, pages);
    q->entry_size = xt_abi_entry_size(f->cfg.protocol);
    int rc = xt_simdom_alloc_port(f->dom, &q->port, &q->rx_fd, &q->tx_fd, err);
    if (rc < 0)
        return rc;
    p->evtchn[q->idx] = q->port;
    q->nr_slots = RING_SIZE(&q->ring);
    q->slots = calloc(q->nr_slots, sizeof(*q->slots));
    if (!q->slots)
        return xt_fail(err, ENOMEM, "out of memory");
    for (unsigned i = q->nr_slots; i-- > 0;) {
        q->slots[i].next_free = q->free_list;
        q->free_list = &q->slots[i];
    }
    return 0;
}

int xt_front_open(const struct xt_front_config *cfg, xt_front **out,
                  struct xt_ring_params *p, char *err)
{
    if (cfg->nr_queues < 1 || cfg->nr_queues > XT_MAX_QUEUES)
        return xt_fail(err, EINVAL, "sim blkfront: %u queues out of range", cfg->nr_queues);
    if (cfg->ring_order > XT_MAX_RING_ORDER)
        return xt_fail(err, EINVAL, "sim blkfront: ring order %u out of range", cfg->ring_order);
    if (cfg->protocol != XT_PROTO_NATIVE && cfg->protocol != XT_PROTO_X86_32)
        return xt_fail(err, EINVAL, "sim blkfront: unknown protocol %u", cfg->protocol);
    if (cfg->max_indirect_segments > XT_MAX_INDIRECT_SEGMENTS)
        return xt_fail(err, EINVAL, "sim blkfront: %u indirect segments out of range",
                       cfg->max_indirect_segments);
    xt_front *f = calloc(1, sizeof(*f));
    if (!f)
        return xt_fail(err, ENOMEM, "out of memory");
    f->cfg = *cfg;
    f->cfg.simdir = NULL;
    f->max_segs = cfg->max_indirect_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST
                      ? cfg->max_indirect_segments : BLKIF_MAX_SEGMENTS_PER_REQUEST;
    int rc = xt_simdom_attach(cfg->simdir, &f->dom, err);
    if (rc < 0) {
        free(f);
        return rc;
    }
    memset(p, 0, sizeof(*p));
    p->domid = f->dom->hdr_copy.domid;
    p->protocol = cfg->protocol;
    p->nr_queues = cfg->nr_queues;
    p->ring_order = cfg->ring_order;
    p->persistent = 1;      /* slot_prepare grants each page once, for good */
    f->queues = calloc(cfg->nr_queues, sizeof(*f->queues));
    if (!f->queues) {
        xt_front_close(f);
        return xt_fail(err, ENOMEM, "out of memory");
    }
    for (unsigned i = 0; i < cfg->nr_queues; i++) {
        f->queues[i].f = f;
        f->queues[i].idx = i;
        f->queues[i].rx_fd = f->queues[i].tx_fd = -1;
    }
    for (unsigned i = 0; i < cfg->nr_queues; i++) {
        rc = queue_open(f, &f->queues[i], p, err);
        if (rc < 0) {
            xt_front_close(f);
            return rc;
        }
    }
    *out = f;
    return 0;
}

void xt_front_close(xt_front *f)
{
    if (!f)
        return;
    for (unsigned i = 0; f->queues && i < f->cfg.nr_queues; i++) {
        struct front_queue *q = &f->queues[i];
        if (q->rx_fd >= 0)
            close(q->rx_fd);
        if (q->tx_fd >= 0)
            close(q->tx_fd);
        free(q->slots);
        free(q->busy);
    }
    free(f->queues);
    free(f->oracle);
    xt_simdom_destroy(f->dom);
    free(f);
}

void xt_front_stop(xt_front *f)
{
    atomic_store(&f->stop, true);
}

/* ---- requests ---- */

/* Grants a slot's data frames (and indirect frames) on first use. */
static int slot_prepare(struct front_queue *q, struct front_slot *s)
{
    if (s->granted)
        return 0;
    struct xt_front *f = q->f;
    unsigned ind = f->max_segs > BLKIF_MAX_SEGMENTS_PER_REQUEST
                       ? (unsigned)((f->max_segs + XT_SEGS_PER_INDIRECT_PAGE - 1) / XT_SEGS_PER_INDIRECT_PAGE)
                       : 0;
    if (xt_simdom_alloc_frames(f->dom, f->max_segs + ind, &s->data_frame) < 0)
        return -ENOSPC;
    s->ind_frame = s->data_frame + f->max_segs;
    s->nr_frames = f->max_segs;
    for (unsigned i = 0; i < f->max_segs + ind; i++) {
        uint8_t *page = xt_simdom_frame(f->dom, s->data_frame + i);
        /* Non-zero content, so that unverified writes are not all zeroes. */
        memset(page, 0xa5 ^ (int)(i & 0xff), XT_PAGE_SIZE);
        xt_simdom_grant(f->dom, s->data_frame + i, false);
    }
    s->granted = true;
    return 0;
}

static bool pick_block(struct front_queue *q, uint64_t *block)
{
    struct xt_front *f = q->f;
    unsigned nq = f->cfg.nr_queues;
    uint64_t mine = (f->region_blocks + nq - 1 - q->idx) / nq;     /* blocks b with b % nq == idx */
    if (mine == 0)
        return false;
    uint64_t k;
    if (q->w->sequential) {
        k = q->next_seq_block++ % mine;
        if (q->busy[k])
            return false;
    } else {
        k = splitmix(&q->rng) % mine;
        for (unsigned tries = 0; q->busy[k]; tries++) {
            if (tries == 64)
                return false;
            k = (k + 1) % mine;
        }
    }
    *block = k;
    return true;
}

static void fill_segments(struct front_queue *q, struct front_slot *s,
                          struct blkif_request_segment *seg)
{
    uint32_t left = s->nsect;
    for (unsigned i = 0; left; i++) {
        uint32_t n = left < XT_SECTORS_PER_PAGE ? left : XT_SECTORS_PER_PAGE;
        seg[i].gref = s->data_frame + i;
        seg[i].first_sect = 0;
        seg[i].last_sect = (uint8_t)(n - 1);
        left -= n;
    }
}

static bool due(uint64_t every, uint64_t since)
{
    return every && since >= every;
}

/* Builds one request in the ring's next slot; false when nothing to issue. */
static bool issue(struct front_queue *q)
{
    struct xt_front *f = q->f;
    const struct xt_workload *w = q->w;
    struct front_slot *s = q->free_list;
    if (!s)
        return false;
    uint8_t op;
    if (due(w->flush_every, q->writes_since_flush))
        op = BLKIF_OP_FLUSH_DISKCACHE;
    else if (due(w->barrier_every, q->writes_since_barrier))
        op = BLKIF_OP_WRITE_BARRIER;
    else if (w->discard_pct && splitmix(&q->rng) % 100 < w->discard_pct)
        op = BLKIF_OP_DISCARD;
    else
        op = (splitmix(&q->rng) % 100) < w->read_pct ? BLKIF_OP_READ : BLKIF_OP_WRITE;
    bool ordered = op == BLKIF_OP_FLUSH_DISKCACHE || op == BLKIF_OP_WRITE_BARRIER;
    uint64_t block = 0;
    if (!ordered && !pick_block(q, &block))
        return false;
    if (slot_prepare(q, s) < 0) {
        q->rc = xt_fail(q->err, ENOSPC, "sim domain has no room for request pages");
        return false;
    }
    q->free_list = s->next_free;
    s->in_use = true;
    s->t0 = xt_now_ns();
    s->issue_no = ++q->issued_no;
    s->op = op;

    struct xt_ring_req r;
    memset(&r, 0, sizeof(r));
    r.operation = op;
    r.id = (uint64_t)(s - q->slots);
    if (ordered) {
        s->nsect = 0;
        if (op == BLKIF_OP_FLUSH_DISKCACHE)
            q->writes_since_flush = 0;
        else
            q->writes_since_barrier = 0;
        if (op == BLKIF_OP_WRITE_BARRIER)
            q->barriers_in_flight++;
        xt_abi_put_request(f->cfg.protocol, req_slot(q, q->ring.req_prod_pvt), &r);
        q->ring.req_prod_pvt++;
        q->in_flight++;
        return true;
    }
    q->busy[block] = 1;
    s->block = block;
    uint64_t gblock = block * f->cfg.nr_queues + q->idx;
    s->sector = f->region_sector + gblock * f->block_sectors;
    s->nsect = f->block_sectors;
    r.sector = s->sector;

    if (op == BLKIF_OP_DISCARD) {
        r.nr_sectors = s->nsect;
        if (w->verify)
            for (uint32_t i = 0; i < s->nsect; i++)
                f->oracle[s->sector + i] = ZEROED;
        xt_abi_put_request(f->cfg.protocol, req_slot(q, q->ring.req_prod_pvt), &r);
        q->ring.req_prod_pvt++;
        q->in_flight++;
        return true;
    }
    if (op == BLKIF_OP_WRITE) {
        q->writes_since_flush++;
        q->writes_since_barrier++;
        if (w->verify) {
            uint32_t v = (uint32_t)atomic_fetch_add(&f->version, 1) + 1;
            for (uint32_t i = 0; i < s->nsect; i++) {
                uint64_t *sec = (uint64_t *)((uint8_t *)xt_simdom_frame(f->dom, s->data_frame + i / XT_SECTORS_PER_PAGE) +
                                             (i % XT_SECTORS_PER_PAGE) * XT_SECTOR_SIZE);
                fill_sector(sec, s->sector + i, v);
                f->oracle[s->sector + i] = v;
            }
        }
    }
    unsigned nsegs = (s->nsect + XT_SECTORS_PER_PAGE - 1) / XT_SECTORS_PER_PAGE;
    if (nsegs <= BLKIF_MAX_SEGMENTS_PER_REQUEST) {
        r.nr_segments = (uint16_t)nsegs;
        fill_segments(q, s, r.seg);
    } else {
        r.operation = BLKIF_OP_INDIRECT;
        r.indirect_op = op;
        r.nr_segments = (uint16_t)nsegs;
        unsigned pages = (unsigned)((nsegs + XT_SEGS_PER_INDIRECT_PAGE - 1) / XT_SEGS_PER_INDIRECT_PAGE);
        struct blkif_request_segment *segs = xt_simdom_frame(f->dom, s->ind_frame);
        fill_segments(q, s, segs);      /* the indirect frames are consecutive */
        for (unsigned i = 0; i < pages; i++)
            r.indirect_grefs[i] = s->ind_frame + i;
    }
    xt_abi_put_request(f->cfg.protocol, req_slot(q, q->ring.req_prod_pvt), &r);
    q->ring.req_prod_pvt++;
    q->in_flight++;
    return true;
}

static void record_latency(struct front_queue *q, uint64_t ns)
{
    uint64_t us = ns / 1000;
    q->lat[us < LAT_BUCKETS ? us : LAT_BUCKETS - 1]++;
    q->lat_sum += ns;
    if (ns > q->lat_max)
        q->lat_max = ns;
}

static bool all_zero(const uint64_t *w)
{
    for (unsigned i = 0; i < XT_SECTOR_SIZE / 8; i++)
        if (w[i])
            return false;
    return true;
}

static void complete(struct front_queue *q, uint64_t id, int16_t status)
{
    struct xt_front *f = q->f;
    if (id >= q->nr_slots || !q->slots[id].in_use) {
        q->res.errors++;
        return;
    }
    struct front_slot *s = &q->slots[id];
    record_latency(q, xt_now_ns() - s->t0);
    q->res.ios++;
    if (status != BLKIF_RSP_OKAY) {
        q->res.errors++;
    } else if (s->op == BLKIF_OP_DISCARD) {
        q->res.discards++;
    } else if (s->op == BLKIF_OP_FLUSH_DISKCACHE || s->op == BLKIF_OP_WRITE_BARRIER) {
        if (s->op == BLKIF_OP_FLUSH_DISKCACHE)
            q->res.flushes++;
        else
            q->res.barriers++;
        /* A flush or barrier answers only after every write issued before it. */
        for (unsigned i = 0; i < q->nr_slots; i++)
            if (q->slots[i].in_use && q->slots[i].op == BLKIF_OP_WRITE &&
                q->slots[i].issue_no < s->issue_no)
                q->res.flush_order_violations++;
    } else if (s->op == BLKIF_OP_WRITE) {
        /* A write issued after a barrier completes only after it. */
        for (unsigned i = 0; q->barriers_in_flight && i < q->nr_slots; i++)
            if (q->slots[i].in_use && q->slots[i].op == BLKIF_OP_WRITE_BARRIER &&
                q->slots[i].issue_no < s->issue_no)
                q->res.flush_order_violations++;
        q->res.writes++;
        q->res.bytes_written += (uint64_t)s->nsect * XT_SECTOR_SIZE;
    } else {
        q->res.reads++;
        q->res.bytes_read += (uint64_t)s->nsect * XT_SECTOR_SIZE;
        if (q->w->verify) {
            for (uint32_t i = 0; i < s->nsect; i++) {
                uint32_t v = f->oracle[s->sector + i];
                if (v == 0)
                    continue;   /* never written by us: nothing to expect */
                const uint64_t *sec = (const uint64_t *)((uint8_t *)xt_simdom_frame(
                                          f->dom, s->data_frame + i / XT_SECTORS_PER_PAGE) +
                                      (i % XT_SECTORS_PER_PAGE) * XT_SECTOR_SIZE);
                if (v == ZEROED ? !all_zero(sec) : !check_sector(sec, s->sector + i, v)) {
                    if (q->res.verify_failures == 0)
                        q->res.first_bad_sector = s->sector + i;
                    q->res.verify_failures++;
                }
            }
        }
    }
    if (s->op == BLKIF_OP_WRITE_BARRIER)
        q->barriers_in_flight--;
    else if (s->op != BLKIF_OP_FLUSH_DISKCACHE)
        q->busy[s->block] = 0;
    s->in_use = false;
    s->next_free = q->free_list;
    q->free_list = s;
    q->in_flight--;
}

static unsigned reap(struct front_queue *q)
{
    unsigned n = 0;
    RING_IDX rp = q->ring.sring->rsp_prod;
    xen_rmb();
    while (q->ring.rsp_cons != rp) {
        uint64_t id;
        uint8_t op;
        int16_t status;
        xt_abi_get_response(q->f->cfg.protocol, req_slot(q, q->ring.rsp_cons), &id, &op, &status);
        q->ring.rsp_cons++;
        complete(q, id, status);
        n++;
    }
    return n;
}

static void *queue_run(void *arg)
{
    struct front_queue *q = arg;
    struct xt_front *f = q->f;
    const struct xt_workload *w = q->w;
    uint64_t issued = 0;
    uint64_t max_ios = w->max_ios ? (w->max_ios + f->cfg.nr_queues - 1 - q->idx) / f->cfg.nr_queues : 0;
    uint64_t drain_deadline = 0;
    /* rate_iops: this queue's share; it may have issued 1 + elapsed * rate by now */
    double ios_per_ns = (double)w->rate_iops / f->cfg.nr_queues / 1e9;
    uint64_t t_start = xt_now_ns();

    for (;;) {
        bool issuing = !atomic_load_explicit(&f->stop, memory_order_relaxed) &&
                       (!max_ios || issued < max_ios) &&
                       (!f->deadline_ns || xt_now_ns() < f->deadline_ns) && q->rc == 0;
        uint64_t allowed = UINT64_MAX;
        if (issuing && w->rate_iops)
            allowed = 1 + (uint64_t)((double)(xt_now_ns() - t_start) * ios_per_ns);
        if (issuing) {
            while (q->in_flight < w->queue_depth && !RING_FULL(&q->ring) &&
                   (!max_ios || issued < max_ios) && issued < allowed && issue(q))
                issued++;
            int notify;
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->ring, notify);
            if (notify)
                xt_fifo_notify(q->tx_fd);
        } else if (q->in_flight == 0) {
            break;
        } else if (!drain_deadline) {
            drain_deadline = xt_now_ns() + DRAIN_TIMEOUT_NS;
        } else if (xt_now_ns() > drain_deadline) {
            q->rc = xt_fail(q->err, ETIMEDOUT, "queue %u: the backend did not answer %u requests",
                            q->idx, q->in_flight);
            break;
        }
        if (reap(q))
            continue;
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&q->ring, more);
        if (more)
            continue;
        struct pollfd pfd = { .fd = q->rx_fd, .events = POLLIN };
        uint64_t slept = xt_now_ns();
        /* held back by the rate: wake for the next slot, not only for a response */
        if (poll(&pfd, 1, issuing && issued >= allowed ? 1 : 100) > 0) {
            uint64_t sent = xt_fifo_drain(q->rx_fd), now = xt_now_ns();
            if (sent > slept && now >= sent) {      /* the event found us asleep */
                uint64_t us = (now - sent) / 1000;
                q->wake[us < WAKE_BUCKETS ? us : WAKE_BUCKETS - 1]++;
                q->res.wakes++;
            }
        }
    }
    return NULL;
}

static uint64_t percentile(const uint64_t *hist, unsigned buckets, uint64_t total, double pct)
{
    uint64_t want = (uint64_t)((double)total * pct), seen = 0;
    for (unsigned i = 0; i < buckets; i++) {
        seen += hist[i];
        if (seen > want)
            return i;
    }
    return buckets - 1;
}

int xt_front_run(xt_front *f, const struct xt_workload *w,
                 struct xt_front_result *res, char *err)
{
    memset(res, 0, sizeof(*res));
    if (w->block_size == 0 || w->block_size % XT_SECTOR_SIZE)
        return xt_fail(err, EINVAL, "block size %u is not a multiple of 512", w->block_size);
    uint32_t bsect = w->block_size / XT_SECTOR_SIZE;
    unsigned nsegs = (bsect + XT_SECTORS_PER_PAGE - 1) / XT_SECTORS_PER_PAGE;
    if (nsegs > f->max_segs)
        return xt_fail(err, EINVAL, "block size %u needs %u segments; the backend allows %u",
                       w->block_size, nsegs, f->max_segs);
    if (w->queue_depth == 0)
        return xt_fail(err, EINVAL, "queue depth must be at least 1");
    if (w->read_pct > 100)
        return xt_fail(err, EINVAL, "read percentage over 100");
    if (w->offset % w->block_size)
        return xt_fail(err, EINVAL, "offset is not a multiple of the block size");
    uint64_t disk = f->cfg.sectors * XT_SECTOR_SIZE;
    uint64_t size = w->size ? w->size : disk - (w->offset < disk ? w->offset : disk);
    if (w->offset > disk || size > disk - w->offset)
        return xt_fail(err, EINVAL, "region [%llu, +%llu) is past the end of the disk (%llu bytes)",
                       (unsigned long long)w->offset, (unsigned long long)size, (unsigned long long)disk);
    f->region_sector = w->offset / XT_SECTOR_SIZE;
    f->block_sectors = bsect;
    f->region_blocks = size / w->block_size;
    if (f->region_blocks < f->cfg.nr_queues)
        return xt_fail(err, EINVAL, "region too small for %u queues of %u-byte blocks",
                       f->cfg.nr_queues, w->block_size);
    if (w->verify) {
        uint64_t need = f->cfg.sectors;
        if (need > MAX_VERIFY_SECTORS)
            return xt_fail(err, EINVAL, "disk too large to verify");
        if (!f->oracle) {
            f->oracle = calloc(need, sizeof(uint32_t));
            if (!f->oracle)
                return xt_fail(err, ENOMEM, "out of memory for the verify oracle");
            f->oracle_sectors = need;
        }
    }
    atomic_store(&f->stop, false);
    uint64_t t0 = xt_now_ns();
    f->deadline_ns = w->seconds > 0 ? t0 + (uint64_t)(w->seconds * 1e9) : 0;
    int rc = 0;
    unsigned started = 0;
    for (unsigned i = 0; i < f->cfg.nr_queues; i++) {
        struct front_queue *q = &f->queues[i];
        memset(&q->res, 0, sizeof(q->res));
        q->w = w;
        q->rng = w->seed * 0x100000001b3ull + i + 1;
        q->next_seq_block = 0;
        q->writes_since_flush = 0;
        q->writes_since_barrier = 0;
        q->rc = 0;
        q->lat_max = 0;
        q->lat_sum = 0;
        memset(q->wake, 0, sizeof(q->wake));
        free(q->busy);
        q->busy = calloc(f->region_blocks / f->cfg.nr_queues + 1, 1);
        q->lat = calloc(LAT_BUCKETS, sizeof(uint64_t));
        if (!q->busy || !q->lat) {
            rc = xt_fail(err, ENOMEM, "out of memory");
            break;
        }
    }
    if (rc == 0) {
        for (; started < f->cfg.nr_queues; started++)
            if (pthread_create(&f->queues[started].thread, NULL, queue_run, &f->queues[started]) != 0) {
                atomic_store(&f->stop, true);
                rc = xt_fail(err, EAGAIN, "cannot start a queue thread");
                break;
            }
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(f->queues[i].thread, NULL);
    res->seconds = (double)(xt_now_ns() - t0) / 1e9;

    uint64_t *hist = calloc(LAT_BUCKETS, sizeof(uint64_t));
    uint64_t wake[WAKE_BUCKETS] = {0};
    uint64_t lat_max = 0, lat_sum = 0;
    for (unsigned i = 0; i < f->cfg.nr_queues; i++) {
        struct front_queue *q = &f->queues[i];
        if (q->rc && rc == 0)
            rc = xt_fail(err, -q->rc, "%s", q->err);
        res->ios += q->res.ios;
        res->reads += q->res.reads;
        res->writes += q->res.writes;
        res->flushes += q->res.flushes;
        res->barriers += q->res.barriers;
        res->discards += q->res.discards;
        res->bytes_read += q->res.bytes_read;
        res->bytes_written += q->res.bytes_written;
        res->errors += q->res.errors;
        res->flush_order_violations += q->res.flush_order_violations;
        if (q->res.verify_failures && !res->verify_failures)
            res->first_bad_sector = q->res.first_bad_sector;
        res->verify_failures += q->res.verify_failures;
        if (hist && q->lat)
            for (unsigned b = 0; b < LAT_BUCKETS; b++)
                hist[b] += q->lat[b];
        if (q->lat_max > lat_max)
            lat_max = q->lat_max;
        lat_sum += q->lat_sum;
        res->wakes += q->res.wakes;
        for (unsigned b = 0; b < WAKE_BUCKETS; b++)
            wake[b] += q->wake[b];
        free(q->lat);
        q->lat = NULL;
    }
    if (hist && res->ios) {
        res->lat_us_p50 = (double)percentile(hist, LAT_BUCKETS, res->ios, 0.50);
        res->lat_us_p99 = (double)percentile(hist, LAT_BUCKETS, res->ios, 0.99);
        res->lat_us_max = (double)lat_max / 1000.0;
        res->lat_us_mean = (double)lat_sum / 1000.0 / (double)res->ios;
    }
    if (res->wakes)
        res->wake_us_p50 = (double)percentile(wake, WAKE_BUCKETS, res->wakes, 0.50);
    free(hist);
    return rc;
}

/* ---- replay ---- */

static bool write_in_flight_overlaps(const struct front_queue *q, uint64_t sector, uint32_t nsect)
{
    for (unsigned i = 0; i < q->nr_slots; i++) {
        const struct front_slot *s = &q->slots[i];
        if (s->in_use && s->op == BLKIF_OP_WRITE &&
            sector < s->sector + s->nsect && s->sector < sector + nsect)
            return true;
    }
    return false;
}

/* Puts a write of `nsect` sectors at `sector` from `data` in the ring. */
static int replay_issue(struct front_queue *q, uint8_t op, uint64_t sector, uint32_t nsect,
                        const uint8_t *data)
{
    struct xt_front *f = q->f;
    struct front_slot *s = q->free_list;
    if (slot_prepare(q, s) < 0)
        return xt_fail(q->err, ENOSPC, "sim domain has no room for request pages");
    q->free_list = s->next_free;
    s->in_use = true;
    s->t0 = xt_now_ns();
    s->issue_no = ++q->issued_no;
    s->op = op;
    s->block = 0;
    s->sector = sector;
    s->nsect = nsect;
    struct xt_ring_req r;
    memset(&r, 0, sizeof(r));
    r.operation = op;
    r.id = (uint64_t)(s - q->slots);
    if (op == BLKIF_OP_WRITE) {
        size_t left = (size_t)nsect * XT_SECTOR_SIZE;
        for (unsigned i = 0; left; i++) {
            size_t n = left < XT_PAGE_SIZE ? left : XT_PAGE_SIZE;
            memcpy(xt_simdom_frame(f->dom, s->data_frame + i), data + (size_t)i * XT_PAGE_SIZE, n);
            left -= n;
        }
        r.sector = sector;
        unsigned nsegs = (nsect + XT_SECTORS_PER_PAGE - 1) / XT_SECTORS_PER_PAGE;
        r.nr_segments = (uint16_t)nsegs;
        if (nsegs <= BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            fill_segments(q, s, r.seg);
        } else {
            r.operation = BLKIF_OP_INDIRECT;
            r.indirect_op = op;
            unsigned pages = (nsegs + XT_SEGS_PER_INDIRECT_PAGE - 1) / XT_SEGS_PER_INDIRECT_PAGE;
            fill_segments(q, s, xt_simdom_frame(f->dom, s->ind_frame));
            for (unsigned i = 0; i < pages; i++)
                r.indirect_grefs[i] = s->ind_frame + i;
        }
    }
    xt_abi_put_request(f->cfg.protocol, req_slot(q, q->ring.req_prod_pvt), &r);
    q->ring.req_prod_pvt++;
    q->in_flight++;
    return 0;
}

int xt_front_replay(xt_front *f, const struct xt_replay_op *ops, uint64_t n,
                    uint32_t queue_depth, struct xt_front_result *res, char *err)
{
    memset(res, 0, sizeof(*res));
    if (queue_depth == 0)
        return xt_fail(err, EINVAL, "queue depth must be at least 1");
    for (uint64_t i = 0; i < n; i++) {
        const struct xt_replay_op *o = &ops[i];
        if (o->kind == XT_REPLAY_FLUSH)
            continue;
        if (o->kind != XT_REPLAY_WRITE || o->len == 0 || o->len % XT_SECTOR_SIZE || !o->data)
            return xt_fail(err, EINVAL, "replay op %llu: not a write of whole sectors",
                           (unsigned long long)i);
        if (o->sector > f->cfg.sectors || o->len / XT_SECTOR_SIZE > f->cfg.sectors - o->sector)
            return xt_fail(err, EINVAL, "replay op %llu: past the end of the disk",
                           (unsigned long long)i);
    }
    struct front_queue *q = &f->queues[0];
    struct xt_workload w = { .queue_depth = queue_depth };
    memset(&q->res, 0, sizeof(q->res));
    q->w = &w;
    q->rc = 0;
    q->lat_max = 0;
    q->lat_sum = 0;
    free(q->busy);
    q->busy = calloc(1, 1);
    q->lat = calloc(LAT_BUCKETS, sizeof(uint64_t));
    if (!q->busy || !q->lat) {
        free(q->lat);
        q->lat = NULL;
        return xt_fail(err, ENOMEM, "out of memory");
    }
    uint32_t max_sect = f->max_segs * XT_SECTORS_PER_PAGE;
    uint64_t t0 = xt_now_ns(), i = 0, last_progress = t0;
    uint32_t done_sect = 0;     /* of ops[i], already issued */
    bool fence = false;         /* a flush is in flight: issue nothing */
    int rc = 0;
    for (;;) {
        if (fence && q->in_flight == 0)
            fence = false;
        while (!fence && i < n && q->in_flight < queue_depth && q->free_list && !RING_FULL(&q->ring)) {
            const struct xt_replay_op *o = &ops[i];
            if (o->kind == XT_REPLAY_FLUSH) {
                if (q->in_flight)
                    break;
                rc = replay_issue(q, BLKIF_OP_FLUSH_DISKCACHE, 0, 0, NULL);
                fence = true;
                i++;
                break;
            }
            uint32_t nsect = o->len / XT_SECTOR_SIZE - done_sect;
            if (nsect > max_sect)
                nsect = max_sect;
            uint64_t sector = o->sector + done_sect;
            if (write_in_flight_overlaps(q, sector, nsect))
                break;
            rc = replay_issue(q, BLKIF_OP_WRITE, sector, nsect,
                              o->data + (size_t)done_sect * XT_SECTOR_SIZE);
            if (rc < 0)
                break;
            done_sect += nsect;
            if (done_sect == o->len / XT_SECTOR_SIZE) {
                done_sect = 0;
                i++;
            }
        }
        int notify;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->ring, notify);
        if (notify)
            xt_fifo_notify(q->tx_fd);
        if (rc < 0 || (i == n && q->in_flight == 0))
            break;
        if (reap(q)) {
            last_progress = xt_now_ns();
            continue;
        }
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&q->ring, more);
        if (more)
            continue;
        if (xt_now_ns() - last_progress > DRAIN_TIMEOUT_NS) {
            rc = xt_fail(q->err, ETIMEDOUT, "replay: the backend did not answer %u requests",
                         q->in_flight);
            break;
        }
        struct pollfd pfd = { .fd = q->rx_fd, .events = POLLIN };
        if (poll(&pfd, 1, 100) > 0)
            xt_fifo_drain(q->rx_fd);
    }
    *res = q->res;
    res->seconds = (double)(xt_now_ns() - t0) / 1e9;
    if (res->ios) {
        res->lat_us_p50 = (double)percentile(q->lat, LAT_BUCKETS, res->ios, 0.50);
        res->lat_us_p99 = (double)percentile(q->lat, LAT_BUCKETS, res->ios, 0.99);
        res->lat_us_max = (double)q->lat_max / 1000.0;
        res->lat_us_mean = (double)q->lat_sum / 1000.0 / (double)res->ios;
    }
    free(q->lat);
    q->lat = NULL;
    q->w = NULL;
    if (rc < 0)
        return xt_fail(err, -rc, "%s", q->err);
    return 0;
}
