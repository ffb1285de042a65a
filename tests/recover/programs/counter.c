/* Stage-1 recovery program: one thread, anonymous memory, an O_APPEND file, FPU state.
 *
 * counter LOG [--pause] [--mib N] [--threads]
 * Fills N MiB (default 8) of anonymous memory with a pseudo-random pattern and keeps its
 * sum; every 100 ms it counts on and appends "N ok S" (or "N BAD ...") to LOG with fsync,
 * where S is a floating-point accumulator that must equal N/2; the sum is checked on
 * every line (every N/8th line for more than 8 MiB, and on the first line). With
 * --threads, a second thread waits on a condition variable (a futex) for each line's
 * number, and a third computes in user code (two sums in SSE registers, one always
 * twice the other): a line is ok only if the waiter saw the previous number and the
 * computing thread moved on with its sums in step. After a recovery the line numbers go
 * on without a gap, and every line says ok. With --pause it writes "ready" and waits
 * in pause(), leaving memory unchanged (for the golden comparison with criu dump).
 * It holds LOG with a flock lock and a POSIX write lock over all of it: another
 * process can take neither, before and after a recovery. It maps LOG.map shared (the
 * file's descriptor closed) and keeps the last line's number there: a line is ok only
 * if the mapping still holds the one before; the same in anonymous shared memory. It
 * also keeps that number in flight in a UNIX socketpair and in the FIFO
 * /tmp/BASE.fifo (BASE: LOG's file name; open for reading and writing): each line reads
 * the previous one out of each and sends its own. And in /dev/shm/BASE.state (POSIX
 * shared memory: a file on a tmpfs, which a dead kernel took with it): mapped shared,
 * its first page holds the last number; after it, the file descriptor appends every
 * number, and a line is ok only if the file ends with the previous one where the
 * descriptor stands. It holds a POSIX read lock on its byte 128, as sqlite does on
 * the -shm file it maps.
 */
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>


static volatile sig_atomic_t usr1;
static void on_usr1(int sig) { (void)sig; usr1++; }

static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t posted_changed = PTHREAD_COND_INITIALIZER;
static uint64_t posted, seen;
static volatile uint64_t spins;

static void *waiter(void *unused) {
    (void)unused;
    pthread_mutex_lock(&mutex);
    for (;;) {
        while (seen == posted) pthread_cond_wait(&posted_changed, &mutex);
        seen = posted;
    }
    return NULL;
}

static volatile int spin_bad;

/* Computes in user code, with its state in registers (general and SSE): a thread the VM
 * may stop on its vCPU, whose registers are then only there. */
static void *spinner(void *unused) {
    (void)unused;
    double a = 1, b = 2;
    for (;;) {
        for (int i = 0; i < 1000000; i++) {
            a += 1.0;
            b += 2.0;
            if (i % 4096 == 0) spins++;
        }
        if (b != 2 * a) spin_bad = 1;
        struct timespec rest = {0, 20 * 1000 * 1000};
        nanosleep(&rest, NULL);
    }
    return NULL;
}

static uint64_t next(uint64_t *s) {
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s;
}

