//! Strategic merge patches, as the API server applies them to built-in kinds: a plain
//! JSON merge, except that the lists Kubernetes declares with a merge key are merged
//! element by element on that key (containers by `name`, ports by `containerPort`...),
//! and the patch's directives (`$patch: delete|replace`, `$setElementOrder/…`,
//! `$retainKeys`, `$deleteFromPrimitiveList/…`) are obeyed or dropped, never stored.
//! kubectl sends these (`kubectl set image`, `kubectl apply` of a built-in); merged as
//! a JSON merge patch, `set image` replaced a container with its name and image only.
//! The table holds the keyed lists of the kinds the project's manifests use, not all.

use serde_json::{Map, Value};

const KEYED: &[(&str, &str)] = &[
    ("containers", "name"),
    ("initContainers", "name"),
    ("ephemeralContainers", "name"),
    ("env", "name"),
    ("ports", "containerPort"),
    ("volumes", "name"),
    ("volumeMounts", "mountPath"),
    ("volumeDevices", "devicePath"),
    ("imagePullSecrets", "name"),
    ("hostAliases", "ip"),
    ("conditions", "type"),
];

fn key_of(field: &str) -> Option<&'static str> {
    KEYED.iter().find(|(f, _)| *f == field).map(|(_, k)| *k)
}

/// Applies `patch` to `target`.
pub fn apply(target: &mut Value, patch: &Value) {
    merge(target, patch);
}

fn without_directives(p: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (k, v) in p {
        if !k.starts_with('$') {
            out.insert(k.clone(), clean(v));
        }
    }
    Value::Object(out)
}

/// A value with every directive taken out (for what is inserted whole).
fn clean(v: &Value) -> Value {
    match v {
        Value::Object(o) => without_directives(o),
        Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
        other => other.clone(),
    }
}

fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = without_directives(p);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else {
        return;
    };
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(gone)) =
                (t.get_mut(field).and_then(Value::as_array_mut), v.as_array())
            {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        let slot = t.entry(k.clone()).or_insert(Value::Null);
        match (key_of(k), v) {
            (Some(key), Value::Array(items)) => merge_list(slot, items, key),
            _ => merge(slot, v),
        }
    }
}

fn merge_list(target: &mut Value, items: &[Value], key: &str) {
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let Some(list) = target.as_array_mut() else {
        return;
    };
    for item in items {
        let at = list.iter().position(|e| e.get(key) == item.get(key));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = at {
                list.remove(i);
            }
            continue;
        }
        match at {
            Some(i) => merge(&mut list[i], item),
            None => list.push(clean(item)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_image_keeps_the_rest_of_the_container() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "trade", "image": "t:1", "env": [{"name": "A", "value": "1"}], "ports": [{"containerPort": 8080}]},
            {"name": "side", "image": "s:1"}]}}}});
        // What `kubectl set image deployment/x trade=t:2` sends.
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "trade"}, {"name": "side"}],
            "containers": [{"image": "t:2", "name": "trade"}]}}}});
        apply(&mut d, &patch);
        let c = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["image"], "t:2");
        assert_eq!(c[0]["env"][0]["value"], "1", "{d}");
        assert_eq!(c[0]["ports"][0]["containerPort"], 8080);
        assert_eq!(c[1]["image"], "s:1");
        assert!(!d.to_string().contains('$'), "{d}");
    }

    #[test]
    fn directives_delete_replace_and_null() {
        let mut d = json!({"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                           "args": ["x", "y"], "labels": {"a": "1", "b": "2"}, "sel": {"k": "v"}});
        apply(
            &mut d,
            &json!({
                "env": [{"name": "A", "$patch": "delete"}, {"name": "C", "value": "3"}],
                "$deleteFromPrimitiveList/args": ["x"],
                "labels": {"b": null},
                "sel": {"$patch": "replace", "n": "m"},
            }),
        );
        assert_eq!(
            d["env"],
            json!([{"name": "B", "value": "2"}, {"name": "C", "value": "3"}])
        );
        assert_eq!(d["args"], json!(["y"]));
        assert_eq!(d["labels"], json!({"a": "1"}));
        assert_eq!(d["sel"], json!({"n": "m"}));
    }
}
