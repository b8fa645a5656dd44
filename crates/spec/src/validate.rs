//! Semantic checks that serde cannot express. Each returns a field path and a reason
//! that tells the user what to write instead.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use crate::{API_VERSION, Duration, FieldError, KIND, Probe, Rollout, Step};

/// The longest duration a spec may hold anywhere (30 days): longer is a typo, and a
/// time computed from it stays far from wrapping.
pub const MAX_DURATION_SECONDS: u64 = 30 * 24 * 3600;
/// The most instances per revision (and the largest `maxSurge` / `maxUnavailable`).
/// One argument or `KEY=VALUE`, in bytes: the kernel's MAX_ARG_STRLEN (128 KiB).
pub const MAX_ARG_BYTES: usize = 128 * 1024;
/// Command and env together, in bytes: well under the kernel's usual ARG_MAX (2 MiB
/// with an 8 MiB stack), which the inherited environment shares.
pub const MAX_RUN_BYTES: usize = 1024 * 1024;
pub const MAX_REPLICAS: u32 = 100;
/// The most old revisions a rollout remembers (`revisionHistoryLimit`).
pub const MAX_HISTORY: u32 = 100;
/// The largest gate count or limit (`count`, `failureLimit`, `inconclusiveLimit`,
/// `consecutiveErrorLimit`) and probe threshold.
pub const MAX_COUNT: u32 = 1000;
/// The largest `minRequests`.
pub const MAX_MIN_REQUESTS: u64 = 1_000_000;

/// Why `d` is too long, if it is.
pub(crate) fn too_long(d: Duration) -> Option<String> {
    (d.0 > std::time::Duration::from_secs(MAX_DURATION_SECONDS)).then(|| {
        format!(
            "must be at most 30 days ({MAX_DURATION_SECONDS} s), got {} s",
            d.0.as_secs()
        )
    })
}

/// Why `n` is above `max`, if it is.
fn above(n: impl Into<u64>, max: impl Into<u64>) -> Option<String> {
    let (n, max) = (n.into(), max.into());
    (n > max).then(|| format!("must be at most {max}, got {n}"))
}

