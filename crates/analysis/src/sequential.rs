//! Sequential tests of error counts that may be looked at after every request.
//!
//! Each test is an e-process: a mixture of likelihood ratios over a grid of worse
//! alternatives, a non-negative supermartingale while the canary is no worse than the
//! null allows. By Ville's inequality it ever reaches `1 / alpha` with a chance of at
//! most `alpha`, however often it is read — so judging after every batch of requests
//! does not inflate false rollbacks the way re-running a fixed-horizon test does (see
//! docs/analysis.md). Two tests:
//!
//! - [`Bernoulli`]: one revision's errors against a fixed rate `p0` (a gate's
//!   `result < 0.05`): H0 is `p <= p0`.
//! - [`RateRatio`]: the canary's error rate against stable's times `rho` (a gate's
//!   `compare.maxIncreasePercent`): conditioned on an error having happened, it is the
//!   canary's with a probability set by the traffic split, and H0 bounds that
//!   probability. The counting-process test of Lindon, Sanden and Shirikian (KDD 2022)
//!   conditions the same way; they mix with a conjugate prior, this uses a fixed grid,
//!   which needs no special functions and keeps its power against both small and gross
//!   regressions.

/// Alternatives, as odds ratios over the null: from a 10 % worsening to a version
/// failing nearly every request. Equal weights.
const ODDS_RATIOS: [f64; 14] = [
    1.02, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1e3, 1e4, 1e5,
];

fn log_mean_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    let sum: f64 = xs.iter().map(|x| (x - max).exp()).sum();
    max + (sum / xs.len() as f64).ln()
}

fn worse(p0: f64, odds_ratio: f64) -> f64 {
    let odds = p0 / (1.0 - p0) * odds_ratio;
    odds / (1.0 + odds)
}

/// H0: a revision fails at most a share `p0` of its requests.
#[derive(Debug, Clone)]
pub struct Bernoulli {
    p0: f64,
    log_lr: [f64; ODDS_RATIOS.len()],
    /// Requests and errors seen.
    pub requests: u64,
    pub errors: u64,
    /// An error under `p0 == 0` disproves H0 outright.
    certain: bool,
}

impl Bernoulli {
    pub fn new(p0: f64) -> Self {
        Bernoulli {
            p0: p0.clamp(0.0, 1.0),
            log_lr: [0.0; ODDS_RATIOS.len()],
            requests: 0,
            errors: 0,
            certain: false,
        }
    }

    pub fn p0(&self) -> f64 {
        self.p0
    }

    /// `requests` more, of which `errors` failed.
    pub fn observe(&mut self, requests: u64, errors: u64) {
        let errors = errors.min(requests);
        self.requests += requests;
        self.errors += errors;
        if self.p0 >= 1.0 {
            return;
        }
        if self.p0 <= 0.0 {
            self.certain |= errors > 0;
            return;
        }
        let (k, m) = (errors as f64, (requests - errors) as f64);
        for (l, r) in self.log_lr.iter_mut().zip(ODDS_RATIOS) {
            let p1 = worse(self.p0, r);
            *l += k * (p1 / self.p0).ln() + m * ((1.0 - p1) / (1.0 - self.p0)).ln();
        }
    }

    /// The natural log of the evidence against H0.
    pub fn log_evidence(&self) -> f64 {
        if self.certain {
            return f64::INFINITY;
        }
        log_mean_exp(&self.log_lr)
    }
}

/// H0: the canary's error rate is at most `rho` times stable's.
#[derive(Debug, Clone)]
pub struct RateRatio {
    rho: f64,
    log_lr: [f64; ODDS_RATIOS.len()],
    pub canary: (u64, u64),
    pub stable: (u64, u64),
}

impl RateRatio {
    pub fn new(rho: f64) -> Self {
        RateRatio {
            rho: rho.max(f64::MIN_POSITIVE),
            log_lr: [0.0; ODDS_RATIOS.len()],
            canary: (0, 0),
            stable: (0, 0),
        }
    }

    pub fn rho(&self) -> f64 {
        self.rho
    }

    /// One batch of requests and errors of each revision, taken over the same time.
    /// Within a batch the traffic split is taken as constant: the router holds one
    /// weight between cycles.
    pub fn observe(&mut self, canary: (u64, u64), stable: (u64, u64)) {
        let (nc, kc) = (canary.0, canary.1.min(canary.0));
        let (ns, ks) = (stable.0, stable.1.min(stable.0));
        self.canary = (self.canary.0 + nc, self.canary.1 + kc);
        self.stable = (self.stable.0 + ns, self.stable.1 + ks);
        if nc == 0 || ns == 0 || kc + ks == 0 {
            // An error with no request on the other side says nothing about the ratio.
            return;
        }
        // The chance an error is the canary's, were its rate `rho` times stable's.
        let w = nc as f64 / (nc + ns) as f64;
        let q0 = self.rho * w / (self.rho * w + (1.0 - w));
        let (kc, ks) = (kc as f64, ks as f64);
        for (l, r) in self.log_lr.iter_mut().zip(ODDS_RATIOS) {
            let q1 = worse(q0, r);
            *l += kc * (q1 / q0).ln() + ks * ((1.0 - q1) / (1.0 - q0)).ln();
        }
    }

