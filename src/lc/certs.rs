//! `ciao-lc certs`: a CA made the way ciao makes it (the scheduler's own
//! certificate is the CA) and certificates for an agent and a netagent.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use super::{AGENT_FILE, CA_FILE, LcExit, NETAGENT_FILE, SCHEDULER_FILE};
use crate::ssntp::certgen::{self, CertSpec};
use crate::ssntp::{Role, tls};

/// The subject alternative names of the scheduler certificate. Launchers
/// that verify the scheduler's name (the 2018 profile by default, and every
/// Go launcher of ciao master) accept a scheduler only under a name or
/// address its certificate carries, so by default it names `localhost`,
/// `127.0.0.1` and this machine's host name; `--host`/`--ip` replace that
/// list; `--all-addresses` adds the machine's non-loopback addresses.
pub fn scheduler_names(
    hosts: Vec<String>,
    ips: Vec<IpAddr>,
    all_addresses: bool,
) -> (Vec<String>, Vec<IpAddr>) {
    let (mut hosts, mut ips) = if hosts.is_empty() && ips.is_empty() {
        let mut hosts = vec!["localhost".to_string()];
        match nix::unistd::gethostname().map(|h| h.into_string()) {
            Ok(Ok(h)) if usable_dns_name(&h) => hosts.push(h),
            Ok(Ok(h)) => eprintln!(
                "ciao-lc certs: host name {h:?} is not a DNS name; not written (use --host)"
            ),
            Ok(Err(h)) => eprintln!("ciao-lc certs: host name {h:?} is not UTF-8; not written"),
            Err(e) => eprintln!("ciao-lc certs: cannot read the host name: {e}"),
        }
        (hosts, vec![IpAddr::from([127, 0, 0, 1])])
    } else {
        (hosts, ips)
    };
    if all_addresses {
        ips.extend(own_addresses());
    }
    dedup(&mut hosts);
    dedup(&mut ips);
    (hosts, ips)
}

/// Removes later repetitions, keeping the first of each in place.
fn dedup<T: PartialEq + Clone>(v: &mut Vec<T>) {
    let mut seen: Vec<T> = Vec::with_capacity(v.len());
    v.retain(|x| {
        let new = !seen.contains(x);
        if new {
            seen.push(x.clone());
        }
        new
    });
}

/// What a TLS client accepts as a DNS name (no IP literals, no `_`, …).
fn usable_dns_name(name: &str) -> bool {
    name.parse::<IpAddr>().is_err()
        && matches!(
            tls::ServerName::try_from(name),
            Ok(tls::ServerName::DnsName(_))
        )
}

/// This machine's addresses, without loopback and link-local IPv6 ones.
fn own_addresses() -> Vec<IpAddr> {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ciao-lc certs: cannot list this machine's addresses: {e}");
            return Vec::new();
        }
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| {
            !ip.is_loopback()
                && !ip.is_unspecified()
                && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
        })
        .collect()
}

pub(super) fn certs(dir: &Path, org: &str, hosts: Vec<String>, ips: Vec<IpAddr>) -> LcExit {
    let result = (|| -> Result<(), String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut spec = CertSpec::new(Role::SCHEDULER);
        spec.org = org.to_string();
        spec.is_ca = true;
        let names: Vec<String> = hosts
            .iter()
            .map(|h| format!("DNS:{h}"))
            .chain(ips.iter().map(|ip| format!("IP:{ip}")))
            .collect();
        spec.dns = hosts;
        spec.ips = ips;
        let (ca, ca_cert) = certgen::self_signed_ca(&spec).map_err(|e| e.to_string())?;
        write_new(&dir.join(CA_FILE), ca_cert.cert_pem.as_bytes())?;
        write_new(&dir.join(SCHEDULER_FILE), ca_cert.combined_pem().as_bytes())?;
        for (role, file) in [(Role::AGENT, AGENT_FILE), (Role::NETAGENT, NETAGENT_FILE)] {
            let mut s = CertSpec::new(role);
            s.org = org.to_string();
            let issued = certgen::issue(&ca, &s).map_err(|e| e.to_string())?;
            write_new(&dir.join(file), issued.combined_pem().as_bytes())?;
        }
        println!(
            "wrote {CA_FILE}, {SCHEDULER_FILE}, {AGENT_FILE} and {NETAGENT_FILE} in {}",
            dir.display()
        );
        if names.is_empty() {
            println!("the scheduler certificate names no host (--no-san)");
        } else {
            println!("the scheduler certificate names {}", names.join(", "));
        }
        Ok(())
    })();
    match result {
        Ok(()) => LcExit::Ok,
        Err(e) => {
            eprintln!("ciao-lc certs: {e}");
            LcExit::Certs
        }
    }
}

fn write_new(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}
