//! clap types for the `headroom` binary: `keys`, `shim`, `load-receiver`.

use std::time::Duration;

use crate::keystore::{Grant, KeyStore};
pub use crate::load_receiver::LoadReceiverArgs;
pub use crate::shim::ShimArgs;

/// `headroom keys …` — manage the permission DB.
#[derive(Debug, Clone, clap::Args)]
pub struct KeysArgs {
    #[arg(long, env = "HEADROOM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    #[command(subcommand)]
    pub cmd: KeysCmd,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCmd {
    /// Create an API key for a principal; prints the access key id and the
    /// secret (shown once).
    Create {
        #[arg(long)]
        principal: String,
    },
    /// New secret for a key; the old one stays valid for the overlap.
    Rotate {
        #[arg(long)]
        access_key_id: String,
        /// Seconds the previous secret stays valid.
        #[arg(long, default_value_t = 3600)]
        overlap_secs: u64,
    },
    /// Revoke a key (its secrets are deleted).
    Revoke {
        #[arg(long)]
        access_key_id: String,
    },
    /// Allow a principal to call a service (replaces an existing grant).
    Grant {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        service: String,
        /// HTTP methods (repeat), `*` for all.
        #[arg(long = "method", default_values_t = vec!["*".to_string()])]
        methods: Vec<String>,
        /// Path prefixes (repeat), segment-aware.
        #[arg(long = "prefix", default_values_t = vec!["/".to_string()])]
        prefixes: Vec<String>,
    },
    /// Remove a principal's grant on a service.
    Ungrant {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        service: String,
    },
    /// List keys (no secrets) and grants.
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Run one `keys` command, printing its result to stdout.
pub async fn run_keys(args: KeysArgs) -> anyhow::Result<()> {
    let mut ks = KeyStore::connect(&args.redis).await?;
    match args.cmd {
        KeysCmd::Create { principal } => {
            let k = ks.create_key(&principal).await?;
            println!(
                "access_key_id={}\nsecret={}\nprincipal={}",
                k.access_key_id, k.secret, k.principal
            );
        }
        KeysCmd::Rotate {
            access_key_id,
            overlap_secs,
        } => {
            let k = ks
                .rotate_key(&access_key_id, Duration::from_secs(overlap_secs))
                .await?;
            println!(
                "access_key_id={}\nsecret={}\nprevious_valid_for_secs={overlap_secs}",
                k.access_key_id, k.secret
            );
        }
        KeysCmd::Revoke { access_key_id } => {
            ks.revoke_key(&access_key_id).await?;
            println!("revoked {access_key_id}");
        }
        KeysCmd::Grant {
            principal,
            service,
            methods,
            prefixes,
        } => {
            let g = Grant {
                methods: methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                prefixes,
            };
            ks.set_grant(&service, &principal, &g).await?;
            println!(
                "granted {principal} on {service}: methods={} prefixes={}",
                g.methods.join(","),
                g.prefixes.join(",")
            );
        }
        KeysCmd::Ungrant { principal, service } => {
            ks.remove_grant(&service, &principal).await?;
            println!("removed grant of {principal} on {service}");
        }
        KeysCmd::List { json } => {
            let l = ks.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                println!(
                    "generation {} seq {}",
                    if l.gen.is_empty() { "-" } else { &l.gen },
                    l.seq
                );
                for k in &l.keys {
                    let overlap = k
                        .rotation_overlap_until_ms
                        .map(|t| format!(" previous-secret-until-ms={t}"))
                        .unwrap_or_default();
                    println!(
                        "key {} principal={} status={}{overlap}",
                        k.access_key_id, k.principal, k.status
                    );
                }
                for (s, per) in &l.grants {
                    for (p, g) in per {
                        println!(
                            "grant {p} -> {s} methods={} prefixes={}",
                            g.methods.join(","),
                            g.prefixes.join(",")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
