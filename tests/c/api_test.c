/* C tests of the phi4 ABI: load errors, streaming, structured output, saved state, cancellation, busy sessions, many sessions
 * on many threads, what the library reports about the kernels it uses.
 * Usage: api_test DEMO_MODEL MALFORMED_FILE QUANTIZED_MODEL [--short [--part K/N]]: `--short` makes
 * shorter replies (for valgrind), `--part K/N` runs the Kth of N parts of the tests (the first part
 * has the tests that load models of their own). Prints "cpu features: ...", "repacked: ..." and
 * finally "N passed, M failed". */
#include "phi4.h"
#include "check.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


typedef struct {
    char text[8192];
    size_t len;
    int pieces;
    int stop_after; /* cancel after this many pieces (0: never) */
} collector;

static bool collect(void *user, const char *piece, size_t len) {
    collector *c = user;
    CHECK(strlen(piece) == len, "piece is NUL-terminated at len");
    if (c->len + len < sizeof c->text) {
        memcpy(c->text + c->len, piece, len);
        c->len += len;
        c->text[c->len] = 0;
    }
    c->pieces++;
    return c->stop_after == 0 || c->pieces < c->stop_after;
}

static const char *demo;

static void test_load_errors(const char *malformed) {
    phi4_model *m = (phi4_model *)0x1;
    CHECK(phi4_model_load("/nonexistent/model.gguf", NULL, &m) == PHI4_ERR_IO, "missing file");
    CHECK(m == (phi4_model *)0x1, "output untouched on failure");
    CHECK(strstr(phi4_last_load_error(), "No such file") != NULL, "message: %s", phi4_last_load_error());
    CHECK(phi4_model_load(malformed, NULL, &m) == PHI4_ERR_BAD_MODEL, "malformed file");
    CHECK(strlen(phi4_last_load_error()) > 0, "a message for the malformed file");
    CHECK(phi4_model_load(NULL, NULL, &m) == PHI4_ERR_NULL, "NULL path");
    CHECK(phi4_model_load(demo, NULL, NULL) == PHI4_ERR_NULL, "NULL out");
    phi4_model_params p;
    phi4_model_default_params(&p);
    p.struct_size = 3;
    CHECK(phi4_model_load(demo, &p, &m) == PHI4_ERR_INVALID_ARGUMENT, "bad struct_size");
    CHECK(phi4_session_new(NULL, NULL, NULL) == PHI4_ERR_NULL, "NULL model");
    CHECK(phi4_session_chat(NULL, NULL, 0, NULL, NULL, NULL) == PHI4_ERR_NULL, "NULL session");
    CHECK(phi4_session_cancel(NULL) == PHI4_ERR_NULL, "NULL session cancel");
    phi4_model_free(NULL);
    phi4_session_free(NULL);
}

static bool cancel_load(void *user, float progress) {
    (void)user;
    return progress < 0.5f;
}

typedef struct {
    int info, warn;
    char last[512];
} log_sink;

static void on_log(void *user, phi4_log_level level, const char *msg) {
    log_sink *l = user;
    if (level == PHI4_LOG_INFO) l->info++;
    if (level == PHI4_LOG_WARN) l->warn++;
    snprintf(l->last, sizeof l->last, "%s", msg);
}

/* The log callback belongs to one model: the load summary, then its sessions' warnings. */
static void test_log_per_model(void) {
    log_sink sink = {0, 0, ""};
    phi4_model_params p;
    phi4_model_default_params(&p);
    p.log = on_log;
    p.log_user_data = &sink;
    phi4_model *m = NULL;
    CHECK(phi4_model_load(demo, &p, &m) == PHI4_OK, "load with a log");
    CHECK(sink.info == 1 && strstr(sink.last, "loaded") != NULL, "load summary: %s", sink.last);
    phi4_session_params sp;
    phi4_session_default_params(&sp);
    sp.n_ctx = 40;
    sp.overflow = PHI4_OVERFLOW_DROP_OLDEST;
    phi4_session *s = NULL;
    CHECK(phi4_session_new(m, &sp, &s) == PHI4_OK, "small session");
    phi4_message msgs[] = {{"user", "Tell me about lists, tuples, dictionaries, sets, strings, bytes, integers and floats in great detail, please."},
                           {"assistant", "Lists are mutable sequences; tuples are immutable sequences."},
                           {"user", "And sets?"}};
    phi4_generate_params g;
    phi4_generate_default_params(&g);
    g.max_tokens = 4;
    CHECK(phi4_session_chat(s, msgs, 3, &g, NULL, NULL) == PHI4_OK, "chat: %s", phi4_session_last_error(s));
    CHECK(sink.warn >= 1 && strstr(sink.last, "dropped") != NULL, "warned: %d %s", sink.warn, sink.last);
    phi4_session_free(s);
    phi4_model_free(m);
}

static void test_load_cancel(void) {
    phi4_model_params p;
    phi4_model_default_params(&p);
    p.progress = cancel_load;
    phi4_model *m = NULL;
    CHECK(phi4_model_load(demo, &p, &m) == PHI4_ERR_CANCELLED, "progress callback cancels");
    CHECK(m == NULL, "no model");
}

/* The length of the replies the multi-threaded tests compare (shorter under valgrind, which runs
 * threads one at a time: `--short`). */
static unsigned chat_tokens = 40;

static phi4_generate_params greedy(unsigned max_tokens) {
    phi4_generate_params g;
    phi4_generate_default_params(&g);
    g.temperature = 0;
    g.repeat_penalty = 1;
    g.max_tokens = max_tokens;
    return g;
}

