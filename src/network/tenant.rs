//! The node's tenant networking as the launcher's threads use it: one
//! [`TenantNetwork`], shared by the server thread (start-up, the cluster
//! configuration), the overseer (what READY/STATS report) and every
//! instance thread (a VNIC per START, its removal at DELETE).
//!
//! It is in one of three states:
//! * **off** (`-network none`): no VNIC is made; instances run without a
//!   tenant NIC;
//! * **down**: `-network cn|nn` was asked for but the start-up failed (no
//!   usable interface, bad CIDRs, no netlink). Logged once; the node keeps
//!   serving and every tenant START is refused with `network_failure`
//!   naming that cause;
//! * **up**: a [`NodeNetwork`] behind the node-wide lock (module docs of
//!   `network`: one create or delete at a time).
//!
//! READY and STATS read a copy of the reported addresses kept outside the
//! node lock, so a report never waits for a create in progress.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{error, info, warn};

use super::node::{
    ContainerVnic, GreTap, NetConfig, NodeNetwork, RandomNames, TunnelMaker, VethStandIn,
    VnicGranted,
};
use super::{NetError, VnicRequest};
use crate::payloads::outgoing::{NetworkInfo, TenantEvent};

/// Which device carries a subnet's traffic to its concentrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TunnelKind {
    /// Keyed Ethernet over GRE, as ciao (production).
    #[default]
    GreTap,
    /// A veth pair (`sgt_…` with the far end `tpr_…` left unconnected), for
    /// test nodes whose kernel has no GRE: everything else is real.
    VethStandIn,
}

impl TunnelKind {
    fn maker(self) -> Box<dyn TunnelMaker> {
        match self {
            TunnelKind::GreTap => Box::new(GreTap),
            TunnelKind::VethStandIn => Box::new(VethStandIn),
        }
    }

    /// The rtnetlink kind of the tunnel links (for the hard reset).
    pub fn link_kind(self) -> &'static str {
        self.maker().kind()
    }
}

/// How the node's networking was asked for at start-up.
#[derive(Debug, Clone)]
pub struct NetSetup {
    /// `--compute-net` (empty: the cluster configuration's, else any).
    pub compute_nets: Vec<String>,
    /// `--mgmt-net` (same rule).
    pub mgmt_nets: Vec<String>,
    /// The launcher's SSNTP UUID (`agent_uuid` of the events).
    pub agent_uuid: String,
    pub tunnel: TunnelKind,
}

#[derive(Debug)]
enum NetState {
    Off,
    Down(String),
    Up(Box<NodeNetwork>),
}

/// See the module docs.
#[derive(Debug)]
pub struct TenantNetwork {
    setup: Option<NetSetup>,
    state: Mutex<NetState>,
    /// The VNICs recovered instances claimed: claimed again whenever the
    /// topology is re-learned (ownership is not in the kernel). Locked
    /// after `state`, never before.
    claims: Mutex<Vec<VnicRequest>>,
    /// (host name, compute addresses) for READY/STATS.
    reported: Mutex<(String, Vec<NetworkInfo>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under the lock leaves the topology as far as it got; the
    // kernel is the truth and the next create re-reads it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TenantNetwork {
    /// `-network none`.
    pub fn off() -> Arc<TenantNetwork> {
        Arc::new(TenantNetwork {
            setup: None,
            state: Mutex::new(NetState::Off),
            claims: Mutex::new(Vec::new()),
            reported: Mutex::new((String::new(), Vec::new())),
        })
    }

    /// `-network cn|nn`: discovers the node's addresses and re-learns our
    /// devices from the kernel. Never fails: a failure is logged once and
    /// leaves the networking down.
    pub fn start(setup: NetSetup) -> Arc<TenantNetwork> {
        let net = Arc::new(TenantNetwork {
            setup: Some(setup.clone()),
            state: Mutex::new(NetState::Off),
            claims: Mutex::new(Vec::new()),
            reported: Mutex::new((String::new(), Vec::new())),
        });
        net.bring_up(setup.compute_nets, setup.mgmt_nets);
        net
    }

    fn bring_up(&self, compute_nets: Vec<String>, mgmt_nets: Vec<String>) {
        let Some(setup) = &self.setup else { return };
        let config = NetConfig {
            compute_nets,
            mgmt_nets,
            agent_uuid: setup.agent_uuid.clone(),
            tunnels: setup.tunnel.maker(),
            names: Box::new(RandomNames),
        };
        let mut state = lock(&self.state);
        match NodeNetwork::init(config) {
            Ok(mut net) => {
                // Recovered instances may have claimed theirs already
                // (before the cluster configuration brought this up).
                for req in lock(&self.claims).iter() {
                    net.claim_vnic(req);
                }
                let networks = net.node_networks();
                info!(
                    "tenant networking up: tunnels from {} ({:?}), {} tenant subnet(s) re-learned",
                    net.agent_ip(),
                    setup.tunnel,
                    net.subnet_count()
                );
                let host = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|e| {
                        warn!("cannot read the host name: {e}");
                        String::new()
                    });
                *lock(&self.reported) = (host, networks);
                *state = NetState::Up(Box::new(net));
            }
            Err(e) if matches!(*state, NetState::Up(_)) => {
                // What works stays: running instances and later STARTs
                // keep the addresses chosen at start-up.
                error!(
                    "tenant networking: the cluster configuration's networks do not fit this node ({e}); keeping those chosen at start-up"
                );
            }
            Err(e) => {
                error!(
                    "tenant networking is down: {e}; tenant STARTs get network_failure until networks that fit are given (flags, or the cluster configuration)"
                );
                *lock(&self.reported) = (String::new(), Vec::new());
                *state = NetState::Down(e.to_string());
            }
        }
    }

