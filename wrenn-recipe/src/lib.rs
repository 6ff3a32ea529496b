//! Template recipes.
//!
//! A recipe is a base template and ordered steps, one instruction per line:
//!
//! ```text
//! RUN [--timeout=<duration>] [--user=<name>] <shell command>
//! ENV <key>=<value> [<key>=<value> …]
//! WORKDIR <path>
//! USER <name>
//! COPY [--chown=<user>] [--chmod=<octal mode>] <src> [<src> …] <dst>
//! START <shell command>
//! ```
//!
//! and an optional readiness check, `[--interval=3s] [--timeout=10s]
//! [--start-period=0s] [--retries=0] (--port=<port> | <shell command>)`. A recipe file
//! (what `wrenn template build FILE` reads) adds `FROM <template or image>` and
//! `HEALTHCHECK <check>` lines, `#` comments and `\` line continuations. A `FROM`
//! naming a registry, tag or digest (`python:3.12`, `ghcr.io/org/app`,
//! `app@sha256:…`) is a container image ([`is_image_reference`]); a bare name is a
//! template.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Time a `RUN` step may take unless it says otherwise.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest time one step may be given.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most steps in one recipe.
pub const MAX_STEPS: usize = 256;

/// One instruction of a recipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Step {
    /// A shell command that must exit 0 within `timeout`, as `user` when given (else
    /// as the current user).
    Run {
        cmd: String,
        timeout: Duration,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Environment of the following steps and of the template's processes.
    Env { vars: Vec<(String, String)> },
    /// Working directory of the following steps and of the template's processes
    /// (created if missing).
    Workdir { path: String },
    /// User of the following steps and the template's default user.
    User { name: String },
    /// Files uploaded with the build, copied into the capsule, owned by `owner` (else
    /// the current user) and with permissions `mode` (else as uploaded).
    Copy {
        srcs: Vec<String>,
        dst: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// A command started in the background that keeps running in the template.
    Start { cmd: String },
}

impl Step {
    /// The instruction's keyword.
    pub fn keyword(&self) -> &'static str {
        match self {
            Step::Run { .. } => "RUN",
            Step::Env { .. } => "ENV",
            Step::Workdir { .. } => "WORKDIR",
            Step::User { .. } => "USER",
            Step::Copy { .. } => "COPY",
            Step::Start { .. } => "START",
        }
    }
}

/// What "ready" means for a template's start command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Check {
    /// A shell command exits 0.
    Command { cmd: String },
    /// Something accepts TCP connections on this guest port.
    Port { port: u16 },
}

/// A readiness check, retried until it passes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    pub check: Check,
    /// Time between attempts.
    pub interval: Duration,
    /// Time one attempt may take.
    pub timeout: Duration,
    /// Failures in this first period do not count towards `retries`.
    pub start_period: Duration,
    /// Failed attempts allowed after the start period; 0 = until the build's time
    /// limit.
    pub retries: u32,
}

/// Whether a `FROM` names a container image rather than a template: template names
/// have no `/`, `:` or `@`.
pub fn is_image_reference(base: &str) -> bool {
    base.contains(['/', ':', '@'])
}

/// A recipe file: base template, steps and readiness check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipeFile {
    pub base: Option<String>,
    /// The step lines as written (continuations joined), for the API.
    pub lines: Vec<String>,
    pub steps: Vec<Step>,
    /// The readiness check as written.
    pub healthcheck_line: Option<String>,
    pub healthcheck: Option<Healthcheck>,
}

/// What is wrong with a recipe.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RecipeError {
    /// 1-based line (of the recipe array, or of the file).
    pub line: usize,
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> RecipeError {
    RecipeError {
        line,
        message: message.into(),
    }
}

/// Parses a duration: `30s`, `5m`, `1h30m`, `500ms`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Splits a leading `--name=value` option off `rest`.
fn take_option(rest: &str) -> Option<(&str, &str, &str)> {
    let rest = rest.trim_start();
    let opt = rest.strip_prefix("--")?;
    let end = opt.find(char::is_whitespace).unwrap_or(opt.len());
    let (word, after) = opt.split_at(end);
    let (name, value) = word.split_once('=')?;
    Some((name, value, after))
}

fn is_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn is_user_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !n.starts_with('-')
}

/// Checks a path given to `WORKDIR` or as a `COPY` destination.
fn check_guest_path(line: usize, p: &str) -> Result<(), RecipeError> {
    if p.is_empty() || p.contains('\0') {
        return Err(err(line, "empty path"));
    }
    Ok(())
}

