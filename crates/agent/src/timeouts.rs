//! How long the agent waits, for what: one place, with production values
//! as defaults, settable per agent (`livemigd --timeout NAME=DURATION`, or
//! `[timeouts]` in the config file), so an operator can tune them and tests
//! need not wait them out.

use std::fmt;
use std::time::Duration;

/// The agent's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A peer agent unheard for this long during a migration is taken for
    /// gone: the job is cancelled, and TCP keepalive probes its connection
    /// on the same scale. `peer-silence`, 20 s.
    pub peer_silence: Duration,
    /// How long a source keeps trying to learn from its destination whether
    /// Finish happened, before it leaves its copy paused. `peer-retry`, 30 s.
    pub peer_retry: Duration,
    /// How long the destination may take to start its QEMU and listen.
    /// `prepare`, 90 s.
    pub prepare: Duration,
    /// A disk copy whose bytes left set no new low for this long is not
    /// converging. `disk-progress`, 30 s.
    pub disk_progress: Duration,
    /// A host throttle's guard lifts the throttle when the agent says
    /// nothing for this long. `throttle-lease`, 5 s.
    pub throttle_lease: Duration,
    /// A client connection with no request for this long is closed.
    /// `client-idle`, 120 s.
    pub client_idle: Duration,
    /// A reply the client has not taken within this closes its connection
    /// (a client that sends and never reads would hold it forever).
    /// `client-write`, 30 s.
    pub client_write: Duration,
    /// A connection must finish its TLS handshake, and send its first bytes,
    /// within this. `handshake`, 10 s.
    pub handshake: Duration,
    /// An incoming migration adopted after a restart whose source says
    /// nothing for this long is torn down. `orphan`, 60 s.
    pub orphan: Duration,
    /// A host whose agent stops renewing its cluster registration leaves
    /// the cluster after this long. `cluster-lease`, 10 s.
    pub cluster_lease: Duration,
    /// How long a `watch` goes between reports of the running jobs (an
    /// end or a switch to post-copy is told at once). `watch-interval`,
    /// 500 ms.
    pub watch_interval: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            peer_silence: Duration::from_secs(20),
            peer_retry: Duration::from_secs(30),
            prepare: Duration::from_secs(90),
            disk_progress: Duration::from_secs(30),
            throttle_lease: Duration::from_secs(5),
            client_idle: Duration::from_secs(120),
            client_write: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
            orphan: Duration::from_secs(60),
            cluster_lease: Duration::from_secs(10),
            watch_interval: Duration::from_millis(500),
        }
    }
}

/// A timeout that could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    /// Not `NAME=DURATION`.
    #[error("a timeout is NAME=DURATION (e.g. peer-silence=20s), got {0:?}")]
    Form(String),
    /// No such timeout.
    #[error("no timeout named {0:?} (one of: {names})", names = Timeouts::NAMES.join(", "))]
    Name(String),
    /// Not a duration.
    #[error("{0:?} is not a duration: a number with ms, s or m (500ms, 20s, 2m)")]
    Duration(String),
    /// Zero: nothing would ever get through.
    #[error("timeout {0} cannot be zero")]
    Zero(String),
}

impl Timeouts {
    /// Every name, as `--timeout` takes it.
    pub const NAMES: &'static [&'static str] = &[
        "peer-silence",
        "peer-retry",
        "prepare",
        "disk-progress",
        "throttle-lease",
        "client-idle",
        "client-write",
        "handshake",
        "orphan",
        "cluster-lease",
        "watch-interval",
    ];

    fn slot(&mut self, name: &str) -> Option<&mut Duration> {
        Some(match name {
            "peer-silence" => &mut self.peer_silence,
            "peer-retry" => &mut self.peer_retry,
            "prepare" => &mut self.prepare,
            "disk-progress" => &mut self.disk_progress,
            "throttle-lease" => &mut self.throttle_lease,
            "client-idle" => &mut self.client_idle,
            "client-write" => &mut self.client_write,
            "handshake" => &mut self.handshake,
            "orphan" => &mut self.orphan,
            "cluster-lease" => &mut self.cluster_lease,
            "watch-interval" => &mut self.watch_interval,
            _ => return None,
        })
    }

    /// Sets one timeout by name.
    ///
    /// # Errors
    /// [`TimeoutError`] for an unknown name or a zero duration.
    pub fn set(&mut self, name: &str, value: Duration) -> Result<(), TimeoutError> {
        if value.is_zero() {
            return Err(TimeoutError::Zero(name.to_string()));
        }
        *self
            .slot(name)
            .ok_or_else(|| TimeoutError::Name(name.to_string()))? = value;
        Ok(())
    }

    /// Applies `NAME=DURATION`.
    ///
    /// # Errors
    /// [`TimeoutError`] when it does not read.
    pub fn apply(&mut self, setting: &str) -> Result<(), TimeoutError> {
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| TimeoutError::Form(setting.to_string()))?;
        self.set(name.trim(), parse_duration(value.trim())?)
    }

    /// How often a source checks that its peer answers: often enough to
    /// notice [`Timeouts::peer_silence`] in time.
    pub fn peer_check_interval(&self) -> Duration {
        (self.peer_silence / 4).min(Duration::from_secs(5))
    }
}

/// `500ms`, `20s`, `2m`.
///
/// # Errors
/// [`TimeoutError::Duration`] for anything else.
pub fn parse_duration(text: &str) -> Result<Duration, TimeoutError> {
    let bad = || TimeoutError::Duration(text.to_string());
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

impl fmt::Display for Timeouts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut copy = *self;
        for (i, name) in Self::NAMES.iter().enumerate() {
            let value = copy.slot(name).copied().unwrap_or_default();
            write!(
                f,
                "{}{name}={}ms",
                if i > 0 { " " } else { "" },
                value.as_millis()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_production_values() {
        let t = Timeouts::default();
        assert_eq!(t.peer_silence, Duration::from_secs(20));
        assert_eq!(t.prepare, Duration::from_secs(90));
        assert_eq!(t.peer_check_interval(), Duration::from_secs(5));
    }

    #[test]
    fn settings_read_by_name_and_unit() {
        let mut t = Timeouts::default();
        t.apply("peer-silence=3s").unwrap();
        t.apply("disk-progress = 500ms").unwrap();
        t.apply("orphan=2m").unwrap();
        assert_eq!(t.peer_silence, Duration::from_secs(3));
        assert_eq!(t.disk_progress, Duration::from_millis(500));
        assert_eq!(t.orphan, Duration::from_secs(120));
        assert_eq!(t.peer_check_interval(), Duration::from_millis(750));
        assert!(t.to_string().contains("peer-silence=3000ms"));
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let mut t = Timeouts::default();
        assert!(matches!(
            t.apply("peer-silence"),
            Err(TimeoutError::Form(_))
        ));
        let err = t.apply("silence=3s").unwrap_err();
        assert!(err.to_string().contains("peer-silence"), "{err}");
        assert!(matches!(
            t.apply("prepare=3h"),
            Err(TimeoutError::Duration(_))
        ));
        assert!(matches!(t.apply("prepare=0s"), Err(TimeoutError::Zero(_))));
        assert_eq!(t, Timeouts::default());
    }
}
