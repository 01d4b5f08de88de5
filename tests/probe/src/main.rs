//! airlock-probe: a native vfio-user client that checks an edu device served
//! by airlock (emulated, or a real edu passed through with VFIO inside a
//! nested guest). Prints PASS/FAIL/SKIP/INFO lines and a final
//! `N passed, M failed[, K skipped]`; exits 0 iff nothing failed.

mod args;
mod bench_confined;
mod bench_dma;
mod bench_echo;
mod bench_loops;
mod bench_sizes;
mod bench_spent;
mod bench_split;
mod broken_upgrade;
mod checks;
mod checks_dma;
mod checks_msi;
mod device;
mod hold_request;
mod os;
mod report;
mod restart;
mod spent;

fn main() {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("airlock-probe: {e}");
            }
            eprintln!("{}", args::USAGE);
            std::process::exit(2);
        }
    };
    let mut report = report::Report::new(args.skip.clone());
    match (args.hold_request, &args.bench_dma) {
        (Some(s), _) => hold_request::run(&mut report, &args.socket, s),
        (None, Some(group)) => bench_dma::run(&mut report, &args.socket, group, args.airlock_pid),
        (None, None) => checks::run(&mut report, &args),
    }
    std::process::exit(report.finish());
}