static void test_streaming(phi4_model *m) {
    phi4_session *s = NULL;
    CHECK(phi4_session_new(m, NULL, &s) == PHI4_OK, "session");
    phi4_message msgs[] = {{"system", "You answer questions about Python."}, {"user", "How do I open a file?"}};
    phi4_generate_params g = greedy(300);
    collector c = {0};
    CHECK(phi4_session_chat(s, msgs, 2, &g, collect, &c) == PHI4_OK, "chat: %s", phi4_session_last_error(s));
    phi4_result r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    CHECK(phi4_session_last_result(s, &r) == PHI4_OK, "result");
    CHECK(r.done_reason == PHI4_DONE_STOP, "ends at <|im_end|>: %d", (int)r.done_reason);
    CHECK(c.pieces > 3 && c.len > 10, "streamed %d pieces: %s", c.pieces, c.text);
    CHECK(r.eval_count >= (uint64_t)c.pieces && r.prompt_eval_count > 10, "counts %llu %llu", (unsigned long long)r.eval_count, (unsigned long long)r.prompt_eval_count);
    CHECK(strstr(c.text, "<|") == NULL, "no control tokens printed");

    /* Second turn: only the new tokens are evaluated. */
    phi4_message more[] = {msgs[0], msgs[1], {"assistant", c.text}, {"user", "And close it?"}};
    collector c2 = {0};
    size_t cached = 0;
    phi4_session_n_cached(s, &cached);
    CHECK(phi4_session_chat(s, more, 4, &g, collect, &c2) == PHI4_OK, "second turn");
    phi4_session_last_result(s, &r);
    CHECK(r.prompt_eval_count < 20, "second turn evaluated %llu tokens after %zu cached", (unsigned long long)r.prompt_eval_count, cached);

    /* Errors leave the session usable. */
    phi4_message bad[] = {{"wizard", "hi"}};
    CHECK(phi4_session_chat(s, bad, 1, &g, collect, &c2) == PHI4_ERR_INVALID_ARGUMENT, "bad role");
    CHECK(strstr(phi4_session_last_error(s), "wizard") != NULL, "message names the role");
    phi4_message invalid[] = {{"user", "\xff\xfe"}};
    CHECK(phi4_session_chat(s, invalid, 1, &g, collect, &c2) == PHI4_ERR_INVALID_ARGUMENT, "invalid UTF-8");
    g.top_p = 2;
    CHECK(phi4_session_chat(s, msgs, 2, &g, collect, &c2) == PHI4_ERR_INVALID_ARGUMENT, "top_p out of range");
    phi4_session_free(s);
}

/* A caller built against an older header passes a shorter struct: the fields it does not know
 * keep their defaults, whatever bytes follow its struct in memory. */
static void test_older_struct_sizes(phi4_model *m) {
    phi4_session *s = NULL;
    phi4_session_new(m, NULL, &s);
    phi4_message msgs[] = {{"user", "What is a tuple?"}};
    phi4_generate_params g;
    phi4_generate_default_params(&g);
    g.temperature = 0;
    g.max_tokens = 5;
    g.top_p = 7.0f; /* out of range: rejected when the library reads it */
    CHECK(phi4_session_chat(s, msgs, 1, &g, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "top_p 7 is read and rejected");
    g.struct_size = offsetof(phi4_generate_params, top_p); /* knows temperature and top_k only */
    CHECK(phi4_session_chat(s, msgs, 1, &g, NULL, NULL) == PHI4_OK, "older struct: %s", phi4_session_last_error(s));
    phi4_result r;
    memset(&r, 0, sizeof r);
    r.struct_size = offsetof(phi4_result, prompt_eval_count); /* an older, shorter result */
    r.eval_count = 12345;
    CHECK(phi4_session_last_result(s, &r) == PHI4_OK && r.eval_count == 12345, "only struct_size bytes are written");
    CHECK(r.done_reason != PHI4_DONE_NONE, "but those are");
    phi4_session_free(s);
}

/* Enum-valued fields travel as uint32_t and are checked; seeds: PHI4_SEED_RANDOM (the default)
 * draws a fresh seed per generation, a given seed reproduces. */
static void test_enums_and_seeds(phi4_model *m) {
    phi4_session_params sp;
    phi4_session_default_params(&sp);
    phi4_session *s = NULL;
    uint32_t bad[] = {2, 7, 0x80000000u, 0xFFFFFFFFu};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        sp.overflow = bad[i];
        CHECK(phi4_session_new(m, &sp, &s) == PHI4_ERR_INVALID_ARGUMENT && s == NULL, "overflow %u", bad[i]);
        CHECK(strstr(phi4_last_load_error(), "overflow") != NULL, "message names the field: %s", phi4_last_load_error());
    }
    sp.overflow = PHI4_OVERFLOW_DROP_OLDEST;
    CHECK(phi4_session_new(m, &sp, &s) == PHI4_OK, "valid overflow");

    phi4_generate_params g;
    phi4_generate_default_params(&g);
    CHECK(g.seed == PHI4_SEED_RANDOM, "the default seed is random");
    CHECK(PHI4_VERSION_MAJOR == 0 && strncmp(phi4_version(), "0.", 2) == 0, "version macros match the library");
    g.temperature = 1.5f;
    g.max_tokens = 24;
    phi4_message msgs[] = {{"user", "Tell me about lists."}};
    collector a = {0}, b = {0}, c = {0}, d = {0};
    phi4_session_chat(s, msgs, 1, &g, collect, &a);
    phi4_session_chat(s, msgs, 1, &g, collect, &b);
    phi4_session_chat(s, msgs, 1, &g, collect, &c);
    CHECK(strcmp(a.text, b.text) != 0 || strcmp(b.text, c.text) != 0, "three unseeded replies differ: %s", a.text);
    g.seed = 12345;
    memset(&a, 0, sizeof a);
    phi4_session_chat(s, msgs, 1, &g, collect, &a);
    phi4_session_chat(s, msgs, 1, &g, collect, &d);
    CHECK(strcmp(a.text, d.text) == 0 && a.len > 0, "a given seed reproduces: %s | %s", a.text, d.text);
    phi4_session_free(s);
}

/* Structured output: the reply is what the format says; a format that does not compile is an
 * error naming it, the session goes on; a caller that predates the format fields gets text. */
