/*
 * xt_internal.h — what the shim's C files share and cffi does not see:
 * the transport and I/O engine interfaces, the queue and VBD structures.
 */
#ifndef XENTAP_XT_INTERNAL_H
#define XENTAP_XT_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

/* Xen's public headers leave the memory barriers of ring.h to the user
 * (tools define __XEN_TOOLS__ and their own xen_mb, as xenctrl.h does). */
#define __XEN_TOOLS__ 1
#define xen_mb() atomic_thread_fence(memory_order_seq_cst)
#define xen_rmb() atomic_thread_fence(memory_order_acquire)
#define xen_wmb() atomic_thread_fence(memory_order_release)
#include <string.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>

#include "xt.h"

/* CLOCK_MONOTONIC in ns (the vDSO: no system call) */
static inline uint64_t xt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define XT_PAGE_SIZE 4096u
#define XT_PAGE_SHIFT 12
#define XT_SECTORS_PER_PAGE (XT_PAGE_SIZE / XT_SECTOR_SIZE)
/* Segments that fit one indirect page. */
#define XT_SEGS_PER_INDIRECT_PAGE (XT_PAGE_SIZE / sizeof(struct blkif_request_segment))

/* ---- logging and errors ---- */

void xt_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Writes a one-line reason into err (XT_ERRLEN) and returns -errnum. */
int xt_fail(char *err, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- transport: grant copy/map and event channels ---- */

/* One segment of a grant copy between a guest page and a local buffer. */
struct xt_copy {
    uint32_t gref;
    uint16_t offset;        /* within the guest page */
    uint16_t len;           /* bytes, offset + len <= page */
    void *local;
    int16_t status;         /* out: 0 or a GNTST_* (negative) */
};

enum xt_copy_dir { XT_COPY_FROM_GUEST, XT_COPY_TO_GUEST };

/* An event channel bound to a frontend's port; fd polls readable on events. */
struct xt_evtchn {
    int fd;
    uint32_t local_port;
    void *priv;
};

struct xt_transport_ops {
    const char *name;
    /* Maps `n` granted pages of `domid` contiguously, read-write. */
    void *(*map)(xt_transport *t, uint16_t domid, const uint32_t *grefs,
                 unsigned n, char *err);
    void (*unmap)(xt_transport *t, void *addr, unsigned n);
    /* Copies every segment; each gets its own status. Returns 0 if all
     * succeeded, -1 if any failed. */
    int (*copy)(xt_transport *t, uint16_t domid, enum xt_copy_dir dir,
                struct xt_copy *segs, unsigned n);
    int (*bind)(xt_transport *t, uint16_t domid, uint32_t remote_port,
                struct xt_evtchn *ev, char *err);
    void (*unbind)(xt_transport *t, struct xt_evtchn *ev);
    void (*notify)(xt_transport *t, struct xt_evtchn *ev);
    /* Consumes pending events on ev (after its fd polled readable) and
     * re-enables delivery. */
    void (*ack)(xt_transport *t, struct xt_evtchn *ev);
    void (*close)(xt_transport *t);
};

struct xt_transport {
    const struct xt_transport_ops *ops;
};

/* ---- the sim domain's layout, shared by its frontend and backend sides ---- */

#define XT_SIMDOM_MAGIC 0x4d4f444d49535458ull /* "XTSIMDOM" */
#define XT_SIMDOM_VERSION 1u

struct xt_simdom_header {
    uint64_t magic;
    uint32_t version;
    uint16_t domid;
    uint16_t pad;
    uint32_t nr_grants;     /* grant_entry_v1 entries after the header page */
    uint32_t nr_pages;      /* frames after the entry pages */
};

/* Byte offsets inside the grant-table memfd. */
static inline uint64_t xt_simdom_entries_off(void) { return XT_PAGE_SIZE; }
static inline uint64_t xt_simdom_entry_pages(uint32_t nr_grants)
{
    return ((uint64_t)nr_grants * sizeof(grant_entry_v1_t) + XT_PAGE_SIZE - 1) / XT_PAGE_SIZE;
}
static inline uint64_t xt_simdom_frames_off(uint32_t nr_grants)
{
    return XT_PAGE_SIZE * (1 + xt_simdom_entry_pages(nr_grants));
}

/* Paths inside a sim domain directory. */
int xt_simdom_path(char *out, size_t len, const char *dir, const char *leaf);
int xt_simdom_evtchn_path(char *out, size_t len, const char *dir,
                          uint32_t port, char side);

/* ---- direct I/O (dio.c) ---- */

/* The file offset alignment direct I/O needs on fd: > 0 as the kernel
 * reports it, 0 if the file takes no direct I/O, -1 if the kernel does not
 * say (before Linux 6.1, or a filesystem that does not report it). */
long xt_dio_offset_align(int fd);

/* ---- ring ABIs (abi.c) ---- */

/* A request as read from the ring, whatever the ABI. */
struct xt_ring_req {
    uint8_t operation;
    uint8_t indirect_op;        /* BLKIF_OP_INDIRECT */
    uint8_t flag;               /* BLKIF_OP_DISCARD */
    uint16_t nr_segments;
    uint64_t id;
    uint64_t sector;
    uint64_t nr_sectors;        /* BLKIF_OP_DISCARD */
    uint32_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};

unsigned xt_abi_entry_size(uint32_t protocol);
void xt_abi_get_request(uint32_t protocol, const volatile void *slot, struct xt_ring_req *r);
void xt_abi_put_response(uint32_t protocol, volatile void *slot, uint64_t id,
                         uint8_t operation, int16_t status);
/* The frontend's side of the same layouts (sim blkfront). */
void xt_abi_put_request(uint32_t protocol, volatile void *slot, const struct xt_ring_req *r);
void xt_abi_get_response(uint32_t protocol, const volatile void *slot, uint64_t *id,
                         uint8_t *operation, int16_t *status);
/* Ring slots in `pages` pages for this ABI (a power of two). */
unsigned xt_abi_ring_slots(uint32_t protocol, unsigned pages);

/* ---- I/O engines ---- */

enum xt_io_op { XT_IO_READ, XT_IO_WRITE, XT_IO_FSYNC, XT_IO_PUNCH };

struct xt_io {
    enum xt_io_op op;
    uint64_t offset;
    void *buf;
    size_t len;
    struct iovec *iov;      /* not NULL: the data is here instead of at buf */
    unsigned iovcnt;
    size_t done;            /* engine-private: bytes done so far */
    int res;                /* out: 0 or -errno */
    struct xt_io *next;     /* engine-private list link */
};

struct xt_engine;

struct xt_engine_ops {
    const char *name;
    /* wake_fds are polled too; wait() reports which became readable. */
    int (*init)(struct xt_engine *e, int fd, unsigned depth,
                const int *wake_fds, unsigned nr_wake, char *err);
    void (*submit)(struct xt_engine *e, struct xt_io *io);
    /* Issues what was submitted; if `block`, waits until at least one I/O
     * completes or a wake fd is readable.  Returns the number of completed
     * I/Os stored in done[], and a bit per readable wake fd in *woken. */
    int (*wait)(struct xt_engine *e, struct xt_io **done, unsigned max,
                unsigned *woken, bool block);
    /* Optional, for polling: true if wait() has something to report now.
     * Cheap and syscall-free. */
    bool (*ready)(struct xt_engine *e);
    void (*fini)(struct xt_engine *e);
};

struct xt_engine {
    const struct xt_engine_ops *ops;
    void *priv;
};

extern const struct xt_engine_ops xt_engine_uring;
extern const struct xt_engine_ops xt_engine_threads;
/* Does each I/O at submit time: deterministic, for the fuzzer. */
extern const struct xt_engine_ops xt_engine_sync;
/* Runs one I/O to its end with plain syscalls (the thread and sync engines). */
void xt_io_do(int fd, struct xt_io *io);
/* After a short transfer of n bytes: done grows, and iov skips what was done. */
void xt_io_advance(struct xt_io *io, size_t n);
/* 1 if this kernel lets us set up an io_uring. */
bool xt_uring_available(void);

/* ---- the dataplane ---- */

struct xt_seg {
    uint32_t gref;
    uint8_t first_sect, last_sect;
};

/* A request taken from the ring, preallocated per ring slot. */
struct xt_req {
    struct xt_queue *q;
    uint64_t id;                /* the guest's, echoed */
    RING_IDX ring_idx;          /* where the request was taken from */
    uint8_t operation;          /* as in the ring (INDIRECT stays INDIRECT) */
    uint8_t io_op;              /* effective BLKIF_OP_READ/WRITE/FLUSH */
    uint8_t stage;              /* flush or barrier with data: 0 write, 1 fsync */
    uint16_t nr_segs;
    uint64_t sector;
    uint64_t discard_sectors;
    struct xt_seg *segs;        /* XT_MAX_INDIRECT_SEGMENTS entries */
    uint8_t *buf;               /* bounce buffer, page aligned */
    struct iovec *iov;          /* a direct read's segments in the guest's pages (persistent grants) */
    size_t buf_cap, len;
    struct xt_io io;
    struct xt_req *next_free;
    uint64_t t_taken, t_engine;  /* CLOCK_MONOTONIC ns: taken from the ring, handed to the engine */
};

struct xt_counters {
    atomic_uint_fast64_t reqs_read, reqs_write, reqs_flush, reqs_barrier, reqs_discard, reqs_indirect;
    atomic_uint_fast64_t bytes_read, bytes_written;
    atomic_uint_fast64_t err_bad_request, err_unsupported, err_grant, err_io;
    atomic_uint_fast64_t in_flight, buffer_bytes, ring_stopped;
    /* where a read's or write's time went (xt_stats has the meaning) */
    atomic_uint_fast64_t timed, ns_to_engine, ns_at_engine, ns_to_answer;
    atomic_uint_fast64_t grants_mapped;
};

/* An answer held until every request taken before it is answered too. */
/*
 * The answer being published, kept in the shared ring page's padding
 * (blkif leaves __pad unused; Linux blkfront zeroes it at init and never
 * reads it).  An answer is written into its ring slot (over its request)
 * before rsp_prod moves past it; a daemon killed between the two would leave
 * a slot that is neither a request nor a visible answer.  The log names the
 * slot and the answer first, so the next daemon finishes the publication
 * (xt_publish_recover) instead of reading the answer back as a request.
 * All fields are 32-bit or smaller: __pad starts 4-byte aligned.
 */
struct xt_publish_log {
    uint32_t check;             /* XT_PUBLISH_MAGIC ^ idx, written last */
    uint32_t idx;               /* the slot (a RING_IDX) */
    uint32_t id_lo, id_hi;
    uint8_t operation, reserved;
    int16_t status;
};
#define XT_PUBLISH_MAGIC 0x78747062u    /* "xtpb" */

/* Finishes a publication a killed daemon left half done; returns the
 * response producer index to attach at. */
RING_IDX xt_publish_recover(blkif_sring_t *sring, uint32_t protocol, unsigned entry_size,
                            unsigned nr_ents);

struct xt_rsp {
    uint64_t id;
    int16_t status;
    uint8_t operation;
    bool ready;
    uint64_t t_taken, t_engine, t_done; /* its request's times (xt_req); t_done 0: not timed */
};

struct xt_queue {
    struct xt_vbd *vbd;
    unsigned idx;
    blkif_back_ring_t ring;
    void *ring_addr;
    unsigned nr_ring_pages;
    struct xt_evtchn ev;
    bool ev_bound;
    struct xt_engine engine;
    int stop_fd;                /* eventfd: ask the thread to stop */
    pthread_t thread;
    bool thread_started;
    struct xt_req *reqs;        /* ring-size slots */
    struct xt_seg *seg_store;
    struct xt_req *free_list;
    unsigned nr_reqs;
    unsigned entry_size;        /* of a ring slot, by ABI */
    struct xt_rsp *rsp;         /* answers waiting to be published in ring order */
    RING_IDX rsp_notified;      /* rsp_prod when the guest was last considered for a kick */
    unsigned writes_in_flight;
    struct xt_req *blocker;     /* a flush or barrier waiting for writes to drain */
    bool barrier_running;       /* a barrier holds back later requests */
    bool ring_dead;             /* protocol violation: no more service */
    bool stopping;
    unsigned errors_logged;
    uint64_t poll_ns;           /* current polling window (adaptive, <= vbd->poll_max_ns) */
    struct blkif_request_segment ind_segs[XT_MAX_INDIRECT_SEGMENTS];
    struct xt_copy copies[XT_MAX_INDIRECT_SEGMENTS];
    struct xt_counters c;
    uint64_t t_seen;            /* when the last batch of completions was seen */
    /* Persistent grants: gref -> the guest page mapped for it, open
     * addressing over pgrant_slots (a power of two), as many as
     * c.grants_mapped; NULL when the frontend did not ask for them. */
    struct xt_pgrant *pgrants;
    unsigned pgrant_slots;
    bool direct_reads_failed;
    struct iovec *iov_store;
};

struct xt_pgrant {
    uint32_t gref;
    uint8_t *page;              /* NULL: a free slot */
};

/* With persistent grants: the queue's table of mapped pages and each
 * request's room for its segments as iovecs (queue_teardown frees them). */
int xt_queue_persistent_init(struct xt_queue *q, unsigned max_segs, char *err);
/* The process-wide count of persistent grant mappings (xt_set_persistent_grants_limit):
 * take one before mapping (false: over the limit), give back those unmapped. */
bool xt_pgrant_take(void);
void xt_pgrant_give(uint64_t n);

struct xt_vbd {
    int fd;
    char *path;
    uint64_t sectors;
    bool readonly;
    bool direct;
    bool is_blockdev;
    uint32_t max_indirect;
    uint64_t poll_max_ns;       /* 0: queue threads never poll */
    uint32_t sector_size, physical_sector_size;
    uint32_t discard_granularity;   /* 0: no discard */
    uint32_t discard_alignment;
    int engine_kind;
    const struct xt_engine_ops *engine_ops;
    xt_transport *t;
    uint16_t domid;
    uint32_t protocol;
    bool persistent;            /* negotiated: the frontend asked for persistent grants */
    unsigned nr_queues;
    struct xt_queue *queues;
    atomic_uint state;
    pthread_mutex_t lock;       /* connect/disconnect */
    struct xt_counters closed;  /* counters of queues already torn down */
    struct xt_mirror *mirror;   /* NULL: mirroring off; set only while not connected */
};

/* ---- the tap (mirror.c) ---- */

#define XT_MREC_MARKER_MASK 0xff000000u
#define XT_MREC_FLUSH ((uint32_t)XT_MK_FLUSH << XT_MREC_KIND_SHIFT)
#define XT_MREC_GAP ((uint32_t)XT_MK_GAP << XT_MREC_KIND_SHIFT)
#define XT_MREC_RESYNC ((uint32_t)XT_MK_RESYNC << XT_MREC_KIND_SHIFT)
#define XT_MREC_RESYNC_END ((uint32_t)XT_MK_RESYNC_END << XT_MREC_KIND_SHIFT)
#define XT_MREC_CHECKPOINT ((uint32_t)XT_MK_CHECKPOINT << XT_MREC_KIND_SHIFT)

struct xt_mirror;
int xt_mirror_create(struct xt_mirror **out, uint64_t ring_bytes, uint32_t chunk_bytes,
                     uint64_t disk_sectors, char *err);
void xt_mirror_destroy(struct xt_mirror *m);
void xt_mirror_write(struct xt_mirror *m, uint64_t sector, const void *data, uint32_t len,
                     uint32_t flags);
void xt_mirror_marker(struct xt_mirror *m, uint32_t kind, uint64_t sector, const void *payload,
                      uint32_t len);
int xt_mirror_peek(struct xt_mirror *m, uint64_t skip, uint64_t max_bytes, uint32_t max_records,
                   struct xt_mirror_batch *out);
void xt_mirror_release(struct xt_mirror *m, uint64_t nbytes);
int xt_mirror_resync_step(struct xt_mirror *m);
void xt_mirror_get_stats(struct xt_mirror *m, struct xt_mirror_stats *out);
int xt_mirror_wake_fd(struct xt_mirror *m);
bool xt_mirror_arm_wake(struct xt_mirror *m, uint64_t sent);

void *xt_queue_main(void *arg);
/* One turn of a queue's loop: take requests, wait (if may_block), complete.
 * Returns false once the queue has stopped and answered everything. */
bool xt_queue_step(struct xt_queue *q, bool may_block);

#endif
