//! Tenant networking of a node: bridges, tunnels to the concentrator (CNCI),
//! tap VNICs for tenant VMs and macvtap VNICs for CNCI VMs, the events the
//! CNCI needs, and the hard reset. docs/networking.md has the whole picture.
//!
//! # One object, one lock
//! [`NodeNetwork`] owns the node's topology (which subnet has which bridge
//! and tunnel, which VNICs hang on it). It has no thread of its own and no
//! internal locking: the launcher keeps exactly **one** of it behind one
//! node-wide `Mutex` (in [`TenantNetwork`]) and every instance thread takes
//! that lock for the whole of a create or delete. ciao runs its network library
//! with a concurrency of 1 as well; serialising is what makes "first VNIC of
//! a subnet sends TenantAdded, last one sends TenantRemoved" exact without
//! per-device ready signals. Only the network step is serialised; instances
//! still start in parallel.
//!
//! Inputs: START networking fields ([`VnicRequest`]), the kernel (netlink,
//! `/dev/net/tun`, `/dev/tap<n>`, `iptables`). Outputs: file descriptors for
//! QEMU ([`VnicGranted`]), TenantAdded/TenantRemoved bodies for the caller
//! to send, typed errors ([`NetError::reason`] is the wire reason).
//!
//! # Creating a tenant VM's VNIC (compute node)
//! 1. Parse MAC, subnet, concentrator ip, private ip (else `invalid_data`,
//!    nothing touched); check the ids (else `network_failure`). A VNIC we
//!    know already (a VM started again, or re-learned) gets a fresh queue
//!    fd on its tap, if it is this instance's and its device still exists.
//! 2. List the kernel's links (names in use; our devices still there).
//! 3. If the subnet (tenant, subnet, concentrator uuid, concentrator ip) has
//!    no bridge here: create bridge `sbr_…` + alias, tunnel `sgt_…` + alias
//!    (through the [`TunnelMaker`]), enslave the tunnel, tunnel up, bridge
//!    up, FORWARD accept rule; a TenantAdded body is prepared.
//! 4. Create the persistent tap `svn_…`, alias, enslave, up.
//! 5. Any failure undoes steps 3–4 in reverse (devices deleted, rule
//!    removed, nothing recorded) and returns the error; nothing half-built
//!    stays behind (ciao leaves it).
//!
//! # A container's VNIC
//! Same steps 1 and 3, then a veth pair `svn_…`/`svp_…` instead of the tap;
//! the container end is moved into the container's namespace and set up
//! there as `eth0` ([`NodeNetwork::plug_container_vnic`]; the `container`
//! module says how, and why this way rather than a Docker network plugin).
//!
//! # How the launcher uses it
//! [`TenantNetwork`] (`tenant.rs`) holds the one [`NodeNetwork`] in the
//! launcher's `NodeContext`:
//! 1. Start-up (`-network cn|nn`): `TenantNetwork::start` discovers the
//!    node's addresses and re-learns our devices; a failure leaves the
//!    networking *down* (one error line; tenant STARTs get
//!    `network_failure`). The cluster configuration's CIDRs (CONNECTED)
//!    re-run it when the command line gave none.
//! 2. START (instance thread, before the image is made): `create_vnic`;
//!    TenantAdded sent if the subnet is new here; the descriptors go to
//!    QEMU (`Virtualizer::set_nic`), which inherits them; the launcher's
//!    copies close after the launch. A START that fails later removes the
//!    VNIC again (TenantRemoved if it was the last).
//!    A container's START only checks the request first
//!    ([`VnicRequest::check`]); once the container runs,
//!    `plug_container_vnic` with its PID (TenantAdded if new). It fails the
//!    START if that fails (container and VNIC go again).
//! 3. RESTART (2016): `create_vnic` re-opens the persistent tap; a
//!    container gets a new pair once it runs again. A container the monitor
//!    reports running (recovery, the engine back after a restart) without
//!    its `eth0` ([`ContainerNetns::has_nic`]) is plugged in again.
//! 4. Recovery: `claim_vnic` gives a recovered instance its VNIC back.
//! 5. DELETE, a 2018 exit, a vanished instance: `delete_vnic` once the
//!    instance is gone from its virtualizer; TenantRemoved after the last.
//! 6. `-hard-reset`: [`hard_reset`]; shutdown leaves every device.
//! 7. READY/STATS: the compute addresses and the host name.

mod container;
mod discovery;
mod firewall;
mod names;
mod netlink;
mod node;
mod tenant;

use std::fmt;
use std::io;

use crate::payloads::Reason;

pub use container::{CONTAINER_MTU, CONTAINER_NIC, ContainerNetns};
pub use discovery::{NodeAddress, NodeAddresses, choose_addresses, is_physical};
pub use names::{
    Cidr, DeviceRole, ParsedAlias, SubnetId, cnci_vnic_alias, device_name, format_mac,
    is_device_name, parse_alias, parse_ip, parse_mac, subnet_key,
};
pub use netlink::{Link, Netlink, create_persistent_tap, open_macvtap};
pub use node::{
    ContainerVnic, GreTap, NameSource, NetConfig, NodeNetwork, RandomNames, TunnelMaker,
    VethStandIn, VnicGranted, VnicRequest, hard_reset,
};
pub use tenant::{NetSetup, TenantNetwork, TunnelKind};

/// What went wrong, by who is to blame.
#[derive(Debug)]
pub enum NetError {
    /// A START value that does not parse (MAC, CIDR, IP): `invalid_data`.
    InvalidData(String),
    /// A request we cannot act on (missing ids, key 0, VNIC owned by
    /// another instance): `network_failure`.
    Invalid(String),
    /// Start-up: bad CIDR lists or no usable interface: `network_failure`.
    Config(String),
    /// The kernel refused `what`.
    Kernel {
        what: String,
        errno: Option<i32>,
        source: io::Error,
    },
    /// The kernel lacks a feature (no GRE): `network_failure`.
    Unsupported(String),
    /// The iptables command failed: `network_failure`.
    Firewall(String),
}

impl NetError {
    pub(crate) fn kernel(what: &str, source: io::Error) -> NetError {
        NetError::Kernel {
            what: what.to_string(),
            errno: source.raw_os_error(),
            source,
        }
    }

    /// The StartFailure reason for this error.
    pub fn reason(&self) -> Reason {
        match self {
            NetError::InvalidData(_) => Reason::InvalidData,
            _ => Reason::NetworkFailure,
        }
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::InvalidData(m)
            | NetError::Invalid(m)
            | NetError::Config(m)
            | NetError::Unsupported(m)
            | NetError::Firewall(m) => f.write_str(m),
            NetError::Kernel { what, source, .. } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for NetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NetError::Kernel { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_sharing() {
        assert_eq!(
            NetError::InvalidData("x".into()).reason(),
            Reason::InvalidData
        );
        for e in [
            NetError::Invalid("x".into()),
            NetError::Config("x".into()),
            NetError::Unsupported("x".into()),
            NetError::Firewall("x".into()),
            NetError::kernel("create bridge sbr_1", io::Error::from_raw_os_error(17)),
        ] {
            assert_eq!(e.reason(), Reason::NetworkFailure, "{e}");
        }
        let e = NetError::kernel("create bridge sbr_1", io::Error::from_raw_os_error(17));
        assert!(e.to_string().starts_with("create bridge sbr_1: "), "{e}");
        // The one object must be able to live behind the node-wide lock.
        fn shared<T: Send + Sync>() {}
        shared::<TenantNetwork>();
    }
}
