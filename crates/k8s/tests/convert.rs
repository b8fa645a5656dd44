//! `baton convert` on manifests in the formats of Argo Rollouts and Flagger (the
//! fixtures under `tests/fixtures/`, written for these tests to use every feature of
//! those formats the converter meets): each converts into a Rollout that validates,
//! or names what it could not carry over.

use std::path::PathBuf;

use baton_k8s::cli::parse_cluster;
use baton_k8s::convert::convert;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn every_example_rollout_and_canary_converts_into_a_valid_rollout() {
    let mut seen = 0;
    for dir in ["argo-rollouts", "flagger"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join(dir))
            .expect("fixtures dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read");
            let Ok(out) = convert(&text) else {
                // Files with only templates or Services.
                assert!(
                    !text.contains("kind: Rollout") && !text.contains("kind: Canary"),
                    "{}",
                    f.display()
                );
                continue;
            };
            for c in out {
                seen += 1;
                if let Err(e) = parse_cluster(std::slice::from_ref(&c.rollout)) {
                    panic!(
                        "{} ({}) converts into an invalid Rollout: {e}\n{}\nnotes: {:?}",
                        f.display(),
                        c.name,
                        serde_json::to_string_pretty(&c.rollout).unwrap_or_default(),
                        c.notes
                    );
                }
            }
        }
    }
    assert_eq!(
        seen, 12,
        "every Rollout and Canary in the fixtures converted"
    );
}

#[test]
fn what_does_not_carry_over_is_named() {
    let notes = |rel: &str| -> Vec<String> {
        convert(&read(rel))
            .expect("convert")
            .into_iter()
            .flat_map(|c| c.notes)
            .collect()
    };
    let has = |notes: &[String], text: &str| notes.iter().any(|n| n.contains(text));
    let n = notes("argo-rollouts/experiment-step.yaml");
    assert!(has(&n, "(experiment) has no Baton equivalent"), "{n:?}");
    let n = notes("argo-rollouts/istio-subset-split.yaml");
    assert!(has(&n, "destinationRule"), "{n:?}");
    let n = notes("argo-rollouts/notifications-canary.yaml");
    assert!(
        has(
            &n,
            "annotation notifications.argoproj.io/subscribe.on-rollout-aborted"
        ),
        "{n:?}"
    );
    let n = notes("argo-rollouts/rolling-update.yaml");
    assert!(has(&n, "strategy.canary.maxSurge"), "{n:?}");
    let n = notes("flagger/istio-abtest.yaml");
    assert!(has(&n, "A/B testing"), "{n:?}");
    assert!(has(&n, "autoscalerRef"), "{n:?}");
    let n = notes("flagger/istio-canary.yaml");
    assert!(has(&n, "webhook traffic (rollout)"), "{n:?}");
    assert!(has(&n, "webhook acceptance (pre-rollout)"), "{n:?}");
    // Background analysis with its template in the input becomes analysis steps; a Job
    // provider is named, not dropped silently.
    let text = format!(
        "{}\n---\n{}",
        read("argo-rollouts/background-analysis.yaml"),
        read("argo-rollouts/analysis-templates.yaml"),
    );
    let n: Vec<String> = convert(&text)
        .expect("convert")
        .into_iter()
        .flat_map(|c| c.notes)
        .collect();
    assert!(has(&n, "its Job became a command gate"), "{n:?}");
    let search = convert(&text).expect("convert").remove(0).rollout;
    assert_eq!(search["spec"]["jobs"]["image"], "busybox:1.36", "{search}");
    let gate = &search["spec"]["analysis"]["gates"][0];
    assert_eq!(
        gate["metric"]["command"]["command"],
        serde_json::json!(["sh", "-c", "wget -qO- http://inventory-canary/healthz"]),
        "the Job's command, as data: {gate}"
    );
    assert!(gate.get("__jobImage").is_none(), "{gate}");
    if let Err(e) = baton_k8s::cli::parse_cluster(std::slice::from_ref(&search)) {
        panic!("the converted Rollout validates: {e}");
    }
    // Templates in the same input are used, namespaced and cluster-scoped alike.
    let text = format!(
        "{}\n---\n{}\n---\n{}",
        read("argo-rollouts/analysis-step.yaml"),
        read("argo-rollouts/analysis-templates.yaml"),
        read("argo-rollouts/cluster-analysis-templates.yaml")
    );
    let c = convert(&text).expect("convert");
    let n: Vec<String> = c.iter().flat_map(|c| c.notes.clone()).collect();
    assert!(has(&n, "its Job became a command gate"), "{n:?}");
    assert!(
        !has(&n, "is not in the input"),
        "templates in the input are found: {n:?}"
    );
}

