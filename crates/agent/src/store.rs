//! The agent's state directory.
//!
//! ```text
//! STATE_DIR/
//!   domains/NAME.toml   persistent definitions
//!   domains/NAME.peer   the host (certificate name) this domain's guest
//!                       was handed to, which may hand it back
//!   history.db          finished migration jobs (see `history`)
//!   run/                QMP sockets, and NAME.json for each running QEMU
//!   logs/               QEMU output and guest serial logs
//! ```
//!
//! Files are replaced atomically (write a temporary file, fsync, rename,
//! fsync the directory), so a crash leaves the old or the new version.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use domain::{DomainDefinition, DomainName};

use crate::runfile::RunRecord;

#[derive(Debug, thiserror::Error)]
/// Why the state directory could not be changed.
pub enum StoreError {
    #[error("cannot create state directory {path}")]
    /// A directory could not be created.
    Create {
        /// The directory.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    /// A file could not be written.
    Write {
        /// The file.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("cannot remove {path}")]
    /// A file could not be removed.
    Remove {
        /// The file.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
/// The state directory.
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a state directory.
    ///
    /// # Errors
    /// [`StoreError::Create`] if a directory cannot be made.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(root).map_err(|source| StoreError::Create {
            path: root.to_path_buf(),
            source,
        })?;
        // Definitions, sockets and logs are the agent's alone.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| StoreError::Create {
                path: root.to_path_buf(),
                source,
            },
        )?;
        for sub in ["domains", "run", "logs"] {
            let path = root.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| StoreError::Create {
                path: path.clone(),
                source,
            })?;
            // A crash mid-write leaves a temporary file; the real one is
            // intact (old or new), so the leftover goes.
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp.") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a file of the state directory the crash-safe way (see
    /// `write_atomic`).
    ///
    /// # Errors
    /// [`StoreError::Write`].
    pub(crate) async fn write_file(&self, path: PathBuf, bytes: Vec<u8>) -> Result<(), StoreError> {
        write_atomic(path, bytes).await
    }

    /// Where run records, QMP sockets and serial logs live.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Where QEMU's logs live.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    fn definition_path(&self, name: &DomainName) -> PathBuf {
        // Safe: a DomainName cannot contain '/' or start with '.'.
        self.root.join("domains").join(format!("{name}.toml"))
    }

    /// Every definition on disk. A file that no longer validates is
    /// reported and skipped rather than keeping the agent from starting.
    pub async fn load_definitions(&self) -> Vec<DomainDefinition> {
        let dir = self.root.join("domains");
        tokio::task::spawn_blocking(move || {
            let mut defs = Vec::new();
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return defs;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                    continue;
                }
                let loaded = std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        DomainDefinition::from_toml(&text).map_err(|e| e.to_string())
                    });
                match loaded {
                    Ok(def) if path.file_stem() == Some(def.name.as_str().as_ref()) => {
                        defs.push(def)
                    }
                    Ok(def) => tracing::error!(path = %path.display(), name = %def.name, "definition file name does not match the domain name; skipped"),
                    Err(e) => tracing::error!(path = %path.display(), error = %e, "unreadable definition skipped"),
                }
            }
            defs.sort_by(|a, b| a.name.cmp(&b.name));
            defs
        })
        .await
        .unwrap_or_default()
    }

    /// Persists a definition.
    ///
    /// # Errors
    /// [`StoreError::Write`].
    pub async fn save_definition(&self, def: &DomainDefinition) -> Result<(), StoreError> {
        write_atomic(self.definition_path(&def.name), def.to_toml().into_bytes()).await
    }

    /// Removes a definition (and its binding); a missing file is not an
    /// error.
    ///
    /// # Errors
    /// [`StoreError::Remove`].
    pub async fn remove_definition(&self, name: &DomainName) -> Result<(), StoreError> {
        remove_if_there(self.definition_path(name)).await?;
        remove_if_there(self.binding_path(name)).await
    }

    fn binding_path(&self, name: &DomainName) -> PathBuf {
        self.root.join("domains").join(format!("{name}.peer"))
    }

    /// Records which peer (its certificate's name) `name`'s guest went to,
    /// or that it went nowhere.
    ///
    /// # Errors
    /// [`StoreError::Write`] or [`StoreError::Remove`].
    pub async fn save_binding(
        &self,
        name: &DomainName,
        peer: Option<&str>,
    ) -> Result<(), StoreError> {
        match peer {
            Some(peer) => write_atomic(self.binding_path(name), peer.as_bytes().to_vec()).await,
            None => remove_if_there(self.binding_path(name)).await,
        }
    }

    /// The peer `name`'s guest went to, if recorded.
    pub async fn load_binding(&self, name: &DomainName) -> Option<String> {
        let text = tokio::fs::read_to_string(self.binding_path(name))
            .await
            .ok()?;
        let peer = text.trim();
        (!peer.is_empty()).then(|| peer.to_string())
    }

    fn run_path(&self, name: &DomainName) -> PathBuf {
        self.run_dir().join(format!("{name}.json"))
    }

    /// Records a running QEMU (see `runfile`).
    ///
    /// # Errors
    /// [`StoreError::Write`].
    pub(crate) async fn save_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(record).expect("a run record always serializes");
        write_atomic(self.run_path(&record.name), bytes).await
    }

    /// Forgets the run record of `name` if it describes run `run_id` (a
    /// newer QEMU of the same domain keeps its own).
    pub(crate) async fn remove_run_if(&self, name: &DomainName, run_id: u64) {
        let path = self.run_path(name);
        let Ok(bytes) = tokio::fs::read(&path).await else {
            return;
        };
        if serde_json::from_slice::<RunRecord>(&bytes).is_ok_and(|r| r.run_id == run_id) {
            let _ = tokio::fs::remove_file(&path).await;
        }
    }

    /// Every run record on disk; unreadable ones are reported and removed.
    pub(crate) async fn load_runs(&self) -> Vec<RunRecord> {
        let dir = self.run_dir();
        tokio::task::spawn_blocking(move || {
            let mut runs = Vec::new();
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return runs;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|bytes| {
                    serde_json::from_slice::<RunRecord>(&bytes).map_err(|e| e.to_string())
                }) {
                    Ok(run) => runs.push(run),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "unreadable run record removed");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            runs
        })
        .await
        .unwrap_or_default()
    }
}