    /// The cluster configuration's CIDR lists (the first CONNECTED): used
    /// when the command line gave none. Our devices are re-learned from the
    /// kernel and the recovered instances' claims replayed, so nothing made
    /// so far is lost.
    pub fn cluster_configured(&self, compute_nets: &[String], mgmt_nets: &[String]) {
        let Some(setup) = &self.setup else { return };
        let flags = !setup.compute_nets.is_empty() || !setup.mgmt_nets.is_empty();
        if flags || (compute_nets.is_empty() && mgmt_nets.is_empty()) {
            return;
        }
        info!(
            "tenant networking: compute {compute_nets:?}, management {mgmt_nets:?} from the cluster configuration"
        );
        self.bring_up(compute_nets.to_vec(), mgmt_nets.to_vec());
    }

    /// Whether START makes VNICs (`-network cn|nn`, up or down).
    pub fn is_on(&self) -> bool {
        self.setup.is_some()
    }

    /// The host name and the compute addresses for READY/STATS (empty with
    /// networking off or down, as ciao).
    pub fn reported(&self) -> (String, Vec<NetworkInfo>) {
        lock(&self.reported).clone()
    }

    /// Makes (or re-opens) the VNIC of one instance.
    pub fn create_vnic(&self, req: &VnicRequest) -> Result<VnicGranted, NetError> {
        match &mut *lock(&self.state) {
            NetState::Up(net) => net.create_vnic(req),
            NetState::Down(why) => Err(NetError::Config(format!(
                "tenant networking is down: {why}"
            ))),
            NetState::Off => Err(NetError::Invalid("tenant networking is off".into())),
        }
    }

    /// Whether a container's VNIC could be made from `req` (see
    /// [`VnicRequest::check`]); networking down: `network_failure`.
    pub fn check(&self, req: &VnicRequest) -> Result<(), NetError> {
        match &*lock(&self.state) {
            NetState::Up(_) => req.check(),
            NetState::Down(why) => Err(NetError::Config(format!(
                "tenant networking is down: {why}"
            ))),
            NetState::Off => Ok(()),
        }
    }

    /// Plugs a container's VNIC into the namespace of its process `pid`
    /// (see [`NodeNetwork::plug_container_vnic`]).
    pub fn plug_container_vnic(
        &self,
        req: &VnicRequest,
        pid: u32,
    ) -> Result<ContainerVnic, NetError> {
        match &mut *lock(&self.state) {
            NetState::Up(net) => net.plug_container_vnic(req, pid),
            NetState::Down(why) => Err(NetError::Config(format!(
                "tenant networking is down: {why}"
            ))),
            NetState::Off => Err(NetError::Invalid("tenant networking is off".into())),
        }
    }

    /// A recovered instance takes its re-learned VNIC back (see
    /// [`NodeNetwork::claim_vnic`]); one whose VNIC is gone is logged.
    pub fn claim_vnic(&self, req: &VnicRequest) {
        let mut state = lock(&self.state);
        lock(&self.claims).push(req.clone());
        if let NetState::Up(net) = &mut *state
            && !net.claim_vnic(req)
        {
            warn!(
                "{}: its VNIC was not found after the restart; its next boot makes a new one",
                req.instance_uuid
            );
        }
    }

    /// Removes the VNIC of an instance that is gone (idempotent). With
    /// networking off there is nothing to remove.
    pub fn delete_vnic(&self, req: &VnicRequest) -> Result<Option<TenantEvent>, NetError> {
        let mut state = lock(&self.state);
        lock(&self.claims).retain(|c| c.instance_uuid != req.instance_uuid);
        match &mut *state {
            NetState::Up(net) => net.delete_vnic(req),
            NetState::Down(why) => Err(NetError::Config(format!(
                "tenant networking is down ({why}): the VNIC stays until -hard-reset"
            ))),
            NetState::Off => Ok(None),
        }
    }
}

impl VnicRequest {
    /// The VNIC of instance `cfg` (its START's networking, or its state
    /// file's at DELETE).
    pub fn of(cfg: &crate::payloads::config::InstanceConfig) -> VnicRequest {
        let n = &cfg.networking;
        VnicRequest {
            instance_uuid: cfg.instance_uuid.clone(),
            tenant_uuid: cfg.tenant_uuid.clone(),
            vnic_uuid: n.vnic_uuid.clone(),
            vnic_mac: n.vnic_mac.clone(),
            network_node: cfg.network_node,
            subnet: n.subnet.clone(),
            concentrator_uuid: n.concentrator_uuid.clone(),
            concentrator_ip: n.concentrator_ip.clone(),
            private_ip: n.private_ip.clone(),
            container: cfg.vm_type == crate::payloads::config::VmType::Docker,
        }
    }
}
