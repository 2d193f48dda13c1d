//! Certificates for tests: a CA, a certificate for 127.0.0.1 and localhost that serves and
//! dials, and a second CA that signed nothing the first trusts.

use std::path::{Path, PathBuf};

/// PEM files written by [`write_certs`].
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A CA unrelated to `ca`, and a certificate and key it signed.
    pub other_ca: PathBuf,
    pub other_cert: PathBuf,
    pub other_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let pem = p.self_signed(&key).expect("CA").pem();
    (p, key, pem)
}

fn leaf(ca: &(rcgen::CertificateParams, rcgen::KeyPair, String)) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("params");
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let issuer = rcgen::Issuer::from_params(&ca.0, &ca.1);
    let cert = p.signed_by(&key, &issuer).expect("leaf");
    (cert.pem(), key.serialize_pem())
}

/// Writes a fresh set of test certificates into `dir`.
pub fn write_certs(dir: &Path) -> CertFiles {
    let a = ca("ringbolt");
    let b = ca("other");
    let (cert, key) = leaf(&a);
    let (other_cert, other_key) = leaf(&b);
    let f = CertFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        other_ca: dir.join("other-ca.pem"),
        other_cert: dir.join("other-cert.pem"),
        other_key: dir.join("other-key.pem"),
    };
    for (p, s) in [
        (&f.ca, &a.2),
        (&f.cert, &cert),
        (&f.key, &key),
        (&f.other_ca, &b.2),
        (&f.other_cert, &other_cert),
        (&f.other_key, &other_key),
    ] {
        std::fs::write(p, s).expect("writing a test certificate");
    }
    f
}
