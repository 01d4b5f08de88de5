//! The accept loop, in-process on the mock device.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use airlock_protocol::client::Client;

use super::{serve, Listener};
use crate::device::mock::MockDevice;
use crate::device::Device;

#[test]
fn a_withdrawn_device_serves_its_client_to_the_end_and_then_no_other() {
    let dir = std::env::temp_dir().join(format!("airlock-withdrawn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let _ = std::fs::remove_file(&path);
    let listener = Listener::local(UnixListener::bind(&path).unwrap());
    let dev = MockDevice::new();
    let request = dev.withdrawn.clone();
    // The client is already waiting when serving starts.
    let mut first = Client::from_stream(UnixStream::connect(&path).unwrap());
    let (done_tx, done_rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let dev: Box<dyn Device> = Box::new(dev);
        let left = serve(&listener, dev, crate::server_limits(1 << 20)).map(|d| d.withdrawn());
        done_tx.send(left.unwrap()).unwrap();
    });
    first
        .negotiate(Client::qemu_capabilities())
        .expect("the client holding the device is served on");
    // The host asks for the device back while the client holds it.
    request.store(true, Ordering::SeqCst);
    assert!(first.device_info().is_ok());
    assert!(
        done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the loop waits for its client to leave"
    );
    drop(first);
    let withdrawn = done_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the loop ends once the client left, instead of waiting for another");
    assert!(withdrawn);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
