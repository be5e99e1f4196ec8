//! The `hopvm` binary: see [`hopvm::cli`]. Invoked through a link named `qemu-system-x86_64`
//! it speaks QEMU's command line instead ([`hopvm::qemu_cli`]).

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let status = match args.first() {
        Some(argv0) if hopvm::qemu_cli::invoked_as_qemu(argv0) => {
            let rest: Vec<String> = args[1..]
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            hopvm::qemu_cli::main(&rest)
        }
        _ => hopvm::cli::main_with_args(args),
    };
    std::process::exit(status);
}
