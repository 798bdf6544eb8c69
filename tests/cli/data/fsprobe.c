/* Filesystem semantics a program sees on a container's writable root (run in /tmp).
 * One line per check, "name: ok" or "name: <what differed>": the differential test compares the
 * output under runc and under pykata. Built static by tests/cli/test_fs_differential.py. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static void report(const char *name, int ok, const char *what) {
    if (ok) printf("%s: ok\n", name);
    else printf("%s: %s (%s)\n", name, what, strerror(errno));
}

static void unix_socket(void) {
    unlink("sock");
    int s = socket(AF_UNIX, SOCK_STREAM, 0), c = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, "sock");
    if (bind(s, (void *)&a, sizeof a)) return report("unix-bind", 0, "bind");
    if (listen(s, 1)) return report("unix-bind", 0, "listen");
    if (connect(c, (void *)&a, sizeof a)) return report("unix-bind", 0, "connect");
    int p = accept(s, 0, 0);
    char buf[8] = {0};
    if (p < 0 || write(c, "ping", 4) != 4 || read(p, buf, 4) != 4) return report("unix-bind", 0, "transfer");
    report("unix-bind", strcmp(buf, "ping") == 0, "data differs");
    struct stat st;
    report("unix-stat", stat("sock", &st) == 0 && S_ISSOCK(st.st_mode), "stat of the bound path");
    close(p); close(c); close(s);
}

static void fifo(void) {
    unlink("fifo");
    if (mkfifo("fifo", 0644)) return report("mkfifo", 0, "mkfifo");
    int fd = open("fifo", O_RDWR);
    char buf[8] = {0};
    if (fd < 0 || write(fd, "abc", 3) != 3 || read(fd, buf, 3) != 3) return report("mkfifo", 0, "io");
    report("mkfifo", strcmp(buf, "abc") == 0, "data differs");
    unlink("mknod-fifo");
    report("mknod-fifo", mknod("mknod-fifo", S_IFIFO | 0600, 0) == 0, "mknod");
}

static void mmap_shared(const char *name, off_t size, off_t at) {
    int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, size)) return report(name, 0, "create");
    long pg = sysconf(_SC_PAGESIZE);
    char *m = mmap(0, pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd, at);
    if (m == MAP_FAILED) return report(name, 0, "mmap");
    memcpy(m, "mapped", 6);
    if (msync(m, pg, MS_SYNC)) return report(name, 0, "msync");
    char buf[8] = {0};
    if (pread(fd, buf, 6, at) != 6) return report(name, 0, "pread");
    if (strcmp(buf, "mapped")) return report(name, 0, "pread after msync differs");
    if (pwrite(fd, "WRITTEN", 7, at) != 7) return report(name, 0, "pwrite");
    report(name, memcmp(m, "WRITTEN", 7) == 0, "mapping does not see the write");
    munmap(m, pg);
    close(fd);
    unlink(name);
}

static void print_times(const char *name, const struct stat *st) {
    printf("%s: atime %ld.%09ld mtime %ld.%09ld\n", name, (long)st->st_atim.tv_sec, st->st_atim.tv_nsec,
           (long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec);
}

static void utimes_(void) {
    struct timespec ts[2] = {{1000000001, 123456789}, {2000000002, 987654321}};
    struct stat st;
    close(open("timed", O_WRONLY | O_CREAT, 0644));
    if (utimensat(AT_FDCWD, "timed", ts, 0) || stat("timed", &st)) report("utime-path", 0, "utimensat");
    else print_times("utime-path", &st);
    int fd = open("timed", O_RDONLY);
    ts[0].tv_nsec = 1; ts[1].tv_nsec = 999999999;
    if (futimens(fd, ts) || fstat(fd, &st)) report("utime-fd", 0, "futimens");
    else print_times("utime-fd", &st);
    close(fd);
    unlink("link"); symlink("timed", "link");
    ts[1].tv_sec = 3;
    if (utimensat(AT_FDCWD, "link", ts, AT_SYMLINK_NOFOLLOW) || lstat("link", &st))
        report("utime-nofollow", 0, "utimensat");
    else print_times("utime-nofollow", &st);
    /* one time alone (touch -m/-a, rsync): the other stays; seconds and nanoseconds are two rows */
    struct timespec only[2] = {{0, UTIME_OMIT}, {5, 555555555}};
    struct stat was;
    if (stat("timed", &was) || utimensat(AT_FDCWD, "timed", only, 0) || stat("timed", &st)) {
        report("utime-mtime-only", 0, "utimensat");
    } else {
        printf("utime-mtime-only: atime seconds %s, mtime %ld.%09ld\n",
               st.st_atim.tv_sec == was.st_atim.tv_sec ? "kept" : "changed", (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
        printf("utime-mtime-only-ns: atime nanoseconds %s\n", st.st_atim.tv_nsec == was.st_atim.tv_nsec ? "kept" : "changed");
    }
    struct timespec aonly[2] = {{7, 777777777}, {0, UTIME_OMIT}};
    if (stat("timed", &was) || utimensat(AT_FDCWD, "timed", aonly, 0) || stat("timed", &st)) {
        report("utime-atime-only", 0, "utimensat");
    } else {
        printf("utime-atime-only: mtime %s, atime seconds %ld\n", st.st_mtim.tv_sec == was.st_mtim.tv_sec &&
               st.st_mtim.tv_nsec == was.st_mtim.tv_nsec ? "kept" : "changed", (long)st.st_atim.tv_sec);
        printf("utime-atime-only-ns: atime nanoseconds %09ld\n", st.st_atim.tv_nsec);
    }
    mkdir("tdir", 0755);
    ts[1].tv_sec = 4;
    if (utimensat(AT_FDCWD, "tdir", ts, 0) || stat("tdir", &st)) report("utime-dir", 0, "utimensat");
    else print_times("utime-dir", &st);
}

/* user.* xattrs on `path`: set, replace, get, list, remove; prints what each step saw. */
static void xattr_cycle(const char *name, const char *path) {
    char buf[256] = {0};
    if (setxattr(path, "user.test", "value", 5, XATTR_CREATE)) return report(name, 0, "setxattr");
    if (setxattr(path, "user.test", "value", 5, XATTR_CREATE) == 0 || errno != EEXIST)
        return report(name, 0, "XATTR_CREATE of an existing name did not fail with EEXIST");
    if (setxattr(path, "user.other", "", 0, 0)) return report(name, 0, "setxattr empty");
    if (setxattr(path, "user.test", "replaced", 8, XATTR_REPLACE)) return report(name, 0, "XATTR_REPLACE");
    ssize_t n = getxattr(path, "user.test", buf, sizeof buf);
    if (n != 8 || memcmp(buf, "replaced", 8)) return report(name, 0, "getxattr");
    if (getxattr(path, "user.test", buf, 2) != -1 || errno != ERANGE) return report(name, 0, "no ERANGE");
    n = listxattr(path, buf, sizeof buf);
    int seen = 0;
    for (char *s = buf; n > 0 && s < buf + n; s += strlen(s) + 1)
        seen += !strcmp(s, "user.test") * 1 + !strcmp(s, "user.other") * 2;
    if (seen != 3) return report(name, 0, "listxattr");
    if (removexattr(path, "user.test") || removexattr(path, "user.other")) return report(name, 0, "removexattr");
    if (getxattr(path, "user.test", buf, sizeof buf) != -1 || errno != ENODATA)
        return report(name, 0, "getxattr after remove did not fail with ENODATA");
    if (removexattr(path, "user.test") != -1 || errno != ENODATA) return report(name, 0, "second removexattr");
    n = listxattr(path, buf, sizeof buf);
    for (char *s = buf; n > 0 && s < buf + n; s += strlen(s) + 1)
        if (!strncmp(s, "user.", 5)) return report(name, 0, "listxattr after remove");
    report(name, 1, "");
}

static void xattrs(void) {
    close(open("xa", O_WRONLY | O_CREAT, 0644));
    xattr_cycle("xattr-user", "xa");
    mkdir("xadir", 0755);
    xattr_cycle("xattr-user-dir", "xadir");
    /* a file of the image: the first setxattr copies it up into the writable layer */
    if (access("/imgxattr/file", F_OK) == 0) xattr_cycle("xattr-user-image", "/imgxattr/file");
    int fd = open("xa", O_RDWR);
    report("xattr-user-fd", fd >= 0 && fsetxattr(fd, "user.fd", "1", 1, 0) == 0 && fgetxattr(fd, "user.fd", 0, 0) == 1
           && fremovexattr(fd, "user.fd") == 0, "f*xattr");
    close(fd);
}

/* POSIX ACLs as setfacl writes them (tar --acls, cp -a, rsync -A): an access ACL with a named user, and a
   directory's default ACL, which a file made in it inherits (with the mode the mask allows) */
static void acl_entry(char *at, unsigned short tag, unsigned short perm, unsigned id) {
    memcpy(at, &tag, 2); memcpy(at + 2, &perm, 2); memcpy(at + 4, &id, 4);
}

static void acls(void) {
    char acl[4 + 5 * 8], buf[64];
    unsigned version = 2, perms[5] = {6, 4, 4, 4, 4};
    unsigned short tags[5] = {1, 2, 4, 0x10, 0x20};
    memcpy(acl, &version, 4);
    for (int i = 0; i < 5; i++) acl_entry(acl + 4 + 8 * i, tags[i], perms[i], tags[i] == 2 ? 1000 : 0xFFFFFFFFu);
    close(open("acl", O_WRONLY | O_CREAT, 0644));
    if (setxattr("acl", "system.posix_acl_access", acl, sizeof acl, 0)) report("acl-access", 0, "setxattr");
    else report("acl-access", getxattr("acl", "system.posix_acl_access", buf, sizeof buf) == sizeof acl &&
                memcmp(buf, acl, sizeof acl) == 0, "getxattr");
    mkdir("acldir", 0755);
    acl_entry(acl + 4 + 8 * 4, 0x20, 0, 0xFFFFFFFFu);
    if (setxattr("acldir", "system.posix_acl_default", acl, sizeof acl, 0)) return report("acl-default", 0, "setxattr");
    int fd = open("acldir/new", O_WRONLY | O_CREAT, 0666);
    struct stat st;
    report("acl-default", fd >= 0 && fstat(fd, &st) == 0 && (st.st_mode & 0777) == 0640 &&
           getxattr("acldir/new", "system.posix_acl_access", buf, sizeof buf) == sizeof acl, "inherited");
    close(fd);
}

static void locks(void) {
    int a = open("locked", O_RDWR | O_CREAT, 0644), b = open("locked", O_RDWR);
    struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 1LL << 33, .l_len = 10};
    if (fcntl(a, F_OFD_SETLK, &l)) return report("lock-ofd-64", 0, "F_OFD_SETLK");
    struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (1LL << 33) + 5, .l_len = 1};
    if (fcntl(b, F_OFD_GETLK, &q)) return report("lock-ofd-64", 0, "F_OFD_GETLK");
    printf("lock-ofd-64: type %s start %lld len %lld\n", q.l_type == F_WRLCK ? "wr" : "other",
           (long long)q.l_start, (long long)q.l_len);
    struct flock p = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (1LL << 40), .l_len = 0};
    report("lock-posix-64", fcntl(b, F_SETLK, &p) == 0, "F_SETLK");
    pid_t child = fork();
    if (child == 0) {
        int c = open("locked", O_RDWR);
        struct flock g = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = (1LL << 40) + 7, .l_len = 1};
        if (fcntl(c, F_GETLK, &g)) _exit(2);
        printf("lock-posix-64-other: type %s start %lld len %lld owner-is-parent %d\n",
               g.l_type == F_WRLCK ? "wr" : "other", (long long)g.l_start, (long long)g.l_len, g.l_pid == getppid());
        struct flock s = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (1LL << 40) + 7, .l_len = 1};
        _exit(fcntl(c, F_SETLK, &s) == -1 && (errno == EAGAIN || errno == EACCES) ? 0 : 3);
    }
    int status = -1;
    waitpid(child, &status, 0);
    report("lock-posix-64-conflict", WIFEXITED(status) && WEXITSTATUS(status) == 0, "child's F_SETLK");
    /* a blocking lock on a free range (lockf(F_LOCK), Python's fcntl.lockf): granted at once */
    struct flock w = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100};
    report("lock-posix-wait", fcntl(a, F_SETLKW, &w) == 0, "F_SETLKW");
    close(a); close(b);
}