int main(int argc, char **argv) {
    if (argc < 2) { fputs("usage: counter LOG [--pause] [--mib N]\n", stderr); return 2; }
    int pause_mode = 0, threads = 0;
    size_t mib = 8;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--pause") == 0) pause_mode = 1;
        else if (strcmp(argv[i], "--threads") == 0) threads = 1;
        else if (strcmp(argv[i], "--mib") == 0 && i + 1 < argc) mib = strtoul(argv[++i], 0, 10);
    }
    const size_t WORDS = mib << 17, every = mib > 8 ? mib / 8 : 1;
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) { perror(argv[1]); return 1; }
    struct flock whole = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (flock(fd, LOCK_EX | LOCK_NB) || fcntl(fd, F_SETLK, &whole)) {
        perror("locking the log"); return 1;
    }
    char map_path[4096];
    snprintf(map_path, sizeof map_path, "%s.map", argv[1]);
    int map_fd = open(map_path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (map_fd < 0 || ftruncate(map_fd, 4096)) { perror(map_path); return 1; }
    volatile uint64_t *last = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
    if (last == MAP_FAILED) { perror("mmap"); return 1; }
    close(map_fd);
    volatile uint64_t *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) { perror("mmap shared"); return 1; }
    *shared = 0;  /* its page exists from here on, also for --pause */
    int pair[2];
    uint64_t in_flight = 0;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) ||
        write(pair[0], &in_flight, sizeof in_flight) != sizeof in_flight) {
        perror("socketpair"); return 1;
    }
    const char *base = strrchr(argv[1], '/') ? strrchr(argv[1], '/') + 1 : argv[1];
    char fifo_path[4096];
    snprintf(fifo_path, sizeof fifo_path, "/tmp/%s.fifo", base);
    unlink(fifo_path);
    int fifo = -1;
    if (mkfifo(fifo_path, 0600) || (fifo = open(fifo_path, O_RDWR | O_NONBLOCK)) < 0 ||
        write(fifo, &in_flight, sizeof in_flight) != sizeof in_flight) {
        perror(fifo_path); return 1;
    }
    char state_path[4096];
    snprintf(state_path, sizeof state_path, "/dev/shm/%s.state", base);
    int state = open(state_path, O_RDWR | O_CREAT | O_TRUNC, 0640);
    volatile uint64_t *posix_shm = MAP_FAILED;
    if (state < 0 || ftruncate(state, 4096) || lseek(state, 4096, SEEK_SET) != 4096 ||
        write(state, &in_flight, sizeof in_flight) != sizeof in_flight ||
        (posix_shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, state, 0))
        == MAP_FAILED) {
        perror(state_path); return 1;
    }
    *posix_shm = 0;
    /* A read lock on one byte of it, as sqlite holds one on its -shm file (mapped too). */
    struct flock byte = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 128, .l_len = 1};
    if (fcntl(state, F_SETLK, &byte)) { perror("locking the state"); return 1; }
    uint64_t *words = malloc(WORDS * 8), seed = 0x9E3779B97F4A7C15ull, sum = 0;
    if (!words) { perror("malloc"); return 1; }
    for (size_t i = 0; i < WORDS; i++) sum += (words[i] = next(&seed));
    struct sigaction sa = {.sa_handler = on_usr1};
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t blocked;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGUSR2);
    sigprocmask(SIG_BLOCK, &blocked, NULL);
    char line[128];
    pthread_t thread;
    if (threads) {
        pthread_create(&thread, NULL, waiter, NULL);
        if (!pause_mode) pthread_create(&thread, NULL, spinner, NULL);
    }
    if (pause_mode) {
        write(fd, "ready\n", 6);
        fsync(fd);
        for (;;) pause();
    }
    double half = 0;
    uint64_t last_spins = 0;
    for (uint64_t n = 1;; n++) {
        uint64_t check = sum;
        if (n == 1 || n % every == 0) {
            check = 0;
            for (size_t i = 0; i < WORDS; i++) check += words[i];
        }
        half += 0.5;
        int ok = check == sum && half * 2 == (double)n && *last == n - 1 && *shared == n - 1;
        *last = *shared = n;
        ok = ok && read(pair[1], &in_flight, sizeof in_flight) == sizeof in_flight
             && in_flight == n - 1 && write(pair[0], &n, sizeof n) == sizeof n;
        ok = ok && read(fifo, &in_flight, sizeof in_flight) == sizeof in_flight
             && in_flight == n - 1 && write(fifo, &n, sizeof n) == sizeof n;
        off_t end = lseek(state, 0, SEEK_CUR);
        ok = ok && *posix_shm == n - 1 && end == 4096 + (off_t)(n * sizeof n)
             && pread(state, &in_flight, sizeof in_flight, end - sizeof n) == sizeof n
             && in_flight == n - 1 && write(state, &n, sizeof n) == sizeof n;
        *posix_shm = n;
        if (threads) {
            pthread_mutex_lock(&mutex);
            ok = ok && seen == n - 1 && (n == 1 || spins != last_spins) && !spin_bad;
            last_spins = spins;
            posted = n;
            pthread_cond_signal(&posted_changed);
            pthread_mutex_unlock(&mutex);
        }
        size_t at = next(&seed) % WORDS;
        uint64_t value = next(&seed);
        sum += value - words[at];
        words[at] = value;
        int len = snprintf(line, sizeof line, "%llu %s %.1f\n", (unsigned long long)n,
                           ok ? "ok" : "BAD", half);
        if (write(fd, line, len) != len || fsync(fd) != 0) return 1;
        struct timespec pause_for = {0, 100 * 1000 * 1000};
        nanosleep(&pause_for, NULL);
    }
}
