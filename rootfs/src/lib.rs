//! Root-filesystem assembly for fuse images: the ELF dependency closure of a program, the tree
//! of files an image holds, and deterministic writers for that tree (squashfs for the root
//! filesystem, cpio for the initramfs) and the
//! dm-verity hash tree over the root filesystem. Same tree in, same bytes out.

pub mod arch;
pub mod block_cache;
pub mod cpio;
pub mod elf;
pub mod squashfs;
pub mod times;
pub mod tree;
pub mod verity;

pub use arch::Arch;
pub use cpio::write_newc;
pub use elf::{
    add_with_closure, inspect, resolve_closure, Closure, ClosureOptions, ElfInfo, Library,
};
pub use squashfs::{write_squashfs, BranchFilter, Compression, SquashfsOptions};
pub use tree::{FileSource, Node, Tree};
