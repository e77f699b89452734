#!/bin/bash
# Runs as root in `cargo xtask vm --kernel 6.1 --systemd` (bookworm, systemd as
# PID 1, no network): installs both packages, starts both services with mTLS
# between them, sends traffic through a watched veth, reloads with a good and a
# broken conduit map, stops, and checks the journal and the records. Argument:
# the workspace as the guest sees it (/host/...). Every wait has a deadline.
set -euo pipefail
WS=$1
DEBS=$WS/target/debian
VERSION=$2
step() { echo "== $*"; }
fail() { echo "FAIL: $*"; journalctl -u conduit-sensor -u conduit-collector --no-pager -o short-monotonic | tail -60; exit 1; }
# wait_for SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_for() {
	local deadline=$(( $(date +%s) + $1 )); shift
	until "$@" >/dev/null 2>&1; do
		[ "$(date +%s)" -lt "$deadline" ] || return 1
		sleep 0.2
	done
}

step "install"
dpkg -i "$DEBS/conduit-sensor_${VERSION}_amd64.deb" "$DEBS/conduit-collector_${VERSION}_amd64.deb"
id conduit-sensor && id conduit-collector
test -f /usr/share/man/man1/conduit-sensor-run.1.gz
test -f /usr/share/bash-completion/completions/conduit-collector
test -d /var/log/conduit-sensor -a -d /var/lib/conduit-collector/export
systemctl cat conduit-sensor.service | grep -q '^Type=notify'