static void test_structured_output(phi4_model *m) {
    phi4_session *s = NULL;
    phi4_session_new(m, NULL, &s);
    phi4_message msgs[] = {{"user", "Is the sensor ok? Answer in JSON."}};
    phi4_generate_params g = greedy(100);
    g.format = PHI4_FORMAT_JSON_SCHEMA;
    g.format_text = "{\"type\": \"object\", \"properties\": {\"ok\": {\"type\": \"boolean\"}},"
                    " \"required\": [\"ok\"], \"additionalProperties\": false}";
    for (int i = 0; i < 3; i++) {
        collector c = {0};
        g.temperature = (float)i * 0.7f;
        g.seed = (uint64_t)i;
        CHECK(phi4_session_chat(s, msgs, 1, &g, collect, &c) == PHI4_OK, "schema chat: %s", phi4_session_last_error(s));
        CHECK(strcmp(c.text, "{\"ok\": true}") == 0 || strcmp(c.text, "{\"ok\": false}") == 0, "the schema's only shapes: %s", c.text);
        phi4_result r;
        memset(&r, 0, sizeof r);
        r.struct_size = sizeof r;
        phi4_session_last_result(s, &r);
        CHECK(r.done_reason == PHI4_DONE_STOP, "complete reply ends the generation: %d", (int)r.done_reason);
    }
    g = greedy(100);
    g.format = PHI4_FORMAT_REGEX;
    g.format_text = "[0-9]{3}-(yes|no)";
    collector c = {0};
    CHECK(phi4_session_chat(s, msgs, 1, &g, collect, &c) == PHI4_OK, "regex chat: %s", phi4_session_last_error(s));
    CHECK(strlen(c.text) >= 6 && c.text[3] == '-' && (strcmp(c.text + 4, "yes") == 0 || strcmp(c.text + 4, "no") == 0), "regex reply: %s", c.text);

    g.format_text = "([0-9]";
    CHECK(phi4_session_chat(s, msgs, 1, &g, collect, &c) == PHI4_ERR_INVALID_ARGUMENT, "bad regex");
    CHECK(strstr(phi4_session_last_error(s), "regex") != NULL, "message names it: %s", phi4_session_last_error(s));
    g.format_text = NULL;
    CHECK(phi4_session_chat(s, msgs, 1, &g, collect, &c) != PHI4_OK, "regex without text");
    g.format = 99;
    CHECK(phi4_session_chat(s, msgs, 1, &g, collect, &c) == PHI4_ERR_INVALID_ARGUMENT, "format 99");
    CHECK(strstr(phi4_session_last_error(s), "format") != NULL, "message names the field: %s", phi4_session_last_error(s));

    /* A program built against phi4 0.1's header calls the phi4_generate_default_params symbol
     * (here: the function, not the header's macro) with that header's smaller struct: the
     * library writes only those bytes. */
    unsigned char old_struct[offsetof(phi4_generate_params, format) + 16];
    memset(old_struct, 0xAB, sizeof old_struct);
    CHECK((phi4_generate_default_params)((phi4_generate_params *)old_struct) == PHI4_OK, "0.1 defaults");
    size_t old_size;
    memcpy(&old_size, old_struct, sizeof old_size);
    CHECK(old_size == offsetof(phi4_generate_params, format), "struct_size %zu", old_size);
    for (size_t i = offsetof(phi4_generate_params, format); i < sizeof old_struct; i++)
        CHECK(old_struct[i] == 0xAB, "byte %zu past the 0.1 struct was written", i);
    CHECK(phi4_generate_params_init(&g, 3) == PHI4_ERR_INVALID_ARGUMENT, "a size below struct_size");

    /* An older caller's struct ends before `format`: whatever follows it is not read. */
    g = greedy(8);
    g.format = PHI4_FORMAT_GRAMMAR;
    g.format_text = (const char *)1;
    g.struct_size = offsetof(phi4_generate_params, format);
    collector old = {0};
    CHECK(phi4_session_chat(s, msgs, 1, &g, collect, &old) == PHI4_OK, "older struct: %s", phi4_session_last_error(s));
    CHECK(old.len > 0, "free text");
    phi4_session_free(s);
}

/* Saved state: the buffer's size negotiated, restored into another session (from a buffer, a
 * file, a copy) that then replies exactly as the first; every damaged byte of the header and a
 * sample of the rows is PHI4_ERR_BAD_STATE with the session untouched. */
