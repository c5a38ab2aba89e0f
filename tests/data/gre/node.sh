# Compute node of tests/gre_nodes.rs; sourced by the node VM's user_data
# after the test's variables:
#   NODE_IP     this node's compute address (10.99.0.11)
#   COMPUTE     the compute CIDR netnode is started with
#   CNCI_IPS    concentrator addresses to wait for on the underlay
#   SPECS       netnode instance specs (one a word)
#   INSTANCES   lines "veth ip/prefix gateway": instance namespaces to make
#   CHECKS      lines "ok|fail from-veth to-ip": pings from an instance
# Every line for the test starts with GRE-; netnode's own with NETNODE-.
say() { echo "GRE-$*"; }
G=/mnt/config/gre
# netnode finds the iptables stand-in on PATH. busybox sh prefers its own
# applets to PATH, so iproute2's ip (for gretap, -d, netns) is a function.
PATH=$G/bin:$PATH
export PATH
ip() { "$G/bin/ip" "$@"; }

# 1. Underlay: the one NIC, towards the CNCI stand-in.
ip addr add "$NODE_IP/24" dev eth0
ip link set eth0 up
for c in $CNCI_IPS; do
  i=0
  until ping -c 1 -W 1 "$c" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 90 ] || { say "UNDERLAY $c fail"; exit 1; }
  done
  say "UNDERLAY $c ok"
done

# 2. netnode: init, create_vnic per instance; it waits on the fifo for the
# go-ahead to delete (the test sends it over the second serial port).
mkfifo /run/netnode.ctl
# shellcheck disable=SC2086 # one spec a word
netnode --compute "$COMPUTE" $SPECS </run/netnode.ctl 2>&1 | tee /run/netnode.out &
exec 3>/run/netnode.ctl
i=0
until grep -q 'NETNODE-READY\|NETNODE-ERROR' /run/netnode.out 2>/dev/null; do
  i=$((i + 1))
  [ $i -lt 600 ] || { say "NETNODE-TIMEOUT"; exit 1; }
  sleep 0.1
done
grep -q NETNODE-READY /run/netnode.out || exit 1
# Not the fallback gretap0 of the built-in driver.
ip -d -o link show type gretap | grep -v ': gretap0@' | sed 's/^/GRE-LINK /'

# 3. The instances: a namespace each (held by a sleeping process) with the
# instance end of the veth netnode put on the tenant bridge.
echo "$INSTANCES" | while read -r veth addr gw; do
  [ -n "$veth" ] || continue
  unshare -n sleep 100000 </dev/null >/dev/null 2>&1 &
  pid=$!
  echo "$pid" >"/run/inst.$veth"
  i=0
  until [ "$(readlink /proc/$pid/ns/net)" != "$(readlink /proc/self/ns/net)" ]; do
    i=$((i + 1)); [ $i -lt 100 ] || break; sleep 0.05
  done
  ip link set "$veth" netns "$pid"
  nsenter -t "$pid" -n "$G/bin/ip" link set lo up
  nsenter -t "$pid" -n "$G/bin/ip" addr add "$addr" dev "$veth"
  nsenter -t "$pid" -n "$G/bin/ip" link set "$veth" up
  nsenter -t "$pid" -n "$G/bin/ip" route add default via "$gw"
  say "INSTANCE $veth $addr pid=$pid"
done

# 4. The pings: "ok" ones retry (the other node may still be booting),
# "fail" ones get three chances to go through.
echo "$CHECKS" | while read -r want from to; do
  [ -n "$want" ] || continue
  pid=$(cat "/run/inst.$from")
  tries=3
  [ "$want" = ok ] && tries=120
  got=fail
  i=0
  while [ $i -lt $tries ]; do
    if nsenter -t "$pid" -n ping -c 1 -W 1 "$to" >/dev/null 2>&1; then got=ok; break; fi
    i=$((i + 1))
  done
  say "PING $from $to want=$want got=$got"
done
say CHECKS-DONE

# 5. Wait for the test's go-ahead, then netnode deletes every VNIC.
stty -F /dev/ttyS1 -echo 2>/dev/null
read -r _go </dev/ttyS1
echo delete >&3
exec 3>&-
wait
left=$(ip -o link | grep -o 'sbr_[0-9a-f]*\|sgt_[0-9a-f]*\|svn_[0-9a-f]*' | tr '\n' ' ')
say "AFTER-DELETE [${left% }]"
say NODE-DONE
