/*
 * transport_sim.c — the `sim` transport: a stand-in for the hypervisor's
 * grant table and event channels on a machine without Xen.
 *
 * A sim domain is a directory holding
 *   grant-table      text: "/proc/PID/fd/N", a sealed memfd laid out as
 *                    [header page][grant_entry_v1_t entries][frames]
 *   evtchn-P.b       FIFO: events from the frontend to the backend on port P
 *   evtchn-P.f       FIFO: events from the backend to the frontend
 * A grant ref indexes the entries exactly as in Xen's v1 grant table; an
 * entry grants one frame to a domain (domid), read-only or read-write.  The
 * backend checks every entry as Xen would before copying or mapping, and
 * reaches frames only through copy/map, never by trusting the guest.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "xt_internal.h"
#include "xt_sim.h"

#define SIM_BACKEND_DOMID 0
#define SIM_MAX_PORTS 4096

/* ---------------- the domain (frontend side, and creation) ---------------- */

int xt_simdom_create(const char *dir, uint16_t domid, uint32_t nr_pages,
                     xt_simdom **out, char *err)
{
    if (nr_pages == 0 || nr_pages > (1u << 22))
        return xt_fail(err, EINVAL, "sim domain: %u pages is out of range", nr_pages);
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        return xt_fail(err, errno, "sim domain: mkdir %s: %s", dir, strerror(errno));

    xt_simdom *d = calloc(1, sizeof(*d));
    if (!d)
        return xt_fail(err, ENOMEM, "sim domain: out of memory");
    d->fd = -1;
    snprintf(d->dir, sizeof(d->dir), "%s", dir);
    uint32_t nr_grants = nr_pages;
    d->size = xt_simdom_frames_off(nr_grants) + (uint64_t)nr_pages * XT_PAGE_SIZE;

    int rc;
    d->fd = memfd_create("xentap-simdom", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (d->fd < 0 || ftruncate(d->fd, (off_t)d->size) < 0 ||
        fcntl(d->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        rc = xt_fail(err, errno, "sim domain: memfd: %s", strerror(errno));
        goto fail;
    }
    d->map = mmap(NULL, d->size, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, 0);
    if (d->map == MAP_FAILED) {
        d->map = NULL;
        rc = xt_fail(err, errno, "sim domain: mmap: %s", strerror(errno));
        goto fail;
    }
    d->hdr = d->map;
    d->hdr->magic = XT_SIMDOM_MAGIC;
    d->hdr->version = XT_SIMDOM_VERSION;
    d->hdr->domid = domid;
    d->hdr->nr_grants = nr_grants;
    d->hdr->nr_pages = nr_pages;
    d->alloc = (struct xt_simdom_alloc *)((uint8_t *)d->map + sizeof(struct xt_simdom_header));
    atomic_store(&d->alloc->next_frame, 0);
    atomic_store(&d->alloc->next_port, 1);   /* port 0 is never valid in Xen */

    char path[4096], target[64];
    snprintf(target, sizeof(target), "/proc/%d/fd/%d\n", (int)getpid(), d->fd);
    if ((rc = xt_simdom_path(path, sizeof(path), dir, "grant-table")) < 0) {
        xt_fail(err, -rc, "sim domain: path too long");
        goto fail;
    }
    FILE *f = fopen(path, "w");
    if (!f || fputs(target, f) < 0 || fclose(f) != 0) {
        rc = xt_fail(err, errno, "sim domain: write %s: %s", path, strerror(errno));
        goto fail;
    }
    *out = d;
    return 0;
fail:
    xt_simdom_destroy(d);
    return rc;
}

static int simdom_map_existing(xt_simdom *d, char *err);

int xt_simdom_attach(const char *dir, xt_simdom **out, char *err)
{
    xt_simdom *d = calloc(1, sizeof(*d));
    if (!d)
        return xt_fail(err, ENOMEM, "sim domain: out of memory");
    snprintf(d->dir, sizeof(d->dir), "%s", dir);
    d->fd = -1;
    int rc = simdom_map_existing(d, err);
    if (rc < 0) {
        xt_simdom_destroy(d);
        return rc;
    }
    d->attached = true;
    *out = d;
    return 0;
}

void xt_simdom_destroy(xt_simdom *d)
{
    if (!d)
        return;
    if (!d->attached && d->hdr) {
        /* The domain dies: its event channels and grant table go. */
        uint32_t ports = atomic_load(&d->alloc->next_port);
        char path[4096];
        for (uint32_t p = 1; p < ports && p < SIM_MAX_PORTS; p++) {
            if (xt_simdom_evtchn_path(path, sizeof(path), d->dir, p, 'b') == 0)
                unlink(path);
            if (xt_simdom_evtchn_path(path, sizeof(path), d->dir, p, 'f') == 0)
                unlink(path);
        }
        if (xt_simdom_path(path, sizeof(path), d->dir, "grant-table") == 0)
            unlink(path);
    }
    if (d->map)
        munmap(d->map, d->size);
    if (d->fd >= 0)
        close(d->fd);
    free(d);
}

int xt_simdom_alloc_frames(xt_simdom *d, uint32_t n, uint32_t *first)
{
    uint32_t f = atomic_fetch_add(&d->alloc->next_frame, n);
    if ((uint64_t)f + n > d->hdr->nr_pages)
        return -ENOSPC;
    *first = f;
    return 0;
}

void *xt_simdom_frame(xt_simdom *d, uint32_t frame)
{
    return (uint8_t *)d->map + xt_simdom_frames_off(d->hdr->nr_grants) +
           (uint64_t)frame * XT_PAGE_SIZE;
}

/* gref == frame: each frame has its own entry, granted to the backend. */
uint32_t xt_simdom_grant(xt_simdom *d, uint32_t frame, bool readonly)
{
    grant_entry_v1_t *e = (grant_entry_v1_t *)((uint8_t *)d->map + xt_simdom_entries_off()) + frame;
    e->domid = SIM_BACKEND_DOMID;
    e->frame = frame;
    atomic_thread_fence(memory_order_release);
    e->flags = (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0));
    return frame;
}

void xt_simdom_revoke(xt_simdom *d, uint32_t gref)
{
    grant_entry_v1_t *e = (grant_entry_v1_t *)((uint8_t *)d->map + xt_simdom_entries_off()) + gref;
    e->flags = 0;
}

static int open_fifo(const char *path, bool create, char *err)
{
    if (create && mkfifo(path, 0600) < 0 && errno != EEXIST)
        return xt_fail(err, errno, "event channel: mkfifo %s: %s", path, strerror(errno));
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return xt_fail(err, errno, "event channel %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISFIFO(st.st_mode)) {
        close(fd);
        return xt_fail(err, EINVAL, "event channel %s is not a FIFO", path);
    }
    return fd;
}

/* Frontend: like alloc_unbound; returns the port and the two FIFO fds
 * (listen on rx_fd, notify through tx_fd). */
int xt_simdom_alloc_port(xt_simdom *d, uint32_t *port, int *rx_fd, int *tx_fd, char *err)
{
    uint32_t p = atomic_fetch_add(&d->alloc->next_port, 1);
    if (p >= SIM_MAX_PORTS)
        return xt_fail(err, ENOSPC, "sim domain: out of event channels");
    char pb[4096], pf[4096];
    if (xt_simdom_evtchn_path(pb, sizeof(pb), d->dir, p, 'b') < 0 ||
        xt_simdom_evtchn_path(pf, sizeof(pf), d->dir, p, 'f') < 0)
        return xt_fail(err, ENAMETOOLONG, "sim domain: path too long");
    int rx = open_fifo(pf, true, err);
    if (rx < 0)
        return rx;
    int tx = open_fifo(pb, true, err);
    if (tx < 0) {
        close(rx);
        return tx;
    }
    *port = p;
    *rx_fd = rx;
    *tx_fd = tx;
    return 0;
}

/* An event carries nothing on Xen; here it carries the time it was sent
 * (xt_now_ns), so that the sim blkfront can tell how long its wake-up took. */
void xt_fifo_notify(int fd)
{
    uint64_t sent = xt_now_ns();
    /* A full FIFO already holds a pending event: EAGAIN is fine. */
    ssize_t w = write(fd, &sent, sizeof(sent));
    (void)w;
}

uint64_t xt_fifo_drain(int fd)
{
    uint64_t buf[32];
    uint64_t first = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0) {
        if (!first && n >= (ssize_t)sizeof(buf[0]))
            first = buf[0];
        if (n < (ssize_t)sizeof(buf))
            break;
    }
    return first;
}

