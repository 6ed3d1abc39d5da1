/* CHECK(cond, fmt, ...) for the C test programs: counts passes and failures, prints each failure
 * with its place. The program prints "N passed, M failed" at its end. */
#ifndef PHI4_TEST_CHECK_H
#define PHI4_TEST_CHECK_H

#include <stdio.h>

static int passed, failed;
#define CHECK(cond, ...)                                                              \
    do {                                                                              \
        if (cond) {                                                                   \
            passed++;                                                                 \
        } else {                                                                      \
            failed++;                                                                 \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);           \
            fprintf(stderr, __VA_ARGS__);                                             \
            fprintf(stderr, "\n");                                                    \
        }                                                                             \
    } while (0)

#endif
