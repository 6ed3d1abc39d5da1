/* A streaming chat in C over libphi4.
 *
 *   cc -std=c99 chat.c $(pkg-config --cflags --libs phi4) -o chat
 *   ./chat MODEL.gguf            # then type messages; an empty line or EOF quits
 */
#include <phi4.h>

#include <stdio.h>
#include <string.h>

enum { MAX_TURNS = 32, MAX_TEXT = 4096 };

/* Print each piece as it comes, and keep the reply (user points at its buffer). */
static bool print_piece(void *user, const char *piece, size_t len) {
    char *reply = user;
    size_t have = strlen(reply);
    if (have + len < MAX_TEXT) memcpy(reply + have, piece, len + 1);
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return true; /* false would cancel the reply */
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    phi4_model *model = NULL;
    if (phi4_model_load(argv[1], NULL, &model) != PHI4_OK) {
        fprintf(stderr, "cannot load %s: %s\n", argv[1], phi4_last_error());
        return 1;
    }
    phi4_session_params sp;
    phi4_session_default_params(&sp);
    sp.overflow = PHI4_OVERFLOW_DROP_OLDEST;
    phi4_session *session = NULL;
    if (phi4_session_new(model, &sp, &session) != PHI4_OK) {
        fprintf(stderr, "cannot open a session: %s\n", phi4_last_error());
        phi4_model_free(model);
        return 1;
    }

    /* The conversation: texts kept here, messages point into them. */
    static char texts[2 * MAX_TURNS][MAX_TEXT];
    phi4_message msgs[2 * MAX_TURNS];
    size_t n = 0;
    phi4_generate_params gp;
    phi4_generate_default_params(&gp);

    for (;;) {
        printf(">>> ");
        fflush(stdout);
        if (!fgets(texts[n], MAX_TEXT, stdin) || texts[n][0] == '\n') break;
        texts[n][strcspn(texts[n], "\n")] = 0;
        msgs[n].role = "user";
        msgs[n].content = texts[n];
        n++;
        /* Stream the reply into the next slot: it becomes the assistant's message. */
        char *reply = texts[n];
        reply[0] = 0;
        if (phi4_session_chat(session, msgs, n, &gp, print_piece, reply) != PHI4_OK) {
            fprintf(stderr, "\nerror: %s\n", phi4_session_last_error(session));
            n--;
            continue;
        }
        printf("\n");
        phi4_result r;
        memset(&r, 0, sizeof r);
        r.struct_size = sizeof r;
        phi4_session_last_result(session, &r);
        fprintf(stderr, "(%llu tokens, %.1f tok/s)\n", (unsigned long long)r.eval_count,
                r.eval_duration ? r.eval_count / (r.eval_duration / 1e9) : 0.0);
        msgs[n].role = "assistant";
        msgs[n].content = reply;
        n++;
        if (n + 2 > 2 * MAX_TURNS) break;
    }
    phi4_session_free(session);
    phi4_model_free(model);
    return 0;
}
