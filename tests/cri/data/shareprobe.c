/* Two containers of one pod using one file system: run in one container while the other acts.
 *   shareprobe mmap-put FILE TEXT        map FILE MAP_SHARED (made 4096 bytes) and write TEXT into the
 *                                        mapping (no write(2), no msync): only a shared page carries it
 *   shareprobe mmap-wait FILE TEXT SECS [ARMED]  map FILE MAP_SHARED and poll the mapping until it
 *                                        starts with TEXT; prints "seen" (exit 0) or "timeout" (exit 1)
 *   shareprobe inotify DIR SECS [ARMED]  print the name of the first file created in DIR, or "timeout"
 * The waits create the file ARMED once they map / watch, so the other side knows when to act.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static char *map(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0 || ftruncate(fd, 4096) != 0) { perror(path); exit(2); }
    char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(2); }
    close(fd);
    return p;
}

static void armed(const char *marker) {
    if (!marker) return;
    int fd = open(marker, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) close(fd);
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "mmap-put")) {
        char *p = map(argv[2]);
        memcpy(p, argv[3], strlen(argv[3]));
        return 0;
    }
    if (argc >= 5 && !strcmp(argv[1], "mmap-wait")) {
        volatile char *p = map(argv[2]);
        armed(argc >= 6 ? argv[5] : NULL);
        size_t n = strlen(argv[3]);
        time_t end = time(NULL) + atoi(argv[4]);
        while (time(NULL) < end) {
            if (!memcmp((const char *)p, argv[3], n)) { puts("seen"); return 0; }
            usleep(10000);
        }
        puts("timeout");
        return 1;
    }
    if (argc >= 4 && !strcmp(argv[1], "inotify")) {
        int fd = inotify_init1(IN_CLOEXEC);
        if (fd < 0 || inotify_add_watch(fd, argv[2], IN_CREATE) < 0) { perror("inotify"); return 2; }
        armed(argc >= 5 ? argv[4] : NULL);
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, atoi(argv[3]) * 1000) != 1) { puts("timeout"); return 1; }
        char buf[4096] __attribute__((aligned(8)));
        ssize_t len = read(fd, buf, sizeof buf);
        if (len < (ssize_t)sizeof(struct inotify_event)) { puts("short"); return 1; }
        struct inotify_event *ev = (struct inotify_event *)buf;
        puts(ev->len ? ev->name : "?");
        return 0;
    }
    fprintf(stderr, "usage: see the comment in shareprobe.c\n");
    return 2;
}
