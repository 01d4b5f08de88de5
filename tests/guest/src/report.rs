//! The output format: `PASS name`, `FAIL name: reason`, `SKIP name: reason`,
//! `INFO ...`, and the final `N passed, M failed[, K skipped]`.

use std::io::Write;

#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One report line (no newline). Reasons are kept on one line.
pub fn line(name: &str, o: &Outcome) -> String {
    let one = |s: &str| s.replace('\n', " / ");
    match o {
        Outcome::Pass => format!("PASS {name}"),
        Outcome::Fail(r) => format!("FAIL {name}: {}", one(r)),
        Outcome::Skip(r) => format!("SKIP {name}: {}", one(r)),
    }
}

fn emit(s: &str) {
    // Unit tests must not print result-shaped lines into cargo's output.
    if cfg!(test) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

pub fn info(msg: &str) {
    emit(&format!("INFO {msg}"));
}

#[derive(Default)]
pub struct Report {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    skip: Vec<String>,
}

impl Report {
    pub fn new(skip: Vec<String>) -> Report {
        Report {
            skip,
            ..Default::default()
        }
    }

    /// Whether `name` was excluded with --skip (an exact name, or a prefix
    /// followed by '-': `--skip msix` covers `msix-vector-0`).
    pub fn skipped_by_user(&self, name: &str) -> bool {
        self.skip.iter().any(|s| {
            name == s || (name.starts_with(s.as_str()) && name[s.len()..].starts_with('-'))
        })
    }

    pub fn record(&mut self, name: &str, o: Outcome) -> bool {
        match &o {
            Outcome::Pass => self.passed += 1,
            Outcome::Fail(_) => self.failed += 1,
            Outcome::Skip(_) => self.skipped += 1,
        }
        emit(&line(name, &o));
        o == Outcome::Pass
    }

    /// Runs `f` unless --skip names it; returns true if it passed.
    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Outcome) -> bool {
        if self.skipped_by_user(name) {
            return self.record(name, Outcome::Skip("skipped by --skip".into()));
        }
        let o = f();
        self.record(name, o)
    }

    pub fn summary(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            s += &format!(", {} skipped", self.skipped);
        }
        s
    }

    pub fn finish(&self) -> i32 {
        emit(&self.summary());
        if self.failed == 0 {
            0
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(line("ident", &Outcome::Pass), "PASS ident");
        assert_eq!(
            line("msi", &Outcome::Fail("no\nirq".into())),
            "FAIL msi: no / irq"
        );
        assert_eq!(
            line("msix", &Outcome::Skip("none".into())),
            "SKIP msix: none"
        );
    }

    #[test]
    fn summary_counts() {
        let mut r = Report::new(vec![]);
        assert_eq!(r.summary(), "0 passed, 0 failed");
        r.record("a", Outcome::Pass);
        r.record("b", Outcome::Fail("x".into()));
        assert_eq!(r.summary(), "1 passed, 1 failed");
        r.record("c", Outcome::Skip("y".into()));
        assert_eq!(r.summary(), "1 passed, 1 failed, 1 skipped");
        assert_eq!(r.finish(), 1);
    }

    #[test]
    fn user_skip_matching() {
        let r = Report::new(vec!["msix".into(), "intx".into()]);
        assert!(r.skipped_by_user("msix"));
        assert!(r.skipped_by_user("msix-vector-3"));
        assert!(r.skipped_by_user("intx"));
        assert!(!r.skipped_by_user("msi"));
        assert!(!r.skipped_by_user("intxx"));
    }
}
