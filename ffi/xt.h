/*
 * xt.h — the whole cffi-visible API of the xentap shim.
 *
 * The shim is a userspace Xen PV block backend (blkif).  Python opens a VBD
 * on an image, connects it to a frontend's rings over a transport (real Xen
 * or the `sim` stand-in), and reads counters; every request is served in C
 * threads, one per ring (queue).  The sim blkfront (xt_front_*) is a
 * frontend for tests, benchmarks and the demo.
 *
 * Conventions: functions return 0 or a negative errno and, on failure, write
 * a one-line reason into `err` (XT_ERRLEN bytes).  build_shim.py feeds this
 * file to cffi with the preprocessor lines removed, so constants are enums
 * and array sizes are literals (their enum names are in the comments).
 */
#ifndef XENTAP_XT_H
#define XENTAP_XT_H

#include <stddef.h>
#include <stdint.h>

enum {
    XT_ERRLEN = 256,
    XT_MAX_QUEUES = 8,          /* multi-queue-max-queues we advertise */
    XT_MAX_RING_ORDER = 4,      /* max-ring-page-order we advertise */
    XT_MAX_RING_PAGES = 16,     /* 1 << XT_MAX_RING_ORDER */
    XT_MAX_INDIRECT_SEGMENTS = 256, /* feature-max-indirect-segments */
    XT_SECTOR_SIZE = 512,       /* blkif sector numbers are always 512 B */
    XT_DEFAULT_POLL_US = 200,   /* a queue thread's polling window, at most (xt_vbd_config.poll_us) */
    XT_MAX_PERSISTENT_GRANTS = 1056,    /* guest pages kept mapped per queue (Linux blkback's default) */
};

/* I/O engines. */
enum { XT_ENGINE_AUTO = 0, XT_ENGINE_URING = 1, XT_ENGINE_THREADS = 2, XT_ENGINE_SYNC = 3 };

/* O_DIRECT on the image (xt_vbd_config.direct).  AUTO uses it where the
 * image takes direct I/O of one logical sector, and the page cache elsewhere
 * (tmpfs, some network filesystems, a device with larger sectors). */
enum { XT_DIRECT_OFF = 0, XT_DIRECT_ON = 1, XT_DIRECT_AUTO = 2 };

/* Ring ABIs (the frontend's `protocol` key: "x86_64-abi" is native here). */
enum { XT_PROTO_NATIVE = 0, XT_PROTO_X86_32 = 1 };

/* VBD states, as xt_stats.state. */
enum { XT_STATE_OPEN = 1, XT_STATE_CONNECTED = 2, XT_STATE_FAILED = 3 };

/* ------------------------------------------------------------------ */
/* Transports: how the backend reaches a frontend's memory and events. */

typedef struct xt_transport xt_transport;

/* The sim transport: `simdir` is a sim domain made by xt_simdom_create. */
int xt_transport_sim_open(const char *simdir, xt_transport **out, char *err);
/* The xen transport: libxengnttab + libxenevtchn (needs /dev/xen/gntdev). */
int xt_transport_xen_open(xt_transport **out, char *err);
void xt_transport_close(xt_transport *t);
const char *xt_transport_name(const xt_transport *t);

/* A sim domain: a sealed memfd acting as the domain's grant table (v1
 * entries + pages, gref i is entry i) and FIFOs as its event channels, all
 * found through the directory `simdir`.  The creating process must keep
 * running while the domain lives (the memfd is published as /proc/PID/fd/N),
 * like a domain whose death ends its grants. */
typedef struct xt_simdom xt_simdom;
int xt_simdom_create(const char *simdir, uint16_t domid, uint32_t nr_pages,
                     xt_simdom **out, char *err);
void xt_simdom_destroy(xt_simdom *d);

/* ------------------------------------------------------------------ */
/* VBDs. */

typedef struct xt_vbd xt_vbd;

