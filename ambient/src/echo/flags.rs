//! Command-line flags for `echo-server` and `echo-client`: `--flag value`, `--flag=value` and
//! positional arguments, with errors that name the flag.

use std::fmt::Display;
use std::str::FromStr;

/// Exit code for a command line that does not parse, as most Unix tools use.
pub const USAGE_EXIT_CODE: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("help requested")]
    Help,
    #[error("unknown flag {0}; see --help")]
    UnknownFlag(String),
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{0} takes no value")]
    UnexpectedValue(String),
    #[error("{flag} {value:?}: {reason}")]
    BadValue {
        flag: String,
        value: String,
        reason: String,
    },
    #[error("unexpected argument {0:?}; see --help")]
    UnexpectedArgument(String),
    #[error("{0}; see --help")]
    Invalid(String),
}

pub enum Arg<'a> {
    Flag(&'a str),
    Positional(&'a str),
}

pub struct Args<'a> {
    rest: std::slice::Iter<'a, String>,
    /// The flag and value of a `--flag=value` argument until the value is taken.
    inline: Option<(&'a str, &'a str)>,
}

impl<'a> Args<'a> {
    pub fn new(args: &'a [String]) -> Self {
        Args {
            rest: args.iter(),
            inline: None,
        }
    }

    pub fn next_arg(&mut self) -> Result<Option<Arg<'a>>, UsageError> {
        if let Some((flag, _)) = self.inline.take() {
            return Err(UsageError::UnexpectedValue(flag.to_owned()));
        }
        let Some(arg) = self.rest.next() else {
            return Ok(None);
        };
        if arg == "-h" || arg == "--help" {
            return Err(UsageError::Help);
        }
        if !arg.starts_with('-') || arg == "-" {
            return Ok(Some(Arg::Positional(arg)));
        }
        match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                self.inline = Some((flag, value));
                Ok(Some(Arg::Flag(flag)))
            }
            _ => Ok(Some(Arg::Flag(arg))),
        }
    }

    /// The value of the flag just returned by [`Args::next_arg`].
    pub fn value(&mut self, flag: &str) -> Result<&'a str, UsageError> {
        if let Some((_, value)) = self.inline.take() {
            return Ok(value);
        }
        self.rest
            .next()
            .map(String::as_str)
            .ok_or_else(|| UsageError::MissingValue(flag.to_owned()))
    }

    pub fn parse<T>(&mut self, flag: &str) -> Result<T, UsageError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let value = self.value(flag)?;
        value.parse().map_err(|e: T::Err| bad_value(flag, value, e))
    }
}

pub fn bad_value(flag: &str, value: &str, reason: impl Display) -> UsageError {
    UsageError::BadValue {
        flag: flag.to_owned(),
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_take_separate_or_inline_values() {
        let argv = strings(&["--port", "80", "--port=81", "url", "-H", "a: b"]);
        let mut args = Args::new(&argv);
        let mut seen = Vec::new();
        while let Some(arg) = args.next_arg().expect("valid command line") {
            match arg {
                Arg::Flag(flag) => {
                    seen.push(format!("{flag}={}", args.value(flag).expect("value")))
                }
                Arg::Positional(p) => seen.push(p.to_owned()),
            }
        }
        assert_eq!(seen, ["--port=80", "--port=81", "url", "-H=a: b"]);
    }

    #[test]
    fn mistakes_name_the_flag() {
        let argv = strings(&["--switch=on"]);
        let mut args = Args::new(&argv);
        assert!(matches!(args.next_arg(), Ok(Some(Arg::Flag("--switch")))));
        let err = args.next_arg().err().expect("a switch given a value");
        assert_eq!(err.to_string(), "--switch takes no value");

        let argv = strings(&["--port", "http"]);
        let mut args = Args::new(&argv);
        assert!(matches!(args.next_arg(), Ok(Some(Arg::Flag("--port")))));
        let err = args.parse::<u16>("--port").expect_err("not a number");
        assert_eq!(
            err.to_string(),
            r#"--port "http": invalid digit found in string"#
        );

        let argv = strings(&["--port"]);
        let mut args = Args::new(&argv);
        assert!(matches!(args.next_arg(), Ok(Some(Arg::Flag("--port")))));
        let err = args.parse::<u16>("--port").expect_err("no value");
        assert_eq!(err.to_string(), "--port needs a value");
    }
}
