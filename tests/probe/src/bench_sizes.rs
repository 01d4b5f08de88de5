//! The batched loop at several batch sizes, to split its cost into what
//! each batch costs (two messages, each waited for: sockets, wake-ups) and
//! what each pair in it costs (airlock's work and the two ioctls). A
//! least-squares line through the per-batch times t(n) = A + B n gives
//! both; B against the floor is what a pair costs once batches are large,
//! and A / B is the batch size at which the messages cost as much as the
//! pairs. Sizes run interleaved in every round; medians per size.

use airlock_protocol::client::Client;

use crate::bench_dma::median;
use crate::bench_loops::{batched_of, Await};
use crate::os::Memfd;
use crate::report::info;

/// Pairs per batch: one (a lone map and unmap, as a 4 KiB read behind a
/// strict vIOMMU), the main loop's 50, and a large one.
const SIZES: [usize; 4] = [1, 10, 50, 250];
const ROUNDS: usize = 11;

/// (A, B): intercept and slope of the least-squares line through (x, y).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let b = sxy / sxx;
    (my - b * mx, b)
}

/// Runs the sizes and prints one INFO line; `floor`: the floor's
/// microseconds per pair, for the ratios.
pub fn report(c: &mut Client, mem: &Memfd, floor: f64) -> Result<(), String> {
    let mut per_batch: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
    for _ in 0..ROUNDS {
        for (i, &n) in SIZES.iter().enumerate() {
            let t = std::time::Instant::now();
            batched_of(c, mem, n, Await::InRecv)?;
            per_batch[i].push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let medians: Vec<(f64, f64)> = SIZES
        .iter()
        .zip(per_batch)
        .map(|(&n, v)| (n as f64, median(v)))
        .collect();
    let (a, b) = fit(&medians);
    let sizes = medians
        .iter()
        .map(|(n, t)| format!("{n}: {:.1} us ({:.2}x)", t / n, t / n / floor))
        .collect::<Vec<_>>()
        .join(", ");
    info(&format!(
        "bench-dma: batched by batch size, per pair (medians; vs the floor): {sizes}; fitted: {a:.0} us per batch + {b:.1} us per pair ({:.2}x the floor), the messages cost as much as the pairs at {:.0} pairs per batch",
        b / floor,
        a / b
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn a_line_is_fitted_exactly() {
        let (a, b) = fit(&[(1.0, 205.0), (10.0, 250.0), (50.0, 450.0), (250.0, 1450.0)]);
        assert!(
            (a - 200.0).abs() < 1e-9 && (b - 5.0).abs() < 1e-9,
            "{a} {b}"
        );
    }
}