static void test_state(phi4_model *m) {
    phi4_session *a = NULL, *b = NULL, *c = NULL, *d = NULL;
    phi4_session_new(m, NULL, &a);
    phi4_session_new(m, NULL, &b);
    phi4_session_new(m, NULL, &c);
    phi4_session_new(m, NULL, &d);
    phi4_message msgs[] = {{"system", "You answer questions about Python."}, {"user", "What is a dict?"}};
    phi4_generate_params g = greedy(8);
    collector first = {0};
    CHECK(phi4_session_chat(a, msgs, 2, &g, collect, &first) == PHI4_OK, "chat");
    size_t len = 0, n_a = 0, n = 0;
    CHECK(phi4_session_save_buffer(a, NULL, 0, &len) == PHI4_ERR_BUFFER_TOO_SMALL && len > 48, "size asked: %zu", len);
    unsigned char *buf = malloc(len);
    size_t len2 = 0;
    CHECK(phi4_session_save_buffer(a, buf, len, &len2) == PHI4_OK && len2 == len, "saved %zu bytes", len2);
    phi4_session_n_cached(a, &n_a);

    CHECK(phi4_session_load_buffer(b, buf, len) == PHI4_OK, "load: %s", phi4_session_last_error(b));
    phi4_session_n_cached(b, &n);
    CHECK(n == n_a && n > 10, "restored %zu of %zu tokens", n, n_a);
    char path[256];
    snprintf(path, sizeof path, "%s/phi4-api-test-%d.kv", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
    CHECK(phi4_session_save_file(a, path) == PHI4_OK, "save file: %s", phi4_session_last_error(a));
    CHECK(phi4_session_load_file(c, path) == PHI4_OK, "load file: %s", phi4_session_last_error(c));
    unlink(path);
    CHECK(phi4_session_load_file(c, path) == PHI4_ERR_IO, "a missing file");
    CHECK(phi4_session_copy(d, a) == PHI4_OK && phi4_session_copy(a, a) == PHI4_OK, "copy");
    CHECK(phi4_session_copy(NULL, a) == PHI4_ERR_NULL && phi4_session_copy(d, NULL) == PHI4_ERR_NULL, "NULL sessions");

    /* Each restored session continues as the one that never stopped. */
    phi4_message more[] = {msgs[0], msgs[1], {"assistant", first.text}, {"user", "And a set?"}};
    collector ra = {0}, rb = {0}, rc = {0}, rd = {0};
    phi4_session_chat(a, more, 4, &g, collect, &ra);
    phi4_session_chat(b, more, 4, &g, collect, &rb);
    phi4_session_chat(c, more, 4, &g, collect, &rc);
    phi4_session_chat(d, more, 4, &g, collect, &rd);
    CHECK(ra.len > 0 && strcmp(ra.text, rb.text) == 0 && strcmp(ra.text, rc.text) == 0 && strcmp(ra.text, rd.text) == 0,
          "same replies: %s | %s | %s | %s", ra.text, rb.text, rc.text, rd.text);

    size_t n_b = 0, after = 0;
    phi4_session_n_cached(b, &n_b);
    for (size_t i = 0; i < len; i += i < 48 + 4 * n_a ? 1 : 4099) {
        buf[i] ^= 0x20;
        CHECK(phi4_session_load_buffer(b, buf, len) == PHI4_ERR_BAD_STATE, "byte %zu flipped", i);
        buf[i] ^= 0x20;
    }
    CHECK(strstr(phi4_session_last_error(b), "damaged") != NULL, "says why: %s", phi4_session_last_error(b));
    CHECK(phi4_session_load_buffer(b, buf, len - 1) == PHI4_ERR_BAD_STATE, "truncated");
    CHECK(phi4_session_load_buffer(b, buf, 7) == PHI4_ERR_BAD_STATE, "a few bytes");
    CHECK(phi4_session_load_buffer(b, NULL, 0) == PHI4_ERR_BAD_STATE, "no bytes");
    phi4_session_n_cached(b, &after);
    CHECK(after == n_b, "the session is untouched: %zu, was %zu", after, n_b);
    CHECK(phi4_session_load_buffer(b, buf, len) == PHI4_OK, "the good state still loads");
    free(buf);
    phi4_session_free(a);
    phi4_session_free(b);
    phi4_session_free(c);
    phi4_session_free(d);
}

static void test_cancel_by_callback(phi4_model *m) {
    phi4_session *s = NULL;
    phi4_session_new(m, NULL, &s);
    phi4_message msgs[] = {{"user", "Describe the standard library."}};
    phi4_generate_params g = greedy(200);
    collector c = {0};
    c.stop_after = 3;
    CHECK(phi4_session_chat(s, msgs, 1, &g, collect, &c) == PHI4_OK, "chat");
    phi4_result r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    phi4_session_last_result(s, &r);
    CHECK(r.done_reason == PHI4_DONE_CANCELLED && c.pieces == 3, "cancelled after 3 pieces: %d, %d", (int)r.done_reason, c.pieces);
    phi4_session_free(s);
}

typedef struct {
    phi4_session *s;
    phi4_status status;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started, released, finished;
} gen_job;

/* Blocks in the first piece until the main thread has made its checks. */
static bool hold_first_piece(void *user, const char *piece, size_t len) {
    gen_job *j = user;
    (void)piece;
    (void)len;
    pthread_mutex_lock(&j->mu);
    j->started = 1;
    pthread_cond_broadcast(&j->cv);
    while (!j->released) pthread_cond_wait(&j->cv, &j->mu);
    pthread_mutex_unlock(&j->mu);
    return true;
}

static void *long_generation(void *arg) {
    gen_job *j = arg;
    phi4_message msgs[] = {{"user", "How do I open a file?"}};
    phi4_generate_params g = greedy(0);
    j->status = phi4_session_chat(j->s, msgs, 1, &g, hold_first_piece, j);
    pthread_mutex_lock(&j->mu);
    j->finished = 1;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

static void test_cancel_from_another_thread_and_busy(phi4_model *m) {
    phi4_session *s = NULL;
    CHECK(phi4_session_new(m, NULL, &s) == PHI4_OK, "session");
    gen_job j = {s, PHI4_ERR_INTERNAL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0};
    pthread_t t;
    pthread_create(&t, NULL, long_generation, &j);
    pthread_mutex_lock(&j.mu);
    while (!j.started && !j.finished) pthread_cond_wait(&j.cv, &j.mu);
    pthread_mutex_unlock(&j.mu);
    CHECK(j.started, "the generation streamed a piece (status %d)", (int)j.status);
    uint32_t tok = 1;
    CHECK(phi4_session_generate(s, &tok, 1, NULL, NULL, NULL) == PHI4_ERR_BUSY, "second call is busy");
    CHECK(strstr(phi4_session_last_error(s), "another call") != NULL, "busy message");
    CHECK(phi4_session_cancel(s) == PHI4_OK, "cancel from another thread");
    pthread_mutex_lock(&j.mu);
    j.released = 1;
    pthread_cond_broadcast(&j.cv);
    pthread_mutex_unlock(&j.mu);
    pthread_join(t, NULL);
    phi4_result r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    phi4_session_last_result(s, &r);
    CHECK(j.status == PHI4_OK && r.done_reason == PHI4_DONE_CANCELLED, "cancelled: %d %d", (int)j.status, (int)r.done_reason);
    CHECK(r.eval_count <= 2, "stopped right after the held piece: %llu tokens", (unsigned long long)r.eval_count);
    phi4_session_free(s);
}

typedef struct {
    phi4_model *m;
    const phi4_scheduler *sched; /* open the session on it when not NULL */
    const char *question;        /* "What is a module?" when NULL */
    char text[4096];
    phi4_status status;
} chat_job;

static bool append(void *user, const char *piece, size_t len) {
    chat_job *j = user;
    size_t n = strlen(j->text);
    if (n + len < sizeof j->text) memcpy(j->text + n, piece, len + 1);
    return true;
}

static void *chat_thread(void *arg) {
    chat_job *j = arg;
    phi4_session_params sp;
    phi4_session_default_params(&sp);
    sp.n_ctx = 512;
    sp.n_threads = 1;
    phi4_session *s = NULL;
    j->status = j->sched ? phi4_session_new_on(j->sched, &sp, &s) : phi4_session_new(j->m, &sp, &s);
    if (j->status != PHI4_OK) return NULL;
    phi4_message msgs[] = {{"user", j->question ? j->question : "What is a module?"}};
    phi4_generate_params g = greedy(chat_tokens);
    j->status = phi4_session_chat(s, msgs, 1, &g, append, j);
    phi4_session_free(s);
    return NULL;
}

static void test_many_sessions_many_threads(phi4_model *m) {
    enum { N = 4 };
    chat_job jobs[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
        memset(&jobs[i], 0, sizeof jobs[i]);
        jobs[i].m = m;
        pthread_create(&t[i], NULL, chat_thread, &jobs[i]);
    }
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < N; i++) {
        CHECK(jobs[i].status == PHI4_OK, "thread %d: %d", i, (int)jobs[i].status);
        CHECK(strlen(jobs[i].text) > 0 && strcmp(jobs[i].text, jobs[0].text) == 0, "thread %d: same greedy reply", i);
    }
}

/* Sessions on a scheduler, decoding at once from four threads, reply as they do alone. */
static void test_scheduler(phi4_model *m) {
    enum { N = 4 };
    const char *questions[N] = {"What is a module?", "How do I read a file?", "What is a tuple?", "How do I sort a list?"};
    phi4_scheduler *sched = NULL;
    CHECK(phi4_scheduler_new(m, 2, 0, &sched) == PHI4_ERR_INVALID_ARGUMENT && sched == NULL, "max_batch 0");
    CHECK(phi4_scheduler_new(m, 2, 65, &sched) == PHI4_ERR_INVALID_ARGUMENT, "max_batch 65: %s", phi4_last_load_error());
    CHECK(phi4_scheduler_new(NULL, 2, 4, &sched) == PHI4_ERR_NULL, "NULL model");
    CHECK(phi4_scheduler_new(m, 2, 4, NULL) == PHI4_ERR_NULL, "NULL out");
    CHECK(phi4_session_new_on(NULL, NULL, NULL) == PHI4_ERR_NULL, "NULL scheduler");
    CHECK(phi4_scheduler_new(m, 0, N, &sched) == PHI4_OK && sched != NULL, "scheduler: %s", phi4_last_load_error());
    chat_job together[N], alone[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
        memset(&together[i], 0, sizeof together[i]);
        together[i].sched = sched;
        together[i].question = questions[i];
        pthread_create(&t[i], NULL, chat_thread, &together[i]);
    }
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < N; i++) {
        memset(&alone[i], 0, sizeof alone[i]);
        alone[i].m = m;
        alone[i].question = questions[i];
        chat_thread(&alone[i]);
        CHECK(together[i].status == PHI4_OK && strlen(together[i].text) > 0, "thread %d: %d", i, (int)together[i].status);
        CHECK(strcmp(together[i].text, alone[i].text) == 0, "thread %d: the lone reply\n%s\n%s", i, together[i].text, alone[i].text);
    }
    /* A session keeps its scheduler alive. */
    phi4_session *s = NULL;
    phi4_session_params sp;
    phi4_session_default_params(&sp);
    sp.overflow = 7;
    CHECK(phi4_session_new_on(sched, &sp, &s) == PHI4_ERR_INVALID_ARGUMENT && s == NULL, "bad params");
    CHECK(phi4_session_new_on(sched, NULL, &s) == PHI4_OK, "session on it");
    phi4_scheduler_free(sched);
    phi4_scheduler_free(NULL);
    phi4_message msgs[] = {{"user", questions[0]}};
    phi4_generate_params g = greedy(chat_tokens);
    chat_job after = {0};
    CHECK(phi4_session_chat(s, msgs, 1, &g, append, &after) == PHI4_OK, "chat after the scheduler's free");
    CHECK(strcmp(after.text, alone[0].text) == 0, "same reply: %s", after.text);
    phi4_session_free(s);
}