static void truncation(void) {
    int fd = open("trunc", O_RDWR | O_CREAT | O_TRUNC, 0644);
    struct stat st;
    if (write(fd, "0123456789", 10) != 10 || ftruncate(fd, 4096) || fstat(fd, &st)) return report("ftruncate", 0, "");
    printf("ftruncate: size %lld\n", (long long)st.st_size);
    if (truncate("trunc", 3) || fstat(fd, &st)) return report("truncate-open", 0, "truncate");
    printf("truncate-open: size %lld\n", (long long)st.st_size);
    close(fd);
}

static void misc(void) {
    int fd = open(".", O_TMPFILE | O_RDWR, 0600);
    report("o-tmpfile", fd >= 0, "open");
    struct stat st;
    if (fd >= 0) {
        char path[64], buf[8] = {0};
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        unlink("tmpfile-linked");
        int ok = write(fd, "anon", 4) == 4 && fstat(fd, &st) == 0 && st.st_nlink == 0;
        ok = ok && linkat(AT_FDCWD, path, AT_FDCWD, "tmpfile-linked", AT_SYMLINK_FOLLOW) == 0;
        int rd = open("tmpfile-linked", O_RDONLY);
        ok = ok && rd >= 0 && read(rd, buf, 4) == 4 && !strcmp(buf, "anon") && fstat(fd, &st) == 0 && st.st_nlink == 1;
        report("o-tmpfile-linkat", ok, "linkat");
        close(rd);
        close(fd);
    } else report("o-tmpfile-linkat", 0, "open");
    fd = open(".", O_TMPFILE | O_RDWR | O_EXCL, 0600);
    if (fd >= 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        report("o-tmpfile-excl", linkat(AT_FDCWD, path, AT_FDCWD, "never", AT_SYMLINK_FOLLOW) == -1 && errno == ENOENT,
               "linkat of an O_EXCL tmpfile");
        close(fd);
    } else report("o-tmpfile-excl", 0, "open");
    /* its mode: the umask applied, or in a directory with a default ACL (acls() made acldir) the ACL
       inherited and the mode its mask allows */
    fd = open(".", O_TMPFILE | O_RDWR | O_EXCL, 0666);
    if (fd >= 0 && fstat(fd, &st) == 0) printf("o-tmpfile-excl-mode: %o\n", (unsigned)(st.st_mode & 07777));
    else report("o-tmpfile-excl-mode", 0, "open");
    if (fd >= 0) close(fd);
    fd = open("acldir", O_TMPFILE | O_RDWR | O_EXCL, 0666);
    if (fd >= 0 && fstat(fd, &st) == 0) {
        char acl[64];
        printf("o-tmpfile-excl-acl: mode %o acl %zd\n", (unsigned)(st.st_mode & 07777),
               fgetxattr(fd, "system.posix_acl_access", acl, sizeof acl));
    } else report("o-tmpfile-excl-acl", 0, "open");
    if (fd >= 0) close(fd);
    fd = open("alloc", O_RDWR | O_CREAT | O_TRUNC, 0644);
    /* allocated: the blocks exist (a later write cannot fail for room), du counts them */
    report("fallocate", fallocate(fd, 0, 0, 1 << 20) == 0 && fstat(fd, &st) == 0 && st.st_size == 1 << 20 &&
           st.st_blocks >= 2048, "fallocate");
    blkcnt_t before = st.st_blocks;
    char data[8192], back[8192], zeros[4096] = {0};
    memset(data, 'x', sizeof data);
    if (pwrite(fd, data, sizeof data, 0) != sizeof data || fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                                                     0, 512 << 10))
        report("fallocate-punch", 0, "punch hole");
    else {
        /* what a reader sees (zeros, the size kept), then whether the host freed the blocks */
        report("fallocate-punch", fstat(fd, &st) == 0 && st.st_size == 1 << 20 && pread(fd, back, 4096, 4096) == 4096
               && memcmp(back, zeros, 4096) == 0, "read after punch");
        printf("fallocate-punch-blocks: %s\n", st.st_blocks <= before - 1024 ? "freed" : "kept");
    }
    report("fallocate-keep-size", fallocate(fd, FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20) == 0 && fstat(fd, &st) == 0
           && st.st_size == 1 << 20, "keep size");
    close(fd);
    /* zero range: over data and past the end (the size grows), then with KEEP_SIZE (it does not) */
    fd = open("zrange", O_RDWR | O_CREAT | O_TRUNC, 0644);
    memset(data, 'y', sizeof data);
    if (pwrite(fd, data, sizeof data, 0) != sizeof data || fallocate(fd, FALLOC_FL_ZERO_RANGE, 4096, 8192))
        report("fallocate-zero-range", 0, "zero range");
    else report("fallocate-zero-range", fstat(fd, &st) == 0 && st.st_size == 12288 && pread(fd, back, 8192, 0) == 8192
                && back[4095] == 'y' && memcmp(back + 4096, zeros, 4096) == 0, "read after zero range");
    if (pwrite(fd, data, sizeof data, 0) != sizeof data ||
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 8000, 8192))
        report("fallocate-zero-range-keep", 0, "zero range");
    else report("fallocate-zero-range-keep", fstat(fd, &st) == 0 && st.st_size == 12288 &&
                pread(fd, back, 8192, 4096) == 8192 && back[3903] == 'y' && memcmp(back + 3904, zeros, 4096) == 0,
                "read after zero range");
    /* moving data: collapse a block out of the middle */
    report("fallocate-collapse", fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, 4096) == 0 && fstat(fd, &st) == 0 &&
           st.st_size == 8192, "collapse range");
    close(fd);
    /* posix_fallocate (PostgreSQL 16's relation extension, rsync --preallocate, SQLite's chunk size): where
       fallocate() says EOPNOTSUPP, glibc writes a zero byte per block the range has no data in */
    fd = open("palloc", O_RDWR | O_CREAT | O_TRUNC, 0644);
    char pbuf[4] = {0};
    errno = posix_fallocate(fd, 0, 1 << 20);
    report("posix-fallocate", errno == 0 && pwrite(fd, "abc", 3, 0) == 3 &&
           (errno = posix_fallocate(fd, 0, 2 << 20)) == 0 && fstat(fd, &st) == 0 && st.st_size == 2 << 20 &&
           pread(fd, pbuf, 3, 0) == 3 && strcmp(pbuf, "abc") == 0, "posix_fallocate");
    close(fd);
    fd = open("sparse", O_RDWR | O_CREAT | O_TRUNC, 0644);
    report("sparse", pwrite(fd, "x", 1, 3LL << 30) == 1 && fstat(fd, &st) == 0 && st.st_blocks < 1024, "pwrite");
    printf("sparse-seek: data %lld hole %lld\n", (long long)lseek(fd, 0, SEEK_DATA), (long long)lseek(fd, 0, SEEK_HOLE));
    /* st_blksize, the preferred I/O size: cp and tar write a hole only for a zero run that fills whole
       blocks of it, and stdio sizes its buffers by it */
    if (fstat(fd, &st) == 0 && st.st_blksize == sysconf(_SC_PAGESIZE)) printf("st-blksize: page\n");
    else printf("st-blksize: %ld\n", (long)st.st_blksize);
    close(fd);
    fd = open("open-unlinked", O_RDWR | O_CREAT | O_TRUNC, 0644);
    char buf[4] = {0};
    report("unlink-open", write(fd, "abc", 3) == 3 && unlink("open-unlinked") == 0 && pread(fd, buf, 3, 0) == 3 &&
           strcmp(buf, "abc") == 0, "io");
    close(fd);
    fd = open("renamed", O_RDWR | O_CREAT | O_TRUNC, 0644);
    report("rename-link-open", rename("renamed", "renamed2") == 0 && link("renamed2", "hard") == 0 &&
           fstat(fd, &st) == 0 && st.st_nlink == 2, "rename/link");
    close(fd);
    struct statfs sf;
    report("statfs", statfs(".", &sf) == 0 && sf.f_bsize > 0 && sf.f_blocks > 0 && sf.f_bfree <= sf.f_blocks &&
           sf.f_bavail <= sf.f_bfree && sf.f_namelen >= 255, "figures");
    /* the root holds the image's files: df / shows them used (CPython's test_shutil.test_disk_usage) */
    struct statfs rf;
    report("statfs-root-used", statfs("/", &rf) == 0 && rf.f_blocks > rf.f_bfree && rf.f_bfree >= rf.f_bavail &&
           rf.f_files > rf.f_ffree, "nothing used");
}

