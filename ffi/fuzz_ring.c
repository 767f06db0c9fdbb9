/*
 * fuzz_ring.c — libFuzzer harness for the shim's request path.
 *
 * Built by tools/fuzz.sh with clang -fsanitize=fuzzer,address,undefined
 * together with the shim's own C sources (never into the cffi module: the
 * build skips files named fuzz_*).  Each input is a small program that a
 * hostile guest runs against its memory: it writes raw ring slots, grant
 * entries, indirect/data page bytes and ring indices into a sim domain, and
 * lets the real consumer (xt_queue_step on the sync engine) run until it
 * makes no more progress.  The sim domain, its VBDs (one per configuration:
 * both ABIs, read-only, 4 KiB sectors, with and without indirect segments)
 * and their memfd images are made once per process.
 *
 * Input: [config][start index u32] then commands, each a byte (modulo 10):
 *   0 SLOT   u8 slot, entry bytes       a ring slot, raw (the entry size of the ABI)
 *   1 PUSH   entry bytes               the slot at the guest's req_prod, then req_prod++
 *   2 GRANT  u8 gref, 8 bytes          a raw grant_entry_v1 (flags, domid, frame)
 *   3 PAGE   u8 frame, u16 off, u8 n, n bytes   data or indirect page content
 *   4 PROD   u32                       req_prod, raw
 *   5 STEP   u8 n                      up to n+1 turns of the consumer
 *   6 EVENT  u32, u32                  rsp_prod and req_event, raw (guest scribbles)
 *   7 RUN                              turns until no progress
 *   8 DRAIN                            the mirror drainer empties the tap's ring (and resyncs)
 *   9 CHECKPOINT u8 n, n bytes         a user checkpoint tag into the tap's ring
 * The end of the input is a RUN and a DRAIN.  Short reads pad with zeroes.
 * Configurations with mirroring on run the tap on every write (a 1 MiB
 * mirror ring, so that it overflows into its dirty bitmap).
 *
 * Invariants checked beyond the sanitizers: a RUN ends within a bounded
 * number of turns (no spin); once idle, every request taken has been
 * answered and published (no slot leaked, response index == consumer
 * index); the mirror drainer gets readable batches and its resync ends.
 *
 * Set XT_FUZZ_STATS=path to get "requests R executions E" written to path
 * (kept current during the run; R: responses the shim published, i.e. ring
 * requests it processed);
 * XT_FUZZ_LOG=1 keeps the shim's log lines on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "xt_internal.h"
#include "xt_sim.h"

#define FZ_DOMID 7
#define FZ_NR_CONFIGS 6
#define FZ_RING_FRAMES (2 * FZ_NR_CONFIGS)      /* ring order <= 1 */
#define FZ_NR_DATA 36
#define FZ_NR_FRAMES (FZ_RING_FRAMES + FZ_NR_DATA)
#define FZ_IMAGE_BYTES (1u << 20)
#define FZ_MAX_TURNS 4096
#define FZ_MIRROR_BYTES (1u << 20)

struct fz_config {
    uint32_t protocol, ring_order, readonly, indirect, sector_size, mirror, persistent;
};

/* persistent: reads go into pages mapped on first use and kept across
 * inputs, as a frontend that asked for persistent grants promises them */
static const struct fz_config configs[FZ_NR_CONFIGS] = {
    { XT_PROTO_NATIVE, 0, 0, 256, 512, 1, 1 },
    { XT_PROTO_X86_32, 0, 0, 256, 512, 1, 0 },
    { XT_PROTO_NATIVE, 1, 1, 32, 512, 0, 0 },   /* read-only */
    { XT_PROTO_X86_32, 1, 0, 0, 4096, 1, 1 },   /* no indirect, 4 KiB sectors */
    { XT_PROTO_NATIVE, 0, 0, 17, 4096, 0, 0 },  /* odd indirect limit, no tap */
    { XT_PROTO_X86_32, 0, 1, 256, 4096, 0, 1 }, /* read-only, 4 KiB */
};

