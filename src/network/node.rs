//! [`NodeNetwork`]: the topology of one node and the operations on it (see
//! the module doc of `network` for the locking rule and the create steps).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

use log::{info, warn};

use super::NetError;
use super::container::{CONTAINER_MTU, ContainerNetns};
use super::discovery::{NodeAddresses, choose_addresses};
use super::firewall;
use super::names::{
    Cidr, DeviceRole, ParsedAlias, SubnetId, cnci_vnic_alias, device_name, parse_alias, parse_ip,
    parse_mac, subnet_key,
};
use super::netlink::{Link, Netlink, create_persistent_tap, open_macvtap};
use crate::payloads::outgoing::{NetworkInfo, TenantEvent};

/// How many queues (fds) a CNCI macvtap gets, as ciao.
const CNCI_QUEUES: usize = 4;
/// Bound on fresh names tried per device (ciao's retry never ends).
const NAME_TRIES: usize = 16;

/// Makes the tunnel of a subnet. Production: [`GreTap`]. Tests on a kernel
/// without GRE substitute a stand-in of another kind.
pub trait TunnelMaker: Send + fmt::Debug {
    /// Creates link `name` (down, no alias) from `local` to `remote` with
    /// `key`.
    fn create(
        &mut self,
        nl: &mut Netlink,
        name: &str,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        key: u32,
    ) -> Result<(), NetError>;
    /// The rtnetlink kind of what `create` makes (`gretap`): only links of
    /// this kind with a tunnel alias are taken for ours.
    fn kind(&self) -> &'static str;
}

/// Keyed Ethernet-over-GRE (`gretap`).
#[derive(Debug, Default)]
pub struct GreTap;

impl TunnelMaker for GreTap {
    fn create(
        &mut self,
        nl: &mut Netlink,
        name: &str,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        key: u32,
    ) -> Result<(), NetError> {
        nl.create_gretap(name, local, remote, key)
    }
    fn kind(&self) -> &'static str {
        "gretap"
    }
}

/// Stand-in for gretap on kernels without GRE: a veth pair whose far end
/// is named `tpr` + the tunnel's hex. It carries nothing anywhere; tests
/// that need the concentrator side wire the far end themselves.
#[derive(Debug, Default)]
pub struct VethStandIn;

impl TunnelMaker for VethStandIn {
    fn create(
        &mut self,
        nl: &mut Netlink,
        name: &str,
        _local: Ipv4Addr,
        _remote: Ipv4Addr,
        _key: u32,
    ) -> Result<(), NetError> {
        let hex = name.strip_prefix("sgt_").unwrap_or(name);
        nl.create_veth(name, &format!("tpr_{hex}"))
    }
    fn kind(&self) -> &'static str {
        "veth"
    }
}

/// Where the random part of device names comes from.
pub trait NameSource: Send + fmt::Debug {
    /// A number for the next `role` device name.
    fn next(&mut self, role: DeviceRole) -> u32;
}

/// Random 32-bit numbers from the OS (via uuid v4).
#[derive(Debug, Default)]
pub struct RandomNames;

impl NameSource for RandomNames {
    fn next(&mut self, _role: DeviceRole) -> u32 {
        let b = uuid::Uuid::new_v4().into_bytes();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// What [`NodeNetwork::init`] needs.
#[derive(Debug)]
pub struct NetConfig {
    /// Compute network CIDRs (empty: autoconfigure).
    pub compute_nets: Vec<String>,
    /// Management network CIDRs (empty: autoconfigure).
    pub mgmt_nets: Vec<String>,
    /// The launcher's SSNTP UUID (`agent_uuid` of the events).
    pub agent_uuid: String,
    pub tunnels: Box<dyn TunnelMaker>,
    pub names: Box<dyn NameSource>,
}

impl NetConfig {
    /// Production configuration: gretap tunnels, random names.
    pub fn new(compute_nets: Vec<String>, mgmt_nets: Vec<String>, agent_uuid: &str) -> NetConfig {
        NetConfig {
            compute_nets,
            mgmt_nets,
            agent_uuid: agent_uuid.to_string(),
            tunnels: Box::new(GreTap),
            names: Box::new(RandomNames),
        }
    }
}

/// The START networking fields of one instance (strings as received).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VnicRequest {
    pub instance_uuid: String,
    pub tenant_uuid: String,
    pub vnic_uuid: String,
    pub vnic_mac: String,
    /// `network_node: true`: a CNCI VM (macvtap); only MAC, vnic uuid and
    /// tenant matter then.
    pub network_node: bool,
    pub subnet: String,
    pub concentrator_uuid: String,
    pub concentrator_ip: String,
    pub private_ip: String,
    /// A container's VNIC (a veth pair, [`NodeNetwork::plug_container_vnic`]),
    /// not a VM's tap.
    pub container: bool,
}

impl VnicRequest {
    /// Step 1 of a tenant VNIC create alone: whether the fields parse
    /// (`invalid_data`) and the ids are there (`network_failure`). A
    /// container's START checks before its container is made, as its VNIC
    /// can only be plugged once it runs.
    pub fn check(&self) -> Result<(), NetError> {
        NodeNetwork::parse_tenant(self).map(|_| ())
    }
}

/// What the VM needs from its VNIC.
#[derive(Debug)]
pub struct VnicGranted {
    /// The link name (`svn_…` or `svc_…`), also QEMU's netdev id.
    pub name: String,
    /// One fd per queue (tap: 1; macvtap: 4). QEMU inherits them; drop
    /// them after the launch.
    pub fds: Vec<OwnedFd>,
    /// The guest MAC (`vnic_mac`).
    pub mac: [u8; 6],
    /// Whether `/dev/vhost-net` exists (else QEMU must run `vhost=off`).
    pub vhost: bool,
    /// Tenant VM only: the subnet's gateway (network + 1).
    pub gateway: Option<Ipv4Addr>,
    /// Set when this VNIC created the subnet's bridge and tunnel here.
    pub tenant_added: Option<TenantEvent>,
}

/// A device of ours the kernel knows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dev {
    name: String,
    index: u32,
}

