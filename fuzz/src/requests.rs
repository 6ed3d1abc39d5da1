//! The server's request layer: arbitrary bytes as the body of every route that reads one
//! (`phi4 serve`'s parsing and checking of each of `BODY_ROUTES`: Ollama's, OpenAI's chat,
//! completions, embeddings and Responses, Anthropic's Messages; no model needed). Every body is
//! either accepted or refused with a message for the client; none panics, none takes
//! super-linear time (libFuzzer's -timeout) or memory (-rss_limit_mb).

use phi4_cli::serve::{check_body, BODY_ROUTES};

/// The check of one input.
pub fn run(body: &[u8]) {
    for route in BODY_ROUTES {
        if let Err(message) = check_body(route, body) {
            assert!(!message.is_empty(), "{route}: a refusal without a message");
        }
    }
}
