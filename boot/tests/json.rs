//! The init's JSON parser (`boot/init/json.c`), which reads user-data a cloud hands over,
//! compiled for the host with a small driver that prints the tree it parsed, or its error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Prints a parsed document canonically: strings as `"..."` with bytes below 0x20 or above
/// 0x7e in `\xNN` form, numbers as their text, objects `{k:v,...}`, arrays `[v,...]`.
const DRIVER: &str = r#"
#include "init.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
void *xmalloc(size_t n) { void *p = malloc(n ? n : 1); if (!p) abort(); return p; }
void *xrealloc(void *p, size_t n) { p = realloc(p, n ? n : 1); if (!p) abort(); return p; }
static void str(const char *s) {
    putchar('"');
    for (const unsigned char *c = (const unsigned char *)s; *c; c++)
        if (*c < 0x20 || *c > 0x7e || *c == '"' || *c == '\\') printf("\\x%02x", *c);
        else putchar(*c);
    putchar('"');
}
static void dump(const struct json *j) {
    switch (j->type) {
    case JSON_NULL: printf("null"); break;
    case JSON_BOOL: printf(j->boolean ? "true" : "false"); break;
    case JSON_NUMBER: printf("%s", j->str); break;
    case JSON_STRING: str(j->str); break;
    case JSON_ARRAY: case JSON_OBJECT:
        putchar(j->type == JSON_ARRAY ? '[' : '{');
        for (size_t i = 0; i < j->n; i++) {
            if (i) putchar(',');
            if (j->keys) { str(j->keys[i]); putchar(':'); }
            dump(j->items[i]);
        }
        putchar(j->type == JSON_ARRAY ? ']' : '}');
    }
}
int main(void) {
    static char buf[1 << 20];
    size_t len = fread(buf, 1, sizeof buf, stdin);
    char err[256];
    struct json *j = json_parse(buf, len, err, sizeof err);
    if (!j) { printf("error: %s", err); return 1; }
    dump(j);
    json_free(j);
    return 0;
}
"#;

/// The driver, built once per test run.
fn driver() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("init");
        let dir = std::env::temp_dir().join(format!("fuse-json-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("driver.c"), DRIVER).unwrap();
        let bin = dir.join("driver");
        let status = Command::new("cc")
            .args([
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-fsanitize=address,undefined",
            ])
            .arg("-I")
            .arg(&init)
            .arg(init.join("json.c"))
            .arg(dir.join("driver.c"))
            .arg("-o")
            .arg(&bin)
            .status()
            .expect("cc");
        assert!(status.success(), "the driver does not build");
        bin
    })
}

fn parse(text: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new(driver())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text).unwrap();
    let out = child.wait_with_output().unwrap();
    // A sanitizer report (memory error, leak, undefined behaviour) fails the test.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn user_data_parses_into_its_tree() {
    assert_eq!(
        parse(br#" {"fuse": 1, "environment": "prod", "env": {"A": "x=y", "B": ""}, "args": ["-v", "two words"]} "#),
        r#"{"fuse":1,"environment":"prod","env":{"A":"x=y","B":""},"args":["-v","two words"]}"#
    );
    assert_eq!(
        parse(b"[true,false,null,-0.5e+3,0,[],{}]"),
        "[true,false,null,-0.5e+3,0,[],{}]"
    );
}

#[test]
fn escapes_decode_to_utf8() {
    // \n, \", \\, \/, \t, a two-byte and a three-byte character, and a surrogate pair (U+1F600).
    assert_eq!(
        parse(br#""a\nb\"c\\d\/e\tf\u00e9\u20ac\ud83d\ude00""#),
        r#""a\x0ab\x22c\x5cd/e\x09f\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80""#
    );
    // Raw UTF-8 passes through.
    assert_eq!(parse("\"é\"".as_bytes()), r#""\xc3\xa9""#);
}

#[test]
fn invalid_documents_are_refused_with_a_reason() {
    let cases: [(&[u8], &str); 14] = [
        (b"", "a value is missing"),
        (b"{", "an object key is not a string"),
        (b"{\"a\" 1}", "':' expected after the key \"a\""),
        (b"{\"a\":1,}", "an object key is not a string"),
        (b"[1 2]", "',' or ']' expected"),
        (b"\"abc", "a string is not closed"),
        (b"\"a\x01\"", "raw control character (0x01)"),
        (br#""\u0000""#, "\\u0000"),
        (br#""\ud83d""#, "invalid escape"),
        (br#""\ude00""#, "invalid escape"),
        (br#""\x""#, "invalid escape"),
        (b"01", "text follows the value"),
        (b"{} {}", "text follows the value"),
        (b"tru", "unexpected character 't'"),
    ];
    for (text, reason) in cases {
        let out = parse(text);
        assert!(
            out.starts_with("error: ") && out.contains(reason),
            "{:?}: {out}",
            String::from_utf8_lossy(text)
        );
    }
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    assert!(parse(
        &[b'['; 31]
            .iter()
            .chain([b']'; 31].iter())
            .copied()
            .collect::<Vec<_>>()
    )
    .starts_with("[[["));
    let deep: Vec<u8> = std::iter::repeat_n(b'[', 100_000).collect();
    assert!(parse(&deep).contains("nested deeper than 32 levels"));
}

#[test]
fn duplicate_keys_keep_the_last_and_truncated_input_is_refused() {
    // json_get's rule; the tree keeps both, in order.
    assert_eq!(parse(br#"{"a":1,"a":2}"#), r#"{"a":1,"a":2}"#);
    for cut in 1..br#"{"fuse":1,"env":{"K":"V\u00e9"}}"#.len() {
        let text = &br#"{"fuse":1,"env":{"K":"V\u00e9"}}"#[..cut];
        assert!(
            parse(text).starts_with("error: "),
            "{:?}",
            String::from_utf8_lossy(text)
        );
    }
}