#[derive(Debug)]
struct SubnetDevs {
    bridge: Dev,
    /// `None` only for a bridge re-learned without its tunnel (repaired
    /// by the next create).
    tunnel: Option<Dev>,
    /// VNIC aliases on this bridge (the reference count).
    vnics: BTreeSet<String>,
}

#[derive(Debug)]
struct VnicDev {
    /// `None`: a container VNIC whose pair died with the container's
    /// namespace (stopped); it still counts on its bridge.
    dev: Option<Dev>,
    /// `None` after a restart (ownership is not in the kernel).
    owner: Option<String>,
    /// `None` for CNCI VNICs.
    subnet: Option<SubnetId>,
}

/// Step 1 of a tenant VNIC create: the request, parsed.
#[derive(Debug)]
struct TenantVnic {
    mac: [u8; 6],
    cidr: Cidr,
    ip: Ipv4Addr,
    id: SubnetId,
    key: u32,
    alias: String,
}

/// A tenant VNIC built and not yet recorded; `made` is what its maker
/// returns beside the host-side link (a tap's queue fd, a veth's peer).
#[derive(Debug)]
struct Built<M> {
    vnic: Dev,
    made: M,
    bridge: Dev,
    tunnel: Dev,
    new_subnet: bool,
}

/// A container's tenant VNIC, plugged into its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerVnic {
    /// The host end `svn_…` on the subnet's bridge.
    pub name: String,
    /// `eth0`'s MAC (`vnic_mac`).
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// Default route and DNS server of the container: network + 1.
    pub gateway: Ipv4Addr,
    /// Set when this plug created the subnet's bridge and tunnel here.
    pub tenant_added: Option<TenantEvent>,
}

/// One undo step of a create in progress.
#[derive(Debug)]
enum Undo {
    Link(Dev),
    Rule(String),
}

/// The node's tenant network.
#[derive(Debug)]
pub struct NodeNetwork {
    nl: Netlink,
    tunnels: Box<dyn TunnelMaker>,
    names: Box<dyn NameSource>,
    agent_uuid: String,
    addresses: NodeAddresses,
    subnets: BTreeMap<SubnetId, SubnetDevs>,
    /// Tenant and CNCI VNICs by alias.
    vnics: BTreeMap<String, VnicDev>,
}

fn parse_cidrs(list: &[String], what: &str) -> Result<Vec<Cidr>, NetError> {
    list.iter()
        .map(|s| {
            Cidr::parse(s.trim()).map_err(|e| NetError::Config(format!("{what} network: {e}")))
        })
        .collect()
}

impl NodeNetwork {
    /// Start-up: parse the CIDR lists, choose the compute/management
    /// addresses, and re-learn our devices from the kernel by alias.
    pub fn init(config: NetConfig) -> Result<NodeNetwork, NetError> {
        let compute = parse_cidrs(&config.compute_nets, "compute")?;
        let mgmt = parse_cidrs(&config.mgmt_nets, "management")?;
        let mut nl = Netlink::open()?;
        let links = nl.links()?;
        let addresses = choose_addresses(&links, &compute, &mgmt)?;
        let mut net = NodeNetwork {
            nl,
            tunnels: config.tunnels,
            names: config.names,
            agent_uuid: config.agent_uuid,
            addresses,
            subnets: BTreeMap::new(),
            vnics: BTreeMap::new(),
        };
        net.relearn(&links);
        Ok(net)
    }

