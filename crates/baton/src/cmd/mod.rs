//! One module per command (or small family); `main.rs` only parses and dispatches.
//! What several commands share lives here: output format, spec input, the control
//! API's error shape.

pub mod act;
pub mod apply;
pub mod audit;
pub mod completions;
pub mod convert;
pub mod dashboard;
pub mod demo;
pub mod down;
pub mod history;
pub mod man;
pub mod operator;
pub mod proxy;
pub mod smoke;
pub mod status;
pub mod target;
pub mod up;
pub mod validate;
pub mod wait;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;

pub use target::Target;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
    /// The same document as `json`, in YAML.
    Yaml,
}

impl Output {
    /// A document for scripts (`json` or `yaml`), not text for people.
    pub fn structured(self) -> bool {
        self != Output::Text
    }

    /// `v` as this format's document (text output prints JSON: callers render text
    /// themselves).
    pub fn document(self, v: &Value) -> Result<String> {
        Ok(match self {
            Output::Yaml => serde_saphyr::to_string(v).context("cannot write YAML")?,
            Output::Json | Output::Text => format!("{}\n", serde_json::to_string_pretty(v)?),
        })
    }
}

#[derive(Args, Debug)]
pub struct SpecArgs {
    /// A YAML file (several `---`-separated Rollouts allowed), a directory of them
    /// (*.yaml, *.yml), or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "SPEC")]
    pub file: PathBuf,
}

/// The text of a spec: a file, a directory's YAML files joined as one multi-document
/// stream (in name order), or standard input.
pub fn read_spec(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the spec from stdin")?;
        return Ok(s);
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read directory {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{} holds no *.yaml or *.yml file", path.display());
        }
        let texts = files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(texts.join("\n---\n"));
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

pub fn parse_spec(path: &Path) -> Result<Vec<baton_spec::Rollout>> {
    let text = read_spec(path)?;
    baton_spec::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

pub fn print_as(output: Output, v: &Value) -> Result<()> {
    print!("{}", output.document(v)?);
    Ok(())
}

/// Turns a non-2xx answer into an error with the controller's message.
pub fn check((code, v): (u16, Value)) -> Result<Value> {
    if (200..300).contains(&code) {
        return Ok(v);
    }
    let mut msg = v["error"].as_str().unwrap_or("request failed").to_string();
    if let Some(errs) = v["errors"].as_array() {
        msg = format!("{} problem(s) in the spec:", errs.len());
        for e in errs {
            msg.push_str(&format!(
                "\n  - {}: {}",
                e["field"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or("")
            ));
        }
    }
    Err(anyhow!("{msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_the_same_document_as_json() {
        let v = serde_json::json!({"phase": "Healthy", "revisions": [{"weight": 100}]});
        let yaml = Output::Yaml.document(&v).expect("yaml");
        let back: Value = serde_saphyr::from_str(&yaml).expect("parses");
        assert_eq!(back, v, "{yaml}");
        assert!(!yaml.contains('{'), "block style, not JSON: {yaml}");
        let json: Value =
            serde_json::from_str(&Output::Json.document(&v).expect("json")).expect("parses");
        assert_eq!(json, v);
    }
}
