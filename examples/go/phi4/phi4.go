// Package phi4 is a Go binding of the phi4 C library (cgo). Build with the library's flags,
// e.g. `CGO_CFLAGS=$(pkg-config --cflags phi4) CGO_LDFLAGS=$(pkg-config --libs phi4) go test`.
package phi4

/*
#cgo LDFLAGS: -lphi4
#include <phi4.h>
#include <stdlib.h>
bool phi4go_stream(void *user, const char *piece, size_t len);
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime/cgo"
	"unsafe"
)

// Error is a failed phi4 call: the C status and its message.
type Error struct {
	Status int
	Msg    string
}

func (e *Error) Error() string { return fmt.Sprintf("phi4 status %d: %s", e.Status, e.Msg) }

// ErrBusy is the status of a second concurrent call on one session.
const ErrBusy = int(C.PHI4_ERR_BUSY)

// Model is a loaded model; safe for concurrent use by many sessions.
type Model struct{ m *C.phi4_model }

// Load loads a GGUF model file.
func Load(path string) (*Model, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var m *C.phi4_model
	if st := C.phi4_model_load(cpath, nil, &m); st != C.PHI4_OK {
		return nil, &Error{int(st), C.GoString(C.phi4_last_error())}
	}
	return &Model{m}, nil
}

// Close releases the model (sessions on it keep it alive).
func (m *Model) Close() { C.phi4_model_free(m.m); m.m = nil }

// Session is one conversation; one goroutine at a time.
type Session struct{ s *C.phi4_session }

// NewSession opens a session with the default parameters.
func (m *Model) NewSession() (*Session, error) {
	if m.m == nil {
		return nil, errors.New("phi4: model is closed")
	}
	var s *C.phi4_session
	if st := C.phi4_session_new(m.m, nil, &s); st != C.PHI4_OK {
		return nil, &Error{int(st), C.GoString(C.phi4_last_error())}
	}
	return &Session{s}, nil
}

// Close frees the session.
func (s *Session) Close() { C.phi4_session_free(s.s); s.s = nil }

// Cancel stops a running Chat; safe from any goroutine.
func (s *Session) Cancel() { C.phi4_session_cancel(s.s) }

// Message is one chat message: Role is "system", "user" or "assistant".
type Message struct{ Role, Content string }

// Result says why a reply ended and how long it took.
type Result struct {
	DoneReason                 int
	PromptEvalCount, EvalCount uint64
}

//export goStreamPiece
func goStreamPiece(user unsafe.Pointer, piece *C.char, n C.size_t) C.bool {
	f := (*(*cgo.Handle)(user)).Value().(func(string) bool)
	return C.bool(f(C.GoStringN(piece, C.int(n))))
}

// Chat replies to messages (greedy when temperature is 0), streaming text to onPiece, which
// returns false to cancel.
func (s *Session) Chat(messages []Message, temperature float32, maxTokens uint32, onPiece func(string) bool) (Result, error) {
	msgs := make([]C.phi4_message, len(messages))
	for i, m := range messages {
		msgs[i].role = C.CString(m.Role)
		msgs[i].content = C.CString(m.Content)
		defer C.free(unsafe.Pointer(msgs[i].role))
		defer C.free(unsafe.Pointer(msgs[i].content))
	}
	var gp C.phi4_generate_params
	C.phi4_generate_default_params(&gp)
	gp.temperature = C.float(temperature)
	gp.max_tokens = C.uint32_t(maxTokens)
	h := cgo.NewHandle(onPiece)
	defer h.Delete()
	var first *C.phi4_message
	if len(msgs) > 0 {
		first = &msgs[0]
	}
	st := C.phi4_session_chat(s.s, first, C.size_t(len(msgs)), &gp, C.phi4_stream_fn(C.phi4go_stream), unsafe.Pointer(&h))
	if st != C.PHI4_OK {
		return Result{}, &Error{int(st), C.GoString(C.phi4_session_last_error(s.s))}
	}
	var r C.phi4_result
	r.struct_size = C.size_t(unsafe.Sizeof(r))
	C.phi4_session_last_result(s.s, &r)
	return Result{int(r.done_reason), uint64(r.prompt_eval_count), uint64(r.eval_count)}, nil
}

// Done reasons.
const (
	DoneStop      = int(C.PHI4_DONE_STOP)
	DoneLength    = int(C.PHI4_DONE_LENGTH)
	DoneCancelled = int(C.PHI4_DONE_CANCELLED)
)
