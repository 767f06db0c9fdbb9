/*
 * transport_xen.c — the `xen` transport: libxengnttab and libxenevtchn.
 *
 * Ring pages are grant-mapped (once per connection).  Data is moved with
 * grant copy into the shim's own bounce buffers rather than by mapping each
 * request's pages: a map/unmap pair per request costs two hypercalls and a
 * TLB shootdown, and a copy also means the bytes we write to disk and the
 * bytes we mirror are the same bytes, whatever the guest does to its pages
 * while the request is in flight.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <xenevtchn.h>
#include <xengnttab.h>

#include "xt_internal.h"

#define XEN_COPY_BATCH 64

struct xen_transport {
    struct xt_transport base;
    xengnttab_handle *xgt;
};

struct xen_evtchn {
    xenevtchn_handle *xce;
};

static struct xen_transport *to_xen(xt_transport *t)
{
    return (struct xen_transport *)t;
}

static void *xen_map(xt_transport *t, uint16_t domid, const uint32_t *grefs,
                     unsigned n, char *err)
{
    void *addr = xengnttab_map_domain_grant_refs(to_xen(t)->xgt, n, domid,
                                                 (uint32_t *)grefs,
                                                 PROT_READ | PROT_WRITE);
    if (!addr)
        xt_fail(err, errno, "map of %u grant refs of domain %u failed: %s",
                n, domid, strerror(errno));
    return addr;
}

static void xen_unmap(xt_transport *t, void *addr, unsigned n)
{
    xengnttab_unmap(to_xen(t)->xgt, addr, n);
}

static int xen_copy(xt_transport *t, uint16_t domid, enum xt_copy_dir dir,
                    struct xt_copy *segs, unsigned n)
{
    xengnttab_grant_copy_segment_t ops[XEN_COPY_BATCH];
    int rc = 0;
    for (unsigned base = 0; base < n; base += XEN_COPY_BATCH) {
        unsigned cnt = n - base < XEN_COPY_BATCH ? n - base : XEN_COPY_BATCH;
        for (unsigned i = 0; i < cnt; i++) {
            struct xt_copy *c = &segs[base + i];
            xengnttab_grant_copy_segment_t *op = &ops[i];
            memset(op, 0, sizeof(*op));
            if (dir == XT_COPY_FROM_GUEST) {
                op->source.foreign.ref = c->gref;
                op->source.foreign.offset = c->offset;
                op->source.foreign.domid = domid;
                op->dest.virt = c->local;
                op->flags = GNTCOPY_source_gref;
            } else {
                op->source.virt = c->local;
                op->dest.foreign.ref = c->gref;
                op->dest.foreign.offset = c->offset;
                op->dest.foreign.domid = domid;
                op->flags = GNTCOPY_dest_gref;
            }
            op->len = c->len;
        }
        if (xengnttab_grant_copy(to_xen(t)->xgt, cnt, ops) < 0) {
            for (unsigned i = 0; i < cnt; i++)
                segs[base + i].status = GNTST_general_error;
            rc = -1;
            continue;
        }
        for (unsigned i = 0; i < cnt; i++) {
            segs[base + i].status = ops[i].status;
            if (ops[i].status != GNTST_okay)
                rc = -1;
        }
    }
    return rc;
}

static int xen_bind(xt_transport *t, uint16_t domid, uint32_t remote_port,
                    struct xt_evtchn *ev, char *err)
{
    struct xen_evtchn *xe = calloc(1, sizeof(*xe));
    if (!xe)
        return xt_fail(err, ENOMEM, "event channel: out of memory");
    /* One handle per queue, so that each queue thread polls its own fd. */
    xe->xce = xenevtchn_open(NULL, 0);
    if (!xe->xce) {
        int e = errno;
        free(xe);
        return xt_fail(err, e, "xenevtchn_open: %s", strerror(e));
    }
    xenevtchn_port_or_error_t port = xenevtchn_bind_interdomain(xe->xce, domid, remote_port);
    if (port < 0) {
        int e = errno;
        xenevtchn_close(xe->xce);
        free(xe);
        return xt_fail(err, e, "event channel: bind to port %u of domain %u: %s",
                       remote_port, domid, strerror(e));
    }
    ev->fd = xenevtchn_fd(xe->xce);
    ev->local_port = (uint32_t)port;
    ev->priv = xe;
    return 0;
}

static void xen_unbind(xt_transport *t, struct xt_evtchn *ev)
{
    struct xen_evtchn *xe = ev->priv;
    if (!xe)
        return;
    xenevtchn_unbind(xe->xce, ev->local_port);
    xenevtchn_close(xe->xce);
    free(xe);
    ev->priv = NULL;
    ev->fd = -1;
}

static void xen_notify(xt_transport *t, struct xt_evtchn *ev)
{
    struct xen_evtchn *xe = ev->priv;
    xenevtchn_notify(xe->xce, ev->local_port);
}

static void xen_ack(xt_transport *t, struct xt_evtchn *ev)
{
    struct xen_evtchn *xe = ev->priv;
    xenevtchn_port_or_error_t port = xenevtchn_pending(xe->xce);
    if (port >= 0)
        xenevtchn_unmask(xe->xce, (evtchn_port_t)port);
}

static void xen_close(xt_transport *t)
{
    struct xen_transport *x = to_xen(t);
    xengnttab_close(x->xgt);
    free(x);
}

static const struct xt_transport_ops xen_ops = {
    .name = "xen",
    .map = xen_map,
    .unmap = xen_unmap,
    .copy = xen_copy,
    .bind = xen_bind,
    .unbind = xen_unbind,
    .notify = xen_notify,
    .ack = xen_ack,
    .close = xen_close,
};

int xt_transport_xen_open(xt_transport **out, char *err)
{
    struct xen_transport *x = calloc(1, sizeof(*x));
    if (!x)
        return xt_fail(err, ENOMEM, "xen transport: out of memory");
    x->xgt = xengnttab_open(NULL, 0);
    if (!x->xgt) {
        int e = errno;
        free(x);
        return xt_fail(err, e, "xen transport: cannot open the grant device (/dev/xen/gntdev): %s",
                       strerror(e));
    }
    /* Ring pages of every queue of a VBD, with room to spare. */
    xengnttab_set_max_grants(x->xgt, XT_MAX_QUEUES * XT_MAX_RING_PAGES * 4);
    x->base.ops = &xen_ops;
    *out = &x->base;
    return 0;
}
