//! Command line: `--socket PATH [--airlock-pid PID] [--iterations N]
//! [--msi-window START:SIZE] [--broken-upgrades] [--skip NAME]... [--hold-request SECONDS] [--bench-dma GROUP]` (also `--opt=value`; --skip
//! values may be comma-separated; START and SIZE decimal or 0x-hex).

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub socket: String,
    pub airlock_pid: Option<u32>,
    pub iterations: u32,
    pub skip: Vec<String>,
    /// The host's MSI doorbell window (IOVA start, size): DMA_MAP into it
    /// must be refused (check dma-map-msi-window-refused runs only if set).
    pub msi_window: Option<(u64, u64)>,
    /// Run upgrade-broken (it replaces airlock's installed binary).
    pub broken_upgrades: bool,
    /// Instead of the checks: hold the device with a REQ eventfd for at
    /// most this many seconds (hold_request.rs).
    pub hold_request: Option<u64>,
    /// Instead of the checks: DMA_MAP+UNMAP through airlock against the
    /// direct ioctls on this other VFIO group (bench_dma.rs).
    pub bench_dma: Option<String>,
}

pub const USAGE: &str = "usage: airlock-probe --socket PATH [--airlock-pid PID] [--iterations N] \
     [--msi-window START:SIZE] [--broken-upgrades] [--skip NAME]... [--hold-request SECONDS] [--bench-dma GROUP]";

/// A number in decimal or 0x-hex.
fn number64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// START:SIZE, SIZE non-zero and START + SIZE within u64.
fn window(v: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--msi-window: {v:?} is not START:SIZE (e.g. 0x8000000:0x100000)");
    let (a, b) = v.split_once(':').ok_or_else(bad)?;
    let (start, size) = (number64(a).ok_or_else(bad)?, number64(b).ok_or_else(bad)?);
    if size == 0 || start.checked_add(size).is_none() {
        return Err(bad());
    }
    Ok((start, size))
}

pub fn parse<I: IntoIterator<Item = String>>(argv: I) -> Result<Args, String> {
    let mut socket = None;
    let mut airlock_pid = None;
    let mut iterations = 1000;
    let mut skip = Vec::new();
    let mut msi_window = None;
    let mut broken_upgrades = false;
    let mut hold_request = None;
    let mut bench_dma = None;
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
            "--msi-window" => msi_window = Some(window(&value("--msi-window")?)?),
            "--broken-upgrades" => broken_upgrades = true,
            "--bench-dma" => bench_dma = Some(value("--bench-dma")?),
            "--hold-request" => {
                hold_request = Some(number("--hold-request", value("--hold-request")?)? as u64)
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Args {
        socket: socket.ok_or("--socket PATH is required")?,
        airlock_pid,
        iterations,
        skip,
        msi_window,
        broken_upgrades,
        hold_request,
        bench_dma,
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
                msi_window: None,
                broken_upgrades: false,
                hold_request: None,
                bench_dma: None,
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
            "--msi-window=0x8000000:1048576",
        ])
        .unwrap();
        assert_eq!(a.socket, "/s");
        assert_eq!(a.airlock_pid, Some(42));
        assert_eq!(a.iterations, 200);
        assert_eq!(a.skip, vec!["msi", "dma", "bar0-fast-path"]);
        assert_eq!(a.msi_window, Some((0x800_0000, 0x10_0000)));
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
        for w in [
            "0x8000000",
            "0x8000000:0",
            "x:1",
            "1:0xg",
            "0xffffffffffffffff:2",
        ] {
            assert!(p(&["--socket", "/s", "--msi-window", w]).is_err(), "{w}");
        }
        assert_eq!(p(&["--help"]), Err(String::new()));
    }
}
