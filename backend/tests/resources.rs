//! Given the real `airlock --emulate edu` (sandbox on), long runs of what a
//! client does leave the server's fd count and RSS flat: DMA_MAP/UNMAP of
//! 4 KiB and 2 MiB memfds, connect/disconnect, SET_IRQS with fresh
//! eventfds, and clients that die holding maps. Figures are printed
//! (`cargo test --release --test resources -- --nocapture`).

mod common;

use std::os::fd::AsFd;

use airlock_protocol::device::PCI_MSIX_IRQ_INDEX as MSIX_IRQ_INDEX;
use airlock_protocol::dma::DMA_UNMAP_FLAG_ALL;
use airlock_protocol::irqs::{IrqAction, IrqData};
use common::*;

/// fds and RSS (KiB) of the server, measured with one client connected and
/// nothing mapped (the same state before and after each run).
fn figures(pid: u32) -> (usize, u64) {
    (fd_count(pid), rss_kib(pid))
}

/// Runs `work`, then checks the server's fds are back where they were and
/// its RSS grew by less than `slack_kib`.
fn flat(name: &str, s: &Server, slack_kib: u64, work: impl FnOnce()) {
    let pid = s.server_pid();
    let mut probe = connect(s);
    let before = figures(pid);
    drop(probe);
    let t = std::time::Instant::now();
    work();
    let secs = t.elapsed().as_secs_f64();
    probe = connect(s);
    let after = figures(pid);
    drop(probe);
    println!(
        "{name}: {secs:.1} s; server fds {} -> {}, RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1
    );
    assert_eq!(s.server_pid(), pid, "{name}: the server never restarted");
    assert!(
        after.0 <= before.0,
        "{name}: fds grew {before:?} -> {after:?}"
    );
    assert!(
        after.1 <= before.1 + slack_kib,
        "{name}: RSS grew {before:?} -> {after:?}"
    );
}

#[test]
fn dma_map_unmap_cycles_leave_fds_and_rss_flat() {
    let s = start_edu("res-dma");
    for (size, cycles) in [(4096usize, 100_000u64), (2 << 20, 100_000)] {
        flat(
            &format!("{cycles} DMA_MAP/UNMAP of {size} B"),
            &s,
            1024,
            || {
                let mut c = connect(&s);
                let mem = Memfd::new(size);
                for i in 0..cycles {
                    let iova = 0x1000_0000 + (i % 16) * size as u64;
                    c.dma_map(iova, size as u64, 0, RW, Some(mem.fd.as_fd()))
                        .unwrap();
                    c.dma_unmap(iova, size as u64, 0).unwrap();
                }
            },
        );
    }
}

#[test]
fn connect_disconnect_and_clients_dying_with_maps_leave_fds_and_rss_flat() {
    let s = start_edu("res-conn");
    flat("10000 connect/VERSION/disconnect", &s, 1024, || {
        for _ in 0..10_000 {
            drop(connect(&s));
        }
    });
    flat(
        "1000 clients dying with 8 maps and an eventfd",
        &s,
        1024,
        || {
            let mem = Memfd::new(1 << 16);
            for _ in 0..1000 {
                let mut c = connect(&s);
                for m in 0..8u64 {
                    c.dma_map(0x100000 + m * 0x10000, 0x10000, 0, RW, Some(mem.fd.as_fd()))
                        .unwrap();
                }
                let e = eventfd();
                c.set_irqs(
                    MSIX_IRQ_INDEX,
                    0,
                    1,
                    IrqAction::Trigger,
                    IrqData::Eventfds(vec![e]),
                )
                .unwrap();
                // Dropped without DMA_UNMAP or de-assigning.
            }
        },
    );
}

#[test]
fn set_irqs_with_fresh_eventfds_leaves_fds_and_rss_flat() {
    let s = start_edu("res-irqs");
    flat("10000 SET_IRQS with eventfds", &s, 1024, || {
        let mut c = connect(&s);
        for i in 0..10_000u32 {
            c.set_irqs(
                MSIX_IRQ_INDEX,
                i % 4,
                1,
                IrqAction::Trigger,
                IrqData::Eventfds(vec![eventfd()]),
            )
            .unwrap();
        }
        c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    });
}
