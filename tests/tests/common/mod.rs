//! Shared by the integration tests: a private fuse home per test, and small C programs.

#![allow(dead_code)]

use fuse_tests::{FuseCmd, TestDir};
use std::path::PathBuf;
use std::time::Duration;

/// A test's own image store (FUSE_HOME); the kernel cache is shared, so it is built once.
#[derive(Debug)]
pub struct Sandbox {
    pub dir: TestDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: TestDir::new(),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    /// `fuse` with this sandbox's store. Boots under TCG are slow: allow for it.
    pub fn fuse(&self) -> FuseCmd {
        FuseCmd::new()
            .env("FUSE_HOME", self.home())
            .timeout(Duration::from_secs(300))
    }

    /// Compiles a C program into the sandbox.
    pub fn program(&self, src: &str, name: &str, extra_args: &[&str]) -> PathBuf {
        self.dir.compile_c(src, name, extra_args)
    }
}

pub const HELLO: &str = r#"
#include <stdio.h>
int main(void) { printf("hello from the guest\n"); return 0; }
"#;

pub const EXIT_7: &str = r#"
#include <stdio.h>
int main(void) { printf("about to exit 7\n"); return 7; }
"#;

pub const NEVER_EXITS: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("running forever\n"); fflush(stdout); for (;;) pause(); }
"#;
