//! Phi-4's chat format, produced natively (the Jinja template inside a GGUF is never evaluated):
//!
//! ```text
//! <|im_start|>{role}<|im_sep|>{content}<|im_end|>   for each message
//! <|im_start|>assistant<|im_sep|>                   to ask for a reply
//! ```
//! No newlines, no BOS. Role markers go in as token ids; role names and message content are
//! tokenized as plain text, so text that looks like a marker cannot forge a turn.

use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (see [`crate::tools`]).
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

const IM_START: &str = "<|im_start|>";
const IM_SEP: &str = "<|im_sep|>";
const IM_END: &str = "<|im_end|>";

/// The conversation as text, exactly as Phi-4's template renders it.
pub fn render(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(IM_START);
        s.push_str(m.role.as_str());
        s.push_str(IM_SEP);
        s.push_str(&m.content);
        s.push_str(IM_END);
    }
    if add_generation_prompt {
        s.push_str(IM_START);
        s.push_str("assistant");
        s.push_str(IM_SEP);
    }
    s
}

/// The marker ids of a vocabulary.
#[derive(Debug, Clone, Copy)]
pub struct Markers {
    pub im_start: u32,
    pub im_sep: u32,
    pub im_end: u32,
}

impl Markers {
    pub fn of(tok: &Tokenizer) -> Result<Markers, String> {
        let id = |t: &str| {
            tok.token_id(t)
                .ok_or_else(|| format!("the vocabulary has no {t} token, so it cannot chat"))
        };
        Ok(Markers {
            im_start: id(IM_START)?,
            im_sep: id(IM_SEP)?,
            im_end: id(IM_END)?,
        })
    }
}

/// The conversation as token ids.
pub fn tokens(
    tok: &Tokenizer,
    m: Markers,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Vec<u32> {
    let mut out: Vec<u32> = messages
        .iter()
        .flat_map(|msg| turn(tok, m, msg.role, Some(tok.encode(&msg.content, false))))
        .collect();
    if add_generation_prompt {
        out.extend(turn(tok, m, Role::Assistant, None));
    }
    out
}

/// One message's tokens: `<|im_start|>role<|im_sep|>content<|im_end|>`; without content, the
/// start of a reply (`<|im_start|>assistant<|im_sep|>`). A conversation's tokens are its
/// messages' tokens one after another, so each message can be tokenized once.
pub fn turn(tok: &Tokenizer, m: Markers, role: Role, content: Option<Vec<u32>>) -> Vec<u32> {
    let mut out = vec![m.im_start];
    out.extend(tok.encode(role.as_str(), false));
    out.push(m.im_sep);
    if let Some(c) = content {
        out.extend(c);
        out.push(m.im_end);
    }
    out
}

/// The messages whose turns `ids` holds, in order (the inverse of [`tokens`]): complete turns
/// only; an unfinished last turn (a reply being generated) is left out. For a conversation
/// restored from a saved session state.
pub fn messages(tok: &Tokenizer, m: Markers, ids: &[u32]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut rest = ids;
    while let Some(start) = rest.iter().position(|&t| t == m.im_start) {
        rest = &rest[start + 1..];
        let (Some(sep), Some(end)) = (
            rest.iter().position(|&t| t == m.im_sep),
            rest.iter().position(|&t| t == m.im_end),
        ) else {
            break;
        };
        if sep < end {
            if let Some(role) = Role::parse(&tok.decode(&rest[..sep], false)) {
                out.push(Message::new(role, tok.decode(&rest[sep + 1..end], false)));
            }
        }
        rest = &rest[end + 1..];
    }
    out
}
