/* pykata-execstart: the agent's exec path (pykata.agent.nsexec) as a small static program.
 *
 * The agent starts it with posix_spawn (vfork: nothing of the agent's heap is copied), so an exec no
 * longer forks the agent and runs Python in the child: under TCG that fork and the child's Python
 * (setns, rlimits, capabilities through ctypes) were most of an exec's time. It does exactly what
 * nsexec._child does, in the same order, from a plan the agent computed and checked (nsexec.plan) and
 * serialized (nsexec.encode_plan) on descriptor 6:
 *
 *   0-2  the process's stdio          3  pidfd of the container's init   4  its cgroup.procs (O_WRONLY)
 *   5    the report pipe              6  the plan (read to its end)
 *
 * and answers on 5 as the Python child does, in one write: "P<pid>", "M<message>" (the program is missing)
 * or "E<message>", then exits (nsexec.started_pid reads it).
 * Every other descriptor is made close-on-exec first. Nothing here trusts the container: the plan comes
 * from the agent, and what is read in the container's mount namespace (/etc/passwd) is bounded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#define PLAN_MAX (1 << 20)
#define REPORT_LIMIT 4096
#define NCAPS 41
#define MAX_SECCOMP_INSTRUCTIONS 4096

static char report[REPORT_LIMIT];

static void answer(char kind, const char *text) {
    size_t n = strlen(text);
    if (n > REPORT_LIMIT - 2)
        n = REPORT_LIMIT - 2;
    report[0] = kind;
    memcpy(report + 1, text, n);
    (void)!write(5, report, n + 1);
}

static __attribute__((noreturn)) void fail(char kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static void fail(char kind, const char *fmt, ...) {
    char text[REPORT_LIMIT];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    answer(kind, text);
    _exit(1);
}

/* as Python's OSError(err, "what: strerror") prints */
static __attribute__((noreturn)) void os_fail(const char *what) {
    int err = errno;
    fail('E', "[Errno %d] %s: %s", err, what, strerror(err));
}

/* -- the plan (nsexec.encode_plan) ------------------------------------------------------------- */

static unsigned char *plan_buf;
static size_t plan_len, plan_at;

static void need(size_t n) {
    if (plan_len - plan_at < n)
        fail('E', "exec plan truncated");
}

static uint32_t u32(void) {
    uint32_t v;
    need(4);
    memcpy(&v, plan_buf + plan_at, 4);
    plan_at += 4;
    return v;
}

static uint64_t u64(void) {
    uint64_t v;
    need(8);
    memcpy(&v, plan_buf + plan_at, 8);
    plan_at += 8;
    return v;
}

static char *str(void) {
    uint32_t n = u32();
    char *s;
    need((size_t)n + 1);
    s = (char *)plan_buf + plan_at;
    if (s[n] != '\0' || memchr(s, '\0', n) != NULL)
        fail('E', "exec plan: bad string");
    plan_at += (size_t)n + 1;
    return s;
}

static char **strings(void) {
    uint32_t n = u32();
    char **v;
    if (n > PLAN_MAX / 4)
        fail('E', "exec plan: too many strings");
    v = calloc((size_t)n + 1, sizeof(char *));
    if (v == NULL)
        fail('E', "out of memory");
    for (uint32_t i = 0; i < n; i++)
        v[i] = str();
    return v;
}

