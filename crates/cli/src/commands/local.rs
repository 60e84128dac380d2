//! What needs no agent: the PKI, shell completions, the man page.

use anyhow::{Context, Result};

use crate::args::{Cli, PkiCommand};

/// `pki init`, `pki issue` and `pki revoke`.
pub fn pki(command: PkiCommand) -> Result<String> {
    match command {
        PkiCommand::Init { dir } => {
            tls::pki::init(&dir)
                .with_context(|| format!("cannot create a CA in {}", dir.display()))?;
            Ok(format!(
                "CA created in {} (keep ca-key.pem private; ca.pem goes to every host)\n",
                dir.display()
            ))
        }
        PkiCommand::Issue {
            dir,
            name,
            role,
            hosts,
        } => {
            let out = tls::pki::issue(&dir, &name, role, &hosts)
                .with_context(|| format!("cannot issue a certificate for {name}"))?;
            Ok(format!(
                "Certificate for {name} (role {role}) in {}: use it as --tls-dir\n",
                out.display()
            ))
        }
        PkiCommand::Etcd { dir, hosts, name } => {
            let out = tls::pki::issue(&dir, &name, protocol::Role::Agent, &hosts)
                .with_context(|| format!("cannot issue etcd's certificate {name}"))?;
            Ok(etcd_options(&dir, &out, &hosts))
        }
        PkiCommand::Revoke { dir, name } => {
            let crl = tls::pki::revoke(&dir, &name)
                .with_context(|| format!("cannot revoke the certificate of {name}"))?;
            Ok(format!(
                "Certificate of {name} revoked; copy {} into every host's TLS directory as \
                 crl.pem\n",
                crl.display()
            ))
        }
    }
}

/// What etcd takes to serve a cluster with the certificate in `cert_dir`.
fn etcd_options(pki: &std::path::Path, cert_dir: &std::path::Path, hosts: &[String]) -> String {
    let url = |host: &String| {
        if host.contains(':') {
            format!("https://[{host}]:2379")
        } else {
            format!("https://{host}:2379")
        }
    };
    let urls: Vec<String> = hosts.iter().map(url).collect();
    format!(
        "etcd's certificate is in {dir}; start etcd with:\n  --cert-file {dir}/cert.pem \\\n  \
         --key-file {dir}/key.pem \\\n  --trusted-ca-file {ca} \\\n  --client-cert-auth \\\n  \
         --listen-client-urls {urls} \\\n  --advertise-client-urls {urls}\nand give agents and \
         clients --cluster {urls}\n",
        dir = cert_dir.display(),
        ca = pki.join("ca.pem").display(),
        urls = urls.join(","),
    )
}

/// `completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> Result<String> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "livemig", &mut out);
    Ok(String::from_utf8(out)?)
}

/// `man`: the manual page, roff.
pub fn man() -> Result<String> {
    let command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(command).render(&mut out)?;
    Ok(String::from_utf8(out)?)
}
