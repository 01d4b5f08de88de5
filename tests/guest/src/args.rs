//! Command line: `[--bdf DDDD:BB:DD.F] [--skip NAME]... [--soak SECONDS
//! [--sentinel AT:HOLD]]` (also `--opt=value`; --skip values may be
//! comma-separated).

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub bdf: Option<String>,
    pub skip: Vec<String>,
    /// Drive the device in rounds for this long instead of the checks.
    pub soak: Option<u64>,
    /// With --soak: (AT, HOLD) seconds; see soak.rs (the sentinel).
    pub sentinel: Option<(u64, u64)>,
}

pub const USAGE: &str =
    "usage: airlock-guest-test [--bdf DDDD:BB:DD.F] [--skip NAME]... [--soak SECONDS [--sentinel AT:HOLD]]";

pub fn parse<I: IntoIterator<Item = String>>(argv: I) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        if arg.is_empty() {
            continue;
        }
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |k: &str| -> Result<String, String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(format!("{k} needs a value")),
            }
        };
        match key.as_str() {
            "--bdf" => a.bdf = Some(value("--bdf")?),
            "--skip" => a.skip.extend(
                value("--skip")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            "--soak" => {
                let v = value("--soak")?;
                a.soak = Some(v.parse().map_err(|_| format!("--soak {v:?}: seconds"))?);
            }
            "--sentinel" => {
                let v = value("--sentinel")?;
                let bad = || format!("--sentinel {v:?}: AT:HOLD (seconds)");
                let (at, hold) = v.split_once(':').ok_or_else(bad)?;
                let at: u64 = at.parse().map_err(|_| bad())?;
                let hold: u64 = hold.parse().map_err(|_| bad())?;
                if hold == 0 {
                    return Err(bad());
                }
                a.sentinel = Some((at, hold));
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    if a.sentinel.is_some() && a.soak.is_none() {
        return Err("--sentinel needs --soak".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn empty() {
        assert_eq!(p(&[]).unwrap(), Args::default());
    }

    #[test]
    fn bdf_and_skips() {
        let a = p(&[
            "--bdf",
            "0000:00:03.0",
            "--skip",
            "intx",
            "--skip=msix,msi",
            "",
        ])
        .unwrap();
        assert_eq!(a.bdf.as_deref(), Some("0000:00:03.0"));
        assert_eq!(a.skip, vec!["intx", "msix", "msi"]);
        let a = p(&["--bdf=0000:00:04.0"]).unwrap();
        assert_eq!(a.bdf.as_deref(), Some("0000:00:04.0"));
    }

    #[test]
    fn soak_and_sentinel() {
        let a = p(&["--soak", "60", "--sentinel=15:20"]).unwrap();
        assert_eq!(a.soak, Some(60));
        assert_eq!(a.sentinel, Some((15, 20)));
        assert!(p(&["--sentinel", "15:20"]).is_err());
        assert!(p(&["--soak", "60", "--sentinel", "15"]).is_err());
        assert!(p(&["--soak", "60", "--sentinel", "15:0"]).is_err());
        assert!(p(&["--soak", "60", "--sentinel", "a:b"]).is_err());
    }

    #[test]
    fn errors() {
        assert!(p(&["--bdf"]).is_err());
        assert!(p(&["--skip="]).is_err());
        assert!(p(&["--frobnicate"]).is_err());
        assert_eq!(p(&["--help"]), Err(String::new()));
    }
}