    /// Rebuilds the topology from aliases. A VNIC whose bridge is gone is
    /// still known (so DELETE removes it); a bridge without its tunnel gets
    /// a new tunnel at the next create. Nothing here fails the start-up.
    fn relearn(&mut self, links: &[Link]) {
        let tunnel_kind = self.tunnels.kind();
        let mut tunnels = BTreeMap::new();
        for l in links {
            let dev = Dev {
                name: l.name.clone(),
                index: l.index,
            };
            match (parse_alias(&l.alias), l.kind.as_deref()) {
                (Some(ParsedAlias::Bridge(id)), Some("bridge")) => {
                    self.subnets.insert(
                        id,
                        SubnetDevs {
                            bridge: dev,
                            tunnel: None,
                            vnics: BTreeSet::new(),
                        },
                    );
                }
                (Some(ParsedAlias::Tunnel(id)), Some(k)) if k == tunnel_kind => {
                    tunnels.insert(id, dev);
                }
                (Some(ParsedAlias::Vnic(id, _)), Some("tun" | "veth")) => {
                    self.vnics.insert(
                        l.alias.clone(),
                        VnicDev {
                            dev: Some(dev),
                            owner: None,
                            subnet: Some(id),
                        },
                    );
                }
                (Some(ParsedAlias::CnciVnic), Some("macvtap")) => {
                    self.vnics.insert(
                        l.alias.clone(),
                        VnicDev {
                            dev: Some(dev),
                            owner: None,
                            subnet: None,
                        },
                    );
                }
                _ => {}
            }
        }
        for (id, t) in tunnels {
            match self.subnets.get_mut(&id) {
                Some(s) => s.tunnel = Some(t),
                None => warn!("network: tunnel {} has no bridge; deleting it", t.name),
            }
        }
        // An orphan tunnel is of no use to anyone; remove it now.
        let orphans: Vec<Dev> = links
            .iter()
            .filter(|l| l.kind.as_deref() == Some(tunnel_kind))
            .filter_map(|l| match parse_alias(&l.alias) {
                Some(ParsedAlias::Tunnel(id)) if !self.subnets.contains_key(&id) => Some(Dev {
                    name: l.name.clone(),
                    index: l.index,
                }),
                _ => None,
            })
            .collect();
        for t in orphans {
            if let Err(e) = self.nl.delete_link(t.index) {
                warn!("network: {e}");
            }
        }
        for (alias, v) in &self.vnics {
            let Some(id) = &v.subnet else { continue };
            match self.subnets.get_mut(id) {
                Some(s) => {
                    s.vnics.insert(alias.clone());
                }
                None => warn!(
                    "network: VNIC {} has no bridge; it stays until its DELETE",
                    v.dev.as_ref().map_or(alias.as_str(), |d| d.name.as_str())
                ),
            }
        }
        info!(
            "network: re-learned {} tenant subnet(s) and {} VNIC(s)",
            self.subnets.len(),
            self.vnics.len()
        );
    }

    /// The compute addresses (ip, MAC of the link) for READY/STATS.
    pub fn node_networks(&self) -> Vec<NetworkInfo> {
        self.addresses
            .compute
            .iter()
            .map(|a| NetworkInfo {
                ip: a.ip.to_string(),
                mac: a.mac.clone(),
            })
            .collect()
    }

    /// The chosen addresses (compute entry 0 is the tunnel's local end).
    pub fn addresses(&self) -> &NodeAddresses {
        &self.addresses
    }

    /// The node's tunnel address, also `agent_ip` of the events.
    pub fn agent_ip(&self) -> Ipv4Addr {
        // init guarantees a compute entry.
        self.addresses
            .compute
            .first()
            .map_or(Ipv4Addr::UNSPECIFIED, |a| a.ip)
    }

    /// Number of tenant subnets with a bridge here (for tests and logs).
    pub fn subnet_count(&self) -> usize {
        self.subnets.len()
    }

    fn fresh_name(
        &mut self,
        role: DeviceRole,
        taken: &mut HashSet<String>,
    ) -> Result<String, NetError> {
        for _ in 0..NAME_TRIES {
            let name = device_name(role, self.names.next(role));
            if taken.insert(name.clone()) {
                return Ok(name);
            }
        }
        Err(NetError::Invalid(format!(
            "no free {}… name after {NAME_TRIES} tries",
            role.prefix()
        )))
    }

    /// One ioctl in this thread's namespace, not a dump of every link and
    /// address (this runs under the node-wide lock, once per device made).
    fn index_of(&mut self, name: &str) -> Result<u32, NetError> {
        nix::net::if_::if_nametoindex(name).map_err(|e| {
            NetError::Invalid(format!("link {name} vanished right after creation: {e}"))
        })
    }

