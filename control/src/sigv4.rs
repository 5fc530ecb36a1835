//! AWS Signature Version 4, header form (`Authorization: AWS4-HMAC-SHA256 …`).
//!
//! Canonical request, string to sign, signing-key derivation (with a per-secret
//! cache), signing (for our own clients) and verification with a constant-time
//! comparison. See docs/AUTH.md for the exact form we accept.

use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// SHA-256 of the empty string.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a request's signature could not be checked or did not match.
/// `reason()` is the short code sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    #[error("no Authorization header")]
    MissingAuthorization,
    #[error("malformed Authorization header: {0}")]
    MalformedAuthorization(&'static str),
    #[error("unsupported signing algorithm")]
    UnsupportedAlgorithm,
    #[error("missing x-amz-date")]
    MissingDate,
    #[error("malformed x-amz-date")]
    MalformedDate,
    #[error("request timestamp is too old")]
    RequestExpired,
    #[error("request timestamp is in the future")]
    RequestInFuture,
    #[error("credential scope does not match this service")]
    ScopeMismatch,
    #[error("a required header is not signed: {0}")]
    UnsignedHeader(&'static str),
    #[error("a signed header is missing from the request")]
    SignedHeaderMissing,
    #[error("unsupported payload hash")]
    UnsupportedPayload,
    #[error("payload hash does not match the body")]
    PayloadHashMismatch,
    #[error("signature does not match")]
    SignatureMismatch,
}

impl SigError {
    pub fn reason(&self) -> &'static str {
        match self {
            SigError::MissingAuthorization => "missing_authorization",
            SigError::MalformedAuthorization(_) => "malformed_authorization",
            SigError::UnsupportedAlgorithm => "unsupported_algorithm",
            SigError::MissingDate => "missing_date",
            SigError::MalformedDate => "malformed_date",
            SigError::RequestExpired => "request_expired",
            SigError::RequestInFuture => "request_in_future",
            SigError::ScopeMismatch => "credential_scope_mismatch",
            SigError::UnsignedHeader(_) => "unsigned_header",
            SigError::SignedHeaderMissing => "signed_header_missing",
            SigError::UnsupportedPayload => "unsupported_payload",
            SigError::PayloadHashMismatch => "payload_hash_mismatch",
            SigError::SignatureMismatch => "signature_mismatch",
        }
    }
}

/// The parsed `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAuth {
    pub access_key_id: String,
    /// `YYYYMMDD`
    pub date: String,
    pub region: String,
    pub service: String,
    /// Lower-case, in the order given (must be sorted, as SigV4 requires).
    pub signed_headers: Vec<String>,
    pub signature: [u8; 32],
}

impl ParsedAuth {
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// Parse `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
/// SignedHeaders=a;b, Signature=hex`.
pub fn parse_authorization(value: &str) -> Result<ParsedAuth, SigError> {
    let value = value.trim();
    let (alg, rest) = value
        .split_once(' ')
        .ok_or(SigError::MalformedAuthorization("no parameters"))?;
    if alg != ALGORITHM {
        return Err(SigError::UnsupportedAlgorithm);
    }
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (k, v) = part
            .split_once('=')
            .ok_or(SigError::MalformedAuthorization("parameter without '='"))?;
        let slot = match k.trim() {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(SigError::MalformedAuthorization("unknown parameter")),
        };
        if slot.is_some() {
            return Err(SigError::MalformedAuthorization("duplicate parameter"));
        }
        *slot = Some(v.trim());
    }
    let credential = credential.ok_or(SigError::MalformedAuthorization("no Credential"))?;
    let signed = signed.ok_or(SigError::MalformedAuthorization("no SignedHeaders"))?;
    let signature = signature.ok_or(SigError::MalformedAuthorization("no Signature"))?;