/* An inotify instance watching `path` for every event but reads and opens; -1 when it cannot. */
static int watch_changes(const char *path) {
    int in = inotify_init1(IN_NONBLOCK);
    if (in >= 0 && inotify_add_watch(in, path, IN_ALL_EVENTS & ~(IN_ACCESS | IN_OPEN | IN_CLOSE_NOWRITE)) < 0) {
        close(in);
        return -1;
    }
    return in;
}

/* The row `name`: each event queued on `in`, in order, as its mask (with ":name" when `names`);
 * "no events" when there is none. Closes `in`. */
static void print_events(int in, const char *name, int names) {
    char buf[4096] __attribute__((aligned(8)));
    ssize_t n = read(in, buf, sizeof buf);
    if (n <= 0) {
        close(in);
        return report(name, 0, "no events");
    }
    printf("%s:", name);
    for (char *p = buf; p < buf + n;) {
        struct inotify_event *e = (void *)p;
        if (names) printf(" %x:%s", e->mask, e->len ? e->name : "-");
        else printf(" %x", e->mask);
        p += sizeof *e + e->len;
    }
    printf("\n");
    close(in);
}

/* inotify on files this container changes: the events, in order, of a create/write/rename/delete. */
static void inotify_(void) {
    mkdir("watched", 0755);
    int in = watch_changes("watched");
    if (in < 0) return report("inotify", 0, "inotify_add_watch");
    int fd = open("watched/f", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "x", 1) != 1) return report("inotify", 0, "write");
    close(fd);
    if (chmod("watched/f", 0600) || rename("watched/f", "watched/g") || unlink("watched/g") || mkdir("watched/d", 0755))
        return report("inotify", 0, "changes");
    print_events(in, "inotify", 1);
}

