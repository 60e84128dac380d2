//! QEMU's view of a job, in the protocol's terms.

use protocol::job::JobStats;
use qmp::commands::migration::MigrationInfo;
use types::MIB;

/// Converts a `query-migrate` reply.
pub fn stats_from_qemu(info: &MigrationInfo) -> JobStats {
    let ram = info.ram.clone().unwrap_or_default();
    JobStats {
        qemu_status: info.status.map(|s| s.as_str().to_string()),
        total_time_ms: info.total_time,
        setup_time_ms: info.setup_time,
        downtime_ms: info.downtime,
        expected_downtime_ms: info.expected_downtime,
        memory_total_bytes: ram.total,
        memory_processed_bytes: ram.transferred,
        memory_remaining_bytes: ram.remaining,
        constant_pages: ram.duplicate,
        normal_pages: ram.normal,
        normal_bytes: ram.normal_bytes,
        // QEMU reports megabits per second.
        bandwidth_mib_s: ram.mbps.map(|mbps| mbps * 1e6 / 8.0 / MIB as f64),
        dirty_rate_pages_s: ram.dirty_pages_rate,
        iteration: ram.dirty_sync_count,
        page_size: ram.page_size,
        cpu_throttle_pct: info.cpu_throttle_percentage,
        postcopy_requests: ram.postcopy_requests,
        // The disks' mirrors are block jobs, not part of query-migrate.
        disk_total_bytes: None,
        disk_processed_bytes: None,
        disk_dirty_rate_bytes_s: None,
        // Measured by the destination agent, not QEMU.
        postcopy_work_lost_ms: None,
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_qemu_units() {
        let info: MigrationInfo = serde_json::from_str(
            r#"{"status":"active","cpu-throttle-percentage":30,"expected-downtime":120,
                "ram":{"total":100,"transferred":40,"remaining":60,"mbps":536.870912,
                       "dirty-sync-count":4,"page-size":4096,"dirty-pages-rate":1000}}"#,
        )
        .unwrap();
        let stats = stats_from_qemu(&info);
        assert_eq!(stats.qemu_status.as_deref(), Some("active"));
        assert_eq!(stats.cpu_throttle_pct, Some(30));
        assert_eq!(stats.iteration, Some(4));
        assert!((stats.bandwidth_mib_s.unwrap() - 64.0).abs() < 1e-6);
        assert!(!stats.in_postcopy());
    }

    #[test]
    fn qemus_post_copy_status_reads_as_post_copy() {
        let info = MigrationInfo {
            status: Some(qmp::commands::migration::MigrationStatus::PostcopyActive),
            ..Default::default()
        };
        assert!(stats_from_qemu(&info).in_postcopy());
    }
}