    let parts: Vec<&str> = credential.split('/').collect();
    if parts.len() != 5 || parts[4] != "aws4_request" {
        return Err(SigError::MalformedAuthorization("bad Credential"));
    }
    if parts[0].is_empty()
        || parts[1].len() != 8
        || !parts[1].bytes().all(|b| b.is_ascii_digit())
        || parts[2].is_empty()
        || parts[3].is_empty()
    {
        return Err(SigError::MalformedAuthorization("bad Credential"));
    }
    let signed_headers: Vec<String> = signed.split(';').map(|s| s.to_string()).collect();
    if signed_headers
        .iter()
        .any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err(SigError::MalformedAuthorization("bad SignedHeaders"));
    }
    if signed_headers.windows(2).any(|w| w[0] >= w[1]) {
        return Err(SigError::MalformedAuthorization("SignedHeaders not sorted"));
    }
    if signature.len() != 64 {
        return Err(SigError::MalformedAuthorization("bad Signature"));
    }
    let mut sig = [0u8; 32];
    hex::decode_to_slice(signature, &mut sig)
        .map_err(|_| SigError::MalformedAuthorization("bad Signature"))?;
    Ok(ParsedAuth {
        access_key_id: parts[0].to_string(),
        date: parts[1].to_string(),
        region: parts[2].to_string(),
        service: parts[3].to_string(),
        signed_headers,
        signature: sig,
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 percent-encoding of everything but the unreserved set (upper-case hex).
pub fn uri_encode(input: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(input.len() + 8);
    for &b in input {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789ABCDEF"[(b & 15) as usize]));
        }
    }
    out
}

/// Percent-decode; `None` if an escape is malformed.
pub fn uri_decode(input: &str) -> Option<Vec<u8>> {
    let b = input.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let s = std::str::from_utf8(h).ok()?;
            out.push(u8::from_str_radix(s, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Canonical URI in the standard form: each segment decoded once and
/// encoded once (so `/a%20b` and a raw `/a b` both give `/a%20b`).
pub fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".to_string();
    }
    match uri_decode(path) {
        Some(decoded) => uri_encode(&decoded, true),
        None => path.to_string(),
    }
}

/// Canonical query string: every `name=value` decoded and re-encoded, a
/// missing `=` gives an empty value, sorted by name then value.
pub fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let enc = |s: &str| match uri_decode(s) {
                Some(d) => uri_encode(&d, false),
                None => s.to_string(),
            };
            (enc(k), enc(v))
        })
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(query.len() + 4);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Trim a header value and collapse runs of spaces (outside nothing: SigV4
/// collapses all sequential spaces).
pub fn canonical_header_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    push_canonical_header_value(&mut out, v);
    out
}

/// [`canonical_header_value`] appended to `out` (no temporary string).
fn push_canonical_header_value(out: &mut String, v: &str) {
    let v = v.trim();
    if !v.contains('\t') && !v.contains("  ") {
        // Nothing to collapse (the usual case): one copy.
        out.push_str(v);
        return;
    }
    let mut last_space = false;
    for c in v.chars() {
        if c == ' ' || c == '\t' {
            if !last_space {
                out.push(' ');
            }
            last_space = true;
        } else {
            out.push(c);
            last_space = false;
        }
    }
}

/// Build the canonical headers block for `signed` (lower-case, sorted) from
/// `headers` (name, value) pairs in request order; repeated headers are joined
/// with `,` in order. Errors if a signed header is absent.
pub fn canonical_headers<'a, I>(headers: I, signed: &[String]) -> Result<String, SigError>
where
    I: IntoIterator<Item = (&'a str, &'a str)> + Clone,
{
    let mut out = String::with_capacity(256);
    for name in signed {
        let mut first = true;
        let mut found = false;
        for (n, v) in headers.clone() {
            if n.eq_ignore_ascii_case(name) {
                if first {
                    out.push_str(name);
                    out.push(':');
                    first = false;
                } else {
                    out.push(',');
                }
                push_canonical_header_value(&mut out, v);
                found = true;
            }
        }
        if !found {
            return Err(SigError::SignedHeaderMissing);
        }
        out.push('\n');
    }
    Ok(out)
}

/// `METHOD\nURI\nQUERY\nHEADERS\nSIGNED\nPAYLOAD` — URI and query already canonical.
pub fn canonical_request(
    method: &str,
    canonical_uri: &str,
    canonical_query: &str,
    canonical_headers: &str,
    signed_headers: &[String],
    payload_hash: &str,
) -> String {
    format!(
        "{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{}\n{payload_hash}",
        signed_headers.join(";")
    )
}

pub fn sha256_hex(data: &[u8]) -> String {
    if data.is_empty() {
        return EMPTY_SHA256_HEX.to_string();
    }
    lower_hex(&Sha256::digest(data))
}

