/*
 * VM runner selftest (not a test of the crate), built with `gcc -static`.
 *
 * Does what the crate's root tests do first, with raw syscalls:
 * unshare(CLONE_NEWNS), then make / recursively private; mounts a tmpfs and
 * checks that PID 1 (in the original namespace) does not see it. Also reports
 * whether the kernel has open_tree and mount_setattr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#define OPEN_TREE_CLONE_ 1
#define OPEN_TREE_CLOEXEC_ O_CLOEXEC

struct mount_attr_ {
	uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static int fail(const char *what)
{
	printf("nsprivate: FAIL: %s: %s\n", what, strerror(errno));
	return 1;
}

static int visible_in(const char *mountinfo, const char *path)
{
	char line[4096];
	int found = 0;
	FILE *f = fopen(mountinfo, "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strstr(line, path))
			found = 1;
	fclose(f);
	return found;
}

int main(void)
{
	char dir[] = "/tmp/nsprivate.XXXXXX";
	struct utsname u;
	int fd;

	uname(&u);
	printf("nsprivate: kernel %s\n", u.release);
	if (unshare(CLONE_NEWNS))
		return fail("unshare(CLONE_NEWNS)");
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
		return fail("mount(/, MS_REC|MS_PRIVATE)");
	if (!mkdtemp(dir))
		return fail("mkdtemp");
	if (mount("tmpfs", dir, "tmpfs", 0, "size=1m"))
		return fail("mount tmpfs");
	if (visible_in("/proc/self/mountinfo", dir) != 1) {
		printf("nsprivate: FAIL: own mount not in own mountinfo\n");
		return 1;
	}
	if (visible_in("/proc/1/mountinfo", dir) != 0) {
		printf("nsprivate: FAIL: mount leaked to PID 1's namespace\n");
		return 1;
	}
	printf("nsprivate: private mount namespace: ok\n");

	fd = syscall(SYS_open_tree, AT_FDCWD, dir, OPEN_TREE_CLONE_ | OPEN_TREE_CLOEXEC_);
	if (fd < 0) {
		printf("nsprivate: open_tree: %s\n", strerror(errno));
	} else {
		struct mount_attr_ attr = {0};
		long r = syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &attr, sizeof(attr));
		printf("nsprivate: open_tree: ok; mount_setattr: %s\n",
		       r == 0 ? "ok" : strerror(errno));
		close(fd);
	}
	umount2(dir, MNT_DETACH);
	rmdir(dir);
	return 0;
}
