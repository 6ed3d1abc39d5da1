//! Generation options as command-line flags, made from the library's table of options
//! (`GenerateParams::options()`): `--temperature 0.5`, `--top-k 20`, `-n 64`, `--stop S` (repeatable).
//! The library parses and checks the values, so the CLI, the REPL's `/set parameter` and the
//! library agree on names, defaults and ranges.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use phi4::{Constraint, GenerateParams};

/// The options given on the command line, by name, in order.
#[derive(Debug, Default)]
pub struct GenerateArgs(Vec<(&'static str, String)>);

fn flag(name: &str) -> String {
    name.replace('_', "-")
}

impl GenerateArgs {
    /// The library's defaults with these options applied.
    pub fn params(&self) -> Result<GenerateParams, String> {
        let mut gp = GenerateParams::default();
        for (name, value) in &self.0 {
            gp.set(name, value)
                .map_err(|e| format!("--{}: {e}", flag(name)))?;
        }
        Ok(gp)
    }
}

impl Args for GenerateArgs {
    fn augment_args(mut cmd: Command) -> Command {
        let defaults = GenerateParams::default();
        for &(name, help) in GenerateParams::options() {
            let help = format!(
                "{} [default: {}]",
                help.trim(),
                defaults.get(name).unwrap_or_default()
            );
            let mut arg = Arg::new(name)
                .long(flag(name))
                .help(help)
                .value_name("VALUE")
                .allow_negative_numbers(true);
            arg = match name {
                "stop" => arg.action(ArgAction::Append),
                "num_predict" => arg.short('n'),
                _ => arg,
            };
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for GenerateArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut given: Vec<(usize, &'static str, String)> = Vec::new();
        for &(name, _) in GenerateParams::options() {
            if let (Some(values), Some(indices)) = (m.get_many::<String>(name), m.indices_of(name))
            {
                given.extend(indices.zip(values).map(|(i, v)| (i, name, v.clone())));
            }
        }
        given.sort_by_key(|g| g.0);
        Ok(GenerateArgs(
            given.into_iter().map(|(_, n, v)| (n, v)).collect(),
        ))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// The reply's format (at most one of these): only tokens that keep it valid are sampled.
#[derive(Debug, Default, clap::Args)]
#[group(multiple = false)]
pub struct FormatArgs {
    /// Reply format: `json` (any JSON object) or a JSON Schema written inline (`{...}`).
    #[arg(long, value_name = "json|SCHEMA")]
    format: Option<String>,
    /// Reply format: a JSON value valid against the JSON Schema in FILE.
    #[arg(long, value_name = "FILE")]
    format_schema: Option<std::path::PathBuf>,
    /// Reply format: text in the language of the Lark grammar in FILE (`start: ...`).
    #[arg(long, value_name = "FILE")]
    grammar: Option<std::path::PathBuf>,
    /// Reply format: text matched, whole, by this regular expression.
    #[arg(long, value_name = "REGEX")]
    regex: Option<String>,
}

impl FormatArgs {
    pub fn constraint(&self) -> Result<Option<Constraint>, String> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| format!("--{flag} {}: {e}", p.display()))
        };
        Ok(match self {
            FormatArgs {
                format: Some(f), ..
            } => parse_format(f).map_err(|e| format!("--format: {e}"))?,
            FormatArgs {
                format_schema: Some(p),
                ..
            } => Some(Constraint::JsonSchema(read("format-schema", p)?)),
            FormatArgs {
                grammar: Some(p), ..
            } => Some(Constraint::Lark(read("grammar", p)?)),
            FormatArgs { regex: Some(r), .. } => Some(Constraint::Regex(r.clone())),
            _ => None,
        })
    }
}

/// A format as `--format` and the REPL's `/set format` take it: `json`, or a JSON Schema.
pub fn parse_format(s: &str) -> Result<Option<Constraint>, String> {
    match s.trim() {
        "json" => Ok(Some(Constraint::Json)),
        schema if schema.starts_with('{') => Ok(Some(Constraint::JsonSchema(schema.to_string()))),
        other => Err(format!(
            "{other:?} is neither json nor a JSON Schema ({{...}})"
        )),
    }
}

/// How the REPL names a format (`/set format`, `/show parameters`).
pub fn describe_format(c: Option<&Constraint>) -> String {
    match c {
        None => "text".into(),
        Some(Constraint::Json) => "json".into(),
        Some(c @ (Constraint::JsonSchema(s) | Constraint::Regex(s) | Constraint::Lark(s))) => {
            let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
            let short: String = one_line.chars().take(60).collect();
            format!(
                "{} {short}{}",
                c.kind(),
                if short.len() < one_line.len() {
                    "…"
                } else {
                    ""
                }
            )
        }
    }
}
