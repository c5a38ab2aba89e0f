//! The pure parts of tenant networking: device names, aliases (and reading
//! them back), the subnet key, and the identity of a tenant subnet on a node.
//!
//! The kernel is our only database: every device we make carries an
//! interface alias that says what it is, so a restarted launcher re-learns
//! the topology by reading aliases (docs/networking.md, "Names and aliases").

use std::fmt;
use std::net::Ipv4Addr;

use super::NetError;

/// The kinds of device we create, with their name prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceRole {
    /// Tenant bridge, one per tenant subnet on the node: `sbr_`.
    Bridge,
    /// Tunnel to the concentrator: `sgt_`.
    Tunnel,
    /// Tenant VNIC (tap of a VM, host end of a container veth): `svn_`.
    Vnic,
    /// Container end of a container veth: `svp_`.
    VnicPeer,
    /// CNCI VNIC (macvtap) on a network node: `svc_`.
    CnciVnic,
}

impl DeviceRole {
    /// The name prefix, underscore included.
    pub fn prefix(self) -> &'static str {
        match self {
            DeviceRole::Bridge => "sbr_",
            DeviceRole::Tunnel => "sgt_",
            DeviceRole::Vnic => "svn_",
            DeviceRole::VnicPeer => "svp_",
            DeviceRole::CnciVnic => "svc_",
        }
    }
}

/// A device name: prefix + a 32-bit number in lower-case hex without
/// leading zeros. At most 12 bytes, under the kernel's 15.
pub fn device_name(role: DeviceRole, n: u32) -> String {
    format!("{}{n:x}", role.prefix())
}

/// Whether `name` has the shape of one of our names for `role`.
pub fn is_device_name(role: DeviceRole, name: &str) -> bool {
    name.strip_prefix(role.prefix()).is_some_and(|hex| {
        !hex.is_empty()
            && hex.len() <= 8
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The subnet key: the four bytes of the network address read as a
/// little-endian u32 (192.168.8.0 → 567488). The concentrator recomputes it
/// and misbehaves on a mismatch, so this is the only formula used.
pub fn subnet_key(network: Ipv4Addr) -> u32 {
    u32::from_le_bytes(network.octets())
}

/// An IPv4 CIDR as parsed from a START or a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` (n 0..=32). Anything else is invalid data.
    pub fn parse(s: &str) -> Result<Cidr, NetError> {
        let bad = || NetError::InvalidData(format!("invalid subnet {s:?}: not an IPv4 CIDR"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The gateway ciao uses for a tenant subnet: network + 1.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.addr) & self.mask()).wrapping_add(1))
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses a MAC `aa:bb:cc:dd:ee:ff` (either case). Invalid data otherwise.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::InvalidData(format!("invalid mac address {s:?}"));
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let p = parts.next().ok_or_else(bad)?;
        // from_str_radix alone would take a sign ("+2").
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

/// Formats a MAC the way the kernel and Go print it (lower case).
pub fn format_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses an IPv4 address given by a peer; `what` names it in the error.
pub fn parse_ip(s: &str, what: &str) -> Result<Ipv4Addr, NetError> {
    s.parse()
        .map_err(|_| NetError::InvalidData(format!("invalid {what} {s:?}: not an IPv4 address")))
}

/// A tenant subnet as seen by one node: (tenant, subnet string as received,
/// concentrator uuid, concentrator ip). One bridge and one tunnel each.
/// The subnet is compared as a string, like ciao: two spellings of one
/// network are two bridges here (but the same key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetId {
    pub tenant: String,
    pub subnet: String,
    pub concentrator_uuid: String,
    /// Canonical dotted form.
    pub concentrator_ip: String,
}

impl SubnetId {
    fn tuple(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.tenant, self.subnet, self.concentrator_uuid, self.concentrator_ip
        )
    }

    /// Alias of the subnet's bridge: `br_T_S_C_I`.
    pub fn bridge_alias(&self) -> String {
        format!("{BRIDGE_ALIAS}{}", self.tuple())
    }

    /// Alias of the subnet's tunnel: `gre_T_S_C_I`.
    pub fn tunnel_alias(&self) -> String {
        format!("{TUNNEL_ALIAS}{}", self.tuple())
    }

    /// Alias of a tenant VNIC with private IP `vnic_ip`: `vnic_T_S_C_I##V`.
    pub fn vnic_alias(&self, vnic_ip: Ipv4Addr) -> String {
        format!("{VNIC_ALIAS}{}##{vnic_ip}", self.tuple())
    }
}

pub const BRIDGE_ALIAS: &str = "br_";
pub const TUNNEL_ALIAS: &str = "gre_";
pub const VNIC_ALIAS: &str = "vnic_";
pub const CNCI_VNIC_ALIAS: &str = "cncivnic_";

/// Alias of a CNCI VNIC: `cncivnic_T_<vnic uuid>`.
pub fn cnci_vnic_alias(tenant: &str, vnic_uuid: &str) -> String {
    format!("{CNCI_VNIC_ALIAS}{tenant}_{vnic_uuid}")
}

/// What an alias of ours says, read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedAlias {
    Bridge(SubnetId),
    Tunnel(SubnetId),
    Vnic(SubnetId, Ipv4Addr),
    /// The tenant and vnic uuid cannot be told apart in general (both may
    /// hold `_`); the whole alias identifies the device.
    CnciVnic,
}

