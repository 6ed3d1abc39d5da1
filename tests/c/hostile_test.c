/* The C ABI handed what a hostile or careless host does: re-entrant callbacks, calls during
 * thread exit and atexit, racing error reads, FIFOs, memory and thread limits, and many threads
 * doing random things at once. Every case must end in a status, never in a crash or an abort.
 *
 * Usage:
 *   hostile_test reentry DEMO_MODEL            callbacks, teardown, error messages, FIFO
 *   hostile_test limits DEMO_MODEL BIG_META    allocation failures under RLIMIT_AS
 *   hostile_test stress DEMO_MODEL SECONDS     8 threads of random calls, cancels and frees
 * Prints "N passed, M failed" (and, for stress, its figures). */
#include "phi4.h"
#include "check.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>


static const char *demo;

static phi4_model *load(const char *path) {
    phi4_model *m = NULL;
    phi4_status st = phi4_model_load(path, NULL, &m);
    CHECK(st == PHI4_OK, "load %s: %s", path, phi4_last_load_error());
    return m;
}

static phi4_generate_params greedy(uint32_t max_tokens) {
    phi4_generate_params g;
    phi4_generate_default_params(&g);
    g.temperature = 0;
    g.max_tokens = max_tokens;
    return g;
}

/* A "NAME: N kB" field of /proc/self/status (VmSize, VmRSS), or -1. */
static long status_kb(const char *name) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    size_t n = strlen(name);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, name, n) == 0 && line[n] == ':' && sscanf(line + n + 1, "%ld", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

/* ---- re-entrant callbacks ---- */

typedef struct {
    phi4_session *s;
    int pieces;
    int free_at;          /* free the session at this piece (0: never) */
    phi4_model *free_model; /* free this model at the first piece */
    phi4_status inner;    /* status of a call made from inside the callback */
    int inner_calls;
} reentry;

static bool reenter(void *user, const char *piece, size_t len) {
    (void)piece;
    (void)len;
    reentry *r = user;
    r->pieces++;
    if (r->pieces == 1) {
        phi4_message again[] = {{"user", "again"}};
        r->inner = phi4_session_chat(r->s, again, 1, NULL, NULL, NULL);
        phi4_result res;
        memset(&res, 0, sizeof res);
        res.struct_size = sizeof res;
        r->inner_calls += phi4_session_last_result(r->s, &res) == PHI4_OK;
        r->inner_calls += phi4_session_last_error(r->s) != NULL;
        r->inner_calls += phi4_session_reset(r->s) == PHI4_ERR_BUSY;
        if (r->free_model) {
            phi4_model_free(r->free_model);
            r->free_model = NULL;
        }
    }
    if (r->free_at && r->pieces == r->free_at) {
        phi4_session_free(r->s);
        return false;
    }
    return true;
}

static phi4_session *free_in_log_target;
static int log_frees;

static void log_and_free(void *user, phi4_log_level level, const char *msg) {
    (void)user;
    if (level == PHI4_LOG_WARN && strstr(msg, "dropped") && free_in_log_target) {
        phi4_session_free(free_in_log_target);
        free_in_log_target = NULL;
        log_frees++;
    }
}

static void test_reentrant_callbacks(void) {
    phi4_model *m = load(demo);
    phi4_message msgs[] = {{"user", "How do I open a file?"}};
    phi4_generate_params g = greedy(40);

    /* Calls on the same session from its callback: BUSY, except the thread-safe ones. */
    reentry r = {0};
    CHECK(phi4_session_new(m, NULL, &r.s) == PHI4_OK, "session");
    CHECK(phi4_session_chat(r.s, msgs, 1, &g, reenter, &r) == PHI4_OK, "chat");
    CHECK(r.inner == PHI4_ERR_BUSY && r.inner_calls == 3, "inside the callback: %d, %d", (int)r.inner, r.inner_calls);
    phi4_session_free(r.s);

    /* The session freed from its own streaming callback: freed when the call returns. */
    reentry f = {0};
    f.free_at = 3;
    CHECK(phi4_session_new(m, NULL, &f.s) == PHI4_OK, "session");
    CHECK(phi4_session_chat(f.s, msgs, 1, &g, reenter, &f) == PHI4_OK, "chat that frees its session");
    CHECK(f.pieces == 3, "stopped at the free: %d pieces", f.pieces);

    /* The model freed from a session's callback: the session keeps it alive. */
    phi4_model *m2 = load(demo);
    reentry mf = {0};
    CHECK(phi4_session_new(m2, NULL, &mf.s) == PHI4_OK, "session on m2");
    mf.free_model = m2;
    CHECK(phi4_session_chat(mf.s, msgs, 1, &g, reenter, &mf) == PHI4_OK, "chat after its model was freed");
    CHECK(phi4_session_chat(mf.s, msgs, 1, &g, NULL, NULL) == PHI4_OK, "and another");
    phi4_session_free(mf.s);

    /* The session freed from the model's log callback (a dropped-turns warning). */
    phi4_model_params mp;
    phi4_model_default_params(&mp);
    mp.log = log_and_free;
    phi4_model *m3 = NULL;
    CHECK(phi4_model_load(demo, &mp, &m3) == PHI4_OK, "load with log");
    phi4_session_params sp;
    phi4_session_default_params(&sp);
    sp.n_ctx = 64;
    sp.overflow = PHI4_OVERFLOW_DROP_OLDEST;
    phi4_session *s3 = NULL;
    CHECK(phi4_session_new(m3, &sp, &s3) == PHI4_OK, "small session");
    free_in_log_target = s3;
    phi4_message longer[] = {{"user", "Tell me everything about files, directories, paths and permissions in Python."},
                             {"assistant", "Files are opened with open(), directories are listed with os.listdir()."},
                             {"user", "And paths?"}};
    phi4_generate_params g8 = greedy(8);
    CHECK(phi4_session_chat(s3, longer, 3, &g8, NULL, NULL) == PHI4_OK, "chat that drops turns");
    CHECK(log_frees == 1, "the log callback freed the session (%d)", log_frees);
    phi4_model_free(m3);
    phi4_model_free(m);
}

/* ---- error messages that cannot tear ---- */

typedef struct {
    phi4_session *s;
    int id;
    volatile int *stop;
} racer;

static void *fail_calls(void *arg) {
    racer *r = arg;
    char role[32];
    snprintf(role, sizeof role, "wizard%d", r->id);
    phi4_message bad[] = {{role, "hi"}};
    while (!*r->stop) phi4_session_chat(r->s, bad, 1, NULL, NULL, NULL);
    return NULL;
}

static void test_error_messages_do_not_tear(void) {
    phi4_model *m = load(demo);
    phi4_session *s = NULL;
    phi4_session_new(m, NULL, &s);
    volatile int stop = 0;
    racer rs[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        rs[i] = (racer){s, i, &stop};
        pthread_create(&t[i], NULL, fail_calls, &rs[i]);
    }
    int reads = 0, torn = 0;
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        const char *e = phi4_session_last_error(s);
        char copy[1100];
        snprintf(copy, sizeof copy, "%s", e);
        int ok = copy[0] == 0;
        for (int i = 0; i < 4 && !ok; i++) {
            char want[96];
            snprintf(want, sizeof want, "role \"wizard%d\" is not system, user, assistant or tool", i);
            ok = strcmp(copy, want) == 0;
        }
        torn += !ok;
        if (!ok && torn == 1) fprintf(stderr, "torn: %s\n", copy);
        reads++;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000 < 500);
    stop = 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    CHECK(torn == 0 && reads > 100, "%d of %d reads were not a whole message", torn, reads);
    phi4_session_free(s);
    phi4_model_free(m);
}

