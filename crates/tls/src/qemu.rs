//! QEMU's view of a TLS directory: `tls-creds-x509` reads fixed file names
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`) from one directory. An agent's certificate serves both
//! ends (agents are issued for server and client use), so one directory
//! written from the agent's own serves its QEMUs as migration source and as
//! destination. `dh-params.pem` holds fixed, public parameters so that a
//! QEMU does not generate them at start.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::{files, TlsError};

/// RFC 7919's `ffdhe2048` group (public, fixed parameters), as PKCS#3 PEM.
/// Without a `dh-params.pem` a QEMU serving TLS (a migration's
/// destination) generates Diffie-Hellman parameters at start: measured
/// here, 200–620 ms of QEMU's start against 22 ms with the file, and the
/// destination's start is most of the time from `migrate` to the first
/// byte. The parameters only matter for a finite-field key exchange;
/// TLS 1.3 picks an elliptic curve first.
const DH_PARAMS: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// Which QEMU file each of a TLS directory's files becomes.
const LAYOUT: [(&str, &str); 5] = [
    (files::CA, "ca-cert.pem"),
    (files::CERT, "server-cert.pem"),
    (files::KEY, "server-key.pem"),
    (files::CERT, "client-cert.pem"),
    (files::KEY, "client-key.pem"),
];

/// Writes QEMU's credentials directory `out` from the TLS directory
/// `tls_dir`, replacing what `out` held (certificates may have been
/// renewed). `out` and its files are readable by their owner only.
///
/// # Errors
/// [`TlsError::Copy`] naming the file that could not be read or written.
pub fn write_credentials(tls_dir: &Path, out: &Path) -> Result<(), TlsError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Copy { path, source }
    };
    fs::create_dir_all(out).map_err(fail(out))?;
    fs::set_permissions(out, fs::Permissions::from_mode(0o700)).map_err(fail(out))?;
    let private = |to: &Path, contents: &[u8]| {
        let _ = fs::remove_file(to);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .and_then(|mut f| f.write_all(contents))
            .map_err(fail(to))
    };
    for (from, to) in LAYOUT {
        let from = tls_dir.join(from);
        let contents = fs::read(&from).map_err(fail(&from))?;
        private(&out.join(to), &contents)?;
    }
    private(&out.join("dh-params.pem"), DH_PARAMS.as_bytes())
}

#[cfg(test)]
mod tests {
    use protocol::Role;

    use super::*;
    use crate::pki;

    #[test]
    fn every_file_qemu_reads_is_there_and_private() {
        let pki_dir = tempfile::tempdir().unwrap();
        pki::init(pki_dir.path()).unwrap();
        let agent = pki::issue(pki_dir.path(), "a", Role::Agent, &[]).unwrap();
        let out = pki_dir.path().join("qemu");
        write_credentials(&agent, &out).unwrap();
        // Twice: a restarted agent rewrites it.
        write_credentials(&agent, &out).unwrap();
        for (from, to) in LAYOUT {
            let path = out.join(to);
            assert_eq!(
                fs::read(&path).unwrap(),
                fs::read(agent.join(from)).unwrap()
            );
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(fs::read_to_string(out.join("dh-params.pem"))
            .unwrap()
            .starts_with("-----BEGIN DH PARAMETERS-----"));
        let missing = write_credentials(&pki_dir.path().join("nope"), &out).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
