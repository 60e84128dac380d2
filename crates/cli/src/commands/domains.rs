//! Domains: define, undefine, start, stop, pause, list and show.

use std::path::Path;

use anyhow::{Context, Result};
use domain::DomainDefinition;
use protocol::call;
use protocol::domain::{DefinitionDoc, DomainInfo};
use protocol::Client;

use super::json;
use crate::agent::{call, domain};
use crate::output;

/// `define FILE` (already read and validated).
pub async fn define(client: &Client, definition: DomainDefinition, file: &Path) -> Result<String> {
    let name = definition.name.clone();
    let definition = DefinitionDoc(definition.to_document());
    call(client, call::Define { definition }).await?;
    Ok(format!("Domain '{name}' defined from {}\n", file.display()))
}

/// `undefine`.
pub async fn undefine(client: &Client, name: &str) -> Result<String> {
    call(
        client,
        call::Undefine {
            domain: domain(name)?,
        },
    )
    .await?;
    Ok(format!("Domain '{name}' has been undefined\n"))
}

/// `start [--paused]`.
pub async fn start(client: &Client, name: &str, paused: bool) -> Result<String> {
    let domain = domain(name)?;
    call(client, call::Start { domain, paused }).await?;
    Ok(format!("Domain '{name}' started\n"))
}

/// `destroy`.
pub async fn destroy(client: &Client, name: &str) -> Result<String> {
    call(
        client,
        call::Destroy {
            domain: domain(name)?,
        },
    )
    .await?;
    Ok(format!("Domain '{name}' destroyed\n"))
}

/// `suspend`.
pub async fn suspend(client: &Client, name: &str) -> Result<String> {
    call(
        client,
        call::Suspend {
            domain: domain(name)?,
        },
    )
    .await?;
    Ok(format!("Domain '{name}' suspended\n"))
}

/// `resume`.
pub async fn resume(client: &Client, name: &str) -> Result<String> {
    call(
        client,
        call::Resume {
            domain: domain(name)?,
        },
    )
    .await?;
    Ok(format!("Domain '{name}' resumed\n"))
}

/// `list [--all]`.
pub async fn list(client: &Client, all: bool, as_json: bool) -> Result<String> {
    let domains = call(client, call::List { all }).await?;
    if as_json {
        json(&domains)
    } else {
        Ok(output::domain_list(&domains))
    }
}

/// `dumpdef`: the definition as the agent holds it, as a file `define`
/// takes back.
pub async fn dumpdef(client: &Client, name: &str) -> Result<String> {
    let doc = call(
        client,
        call::DumpDef {
            domain: domain(name)?,
        },
    )
    .await?;
    let definition = DomainDefinition::from_document(doc.0)
        .context("the agent sent a definition that does not validate")?;
    Ok(definition.to_toml())
}

/// One domain's `dominfo`.
pub async fn info(client: &Client, name: &str) -> Result<DomainInfo> {
    call(
        client,
        call::DomInfo {
            domain: domain(name)?,
        },
    )
    .await
}

/// `dominfo`.
pub async fn dominfo(client: &Client, name: &str, as_json: bool) -> Result<String> {
    let info = info(client, name).await?;
    if as_json {
        json(&info)
    } else {
        Ok(output::domain_info(&info))
    }
}

/// `domstate`.
pub async fn domstate(client: &Client, name: &str, as_json: bool) -> Result<String> {
    let info = info(client, name).await?;
    if as_json {
        json(&serde_json::json!({"domain": info.name, "state": info.state}))
    } else {
        Ok(format!("{}\n", info.state))
    }
}

/// `domcapabilities`.
pub async fn domcapabilities(client: &Client, as_json: bool) -> Result<String> {
    let caps = call(client, call::DomCapabilities {}).await?;
    if as_json {
        json(&caps)
    } else {
        Ok(output::capabilities(&caps))
    }
}
