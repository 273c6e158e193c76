//! Prints the progress of one bulk transfer in the simulator every 250 ms of virtual time:
//! goodput, congestion window, bytes in flight, SRTT, recovery state and loss counters.
//!
//! `cargo run --release -p pilot-tests --example sim_trace -- [MBIT] [RTT_MS] [LOSS] [MIB]`
//! (defaults 100, 50, 0, 64). `SEED=n` picks the random seed; `REORDER=1` adds 2 %
//! reordering (up to 5 ms) and 1 % duplication.

use std::process::ExitCode;
use std::time::Duration;

use pilot_tests::sim::{LinkConfig, Sim};
use pilot_tests::transfer::BulkTransfer;
use tunnel::stream::EndpointConfig;
use tunnel::Addr;

fn arg<T: std::str::FromStr>(i: usize, default: T) -> Result<T, String> {
    match std::env::args().nth(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("argument {i} ({s:?}) is not a number")),
    }
}

fn run() -> Result<(), String> {
    let mbit: u64 = arg(1, 100)?;
    let rtt: u64 = arg(2, 50)?;
    let loss: f64 = arg(3, 0.0)?;
    let mib: u64 = arg(4, 64)?;
    let seed = match std::env::var("SEED") {
        Ok(s) => s
            .parse()
            .map_err(|_| format!("SEED {s:?} is not a number"))?,
        Err(_) => 3,
    };
    let mut link = LinkConfig::new(mbit, Duration::from_millis(rtt)).loss(loss);
    if std::env::var_os("REORDER").is_some() {
        link = link.reorder(0.02, Duration::from_millis(5)).duplicate(0.01);
    }
    let mut sim = Sim::new(seed);
    let cfg = EndpointConfig::default();
    let a = sim.add_node(Addr::new(0, 1), cfg);
    let b = sim.add_node(Addr::new(0, 2), cfg);
    sim.connect(a, b, link);
    let mut t = BulkTransfer::start(&mut sim, a, b, 1001, mib << 20);
    let tick = Duration::from_millis(250);
    let mut next = tick;
    let mut last = 0;
    let done = sim.run_until(Duration::from_secs(3600), |sim| {
        t.drive(sim);
        if sim.elapsed() >= next {
            next += tick;
            let stats = sim.node(a).ep.connection(t.client_conn).map(|c| c.stats());
            if let Some(st) = stats {
                println!(
                    "{:>7.2}s {:>7.1} Mbit/s cwnd {:>8} in-flight {:>8} srtt {:>6.1} ms {:?} \
                     rtx {} loss-events {} timeouts {}",
                    sim.elapsed().as_secs_f64(),
                    (t.received - last) as f64 * 8.0 / tick.as_secs_f64() / 1e6,
                    st.cwnd,
                    st.bytes_in_flight,
                    st.srtt.as_secs_f64() * 1e3,
                    st.recovery,
                    st.retransmissions,
                    st.fast_retransmits,
                    st.timeouts
                );
            }
            last = t.received;
        }
        t.complete() && t.closed_cleanly(sim)
    });
    println!(
        "{} after {:.2} s virtual; link {:?}",
        if done { "finished" } else { "gave up" },
        sim.elapsed().as_secs_f64(),
        sim.link_stats(a, b)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
