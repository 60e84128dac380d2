//! `domdirtyrate-calc`, `domstats --dirtyrate` and `migrate-compcache`, as
//! virsh prints them.

use anyhow::Result;
use protocol::call;
use protocol::domain::DirtyRate;
use protocol::Client;
use serde_json::json;

use crate::agent::{call, domain};
use crate::commands::json;

/// `domdirtyrate-calc`: starts the measurement.
pub async fn calc(
    client: &Client,
    name: &str,
    seconds: u32,
    mode: Option<String>,
) -> Result<String> {
    call(
        client,
        call::DomDirtyRateCalc {
            domain: domain(name)?,
            seconds,
            mode,
        },
    )
    .await?;
    Ok(format!(
        "Measuring {name}'s dirty rate over {seconds} s: `livemig domstats --dirtyrate {name}` \
         shows it then\n"
    ))
}

/// virsh's `dirtyrate.calc_status`: 0 unstarted, 1 measuring, 2 measured.
fn status_code(status: &str) -> u8 {
    match status {
        "measuring" => 1,
        "measured" => 2,
        _ => 0,
    }
}

/// The `dirtyrate.*` lines of `domstats`.
pub fn dirtyrate_lines(rate: &DirtyRate) -> String {
    let mut out = format!("  dirtyrate.calc_status={}\n", status_code(&rate.status));
    if let Some(start) = rate.start_time {
        out.push_str(&format!("  dirtyrate.calc_start_time={start}\n"));
    }
    if let Some(period) = rate.calc_period_s {
        out.push_str(&format!("  dirtyrate.calc_period={period}\n"));
    }
    if let Some(mode) = &rate.mode {
        out.push_str(&format!("  dirtyrate.calc_mode={mode}\n"));
    }
    if let Some(mib_s) = rate.mib_s {
        out.push_str(&format!("  dirtyrate.megabytes_per_second={mib_s}\n"));
    }
    for (vcpu, mib_s) in rate.vcpus_mib_s.iter().enumerate() {
        out.push_str(&format!(
            "  dirtyrate.vcpu.{vcpu}.megabytes_per_second={mib_s}\n"
        ));
    }
    out
}

/// `domstats [--dirtyrate]`: the dirty-rate group is the one livemig has.
pub async fn domstats(
    client: &Client,
    name: &str,
    _dirtyrate: bool,
    as_json: bool,
) -> Result<String> {
    let rate = call(
        client,
        call::DomDirtyRate {
            domain: domain(name)?,
        },
    )
    .await?;
    if as_json {
        return json(&json!({"domain": name, "dirtyrate": rate}));
    }
    Ok(format!("Domain: '{name}'\n{}", dirtyrate_lines(&rate)))
}

/// `migrate-compcache`.
pub async fn compcache(
    client: &Client,
    name: &str,
    size: Option<u64>,
    as_json: bool,
) -> Result<String> {
    let bytes = call(
        client,
        call::MigrateCompcache {
            domain: domain(name)?,
            bytes: size,
        },
    )
    .await?;
    if as_json {
        return json(&json!({"domain": name, "bytes": bytes}));
    }
    Ok(format!(
        "Compression cache: {:.3} MiB\n",
        bytes as f64 / 1048576.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measurement_prints_as_virsh_s_domstats_does() {
        let rate = DirtyRate {
            status: "measured".into(),
            start_time: Some(12930),
            calc_period_s: Some(2),
            mode: Some("dirty-ring".into()),
            mib_s: Some(384),
            vcpus_mib_s: vec![384, 0],
        };
        assert_eq!(
            dirtyrate_lines(&rate),
            "  dirtyrate.calc_status=2\n  dirtyrate.calc_start_time=12930\n  \
             dirtyrate.calc_period=2\n  dirtyrate.calc_mode=dirty-ring\n  \
             dirtyrate.megabytes_per_second=384\n  dirtyrate.vcpu.0.megabytes_per_second=384\n  \
             dirtyrate.vcpu.1.megabytes_per_second=0\n"
        );
    }
}