/* A BUSY returned to an intruder does not replace the message of the call holding the session. */
typedef struct {
    phi4_session *s;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started, released;
} holder;

static bool hold(void *user, const char *piece, size_t len) {
    (void)piece;
    (void)len;
    holder *h = user;
    pthread_mutex_lock(&h->mu);
    h->started = 1;
    pthread_cond_broadcast(&h->cv);
    while (!h->released) pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
    return false;
}

static void *hold_session(void *arg) {
    holder *h = arg;
    phi4_message msgs[] = {{"user", "What is a list?"}};
    phi4_generate_params g = greedy(20);
    phi4_session_chat(h->s, msgs, 1, &g, hold, h);
    return NULL;
}

static void test_busy_keeps_the_owners_message(void) {
    phi4_model *m = load(demo);
    holder h = {NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    phi4_session_new(m, NULL, &h.s);
    phi4_message bad[] = {{"owner", "x"}};
    phi4_session_chat(h.s, bad, 1, NULL, NULL, NULL);
    pthread_t t;
    pthread_create(&t, NULL, hold_session, &h);
    pthread_mutex_lock(&h.mu);
    while (!h.started) pthread_cond_wait(&h.cv, &h.mu);
    pthread_mutex_unlock(&h.mu);
    uint32_t tok = 1;
    CHECK(phi4_session_generate(h.s, &tok, 1, NULL, NULL, NULL) == PHI4_ERR_BUSY, "busy");
    CHECK(strstr(phi4_session_last_error(h.s), "another call") != NULL, "the intruder sees its BUSY");
    char seen[256] = {0};
    /* another thread (here: the main one after a different session call) sees the owner's */
    phi4_session *other = NULL;
    phi4_session_new(m, NULL, &other);
    phi4_session_n_cached(h.s, NULL); /* BUSY again on this thread */
    pthread_mutex_lock(&h.mu);
    h.released = 1;
    pthread_cond_broadcast(&h.cv);
    pthread_mutex_unlock(&h.mu);
    pthread_join(t, NULL);
    size_t n = 0;
    CHECK(phi4_session_n_cached(h.s, &n) == PHI4_OK, "free again");
    snprintf(seen, sizeof seen, "%s", phi4_session_last_error(h.s));
    CHECK(strstr(seen, "owner") != NULL, "the owner's message stayed: %s", seen);
    phi4_session_free(other);
    phi4_session_free(h.s);
    phi4_model_free(m);
}

/* ---- paths that are not regular files ---- */

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "FAIL: a load blocked\n";
    if (write(2, msg, sizeof msg - 1)) {}
    _exit(3);
}

