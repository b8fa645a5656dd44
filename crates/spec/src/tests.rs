use super::*;

const CANARY: &str = include_str!("../../../examples/hello/canary.yaml");
const BLUE_GREEN: &str = include_str!("../../../examples/hello/blue-green.yaml");

fn fields(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => vec![],
        Err(SpecErrors(e)) => e.into_iter().map(|e| e.field).collect(),
    }
}

#[test]
fn shipped_examples_are_valid() {
    let c = parse(CANARY).expect("canary example");
    assert_eq!(c[0].metadata.name, "hello");
    let steps = &c[0].spec.strategy.canary.as_ref().expect("canary").steps;
    assert_eq!(steps[0], Step::SetWeight(10));
    assert_eq!(
        steps[1],
        Step::Pause(Pause {
            duration: Some(Duration::from_secs(5))
        })
    );
    let bg = parse(BLUE_GREEN).expect("blue-green example");
    let bgs = bg[0].spec.strategy.blue_green.as_ref().expect("blueGreen");
    assert_eq!(bgs.retain_previous, Duration::from_secs(3600));
    assert_eq!(bgs.smoke.len(), 2);
    assert_eq!(bgs.smoke[0].method, "GET");
}

#[test]
fn shipped_exchange_rollouts_are_valid_and_say_what_their_comments_promise() {
    let trade = parse(include_str!("../../../examples/exchange/baton/trade.yaml")).expect("trade");
    let canary = trade[0]
        .spec
        .strategy
        .canary
        .as_ref()
        .expect("trade is a canary");
    let weights: Vec<u32> = canary
        .steps
        .iter()
        .filter_map(|s| match s {
            crate::Step::SetWeight(w) => Some(*w),
            _ => None,
        })
        .collect();
    assert_eq!(
        weights,
        vec![2, 4, 8, 16, 32, 64],
        "2 %, doubling every step"
    );
    assert!(trade[0].spec.traffic.shield_canary);
    let latency = trade[0]
        .spec
        .analysis
        .gates
        .iter()
        .find(|g| g.name == "p99-vs-stable")
        .expect("a latency gate");
    let st = latency.statistical.as_ref().expect("judged statistically");
    assert_eq!(
        (st.confidence, st.tolerance),
        (0.99, 0.1),
        "99 %, over 10 %"
    );
    assert!(latency.compare.is_none());
    let user = parse(include_str!("../../../examples/exchange/baton/user.yaml")).expect("user");
    let bg = user[0]
        .spec
        .strategy
        .blue_green
        .as_ref()
        .expect("user is blue-green");
    assert_eq!(bg.retain_previous, Duration::from_secs(3600));
    assert!(
        bg.smoke
            .iter()
            .any(|s| s.method == "POST" && s.path == "/login")
    );
    let notification = parse(include_str!(
        "../../../examples/exchange/baton/notification.yaml"
    ))
    .expect("notification");
    assert_eq!(notification[0].metadata.name, "notification");
}

#[test]
fn type_errors_name_the_field_path() {
    let bad = CANARY.replace("setWeight: 25", "setWeight: lots");
    assert_eq!(
        fields(&bad),
        vec!["spec.strategy.canary.steps[3].setWeight"]
    );
    let unknown = CANARY.replace("replicas: 2", "replicas: 2\n  replicaz: 3");
    let f = fields(&unknown);
    assert_eq!(f.len(), 1);
    assert!(f[0].starts_with("spec"), "{f:?}");
}

#[test]
fn semantic_errors_are_all_reported() {
    let bad = CANARY
        .replace("replicas: 2", "replicas: 0")
        .replace("127.0.0.1:8080", "localhost")
        .replace("setWeight: 50", "setWeight: 150")
        .replace(
            "analysis: { gates: [errors, p99] }\n        - setWeight: 25",
            "analysis: { gates: [nope] }\n        - setWeight: 25",
        )
        .replace("result <= 0.01", "result <=");
    let f = fields(&bad);
    assert_eq!(
        f,
        vec![
            "spec.replicas",
            "spec.traffic.listen",
            "spec.strategy.canary.steps[2].analysis.gates[0]",
            "spec.strategy.canary.steps[5].setWeight",
            "spec.analysis.gates[0].successCondition",
        ]
    );
}