static void test_tokenize(phi4_model *m) {
    uint32_t ids[64];
    size_t n = 0;
    const char *text = "<|im_start|>user";
    CHECK(phi4_tokenize(m, text, strlen(text), true, ids, 64, &n) == PHI4_OK && n >= 2, "tokenize");
    size_t plain = 0;
    phi4_tokenize(m, text, strlen(text), false, ids, 64, &plain);
    CHECK(plain > n, "special tokens only when asked: %zu vs %zu", plain, n);
    CHECK(phi4_tokenize(m, text, strlen(text), false, ids, 1, &n) == PHI4_ERR_BUFFER_TOO_SMALL && n == plain, "too small reports the size");
    char out[128];
    size_t len = 0;
    phi4_tokenize(m, text, strlen(text), false, ids, 64, &n);
    CHECK(phi4_detokenize(m, ids, n, false, out, sizeof out, &len) == PHI4_OK && strcmp(out, text) == 0, "round trip: %s", out);
    CHECK(phi4_tokenize(m, "\xc3", 1, false, ids, 64, &n) == PHI4_ERR_INVALID_ARGUMENT, "invalid UTF-8");
    uint32_t bad = 999999;
    CHECK(phi4_detokenize(m, &bad, 1, false, out, sizeof out, &len) == PHI4_ERR_INVALID_ARGUMENT, "bad id");
}

/* Embeddings: the size asked first, normalised or not (the same direction), an error for no
 * tokens or a NULL session, and the session chats on afterwards. */
static void test_embed(phi4_model *m) {
    uint32_t ids[64];
    size_t n_ids = 0, n = 0;
    const char *text = "What is a tuple?";
    CHECK(phi4_tokenize(m, text, strlen(text), false, ids, 64, &n_ids) == PHI4_OK, "tokenize");
    phi4_session *s = NULL;
    CHECK(phi4_session_new(m, NULL, &s) == PHI4_OK, "session");
    CHECK(phi4_session_embed(s, ids, n_ids, true, NULL, 0, &n) == PHI4_ERR_BUFFER_TOO_SMALL && n > 0, "the size: %zu", n);
    float *unit = calloc(n, sizeof *unit), *raw = calloc(n, sizeof *raw);
    size_t got = 0;
    CHECK(phi4_session_embed(s, ids, n_ids, true, unit, n, &got) == PHI4_OK && got == n, "embed: %s", phi4_last_error());
    CHECK(phi4_session_embed(s, ids, n_ids, false, raw, n, &got) == PHI4_OK, "embed raw");
    double dot = 0, norm_u = 0, norm_r = 0;
    for (size_t i = 0; i < n; i++) {
        dot += (double)unit[i] * raw[i];
        norm_u += (double)unit[i] * unit[i];
        norm_r += (double)raw[i] * raw[i];
    }
    CHECK(fabs(norm_u - 1) < 1e-4, "unit length: %f", norm_u);
    CHECK(fabs(dot / sqrt(norm_r) - 1) < 1e-4, "the same direction: %f", dot / sqrt(norm_r));
    CHECK(phi4_session_embed(s, ids, 0, true, unit, n, &got) == PHI4_ERR_INVALID_ARGUMENT, "no tokens");
    CHECK(phi4_session_embed(NULL, ids, n_ids, true, unit, n, &got) == PHI4_ERR_NULL, "NULL session");
    uint32_t bad = 999999;
    CHECK(phi4_session_embed(s, &bad, 1, true, unit, n, &got) == PHI4_ERR_INVALID_ARGUMENT, "a token outside the vocabulary");
    phi4_message msgs[] = {{"user", text}};
    phi4_generate_params g = greedy(4);
    chat_job after = {0};
    CHECK(phi4_session_chat(s, msgs, 1, &g, append, &after) == PHI4_OK && strlen(after.text) > 0, "a chat after embedding");
    free(unit);
    free(raw);
    phi4_session_free(s);
}

