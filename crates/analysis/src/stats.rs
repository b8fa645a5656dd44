//! The statistics behind the comparison judges: Mann-Whitney U (location), a
//! bootstrap interval on a high quantile (tail shape), Fisher's exact test (error
//! counts as proportions). Checked against SciPy on the fixtures in
//! `tests/fixtures/stats.json`.

use statrs::distribution::{DiscreteCDF, Hypergeometric};
use statrs::function::erf::erfc;

/// P(Z > z) for a standard normal Z.
fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of `x`: how often an `x` beats a `y` (ties count half).
    pub u: f64,
    pub p_two_sided: f64,
    /// The chance of a U this large if `x` were not stochastically greater than `y`.
    pub p_greater: f64,
}

/// Mann-Whitney U with average ranks for ties, tie-corrected variance and continuity
/// correction: SciPy's `mannwhitneyu(method="asymptotic", use_continuity=True)`.
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<MannWhitney> {
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    if x.is_empty() || y.is_empty() {
        return None;
    }
    let mut all: Vec<(f64, bool)> = x
        .iter()
        .map(|v| (*v, true))
        .chain(y.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = all.len();
    let (mut r1, mut tie_term) = (0.0, 0.0);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        let rank = (i + j) as f64 / 2.0 + 1.0;
        r1 += all[i..=j].iter().filter(|v| v.1).count() as f64 * rank;
        tie_term += t * t * t - t;
        i = j + 1;
    }
    let u1 = r1 - n1 * (n1 + 1.0) / 2.0;
    let u2 = n1 * n2 - u1;
    let nf = n as f64;
    let mu = n1 * n2 / 2.0;
    let sigma = (n1 * n2 / 12.0 * ((nf + 1.0) - tie_term / (nf * (nf - 1.0)))).sqrt();
    if sigma == 0.0 || !sigma.is_finite() {
        return Some(MannWhitney {
            u: u1,
            p_two_sided: 1.0,
            p_greater: 1.0,
        });
    }
    let z_two = (u1.max(u2) - mu - 0.5) / sigma;
    let z_greater = (u1 - mu - 0.5) / sigma;
    Some(MannWhitney {
        u: u1,
        p_two_sided: (2.0 * normal_sf(z_two)).min(1.0),
        p_greater: normal_sf(z_greater),
    })
}

/// Fisher's exact test, one-sided: the chance of `a` or more errors among the
/// canary's `a + b` requests if both revisions failed alike (stable: `c` of `c + d`).
pub fn fisher_greater(a: u64, b: u64, c: u64, d: u64) -> f64 {
    if a == 0 {
        return 1.0;
    }
    let (population, errors, draws) = (a + b + c + d, a + c, a + b);
    match Hypergeometric::new(population, errors, draws) {
        Ok(h) => h.sf(a - 1).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

/// The q-quantile of sorted data (linear interpolation, as NumPy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// SplitMix64: a seeded generator so that a bootstrap gives the same answer for the
/// same data every time (a judge must be reproducible); five lines, no dependency.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A percentile-bootstrap interval, at `confidence`, for
/// `quantile(x, q) - quantile(y, q)`.
pub fn bootstrap_quantile_diff(
    x: &[f64],
    y: &[f64],
    q: f64,
    confidence: f64,
    rounds: usize,
) -> Option<(f64, f64)> {
    if x.is_empty() || y.is_empty() || rounds == 0 {
        return None;
    }
    let mut rng = SplitMix(0x5EED_BA70_0000_0001);
    let mut diffs = Vec::with_capacity(rounds);
    let (mut bx, mut by) = (vec![0.0; x.len()], vec![0.0; y.len()]);
    for _ in 0..rounds {
        for v in bx.iter_mut() {
            *v = x[rng.below(x.len())];
        }
        for v in by.iter_mut() {
            *v = y[rng.below(y.len())];
        }
        bx.sort_by(f64::total_cmp);
        by.sort_by(f64::total_cmp);
        diffs.push(quantile(&bx, q) - quantile(&by, q));
    }
    diffs.sort_by(f64::total_cmp);
    let alpha = 1.0 - confidence;
    Some((
        quantile(&diffs, alpha / 2.0),
        quantile(&diffs, 1.0 - alpha / 2.0),
    ))
}
