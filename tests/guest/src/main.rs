//! airlock-guest-test: runs inside a Linux guest (as /test from an initramfs),
//! binds the edu-compatible PCI device (1234:11e8) to vfio-pci and checks it
//! through the guest's own VFIO. Prints PASS/FAIL/SKIP/INFO lines and a final
//! `N passed, M failed[, K skipped]`; exits 0 iff nothing failed.

mod args;
mod checks;
mod edu;
mod os;
mod report;
mod soak;
mod sysfs;
mod vfio;

use report::{Outcome, Report};

fn main() {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("airlock-guest-test: {e}");
            }
            eprintln!("{}", args::USAGE);
            std::process::exit(2);
        }
    };
    let mut report = Report::new(args.skip.clone());
    match checks::open(args.bdf.as_deref()) {
        Ok(v) => {
            report.record("vfio-setup", Outcome::Pass);
            match args.soak {
                Some(secs) => soak::run(&mut report, &v, secs, args.sentinel),
                None => checks::run(&mut report, &v),
            }
        }
        Err(e) => {
            report.record("vfio-setup", Outcome::Fail(e));
        }
    }
    std::process::exit(report.finish());
}