struct fz_vbd {
    xt_vbd *vbd;
    struct xt_queue *q;
    int img_fd;
    int front_rx;           /* the frontend's end of the event channel */
};

static struct {
    char dir[64];
    xt_simdom *dom;
    xt_transport *t;
    struct fz_vbd v[FZ_NR_CONFIGS];
    uint64_t requests, executions;
    bool ready;
} fz;

static void die(const char *what, const char *err)
{
    fprintf(stderr, "fuzz_ring: %s: %s\n", what, err ? err : strerror(errno));
    abort();
}

static grant_entry_v1_t *entries(void)
{
    return (grant_entry_v1_t *)((uint8_t *)fz.dom->map + xt_simdom_entries_off());
}

/* The queue as xt_vbd_connect sets it up, minus its thread: we turn it. */
static void queue_setup(struct fz_vbd *f, unsigned cfg_idx, uint32_t port)
{
    const struct fz_config *c = &configs[cfg_idx];
    xt_vbd *v = f->vbd;
    char err[XT_ERRLEN];
    v->t = fz.t;
    v->domid = FZ_DOMID;
    v->protocol = c->protocol;
    v->queues = calloc(1, sizeof(*v->queues));
    if (!v->queues)
        die("calloc", NULL);
    v->nr_queues = 1;
    struct xt_queue *q = &v->queues[0];
    q->vbd = v;
    q->idx = 0;
    q->nr_ring_pages = 1u << c->ring_order;
    uint32_t refs[2] = { 2 * cfg_idx, 2 * cfg_idx + 1 };
    q->ring_addr = fz.t->ops->map(fz.t, FZ_DOMID, refs, q->nr_ring_pages, err);
    if (!q->ring_addr)
        die("map ring", err);
    q->entry_size = xt_abi_entry_size(c->protocol);
    BACK_RING_ATTACH(&q->ring, (blkif_sring_t *)q->ring_addr, 0, XT_PAGE_SIZE * q->nr_ring_pages);
    q->ring.nr_ents = xt_abi_ring_slots(c->protocol, q->nr_ring_pages);
    q->nr_reqs = RING_SIZE(&q->ring);
    if (fz.t->ops->bind(fz.t, FZ_DOMID, port, &q->ev, err) < 0)
        die("bind", err);
    q->ev_bound = true;
    q->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    unsigned max_segs = v->max_indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST
                            ? v->max_indirect : BLKIF_MAX_SEGMENTS_PER_REQUEST;
    q->reqs = calloc(q->nr_reqs, sizeof(*q->reqs));
    q->rsp = calloc(q->nr_reqs, sizeof(*q->rsp));
    q->seg_store = calloc((size_t)q->nr_reqs * max_segs, sizeof(struct xt_seg));
    if (q->stop_fd < 0 || !q->reqs || !q->rsp || !q->seg_store)
        die("queue setup", NULL);
    for (unsigned i = 0; i < q->nr_reqs; i++) {
        q->reqs[i].q = q;
        q->reqs[i].segs = &q->seg_store[(size_t)i * max_segs];
    }
    v->persistent = c->persistent;
    if (v->persistent && xt_queue_persistent_init(q, max_segs, err) < 0)
        die("persistent grants", err);
    int wake[2] = { q->ev.fd, q->stop_fd };
    q->engine.ops = v->engine_ops;
    if (v->engine_ops->init(&q->engine, v->fd, q->nr_reqs, wake, 2, err) < 0)
        die("engine", err);
    atomic_store(&v->state, XT_STATE_CONNECTED);
    f->q = q;
}

/* Rewrites the stats file (XT_FUZZ_STATS) in place: also kept up to date
 * during the run, since a crash ends the process without atexit. */
static void write_stats(void)
{
    static int fd = -2;
    if (fd == -2) {
        const char *path = getenv("XT_FUZZ_STATS");
        fd = path ? open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644) : -1;
    }
    if (fd < 0)
        return;
    char line[96];
    int n = snprintf(line, sizeof(line), "requests %llu executions %llu\n",
                     (unsigned long long)fz.requests, (unsigned long long)fz.executions);
    if (pwrite(fd, line, (size_t)n, 0) < 0)
        return;
}