static void test_not_regular_files(void) {
    char fifo[64];
    snprintf(fifo, sizeof fifo, "/tmp/phi4-fifo-%d", (int)getpid());
    unlink(fifo);
    CHECK(mkfifo(fifo, 0600) == 0, "mkfifo: %s", strerror(errno));
    signal(SIGALRM, on_alarm);
    alarm(20);
    phi4_model *m = NULL;
    CHECK(phi4_model_load(fifo, NULL, &m) == PHI4_ERR_IO && m == NULL, "a FIFO is refused");
    CHECK(strstr(phi4_last_load_error(), "not a regular file") != NULL, "%s", phi4_last_load_error());
    CHECK(phi4_model_load("/tmp", NULL, &m) == PHI4_ERR_IO, "a directory is refused");
    CHECK(phi4_model_load("/dev/zero", NULL, &m) == PHI4_ERR_IO, "a device is refused");
    alarm(0);
    unlink(fifo);
}

/* ---- calls while a thread exits, and from atexit ---- */

static phi4_model *teardown_model;
static int teardown_ok;
static pthread_key_t key;

/* Load errors, a session and a short chat: what a host might do in cleanup code. */
static int cleanup_work(void) {
    int ok = 1;
    phi4_model *bad = NULL;
    ok &= phi4_model_load("/nonexistent/m.gguf", NULL, &bad) == PHI4_ERR_IO;
    ok &= strstr(phi4_last_load_error(), "nonexistent") != NULL;
    ok &= strlen(phi4_version()) > 0 && strlen(phi4_cpu_features()) > 0;
    phi4_session *s = NULL;
    ok &= phi4_session_new(teardown_model, NULL, &s) == PHI4_OK;
    phi4_message msgs[] = {{"user", "Bye?"}};
    phi4_generate_params g = greedy(4);
    ok &= phi4_session_chat(s, msgs, 1, &g, NULL, NULL) == PHI4_OK;
    ok &= phi4_session_chat(s, NULL, 1, &g, NULL, NULL) == PHI4_ERR_NULL;
    ok &= strstr(phi4_session_last_error(s), "NULL") != NULL;
    phi4_session_free(s);
    return ok;
}

static void key_destructor(void *value) {
    (void)value;
    teardown_ok = cleanup_work();
}

static void *exiting_thread(void *arg) {
    (void)arg;
    pthread_setspecific(key, (void *)1);
    return NULL;
}

static void at_exit(void) {
    int ok = cleanup_work();
    phi4_model_free(teardown_model);
    printf("atexit: %s\n", ok ? "ok" : "FAILED");
    fflush(stdout);
}

static void test_teardown(void) {
    teardown_model = load(demo);
    pthread_key_create(&key, key_destructor);
    pthread_t t;
    pthread_create(&t, NULL, exiting_thread, NULL);
    pthread_join(t, NULL);
    CHECK(teardown_ok, "calls from a thread-exit destructor");
    atexit(at_exit);
}