/// Every problem in one rollout, in field order.
pub fn validate(r: &Rollout) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut err = |field: &str, reason: String| {
        errs.push(FieldError {
            field: field.to_string(),
            reason,
        })
    };
    if r.api_version != API_VERSION {
        err(
            "apiVersion",
            format!("must be {API_VERSION:?}, got {:?}", r.api_version),
        );
    }
    if r.kind != KIND {
        err("kind", format!("must be {KIND:?}, got {:?}", r.kind));
    }
    if let Err(reason) = check_name(&r.metadata.name) {
        err("metadata.name", reason);
    }
    let s = &r.spec;
    if s.replicas == 0 || s.replicas > MAX_REPLICAS {
        err(
            "spec.replicas",
            format!("must be between 1 and {MAX_REPLICAS}, got {}", s.replicas),
        );
    }
    match s.run.command.first() {
        None => err("spec.run.command", "must name a program to run".into()),
        Some(p) if p.trim().is_empty() => {
            err("spec.run.command[0]", "the program name is empty".into())
        }
        _ => {}
    }
    for key in s.run.env.keys() {
        let ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            err(
                &format!("spec.run.env.{key}"),
                "an environment variable name is letters, digits and _, not starting with a digit"
                    .into(),
            );
        }
    }
    // The kernel refuses to start a program with one argument or `KEY=VALUE` over
    // 128 KiB (MAX_ARG_STRLEN), or with all of them over its ARG_MAX: such a spec
    // could never start, so it is refused here, by field.
    for (i, a) in s.run.command.iter().enumerate() {
        if a.len() >= MAX_ARG_BYTES {
            err(
                &format!("spec.run.command[{i}]"),
                format!(
                    "is {} bytes; one argument must stay under {MAX_ARG_BYTES}",
                    a.len()
                ),
            );
        }
    }
    for (key, value) in &s.run.env {
        let len = key.len() + 1 + value.len();
        if len >= MAX_ARG_BYTES {
            err(
                &format!("spec.run.env.{key}"),
                format!(
                    "is {len} bytes with its name; one variable must stay under {MAX_ARG_BYTES}"
                ),
            );
        }
    }
    let total: usize = s.run.command.iter().map(|a| a.len() + 1).sum::<usize>()
        + s.run
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    if total > MAX_RUN_BYTES {
        err(
            "spec.run",
            format!(
                "command and env are {total} bytes together; at most {MAX_RUN_BYTES} (the rest of the environment needs room too)"
            ),
        );
    }
    if let Some(dir) = &s.run.working_dir
        && dir.trim().is_empty()
    {
        err(
            "spec.run.workingDir",
            "is empty; leave it out to use the current directory".into(),
        );
    }
    for (name, probe) in [
        ("readiness", &s.probes.readiness),
        ("liveness", &s.probes.liveness),
    ] {
        if let Some(p) = probe {
            check_probe(&format!("spec.probes.{name}"), p, &mut err);
        }
    }
    for (field, v) in [
        ("spec.shutdown.preStopSeconds", s.shutdown.pre_stop_seconds),
        (
            "spec.shutdown.drainTimeoutSeconds",
            s.shutdown.drain_timeout_seconds,
        ),
    ] {
        if !(0.0..=3600.0).contains(&v) {
            err(
                field,
                format!("must be between 0 and 3600 seconds, got {v}"),
            );
        }
    }
    if let Some(why) = too_long(Duration::from_secs(s.min_ready_seconds)) {
        err("spec.minReadySeconds", why);
    }
    if s.progress_deadline_seconds == 0 {
        err("spec.progressDeadlineSeconds", "must be at least 1".into());
    } else if let Some(why) = too_long(Duration::from_secs(s.progress_deadline_seconds)) {
        err("spec.progressDeadlineSeconds", why);
    }
    if s.revision_history_limit > MAX_HISTORY {
        err(
            "spec.revisionHistoryLimit",
            format!(
                "must be between 0 and {MAX_HISTORY}, got {}",
                s.revision_history_limit
            ),
        );
    }
    let listen = check_addr("spec.traffic.listen", &s.traffic.listen, &mut err);
    let header_name = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    };
    if let Some(st) = &s.traffic.stickiness {
        match (&st.header, &st.cookie) {
            (Some(_), Some(_)) | (None, None) => err(
                "spec.traffic.stickiness",
                "set exactly one of header or cookie".into(),
            ),
            (Some(h), None) if !header_name(h) => err(
                "spec.traffic.stickiness.header",
                format!("{h:?} is not a header name"),
            ),
            (None, Some(c)) if c.is_empty() || c.contains([';', '=', ' ']) => err(
                "spec.traffic.stickiness.cookie",
                format!("{c:?} is not a cookie name"),
            ),
            _ => {}
        }
    }
    if s.traffic.mirror_percent > 100 {
        err(
            "spec.traffic.mirrorPercent",
            format!("must be 0-100, got {}", s.traffic.mirror_percent),
        );
    }
    for (i, m) in s.traffic.mirror_methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            err(
                &format!("spec.traffic.mirrorMethods[{i}]"),
                format!("{m:?} is not a method: methods are case-sensitive, e.g. GET or PUT"),
            );
        }
    }
    if let Some(t) = &s.traffic.tls {
        for (k, v) in [("certFile", &t.cert_file), ("keyFile", &t.key_file)] {
            if v.trim().is_empty() {
                err(&format!("spec.traffic.tls.{k}"), "is empty".into());
            }
        }
    }
    if let Some(h) = &s.traffic.canary_header
        && !header_name(&h.name)
    {
        err(
            "spec.traffic.canaryHeader.name",
            format!("{:?} is not a header name", h.name),
        );
    }

    let st = &s.strategy;
    let set = [
        st.canary.is_some(),
        st.blue_green.is_some(),
        st.rolling.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        err(
            "spec.strategy",
            format!("set exactly one of canary, blueGreen or rolling (found {set})"),
        );
    }
    let gate_names: BTreeSet<&str> = s.analysis.gates.iter().map(|g| g.name.as_str()).collect();
    if let Some(bg) = &st.blue_green
        && let Some(d) = bg.post_promotion_analysis
    {
        let f = "spec.strategy.blueGreen.postPromotionAnalysis";
        if d.0.is_zero() {
            err(f, "must be positive; leave it out for none".into());
        } else if d > bg.retain_previous {
            err(
                f,
                format!(
                    "must be no longer than retainPrevious ({}): the previous stack is what a failure switches back to",
                    bg.retain_previous
                ),
            );
        }
        if s.analysis.gates.is_empty() {
            err(f, "needs gates in spec.analysis.gates to judge with".into());
        }
    }
    for (j, name) in s.analysis.pre_traffic.iter().enumerate() {
        let f = format!("spec.analysis.preTraffic[{j}]");
        match s.analysis.gates.iter().find(|g| &g.name == name) {
            None => err(&f, format!("no gate named {name:?} in spec.analysis.gates")),
            Some(g)
                if matches!(
                    g.metric,
                    crate::MetricSource::Builtin(_) | crate::MetricSource::Scorecard(_)
                ) =>
            {
                err(
                    &f,
                    format!(
                        "gate {name:?} reads requests, and there are none before traffic: use a command, web or prometheus gate"
                    ),
                )
            }
            Some(_) => {}
        }
    }
    if !s.analysis.pre_traffic.is_empty() && st.rolling.is_some() {
        err(
            "spec.analysis.preTraffic",
            "a rolling update gives each new instance traffic as it becomes ready: use canary or blueGreen".into(),
        );
    }
    if let Some(c) = &st.canary {
        if let Some(why) = c.retain_previous.and_then(too_long) {
            err("spec.strategy.canary.retainPrevious", why);
        }
        if let Some(p) = &c.progressive {
            let f = "spec.strategy.canary.progressive";
            if !c.steps.is_empty() {
                err(f, "set steps or progressive, not both".into());
            }
            if !(1..=99).contains(&p.start) {
                err(
                    &format!("{f}.start"),
                    format!("must be 1-99, got {}", p.start),
                );
            }
            if !(p.factor.is_finite() && p.factor > 1.0) {
                err(
                    &format!("{f}.factor"),
                    format!("must be a number above 1, got {}", p.factor),
                );
            }
            if p.every.0.is_zero() {
                err(&format!("{f}.every"), "must be positive".into());
            } else if let Some(why) = too_long(p.every) {
                err(&format!("{f}.every"), why);
            }
            for (j, g) in p.gates.iter().enumerate() {
                if !gate_names.contains(g.as_str()) {
                    err(
                        &format!("{f}.gates[{j}]"),
                        format!("no gate named {g:?} in spec.analysis.gates"),
                    );
                }
            }
        }
        for (i, step) in c.steps.iter().enumerate() {
            let f = format!("spec.strategy.canary.steps[{i}]");
            match step {
                Step::SetWeight(w) if *w > 100 => {
                    err(&format!("{f}.setWeight"), format!("must be 0-100, got {w}"))
                }
                Step::Pause(p) if p.duration.is_some_and(|d| d.0.is_zero()) => err(
                    &format!("{f}.pause.duration"),
                    "must be positive; leave it out to pause until promoted".into(),
                ),
                Step::Pause(p) => {
                    if let Some(why) = p.duration.and_then(too_long) {
                        err(&format!("{f}.pause.duration"), why);
                    }
                }
                Step::Analysis(a) => {
                    if a.gates.is_empty() {
                        err(
                            &format!("{f}.analysis.gates"),
                            "name at least one gate".into(),
                        );
                    }
                    for (j, g) in a.gates.iter().enumerate() {
                        if !gate_names.contains(g.as_str()) {
                            err(
                                &format!("{f}.analysis.gates[{j}]"),
                                format!("no gate named {g:?} in spec.analysis.gates"),
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(bg) = &st.blue_green {
        if let Some(why) = too_long(bg.retain_previous) {
            err("spec.strategy.blueGreen.retainPrevious", why);
        }
        if let Some(p) = &bg.preview_listen {
            let preview = check_addr("spec.strategy.blueGreen.previewListen", p, &mut err);
            if preview.is_some() && preview == listen {
                err(
                    "spec.strategy.blueGreen.previewListen",
                    "must differ from spec.traffic.listen".into(),
                );
            }
        }
        for (i, t) in bg.smoke.iter().enumerate() {
            let f = format!("spec.strategy.blueGreen.smoke[{i}]");
            if !t.path.starts_with('/') {
                err(
                    &format!("{f}.path"),
                    format!("must start with /, got {:?}", t.path),
                );
            }
            if !(100..=599).contains(&t.expect_status) {
                err(
                    &format!("{f}.expectStatus"),
                    format!("must be 100-599, got {}", t.expect_status),
                );
            }
            if t.method.parse::<MethodName>().is_err() {
                err(
                    &format!("{f}.method"),
                    format!("{:?} is not an HTTP method", t.method),
                );
            }
        }
    }
    if let Some(r) = &st.rolling {
        for (k, v) in [
            ("maxSurge", r.max_surge),
            ("maxUnavailable", r.max_unavailable),
        ] {
            if let Some(why) = above(v, MAX_REPLICAS) {
                err(&format!("spec.strategy.rolling.{k}"), why);
            }
        }
        if r.max_surge == 0 && r.max_unavailable == 0 {
            err(
                "spec.strategy.rolling",
                "maxSurge and maxUnavailable cannot both be 0: nothing could move".into(),
            );
        }
        if r.max_unavailable >= s.replicas && s.replicas > 0 {
            err(
                "spec.strategy.rolling.maxUnavailable",
                format!(
                    "must be below replicas ({}), or the service could go dark",
                    s.replicas
                ),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for (i, g) in s.analysis.gates.iter().enumerate() {
        let f = format!("spec.analysis.gates[{i}]");
        if let Err(reason) = check_name(&g.name) {
            err(&format!("{f}.name"), reason);
        } else if !seen.insert(g.name.as_str()) {
            err(
                &format!("{f}.name"),
                format!("gate {:?} is defined twice", g.name),
            );
        }
        let is_command = matches!(g.metric, crate::MetricSource::Command(_));
        if g.success_condition.is_none()
            && g.failure_condition.is_none()
            && g.compare.is_none()
            && g.statistical.is_none()
            && g.burn_rate.is_none()
            && !is_command
            && !matches!(g.metric, crate::MetricSource::Smoke(_))
        {
            err(
                &f,
                "set successCondition, failureCondition or compare, e.g. successCondition: \"result < 0.8\"".into(),
            );
        }
        if let Some(b) = &g.burn_rate {
            if !matches!(
                g.metric,
                crate::MetricSource::Builtin(crate::BuiltinMetric::ErrorRate)
            ) {
                err(
                    &format!("{f}.burnRate"),
                    "a burn rate is computed from errors: use metric { builtin: error_rate }"
                        .into(),
                );
            }
            if !(b.slo > 0.0 && b.slo < 1.0) {
                err(
                    &format!("{f}.burnRate.slo"),
                    format!(
                        "must be between 0 and 1 (exclusive), e.g. 0.999; got {}",
                        b.slo
                    ),
                );
            }
            if b.windows.is_empty() {
                err(
                    &format!("{f}.burnRate.windows"),
                    "name at least one window pair, or leave it out for the defaults".into(),
                );
            }
            for (j, w) in b.windows.iter().enumerate() {
                for (k, d) in [("long", w.long), ("short", w.short)] {
                    if let Some(why) = too_long(d) {
                        err(&format!("{f}.burnRate.windows[{j}].{k}"), why);
                    }
                }
                if w.short.0.is_zero() || w.short > w.long {
                    err(
                        &format!("{f}.burnRate.windows[{j}]"),
                        "short must be positive and no longer than long".into(),
                    );
                }
                if !(w.factor.is_finite() && w.factor > 0.0) {
                    err(
                        &format!("{f}.burnRate.windows[{j}].factor"),
                        "must be a positive number".into(),
                    );
                }
            }
        }
        if let crate::MetricSource::Scorecard(ms) = &g.metric {
            if g.statistical.is_none() {
                err(&format!("{f}.statistical"), "a scorecard needs statistical: { ... } (confidence, tolerance, passScore, marginalScore)".into());
            }
            if ms.is_empty() {
                err(
                    &format!("{f}.metric.scorecard"),
                    "name at least one builtin metric".into(),
                );
            }
        }
        if !(g.confidence > 0.5 && g.confidence < 1.0) {
            err(
                &format!("{f}.confidence"),
                format!(
                    "must be between 0.5 and 1 (exclusive), e.g. 0.99; got {}",
                    g.confidence
                ),
            );
        }
        if let Some(st) = &g.statistical {
            if !(st.marginal_score <= st.pass_score
                && (0.0..=100.0).contains(&st.pass_score)
                && st.marginal_score >= 0.0)
            {
                err(
                    &format!("{f}.statistical"),
                    format!(
                        "need 0 <= marginalScore ({}) <= passScore ({}) <= 100",
                        st.marginal_score, st.pass_score
                    ),
                );
            }
            if !matches!(
                g.metric,
                crate::MetricSource::Builtin(_) | crate::MetricSource::Scorecard(_)
            ) {
                err(
                    &format!("{f}.statistical"),
                    "statistical comparison needs a builtin metric".into(),
                );
            }
            if !(st.confidence > 0.5 && st.confidence < 1.0) {
                err(
                    &format!("{f}.statistical.confidence"),
                    format!(
                        "must be between 0.5 and 1 (exclusive), got {}",
                        st.confidence
                    ),
                );
            }
            if !(st.tolerance.is_finite() && st.tolerance >= 0.0) {
                err(
                    &format!("{f}.statistical.tolerance"),
                    "must be a non-negative number".into(),
                );
            }
        }
        if let Some(c) = &g.compare {
            if !matches!(g.metric, crate::MetricSource::Builtin(_)) {
                err(
                    &format!("{f}.compare"),
                    "comparing with stable needs a builtin metric".into(),
                );
            }
            if c.max_increase_percent.is_none() && c.max_increase.is_none() {
                err(
                    &format!("{f}.compare"),
                    "set maxIncreasePercent and/or maxIncrease".into(),
                );
            }
            for (k, v) in [
                ("maxIncreasePercent", c.max_increase_percent),
                ("maxIncrease", c.max_increase),
            ] {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    err(
                        &format!("{f}.compare.{k}"),
                        "must be a non-negative number".into(),
                    );
                }
            }
        }
        let timeout = match &g.metric {
            crate::MetricSource::Prometheus(p) => Some(("prometheus", p.timeout)),
            crate::MetricSource::Web(w) => Some(("web", w.timeout)),
            crate::MetricSource::Command(c) => Some(("command", c.timeout)),
            _ => None,
        };
        if let Some((k, t)) = timeout
            && let Some(why) = too_long(t)
        {
            err(&format!("{f}.metric.{k}.timeout"), why);
        }
        match &g.metric {
            crate::MetricSource::Prometheus(p) => {
                if !(p.address.starts_with("http://") || p.address.starts_with("https://")) {
                    err(
                        &format!("{f}.metric.prometheus.address"),
                        format!("{:?} must start with http:// or https://", p.address),
                    );
                }
                if p.query.trim().is_empty() {
                    err(&format!("{f}.metric.prometheus.query"), "is empty".into());
                }
            }
            crate::MetricSource::Web(w) => {
                if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                    err(
                        &format!("{f}.metric.web.url"),
                        format!("{:?} must start with http:// or https://", w.url),
                    );
                }
            }
            crate::MetricSource::Command(c) => {
                if c.command.first().is_none_or(|p| p.trim().is_empty()) {
                    err(
                        &format!("{f}.metric.command.command"),
                        "must name a program to run".into(),
                    );
                }
            }
            crate::MetricSource::Smoke(tests) => {
                if tests.is_empty() {
                    err(
                        &format!("{f}.metric.smoke"),
                        "name at least one check".into(),
                    );
                }
                for (j, t) in tests.iter().enumerate() {
                    if !t.path.starts_with('/') {
                        err(
                            &format!("{f}.metric.smoke[{j}].path"),
                            format!("must start with /, got {:?}", t.path),
                        );
                    }
                }
            }
            crate::MetricSource::Builtin(_) | crate::MetricSource::Scorecard(_) => {}
        }

        for (k, c) in [
            ("successCondition", &g.success_condition),
            ("failureCondition", &g.failure_condition),
        ] {
            if let Some(c) = c
                && let Err(e) = check_condition(c)
            {
                err(&format!("{f}.{k}"), e);
            }
        }
        if g.interval.0.is_zero() {
            err(&format!("{f}.interval"), "must be positive".into());
        } else if let Some(why) = too_long(g.interval) {
            err(&format!("{f}.interval"), why);
        }
        if let Some(why) = too_long(g.initial_delay) {
            err(&format!("{f}.initialDelay"), why);
        }
        if let Some(why) = g.for_duration.and_then(too_long) {
            err(&format!("{f}.for"), why);
        }
        if g.count == 0 {
            err(&format!("{f}.count"), "must be at least 1".into());
        }
        for (k, v) in [
            ("count", Some(g.count)),
            ("failureLimit", Some(g.failure_limit)),
            ("inconclusiveLimit", g.inconclusive_limit),
            ("consecutiveErrorLimit", Some(g.consecutive_error_limit)),
        ] {
            if let Some(why) = v.and_then(|v| above(v, MAX_COUNT)) {
                err(&format!("{f}.{k}"), why);
            }
        }
        if let Some(why) = above(g.min_requests, MAX_MIN_REQUESTS) {
            err(&format!("{f}.minRequests"), why);
        }
    }
    for (i, n) in s.notifications.iter().enumerate() {
        let f = format!("spec.notifications[{i}]");
        // `${NAME}` parts are filled in when sending; check the rest.
        let shape = expand_placeholders(&n.url);
        if !(shape.starts_with("http://") || shape.starts_with("https://")) {
            err(
                &format!("{f}.url"),
                "must start with http:// or https:// (or be ${NAME} from the environment)".into(),
            );
        }
        if n.name.trim().is_empty() {
            err(&format!("{f}.name"), "is empty".into());
        }
        for key in n.headers.keys() {
            if key.is_empty()
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                err(
                    &format!("{f}.headers.{key}"),
                    "is not a valid header name".into(),
                );
            }
        }
        if n.events.is_empty() {
            err(
                &format!("{f}.events"),
                "name at least one event, or leave it out for all".into(),
            );
        }
    }
    errs
}

/// `${NAME}` placeholders replaced by `x`, to check the shape of a templated value.
fn expand_placeholders(s: &str) -> String {
    if s.trim().starts_with("${") && s.trim().ends_with('}') && !s.trim()[2..].contains("${") {
        return "https://placeholder".into();
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                out.push('x');
                rest = &rest[start + end + 1..];
            }
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Problems between documents of one file: names and listeners must be unique.
pub(crate) fn across(rollouts: &[Rollout], errors: &mut Vec<FieldError>, many: bool) {
    if !many {
        return;
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut listens: Vec<(String, usize)> = Vec::new();
    for (i, r) in rollouts.iter().enumerate() {
        if let Some(first) = names.insert(&r.metadata.name, i) {
            errors.push(FieldError {
                field: format!("documents[{i}].metadata.name"),
                reason: format!(
                    "{:?} is also the name of documents[{first}]",
                    r.metadata.name
                ),
            });
        }
        for a in crate::addr::listeners(r) {
            let first = listens
                .iter()
                .find(|(b, j)| *j != i && crate::addr::clash(&a, b))
                .map(|(b, j)| (b.clone(), *j));
            if let Some((b, first)) = first {
                errors.push(FieldError {
                    field: format!("documents[{i}].spec.traffic.listen"),
                    reason: format!("{a} clashes with {b} of documents[{first}]"),
                });
            }
            listens.push((a, i));
        }
    }
}

/// Checks that a condition parses and yields a boolean for a sample `result`.
pub fn check_condition(c: &str) -> Result<(), String> {
    use evalexpr::ContextWithMutableVariables;
    let tree = evalexpr::build_operator_tree::<evalexpr::DefaultNumericTypes>(c)
        .map_err(|e| format!("cannot parse {c:?}: {e}"))?;
    let mut ctx = evalexpr::HashMapContext::<evalexpr::DefaultNumericTypes>::new();
    ctx.set_value("result".into(), evalexpr::Value::Float(0.5))
        .map_err(|e| e.to_string())?;
    tree.eval_boolean_with_context(&ctx)
        .map(|_| ())
        .map_err(|e| format!("{c:?} must be a true/false expression over `result`: {e}"))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

fn check_probe(f: &str, p: &Probe, err: &mut impl FnMut(&str, String)) {
    if !p.http_get.path.starts_with('/') {
        err(
            &format!("{f}.httpGet.path"),
            format!("must start with /, got {:?}", p.http_get.path),
        );
    }
    for (k, v, min) in [
        ("periodSeconds", p.period_seconds, 0.05),
        ("timeoutSeconds", p.timeout_seconds, 0.05),
        ("initialDelaySeconds", p.initial_delay_seconds, 0.0),
    ] {
        if !(min..=3600.0).contains(&v) {
            err(
                &format!("{f}.{k}"),
                format!("must be between {min} and 3600, got {v}"),
            );
        }
    }
    for (k, v) in [
        ("failureThreshold", p.failure_threshold),
        ("successThreshold", p.success_threshold),
    ] {
        if v == 0 {
            err(&format!("{f}.{k}"), "must be at least 1".into());
        } else if let Some(why) = above(v, MAX_COUNT) {
            err(&format!("{f}.{k}"), why);
        }
    }
}

fn check_addr(f: &str, a: &str, err: &mut impl FnMut(&str, String)) -> Option<SocketAddr> {
    match a.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => {
            err(f, format!("{a:?} needs a fixed port, not 0"));
            None
        }
        Ok(addr) => Some(addr),
        Err(_) => {
            err(
                f,
                format!("{a:?} is not an IP:port address such as 127.0.0.1:8080"),
            );
            None
        }
    }
}

struct MethodName;
impl std::str::FromStr for MethodName {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => Ok(MethodName),
            _ => Err(()),
        }
    }
}
