//! The kernel side: rtnetlink requests from blocking code, and the two
//! character devices (`/dev/net/tun`, `/dev/tap<ifindex>`).
//!
//! # rtnetlink, as this module speaks it
//!
//! The few messages tenant networking needs are built and read here by
//! hand (docs/networking.md, "rtnetlink"), on a plain blocking
//! `AF_NETLINK`/`NETLINK_ROUTE` socket: a general-purpose netlink library
//! parses every attribute the kernel knows and was the largest part of the
//! release binary. One request at a time:
//!
//! 1. A request is a 16-byte `nlmsghdr` (length, type, flags, sequence,
//!    port 0), the family header of its type (`ifinfomsg` 16 bytes,
//!    `ifaddrmsg` 8, `rtmsg` 12), then attributes: a 4-byte `nlattr`
//!    (length, type) and the value, each padded to 4 bytes. Nested
//!    attributes (`IFLA_LINKINFO`, its `IFLA_INFO_DATA`) are attributes whose
//!    value is attributes. Integers are host order, except the GRE flags and
//!    keys, which the kernel takes in network order (`__be16`/`__be32`).
//! 2. Changes are sent with `NLM_F_ACK` and read until the answer with our
//!    sequence number is an `NLMSG_ERROR`: error 0 is the ACK, a negative
//!    value is the errno of the refusal.
//! 3. Listings (`NLM_F_DUMP`) are read until `NLMSG_DONE`; each answer
//!    datagram holds several messages, each one's length in its header.
//!
//! Answers to an earlier request (another sequence number) are skipped.
//! The caller owns the [`Netlink`] value; it is not shared between threads.
//!
//! A netlink socket belongs to the network namespace of the thread that
//! opened it, which is what the namespace tests rely on.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, connect, recv,
    send, socket,
};

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

/// The numbers of linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
/// linux/if_addr.h and linux/if_tunnel.h that this module uses.
mod abi {
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLM_F_EXCL: u16 = 0x200;
    pub const NLM_F_CREATE: u16 = 0x400;
    /// The nested/byte-order bits of an attribute type.
    pub const NLA_TYPE_MASK: u16 = 0x3fff;

    pub const RTM_NEWLINK: u16 = 16;
    pub const RTM_DELLINK: u16 = 17;
    pub const RTM_GETLINK: u16 = 18;
    pub const RTM_SETLINK: u16 = 19;
    pub const RTM_NEWADDR: u16 = 20;
    pub const RTM_GETADDR: u16 = 22;
    pub const RTM_NEWROUTE: u16 = 24;

    pub const AF_INET: u8 = 2;
    pub const IFF_UP: u32 = 0x1;
    pub const IFF_LOOPBACK: u32 = 0x8;

    pub const IFLA_ADDRESS: u16 = 1;
    pub const IFLA_IFNAME: u16 = 3;
    pub const IFLA_MTU: u16 = 4;
    pub const IFLA_LINK: u16 = 5;
    pub const IFLA_MASTER: u16 = 10;
    pub const IFLA_TXQLEN: u16 = 13;
    pub const IFLA_LINKINFO: u16 = 18;
    pub const IFLA_IFALIAS: u16 = 20;
    pub const IFLA_STATS64: u16 = 23;
    pub const IFLA_NET_NS_FD: u16 = 28;
    pub const IFLA_INFO_KIND: u16 = 1;
    pub const IFLA_INFO_DATA: u16 = 2;
    pub const VETH_INFO_PEER: u16 = 1;
    pub const IFLA_MACVLAN_MODE: u16 = 1;
    pub const MACVLAN_MODE_BRIDGE: u32 = 4;
    pub const IFLA_GRE_IFLAGS: u16 = 2;
    pub const IFLA_GRE_OFLAGS: u16 = 3;
    pub const IFLA_GRE_IKEY: u16 = 4;
    pub const IFLA_GRE_OKEY: u16 = 5;
    pub const IFLA_GRE_LOCAL: u16 = 6;
    pub const IFLA_GRE_REMOTE: u16 = 7;
    pub const IFLA_GRE_TTL: u16 = 8;
    pub const IFLA_GRE_PMTUDISC: u16 = 10;
    /// `GRE_KEY` of the GRE header's flags word.
    pub const GRE_KEY: u16 = 0x2000;