#[test]
fn exactly_one_strategy() {
    let two = BLUE_GREEN.replace(
        "    blueGreen:",
        "    rolling: { maxSurge: 1 }\n    blueGreen:",
    );
    assert_eq!(fields(&two), vec!["spec.strategy"]);
}

#[test]
fn durations_parse_in_human_forms() {
    for (text, ms) in [
        ("90s", 90_000),
        ("1m30s", 90_000),
        ("500ms", 500),
        ("2", 2000),
    ] {
        let d: Duration = text.parse().expect(text);
        assert_eq!(d.as_millis(), ms, "{text}");
    }
    assert!("soon".parse::<Duration>().is_err());
}

#[test]
fn multi_document_names_and_listeners_must_be_unique() {
    let both = format!("{CANARY}\n---\n{CANARY}");
    let f = fields(&both);
    assert_eq!(
        f,
        vec![
            "documents[1].metadata.name",
            "documents[1].spec.traffic.listen"
        ]
    );
    let ok = format!("{CANARY}\n---\n{BLUE_GREEN}");
    assert_eq!(parse(&ok).expect("two rollouts").len(), 2);
}

#[test]
fn revision_hash_follows_run_only() {
    let a = parse(CANARY).expect("valid").remove(0);
    let mut b = a.clone();
    b.spec.replicas = 5;
    assert_eq!(a.spec.run.revision_hash(), b.spec.run.revision_hash());
    b.spec.run.env.insert("APP_VERSION".into(), "v2".into());
    assert_ne!(a.spec.run.revision_hash(), b.spec.run.revision_hash());
    assert_eq!(a.spec.run.revision_hash().len(), 10);
}

#[test]
fn empty_and_broken_yaml_are_errors() {
    assert_eq!(fields(""), vec!["(document)"]);
    assert_eq!(fields("a: [1, 2"), vec!["(yaml)"]);
}

#[test]
fn the_readme_spec_is_valid() {
    let readme = include_str!("../../../README.md");
    let section = readme
        .find("\n## The spec")
        .expect("README has a spec section");
    let start = section
        + readme[section..]
            .find("```yaml\n")
            .expect("a yaml block there")
        + 8;
    let len = readme[start..].find("```").expect("block ends");
    let rollouts = parse(&readme[start..start + len]).expect("the README's spec parses");
    let r = &rollouts[0];
    assert_eq!(r.spec.replicas, 2);
    assert_eq!(r.spec.run.working_dir.as_deref(), Some("."));
    assert_eq!(r.spec.analysis.gates[0].min_requests, 20);
}

#[test]
fn notifications_are_checked() {
    let with = |n: &str| format!("{CANARY}  notifications:\n{n}");
    let ok = with(
        "    - { name: oncall, url: \"${HOOK_URL}\", format: slack }\n    - { url: \"http://127.0.0.1:9/x?token=${T}\", events: [rolledBack] }\n",
    );
    let r = parse(&ok).expect("valid notifications");
    assert_eq!(r[0].spec.notifications.len(), 2);
    assert_eq!(r[0].spec.notifications[0].events.len(), 6);
    assert_eq!(r[0].spec.notifications[1].name, "webhook");
    let bad = with("    - { url: \"ftp://x\", events: [], headers: { \"bad header\": x } }\n");
    assert_eq!(
        fields(&bad),
        vec![
            "spec.notifications[0].url",
            "spec.notifications[0].headers.bad header",
            "spec.notifications[0].events"
        ]
    );
}

/// The canary example with its steps replaced by `canary` (YAML at the canary's
/// indentation).
fn with_canary(canary: &str) -> String {
    let start = CANARY.find("      steps:").expect("steps");
    let end = CANARY.find("  analysis:").expect("analysis");
    format!("{}{canary}\n{}", &CANARY[..start], &CANARY[end..])
}

fn weights(steps: &[Step]) -> Vec<u32> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::SetWeight(w) => Some(*w),
            _ => None,
        })
        .collect()
}