/// Checks a `COPY` source: a relative path inside the build's files.
fn check_source(line: usize, p: &str) -> Result<(), RecipeError> {
    if p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(err(
            line,
            format!("COPY source {p:?} must be a relative path inside the build's files"),
        ));
    }
    Ok(())
}

/// Parses one step line (`line` is its number, for errors).
pub fn parse_step(line: usize, text: &str) -> Result<Step, RecipeError> {
    let text = text.trim();
    let (word, rest) = match text.find(char::is_whitespace) {
        Some(i) => (&text[..i], text[i..].trim()),
        None => (text, ""),
    };
    let need = |what: &str| {
        if rest.is_empty() {
            Err(err(line, format!("{} needs {what}", word.to_uppercase())))
        } else {
            Ok(())
        }
    };
    match word.to_ascii_uppercase().as_str() {
        "RUN" => {
            let mut timeout = DEFAULT_STEP_TIMEOUT;
            let mut user = None;
            let mut cmd = rest;
            while let Some((name, value, after)) = take_option(cmd) {
                match name {
                    "user" => {
                        if !is_user_name(value) {
                            return Err(err(line, format!("invalid user name {value:?}")));
                        }
                        user = Some(value.to_string());
                    }
                    "timeout" => {
                        timeout = parse_duration(value).map_err(|e| err(line, e))?;
                        if timeout.is_zero() || timeout > MAX_STEP_TIMEOUT {
                            return Err(err(
                                line,
                                format!(
                                    "RUN --timeout must be between 1s and {}s",
                                    MAX_STEP_TIMEOUT.as_secs()
                                ),
                            ));
                        }
                    }
                    other => return Err(err(line, format!("RUN has no option --{other}"))),
                }
                cmd = after.trim();
            }
            if cmd.is_empty() {
                return Err(err(line, "RUN needs a command"));
            }
            Ok(Step::Run {
                cmd: cmd.to_string(),
                timeout,
                user,
            })
        }
        "START" => {
            need("a command")?;
            Ok(Step::Start {
                cmd: rest.to_string(),
            })
        }
        "ENV" => {
            need("KEY=value")?;
            let words = shell_words::split(rest).map_err(|e| err(line, format!("ENV: {e}")))?;
            let mut vars = Vec::new();
            for w in words {
                let (k, v) = w
                    .split_once('=')
                    .ok_or_else(|| err(line, format!("ENV takes KEY=value, got {w:?}")))?;
                if !is_env_name(k) {
                    return Err(err(
                        line,
                        format!("invalid environment variable name {k:?}"),
                    ));
                }
                vars.push((k.to_string(), v.to_string()));
            }
            Ok(Step::Env { vars })
        }
        "WORKDIR" => {
            need("a path")?;
            check_guest_path(line, rest)?;
            Ok(Step::Workdir {
                path: rest.to_string(),
            })
        }
        "USER" => {
            need("a user name")?;
            if !is_user_name(rest) {
                return Err(err(line, format!("invalid user name {rest:?}")));
            }
            Ok(Step::User {
                name: rest.to_string(),
            })
        }
        "COPY" => {
            let (mut owner, mut mode) = (None, None);
            let mut rest = rest;
            while let Some((name, value, after)) = take_option(rest) {
                match name {
                    "chown" => {
                        if !is_user_name(value) {
                            return Err(err(line, format!("invalid user name {value:?}")));
                        }
                        owner = Some(value.to_string());
                    }
                    "chmod" => {
                        mode = Some(
                            u32::from_str_radix(value, 8)
                                .ok()
                                .filter(|m| *m <= 0o7777)
                                .ok_or_else(|| {
                                    err(
                                        line,
                                        format!("COPY --chmod takes an octal mode, got {value:?}"),
                                    )
                                })?,
                        );
                    }
                    other => return Err(err(line, format!("COPY has no option --{other}"))),
                }
                rest = after.trim();
            }
            let mut words =
                shell_words::split(rest).map_err(|e| err(line, format!("COPY: {e}")))?;
            if words.len() < 2 {
                return Err(err(
                    line,
                    "COPY needs at least one source and a destination",
                ));
            }
            let dst = words.pop().unwrap_or_default();
            check_guest_path(line, &dst)?;
            for s in &words {
                check_source(line, s)?;
            }
            Ok(Step::Copy {
                srcs: words,
                dst,
                owner,
                mode,
            })
        }
        "" => Err(err(line, "empty step")),
        other => Err(err(
            line,
            format!("unknown instruction {other:?} (RUN, ENV, WORKDIR, USER, COPY or START)"),
        )),
    }
}

