//! The request gate shared by the shim and the load-receiver: read the body
//! under a size limit, verify the SigV4 signature against the local key
//! cache, check the optional nonce. No I/O besides the request itself.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response, StatusCode};

use crate::authz::{AuthState, NonceCache, Rejection};
use crate::sigv4::{RequestParts, VerifyPolicy};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Optional nonce header (must be signed when present).
pub const NONCE_HEADER: &str = "x-headroom-nonce";

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `{"error": reason}` with `status`. Never carries signatures.
pub fn json_error(status: u16, reason: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({ "error": reason }))
}

pub fn json_response(status: u16, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn reject(r: &Rejection) -> Response<Body> {
    json_error(r.status(), r.reason())
}

pub struct Gate {
    pub state: Arc<AuthState>,
    pub policy: VerifyPolicy,
    pub max_body: usize,
    pub nonces: NonceCache,
}

/// An authenticated request, body read.
pub struct Admitted {
    pub parts: hyper::http::request::Parts,
    pub body: Bytes,
    pub principal: String,
    /// Decoded path (for grant checks).
    pub path: String,
}

impl Gate {
    pub fn new(state: Arc<AuthState>, policy: VerifyPolicy, max_body: usize) -> Self {
        let ttl = policy.max_skew_secs * 2;
        Gate {
            state,
            policy,
            max_body,
            nonces: NonceCache::new(100_000, ttl),
        }
    }

    /// Authenticate `req`; on refusal returns the response to send.
    pub async fn admit(&self, req: Request<Incoming>) -> Result<Admitted, Response<Body>> {
        if !self.state.is_ready() {
            return Err(reject(&Rejection::NotReady));
        }
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(json_error(413, "body_too_large"));
        }
        // Most requests (GETs) have no body: nothing to collect.
        let body = if body.is_end_stream() {
            Bytes::new()
        } else {
            match Limited::new(body, self.max_body).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        return Err(json_error(413, "body_too_large"));
                    }
                    return Err(json_error(400, "bad_body"));
                }
            }
        };
        let path = crate::authz::decoded_path(parts.uri.path()).map_err(|r| reject(&r))?;
        let rp = RequestParts::from_http(&parts, &body);
        let now = crate::sigv4::unix_now();
        let principal = self
            .state
            .authenticate(&rp, &self.policy, now)
            .map_err(|r| reject(&r))?;
        if let Some(nonce) = rp.header(NONCE_HEADER) {
            let signed = rp
                .header("authorization")
                .and_then(|a| crate::sigv4::parse_authorization(a).ok())
                .is_some_and(|p| p.signed_headers.iter().any(|h| h == NONCE_HEADER));
            if !signed {
                return Err(reject(&Rejection::Signature(
                    crate::sigv4::SigError::UnsignedHeader(NONCE_HEADER),
                )));
            }
            if !self.nonces.check_and_insert(&principal, nonce, now) {
                return Err(reject(&Rejection::ReplayedNonce));
            }
        }
        Ok(Admitted {
            parts,
            body,
            principal,
            path,
        })
    }
}