/* ---- memory, address space and threads running out ---- */

static void set_as_limit(rlim_t bytes) {
    struct rlimit r;
    getrlimit(RLIMIT_AS, &r);
    r.rlim_cur = bytes;
    CHECK(setrlimit(RLIMIT_AS, &r) == 0, "setrlimit: %s", strerror(errno));
}

static void test_limits(const char *big_meta) {
    struct rlimit orig;
    getrlimit(RLIMIT_AS, &orig);

    /* A file with a 50 MB metadata array under a 1 GiB address space: a clean bad-model error. */
    set_as_limit((rlim_t)1 << 30);
    phi4_model *bm = NULL;
    phi4_status st = phi4_model_load(big_meta, NULL, &bm);
    CHECK(st == PHI4_ERR_BAD_MODEL && bm == NULL, "50 MB metadata array: %d %s", (int)st, phi4_last_load_error());
    set_as_limit(orig.rlim_cur);

    phi4_model *m = load(demo);
    phi4_session_params sp;
    phi4_session_default_params(&sp);
    sp.n_threads = 2;
    sp.n_ctx = 2048; /* the demo model's: a 4 MB KV cache */
    /* Headroom above what is mapped now: from none (everything fails) to plenty (all works).
     * Each step must end in PHI4_OK or PHI4_ERR_OUT_OF_MEMORY, and the process goes on. */
    static const long headroom_mb[] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 64, 128, 512};
    int oom = 0, ok = 0;
    for (size_t i = 0; i < sizeof headroom_mb / sizeof headroom_mb[0]; i++) {
        long base = status_kb("VmSize");
        set_as_limit((rlim_t)(base + headroom_mb[i] * 1024) * 1024);
        phi4_session *s = NULL;
        st = phi4_session_new(m, &sp, &s);
        const char *stage = "session";
        if (st == PHI4_OK) {
            phi4_message msgs[] = {{"user", "What is a dict?"}};
            phi4_generate_params g = greedy(8);
            st = phi4_session_chat(s, msgs, 1, &g, NULL, NULL);
            stage = "chat";
        }
        if (st == PHI4_OK) {
            phi4_model *again = NULL;
            st = phi4_model_load(demo, NULL, &again);
            stage = "load";
            phi4_model_free(again);
        }
        set_as_limit(orig.rlim_cur);
        printf("headroom %ld MB: %s %s\n", headroom_mb[i], stage, st == PHI4_OK ? "ok" : phi4_last_load_error());
        CHECK(st == PHI4_OK || st == PHI4_ERR_OUT_OF_MEMORY, "headroom %ld MB: %s status %d", headroom_mb[i], stage, (int)st);
        oom += st == PHI4_ERR_OUT_OF_MEMORY;
        ok += st == PHI4_OK;
        phi4_session_free(s);
    }
    CHECK(oom > 0 && ok > 0, "some limits ran out (%d), some did not (%d)", oom, ok);
    /* The process is usable: a session with no limit works. */
    phi4_session *s = NULL;
    CHECK(phi4_session_new(m, &sp, &s) == PHI4_OK, "after the limits");
    phi4_message msgs[] = {{"user", "What is a set?"}};
    phi4_generate_params g = greedy(8);
    CHECK(phi4_session_chat(s, msgs, 1, &g, NULL, NULL) == PHI4_OK, "chat after the limits");
    phi4_session_free(s);
    phi4_model_free(m);
}

/* ---- stress: 8 threads, random calls, cancels and frees ---- */

enum { STRESS_THREADS = 8, SHARED = 3 };
static phi4_model *stress_model;
static phi4_session *shared[SHARED];
static volatile int stress_stop;
static long calls[STRESS_THREADS], cancels[STRESS_THREADS], busy[STRESS_THREADS], bad[STRESS_THREADS];

static unsigned next_rand(unsigned *state) {
    *state = *state * 1103515245u + 12345u;
    return *state >> 8;
}

static bool maybe_cancel(void *user, const char *piece, size_t len) {
    (void)piece;
    (void)len;
    unsigned *state = user;
    return next_rand(state) % 16 != 0;
}

