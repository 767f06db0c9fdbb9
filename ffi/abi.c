/*
 * abi.c — the two functions that differ between blkif ABIs: reading a
 * request out of a ring slot and writing a response into one.
 *
 * Native (x86_64) offsets come from Xen's own structs in blkif.h; the
 * x86_32 ABI packs its structs to 4 bytes (the `protocol` "x86_32-abi" of a
 * 32-bit guest on a 64-bit dom0), so `id` sits at offset 4, not 8, and its
 * response is 12 bytes, not 16.  Both read a slot exactly once: the bytes
 * are copied out of shared memory, then decoded from the copy.
 */
#include <string.h>

#include "xt_internal.h"

struct abi_layout {
    unsigned entry_size, rsp_size;
    unsigned id, sector, seg;               /* read/write (and flush, barrier) */
    unsigned nr_sectors;                    /* discard */
    unsigned ind_nr_segments, ind_id, ind_sector, ind_grefs;    /* indirect */
};

static const struct abi_layout native = {
    .entry_size = sizeof(union blkif_sring_entry),
    .rsp_size = sizeof(blkif_response_t),
    .id = offsetof(blkif_request_t, id),
    .sector = offsetof(blkif_request_t, sector_number),
    .seg = offsetof(blkif_request_t, seg),
    .nr_sectors = offsetof(blkif_request_discard_t, nr_sectors),
    .ind_nr_segments = offsetof(blkif_request_indirect_t, nr_segments),
    .ind_id = offsetof(blkif_request_indirect_t, id),
    .ind_sector = offsetof(blkif_request_indirect_t, sector_number),
    .ind_grefs = offsetof(blkif_request_indirect_t, indirect_grefs),
};

/* The x86_32 layout: every 64-bit field 4-aligned. */
static const struct abi_layout x86_32 = {
    .entry_size = 108,      /* 20-byte header + 11 segments of 8 bytes */
    .rsp_size = 12,
    .id = 4,
    .sector = 12,
    .seg = 20,
    .nr_sectors = 20,
    .ind_nr_segments = 2,
    .ind_id = 4,
    .ind_sector = 12,
    .ind_grefs = 24,
};

static const struct abi_layout *layout(uint32_t protocol)
{
    return protocol == XT_PROTO_X86_32 ? &x86_32 : &native;
}

unsigned xt_abi_entry_size(uint32_t protocol)
{
    return layout(protocol)->entry_size;
}

unsigned xt_abi_ring_slots(uint32_t protocol, unsigned pages)
{
    unsigned fit = (unsigned)((XT_PAGE_SIZE * pages - offsetof(blkif_sring_t, ring)) /
                              layout(protocol)->entry_size);
    unsigned n = 1;
    while (n * 2 <= fit)
        n *= 2;
    return n;
}

static uint16_t ld16(const uint8_t *b, unsigned off)
{
    uint16_t v;
    memcpy(&v, b + off, sizeof(v));
    return v;
}

static uint32_t ld32(const uint8_t *b, unsigned off)
{
    uint32_t v;
    memcpy(&v, b + off, sizeof(v));
    return v;
}

static uint64_t ld64(const uint8_t *b, unsigned off)
{
    uint64_t v;
    memcpy(&v, b + off, sizeof(v));
    return v;
}