/// SHA-256 of the empty string (the payload hash of every bodiless request).
pub const EMPTY_SHA256_HEX: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Lower-case hex, a table lookup per nibble (`hex::encode` goes through a
/// char iterator; this runs on every request).
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 15) as usize]);
    }
    // Only ASCII digits were pushed.
    String::from_utf8(out).unwrap_or_default()
}

pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes any key length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub fn derive_signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

pub fn signature(signing_key: &[u8; 32], string_to_sign: &str) -> [u8; 32] {
    hmac(signing_key, string_to_sign.as_bytes())
}

/// (date, region, service, derived signing key)
type DerivedKey = (String, String, String, [u8; 32]);

/// A secret with its cached derived signing key (one entry: the key changes
/// only once a day per region/service).
#[derive(Debug)]
pub struct CachedSecret {
    secret: String,
    cache: Mutex<Option<DerivedKey>>,
}

impl Clone for CachedSecret {
    fn clone(&self) -> Self {
        CachedSecret::new(self.secret.clone())
    }
}

impl CachedSecret {
    pub fn new(secret: String) -> Self {
        CachedSecret {
            secret,
            cache: Mutex::new(None),
        }
    }
    pub fn secret(&self) -> &str {
        &self.secret
    }
    pub fn signing_key(&self, date: &str, region: &str, service: &str) -> [u8; 32] {
        if let Ok(guard) = self.cache.lock() {
            if let Some((d, r, s, k)) = guard.as_ref() {
                if d == date && r == region && s == service {
                    return *k;
                }
            }
        }
        let k = derive_signing_key(&self.secret, date, region, service);
        if let Ok(mut guard) = self.cache.lock() {
            *guard = Some((date.to_string(), region.to_string(), service.to_string(), k));
        }
        k
    }
}

/// Constant-time equality of two signatures.
pub fn signatures_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

// ---------------------------------------------------------------- time

/// Days since 1970-01-01 for a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parse `YYYYMMDDTHHMMSSZ` into seconds since the Unix epoch.
pub fn parse_amz_date(s: &str) -> Result<i64, SigError> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return Err(SigError::MalformedDate);
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, SigError> {
        let part = &s[r];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(SigError::MalformedDate);
        }
        part.parse::<i64>().map_err(|_| SigError::MalformedDate)
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(SigError::MalformedDate);
    }
    Ok(days_from_civil(y, mo as u32, d as u32) * 86400 + h * 3600 + mi * 60 + se)
}

/// Format seconds since the epoch as `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(unix: i64) -> String {
    let (y, m, d) = civil_from_days(unix.div_euclid(86400));
    let s = unix.rem_euclid(86400);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------- verification

/// What the verifier needs from one request. `headers` are (name, value) in
/// request order.
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// Raw path as received (still percent-encoded).
    pub path: &'a str,
    /// Raw query as received, without `?`.
    pub query: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
}

impl<'a> RequestParts<'a> {
    /// The parts of an HTTP request the verifier reads (headers that are not
    /// valid UTF-8 are left out: they cannot be signed over).
    pub fn from_http(parts: &'a hyper::http::request::Parts, body: &'a [u8]) -> Self {
        Self {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: parts
                .headers
                .iter()
                .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
                .collect(),
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// Verifier settings: our service name, region and time window.
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    pub service: String,
    pub region: String,
    pub max_skew_secs: i64,
}

/// Step 1: everything that does not need the secret. Returns the parsed
/// header and the request time.
pub fn precheck(
    req: &RequestParts<'_>,
    policy: &VerifyPolicy,
    now_unix: i64,
) -> Result<(ParsedAuth, i64), SigError> {
    let auth = req
        .header("authorization")
        .ok_or(SigError::MissingAuthorization)?;
    let parsed = parse_authorization(auth)?;
    let date = req.header("x-amz-date").ok_or(SigError::MissingDate)?;
    let t = parse_amz_date(date.trim())?;
    if parsed.date != date.trim()[..8] {
        return Err(SigError::ScopeMismatch);
    }
    if parsed.service != policy.service || parsed.region != policy.region {
        return Err(SigError::ScopeMismatch);
    }
    if !parsed.signed_headers.iter().any(|h| h == "host") {
        return Err(SigError::UnsignedHeader("host"));
    }
    if !parsed.signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err(SigError::UnsignedHeader("x-amz-date"));
    }
    if req.header("x-amz-content-sha256").is_some()
        && !parsed
            .signed_headers
            .iter()
            .any(|h| h == "x-amz-content-sha256")
    {
        return Err(SigError::UnsignedHeader("x-amz-content-sha256"));
    }
    if now_unix - t > policy.max_skew_secs {
        return Err(SigError::RequestExpired);
    }
    if t - now_unix > policy.max_skew_secs {
        return Err(SigError::RequestInFuture);
    }
    Ok((parsed, t))
}

/// The payload hash to put in the canonical request: the signed
/// `x-amz-content-sha256` (which must then match the body) or the body's hash.
pub fn payload_hash(req: &RequestParts<'_>) -> Result<String, SigError> {
    let body_hash = sha256_hex(req.body);
    match req.header("x-amz-content-sha256") {
        None => Ok(body_hash),
        Some(v) => {
            let v = v.trim();
            if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(SigError::UnsupportedPayload);
            }
            if !v.eq_ignore_ascii_case(&body_hash) {
                return Err(SigError::PayloadHashMismatch);
            }
            Ok(v.to_string())
        }
    }
}

