//! Exit codes, decided from the typed error in one place.

use fuse_boot::vm::RunError;

/// Exit codes a shell user expects: 124 for a timeout (like timeout(1)); when a stop signal
/// killed the VM, 128 + the signal for a forced stop (130 for a second Ctrl-C) and 137 (as if
/// SIGKILLed) when the app outlived the grace period; 74 when the image's root failed dm-verity
/// verification (`EXIT_INTEGRITY`); 1 for every other error. An app that
/// ran to its end (or stopped in time) reports its own code, without an error.
pub(super) fn code_of(err: &anyhow::Error) -> i32 {
    match err.chain().find_map(|e| e.downcast_ref::<RunError>()) {
        Some(RunError::Timeout { .. }) => 124,
        Some(RunError::Interrupted { signal }) => 128 + signal,
        Some(RunError::StopTimeout { .. }) => 128 + libc::SIGKILL,
        Some(RunError::Integrity { .. }) => i32::from(fuse_boot::spec::EXIT_INTEGRITY),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::time::Duration;

    #[test]
    fn codes_come_from_the_runner_error_anywhere_in_the_chain() {
        let timeout: anyhow::Result<()> = Err(RunError::Timeout {
            timeout: Duration::from_secs(5),
            diagnostics: Default::default(),
        })
        .context("Image hello:1.0 did not run to completion");
        assert_eq!(code_of(&timeout.unwrap_err()), 124);
        let interrupted = anyhow::Error::new(RunError::Interrupted { signal: 2 });
        assert_eq!(code_of(&interrupted), 130);
        let corrupt = anyhow::Error::new(RunError::Integrity {
            block: Some(3),
            volume: None,
        });
        assert_eq!(code_of(&corrupt), 74);
        assert_eq!(code_of(&anyhow::anyhow!("No image 'x' in the store")), 1);
    }
}
