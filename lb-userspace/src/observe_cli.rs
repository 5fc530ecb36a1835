//! `headroom lb status` and `headroom lb trace`: the command-line side of
//! the admin endpoint. Both find the daemon by `--url`, else by the
//! `metrics_listen` of `--config`, else at the default `127.0.0.1:9470`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use thiserror::Error;

use crate::{
    admin_client::{AdminClient, ClientError},
    config::{parse_duration, Config},
    status_table,
    trace::{Outcome, Proto, TraceAnswer, TraceRequest},
};

/// Where the daemon's admin endpoint is.
#[derive(Debug, Clone, Args)]
pub struct Endpoint {
    /// The daemon's config file: its `metrics_listen` is asked.
    #[arg(long, conflicts_with = "url")]
    pub config: Option<PathBuf>,
    /// The admin endpoint, `http://HOST:PORT` (default: http://127.0.0.1:9470).
    #[arg(long)]
    pub url: Option<String>,
}

/// `headroom lb status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Where the daemon is.
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Time between the two snapshots packet rates are computed from.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
}

/// `headroom lb trace SRC:PORT VIP:PORT [tcp|udp]`.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// The client's address and port, e.g. 10.90.0.2:40000 or [fd00::2]:40000.
    pub src: String,
    /// The service's VIP and port.
    pub dst: String,
    /// The protocol.
    #[arg(default_value = "tcp")]
    pub proto: String,
    /// Interface the packet arrives on (default: the service group's first).
    #[arg(long)]
    pub interface: Option<String>,
    /// Where the daemon is.
    #[command(flatten)]
    pub endpoint: Endpoint,
}

/// Why a command failed.
#[derive(Debug, Error)]
pub enum ObserveError {
    /// A bad argument.
    #[error("{0}")]
    Input(String),
    /// The config could not be read.
    #[error("{0}")]
    Config(String),
    /// The daemon could not be asked, or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err(format!("interval {s}: give a duration between 1ms and 1h"));
    }
    Ok(d)
}

impl Endpoint {
    /// The client for this endpoint.
    pub fn client(&self) -> Result<AdminClient, ObserveError> {
        if let Some(url) = &self.url {
            return Ok(AdminClient::from_url(url)?);
        }
        if let Some(file) = &self.config {
            let c = Config::load(file)
                .map_err(|e| ObserveError::Config(format!("config {}: {e}", file.display())))?;
            return Ok(AdminClient::from_listen(c.metrics_listen));
        }
        Ok(AdminClient::from_listen(Config::default().metrics_listen))
    }
}

/// Fetches the status twice, `interval` apart, and renders the table.
pub async fn status(args: &StatusArgs) -> Result<String, ObserveError> {
    let client = args.endpoint.client()?;
    let before = client.status().await?;
    let t = std::time::Instant::now();
    tokio::time::sleep(args.interval).await;
    let after = client.status().await?;
    Ok(status_table::render(&before, &after, t.elapsed()))
}

/// Parses the arguments of `lb trace` into a request.
pub fn trace_request(args: &TraceArgs) -> Result<TraceRequest, ObserveError> {
    let addr = |what: &str, s: &str| {
        s.parse::<SocketAddr>().map_err(|_| {
            ObserveError::Input(format!(
                "{what} {s:?}: expected IP:PORT (IPv6 as [IP]:PORT)"
            ))
        })
    };
    let req = TraceRequest {
        src: addr("source", &args.src)?,
        dst: addr("destination", &args.dst)?,
        proto: args.proto.parse::<Proto>().map_err(ObserveError::Input)?,
        interface: args.interface.clone(),
    };
    req.validate()
        .map_err(|e| ObserveError::Input(e.to_string()))?;
    Ok(req)
}

/// Asks the daemon; returns the answer and its rendering.
pub async fn trace(args: &TraceArgs) -> Result<(TraceAnswer, String), ObserveError> {
    let req = trace_request(args)?;
    let answer = args.endpoint.client()?.trace(&req).await?;
    let text = render_trace(&answer);
    Ok((answer, text))
}

/// The answer as printed.
pub fn render_trace(a: &TraceAnswer) -> String {
    let r = &a.request;
    let mut out = format!("{} → {} {}: ", r.src, r.dst, r.proto.as_str());
    match a.outcome {
        Outcome::NotAService => out.push_str("not a service"),
        o => {
            out.push_str(o.describe());
            if let Some(s) = &a.service {
                out.push_str(&format!(", service {s}"));
            }
            match &a.backend {
                Some(b) => {
                    out.push_str(&format!(", backend {}", b.id));
                    if let Some(addr) = b.addr {
                        out.push_str(&format!(" {addr}"));
                    }
                    if let Some(i) = &b.instance {
                        out.push_str(&format!(" (instance {i})"));
                    }
                    if b.draining {
                        out.push_str(" [draining]");
                    }
                }
                None => out.push_str(", no backend"),
            }
            if let Some(act) = &a.action {
                out.push_str(&format!(", verdict {act}"));
            }
            if let Some(i) = &a.interface {
                out.push_str(&format!(" (in on {i})"));
            }
        }
    }
    out.push('\n');
    if let Some(n) = &a.note {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(src: &str, dst: &str, proto: &str) -> TraceArgs {
        TraceArgs {
            src: src.into(),
            dst: dst.into(),
            proto: proto.into(),
            interface: None,
            endpoint: Endpoint {
                config: None,
                url: None,
            },
        }
    }

    #[test]
    fn trace_arguments_are_checked() {
        let r = trace_request(&args("10.90.0.2:40000", "10.99.0.1:80", "udp")).unwrap();
        assert_eq!(r.proto, Proto::Udp);
        let e = trace_request(&args("10.90.0.2", "10.99.0.1:80", "tcp")).unwrap_err();
        assert!(e.to_string().contains("source \"10.90.0.2\""), "{e}");
        let e = trace_request(&args("10.90.0.2:1", "10.99.0.1:80", "icmp")).unwrap_err();
        assert!(e.to_string().contains("icmp"), "{e}");
        assert!(parse_interval("0s").is_err());
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
    }
}
