/* fusetrace: serve one disk image as the file <mnt>/disk through FUSE and
 * record, in the order the kernel sends them, every write (offset, data) and
 * every fsync (a flush marker).  A loop device on <mnt>/disk turns the block
 * layer's writes and REQ_PREFLUSH into exactly those calls, so a filesystem
 * mounted on it yields the ordered write trace a block backend would see.
 *
 * Trace format (little-endian), read by analyzer/trace.py:
 *   "XTTRACE1" then records: u8 kind (1 write, 2 flush), u8 pad[3],
 *   u32 len, u64 seq, u64 time_ns, u64 offset, then len bytes of data.
 *
 * Build: cc -O2 -o fusetrace fusetrace.c $(pkg-config --cflags --libs fuse3)
 * Run:   fusetrace IMAGE TRACE MOUNTPOINT -f -s
 */
#define FUSE_USE_VERSION 31
#include <fuse.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int img_fd = -1;
static FILE *trace;
static uint64_t seq;

struct rec {
	uint8_t kind, pad[3];
	uint32_t len;
	uint64_t seq, time_ns, offset;
} __attribute__((packed));

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void record(uint8_t kind, const char *buf, size_t len, off_t off)
{
	struct rec r = { .kind = kind, .len = (uint32_t)len, .seq = seq++,
			 .time_ns = now_ns(), .offset = (uint64_t)off };
	fwrite(&r, sizeof r, 1, trace);
	if (len)
		fwrite(buf, 1, len, trace);
}

static int ft_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	(void)fi;
	memset(st, 0, sizeof *st);
	if (strcmp(path, "/") == 0) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		return 0;
	}
	if (strcmp(path, "/disk") != 0)
		return -ENOENT;
	struct stat ist;
	if (fstat(img_fd, &ist) < 0)
		return -errno;
	st->st_mode = S_IFREG | 0644;
	st->st_nlink = 1;
	st->st_size = ist.st_size;
	return 0;
}

static int ft_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		      struct fuse_file_info *fi, enum fuse_readdir_flags fl)
{
	(void)off; (void)fi; (void)fl;
	if (strcmp(path, "/") != 0)
		return -ENOENT;
	fill(buf, ".", NULL, 0, 0);
	fill(buf, "..", NULL, 0, 0);
	fill(buf, "disk", NULL, 0, 0);
	return 0;
}

static int ft_open(const char *path, struct fuse_file_info *fi)
{
	if (strcmp(path, "/disk") != 0)
		return -ENOENT;
	fi->direct_io = 1;	/* every write reaches us, in order, uncached */
	return 0;
}

static int ft_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)path; (void)fi;
	ssize_t n = pread(img_fd, buf, size, off);
	return n < 0 ? -errno : (int)n;
}

static int ft_write(const char *path, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)path; (void)fi;
	ssize_t n = pwrite(img_fd, buf, size, off);
	if (n < 0)
		return -errno;
	record(1, buf, (size_t)n, off);
	return (int)n;
}

static int ft_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path; (void)datasync; (void)fi;
	record(2, NULL, 0, 0);
	fflush(trace);
	return 0;
}

static int ft_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	(void)path; (void)size; (void)fi;
	return 0;
}

static void ft_destroy(void *p)
{
	(void)p;
	fflush(trace);
	fclose(trace);
	close(img_fd);
}

static const struct fuse_operations ops = {
	.getattr = ft_getattr, .readdir = ft_readdir, .open = ft_open, .read = ft_read,
	.write = ft_write, .fsync = ft_fsync, .truncate = ft_truncate, .destroy = ft_destroy,
};

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: fusetrace IMAGE TRACE MOUNTPOINT [fuse options]\n");
		return 2;
	}
	img_fd = open(argv[1], O_RDWR);
	if (img_fd < 0) {
		perror(argv[1]);
		return 1;
	}
	trace = fopen(argv[2], "wb");
	if (!trace) {
		perror(argv[2]);
		return 1;
	}
	fwrite("XTTRACE1", 1, 8, trace);
	fflush(trace);
	argv[2] = argv[0];
	return fuse_main(argc - 2, argv + 2, &ops, NULL);
}
