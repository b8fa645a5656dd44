//! The power and the false rollbacks of Baton's error-rate judges beside the judges
//! users have today, on the same generated requests (bench/analysis.sh runs it).
//!
//! Each run replays a canary for `--minutes`: requests arrive as a Poisson process at
//! `rate`, a share `weight` goes to the canary; stable fails `BASE` of its requests, the
//! canary `BASE + delta`. Every 100 ms (the controller's tick) each judge sees the
//! counters so far, as it would live:
//!
//! - Baton, continuous: the real `Measurer` with a `result < 0.01` gate (and one
//!   comparing with stable, `maxIncreasePercent: 20`), judged on every tick;
//! - Baton, interval: the same gates with `judging: interval` (Baton before sequential
//!   judging);
//! - Flagger-style: the canary's error rate over the last interval against the same 1 %;
//!   one failed check rolls back (Flagger's `threshold: 1`), or five (`threshold: 5`,
//!   failed checks counted over the whole analysis);
//! - Kayenta-style: a one-sided Mann-Whitney test of the canary's per-second error rates
//!   against stable's, over everything so far, at each interval, failing at p < 0.01.
//!
//!
//! And for latency (median 50 ms, log-normal): Baton's `latency_p50` and `latency_p99`
//! gates against stable (`maxIncreasePercent: 2`), continuous and interval; a
//! Flagger-style p99 threshold per interval (stable's p99 plus 10 %, a value a user
//! would write); a Kayenta-style Mann-Whitney test of per-second medians.
//!
//! A home-made generator (SplitMix64, Poisson by inversion): seeded, so a run is
//! repeatable, and no dependency for a benchmark.

use std::fmt::Write as _;

use baton_analysis::Measurer;
use baton_analysis::stats::mann_whitney;
use baton_engine::Verdict;
use baton_proxy_api::RevisionStats;
use baton_proxy_api::metrics::{FINE_BUCKETS, fine_index};
use baton_spec::{BuiltinMetric, Compare, Duration, Gate, Judging, MetricSource};

const BASE: f64 = 0.005;
const TICK_MS: u64 = 100;
const INTERVAL_MS: u64 = 10_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn poisson(&mut self, mean: f64) -> u64 {
        let (limit, mut p, mut k) = ((-mean).exp(), 1.0, 0);
        loop {
            p *= self.next();
            if p <= limit {
                return k;
            }
            k += 1;
        }
    }
    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| self.next() < p).count() as u64
    }
}

fn gate(name: &str, judging: Judging, threshold: bool) -> Gate {
    Gate {
        success_condition: threshold.then(|| "result < 0.01".into()),
        interval: Duration::from_secs(INTERVAL_MS / 1000),
        compare: (!threshold).then_some(Compare {
            max_increase_percent: Some(20.0),
            max_increase: None,
        }),
        judging,
        ..Gate::new(name, MetricSource::Builtin(BuiltinMetric::ErrorRate))
    }
}

const JUDGES: [&str; 7] = [
    "Baton threshold, continuous",
    "Baton vs stable, continuous",
    "Baton threshold, interval",
    "Baton vs stable, interval",
    "Flagger-style, threshold 1",
    "Flagger-style, threshold 5",
    "Kayenta-style Mann-Whitney",
];

fn stats(requests: u64, errors: u64) -> RevisionStats {
    let mut s = RevisionStats {
        buckets: vec![0; baton_proxy_api::BUCKETS.len() + 1],
        ..RevisionStats::default()
    };
    s.classes[1] = requests - errors;
    s.classes[4] = errors;
    s
}

