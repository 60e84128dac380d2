//! Whatever arrives on an agent's socket, the decoders answer with a value
//! or a clear error: no panic, no hang, no unbounded buffer.

use proptest::prelude::*;
use protocol::codec::{read_message, CodecError, MAX_MESSAGE};
use protocol::envelope::RequestEnvelope;
use protocol::AgentUri;

fn decode(bytes: &[u8]) -> Result<Option<RequestEnvelope>, CodecError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut reader = bytes;
        read_message::<_, RequestEnvelope>(&mut reader).await
    })
}

const VALID: &str = r#"{"version":1,"id":7,"request":{"op":"dom-info","domain":"web1"}}"#;

proptest! {
    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn a_valid_request_cut_anywhere_is_an_error_not_a_request(cut in 0..VALID.len()) {
        let mut line = VALID.as_bytes()[..cut].to_vec();
        line.push(b'\n');
        prop_assert!(decode(&line).is_err() || cut == 0);
    }

    #[test]
    fn a_valid_request_with_one_byte_changed_never_panics(at in 0..VALID.len(), byte in any::<u8>()) {
        let mut line = VALID.as_bytes().to_vec();
        line[at] = byte;
        line.push(b'\n');
        let _ = decode(&line);
    }

    #[test]
    fn agent_uris_parse_or_fail_cleanly(text in ".{0,200}") {
        let _ = text.parse::<AgentUri>();
    }

    #[test]
    fn huge_numbers_are_refused_or_kept_exact(n in any::<u128>()) {
        let line = format!(
            r#"{{"version":1,"id":{n},"request":{{"op":"migrate-set-speed","domain":"a","bandwidth_mib_s":{n}}}}}"#
        ) + "\n";
        match decode(line.as_bytes()) {
            Ok(Some(envelope)) => prop_assert_eq!(u128::from(envelope.id), n),
            Ok(None) => prop_assert!(false, "a line decoded as end of stream"),
            Err(_) => prop_assert!(n > u128::from(u64::MAX)),
        }
    }
}

#[test]
fn the_valid_request_decodes() {
    let envelope = decode(format!("{VALID}\n").as_bytes()).unwrap().unwrap();
    assert_eq!(envelope.id, 7);
}

#[test]
fn deep_nesting_is_an_error() {
    let line = "[".repeat(100_000) + "\n";
    assert!(matches!(
        decode(line.as_bytes()),
        Err(CodecError::Malformed(_))
    ));
    let line = format!(
        r#"{{"version":1,"id":1,"request":{{"op":"define","definition":{}1{}}}}}"#,
        "{\"a\":".repeat(10_000),
        "}".repeat(10_000)
    ) + "\n";
    assert!(matches!(
        decode(line.as_bytes()),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn invalid_utf8_is_an_error() {
    let mut line = br#"{"version":1,"id":1,"request":{"op":"dom-info","domain":""#.to_vec();
    line.extend_from_slice(&[0xff, 0xfe]);
    line.extend_from_slice(b"\"}}\n");
    assert!(matches!(decode(&line), Err(CodecError::Malformed(_))));
}

#[test]
fn an_endless_line_stops_at_the_limit() {
    let line = vec![b' '; MAX_MESSAGE + 2];
    assert!(matches!(decode(&line), Err(CodecError::TooLong)));
}
