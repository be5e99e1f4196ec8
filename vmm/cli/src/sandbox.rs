//! QEMU's `-sandbox on[,obsolete=deny][,elevateprivileges=deny][,spawn=deny]
//! [,resourcecontrol=deny]`: a seccomp filter over the whole process with QEMU's deny lists
//! (`softmmu/qemu-seccomp.c`). Always: the system calls no emulator needs (reboot, mount,
//! swapon, kexec_load, …) kill the process, as do calls of another ABI (x32, i386). On request:
//! obsolete calls kill it; privilege changes (setuid, setsid, …), new processes (fork, vfork,
//! execve, a clone without CLONE_THREAD; clone3 answers ENOSYS so that threads fall back to
//! clone) and scheduling changes fail with EPERM.

use crate::qemu_cli::QemuCliError;
use crate::qemu_domain::{option_map, Keys};

/// Which of QEMU's optional deny lists apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// `obsolete=deny`.
    pub obsolete: bool,
    /// `elevateprivileges=deny`.
    pub elevate_privileges: bool,
    /// `spawn=deny`.
    pub spawn: bool,
    /// `resourcecontrol=deny`.
    pub resource_control: bool,
}

/// Errors installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// prctl(PR_SET_NO_NEW_PRIVS) or seccomp(2) failed.
    #[error("failed to install seccomp syscall filter in the kernel: {0}")]
    Install(#[source] std::io::Error),
}

/// Parses `-sandbox`'s value: `None` for `off`.
pub fn parse(value: &str) -> Result<Option<Sandbox>, QemuCliError> {
    let opt = "-sandbox";
    let mut k = Keys::new(opt, option_map(opt, value, "enable")?);
    let on = k.bool("enable")?.unwrap_or(false);
    let deny = |k: &mut Keys<'_>, key: &str| -> Result<bool, QemuCliError> {
        match k.take(key).as_deref() {
            None | Some("allow") => Ok(false),
            Some("deny") => Ok(true),
            Some(other) => Err(QemuCliError::Invalid(
                format!("{opt} {value}"),
                format!("invalid argument for {key}: {other}"),
            )),
        }
    };
    let sandbox = Sandbox {
        obsolete: deny(&mut k, "obsolete")?,
        elevate_privileges: deny(&mut k, "elevateprivileges")?,
        spawn: deny(&mut k, "spawn")?,
        resource_control: deny(&mut k, "resourcecontrol")?,
    };
    k.finish()?;
    Ok(on.then_some(sandbox))
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const CLONE_THREAD: u32 = 0x0001_0000;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

