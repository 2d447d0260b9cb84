/*
 * Minimal read-only libfuse3 passthrough in C: the "FUSE ceiling" of the bench.
 *
 * Usage: c-passthrough SOURCE_DIR MOUNTPOINT
 *
 * Serves SOURCE_DIR read-only at MOUNTPOINT with libfuse's multithreaded loop.
 * Attributes and entries are cached by the kernel for 300 s and open files keep
 * the page cache (kernel_cache), as in bench/passthrough.py; data comes from
 * pread on the file descriptor opened at open().  It does the least any FUSE
 * daemon must do per request, so it bounds what a FUSE file system can reach on
 * this machine, whatever language it is written in.  The bench raises the mount's
 * read_ahead_kb to 1024 after mounting, as for the other passthrough.
 *
 * Built by bench/run.sh:
 *   gcc -O2 -Wall -o bench/.build/c-passthrough bench/c_passthrough.c \
 *       $(pkg-config --cflags --libs fuse3)
 * Runs in the foreground; stop it with `fusermount3 -u MOUNTPOINT`.
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int source_fd = -1;

/* "/a/b" -> "a/b" relative to source_fd; "/" -> "." */
static const char *rel(const char *path)
{
	while (*path == '/')
		path++;
	return *path ? path : ".";
}

static void *pt_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	(void)conn;
	cfg->use_ino = 1;
	cfg->kernel_cache = 1;
	cfg->entry_timeout = 300.0;
	cfg->attr_timeout = 300.0;
	cfg->negative_timeout = 300.0;
	cfg->nullpath_ok = 1;
	return NULL;
}

static int pt_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	int r = fi ? fstat((int)fi->fh, st)
		   : fstatat(source_fd, rel(path), st, AT_SYMLINK_NOFOLLOW);
	return r == -1 ? -errno : 0;
}

static int pt_access(const char *path, int mask)
{
	if (mask & W_OK)
		return -EROFS;
	return faccessat(source_fd, rel(path), mask, 0) == -1 ? -errno : 0;
}

static int pt_opendir(const char *path, struct fuse_file_info *fi)
{
	int fd = openat(source_fd, rel(path), O_RDONLY | O_DIRECTORY);
	if (fd == -1)
		return -errno;
	DIR *d = fdopendir(fd);
	if (!d) {
		int e = errno;
		close(fd);
		return -e;
	}
	fi->fh = (uint64_t)(uintptr_t)d;
	return 0;
}

static int pt_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	(void)path;
	(void)flags;
	DIR *d = (DIR *)(uintptr_t)fi->fh;
	/* offsets are telldir() cookies: a reply that filled up resumes where it stopped */
	seekdir(d, off);
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		struct stat st = {0};
		st.st_ino = de->d_ino;
		st.st_mode = (mode_t)de->d_type << 12;
		if (fill(buf, de->d_name, &st, telldir(d), 0))
			break;
	}
	return 0;
}

static int pt_releasedir(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	closedir((DIR *)(uintptr_t)fi->fh);
	return 0;
}

static int pt_open(const char *path, struct fuse_file_info *fi)
{
	if ((fi->flags & O_ACCMODE) != O_RDONLY)
		return -EROFS;
	int fd = openat(source_fd, rel(path), O_RDONLY);
	if (fd == -1)
		return -errno;
	fi->fh = (uint64_t)fd;
	fi->keep_cache = 1;
	return 0;
}

static int pt_read(const char *path, char *buf, size_t size, off_t off,
		   struct fuse_file_info *fi)
{
	(void)path;
	ssize_t n = pread((int)fi->fh, buf, size, off);
	return n == -1 ? -errno : (int)n;
}

static int pt_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	close((int)fi->fh);
	return 0;
}

static const struct fuse_operations ops = {
	.init = pt_init,
	.getattr = pt_getattr,
	.access = pt_access,
	.opendir = pt_opendir,
	.readdir = pt_readdir,
	.releasedir = pt_releasedir,
	.open = pt_open,
	.read = pt_read,
	.release = pt_release,
};

int main(int argc, char *argv[])
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s SOURCE_DIR MOUNTPOINT\n", argv[0]);
		return 2;
	}
	source_fd = open(argv[1], O_RDONLY | O_DIRECTORY);
	if (source_fd == -1) {
		perror(argv[1]);
		return 2;
	}
	char *fargv[] = {argv[0], "-f", "-o", "ro,fsname=c-passthrough", argv[2], NULL};
	return fuse_main(5, fargv, &ops, NULL);
}