#[test]
fn steps_services_and_routing_carry_over() {
    let c = convert(&read("flagger/istio-canary.yaml"))
        .expect("convert")
        .remove(0);
    let spec = &c.rollout["spec"];
    assert_eq!(spec["workloadRef"]["name"], "storefront");
    assert_eq!(spec["progressDeadlineSeconds"], 300);
    let weights: Vec<u64> = spec["strategy"]["canary"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["setWeight"].as_u64())
        .collect();
    assert_eq!(weights, vec![15, 30, 45, 60]);
    assert_eq!(
        spec["strategy"]["canary"]["trafficRouting"]["istio"]["virtualService"],
        "storefront"
    );
    assert_eq!(
        spec["strategy"]["canary"]["stableService"],
        "storefront-primary"
    );
    assert_eq!(
        spec["analysis"]["gates"][0]["successCondition"],
        "result >= 99.5"
    );
    assert_eq!(
        spec["analysis"]["gates"][1]["successCondition"],
        "result <= 250"
    );
    assert_eq!(spec["analysis"]["gates"][0]["interval"], "20s");
    assert_eq!(
        spec["analysis"]["gates"][0]["failureLimit"], 3,
        "threshold 4: the fourth failure rolls back"
    );

    let c = convert(&read("flagger/linkerd-canary-steps.yaml"))
        .expect("convert")
        .remove(0);
    let steps = c.rollout["spec"]["strategy"]["canary"]["steps"]
        .as_array()
        .expect("steps")
        .clone();
    let weights: Vec<u64> = steps
        .iter()
        .filter_map(|s| s["setWeight"].as_u64())
        .collect();
    assert_eq!(weights, vec![1, 2, 5, 10, 20, 40, 80]);
    assert!(
        c.rollout["spec"]["analysis"]["gates"][0]["metric"]["prometheus"]["query"]
            .as_str()
            .expect("query")
            .contains("response_total{namespace=\"finance\",deployment=~\"ledger.*\""),
        "{}",
        c.rollout
    );

    let c = convert(&read("argo-rollouts/canary.yaml"))
        .expect("convert")
        .remove(0);
    let steps = &c.rollout["spec"]["strategy"]["canary"]["steps"];
    assert_eq!(steps[1], serde_json::json!({"pause": {}}));
    assert_eq!(steps[3], serde_json::json!({"pause": {"duration": "1m"}}));
    assert_eq!(
        steps[5],
        serde_json::json!({"pause": {"duration": "45s"}}),
        "a bare number is seconds"
    );
    assert_eq!(c.rollout["spec"]["revisionHistoryLimit"], 5);

    let c = convert(&read("argo-rollouts/workload-ref.yaml"))
        .expect("convert")
        .remove(0);
    assert_eq!(c.rollout["spec"]["workloadRef"]["kind"], "Deployment");
    assert_eq!(c.rollout["spec"]["workloadRef"]["name"], "gateway");

    let c = convert(&read("argo-rollouts/bluegreen.yaml"))
        .expect("convert")
        .remove(0);
    let bg = &c.rollout["spec"]["strategy"]["blueGreen"];
    assert_eq!(bg["autoPromote"], false);
    assert!(
        bg["activeService"].is_string() && bg["previewService"].is_string(),
        "{bg}"
    );
}

#[test]
fn an_argo_prometheus_template_with_arguments_becomes_a_gate() {
    let text = r#"
apiVersion: argoproj.io/v1alpha1
kind: AnalysisTemplate
metadata: {name: success-rate}
spec:
  args: [{name: service-name}]
  metrics:
  - name: success-rate
    interval: 30s
    count: 3
    failureLimit: 1
    successCondition: result[0] >= 0.95
    provider:
      prometheus:
        address: http://prometheus.monitoring:9090
        query: sum(rate(http_requests_total{service="{{args.service-name}}",code!~"5.."}[1m])) / sum(rate(http_requests_total{service="{{args.service-name}}"}[1m]))
---
apiVersion: argoproj.io/v1alpha1
kind: Rollout
metadata: {name: trade, namespace: exchange}
spec:
  replicas: 3
  selector: {matchLabels: {app: trade}}
  template: {metadata: {labels: {app: trade}}, spec: {containers: [{name: trade, image: "trade:v2"}]}}
  strategy:
    canary:
      canaryService: trade-canary
      stableService: trade-stable
      trafficRouting:
        plugins:
          argoproj-labs/gatewayAPI: {httpRoute: trade, namespace: exchange}
      steps:
      - setWeight: 10
      - pause: {duration: 1m}
      - analysis:
          templates: [{templateName: success-rate}]
          args: [{name: service-name, value: trade-canary}]
      - pause: {}
"#;
    let c = convert(text).expect("convert").remove(0);
    assert!(c.notes.is_empty(), "{:?}", c.notes);
    let spec = &c.rollout["spec"];
    let gate = &spec["analysis"]["gates"][0];
    assert_eq!(gate["successCondition"], "result >= 0.95");
    assert!(
        gate["metric"]["prometheus"]["query"]
            .as_str()
            .expect("query")
            .contains("service=\"trade-canary\"")
    );
    assert_eq!(gate["count"], 3);
    assert_eq!(
        spec["strategy"]["canary"]["trafficRouting"]["gatewayAPI"]["httpRoute"],
        "trade"
    );
    assert_eq!(
        spec["strategy"]["canary"]["steps"][3],
        serde_json::json!({"pause": {}})
    );
    parse_cluster(std::slice::from_ref(&c.rollout)).expect("valid");
}

/// Nothing in the repository reads or cites files beside it: every fixture a test uses
/// is the project's own.
#[test]
fn the_repository_refers_to_nothing_outside_it() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // Spelled in pieces so that this file does not match itself.
    let outside = [["..", "/shared/"].concat(), ["/work", "/shared"].concat()];
    let mut stack = vec![root.clone()];
    let mut found = Vec::new();
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() {
                if name != "target" && name != ".git" {
                    stack.push(path);
                }
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue; // not text
            };
            files += 1;
            for (n, line) in text.lines().enumerate() {
                if outside.iter().any(|o| line.contains(o.as_str())) {
                    found.push(format!("{}:{}: {line}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        files > 100,
        "walked only {files} files from {}",
        root.display()
    );
    assert!(found.is_empty(), "{}", found.join("\n"));
}
