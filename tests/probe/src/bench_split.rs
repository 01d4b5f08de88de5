//! Where the batched loop's time goes, by kernel and user space: one long
//! run of batched pairs (DMA_MAP_MULTI + DMA_UNMAP_MULTI) and one of the
//! floor in the same order, each with the user and system CPU time of
//! airlock (its process tree), of this probe, and of the floor. The kernel
//! splits CPU time by where its ticks fell (spent.rs), so the runs are
//! long: thousands of pairs, not one round's fifty.
//!
//! Both make the same VFIO ioctls; airlock's system time beyond the
//! floor's is its messages, wake-ups and the seccomp filter, and its user
//! time is its own code.

use airlock_protocol::client::Client;

use crate::bench_dma::PAIRS;
use crate::bench_loops::{batched, floor_batched, Floor};
use crate::os::Memfd;
use crate::report::info;
use crate::spent::Tree;

/// Batches per run: PAIRS pairs each.
const BATCHES: usize = 400;

/// For each of `trees`: (user, system) microseconds per pair spent while
/// `body` ran BATCHES batches.
fn split_of(
    trees: &[&Tree],
    body: impl FnOnce() -> Result<(), String>,
) -> Result<Vec<(f64, f64)>, String> {
    let before: Vec<_> = trees.iter().map(|t| t.user_system_ns()).collect();
    body()?;
    let pairs = (BATCHES * PAIRS) as f64;
    Ok(trees
        .iter()
        .zip(before)
        .map(|(t, (u0, s0))| {
            let (u1, s1) = t.user_system_ns();
            (
                u1.saturating_sub(u0) as f64 / 1e3 / pairs,
                s1.saturating_sub(s0) as f64 / 1e3 / pairs,
            )
        })
        .collect())
}

/// Runs both and prints one INFO line; `airlock`: its supervisor's pid.
pub fn report(
    c: &mut Client,
    mem: &Memfd,
    floor: &Floor,
    vaddr: u64,
    airlock: u32,
) -> Result<(), String> {
    let server = Tree::of(airlock)?;
    let me = Tree::process(std::process::id());
    let served = split_of(&[&server, &me], || {
        (0..BATCHES).try_for_each(|_| batched(c, mem))
    })?;
    let direct = split_of(&[&me], || {
        (0..BATCHES).try_for_each(|_| floor_batched(floor, vaddr))
    })?;
    let (a, p, f) = (served[0], served[1], direct[0]);
    info(&format!(
        "bench-dma: per batched pair over {} pairs, user / system CPU: airlock {:.1} / {:.1} us, its client (this probe) {:.1} / {:.1} us; the floor in the same order {:.1} / {:.1} us",
        BATCHES * PAIRS,
        a.0,
        a.1,
        p.0,
        p.1,
        f.0,
        f.1
    ));
    Ok(())
}
