//! What files a definition may make QEMU open on this host.
//!
//! QEMU runs with the agent's privileges, so a definition must not name
//! any file it likes: images (kernel, initrd, disk) only under the
//! directories the agent's owner allows (`image_dirs`), device nodes only
//! if allowed as well, and the serial log (which QEMU creates and
//! truncates) only inside the agent's log directory. Paths are compared
//! after resolving symlinks, so neither `..` nor a link leads out, and a
//! link to nothing is refused (whatever creates the file would follow it).
//! A qcow2 image names files QEMU opens too (its backing chain, a data
//! file): the whole chain is held to the same rules.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::definition::DiskFormat;
use crate::DomainDefinition;

mod qcow2;

/// How deep a backing chain may go.
pub const MAX_CHAIN: usize = 16;

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
        "serial log {path:?} is not {name}'s own: leave serial.log unset (the agent uses \
         {logs_dir:?}/{name}.serial.log) or name a file in {logs_dir:?}/{name}/"
    )]
    SerialLogOutside {
        /// The path.
        path: PathBuf,
        /// The domain's name.
        name: String,
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
    /// A symbolic link to nothing.
    #[error("{what} path {path:?} is a symbolic link to a missing file")]
    DanglingLink {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A file in a qcow2 image's backing chain this host does not allow.
    #[error("the backing chain of {image:?}: {inner}")]
    Backing {
        /// The image whose chain it is.
        image: PathBuf,
        /// What is wrong with the file down the chain.
        inner: Box<ConfinementError>,
    },
    /// A qcow2 image that names a file in a way this host does not follow.
    #[error("image {image:?}: {reason}")]
    Image {
        /// The image.
        image: PathBuf,
        /// Why.
        reason: String,
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

/// Why a path does not resolve.
enum Unresolved {
    /// A link on the way leads nowhere.
    Dangling,
    Io(io::Error),
}

/// What a path resolves to, symlinks followed as far as they exist; a
/// link to a missing file is refused rather than taken for a new file.
async fn resolve(path: &Path) -> Result<PathBuf, Unresolved> {
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
                if tokio::fs::symlink_metadata(&existing).await.is_ok() {
                    return Err(Unresolved::Dangling);
                }
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(Unresolved::Io(e));
                };
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            Err(e) => return Err(Unresolved::Io(e)),
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
        let mut images: Vec<(&'static str, &Path, DiskFormat)> = Vec::new();
        if let Some(k) = &def.kernel {
            images.push(("kernel", &k.path, DiskFormat::Raw));
            if let Some(i) = &k.initrd {
                images.push(("initrd", i, DiskFormat::Raw));
            }
        }
        for d in &def.disks {
            images.push(("disk", &d.path, d.format));
        }
        let allowed = self.allowed_dirs().await;
        for (what, path, format) in images {
            self.check_chain(what, path, format, &allowed).await?;
        }
        if let Some(log) = &def.serial.log {
            let real = self.real("serial log", log).await?;
            let logs_dir = match resolve(&self.logs_dir).await {
                Ok(dir) => dir,
                Err(_) => self.logs_dir.clone(),
            };
            // Only the domain's own file: the agent's default for it, or
            // one in a directory of its name. Names are unique, so no other
            // domain's log (nor the agent's QEMU log) is either.
            let name = def.name.as_str();
            let own = real == logs_dir.join(format!("{name}.serial.log"))
                || (real.parent() == Some(&logs_dir.join(name)) && real.file_name().is_some());
            if !own {
                return Err(ConfinementError::SerialLogOutside {
                    path: log.clone(),
                    name: name.to_string(),
                    logs_dir: self.logs_dir.clone(),
                });
            }
            self.check_kind("serial log", log, &real, false).await?;
        }
        Ok(())
    }

    /// Checks an image of `format` that QEMU or `qemu-img` will open (a
    /// disk, or the backing file a migration's new image sits on) and the
    /// whole chain of files it names.
    ///
    /// # Errors
    /// The first file of the chain this host does not allow.
    pub async fn check_image(
        &self,
        what: &'static str,
        path: &Path,
        format: DiskFormat,
    ) -> Result<(), ConfinementError> {
        let allowed = self.allowed_dirs().await;
        self.check_chain(what, path, format, &allowed).await
    }

    async fn allowed_dirs(&self) -> Vec<PathBuf> {
        let mut allowed = Vec::new();
        for dir in &self.image_dirs {
            allowed.push(match resolve(dir).await {
                Ok(real) => real,
                Err(_) => dir.clone(),
            });
        }
        allowed
    }

    /// One image inside the image directories, of a kind allowed here.
    async fn check_one(
        &self,
        what: &'static str,
        path: &Path,
        allowed: &[PathBuf],
    ) -> Result<PathBuf, ConfinementError> {
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
        Ok(real)
    }

    /// The image and, for qcow2, every file its header names, down the
    /// chain: each held to [`Confinement::check_one`]; names QEMU would
    /// take for a protocol or a JSON description, backing files of no
    /// recorded format (QEMU would probe them) and external data files
    /// are refused.
    async fn check_chain(
        &self,
        what: &'static str,
        path: &Path,
        format: DiskFormat,
        allowed: &[PathBuf],
    ) -> Result<(), ConfinementError> {
        let top = path;
        let image_error = |image: &Path, reason: String| ConfinementError::Image {
            image: image.to_path_buf(),
            reason,
        };
        let in_chain = |depth: usize, e: ConfinementError| {
            if depth == 0 {
                e
            } else {
                ConfinementError::Backing {
                    image: top.to_path_buf(),
                    inner: Box::new(e),
                }
            }
        };
        let mut path = path.to_path_buf();
        let mut format = format;
        for depth in 0..=MAX_CHAIN {
            let what = if depth == 0 { what } else { "backing file" };
            let real = self
                .check_one(what, &path, allowed)
                .await
                .map_err(|e| in_chain(depth, e))?;
            let is_file = tokio::fs::metadata(&real).await.is_ok_and(|m| m.is_file());
            // Missing: QEMU reports it when it opens the image.
            if format != DiskFormat::Qcow2 || !is_file {
                return Ok(());
            }
            let header = qcow2::read(&real).await.map_err(|e| {
                in_chain(
                    depth,
                    image_error(&path, format!("cannot read its qcow2 header: {e}")),
                )
            })?;
            if header.data_file {
                return Err(in_chain(
                    depth,
                    image_error(
                        &path,
                        "it keeps its data in an external file, which this host does not open"
                            .into(),
                    ),
                ));
            }
            let Some(backing) = header.backing else {
                return Ok(());
            };
            let next = backing_path(&path, &backing)
                .map_err(|reason| in_chain(depth, image_error(&path, reason)))?;
            format = match header.backing_format.as_deref() {
                Some("raw") => DiskFormat::Raw,
                Some("qcow2") => DiskFormat::Qcow2,
                other => {
                    return Err(in_chain(
                        depth,
                        image_error(
                            &path,
                            format!(
                                "its backing file {backing:?} has format {other:?}; this host \
                                 follows only raw and qcow2 backing files of a recorded format \
                                 (qemu-img create -F)"
                            ),
                        ),
                    ))
                }
            };
            path = next;
        }
        Err(image_error(
            top,
            format!("its backing chain is deeper than {MAX_CHAIN} images"),
        ))
    }

    async fn real(&self, what: &'static str, path: &Path) -> Result<PathBuf, ConfinementError> {
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(ConfinementError::ParentComponent {
                what,
                path: path.to_path_buf(),
            });
        }
        resolve(path).await.map_err(|e| match e {
            Unresolved::Dangling => ConfinementError::DanglingLink {
                what,
                path: path.to_path_buf(),
            },
            Unresolved::Io(source) => ConfinementError::Io {
                what,
                path: path.to_path_buf(),
                source,
            },
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

/// The file a backing file name in `image` means, as QEMU reads it: a
/// relative name is relative to the image's directory.
///
/// # Errors
/// Why the name is refused: a protocol prefix or `json:` (QEMU would open
/// a network connection or a description of its own), or `..`.
fn backing_path(image: &Path, name: &str) -> Result<PathBuf, String> {
    let first = name.split('/').next().unwrap_or_default();
    if first.contains(':') {
        return Err(format!(
            "its backing file {name:?} names a protocol or a JSON description; this host \
             follows only plain file names"
        ));
    }
    let backing = Path::new(name);
    if backing.components().any(|c| c == Component::ParentDir) {
        return Err(format!("its backing file {name:?} contains '..'"));
    }
    Ok(if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(backing)
    })
}

#[cfg(test)]
mod tests;
