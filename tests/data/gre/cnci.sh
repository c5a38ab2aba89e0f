# CNCI stand-in of tests/gre_nodes.rs (what a concentrator does for its
# tenants' subnets, by hand); sourced by the CNCI VM's user_data after:
#   UNDERLAY  addresses ("a.b.c.d/n" words) of the concentrators, on a
#             bridge of all NICs (one NIC per compute node)
#   BRIDGES   lines "name [gateway/prefix]": one bridge per tenant subnet
#   TUNNELS   lines "name bridge local remote key": gretap ends
say() { echo "GRE-$*"; }
G=/mnt/config/gre
# netnode finds the iptables stand-in on PATH. busybox sh prefers its own
# applets to PATH, so iproute2's ip (for gretap, -d, netns) is a function.
PATH=$G/bin:$PATH
export PATH
ip() { "$G/bin/ip" "$@"; }

ip link add ul0 type bridge
for n in /sys/class/net/eth*; do ip link set "${n##*/}" master ul0; ip link set "${n##*/}" up; done
ip link set ul0 up
for a in $UNDERLAY; do ip addr add "$a" dev ul0; done
echo "$BRIDGES" | while read -r br gw; do
  [ -n "$br" ] || continue
  ip link add "$br" type bridge
  ip link set "$br" up
  [ -z "$gw" ] || ip addr add "$gw" dev "$br"
done
echo "$TUNNELS" | while read -r t br local remote key; do
  [ -n "$t" ] || continue
  ip link add "$t" type gretap local "$local" remote "$remote" key "$key"
  ip link set "$t" master "$br"
  ip link set "$t" up
done
# Not the fallback gretap0 of the built-in driver.
ip -d -o link show type gretap | grep -v ': gretap0@' | sed 's/^/GRE-LINK /'
say CNCI-READY