/// When each judge first failed the canary (ms from its first request), if it did.
fn run(
    rng: &mut Rng,
    rate: f64,
    weight: f64,
    delta: f64,
    horizon_ms: u64,
) -> [Option<u64>; JUDGES.len()] {
    let gates = [
        gate("t", Judging::Continuous, true),
        gate("c", Judging::Continuous, false),
        gate("t", Judging::Interval, true),
        gate("c", Judging::Interval, false),
    ];
    let mut measurers: Vec<Measurer> = (0..4).map(|_| Measurer::default()).collect();
    let mut out = [None; JUDGES.len()];
    let mut failed_checks = 0;
    let (mut cn, mut ce, mut sn, mut se) = (0u64, 0u64, 0u64, 0u64);
    // Flagger's interval counters; Kayenta's per-second series.
    let (mut fl_n, mut fl_e) = (0u64, 0u64);
    let (mut sec_c, mut sec_s) = ((0u64, 0u64), (0u64, 0u64));
    let (mut series_c, mut series_s) = (Vec::new(), Vec::new());
    let mut now = 0;
    while now <= horizon_ms && out.iter().any(Option::is_none) {
        let due = now % INTERVAL_MS == 0;
        let (c, s) = (stats(cn, ce), stats(sn, se));
        for (i, (g, m)) in gates.iter().zip(measurers.iter_mut()).enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(v) = m.measure("r", g, "c", 1, due, &c, Some(&s), now)
                && v.verdict == Verdict::Fail
            {
                out[i] = Some(now);
            }
        }
        if due && now > 0 {
            if fl_n > 0 && fl_e as f64 / fl_n as f64 >= 0.01 {
                failed_checks += 1;
                if out[4].is_none() {
                    out[4] = Some(now);
                }
                if failed_checks >= 5 && out[5].is_none() {
                    out[5] = Some(now);
                }
            }
            (fl_n, fl_e) = (0, 0);
            if out[6].is_none()
                && let Some(t) = mann_whitney(&series_c, &series_s)
                && t.p_greater < 0.01
            {
                out[6] = Some(now);
            }
        }
        if now % 1000 == 0 && now > 0 {
            if sec_c.0 > 0 && sec_s.0 > 0 {
                series_c.push(sec_c.1 as f64 / sec_c.0 as f64);
                series_s.push(sec_s.1 as f64 / sec_s.0 as f64);
            }
            (sec_c, sec_s) = ((0, 0), (0, 0));
        }
        // The next tick's requests.
        let n = rng.poisson(rate * TICK_MS as f64 / 1000.0);
        let nc = rng.binomial(n, weight);
        let ns = n - nc;
        let ec = rng.binomial(nc, BASE + delta);
        let es = rng.binomial(ns, BASE);
        (cn, ce, sn, se) = (cn + nc, ce + ec, sn + ns, se + es);
        (fl_n, fl_e) = (fl_n + nc, fl_e + ec);
        sec_c = (sec_c.0 + nc, sec_c.1 + ec);
        sec_s = (sec_s.0 + ns, sec_s.1 + es);
        now += TICK_MS;
    }
    out
}

/// The median over all runs, a run that was never failed counting as never.
fn median(xs: &mut [u64], runs: u64) -> Option<u64> {
    xs.sort_unstable();
    xs.get(runs as usize / 2).copied()
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or("—".into(), |m| format!("{:.1}", m as f64 / 1000.0))
}

const LATENCY_JUDGES: [&str; 6] = [
    "Baton p50 vs stable, continuous",
    "Baton p99 vs stable, continuous",
    "Baton p50 vs stable, interval",
    "Baton p99 vs stable, interval",
    "Flagger-style p99 threshold",
    "Kayenta-style Mann-Whitney on p50",
];

/// Stable's latencies: log-normal, median 50 ms, sigma 0.5 (p99 about 160 ms).
const MEDIAN: f64 = 0.05;
const SIGMA: f64 = 0.5;

fn latency(rng: &mut Rng, factor: f64) -> f64 {
    let (u, v) = (rng.next().max(1e-300), rng.next());
    let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
    MEDIAN * (SIGMA * z).exp() * factor
}

fn latency_gate(metric: BuiltinMetric, judging: Judging) -> Gate {
    let mut g = gate("l", judging, false);
    g.metric = MetricSource::Builtin(metric);
    g.compare = Some(Compare {
        max_increase_percent: Some(2.0),
        max_increase: None,
    });
    g
}

fn record(s: &mut RevisionStats, seconds: f64) {
    s.classes[1] += 1;
    let i = baton_proxy_api::BUCKETS
        .iter()
        .position(|b| seconds <= *b)
        .unwrap_or(baton_proxy_api::BUCKETS.len());
    s.buckets[i] += 1;
    s.fine[fine_index(seconds)] += 1;
}

fn fresh() -> RevisionStats {
    RevisionStats {
        buckets: vec![0; baton_proxy_api::BUCKETS.len() + 1],
        fine: vec![0; FINE_BUCKETS],
        ..RevisionStats::default()
    }
}

