//! The migrations a domain can be part of on this host: one it sends, one
//! it receives.

use std::sync::{Arc, Mutex};

use domain::DomainDefinition;
use migration::perform::{Progress, Retune};
use migration::record::JobIdentity;
use migration::settings::Previous;
use protocol::job::{JobInfo, Phase};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::running::RunningVm;

/// A migration this agent is sending.
#[derive(Debug)]
pub(crate) struct OutgoingJob {
    pub ident: JobIdentity,
    pub started: Instant,
    /// The phase it is in, and when each began from the command's arrival.
    pub clock: migration::record::PhaseClock,
    pub cancel: CancellationToken,
    pub progress: watch::Receiver<Progress>,
    /// Mid-job limits for the watcher (`migrate-setspeed`, ...).
    pub retune: mpsc::Sender<Retune>,
    /// The watcher's end, taken when Perform starts.
    pub retunes: Mutex<Option<mpsc::Receiver<Retune>>>,
    /// The disks it copies (`vda`, ...): their mirrors follow
    /// `migrate-setspeed` too.
    pub storage: Vec<String>,
}

/// A migration this agent is receiving.
#[derive(Debug)]
pub(crate) struct IncomingJob {
    pub ident: JobIdentity,
    pub started: Instant,
    /// The peer connection that prepared it: if that connection drops
    /// before Finish, the destination side is torn down.
    pub connection: u64,
    /// The certificate name of the agent that prepared it: only it (or an
    /// administrator) may finish, recover or abort it.
    pub prepared_by: Option<String>,
    /// The domain did not exist here before the migration.
    pub created_domain: bool,
    /// The virtual size of the images it creates for copied disks: what it
    /// counts against its peer's disk quota.
    pub disk_bytes: u64,
    pub previous: Previous,
    pub vm: Option<Arc<RunningVm>>,
    pub phase: Mutex<Phase>,
    /// The definition the guest arrives with (persisted on Finish with
    /// `--persistent`).
    pub definition: DomainDefinition,
    /// The definition the domain had here before, put back if the
    /// migration fails (`None` when the domain is new here).
    pub replaced_definition: Option<DomainDefinition>,
    /// Adopted after an agent restart: the settings to restore are not
    /// known, so Finish resets them to defaults.
    pub reattached: bool,
    /// Images created for copied disks: removed if the guest does not land.
    pub created_images: Vec<std::path::PathBuf>,
    /// The task that resumes the guest when post-copy starts, ending with
    /// its vCPUs' clock then (what post-copy cost the guest is measured
    /// from at Finish).
    pub postcopy_resume: PostcopyResume,
}

/// [`IncomingJob::postcopy_resume`].
pub(crate) type PostcopyResume =
    Mutex<Option<tokio::task::JoinHandle<Option<migration::postcopy::cost::VcpuClock>>>>;

#[derive(Debug, Clone)]
pub(crate) enum ActiveJob {
    Outgoing(Arc<OutgoingJob>),
    Incoming(Arc<IncomingJob>),
}

impl ActiveJob {
    pub fn ident(&self) -> &JobIdentity {
        match self {
            ActiveJob::Outgoing(j) => &j.ident,
            ActiveJob::Incoming(j) => &j.ident,
        }
    }

    pub fn id(&self) -> &str {
        &self.ident().id
    }

    pub fn info(&self) -> JobInfo {
        match self {
            ActiveJob::Outgoing(j) => {
                let mut info = j.ident.info(
                    j.clock.current(),
                    j.started.elapsed(),
                    Some(&j.progress.borrow()),
                );
                info.phases = j.clock.times();
                info
            }
            ActiveJob::Incoming(j) => j.ident.info(
                *j.phase.lock().expect("phase lock"),
                j.started.elapsed(),
                None,
            ),
        }
    }
}
