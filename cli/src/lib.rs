//! The server of the `phi4` command line, as a library: the `phi4` binary (`main.rs`) serves
//! with it, and the request-layer fuzz target checks arbitrary bodies through it
//! ([`serve::check_body`]).

pub mod memory;
pub mod serve;

/// What a command returns: an error is printed and the process exits with 1.
pub type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;
