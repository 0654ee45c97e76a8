fn main() {
    std::process::exit(fuse_packager::main());
}