static void *stress_thread(void *arg) {
    int id = (int)(long)arg;
    unsigned state = 0x9E3779B9u * (unsigned)(id + 1);
    phi4_session *own = NULL;
    while (!stress_stop) {
        unsigned op = next_rand(&state) % 10;
        phi4_session *s = (op < 5) ? shared[next_rand(&state) % SHARED] : own;
        phi4_status st = PHI4_OK;
        phi4_generate_params g;
        phi4_generate_default_params(&g);
        g.temperature = (float)(next_rand(&state) % 300) / 100.0f;
        g.top_k = next_rand(&state) % 50;
        g.top_p = (float)(next_rand(&state) % 100 + 1) / 100.0f;
        g.max_tokens = next_rand(&state) % 24;
        if (next_rand(&state) % 8 == 0) g.top_p = -1.0f; /* out of range */
        phi4_message msgs[] = {{"system", "Short answers."}, {next_rand(&state) % 12 ? "user" : "robot", "Name a builtin."}};
        switch (op) {
        case 0: case 1: case 2: case 5: case 6:
            st = phi4_session_chat(s, msgs, 2, &g, maybe_cancel, &state);
            break;
        case 3:
            st = phi4_session_cancel(s);
            cancels[id]++;
            break;
        case 4: {
            size_t n;
            st = phi4_session_n_cached(s, &n);
            break;
        }
        case 7:
            st = phi4_session_reset(s);
            break;
        case 8: {
            phi4_session_free(own);
            own = NULL;
            phi4_session_params sp;
            phi4_session_default_params(&sp);
            sp.n_ctx = 128 + next_rand(&state) % 512;
            sp.n_threads = 1 + next_rand(&state) % 3;
            sp.n_batch = 1 + next_rand(&state) % 64;
            sp.overflow = next_rand(&state) % 3; /* 2 is invalid */
            st = phi4_session_new(stress_model, &sp, &own);
            break;
        }
        default: {
            uint32_t toks[8];
            size_t n = 0;
            st = phi4_tokenize(stress_model, "hello world", 11, false, toks, 8, &n);
            break;
        }
        }
        calls[id]++;
        busy[id] += st == PHI4_ERR_BUSY;
        bad[id] += st == PHI4_ERR_INVALID_ARGUMENT || st == PHI4_ERR_NULL;
        if (st == PHI4_ERR_INTERNAL) {
            fprintf(stderr, "FAIL: internal error in stress: op %u\n", op);
            failed++;
        }
    }
    phi4_session_free(own);
    return NULL;
}

static void test_stress(int seconds) {
    stress_model = load(demo);
    for (int i = 0; i < SHARED; i++) phi4_session_new(stress_model, NULL, &shared[i]);
    long rss0 = status_kb("VmRSS");
    pthread_t t[STRESS_THREADS];
    for (long i = 0; i < STRESS_THREADS; i++) pthread_create(&t[i], NULL, stress_thread, (void *)i);
    sleep((unsigned)seconds);
    stress_stop = 1;
    for (int i = 0; i < STRESS_THREADS; i++) pthread_join(t[i], NULL);
    long total = 0, total_cancels = 0, total_busy = 0, total_bad = 0;
    for (int i = 0; i < STRESS_THREADS; i++) {
        total += calls[i];
        total_cancels += cancels[i];
        total_busy += busy[i];
        total_bad += bad[i];
    }
    for (int i = 0; i < SHARED; i++) phi4_session_free(shared[i]);
    phi4_model_free(stress_model);
    long rss1 = status_kb("VmRSS");
    printf("stress: %d threads, %d s: %ld calls, %ld cancels, %ld busy, %ld rejected; RSS %ld kB before, %ld kB after\n",
           STRESS_THREADS, seconds, total, total_cancels, total_busy, total_bad, rss0, rss1);
    CHECK(total > 20, "calls were made: %ld", total);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: hostile_test reentry|limits|stress DEMO_MODEL [BIG_META|SECONDS]\n");
        return 2;
    }
    demo = argv[2];
    if (strcmp(argv[1], "reentry") == 0) {
        test_reentrant_callbacks();
        test_error_messages_do_not_tear();
        test_busy_keeps_the_owners_message();
        test_not_regular_files();
        test_teardown();
    } else if (strcmp(argv[1], "limits") == 0 && argc > 3) {
        test_limits(argv[3]);
    } else if (strcmp(argv[1], "stress") == 0 && argc > 3) {
        test_stress(atoi(argv[3]));
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed != 0;
}
