//! `--env-file FILE`: variables in the dotenv format, injected at run like `-e`.
//!
//! One `KEY=VALUE` a line; blank lines and lines starting with `#` are skipped; `export KEY=...`
//! is accepted (so the file can be sourced by a shell too). Values:
//! - unquoted: up to an inline ` #` comment, surrounding whitespace trimmed;
//! - `'single quoted'`: taken literally;
//! - `"double quoted"`: with the escapes `\n`, `\t`, `\r`, `\"`, `\\` and `\$`.
//!
//! No variable expansion and no multi-line values: what is in the file is what the app gets.
//! A leading UTF-8 byte-order mark (editors on Windows write one) is skipped, as Docker's
//! `--env-file` does; a NUL byte is refused (execve could not pass it).
//! Errors are one line, `FILE:LINE: what is wrong`.

use crate::image::config::check_env_name;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Reads and parses a dotenv file.
pub(crate) fn load(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Cannot read the env file {}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// Parses dotenv text; `origin` names it in errors. Later lines win over earlier ones.
pub(crate) fn parse(text: &str, origin: &str) -> Result<Vec<(String, String)>> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, line) in text.lines().enumerate() {
        let at = || format!("{origin}:{}", index + 1);
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let body = trimmed
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(trimmed);
        let Some((key, raw_value)) = body.split_once('=') else {
            bail!("{}: expected KEY=VALUE, found '{trimmed}'", at());
        };
        let key = key.trim();
        if let Err(why) = check_env_name(key) {
            bail!("{}: {why}", at());
        }
        let value = parse_value(raw_value.trim_start())
            .map_err(|why| anyhow::anyhow!("{}: {why}", at()))?;
        if value.contains('\0') {
            bail!("{}: the value of {key} contains a NUL byte", at());
        }
        match vars.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => vars.push((key.to_string(), value)),
        }
    }
    Ok(vars)
}

fn parse_value(raw: &str) -> std::result::Result<String, String> {
    let mut chars = raw.chars();
    let (value, rest) = match chars.next() {
        Some('\'') => {
            let body = chars.as_str();
            let end = body
                .find('\'')
                .ok_or("the single quote is not closed (values are one line)")?;
            (body[..end].to_string(), &body[end + 1..])
        }
        Some('"') => {
            let mut value = String::new();
            let mut closed = None;
            let body = chars.as_str();
            let mut iter = body.char_indices();
            while let Some((i, c)) = iter.next() {
                match c {
                    '"' => {
                        closed = Some(i + 1);
                        break;
                    }
                    '\\' => {
                        let (_, escaped) = iter.next().ok_or("a \\ ends the line")?;
                        value.push(match escaped {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            '"' | '\\' | '$' => escaped,
                            other => {
                                return Err(format!(
                                    "unknown escape \\{other} (use \\\\ for a backslash)"
                                ))
                            }
                        });
                    }
                    c => value.push(c),
                }
            }
            let end = closed.ok_or("the double quote is not closed (values are one line)")?;
            (value, &body[end..])
        }
        _ => {
            // An unquoted value ends at a comment: `#` after whitespace.
            let end = raw
                .char_indices()
                .find(|&(i, c)| c == '#' && i > 0 && raw[..i].ends_with(char::is_whitespace))
                .map(|(i, _)| i)
                .unwrap_or(raw.len());
            return Ok(raw[..end].trim_end().to_string());
        }
    };
    let rest = rest.trim_start();
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err(format!("unexpected '{rest}' after the quoted value"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_common_forms() {
        let text = "\
# comment
PLAIN=value
SPACED = some value   # trailing comment
export EXPORTED=1
EMPTY=
HASH=a#b
SINGLE='literal $HOME \\n # not a comment'
DOUBLE=\"line\\nnext \\\"quoted\\\" \\$x\"  # comment
EQUALS=a=b=c

PLAIN=overridden
";
        let vars = parse(text, "prod.env").unwrap();
        let get = |k: &str| vars.iter().find(|(key, _)| key == k).unwrap().1.clone();
        assert_eq!(get("PLAIN"), "overridden");
        assert_eq!(get("SPACED"), "some value");
        assert_eq!(get("EXPORTED"), "1");
        assert_eq!(get("EMPTY"), "");
        assert_eq!(get("HASH"), "a#b");
        assert_eq!(get("SINGLE"), "literal $HOME \\n # not a comment");
        assert_eq!(get("DOUBLE"), "line\nnext \"quoted\" $x");
        assert_eq!(get("EQUALS"), "a=b=c");
        assert_eq!(vars[0].0, "PLAIN", "order of first appearance is kept");
        assert_eq!(vars.len(), 8);
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let vars = parse("\u{feff}KEY=1\n", "bom.env").unwrap();
        assert_eq!(vars, [("KEY".to_string(), "1".to_string())]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let cases = [
            ("OK=1\nno equals here\n", "x.env:2: expected KEY=VALUE"),
            ("=value\n", "x.env:1: the variable name is empty"),
            ("BAD KEY=1\n", "x.env:1: variable name 'BAD KEY'"),
            ("A='open\n", "x.env:1: the single quote is not closed"),
            ("A=\"open\n", "x.env:1: the double quote is not closed"),
            ("A=\"x\" y\n", "x.env:1: unexpected 'y'"),
            ("A=\"\\q\"\n", "x.env:1: unknown escape \\q"),
            ("FUSE_ENV=prod\n", "x.env:1: FUSE_ENV is set by fuse"),
            (
                "A=1\nB=x\0y\n",
                "x.env:2: the value of B contains a NUL byte",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text, "x.env").unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