struct xt_vbd_config {
    const char *path;           /* raw image file or block device */
    int engine;                 /* XT_ENGINE_* */
    int direct;                 /* XT_DIRECT_* */
    int readonly;               /* refuse writes */
    uint32_t max_indirect_segments; /* 0: no indirect; max XT_MAX_INDIRECT_SEGMENTS */
    uint32_t sector_size;       /* logical: 512 or 4096; 0: the device's (files: 512) */
    uint32_t physical_sector_size;  /* 0: the device's (files: their block size) */
    uint32_t poll_us;           /* adaptive polling before a queue thread sleeps, at most
                                   this long (io_uring engine); 0: never poll */
};

/* What a VBD can do: the source of every feature key the backend writes. */
struct xt_vbd_info {
    uint64_t sectors;           /* size in 512-byte units (blkif's, always) */
    uint32_t sector_size;       /* logical, bytes */
    uint32_t physical_sector_size;
    uint32_t readonly;
    uint32_t is_blockdev;
    uint32_t feature_flush;
    uint32_t feature_barrier;
    uint32_t feature_discard;
    uint32_t discard_granularity;   /* bytes */
    uint32_t discard_alignment;     /* bytes */
    uint32_t discard_secure;
    uint32_t max_indirect_segments;
    uint32_t max_ring_order;
    uint32_t max_queues;
    uint32_t direct;            /* 1: I/O bypasses the page cache (O_DIRECT) */
    uint32_t feature_persistent;    /* persistent grants: a frontend's pages stay mapped */
};

/* What the frontend published: ring pages and event channel per queue. */
struct xt_ring_params {
    uint16_t domid;             /* the frontend's domain */
    uint32_t protocol;          /* XT_PROTO_* */
    uint32_t nr_queues;         /* 1 .. XT_MAX_QUEUES */
    uint32_t ring_order;        /* 0 .. XT_MAX_RING_ORDER */
    uint32_t ring_ref[128];     /* [queue * XT_MAX_RING_PAGES + page] */
    uint32_t evtchn[8];         /* [queue], the frontend's unbound port */
    uint32_t persistent;        /* the frontend's feature-persistent: it grants its data
                                   pages once and keeps them granted until it disconnects */
};

struct xt_stats {
    uint32_t state;             /* XT_STATE_* */
    uint32_t nr_queues;
    uint64_t sectors;           /* disk size in 512-byte sectors */
    uint64_t reqs_read, reqs_write, reqs_flush, reqs_barrier, reqs_discard, reqs_indirect;
    uint64_t bytes_read, bytes_written;
    uint64_t err_bad_request;   /* malformed by the guest: BLKIF_RSP_ERROR */
    uint64_t err_unsupported;   /* unknown operation: BLKIF_RSP_EOPNOTSUPP */
    uint64_t err_grant;         /* grant copy or map refused */
    uint64_t err_io;            /* the image returned an error */
    uint64_t in_flight;         /* requests taken from rings, not yet answered */
    uint64_t buffer_bytes;      /* bounce buffers held (peak in-flight data) */
    uint64_t ring_stopped;      /* rings stopped for a protocol violation */
    /* Where the time of the reads and writes answered OKAY went, summed over
     * `timed` of them (CLOCK_MONOTONIC ns): to_engine from being taken off
     * the ring to being handed to the I/O engine (parsing, the grant copy of
     * a write's data, waiting behind the requests taken with it);
     * at_engine from there to the shim seeing it done (the disk, and the
     * kernel on both sides of it); to_answer from there to its answer being
     * in the ring for the guest (a read's grant copy, the tap, answers
     * published in ring order). */
    uint64_t timed, ns_to_engine, ns_at_engine, ns_to_answer;
    uint64_t grants_mapped;     /* the guest's pages kept mapped (persistent grants) */
};

int xt_vbd_open(const struct xt_vbd_config *cfg, xt_vbd **out, char *err);
uint64_t xt_vbd_sectors(const xt_vbd *v);
void xt_vbd_info(const xt_vbd *v, struct xt_vbd_info *out);
const char *xt_vbd_engine_name(const xt_vbd *v);
int xt_vbd_connect(xt_vbd *v, xt_transport *t, const struct xt_ring_params *p,
                   char *err);
/* Stops the queue threads after answering what is in flight; unmaps rings. */
void xt_vbd_disconnect(xt_vbd *v);
void xt_vbd_close(xt_vbd *v);
void xt_vbd_stats(const xt_vbd *v, struct xt_stats *out);

