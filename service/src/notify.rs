//! Readiness and status for systemd (`Type=notify` units), sent as datagrams on
//! `$NOTIFY_SOCKET` (sd_notify(3)).
//!
//! Invariants: every function is a no-op without `$NOTIFY_SOCKET` (run by hand, in tests, or
//! under another supervisor), and a send failure is logged by the caller's choice, never fatal:
//! the daemon works the same whether or not the service manager hears it.

use sd_notify::NotifyState;

/// Tells the service manager the daemon is ready, with a one-line status (shown by
/// `systemctl status`).
pub fn ready(status: &str) -> std::io::Result<()> {
    send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))])
}

/// Updates the one-line status only.
pub fn status(status: &str) -> std::io::Result<()> {
    send(&[NotifyState::Status(&one_line(status))])
}

/// Tells the service manager the daemon is reloading its configuration; [`reloaded`] ends it.
pub fn reloading() -> std::io::Result<()> {
    let now = sd_notify::NotifyState::monotonic_usec_now()?;
    send(&[NotifyState::Reloading, now])
}

/// Ends a reload begun with [`reloading`], with the new status.
pub fn reloaded(status: &str) -> std::io::Result<()> {
    ready(status)
}

/// Tells the service manager the daemon is stopping.
pub fn stopping() -> std::io::Result<()> {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")])
}

/// Whether a service manager listens for these messages.
pub fn expected() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

fn send(states: &[NotifyState<'_>]) -> std::io::Result<()> {
    if !expected() {
        return Ok(());
    }
    sd_notify::notify(states)
}

/// The protocol is line based: a newline inside STATUS= would end the field early.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