    /// Whether `owner` (if known) is someone other than `instance`.
    fn owned_by_other(owner: Option<&str>, instance: &str) -> bool {
        owner.is_some_and(|o| o != instance.trim())
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            let r = match &u {
                Undo::Link(d) => self.nl.delete_link(d.index),
                Undo::Rule(b) => firewall::delete_forward_rule(b),
            };
            if let Err(e) = r {
                warn!("network: rollback step {u:?} failed: {e}");
            }
        }
    }

    /// Step 1 for a tenant VNIC (VM or container): every value parsed
    /// (`invalid_data`), every id present (`network_failure`).
    fn parse_tenant(req: &VnicRequest) -> Result<TenantVnic, NetError> {
        let mac = parse_mac(req.vnic_mac.trim())?;
        let cidr = Cidr::parse(req.subnet.trim())?;
        let conc_ip = parse_ip(req.concentrator_ip.trim(), "concentrator ip")?;
        let ip = parse_ip(req.private_ip.trim(), "private ip")?;
        for (v, what) in [
            (&req.tenant_uuid, "tenant_uuid"),
            (&req.concentrator_uuid, "concentrator_uuid"),
            (&req.vnic_uuid, "vnic_uuid"),
        ] {
            if v.trim().is_empty() {
                return Err(NetError::Invalid(format!("missing {what}")));
            }
        }
        let key = subnet_key(cidr.network());
        if key == 0 {
            return Err(NetError::Invalid(format!(
                "subnet {} gives subnet key 0, which the concentrator refuses",
                req.subnet.trim()
            )));
        }
        let id = SubnetId {
            tenant: req.tenant_uuid.trim().to_string(),
            subnet: req.subnet.trim().to_string(),
            concentrator_uuid: req.concentrator_uuid.trim().to_string(),
            concentrator_ip: conc_ip.to_string(),
        };
        let alias = id.vnic_alias(ip);
        Ok(TenantVnic {
            mac,
            cidr,
            ip,
            id,
            key,
            alias,
        })
    }

    /// Creates the VNIC of one instance (tenant VM on a compute node, or a
    /// CNCI VM when `network_node`).
    pub fn create_vnic(&mut self, req: &VnicRequest) -> Result<VnicGranted, NetError> {
        if req.network_node {
            return self.create_cnci_vnic(req);
        }
        let t = Self::parse_tenant(req)?;
        let (mac, cidr, vnic_ip) = (t.mac, t.cidr, t.ip);
        let vhost = Path::new("/dev/vhost-net").exists();
        let granted = |name: String, fds: Vec<File>, tenant_added| VnicGranted {
            name,
            fds: fds.into_iter().map(OwnedFd::from).collect(),
            mac,
            vhost,
            gateway: Some(cidr.gateway()),
            tenant_added,
        };

        // An existing VNIC (a restarted VM, or the launcher restarted):
        // attach a fresh queue fd to the persistent tap.
        if let Some(v) = self.vnics.get_mut(&t.alias) {
            if Self::owned_by_other(v.owner.as_deref(), &req.instance_uuid) {
                return Err(NetError::Invalid(format!(
                    "VNIC for {vnic_ip} in subnet {} already belongs to instance {}",
                    t.id.subnet,
                    v.owner.as_deref().unwrap_or_default()
                )));
            }
            // Attaching by name would make a new, unbridged tap if ours had
            // been removed behind our back: only attach to the same device.
            let Some(dev) = v.dev.as_ref().filter(|d| Self::still_there(d)) else {
                return Err(NetError::Invalid(format!(
                    "VNIC of {vnic_ip} in subnet {} is gone from the kernel; DELETE the instance",
                    t.id.subnet
                )));
            };
            let name = dev.name.clone();
            let fd = super::netlink::attach_tap(&name)?;
            v.owner = Some(req.instance_uuid.trim().to_string());
            return Ok(granted(name, vec![fd], None));
        }

        let links = self.nl.links()?;
        let mut taken: HashSet<String> = links.into_iter().map(|l| l.name).collect();
        let mut undo = Vec::new();
        match self.build_tenant_vnic(&t, &mut taken, &mut undo, Self::make_tap) {
            Ok(b) => {
                let name = b.vnic.name.clone();
                let tenant_added = self.record(&t, req, b.vnic, b.bridge, b.tunnel, b.new_subnet);
                Ok(granted(name, vec![b.made], tenant_added))
            }
            Err(e) => {
                self.rollback(undo);
                Err(e)
            }
        }
    }

    /// Whether `dev` is still the link of that name (a link removed behind
    /// our back may have left its index or name to a foreign one).
    fn still_there(dev: &Dev) -> bool {
        nix::net::if_::if_nametoindex(dev.name.as_str()).ok() == Some(dev.index)
    }

    /// Records a tenant VNIC that is complete, and its subnet (a repaired
    /// tunnel included); the TenantAdded body when the subnet is new here.
    fn record(
        &mut self,
        t: &TenantVnic,
        req: &VnicRequest,
        vnic: Dev,
        bridge: Dev,
        tunnel: Dev,
        new_subnet: bool,
    ) -> Option<TenantEvent> {
        let subnet = self
            .subnets
            .entry(t.id.clone())
            .or_insert_with(|| SubnetDevs {
                bridge,
                tunnel: None,
                vnics: BTreeSet::new(),
            });
        subnet.tunnel = Some(tunnel);
        subnet.vnics.insert(t.alias.clone());
        self.vnics.insert(
            t.alias.clone(),
            VnicDev {
                dev: Some(vnic),
                owner: Some(req.instance_uuid.trim().to_string()),
                subnet: Some(t.id.clone()),
            },
        );
        new_subnet.then(|| self.event(&t.id, t.key))
    }

    /// Plugs the tenant VNIC of a container into the network namespace of
    /// its process `pid`: after every start of the container (a first
    /// START, a RESTART, and whenever the launcher finds it running without
    /// its NIC). The pair is made anew each time (it dies with the
    /// container's namespace); MAC and address come from the request, so
    /// they are the same every time. See the `container` module docs for
    /// the steps inside the namespace.
    ///
    /// 1. Parse and check as for a VM (nothing touched on bad input).
    /// 2. A known VNIC of another instance: refused. A host end of ours
    ///    still here (its peer never reached a container) is deleted.
    /// 3. The subnet's bridge and tunnel if new (as for a VM); the veth
    ///    pair `svn_…` (alias, MTU 1400, on the bridge, up) / `svp_…`
    ///    (`vnic_mac`, MTU 1400).
    /// 4. `svp_…` into the namespace, configured there as `eth0`.
    /// 5. Any failure undoes step 3 (deleting the host end takes the peer,
    ///    wherever it is); the VNIC stays counted if it was known before
    ///    (a RESTART that failed: DELETE still removes it).
    pub fn plug_container_vnic(
        &mut self,
        req: &VnicRequest,
        pid: u32,
    ) -> Result<ContainerVnic, NetError> {
        if req.network_node {
            return Err(NetError::Invalid(
                "a container cannot be a CNCI here (network_node with a container image)".into(),
            ));
        }
        let t = Self::parse_tenant(req)?;
        if let Some(v) = self.vnics.get(&t.alias) {
            if Self::owned_by_other(v.owner.as_deref(), &req.instance_uuid) {
                return Err(NetError::Invalid(format!(
                    "VNIC for {} in subnet {} already belongs to instance {}",
                    t.ip,
                    t.id.subnet,
                    v.owner.as_deref().unwrap_or_default()
                )));
            }
            if let Some(d) = v.dev.clone().filter(Self::still_there) {
                self.nl.delete_link(d.index)?;
            }
            if let Some(v) = self.vnics.get_mut(&t.alias) {
                v.dev = None;
                v.owner = Some(req.instance_uuid.trim().to_string());
            }
        }
        let ns = ContainerNetns::of_pid(pid)?;
        let links = self.nl.links()?;
        let mut taken: HashSet<String> = links.into_iter().map(|l| l.name).collect();
        let mut undo = Vec::new();
        let built = self
            .build_tenant_vnic(&t, &mut taken, &mut undo, Self::make_veth)
            .and_then(|b| {
                let peer = &b.made;
                let what = format!("the network namespace of process {pid}");
                self.nl.move_to_netns(peer.index, ns.raw_fd(), &what)?;
                ns.configure(&peer.name, t.ip, t.cidr.prefix, t.cidr.gateway())?;
                Ok(b)
            });
        match built {
            Ok(b) => {
                let name = b.vnic.name.clone();
                let tenant_added = self.record(&t, req, b.vnic, b.bridge, b.tunnel, b.new_subnet);
                Ok(ContainerVnic {
                    name,
                    mac: t.mac,
                    ip: t.ip,
                    prefix: t.cidr.prefix,
                    gateway: t.cidr.gateway(),
                    tenant_added,
                })
            }
            Err(e) => {
                self.rollback(undo);
                Err(e)
            }
        }
    }

    fn event(&self, id: &SubnetId, key: u32) -> TenantEvent {
        TenantEvent {
            agent_uuid: self.agent_uuid.clone(),
            agent_ip: self.agent_ip().to_string(),
            tenant_uuid: id.tenant.clone(),
            tenant_subnet: id.subnet.clone(),
            concentrator_uuid: id.concentrator_uuid.clone(),
            concentrator_ip: id.concentrator_ip.clone(),
            subnet_key: key,
        }
    }

    /// A VM's VNIC: the persistent tap and its first queue.
    fn make_tap(
        &mut self,
        _t: &TenantVnic,
        taken: &mut HashSet<String>,
        undo: &mut Vec<Undo>,
    ) -> Result<(Dev, File), NetError> {
        let name = self.fresh_name(DeviceRole::Vnic, taken)?;
        let fd = create_persistent_tap(&name)?;
        let index = self.index_of(&name)?;
        let tap = Dev { name, index };
        undo.push(Undo::Link(tap.clone()));
        Ok((tap, fd))
    }

    /// A container's VNIC: the veth pair, MTU 1400 on both ends, the MAC on
    /// the container end (returned, still in this namespace).
    fn make_veth(
        &mut self,
        t: &TenantVnic,
        taken: &mut HashSet<String>,
        undo: &mut Vec<Undo>,
    ) -> Result<(Dev, Dev), NetError> {
        let (name, peer) = self.fresh_veth_names(taken)?;
        self.nl.create_veth(&name, &peer)?;
        let index = self.index_of(&name)?;
        let host = Dev { name, index };
        // The host end takes its peer with it when deleted.
        undo.push(Undo::Link(host.clone()));
        let peer_index = self.index_of(&peer)?;
        self.nl.set_mac(peer_index, t.mac)?;
        self.nl.set_mtu(peer_index, CONTAINER_MTU)?;
        self.nl.set_mtu(host.index, CONTAINER_MTU)?;
        Ok((
            host,
            Dev {
                name: peer,
                index: peer_index,
            },
        ))
    }

    /// A fresh `svn_<hex>` whose peer name `svp_<hex>` is free as well.
    fn fresh_veth_names(
        &mut self,
        taken: &mut HashSet<String>,
    ) -> Result<(String, String), NetError> {
        for _ in 0..NAME_TRIES {
            let name = self.fresh_name(DeviceRole::Vnic, taken)?;
            let peer = name.replacen(DeviceRole::Vnic.prefix(), DeviceRole::VnicPeer.prefix(), 1);
            if taken.insert(peer.clone()) {
                return Ok((name, peer));
            }
        }
        Err(NetError::Invalid(format!(
            "no free {}… / {}… name pair after {NAME_TRIES} tries",
            DeviceRole::Vnic.prefix(),
            DeviceRole::VnicPeer.prefix()
        )))
    }

    /// Steps 3–4 of a create; every device made is pushed on `undo` first.
    /// Nothing is recorded here: the caller records once everything (its
    /// own steps included) worked, or rolls `undo` back.
    fn build_tenant_vnic<M>(
        &mut self,
        t: &TenantVnic,
        taken: &mut HashSet<String>,
        undo: &mut Vec<Undo>,
        make: impl FnOnce(
            &mut Self,
            &TenantVnic,
            &mut HashSet<String>,
            &mut Vec<Undo>,
        ) -> Result<(Dev, M), NetError>,
    ) -> Result<Built<M>, NetError> {
        let id = &t.id;
        let existing = self
            .subnets
            .get(id)
            .map(|s| (s.bridge.clone(), s.tunnel.clone()));
        let new_subnet = existing.is_none();
        let bridge = match &existing {
            Some((b, _)) => b.clone(),
            None => {
                let name = self.fresh_name(DeviceRole::Bridge, taken)?;
                self.nl.create_bridge(&name)?;
                let index = self.index_of(&name)?;
                let b = Dev { name, index };
                undo.push(Undo::Link(b.clone()));
                self.nl.set_alias(b.index, &id.bridge_alias())?;
                b
            }
        };
        let tunnel = match existing.and_then(|(_, t)| t) {
            Some(t) => t,
            None => {
                let name = self.fresh_name(DeviceRole::Tunnel, taken)?;
                let remote = parse_ip(&id.concentrator_ip, "concentrator ip")?;
                let local = self.agent_ip();
                self.tunnels
                    .create(&mut self.nl, &name, local, remote, t.key)?;
                let index = self.index_of(&name)?;
                let t = Dev { name, index };
                undo.push(Undo::Link(t.clone()));
                self.nl.set_alias(t.index, &id.tunnel_alias())?;
                self.nl.set_master(t.index, bridge.index)?;
                self.nl.set_up(t.index)?;
                self.nl.set_up(bridge.index)?;
                t
            }
        };
        if new_subnet {
            undo.push(Undo::Rule(bridge.name.clone()));
            firewall::add_forward_rule(&bridge.name)?;
        }
        let (vnic, made) = make(self, t, taken, undo)?;
        self.nl.set_alias(vnic.index, &t.alias)?;
        self.nl.set_master(vnic.index, bridge.index)?;
        self.nl.set_up(vnic.index)?;
        Ok(Built {
            vnic,
            made,
            bridge,
            tunnel,
            new_subnet,
        })
    }

    fn create_cnci_vnic(&mut self, req: &VnicRequest) -> Result<VnicGranted, NetError> {
        let mac = parse_mac(req.vnic_mac.trim())?;
        let tenant = req.tenant_uuid.trim();
        let vnic_uuid = req.vnic_uuid.trim();
        if tenant.is_empty() || vnic_uuid.is_empty() {
            return Err(NetError::Invalid(
                "CNCI VNIC needs tenant_uuid and vnic_uuid".into(),
            ));
        }
        let alias = cnci_vnic_alias(tenant, vnic_uuid);
        let vhost = Path::new("/dev/vhost-net").exists();
        let dev = match self.vnics.get(&alias) {
            Some(v) if Self::owned_by_other(v.owner.as_deref(), &req.instance_uuid) => {
                return Err(NetError::Invalid(format!(
                    "CNCI VNIC {alias} already belongs to instance {}",
                    v.owner.as_deref().unwrap_or_default()
                )));
            }
            Some(VnicDev { dev: Some(d), .. }) => d.clone(),
            Some(VnicDev { dev: None, .. }) => {
                return Err(NetError::Invalid(format!(
                    "CNCI VNIC {alias} is gone from the kernel; DELETE the instance"
                )));
            }
            None => {
                let lower = self
                    .addresses
                    .compute
                    .first()
                    .map(|a| a.link_index)
                    .ok_or_else(|| NetError::Config("no compute interface".into()))?;
                let mut taken: HashSet<String> =
                    self.nl.links()?.into_iter().map(|l| l.name).collect();
                let name = self.fresh_name(DeviceRole::CnciVnic, &mut taken)?;
                self.nl.create_macvtap(&name, lower, mac)?;
                let mut made = || -> Result<Dev, NetError> {
                    let index = self.index_of(&name)?;
                    self.nl.set_alias(index, &alias)?;
                    self.nl.set_up(index)?;
                    Ok(Dev {
                        name: name.clone(),
                        index,
                    })
                };
                match made() {
                    Ok(d) => d,
                    Err(e) => {
                        if let Some(l) = self.nl.link_by_name(&name).ok().flatten() {
                            self.rollback(vec![Undo::Link(Dev {
                                name: name.clone(),
                                index: l.index,
                            })]);
                        }
                        return Err(e);
                    }
                }
            }
        };
        let mut fds = Vec::with_capacity(CNCI_QUEUES);
        for _ in 0..CNCI_QUEUES {
            match open_macvtap(dev.index) {
                Ok(f) => fds.push(f),
                Err(e) => {
                    if !self.vnics.contains_key(&alias) {
                        self.rollback(vec![Undo::Link(dev)]);
                    }
                    return Err(e);
                }
            }
        }
        self.vnics.insert(
            alias,
            VnicDev {
                dev: Some(dev.clone()),
                owner: Some(req.instance_uuid.trim().to_string()),
                subnet: None,
            },
        );
        Ok(VnicGranted {
            name: dev.name,
            fds: fds.into_iter().map(OwnedFd::from).collect(),
            mac,
            vhost,
            gateway: None,
            tenant_added: None,
        })
    }

    /// The alias of `req`'s VNIC, and its subnet (none for a CNCI's).
    fn alias_of(req: &VnicRequest) -> Result<(String, Option<SubnetId>), NetError> {
        if req.network_node {
            return Ok((
                cnci_vnic_alias(req.tenant_uuid.trim(), req.vnic_uuid.trim()),
                None,
            ));
        }
        // Validated like at create, so a bad state file is reported.
        Cidr::parse(req.subnet.trim())?;
        let conc_ip = parse_ip(req.concentrator_ip.trim(), "concentrator ip")?;
        let vnic_ip = parse_ip(req.private_ip.trim(), "private ip")?;
        let id = SubnetId {
            tenant: req.tenant_uuid.trim().to_string(),
            subnet: req.subnet.trim().to_string(),
            concentrator_uuid: req.concentrator_uuid.trim().to_string(),
            concentrator_ip: conc_ip.to_string(),
        };
        Ok((id.vnic_alias(vnic_ip), Some(id)))
    }

    /// After a launcher restart: the recovered instance of `req` owns its
    /// re-learned VNIC again (ownership is not in the kernel), so a START
    /// of another instance for the same address cannot take it. Returns
    /// whether the VNIC is known.
    ///
    /// A stopped container's pair died with its namespace, so the kernel
    /// has nothing to re-learn: its VNIC is recorded here without a device
    /// and counts on its bridge again (so the bridge stays while the
    /// container exists, and its DELETE can send TenantRemoved).
    pub fn claim_vnic(&mut self, req: &VnicRequest) -> bool {
        let Ok((alias, id)) = Self::alias_of(req) else {
            return false;
        };
        let owner = req.instance_uuid.trim().to_string();
        match self.vnics.get_mut(&alias) {
            Some(v) => {
                if v.owner.is_none() {
                    v.owner = Some(owner);
                }
                true
            }
            None if req.container && id.is_some() => {
                if let Some(s) = id.as_ref().and_then(|id| self.subnets.get_mut(id)) {
                    s.vnics.insert(alias.clone());
                }
                self.vnics.insert(
                    alias,
                    VnicDev {
                        dev: None,
                        owner: Some(owner),
                        subnet: id,
                    },
                );
                true
            }
            None => false,
        }
    }

    /// Deletes an instance's VNIC (after its VM is gone). Unknown: nothing
    /// to do. Returns the TenantRemoved body when this was the subnet's last
    /// VNIC on the node (tunnel, rule and bridge are then gone too).
    pub fn delete_vnic(&mut self, req: &VnicRequest) -> Result<Option<TenantEvent>, NetError> {
        let (alias, id) = Self::alias_of(req)?;
        let Some(v) = self.vnics.get(&alias) else {
            return Ok(None);
        };
        // Another instance's VNIC (this one's START was refused for it).
        if Self::owned_by_other(v.owner.as_deref(), &req.instance_uuid) {
            return Ok(None);
        }
        // A device already gone (a stopped container's pair) is not an
        // error; a name or index now held by a foreign link is left alone.
        if let Some(d) = v.dev.clone().filter(Self::still_there) {
            self.nl.delete_link(d.index)?;
        }
        self.vnics.remove(&alias);
        let Some(id) = id else { return Ok(None) };
        let last = match self.subnets.get_mut(&id) {
            Some(s) => {
                s.vnics.remove(&alias);
                s.vnics.is_empty()
            }
            None => false,
        };
        if !last {
            return Ok(None);
        }
        let Some(s) = self.subnets.get(&id) else {
            return Ok(None);
        };
        let (bridge, tunnel) = (s.bridge.clone(), s.tunnel.clone());
        if let Some(t) = &tunnel {
            self.nl.delete_link(t.index)?;
        }
        if let Some(s) = self.subnets.get_mut(&id) {
            s.tunnel = None;
        }
        if let Err(e) = firewall::delete_forward_rule(&bridge.name) {
            warn!("network: {e}");
        }
        self.nl.delete_link(bridge.index)?;
        self.subnets.remove(&id);
        let key = Cidr::parse(&id.subnet).map_or(0, |c| subnet_key(c.network()));
        Ok(Some(self.event(&id, key)))
    }
}

