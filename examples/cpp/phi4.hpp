// A small RAII wrapper over the phi4 C API (header-only, C++17).
//
// Errors become phi4::Error exceptions; handles are freed by destructors; a callable streams
// text (an exception thrown by it cancels the reply and is rethrown after the C call returns).
#pragma once

#include <phi4.h>

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace phi4 {

class Error : public std::runtime_error {
  public:
    Error(phi4_status status, const std::string &what) : std::runtime_error(what), status_(status) {}
    phi4_status status() const noexcept { return status_; }

  private:
    phi4_status status_;
};

struct Message {
    std::string role;
    std::string content;
};

class Model {
  public:
    explicit Model(const std::string &path, const phi4_model_params *params = nullptr) {
        phi4_status st = phi4_model_load(path.c_str(), params, &m_);
        if (st != PHI4_OK) throw Error(st, phi4_last_error());
    }
    ~Model() { phi4_model_free(m_); }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    Model(Model &&o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
    Model &operator=(Model &&o) noexcept {
        std::swap(m_, o.m_);
        return *this;
    }

    const phi4_model *get() const noexcept { return m_; }

    std::vector<uint32_t> tokenize(std::string_view text, bool special = false) const {
        std::vector<uint32_t> ids(text.size() + 8);
        size_t n = 0;
        phi4_status st = phi4_tokenize(m_, text.data(), text.size(), special, ids.data(), ids.size(), &n);
        if (st == PHI4_ERR_BUFFER_TOO_SMALL) {
            ids.resize(n);
            st = phi4_tokenize(m_, text.data(), text.size(), special, ids.data(), ids.size(), &n);
        }
        if (st != PHI4_OK) throw Error(st, "tokenize failed");
        ids.resize(n);
        return ids;
    }

  private:
    phi4_model *m_ = nullptr;
};

class Session {
  public:
    explicit Session(const Model &model, const phi4_session_params *params = nullptr) {
        phi4_status st = phi4_session_new(model.get(), params, &s_);
        if (st != PHI4_OK) throw Error(st, phi4_last_error());
    }
    ~Session() { phi4_session_free(s_); }
    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;

    // Reply to `messages`, calling on_piece(std::string_view) for each piece of text; it returns
    // true to go on. Returns the outcome (done reason, timings).
    template <class F>
    phi4_result chat(const std::vector<Message> &messages, F &&on_piece, const phi4_generate_params *params = nullptr) {
        std::vector<phi4_message> msgs;
        for (const auto &m : messages) msgs.push_back({m.role.c_str(), m.content.c_str()});
        Stream<F> stream{on_piece, nullptr};
        phi4_status st = phi4_session_chat(s_, msgs.data(), msgs.size(), params, &Stream<F>::call, &stream);
        if (stream.error) std::rethrow_exception(stream.error);
        if (st != PHI4_OK) throw Error(st, phi4_session_last_error(s_));
        phi4_result r;
        std::memset(&r, 0, sizeof r);
        r.struct_size = sizeof r;
        phi4_session_last_result(s_, &r);
        return r;
    }

    // Safe from any thread.
    void cancel() noexcept { phi4_session_cancel(s_); }

  private:
    template <class F>
    struct Stream {
        F &f;
        std::exception_ptr error;
        static bool call(void *user, const char *piece, size_t len) noexcept {
            auto *self = static_cast<Stream *>(user);
            try {
                return self->f(std::string_view(piece, len));
            } catch (...) {
                self->error = std::current_exception();
                return false;
            }
        }
    };

    phi4_session *s_ = nullptr;
};

}  // namespace phi4