static void fz_teardown(void)
{
    if (!fz.ready)
        return;
    for (unsigned i = 0; i < FZ_NR_CONFIGS; i++) {
        xt_vbd_close(fz.v[i].vbd);      /* tears the queue down, no thread to join */
        close(fz.v[i].img_fd);
        close(fz.v[i].front_rx);
    }
    xt_transport_close(fz.t);
    xt_simdom_destroy(fz.dom);          /* unlinks its files */
    rmdir(fz.dir);
    write_stats();
    fz.ready = false;
}

static void fz_init(void)
{
    char err[XT_ERRLEN];
    if (!getenv("XT_FUZZ_LOG")) {
        int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (null >= 0)
            xt_set_log_fd(null);
    }
    snprintf(fz.dir, sizeof(fz.dir), "/tmp/xt-fuzz-XXXXXX");
    if (!mkdtemp(fz.dir))
        die("mkdtemp", NULL);
    if (xt_simdom_create(fz.dir, FZ_DOMID, FZ_NR_FRAMES, &fz.dom, err) < 0)
        die("sim domain", err);
    if (xt_transport_sim_open(fz.dir, &fz.t, err) < 0)
        die("sim transport", err);
    for (unsigned i = 0; i < FZ_NR_FRAMES; i++)
        xt_simdom_grant(fz.dom, i, false);
    for (unsigned i = 0; i < FZ_NR_CONFIGS; i++) {
        struct fz_vbd *f = &fz.v[i];
        const struct fz_config *c = &configs[i];
        f->img_fd = memfd_create("xt-fuzz-image", MFD_CLOEXEC);
        if (f->img_fd < 0 || ftruncate(f->img_fd, FZ_IMAGE_BYTES) < 0)
            die("image", NULL);
        char path[64];
        snprintf(path, sizeof(path), "/proc/self/fd/%d", f->img_fd);
        struct xt_vbd_config vc = {
            .path = path, .engine = XT_ENGINE_SYNC, .readonly = (int)c->readonly,
            .max_indirect_segments = c->indirect, .sector_size = c->sector_size,
        };
        if (xt_vbd_open(&vc, &f->vbd, err) < 0)
            die("vbd", err);
        /* The smallest mirror ring: a few large writes overflow it. */
        if (c->mirror && xt_vbd_mirror_enable(f->vbd, FZ_MIRROR_BYTES, 64 * 1024, err) < 0)
            die("mirror", err);
        uint32_t port;
        int tx;
        if (xt_simdom_alloc_port(fz.dom, &port, &f->front_rx, &tx, err) < 0)
            die("port", err);
        close(tx);      /* the guest never kicks: the harness turns the queue */
        queue_setup(f, i, port);
    }
    fz.ready = true;
    atexit(fz_teardown);
}

/* ---- the input ---- */

struct cursor {
    const uint8_t *p;
    size_t left;
};

static void take_bytes(struct cursor *c, void *out, size_t n)
{
    size_t k = n < c->left ? n : c->left;
    memcpy(out, c->p, k);
    memset((uint8_t *)out + k, 0, n - k);
    c->p += k;
    c->left -= k;
}

static uint8_t u8(struct cursor *c)
{
    uint8_t v;
    take_bytes(c, &v, 1);
    return v;
}

static uint32_t u32(struct cursor *c)
{
    uint32_t v;
    take_bytes(c, &v, 4);
    return v;
}

/* ---- the consumer ---- */

