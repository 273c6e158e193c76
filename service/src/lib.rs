//! What the Pilot daemons (`pilotd`, `pilot-registry`, `pilot-beacon`) and `pilotctl` share to
//! run as system services and to be packaged:
//!
//! - [`notify`]: the systemd readiness protocol (`READY=1`, `STATUS=`, `STOPPING=1`) on
//!   `$NOTIFY_SOCKET`; a no-op when the process does not run under a service manager.
//! - [`config_file`]: a JSON config file whose keys are the long flag names of a clap command,
//!   for daemons whose flags are declared only with clap (precedence: flag, environment,
//!   file, default); unknown keys and bad values are errors that name the key.
//! - [`man`]: a man page rendered from the same clap command as `--help`.
//!
//! Process-level glue only: nothing here knows the Pilot protocol.

pub mod config_file;
pub mod man;
pub mod notify;