    pub const IFA_ADDRESS: u16 = 1;
    pub const IFA_LOCAL: u16 = 2;

    pub const RTA_OIF: u16 = 4;
    pub const RTA_GATEWAY: u16 = 5;
    pub const RT_TABLE_MAIN: u8 = 254;
    pub const RTPROT_BOOT: u8 = 3;
    pub const RT_SCOPE_UNIVERSE: u8 = 0;
    pub const RTN_UNICAST: u8 = 1;

    pub const NLMSG_HDRLEN: usize = 16;
    pub const IFINFOMSG_LEN: usize = 16;
    pub const IFADDRMSG_LEN: usize = 8;
}
use abi::*;

/// One request being built: the header, the family header, attributes.
struct Request {
    buf: Vec<u8>,
}

impl Request {
    /// A request of `kind` whose family header is `family` (already in its
    /// wire form).
    fn new(kind: u16, flags: u16, family: &[u8]) -> Request {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
        buf.extend_from_slice(family);
        pad(&mut buf);
        Request { buf }
    }

    fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Request {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        pad(&mut self.buf);
        self
    }

    fn u32(&mut self, kind: u16, value: u32) -> &mut Request {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel's `NLA_STRING` policy takes.
    fn str(&mut self, kind: u16, value: &str) -> &mut Request {
        self.attr(kind, &nul_terminated(value))
    }

    /// Opens a nested attribute; `end` closes it.
    fn begin(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.attr(kind, &[]);
        at
    }

    fn end(&mut self, at: usize) -> &mut Request {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// An `ifinfomsg`: family unspecified, the link's index, flags and the
/// mask of the flags to change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut m = [0u8; IFINFOMSG_LEN];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// An `ifaddrmsg` for IPv4.
fn ifaddrmsg(prefix: u8, index: u32) -> [u8; IFADDRMSG_LEN] {
    let mut m = [0u8; IFADDRMSG_LEN];
    m[0] = AF_INET;
    m[1] = prefix;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m
}

/// The attributes in `buf`, as (type without the nested/byte-order bits,
/// value). A truncated attribute ends the walk.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
        Some((kind, value))
    })
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

/// A string attribute without its NUL.
fn str_of(v: &[u8]) -> String {
    let v = v.split(|b| *b == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(v).into_owned()
}

/// An rtnetlink socket.
#[derive(Debug)]
pub struct Netlink {
    socket: OwnedFd,
    seq: u32,
    rx: Vec<u8>,
}

/// Larger than any answer datagram the kernel sends for a dump (it fills
/// at most a page-sized multiple, 32 KiB) or an error (the request echoed).
const RECV_BUF: usize = 64 * 1024;

fn bad_answer(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NetError> {
        let err = |e: nix::Error| NetError::kernel("open a netlink socket", io::Error::from(e));
        let socket = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(err)?;
        // Port 0: the kernel picks ours; the peer is the kernel (port 0).
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(err)?;
        connect(socket.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(err)?;
        Ok(Netlink {
            socket,
            seq: 0,
            rx: vec![0u8; RECV_BUF],
        })
    }

    /// Sends `req` and reads its answers (steps 2 and 3 of the module doc).
    /// `on_message` sees every answer message of a dump (type, body after
    /// the `nlmsghdr`). A refusal becomes its errno as an `io::Error`.
    fn exchange(&mut self, req: Request, mut on_message: impl FnMut(u16, &[u8])) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let buf = req.finish(seq);
        let dump = u16::from_ne_bytes([buf[6], buf[7]]) & NLM_F_DUMP == NLM_F_DUMP;
        send(self.socket.as_raw_fd(), &buf, MsgFlags::empty()).map_err(io::Error::from)?;
        loop {
            let n = recv(self.socket.as_raw_fd(), &mut self.rx, MsgFlags::empty())
                .map_err(io::Error::from)?;
            let mut datagram = &self.rx[..n.min(self.rx.len())];
            while datagram.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]])
                    as usize;
                if len < NLMSG_HDRLEN || len > datagram.len() {
                    return Err(bad_answer("message length out of bounds"));
                }
                let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
                let their_seq =
                    u32::from_ne_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
                let body = &datagram[NLMSG_HDRLEN..len];
                datagram = datagram.get((len + 3) & !3..).unwrap_or(&[]);
                if their_seq != seq {
                    continue; // a late answer to an earlier request
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or_else(|| bad_answer("short error message"))?;
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    NLMSG_DONE if dump => return Ok(()),
                    _ if dump => on_message(kind, body),
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, req: Request) -> io::Result<()> {
        self.exchange(req, |_, _| {})
    }

    /// Every link with its kind, alias, master, MAC and IPv4 addresses.
    pub fn links(&mut self) -> Result<Vec<Link>, NetError> {
        let mut links = Vec::new();
        self.exchange(
            Request::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0)),
            |kind, body| {
                if kind == RTM_NEWLINK
                    && let Some(link) = link_of(body)
                {
                    links.push(link);
                }
            },
        )
        .map_err(|e| NetError::kernel("list links", e))?;
        let mut addresses = Vec::new();
        self.exchange(
            Request::new(RTM_GETADDR, NLM_F_DUMP, &ifaddrmsg(0, 0)),
            |kind, body| {
                if kind == RTM_NEWADDR
                    && let Some(a) = address_of(body)
                {
                    addresses.push(a);
                }
            },
        )
        .map_err(|e| NetError::kernel("list addresses", e))?;
        for (index, ip, prefix) in addresses {
            if let Some(link) = links.iter_mut().find(|l| l.index == index) {
                link.ipv4.push((ip, prefix));
            }
        }
        Ok(links)
    }

    fn new_link(&mut self, what: &str, req: Request) -> Result<(), NetError> {
        self.ack(req).map_err(|e| NetError::kernel(what, e))
    }

    /// A new bridge `name`, down, no address.
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetError> {
        let mut req = new_link_request(name);
        let info = req.begin(IFLA_LINKINFO);
        req.str(IFLA_INFO_KIND, "bridge").end(info);
        self.new_link(&format!("create bridge {name}"), req)
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
            gretap_request(name, local, remote, key),
        );
        match r {
            Err(NetError::Kernel { errno, .. }) if errno == Some(nix::libc::EOPNOTSUPP) => {
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
        let mut req = new_link_request(name);
        let info = req.begin(IFLA_LINKINFO);
        req.str(IFLA_INFO_KIND, "veth");
        let data = req.begin(IFLA_INFO_DATA);
        // The peer is an ifinfomsg and its own attributes.
        let p = req.begin(VETH_INFO_PEER);
        req.buf.extend_from_slice(&ifinfomsg(0, 0, 0));
        req.str(IFLA_IFNAME, peer).end(p).end(data).end(info);
        self.new_link(&format!("create veth {name}/{peer}"), req)
    }

    /// A bridge-mode macvtap on `lower` with hardware address `mac` and
    /// txqueuelen 500.
    pub fn create_macvtap(&mut self, name: &str, lower: u32, mac: [u8; 6]) -> Result<(), NetError> {
        let mut req = new_link_request(name);
        req.u32(IFLA_LINK, lower)
            .attr(IFLA_ADDRESS, &mac)
            .u32(IFLA_TXQLEN, 500);
        let info = req.begin(IFLA_LINKINFO);
        req.str(IFLA_INFO_KIND, "macvtap");
        let data = req.begin(IFLA_INFO_DATA);
        req.u32(IFLA_MACVLAN_MODE, MACVLAN_MODE_BRIDGE)
            .end(data)
            .end(info);
        self.new_link(&format!("create macvtap {name}"), req)
    }

    /// An `RTM_SETLINK` of link `index` with one attribute.
    fn set(&mut self, what: String, index: u32, kind: u16, value: &[u8]) -> Result<(), NetError> {
        let mut req = Request::new(RTM_SETLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0));
        req.attr(kind, value);
        self.ack(req).map_err(|e| NetError::kernel(&what, e))
    }

    pub fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), NetError> {
        self.set(
            format!("set alias of link {index}"),
            index,
            IFLA_IFALIAS,
            &nul_terminated(alias),
        )
    }

    pub fn set_master(&mut self, index: u32, master: u32) -> Result<(), NetError> {
        self.set(
            format!("enslave link {index} to {master}"),
            index,
            IFLA_MASTER,
            &master.to_ne_bytes(),
        )
    }

    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetError> {
        self.set(
            format!("set address {} of link {index}", format_mac(&mac)),
            index,
            IFLA_ADDRESS,
            &mac,
        )
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError> {
        self.set(
            format!("set MTU {mtu} of link {index}"),
            index,
            IFLA_MTU,
            &mtu.to_ne_bytes(),
        )
    }

    /// Renames link `index` (it must be down).
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        self.set(
            format!("rename link {index} to {name}"),
            index,
            IFLA_IFNAME,
            &nul_terminated(name),
        )
    }

    /// Moves link `index` into the network namespace open as `ns_fd`
    /// (`IFLA_NET_NS_FD`); it is gone from this namespace afterwards.
    pub fn move_to_netns(&mut self, index: u32, ns_fd: i32, what: &str) -> Result<(), NetError> {
        self.set(
            format!("move link {index} into {what}"),
            index,
            IFLA_NET_NS_FD,
            &ns_fd.to_ne_bytes(),
        )
    }

    /// Adds `ip/prefix` to link `index` (the kernel adds the subnet route).
    pub fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let mut req = Request::new(
            RTM_NEWADDR,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &ifaddrmsg(prefix, index),
        );
        req.attr(IFA_LOCAL, &ip.octets())
            .attr(IFA_ADDRESS, &ip.octets());
        self.ack(req)
            .map_err(|e| NetError::kernel(&format!("add address {ip}/{prefix} to link {index}"), e))
    }

    /// Adds the default route via `gateway` out of link `index` (main
    /// table, as `ip route add default via …`).
    pub fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), NetError> {
        // rtmsg: family, dst_len 0, src_len 0, tos 0, table, protocol,
        // scope, type, flags 0.
        let rtmsg = [
            AF_INET,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        let mut req = Request::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &rtmsg);
        req.attr(RTA_GATEWAY, &gateway.octets()).u32(RTA_OIF, index);
        self.ack(req)
            .map_err(|e| NetError::kernel(&format!("add default route via {gateway}"), e))
    }

    pub fn set_up(&mut self, index: u32) -> Result<(), NetError> {
        let req = Request::new(RTM_SETLINK, NLM_F_ACK, &ifinfomsg(index, IFF_UP, IFF_UP));
        self.ack(req)
            .map_err(|e| NetError::kernel(&format!("set link {index} up"), e))
    }

    /// Deletes link `index`; a link already gone is not an error.
    pub fn delete_link(&mut self, index: u32) -> Result<(), NetError> {
        let req = Request::new(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0));
        match self.ack(req) {
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(()),
            r => r.map_err(|e| NetError::kernel(&format!("delete link {index}"), e)),
        }
    }

    /// The link called `name`, if any (one fresh listing).
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetError> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// An `RTM_NEWLINK` that creates `name` and refuses an existing one.
fn new_link_request(name: &str) -> Request {
    let mut req = Request::new(
        RTM_NEWLINK,
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        &ifinfomsg(0, 0, 0),
    );
    req.str(IFLA_IFNAME, name);
    req
}

