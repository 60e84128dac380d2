use super::super::tests::live;
use super::*;

#[test]
fn contradictions_are_refused_with_the_option_names() {
    let cases = [
        (
            MigrateOptions {
                offline: true,
                ..live()
            },
            "--live and --offline",
        ),
        (
            MigrateOptions {
                live: false,
                offline: true,
                ..Default::default()
            },
            "--persistent",
        ),
        (
            MigrateOptions {
                auto_converge_initial: Some(20),
                ..live()
            },
            "need --auto-converge",
        ),
        (
            MigrateOptions {
                auto_converge: true,
                auto_converge_increment: Some(100),
                ..live()
            },
            "between 1 and 99",
        ),
        (
            MigrateOptions {
                compressed: true,
                parallel: true,
                ..live()
            },
            "--compressed",
        ),
        (
            MigrateOptions {
                postcopy_after_precopy: true,
                ..live()
            },
            "needs --postcopy",
        ),
        (
            MigrateOptions {
                copy_storage_all: true,
                copy_storage_inc: true,
                ..live()
            },
            "--copy-storage-all and --copy-storage-inc are mutually exclusive",
        ),
        (
            MigrateOptions {
                migrate_disks: vec!["vda".into()],
                ..live()
            },
            "--migrate-disks needs --copy-storage-all or --copy-storage-inc",
        ),
        (
            MigrateOptions {
                disks_port: Some(10809),
                ..live()
            },
            "--disks-port needs",
        ),
        (
            MigrateOptions {
                dirty_limit: true,
                auto_converge: true,
                ..live()
            },
            "mutually exclusive",
        ),
        (
            MigrateOptions {
                migrateuri: Some("udp:1.2.3.4:5".into()),
                ..live()
            },
            "udp",
        ),
        (
            MigrateOptions {
                bandwidth: Some(u64::MAX),
                ..live()
            },
            "beyond any link",
        ),
        (
            MigrateOptions {
                comp_methods: vec![CompMethod::Zstd],
                parallel: true,
                ..live()
            },
            "--comp-methods needs --compressed",
        ),
        (
            MigrateOptions {
                compressed: true,
                comp_methods: vec![CompMethod::Zstd],
                ..live()
            },
            "needs --parallel",
        ),
        (
            MigrateOptions {
                compressed: true,
                parallel: true,
                comp_methods: vec![CompMethod::Zstd, CompMethod::Zlib],
                ..live()
            },
            "mutually exclusive",
        ),
        (
            MigrateOptions {
                compressed: true,
                parallel: true,
                comp_methods: vec![CompMethod::Xbzrle, CompMethod::Zstd],
                ..live()
            },
            "--compressed (XBZRLE) cannot be combined with --parallel",
        ),
        (
            MigrateOptions {
                compressed: true,
                comp_methods: vec![CompMethod::Xbzrle, CompMethod::Xbzrle],
                ..live()
            },
            "names xbzrle twice",
        ),
        (
            MigrateOptions {
                compressed: true,
                parallel: true,
                comp_methods: vec![CompMethod::Zstd],
                comp_zlib_level: Some(3),
                ..live()
            },
            "--comp-zlib-level needs --compressed --comp-methods zlib",
        ),
        (
            MigrateOptions {
                compressed: true,
                parallel: true,
                comp_methods: vec![CompMethod::Zstd],
                comp_zstd_level: Some(21),
                ..live()
            },
            "--comp-zstd-level must be between 0 and 20",
        ),
        (
            MigrateOptions {
                compressed: true,
                comp_xbzrle_cache: Some(5_000_000),
                ..live()
            },
            "power of two",
        ),
        (
            MigrateOptions {
                parallel: true,
                compressed: true,
                comp_methods: vec![CompMethod::Zstd],
                comp_xbzrle_cache: Some(1 << 26),
                ..live()
            },
            "--comp-xbzrle-cache needs --compressed with XBZRLE",
        ),
        (
            MigrateOptions {
                zerocopy: true,
                ..live()
            },
            "--zerocopy needs --parallel",
        ),
        (
            MigrateOptions {
                zerocopy: true,
                parallel: true,
                tls: true,
                ..live()
            },
            "--zerocopy cannot be combined with --tls",
        ),
        (
            MigrateOptions {
                postcopy_bandwidth: Some(10),
                ..live()
            },
            "--postcopy-bandwidth needs --postcopy or --allow-postcopy",
        ),
        (
            MigrateOptions {
                dname: Some("../etc".into()),
                ..live()
            },
            "--dname",
        ),
        (
            MigrateOptions {
                tls_destination: Some("b.example".into()),
                ..live()
            },
            "--tls-destination needs --tls",
        ),
        (
            MigrateOptions {
                listen_address: Some("0.0.0.0".into()),
                ..live()
            },
            "--listen-address \"0.0.0.0\"",
        ),
        (
            MigrateOptions {
                listen_address: Some("b.example".into()),
                ..live()
            },
            "own IP addresses",
        ),
        (
            MigrateOptions {
                copy_storage_all: true,
                disks_uri: Some("unix:/tmp/nbd".into()),
                ..live()
            },
            "--disks-uri \"unix:/tmp/nbd\"",
        ),
        (
            MigrateOptions {
                disks_uri: Some("tcp:10.0.0.2:10809".into()),
                ..live()
            },
            "--disks-uri needs --copy-storage-all",
        ),
        (
            MigrateOptions {
                tls: true,
                tls_destination: Some("b example,evil=1".into()),
                ..live()
            },
            "is not a host name",
        ),
    ];
    for (f, expected) in cases {
        let err = validate(&f).unwrap_err().to_string();
        assert!(err.contains(expected), "{err} / {expected}");
    }
}

#[test]
fn compression_as_virsh_takes_it() {
    for ok in [
        MigrateOptions {
            compressed: true,
            ..live()
        },
        MigrateOptions {
            compressed: true,
            comp_methods: vec![CompMethod::Xbzrle],
            comp_xbzrle_cache: Some(1 << 27),
            ..live()
        },
        MigrateOptions {
            compressed: true,
            parallel: true,
            comp_methods: vec![CompMethod::Zstd],
            comp_zstd_level: Some(3),
            ..live()
        },
        MigrateOptions {
            parallel: true,
            zerocopy: true,
            ..live()
        },
        MigrateOptions {
            postcopy: true,
            postcopy_bandwidth: Some(16),
            dname: Some("web-2".into()),
            ..live()
        },
        MigrateOptions {
            tls: true,
            tls_destination: Some("host-b.example.org".into()),
            ..live()
        },
        MigrateOptions {
            tls: true,
            tls_destination: Some("fd00::2".into()),
            ..live()
        },
        MigrateOptions {
            listen_address: Some("10.0.0.2".into()),
            copy_storage_all: true,
            disks_uri: Some("tcp:[fd00::2]:10809".into()),
            ..live()
        },
    ] {
        assert_eq!(validate(&ok), Ok(()), "{ok:?}");
    }
}