/* ------------------------------------------------------------------ */
/* The tap: the VBD's mirror ring (see mirror.c).  A record is laid out as a
 * record of the wire protocol's WRITES batch: this header, then the data
 * (none for DISCARD/ZEROES).  Markers carry their kind in flags' top byte
 * and a small payload of `length` bytes (padded to 8 in the ring). */

struct xt_mirror_rec {
    uint64_t seq;
    uint64_t timestamp_ns;      /* completion, CLOCK_REALTIME */
    uint64_t sector;            /* 512-byte units */
    uint32_t length;            /* bytes of the write; payload bytes of a marker */
    uint32_t flags;             /* XT_MREC_*, or XT_MK_* << XT_MREC_KIND_SHIFT */
};

/* Record flags: the same bits as the wire protocol's WriteFlags. */
enum { XT_MREC_FUA = 1, XT_MREC_DISCARD = 2, XT_MREC_ZEROES = 4, XT_MREC_KIND_SHIFT = 24 };
/* What xt_vbd_mirror_peek found: a run of write records, or one marker. */
enum { XT_MK_WRITES = 1, XT_MK_FLUSH = 2, XT_MK_GAP = 3, XT_MK_RESYNC = 4,
       XT_MK_RESYNC_END = 5, XT_MK_CHECKPOINT = 6 };
/* GAP reasons (payload: dirty chunks u64, reason u64). */
enum { XT_GAP_RING_OVERFLOW = 1 };

struct xt_mirror_batch {
    uint32_t kind;              /* XT_MK_*; 0: the ring is empty */
    uint32_t count;             /* records in the run (1 for a marker) */
    uint64_t first_seq;
    const uint8_t *data;        /* the records as they lie in the ring */
    uint64_t nbytes;            /* bytes at data (headers and data) */
    uint64_t data_bytes;        /* write data in the run */
    uint64_t sector;            /* a marker's sector (RESYNC: the chunk's start) */
    uint64_t timestamp_ns;      /* a marker's */
    uint32_t length;            /* a marker's payload bytes (after its header) */
};

struct xt_mirror_stats {
    uint64_t ring_bytes, used_bytes, chunk_bytes;
    uint64_t next_seq;
    uint64_t records, markers, bytes;
    uint64_t overflows;         /* writes that did not fit: in the dirty bitmap */
    uint64_t overflow_bytes;
    uint64_t markers_dropped;
    uint64_t dirty_chunks;
    uint64_t gaps, resyncs;
    uint32_t gap_pending, resyncing;
};

/* Mirroring starts with the next write; only while not connected. */
int xt_vbd_mirror_enable(xt_vbd *v, uint64_t ring_bytes, uint32_t chunk_bytes, char *err);
/* Looks at what lies `skip` bytes past the oldest unreleased record (what
 * was sent but not yet acknowledged stays in the ring until released).
 * Returns 1 and fills out, 0 when there is nothing more; -ENODEV if off. */
int xt_vbd_mirror_peek(xt_vbd *v, uint64_t skip, uint64_t max_bytes, uint32_t max_records,
                       struct xt_mirror_batch *out);
void xt_vbd_mirror_release(xt_vbd *v, uint64_t nbytes);
/* After a GAP: appends the next RESYNC marker (or RESYNC_END); returns 1 if
 * it appended one, 0 when nothing is dirty, -ENOSPC when the ring is full. */
int xt_vbd_mirror_resync_step(xt_vbd *v);
/* A user checkpoint tag, in write order. */
int xt_vbd_mirror_checkpoint(xt_vbd *v, const char *label, char *err);
int xt_vbd_mirror_stats(xt_vbd *v, struct xt_mirror_stats *out);
/* An eventfd that becomes readable when the ring stops being empty or
 * passes a quarter full (the drainer polls it; read it to clear), and on
 * the next record after xt_vbd_mirror_arm_wake. */
int xt_vbd_mirror_wake_fd(xt_vbd *v);
/* Before a consumer that sent the first `sent` bytes past the oldest
 * unreleased record sleeps on the wake fd: the next record wakes it.
 * Returns 0 when armed; 1, not armed, if there is already more than `sent`
 * (do not sleep unless something else, such as credit, holds it back);
 * -ENODEV if mirroring is off. */