/// A keyed gretap: the same key both ways, path-MTU discovery on, TTL 0
/// (inherit). Flags and key go out in network byte order (the kernel's
/// `__be16`/`__be32`), like `ip link … type gretap key N`.
fn gretap_request(name: &str, local: Ipv4Addr, remote: Ipv4Addr, key: u32) -> Request {
    let mut req = new_link_request(name);
    let info = req.begin(IFLA_LINKINFO);
    req.str(IFLA_INFO_KIND, "gretap");
    let data = req.begin(IFLA_INFO_DATA);
    req.attr(IFLA_GRE_LOCAL, &local.octets())
        .attr(IFLA_GRE_REMOTE, &remote.octets())
        .attr(IFLA_GRE_IFLAGS, &GRE_KEY.to_be_bytes())
        .attr(IFLA_GRE_OFLAGS, &GRE_KEY.to_be_bytes())
        .attr(IFLA_GRE_IKEY, &key.to_be_bytes())
        .attr(IFLA_GRE_OKEY, &key.to_be_bytes())
        .attr(IFLA_GRE_TTL, &[0])
        .attr(IFLA_GRE_PMTUDISC, &[1])
        .end(data)
        .end(info);
    req
}

/// A link of an `RTM_NEWLINK` answer (`body` after the `nlmsghdr`).
fn link_of(body: &[u8]) -> Option<Link> {
    let header = body.get(..IFINFOMSG_LEN)?;
    let flags = u32_of(&header[8..12])?;
    let mut l = Link {
        index: u32_of(&header[4..8])?,
        is_loopback: flags & IFF_LOOPBACK != 0,
        is_up: flags & IFF_UP != 0,
        ..Link::default()
    };
    for (kind, value) in attrs(body.get(IFINFOMSG_LEN..)?) {
        match kind {
            IFLA_IFNAME => l.name = str_of(value),
            IFLA_IFALIAS => l.alias = str_of(value),
            IFLA_MASTER => l.master = u32_of(value),
            IFLA_ADDRESS => l.mac = format_mac(value),
            // rtnl_link_stats64 starts with rx_packets.
            IFLA_STATS64 => {
                if let Some(v) = value.get(..8) {
                    l.rx_packets = u64::from_ne_bytes(v.try_into().ok()?);
                }
            }
            IFLA_LINKINFO => {
                for (k, v) in attrs(value) {
                    if k == IFLA_INFO_KIND {
                        l.kind = Some(str_of(v));
                    }
                }
            }
            _ => {}
        }
    }
    Some(l)
}

