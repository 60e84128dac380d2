//! Two libvirt "hosts" on one machine, for side-by-side runs with
//! `virsh migrate`.
//!
//! Each host is a session-mode `libvirtd` (Debian's
//! `libvirt-daemon-driver-qemu`) run as an unprivileged user with its own
//! runtime, config and cache directories, so the two share nothing but the
//! machine, and with a host UUID of its own (libvirt refuses a migration
//! to the host it comes from). The QEMUs they start run as that user too.
//! Everything lives in one temporary directory; on drop the QEMUs the
//! daemons started (by the PIDs in their pid files) and the daemons die.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// The unprivileged user the daemons and their QEMUs run as.
const USER: &str = "nobody";
const GROUP: &str = "nogroup";
const VIRSH_TIMEOUT: Duration = Duration::from_secs(600);
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One session `libvirtd`.
pub struct Libvirtd {
    dir: PathBuf,
    child: Child,
}

impl Libvirtd {
    /// This host's connection URI.
    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///session?socket={}",
            self.dir.join("run/libvirt/libvirt-sock").display()
        )
    }

    async fn spawn(dir: &Path, host_uuid: &str) -> Result<Libvirtd> {
        for sub in ["config/libvirt", "run", "cache", "home"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(
            dir.join("config/libvirt/libvirtd.conf"),
            format!("host_uuid = \"{host_uuid}\"\n"),
        )?;
        // QEMU's stdio to a plain file: no virtlogd daemon to outlive us.
        std::fs::write(
            dir.join("config/libvirt/qemu.conf"),
            "stdio_handler = \"file\"\n",
        )?;
        give_to_user(dir).await?;
        let log = std::fs::File::create(dir.join("libvirtd.log"))?;
        let child = Command::new("setpriv")
            .args([
                &format!("--reuid={USER}"),
                &format!("--regid={GROUP}"),
                "--clear-groups",
                "/usr/sbin/libvirtd",
            ])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", dir.join("home"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_RUNTIME_DIR", dir.join("run"))
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start libvirtd (apt-get install libvirt-daemon-driver-qemu libvirt-clients)")?;
        let daemon = Libvirtd {
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if daemon.virsh(&["version"]).await.is_ok() {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!(
                    "libvirtd did not answer within {START_TIMEOUT:?}: see {}",
                    dir.join("libvirtd.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `virsh -c URI ARGS...`; its stdout, or an error with its stderr.
    pub async fn virsh(&self, args: &[&str]) -> Result<String> {
        let uri = self.uri();
        let mut command = Command::new("virsh");
        command
            .args(["-q", "-c", &uri])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(VIRSH_TIMEOUT, command.output())
            .await
            .with_context(|| format!("virsh {} took over {VIRSH_TIMEOUT:?}", args.join(" ")))?
            .context("cannot run virsh (apt-get install libvirt-clients)")?;
        if !output.status.success() {
            bail!(
                "virsh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The PIDs of the QEMUs this daemon runs, from its pid files.
    fn qemu_pids(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("run/libvirt/qemu/run")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // libvirt daemonizes its QEMUs: they are not in the daemon's
        // process group.
        for pid in self.qemu_pids() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-9", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// Gives `path` (recursively) to the daemons' user.
pub async fn give_to_user(path: &Path) -> Result<()> {
    let status = Command::new("chown")
        .args(["-R", &format!("{USER}:{GROUP}")])
        .arg(path)
        .status()
        .await?;
    if !status.success() {
        bail!("chown {} failed", path.display());
    }
    Ok(())
}

/// Two libvirt hosts, `a` and `b`, in one temporary directory the daemons'
/// user can read.
pub struct LibvirtHosts {
    pub a: Libvirtd,
    pub b: Libvirtd,
    dir: tempfile::TempDir,
}

impl LibvirtHosts {
    pub async fn start() -> Result<LibvirtHosts> {
        let dir = tempfile::Builder::new()
            .prefix("livemig-bench-libvirt-")
            .tempdir()?;
        // The daemons' user must reach its files inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let a = Libvirtd::spawn(
            &dir.path().join("a"),
            "6c9e2f0a-1a52-4d7e-9d01-00000000000a",
        )
        .await?;
        let b = Libvirtd::spawn(
            &dir.path().join("b"),
            "6c9e2f0a-1a52-4d7e-9d01-00000000000b",
        )
        .await?;
        Ok(LibvirtHosts { a, b, dir })
    }

    /// A directory for guest files both daemons' QEMUs can use.
    pub fn files(&self) -> PathBuf {
        self.dir.path().join("files")
    }
}

/// A domain's XML for the session daemons: `type='qemu'` (TCG), no
/// devices beyond the disks and a serial port logged to a file.
pub struct DomainXml<'a> {
    pub name: &'a str,
    pub memory_mib: u32,
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub disks: &'a [(&'a Path, &'a str)],
    pub serial_log: &'a Path,
}

impl DomainXml<'_> {
    /// The domain's UUID, from its name: the source's and the
    /// destination's XML must agree on it.
    fn uuid(&self) -> String {
        use std::hash::{Hash, Hasher};
        let half = |salt: u8| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (salt, self.name).hash(&mut hasher);
            hasher.finish()
        };
        let (high, low) = (half(0), half(1));
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            high >> 32,
            (high >> 16) & 0xffff,
            high & 0xfff,
            low >> 52,
            low & 0xffff_ffff_ffff
        )
    }

    pub fn render(&self) -> String {
        let mut disks = String::new();
        for (index, (path, format)) in self.disks.iter().enumerate() {
            let target = format!("vd{}", (b'a' + index as u8) as char);
            disks.push_str(&format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}' cache='none'/>\n      \
                 <source file='{}'/>\n      <target dev='{target}' bus='virtio'/>\n    </disk>\n",
                escape(&path.display().to_string())
            ));
        }
        format!(
            "<domain type='qemu'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n  <memory unit='MiB'>{}</memory>\n  <vcpu>1</vcpu>\n  \
             <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <kernel>{}</kernel>\n{}    \
             <cmdline>{}</cmdline>\n  </os>\n  <on_poweroff>destroy</on_poweroff>\n  \
             <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n{disks}    \
             <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n    \
             <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
            escape(self.name),
            self.uuid(),
            self.memory_mib,
            escape(&self.kernel.display().to_string()),
            self.initrd.map_or(String::new(), |i| format!(
                "    <initrd>{}</initrd>\n",
                escape(&i.display().to_string())
            )),
            escape(self.cmdline),
            escape(&self.serial_log.display().to_string()),
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// What `virsh domjobinfo --completed` says of a finished migration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompletedJob {
    /// libvirt's own timer, from the source's job start.
    pub elapsed_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
}

impl CompletedJob {
    pub fn parse(text: &str) -> CompletedJob {
        let mut job = CompletedJob::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "Time elapsed" => job.elapsed_ms = milliseconds(value),
                "Total downtime" => job.downtime_ms = milliseconds(value),
                "Memory processed" => job.memory_bytes = bytes(value),
                "File processed" => job.file_bytes = bytes(value),
                _ => {}
            }
        }
        job
    }
}

/// virsh's "57           ms".
fn milliseconds(value: &str) -> Option<u64> {
    value.split_whitespace().next()?.parse().ok()
}

/// virsh's "95.123 MiB".
fn bytes(value: &str) -> Option<u64> {
    let mut parts = value.split_whitespace();
    let number: f64 = parts.next()?.parse().ok()?;
    let scale = match parts.next()? {
        "B" => 1u64,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    Some((number * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virsh_completed_job_figures_are_read_with_their_units() {
        let job = CompletedJob::parse(
            "Job type:         Completed\nOperation:        Incoming migration\n\
             Time elapsed:     5312         ms\nTotal downtime:   57           ms\n\
             Memory processed: 95.250 MiB\nFile processed:   1.000 GiB\n",
        );
        assert_eq!(job.elapsed_ms, Some(5312));
        assert_eq!(job.downtime_ms, Some(57));
        assert_eq!(job.memory_bytes, Some(95 * (1 << 20) + (1 << 18)));
        assert_eq!(job.file_bytes, Some(1 << 30));
    }

    #[test]
    fn paths_and_command_lines_are_escaped_in_the_domain_xml() {
        let xml = DomainXml {
            name: "g",
            memory_mib: 192,
            kernel: Path::new("/k/a&b"),
            initrd: Some(Path::new("/i")),
            cmdline: "console=ttyS0 x=<1>",
            disks: &[(Path::new("/d/x.raw"), "raw")],
            serial_log: Path::new("/s'q"),
        }
        .render();
        assert!(xml.contains("<kernel>/k/a&amp;b</kernel>"));
        assert!(xml.contains("x=&lt;1&gt;"));
        assert!(xml.contains("<initrd>/i</initrd>"));
        assert!(xml.contains("<source path='/s&apos;q'/>"));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"));
        let uuid = xml
            .split("<uuid>")
            .nth(1)
            .unwrap()
            .split("</uuid>")
            .next()
            .unwrap();
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
    }
}
