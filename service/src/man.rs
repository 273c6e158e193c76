//! Man pages rendered with clap_mangen from the same `clap::Command` that prints `--help`,
//! so the two cannot drift apart.

/// Renders `cmd` as a roff man page in `section` (1 for commands, 8 for daemons).
pub fn render(cmd: clap::Command, section: &str) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .section(section)
        .manual("Pilot")
        .source(concat!("pilot ", env!("CARGO_PKG_VERSION")))
        .render(&mut out)?;
    Ok(out)
}

/// Writes the man page of `cmd` to stdout; a reader that closes the pipe early is no error.
pub fn print(cmd: clap::Command, section: &str) -> std::io::Result<()> {
    use std::io::Write;
    let page = render(cmd, section)?;
    let mut out = std::io::stdout().lock();
    match out.write_all(&page).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// `--man-page` of a daemon: prints the page of `cmd` in section 8; on failure says why,
/// prefixed with `program`, and exits non-zero.
pub fn print_daemon_page(cmd: clap::Command, program: &str) -> std::process::ExitCode {
    match print(cmd, "8") {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn page_names_the_command_and_its_flags() {
        let cmd = clap::Command::new("demo").about("A demo daemon").arg(
            clap::Arg::new("listen")
                .long("listen")
                .help("Where to listen"),
        );
        let page = String::from_utf8(render(cmd, "8").unwrap()).unwrap();
        assert!(page.contains(".TH demo 8"), "{page}");
        assert!(page.contains("listen"), "{page}");
        assert!(page.contains("Where to listen"), "{page}");
    }
}
