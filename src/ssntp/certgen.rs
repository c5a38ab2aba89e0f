//! Generation of ciao-style certificates (as ciao-cert makes them) with rcgen:
//! subject only `O=<org>`, EKU = anyExtendedKeyUsage plus one private OID per
//! role, no serverAuth/clientAuth, SANs only when asked for.
//!
//! Used by the tests and by the operator tool `ciao-lc certs`. Keys are ECDSA
//! P-256 (what rcgen generates with ring), written as PKCS#8.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

use super::role::Role;

/// What to put into a certificate.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Role OIDs to carry in the EKU (may be several bits, or none).
    pub role: Role,
    /// The subject's only attribute, `O=<org>`.
    pub org: String,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// `CA:TRUE` (with keyCertSign) when issuing; [`self_signed_ca`] always is.
    pub is_ca: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertSpec {
    /// Organisation "ciao", no SANs, not a CA, valid from an hour ago (slack
    /// for clock skew between nodes) for one year.
    pub fn new(role: Role) -> Self {
        let now = SystemTime::now();
        CertSpec {
            role,
            org: "ciao".to_string(),
            dns: Vec::new(),
            ips: Vec::new(),
            is_ca: false,
            not_before: now
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or(UNIX_EPOCH),
            not_after: now + Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// Certificate generation failed.
#[derive(Debug)]
pub enum CertGenError {
    /// rcgen refused the parameters or failed to sign.
    Rcgen(rcgen::Error),
    /// A validity date cannot be encoded in a certificate.
    TimeOutOfRange(&'static str),
    /// Writing an output file failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for CertGenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertGenError::Rcgen(e) => write!(f, "certificate generation failed: {e}"),
            CertGenError::TimeOutOfRange(which) => {
                write!(f, "certificate {which} date is out of range")
            }
            CertGenError::Io { path, source } => {
                write!(f, "{}: cannot write: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for CertGenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CertGenError::Rcgen(e) => Some(e),
            CertGenError::Io { source, .. } => Some(source),
            CertGenError::TimeOutOfRange(_) => None,
        }
    }
}

impl From<rcgen::Error> for CertGenError {
    fn from(e: rcgen::Error) -> Self {
        CertGenError::Rcgen(e)
    }
}

/// A generated certificate and its private key.
pub struct Issued {
    /// The certificate as one PEM CERTIFICATE block.
    pub cert_pem: String,
    /// The private key as a PKCS#8 PEM block.
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Issued {
    /// The combined file ciao expects: certificate, then key.
    pub fn combined_pem(&self) -> String {
        let mut s = String::with_capacity(self.cert_pem.len() + self.key_pem.len() + 1);
        s.push_str(&self.cert_pem);
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&self.key_pem);
        s
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<elided>")
            .finish()
    }
}

/// A CA that can sign more certificates.
pub struct Authority {
    issuer: rcgen::Issuer<'static, KeyPair>,
    org: String,
    role: Role,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("org", &self.org)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A new self-signed CA (`CA:TRUE`, regardless of `spec.is_ca`), like the
/// classic ciao scheduler certificate that doubles as trust anchor.
pub fn self_signed_ca(spec: &CertSpec) -> Result<(Authority, Issued), CertGenError> {
    let key = KeyPair::generate()?;
    let params = params_for(spec, true)?;
    let cert = params.self_signed(&key)?;
    let issued = Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    };
    let authority = Authority {
        issuer: rcgen::Issuer::new(params, key),
        org: spec.org.clone(),
        role: spec.role,
    };
    Ok((authority, issued))
}

/// A certificate for a new key, signed by `ca`.
pub fn issue(ca: &Authority, spec: &CertSpec) -> Result<Issued, CertGenError> {
    let key = KeyPair::generate()?;
    let mut params = params_for(spec, spec.is_ca)?;
    // Issuer and subject names are usually identical in ciao (both `O=org`);
    // the key identifier tells path builders which key signed.
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    })
}

fn params_for(spec: &CertSpec, is_ca: bool) -> Result<CertificateParams, CertGenError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    // rcgen's default subject has a CN; ciao subjects carry only O=.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spec.org.as_str());
    params.distinguished_name = dn;

    for name in &spec.dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.clone().try_into()?));
    }
    for ip in &spec.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }

    params.extended_key_usages = std::iter::once(ExtendedKeyUsagePurpose::Any)
        .chain(
            spec.role
                .oid_arcs()
                .into_iter()
                .map(ExtendedKeyUsagePurpose::Other),
        )
        .collect();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    } else {
        // ciao-cert writes CA:FALSE explicitly.
        params.is_ca = IsCa::ExplicitNoCa;
    }

    // rcgen wants the `time` crate's type, which this crate does not name;
    // shift rcgen's own epoch instead, with checked arithmetic so that an
    // absurd operator-supplied date is an error, not a panic. Whole seconds
    // only: X.509 times have no fractions. Dates before 1970 are refused:
    // x509-cert (which reads roles back) cannot decode such UTCTimes.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let convert = |t: SystemTime, which: &'static str| {
        t.duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| Duration::from_secs(d.as_secs()).try_into().ok())
            .and_then(|d| epoch.checked_add(d))
            .ok_or(CertGenError::TimeOutOfRange(which))
    };
    params.not_before = convert(spec.not_before, "notBefore")?;
    params.not_after = convert(spec.not_after, "notAfter")?;
    Ok(params)
}

