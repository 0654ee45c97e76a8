//! What an image is and where it lives: its manifest (and the configuration it records), the
//! local store, image names, the disk that is the image, and exports of it (and of a deployment's seed disk), and its SPDX bill of materials.

pub(crate) mod config;
pub(crate) mod disk;
pub(crate) mod export;
pub(crate) mod manifest;
pub(crate) mod naming;
pub(crate) mod sbom;
pub(crate) mod seed;
pub(crate) mod store;
