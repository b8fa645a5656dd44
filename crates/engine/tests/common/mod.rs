//! A tiny simulated world for the engine: a platform and a router that do what they are
//! told, optionally late.
#![allow(dead_code)]

use baton_engine::{
    Action, Command, Measurement, Observations, Output, RevisionObs, Status, Verdict, step,
};
use baton_spec::Rollout;

pub fn spec(yaml: &str) -> Rollout {
    baton_spec::parse(yaml)
        .expect("test spec is valid")
        .remove(0)
}

pub const CANARY: &str = r#"
apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: { name: web }
spec:
  replicas: 2
  progressDeadlineSeconds: 60
  run: { command: ["svc", "{port}"], env: { APP_VERSION: v1 } }
  traffic: { listen: "127.0.0.1:9000" }
  strategy:
    canary:
      steps:
        - setWeight: 10
        - pause: { duration: 10s }
        - analysis: { gates: [errors] }
        - setWeight: 50
        - pause: {}
  analysis:
    gates:
      - name: errors
        metric: { builtin: error_rate }
        successCondition: "result < 0.01"
        interval: 1s
        count: 2
"#;

pub const BLUE_GREEN: &str = r#"
apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: { name: web }
spec:
  replicas: 2
  run: { command: ["svc", "{port}"], env: { APP_VERSION: v1 } }
  traffic: { listen: "127.0.0.1:9000" }
  strategy:
    blueGreen:
      previewListen: "127.0.0.1:9001"
      smoke: [{ path: /readyz }]
      retainPrevious: 1m
"#;

pub const ROLLING: &str = r#"
apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: { name: web }
spec:
  replicas: 3
  run: { command: ["svc", "{port}"], env: { APP_VERSION: v1 } }
  traffic: { listen: "127.0.0.1:9000" }
  strategy:
    rolling: { maxSurge: 1, maxUnavailable: 1 }
"#;

pub fn with_version(r: &Rollout, v: &str) -> Rollout {
    let mut r = r.clone();
    r.spec.run.env.insert("APP_VERSION".into(), v.into());
    r
}

pub struct World {
    pub spec: Rollout,
    pub status: Status,
    pub now: u64,
    pub obs: Observations,
    /// When true the platform makes every desired instance ready and available at once,
    /// and the router acknowledges every table at once.
    pub perfect: bool,
    pub last: Option<Output>,
}

impl World {
    pub fn new(spec: Rollout) -> Self {
        World {
            spec,
            status: Status::default(),
            now: 1_000_000,
            obs: Observations::default(),
            perfect: true,
            last: None,
        }
    }

    /// One engine step, then the perfect world catches up with what was asked.
    pub fn tick(&mut self) -> Output {
        let out = step(&self.spec, &self.status, &self.obs, self.now);
        self.obs.commands.clear();
        self.obs.measurements.clear();
        self.obs.smoke = None;
        self.status = out.status.clone();
        if self.perfect {
            self.obs.router_acked = self.status.route_version;
            self.obs.revisions = self
                .status
                .desired
                .iter()
                .map(|(r, n)| {
                    (
                        r.clone(),
                        RevisionObs {
                            ready: *n,
                            available: *n,
                            stale: 0,
                        },
                    )
                })
                .collect();
        }
        self.last = Some(out.clone());
        out
    }

    pub fn advance(&mut self, ms: u64) -> Output {
        self.now += ms;
        self.tick()
    }

    pub fn command(&mut self, c: Command) -> Result<String, String> {
        self.obs.commands.push(c);
        self.tick().command_results.remove(0)
    }

    /// Answers every Measure action of the last step with `verdict`.
    pub fn answer_measurements(&mut self, verdict: Verdict) {
        let Some(out) = &self.last else { return };
        for a in &out.actions {
            if let Action::Measure {
                gate,
                revision,
                due: true,
                ..
            } = a
            {
                self.obs.measurements.push(Measurement {
                    gate: gate.clone(),
                    revision: revision.clone(),
                    verdict,
                    value: Some(0.0),
                    requests: 100,
                    at: self.now,
                    detail: format!("{verdict:?}"),
                });
            }
        }
    }

    pub fn name_of(&self, version: &str) -> String {
        self.status
            .revisions
            .iter()
            .find(|r| r.run.app_version() == Some(version))
            .map(|r| r.name.clone())
            .expect("revision exists")
    }

    pub fn weight(&self, version: &str) -> u32 {
        self.status.weight(&self.name_of(version))
    }

    /// Ticks (1 s apart, answering measurements) until `done` or the step budget runs out.
    pub fn run_until(&mut self, verdict: Verdict, mut done: impl FnMut(&World) -> bool) -> bool {
        for _ in 0..500 {
            if done(self) {
                return true;
            }
            self.answer_measurements(verdict);
            self.advance(1000);
        }
        done(self)
    }
}
