/*
 * dio.c — what direct I/O an open image takes, from statx(STATX_DIOALIGN).
 *
 * Its own file because it needs the kernel's struct statx (linux/stat.h),
 * which glibc's sys/stat.h declares without the direct I/O fields.
 */
#include <fcntl.h>
#include <linux/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "xt_internal.h"

long xt_dio_offset_align(int fd)
{
    struct statx stx;
    memset(&stx, 0, sizeof(stx));
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0 ||
        !(stx.stx_mask & STATX_DIOALIGN))
        return -1;
    return (long)stx.stx_dio_offset_align;
}