/// Write `<stem>.pem` (certificate and key, mode 0600) and `<stem>-cert.pem`
/// (certificate only, mode 0644, e.g. the CA file) into `dir`. Existing files
/// are never overwritten. Returns both paths, combined file first.
pub fn write_pem_files(
    dir: &Path,
    stem: &str,
    issued: &Issued,
) -> Result<(PathBuf, PathBuf), CertGenError> {
    let combined = dir.join(format!("{stem}.pem"));
    let cert_only = dir.join(format!("{stem}-cert.pem"));
    write_new(&combined, issued.combined_pem().as_bytes(), 0o600)?;
    write_new(&cert_only, issued.cert_pem.as_bytes(), 0o644)?;
    Ok((combined, cert_only))
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CertGenError> {
    let io = |source| CertGenError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Mode set at creation so the key is never readable by others.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use x509_cert::Certificate;
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};

    /// anyExtendedKeyUsage, 2.5.29.37.0, DER content bytes.
    const ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

    fn parse(issued: &Issued) -> Certificate {
        Certificate::from_der(issued.der.as_ref()).expect("generated certificate parses")
    }

    fn eku(cert: &Certificate) -> Vec<Vec<u8>> {
        let (_, ExtendedKeyUsage(oids)) = cert
            .tbs_certificate()
            .get_extension::<ExtendedKeyUsage>()
            .expect("eku decodes")
            .expect("eku present");
        oids.iter().map(|o| o.as_bytes().to_vec()).collect()
    }

    #[test]
    fn ca_and_leaf_look_like_ciao_cert_output() {
        let (ca, ca_issued) = self_signed_ca(&CertSpec::new(Role::SCHEDULER)).expect("ca");
        let ca_cert = parse(&ca_issued);
        let tbs = ca_cert.tbs_certificate();
        assert_eq!(tbs.subject().to_string(), "O=ciao");
        assert_eq!(tbs.issuer(), tbs.subject());
        let (_, bc) = tbs
            .get_extension::<BasicConstraints>()
            .expect("bc decodes")
            .expect("bc present");
        assert!(bc.ca);
        let (_, ku) = tbs
            .get_extension::<KeyUsage>()
            .expect("ku decodes")
            .expect("ku present");
        assert!(ku.digital_signature() && ku.key_encipherment() && ku.key_cert_sign());
        let expected: Vec<Vec<u8>> = vec![
            ANY_EKU.to_vec(),
            Role::SCHEDULER.oids_der().next().expect("oid").to_vec(),
        ];
        assert_eq!(eku(&ca_cert), expected);

        let mut spec = CertSpec::new(Role::AGENT.union(Role::NETAGENT));
        spec.org = "Intel".to_string();
        let leaf = issue(&ca, &spec).expect("leaf");
        let leaf_cert = parse(&leaf);
        let tbs = leaf_cert.tbs_certificate();
        assert_eq!(tbs.subject().to_string(), "O=Intel");
        assert_eq!(tbs.issuer().to_string(), "O=ciao");
        let (_, bc) = tbs
            .get_extension::<BasicConstraints>()
            .expect("bc decodes")
            .expect("CA:FALSE written explicitly");
        assert!(!bc.ca);
        let (_, ku) = tbs
            .get_extension::<KeyUsage>()
            .expect("ku decodes")
            .expect("ku present");
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let mut expected = vec![ANY_EKU.to_vec()];
        expected.extend(spec.role.oids_der().map(<[u8]>::to_vec));
        assert_eq!(eku(&leaf_cert), expected);
        assert!(
            tbs.get_extension::<SubjectAltName>()
                .expect("san decodes")
                .is_none(),
            "no SANs unless asked for"
        );

        // Validity is whole seconds around the requested times.
        let nb = tbs.validity().not_before.to_system_time();
        let na = tbs.validity().not_after.to_system_time();
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        assert_eq!(secs(nb), secs(spec.not_before));
        assert_eq!(secs(na), secs(spec.not_after));

        assert!(
            leaf.combined_pem()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(
            leaf.combined_pem()
                .trim_end()
                .ends_with("-----END PRIVATE KEY-----")
        );
        assert!(format!("{ca:?}").contains("Scheduler"));
    }

    #[test]
    fn absurd_dates_are_errors() {
        let mut spec = CertSpec::new(Role::AGENT);
        spec.not_after = UNIX_EPOCH + Duration::from_secs(20_000 * 365 * 86400);
        let e = self_signed_ca(&spec).expect_err("year 21970 cannot be encoded");
        assert!(
            matches!(e, CertGenError::TimeOutOfRange("notAfter")),
            "{e:?}"
        );

        // Before 1970 cannot be read back by x509-cert, so it is refused.
        let mut spec = CertSpec::new(Role::AGENT);
        spec.not_before = UNIX_EPOCH - Duration::from_secs(86400);
        let e = issue_check(&spec);
        assert!(
            matches!(e, CertGenError::TimeOutOfRange("notBefore")),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("notBefore date is out of range"),
            "{e}"
        );
    }

    fn issue_check(spec: &CertSpec) -> CertGenError {
        self_signed_ca(spec).expect_err("date out of range")
    }

    #[test]
    fn write_pem_files_protects_the_key() {
        let dir = std::env::temp_dir().join(format!("ciao-certgen-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).expect("tmpdir");
        let (_, issued) = self_signed_ca(&CertSpec::new(Role::SCHEDULER)).expect("ca");
        let (combined, cert_only) =
            write_pem_files(&dir, "cert-Scheduler-localhost", &issued).expect("write");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&combined), 0o600);
        assert_eq!(mode(&cert_only), 0o644 & !umask_bits());
        assert_eq!(
            std::fs::read_to_string(&combined).expect("read"),
            issued.combined_pem()
        );
        assert_eq!(
            std::fs::read_to_string(&cert_only).expect("read"),
            issued.cert_pem
        );
        let e = write_pem_files(&dir, "cert-Scheduler-localhost", &issued)
            .expect_err("never overwrites");
        assert!(
            e.to_string().contains("cert-Scheduler-localhost.pem"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// The process umask, read without changing it (Linux /proc).
    fn umask_bits() -> u32 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    }
}
