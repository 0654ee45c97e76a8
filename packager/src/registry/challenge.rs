//! `WWW-Authenticate` challenges (RFC 7235): `Basic realm="x"`, `Bearer realm="https://auth/token",
//! service="reg",scope="repository:a/b:pull"`. Quoted values may hold commas and escapes.

use std::collections::BTreeMap;

/// One challenge: its scheme (lowercase) and parameters (keys lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) scheme: String,
    pub(crate) params: BTreeMap<String, String>,
}

/// Every challenge in a header value, in order; unparseable rest is dropped.
pub(crate) fn parse(header: &str) -> Vec<Challenge> {
    let mut challenges: Vec<Challenge> = Vec::new();
    let mut chars = header.chars().peekable();
    let skip = |chars: &mut std::iter::Peekable<std::str::Chars>, set: &[char]| {
        while chars.peek().is_some_and(|c| set.contains(c)) {
            chars.next();
        }
    };
    let token = |chars: &mut std::iter::Peekable<std::str::Chars>| {
        let mut t = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() || c == ',' || c == '=' {
                break;
            }
            t.push(c);
            chars.next();
        }
        t
    };
    loop {
        skip(&mut chars, &[' ', '\t', ',']);
        let word = token(&mut chars);
        if word.is_empty() {
            break;
        }
        if chars.peek() == Some(&'=') {
            // A parameter of the current challenge (or token68 padding, ignored).
            chars.next();
            let value = if chars.peek() == Some(&'"') {
                chars.next();
                let mut v = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                v.push(n);
                            }
                        }
                        '"' => break,
                        _ => v.push(c),
                    }
                }
                v
            } else {
                token(&mut chars)
            };
            if let Some(current) = challenges.last_mut() {
                current.params.insert(word.to_ascii_lowercase(), value);
            }
        } else {
            challenges.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    challenges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_challenges_parse_with_quoted_commas() {
        let c = parse(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:team/shop:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.example.com/token");
        assert_eq!(c[0].params["service"], "registry.example.com");
        assert_eq!(c[0].params["scope"], "repository:team/shop:pull,push");

        let c = parse(
            r#"Basic realm="Registry \"Realm\"", Bearer realm=https://a/t, error=invalid_token"#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "Registry \"Realm\"");
        assert_eq!(c[1].params["realm"], "https://a/t");
        assert_eq!(c[1].params["error"], "invalid_token");

        assert_eq!(parse("BASIC").len(), 1);
        assert!(parse("").is_empty());
        assert!(parse("  ,, ").is_empty());
    }
}