/// Hard reset: deletes every link that is ours — an alias of ours on a link
/// of the matching kind (bridge alias on a bridge, tunnel alias on
/// `tunnel_kind`, VNIC alias on a tap or veth, CNCI alias on a macvtap) —
/// and every FORWARD rule of our shape. A foreign link, aliased or merely
/// named like ours, stays. Returns the names deleted. Production passes
/// `GreTap.kind()` ("gretap"). Runs in the caller's network namespace.
pub fn hard_reset(tunnel_kind: &str) -> Result<Vec<String>, NetError> {
    let mut nl = Netlink::open()?;
    let mut deleted = Vec::new();
    let mut failed = Vec::new();
    let links = nl.links()?;
    let mut foreign_names = HashSet::new();
    for l in links {
        let ours = match (parse_alias(&l.alias), l.kind.as_deref()) {
            (Some(ParsedAlias::Bridge(_)), Some("bridge")) => true,
            (Some(ParsedAlias::Tunnel(_)), Some(k)) => k == tunnel_kind,
            (Some(ParsedAlias::Vnic(..)), Some("tun" | "veth")) => true,
            (Some(ParsedAlias::CnciVnic), Some("macvtap")) => true,
            _ => false,
        };
        if !ours {
            foreign_names.insert(l.name);
            continue;
        }
        match nl.delete_link(l.index) {
            Ok(()) => deleted.push(l.name),
            Err(e) => failed.push(format!("{}: {e}", l.name)),
        }
    }
    // Rules of bridges we just deleted or that are long gone; a rule of a
    // foreign link that happens to be named like ours stays.
    for bridge in firewall::our_forward_rules()? {
        if foreign_names.contains(&bridge) {
            continue;
        }
        if let Err(e) = firewall::delete_forward_rule(&bridge) {
            failed.push(e.to_string());
        }
    }
    if failed.is_empty() {
        Ok(deleted)
    } else {
        Err(NetError::Invalid(format!(
            "hard reset could not delete: {}",
            failed.join("; ")
        )))
    }
}
