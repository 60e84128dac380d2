//! `livemig migrate`'s options, with virsh's names; mapped onto the
//! protocol's `MigrateOptions`, so an option can be renamed here without
//! changing the wire.

use clap::{Args, ValueEnum};
use protocol::{CompMethod, ConvergeMode, MigrateOptions, TimeoutAction};

/// Who makes a busy guest's migration converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConvergeArg {
    /// Plain pre-copy.
    None,
    /// QEMU's auto-converge (same as --auto-converge).
    Qemu,
    /// livemig's controller: measures, throttles only as much as needed.
    Adaptive,
}

impl From<ConvergeArg> for ConvergeMode {
    fn from(arg: ConvergeArg) -> Self {
        match arg {
            ConvergeArg::None => ConvergeMode::None,
            ConvergeArg::Qemu => ConvergeMode::Qemu,
            ConvergeArg::Adaptive => ConvergeMode::Adaptive,
        }
    }
}

/// A compression method (`--comp-methods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompMethodArg {
    /// Pages sent before go as deltas against a cache (one stream only).
    Xbzrle,
    /// zlib on each multifd channel (needs --parallel).
    Zlib,
    /// zstd on each multifd channel (needs --parallel).
    Zstd,
}

impl From<CompMethodArg> for CompMethod {
    fn from(arg: CompMethodArg) -> Self {
        match arg {
            CompMethodArg::Xbzrle => CompMethod::Xbzrle,
            CompMethodArg::Zlib => CompMethod::Zlib,
            CompMethodArg::Zstd => CompMethod::Zstd,
        }
    }
}

/// What to do when `--timeout` expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeoutActionArg {
    /// Cancel the migration; the guest keeps running on the source.
    Abort,
    /// Switch to post-copy (needs --postcopy or --allow-postcopy).
    Postcopy,
    /// Pause the guest so the copy finishes; it resumes on the destination.
    Suspend,
}