static void check_leaks(struct xt_queue *q)
{
    uint64_t in_flight = atomic_load(&q->c.in_flight);
    unsigned free_slots = 0;
    for (struct xt_req *r = q->free_list; r; r = r->next_free)
        if (++free_slots > q->nr_reqs)
            break;
    if (in_flight || free_slots != q->nr_reqs || q->writes_in_flight || q->blocker ||
        q->barrier_running) {
        fprintf(stderr, "fuzz_ring: quiescent queue still holds requests: in_flight %llu, "
                "free %u of %u, writes %u, blocker %p, barrier %d\n",
                (unsigned long long)in_flight, free_slots, q->nr_reqs, q->writes_in_flight,
                (void *)q->blocker, q->barrier_running);
        abort();
    }
    /* The backend never answers more than it took. */
    if ((RING_IDX)(q->ring.req_cons - q->ring.rsp_prod_pvt) != 0) {
        fprintf(stderr, "fuzz_ring: %u requests taken but unanswered\n",
                q->ring.req_cons - q->ring.rsp_prod_pvt);
        abort();
    }
}

/* Turns the queue up to max_turns times, or until it is idle: a turn that
 * changes nothing visible with nothing in flight, or three such turns in a
 * row (a flush's data write completing and its fsync being issued is
 * internal progress that shows in no index). */
static void turn(struct xt_queue *q, unsigned max_turns, bool to_quiescence)
{
    unsigned idle = 0;
    for (unsigned i = 0; i < max_turns; i++) {
        RING_IDX cons = q->ring.req_cons, rsp = q->ring.rsp_prod_pvt;
        uint64_t in_flight = atomic_load(&q->c.in_flight);
        xt_queue_step(q, false);
        fz.requests += (RING_IDX)(q->ring.rsp_prod_pvt - rsp);
        if (q->ring.req_cons != cons || q->ring.rsp_prod_pvt != rsp ||
            atomic_load(&q->c.in_flight) != in_flight)
            idle = 0;
        else if (in_flight == 0 || ++idle == 3)
            return;
    }
    if (to_quiescence) {
        fprintf(stderr, "fuzz_ring: the consumer still makes progress after %u turns\n", max_turns);
        abort();
    }
}

/* The mirror drainer: takes everything out of the tap's ring (touching what
 * it hands out) and runs the resync after a GAP until nothing is dirty. */
static void drain_mirror(xt_vbd *v)
{
    if (!v->mirror)
        return;
    uint64_t disk_chunks = v->sectors * XT_SECTOR_SIZE / (64 * 1024) + 1;
    for (uint64_t round = 0; round < 2 * disk_chunks + 4; round++) {
        struct xt_mirror_batch b;
        unsigned batches = 0;
        while (xt_vbd_mirror_peek(v, 0, FZ_MIRROR_BYTES, 1024, &b) == 1) {
            if (b.nbytes == 0 || b.nbytes > FZ_MIRROR_BYTES || ++batches > 100000) {
                fprintf(stderr, "fuzz_ring: mirror batch of %llu bytes\n",
                        (unsigned long long)b.nbytes);
                abort();
            }
            /* Every page of the batch and its last byte must be readable. */
            volatile uint8_t sum = 0;
            for (uint64_t i = 0; i < b.nbytes; i += 1024)
                sum ^= b.data[i];
            sum ^= b.data[b.nbytes - 1];
            (void)sum;
            xt_vbd_mirror_release(v, b.nbytes);
        }
        if (xt_vbd_mirror_resync_step(v) <= 0)
            return;
    }
    fprintf(stderr, "fuzz_ring: the mirror's resync does not end\n");
    abort();
}

