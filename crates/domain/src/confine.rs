//! What files a definition may make QEMU open on this host.
//!
//! QEMU runs with the agent's privileges, so a definition must not name
//! any file it likes: images (kernel, initrd, disk) only under the
//! directories the agent's owner allows (`image_dirs`), device nodes only
//! if allowed as well, and the serial log (which QEMU creates and
//! truncates) only inside the agent's log directory. Paths are compared
//! after resolving symlinks, so neither `..` nor a link leads out.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::DomainDefinition;

/// The directories and kinds of files a host allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// Where kernels, initrds and disk images may be.
    pub image_dirs: Vec<PathBuf>,
    /// Disks may be block devices (and images character devices).
    pub allow_device_nodes: bool,
    /// Where serial logs may be written.
    pub logs_dir: PathBuf,
}

/// A path a definition may not use here.
#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    /// Outside every allowed directory.
    #[error(
        "{what} path {path:?} is outside the image directories this host allows ({allowed}): \
         put the file there, or add its directory to the agent's image_dirs"
    )]
    OutsideImageDirs {
        /// Which path.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The allowed directories, listed.
        allowed: String,
    },
    /// A device node where none are allowed.
    #[error(
        "{what} path {path:?} is a device node; this host takes device nodes only with \
         allow_device_nodes = true"
    )]
    DeviceNode {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A directory, socket or pipe.
    #[error("{what} path {path:?} is not a regular file")]
    NotAFile {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A serial log outside the agent's log directory.
    #[error(
        "serial log {path:?} is outside this host's log directory {logs_dir:?}: leave \
         serial.log unset (the agent picks a file there) or name a file inside it"
    )]
    SerialLogOutside {
        /// The path.
        path: PathBuf,
        /// Where logs may go.
        logs_dir: PathBuf,
    },
    /// `..` in a path.
    #[error("{what} path {path:?} contains '..'")]
    ParentComponent {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The file system could not be asked.
    #[error("cannot check {what} path {path:?}")]
    Io {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What a path resolves to, symlinks followed as far as they exist.
async fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match tokio::fs::canonicalize(&existing).await {
            Ok(real) => {
                return Ok(rest
                    .iter()
                    .rev()
                    .fold(real, |p, c: &std::ffi::OsString| p.join(c)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e);
                };
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            Err(e) => return Err(e),
        }
    }
}

/// The kind of file at `real`, if there is one.
async fn kind(real: &Path) -> io::Result<Option<std::fs::FileType>> {
    match tokio::fs::metadata(real).await {
        Ok(m) => Ok(Some(m.file_type())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Confinement {
    /// Checks every path `def` names.
    ///
    /// # Errors
    /// The first path this host does not allow.
    pub async fn check(&self, def: &DomainDefinition) -> Result<(), ConfinementError> {
        let mut images: Vec<(&'static str, &Path)> = Vec::new();
        if let Some(k) = &def.kernel {
            images.push(("kernel", &k.path));
            if let Some(i) = &k.initrd {
                images.push(("initrd", i));
            }
        }
        for d in &def.disks {
            images.push(("disk", &d.path));
        }
        let mut allowed = Vec::new();
        for dir in &self.image_dirs {
            allowed.push(resolve(dir).await.unwrap_or_else(|_| dir.clone()));
        }
        for (what, path) in images {
            let real = self.real(what, path).await?;
            if !allowed.iter().any(|dir| real.starts_with(dir)) {
                return Err(ConfinementError::OutsideImageDirs {
                    what,
                    path: path.to_path_buf(),
                    allowed: if self.image_dirs.is_empty() {
                        "none configured".into()
                    } else {
                        self.image_dirs
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                });
            }
            self.check_kind(what, path, &real, self.allow_device_nodes)
                .await?;
        }
        if let Some(log) = &def.serial.log {
            let real = self.real("serial log", log).await?;
            let logs_dir = resolve(&self.logs_dir)
                .await
                .unwrap_or_else(|_| self.logs_dir.clone());
            if !real.starts_with(&logs_dir) || real == logs_dir {
                return Err(ConfinementError::SerialLogOutside {
                    path: log.clone(),
                    logs_dir: self.logs_dir.clone(),
                });
            }
            self.check_kind("serial log", log, &real, false).await?;
        }
        Ok(())
    }

    async fn real(&self, what: &'static str, path: &Path) -> Result<PathBuf, ConfinementError> {
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(ConfinementError::ParentComponent {
                what,
                path: path.to_path_buf(),
            });
        }
        resolve(path).await.map_err(|source| ConfinementError::Io {
            what,
            path: path.to_path_buf(),
            source,
        })
    }

    async fn check_kind(
        &self,
        what: &'static str,
        path: &Path,
        real: &Path,
        devices: bool,
    ) -> Result<(), ConfinementError> {
        use std::os::unix::fs::FileTypeExt;
        let kind = kind(real).await.map_err(|source| ConfinementError::Io {
            what,
            path: path.to_path_buf(),
            source,
        })?;
        match kind {
            // Missing: QEMU reports it when the domain starts.
            None => Ok(()),
            Some(k) if k.is_file() => Ok(()),
            Some(k) if k.is_block_device() || k.is_char_device() => {
                if devices {
                    Ok(())
                } else {
                    Err(ConfinementError::DeviceNode {
                        what,
                        path: path.to_path_buf(),
                    })
                }
            }
            Some(_) => Err(ConfinementError::NotAFile {
                what,
                path: path.to_path_buf(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(kernel: &Path, serial: Option<&Path>) -> DomainDefinition {
        let mut text = format!(
            "name = \"vm\"\nmemory_mib = 64\n[kernel]\npath = {:?}\n",
            kernel.display().to_string()
        );
        if let Some(log) = serial {
            text.push_str(&format!(
                "[serial]\nlog = {:?}\n",
                log.display().to_string()
            ));
        }
        DomainDefinition::from_toml(&text).unwrap()
    }

    fn confinement(root: &Path) -> Confinement {
        Confinement {
            image_dirs: vec![root.join("images")],
            allow_device_nodes: false,
            logs_dir: root.join("state/logs"),
        }
    }

    #[tokio::test]
    async fn images_only_under_the_allowed_directories_links_followed() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["images", "elsewhere", "state/logs"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("images/kernel"), b"k").unwrap();
        std::fs::write(r.join("elsewhere/secret"), b"s").unwrap();
        std::os::unix::fs::symlink(r.join("elsewhere/secret"), r.join("images/link")).unwrap();
        let c = confinement(r);

        c.check(&definition(&r.join("images/kernel"), None))
            .await
            .unwrap();
        // Not there yet: allowed, QEMU says so at start.
        c.check(&definition(&r.join("images/new/kernel"), None))
            .await
            .unwrap();
        for refused in [
            r.join("elsewhere/secret"),
            r.join("images/link"),
            PathBuf::from("/etc/passwd"),
        ] {
            let err = c.check(&definition(&refused, None)).await.unwrap_err();
            assert!(
                matches!(err, ConfinementError::OutsideImageDirs { .. }),
                "{refused:?}: {err}"
            );
        }
        let err = c
            .check(&definition(&r.join("images/../elsewhere/secret"), None))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConfinementError::ParentComponent { .. }),
            "{err}"
        );
        let none = Confinement {
            image_dirs: vec![],
            ..c
        };
        let err = none
            .check(&definition(&r.join("images/kernel"), None))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("none configured"), "{err}");
    }

    #[tokio::test]
    async fn device_nodes_only_when_allowed() {
        let root = tempfile::tempdir().unwrap();
        let c = Confinement {
            image_dirs: vec![PathBuf::from("/dev")],
            allow_device_nodes: false,
            logs_dir: root.path().to_path_buf(),
        };
        let err = c
            .check(&definition(Path::new("/dev/null"), None))
            .await
            .unwrap_err();
        assert!(matches!(err, ConfinementError::DeviceNode { .. }), "{err}");
        let allowed = Confinement {
            allow_device_nodes: true,
            ..c
        };
        allowed
            .check(&definition(Path::new("/dev/null"), None))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn serial_logs_only_in_the_log_directory() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["images", "state/logs"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let c = confinement(r);
        let kernel = r.join("images/kernel");
        c.check(&definition(&kernel, Some(&r.join("state/logs/vm.log"))))
            .await
            .unwrap();
        for refused in [
            r.join("state/definitions.db"),
            PathBuf::from("/etc/passwd"),
            r.join("state/logs"),
        ] {
            let err = c
                .check(&definition(&kernel, Some(&refused)))
                .await
                .unwrap_err();
            assert!(
                matches!(err, ConfinementError::SerialLogOutside { .. }),
                "{refused:?}: {err}"
            );
        }
    }
}