/// When each latency judge first failed the canary, if it did.
fn run_latency(
    rng: &mut Rng,
    rate: f64,
    weight: f64,
    factor: f64,
    horizon_ms: u64,
) -> [Option<u64>; LATENCY_JUDGES.len()] {
    // The stable p99 a user would have put in a fixed threshold, plus 10 %.
    let fixed_p99 = MEDIAN * (SIGMA * 2.326_f64).exp() * 1.1;
    let gates = [
        latency_gate(BuiltinMetric::LatencyP50, Judging::Continuous),
        latency_gate(BuiltinMetric::LatencyP99, Judging::Continuous),
        latency_gate(BuiltinMetric::LatencyP50, Judging::Interval),
        latency_gate(BuiltinMetric::LatencyP99, Judging::Interval),
    ];
    let mut measurers: Vec<Measurer> = (0..4).map(|_| Measurer::default()).collect();
    let mut out = [None; LATENCY_JUDGES.len()];
    let (mut c, mut s) = (fresh(), fresh());
    let mut interval_c = fresh();
    let (mut sec_c, mut sec_s) = (fresh(), fresh());
    let (mut series_c, mut series_s) = (Vec::new(), Vec::new());
    let mut now = 0;
    while now <= horizon_ms && out.iter().any(Option::is_none) {
        let due = now % INTERVAL_MS == 0;
        for (i, (g, m)) in gates.iter().zip(measurers.iter_mut()).enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(v) = m.measure("r", g, "c", 1, due, &c, Some(&s), now)
                && v.verdict == Verdict::Fail
            {
                out[i] = Some(now);
            }
        }
        if due && now > 0 {
            if out[4].is_none()
                && interval_c.requests() >= 20
                && interval_c.quantile(0.99).is_some_and(|p| p > fixed_p99)
            {
                out[4] = Some(now);
            }
            interval_c = fresh();
            if out[5].is_none()
                && let Some(t) = mann_whitney(&series_c, &series_s)
                && t.p_greater < 0.01
            {
                out[5] = Some(now);
            }
        }
        if now % 1000 == 0 && now > 0 {
            if let (Some(a), Some(b)) = (sec_c.quantile(0.5), sec_s.quantile(0.5)) {
                series_c.push(a);
                series_s.push(b);
            }
            (sec_c, sec_s) = (fresh(), fresh());
        }
        let n = rng.poisson(rate * TICK_MS as f64 / 1000.0);
        for _ in 0..n {
            if rng.next() < weight {
                let l = latency(rng, factor);
                record(&mut c, l);
                record(&mut interval_c, l);
                record(&mut sec_c, l);
            } else {
                let l = latency(rng, 1.0);
                record(&mut s, l);
                record(&mut sec_s, l);
            }
        }
        now += TICK_MS;
    }
    out
}

