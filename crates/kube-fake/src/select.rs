//! Label and field selectors as the API server parses them.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector(Vec<Term>);

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn set(values: &str) -> Vec<String> {
    values
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for t in split_terms(s) {
            let t = t.trim();
            if t.is_empty() {
                continue;
            }
            if let Some((k, v)) = t.split_once("!=") {
                terms.push(Term::Ne(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = t.split_once("==") {
                terms.push(Term::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = t.split_once('=') {
                terms.push(Term::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = t.split_once(" notin ") {
                terms.push(Term::NotIn(k.trim().into(), set(v)));
            } else if let Some((k, v)) = t.split_once(" in ") {
                terms.push(Term::In(k.trim().into(), set(v)));
            } else if let Some(k) = t.strip_prefix('!') {
                terms.push(Term::Absent(k.trim().into()));
            } else if t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                terms.push(Term::Exists(t.into()));
            } else {
                return Err(format!("cannot parse selector term {t:?}"));
            }
        }
        Ok(Selector(terms))
    }

    /// Whether a map of labels (or of field values) matches.
    pub fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
            Term::Ne(k, v) => get(k).as_deref() != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
            Term::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Term::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
        })
    }

    pub fn matches_labels(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.matches(|k| labels.get(k).and_then(Value::as_str).map(str::to_string))
    }

    /// Field selectors: `metadata.name`, `metadata.namespace`, or any dotted path to a string.
    pub fn matches_fields(&self, obj: &Value) -> bool {
        self.matches(|path| {
            let mut v = obj;
            for part in path.split('.') {
                v = v.get(part)?;
            }
            v.as_str().map(str::to_string)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_match_like_the_api_server() {
        let o = json!({"metadata": {"name": "a", "labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| Selector::parse(s).expect("parse").matches_labels(&o);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, api),!canary"));
        assert!(!m("tier notin (front)"));
        assert!(m(""));
        assert!(
            Selector::parse("metadata.name=a")
                .expect("parse")
                .matches_fields(&o)
        );
    }
}