/// Splits `T_S_C_I` back. The subnet holds `/` and no `_`, the concentrator
/// ip no `_`; the tenant and concentrator uuids are the parts between, so
/// we cut from the right: I, then C (a uuid has no `_`), then S, rest = T.
fn parse_tuple(t: &str) -> Option<SubnetId> {
    let mut it = t.rsplitn(4, '_');
    let ip = it.next()?;
    let conc = it.next()?;
    let subnet = it.next()?;
    let tenant = it.next()?;
    if ip.parse::<Ipv4Addr>().is_err() || !subnet.contains('/') {
        return None;
    }
    Some(SubnetId {
        tenant: tenant.to_string(),
        subnet: subnet.to_string(),
        concentrator_uuid: conc.to_string(),
        concentrator_ip: ip.to_string(),
    })
}

/// Reads an alias back; `None` for anything that is not one of ours.
pub fn parse_alias(alias: &str) -> Option<ParsedAlias> {
    if let Some(rest) = alias.strip_prefix(VNIC_ALIAS) {
        let (tuple, ip) = rest.rsplit_once("##")?;
        return Some(ParsedAlias::Vnic(parse_tuple(tuple)?, ip.parse().ok()?));
    }
    if let Some(rest) = alias.strip_prefix(BRIDGE_ALIAS) {
        return parse_tuple(rest).map(ParsedAlias::Bridge);
    }
    if let Some(rest) = alias.strip_prefix(TUNNEL_ALIAS) {
        return parse_tuple(rest).map(ParsedAlias::Tunnel);
    }
    if alias
        .strip_prefix(CNCI_VNIC_ALIAS)
        .is_some_and(|r| r.contains('_'))
    {
        return Some(ParsedAlias::CnciVnic);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "67d86208-0000-4465-9018-fe14087d415f";
    const C: &str = "67d86208-b46c-4465-0000-fe14087d415f";

    fn sid() -> SubnetId {
        SubnetId {
            tenant: T.into(),
            subnet: "192.168.8.0/21".into(),
            concentrator_uuid: C.into(),
            concentrator_ip: "192.168.42.21".into(),
        }
    }

    #[test]
    fn subnet_keys_of_the_spec() {
        assert_eq!(subnet_key(Ipv4Addr::new(192, 168, 8, 0)), 567488);
        assert_eq!(subnet_key(Ipv4Addr::new(192, 168, 8, 0)), 0x0008_A8C0);
        assert_eq!(subnet_key(Ipv4Addr::new(192, 168, 16, 0)), 1091776);
        assert_eq!(subnet_key(Ipv4Addr::new(0, 0, 0, 0)), 0);
        assert_eq!(subnet_key(Ipv4Addr::new(1, 0, 0, 0)), 1);
        assert_eq!(subnet_key(Ipv4Addr::new(0, 0, 0, 1)), 1 << 24);
        // The key of a non-network spelling is that of its network.
        let c = Cidr::parse("192.168.8.5/21").expect("cidr");
        assert_eq!(subnet_key(c.network()), 567488);
    }

    #[test]
    fn names_fit_the_kernel_limit() {
        for role in [
            DeviceRole::Bridge,
            DeviceRole::Tunnel,
            DeviceRole::Vnic,
            DeviceRole::VnicPeer,
            DeviceRole::CnciVnic,
        ] {
            for n in [0, 1, 0xabc, u32::MAX] {
                let name = device_name(role, n);
                assert!(name.len() <= 15, "{name}");
                assert!(is_device_name(role, &name), "{name}");
            }
        }
        assert_eq!(device_name(DeviceRole::Bridge, 0x1f2e3d), "sbr_1f2e3d");
        assert_eq!(device_name(DeviceRole::Tunnel, u32::MAX), "sgt_ffffffff");
        assert!(!is_device_name(DeviceRole::Vnic, "svn_"));
        assert!(!is_device_name(DeviceRole::Vnic, "svnx"));
        assert!(!is_device_name(DeviceRole::Vnic, "svn_ABC"));
        assert!(!is_device_name(DeviceRole::Vnic, "svn_123456789"));
    }

    #[test]
    fn aliases_of_the_spec_and_back() {
        let s = sid();
        assert_eq!(
            s.bridge_alias(),
            "br_67d86208-0000-4465-9018-fe14087d415f_192.168.8.0/21_67d86208-b46c-4465-0000-fe14087d415f_192.168.42.21"
        );
        assert_eq!(
            s.tunnel_alias(),
            s.bridge_alias().replacen("br_", "gre_", 1)
        );
        let v = s.vnic_alias(Ipv4Addr::new(192, 168, 8, 2));
        assert_eq!(
            v,
            format!(
                "{}##192.168.8.2",
                s.bridge_alias().replacen("br_", "vnic_", 1)
            )
        );
        assert!(v.len() <= 255);
        assert_eq!(
            parse_alias(&s.bridge_alias()),
            Some(ParsedAlias::Bridge(s.clone()))
        );
        assert_eq!(
            parse_alias(&s.tunnel_alias()),
            Some(ParsedAlias::Tunnel(s.clone()))
        );
        assert_eq!(
            parse_alias(&v),
            Some(ParsedAlias::Vnic(s.clone(), Ipv4Addr::new(192, 168, 8, 2)))
        );
        // A tenant id with underscores still reads back.
        let odd = SubnetId {
            tenant: "a_b".into(),
            ..s
        };
        assert_eq!(
            parse_alias(&odd.bridge_alias()),
            Some(ParsedAlias::Bridge(odd))
        );
        assert_eq!(
            parse_alias(&cnci_vnic_alias(T, "vu")),
            Some(ParsedAlias::CnciVnic)
        );
        for foreign in [
            "",
            "br_",
            "my uplink",
            "br_x_y",
            "vnic_a_1.2.3.0/24_c_1.2.3.4",
            "gre_a_b_c_d",
        ] {
            assert_eq!(parse_alias(foreign), None, "{foreign:?}");
        }
    }

    #[test]
    fn cidr_mac_ip_parsing() {
        let c = Cidr::parse("192.168.8.0/21").expect("cidr");
        assert_eq!(c.network(), Ipv4Addr::new(192, 168, 8, 0));
        assert_eq!(c.gateway(), Ipv4Addr::new(192, 168, 8, 1));
        assert!(c.contains(Ipv4Addr::new(192, 168, 15, 255)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 16, 0)));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("all")
                .contains(Ipv4Addr::new(9, 9, 9, 9))
        );
        for bad in [
            "",
            "192.168.8.0",
            "192.168.8.0/33",
            "192.168.8/21",
            "x/1",
            "1.2.3.4/+1",
            "1.2.3.4/",
        ] {
            assert!(
                matches!(Cidr::parse(bad), Err(NetError::InvalidData(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_mac("02:00:C0:a8:08:02").expect("mac"),
            [2, 0, 0xc0, 0xa8, 8, 2]
        );
        assert_eq!(format_mac(&[2, 0, 0xc0, 0xa8, 8, 2]), "02:00:c0:a8:08:02");
        for bad in [
            "",
            "zz",
            "02:00:c0:a8:08",
            "02:00:c0:a8:08:02:01",
            "2:00:c0:a8:08:02",
            "02:00:c0:a8:08:0g",
            "+2:00:c0:a8:08:02",
        ] {
            assert!(
                matches!(parse_mac(bad), Err(NetError::InvalidData(_))),
                "{bad:?}"
            );
        }
        assert!(
            matches!(parse_ip("1.2.3", "private ip"), Err(NetError::InvalidData(m)) if m.contains("private ip"))
        );
    }
}