async fn remove_if_there(path: PathBuf) -> Result<(), StoreError> {
    match tokio::fs::remove_file(&path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Remove { path, source }),
    }
}

async fn write_atomic(path: PathBuf, bytes: Vec<u8>) -> Result<(), StoreError> {
    let target = path.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let dir = target.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp.{}",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("state"),
            std::process::id()
        ));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &target)
        })();
        if written.is_err() {
            // A full disk must not also leave half a file behind.
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    .map_err(|source| StoreError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str) -> DomainDefinition {
        DomainDefinition::from_toml(&format!(
            "name = \"{name}\"\nmemory_mib = 64\n[kernel]\npath = \"/k\"\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn definitions_persist_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save_definition(&def("b")).await.unwrap();
        store.save_definition(&def("a")).await.unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        let names: Vec<_> = reopened
            .load_definitions()
            .await
            .into_iter()
            .map(|d| d.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        reopened
            .remove_definition(&"a".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(reopened.load_definitions().await.len(), 1);
    }

    #[tokio::test]
    async fn a_corrupt_definition_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save_definition(&def("good")).await.unwrap();
        std::fs::write(dir.path().join("domains/bad.toml"), "name = ").unwrap();
        let defs = store.load_definitions().await;
        assert_eq!(defs.len(), 1);
        assert_eq!(defs[0].name.as_str(), "good");
    }
}