    pub fn log_evidence(&self) -> f64 {
        log_mean_exp(&self.log_lr)
    }
}

/// The evidence an error bound of `1 - confidence` needs, as a natural log.
pub fn log_threshold(confidence: f64) -> f64 {
    (1.0 / (1.0 - confidence).max(f64::MIN_POSITIVE)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small, seeded generator: the simulations below must give the same answer on
    /// every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            // SplitMix64.
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn binomial(&mut self, n: u64, p: f64) -> u64 {
            (0..n).filter(|_| self.next() < p).count() as u64
        }
    }

    #[test]
    fn the_evidence_is_the_mean_likelihood_ratio_of_the_grid() {
        // Two requests, one error, against p0 = 0.1: by hand for each alternative.
        let mut t = Bernoulli::new(0.1);
        t.observe(2, 1);
        let expect: f64 = ODDS_RATIOS
            .iter()
            .map(|r| {
                let p1 = worse(0.1, *r);
                (p1 / 0.1) * ((1.0 - p1) / 0.9)
            })
            .sum::<f64>()
            / ODDS_RATIOS.len() as f64;
        assert!((t.log_evidence() - expect.ln()).abs() < 1e-12);
        // No data: no evidence (e = 1).
        assert_eq!(Bernoulli::new(0.1).log_evidence(), 0.0);
        // Against odds ratio 2 at p0 = 0.5 the alternative is 2/3.
        assert!((worse(0.5, 2.0) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_version_failing_every_request_is_judged_on_a_handful() {
        let need = log_threshold(0.99);
        for (p0, most) in [(0.01, 2), (0.05, 3), (0.1, 4), (0.5, 9)] {
            let mut t = Bernoulli::new(p0);
            let mut n = 0;
            while t.log_evidence() < need {
                t.observe(1, 1);
                n += 1;
            }
            assert!(n <= most, "p0 {p0}: {n} requests");
            assert!(n >= 2, "p0 {p0}: one request is never enough ({n})");
        }
        // With no errors allowed, one error settles it.
        let mut t = Bernoulli::new(0.0);
        t.observe(1000, 0);
        assert!(t.log_evidence() < need);
        t.observe(1, 1);
        assert!(t.log_evidence() >= need);
    }

    #[test]
    fn looking_after_every_batch_keeps_false_rejections_under_the_bound() {
        // 2,000 versions exactly at the allowed rate (the hardest case for H0), each
        // looked at after every batch of 10 requests for 20,000 requests.
        let mut rng = Rng(7);
        let (runs, alpha) = (2000, 0.05);
        let need = log_threshold(1.0 - alpha);
        let mut rejected = 0;
        for _ in 0..runs {
            let mut t = Bernoulli::new(0.02);
            for _ in 0..2000 {
                t.observe(10, rng.binomial(10, 0.02));
                if t.log_evidence() >= need {
                    rejected += 1;
                    break;
                }
            }
        }
        let rate = rejected as f64 / runs as f64;
        assert!(rate <= alpha, "false rejections {rate}");
        // Well under the allowed rate: much rarer still.
        let mut rejected_better = 0;
        for _ in 0..runs {
            let mut t = Bernoulli::new(0.02);
            for _ in 0..2000 {
                t.observe(10, rng.binomial(10, 0.01));
                if t.log_evidence() >= need {
                    rejected_better += 1;
                    break;
                }
            }
        }
        assert!(
            rejected_better * 10 <= rejected.max(10),
            "{rejected_better}"
        );
    }

    #[test]
    fn a_doubled_error_rate_is_found_and_a_small_rise_takes_longer() {
        let mut rng = Rng(11);
        let need = log_threshold(0.99);
        let mut until = |p: f64| {
            let mut t = Bernoulli::new(0.01);
            let mut n = 0;
            while t.log_evidence() < need && n < 1_000_000 {
                t.observe(10, rng.binomial(10, p));
                n += 10;
            }
            n
        };
        let doubled = until(0.02);
        let gross = until(0.5);
        assert!(gross <= 20, "{gross}");
        assert!(doubled < 1_000_000 && doubled > gross, "{doubled}");
    }

    #[test]
    fn the_ratio_test_holds_under_its_null_and_finds_a_worse_canary() {
        let mut rng = Rng(3);
        let need = log_threshold(0.95);
        // Canary at 10 % of traffic, both failing 1 %: H0 (ratio <= 1.1) holds.
        let mut rejected = 0;
        for _ in 0..1000 {
            let mut t = RateRatio::new(1.1);
            for _ in 0..1000 {
                t.observe((10, rng.binomial(10, 0.01)), (90, rng.binomial(90, 0.01)));
                if t.log_evidence() >= need {
                    rejected += 1;
                    break;
                }
            }
        }
        assert!(rejected <= 50, "false rejections {rejected} of 1000");
        // A canary failing 5 % beside a stable failing 1 %: found.
        let mut t = RateRatio::new(1.1);
        let mut batches = 0;
        while t.log_evidence() < need && batches < 1000 {
            t.observe((10, rng.binomial(10, 0.05)), (90, rng.binomial(90, 0.01)));
            batches += 1;
        }
        assert!(batches < 1000, "never found");
        assert_eq!(t.canary.0, batches * 10);
    }
}
