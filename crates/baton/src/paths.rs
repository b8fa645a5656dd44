//! Where a Baton working directory keeps its files (`.baton/` by default).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Paths { root: root.into() }
    }
    /// Creates the directory (owner-only: it holds the API token).
    /// Creates the state directory, private to its owner. An existing directory is
    /// left as it is (it may be shared on purpose); one others can read is warned of.
    pub fn create(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let existed = self.root.is_dir();
        std::fs::create_dir_all(self.logs())
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        if !existed {
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                .with_context(|| {
                    format!("cannot restrict permissions of {}", self.root.display())
                })?;
        } else if let Ok(m) = std::fs::metadata(&self.root)
            && m.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "warning: {} is open to other users (mode {:o}); it holds the API token: \
                 consider chmod 700",
                self.root.display(),
                m.permissions().mode() & 0o777
            );
        }
        Ok(())
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("state.db")
    }
    pub fn token(&self) -> PathBuf {
        self.root.join("token")
    }
    pub fn api_addr(&self) -> PathBuf {
        self.root.join("api.addr")
    }
    pub fn proxy_socket(&self) -> PathBuf {
        self.root.join("proxy.sock")
    }
    /// The rollout metrics the proxy serves on `/metrics` after its own.
    pub fn rollout_metrics(&self) -> PathBuf {
        self.root.join("rollout-metrics.prom")
    }
    pub fn proxy_log(&self) -> PathBuf {
        self.root.join("proxy.log")
    }
    pub fn controller_pid(&self) -> PathBuf {
        self.root.join("controller.pid")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn exists(&self) -> bool {
        Path::new(&self.db()).exists()
    }
}

/// A new random token from the kernel's generator, as hex.
pub fn new_token() -> Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom for the API token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