impl From<TimeoutActionArg> for TimeoutAction {
    fn from(arg: TimeoutActionArg) -> Self {
        match arg {
            TimeoutActionArg::Abort => TimeoutAction::Abort,
            TimeoutActionArg::Postcopy => TimeoutAction::Postcopy,
            TimeoutActionArg::Suspend => TimeoutAction::Suspend,
        }
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Live migration: the guest keeps running while its memory is copied
    /// (without it, the guest is paused for the whole copy).
    #[arg(long)]
    pub live: bool,
    /// Migrate only the definition; the domain must not be running.
    #[arg(long)]
    pub offline: bool,
    /// Let QEMU throttle the vCPUs when dirtying outpaces the transfer.
    #[arg(long)]
    pub auto_converge: bool,
    /// Initial auto-converge throttle, percent (QEMU default 20).
    #[arg(long, value_name = "PCT")]
    pub auto_converge_initial: Option<u8>,
    /// Auto-converge throttle increment, percent (QEMU default 10).
    #[arg(long, value_name = "PCT")]
    pub auto_converge_increment: Option<u8>,
    /// Compress the stream: XBZRLE (repeated pages as deltas), or the
    /// methods --comp-methods names.
    #[arg(long)]
    pub compressed: bool,
    /// Compression methods, comma-separated: xbzrle, or zlib or zstd on
    /// multifd's channels (with --parallel) [default: xbzrle].
    #[arg(long, value_enum, value_name = "METHODS", value_delimiter = ',')]
    pub comp_methods: Vec<CompMethodArg>,
    /// zlib's level, 0 (none) to 9 (smallest) [QEMU default 1].
    #[arg(long, value_name = "LEVEL")]
    pub comp_zlib_level: Option<u8>,
    /// zstd's level, 0 to 20 [QEMU default 1].
    #[arg(long, value_name = "LEVEL")]
    pub comp_zstd_level: Option<u8>,
    /// XBZRLE's page cache, bytes: a power of two [QEMU default 64 MiB].
    #[arg(long, value_name = "BYTES")]
    pub comp_xbzrle_cache: Option<u64>,
    /// Send memory over several connections (multifd).
    #[arg(long)]
    pub parallel: bool,
    /// Number of parallel connections (QEMU default 2).
    #[arg(long, value_name = "N")]
    pub parallel_connections: Option<u8>,
    /// Enable post-copy (switch with `migrate-postcopy`).
    #[arg(long)]
    pub postcopy: bool,
    /// Switch to post-copy automatically after the first pre-copy pass.
    #[arg(long)]
    pub postcopy_after_precopy: bool,
    /// Limit the bandwidth once in post-copy, MiB/s [default: --bandwidth].
    #[arg(long, value_name = "MiB/s")]
    pub postcopy_bandwidth: Option<u64>,
    /// Send multifd's pages without copying them (QEMU 7.1+ on Linux; the
    /// agent raises QEMU's locked-memory limit to the guest's RAM).
    #[arg(long)]
    pub zerocopy: bool,
    /// Limit the migration bandwidth, MiB/s.
    #[arg(long, value_name = "MiB/s")]
    pub bandwidth: Option<u64>,
    /// Maximum tolerable downtime, milliseconds (QEMU default 300).
    #[arg(long, value_name = "MS")]
    pub downtime: Option<u64>,
    /// Abort the migration if it has not completed after this many seconds;
    /// the source keeps running. (virsh suspends the guest instead: that is
    /// --timeout-suspend here, or --timeout-action suspend.)
    #[arg(long, value_name = "S")]
    pub timeout: Option<u64>,
    /// Make the domain persistent on the destination.
    #[arg(long)]
    pub persistent: bool,
    /// Remove the domain's definition from the source after success.
    #[arg(long, visible_alias = "undefinesource")]
    pub undefine_source: bool,
    /// The name the domain arrives under on the destination.
    #[arg(long, value_name = "NAME")]
    pub dname: Option<String>,
    /// Leave the domain paused on the destination.
    #[arg(long)]
    pub suspend: bool,
    /// Use QEMU's dirty-limit throttle instead of auto-converge (QEMU 8.1+
    /// with a KVM dirty ring).
    #[arg(long)]
    pub dirty_limit: bool,
    /// Address for the migration data (`tcp:HOST:PORT`); by default the
    /// destination agent picks one.
    #[arg(long, value_name = "URI")]
    pub migrateuri: Option<String>,
    /// Convergence: none, qemu (auto-converge) or adaptive (livemig's
    /// controller).
    #[arg(long, value_enum, value_name = "MODE")]
    pub converge: Option<ConvergeArg>,
    /// What --timeout does: abort (the default), postcopy or suspend.
    #[arg(long, value_enum, value_name = "ACTION")]
    pub timeout_action: Option<TimeoutActionArg>,
    /// virsh's spelling of --timeout-action suspend.
    #[arg(long, conflicts_with_all = ["timeout_action", "timeout_postcopy"])]
    pub timeout_suspend: bool,
    /// virsh's spelling of --timeout-action postcopy.
    #[arg(long, conflicts_with = "timeout_action")]
    pub timeout_postcopy: bool,
    /// Ceiling a downtime ramp may reach, milliseconds.
    #[arg(long, value_name = "MS")]
    pub max_downtime: Option<u64>,
    /// Highest vCPU throttle, percent (adaptive: up to 99.9 with a host
    /// throttle, 99 with QEMU's).
    #[arg(long, value_name = "PCT")]
    pub max_throttle: Option<f64>,
    /// Enable post-copy so the policy may switch to it when pre-copy cannot
    /// finish in time, or (adaptive) when it costs the guest less than the
    /// throttle pre-copy would need.
    #[arg(long)]
    pub allow_postcopy: bool,
    /// Check everything and predict the migration, without starting it.
    #[arg(long)]
    pub dry_run: bool,
    /// Recover this domain's post-copy migration after a network failure
    /// (QEMU's migrate-recover on the destination, migrate resume here).
    #[arg(long)]
    pub postcopy_resume: bool,
    /// Encrypt the migration stream with TLS, both QEMUs authenticated by
    /// their agents' certificates (the agents need --tls-dir).
    #[arg(long)]
    pub tls: bool,
    /// A definition file the destination runs the domain with: image
    /// paths, bridges, cache modes and the serial log may differ from the
    /// source's; what the guest sees may not.
    #[arg(long, value_name = "FILE")]
    pub xml: Option<std::path::PathBuf>,
    /// With --persistent: the definition file the destination keeps for
    /// the domain's next start (as `define` on a running domain).
    #[arg(long, value_name = "FILE", requires = "persistent")]
    pub persistent_xml: Option<std::path::PathBuf>,
    /// The destination's own address its QEMU listens on for the memory
    /// stream (and this host dials) [default: the one DEST_URI reaches];
    /// with --migrateuri, on its port.
    #[arg(long, value_name = "ADDRESS")]
    pub listen_address: Option<String>,
    /// Where the destination's NBD server for the copied disks listens:
    /// tcp:ADDRESS:PORT, an address of the destination's own (PORT 0: any
    /// free one) [default: beside the memory stream].
    #[arg(long, value_name = "URI")]
    pub disks_uri: Option<String>,
    /// With --tls: the name the destination's certificate must carry for
    /// the migration stream [default: the host in DEST_URI].
    #[arg(long, value_name = "NAME")]
    pub tls_destination: Option<String>,
    /// Migrate although the domain's configuration is unsafe to migrate (a
    /// CPU model that passes the host's CPU through).
    #[arg(long = "unsafe")]
    pub unsafe_migration: bool,
    /// Copy every disk that is not on shared storage to the destination
    /// (QEMU's NBD server there, block mirrors here), whole.
    #[arg(long)]
    pub copy_storage_all: bool,
    /// As --copy-storage-all, only each disk's top image: the backing chain
    /// is on storage both hosts see.
    #[arg(long)]
    pub copy_storage_inc: bool,
    /// The disks to copy, by the guest's names (vda,vdb) [default: every
    /// disk not on shared storage].
    #[arg(long, value_name = "DISKS", value_delimiter = ',')]
    pub migrate_disks: Vec<String>,
    /// The port of the destination's NBD server for the disks.
    #[arg(long, value_name = "PORT")]
    pub disks_port: Option<u16>,
    /// Mirror guest writes synchronously from the start, so that a busy
    /// disk converges (its writes wait for the network).
    #[arg(long)]
    pub copy_storage_synchronous_writes: bool,
    /// Accepted for virsh compatibility: progress is always shown (a bar on
    /// a terminal, a line a second otherwise).
    #[arg(long)]
    pub verbose: bool,
    /// Stream progress as NDJSON events and print the job record as JSON on
    /// the last line.
    #[arg(long)]
    pub json: bool,
    /// Domain name.
    pub domain: String,
    /// Destination agent: tcp://HOST:PORT.
    pub dest_uri: String,
}

impl MigrateArgs {
    /// The options as the agent takes them, virsh's spellings folded in.
    pub fn options(&self) -> MigrateOptions {
        let timeout_action = if self.timeout_suspend {
            Some(TimeoutAction::Suspend)
        } else if self.timeout_postcopy {
            Some(TimeoutAction::Postcopy)
        } else {
            self.timeout_action.map(Into::into)
        };
        MigrateOptions {
            live: self.live,
            offline: self.offline,
            auto_converge: self.auto_converge,
            auto_converge_initial: self.auto_converge_initial,
            auto_converge_increment: self.auto_converge_increment,
            compressed: self.compressed,
            parallel: self.parallel,
            parallel_connections: self.parallel_connections,
            postcopy: self.postcopy,
            postcopy_after_precopy: self.postcopy_after_precopy,
            bandwidth: self.bandwidth,
            downtime: self.downtime,
            timeout: self.timeout,
            persistent: self.persistent,
            undefine_source: self.undefine_source,
            suspend: self.suspend,
            dirty_limit: self.dirty_limit,
            migrateuri: self.migrateuri.clone(),
            converge: self.converge.map(Into::into),
            timeout_action,
            max_downtime: self.max_downtime,
            max_throttle: self.max_throttle,
            allow_postcopy: self.allow_postcopy,
            dry_run: self.dry_run,
            postcopy_resume: self.postcopy_resume,
            tls: self.tls,
            unsafe_migration: self.unsafe_migration,
            copy_storage_all: self.copy_storage_all,
            copy_storage_inc: self.copy_storage_inc,
            migrate_disks: self.migrate_disks.clone(),
            disks_port: self.disks_port,
            copy_storage_synchronous_writes: self.copy_storage_synchronous_writes,
            comp_methods: self.comp_methods.iter().map(|&m| m.into()).collect(),
            comp_zlib_level: self.comp_zlib_level,
            comp_zstd_level: self.comp_zstd_level,
            comp_xbzrle_cache: self.comp_xbzrle_cache,
            postcopy_bandwidth: self.postcopy_bandwidth,
            dname: self.dname.clone(),
            zerocopy: self.zerocopy,
            tls_destination: self.tls_destination.clone(),
            xml: None,
            persistent_xml: None,
            listen_address: self.listen_address.clone(),
            disks_uri: self.disks_uri.clone(),
        }
    }

