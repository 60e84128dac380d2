//! The envelope around every message: protocol version and request id.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::reply::Reply;
use crate::request::Request;

/// The protocol version in every envelope. A newer minor revision only adds
/// `#[serde(default)]` fields; a different version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request on its way to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// Chosen by the client; the reply carries it back.
    pub id: u64,
    /// What is asked.
    pub request: Request,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub version: u32,
    /// The request's id.
    pub id: u64,
    /// The reply or the error.
    #[serde(flatten)]
    pub result: ResponseResult,
}

/// A reply or an error, on the wire as `{"ok": ...}` or `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseResult {
    /// The request succeeded.
    Ok(Reply),
    /// The request was refused or failed.
    Error(ApiError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let env = RequestEnvelope {
            version: PROTOCOL_VERSION,
            id: 7,
            request: Request::DomJobAbort {
                domain: "web1".parse().unwrap(),
            },
        };
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"version": 1, "id": 7, "request": {"op": "dom-job-abort", "domain": "web1"}})
        );
        let back: RequestEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn errors_round_trip_and_unknown_codes_decode() {
        let env = ResponseEnvelope {
            version: 1,
            id: 1,
            result: ResponseResult::Error(ApiError::new(ErrorCode::NoDomain, "no domain 'x'")),
        };
        let text = serde_json::to_string(&env).unwrap();
        assert_eq!(
            serde_json::from_str::<ResponseEnvelope>(&text).unwrap(),
            env
        );
        let newer: ApiError =
            serde_json::from_str(r#"{"code":"from-the-future","message":"m"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
    }
}