/* ---------------- the backend's transport ---------------- */

struct sim_transport {
    struct xt_transport base;
    xt_simdom *dom;
    struct xt_simdom_header hdr;    /* copied once and validated */
    grant_entry_v1_t *entries;
    uint8_t *frames;
};

static int simdom_map_existing(xt_simdom *d, char *err)
{
    char path[4096], target[256];
    if (xt_simdom_path(path, sizeof(path), d->dir, "grant-table") < 0)
        return xt_fail(err, ENAMETOOLONG, "sim domain: path too long");
    FILE *f = fopen(path, "r");
    if (!f)
        return xt_fail(err, errno, "sim domain %s: %s", d->dir, strerror(errno));
    char *ok = fgets(target, sizeof(target), f);
    fclose(f);
    if (!ok)
        return xt_fail(err, EINVAL, "sim domain %s: empty grant-table file", d->dir);
    target[strcspn(target, "\n")] = 0;
    d->fd = open(target, O_RDWR | O_CLOEXEC);
    if (d->fd < 0)
        return xt_fail(err, errno, "sim domain %s: grant table %s: %s (is its domain alive?)",
                       d->dir, target, strerror(errno));
    struct stat st;
    int seals = fcntl(d->fd, F_GET_SEALS);
    if (fstat(d->fd, &st) < 0 || seals < 0 || !(seals & F_SEAL_SHRINK))
        return xt_fail(err, EINVAL, "sim domain %s: grant table is not a sealed memfd", d->dir);
    if ((uint64_t)st.st_size < 2 * XT_PAGE_SIZE)
        return xt_fail(err, EINVAL, "sim domain %s: grant table too small", d->dir);
    d->size = (uint64_t)st.st_size;
    d->map = mmap(NULL, d->size, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, 0);
    if (d->map == MAP_FAILED) {
        d->map = NULL;
        return xt_fail(err, errno, "sim domain %s: mmap: %s", d->dir, strerror(errno));
    }
    d->hdr = d->map;
    d->alloc = (struct xt_simdom_alloc *)((uint8_t *)d->map + sizeof(struct xt_simdom_header));
    /* The header is guest memory: copy once, then check it. */
    struct xt_simdom_header h;
    memcpy(&h, d->hdr, sizeof(h));
    if (h.magic != XT_SIMDOM_MAGIC || h.version != XT_SIMDOM_VERSION)
        return xt_fail(err, EINVAL, "sim domain %s: bad grant table header", d->dir);
    if (h.nr_grants == 0 || h.nr_pages == 0 ||
        xt_simdom_frames_off(h.nr_grants) + (uint64_t)h.nr_pages * XT_PAGE_SIZE > d->size)
        return xt_fail(err, EINVAL, "sim domain %s: grant table sizes disagree with its file", d->dir);
    d->hdr_copy = h;
    return 0;
}

