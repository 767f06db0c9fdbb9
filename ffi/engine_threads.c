/*
 * engine_threads.c — the fallback I/O engine for kernels without io_uring:
 * a few worker threads doing pread/pwrite/fdatasync, completions handed
 * back to the queue thread through a list and an eventfd.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "xt_internal.h"

#define THREADS_MAX_WAKE 4
#define THREADS_WORKERS 8

struct threads_priv {
    int fd;
    int wake_fds[THREADS_MAX_WAKE];
    unsigned nr_wake;
    int done_efd;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct xt_io *todo_head, *todo_tail;    /* FIFO of work */
    struct xt_io *done_list;
    struct xt_io *staged;       /* submitted by the queue thread, not yet handed over */
    bool stopping;
    unsigned nr_workers;
    pthread_t workers[THREADS_WORKERS];
};

static void *worker(void *arg)
{
    struct threads_priv *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->todo_head && !p->stopping)
            pthread_cond_wait(&p->cond, &p->lock);
        if (p->stopping)
            break;
        struct xt_io *io = p->todo_head;
        p->todo_head = io->next;
        if (!p->todo_head)
            p->todo_tail = NULL;
        pthread_mutex_unlock(&p->lock);
        xt_io_do(p->fd, io);
        pthread_mutex_lock(&p->lock);
        io->next = p->done_list;
        p->done_list = io;
        uint64_t one = 1;
        ssize_t w = write(p->done_efd, &one, sizeof(one));
        (void)w;
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static void threads_fini(struct xt_engine *e);

static int threads_init(struct xt_engine *e, int fd, unsigned depth,
                        const int *wake_fds, unsigned nr_wake, char *err)
{
    if (nr_wake > THREADS_MAX_WAKE)
        return xt_fail(err, EINVAL, "threads engine: too many wake fds");
    struct threads_priv *p = calloc(1, sizeof(*p));
    if (!p)
        return xt_fail(err, ENOMEM, "threads engine: out of memory");
    p->fd = fd;
    p->nr_wake = nr_wake;
    memcpy(p->wake_fds, wake_fds, nr_wake * sizeof(int));
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->done_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->priv = p;
    if (p->done_efd < 0) {
        int en = errno;
        threads_fini(e);
        return xt_fail(err, en, "threads engine: eventfd: %s", strerror(en));
    }
    unsigned want = depth < THREADS_WORKERS ? depth : THREADS_WORKERS;
    for (unsigned i = 0; i < want; i++) {
        if (pthread_create(&p->workers[i], NULL, worker, p) != 0)
            break;
        p->nr_workers++;
    }
    if (p->nr_workers == 0) {
        threads_fini(e);
        return xt_fail(err, EAGAIN, "threads engine: cannot start workers");
    }
    return 0;
}

static void threads_submit(struct xt_engine *e, struct xt_io *io)
{
    struct threads_priv *p = e->priv;
    io->done = 0;
    io->res = 0;
    io->next = p->staged;
    p->staged = io;
}

/* Hands staged work to the workers, oldest first. */
static void hand_over(struct threads_priv *p)
{
    if (!p->staged)
        return;
    struct xt_io *rev = NULL;
    while (p->staged) {
        struct xt_io *io = p->staged;
        p->staged = io->next;
        io->next = rev;
        rev = io;
    }
    pthread_mutex_lock(&p->lock);
    for (struct xt_io *io = rev, *next; io; io = next) {
        next = io->next;
        io->next = NULL;
        if (p->todo_tail)
            p->todo_tail->next = io;
        else
            p->todo_head = io;
        p->todo_tail = io;
    }
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

static int threads_wait(struct xt_engine *e, struct xt_io **done, unsigned max,
                        unsigned *woken, bool block)
{
    struct threads_priv *p = e->priv;
    *woken = 0;
    hand_over(p);

    struct pollfd pfd[THREADS_MAX_WAKE + 1];
    for (unsigned i = 0; i < p->nr_wake; i++)
        pfd[i] = (struct pollfd){ .fd = p->wake_fds[i], .events = POLLIN };
    pfd[p->nr_wake] = (struct pollfd){ .fd = p->done_efd, .events = POLLIN };
    if (poll(pfd, p->nr_wake + 1, block ? -1 : 0) < 0)
        return 0;
    for (unsigned i = 0; i < p->nr_wake; i++)
        if (pfd[i].revents)
            *woken |= 1u << i;

    uint64_t cnt;
    ssize_t r = read(p->done_efd, &cnt, sizeof(cnt));
    (void)r;
    unsigned n = 0;
    pthread_mutex_lock(&p->lock);
    while (p->done_list && n < max) {
        struct xt_io *io = p->done_list;
        p->done_list = io->next;
        done[n++] = io;
    }
    if (p->done_list) {     /* more than max: make the next poll see them */
        uint64_t one = 1;
        ssize_t w = write(p->done_efd, &one, sizeof(one));
        (void)w;
    }
    pthread_mutex_unlock(&p->lock);
    return (int)n;
}

static void threads_fini(struct xt_engine *e)
{
    struct threads_priv *p = e->priv;
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < p->nr_workers; i++)
        pthread_join(p->workers[i], NULL);
    if (p->done_efd >= 0)
        close(p->done_efd);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cond);
    free(p);
    e->priv = NULL;
}

const struct xt_engine_ops xt_engine_threads = {
    .name = "threads",
    .init = threads_init,
    .submit = threads_submit,
    .wait = threads_wait,
    .fini = threads_fini,
};
