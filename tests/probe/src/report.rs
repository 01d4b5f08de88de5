//! The output format: `PASS name`, `FAIL name: why`, `SKIP name: why`,
//! `INFO ...`, and the final `N passed, M failed[, K skipped]`.

use std::io::Write;

pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

impl From<Result<(), String>> for Outcome {
    fn from(r: Result<(), String>) -> Outcome {
        match r {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(e),
        }
    }
}

fn emit(s: &str) {
    // Unit tests must not print result-shaped lines into cargo's output.
    if cfg!(test) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", s.replace('\n', " / "));
    let _ = out.flush();
}

pub fn info(msg: &str) {
    emit(&format!("INFO {msg}"));
}

#[derive(Default)]
pub struct Report {
    passed: u32,
    failed: u32,
    skipped: u32,
    skip: Vec<String>,
}

impl Report {
    pub fn new(skip: Vec<String>) -> Report {
        Report {
            skip,
            ..Default::default()
        }
    }

    pub fn wants(&self, name: &str) -> bool {
        !self.skip.iter().any(|s| s == name)
    }

    pub fn record(&mut self, name: &str, o: Outcome) -> bool {
        let (line, pass) = match o {
            Outcome::Pass => {
                self.passed += 1;
                (format!("PASS {name}"), true)
            }
            Outcome::Fail(why) => {
                self.failed += 1;
                (format!("FAIL {name}: {why}"), false)
            }
            Outcome::Skip(why) => {
                self.skipped += 1;
                (format!("SKIP {name}: {why}"), false)
            }
        };
        emit(&line);
        pass
    }

    /// Runs `f` unless --skip names it; returns true if it passed.
    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Outcome) -> bool {
        if !self.wants(name) {
            return self.record(name, Outcome::Skip("skipped by --skip".into()));
        }
        let o = f();
        self.record(name, o)
    }

    /// Prints the summary line; the exit status (0 iff nothing failed).
    pub fn finish(&self) -> i32 {
        let mut s = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            s += &format!(", {} skipped", self.skipped);
        }
        emit(&s);
        i32::from(self.failed != 0)
    }
}