fn latency_tables(md: &mut String, rng: &mut Rng, null_runs: u64, runs: u64, minutes: u64) {
    let horizon = minutes * 60_000;
    let weights = [0.02, 0.10, 0.50];
    let rates = [50.0, 400.0];
    let _ = writeln!(
        md,
        "\nLatency: false rollbacks of an unchanged version ({null_runs} runs per cell, {minutes} min each; latencies log-normal, median 50 ms, p99 about 160 ms; the Flagger-style threshold is stable's p99 plus 10 %):\n"
    );
    let _ = writeln!(
        md,
        "| judge | {} |",
        rates
            .iter()
            .flat_map(|r| weights
                .iter()
                .map(move |w| format!("{:.0} % of {r} req/s", w * 100.0)))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(
        md,
        "| --- |{}",
        " --- |".repeat(weights.len() * rates.len())
    );
    let mut false_count = vec![vec![0u64; weights.len() * rates.len()]; LATENCY_JUDGES.len()];
    let mut cell = 0;
    for rate in rates {
        for weight in weights {
            for _ in 0..null_runs {
                for (j, t) in run_latency(rng, rate, weight, 1.0, horizon)
                    .iter()
                    .enumerate()
                {
                    if t.is_some() {
                        false_count[j][cell] += 1;
                    }
                }
            }
            cell += 1;
        }
    }
    for (j, name) in LATENCY_JUDGES.iter().enumerate() {
        let cells: Vec<String> = false_count[j]
            .iter()
            .map(|n| format!("{n} ({:.1} %)", *n as f64 * 100.0 / null_runs as f64))
            .collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        md,
        "\nLatency: time from the canary's first request to the judge failing it (median of {runs} runs, seconds; in brackets the share failed within {minutes} min when not all were). Baton's gates: `compare: {{ maxIncreasePercent: 2 }}` on `latency_p50` and on `latency_p99`, `interval: 10s`.\n"
    );
    let _ = writeln!(
        md,
        "| latency + | canary | rate | {} |",
        LATENCY_JUDGES.join(" | ")
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- |{}",
        " --- |".repeat(LATENCY_JUDGES.len())
    );
    for pct in [5.0, 10.0, 30.0, 100.0] {
        for rate in rates {
            for weight in weights {
                let mut times: Vec<Vec<u64>> = vec![Vec::new(); LATENCY_JUDGES.len()];
                for _ in 0..runs {
                    let found = run_latency(rng, rate, weight, 1.0 + pct / 100.0, horizon);
                    for (j, t) in found.iter().enumerate() {
                        if let Some(t) = t {
                            times[j].push(*t);
                        }
                    }
                }
                let cells: Vec<String> = times
                    .iter_mut()
                    .map(|ts| {
                        let found = ts.len();
                        let m = secs(median(ts, runs));
                        if found as u64 == runs {
                            m
                        } else {
                            format!("{m} ({:.0} %)", found as f64 * 100.0 / runs as f64)
                        }
                    })
                    .collect();
                let _ = writeln!(
                    md,
                    "| {pct:.0} % | {:.0} % | {rate} req/s | {} |",
                    weight * 100.0,
                    cells.join(" | ")
                );
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let null_runs = arg("--null-runs", 500);
    let runs = arg("--runs", 50);
    let minutes = arg("--minutes", 10);
    let horizon = minutes * 60_000;
    let mut rng = Rng(arg("--seed", 1));
    let weights = [0.02, 0.10, 0.50];
    let rates = [50.0, 400.0];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "False rollbacks of an unchanged version ({null_runs} runs per cell, {minutes} min of canary each; both revisions fail {:.1} % of requests):\n",
        BASE * 100.0
    );
    let _ = writeln!(
        md,
        "| judge | {} |",
        rates
            .iter()
            .flat_map(|r| weights
                .iter()
                .map(move |w| format!("{:.0} % of {r} req/s", w * 100.0)))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(
        md,
        "| --- |{}",
        " --- |".repeat(weights.len() * rates.len())
    );
    let mut false_rate = vec![vec![0u64; weights.len() * rates.len()]; JUDGES.len()];
    let mut cell = 0;
    for rate in rates {
        for weight in weights {
            for _ in 0..null_runs {
                for (j, t) in run(&mut rng, rate, weight, 0.0, horizon).iter().enumerate() {
                    if t.is_some() {
                        false_rate[j][cell] += 1;
                    }
                }
            }
            cell += 1;
        }
    }
    for (j, name) in JUDGES.iter().enumerate() {
        let cells: Vec<String> = false_rate[j]
            .iter()
            .map(|n| format!("{n} ({:.1} %)", *n as f64 * 100.0 / null_runs as f64))
            .collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        md,
        "\nTime from the canary's first request (every canary request is affected) to the judge failing it: median over {runs} runs, in seconds, and in brackets the share of runs failed within {minutes} min when not all were. Stable fails {:.1} %; the canary that plus the regression.\n",
        BASE * 100.0
    );
    let _ = writeln!(md, "| errors + | canary | rate | {} |", JUDGES.join(" | "));
    let _ = writeln!(md, "| --- | --- | --- |{}", " --- |".repeat(JUDGES.len()));
    for delta in [0.005, 0.01, 0.05, 0.5] {
        for rate in rates {
            for weight in weights {
                let mut times: Vec<Vec<u64>> = vec![Vec::new(); JUDGES.len()];
                for _ in 0..runs {
                    for (j, t) in run(&mut rng, rate, weight, delta, horizon)
                        .iter()
                        .enumerate()
                    {
                        if let Some(t) = t {
                            times[j].push(*t);
                        }
                    }
                }
                let cells: Vec<String> = times
                    .iter_mut()
                    .map(|ts| {
                        let found = ts.len();
                        let m = secs(median(ts, runs));
                        if found as u64 == runs {
                            m
                        } else {
                            format!("{m} ({:.0} %)", found as f64 * 100.0 / runs as f64)
                        }
                    })
                    .collect();
                let _ = writeln!(
                    md,
                    "| {:.1} pp | {:.0} % | {rate} req/s | {} |",
                    delta * 100.0,
                    weight * 100.0,
                    cells.join(" | ")
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\nA canary failing every request (median and slowest of {runs} runs, seconds from its first request):\n"
    );
    let _ = writeln!(md, "| canary | rate | {} |", JUDGES.join(" | "));
    let _ = writeln!(md, "| --- | --- |{}", " --- |".repeat(JUDGES.len()));
    for (weight, rate) in [(0.20, 1500.0), (0.05, 150.0)] {
        let mut times: Vec<Vec<u64>> = vec![Vec::new(); JUDGES.len()];
        for _ in 0..runs {
            for (j, t) in run(&mut rng, rate, weight, 1.0 - BASE, horizon)
                .iter()
                .enumerate()
            {
                if let Some(t) = t {
                    times[j].push(*t);
                }
            }
        }
        let cells: Vec<String> = times
            .iter_mut()
            .map(|ts| {
                let m = median(ts, runs);
                let worst = (ts.len() as u64 == runs)
                    .then(|| ts.last().copied())
                    .flatten();
                format!("{} / {}", secs(m), secs(worst))
            })
            .collect();
        let _ = writeln!(
            md,
            "| {:.0} % | {rate} req/s | {} |",
            weight * 100.0,
            cells.join(" | ")
        );
    }
    if arg("--latency", 1) == 1 {
        latency_tables(
            &mut md,
            &mut rng,
            arg("--latency-null-runs", 200),
            runs,
            minutes,
        );
    }
    print!("{md}");
}
