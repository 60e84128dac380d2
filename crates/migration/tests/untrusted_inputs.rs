//! Migration options and data URIs come from clients and peers: any of
//! them is accepted only checked, and none makes the agent panic.

use migration::uri::{check_peer_data_uri, parse_data_uri, DataUri};
use migration::Flags;
use proptest::prelude::*;
use protocol::MigrateOptions;

proptest! {
    #[test]
    fn data_uris_parse_or_fail_cleanly(text in ".{0,200}") {
        let _ = parse_data_uri(&text);
    }

    #[test]
    fn a_peer_s_data_uri_is_only_ever_tcp_to_the_peer(text in ".{0,120}", asked in proptest::option::of(".{0,60}")) {
        let peer: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        if let Ok(uri) = check_peer_data_uri(&text, asked.as_deref(), "10.0.0.2", &[peer]) {
            let shown = uri.to_string();
            let to_peer = shown.starts_with("tcp:10.0.0.2:");
            // Or exactly where the user asked (any port, if they gave 0).
            let as_asked = match (asked.as_deref().map(parse_data_uri), &uri) {
                (Some(Ok(DataUri::Tcp { host: a, .. })), DataUri::Tcp { host: b, .. }) => a == *b,
                (Some(Ok(a)), b) => a == *b,
                _ => false,
            };
            prop_assert!(to_peer || as_asked, "{} accepted", shown);
        }
    }

    #[test]
    fn numbers_from_the_wire_are_checked_never_overflow(
        bandwidth in proptest::option::of(any::<u64>()),
        downtime in proptest::option::of(any::<u64>()),
        max_downtime in proptest::option::of(any::<u64>()),
        timeout in proptest::option::of(any::<u64>()),
        initial in proptest::option::of(any::<u8>()),
        max_throttle in proptest::option::of(any::<f64>()),
        connections in proptest::option::of(any::<u8>()),
    ) {
        let options = MigrateOptions {
            live: true,
            bandwidth,
            downtime,
            max_downtime,
            timeout,
            auto_converge: initial.is_some(),
            auto_converge_initial: initial,
            max_throttle,
            parallel: connections.is_some(),
            parallel_connections: connections,
            ..Default::default()
        };
        if let Ok(flags) = Flags::new(options) {
            // Everything a job derives from them is in range.
            if let Some(b) = flags.bandwidth() {
                prop_assert!(b.bytes_per_sec() > 0);
            }
            let _ = (flags.downtime(), flags.max_downtime(), flags.timeout(), flags.max_throttle());
            let _ = flags.requirements();
        }
    }
}
