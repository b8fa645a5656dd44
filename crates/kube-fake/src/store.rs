//! The storage behind the fake API server: objects by group/version, resource,
//! namespace and name, one resourceVersion counter, and a history of changes for
//! watches to resume from.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

/// Where an object lives: `v1` or `apps/v1`, a plural resource, a namespace for
/// namespaced resources.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub gv: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl Key {
    pub fn new(gv: &str, resource: &str, namespace: Option<&str>, name: &str) -> Key {
        Key {
            gv: gv.into(),
            resource: resource.into(),
            namespace: namespace.map(str::to_string),
            name: name.into(),
        }
    }
}

/// One write, as watches see it. The object is shared: history, the live feed and
/// every watcher hold the same copy.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub kind: &'static str,
    pub key: Key,
    pub object: Arc<Value>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error(
        "the object has been modified; please apply your changes to the latest version and try again ({0})"
    )]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    pub fn code(&self) -> u16 {
        match self {
            StoreError::NotFound(_) => 404,
            StoreError::AlreadyExists(_) | StoreError::Conflict(_) => 409,
            StoreError::Invalid(_) => 422,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "NotFound",
            StoreError::AlreadyExists(_) => "AlreadyExists",
            StoreError::Conflict(_) => "Conflict",
            StoreError::Invalid(_) => "Invalid",
        }
    }
}

/// How many changes a watch can resume across before it gets 410 Gone.
const HISTORY: usize = 50_000;

struct Inner {
    rv: u64,
    uid: u64,
    /// Shared with lists, history and watchers: a read never copies an object.
    objects: BTreeMap<Key, Arc<Value>>,
    /// Owner uid → its dependents (by ownerReference), so garbage collection does not
    /// scan every object on every delete.
    dependents: HashMap<String, BTreeSet<Key>>,
    history: VecDeque<Change>,
    /// resource → kind, learned from stored objects (for bookmarks and lists).
    kinds: BTreeMap<(String, String), String>,
}

/// Shared by the HTTP server and the simulated cluster.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<Change>,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            inner: Arc::new(Mutex::new(Inner {
                rv: 1,
                uid: 0,
                objects: BTreeMap::new(),
                dependents: HashMap::new(),
                history: VecDeque::new(),
                kinds: BTreeMap::new(),
            })),
            changes: broadcast::channel(65_536).0,
        }
    }
}

pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Whether everything but metadata and status is equal: a change there bumps
/// `generation`. Compared in place (copying both sides was most of a write's cost).
fn same_spec(a: &Value, b: &Value) -> bool {
    let spec = |k: &str| !matches!(k, "metadata" | "status" | "apiVersion" | "kind");
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.iter()
                .filter(|(k, _)| spec(k))
                .all(|(k, v)| y.get(k) == Some(v))
                && y.keys().filter(|k| spec(k)).all(|k| x.contains_key(k))
        }
        _ => a == b,
    }
}

/// The uids an object names in its ownerReferences.
fn owner_uids(v: &Value) -> impl Iterator<Item = &str> {
    v["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
}

impl Inner {
    /// Stores an object, keeping the dependents index in step with its ownerReferences.
    fn put(&mut self, key: &Key, obj: Arc<Value>) {
        if let Some(old) = self.objects.insert(key.clone(), obj.clone()) {
            self.unindex(key, &old);
        }
        for uid in owner_uids(&obj) {
            self.dependents
                .entry(uid.to_string())
                .or_default()
                .insert(key.clone());
        }
    }

    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.objects.remove(key) {
            self.unindex(key, &old);
        }
    }

    fn unindex(&mut self, key: &Key, old: &Value) {
        for uid in owner_uids(old) {
            if let Some(set) = self.dependents.get_mut(uid) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(uid);
                }
            }
        }
    }
}

fn rv_of(v: &Value) -> Option<u64> {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
}

fn ensure_meta(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = json!({});
    }
    let obj = v.as_object_mut().expect("object");
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().expect("metadata object")
}

impl Store {
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    pub fn kind_of(&self, gv: &str, resource: &str) -> Option<String> {
        self.lock()
            .kinds
            .get(&(gv.to_string(), resource.to_string()))
            .cloned()
    }

    fn record(&self, inner: &mut Inner, kind: &'static str, key: Key, object: Arc<Value>) {
        let change = Change {
            rv: inner.rv,
            kind,
            key,
            object,
        };
        inner.history.push_back(change.clone());
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        let _ = self.changes.send(change);
    }

