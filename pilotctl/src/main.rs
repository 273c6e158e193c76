//! `pilotctl`: see the library documentation and `pilotctl --help`.

fn main() {
    std::process::exit(pilotctl::main_entry());
}
