//! The kernel side: rtnetlink requests from blocking code, and the two
//! character devices (`/dev/net/tun`, `/dev/tap<ifindex>`).
//!
//! Messages are built and parsed with `netlink-packet-route`; the socket is
//! `netlink-sys`'s plain blocking `Socket` (no default features, so no
//! tokio/futures). One request at a time: send with `NLM_F_ACK`, read until
//! the kernel's ACK/NACK (or `NLMSG_DONE` for a dump). The caller owns the
//! [`Netlink`] value; it is not shared between threads.
//!
//! A netlink socket belongs to the network namespace of the thread that
//! opened it, which is what the namespace tests rely on.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    GreIOFlags, InfoBridge, InfoData, InfoGre, InfoKind, InfoMacVtap, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage, MacVtapMode,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::NetError;
use super::names::format_mac;

/// One link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The rtnetlink kind (`bridge`, `gretap`, `tun`, `veth`, …); `None` for
    /// a real NIC.
    pub kind: Option<String>,
    /// Interface alias; "" when none.
    pub alias: String,
    /// Index of the bridge (or bond) this link is enslaved to.
    pub master: Option<u32>,
    /// `aa:bb:…`; "" when the link has no hardware address.
    pub mac: String,
    pub is_loopback: bool,
    pub is_up: bool,
    /// IPv4 addresses with prefix length, in the kernel's order.
    pub ipv4: Vec<(Ipv4Addr, u8)>,
    /// Frames received so far (the kernel's 64-bit counter).
    pub rx_packets: u64,
}

/// An rtnetlink socket.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

