//! Generation options as command-line flags, made from the library's table of options
//! (`GenerateParams::options()`): `--temperature 0.5`, `--top-k 20`, `-n 64`, `--stop S` (repeatable).
//! The library parses and checks the values, so the CLI, the REPL's `/set parameter` and the
//! library agree on names, defaults and ranges.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use phi4::GenerateParams;

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
            gp.set(name, value).map_err(|e| format!("--{}: {e}", flag(name)))?;
        }
        Ok(gp)
    }
}

impl Args for GenerateArgs {
    fn augment_args(mut cmd: Command) -> Command {
        let defaults = GenerateParams::default();
        for &(name, help) in GenerateParams::options() {
            let help = format!("{} [default: {}]", help.trim(), defaults.get(name).unwrap_or_default());
            let mut arg = Arg::new(name).long(flag(name)).help(help).value_name("VALUE").allow_negative_numbers(true);
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
            if let (Some(values), Some(indices)) = (m.get_many::<String>(name), m.indices_of(name)) {
                given.extend(indices.zip(values).map(|(i, v)| (i, name, v.clone())));
            }
        }
        given.sort_by_key(|g| g.0);
        Ok(GenerateArgs(given.into_iter().map(|(_, n, v)| (n, v)).collect()))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}
