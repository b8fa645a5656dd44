//! `baton convert`: Argo Rollouts `Rollout`s (with the AnalysisTemplates in the same
//! input) and Flagger `Canary`s into Baton's cluster Rollouts. What has no Baton
//! equivalent is left out and named in the notes, never silently dropped.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// One converted resource and what could not be carried over.
#[derive(Debug, Clone)]
pub struct Converted {
    pub name: String,
    pub rollout: Value,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the input is not YAML: {0}")]
    Yaml(String),
    #[error("no Argo Rollouts Rollout or Flagger Canary in the input")]
    Nothing,
}

fn kind_of(doc: &Value) -> (&str, &str) {
    (
        doc["apiVersion"].as_str().unwrap_or(""),
        doc["kind"].as_str().unwrap_or(""),
    )
}

/// Converts every Rollout and Canary in `text`; other documents only inform (analysis
/// templates) or are passed over.
pub fn convert(text: &str) -> Result<Vec<Converted>, ConvertError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ConvertError::Yaml(e.to_string()))?;
    let mut templates: BTreeMap<(String, bool), Value> = BTreeMap::new();
    for d in &docs {
        match kind_of(d) {
            (api, "AnalysisTemplate") if api.starts_with("argoproj.io/") => {
                templates.insert(
                    (d["metadata"]["name"].as_str().unwrap_or("").into(), false),
                    d["spec"].clone(),
                );
            }
            (api, "ClusterAnalysisTemplate") if api.starts_with("argoproj.io/") => {
                templates.insert(
                    (d["metadata"]["name"].as_str().unwrap_or("").into(), true),
                    d["spec"].clone(),
                );
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for d in &docs {
        match kind_of(d) {
            (api, "Rollout") if api.starts_with("argoproj.io/") => out.push(argo(d, &templates)),
            (api, "Canary") if api.starts_with("flagger.app/") => out.push(flagger(d)),
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(ConvertError::Nothing);
    }
    Ok(out)
}

fn base(name: &str, meta: &Value) -> Value {
    let mut m = json!({"name": name});
    if let Some(ns) = meta["namespace"].as_str() {
        m["namespace"] = json!(ns);
    }
    if let Some(l) = meta.get("labels").filter(|l| l.is_object()) {
        m["labels"] = l.clone();
    }
    json!({"apiVersion": "baton.dev/v1alpha1", "kind": "Rollout", "metadata": m, "spec": {}})
}

/// A duration as Baton writes it: numbers are seconds, strings pass through.
fn duration(v: &Value) -> Option<Value> {
    match v {
        Value::Number(n) => Some(json!(format!("{}s", n))),
        Value::String(s) if !s.is_empty() => Some(json!(s)),
        _ => None,
    }
}

/// Argo's expr conditions, where they mean the same in Baton's: `result[0]` is the
/// first (only) value Baton measures.
fn condition(c: &str) -> Option<String> {
    let c = c.replace("result[0]", "result");
    baton_spec::validate::check_condition(&c).ok().map(|_| c)
}

/// One Argo metric as a Baton gate, or why not.
fn argo_metric(m: &Value, args: &BTreeMap<String, String>) -> Result<Value, String> {
    let name = m["name"].as_str().unwrap_or("metric").to_string();
    let fill = |s: &str| {
        let mut s = s.to_string();
        for (k, v) in args {
            s = s.replace(&format!("{{{{args.{k}}}}}"), v);
        }
        s
    };
    let provider = &m["provider"];
    let metric = if let Some(p) = provider.get("prometheus") {
        let query = fill(p["query"].as_str().unwrap_or(""));
        if query.contains("{{args.") {
            return Err(format!(
                "metric {name}: its query uses an argument with no value here"
            ));
        }
        json!({"prometheus": {"address": p["address"].as_str().unwrap_or("http://prometheus:9090"), "query": query}})
    } else if let Some(w) = provider.get("web") {
        let mut web = json!({"url": fill(w["url"].as_str().unwrap_or(""))});
        if let Some(j) = w["jsonPath"].as_str() {
            // Argo's `{$.data.ok}` is Baton's `data.ok`.
            web["jsonPath"] = json!(
                j.trim_start_matches('{')
                    .trim_end_matches('}')
                    .trim_start_matches("$.")
                    .trim_start_matches('$')
            );
        }
        if let Some(h) = w["headers"].as_array() {
            let map: Map<String, Value> = h
                .iter()
                .filter_map(|x| Some((x["key"].as_str()?.to_string(), x["value"].clone())))
                .collect();
            web["headers"] = Value::Object(map);
        }
        json!({"web": web})
    } else if let Some(j) = provider.get("job") {
        // A Job metric passes when its Job succeeds: a command gate (exit status 0
        // passes), run as a Job of the container's image (the Rollout's `jobs.image`).
        let c = &j["spec"]["template"]["spec"]["containers"][0];
        let argv: Vec<String> = c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(c["args"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str().map(fill))
            .collect();
        let (Some(image), false) = (c["image"].as_str(), argv.is_empty()) else {
            return Err(format!(
                "metric {name}: its Job's container names no image or no command (Baton runs the command itself, so an image's entrypoint is not enough)"
            ));
        };
        json!({"command": {"command": argv}, "__jobImage": image})
    } else {
        let which = provider
            .as_object()
            .and_then(|o| o.keys().next().cloned())
            .unwrap_or_else(|| "none".into());
        return Err(format!(
            "metric {name}: the {which} provider has no Baton equivalent (Baton measures with prometheus, web, command or smoke checks)"
        ));
    };
    let mut metric = metric;
    let job_image = metric.as_object_mut().and_then(|o| o.remove("__jobImage"));
    let mut gate = json!({"name": name, "metric": metric});
    if let Some(image) = job_image {
        gate["__jobImage"] = image;
    }
    for (from, to) in [
        ("successCondition", "successCondition"),
        ("failureCondition", "failureCondition"),
    ] {
        if let Some(c) = m[from].as_str() {
            match condition(c) {
                Some(c) => gate[to] = json!(c),
                None => {
                    return Err(format!(
                        "metric {name}: {from} {c:?} is not an expression Baton can evaluate"
                    ));
                }
            }
        }
    }
    if gate.get("successCondition").is_none()
        && gate.get("failureCondition").is_none()
        && gate.get("__jobImage").is_none()
    {
        return Err(format!("metric {name}: no success or failure condition"));
    }
    for (from, to) in [("interval", "interval"), ("initialDelay", "initialDelay")] {
        if let Some(d) = duration(&m[from]) {
            gate[to] = d;
        }
    }
    for k in [
        "failureLimit",
        "inconclusiveLimit",
        "consecutiveErrorLimit",
        "count",
    ] {
        if let Some(n) = m[k].as_u64() {
            gate[k] = json!(n);
        }
    }
    if m["dryRun"].as_bool() == Some(true) {
        gate["dryRun"] = json!(true);
    }
    Ok(gate)
}

/// Gates of the named templates; their names, for an analysis step.
fn gates_of(
    refs: &Value,
    args: &Value,
    templates: &BTreeMap<(String, bool), Value>,
    gates: &mut Vec<Value>,
    notes: &mut Vec<String>,
) -> Vec<String> {
    let mut values = BTreeMap::new();
    for a in args.as_array().into_iter().flatten() {
        let key = a["name"].as_str().unwrap_or("").to_string();
        if let Some(v) = a["value"].as_str() {
            values.insert(key, v.to_string());
        } else if let Some(h) = a["valueFrom"]["podTemplateHashValue"].as_str() {
            values.insert(
                key,
                if h == "Stable" {
                    "{{stable}}".into()
                } else {
                    "{{revision}}".into()
                },
            );
        } else {
            notes.push(format!(
                "analysis argument {key}: only literal values and podTemplateHashValue carry over"
            ));
        }
    }
    let mut names = Vec::new();
    for t in refs.as_array().into_iter().flatten() {
        let tname = t["templateName"].as_str().unwrap_or("").to_string();
        let cluster = t["clusterScope"].as_bool().unwrap_or(false);
        let Some(spec) = templates.get(&(tname.clone(), cluster)) else {
            notes.push(format!(
                "analysis template {tname}{} is not in the input: convert it too, or define its gates by hand",
                if cluster { " (cluster scope)" } else { "" }
            ));
            continue;
        };
        for a in spec["args"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (a["name"].as_str(), a["value"].as_str()) {
                values.entry(k.to_string()).or_insert_with(|| v.to_string());
            }
        }
        for m in spec["metrics"].as_array().into_iter().flatten() {
            match argo_metric(m, &values) {
                Ok(g) => {
                    let n = g["name"].as_str().unwrap_or("").to_string();
                    if !gates.iter().any(|x| x["name"] == n.as_str()) {
                        gates.push(g);
                    }
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
                Err(why) => notes.push(format!("{why} (template {tname})")),
            }
        }
    }
    names
}

fn argo(d: &Value, templates: &BTreeMap<(String, bool), Value>) -> Converted {
    let name = d["metadata"]["name"]
        .as_str()
        .unwrap_or("rollout")
        .to_string();
    let mut notes = Vec::new();
    let mut r = base(&name, &d["metadata"]);
    let s = &d["spec"];
    let spec = &mut r["spec"];
    spec["replicas"] = json!(s["replicas"].as_i64().unwrap_or(1));
    spec["selector"] = s["selector"].clone();
    if s["template"].is_object() {
        spec["template"] = s["template"].clone();
    }
    if let Some(w) = s["workloadRef"].as_object() {
        spec["workloadRef"] = json!({"apiVersion": w.get("apiVersion").cloned().unwrap_or(json!("apps/v1")), "kind": w.get("kind").cloned().unwrap_or(json!("Deployment")), "name": w.get("name").cloned().unwrap_or(json!(""))});
        if let Some(sd) = w.get("scaleDown") {
            notes.push(format!("workloadRef.scaleDown {sd}: Baton scales the Deployment to zero once the Rollout's pods are available"));
        }
    }
    if spec["selector"].is_null() {
        match spec["template"]["metadata"]["labels"].as_object() {
            _ if spec["workloadRef"].is_object() => {
                if let Some(o) = spec.as_object_mut() {
                    o.remove("selector");
                }
            }
            Some(labels) => {
                spec["selector"] = json!({"matchLabels": labels});
                notes.push("spec.selector was missing: set to the template's labels".into());
            }
            None => {
                notes.push("spec.selector is missing and the template has no labels: set it".into())
            }
        }
    }
    for k in [
        "minReadySeconds",
        "progressDeadlineSeconds",
        "revisionHistoryLimit",
    ] {
        if let Some(v) = s[k].as_i64() {
            spec[k] = json!(v);
        }
    }
    for k in [
        "paused",
        "restartAt",
        "rollbackWindow",
        "progressDeadlineAbort",
        "analysis",
    ] {
        if !s[k].is_null() {
            notes.push(format!("spec.{k} has no Baton equivalent"));
        }
    }
    let mut gates = Vec::new();
    if let Some(c) = s["strategy"]["canary"].as_object() {
        let mut canary = Map::new();
        for k in ["stableService", "canaryService"] {
            if let Some(v) = c.get(k) {
                canary.insert(k.into(), v.clone());
            }
        }
        if let Some(tr) = c.get("trafficRouting") {
            if let Some(vs) = tr["istio"]["virtualService"]["name"]
                .as_str()
                .or_else(|| tr["istio"]["virtualServices"][0]["name"].as_str())
            {
                canary.insert(
                    "trafficRouting".into(),
                    json!({"istio": {"virtualService": vs}}),
                );
                if !tr["istio"]["destinationRule"].is_null() {
                    notes.push("trafficRouting.istio.destinationRule (subset-level split): Baton weighs the stableService and canaryService hosts instead; point the VirtualService's routes at those Services".into());
                }
            } else if let Some(route) =
                tr["plugins"]["argoproj-labs/gatewayAPI"]["httpRoute"].as_str()
            {
                canary.insert(
                    "trafficRouting".into(),
                    json!({"gatewayAPI": {"httpRoute": route}}),
                );
            } else {
                let which: Vec<String> = tr
                    .as_object()
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default();
                notes.push(format!(
                    "trafficRouting {}: Baton routes with Gateway API or Istio; without a router the weight is the canary's share of pods",
                    which.join(", ")
                ));
            }
            if tr["istio"].is_object()
                && (canary.get("stableService").is_none() || canary.get("canaryService").is_none())
            {
                notes.push(
                    "istio routing needs strategy.canary.stableService and canaryService: add them"
                        .into(),
                );
            }
        }
        for k in [
            "maxSurge",
            "maxUnavailable",
            "antiAffinity",
            "canaryMetadata",
            "stableMetadata",
            "scaleDownDelaySeconds",
            "dynamicStableScale",
            "abortScaleDownDelaySeconds",
            "pingPong",
        ] {
            if c.contains_key(k) {
                notes.push(format!("strategy.canary.{k} has no Baton equivalent"));
            }
        }
        let mut steps = Vec::new();
        for (i, st) in c
            .get("steps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(w) = st.get("setWeight") {
                steps.push(json!({"setWeight": w}));
            } else if let Some(p) = st.get("pause") {
                steps.push(match duration(&p["duration"]) {
                    Some(d) => json!({"pause": {"duration": d}}),
                    None => json!({"pause": {}}),
                });
            } else if let Some(a) = st.get("analysis") {
                let names = gates_of(
                    &a["templates"],
                    &a["args"],
                    templates,
                    &mut gates,
                    &mut notes,
                );
                if names.is_empty() {
                    notes.push(format!(
                        "step {}: an analysis with no gate Baton can run was left out",
                        i + 1
                    ));
                } else {
                    steps.push(json!({"analysis": {"gates": names}}));
                }
            } else {
                let which = st
                    .as_object()
                    .and_then(|o| o.keys().next().cloned())
                    .unwrap_or_default();
                notes.push(format!(
                    "step {} ({which}) has no Baton equivalent and was left out",
                    i + 1
                ));
            }
        }
        if let Some(bg) = c.get("analysis") {
            // Background analysis: Baton checks gates at analysis steps, so one follows
            // every weight from the starting step on.
            let names = gates_of(
                &bg["templates"],
                &bg["args"],
                templates,
                &mut gates,
                &mut notes,
            );
            if !names.is_empty() {
                let start = bg["startingStep"].as_u64().unwrap_or(0) as usize;
                let mut with = Vec::new();
                for (i, st) in steps.into_iter().enumerate() {
                    let weight = st.get("setWeight").is_some();
                    with.push(st);
                    if weight && i >= start {
                        with.push(json!({"analysis": {"gates": names}}));
                    }
                }
                steps = with;
                notes.push("strategy.canary.analysis (background analysis) became an analysis step after every setWeight from its startingStep".into());
            }
        }
        canary.insert("steps".into(), Value::Array(steps));
        spec["strategy"] = json!({"canary": canary});
    } else if let Some(b) = s["strategy"]["blueGreen"].as_object() {
        let mut bg = json!({
            "activeService": b.get("activeService").cloned().unwrap_or(json!("")),
            "autoPromote": b.get("autoPromotionEnabled").and_then(Value::as_bool).unwrap_or(true),
        });
        if let Some(p) = b.get("previewService") {
            bg["previewService"] = p.clone();
        }
        if let Some(sd) = b.get("scaleDownDelaySeconds").and_then(Value::as_i64) {
            bg["retainPrevious"] = json!(format!("{sd}s"));
        }
        for k in ["prePromotionAnalysis", "postPromotionAnalysis"] {
            if b.contains_key(k) {
                notes.push(format!("strategy.blueGreen.{k}: Baton checks a blue-green preview with smoke tests (HTTP checks); add them under strategy.blueGreen.smoke"));
            }
        }
        for k in [
            "autoPromotionSeconds",
            "previewReplicaCount",
            "antiAffinity",
            "previewMetadata",
            "activeMetadata",
            "scaleDownDelayRevisionLimit",
            "abortScaleDownDelaySeconds",
        ] {
            if b.contains_key(k) {
                notes.push(format!("strategy.blueGreen.{k} has no Baton equivalent"));
            }
        }
        spec["strategy"] = json!({"blueGreen": bg});
    } else {
        notes.push("no canary or blueGreen strategy: converted to a rolling update".into());
        spec["strategy"] = json!({"rolling": {"maxSurge": 1, "maxUnavailable": 0}});
    }
    // Command gates from Job metrics run in one image, the Rollout's `jobs.image`.
    let mut job_image: Option<String> = None;
    for g in &mut gates {
        let Some(image) = g
            .as_object_mut()
            .and_then(|o| o.remove("__jobImage"))
            .and_then(|i| i.as_str().map(str::to_string))
        else {
            continue;
        };
        let name = g["name"].as_str().unwrap_or("").to_string();
        match &job_image {
            None => {
                notes.push(format!(
                    "metric {name}: its Job became a command gate, run as a Job of {image} (spec.jobs.image) as the namespace's default account; only the first container's command and args carried over"
                ));
                job_image = Some(image);
            }
            Some(first) if *first != image => notes.push(format!(
                "metric {name}: its Job's image {image} is not {first}, the one image a Rollout's command gates run in: put its command there, or measure it another way"
            )),
            Some(_) => {}
        }
    }
    if let Some(image) = job_image {
        spec["jobs"] = json!({"image": image});
    }
    if !gates.is_empty() {
        spec["analysis"] = json!({"gates": gates});
    }
    for (k, _) in d["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("notifications.argoproj.io"))
    {
        notes.push(format!("annotation {k}: Baton's notifications are webhooks configured per rollout (see the README)"));
    }
    Converted {
        name,
        rollout: r,
        notes,
    }
}

fn flagger(d: &Value) -> Converted {
    let name = d["metadata"]["name"]
        .as_str()
        .unwrap_or("canary")
        .to_string();
    let ns = d["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let mut notes = Vec::new();
    let mut r = base(&name, &d["metadata"]);
    let s = &d["spec"];
    let target = s["targetRef"]["name"].as_str().unwrap_or(&name).to_string();
    let spec = &mut r["spec"];
    spec["workloadRef"] = json!({"apiVersion": s["targetRef"]["apiVersion"].as_str().unwrap_or("apps/v1"), "kind": s["targetRef"]["kind"].as_str().unwrap_or("Deployment"), "name": target});
    spec["replicas"] = json!(2);
    spec["selector"] = json!({"matchLabels": {"app": target}});
    notes.push(format!("spec.selector assumed to be app={target} and replicas 2 (Flagger reads both from the Deployment): check them"));
    if let Some(p) = s["progressDeadlineSeconds"].as_i64() {
        spec["progressDeadlineSeconds"] = json!(p);
    }
    if !s["autoscalerRef"].is_null() {
        notes.push("autoscalerRef: point the HorizontalPodAutoscaler at the Rollout (it has a scale subresource) instead of the Deployment".into());
    }
    let provider = s["provider"].as_str().unwrap_or("kubernetes");
    let a = &s["analysis"];
    let interval = duration(&a["interval"]).unwrap_or(json!("1m"));
    let threshold = a["threshold"].as_u64().unwrap_or(1);
    let mut gates = Vec::new();
    for m in a["metrics"].as_array().into_iter().flatten() {
        let mname = m["name"].as_str().unwrap_or("");
        let range = &m["thresholdRange"];
        let window = m["interval"].as_str().unwrap_or("1m");
        let sel =
            format!("destination_workload_namespace=\"{ns}\",destination_workload=~\"{target}.*\"");
        let (query, cond) = match (mname, provider) {
            ("request-success-rate", "istio") => (
                format!(
                    "sum(rate(istio_requests_total{{reporter=\"destination\",{sel},response_code!~\"5.*\"}}[{window}])) / sum(rate(istio_requests_total{{reporter=\"destination\",{sel}}}[{window}])) * 100"
                ),
                range["min"].as_f64().map(|v| format!("result >= {v}")),
            ),
            ("request-duration", "istio") => (
                format!(
                    "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{sel}}}[{window}])) by (le))"
                ),
                range["max"].as_f64().map(|v| format!("result <= {v}")),
            ),
            ("request-success-rate", "linkerd") => (
                format!(
                    "sum(rate(response_total{{namespace=\"{ns}\",deployment=~\"{target}.*\",classification!=\"failure\",direction=\"inbound\"}}[{window}])) / sum(rate(response_total{{namespace=\"{ns}\",deployment=~\"{target}.*\",direction=\"inbound\"}}[{window}])) * 100"
                ),
                range["min"].as_f64().map(|v| format!("result >= {v}")),
            ),
            ("request-duration", "linkerd") => (
                format!(
                    "histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{namespace=\"{ns}\",deployment=~\"{target}.*\",direction=\"inbound\"}}[{window}])) by (le))"
                ),
                range["max"].as_f64().map(|v| format!("result <= {v}")),
            ),
            _ => {
                notes.push(format!("metric {mname}: only Flagger's built-in request-success-rate and request-duration on istio or linkerd carry over; add a prometheus gate for it"));
                continue;
            }
        };
        let Some(cond) = cond else {
            notes.push(format!(
                "metric {mname}: no thresholdRange to turn into a condition"
            ));
            continue;
        };
        gates.push(json!({
            "name": mname,
            "metric": {"prometheus": {"address": "http://prometheus.istio-system:9090", "query": query}},
            "successCondition": cond,
            "interval": interval,
            "failureLimit": threshold.saturating_sub(1),
        }));
    }
    if !gates.is_empty() {
        notes.push("Prometheus address assumed http://prometheus.istio-system:9090 (Flagger's default metrics server): check it, and that the queries select the canary's pods".into());
    }
    let names: Vec<Value> = gates.iter().map(|g| g["name"].clone()).collect();
    let weights: Vec<u64> = if let Some(ws) = a["stepWeights"].as_array() {
        ws.iter().filter_map(Value::as_u64).collect()
    } else if let (Some(step), Some(max)) = (a["stepWeight"].as_u64(), a["maxWeight"].as_u64()) {
        (1..).map(|i| i * step).take_while(|w| *w <= max).collect()
    } else {
        Vec::new()
    };
    let mut steps = Vec::new();
    for w in &weights {
        steps.push(json!({"setWeight": w}));
        steps.push(json!({"pause": {"duration": interval}}));
        if !names.is_empty() {
            steps.push(json!({"analysis": {"gates": names}}));
        }
    }
    if weights.is_empty() {
        if a["iterations"].is_u64() || a["match"].is_array() {
            notes.push("A/B testing (iterations with header match) has no Baton equivalent on a cluster router: converted to a canary that pauses for a person to promote".into());
        } else {
            notes.push(
                "no stepWeight/maxWeight or stepWeights: the canary pauses for a person to promote"
                    .into(),
            );
        }
        if !names.is_empty() {
            steps.push(json!({"setWeight": 0}));
            steps.push(json!({"analysis": {"gates": names}}));
        }
        steps.push(json!({"pause": {}}));
    }
    let svc = s["service"]["name"].as_str().unwrap_or(&target).to_string();
    let mut canary = json!({"steps": steps, "stableService": format!("{svc}-primary"), "canaryService": format!("{svc}-canary")});
    notes.push(format!("Flagger generates the Services {svc}-primary and {svc}-canary; with Baton they must exist (selecting the pods), and Baton pins their selectors to revisions"));
    match provider {
        "istio" => {
            canary["trafficRouting"] = json!({"istio": {"virtualService": svc}});
            notes.push(format!("Flagger generates the VirtualService {svc}; with Baton it must exist and route to {svc}-primary"));
        }
        "gatewayapi" | "gatewayapi:v1" | "gatewayapi:v1beta1" => {
            canary["trafficRouting"] = json!({"gatewayAPI": {"httpRoute": svc}});
        }
        other => notes.push(format!("provider {other}: Baton routes with Gateway API or Istio; without a router the weight is the canary's share of pods")),
    }
    for w in a["webhooks"].as_array().into_iter().flatten() {
        notes.push(format!(
            "webhook {} ({}): Baton has no gating webhooks; a smoke or command gate can take its place",
            w["name"].as_str().unwrap_or(""),
            w["type"].as_str().unwrap_or("rollout")
        ));
    }
    for k in ["skipAnalysis", "revertOnDeletion", "suspend"] {
        if s[k].as_bool() == Some(true) {
            notes.push(format!("spec.{k} has no Baton equivalent"));
        }
    }
    spec["strategy"] = json!({"canary": canary});
    if !gates.is_empty() {
        spec["analysis"] = json!({"gates": gates});
    }
    Converted {
        name,
        rollout: r,
        notes,
    }
}
