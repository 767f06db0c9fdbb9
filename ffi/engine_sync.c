/*
 * engine_sync.c — plain syscalls, shared by the thread engine, and the
 * synchronous engine: each I/O runs when it is submitted and is reported
 * by the next wait().  Deterministic, so the fuzzer uses it.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

#include "xt_internal.h"

#define SYNC_MAX_WAKE 4

void xt_io_do(int fd, struct xt_io *io)
{
    io->res = 0;
    switch (io->op) {
    case XT_IO_FSYNC:
        if (fdatasync(fd) < 0)
            io->res = -errno;
        return;
    case XT_IO_PUNCH:
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)io->offset, (off_t)io->len) < 0)
            io->res = -errno;
        return;
    case XT_IO_READ:
    case XT_IO_WRITE:
        break;
    }
    while (io->done < io->len) {
        off_t off = (off_t)(io->offset + io->done);
        ssize_t r;
        if (io->iov) {
            r = io->op == XT_IO_READ ? preadv(fd, io->iov, (int)io->iovcnt, off)
                                     : pwritev(fd, io->iov, (int)io->iovcnt, off);
        } else {
            uint8_t *buf = (uint8_t *)io->buf + io->done;
            size_t len = io->len - io->done;
            r = io->op == XT_IO_READ ? pread(fd, buf, len, off) : pwrite(fd, buf, len, off);
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            io->res = r < 0 ? -errno : -EIO;
            return;
        }
        xt_io_advance(io, (size_t)r);
    }
}

void xt_io_advance(struct xt_io *io, size_t n)
{
    io->done += n;
    if (!io->iov || io->done >= io->len)
        return;
    while (io->iovcnt && n >= io->iov->iov_len) {
        n -= io->iov->iov_len;
        io->iov++;
        io->iovcnt--;
    }
    io->iov->iov_base = (uint8_t *)io->iov->iov_base + n;
    io->iov->iov_len -= n;
}

struct sync_priv {
    int fd;
    int wake_fds[SYNC_MAX_WAKE];
    unsigned nr_wake;
    struct xt_io *done_head, *done_tail;
};

static int sync_init(struct xt_engine *e, int fd, unsigned depth,
                     const int *wake_fds, unsigned nr_wake, char *err)
{
    if (nr_wake > SYNC_MAX_WAKE)
        return xt_fail(err, EINVAL, "sync engine: too many wake fds");
    struct sync_priv *p = calloc(1, sizeof(*p));
    if (!p)
        return xt_fail(err, ENOMEM, "sync engine: out of memory");
    p->fd = fd;
    p->nr_wake = nr_wake;
    for (unsigned i = 0; i < nr_wake; i++)
        p->wake_fds[i] = wake_fds[i];
    e->priv = p;
    return 0;
}

static void sync_submit(struct xt_engine *e, struct xt_io *io)
{
    struct sync_priv *p = e->priv;
    io->done = 0;
    xt_io_do(p->fd, io);
    io->next = NULL;
    if (p->done_tail)
        p->done_tail->next = io;
    else
        p->done_head = io;
    p->done_tail = io;
}

static int sync_wait(struct xt_engine *e, struct xt_io **done, unsigned max,
                     unsigned *woken, bool block)
{
    struct sync_priv *p = e->priv;
    *woken = 0;
    struct pollfd pfd[SYNC_MAX_WAKE];
    for (unsigned i = 0; i < p->nr_wake; i++)
        pfd[i] = (struct pollfd){ .fd = p->wake_fds[i], .events = POLLIN };
    if (p->nr_wake && poll(pfd, p->nr_wake, block && !p->done_head ? -1 : 0) > 0)
        for (unsigned i = 0; i < p->nr_wake; i++)
            if (pfd[i].revents)
                *woken |= 1u << i;
    unsigned n = 0;
    while (p->done_head && n < max) {
        done[n++] = p->done_head;
        p->done_head = p->done_head->next;
    }
    if (!p->done_head)
        p->done_tail = NULL;
    return (int)n;
}

static void sync_fini(struct xt_engine *e)
{
    free(e->priv);
    e->priv = NULL;
}

const struct xt_engine_ops xt_engine_sync = {
    .name = "sync",
    .init = sync_init,
    .submit = sync_submit,
    .wait = sync_wait,
    .fini = sync_fini,
};
