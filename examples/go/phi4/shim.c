// C side of the Go callbacks: adapts phi4_stream_fn's const char * to the exported Go function.
#include <phi4.h>
#include "_cgo_export.h"

bool phi4go_stream(void *user, const char *piece, size_t len) {
    return goStreamPiece(user, (char *)piece, len);
}