#[test]
fn the_progressive_shorthand_expands_into_steps() {
    let r = parse(&with_canary(
        "      progressive: { start: 2, factor: 2, every: 90s }",
    ))
    .expect("valid");
    let c = r[0].spec.strategy.canary.as_ref().expect("canary");
    assert_eq!(c.progressive, None, "expanded, not kept beside the steps");
    assert_eq!(weights(&c.steps), vec![2, 4, 8, 16, 32, 64]);
    // Each weight: held, then judged by every gate when none are named.
    assert_eq!(
        c.steps[..3],
        [
            Step::SetWeight(2),
            Step::Pause(Pause {
                duration: Some(Duration::from_secs(90))
            }),
            Step::Analysis(AnalysisStep {
                gates: vec!["errors".into(), "p99".into()]
            }),
        ]
    );
    assert_eq!(c.steps.len(), 18);

    let r = parse(&with_canary(
        "      progressive: { start: 10, factor: 1.5, every: 5s, gates: [errors] }",
    ))
    .expect("valid");
    let c = r[0].spec.strategy.canary.as_ref().expect("canary");
    assert_eq!(weights(&c.steps), vec![10, 15, 23, 35, 53, 80]);
    assert!(c.steps.contains(&Step::Analysis(AnalysisStep {
        gates: vec!["errors".into()]
    })));
    // A factor that rounds back to the same weight still moves on.
    let r = parse(&with_canary(
        "      progressive: { start: 97, factor: 1.001, every: 1s }",
    ))
    .expect("valid");
    let c = r[0].spec.strategy.canary.as_ref().expect("canary");
    assert_eq!(weights(&c.steps), vec![97, 98, 99]);
}

#[test]
fn a_bad_progressive_shorthand_names_each_field() {
    let f = fields(&with_canary(
        "      steps: [{ setWeight: 10 }]\n      progressive: { start: 0, factor: 1, every: 0s, gates: [nope] }",
    ));
    for field in [
        "spec.strategy.canary.progressive",
        "spec.strategy.canary.progressive.start",
        "spec.strategy.canary.progressive.factor",
        "spec.strategy.canary.progressive.every",
        "spec.strategy.canary.progressive.gates[0]",
    ] {
        assert!(f.iter().any(|x| x == field), "{field} missing from {f:?}");
    }
}

#[test]
fn mirror_methods_default_to_none_listed_and_are_checked() {
    let with = |m: &str| {
        CANARY.replace(
            "    listen: 127.0.0.1:8080",
            &format!("    listen: 127.0.0.1:8080\n{m}"),
        )
    };
    let r = parse(CANARY).expect("valid");
    assert!(
        r[0].spec.traffic.mirror_methods.is_empty(),
        "empty: the safe methods"
    );
    let r = parse(&with(
        "    mirrorPercent: 10\n    mirrorMethods: [GET, PUT]",
    ))
    .expect("valid");
    assert_eq!(r[0].spec.traffic.mirror_methods, ["GET", "PUT"]);
    assert_eq!(
        fields(&with("    mirrorMethods: [GET, put, \"\"]")),
        vec![
            "spec.traffic.mirrorMethods[1]",
            "spec.traffic.mirrorMethods[2]"
        ]
    );
}

