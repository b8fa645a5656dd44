//! Where the local audit trail keeps what protects it: its head (the newest entry
//! and high-water mark) and its key. Both sit outside the state directory by
//! default, so whoever can write the state directory (and so the SQLite trail) can
//! neither remove entries from its end nor forge one unnoticed; whoever can also
//! write the head can truncate it, and whoever holds the key can forge.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_audit::{AuditLog, Key};

use crate::paths::Paths;

/// The environment variable that holds the audit key itself.
pub const KEY_ENV: &str = "BATON_AUDIT_KEY";

/// Where the head and the key are, when not in their default places.
#[derive(Debug, Clone, Default)]
pub struct Seal {
    /// `--audit-head` (`BATON_AUDIT_HEAD`).
    pub head: Option<PathBuf>,
    /// `--audit-key-file` (`BATON_AUDIT_KEY_FILE`).
    pub key_file: Option<PathBuf>,
}

/// The key, and where it was found (for messages).
pub struct FoundKey {
    pub key: Key,
    pub from: String,
}

impl Seal {
    /// One directory per state directory, outside it: `$XDG_STATE_HOME/baton/ID`
    /// (`~/.local/state/baton/ID` without it), ID the first 16 hex digits of the
    /// SHA-256 of the state directory's absolute path.
    pub fn home(paths: &Paths) -> Result<PathBuf> {
        let base = match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
            (Some(x), _) if Path::new(&x).is_absolute() => PathBuf::from(x),
            (_, Some(h)) if !h.is_empty() => Path::new(&h).join(".local/state"),
            _ => bail!(
                "neither XDG_STATE_HOME nor HOME is set, so the audit trail's head and key have no place outside the state directory: give --audit-head and --audit-key-file"
            ),
        };
        let root = std::fs::canonicalize(&paths.root)
            .or_else(|_| std::path::absolute(&paths.root))
            .with_context(|| format!("cannot resolve {}", paths.root.display()))?;
        let id = baton_audit::digest(root.as_os_str().as_encoded_bytes());
        Ok(base.join("baton").join(id.get(..16).unwrap_or(&id)))
    }

    pub fn head_path(&self, paths: &Paths) -> Result<PathBuf> {
        match &self.head {
            Some(p) => outside("--audit-head", p, paths).map(|()| p.clone()),
            None => Ok(Seal::home(paths)?.join("audit.head")),
        }
    }

    /// The key: the file given (`--audit-key-file`), else `BATON_AUDIT_KEY`, else the
    /// default file beside the default head. With `create` (the controller), a
    /// missing file is made (0600): a trail is signed from then on.
    pub fn key(&self, paths: &Paths, create: bool) -> Result<Option<FoundKey>> {
        let env = std::env::var(KEY_ENV).ok();
        let p = match (&self.key_file, env) {
            (Some(p), _) => {
                outside("--audit-key-file", p, paths)?;
                p.clone()
            }
            (None, Some(text)) => {
                let key = Key::from_text(&text).with_context(|| KEY_ENV.to_string())?;
                return Ok(Some(FoundKey {
                    key,
                    from: KEY_ENV.into(),
                }));
            }
            (None, None) => Seal::home(paths)?.join("audit.key"),
        };
        if create && !p.exists() {
            make_key(&p)?;
        }
        match p.exists() {
            true => read_key(&p).map(Some),
            false => Ok(None),
        }
    }

    /// The key named explicitly (`--audit-key-file`, else `BATON_AUDIT_KEY`), for a
    /// trail that is not this machine's: a cluster's.
    pub fn explicit_key(&self) -> Result<Option<FoundKey>> {
        if let Some(p) = &self.key_file {
            return read_key(p).map(Some);
        }
        match std::env::var(KEY_ENV) {
            Ok(text) => Ok(Some(FoundKey {
                key: Key::from_text(&text).with_context(|| KEY_ENV.to_string())?,
                from: KEY_ENV.into(),
            })),
            Err(_) => Ok(None),
        }
    }

    /// The trail for appending: signed with the key (made first when `create_key`),
    /// checked against and recording the head.
    pub fn writer(&self, paths: &Paths, create_key: bool) -> Result<AuditLog> {
        let key = self.key(paths, create_key)?.map(|k| k.key);
        let head = self.head_path(paths)?;
        Ok(AuditLog::open(&paths.db(), Some(head))
            .context("cannot open the audit trail")?
            .with_key(key))
    }
}

/// The head and the key protect the trail only from outside the state directory.
fn outside(flag: &str, p: &Path, paths: &Paths) -> Result<()> {
    let abs = |p: &Path| {
        std::fs::canonicalize(p)
            .or_else(|_| {
                // A file not made yet: its directory resolved.
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
                let dir = dir.map_or_else(std::env::current_dir, std::fs::canonicalize)?;
                Ok::<_, std::io::Error>(dir.join(p.file_name().unwrap_or_default()))
            })
            .unwrap_or_else(|_| p.to_path_buf())
    };
    if abs(p).starts_with(abs(&paths.root)) {
        bail!(
            "{flag} {}: it is inside the state directory {}, where whoever can change the trail can change it too; keep it elsewhere",
            p.display(),
            paths.root.display()
        );
    }
    Ok(())
}

/// Reads a key file, which only its owner may read (like ssh's keys).
fn read_key(p: &Path) -> Result<FoundKey> {
    let meta = std::fs::metadata(p)
        .with_context(|| format!("cannot read the audit key {}", p.display()))?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "audit key {}: its mode is {:o}, so others may read it: make it 0600 (chmod 600)",
            p.display(),
            meta.mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read the audit key {}", p.display()))?;
    let key = Key::from_text(&text).with_context(|| format!("audit key {}", p.display()))?;
    Ok(FoundKey {
        key,
        from: p.display().to_string(),
    })
}

fn make_key(p: &Path) -> Result<()> {
    if let Some(dir) = p.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = Key::generate().context("cannot read /dev/urandom for the audit key")?;
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p);
    match made {
        Ok(mut f) => f
            .write_all(format!("{text}\n").as_bytes())
            .with_context(|| format!("cannot write the audit key {}", p.display())),
        // Another writer made it first: theirs is the key.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create the audit key {}", p.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_others_may_read_or_inside_the_state_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(dir.path().join(".baton"));
        paths.create().expect("create");
        let loose = dir.path().join("loose.key");
        std::fs::write(&loose, "0123456789abcdef0123456789abcdef\n").expect("write");
        std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let seal = Seal {
            head: None,
            key_file: Some(loose.clone()),
        };
        let err = seal.key(&paths, false).err().map(|e| format!("{e:#}"));
        assert!(
            err.as_deref().is_some_and(|e| e.contains("0600")),
            "{err:?}"
        );
        std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        assert!(seal.key(&paths, false).expect("key").is_some());

        let inside = Seal {
            head: Some(paths.root.join("audit.head")),
            key_file: None,
        };
        let err = inside.head_path(&paths).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(
                |e| e.contains("--audit-head") && e.contains("inside the state directory")
            ),
            "{err:?}"
        );
    }
}