const RECV_BUF: usize = 64 * 1024;

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NetError> {
        let err = |e: io::Error| NetError::kernel("open a netlink socket", e);
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
        socket.bind_auto().map_err(err)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        socket.set_ext_ack(true).ok();
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends one request and collects the answers until ACK or DONE. A NACK
    /// becomes the errno as an `io::Error`.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut rx = vec![0u8; RECV_BUF];
        loop {
            let n = self.socket.recv(&mut &mut rx[..], 0)?;
            let mut off = 0;
            while off < n {
                let answer: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&rx[off..n]).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {e}"))
                    })?;
                let len = answer.header.length as usize;
                if len == 0 {
                    break;
                }
                off += len;
                if answer.header.sequence_number != seq {
                    continue; // a late answer to an earlier request
                }
                match answer.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            None => Ok(out),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(msg, NLM_F_ACK | flags).map(|_| ())
    }

    /// Every link with its kind, alias, master, MAC and IPv4 addresses.
    pub fn links(&mut self) -> Result<Vec<Link>, NetError> {
        let answers = self
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )
            .map_err(|e| NetError::kernel("list links", e))?;
        let mut links: Vec<Link> = answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_of(&l)),
                _ => None,
            })
            .collect();
        let mut addr = AddressMessage::default();
        addr.header.family = AddressFamily::Inet;
        let answers = self
            .request(RouteNetlinkMessage::GetAddress(addr), NLM_F_DUMP)
            .map_err(|e| NetError::kernel("list addresses", e))?;
        for m in answers {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            let ip = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
            if let (Some(ip), Some(link)) =
                (ip, links.iter_mut().find(|l| l.index == a.header.index))
            {
                link.ipv4.push((ip, a.header.prefix_len));
            }
        }
        Ok(links)
    }

    fn new_link(&mut self, what: &str, attrs: Vec<LinkAttribute>) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.attributes = attrs;
        self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|e| NetError::kernel(what, e))
    }

    /// A new bridge `name`, down, no address.
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetError> {
        self.new_link(
            &format!("create bridge {name}"),
            vec![
                LinkAttribute::IfName(name.into()),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Bridge),
                    LinkInfo::Data(InfoData::Bridge(Vec::<InfoBridge>::new())),
                ]),
            ],
        )
    }

    /// A keyed Ethernet-over-GRE tunnel (same input and output key,
    /// path-MTU discovery on, TTL inherited). A kernel without GRE answers
    /// EOPNOTSUPP, reported as [`NetError::Unsupported`].
    pub fn create_gretap(
        &mut self,
        name: &str,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        key: u32,
    ) -> Result<(), NetError> {
        let r = self.new_link(
            &format!("create gretap {name}"),
            gretap_attributes(name, local, remote, key),
        );
        match r {
            Err(NetError::Kernel { errno, .. }) if errno == Some(libc_eopnotsupp()) => {
                Err(NetError::Unsupported(format!(
                    "create gretap {name}: this kernel has no GRE tunnel support \
                     (CONFIG_NET_IPGRE / ip_gre module missing)"
                )))
            }
            other => other,
        }
    }

    /// A veth pair (container VNICs; stand-in tunnels on kernels without
    /// GRE).
    pub fn create_veth(&mut self, name: &str, peer: &str) -> Result<(), NetError> {
        let mut p = LinkMessage::default();
        p.attributes = vec![LinkAttribute::IfName(peer.into())];
        self.new_link(
            &format!("create veth {name}/{peer}"),
            vec![
                LinkAttribute::IfName(name.into()),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Veth),
                    LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
                ]),
            ],
        )
    }

    /// A bridge-mode macvtap on `lower` with hardware address `mac` and
    /// txqueuelen 500.
    pub fn create_macvtap(&mut self, name: &str, lower: u32, mac: [u8; 6]) -> Result<(), NetError> {
        self.new_link(
            &format!("create macvtap {name}"),
            vec![
                LinkAttribute::IfName(name.into()),
                LinkAttribute::Link(lower),
                LinkAttribute::Address(mac.to_vec()),
                LinkAttribute::TxQueueLen(500),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::MacVtap),
                    LinkInfo::Data(InfoData::MacVtap(vec![InfoMacVtap::Mode(
                        MacVtapMode::Bridge,
                    )])),
                ]),
            ],
        )
    }

    fn set(&mut self, what: String, index: u32, attrs: Vec<LinkAttribute>) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes = attrs;
        self.ack(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(|e| NetError::kernel(&what, e))
    }

    pub fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), NetError> {
        self.set(
            format!("set alias of link {index}"),
            index,
            vec![LinkAttribute::IfAlias(alias.into())],
        )
    }

    pub fn set_master(&mut self, index: u32, master: u32) -> Result<(), NetError> {
        self.set(
            format!("enslave link {index} to {master}"),
            index,
            vec![LinkAttribute::Controller(master)],
        )
    }

    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetError> {
        self.set(
            format!("set address {} of link {index}", format_mac(&mac)),
            index,
            vec![LinkAttribute::Address(mac.to_vec())],
        )
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError> {
        self.set(
            format!("set MTU {mtu} of link {index}"),
            index,
            vec![LinkAttribute::Mtu(mtu)],
        )
    }

    /// Renames link `index` (it must be down).
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        self.set(
            format!("rename link {index} to {name}"),
            index,
            vec![LinkAttribute::IfName(name.into())],
        )
    }

    /// Moves link `index` into the network namespace open as `ns_fd`
    /// (`IFLA_NET_NS_FD`); it is gone from this namespace afterwards.
    pub fn move_to_netns(&mut self, index: u32, ns_fd: i32, what: &str) -> Result<(), NetError> {
        self.set(
            format!("move link {index} into {what}"),
            index,
            vec![LinkAttribute::NetNsFd(ns_fd)],
        )
    }

    /// Adds `ip/prefix` to link `index` (the kernel adds the subnet route).
    pub fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes = vec![
            AddressAttribute::Local(IpAddr::V4(ip)),
            AddressAttribute::Address(IpAddr::V4(ip)),
        ];
        self.ack(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| NetError::kernel(&format!("add address {ip}/{prefix} to link {index}"), e))
    }

    /// Adds the default route via `gateway` out of link `index` (main
    /// table, as `ip route add default via …`).
    pub fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), NetError> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes = vec![
            RouteAttribute::Gateway(RouteAddress::Inet(gateway)),
            RouteAttribute::Oif(index),
        ];
        self.ack(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|e| NetError::kernel(&format!("add default route via {gateway}"), e))
    }

    pub fn set_up(&mut self, index: u32) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.ack(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(|e| NetError::kernel(&format!("set link {index} up"), e))
    }

    /// Deletes link `index`; a link already gone is not an error.
    pub fn delete_link(&mut self, index: u32) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.ack(RouteNetlinkMessage::DelLink(m), 0) {
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(()),
            r => r.map_err(|e| NetError::kernel(&format!("delete link {index}"), e)),
        }
    }

    /// The link called `name`, if any (one fresh listing).
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetError> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }
}

/// The attributes of a keyed gretap: the same key both ways, path-MTU
/// discovery on, TTL 0 (inherit). The key goes out in network byte order
/// (the kernel's `__be32`), like `ip link … type gretap key N`.
fn gretap_attributes(
    name: &str,
    local: Ipv4Addr,
    remote: Ipv4Addr,
    key: u32,
) -> Vec<LinkAttribute> {
    vec![
        LinkAttribute::IfName(name.into()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::GreTap),
            LinkInfo::Data(InfoData::GreTap(vec![
                InfoGre::Local(local),
                InfoGre::Remote(remote),
                InfoGre::IFlags(GreIOFlags::Key),
                InfoGre::OFlags(GreIOFlags::Key),
                InfoGre::IKey(key),
                InfoGre::OKey(key),
                InfoGre::Ttl(0),
                InfoGre::PathMTUDiscovery(true),
            ])),
        ]),
    ]
}