    /// [`MigrateArgs::options`] with `--xml`'s file read and checked.
    ///
    /// # Errors
    /// A file that cannot be read or is no valid definition.
    pub fn wire_options(&self) -> anyhow::Result<MigrateOptions> {
        use anyhow::Context;
        let mut options = self.options();
        let read = |file: &std::path::Path, option: &str| -> anyhow::Result<_> {
            let definition = domain::DomainDefinition::from_file(file)
                .with_context(|| format!("{option} {}", file.display()))?;
            Ok(protocol::domain::DefinitionDoc(definition.to_document()))
        };
        if let Some(file) = &self.xml {
            options.xml = Some(read(file, "--xml")?);
        }
        if let Some(file) = &self.persistent_xml {
            options.persistent_xml = Some(read(file, "--persistent-xml")?);
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn migrate(args: &[&str]) -> Result<MigrateArgs, clap::Error> {
        let argv = ["livemig", "migrate", "--timeout", "10"]
            .iter()
            .chain(args)
            .chain(&["vm", "tcp://127.0.0.1:7000"]);
        match Cli::try_parse_from(argv)?.command {
            Command::Migrate(m) => Ok(*m),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn virsh_timeout_spellings_pick_the_timeout_action() {
        let action = |args: &[&str]| migrate(args).unwrap().options().timeout_action;
        assert_eq!(action(&[]), None, "abort, by default");
        assert_eq!(action(&["--timeout-suspend"]), Some(TimeoutAction::Suspend));
        assert_eq!(
            action(&["--timeout-postcopy", "--allow-postcopy"]),
            Some(TimeoutAction::Postcopy)
        );
        assert_eq!(
            action(&["--timeout-action", "suspend"]),
            Some(TimeoutAction::Suspend)
        );
    }

    #[test]
    fn two_timeout_actions_are_refused() {
        for args in [
            &["--timeout-suspend", "--timeout-postcopy"][..],
            &["--timeout-suspend", "--timeout-action", "abort"],
            &["--timeout-postcopy", "--timeout-action", "suspend"],
        ] {
            let e = migrate(args).expect_err("conflicting timeout actions");
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{args:?}"
            );
        }
    }

    #[test]
    fn every_option_reaches_the_wire_under_its_own_name() {
        let args = migrate(&[
            "--live",
            "--auto-converge",
            "--auto-converge-initial",
            "30",
            "--bandwidth",
            "64",
            "--downtime",
            "200",
            "--converge",
            "qemu",
            "--max-downtime",
            "400",
            "--migrateuri",
            "tcp:10.0.0.2:49152",
        ])
        .unwrap();
        let wire = serde_json::to_value(args.options()).unwrap();
        assert_eq!(wire["live"], true);
        assert_eq!(wire["auto_converge_initial"], 30);
        assert_eq!(wire["bandwidth"], 64);
        assert_eq!(wire["downtime"], 200);
        assert_eq!(wire["timeout"], 10);
        assert_eq!(wire["converge"], "qemu");
        assert_eq!(wire["max_downtime"], 400);
        assert_eq!(wire["migrateuri"], "tcp:10.0.0.2:49152");
    }

    #[test]
    fn virsh_compression_renaming_and_post_copy_options_reach_the_wire() {
        let args = migrate(&[
            "--live",
            "--parallel",
            "--compressed",
            "--comp-methods",
            "zstd",
            "--comp-zstd-level",
            "3",
            "--postcopy",
            "--postcopy-bandwidth",
            "16",
            "--dname",
            "web-2",
            "--undefinesource",
        ])
        .unwrap();
        let wire = serde_json::to_value(args.options()).unwrap();
        assert_eq!(wire["comp_methods"], serde_json::json!(["zstd"]));
        assert_eq!(wire["comp_zstd_level"], 3);
        assert_eq!(wire["postcopy_bandwidth"], 16);
        assert_eq!(wire["dname"], "web-2");
        assert_eq!(wire["undefine_source"], true);
        let methods = migrate(&["--compressed", "--comp-methods", "xbzrle,zlib"]).unwrap();
        assert_eq!(
            methods.options().comp_methods,
            [CompMethod::Xbzrle, CompMethod::Zlib]
        );
        assert!(migrate(&["--comp-methods", "mt"]).is_err());
    }
}
