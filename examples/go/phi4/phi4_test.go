package phi4

import (
	"os"
	"strings"
	"sync"
	"testing"
)

func demo(t *testing.T) *Model {
	path := os.Getenv("PHI4_DEMO_MODEL")
	if path == "" {
		path = "../../../tests/fixtures/phi4-tiny-docs.gguf"
	}
	m, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestChatStreamsAndStops(t *testing.T) {
	m := demo(t)
	defer m.Close()
	s, err := m.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var b strings.Builder
	r, err := s.Chat([]Message{{"user", "How do I open a file?"}}, 0, 300, func(p string) bool { b.WriteString(p); return true })
	if err != nil {
		t.Fatal(err)
	}
	if r.DoneReason != DoneStop || len(strings.Fields(b.String())) < 5 || r.EvalCount == 0 {
		t.Fatalf("reason %d, %d tokens: %q", r.DoneReason, r.EvalCount, b.String())
	}
}

func TestCancelFromTheCallback(t *testing.T) {
	m := demo(t)
	defer m.Close()
	s, _ := m.NewSession()
	defer s.Close()
	n := 0
	r, err := s.Chat([]Message{{"user", "Describe the standard library."}}, 0, 200, func(string) bool { n++; return n < 2 })
	if err != nil || r.DoneReason != DoneCancelled || n != 2 {
		t.Fatalf("err %v, reason %d, pieces %d", err, r.DoneReason, n)
	}
}

func TestErrors(t *testing.T) {
	if _, err := Load("/nonexistent.gguf"); err == nil || !strings.Contains(err.Error(), "No such file") {
		t.Fatalf("missing file: %v", err)
	}
	m := demo(t)
	defer m.Close()
	s, _ := m.NewSession()
	defer s.Close()
	if _, err := s.Chat([]Message{{"wizard", "hi"}}, 0, 5, func(string) bool { return true }); err == nil {
		t.Fatal("a bad role must fail")
	}
}

func TestSessionsOnManyGoroutines(t *testing.T) {
	m := demo(t)
	defer m.Close()
	var wg sync.WaitGroup
	out := make([]string, 4)
	for i := range out {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			s, err := m.NewSession()
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close()
			var b strings.Builder
			if _, err := s.Chat([]Message{{"user", "What is a module?"}}, 0, 30, func(p string) bool { b.WriteString(p); return true }); err != nil {
				t.Error(err)
			}
			out[i] = b.String()
		}(i)
	}
	wg.Wait()
	for i := range out {
		if out[i] == "" || out[i] != out[0] {
			t.Fatalf("goroutine %d: %q vs %q", i, out[i], out[0])
		}
	}
}