/* inotify on a file itself, which has a second name (a hard link): a write through the other name, a
 * chmod, a rename, then the removal of both names (IN_DELETE_SELF once the last one goes). */
static void inotify_file(void) {
    unlink("wf"); unlink("wf-link");
    close(open("wf", O_WRONLY | O_CREAT | O_TRUNC, 0644));
    if (link("wf", "wf-link")) return report("inotify-file", 0, "link");
    int in = watch_changes("wf");
    if (in < 0) return report("inotify-file", 0, "inotify_add_watch");
    int fd = open("wf-link", O_WRONLY | O_APPEND);
    if (fd < 0 || write(fd, "x", 1) != 1) return report("inotify-file", 0, "write");
    close(fd);
    if (chmod("wf", 0600) || rename("wf", "wf2") || unlink("wf2") || unlink("wf-link"))
        return report("inotify-file", 0, "changes");
    print_events(in, "inotify-file", 0);
}

/* Link counts of directories: one the container made (with two subdirectories) and the working
 * directory (/tmp: the image has it and the container wrote into it). */
static void dir_nlink(void) {
    struct stat st;
    mkdir("nl", 0755); mkdir("nl/a", 0755); mkdir("nl/b", 0755);
    if (stat("nl", &st)) return report("dir-nlink-new", 0, "stat");
    printf("dir-nlink-new: %lu\n", (unsigned long)st.st_nlink);
    if (stat(".", &st)) return report("dir-nlink-cwd", 0, "stat");
    printf("dir-nlink-cwd: %lu\n", (unsigned long)st.st_nlink);
}