#[test]
fn numbers_above_their_maximum_are_refused_by_name() {
    const HUGE: &str = "18446744073709551615";
    let canary = CANARY
        .replace(
            "minReadySeconds: 1",
            &format!(
                "minReadySeconds: {HUGE}\n  progressDeadlineSeconds: {HUGE}\n  revisionHistoryLimit: 101"
            ),
        )
        .replace("failureThreshold: 2", "failureThreshold: 1001")
        .replacen("{ duration: 5s }", &format!("{{ duration: {HUGE} }}"), 1)
        .replacen(
            "interval: 1s\n        minRequests: 20",
            &format!(
                "interval: 31d\n        minRequests: 1000001\n        initialDelay: {HUGE}\n        count: 1001\n        failureLimit: 4294967295\n        inconclusiveLimit: 1001\n        consecutiveErrorLimit: 1001"
            ),
            1,
        )
        .replace(
            "  rollback:",
            "      - { name: prom, metric: { prometheus: { address: http://p:9090, query: up, timeout: 31d } }, successCondition: result > 0 }\n      - { name: web, metric: { web: { url: http://w/, timeout: 31d } }, successCondition: result > 0 }\n      - { name: cmd, metric: { command: { command: [\"true\"], timeout: 31d } } }\n      - { name: burn, metric: { builtin: error_rate }, burnRate: { slo: 0.999, windows: [{ long: 31d, short: 31d, factor: 1 }] } }\n  rollback:",
        );
    let f = fields(&canary);
    for field in [
        "spec.probes.readiness.failureThreshold",
        "spec.minReadySeconds",
        "spec.progressDeadlineSeconds",
        "spec.revisionHistoryLimit",
        "spec.strategy.canary.steps[1].pause.duration",
        "spec.analysis.gates[0].interval",
        "spec.analysis.gates[0].initialDelay",
        "spec.analysis.gates[0].count",
        "spec.analysis.gates[0].failureLimit",
        "spec.analysis.gates[0].inconclusiveLimit",
        "spec.analysis.gates[0].consecutiveErrorLimit",
        "spec.analysis.gates[0].minRequests",
        "spec.analysis.gates[2].metric.prometheus.timeout",
        "spec.analysis.gates[3].metric.web.timeout",
        "spec.analysis.gates[4].metric.command.timeout",
        "spec.analysis.gates[5].burnRate.windows[0].long",
        "spec.analysis.gates[5].burnRate.windows[0].short",
    ] {
        assert!(f.iter().any(|x| x == field), "{field} missing from {f:?}");
    }
    let Err(SpecErrors(errors)) = parse(&canary) else {
        panic!("refused")
    };
    let deadline = errors
        .iter()
        .find(|e| e.field == "spec.progressDeadlineSeconds")
        .expect("deadline");
    assert_eq!(
        deadline.reason,
        format!("must be at most 30 days (2592000 s), got {HUGE} s")
    );

    let bg = BLUE_GREEN.replace("retainPrevious: 1h", "retainPrevious: 721h");
    assert_eq!(fields(&bg), vec!["spec.strategy.blueGreen.retainPrevious"]);
    let rolling = with_canary("      x: 1").replace(
        "    canary:\n      x: 1\n",
        "    rolling: { maxSurge: 4294967295, maxUnavailable: 101 }\n",
    );
    let f = fields(&rolling);
    for field in [
        "spec.strategy.rolling.maxSurge",
        "spec.strategy.rolling.maxUnavailable",
    ] {
        assert!(f.iter().any(|x| x == field), "{field} missing from {f:?}");
    }
    // At the maximum, accepted.
    let at_max = BLUE_GREEN.replace("retainPrevious: 1h", "retainPrevious: 720h");
    parse(&at_max).expect("30 days is allowed");
}

/// Type errors do not hide each other, nor the range errors the schema knows: each is
/// listed with its path, in path order.
#[test]
fn every_type_error_is_listed_with_its_path() {
    let bad = CANARY
        .replace("replicas: 2", "replicas: -2\n  replicaz: 1")
        .replace(
            "command: [\"./target/release/hello\", \"--port\", \"{port}\"]",
            "command: []",
        )
        .replace("setWeight: 10", "setWeight: 150")
        .replacen("duration: 5s", "duration: soon", 1)
        .replacen("duration: 5s", "duration: -3", 1)
        .replace("{ builtin: latency_p99 }", "{ builtin: bogus }")
        .replace("- setWeight: 50", "- { setWeight: 50, pause: {} }")
        .replacen("minRequests: 20", "minRequests: lots", 1);
    let Err(SpecErrors(errors)) = parse(&bad) else {
        panic!("refused")
    };
    let got: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| (e.field.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "spec.analysis.gates[0].minRequests",
                "expected an integer, got the string \"lots\""
            ),
            (
                "spec.analysis.gates[1].metric.builtin",
                "expected \"latency_p50\" or \"latency_p90\" or \"latency_p99\" or \"error_rate\", got the string \"bogus\""
            ),
            ("spec.replicas", "must be at least 1, got -2"),
            (
                "spec.replicaz",
                "is not a field here; expected one of analysis, minReadySeconds, notifications, probes, progressDeadlineSeconds, replicas, revisionHistoryLimit, rollback, run, shutdown, strategy, traffic"
            ),
            ("spec.run.command", "must not be empty"),
            (
                "spec.strategy.canary.steps[0].setWeight",
                "must be at most 100, got 150"
            ),
            (
                "spec.strategy.canary.steps[1].pause.duration",
                "invalid duration \"soon\" (expected number at 0); write e.g. 90s, 1m30s, 500ms or 1h"
            ),
            (
                "spec.strategy.canary.steps[4].pause.duration",
                "a duration cannot be negative"
            ),
            (
                "spec.strategy.canary.steps[5]",
                "must have exactly one of the keys setWeight, pause, analysis, got an object"
            ),
        ]
    );
    // Several documents: each one's problems, under its own prefix.
    let both = format!(
        "{bad}\n---\n{}",
        BLUE_GREEN.replace("replicas: 2", "replicas: x")
    );
    let f = fields(&both);
    assert_eq!(f.len(), 10, "{f:?}");
    assert!(
        f.contains(&"documents[1].spec.replicas".to_string()),
        "{f:?}"
    );
    assert!(
        f.contains(&"documents[0].spec.run.command".to_string()),
        "{f:?}"
    );
}

