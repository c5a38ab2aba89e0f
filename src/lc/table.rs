//! The tables `ciao-lc list` and `ciao-lc stats` print, from what `serve`
//! knows of each launcher.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::serve::NodeView;
use crate::ssntp::frame::Uuid16;

/// Human units for MB figures (−1 = unknown).
fn human_mb(mb: i64) -> String {
    match mb {
        m if m < 0 => "-".into(),
        m if m >= 10 * 1024 => format!("{:.1} GiB", m as f64 / 1024.0),
        m => format!("{m} MiB"),
    }
}

/// `ssh_ip:ssh_port` of a STATS instance, `-` when it reports none.
fn ssh_column(ip: &str, port: i64) -> String {
    match (ip, port) {
        ("", _) | (_, ..=0) => "-".into(),
        (ip, port) if ip.contains(':') => format!("[{ip}]:{port}"),
        (ip, port) => format!("{ip}:{port}"),
    }
}

/// The VNIC column: `private_ip mac` of the START that `serve` sent (STATS
/// do not carry them), `-` for an instance without tenant networking.
fn vnic_column(vnics: &BTreeMap<String, (String, String)>, instance: &str) -> String {
    match vnics.get(instance) {
        Some((ip, mac)) if !ip.is_empty() => format!("{ip} {mac}"),
        Some((_, mac)) if !mac.is_empty() => format!("- {mac}"),
        _ => "-".into(),
    }
}

/// `vnics`: instance → (private IP, MAC) of the STARTs sent.
pub fn list_table(
    nodes: &BTreeMap<Uuid16, NodeView>,
    vnics: &BTreeMap<String, (String, String)>,
) -> String {
    let mut out = format!(
        "{:<36}  {:<36}  {:<8}  {:>10}  {:>10}  {:>4}  {:<21}  {}\n",
        "NODE", "INSTANCE", "STATE", "MEMORY", "DISK", "CPU%", "SSH", "VNIC"
    );
    for (u, n) in nodes {
        let Some(stats) = &n.stats else { continue };
        for i in &stats.instances {
            let cpu = if i.cpu_usage < 0 {
                "-".into()
            } else {
                i.cpu_usage.to_string()
            };
            let _ = writeln!(
                out,
                "{:<36}  {:<36}  {:<8}  {:>10}  {:>10}  {:>4}  {:<21}  {}",
                uuid::Uuid::from_bytes(*u),
                i.instance_uuid,
                i.state,
                human_mb(i.memory_usage_mb),
                human_mb(i.disk_usage_mb),
                cpu,
                ssh_column(&i.ssh_ip, i.ssh_port),
                vnic_column(vnics, &i.instance_uuid)
            );
        }
    }
    out
}