/// The canonical requests we accept for this request: the standard form
/// (segments decoded then encoded once, query sorted), the form where the
/// received path is encoded again (AWS SDKs for non-S3 services), and the
/// literal form (curl 7.x signs path and query exactly as sent). All of them
/// bind the exact bytes of the request; usually they coincide.
pub fn candidate_canonical_requests(
    req: &RequestParts<'_>,
    signed: &[String],
    payload_hash: &str,
) -> Result<Vec<String>, SigError> {
    let headers = canonical_headers(req.headers.iter().copied(), signed)?;
    let path = if req.path.is_empty() { "/" } else { req.path };
    let mut uris = vec![canonical_uri(path)];
    let double = uri_encode(path.as_bytes(), true);
    let literal = path.to_string();
    for u in [double, literal] {
        if !uris.contains(&u) {
            uris.push(u);
        }
    }
    let mut queries = vec![canonical_query(req.query)];
    if !queries.iter().any(|q| q == req.query) {
        queries.push(req.query.to_string());
    }
    let mut out = Vec::with_capacity(uris.len() * queries.len());
    for u in &uris {
        for q in &queries {
            out.push(canonical_request(
                req.method,
                u,
                q,
                &headers,
                signed,
                payload_hash,
            ));
        }
    }
    Ok(out)
}

/// Step 2: check the signature against one or more candidate secrets (the
/// current one and, during a rotation overlap, the previous one).
pub fn verify_signature(
    req: &RequestParts<'_>,
    parsed: &ParsedAuth,
    secrets: &[&CachedSecret],
) -> Result<(), SigError> {
    let ph = payload_hash(req)?;
    let amz_date = req.header("x-amz-date").unwrap_or("").trim();
    let scope = parsed.scope();
    let candidates = candidate_canonical_requests(req, &parsed.signed_headers, &ph)?;
    let mut ok = subtle::Choice::from(0u8);
    for cr in &candidates {
        let sts = string_to_sign(amz_date, &scope, cr);
        for s in secrets {
            let key = s.signing_key(&parsed.date, &parsed.region, &parsed.service);
            ok |= signature(&key, &sts).ct_eq(&parsed.signature);
        }
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(SigError::SignatureMismatch)
    }
}

// ---------------------------------------------------------------- signing