/* Files of the image itself (the read-only layers: an ext4 disk in the guest), made by the test. */
static void image_file(const char *path) {
    struct stat st;
    char name[64];
    snprintf(name, sizeof name, "image-%s", strrchr(path, '/') + 1);
    if (lstat(path, &st)) return report(name, 0, "lstat");
    printf("%s: mode %o uid %u gid %u nlink %lu size %lld mtime %ld.%09ld\n", name, (unsigned)st.st_mode,
           (unsigned)st.st_uid, (unsigned)st.st_gid, (unsigned long)st.st_nlink, (long long)st.st_size,
           (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
}

static void image_files(void) {
    image_file("/imgfiles");
    image_file("/imgfiles/capfile");
    image_file("/imgfiles/suid");
    image_file("/imgfiles/hl1");
    image_file("/imgfiles/fifo");
    image_file("/imgfiles/link");
    struct stat a, b;
    report("image-hardlink", stat("/imgfiles/hl1", &a) == 0 && stat("/imgfiles/hl2", &b) == 0 &&
           a.st_ino == b.st_ino && a.st_dev == b.st_dev, "hl1 and hl2 are not one file");
    unsigned char cap[64];
    ssize_t n = getxattr("/imgfiles/capfile", "security.capability", cap, sizeof cap);
    if (n < 0) return report("image-capability", 0, "getxattr");
    printf("image-capability: size %zd ", n);
    for (ssize_t i = 0; i < n; i++) printf("%02x", cap[i]);
    printf("\n");
}

/* flock(2) (flock(1), pid files, pip, apt's and many daemons' lock files): another open file description
 * and another process are refused, unlock frees it, and it is independent of POSIX locks on the file */
static void flocks(void) {
    int a = open("flocked", O_RDWR | O_CREAT, 0644), b = open("flocked", O_RDWR);
    if (a < 0 || b < 0 || flock(a, LOCK_EX | LOCK_NB)) return report("flock", 0, "LOCK_EX");
    report("flock", 1, "");
    errno = 0;
    report("flock-conflict", flock(b, LOCK_EX | LOCK_NB) == -1 && errno == EWOULDBLOCK, "second LOCK_EX not refused");
    pid_t child = fork();
    if (child == 0) {
        int c = open("flocked", O_RDWR);
        int shared = flock(c, LOCK_SH | LOCK_NB) == -1 && errno == EWOULDBLOCK;
        /* a POSIX lock on the same file is another kind of lock: granted beside the flock */
        struct flock w = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        int posix = fcntl(c, F_SETLK, &w) == 0;
        _exit((shared ? 0 : 1) | (posix ? 0 : 2));
    }
    int status = -1;
    waitpid(child, &status, 0);
    printf("flock-other-process: refused %s, posix lock beside it %s\n",
           WIFEXITED(status) && !(WEXITSTATUS(status) & 1) ? "yes" : "no",
           WIFEXITED(status) && !(WEXITSTATUS(status) & 2) ? "granted" : "refused");
    report("flock-unlock", flock(a, LOCK_UN) == 0 && flock(b, LOCK_EX | LOCK_NB) == 0, "LOCK_EX after LOCK_UN");
    /* the lock belongs to the open file description: closing another descriptor of the file keeps it */
    int d = open("flocked", O_RDWR);
    close(d);
    errno = 0;
    report("flock-kept-on-other-close", flock(a, LOCK_SH | LOCK_NB) == -1 && errno == EWOULDBLOCK, "lost");
    close(a); close(b);
}

/* A file unlinked while open (tmpfile(3), databases' temporary files): still written, sized, truncated,
 * chmod'ed, timed and given xattrs through its descriptor; and a file renamed over while open */
static void unlinked_open(void) {
    int fd = open("gone", O_RDWR | O_CREAT | O_TRUNC, 0644);
    struct stat st;
    if (fd < 0 || unlink("gone")) return report("unlinked-fstat", 0, "open/unlink");
    report("unlinked-fstat", write(fd, "abcdef", 6) == 6 && fstat(fd, &st) == 0 && st.st_size == 6 &&
           st.st_nlink == 0, "write/fstat");
    report("unlinked-ftruncate", ftruncate(fd, 2) == 0 && fstat(fd, &st) == 0 && st.st_size == 2, "ftruncate");
    report("unlinked-fchmod", fchmod(fd, 0600) == 0 && fstat(fd, &st) == 0 && (st.st_mode & 0777) == 0600, "fchmod");
    struct timespec ts[2] = {{10, 1}, {20, 2}};
    report("unlinked-futimens", futimens(fd, ts) == 0 && fstat(fd, &st) == 0 && st.st_mtim.tv_sec == 20, "futimens");
    report("unlinked-fsetxattr", fsetxattr(fd, "user.x", "1", 1, 0) == 0, "fsetxattr");
    close(fd);
    fd = open("target", O_RDWR | O_CREAT | O_TRUNC, 0644);
    int n = open("replacement", O_RDWR | O_CREAT | O_TRUNC, 0644);
    char buf[4] = {0}, got[4] = {0};
    if (fd < 0 || n < 0 || write(fd, "old", 3) != 3 || write(n, "new", 3) != 3) return report("rename-over-open", 0, "");
    close(n);
    int r = open("target", O_RDONLY);
    struct stat was;
    if (fstat(fd, &was) || rename("replacement", "target")) return report("rename-over-open", 0, "rename");
    report("rename-over-open", pread(fd, buf, 3, 0) == 3 && !strcmp(buf, "old") && pread(r, got, 3, 0) == 3 &&
           !strcmp(got, "old"), "read through the old descriptors");
    /* the old descriptor is still the old file: its inode, and no name left */
    if (fstat(fd, &st)) report("rename-over-open-fstat", 0, "fstat");
    else printf("rename-over-open-fstat: same inode %s nlink %lu\n", st.st_ino == was.st_ino ? "yes" : "no",
                (unsigned long)st.st_nlink);
    close(r);
    /* what is done through the old descriptor is done to the old file, never to the one that took its name */
    int t = ftruncate(fd, 1), m = fchmod(fd, 0600);
    printf("rename-over-open-setattr: ftruncate %s fchmod %s\n", t ? "failed" : "done", m ? "failed" : "done");
    r = open("target", O_RDONLY);
    memset(got, 0, sizeof got);
    if (r < 0 || fstat(r, &st) || read(r, got, 3) < 0) report("rename-over-open-new", 0, "new name");
    else printf("rename-over-open-new: reads %s mode %o\n", got, (unsigned)(st.st_mode & 0777));
    close(r); close(fd);
}

/* renameat2 flags (mv -n and coreutils 9's mv, systemd, atomic swaps) */
static void renames(void) {
    unlink("ra"); unlink("rb"); unlink("rc");
    close(open("ra", O_CREAT | O_WRONLY, 0644));
    close(open("rb", O_CREAT | O_WRONLY, 0600));
    errno = 0;
    report("rename-noreplace-exists", renameat2(AT_FDCWD, "ra", AT_FDCWD, "rb", RENAME_NOREPLACE) == -1 &&
           errno == EEXIST, "renameat2");
    report("rename-noreplace", renameat2(AT_FDCWD, "ra", AT_FDCWD, "rc", RENAME_NOREPLACE) == 0, "renameat2");
    struct stat st;
    report("rename-exchange", renameat2(AT_FDCWD, "rc", AT_FDCWD, "rb", RENAME_EXCHANGE) == 0 &&
           stat("rb", &st) == 0 && (st.st_mode & 0777) == 0644, "renameat2");
}

/* Owners and modes root sets (tar, dpkg, cp -a), and what a non-root process (uid 1000) may do */
static void owners(void) {
    struct stat st;
    unlink("owned");
    close(open("owned", O_CREAT | O_WRONLY, 0644));
    report("chown", chown("owned", 1234, 5678) == 0 && stat("owned", &st) == 0 && st.st_uid == 1234 &&
           st.st_gid == 5678, "chown");
    /* root changes the mode of a file another user owns (tar -p after its chown, chown -R then chmod) */
    report("chmod-other-owner", chmod("owned", 0640) == 0 && stat("owned", &st) == 0 && (st.st_mode & 07777) == 0640,
           "chmod");
    report("chmod-setuid", chmod("owned", 06755) == 0 && stat("owned", &st) == 0 && (st.st_mode & 07777) == 06755,
           "chmod");
    unlink("private");
    close(open("private", O_CREAT | O_WRONLY, 0600));
    mkdir("open-dir", 0777);
    chmod("open-dir", 0777);
    pid_t child = fork();
    if (child == 0) {
        if (setgid(1000) || setuid(1000)) _exit(9);
        if (open("private", O_RDONLY) >= 0 || errno != EACCES) _exit(3);
        int fd = open("open-dir/mine", O_CREAT | O_WRONLY, 0644);
        if (fd < 0 || fstat(fd, &st) || st.st_uid != 1000 || st.st_gid != 1000) _exit(4);
        if (fchown(fd, 0, 0) == 0 || errno != EPERM) _exit(5);
        if (unlink("owned") == 0 || errno != EACCES) _exit(6);
        _exit(0);
    }
    int status = -1;
    waitpid(child, &status, 0);
    printf("non-root: exit %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

/* Two processes with their own MAP_SHARED mappings of one file (SQLite's WAL index, -shm) */
static void mmap_two(void) {
    int fd = open("mm2", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 4096)) return report("mmap-two-processes", 0, "create");
    char *m = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) return report("mmap-two-processes", 0, "mmap");
    memcpy(m, "parent", 6);
    pid_t child = fork();
    if (child == 0) {
        int d = open("mm2", O_RDWR);
        char *n = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
        if (n == MAP_FAILED || memcmp(n, "parent", 6)) _exit(3);
        memcpy(n + 100, "child", 5);
        _exit(0);
    }
    int status = -1;
    waitpid(child, &status, 0);
    report("mmap-two-processes", WIFEXITED(status) && WEXITSTATUS(status) == 0 && memcmp(m + 100, "child", 5) == 0,
           "the other process's mapping");
    munmap(m, 4096);
    close(fd);
}

/* What databases and package managers do besides: fsync of a directory, O_DIRECT, copy_file_range,
 * an xattr of 3000 bytes (ext4 takes at most a block), UTIME_NOW, and removing entries while reading the directory (shutil.rmtree, rm -r) */
static void misc2(void) {
    int d = open(".", O_RDONLY | O_DIRECTORY);
    report("fsync-dir", d >= 0 && fsync(d) == 0, "fsync");
    close(d);
    int fd = open("direct", O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
    void *buf = 0;
    if (fd < 0 || posix_memalign(&buf, 4096, 4096)) report("o-direct", 0, "open");
    else {
        memset(buf, 'd', 4096);
        report("o-direct", pwrite(fd, buf, 4096, 0) == 4096 && pread(fd, buf, 4096, 0) == 4096 &&
               ((char *)buf)[4095] == 'd', "io");
    }
    if (fd >= 0) close(fd);
    free(buf);
    int src = open("cfr-src", O_RDWR | O_CREAT | O_TRUNC, 0644), dst = open("cfr-dst", O_RDWR | O_CREAT | O_TRUNC, 0644);
    char big[65536], back[65536];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (char)(i * 7);
    loff_t in = 0, out = 0;
    report("copy-file-range", src >= 0 && dst >= 0 && write(src, big, sizeof big) == sizeof big &&
           copy_file_range(src, &in, dst, &out, sizeof big, 0) == sizeof big && pread(dst, back, sizeof back, 0) ==
           sizeof back && memcmp(big, back, sizeof big) == 0, "copy_file_range");
    close(src); close(dst);
    close(open("xbig", O_CREAT | O_WRONLY, 0644));
    memset(big, 'v', 3000);
    report("xattr-large", setxattr("xbig", "user.big", big, 3000, 0) == 0 &&
           getxattr("xbig", "user.big", 0, 0) == 3000 && getxattr("xbig", "user.big", back, sizeof back) == 3000 &&
           memcmp(big, back, 3000) == 0, "3000 bytes");
    struct timespec now[2] = {{0, UTIME_NOW}, {0, UTIME_NOW}};
    struct stat st;
    time_t t = time(0);
    report("utime-now", utimensat(AT_FDCWD, "xbig", now, 0) == 0 && stat("xbig", &st) == 0 &&
           st.st_mtim.tv_sec >= t - 5 && st.st_mtim.tv_sec <= t + 5 && st.st_atim.tv_sec >= t - 5 &&
           st.st_atim.tv_sec <= t + 5, "times not the clock's");
    mkdir("many", 0755);
    char name[64];
    for (int i = 0; i < 600; i++) {
        snprintf(name, sizeof name, "many/file-with-a-longer-name-%04d", i);
        close(open(name, O_CREAT | O_WRONLY, 0644));
    }
    DIR *dir = opendir("many");
    int seen = 0;
    for (struct dirent *e; dir && (e = readdir(dir));) {
        if (e->d_name[0] == '.') continue;
        seen++;
        unlinkat(dirfd(dir), e->d_name, 0);
    }
    if (dir) closedir(dir);
    int left = 0;
    dir = opendir("many");
    for (struct dirent *e; dir && (e = readdir(dir));) left += e->d_name[0] != '.';
    if (dir) closedir(dir);
    printf("readdir-unlink: seen %d left %d\n", seen, left);
    report("rmdir-emptied", rmdir("many") == 0, "rmdir");
}

/* Programs and libraries kept on the path (a venv or a build on a volume): a script executed, a file
 * mapped executable as the dynamic loader maps a library */
static void exec_here(void) {
    unlink("script");
    int fd = open("script", O_WRONLY | O_CREAT | O_TRUNC, 0755);
    if (fd < 0 || write(fd, "#!/bin/sh\nexit 7\n", 17) != 17) return report("exec-script", 0, "write");
    close(fd);
    pid_t child = fork();
    if (child == 0) {
        char *argv[] = {"./script", 0};
        execv("./script", argv);
        _exit(errno == EACCES ? 126 : 127);
    }
    int status = -1;
    waitpid(child, &status, 0);
    printf("exec-script: exit %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    fd = open("script", O_RDONLY);
    void *m = fd < 0 ? MAP_FAILED : mmap(0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    report("mmap-exec", m != MAP_FAILED && memcmp(m, "#!/bin/sh", 9) == 0, "mmap PROT_EXEC");
    if (m != MAP_FAILED) munmap(m, 4096);
    if (fd >= 0) close(fd);
}

/* Locks another holder outside the container took (the test holds a POSIX lock on host-posix and a flock
 * on host-flock in a host volume: the host, another pod, a database's other user): rows only where the
 * files exist */
static void host_locks(void) {
    int fd = open("host-posix", O_RDWR);
    if (fd >= 0) {
        struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        int r = fcntl(fd, F_SETLK, &l);
        printf("host-lock-posix: %s\n", r == 0 ? "granted" : errno == EAGAIN || errno == EACCES ? "refused" : strerror(errno));
        close(fd);
    }
    fd = open("host-flock", O_RDWR);
    if (fd >= 0) {
        int r = flock(fd, LOCK_EX | LOCK_NB);
        printf("host-lock-flock: %s\n", r == 0 ? "granted" : errno == EWOULDBLOCK ? "refused" : strerror(errno));
        close(fd);
    }
}

/* Checks run in argv[1] (default /tmp, on the container's root); the image's files are checked only
 * for the default. */
int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    if (chdir(argc > 1 ? argv[1] : "/tmp")) return 2;
    unix_socket();
    fifo();
    mmap_shared("mmap-shared", 8192, 0);
    mmap_shared("mmap-sparse-2g", (3LL << 30), (2LL << 30) - sysconf(_SC_PAGESIZE));
    mmap_shared("mmap-sparse-4g", (5LL << 30), (4LL << 30));
    utimes_();
    xattrs();
    acls();
    locks();
    truncation();
    misc();
    inotify_();
    inotify_file();
    dir_nlink();
    flocks();
    unlinked_open();
    renames();
    owners();
    mmap_two();
    misc2();
    exec_here();
    host_locks();
    if (argc == 1) image_files();
    return 0;
}
