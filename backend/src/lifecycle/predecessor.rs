//! The successor's side of a live upgrade: the airlock that started it
//! (the predecessor) still holds the socket and the device, and serves
//! until told otherwise. The successor says hello once it holds the handed
//! state, starts its first server only on `go`, says `serving` once that
//! server is confined, and is airlock only on `commit`. Until then it
//! sends systemd nothing (its predecessor speaks for the service) and, if
//! it exits, leaves the device and the socket path to its predecessor.

use std::time::Duration;

use tracing::{info, warn};

use super::ctl::{Ctl, Heard, Msg, HANDOVER_VERSION};

/// How long to wait for `go` after hello (the predecessor stops its server
/// first; it kills a successor it gives up on).
const GO_WAIT: Duration = Duration::from_secs(30);

pub struct Predecessor {
    ctl: Ctl,
    pid: u32,
    said_serving: bool,
}

/// What the predecessor said while this airlock served.
#[derive(Debug, PartialEq, Eq)]
pub enum Word {
    /// It let go: this airlock is airlock now.
    Commit,
    /// Nothing new.
    Nothing,
}

impl Predecessor {
    pub fn new(ctl: Ctl, pid: u32) -> Predecessor {
        // This process outlives its predecessor from here: it holds what
        // was handed over, and the predecessor kills it if it gives up.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
        Predecessor {
            ctl,
            pid,
            said_serving: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.ctl.raw_fd()
    }

    /// Says hello and waits for `go`: the predecessor's server is gone.
    pub fn greet(&mut self) -> Result<(), String> {
        let hello = Msg::Hello {
            version: HANDOVER_VERSION,
            pid: std::process::id(),
        };
        self.ctl
            .send(&hello)
            .map_err(|e| format!("saying hello to pid {}: {e}", self.pid))?;
        match self.ctl.wait(Some(GO_WAIT)) {
            Heard::Msg(Msg::Go) => Ok(()),
            // The predecessor died before it let go (its server died with
            // it: PDEATHSIG): what it held is this airlock's to serve.
            Heard::Closed => {
                warn!(
                    "live upgrade: the previous airlock (pid {}) is gone before it said go; taking over",
                    self.pid
                );
                std::thread::sleep(Duration::from_millis(100));
                Ok(())
            }
            other => Err(format!(
                "the previous airlock (pid {}) did not say go: {other:?}",
                self.pid
            )),
        }
    }

    /// This airlock cannot take over: says why, for the predecessor's log.
    pub fn refuse(&self, why: &str) {
        let _ = self.ctl.send(&Msg::Refuse(why.chars().take(300).collect()));
    }

    /// The first server is confined and accepting.
    pub fn serving(&mut self) {
        if !self.said_serving {
            self.said_serving = true;
            if let Err(e) = self.ctl.send(&Msg::Serving) {
                warn!(
                    "live upgrade: telling the previous airlock (pid {}) this one serves: {e}",
                    self.pid
                );
            }
        }
    }

    /// Reads what the predecessor said (the channel was readable).
    pub fn hear(&mut self) -> Word {
        match self.ctl.take() {
            Heard::Msg(Msg::Commit) => Word::Commit,
            Heard::Closed => {
                info!(
                    "live upgrade: the previous airlock (pid {}) went away before it committed; this airlock serves on",
                    self.pid
                );
                Word::Commit
            }
            _ => Word::Nothing,
        }
    }
}
