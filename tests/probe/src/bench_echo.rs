//! The transport floor of `--bench-dma`: a forked process that answers
//! every message with its own payload, receiving and replying with
//! airlock's socket code (the protocol crate's MessageSocket, which holds
//! replies while more requests are buffered) and, like airlock with
//! a DMA_MAP's fd, fstat-ing and closing any fd that came with it. The
//! bench drives it with the same DMA_MAP/DMA_UNMAP loops as airlock, so the
//! difference between the two is airlock's own work plus the two VFIO
//! ioctls, and the echo's figure is what the messages cost by themselves
//! on this machine: sockets, process switches, fd passing.

use airlock_protocol::client::Client;
use airlock_protocol::{Limits, MessageSocket};

/// The forked echo and the client connected to it; the echo ends when the
/// client's socket closes, and is reaped on drop.
pub struct Echo {
    pub client: Client,
    pid: libc::pid_t,
}

impl Echo {
    pub fn spawn() -> Result<Echo, String> {
        let (ours, pid) = crate::os::fork_with_socket(|theirs| {
            serve(MessageSocket::new(theirs));
            0
        })?;
        Ok(Echo {
            client: Client::from_stream(ours),
            pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        // Closing our end ends the echo's loop; then reap it.
        let _ = self
            .client
            .socket()
            .stream()
            .shutdown(std::net::Shutdown::Both);
        let mut status = 0;
        // SAFETY: waits for our own child; status is a live local.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The child: echo until the socket closes or breaks.
fn serve(sock: MessageSocket) {
    let limits = Limits::default();
    let mut payload = Vec::new();
    while let Ok((header, fds)) = sock.recv(&limits, &mut payload) {
        // What airlock's DmaSpace does with a DMA_MAP's fd: its metadata,
        // then close (dropping the File).
        for fd in fds {
            let _ = std::fs::File::from(fd).metadata();
        }
        if sock
            .send_reply(&header.reply(payload.len()), &[&payload])
            .is_err()
        {
            return;
        }
    }
}
