//! The `hopvm` binary: see [`hopvm::cli`]. Invoked through a link named `qemu-system-x86_64`
//! it speaks QEMU's command line instead ([`hopvm::qemu_cli`]).

fn main() {
    // Before anything opens a descriptor: what is open now was handed over by the parent,
    // and only those can be named as `fd:N` (monitor-passed ones go by name, `getfd`).
    migration::transport::record_inherited_fds();
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
