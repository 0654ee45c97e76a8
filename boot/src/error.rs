//! Errors as one line with their causes. Error messages in fuse say what failed and leave why
//! to `source()` (so `{:#}` of an `anyhow` chain prints each cause once); where an error becomes
//! a plain string (a `fuse verify` problem, a notice), [`with_causes`] keeps the why.

use std::error::Error;

/// `err` and each of its sources, joined by `": "` (what anyhow's `{:#}` prints).
pub fn with_causes(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot read the thing")]
    struct Outer(#[source] io::Error);

    #[test]
    fn test_causes_follow_the_message_once() {
        let err = Outer(io::Error::new(io::ErrorKind::NotFound, "entity not found"));
        assert_eq!(with_causes(&err), "Cannot read the thing: entity not found");
        assert_eq!(with_causes(&io::Error::other("alone")), "alone");
    }
}