// Offsets in struct seccomp_data.
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0: u32 = 16;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn nr(n: libc::c_long) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Sandbox {
    /// The system calls denied, each with its action.
    fn rules(&self) -> Vec<(u32, u32)> {
        let kill = libc::SECCOMP_RET_KILL_PROCESS;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let mut rules: Vec<(u32, u32)> = [
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_syslog,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_afs_syscall,
            libc::SYS_getpmsg,
            libc::SYS_putpmsg,
            libc::SYS_security,
            libc::SYS_tuxcall,
            libc::SYS_vserver,
        ]
        .iter()
        .map(|&n| (nr(n), kill))
        .collect();
        if self.obsolete {
            // create_module (174), get_kernel_syms (177) and query_module (178) are gone
            // from the kernel and from libc's list, not from the x86-64 table.
            for n in [
                libc::SYS__sysctl,
                174,
                177,
                178,
                libc::SYS_sysfs,
                libc::SYS_uselib,
                libc::SYS_ustat,
            ] {
                rules.push((nr(n), kill));
            }
        }
        if self.elevate_privileges {
            for n in [
                libc::SYS_setuid,
                libc::SYS_setgid,
                libc::SYS_setpgid,
                libc::SYS_setsid,
                libc::SYS_setreuid,
                libc::SYS_setregid,
                libc::SYS_setresuid,
                libc::SYS_setresgid,
                libc::SYS_setfsuid,
                libc::SYS_setfsgid,
            ] {
                rules.push((nr(n), eperm));
            }
        }
        if self.spawn {
            for n in [
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_execve,
                libc::SYS_execveat,
            ] {
                rules.push((nr(n), eperm));
            }
            // glibc falls back to clone(2) for threads, whose flags the filter can read.
            rules.push((
                nr(libc::SYS_clone3),
                libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            ));
        }
        if self.resource_control {
            for n in [
                libc::SYS_setpriority,
                libc::SYS_sched_setparam,
                libc::SYS_sched_setscheduler,
                libc::SYS_sched_setaffinity,
                libc::SYS_sched_setattr,
            ] {
                rules.push((nr(n), eperm));
            }
        }
        rules
    }

    /// The BPF program.
    fn program(&self) -> Vec<libc::sock_filter> {
        let kill = libc::SECCOMP_RET_KILL_PROCESS;
        let allow = libc::SECCOMP_RET_ALLOW;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let mut p = vec![
            stmt(LD_W_ABS, ARCH),
            jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
            stmt(RET_K, kill),
            stmt(LD_W_ABS, NR),
            jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
            stmt(RET_K, kill),
        ];
        for (n, action) in self.rules() {
            p.push(jump(JEQ_K, n, 0, 1));
            p.push(stmt(RET_K, action));
        }
        if self.spawn {
            // clone without CLONE_THREAD makes a process.
            p.push(jump(JEQ_K, nr(libc::SYS_clone), 0, 4));
            p.push(stmt(LD_W_ABS, ARG0));
            p.push(jump(JSET_K, CLONE_THREAD, 1, 0));
            p.push(stmt(RET_K, eperm));
            p.push(stmt(RET_K, allow));
        }
        p.push(stmt(RET_K, allow));
        p
    }

    /// Installs the filter on every thread of the process (and all later ones), for good.
    pub fn install(&self) -> Result<(), SandboxError> {
        let mut program = self.program();
        let fprog = libc::sock_fprog {
            len: u16::try_from(program.len()).unwrap_or(u16::MAX),
            filter: program.as_mut_ptr(),
        };
        // SAFETY: prctl with constant arguments; it only sets a flag of this process.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(SandboxError::Install(std::io::Error::last_os_error()));
        }
        // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_TSYNC,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(SandboxError::Install(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libvirts_value() {
        let s = parse("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
            .unwrap()
            .unwrap();
        assert!(s.obsolete && s.elevate_privileges && s.spawn && s.resource_control);
        assert_eq!(parse("off").unwrap(), None);
        assert_eq!(parse("on").unwrap(), Some(Sandbox::default()));
        assert!(parse("on,spawn=maybe").is_err());
        assert!(parse("on,what=deny").is_err());
    }

    /// In a child process: with spawn=deny a fork fails with EPERM, threads still start,
    /// and with elevateprivileges=deny setsid fails with EPERM.
    #[test]
    fn filter_denies_in_a_child() {
        let sandbox = Sandbox {
            spawn: true,
            elevate_privileges: true,
            obsolete: true,
            resource_control: true,
        };
        // SAFETY: the child only makes system calls and exits; the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                if sandbox.install().is_err() {
                    return 10;
                }
                // SAFETY: fork is expected to fail under the filter.
                let f = unsafe { libc::fork() };
                if f == 0 {
                    // SAFETY: leaving a child that should not exist.
                    unsafe { libc::_exit(0) };
                }
                if f != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
                    return 11;
                }
                // SAFETY: setsid is expected to fail under the filter.
                if unsafe { libc::setsid() } != -1 {
                    return 12;
                }
                if std::thread::spawn(|| 7).join().ok() != Some(7) {
                    return 13;
                }
                0
            })();
            // SAFETY: ends the child without running the test harness's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child started above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