/// Sign a request (header form). Returns the headers to add:
/// `x-amz-date`, `x-amz-content-sha256` and `authorization`. `headers` must
/// contain `host`; every header given is signed.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    unix_time: i64,
) -> Vec<(String, String)> {
    let amz_date = format_amz_date(unix_time);
    let payload = sha256_hex(body);
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
        .collect();
    all.push(("x-amz-date".into(), amz_date.clone()));
    all.push(("x-amz-content-sha256".into(), payload.clone()));
    let mut signed: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    signed.sort();
    signed.dedup();
    let pairs: Vec<(&str, &str)> = all.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let ch = canonical_headers(pairs.iter().copied(), &signed).unwrap_or_default();
    let cr = canonical_request(
        method,
        &canonical_uri(path),
        &canonical_query(query),
        &ch,
        &signed,
        &payload,
    );
    let scope = format!("{}/{region}/{service}/aws4_request", &amz_date[..8]);
    let sts = string_to_sign(&amz_date, &scope, &cr);
    let key = derive_signing_key(secret, &amz_date[..8], region, service);
    let sig = hex::encode(signature(&key, &sts));
    let auth = format!(
        "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={sig}",
        signed.join(";")
    );
    vec![
        ("x-amz-date".into(), amz_date),
        ("x-amz-content-sha256".into(), payload),
        ("authorization".into(), auth),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_date_roundtrip() {
        let t = parse_amz_date("20150830T123600Z").unwrap();
        assert_eq!(t, 1440938160);
        assert_eq!(format_amz_date(t), "20150830T123600Z");
        assert_eq!(format_amz_date(0), "19700101T000000Z");
        assert!(parse_amz_date("20151330T123600Z").is_err());
        assert!(parse_amz_date("2015-08-30T12:36:00Z").is_err());
    }

    #[test]
    fn parse_rejects_garbage() {
        assert_eq!(
            parse_authorization("AWS4-HMAC-SHA1 Credential=a/b/c/d/aws4_request"),
            Err(SigError::UnsupportedAlgorithm)
        );
        assert!(parse_authorization("AWS4-HMAC-SHA256 Credential=a/20150830/r/s/aws4_request, SignedHeaders=x-amz-date;host, Signature=00").is_err());
        let ok = parse_authorization(&format!(
            "AWS4-HMAC-SHA256 Credential=AK/20150830/r/s/aws4_request, SignedHeaders=host;x-amz-date, Signature={}",
            "ab".repeat(32)
        ))
        .unwrap();
        assert_eq!(ok.access_key_id, "AK");
        assert_eq!(ok.signed_headers, vec!["host", "x-amz-date"]);
    }

    #[test]
    fn sign_then_verify_roundtrip_and_tamper() {
        let secret = CachedSecret::new("s3cr3t".into());
        let now = 1_700_000_000;
        let hdrs = sign(
            "POST",
            "/a/b",
            "y=2&x=1",
            &[("host", "h:1")],
            b"body",
            "AK",
            "s3cr3t",
            "r",
            "svc",
            now,
        );
        let mut headers: Vec<(&str, &str)> = vec![("host", "h:1")];
        for (n, v) in &hdrs {
            headers.push((n.as_str(), v.as_str()));
        }
        let policy = VerifyPolicy {
            service: "svc".into(),
            region: "r".into(),
            max_skew_secs: 300,
        };
        let req = RequestParts {
            method: "POST",
            path: "/a/b",
            query: "y=2&x=1",
            headers: headers.clone(),
            body: b"body",
        };
        let (p, _) = precheck(&req, &policy, now).unwrap();
        verify_signature(&req, &p, &[&secret]).unwrap();
        let bad = RequestParts {
            body: b"bodz",
            ..req
        };
        assert_eq!(
            verify_signature(&bad, &p, &[&secret]),
            Err(SigError::PayloadHashMismatch)
        );
        let req2 = RequestParts {
            method: "POST",
            path: "/a/c",
            query: "y=2&x=1",
            headers,
            body: b"body",
        };
        assert_eq!(
            verify_signature(&req2, &p, &[&secret]),
            Err(SigError::SignatureMismatch)
        );
        assert_eq!(
            precheck(&req2, &policy, now + 301).unwrap_err(),
            SigError::RequestExpired
        );
        assert_eq!(
            precheck(&req2, &policy, now - 301).unwrap_err(),
            SigError::RequestInFuture
        );
    }

    #[test]
    fn fast_hex_and_empty_hash_match_the_reference() {
        for data in [&b""[..], b"abc", &[0u8, 255, 16, 1][..], &[7u8; 200][..]] {
            assert_eq!(sha256_hex(data), hex::encode(Sha256::digest(data)));
        }
    }

    #[test]
    fn header_values_are_trimmed_and_spaces_collapsed() {
        assert_eq!(canonical_header_value("  a b  "), "a b");
        assert_eq!(canonical_header_value("a  b\t\tc \t d"), "a b c d");
        assert_eq!(canonical_header_value("\ta"), "a");
        let h = [("Host", " x "), ("X-A", "1  2"), ("x-a", "3")];
        assert_eq!(
            canonical_headers(h.iter().copied(), &["host".into(), "x-a".into()]).unwrap(),
            "host:x\nx-a:1 2,3\n"
        );
    }
}