/* Tools (JSON in, calls out as JSON) and log-probabilities. */
static void test_tools(phi4_model *m) {
    phi4_session *s = NULL;
    CHECK(phi4_session_new(m, NULL, &s) == PHI4_OK, "session");
    const char *tools =
        "[{\"type\": \"function\", \"function\": {\"name\": \"add\", \"description\": \"Add two integers.\","
        " \"parameters\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}, \"b\": {\"type\": \"integer\"}},"
        " \"required\": [\"a\", \"b\"]}}}]";
    phi4_generate_params g = greedy(200);
    g.tools = tools;
    g.tool_choice = PHI4_TOOL_CHOICE_REQUIRED;
    g.parallel_tool_calls = false;
    phi4_message msgs[4] = {{"user", "Add 2 and 40."}};
    chat_job reply = {0};
    CHECK(phi4_session_chat(s, msgs, 1, &g, append, &reply) == PHI4_OK, "chat with tools: %s", phi4_last_error());
    CHECK(strcmp(reply.text, "") == 0, "no text with a required call: %s", reply.text);
    size_t len = 0;
    CHECK(phi4_session_last_tool_calls(s, NULL, 0, &len) == PHI4_ERR_BUFFER_TOO_SMALL && len > 2, "the calls' size: %zu", len);
    char calls[1024] = {0};
    CHECK(phi4_session_last_tool_calls(s, calls, sizeof calls, &len) == PHI4_OK && len == strlen(calls), "the calls");
    CHECK(strncmp(calls, "[{\"name\": \"add\", \"arguments\": {\"a\": ", 35) == 0, "a call of add: %s", calls);
    /* The conversation goes on: the reply as phi4 wrote it, then the tool's result. */
    char assistant[1100];
    snprintf(assistant, sizeof assistant, "<tool_call>%.*s</tool_call>", (int)(strlen(calls) - 2), calls + 1);
    msgs[1] = (phi4_message){"assistant", assistant};
    msgs[2] = (phi4_message){"tool", "42"};
    phi4_generate_params next = greedy(8);
    next.tools = tools;
    next.tool_choice = PHI4_TOOL_CHOICE_NONE;
    next.logprobs = true;
    next.top_logprobs = 3;
    chat_job answer = {0};
    CHECK(phi4_session_chat(s, msgs, 3, &next, append, &answer) == PHI4_OK, "after the result: %s", phi4_last_error());
    phi4_result r = {.struct_size = sizeof r};
    phi4_session_last_result(s, &r);
    CHECK(r.prompt_eval_count < 20, "the call was in the cache: %llu evaluated", (unsigned long long)r.prompt_eval_count);
    CHECK(phi4_session_last_tool_calls(s, calls, sizeof calls, &len) == PHI4_OK && strcmp(calls, "[]") == 0, "no calls with none: %s", calls);
    size_t n = 0;
    CHECK(phi4_session_last_logprobs(s, NULL, 0, &n) == PHI4_ERR_BUFFER_TOO_SMALL && n == r.eval_count, "a logprob per token: %zu", n);
    phi4_token_logprob lp[8];
    CHECK(phi4_session_last_logprobs(s, lp, 8, &n) == PHI4_OK, "logprobs");
    for (size_t i = 0; i < n; i++) {
        CHECK(lp[i].n_top == 3 && lp[i].top_tokens[0] == lp[i].token && lp[i].top_logprobs[0] == lp[i].logprob && lp[i].logprob <= 0,
              "greedy: the token is the most likely (%u, %f)", lp[i].token, lp[i].logprob);
    }
    /* Bad input: a clear error, the session intact. */
    phi4_generate_params bad = g;
    bad.tools = "[{\"function\": {\"name\": \"a b\"}}]";
    CHECK(phi4_session_chat(s, msgs, 1, &bad, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT && strstr(phi4_last_error(), "a b"), "a bad name: %s", phi4_last_error());
    bad.tools = "{not json";
    CHECK(phi4_session_chat(s, msgs, 1, &bad, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "not JSON");
    bad.tools = tools;
    bad.tool_choice = PHI4_TOOL_CHOICE_FUNCTION;
    bad.tool_choice_name = "sub";
    CHECK(phi4_session_chat(s, msgs, 1, &bad, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "a choice naming no tool");
    bad.tool_choice_name = NULL;
    CHECK(phi4_session_chat(s, msgs, 1, &bad, NULL, NULL) == PHI4_ERR_NULL, "no name: %s", phi4_last_error());
    bad.tool_choice = 77;
    CHECK(phi4_session_chat(s, msgs, 1, &bad, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "not a phi4_tool_choice");
    bad = g;
    bad.format = PHI4_FORMAT_JSON;
    CHECK(phi4_session_chat(s, msgs, 1, &bad, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "tools with a format");
    bad = greedy(4);
    bad.logprobs = true;
    bad.top_logprobs = PHI4_MAX_TOP_LOGPROBS + 1;
    CHECK(phi4_session_chat(s, msgs, 1, &bad, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "too many alternatives");
    phi4_message unknown[] = {{"robot", "hi"}};
    CHECK(phi4_session_chat(s, unknown, 1, NULL, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "an unknown role");
    chat_job after = {0};
    phi4_generate_params four = greedy(4);
    CHECK(phi4_session_chat(s, msgs, 1, &four, append, &after) == PHI4_OK && strlen(after.text) > 0, "a chat after the errors");
    phi4_session_free(s);
}

/* Speculative decoding: the same reply with drafts, the drafts counted, a bad count refused. */
static void test_draft(phi4_model *m) {
    phi4_session *s = NULL;
    CHECK(phi4_session_new(m, NULL, &s) == PHI4_OK, "session");
    phi4_generate_params d;
    phi4_generate_default_params(&d);
    CHECK(d.draft == PHI4_DEFAULT_DRAFT, "the default draft: %u", d.draft);
    phi4_message msgs[] = {{"user", "The list type is mutable. The tuple type is immutable. The list type is mutable."}};
    chat_job plain = {0}, drafted = {0};
    phi4_generate_params g = greedy(48);
    g.draft = 0;
    CHECK(phi4_session_chat(s, msgs, 1, &g, append, &plain) == PHI4_OK, "plain: %s", phi4_last_error());
    phi4_result r = {.struct_size = sizeof r};
    phi4_session_last_result(s, &r);
    CHECK(r.drafted == 0 && r.accepted == 0, "nothing drafted with draft 0");
    phi4_session_reset(s);
    g.draft = 8;
    CHECK(phi4_session_chat(s, msgs, 1, &g, append, &drafted) == PHI4_OK, "drafted: %s", phi4_last_error());
    CHECK(strcmp(plain.text, drafted.text) == 0, "the same reply: %s / %s", plain.text, drafted.text);
    phi4_session_last_result(s, &r);
    CHECK(r.drafted > 0 && r.accepted <= r.drafted, "drafts counted: %llu, %llu", (unsigned long long)r.drafted,
          (unsigned long long)r.accepted);
    g.draft = PHI4_MAX_DRAFT + 1;
    CHECK(phi4_session_chat(s, msgs, 1, &g, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT && strstr(phi4_last_error(), "draft"),
          "too many drafted tokens: %s", phi4_last_error());
    phi4_session_free(s);
}

/* KV cache types: a quantized cache replies; its state loads only into a session of its type;
 * a value that is no phi4_kv_type is refused. */
static void test_kv_type(phi4_model *m) {
    phi4_session_params p;
    phi4_session_default_params(&p);
    CHECK(p.kv_type == PHI4_KV_F16, "the default cache type: %u", p.kv_type);
    p.n_ctx = 256;
    phi4_session *q8 = NULL, *f16 = NULL, *bad = NULL;
    p.kv_type = PHI4_KV_Q8_0;
    CHECK(phi4_session_new(m, &p, &q8) == PHI4_OK, "a q8_0 session: %s", phi4_last_error());
    p.kv_type = PHI4_KV_F16;
    CHECK(phi4_session_new(m, &p, &f16) == PHI4_OK, "an f16 session: %s", phi4_last_error());
    p.kv_type = 7;
    CHECK(phi4_session_new(m, &p, &bad) == PHI4_ERR_INVALID_ARGUMENT && bad == NULL && strstr(phi4_last_error(), "kv_type"),
          "kv_type 7: %s", phi4_last_error());
    if (!q8 || !f16) {
        phi4_session_free(q8);
        phi4_session_free(f16);
        return;
    }
    phi4_message msgs[] = {{"user", "What is a tuple?"}};
    chat_job job = {0};
    phi4_generate_params g = greedy(8);
    CHECK(phi4_session_chat(q8, msgs, 1, &g, append, &job) == PHI4_OK && job.text[0], "a q8_0 reply: %s",
          phi4_last_error());
    size_t len = 0;
    CHECK(phi4_session_save_buffer(q8, NULL, 0, &len) == PHI4_ERR_BUFFER_TOO_SMALL && len > 0, "state size");
    uint8_t *buf = malloc(len);
    CHECK(buf && phi4_session_save_buffer(q8, buf, len, &len) == PHI4_OK, "save");
    CHECK(phi4_session_load_buffer(f16, buf, len) == PHI4_ERR_BAD_STATE && strstr(phi4_last_error(), "q8_0"),
          "a q8_0 state into an f16 session: %s", phi4_last_error());
    CHECK(phi4_session_copy(f16, q8) == PHI4_ERR_BAD_STATE, "a copy across cache types: %s", phi4_last_error());
    free(buf);
    phi4_session_free(q8);
    phi4_session_free(f16);
}

/* The header's contract: the version says what the ABI has; outputs are written only on PHI4_OK
 * (the size output of PHI4_ERR_BUFFER_TOO_SMALL excepted); every failing call leaves its message
 * in phi4_last_error(); a BUSY never replaces a session's message for others. */
#if PHI4_VERSION_MAJOR != 0 || PHI4_VERSION_MINOR < 4
#error "this test needs the 0.4 ABI"
#endif
typedef char done_reason_is_32_bits[sizeof(((phi4_result *)0)->done_reason) == 4 ? 1 : -1];

static bool copy_while_busy(void *user, const char *piece, size_t len) {
    (void)piece;
    (void)len;
    phi4_session **pair = user;
    /* pair[1] runs this generation: copying it into pair[0] finds it busy. */
    CHECK(phi4_session_copy(pair[0], pair[1]) == PHI4_ERR_BUSY, "copy from a session in a call");
    CHECK(strstr(phi4_last_error(), "from") != NULL, "this thread reads why: %s", phi4_last_error());
    CHECK(strstr(phi4_session_last_error(pair[0]), "from") != NULL, "and so does the session, for this thread: %s",
          phi4_session_last_error(pair[0]));
    return false;
}

static void *read_message(void *arg) {
    static char seen[256];
    snprintf(seen, sizeof seen, "%s", phi4_session_last_error(arg));
    return seen;
}

static void test_contract(phi4_model *m) {
    char v[32];
    snprintf(v, sizeof v, "%d.%d.%d", PHI4_VERSION_MAJOR, PHI4_VERSION_MINOR, PHI4_VERSION_PATCH);
    CHECK(strcmp(phi4_version(), v) == 0, "header %s, library %s", v, phi4_version());
    CHECK(phi4_last_load_error() == phi4_last_error(), "the older name reads the same message");

    /* Failures of every kind of function leave a message. */
    CHECK(phi4_session_default_params(NULL) == PHI4_ERR_NULL && strstr(phi4_last_error(), "out") != NULL,
          "params: %s", phi4_last_error());
    uint32_t ids[4];
    size_t n = 12345;
    CHECK(phi4_tokenize(m, "\xc3", 1, false, ids, 4, &n) == PHI4_ERR_INVALID_ARGUMENT && strstr(phi4_last_error(), "UTF-8"),
          "tokenize: %s", phi4_last_error());
    CHECK(n == 12345, "n_tokens untouched on an error");
    CHECK(phi4_tokenize(m, "hello", 5, false, NULL, 4, &n) == PHI4_ERR_NULL && n == 12345, "NULL ids with room: untouched");
    CHECK(phi4_tokenize(m, "hello world and more", 20, false, ids, 1, &n) == PHI4_ERR_BUFFER_TOO_SMALL && n > 1,
          "too small: the size needed (%zu)", n);
    CHECK(strstr(phi4_last_error(), "n_tokens") != NULL, "says where the size is: %s", phi4_last_error());
    uint32_t bad = 999999;
    char text[16];
    size_t len = 777;
    CHECK(phi4_detokenize(m, &bad, 1, false, text, sizeof text, &len) == PHI4_ERR_INVALID_ARGUMENT && len == 777,
          "detokenize: untouched");
    CHECK(strstr(phi4_last_error(), "999999") != NULL, "detokenize: %s", phi4_last_error());
    CHECK(phi4_model_repacked(m, NULL, 1000, &len) == PHI4_ERR_NULL && len == 777, "repacked: NULL text, untouched");
    CHECK(phi4_session_cancel(NULL) == PHI4_ERR_NULL && strstr(phi4_last_error(), "session") != NULL, "cancel: %s",
          phi4_last_error());
    phi4_scheduler *sched = NULL;
    CHECK(phi4_scheduler_new(m, 1, PHI4_MAX_BATCH + 1, &sched) == PHI4_ERR_INVALID_ARGUMENT && sched == NULL,
          "max_batch above PHI4_MAX_BATCH");

    phi4_session *a = NULL, *b = NULL;
    phi4_session_new(m, NULL, &a);
    phi4_session_new(m, NULL, &b);
    len = 555;
    CHECK(phi4_session_save_buffer(a, NULL, 1 << 30, &len) == PHI4_ERR_NULL && len == 555, "save: NULL buf, len untouched");
    size_t need = 0;
    CHECK(phi4_session_save_buffer(a, NULL, 0, &need) == PHI4_ERR_BUFFER_TOO_SMALL && need > 0, "save: size asked");

    /* a's own message, then a BUSY answer on it from a callback: others still read a's. */
    phi4_message bad_role[] = {{"wizard", "hi"}};
    CHECK(phi4_session_chat(a, bad_role, 1, NULL, NULL, NULL) == PHI4_ERR_INVALID_ARGUMENT, "a fails");
    char own[256];
    snprintf(own, sizeof own, "%s", phi4_session_last_error(a));
    CHECK(strstr(own, "wizard") != NULL, "a's message: %s", own);
    phi4_session *pair[2] = {a, b};
    phi4_message msgs[] = {{"user", "What is a list?"}};
    phi4_generate_params g = greedy(4);
    CHECK(phi4_session_chat(b, msgs, 1, &g, copy_while_busy, pair) == PHI4_OK, "b's chat");
    pthread_t t;
    char *seen = NULL;
    pthread_create(&t, NULL, read_message, a);
    pthread_join(t, (void **)&seen);
    CHECK(strcmp(seen, own) == 0, "another thread still reads a's own message: %s", seen);
    phi4_session_free(a);
    phi4_session_free(b);
}

/* CPU features and repacked layouts: consistent with each other and with the load options. */
static void test_what_runs(const char *quantized) {
    const char *features = phi4_cpu_features();
    CHECK(features != NULL && strlen(features) > 0, "cpu features");
    printf("cpu features: %s\n", features);
    const char *variant = phi4_cpu_variant();
    CHECK(variant != NULL && strlen(variant) > 0 && variant == phi4_cpu_variant(), "cpu kernels, one static string");
    printf("cpu kernels: %s\n", variant);
    phi4_model_params p;
    phi4_model_default_params(&p);
    for (int repack = 1; repack >= 0; repack--) {
        p.repack = repack;
        phi4_model *m = NULL;
        CHECK(phi4_model_load(quantized, &p, &m) == PHI4_OK, "load: %s", phi4_last_load_error());
        if (!m) return;
        size_t len = 0;
        char text[256];
        CHECK(phi4_model_repacked(m, NULL, 0, &len) == PHI4_ERR_BUFFER_TOO_SMALL && len > 0, "size first: %zu", len);
        size_t need = len;
        CHECK(phi4_model_repacked(m, text, need, &len) == PHI4_ERR_BUFFER_TOO_SMALL, "no room for the NUL");
        CHECK(phi4_model_repacked(m, text, sizeof text, &len) == PHI4_OK && len == need && strlen(text) == len, "text");
        unsigned n = phi4_model_n_repacked(m);
        if (repack) {
            printf("repacked: %s\n", text);
            CHECK((n == 0) == (strcmp(text, "none") == 0), "%u repacked, \"%s\"", n, text);
            CHECK(n == 0 || strstr(text, " tensors into ") != NULL, "%s", text);
        } else {
            CHECK(n == 0 && strcmp(text, "none") == 0, "repack off: %u, %s", n, text);
        }
        phi4_model_free(m);
    }
    size_t len = 0;
    CHECK(phi4_model_repacked(NULL, NULL, 0, &len) == PHI4_ERR_NULL, "NULL model");
}

/* The tests that share one loaded model, in an order that `--part K/N` (every Nth from the Kth)
 * splits into parts of about the same time under valgrind. */
static void (*const model_tests[])(phi4_model *) = {
    test_tools, test_scheduler, test_streaming, test_enums_and_seeds, test_many_sessions_many_threads,
    test_state, test_embed, test_draft, test_older_struct_sizes, test_structured_output,
    test_cancel_by_callback, test_kv_type, test_contract, test_cancel_from_another_thread_and_busy,
    test_tokenize,
};

int main(int argc, char **argv) {
    unsigned part = 1, parts = 1;
    bool usage = argc < 4 || argc == 6 || argc > 7;
    if (argc >= 5) usage |= strcmp(argv[4], "--short") != 0;
    if (argc == 7)
        usage |= strcmp(argv[5], "--part") != 0 || sscanf(argv[6], "%u/%u", &part, &parts) != 2 || part < 1 ||
                 part > parts;
    if (usage) {
        fprintf(stderr, "usage: %s DEMO_MODEL MALFORMED_FILE QUANTIZED_MODEL [--short [--part K/N]]\n", argv[0]);
        return 2;
    }
    if (argc >= 5) chat_tokens = 8;
    demo = argv[1];
    if (part == 1) {
        CHECK(strlen(phi4_version()) > 0, "version");
        test_load_errors(argv[2]);
        test_load_cancel();
        test_log_per_model();
        test_what_runs(argv[3]);
    }
    phi4_model *m = NULL;
    CHECK(phi4_model_load(demo, NULL, &m) == PHI4_OK, "load: %s", phi4_last_load_error());
    if (!m) return 1;
    for (size_t i = part - 1; i < sizeof model_tests / sizeof model_tests[0]; i += parts) model_tests[i](m);
    phi4_model_free(m);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
