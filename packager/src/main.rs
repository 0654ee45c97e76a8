fn main() {
    std::process::exit(fuse_packager::cli::main());
}