fn libc_eopnotsupp() -> i32 {
    nix::libc::EOPNOTSUPP
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        is_loopback: m.header.flags.contains(LinkFlags::Loopback),
        is_up: m.header.flags.contains(LinkFlags::Up),
        ..Link::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::IfAlias(s) => l.alias = s.clone(),
            LinkAttribute::Controller(i) => l.master = Some(*i),
            LinkAttribute::Address(mac) => l.mac = format_mac(mac),
            LinkAttribute::Stats64(st) => l.rx_packets = st.rx_packets,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

// /dev/net/tun ioctls (linux/if_tun.h).
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
/// Refuse an existing device of that name instead of attaching to it.
const IFF_TUN_EXCL: i16 = -0x8000;
nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, nix::libc::ifreq);
nix::ioctl_write_int_bad!(tunsetpersist, 0x4004_54cb);

/// Creates the persistent tap `name` (multi-queue, no packet info, one
/// queue) and returns its queue fd, which QEMU inherits. Fails if any link
/// of that name exists (IFF_TUN_EXCL), never attaches to a foreign tap.
pub fn create_persistent_tap(name: &str) -> Result<File, NetError> {
    tap_ioctl(
        name,
        IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_TUN_EXCL,
        true,
    )
}

fn tap_ioctl(name: &str, flags: i16, persist: bool) -> Result<File, NetError> {
    let what = format!(
        "{} tap {name}",
        if persist { "create" } else { "attach to" }
    );
    if name.len() >= nix::libc::IFNAMSIZ {
        return Err(NetError::Invalid(format!("{what}: name too long")));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetError::kernel(&format!("{what}: open /dev/net/tun"), e))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as nix::libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: the fd is an open /dev/net/tun; req outlives the call.
    unsafe { tunsetiff(file.as_raw_fd(), &req) }
        .map_err(|e| NetError::kernel(&what, io::Error::from(e)))?;
    if !persist {
        return Ok(file);
    }
    // SAFETY: as above; the argument is an int.
    if let Err(e) = unsafe { tunsetpersist(file.as_raw_fd(), 1) } {
        // The device disappears with the fd as it is not persistent yet.
        return Err(NetError::kernel(
            &format!("{what}: persist"),
            io::Error::from(e),
        ));
    }
    Ok(file)
}

/// A new queue fd on our existing persistent tap `name` (a VM started
/// again, or a VNIC re-learned after a restart).
pub fn attach_tap(name: &str) -> Result<File, NetError> {
    tap_ioctl(name, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE, false)
}

/// Opens the character device of macvtap `ifindex` (`/dev/tap<ifindex>`,
/// made by devtmpfs or udev).
pub fn open_macvtap(ifindex: u32) -> Result<File, NetError> {
    let path = format!("/dev/tap{ifindex}");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| NetError::kernel(&format!("open {path}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn gretap_key_is_sent_big_endian() {
        let mut m = LinkMessage::default();
        m.attributes = gretap_attributes(
            "sgt_1",
            Ipv4Addr::new(10, 0, 0, 11),
            Ipv4Addr::new(192, 168, 42, 21),
            super::super::subnet_key(Ipv4Addr::new(192, 168, 8, 0)),
        );
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        // NLA header (length 8, type IFLA_GRE_IKEY 4 / OKEY 5, host order)
        // then the key as on the GRE wire: 00 08 a8 c0.
        let ikey = [
            &8u16.to_ne_bytes()[..],
            &4u16.to_ne_bytes(),
            &[0x00, 0x08, 0xa8, 0xc0],
        ]
        .concat();
        let okey = [
            &8u16.to_ne_bytes()[..],
            &5u16.to_ne_bytes(),
            &[0x00, 0x08, 0xa8, 0xc0],
        ]
        .concat();
        assert!(contains(&buf, &ikey), "{buf:02x?}");
        assert!(contains(&buf, &okey), "{buf:02x?}");
        // GRE_KEY flag, big-endian, both directions (IFLAGS 2 / OFLAGS 3).
        let iflags = [&6u16.to_ne_bytes()[..], &2u16.to_ne_bytes(), &[0x20, 0x00]].concat();
        assert!(contains(&buf, &iflags), "{buf:02x?}");
        assert!(contains(&buf, b"gretap\0"));
        assert!(contains(&buf, &[10, 0, 0, 11]) && contains(&buf, &[192, 168, 42, 21]));
    }
}