/// (link index, IPv4 address, prefix length) of an `RTM_NEWADDR` answer:
/// the local address, or the address on links that have no peer.
fn address_of(body: &[u8]) -> Option<(u32, Ipv4Addr, u8)> {
    let header = body.get(..IFADDRMSG_LEN)?;
    if header[0] != AF_INET {
        return None;
    }
    let ipv4 = |v: &[u8]| -> Option<Ipv4Addr> {
        let o: [u8; 4] = v.try_into().ok()?;
        Some(Ipv4Addr::from(o))
    };
    let (mut local, mut address) = (None, None);
    for (kind, value) in attrs(body.get(IFADDRMSG_LEN..)?) {
        match kind {
            IFA_LOCAL => local = ipv4(value),
            IFA_ADDRESS => address = ipv4(value),
            _ => {}
        }
    }
    Some((u32_of(&header[4..8])?, local.or(address)?, header[1]))
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

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = [
            &((4 + value.len()) as u16).to_ne_bytes()[..],
            &kind.to_ne_bytes(),
            value,
        ]
        .concat();
        pad(&mut v);
        v
    }

    #[test]
    fn gretap_key_is_sent_big_endian() {
        let buf = gretap_request(
            "sgt_1",
            Ipv4Addr::new(10, 0, 0, 11),
            Ipv4Addr::new(192, 168, 42, 21),
            super::super::subnet_key(Ipv4Addr::new(192, 168, 8, 0)),
        )
        .finish(7);
        // The header: total length, RTM_NEWLINK, request|ack|create|excl, seq.
        assert_eq!(u32_of(&buf[0..4]), Some(buf.len() as u32));
        assert_eq!(&buf[4..6], &RTM_NEWLINK.to_ne_bytes());
        assert_eq!(&buf[6..8], &0x605u16.to_ne_bytes());
        assert_eq!(u32_of(&buf[8..12]), Some(7));
        // IKEY 4 / OKEY 5 (host-order NLA header), the key as on the GRE
        // wire: 00 08 a8 c0.
        assert!(
            contains(&buf, &nla(4, &[0x00, 0x08, 0xa8, 0xc0])),
            "{buf:02x?}"
        );
        assert!(
            contains(&buf, &nla(5, &[0x00, 0x08, 0xa8, 0xc0])),
            "{buf:02x?}"
        );
        // GRE_KEY flag, big-endian, both directions (IFLAGS 2 / OFLAGS 3).
        assert!(contains(&buf, &nla(2, &[0x20, 0x00])), "{buf:02x?}");
        assert!(contains(&buf, &nla(3, &[0x20, 0x00])), "{buf:02x?}");
        assert!(contains(&buf, &nla(IFLA_INFO_KIND, b"gretap\0")));
        assert!(contains(&buf, &nla(6, &[10, 0, 0, 11])));
        assert!(contains(&buf, &nla(7, &[192, 168, 42, 21])));
    }

    #[test]
    fn nested_lengths_cover_their_contents() {
        let buf = new_link_request("a").finish(1);
        let mut req = Request { buf };
        let info = req.begin(IFLA_LINKINFO);
        req.str(IFLA_INFO_KIND, "veth");
        let data = req.begin(IFLA_INFO_DATA);
        req.u32(9, 1).end(data).end(info);
        let body = &req.buf[NLMSG_HDRLEN + IFINFOMSG_LEN..];
        let all: Vec<_> = attrs(body).collect();
        assert_eq!(all[0], (IFLA_IFNAME, &b"a\0"[..]));
        assert_eq!(all[1].0, IFLA_LINKINFO);
        let inner: Vec<_> = attrs(all[1].1).collect();
        assert_eq!(inner[0], (IFLA_INFO_KIND, &b"veth\0"[..]));
        assert_eq!(inner[1].0, IFLA_INFO_DATA);
        assert_eq!(
            attrs(inner[1].1).collect::<Vec<_>>(),
            [(9, &1u32.to_ne_bytes()[..])]
        );
    }

    #[test]
    fn a_link_answer_is_read() {
        let mut body = ifinfomsg(7, IFF_UP, 0).to_vec();
        body.extend(nla(IFLA_IFNAME, b"sbr_x\0"));
        body.extend(nla(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]));
        body.extend(nla(IFLA_MASTER, &3u32.to_ne_bytes()));
        body.extend(nla(IFLA_IFALIAS, b"alias\0"));
        body.extend(nla(
            IFLA_STATS64,
            &[&42u64.to_ne_bytes()[..], &[0; 8]].concat(),
        ));
        // Nested, with the kernel's NLA_F_NESTED bit.
        let kind = nla(IFLA_INFO_KIND, b"bridge\0");
        body.extend(nla(IFLA_LINKINFO | 0x8000, &kind));
        let l = link_of(&body).expect("a link");
        assert_eq!(l.index, 7);
        assert!(l.is_up && !l.is_loopback);
        assert_eq!(l.name, "sbr_x");
        assert_eq!(l.mac, "02:00:00:00:00:01");
        assert_eq!(l.master, Some(3));
        assert_eq!(l.alias, "alias");
        assert_eq!(l.rx_packets, 42);
        assert_eq!(l.kind.as_deref(), Some("bridge"));
    }

    #[test]
    fn damaged_answers_are_not_read_past_their_end() {
        // An attribute claiming more bytes than there are ends the walk.
        let mut body = ifinfomsg(1, 0, 0).to_vec();
        body.extend(nla(IFLA_IFNAME, b"lo\0"));
        body.extend([200, 0, 3, 0, b'x']);
        let l = link_of(&body).expect("a link");
        assert_eq!(l.name, "lo");
        assert!(link_of(&[0; 10]).is_none());
        // An address answer: the local address wins over the peer's.
        let mut a = ifaddrmsg(24, 5).to_vec();
        a.extend(nla(IFA_ADDRESS, &[10, 0, 0, 9]));
        a.extend(nla(IFA_LOCAL, &[10, 0, 0, 2]));
        assert_eq!(address_of(&a), Some((5, Ipv4Addr::new(10, 0, 0, 2), 24)));
        a.truncate(IFADDRMSG_LEN + 4);
        assert_eq!(address_of(&a), None);
    }
}