void xt_abi_get_request(uint32_t protocol, const volatile void *slot, struct xt_ring_req *r)
{
    const struct abi_layout *l = layout(protocol);
    uint8_t b[sizeof(union blkif_sring_entry)];
    memcpy(b, (const void *)slot, l->entry_size);  /* the one fetch */
    atomic_signal_fence(memory_order_seq_cst);      /* decode the copy, never the ring */

    memset(r, 0, sizeof(*r));
    r->operation = b[0];
    switch (r->operation) {
    case BLKIF_OP_INDIRECT:
        r->indirect_op = b[1];
        r->nr_segments = ld16(b, l->ind_nr_segments);
        r->id = ld64(b, l->ind_id);
        r->sector = ld64(b, l->ind_sector);
        for (unsigned i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
            r->indirect_grefs[i] = ld32(b, l->ind_grefs + 4 * i);
        break;
    case BLKIF_OP_DISCARD:
        r->flag = b[1];
        r->id = ld64(b, l->id);
        r->sector = ld64(b, l->sector);
        r->nr_sectors = ld64(b, l->nr_sectors);
        break;
    default:
        r->nr_segments = b[1];
        r->id = ld64(b, l->id);
        r->sector = ld64(b, l->sector);
        for (unsigned i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
            unsigned off = l->seg + i * (unsigned)sizeof(struct blkif_request_segment);
            r->seg[i].gref = ld32(b, off);
            r->seg[i].first_sect = b[off + 4];
            r->seg[i].last_sect = b[off + 5];
        }
        break;
    }
}

void xt_abi_put_response(uint32_t protocol, volatile void *slot, uint64_t id,
                         uint8_t operation, int16_t status)
{
    const struct abi_layout *l = layout(protocol);
    uint8_t b[sizeof(blkif_response_t)];
    memset(b, 0, sizeof(b));        /* no stale bytes in the padding (XSA-216) */
    memcpy(b + offsetof(blkif_response_t, id), &id, sizeof(id));
    b[offsetof(blkif_response_t, operation)] = operation;
    memcpy(b + offsetof(blkif_response_t, status), &status, sizeof(status));
    memcpy((void *)slot, b, l->rsp_size);
}

/* The frontend's side, for the sim blkfront: the same layouts, written. */

static void st16(uint8_t *b, unsigned off, uint16_t v) { memcpy(b + off, &v, sizeof(v)); }
static void st32(uint8_t *b, unsigned off, uint32_t v) { memcpy(b + off, &v, sizeof(v)); }
static void st64(uint8_t *b, unsigned off, uint64_t v) { memcpy(b + off, &v, sizeof(v)); }

void xt_abi_put_request(uint32_t protocol, volatile void *slot, const struct xt_ring_req *r)
{
    const struct abi_layout *l = layout(protocol);
    uint8_t b[sizeof(union blkif_sring_entry)];
    memset(b, 0, sizeof(b));
    b[0] = r->operation;
    switch (r->operation) {
    case BLKIF_OP_INDIRECT:
        b[1] = r->indirect_op;
        st16(b, l->ind_nr_segments, r->nr_segments);
        st64(b, l->ind_id, r->id);
        st64(b, l->ind_sector, r->sector);
        for (unsigned i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
            st32(b, l->ind_grefs + 4 * i, r->indirect_grefs[i]);
        break;
    case BLKIF_OP_DISCARD:
        b[1] = r->flag;
        st64(b, l->id, r->id);
        st64(b, l->sector, r->sector);
        st64(b, l->nr_sectors, r->nr_sectors);
        break;
    default:
        b[1] = (uint8_t)r->nr_segments;
        st64(b, l->id, r->id);
        st64(b, l->sector, r->sector);
        for (unsigned i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
            unsigned off = l->seg + i * (unsigned)sizeof(struct blkif_request_segment);
            st32(b, off, r->seg[i].gref);
            b[off + 4] = r->seg[i].first_sect;
            b[off + 5] = r->seg[i].last_sect;
        }
        break;
    }
    memcpy((void *)slot, b, l->entry_size);
}

void xt_abi_get_response(uint32_t protocol, const volatile void *slot, uint64_t *id,
                         uint8_t *operation, int16_t *status)
{
    const struct abi_layout *l = layout(protocol);
    uint8_t b[sizeof(blkif_response_t)];
    memcpy(b, (const void *)slot, l->rsp_size);
    *id = ld64(b, offsetof(blkif_response_t, id));
    *operation = b[offsetof(blkif_response_t, operation)];
    *status = (int16_t)ld16(b, offsetof(blkif_response_t, status));
}
