/* common.c — log lines, error strings, sim domain paths. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "xt_internal.h"

static atomic_int log_fd = 2;

void xt_set_log_fd(int fd)
{
    atomic_store(&log_fd, fd);
}

void xt_log(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof(line), "xentap-shim: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    /* One write per line so that lines of several threads do not mix. */
    ssize_t w = write(atomic_load(&log_fd), line, len);
    (void)w;
}

int xt_fail(char *err, int errnum, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, XT_ERRLEN, fmt, ap);
        va_end(ap);
    }
    return -errnum;
}

int xt_simdom_path(char *out, size_t len, const char *dir, const char *leaf)
{
    int n = snprintf(out, len, "%s/%s", dir, leaf);
    return (n < 0 || (size_t)n >= len) ? -ENAMETOOLONG : 0;
}

/* side 'b': events to the backend; 'f': events to the frontend. */
int xt_simdom_evtchn_path(char *out, size_t len, const char *dir,
                          uint32_t port, char side)
{
    int n = snprintf(out, len, "%s/evtchn-%u.%c", dir, port, side);
    return (n < 0 || (size_t)n >= len) ? -ENAMETOOLONG : 0;
}
