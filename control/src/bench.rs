//! Micro-benchmark helpers the `cargo xtask bench auth` runner can call
//! (no criterion dependency). Figures go to docs/BENCHMARKS.md.

use std::time::{Duration, Instant};

use crate::authz::{AuthState, Source};
use crate::keystore::{Grant, KeyRecord, Snapshot};
use crate::sigv4::{self, RequestParts, VerifyPolicy};

/// Result of [`verify_cost`].
#[derive(Debug, Clone, Copy)]
pub struct VerifyCost {
    pub iterations: u32,
    /// Requests that were accepted (all of them, if the verifier works).
    pub accepted: u32,
    pub per_request: Duration,
}

/// Cost of authenticating one signed request (parse, checks, canonical
/// request, string to sign, HMAC with the cached signing key, constant-time
/// compare) plus the grant check, for a small GET with `body_len` bytes of body.
pub fn verify_cost(iterations: u32, body_len: usize) -> VerifyCost {
    let secret = "benchsecretbenchsecretbenchsecretbenchse";
    let state = AuthState::new("bench");
    state.install(
        Snapshot {
            service: "bench".into(),
            gen: "g".into(),
            seq: 1,
            last_id: "1-0".into(),
            keys: vec![KeyRecord {
                akid: "HRKBENCHBENCHBENCH00".into(),
                principal: "p".into(),
                status: "active".into(),
                secret: Some(secret.into()),
                secret_id: Some("1".into()),
                prev_secret: None,
                prev_expires_ms: None,
                created_ms: "0".into(),
                updated_ms: "0".into(),
            }],
            grants: [(
                "p".to_string(),
                Grant {
                    methods: vec!["*".into()],
                    prefixes: vec!["/".into()],
                },
            )]
            .into_iter()
            .collect(),
        },
        Source::Redis,
    );
    let policy = VerifyPolicy {
        service: "bench".into(),
        region: "headroom".into(),
        max_skew_secs: 300,
    };
    let now = sigv4::unix_now();
    let body = vec![b'x'; body_len];
    let signed = sigv4::sign(
        "GET",
        "/api/items",
        "a=1&b=2",
        &[("host", "127.0.0.1:8080")],
        &body,
        "HRKBENCHBENCHBENCH00",
        secret,
        "headroom",
        "bench",
        now,
    );
    let mut headers: Vec<(&str, &str)> = vec![("host", "127.0.0.1:8080")];
    for (n, v) in &signed {
        headers.push((n.as_str(), v.as_str()));
    }
    let req = RequestParts {
        method: "GET",
        path: "/api/items",
        query: "a=1&b=2",
        headers,
        body: &body,
    };
    let iterations = iterations.max(1);
    // warm the derived-key cache
    let _ = state.authenticate(&req, &policy, now);
    let mut accepted = 0u32;
    let t = Instant::now();
    for _ in 0..iterations {
        let p = state.authenticate(std::hint::black_box(&req), &policy, now);
        if p.is_ok_and(|p| state.authorise(&p, "GET", "/api/items").is_ok()) {
            accepted += 1;
        }
    }
    VerifyCost {
        iterations,
        accepted,
        per_request: t.elapsed() / iterations,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cost_runs_and_accepts() {
        let c = super::verify_cost(2_000, 0);
        eprintln!(
            "verify cost (this build profile): {:?} per request over {} requests",
            c.per_request, c.iterations
        );
        assert_eq!(
            c.accepted, c.iterations,
            "the benchmarked request must be accepted"
        );
    }
}
