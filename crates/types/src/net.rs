//! `HOST:PORT`, as agent URIs (`tcp://HOST:PORT`) and QEMU's migration URIs
//! (`tcp:HOST:PORT`) both write it.

/// Splits `HOST:PORT` (the host may be a bracketed IPv6 address) and
/// checks the host; the port stays text, for the caller's own rules.
///
/// # Errors
/// What is wrong, for the caller's error message.
pub fn split_host_port(text: &str) -> Result<(&str, &str), &'static str> {
    let (host, port) = text.rsplit_once(':').ok_or("no port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("no host");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
    {
        return Err("the host has characters a host name cannot have");
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_names_addresses_and_bracketed_ipv6() {
        assert_eq!(split_host_port("h.example:7000"), Ok(("h.example", "7000")));
        assert_eq!(split_host_port("[::1]:7000"), Ok(("::1", "7000")));
        assert!(split_host_port("nohost").is_err());
        assert!(split_host_port(":1").is_err());
        assert!(split_host_port("a,b:1").is_err());
    }
}
