//! The cluster commands: what the cluster's etcd holds (`hosts`, `list
//! --cluster`).

use std::path::Path;

use anyhow::{Context, Result};
use cluster::{Cluster, Endpoints, TlsFiles};

/// The cluster `--cluster` names.
async fn connect(urls: Option<&str>, insecure: bool, tls_dir: Option<&Path>) -> Result<Cluster> {
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
    if json {
        return super::json(&hosts);
    }
    let mut out = format!(
        "{:<16} {:<24} {:<8} {:>10} {:>8}  {}\n",
        "NAME", "AGENT", "QEMU", "RAM FREE", "DOMAINS", "CPU"
    );
    for h in &hosts {
        out.push_str(&format!(
            "{:<16} {:<24} {:<8} {:>6} MiB {:>8}  {}\n",
            h.name,
            h.agent_uri,
            h.qemu_version,
            h.ram_free_mib,
            h.domains.len(),
            h.cpu_model
        ));
    }
    if hosts.is_empty() {
        out.push_str("(no host is registered: start livemigd with --cluster)\n");
    }
    Ok(out)
}
