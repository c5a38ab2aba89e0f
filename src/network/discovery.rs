//! Choosing the node's compute and management addresses (pure; the links
//! come from [`super::netlink::Netlink::links`]).
//!
//! Steps (docs/networking.md, "Compute and management network"):
//! 1. keep only "physical" links: a real NIC (no kind), `bond`, `vlan`,
//!    `macvlan`, or a `bridge` not named `docker*`/`virbr*`; never loopback;
//! 2. drop links without IPv4 addresses;
//! 3. for each address of each kept link, in order, append (address, link)
//!    to the management list for every management CIDR holding it, and to
//!    the compute list for every compute CIDR holding it; an empty CIDR list
//!    accepts every address (only when exactly one link survived step 2);
//! 4. an empty management or compute list is an error.
//!
//! Compute entry 0 is the node's tunnel address (`agent_ip`) and the lower
//! device of CNCI macvtaps.

use std::net::Ipv4Addr;

use super::NetError;
use super::names::Cidr;
use super::netlink::Link;

/// One usable address and the link that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub ip: Ipv4Addr,
    pub link_name: String,
    pub link_index: u32,
    /// `aa:bb:…` of the link.
    pub mac: String,
}

/// The outcome of discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddresses {
    pub compute: Vec<NodeAddress>,
    pub management: Vec<NodeAddress>,
}

/// Step 1: whether a link may carry the node's addresses.
pub fn is_physical(link: &Link) -> bool {
    if link.is_loopback {
        return false;
    }
    match link.kind.as_deref() {
        None | Some("") | Some("device") | Some("bond") | Some("vlan") | Some("macvlan") => true,
        Some("bridge") => !link.name.starts_with("docker") && !link.name.starts_with("virbr"),
        Some(_) => false,
    }
}

/// Steps 1–4.
pub fn choose_addresses(
    links: &[Link],
    compute_nets: &[Cidr],
    mgmt_nets: &[Cidr],
) -> Result<NodeAddresses, NetError> {
    let candidates: Vec<&Link> = links
        .iter()
        .filter(|l| is_physical(l) && !l.ipv4.is_empty())
        .collect();
    if (compute_nets.is_empty() || mgmt_nets.is_empty()) && candidates.len() > 1 {
        return Err(NetError::Config(format!(
            "unable to autoconfigure network: no {} network given and {} candidate links ({})",
            if compute_nets.is_empty() {
                "compute"
            } else {
                "management"
            },
            candidates.len(),
            candidates
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut out = NodeAddresses {
        compute: Vec::new(),
        management: Vec::new(),
    };
    for link in candidates {
        for (ip, _) in &link.ipv4 {
            let entry = || NodeAddress {
                ip: *ip,
                link_name: link.name.clone(),
                link_index: link.index,
                mac: link.mac.clone(),
            };
            let matching = |nets: &[Cidr]| {
                if nets.is_empty() {
                    1
                } else {
                    nets.iter().filter(|n| n.contains(*ip)).count()
                }
            };
            for _ in 0..matching(mgmt_nets) {
                out.management.push(entry());
            }
            for _ in 0..matching(compute_nets) {
                out.compute.push(entry());
            }
        }
    }
    if out.management.is_empty() {
        return Err(NetError::Config(
            "unable to associate with management network".into(),
        ));
    }
    if out.compute.is_empty() {
        return Err(NetError::Config(
            "unable to associate with compute network".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<&str>, ips: &[&str]) -> Link {
        Link {
            index,
            name: name.into(),
            kind: kind.map(str::to_string),
            mac: format!("52:54:00:00:00:{index:02x}"),
            ipv4: ips.iter().map(|s| (s.parse().expect("ip"), 24)).collect(),
            ..Link::default()
        }
    }

    fn cidrs(v: &[&str]) -> Vec<Cidr> {
        v.iter().map(|s| Cidr::parse(s).expect("cidr")).collect()
    }

    #[test]
    fn physical_links() {
        let mut lo = link(1, "lo", None, &["127.0.0.1"]);
        lo.is_loopback = true;
        assert!(!is_physical(&lo));
        for (kind, ok) in [
            (None, true),
            (Some("bond"), true),
            (Some("vlan"), true),
            (Some("macvlan"), true),
            (Some("bridge"), true),
            (Some("veth"), false),
            (Some("dummy"), false),
            (Some("tun"), false),
            (Some("gretap"), false),
            (Some("macvtap"), false),
        ] {
            assert_eq!(is_physical(&link(2, "x0", kind, &[])), ok, "{kind:?}");
        }
        assert!(!is_physical(&link(3, "docker0", Some("bridge"), &[])));
        assert!(!is_physical(&link(3, "virbr0", Some("bridge"), &[])));
    }

    #[test]
    fn choice_by_cidr_in_address_order() {
        let links = vec![
            link(2, "eth0", None, &["10.0.0.11", "192.168.1.10"]),
            link(3, "eth1", None, &["10.1.0.5"]),
            link(4, "veth9", Some("veth"), &["10.0.0.99"]),
        ];
        let got = choose_addresses(
            &links,
            &cidrs(&["10.0.0.0/24"]),
            &cidrs(&["192.168.1.0/24", "10.1.0.0/16"]),
        )
        .expect("ok");
        assert_eq!(got.compute.len(), 1);
        assert_eq!(got.compute[0].ip, Ipv4Addr::new(10, 0, 0, 11));
        assert_eq!(got.compute[0].link_name, "eth0");
        let mgmt: Vec<_> = got.management.iter().map(|a| a.ip.to_string()).collect();
        assert_eq!(mgmt, ["192.168.1.10", "10.1.0.5"]);
        // Overlapping CIDRs list an address once per CIDR (as ciao does).
        let got = choose_addresses(
            &links,
            &cidrs(&["10.0.0.0/24", "10.0.0.0/8"]),
            &cidrs(&["10.0.0.0/8"]),
        )
        .expect("ok");
        let comp: Vec<_> = got.compute.iter().map(|a| a.ip.to_string()).collect();
        assert_eq!(comp, ["10.0.0.11", "10.0.0.11", "10.1.0.5"]);
    }

    #[test]
    fn errors_and_autoconfiguration() {
        let two = vec![
            link(2, "eth0", None, &["10.0.0.11"]),
            link(3, "eth1", None, &["10.1.0.5"]),
        ];
        let e = choose_addresses(&two, &cidrs(&["10.2.0.0/16"]), &cidrs(&["10.0.0.0/24"]))
            .expect_err("no compute");
        assert!(
            e.to_string()
                .contains("unable to associate with compute network"),
            "{e}"
        );
        let e = choose_addresses(&two, &cidrs(&["10.0.0.0/24"]), &cidrs(&["10.9.0.0/24"]))
            .expect_err("no mgmt");
        assert!(
            e.to_string()
                .contains("unable to associate with management network"),
            "{e}"
        );
        let e = choose_addresses(&two, &[], &cidrs(&["10.0.0.0/24"])).expect_err("auto");
        assert!(
            e.to_string().contains("unable to autoconfigure network"),
            "{e}"
        );
        // One candidate: every address is both.
        let one = vec![
            link(2, "eth0", None, &["10.0.0.11", "10.0.0.12"]),
            link(3, "veth0", Some("veth"), &["10.3.0.1"]),
            link(4, "eth1", None, &[]),
        ];
        let got = choose_addresses(&one, &[], &[]).expect("auto ok");
        assert_eq!(got.compute.len(), 2);
        assert_eq!(got.management, got.compute);
        assert!(choose_addresses(&[], &[], &[]).is_err());
    }
}