    pub fn get(&self, key: &Key) -> Result<Arc<Value>, StoreError> {
        self.lock()
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("{} {:?}", key.resource, key.name)))
    }

    /// Objects of a resource, in one namespace or all; with the list's resourceVersion.
    pub fn list(
        &self,
        gv: &str,
        resource: &str,
        namespace: Option<&str>,
    ) -> (Vec<Arc<Value>>, u64) {
        self.list_where(gv, resource, namespace, |_| true)
    }

    /// Like `list`, filtering under the lock (a selector over thousands of objects).
    pub fn list_where(
        &self,
        gv: &str,
        resource: &str,
        namespace: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        // Keys sort by group/version, resource, namespace, name: a list is one range.
        let start = Key {
            gv: gv.into(),
            resource: resource.into(),
            namespace: namespace.map(str::to_string),
            name: String::new(),
        };
        let items = inner
            .objects
            .range(start..)
            .take_while(|(k, _)| {
                k.gv == gv
                    && k.resource == resource
                    && (namespace.is_none() || k.namespace.as_deref() == namespace)
            })
            .filter(|(_, v)| keep(v))
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv)
    }

    /// Changes after `rv`, or None when history no longer reaches back that far.
    pub fn since(&self, rv: u64) -> Option<Vec<Change>> {
        let inner = self.lock();
        if let Some(first) = inner.history.front()
            && first.rv > rv + 1
            && inner.history.len() >= HISTORY
        {
            return None;
        }
        Some(
            inner
                .history
                .iter()
                .filter(|c| c.rv > rv)
                .cloned()
                .collect(),
        )
    }

    pub fn create(&self, key_base: &Key, mut obj: Value) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let meta = ensure_meta(&mut obj);
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            let prefix = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if prefix.is_empty() {
                return Err(StoreError::Invalid(
                    "metadata.name or metadata.generateName is required".into(),
                ));
            }
            name = format!("{prefix}{:05x}", (inner.uid * 2_654_435_761) % 0xfffff);
        }
        let key = Key {
            name: name.clone(),
            ..key_base.clone()
        };
        if inner.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists(format!(
                "{} {name:?}",
                key.resource
            )));
        }
        inner.rv += 1;
        inner.uid += 1;
        let (rv, uid) = (inner.rv, inner.uid);
        let meta = ensure_meta(&mut obj);
        meta.insert("name".into(), json!(name));
        if let Some(ns) = &key.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{uid:012x}")),
        );
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        if let Some(kind) = obj.get("kind").and_then(Value::as_str) {
            inner
                .kinds
                .insert((key.gv.clone(), key.resource.clone()), kind.to_string());
        }
        let obj = Arc::new(obj);
        inner.put(&key, obj.clone());
        self.record(&mut inner, "ADDED", key, obj.clone());
        Ok(obj)
    }

    /// Replaces an object (`status_only`: only its status). A resourceVersion in the
    /// body must be the current one.
    pub fn replace(
        &self,
        key: &Key,
        mut obj: Value,
        status_only: bool,
    ) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let Some(old) = inner.objects.get(key).cloned() else {
            return Err(StoreError::NotFound(format!(
                "{} {:?}",
                key.resource, key.name
            )));
        };
        if let Some(given) = rv_of(&obj)
            && Some(given) != rv_of(&old)
        {
            return Err(StoreError::Conflict(format!(
                "{} {:?}",
                key.resource, key.name
            )));
        }
        let mut next = if status_only {
            let mut n = (*old).clone();
            n["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            n
        } else {
            // Writes to the main resource never change status (the status subresource does).
            match old.get("status") {
                Some(s) => obj["status"] = s.clone(),
                None => {
                    if let Some(o) = obj.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            // Identity and bookkeeping stay the server's.
            let keep = [
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "name",
                "namespace",
            ];
            let old_meta = old["metadata"].clone();
            let meta = ensure_meta(&mut obj);
            for k in keep {
                match old_meta.get(k) {
                    Some(v) => {
                        meta.insert(k.into(), v.clone());
                    }
                    None => {
                        meta.remove(k);
                    }
                }
            }
            obj
        };
        if next == *old {
            return Ok(old);
        }
        inner.rv += 1;
        let rv = inner.rv;
        if !same_spec(&next, &old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            ensure_meta(&mut next).insert("generation".into(), json!(g));
        }
        ensure_meta(&mut next).insert("resourceVersion".into(), json!(rv.to_string()));
        let deleting = next["metadata"]["deletionTimestamp"].is_string();
        let no_finalizers = next["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        let next = Arc::new(next);
        if deleting && no_finalizers {
            inner.remove(key);
            self.record(&mut inner, "DELETED", key.clone(), next.clone());
            drop(inner);
            self.collect_garbage(&next);
            return Ok(next);
        }
        inner.put(key, next.clone());
        self.record(&mut inner, "MODIFIED", key.clone(), next.clone());
        Ok(next)
    }

    /// Applies a change function to the current object and replaces it (for patches).
    /// A write that lands between the read and the replace makes it start over with
    /// the newer object, as the API server does for a patch that names no
    /// resourceVersion; one that names an older version than the current gets 409.
    pub fn modify(
        &self,
        key: &Key,
        status_only: bool,
        mut f: impl FnMut(&mut Value) -> Result<(), StoreError>,
    ) -> Result<Arc<Value>, StoreError> {
        let mut attempts = 0;
        loop {
            let mut obj = (*self.get(key)?).clone();
            let rv = obj["metadata"]["resourceVersion"].clone();
            f(&mut obj)?;
            // A patch that names a resourceVersion must name the current one.
            let given = obj["metadata"]["resourceVersion"].clone();
            if given != rv && !given.is_null() {
                return Err(StoreError::Conflict(format!(
                    "{} {:?}",
                    key.resource, key.name
                )));
            }
            ensure_meta(&mut obj).insert("resourceVersion".into(), rv);
            match self.replace(key, obj, status_only) {
                Err(StoreError::Conflict(_)) if attempts < 100 => attempts += 1,
                other => return other,
            }
        }
    }

    /// Deletes, or marks for deletion while finalizers remain; dependents (by
    /// ownerReference) are collected after their owner goes.
    pub fn delete(&self, key: &Key) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let Some(mut obj) = inner.objects.get(key).map(|o| (**o).clone()) else {
            return Err(StoreError::NotFound(format!(
                "{} {:?}",
                key.resource, key.name
            )));
        };
        inner.rv += 1;
        let rv = inner.rv;
        ensure_meta(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                ensure_meta(&mut obj).insert("deletionTimestamp".into(), json!(now_rfc3339()));
            }
            let obj = Arc::new(obj);
            inner.put(key, obj.clone());
            self.record(&mut inner, "MODIFIED", key.clone(), obj.clone());
            return Ok(obj);
        }
        let obj = Arc::new(obj);
        inner.remove(key);
        self.record(&mut inner, "DELETED", key.clone(), obj.clone());
        drop(inner);
        self.collect_garbage(&obj);
        Ok(obj)
    }

    fn collect_garbage(&self, owner: &Value) {
        let Some(uid) = owner["metadata"]["uid"].as_str() else {
            return;
        };
        let dependents: Vec<Key> = self
            .lock()
            .dependents
            .get(uid)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        for k in dependents {
            let _ = self.delete(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key::new("apps/v1", "replicasets", Some("default"), name)
    }

    #[test]
    fn stale_updates_conflict_and_generation_follows_spec() {
        let s = Store::default();
        let created = s
            .create(
                &key(""),
                json!({"kind": "ReplicaSet", "metadata": {"name": "a"}, "spec": {"replicas": 1}}),
            )
            .expect("create");
        assert_eq!(created["metadata"]["generation"], 1);
        let mut stale = (*created).clone();
        let mut fresh = (*created).clone();
        fresh["spec"]["replicas"] = json!(2);
        let updated = s.replace(&key("a"), fresh, false).expect("update");
        assert_eq!(updated["metadata"]["generation"], 2);
        stale["spec"]["replicas"] = json!(3);
        assert!(matches!(
            s.replace(&key("a"), stale, false),
            Err(StoreError::Conflict(_))
        ));
        let mut st = (*updated).clone();
        st["status"] = json!({"readyReplicas": 2});
        let after = s.replace(&key("a"), st, true).expect("status");
        assert_eq!(
            after["metadata"]["generation"], 2,
            "status does not bump generation"
        );
        let mut sneaky = (*after).clone();
        sneaky["status"] = json!({"readyReplicas": 9});
        let after = s.replace(&key("a"), sneaky, false).expect("main write");
        assert_eq!(
            after["status"]["readyReplicas"], 2,
            "the main resource cannot write status"
        );
    }

    #[test]
    fn finalizers_hold_deletion_and_owners_take_dependents_along() {
        let s = Store::default();
        let owner = s
            .create(
                &key(""),
                json!({"metadata": {"name": "o", "finalizers": ["x"]}}),
            )
            .expect("owner");
        let uid = owner["metadata"]["uid"].clone();
        s.create(
            &Key::new("v1", "pods", Some("default"), ""),
            json!({"metadata": {"name": "p", "ownerReferences": [{"uid": uid}]}}),
        )
        .expect("pod");
        let marked = s.delete(&key("o")).expect("delete");
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert!(s.get(&key("o")).is_ok(), "held by its finalizer");
        s.modify(&key("o"), false, |o| {
            o["metadata"]["finalizers"] = json!([]);
            Ok(())
        })
        .expect("remove finalizer");
        assert!(s.get(&key("o")).is_err());
        assert!(
            s.get(&Key::new("v1", "pods", Some("default"), "p"))
                .is_err(),
            "garbage collected"
        );
    }

    #[test]
    fn collection_follows_owner_references_as_they_change() {
        let s = Store::default();
        let pod = |name: &str| Key::new("v1", "pods", Some("default"), name);
        let a = s
            .create(&key(""), json!({"metadata": {"name": "a"}}))
            .expect("a");
        let b = s
            .create(&key(""), json!({"metadata": {"name": "b"}}))
            .expect("b");
        s.create(
            &pod(""),
            json!({"metadata": {"name": "p", "ownerReferences": [{"uid": a["metadata"]["uid"]}]}}),
        )
        .expect("pod");
        s.modify(&pod("p"), false, |p| {
            p["metadata"]["ownerReferences"] = json!([{"uid": b["metadata"]["uid"]}]);
            Ok(())
        })
        .expect("adopted by b");
        s.delete(&key("a")).expect("delete a");
        assert!(s.get(&pod("p")).is_ok(), "no longer a's dependent");
        s.delete(&key("b")).expect("delete b");
        assert!(s.get(&pod("p")).is_err(), "collected with its new owner");
    }
}