#[test]
fn the_rollout_schema_compiles() {
    let shape = rollout_shape();
    assert!(shape.is_ok(), "{:?}", shape.err());
}

#[test]
fn a_missing_field_and_a_wrong_type_deep_inside_are_both_named() {
    let bad = CANARY
        .replace("    listen: 127.0.0.1:8080\n", "    shieldCanary: maybe\n")
        .replace("{ builtin: error_rate }", "{ prometheus: { address: 5 } }");
    assert_eq!(
        fields(&bad),
        vec![
            "spec.analysis.gates[0].metric.prometheus.address",
            "spec.analysis.gates[0].metric.prometheus.query",
            "spec.traffic.listen",
            "spec.traffic.shieldCanary",
        ]
    );
}

/// A spec the kernel could never start is refused by field, not accepted and then
/// failing every start.
#[test]
fn arguments_and_env_too_large_to_exec_are_refused() {
    let big = "x".repeat(900 * 1024);
    let spec = CANARY.replace(
        "      APP_VERSION: v1",
        &format!("      APP_VERSION: v1\n      HUGE: \"{big}\""),
    );
    assert_eq!(fields(&spec), vec!["spec.run.env.HUGE"]);
    let under = CANARY.replace(
        "      APP_VERSION: v1",
        &format!(
            "      APP_VERSION: v1\n      FINE: \"{}\"",
            "x".repeat(100 * 1024)
        ),
    );
    parse(&under).expect("100 KiB is fine");
}

#[test]
fn pre_traffic_names_gates_that_need_no_requests() {
    let with = |pre: &str| {
        CANARY.replace(
            "  analysis:\n    gates:\n",
            &format!("  analysis:\n    preTraffic: {pre}\n    gates:\n      - name: verify\n        metric: {{ command: {{ command: [cosign, verify] }} }}\n"),
        )
    };
    assert_eq!(fields(&with("[verify]")), Vec::<String>::new());
    assert_eq!(
        fields(&with("[verify, nope, errors]")),
        vec!["spec.analysis.preTraffic[1]", "spec.analysis.preTraffic[2]"]
    );
    let err = parse(&with("[errors]")).expect_err("builtin");
    assert!(
        err.0[0].reason.contains("there are none before traffic"),
        "{}",
        err.0[0].reason
    );
}

#[test]
fn a_new_gate_has_the_defaults_a_spec_gets() {
    let text = CANARY.replace(
        "  analysis:\n    gates:\n",
        "  analysis:\n    gates:\n      - name: bare\n        metric: { command: { command: [\"true\"] } }\n",
    );
    let r = parse(&text).expect("valid").remove(0);
    let parsed = r
        .spec
        .analysis
        .gates
        .iter()
        .find(|g| g.name == "bare")
        .expect("the gate");
    assert_eq!(*parsed, Gate::new("bare", parsed.metric.clone()));
}

#[test]
fn backend_protocol_is_http1_unless_h2c_is_asked_and_nothing_else_parses() {
    let with = |p: &str| {
        CANARY.replace(
            "    listen: 127.0.0.1:8080",
            &format!("    listen: 127.0.0.1:8080\n    backendProtocol: {p}"),
        )
    };
    let r = parse(CANARY).expect("valid");
    assert_eq!(
        r[0].spec.traffic.backend_protocol,
        crate::BackendProtocol::Http1
    );
    let r = parse(&with("h2c")).expect("valid");
    assert_eq!(
        r[0].spec.traffic.backend_protocol,
        crate::BackendProtocol::H2c
    );
    let err = parse(&with("http3"))
        .expect_err("not a protocol")
        .to_string();
    assert!(
        err.contains("backendProtocol") && err.contains("h2c"),
        "names the field and what it takes: {err}"
    );
}