static void read_plan(void) {
    size_t cap = 65536;
    plan_buf = malloc(cap);
    if (plan_buf == NULL)
        fail('E', "out of memory");
    for (;;) {
        ssize_t n;
        if (plan_len == cap) {
            if (cap >= PLAN_MAX)
                fail('E', "exec plan too large");
            cap *= 2;
            plan_buf = realloc(plan_buf, cap);
            if (plan_buf == NULL)
                fail('E', "out of memory");
        }
        n = read(6, plan_buf + plan_len, cap - plan_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            os_fail("reading the exec plan");
        if (n == 0)
            break;
        plan_len += (size_t)n;
    }
    close(6);
}

/* -- steps ---------------------------------------------------------------------------------------- */

static int is_executable(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* `name` on `path` (the plan's: the environment's first PATH, as nsexec._find_program searches) */
static const char *find_program(const char *name, const char *path, char *buf, size_t size) {
    if (strchr(name, '/') != NULL)
        return name;
    for (const char *p = path;;) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        int n = dlen ? snprintf(buf, size, "%.*s/%s", (int)dlen, p, name) : snprintf(buf, size, "./%s", name);
        if (n > 0 && (size_t)n < size && is_executable(buf))
            return buf;
        if (end == NULL)
            return NULL;
        p = end + 1;
    }
}

/* the user's home from the container's /etc/passwd, else "/" (nsexec._home) */
static void home_of(uint32_t uid, char *out, size_t size) {
    static char text[1 << 20];
    ssize_t n, total = 0;
    char want[16];
    int fd = open("/etc/passwd", O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    snprintf(out, size, "/");
    if (fd < 0)
        return;
    while (total < (ssize_t)sizeof(text) - 1 && (n = read(fd, text + total, sizeof(text) - 1 - (size_t)total)) > 0)
        total += n;
    close(fd);
    text[total] = '\0';
    snprintf(want, sizeof(want), "%u", uid);
    for (char *line = text; line != NULL && *line;) {
        char *next = strchr(line, '\n');
        char *f[7] = {0};
        int nf = 0;
        if (next)
            *next++ = '\0';
        for (char *p = line; nf < 7;) {
            f[nf++] = p;
            p = strchr(p, ':');
            if (p == NULL)
                break;
            *p++ = '\0';
        }
        if (nf >= 6 && strcmp(f[2], want) == 0 && f[5][0] == '/') {
            /* the field ends at the next ':' only: nsexec takes parts[5] of split(":") */
            snprintf(out, size, "%s", f[5]);
            return;
        }
        line = next;
    }
}

int main(void) {
    int32_t ns_flags, umask_value;
    uint32_t uid, gid, ngroups, nrlimits, seccomp_len, no_new_privs;
    uint64_t bounding, effective, permitted, inheritable, ambient;
    gid_t *groups;
    unsigned char *seccomp = NULL;
    char **args, **env, *cwd, *search, *home_env = NULL;
    struct sock_fprog prog;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    static char program_buf[4096];
    const char *program;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t actions;
    sigset_t all, none;
    pid_t pid;
    size_t nenv;
    int rc;

    /* nothing of the agent's reaches the program: the report pipe (5) included, as the rest */
    if (syscall(SYS_close_range, 3, ~0U, 4 /* CLOSE_RANGE_CLOEXEC */) != 0)
        os_fail("close_range");
    read_plan();
    if (u32() != 0x32584b50) /* "PKX2" */
        fail('E', "exec plan: bad magic");
    ns_flags = (int32_t)u32();
    uid = u32();
    gid = u32();
    umask_value = (int32_t)u32();
    bounding = u64();
    effective = u64();
    permitted = u64();
    inheritable = u64();
    ambient = u64();
    no_new_privs = u32();
    ngroups = u32();
    if (ngroups > 65536)
        fail('E', "exec plan: too many groups");
    groups = calloc(ngroups ? ngroups : 1, sizeof(gid_t));
    if (groups == NULL)
        fail('E', "out of memory");
    for (uint32_t i = 0; i < ngroups; i++)
        groups[i] = u32();
    nrlimits = u32();
    if (nrlimits > 64)
        fail('E', "exec plan: too many rlimits");
    struct { uint32_t number; uint64_t soft, hard; } rl[64];
    for (uint32_t i = 0; i < nrlimits; i++) {
        rl[i].number = u32();
        rl[i].soft = u64();
        rl[i].hard = u64();
    }
    seccomp_len = u32();
    if (seccomp_len) {
        if (seccomp_len % 8 || seccomp_len / 8 > MAX_SECCOMP_INSTRUCTIONS)
            fail('E', "exec plan: bad seccomp program");
        need(seccomp_len);
        seccomp = plan_buf + plan_at;
        plan_at += seccomp_len;
    }
    args = strings();
    env = strings();
    cwd = str();
    search = str();
    if (args[0] == NULL)
        fail('E', "exec plan: no program");

    /* 1-2: cgroup, namespaces */
    if (write(4, "0", 1) != 1)
        os_fail("cgroup.procs");
    close(4);
    if (setns(3, ns_flags) != 0)
        os_fail("setns");
    close(3);
    /* 3: rlimits, bounding set, ids, umask, cwd */
    for (uint32_t i = 0; i < nrlimits; i++) {
        struct rlimit r = {(rlim_t)rl[i].soft, (rlim_t)rl[i].hard};
        if (setrlimit((int)rl[i].number, &r) != 0)
            os_fail("setrlimit");
    }
    for (int cap = 0; cap < NCAPS; cap++) {
        if (bounding >> cap & 1)
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) {
            char what[64];
            snprintf(what, sizeof(what), "dropping capability %d from the bounding set", cap);
            os_fail(what);
        }
    }
    if (seccomp && !no_new_privs) {
        prog.len = (unsigned short)(seccomp_len / 8);
        prog.filter = (struct sock_filter *)seccomp;
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0)
            os_fail("seccomp");
    }
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0)
        os_fail("keepcaps");
    if (setgroups(ngroups, groups) != 0)
        os_fail("setgroups");
    if (setresgid(gid, gid, gid) != 0)
        os_fail("setresgid");
    if (setresuid(uid, uid, uid) != 0)
        os_fail("setresuid");
    if (umask_value >= 0)
        umask((mode_t)umask_value);
    if (chdir(cwd) != 0)
        fail('E', "chdir `%s`: %s", cwd, strerror(errno));
    /* 4: capabilities, ambient, no_new_privs */
    for (int i = 0; i < 2; i++) {
        data[i].effective = (uint32_t)(effective >> (32 * i));
        data[i].permitted = (uint32_t)(permitted >> (32 * i));
        data[i].inheritable = (uint32_t)(inheritable >> (32 * i));
    }
    if (syscall(SYS_capset, &header, data) != 0)
        os_fail("capset");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0)
        os_fail("clearing ambient capabilities");
    for (int cap = 0; cap < NCAPS; cap++)
        if (ambient >> cap & 1 && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0) {
            char what[64];
            snprintf(what, sizeof(what), "raising ambient capability %d", cap);
            os_fail(what);
        }
    if (no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        os_fail("no_new_privs");

    /* 5: HOME as crun sets it, the program on PATH, then spawn it */
    nenv = 0;
    for (char **e = env; *e != NULL; e++)
        nenv++;
    int has_home = 0;
    for (char **e = env; *e != NULL; e++)
        if (strncmp(*e, "HOME=", 5) == 0)
            has_home = 1;
    if (!has_home) {
        char home[4096];
        char **grown = calloc(nenv + 2, sizeof(char *));
        if (grown == NULL)
            fail('E', "out of memory");
        home_of(uid, home, sizeof(home));
        home_env = malloc(strlen(home) + 6);
        if (home_env == NULL)
            fail('E', "out of memory");
        sprintf(home_env, "HOME=%s", home);
        memcpy(grown, env, nenv * sizeof(char *));
        grown[nenv] = home_env;
        env = grown;
    }
    program = find_program(args[0], search, program_buf, sizeof(program_buf));
    if (program == NULL)
        fail('M', "executable file `%s` not found in $PATH: No such file or directory", args[0]);
    if (seccomp && no_new_privs) {
        prog.len = (unsigned short)(seccomp_len / 8);
        prog.filter = (struct sock_filter *)seccomp;
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0)
            os_fail("seccomp");
    }
    sigfillset(&all);
    sigdelset(&all, SIGKILL);
    sigdelset(&all, SIGSTOP);
    sigemptyset(&none);
    if (posix_spawnattr_init(&attr) || posix_spawn_file_actions_init(&actions))
        fail('E', "posix_spawn: out of memory");
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setsigmask(&attr, &none);
    rc = posix_spawn(&pid, program, &actions, &attr, args, env);
    if (rc != 0)
        fail(rc == ENOENT ? 'M' : 'E', "exec `%s`: %s", args[0], strerror(rc));
    {
        char text[32];
        int n = snprintf(text, sizeof(text), "P%d", (int)pid);
        (void)!write(5, text, (size_t)n);
    }
    return 0;
}
