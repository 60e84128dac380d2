//! Definitions arrive as TOML files and as JSON documents from any client
//! or peer: whatever they hold, parsing ends in a definition that
//! validates or a clear error, never a panic.

use domain::DomainDefinition;
use proptest::prelude::*;
use serde_json::{json, Value};

/// JSON values of every shape, nested.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("name".to_string()),
                    Just("memory_mib".to_string()),
                    Just("vcpus".to_string()),
                    Just("kernel".to_string()),
                    Just("path".to_string()),
                    Just("disk".to_string()),
                    Just("serial".to_string()),
                    Just("log".to_string()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn documents_parse_or_fail_cleanly(document in json_value()) {
        if let Ok(def) = DomainDefinition::from_document(document) {
            // Whatever parsed, validated: it round-trips.
            prop_assert_eq!(DomainDefinition::from_document(def.to_document()).unwrap(), def);
        }
    }

    #[test]
    fn near_valid_documents_parse_or_fail_cleanly(
        name in ".{0,80}",
        memory in any::<u64>(),
        vcpus in any::<i64>(),
        path in ".{0,120}",
    ) {
        let document = json!({"name": name, "memory_mib": memory, "vcpus": vcpus,
            "kernel": {"path": path}});
        let _ = DomainDefinition::from_document(document);
    }

    #[test]
    fn toml_text_parses_or_fails_cleanly(text in ".{0,400}") {
        let _ = DomainDefinition::from_toml(&text);
    }
}

#[test]
fn memory_zero_and_huge_are_refused() {
    for memory in [0u64, u64::MAX] {
        let document = json!({"name": "vm", "memory_mib": memory, "kernel": {"path": "/k"}});
        assert!(
            DomainDefinition::from_document(document).is_err(),
            "{memory}"
        );
    }
}

/// The definition README.md shows is one the agent takes, every key of it.
#[test]
fn the_readme_s_example_definition_parses() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"),
    )
    .unwrap();
    let start = readme
        .find("```toml\nname = \"web1\"")
        .expect("the example")
        + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let def = domain::DomainDefinition::from_toml(&readme[start..end]).unwrap();
    assert_eq!(def.name.as_str(), "web1");
    assert_eq!(def.labels.get("tier").map(String::as_str), Some("web"));
    assert_eq!(def.disks.len(), 2);
    assert_eq!(def.nics.len(), 2);
}
