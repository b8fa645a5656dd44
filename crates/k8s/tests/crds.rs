//! The CRDs under `deploy/crds/` are the ones the code generates; and the schema
//! carries what admission needs to reject impossible specs.

use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
}

#[test]
fn checked_in_crds_are_current() {
    let generated = baton_k8s::crd::crds();
    if std::env::var("BATON_UPDATE_CRDS").is_ok_and(|v| v == "1") {
        for (file, text) in &generated {
            std::fs::write(dir().join(file), text).expect("write crd");
        }
    }
    for (file, text) in &generated {
        let on_disk = std::fs::read_to_string(dir().join(file)).unwrap_or_default();
        assert!(
            on_disk == *text,
            "deploy/crds/{file} is stale: regenerate with BATON_UPDATE_CRDS=1 cargo nextest run -p baton-k8s --test crds"
        );
    }
}

#[test]
fn the_rollout_crd_has_what_kubectl_and_admission_need() {
    let crd = serde_json::to_value(<baton_k8s::crd::Rollout as kube::CustomResourceExt>::crd())
        .expect("crd");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "brl");
    assert!(version["subresources"]["status"].is_object());
    assert_eq!(
        version["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, vec!["Phase", "Stable", "Canary", "Weight", "Age"]);
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rules: Vec<&str> = spec["x-kubernetes-validations"]
        .as_array()
        .expect("validation rules")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        rules
            .iter()
            .any(|r| r.contains("has(self.template) != has(self.workloadRef)")),
        "{rules:?}"
    );
    let text = serde_json::to_string(&crd).expect("json");
    assert!(
        text.contains("x-kubernetes-preserve-unknown-fields"),
        "the engine state is opaque"
    );
}
