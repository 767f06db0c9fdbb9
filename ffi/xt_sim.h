/*
 * xt_sim.h — the sim domain's frontend-side helpers (internal), used by the
 * sim blkfront; see transport_sim.c for the layout.
 */
#ifndef XENTAP_XT_SIM_H
#define XENTAP_XT_SIM_H

#include "xt_internal.h"

/* Allocation state shared by every user of one domain (in its memfd). */
struct xt_simdom_alloc {
    atomic_uint next_frame;
    atomic_uint next_port;
};

struct xt_simdom {
    char dir[3072];
    int fd;
    void *map;
    uint64_t size;
    struct xt_simdom_header *hdr;   /* live, in shared memory */
    struct xt_simdom_header hdr_copy;   /* validated copy (attach) */
    struct xt_simdom_alloc *alloc;
    bool attached;                  /* opened by another user, not created */
};

int xt_simdom_attach(const char *dir, xt_simdom **out, char *err);
int xt_simdom_alloc_frames(xt_simdom *d, uint32_t n, uint32_t *first);
void *xt_simdom_frame(xt_simdom *d, uint32_t frame);
uint32_t xt_simdom_grant(xt_simdom *d, uint32_t frame, bool readonly);
void xt_simdom_revoke(xt_simdom *d, uint32_t gref);
int xt_simdom_alloc_port(xt_simdom *d, uint32_t *port, int *rx_fd, int *tx_fd, char *err);
void xt_fifo_notify(int fd);
/* Empties the FIFO; returns the send time of the first event in it (0: none). */
uint64_t xt_fifo_drain(int fd);

#endif
