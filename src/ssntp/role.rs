//! SSNTP roles: a bit mask carried in CONNECT/CONNECTED frames and proven by
//! private-use OIDs in the certificates' Extended Key Usage
//! (1.3.6.1.4.1.343.8.N, one per role bit).

use std::fmt;
use std::str::FromStr;

/// A set of SSNTP roles (Go `ssntp.Role`, a `uint32` bit mask).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Role(u32);

/// One role bit with its Go `String()` part, its `Set()` keyword and the DER
/// content bytes of its EKU OID (1.3.6.1.4.1.343.8.N).
struct RoleInfo {
    bit: u32,
    display: &'static str,
    keyword: &'static str,
    oid_der: &'static [u8],
}

/// In Go's `Role.String()` order.
const ROLES: [RoleInfo; 6] = [
    RoleInfo {
        bit: 0x01,
        display: "Server",
        keyword: "server",
        oid_der: &[0x2b, 6, 1, 4, 1, 0x82, 0x57, 8, 5],
    },
    RoleInfo {
        bit: 0x02,
        display: "Controller",
        keyword: "controller",
        oid_der: &[0x2b, 6, 1, 4, 1, 0x82, 0x57, 8, 3],
    },
    RoleInfo {
        bit: 0x04,
        display: "CNAgent",
        keyword: "agent",
        oid_der: &[0x2b, 6, 1, 4, 1, 0x82, 0x57, 8, 1],
    },
    RoleInfo {
        bit: 0x08,
        display: "Scheduler",
        keyword: "scheduler",
        oid_der: &[0x2b, 6, 1, 4, 1, 0x82, 0x57, 8, 2],
    },
    RoleInfo {
        bit: 0x10,
        display: "NetworkingAgent",
        keyword: "netagent",
        oid_der: &[0x2b, 6, 1, 4, 1, 0x82, 0x57, 8, 4],
    },
    RoleInfo {
        bit: 0x20,
        display: "CNCIAgent",
        keyword: "cnciagent",
        oid_der: &[0x2b, 6, 1, 4, 1, 0x82, 0x57, 8, 6],
    },
];

impl Role {
    pub const UNKNOWN: Role = Role(0);
    pub const SERVER: Role = Role(0x01);
    pub const CONTROLLER: Role = Role(0x02);
    pub const AGENT: Role = Role(0x04);
    pub const SCHEDULER: Role = Role(0x08);
    pub const NETAGENT: Role = Role(0x10);
    pub const CNCIAGENT: Role = Role(0x20);

    /// The raw bit mask as sent on the wire.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Any `u32` is accepted: unknown bits are kept (a peer may send them) but
    /// can never be proven by a certificate.
    pub const fn from_bits(bits: u32) -> Role {
        Role(bits)
    }

    pub const fn union(self, other: Role) -> Role {
        Role(self.0 | other.0)
    }

    /// Go's `HasRole`: every bit of `other` is set in `self`.
    pub const fn contains(self, other: Role) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if any bit of `other` is set in `self`.
    pub const fn intersects(self, other: Role) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The role proven by one EKU OID (DER content bytes, without tag and
    /// length), or `None` for OIDs that are not ciao roles. Compared on raw DER:
    /// rustls-webpki 0.103 mis-decodes the arc 343.
    pub fn from_oid_der(oid: &[u8]) -> Option<Role> {
        ROLES.iter().find(|r| r.oid_der == oid).map(|r| Role(r.bit))
    }

    /// The OR of every recognised role OID (Go's `GetRoleFromOIDs`).
    pub fn from_oids<'a>(oids: impl IntoIterator<Item = &'a [u8]>) -> Role {
        oids.into_iter()
            .filter_map(Role::from_oid_der)
            .fold(Role::UNKNOWN, Role::union)
    }

    /// DER content bytes of the EKU OID of each role bit set in `self`.
    pub fn oids_der(self) -> impl Iterator<Item = &'static [u8]> {
        ROLES
            .iter()
            .filter(move |r| self.0 & r.bit != 0)
            .map(|r| r.oid_der)
    }

    /// The OID arcs of each role bit in `self` (1.3.6.1.4.1.343.8.N), for
    /// certificate generators that take arcs.
    pub fn oid_arcs(self) -> Vec<Vec<u64>> {
        ROLES
            .iter()
            .filter(|r| self.0 & r.bit != 0)
            .map(|r| vec![1, 3, 6, 1, 4, 1, 343, 8, u64::from(r.oid_der[8])])
            .collect()
    }
}

impl fmt::Display for Role {
    /// Go's `Role.String()`: the parts joined with `-`, empty for no role.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for r in ROLES.iter().filter(|r| self.0 & r.bit != 0) {
            if !first {
                f.write_str("-")?;
            }
            f.write_str(r.display)?;
            first = false;
        }
        Ok(())
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Role({:#x} {})", self.0, self)
    }
}

/// Error for an unknown role keyword.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownRole(pub String);

impl fmt::Display for UnknownRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown SSNTP role {:?} (expected server, controller, agent, scheduler, netagent, cnciagent or unknown)",
            self.0
        )
    }
}

impl std::error::Error for UnknownRole {}

impl FromStr for Role {
    type Err = UnknownRole;

    /// Go's `Role.Set()`: a comma-separated list of keywords, ORed together.
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        let mut role = Role::UNKNOWN;
        for word in s.split(',') {
            if word == "unknown" {
                continue;
            }
            match ROLES.iter().find(|r| r.keyword == word) {
                Some(r) => role = role.union(Role(r.bit)),
                None => return Err(UnknownRole(word.to_string())),
            }
        }
        Ok(role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_go() {
        assert_eq!(
            Role::AGENT.union(Role::NETAGENT).to_string(),
            "CNAgent-NetworkingAgent"
        );
        assert_eq!(Role::UNKNOWN.to_string(), "");
        assert_eq!(Role::SCHEDULER.to_string(), "Scheduler");
    }

    #[test]
    fn parse_keywords() {
        assert_eq!("agent,netagent".parse::<Role>(), Ok(Role::from_bits(0x14)));
        assert!("agent, netagent".parse::<Role>().is_err());
    }

    #[test]
    fn oids_round_trip() {
        for bit in [1u32, 2, 4, 8, 16, 32] {
            let r = Role::from_bits(bit);
            let oids: Vec<&[u8]> = r.oids_der().collect();
            assert_eq!(Role::from_oids(oids), r);
        }
        assert_eq!(Role::from_oid_der(&[0x55, 0x1d, 0x25, 0x00]), None);
        assert_eq!(
            Role::AGENT.oid_arcs(),
            vec![vec![1, 3, 6, 1, 4, 1, 343, 8, 1]]
        );
    }
}
