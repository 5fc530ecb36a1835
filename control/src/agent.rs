//! `headroom agent`: the per-node command executor and load transmitter
//! (paper §3.1). The executor answers only SigV4-signed requests of one
//! allowed principal (the container-manager) that also holds a grant on the
//! service `agent`, and runs only the registered templates of a service with
//! type-checked parameters. See docs/AGENT.md.

pub mod api;
pub mod executor;
pub mod logs;
pub mod node_load;
pub mod publish;
pub mod supervise;
pub mod transmit;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, info_span, Instrument};

use crate::keysync::{KeySync, KeySyncConfig};
use crate::sigv4::VerifyPolicy;

/// SigV4 service name (credential scope and grants) of every agent.
pub const AGENT_SERVICE: &str = "agent";

/// Path of the instances collection.
pub const INSTANCES_PATH: &str = "/v1/instances";

/// Parse `500ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 2m"))?;
    let ms = n.checked_mul(mult_ms).ok_or("duration too large")?;
    if ms == 0 {
        return Err("duration must be > 0".into());
    }
    Ok(Duration::from_millis(ms))
}

/// `headroom agent …` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// This node's name (as registered with the machine-manager).
    #[arg(long)]
    pub node: String,
    /// Address of the executor API.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Redis: permission DB, service registry, instance table.
    #[arg(long, env = "HEADROOM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// The only principal whose requests are executed.
    #[arg(long, default_value = "container-manager")]
    pub principal_allowed: String,
    /// Machine-manager base URL for node reports (none: no reports).
    #[arg(long)]
    pub machine_manager: Option<String>,
    /// Access key id of principal `node:<node>` for signing node reports.
    #[arg(long, env = "HEADROOM_AGENT_ACCESS_KEY_ID")]
    pub access_key_id: Option<String>,
    /// Its secret.
    #[arg(long, env = "HEADROOM_AGENT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Time between node reports.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Directory for the instance table, logs and key snapshot; its
    /// filesystem is the reported disk.
    #[arg(long, default_value = "/var/lib/headroom/agent")]
    pub state_dir: PathBuf,
    /// SigV4 region.
    #[arg(long, default_value = "headroom")]
    pub region: String,
    /// Accepted clock skew of x-amz-date, seconds.
    #[arg(long, default_value_t = 300)]
    pub max_skew_secs: i64,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// An instance's log (`STATE_DIR/logs/ID.log`) larger than this is
    /// moved to `ID.log.1` and emptied (checked every 10 s).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_log_bytes: u64,
    /// Key-sync stream block time, ms.
    #[arg(long, default_value_t = 2000, hide = true)]
    pub sync_block_ms: u64,
}

impl AgentArgs {
    /// Defaults for tests and embedding.
    pub fn new(node: &str, listen: SocketAddr, redis: &str, state_dir: PathBuf) -> Self {
        AgentArgs {
            node: node.into(),
            listen,
            redis: redis.into(),
            principal_allowed: "container-manager".into(),
            machine_manager: None,
            access_key_id: None,
            secret: None,
            interval: Duration::from_secs(5),
            state_dir,
            region: "headroom".into(),
            max_skew_secs: 300,
            max_body_bytes: 64 * 1024,
            max_log_bytes: 16 * 1024 * 1024,
            sync_block_ms: 2000,
        }
    }
}

/// A running agent.
pub struct AgentHandle {
    /// Where the API listens.
    pub local_addr: SocketAddr,
    /// Its key cache.
    pub keysync: KeySync,
    /// Its instance table.
    pub supervisor: Arc<supervise::Supervisor>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl AgentHandle {
    /// Stop serving and reporting. Started instances keep running; the next
    /// agent on this state dir re-adopts them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.supervisor.close();
        for t in self.tasks {
            t.abort();
        }
        self.keysync.stop().await;
    }
}

/// Start the agent's API, publisher and (if configured) transmitter.
pub async fn start_agent(args: AgentArgs) -> anyhow::Result<AgentHandle> {
    if !crate::keystore::valid_name(&args.node) {
        anyhow::bail!("--node: {:?} must match [A-Za-z0-9._-]{{1,64}}", args.node);
    }
    let transmit_cfg = match &args.machine_manager {
        None => None,
        Some(url) => {
            let uri: hyper::Uri = url
                .parse()
                .with_context(|| format!("--machine-manager: {url:?} is not a URL"))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                anyhow::bail!("--machine-manager: {url:?} must be http://host:port");
            }
            let (Some(akid), Some(secret)) = (args.access_key_id.clone(), args.secret.clone())
            else {
                anyhow::bail!(
                    "--machine-manager needs --access-key-id and --secret (of principal node:{})",
                    args.node
                );
            };
            Some(transmit::TransmitConfig {
                node: args.node.clone(),
                url: uri,
                access_key_id: akid,
                secret,
                region: args.region.clone(),
                interval: args.interval,
                disk_dir: args.state_dir.clone(),
            })
        }
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    let supervisor = supervise::Supervisor::open(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let local_addr = listener.local_addr()?;
    let mut kcfg = KeySyncConfig::new(&args.redis, AGENT_SERVICE);
    kcfg.snapshot_path = Some(args.state_dir.join("keys-agent.json"));
    kcfg.block = Duration::from_millis(args.sync_block_ms.max(10));
    let keysync = KeySync::start(kcfg).await;
    let policy = VerifyPolicy {
        service: AGENT_SERVICE.into(),
        region: args.region.clone(),
        max_skew_secs: args.max_skew_secs,
    };
    let ctx = Arc::new(api::Ctx::new(
        crate::gate::Gate::new(keysync.state.clone(), policy, args.max_body_bytes),
        args.principal_allowed.clone(),
        args.redis.clone(),
        supervisor.clone(),
    ));
    let (stop, stop_rx) = watch::channel(false);
    let span = info_span!("agent", node = %args.node);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(
        crate::shim::serve_with(listener, stop_rx.clone(), move |req| {
            let ctx = ctx.clone();
            async move { api::handle(ctx, req).await }
        })
        .instrument(span.clone()),
    ));
    tasks.push(tokio::spawn(
        publish::run(
            args.redis.clone(),
            args.node.clone(),
            supervisor.clone(),
            stop_rx.clone(),
        )
        .instrument(span.clone()),
    ));
    let sup = supervisor.clone();
    tasks.push(tokio::spawn(
        logs::run(
            args.state_dir.join("logs"),
            args.max_log_bytes,
            move || sup.ids(),
            stop_rx.clone(),
        )
        .instrument(span.clone()),
    ));
    if let Some(cfg) = transmit_cfg {
        tasks.push(tokio::spawn(
            transmit::run(cfg, stop_rx.clone()).instrument(span.clone()),
        ));
    }
    span.in_scope(|| info!(%local_addr, "agent listening"));
    Ok(AgentHandle {
        local_addr,
        keysync,
        supervisor,
        stop,
        tasks,
    })
}

/// `headroom agent …`: run until SIGINT/SIGTERM.
pub async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let h = start_agent(args).await?;
    crate::wait_for_shutdown_signal().await;
    h.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