static void reset(struct fz_vbd *f, unsigned cfg_idx, RING_IDX start)
{
    struct xt_queue *q = f->q;
    /* A fresh guest: zeroed ring and data pages, every frame granted to
     * dom0 read-write (gref == frame), a zeroed image. */
    for (unsigned i = 0; i < FZ_NR_FRAMES; i++)
        entries()[i] = (grant_entry_v1_t){ .flags = GTF_permit_access, .domid = 0, .frame = i };
    memset(xt_simdom_frame(fz.dom, 0), 0, (size_t)FZ_NR_FRAMES * XT_PAGE_SIZE);
    if (ftruncate(f->img_fd, 0) < 0 || ftruncate(f->img_fd, FZ_IMAGE_BYTES) < 0)
        die("image reset", NULL);
    xt_fifo_drain(f->front_rx);

    blkif_sring_t *s = xt_simdom_frame(fz.dom, 2 * cfg_idx);
    s->req_prod = s->rsp_prod = start;
    s->req_event = s->rsp_event = start + 1;
    BACK_RING_ATTACH(&q->ring, (blkif_sring_t *)q->ring_addr, start, XT_PAGE_SIZE * q->nr_ring_pages);
    q->ring.nr_ents = xt_abi_ring_slots(q->vbd->protocol, q->nr_ring_pages);
    q->rsp_notified = start;

    memset(q->rsp, 0, q->nr_reqs * sizeof(*q->rsp));
    q->free_list = NULL;
    for (unsigned i = q->nr_reqs; i-- > 0;) {
        q->reqs[i].next_free = q->free_list;
        q->free_list = &q->reqs[i];
    }
    atomic_store(&q->c.in_flight, 0);
    q->writes_in_flight = 0;
    q->blocker = NULL;
    q->barrier_running = false;
    q->ring_dead = false;
    q->stopping = false;
    q->errors_logged = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fz.ready)
        fz_init();
    if ((++fz.executions & 1023) == 0)
        write_stats();
    struct cursor c = { data, size };
    unsigned cfg_idx = u8(&c) % FZ_NR_CONFIGS;
    struct fz_vbd *f = &fz.v[cfg_idx];
    struct xt_queue *q = f->q;
    RING_IDX start = u32(&c);
    reset(f, cfg_idx, start);

    /* The guest's view of its ring: the frontend-side pointer into the frames. */
    blkif_sring_t *s = xt_simdom_frame(fz.dom, 2 * cfg_idx);
    uint8_t *slots = (uint8_t *)s->ring;
    unsigned nr_slots = RING_SIZE(&q->ring);
    unsigned esize = q->entry_size;
    RING_IDX prod = start;

    while (c.left) {
        uint8_t cmd = u8(&c);
        switch (cmd % 10) {
        case 0: {           /* SLOT */
            unsigned slot = u8(&c) & (nr_slots - 1);
            take_bytes(&c, slots + (size_t)slot * esize, esize);
            break;
        }
        case 1:             /* PUSH */
            take_bytes(&c, slots + (size_t)(prod & (nr_slots - 1)) * esize, esize);
            s->req_prod = ++prod;
            break;
        case 2: {           /* GRANT */
            unsigned gref = u8(&c) % FZ_NR_FRAMES;
            take_bytes(&c, &entries()[gref], sizeof(grant_entry_v1_t));
            break;
        }
        case 3: {           /* PAGE */
            unsigned frame = FZ_RING_FRAMES + u8(&c) % FZ_NR_DATA;
            unsigned off = (u8(&c) | (unsigned)u8(&c) << 8) % XT_PAGE_SIZE;
            unsigned n = u8(&c);
            if (n > XT_PAGE_SIZE - off)
                n = XT_PAGE_SIZE - off;
            take_bytes(&c, (uint8_t *)xt_simdom_frame(fz.dom, frame) + off, n);
            break;
        }
        case 4:             /* PROD */
            prod = u32(&c);
            s->req_prod = prod;
            break;
        case 5:             /* STEP */
            turn(q, 1u + u8(&c), false);
            break;
        case 6:             /* EVENT */
            s->rsp_prod = u32(&c);
            s->req_event = u32(&c);
            break;
        case 7:             /* RUN */
            turn(q, FZ_MAX_TURNS, true);
            break;
        case 8:             /* DRAIN */
            drain_mirror(f->vbd);
            break;
        case 9: {           /* CHECKPOINT */
            char label[300], err[XT_ERRLEN];
            unsigned n = u8(&c);
            take_bytes(&c, label, n);
            label[n] = 0;
            if (f->vbd->mirror && xt_vbd_mirror_checkpoint(f->vbd, label, err) < 0) {
                fprintf(stderr, "fuzz_ring: checkpoint: %s\n", err);
                abort();
            }
            break;
        }
        }
    }
    turn(q, FZ_MAX_TURNS, true);
    check_leaks(q);
    drain_mirror(f->vbd);
    return 0;
}
