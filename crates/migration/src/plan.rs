//! What a job runs with, from its flags and the domain's tunables: the one
//! place that turns options into limits, a controller policy and watch
//! options, for migrations and for `estimate` alike.

use std::time::Duration;

use converge::Policy;
use protocol::domain::Tunables;
use protocol::ConvergeMode;
use types::{Bandwidth, Throttle};

use crate::flags::Flags;
use crate::perform::WatchOptions;
use crate::settings::{job_bandwidth, DEFAULT_DOWNTIME_MS};

/// The highest throttle anyone may ask for: the host mechanism's limit.
const MAX_THROTTLE_PCT: f64 = 99.9;

/// The downtime limit a job starts with: the one asked for, else the
/// domain's, else QEMU's default, and never above the ramp's ceiling.
pub fn downtime_limit(
    asked: Option<Duration>,
    tunable: Option<u64>,
    ceiling: Option<Duration>,
) -> Duration {
    asked
        .or(tunable.map(Duration::from_millis))
        .unwrap_or(Duration::from_millis(DEFAULT_DOWNTIME_MS))
        .min(ceiling.unwrap_or(Duration::MAX))
}

/// The adaptive controller's policy.
///
/// - `max_throttle`: what the user allows (99.9 % by default), capped by
///   `mechanism_max`, what the throttle mechanism can do;
/// - `downtime`, `max_downtime`: the limit and the ceiling a ramp may
///   reach (no ramp without one);
/// - `budget`: the timeout;
/// - `allow_postcopy`: the policy may switch to post-copy.
pub fn controller_policy(
    max_throttle: Option<Throttle>,
    mechanism_max: f64,
    downtime: Duration,
    max_downtime: Option<Duration>,
    budget: Option<Duration>,
    allow_postcopy: bool,
) -> Policy {
    let downtime = downtime.as_secs_f64();
    let allowed = max_throttle.unwrap_or(Throttle::from_percent(MAX_THROTTLE_PCT));
    Policy {
        max_throttle: allowed.fraction().min(mechanism_max),
        downtime,
        max_downtime: max_downtime.map_or(downtime, |d| d.as_secs_f64().max(downtime)),
        budget: budget.map(|b| b.as_secs_f64()),
        allow_postcopy,
        postcopy_bandwidth: None,
    }
}

/// How to watch a job with these flags. `mechanism_max` is the highest
/// throttle the job's throttle mechanism can apply (0 without one).
pub fn watch_options(
    flags: &Flags,
    tunables: Tunables,
    mechanism_max: f64,
    ram_bytes: u64,
) -> WatchOptions {
    let downtime = downtime_limit(flags.downtime(), tunables.downtime_ms, flags.max_downtime());
    let mut policy = controller_policy(
        flags.max_throttle(),
        mechanism_max,
        downtime,
        flags.max_downtime(),
        flags.timeout(),
        flags.postcopy_enabled(),
    );
    policy.postcopy_bandwidth = flags.limits().postcopy_bandwidth.map(Bandwidth::as_f64);
    let mode = flags.converge_mode();
    let controller = (mode == ConvergeMode::Adaptive).then_some(policy);
    let bandwidth_cap = job_bandwidth(flags, tunables);
    // Every job on a capped link predicts its time, whatever its mode:
    // `estimate` is calibrated on how those predictions fared.
    let forecast = bandwidth_cap.map(|_| (mode, policy));
    WatchOptions {
        timeout: flags.timeout(),
        timeout_action: flags.timeout_action(),
        postcopy_after_precopy: flags.postcopy().after_first_pass(),
        preflight: controller.is_some() || forecast.is_some(),
        forecast,
        ram_bytes,
        compressed: flags.stream().compressed || flags.stream().multifd_compression.is_some(),
        controller,
        downtime,
        max_downtime: flags.max_downtime(),
        allow_postcopy: flags.postcopy().by_policy(),
        bandwidth_cap,
        postcopy_follows_cap: flags.postcopy_enabled()
            && flags.limits().postcopy_bandwidth.is_none(),
        ..WatchOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use protocol::MigrateOptions;

    use super::*;

    fn flags(options: MigrateOptions) -> Flags {
        Flags::new(options).unwrap()
    }

    #[test]
    fn the_downtime_comes_from_the_flag_the_tunable_or_qemu_and_stays_under_the_ceiling() {
        let ms = Duration::from_millis;
        assert_eq!(downtime_limit(Some(ms(100)), Some(500), None), ms(100));
        assert_eq!(downtime_limit(None, Some(500), None), ms(500));
        assert_eq!(downtime_limit(None, None, None), ms(300));
        assert_eq!(downtime_limit(None, None, Some(ms(50))), ms(50));
    }

    #[test]
    fn the_policy_never_asks_more_than_the_mechanism_can_do() {
        let p = controller_policy(None, 0.99, Duration::from_millis(300), None, None, false);
        assert_eq!(p.max_throttle, 0.99);
        let p = controller_policy(
            Some(Throttle::from_percent(50.0)),
            0.999,
            Duration::from_millis(300),
            Some(Duration::from_secs(2)),
            Some(Duration::from_secs(60)),
            true,
        );
        assert_eq!(p.max_throttle, 0.5);
        assert_eq!(p.max_downtime, 2.0);
        assert_eq!(p.budget, Some(60.0));
    }

    #[test]
    fn adaptive_jobs_get_a_controller_and_every_job_on_a_capped_link_a_forecast() {
        let adaptive = flags(MigrateOptions {
            live: true,
            converge: Some(ConvergeMode::Adaptive),
            max_downtime: Some(200),
            bandwidth: Some(64),
            ..Default::default()
        });
        let w = watch_options(&adaptive, Tunables::default(), 0.999, 1 << 29);
        let policy = w.controller.expect("a controller");
        assert!(w.preflight);
        assert_eq!(w.forecast.map(|f| f.0), Some(ConvergeMode::Adaptive));
        assert_eq!(
            w.downtime,
            Duration::from_millis(200),
            "capped by the ceiling"
        );
        assert_eq!(policy.downtime, 0.2);
        assert_eq!(w.bandwidth_cap.unwrap().mib_s(), 64);

        let plain = flags(MigrateOptions {
            live: true,
            auto_converge: true,
            ..Default::default()
        });
        let w = watch_options(
            &plain,
            Tunables {
                bandwidth_mib_s: Some(32),
                downtime_ms: Some(500),
            },
            0.0,
            1 << 29,
        );
        assert!(w.controller.is_none());
        assert!(w.preflight, "capped by the domain's tunable: predicted");
        assert_eq!(w.forecast.map(|f| f.0), Some(ConvergeMode::Qemu));
        assert_eq!(w.downtime, Duration::from_millis(500));
        assert_eq!(w.bandwidth_cap.unwrap().mib_s(), 32);

        let uncapped = watch_options(&plain, Tunables::default(), 0.0, 1 << 29);
        assert!(uncapped.forecast.is_none() && !uncapped.preflight);
    }

    #[test]
    fn a_new_cap_follows_into_post_copy_only_where_post_copy_has_none_of_its_own() {
        let with = |postcopy: bool, postcopy_bandwidth: Option<u64>| {
            let f = flags(MigrateOptions {
                live: true,
                postcopy,
                postcopy_bandwidth,
                bandwidth: Some(64),
                ..Default::default()
            });
            watch_options(&f, Tunables::default(), 0.0, 1 << 29).postcopy_follows_cap
        };
        assert!(with(true, None));
        assert!(!with(true, Some(32)));
        assert!(!with(false, None));
    }
}