int xt_vbd_mirror_arm_wake(xt_vbd *v, uint64_t sent);

/* Where the shim writes its log lines (default 2, stderr). */
void xt_set_log_fd(int fd);

/* Persistent grants kept mapped by the whole process, at most.  Each is a
 * mapping (a VMA) of its own; past vm.max_map_count every mmap of the
 * process fails, io_uring's and the heap's too.  Default (and after 0):
 * half of vm.max_map_count.  Returns the limit now in force. */
uint64_t xt_set_persistent_grants_limit(uint64_t n);

/* ------------------------------------------------------------------ */
/* The sim blkfront: a frontend that drives the ring protocol as Linux's
 * xen-blkfront does, with fio-like workloads. */

typedef struct xt_front xt_front;

struct xt_front_config {
    const char *simdir;         /* its sim domain */
    uint32_t nr_queues;
    uint32_t ring_order;
    uint32_t max_indirect_segments; /* what the backend advertised; 0: none */
    uint64_t sectors;           /* disk size the backend advertised */
    uint32_t protocol;          /* XT_PROTO_* */
};

struct xt_workload {
    uint32_t block_size;        /* bytes, multiple of 512 */
    uint32_t queue_depth;       /* per queue */
    uint32_t read_pct;          /* 0..100 */
    uint32_t sequential;        /* 0: random offsets */
    uint64_t offset, size;      /* region in bytes; size 0: whole disk */
    double seconds;             /* stop after this long (0: no limit) */
    uint64_t max_ios;           /* stop after this many (0: no limit) */
    uint32_t verify;            /* write patterns, check them on reads */
    uint32_t flush_every;       /* a FLUSH after every N writes (0: never) */
    uint32_t barrier_every;     /* a WRITE_BARRIER after every N writes (0: never) */
    uint32_t discard_pct;       /* share of DISCARDs of a whole block (0..100) */
    uint64_t seed;
    uint64_t rate_iops;         /* at most this many I/Os a second, all queues (0: no limit) */
};

struct xt_front_result {
    uint64_t ios, reads, writes, flushes, barriers, discards;
    uint64_t bytes_read, bytes_written;
    uint64_t errors;            /* responses other than BLKIF_RSP_OKAY */
    uint64_t verify_failures;   /* sectors whose content was wrong */
    uint64_t first_bad_sector;
    uint64_t flush_order_violations; /* a flush or barrier answered before an earlier write, or a write before an earlier barrier */
    double seconds;
    double lat_us_p50, lat_us_p99, lat_us_max, lat_us_mean;
    /* The sim transport's events carry their send time: how long the guest
     * took to run again after an event that found it asleep (the median of
     * `wakes` such events), its part of every round trip it slept in. */
    uint64_t wakes;
    double wake_us_p50;
};

int xt_front_open(const struct xt_front_config *cfg, xt_front **out,
                  struct xt_ring_params *params, char *err);
int xt_front_run(xt_front *f, const struct xt_workload *w,
                 struct xt_front_result *res, char *err);

/* A recorded guest's I/O, replayed in order (xt_front_replay). */
enum { XT_REPLAY_WRITE = 1, XT_REPLAY_FLUSH = 2 };
struct xt_replay_op {
    uint64_t sector;
    uint32_t len;               /* bytes, a multiple of 512; 0 for a flush */
    uint32_t kind;              /* XT_REPLAY_* */
    const uint8_t *data;        /* len bytes */
};
/* Replays `ops` on queue 0 as a guest's block layer issues them: up to
 * queue_depth writes in flight, never two that overlap, a write larger than
 * one request split into several; a flush is issued once every earlier
 * write is answered, and nothing later before the flush is. */
int xt_front_replay(xt_front *f, const struct xt_replay_op *ops, uint64_t n,
                    uint32_t queue_depth, struct xt_front_result *res, char *err);
/* Asks a running xt_front_run to stop early (from another thread). */
void xt_front_stop(xt_front *f);
void xt_front_close(xt_front *f);

#endif
