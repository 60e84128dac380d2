//! The cluster commands: what the cluster's etcd holds (`hosts`, `list
//! --cluster`), cordons (`cordon`, `uncordon`) and policies (`policy`).

use std::path::Path;

use anyhow::{Context, Result};
use cluster::{Cluster, Endpoints, TlsFiles};

/// The cluster `--cluster` names.
pub(crate) async fn connect(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
) -> Result<Cluster> {
    let urls = urls.context(
        "which cluster? give --cluster https://HOST:PORT (or set LIVEMIG_CLUSTER), with \
         --tls-dir",
    )?;
    let endpoints = Endpoints::parse(urls, insecure)?;
    let tls = tls_dir.map(|dir| TlsFiles {
        dir: dir.to_path_buf(),
    });
    Cluster::connect(&endpoints, tls.as_ref())
        .await
        .with_context(|| format!("cannot reach the cluster at {endpoints}"))
}

/// `list --cluster`: every domain the cluster has running, and where.
///
/// # Errors
/// As [`hosts`].
pub async fn domains(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
    json: bool,
) -> Result<String> {
    let cluster = connect(urls, insecure, tls_dir).await?;
    let owners = cluster.owners().await?;
    if json {
        let rows: Vec<_> = owners
            .iter()
            .map(|(domain, host)| serde_json::json!({"name": domain, "host": host}))
            .collect();
        return super::json(&rows);
    }
    let mut out = format!("{:<24} {}\n", "NAME", "HOST");
    for (domain, host) in &owners {
        out.push_str(&format!("{domain:<24} {host}\n"));
    }
    Ok(out)
}

/// `hosts`: the hosts registered now.
///
/// # Errors
/// No `--cluster`, a bad endpoint, or an etcd that does not answer.
pub async fn hosts(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
    json: bool,
) -> Result<String> {
    let cluster = connect(urls, insecure, tls_dir).await?;
    let hosts = cluster.hosts().await?;
    let cordons = cluster.cordons().await?;
    if json {
        let rows: Vec<serde_json::Value> = hosts
            .iter()
            .map(|h| {
                let mut row = serde_json::to_value(h).expect("a host record serializes");
                row["cordoned"] = serde_json::to_value(cordons.get(&h.name)).unwrap_or_default();
                row
            })
            .collect();
        return super::json(&rows);
    }
    let mut out = format!(
        "{:<16} {:<24} {:<8} {:>10} {:>11} {:>8}  {:<10} {}\n",
        "NAME", "AGENT", "QEMU", "RAM FREE", "DISK FREE", "DOMAINS", "STATE", "CPU"
    );
    for h in &hosts {
        let state = if cordons.contains_key(&h.name) {
            "cordoned"
        } else {
            "ready"
        };
        out.push_str(&format!(
            "{:<16} {:<24} {:<8} {:>6} MiB {:>11} {:>8}  {:<10} {}\n",
            h.name,
            h.agent_uri,
            h.qemu_version,
            h.ram_free_mib,
            h.disk_free_mib
                .map_or_else(|| "-".to_string(), |mib| format!("{mib} MiB")),
            h.domains.len(),
            state,
            h.cpu_model
        ));
    }
    if hosts.is_empty() {
        out.push_str("(no host is registered: start livemigd with --cluster)\n");
    }
    Ok(out)
}

/// `cordon HOST`: no new guest lands on a registered host.
///
/// # Errors
/// A host the cluster does not have, or an etcd that does not answer.
pub async fn cordon(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
    host: &str,
    reason: &str,
) -> Result<String> {
    let cluster = connect(urls, insecure, tls_dir).await?;
    let hosts = cluster.hosts().await?;
    if !hosts.iter().any(|h| h.name == host) {
        let known: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        anyhow::bail!(
            "no host {host:?} in the cluster (registered: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    let at_ms = cluster::now_ms();
    cluster
        .cordon(
            host,
            &cluster::Cordon {
                reason: reason.to_string(),
                at_ms,
            },
        )
        .await?;
    Ok(format!("{host} cordoned: no new guest lands there\n"))
}

/// `uncordon HOST`.
///
/// # Errors
/// A host that is not cordoned, or an etcd that does not answer.
pub async fn uncordon(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
    host: &str,
) -> Result<String> {
    let cluster = connect(urls, insecure, tls_dir).await?;
    if !cluster.uncordon(host).await? {
        anyhow::bail!("{host} is not cordoned");
    }
    Ok(format!("{host} uncordoned\n"))
}

/// `policy set|list|rm`.
///
/// # Errors
/// A malformed or contradictory policy (refused before etcd is
/// contacted), a policy that does not exist, or an etcd that does not
/// answer.
pub async fn policy(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
    command: crate::args::PolicyCommand,
) -> Result<String> {
    use crate::args::PolicyCommand;
    match command {
        PolicyCommand::Set {
            name,
            selector,
            converge,
            max_downtime,
            max_throttle,
            allow_postcopy,
            bandwidth,
            timeout,
        } => {
            let policy = cluster::Policy {
                name: name.clone(),
                selector: cluster::policy::parse_selector(&selector)?,
                converge: converge.map(Into::into),
                max_downtime_ms: max_downtime,
                max_throttle_pct: max_throttle,
                bandwidth_mib_s: bandwidth,
                timeout_s: timeout,
                allow_postcopy,
            };
            policy.check()?;
            let cluster = connect(urls, insecure, tls_dir).await?;
            cluster.set_policy(&policy).await?;
            Ok(format!("policy {name} set\n"))
        }
        PolicyCommand::List(json) => {
            let cluster = connect(urls, insecure, tls_dir).await?;
            let policies = cluster.policies().await?;
            if json.json {
                return super::json(&policies);
            }
            let mut out = format!("{:<16} {:<24} {}\n", "NAME", "SELECTOR", "SETTINGS");
            for p in &policies {
                let selector: Vec<String> =
                    p.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let mut settings = Vec::new();
                if let Some(c) = p.converge {
                    settings.push(format!(
                        "converge {}",
                        serde_json::to_value(c)?.as_str().unwrap_or("?")
                    ));
                }
                if let Some(d) = p.max_downtime_ms {
                    settings.push(format!("max-downtime {d} ms"));
                }
                if let Some(t) = p.max_throttle_pct {
                    settings.push(format!("max-throttle {t} %"));
                }
                if p.allow_postcopy {
                    settings.push("allow-postcopy".into());
                }
                if let Some(b) = p.bandwidth_mib_s {
                    settings.push(format!("bandwidth {b} MiB/s"));
                }
                if let Some(t) = p.timeout_s {
                    settings.push(format!("timeout {t} s"));
                }
                out.push_str(&format!(
                    "{:<16} {:<24} {}\n",
                    p.name,
                    selector.join(","),
                    settings.join(", ")
                ));
            }
            Ok(out)
        }
        PolicyCommand::Rm { name } => {
            let cluster = connect(urls, insecure, tls_dir).await?;
            if !cluster.remove_policy(&name).await? {
                anyhow::bail!("no policy {name:?}");
            }
            Ok(format!("policy {name} removed\n"))
        }
    }
}