pub fn stats_table(nodes: &BTreeMap<Uuid16, NodeView>) -> String {
    let mut out = format!(
        "{:<36}  {:<16}  {:<21}  {:<11}  {:>21}  {:>21}  {:>4}  {:>4}  {:>9}\n",
        "NODE",
        "ROLE",
        "ADDRESS",
        "STATUS",
        "MEMORY avail/total",
        "DISK avail/total",
        "LOAD",
        "CPUS",
        "INSTANCES"
    );
    for (u, n) in nodes {
        let status = n.status.map_or("-".to_string(), |s| s.to_string());
        let (mem, disk, load, cpus, count) = match &n.stats {
            Some(st) => (
                format!(
                    "{} / {}",
                    human_mb(st.node.mem_available_mb),
                    human_mb(st.node.mem_total_mb)
                ),
                format!(
                    "{} / {}",
                    human_mb(st.node.disk_available_mb),
                    human_mb(st.node.disk_total_mb)
                ),
                st.node.load.to_string(),
                st.node.cpus_online.to_string(),
                st.instances.len().to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<16}  {:<21}  {:<11}  {:>21}  {:>21}  {:>4}  {:>4}  {:>9}",
            uuid::Uuid::from_bytes(*u),
            n.role.to_string(),
            n.peer,
            status,
            mem,
            disk,
            load,
            cpus,
            count
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payloads::outgoing::{InstanceStat, NodeStatus, Stats};
    use crate::ssntp::{Role, Status};

    const NODE: Uuid16 = [0x11; 16];
    const NODE_TEXT: &str = "11111111-1111-1111-1111-111111111111";

    fn node(stats: Option<Stats>) -> BTreeMap<Uuid16, NodeView> {
        BTreeMap::from([(
            NODE,
            NodeView {
                role: Role::AGENT,
                peer: "127.0.0.1:40000".into(),
                status: stats.as_ref().map(|_| Status::Ready),
                stats,
            },
        )])
    }

    fn stats() -> Stats {
        Stats {
            node: NodeStatus {
                node_uuid: NODE_TEXT.into(),
                mem_total_mb: 16_000,
                mem_available_mb: 9_000,
                disk_total_mb: 500,
                disk_available_mb: -1,
                load: 2,
                cpus_online: 4,
                hostname: String::new(),
                networks: Vec::new(),
            },
            status: "READY".into(),
            instances: vec![InstanceStat {
                instance_uuid: "22222222-2222-2222-2222-222222222222".into(),
                state: "running".into(),
                ssh_ip: String::new(),
                ssh_port: 0,
                memory_usage_mb: 128,
                disk_usage_mb: -1,
                cpu_usage: -1,
                volumes: Vec::new(),
            }],
        }
    }

    #[test]
    fn ssh_column_shows_the_reported_address_or_a_dash() {
        assert_eq!(ssh_column("127.0.0.1", 40022), "127.0.0.1:40022");
        assert_eq!(ssh_column("192.168.42.21", 35050), "192.168.42.21:35050");
        assert_eq!(ssh_column("::1", 22), "[::1]:22");
        assert_eq!(ssh_column("", 0), "-");
        assert_eq!(ssh_column("", 35050), "-");
        assert_eq!(ssh_column("192.168.42.21", 0), "-");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_mb(-1), "-");
        assert_eq!(human_mb(0), "0 MiB");
        assert_eq!(human_mb(10 * 1024 - 1), "10239 MiB");
        assert_eq!(human_mb(10 * 1024), "10.0 GiB");
        assert_eq!(human_mb(16_000), "15.6 GiB");
    }

    #[test]
    fn list_has_a_header_and_a_row_per_instance() {
        let none = BTreeMap::new();
        let text = list_table(&node(Some(stats())), &none);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("NODE") && lines[0].ends_with("SSH                    VNIC"),
            "{text}"
        );
        let row = format!(
            "{NODE_TEXT}  22222222-2222-2222-2222-222222222222  running      128 MiB           -     -  -                    "
        );
        assert_eq!(lines[1], format!("{row}  -"));
        let vnics = BTreeMap::from([(
            "22222222-2222-2222-2222-222222222222".to_string(),
            ("172.16.0.2".to_string(), "02:00:ac:10:00:02".to_string()),
        )]);
        let text = list_table(&node(Some(stats())), &vnics);
        assert_eq!(
            text.lines().nth(1),
            Some(format!("{row}  172.16.0.2 02:00:ac:10:00:02").as_str())
        );
        // A launcher without STATS yet has no rows.
        assert_eq!(list_table(&node(None), &none).lines().count(), 1);
    }

    #[test]
    fn stats_has_a_row_per_launcher() {
        let text = stats_table(&node(Some(stats())));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("NODE") && lines[0].ends_with("INSTANCES"));
        let row: Vec<&str> = lines[1]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            row,
            [
                NODE_TEXT,
                "CNAgent",
                "127.0.0.1:40000",
                "READY",
                "9000 MiB / 15.6 GiB",
                "- / 500 MiB",
                "2",
                "4",
                "1"
            ]
        );
        let empty = stats_table(&node(None));
        assert!(
            empty.lines().nth(1).is_some_and(|l| l.ends_with("    -")),
            "{empty}"
        );
    }
}
