//! The container end of a container VNIC: work done *inside* a container's
//! network namespace.
//!
//! # Why the CNI-like way
//! A container is created with Docker's network mode `none`; after every
//! start the launcher hands it its tenant NIC itself (this module and
//! [`NodeNetwork::plug_container_vnic`](super::NodeNetwork::plug_container_vnic)).
//! ciao instead served a libnetwork network + IPAM plugin over HTTP and made
//! one Docker network per bridge. Doing it ourselves needs no plugin HTTP
//! server (nor its discovery file and database), leaves no Docker network
//! objects to leak when a launcher dies between steps, and works on engines
//! started with `--bridge=none`. What a container sees is the same: `eth0`
//! with its MAC, address, MTU 1400 and default route via network + 1.
//!
//! # Plugging one container (node lock held)
//! 1. Open `/proc/<pid>/ns/net` once: the descriptor pins that namespace,
//!    so the move and the configuration below reach the same one even if
//!    the PID were reused meanwhile.
//! 2. Host side: the veth pair `svn_…`/`svp_…` exists (made by the node),
//!    the peer carries `vnic_mac` and MTU 1400; it is moved into the
//!    namespace by that descriptor (`IFLA_NET_NS_FD`).
//! 3. A short-lived thread `setns()`es into the namespace, opens its *own*
//!    rtnetlink socket there and renames the peer to `eth0`, sets it up,
//!    adds `ip/prefix` and the default route via the gateway.
//!
//! Why a thread of its own: `setns` moves only the calling thread, and a
//! netlink socket talks to the namespace its creator was in when it was
//! opened (the node's socket cannot see inside a container). Switching the
//! instance thread there and back could fail half-way and leave it in the
//! container's namespace; a thread that ends after the few requests cannot
//! leak its namespace to anything else.
//!
//! The kernel destroys a veth when either end's namespace dies: a stopped
//! container takes its pair (host end included) with it, so every start
//! makes a new pair with the same MAC and address.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use super::NetError;
use super::netlink::Netlink;

/// The name of the tenant NIC inside a container.
pub const CONTAINER_NIC: &str = "eth0";
/// MTU of both ends of a container VNIC (room for the GRE header).
pub const CONTAINER_MTU: u32 = 1400;

/// A container's network namespace, pinned by a descriptor.
#[derive(Debug)]
pub struct ContainerNetns {
    pid: u32,
    file: File,
}

impl ContainerNetns {
    /// The network namespace of process `pid` (a container's init).
    pub fn of_pid(pid: u32) -> Result<ContainerNetns, NetError> {
        if pid == 0 {
            return Err(NetError::Invalid(
                "container has no process (PID 0): is it running?".into(),
            ));
        }
        let path = format!("/proc/{pid}/ns/net");
        let file = File::open(&path).map_err(|e| NetError::kernel(&format!("open {path}"), e))?;
        Ok(ContainerNetns { pid, file })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `f` with a netlink socket inside the namespace, on a thread of
    /// its own (module docs: why).
    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Netlink) -> Result<R, NetError> + Send + 'static,
    ) -> Result<R, NetError> {
        let ns = self
            .file
            .try_clone()
            .map_err(|e| NetError::kernel("duplicate the namespace descriptor", e))?;
        let pid = self.pid;
        let thread = std::thread::Builder::new()
            .name(format!("netns-{pid}"))
            .spawn(move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |e| {
                        NetError::kernel(
                            &format!("enter the network namespace of process {pid}"),
                            std::io::Error::from(e),
                        )
                    },
                )?;
                let mut nl = Netlink::open()?;
                f(&mut nl)
            })
            .map_err(|e| NetError::kernel("start the namespace thread", e))?;
        thread.join().unwrap_or_else(|_| {
            Err(NetError::Invalid(format!(
                "the thread configuring the namespace of process {pid} panicked"
            )))
        })
    }

    /// Step 3: link `peer` (already moved in) becomes `eth0`, up, with
    /// `ip/prefix` and the default route via `gateway`.
    pub(crate) fn configure(
        &self,
        peer: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        let peer = peer.to_string();
        self.run(move |nl| {
            let link = nl.link_by_name(&peer)?.ok_or_else(|| {
                NetError::Invalid(format!("{peer} did not arrive in the container"))
            })?;
            nl.set_name(link.index, CONTAINER_NIC)?;
            nl.set_up(link.index)?;
            nl.add_address(link.index, ip, prefix)?;
            nl.add_default_route(link.index, gateway)
        })
    }

    /// Whether the namespace has its tenant NIC: `eth0` with `mac`, up.
    /// The launcher asks after a restart (its own or dockerd's) whether a
    /// running container still has it.
    pub fn has_nic(&self, mac: [u8; 6]) -> Result<bool, NetError> {
        let mac = super::format_mac(&mac);
        self.run(move |nl| {
            Ok(nl
                .links()?
                .iter()
                .any(|l| l.name == CONTAINER_NIC && l.mac == mac && l.is_up))
        })
    }
}