static struct sim_transport *to_sim(xt_transport *t)
{
    return (struct sim_transport *)t;
}

/* Checks a grant entry as Xen would; returns the frame or a GNTST_*. */
static int64_t sim_check_gref(struct sim_transport *s, uint16_t domid, uint32_t gref, bool write)
{
    if (domid != s->hdr.domid)
        return GNTST_bad_domain;
    if (gref >= s->hdr.nr_grants)
        return GNTST_bad_gntref;
    grant_entry_v1_t e;
    memcpy(&e, &s->entries[gref], sizeof(e));   /* one fetch */
    atomic_thread_fence(memory_order_acquire);
    if (!(e.flags & GTF_permit_access) || e.domid != SIM_BACKEND_DOMID)
        return GNTST_permission_denied;
    if (write && (e.flags & GTF_readonly))
        return GNTST_permission_denied;
    if (e.frame >= s->hdr.nr_pages)
        return GNTST_bad_page;
    return e.frame;
}

static void *sim_map(xt_transport *t, uint16_t domid, const uint32_t *grefs,
                     unsigned n, char *err)
{
    struct sim_transport *s = to_sim(t);
    uint8_t *area = mmap(NULL, (size_t)n * XT_PAGE_SIZE, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) {
        xt_fail(err, errno, "map: %s", strerror(errno));
        return NULL;
    }
    for (unsigned i = 0; i < n; i++) {
        int64_t frame = sim_check_gref(s, domid, grefs[i], true);
        if (frame < 0) {
            xt_fail(err, EPERM, "map: grant ref %u of domain %u refused (status %lld)",
                    grefs[i], domid, (long long)frame);
            munmap(area, (size_t)n * XT_PAGE_SIZE);
            return NULL;
        }
        off_t off = (off_t)(xt_simdom_frames_off(s->hdr.nr_grants) + (uint64_t)frame * XT_PAGE_SIZE);
        if (mmap(area + (size_t)i * XT_PAGE_SIZE, XT_PAGE_SIZE, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_FIXED, s->dom->fd, off) == MAP_FAILED) {
            xt_fail(err, errno, "map: %s", strerror(errno));
            munmap(area, (size_t)n * XT_PAGE_SIZE);
            return NULL;
        }
    }
    return area;
}

static void sim_unmap(xt_transport *t, void *addr, unsigned n)
{
    munmap(addr, (size_t)n * XT_PAGE_SIZE);
}