/// Parses the steps of a recipe given as lines (the API's `recipe` array).
pub fn parse_steps<S: AsRef<str>>(lines: &[S]) -> Result<Vec<Step>, RecipeError> {
    if lines.len() > MAX_STEPS {
        return Err(err(
            MAX_STEPS + 1,
            format!("a recipe has at most {MAX_STEPS} steps"),
        ));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| parse_step(i + 1, l.as_ref()))
        .collect()
}

/// Parses a readiness check.
pub fn parse_healthcheck(text: &str) -> Result<Healthcheck, String> {
    let mut hc = Healthcheck {
        check: Check::Command { cmd: String::new() },
        interval: Duration::from_secs(3),
        timeout: Duration::from_secs(10),
        start_period: Duration::ZERO,
        retries: 0,
    };
    let mut rest = text.trim();
    let mut port = None;
    while let Some((name, value, after)) = take_option(rest) {
        match name {
            "interval" => hc.interval = parse_duration(value)?,
            "timeout" => hc.timeout = parse_duration(value)?,
            "start-period" => hc.start_period = parse_duration(value)?,
            "retries" => {
                hc.retries = value
                    .parse()
                    .map_err(|_| format!("--retries takes a number, got {value:?}"))?
            }
            "port" => {
                port = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("--port takes a port number, got {value:?}"))?,
                )
            }
            other => return Err(format!("the readiness check has no option --{other}")),
        }
        rest = after.trim();
    }
    if hc.interval.is_zero() || hc.timeout.is_zero() {
        return Err("--interval and --timeout must be above zero".into());
    }
    hc.check = match (port, rest.is_empty()) {
        (Some(port), true) => Check::Port { port },
        (None, false) => Check::Command {
            cmd: rest.to_string(),
        },
        (Some(_), false) => {
            return Err("the readiness check is either --port=N or a command, not both".into())
        }
        (None, true) => return Err("the readiness check needs --port=N or a command".into()),
    };
    Ok(hc)
}

/// Parses a recipe file.
pub fn parse_file(text: &str) -> Result<RecipeFile, RecipeError> {
    let mut out = RecipeFile {
        base: None,
        lines: Vec::new(),
        steps: Vec::new(),
        healthcheck_line: None,
        healthcheck: None,
    };
    let mut pending = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if pending.is_empty() {
            start = n;
            let t = raw.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
        }
        match raw.trim_end().strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            None => pending.push_str(raw),
        }
        let line = std::mem::take(&mut pending);
        let t = line.trim();
        let (word, rest) = match t.find(char::is_whitespace) {
            Some(i) => (&t[..i], t[i..].trim()),
            None => (t, ""),
        };
        match word.to_ascii_uppercase().as_str() {
            "FROM" => {
                if out.base.is_some() || !out.steps.is_empty() {
                    return Err(err(start, "FROM comes once, before the steps"));
                }
                if rest.is_empty() || rest.contains(char::is_whitespace) {
                    return Err(err(start, "FROM takes one template name or image"));
                }
                out.base = Some(rest.to_string());
            }
            "HEALTHCHECK" => {
                if out.healthcheck.is_some() {
                    return Err(err(start, "only one HEALTHCHECK"));
                }
                out.healthcheck = Some(parse_healthcheck(rest).map_err(|e| err(start, e))?);
                out.healthcheck_line = Some(rest.to_string());
            }
            _ => {
                out.steps.push(parse_step(start, t)?);
                out.lines.push(t.to_string());
            }
        }
    }
    if !pending.is_empty() {
        return Err(err(start, "the file ends inside a continued line"));
    }
    if out.steps.len() > MAX_STEPS {
        return Err(err(
            start,
            format!("a recipe has at most {MAX_STEPS} steps"),
        ));
    }
    Ok(out)
}

/// Whether uploaded file `path` is covered by `COPY` source `src`, and where it sits
/// under it: `Some("")` when it is the source itself, `Some(rel)` when it is at `rel`
/// inside the source directory (`.` is the whole upload), `None` when not copied.
pub fn copy_relative<'a>(src: &str, path: &'a str) -> Option<&'a str> {
    let src = src.trim_end_matches('/');
    if src.is_empty() || src == "." {
        return Some(path).filter(|p| !p.is_empty());
    }
    if path == src {
        return Some("");
    }
    path.strip_prefix(src)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|rel| !rel.is_empty())
}

/// Joins `path` to working directory `cwd` (guest paths, POSIX).
pub fn resolve(cwd: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{}", cwd.trim_end_matches('/'), path)
    }
}

#[cfg(test)]
mod tests;
