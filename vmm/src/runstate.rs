//! The VM's run state, with QEMU's names, as `query-status` reports it.

use serde::Serialize;

/// What the VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Built, vCPUs not yet started (`--paused` without `--incoming`).
    Prelaunch,
    /// vCPUs running.
    Running,
    /// Stopped by `stop` (or `--paused` after an incoming migration).
    Paused,
    /// Waiting for or loading an incoming migration.
    Inmigrate,
    /// The migration's final stage: vCPUs stopped, the rest of the state being sent.
    FinishMigrate,
    /// The outgoing migration completed; the guest now runs on the destination.
    Postmigrate,
    /// Suspended to RAM (ACPI S3), waiting for a wake event.
    Suspended,
    /// The guest is being shut down.
    Shutdown,
    /// A vCPU failed.
    InternalError,
}

impl RunState {
    /// QEMU's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Inmigrate => "inmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::Postmigrate => "postmigrate",
            Self::Suspended => "suspended",
            Self::Shutdown => "shutdown",
            Self::InternalError => "internal-error",
        }
    }

    /// Whether `cont` may start the vCPUs from this state (QEMU refuses in `inmigrate`, and
    /// lets `postmigrate` run again only as a fresh start).
    pub fn can_continue(self) -> bool {
        matches!(self, Self::Prelaunch | Self::Paused | Self::Postmigrate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_qemu() {
        assert_eq!(RunState::FinishMigrate.as_str(), "finish-migrate");
        assert_eq!(
            serde_json::to_value(RunState::InternalError).unwrap(),
            "internal-error"
        );
        assert!(!RunState::Inmigrate.can_continue());
        assert!(RunState::Paused.can_continue());
    }
}