static int sim_copy(xt_transport *t, uint16_t domid, enum xt_copy_dir dir,
                    struct xt_copy *segs, unsigned n)
{
    struct sim_transport *s = to_sim(t);
    int rc = 0;
    for (unsigned i = 0; i < n; i++) {
        struct xt_copy *c = &segs[i];
        if ((unsigned)c->offset + c->len > XT_PAGE_SIZE) {
            c->status = GNTST_bad_copy_arg;
            rc = -1;
            continue;
        }
        int64_t frame = sim_check_gref(s, domid, c->gref, dir == XT_COPY_TO_GUEST);
        if (frame < 0) {
            c->status = (int16_t)frame;
            rc = -1;
            continue;
        }
        uint8_t *page = s->frames + (uint64_t)frame * XT_PAGE_SIZE;
        if (dir == XT_COPY_FROM_GUEST)
            memcpy(c->local, page + c->offset, c->len);
        else
            memcpy(page + c->offset, c->local, c->len);
        c->status = GNTST_okay;
    }
    return rc;
}

struct sim_evtchn {
    int notify_fd;
};

static int sim_bind(xt_transport *t, uint16_t domid, uint32_t remote_port,
                    struct xt_evtchn *ev, char *err)
{
    struct sim_transport *s = to_sim(t);
    if (domid != s->hdr.domid)
        return xt_fail(err, ESRCH, "event channel: no domain %u here", domid);
    if (remote_port == 0 || remote_port >= SIM_MAX_PORTS)
        return xt_fail(err, EINVAL, "event channel: port %u out of range", remote_port);
    char pb[4096], pf[4096];
    if (xt_simdom_evtchn_path(pb, sizeof(pb), s->dom->dir, remote_port, 'b') < 0 ||
        xt_simdom_evtchn_path(pf, sizeof(pf), s->dom->dir, remote_port, 'f') < 0)
        return xt_fail(err, ENAMETOOLONG, "event channel: path too long");
    struct sim_evtchn *se = calloc(1, sizeof(*se));
    if (!se)
        return xt_fail(err, ENOMEM, "event channel: out of memory");
    int rx = open_fifo(pb, false, err);
    if (rx < 0) {
        free(se);
        return xt_fail(err, -rx, "event channel: port %u of domain %u does not exist", remote_port, domid);
    }
    int tx = open_fifo(pf, false, err);
    if (tx < 0) {
        close(rx);
        free(se);
        return xt_fail(err, -tx, "event channel: port %u of domain %u does not exist", remote_port, domid);
    }
    se->notify_fd = tx;
    ev->fd = rx;
    ev->local_port = remote_port;
    ev->priv = se;
    return 0;
}

static void sim_unbind(xt_transport *t, struct xt_evtchn *ev)
{
    struct sim_evtchn *se = ev->priv;
    if (ev->fd >= 0)
        close(ev->fd);
    if (se) {
        close(se->notify_fd);
        free(se);
    }
    ev->fd = -1;
    ev->priv = NULL;
}

static void sim_notify(xt_transport *t, struct xt_evtchn *ev)
{
    struct sim_evtchn *se = ev->priv;
    xt_fifo_notify(se->notify_fd);
}

static void sim_ack(xt_transport *t, struct xt_evtchn *ev)
{
    xt_fifo_drain(ev->fd);
}

static void sim_close(xt_transport *t)
{
    struct sim_transport *s = to_sim(t);
    xt_simdom_destroy(s->dom);
    free(s);
}

static const struct xt_transport_ops sim_ops = {
    .name = "sim",
    .map = sim_map,
    .unmap = sim_unmap,
    .copy = sim_copy,
    .bind = sim_bind,
    .unbind = sim_unbind,
    .notify = sim_notify,
    .ack = sim_ack,
    .close = sim_close,
};

int xt_transport_sim_open(const char *simdir, xt_transport **out, char *err)
{
    struct sim_transport *s = calloc(1, sizeof(*s));
    if (!s)
        return xt_fail(err, ENOMEM, "sim transport: out of memory");
    int rc = xt_simdom_attach(simdir, &s->dom, err);
    if (rc < 0) {
        free(s);
        return rc;
    }
    s->base.ops = &sim_ops;
    s->hdr = s->dom->hdr_copy;
    s->entries = (grant_entry_v1_t *)((uint8_t *)s->dom->map + xt_simdom_entries_off());
    s->frames = (uint8_t *)s->dom->map + xt_simdom_frames_off(s->hdr.nr_grants);
    *out = &s->base;
    return 0;
}

void xt_transport_close(xt_transport *t)
{
    if (t)
        t->ops->close(t);
}

const char *xt_transport_name(const xt_transport *t)
{
    return t->ops->name;
}
