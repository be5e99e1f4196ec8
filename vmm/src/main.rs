//! The `hopvm` binary: see [`vmm::cli`].

fn main() {
    std::process::exit(vmm::cli::main_with_args(std::env::args_os()));
}
