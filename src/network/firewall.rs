//! The one filter rule per tenant bridge: `FORWARD -p all -i sbr_… -j ACCEPT`.
//!
//! We run the node's `iptables` command (`-w` waits for the xtables lock)
//! rather than speaking nf_tables netlink: the rule must sit in the same
//! FORWARD chain that the node's own iptables (legacy or nft backend) and
//! Docker manage, which only that command reliably finds, and it runs once
//! per subnet, not per packet or per VNIC. `nft` would need a table of our
//! own whose verdict does not override another table's drop.

use std::process::Command;

use super::NetError;
use super::names::{DeviceRole, is_device_name};

fn iptables(args: &[&str]) -> Result<std::process::Output, NetError> {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| NetError::Firewall(format!("run iptables {}: {e}", args.join(" "))))
}

fn rule(bridge: &str) -> [&str; 7] {
    ["-p", "all", "-i", bridge, "-j", "ACCEPT", ""]
}

/// Appends the accept rule for `bridge` unless it is already there.
pub fn add_forward_rule(bridge: &str) -> Result<(), NetError> {
    let r = rule(bridge);
    let mut check = vec!["-C", "FORWARD"];
    check.extend_from_slice(&r[..6]);
    if iptables(&check)?.status.success() {
        return Ok(());
    }
    let mut add = vec!["-A", "FORWARD"];
    add.extend_from_slice(&r[..6]);
    let out = iptables(&add)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Firewall(format!(
            "iptables -A FORWARD -i {bridge} -j ACCEPT: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Deletes the accept rule for `bridge`; absent is fine.
pub fn delete_forward_rule(bridge: &str) -> Result<(), NetError> {
    let r = rule(bridge);
    let mut check = vec!["-C", "FORWARD"];
    check.extend_from_slice(&r[..6]);
    while iptables(&check)?.status.success() {
        let mut del = vec!["-D", "FORWARD"];
        del.extend_from_slice(&r[..6]);
        let out = iptables(&del)?;
        if !out.status.success() {
            return Err(NetError::Firewall(format!(
                "iptables -D FORWARD -i {bridge} -j ACCEPT: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// The bridges named in FORWARD accept rules of our exact shape.
pub fn our_forward_rules() -> Result<Vec<String>, NetError> {
    let out = iptables(&["-S", "FORWARD"])?;
    if !out.status.success() {
        return Err(NetError::Firewall(format!(
            "iptables -S FORWARD: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_rule)
        .collect())
}

/// `-A FORWARD -i sbr_1f -j ACCEPT` (how iptables -S prints our rule) →
/// `sbr_1f`; anything else → None.
fn parse_rule(line: &str) -> Option<String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["-A", "FORWARD", "-i", name, "-j", "ACCEPT"]
            if is_device_name(DeviceRole::Bridge, name) =>
        {
            Some((*name).to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rule;

    #[test]
    fn only_our_rule_shape() {
        assert_eq!(
            parse_rule("-A FORWARD -i sbr_1f -j ACCEPT").as_deref(),
            Some("sbr_1f")
        );
        assert_eq!(parse_rule("-A FORWARD -i eth0 -j ACCEPT"), None);
        assert_eq!(parse_rule("-A FORWARD -i sbr_1f -o x -j ACCEPT"), None);
        assert_eq!(parse_rule("-P FORWARD ACCEPT"), None);
    }
}
