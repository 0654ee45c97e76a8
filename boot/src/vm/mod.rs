//! Boots an image under QEMU and passes the app's console output on, live.
//!
//! - `config`: what a VM is asked to be ([`VmConfig`], ports, firmware, accelerator choice);
//! - `tsc`: the host's TSC rate, which an x86_64 guest under TCG is told;
//! - `machine`: the QEMU binary and its command line per arch (q35 / virt);
//! - `process`: QEMU as a child process that dies with fuse and is always reaped;
//! - `passt`: the VM's network (passt, one per VM), published ports included;
//! - `accel`: KVM or TCG, decided by a cached probe VM;
//! - `session`: one run from spawn to exit ([`run`], [`run_controlled`]): console pump,
//!   graceful stop through QMP, how it ended.
//!
//! Each module imports only those listed before it (`machine` uses `config` and `tsc`; `accel` uses
//! `config`, `machine`, `process`; `passt` uses `config`, `machine`, `process`; `session` all
//! of them), so there is no import circle.

mod accel;
mod config;
mod machine;
mod passt;
mod process;
mod pvh;
mod session;
mod tsc;

pub use accel::{
    probe_accel, select_accel, AccelError, AccelSelection, ProbeVerdict, PROBE_TIMEOUT,
};
pub use config::{
    guest_forward_network, Accel, AccelChoice, Firmware, GuestForward, InvalidGuestForward,
    InvalidPortForward, Machine, PortForward, Proto, UnknownAccel, UnknownMachine, VmConfig,
};
pub use machine::{find_qemu, QemuMissing, VM_NAME_ARG};
pub use passt::{guest_network_up, PasstError};
pub use session::{
    run, run_controlled, run_with, CorruptVolume, Diagnostics, GuestNetwork, RunControl, RunError,
    Spawned, StopRequest, VmOutcome,
};
