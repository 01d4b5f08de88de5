//! Command line: `--socket PATH [--airlock-pid PID] [--iterations N]
//! [--skip NAME]...` (also `--opt=value`; --skip values may be comma-separated).

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub socket: String,
    pub airlock_pid: Option<u32>,
    pub iterations: u32,
    pub skip: Vec<String>,
}

pub const USAGE: &str =
    "usage: airlock-probe --socket PATH [--airlock-pid PID] [--iterations N] [--skip NAME]...";

pub fn parse<I: IntoIterator<Item = String>>(argv: I) -> Result<Args, String> {
    let mut socket = None;
    let mut airlock_pid = None;
    let mut iterations = 1000;
    let mut skip = Vec::new();
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
        let number = |k: &str, v: String| -> Result<u32, String> {
            v.parse::<u32>()
                .map_err(|_| format!("{k}: {v:?} is not a number"))
        };
        match key.as_str() {
            "--socket" => socket = Some(value("--socket")?),
            "--airlock-pid" => {
                airlock_pid = Some(number("--airlock-pid", value("--airlock-pid")?)?)
            }
            "--iterations" => {
                iterations = number("--iterations", value("--iterations")?)?;
                if iterations == 0 {
                    return Err("--iterations must be at least 1".into());
                }
            }
            "--skip" => skip.extend(
                value("--skip")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Args {
        socket: socket.ok_or("--socket PATH is required")?,
        airlock_pid,
        iterations,
        skip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn socket_alone_takes_the_defaults() {
        let a = p(&["--socket", "/tmp/edu.sock"]).unwrap();
        assert_eq!(
            a,
            Args {
                socket: "/tmp/edu.sock".into(),
                airlock_pid: None,
                iterations: 1000,
                skip: vec![],
            }
        );
    }

    #[test]
    fn every_option_in_both_spellings() {
        let a = p(&[
            "--socket=/s",
            "--airlock-pid",
            "42",
            "--iterations=200",
            "--skip",
            "msi",
            "--skip=dma,bar0-fast-path",
            "",
        ])
        .unwrap();
        assert_eq!(a.socket, "/s");
        assert_eq!(a.airlock_pid, Some(42));
        assert_eq!(a.iterations, 200);
        assert_eq!(a.skip, vec!["msi", "dma", "bar0-fast-path"]);
    }

    #[test]
    fn errors() {
        assert!(p(&[]).is_err(), "--socket is required");
        assert!(p(&["--socket"]).is_err());
        assert!(p(&["--socket", "/s", "--airlock-pid", "x"]).is_err());
        assert!(p(&["--socket", "/s", "--iterations", "0"]).is_err());
        assert!(p(&["--socket", "/s", "--iterations", "-5"]).is_err());
        assert!(p(&["--socket", "/s", "--skip="]).is_err());
        assert!(p(&["--socket", "/s", "--frobnicate"]).is_err());
        assert_eq!(p(&["--help"]), Err(String::new()));
    }
}
