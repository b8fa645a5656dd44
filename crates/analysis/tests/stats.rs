//! The statistics against SciPy's answers on the same samples.

use baton_analysis::stats::{bootstrap_quantile_diff, fisher_greater, mann_whitney};

fn fixtures() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/stats.json")).expect("fixtures parse")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 + 1e-6 * b.abs()
}

#[test]
fn mann_whitney_matches_scipy() {
    for case in fixtures()["mannWhitney"].as_array().expect("cases") {
        let name = case["name"].as_str().unwrap_or("");
        let r = mann_whitney(&floats(&case["x"]), &floats(&case["y"])).expect("non-empty");
        let want = |k: &str| case[k].as_f64().expect("number");
        assert!(close(r.u, want("u")), "{name}: U {} vs {}", r.u, want("u"));
        assert!(
            close(r.p_two_sided, want("pTwoSided")),
            "{name}: p {} vs {}",
            r.p_two_sided,
            want("pTwoSided")
        );
        assert!(
            close(r.p_greater, want("pGreater")),
            "{name}: p> {} vs {}",
            r.p_greater,
            want("pGreater")
        );
    }
}

#[test]
fn fisher_matches_scipy() {
    for case in fixtures()["fisher"].as_array().expect("cases") {
        let t: Vec<u64> = case["table"]
            .as_array()
            .expect("table")
            .iter()
            .map(|v| v.as_u64().expect("count"))
            .collect();
        let p = fisher_greater(t[0], t[1], t[2], t[3]);
        let want = case["pGreater"].as_f64().expect("p");
        assert!(close(p, want), "{t:?}: {p} vs {want}");
    }
}

#[test]
fn bootstrap_sees_a_fatter_tail_that_the_median_hides() {
    // Same median, but one canary request in ten is slow: p99 moves, the median not.
    let stable: Vec<f64> = (0..500).map(|i| 0.05 + (i % 10) as f64 * 0.001).collect();
    let canary: Vec<f64> = (0..500)
        .map(|i| {
            if i % 10 == 9 {
                0.4
            } else {
                0.05 + (i % 10) as f64 * 0.001
            }
        })
        .collect();
    let (lo, _) = bootstrap_quantile_diff(&canary, &stable, 0.99, 0.95, 500).expect("interval");
    assert!(lo > 0.2, "p99 difference interval starts at {lo}");
    let (lo, hi) = bootstrap_quantile_diff(&stable, &stable, 0.99, 0.95, 500).expect("interval");
    assert!(
        lo <= 0.0 && hi >= 0.0,
        "no difference with itself: [{lo}, {hi}]"
    );
}
