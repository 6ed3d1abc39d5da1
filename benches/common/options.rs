//! The benchmarks' command-line options: `--name value` pairs after `cargo bench --bench X --`
//! (cargo bench's own `--bench` flag is passed through and ignored).

use std::path::PathBuf;
use std::str::FromStr;

pub struct Options {
    pairs: Vec<(String, String)>,
    usage: &'static str,
}

impl Options {
    /// The options of this process; `usage` is printed when one is missing or malformed.
    pub fn parse(usage: &'static str) -> Options {
        let mut pairs = Vec::new();
        let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
        while let Some(k) = it.next() {
            match (k.strip_prefix("--"), it.next()) {
                (Some(name), Some(v)) => pairs.push((name.to_string(), v)),
                _ => Options {
                    pairs: vec![],
                    usage,
                }
                .fail(&format!("{k} needs a value")),
            }
        }
        Options { pairs, usage }
    }

    fn fail(&self, why: &str) -> ! {
        eprintln!("{why}\nusage: {}", self.usage);
        std::process::exit(2)
    }

    /// `--name`'s value, or `default` when it is not given.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> T {
        match self.pairs.iter().rev().find(|(n, _)| n == name) {
            None => default,
            Some((_, v)) => v
                .parse()
                .unwrap_or_else(|_| self.fail(&format!("--{name} {v:?} is not valid"))),
        }
    }

    /// A path that must be given.
    pub fn path(&self, name: &str) -> PathBuf {
        let p: PathBuf = self.get(name, PathBuf::new());
        if p.as_os_str().is_empty() {
            self.fail(&format!("--{name} is required"));
        }
        p
    }
}