step "PKI (sensor gw-test, collector localhost)"
pki=$(mktemp -d)
cd "$pki"
cat > ext.cnf <<EXT
[server]
subjectAltName=DNS:localhost,IP:127.0.0.1
[client]
subjectAltName=DNS:gw-test
EXT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca 2>/dev/null
for who in server:localhost client:gw-test; do
	name=${who%%:*}; cn=${who#*:}
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $name.key -out $name.csr -subj /CN=$cn 2>/dev/null
	openssl x509 -req -in $name.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $name.crt -days 2 -extfile ext.cnf -extensions $name 2>/dev/null
done
install -m 0644 ca.crt /etc/conduit-collector/tls/ca.crt
install -m 0644 server.crt /etc/conduit-collector/tls/server.crt
# root-only: the service reads it through LoadCredential=tls.key.
install -m 0600 server.key /etc/conduit-collector/tls/server.key
install -m 0644 ca.crt /etc/conduit-sensor/tls/ca.crt
install -m 0644 client.crt /etc/conduit-sensor/tls/sensor.crt
install -m 0640 -g conduit-sensor client.key /etc/conduit-sensor/tls/sensor.key

step "topology: ns ot (10.10.1.5) -- gw0 (watched) | gateway | gw1 -- ns out (192.0.2.10)"
sysctl -qw net.ipv4.ip_forward=1
ip netns add ot
ip netns add out
ip link add gw0 type veth peer name ot0
ip link add gw1 type veth peer name out0
ip link set ot0 netns ot
ip link set out0 netns out
ip addr add 10.10.1.1/24 dev gw0
ip addr add 192.0.2.1/24 dev gw1
ip link set gw0 up
ip link set gw1 up
ip -n ot addr add 10.10.1.5/24 dev ot0
ip -n ot link set ot0 up
ip -n ot route add default via 10.10.1.1
ip -n out addr add 192.0.2.10/24 dev out0
ip -n out link set out0 up
ip -n out route add default via 192.0.2.1

step "configuration"
cat > /etc/conduit-collector/collector.yaml <<YAML
listen: "127.0.0.1:7443"
store: /var/lib/conduit-collector/store
tofu: true
tls:
  cert: /etc/conduit-collector/tls/server.crt
  client_ca: /etc/conduit-collector/tls/ca.crt
export:
  jsonl: /var/lib/conduit-collector/export/records.jsonl
YAML
cat > /etc/conduit-sensor/sensor.yaml <<YAML
sensor_id: gw-test
interfaces: [gw0]
conduits: /etc/conduit-sensor/conduits.yaml
record_all: true
collector:
  url: https://localhost:7443
  tls:
    cert: /etc/conduit-sensor/tls/sensor.crt
    key: /etc/conduit-sensor/tls/sensor.key
    ca: /etc/conduit-sensor/tls/ca.crt
jsonl: /var/log/conduit-sensor/records.jsonl
timeouts:
  idle: 2s
checkpoint:
  every_seconds: 5
YAML
conduit-sensor check-config
conduit-collector check-config && fail "check-config as root without the credential should name the key"  || true

step "start (Type=notify: returns once READY=1)"
systemctl start conduit-collector.service || fail "collector did not start"
systemctl start conduit-sensor.service || fail "sensor did not start"
systemctl is-active conduit-collector.service conduit-sensor.service
systemctl show -p StatusText --value conduit-sensor.service
ip -d link show gw0 | grep -q xdp || fail "no XDP program on gw0 after READY"

step "traffic: UDP and TCP from 10.10.1.5 to 192.0.2.10, routed through gw0"
for i in $(seq 1 5); do
	ip netns exec ot bash -c "echo hello-$i > /dev/udp/192.0.2.10/5353" || true
	ip netns exec ot timeout 5 bash -c "exec 3<>/dev/tcp/192.0.2.10/80" 2>/dev/null || true
done
wait_for 60 grep -q '"ip":"10.10.1.5"' /var/log/conduit-sensor/records.jsonl || fail "no flow record for 10.10.1.5 in the JSONL side file"

step "reload with a good map"
sed -i 's/^site: plant-01/site: plant-02/' /etc/conduit-sensor/conduits.yaml
systemctl reload conduit-sensor.service || fail "good reload failed"
wait_for 30 sh -c "systemctl show -p StatusText --value conduit-sensor.service | grep -q 'reload applied'" || fail "no 'reload applied' status"
systemctl show -p StatusText --value conduit-sensor.service
good_status=$(systemctl show -p StatusText --value conduit-sensor.service)

step "reload with a broken map: the agent rejects it, systemctl reload fails, the old map stays"
# No check before the SIGHUP: ExecReload= (conduit-sensor reload) reports what the
# agent itself did with the map, so a map that breaks at any moment is caught.
cp /etc/conduit-sensor/conduits.yaml /tmp/good.yaml
printf 'zones:\n  - id: [broken\n' >> /etc/conduit-sensor/conduits.yaml
if systemctl reload conduit-sensor.service; then fail "a broken map reloaded successfully"; fi
systemctl is-active conduit-sensor.service || fail "the sensor stopped after a rejected reload"
bad_status=$(systemctl show -p StatusText --value conduit-sensor.service)
echo "$bad_status"
echo "$bad_status" | grep -q 'RELOAD FAILED' || fail "the status does not say the reload failed"
policy() { echo "$1" | grep -o 'policy [0-9a-f]*'; }
[ "$(policy "$bad_status")" = "$(policy "$good_status")" ] || fail "the policy changed after a rejected reload"
journalctl -u conduit-sensor --no-pager -o cat | grep -q 'the agent rejected the reload' || fail "ExecReload did not report the agent's rejection"
cat /run/conduit-sensor/reload.status
cp /tmp/good.yaml /etc/conduit-sensor/conduits.yaml
systemctl reload conduit-sensor.service || fail "the reload after the repair failed"

step "stop (SIGTERM drains, exit 0)"
systemctl stop conduit-sensor.service
systemctl stop conduit-collector.service
for u in conduit-sensor conduit-collector; do
	r=$(systemctl show -p Result --value $u.service)
	s=$(systemctl show -p ExecMainStatus --value $u.service)
	echo "$u: Result=$r ExecMainStatus=$s"
	[ "$r" = success ] && [ "$s" = 0 ] || fail "$u did not stop cleanly"
done

step "journal: no ANSI, priorities"
journalctl -u conduit-sensor -u conduit-collector --no-pager -o cat > /tmp/journal.txt
if grep -q $'\x1b' /tmp/journal.txt; then fail "ANSI escapes in the journal"; fi
if grep -q '^<[0-7]>' /tmp/journal.txt; then fail "priority prefixes not consumed by journald"; fi
journalctl -u conduit-sensor --no-pager -o cat -p err | grep -q 'broken\|conduits.yaml' || fail "the rejected reload's error has no error priority"
journalctl -u conduit-sensor --no-pager -o cat -p info..info | grep -q 'attached' || fail "info lines are not priority info"
journalctl -u conduit-sensor --no-pager -o cat -p warning..warning | grep -q 'starting a new record chain' || fail "the sensor's warning is not priority warning"
journalctl -u conduit-collector --no-pager -o cat -p warning..warning | grep -q 'trusting a new sensor key' || fail "the collector's warning is not priority warning"
echo "warnings and errors:"; journalctl -u conduit-sensor -u conduit-collector --no-pager -o cat -p warning | head -20

step "records verify"
conduit-sensor verify-chain /var/lib/conduit-sensor/spool
conduit-collector verify --store /var/lib/conduit-collector/store
grep -c '"action":"flow_' /var/lib/conduit-collector/export/records.jsonl
echo "PACKAGE TEST PASSED"
